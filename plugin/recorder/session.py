"""One rank's recording session: the step protocol, the flusher thread and fault isolation.

The seam to vLLM (`moe_reuse.plugin.vllm`) drives four things, all off the forward except the
capture: `step_started()` when execute_model begins, `step_prepared(...)` once the batch layout is
known, `step_finished()` after sampling, and `record(slot, topk_ids)` (or `capture_fn(slot)`) from
each MoE layer's routing hook. This
module imports torch and numpy, never vLLM, so it can be driven and benchmarked with torch alone.

In a worker (`raw` given) the flusher only copies: finished slots and their step records go to the
rank's raw ring, and a status (plain facts, errors, heartbeat) to the status file, once a flush
interval; the reader derives everything else in another process. Without `raw` (tests,
benchmarks, the GPU check) the reader's own code runs here on each flush and `publish` receives
whole snapshots.

A fault anywhere in here must never reach the engine: every entry point catches, disables the
session (the forward keeps running the two counting ops into the idle sink, which is harmless),
counts the error, logs one line, and keeps publishing a status that says `enabled = 0`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import faults
from .. import snapshot as snap_io
from .aggregate import COMM_OPS, BlockStats, ByteModel, StepMeta
from .ring import DECODE, PREFILL, RingLayout, RoutingRing

logger = logging.getLogger("vllm.moe_reuse")
assert (PREFILL, DECODE) == (0, 1)  # step_prepared uses the decode flag itself as the phase

Publisher = Callable[[dict[str, Any]], None]
BlockListener = Callable[[BlockStats, dict[str, np.ndarray], "RecorderSession"], None]


# Benchmarks only (bench_overhead --ablation): how much of the session runs. "protocol" consumes
# each slot as soon as its step finishes (no copy); "copy" copies finished slots off the device but
# derives, folds and publishes nothing; "" is the whole session. (Capture-only skips the step
# protocol, so it is decided where the session is bound, not here.)
ABLATIONS = ("", "protocol", "copy")


class InjectedFault(RuntimeError):
    """Raised on purpose by `inject_fault_after_steps` (tests of fault isolation)."""


class RecorderSession:
    def __init__(
        self,
        layout: RingLayout,
        bytes_model: ByteModel,
        *,
        device: torch.device | str = "cpu",
        labels: dict[str, str],
        info: dict[str, str],
        layer_ids: list[int],
        publish: Publisher,
        raw: Any = None,
        flush_interval_s: float = 1.0,
        inject_fault_after_steps: int = 0,
        clock: Callable[[], int] = time.perf_counter_ns,
        ablate: str = "",
    ) -> None:
        self.layout = layout
        self.bytes_model = bytes_model
        self.ring = RoutingRing(layout, device)
        self.meta = StepMeta(layout.ring_steps)
        self.labels = dict(labels)
        self.info = dict(info)
        self.layer_ids = list(layer_ids)
        self.publish = publish
        self.raw = raw  # a RawWriter: the worker's mode (else the figures are derived in-process)
        self.dropped_steps = 0  # ring full: steps never recorded
        self.status_extra: dict[str, Any] = {}  # plain facts for the reader (worker_runtime)
        self.status_hooks: list[Callable[[RecorderSession], None]] = []
        self._bm_dict: tuple[Any, dict[str, Any]] = (None, {})
        self._status_at = 0.0
        self.flush_interval_s = flush_interval_s
        self.inject_after = inject_fault_after_steps
        self.clock = clock
        if ablate not in ABLATIONS:
            raise ValueError(f"ablate must be one of {ABLATIONS}, got {ablate!r}")
        self.ablate = ablate
        self.enabled = True
        self.reason = "recording"  # why `enabled` is what it is (exported as a label)
        self.errors: dict[str, int] = {}
        self.degraded: set[str] = set()  # parts that failed while recording goes on
        self.gauges: dict[str, Any] = {}
        self._lock = threading.Lock()  # serialises flushes (thread vs close)
        self._steps_begun = 0  # steps given a ring slot (== completed once finished)
        self._completed = 0
        self._read = 0
        self._in_step = False
        self._recording = False
        self._t0 = 0
        self._slot = 0
        self._comm_ns = np.zeros(len(COMM_OPS), dtype=np.int64)
        self._comm_dirty = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host = torch.empty(
            (layout.num_layers, layout.ring_steps, 3, layout.columns), dtype=torch.int32,
            pin_memory=self.ring.device.type == "cuda",
        )
        # Fixed at start-up; exported so a soak can show they never grow.
        self.gauges["buffer_bytes"] = {
            "doc": "Bytes of the recorder's buffers, allocated once at start-up: the device "
                   "ring (counters, token map, staging), the host copy the flusher reads into "
                   "and the per-step layouts (step_meta).",
            "labels": ["buffer"],
            "samples": [(("device_ring",), float(self.ring.nbytes())),
                        (("host_copy",), float(self._host.numel() * self._host.element_size())),
                        (("step_meta",), float(self.meta.nbytes()))]
                       + ([(("raw_ring",), float(raw.nbytes()))] if raw is not None else []),
        }
        self.reader: Any = None
        if raw is None:
            # In-process mode (tests, benchmarks, the GPU check): the reader's own code, run here
            # on each flush. Imported here: the worker's mode never loads it.
            from ..reader.rank import RankReader

            self.reader = RankReader(self.status())

    # ---- binding -----------------------------------------------------------------------------
    def record(self, layer_slot: int, topk_ids: torch.Tensor) -> None:
        """Count one MoE layer's routing (inside the forward: tensor ops only)."""
        self.ring.capture(layer_slot, topk_ids)

    def capture_fn(self, layer_slot: int) -> Callable[[torch.Tensor], None]:
        ring = self.ring

        def capture(topk_ids: torch.Tensor) -> None:
            ring.capture(layer_slot, topk_ids)

        return capture

    # ---- step protocol (engine thread, between forwards) ---------------------------------------
    def step_started(self) -> None:
        if self.enabled:
            self._t0 = self.clock()
            self._in_step = True

    def step_prepared(
        self,
        num_scheduled: np.ndarray,
        is_decode: np.ndarray,
        num_computed: np.ndarray,
        scheduled_total: int = -1,
    ) -> None:
        """Batch layout in batch order (one entry per request); vectorised, no token loop.

        `is_decode`: the request is past its prefill; `num_computed`: tokens already in its KV
        cache; `scheduled_total`: the scheduler's own token count for the step (the self-check's
        expected side; -1 takes the layout's sum).
        """
        if not (self.enabled and self._in_step):
            return
        try:
            lay = self.layout
            if self._steps_begun - self._read >= lay.ring_steps:
                self.dropped_steps += 1  # ring full: never overwrite an unread slot
                self._recording = False
                return
            slot = self._steps_begun % lay.ring_steps
            if self._recording:  # the last step was prepared but never finished: its counts
                self.ring.clear_slot(slot)  # are in this slot, which no flush will zero
            self.ring.begin_requests(slot, is_decode, num_scheduled, scheduled_total)
            # raw copies; the per-phase figures are derived by the flusher (StepMeta.derive)
            self.meta.record(slot, num_scheduled, is_decode, num_computed, scheduled_total,
                             self.bytes_model)
            if self._comm_dirty:  # collectives timed outside a step are not this step's
                self._clear_comm()
            self._slot = slot
            self._recording = True
        except Exception as exc:  # noqa: BLE001 - never let the plugin stop serving
            self.fault("step_prepared", exc)

    def add_comm_ns(self, op: int, ns: int) -> None:
        """Called from the timed collective (host time) during the forward."""
        self._comm_ns[op] += ns
        self._comm_dirty = True

    def _clear_comm(self) -> None:
        self._comm_ns[:] = 0
        self._comm_dirty = False

    def step_finished(self) -> None:
        if not self._in_step:
            return
        self._in_step = False
        if not (self.enabled and self._recording):
            return
        self._recording = False
        try:
            self.ring.end_step()
            self.ring.mark_step_done()
            slot = self._slot
            self.meta.finish(slot, self.clock() - self._t0)
            if self._comm_dirty:  # most steps time no collective (one rank; compiled graphs)
                self.meta.comm_ns[slot] = self._comm_ns  # the flusher zeroes what it takes
                self._clear_comm()
            self._steps_begun += 1
            self._completed = self._steps_begun
            if self.inject_after and self._completed >= self.inject_after:
                raise InjectedFault(f"inject_fault_after_steps={self.inject_after} reached")
            if self.ablate == "protocol":
                self._read = self._completed
                return
            if self._completed - self._read >= self.layout.ring_steps // 2:
                self._wake.set()
        except Exception as exc:  # noqa: BLE001
            self.fault("step_finished", exc)

    # ---- faults --------------------------------------------------------------------------------
    def fault(self, stage: str, exc: BaseException) -> None:
        """Disable recording, count the error, log once. Never raises."""
        try:
            first = self.enabled
            self.enabled = False
            self.reason = "fault"
            self.errors[stage] = self.errors.get(stage, 0) + 1
            with contextlib.suppress(Exception):
                self.ring.end_step()
            if first:
                logger.error(
                    "moe_reuse: disabled after a fault in %s: %s: %s (serving continues; see "
                    "moe_reuse_errors_total)", stage, type(exc).__name__, exc,
                )
            self._wake.set()
        except Exception:  # noqa: BLE001
            pass

    # ---- flushing (flusher thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moe_reuse-flusher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        if self.raw is not None and not self.ablate:
            self._publish_status(force=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            try:
                if self.enabled:
                    faults.check("flush")
                    self._fold_pending()
            except Exception as exc:  # noqa: BLE001
                self.fault("flush", exc)
            if self.ablate:
                return
            if self.raw is not None:
                self._publish_status()
                return
            snap_io.publish_counted(self.publish, self.snapshot, self.errors, self.degraded)

    def _publish_status(self, force: bool = False) -> None:
        """Worker mode: the status the reader needs, once a flush interval (the raw steps went to
        the ring already). Its hooks add facts known only later (KV capacity, EP placement)."""
        now = time.monotonic()
        if not force and now - self._status_at < self.flush_interval_s * 0.9:
            return
        self._status_at = now
        for hook in self.status_hooks:
            try:
                hook(self)
            except Exception as exc:  # noqa: BLE001 - a missing fact, not a broken recorder
                self.errors["status"] = self.errors.get("status", 0) + 1
                logger.debug("moe_reuse: status hook failed: %s", exc)
        snap_io.publish_counted(self.publish, self.status, self.errors, self.degraded)

    def _fold_pending(self) -> None:
        """Copy the finished slots off the device (one batched copy), derive their step records,
        and hand both on: to the raw ring (worker) or to the in-process reader."""
        S = self.layout.ring_steps
        done, read = self._completed, self._read
        n = done - read
        if n <= 0:
            return
        start = read % S
        ranges = [(start, min(start + n, S))]
        if start + n > S:
            ranges.append((0, start + n - S))
        host = self._host
        offset = 0
        for a, b in ranges:
            ev = self.ring.read_range(a, b, host[:, offset : offset + b - a])
            if ev is not None:
                self.ring.note_copied(list(range(a, b)), ev)
                ev.synchronize()  # this thread waits; the engine's stream never does
            offset += b - a
        if self.ablate == "copy":
            self._read = done
            return
        for a, b in ranges:
            dev_ns = self.ring.device_durations_ns(a, b)
            if dev_ns is not None:  # CUDA: the step as the stream ran it, not the host's span
                seg = self.meta.duration_ns[a:b]
                seg[dev_ns >= 0] = dev_ns[dev_ns >= 0]
            comm_ns = self.ring.device_comm_ns(a, b)
            if comm_ns is not None:  # CUDA, opt-in: collectives timed by the GPU's clock
                self.meta.comm_ns[a:b] = comm_ns
            self.meta.derive(a, b, self.bytes_model)
        meta_parts = [self.meta.take(a, b) for a, b in ranges]
        for a, b in ranges:  # step_finished writes a slot's collective time only when there was some
            self.meta.comm_ns[a:b] = 0
        meta = {k: np.concatenate([p[k] for p in meta_parts]) for k in meta_parts[0]}
        counts = host[:, :n].numpy()
        if self.raw is not None:
            self.raw.append(counts, meta)
        else:
            self.reader.bytes_model = self.bytes_model
            self.reader.add_block(counts, meta)
        self._read = done

    @property
    def totals(self) -> Any:
        """In-process mode: the reader's totals (the worker's mode keeps none)."""
        return None if self.reader is None else self.reader.totals

    @property
    def listeners(self) -> list[BlockListener]:
        return [] if self.reader is None else self.reader.listeners

    def status(self) -> dict[str, Any]:
        """What the reader needs from this worker, as plain data (refreshed every flush)."""
        return {
            "version": 1,
            "time": time.time(),
            "pid": os.getpid(),
            "labels": dict(self.labels),
            "info": dict(self.info),
            "layer_ids": list(self.layer_ids),
            "num_experts": self.layout.num_experts,
            "top_k": self.layout.top_k,
            "enabled": bool(self.enabled),
            "reason": self.reason,
            "errors": dict(self.errors),
            "degraded": sorted(self.degraded),
            "dropped_steps": int(self.dropped_steps),
            "byte_model": self._byte_model_dict(),
            "gauges": dict(self.gauges),
            "raw": self.raw.name if self.raw is not None else "",
            "totals": {},
            **self.status_extra,
        }

    def _byte_model_dict(self) -> dict[str, Any]:
        if self._bm_dict[0] is not self.bytes_model:  # asdict deep-copies: once per change
            self._bm_dict = (self.bytes_model, dataclasses.asdict(self.bytes_model))
        return self._bm_dict[1]

    def snapshot(self) -> dict[str, Any]:
        """In-process mode: the exported snapshot, derived here by the reader's code."""
        if self.reader is None:
            raise RuntimeError("a worker-mode session exports through its reader, not here")
        self.reader.bytes_model = self.bytes_model
        self.reader.update_status(self.status())
        snap: dict[str, Any] = self.reader.snapshot()
        return snap
