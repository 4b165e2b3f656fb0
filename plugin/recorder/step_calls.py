"""The step protocol's device calls: two small host-to-device copies and two events a step.

Why not torch's API: on a GPU worker, the host cost of the step protocol is almost all these
calls. Through torch, a 16-byte pinned copy goes through the dispatcher, TensorIterator and the
caching host allocator's event bookkeeping, and taking the current stream builds a Python object:
40 to 49 us a step on an H200 host's vCPU against 21 to 25 us for the same protocol with the ring
on that host's CPU (docs/gpu.md, benchmarks/results/bench_step_protocol-h200.txt). The driver
API does the same work in four plain calls a step (two `cuMemcpyHtoDAsync`, two
`cuEventRecord`), through ctypes, on pointers taken once at start-up.

Same semantics either way: the copies are stream-ordered and read pinned staging buffers that the
ring guards with its events; events stay torch's (`torch.cuda.Event`), so the flusher's reads
(`elapsed_time`, `query`, `wait_event`) are unchanged. `DriverCalls` falls back to `TorchCalls`
for good, with one log line, the first time a driver call fails, so the plugin never stops
counting over it.

Opt-in for now (`MOE_REUSE_STEP_CALLS=driver`): the driver path has run on the CPU only, through
a host stand-in for libcuda that checks every pointer and length against the counts
(tests/test_recorder.py); no GPU was lent since it was written. docs/gpu.md lists the one script
that measures it against torch's calls on a GPU and checks counts inside CUDA graphs; the default
moves to the driver once that has passed.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import torch

logger = logging.getLogger("vllm.moe_reuse")
ITEM = 8  # bytes of one tok_base element (int64)


class TorchCalls:
    """torch's API: the default, the driver path's fallback, and the ring's staged path on the
    CPU (tests)."""

    name = "torch"

    def __init__(self, device: torch.device, tok_base: torch.Tensor, stage: list[torch.Tensor],
                 idle_host: torch.Tensor, slot_at: int) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._tok = tok_base
        self._stage = stage
        # the slot elements as views made once (a view is a Python object a step would pay for)
        self._tok_slots = tok_base[slot_at:]
        self._stage_slots = [t[slot_at:] for t in stage]
        self._idle = idle_host

    def stream(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.on_cuda else None

    def copy_rows(self, i: int, upto: int, stream: Any) -> None:
        """Rows [0, upto) of staging buffer i to the device map (on the current stream)."""
        self._tok[:upto].copy_(self._stage[i][:upto], non_blocking=True)

    def copy_slot(self, i: int, stream: Any) -> None:
        """The two slot elements of staging buffer i."""
        self._tok_slots.copy_(self._stage_slots[i], non_blocking=True)

    def copy_idle(self) -> None:
        """The idle slot's two elements, on the current stream."""
        self._tok_slots.copy_(self._idle, non_blocking=True)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)


def _libcuda() -> Any:
    """The driver library with the three calls' prototypes, or None where it cannot load."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_void_p]
        lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuStreamWaitEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
    except (OSError, AttributeError):  # no driver library, or one without these symbols
        logger.warning("moe_reuse: MOE_REUSE_STEP_CALLS=driver, but libcuda.so.1 with "
                       "cuMemcpyHtoDAsync_v2 could not be loaded; using torch's calls")
        return None
    for fn in (lib.cuMemcpyHtoDAsync_v2, lib.cuEventRecord, lib.cuStreamWaitEvent):
        fn.restype = ctypes.c_int
    return lib


class DriverCalls(TorchCalls):
    """The same calls through the CUDA driver API, on pointers taken once (see module doc).

    `lib` and `raw_stream` are injectable so the pointer arithmetic runs in CPU tests, with a
    `memmove` standing in for the asynchronous copy."""

    name = "driver"

    def __init__(self, device: torch.device, tok_base: torch.Tensor, stage: list[torch.Tensor],
                 idle_host: torch.Tensor, slot_at: int, lib: Any,
                 raw_stream: Any = None) -> None:
        super().__init__(device, tok_base, stage, idle_host, slot_at)
        self._lib = lib
        self._memcpy = lib.cuMemcpyHtoDAsync_v2
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if self.on_cuda else 0)
        getter = raw_stream or torch._C._cuda_getCurrentRawStream
        self._raw = lambda: getter(index)
        self._tok_ptr = tok_base.data_ptr()
        self._stage_ptrs = [t.data_ptr() for t in stage]
        self._slot_off = slot_at * ITEM
        self._idle_ptr = idle_host.data_ptr()
        self.failed = ""  # the call that failed, once one has: every call is torch's then
        if self.on_cuda:
            self._probe(tok_base, idle_host, slot_at)

    def _probe(self, tok_base: torch.Tensor, idle_host: torch.Tensor, slot_at: int) -> None:
        """At start-up (a sync is fine here): one driver copy of the idle pair must land where
        torch's would, on the stream torch calls current; else torch's calls from the start."""
        try:
            if not self._copy(self._tok_ptr + self._slot_off, self._idle_ptr, 2 * ITEM,
                              self._raw()):
                return
            torch.cuda.current_stream(self.device).synchronize()
            if tok_base[slot_at:].tolist() != idle_host.tolist():
                self._fail("cuMemcpyHtoDAsync (probe: wrong bytes)", -1)
        except Exception as exc:  # noqa: BLE001 - a missing symbol or attribute: torch's calls
            self._fail(f"the driver probe ({type(exc).__name__}: {exc})", -1)

    def stream(self) -> Any:
        return super().stream() if self.failed else self._raw()

    def _fail(self, call: str, rc: int) -> None:
        self.failed = call
        logger.warning("moe_reuse: %s returned CUresult %d; the step protocol uses torch's "
                       "calls from now on (unset MOE_REUSE_STEP_CALLS to start that way)",
                       call, rc)

    def _copy(self, dst: int, src: int, nbytes: int, stream: Any) -> bool:
        """One driver copy; False, with torch's calls from then on, where it failed."""
        if self.failed:
            return False
        rc = self._memcpy(dst, src, nbytes, stream)
        if rc:
            self._fail("cuMemcpyHtoDAsync", rc)
        return rc == 0

    def copy_rows(self, i: int, upto: int, stream: Any) -> None:
        if not self._copy(self._tok_ptr, self._stage_ptrs[i], upto * ITEM, stream):
            super().copy_rows(i, upto, stream)

    def copy_slot(self, i: int, stream: Any) -> None:
        off = self._slot_off
        if not self._copy(self._tok_ptr + off, self._stage_ptrs[i] + off, 2 * ITEM, stream):
            super().copy_slot(i, stream)

    def copy_idle(self) -> None:
        if not self._copy(self._tok_ptr + self._slot_off, self._idle_ptr, 2 * ITEM, self._raw()):
            super().copy_idle()

    def record(self, event: Any, stream: Any) -> None:
        # 0 until torch first records it (it creates events lazily)
        handle = getattr(event, "cuda_event", 0)
        if not self.failed and handle:
            rc = self._lib.cuEventRecord(handle, stream)
            if rc == 0:
                return
            self._fail("cuEventRecord", rc)
        event.record(super().stream())

    def wait(self, stream: Any, event: Any) -> None:
        handle = getattr(event, "cuda_event", 0)
        if not self.failed and handle:
            rc = self._lib.cuStreamWaitEvent(stream, handle, 0)
            if rc == 0:
                return
            self._fail("cuStreamWaitEvent", rc)
        super().stream().wait_event(event)


def make(device: torch.device, tok_base: torch.Tensor, stage: list[torch.Tensor],
         idle_host: torch.Tensor, slot_at: int, driver: Any = None) -> TorchCalls:
    """Driver calls on CUDA when asked for (`MOE_REUSE_STEP_CALLS=driver`, see the module doc)
    and libcuda and torch's raw-stream getter are there; else torch's. `driver`: a stand-in
    library (tests), used on any device, on stream 0."""
    args = (device, tok_base, stage, idle_host, slot_at)
    if driver is not None:
        return DriverCalls(*args, lib=driver, raw_stream=lambda index: 0)
    if (device.type != "cuda" or os.environ.get("MOE_REUSE_STEP_CALLS", "").lower() != "driver"
            or not hasattr(torch._C, "_cuda_getCurrentRawStream")):
        return TorchCalls(*args)
    lib = _libcuda()
    return TorchCalls(*args) if lib is None else DriverCalls(*args, lib=lib)
