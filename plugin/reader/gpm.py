"""HBM bandwidth as the GPU measured it: NVML's GPU performance monitoring (GPM), per device.

The byte model says what a step *had to* read; GPM's DRAM-bandwidth metric says what the memory
system *did* move, whatever moved it (weights, KV, activations, other processes). Exported side by
side they show the user whether the model's bytes are the bytes the hardware saw.

GPM (Hopper and newer, `nvmlGpmQueryDeviceSupport`) reports DRAM bandwidth as a percentage of the
device's theoretical peak between two samples. The peak comes from NVML itself (memory bus width x
maximum memory clock x 2, double data rate), so the measured figure does not depend on the
hardware spec the predictor uses. Sampling is two NVML calls per window, in the reader, never in
the worker: the step never waits on it.

Optional: without `nvidia-ml-py`, on a device without GPM, or when NVML fails, the sampler says
why (`reason`) and returns nothing; callers export that reason, never a zero.

`GpmSampler` is one device, sample to sample; `HbmMeter` is one rank's measured traffic as
counters (bytes and the seconds they cover), sampled by the reader at most once per live window
(`RankReader.measure_hbm`, called on every reader poll), exported by `exporters.prometheus`.

`nvml` is the `pynvml` module or a stand-in with the same functions (unit tests).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("vllm.moe_reuse")

MEASURING = "gpm"
NVML_MISSING = "nvml_missing"  # nvidia-ml-py not installed
NVML_FAILED = "nvml_failed"  # nvmlInit or a device query failed
DEVICE_NOT_FOUND = "device_not_found"  # no NVML device with the worker's UUID
GPM_UNSUPPORTED = "gpm_unsupported"  # pre-Hopper, or GPM disabled (some virtualised GPUs)
NOT_CUDA = "not_cuda"  # the rank does not run on an NVIDIA GPU
REASONS = (MEASURING, NVML_MISSING, NVML_FAILED, DEVICE_NOT_FOUND, GPM_UNSUPPORTED, NOT_CUDA)

_DRAM_BW_UTIL = 10  # NVML_GPM_METRIC_DRAM_BW_UTIL: percent of theoretical DRAM bandwidth
_CLOCK_MEM = 2  # NVML_CLOCK_MEM
# NVMLError values that mean "this device or driver has no GPM", not "NVML is broken"
_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED
_FUNCTION_NOT_FOUND = 13  # NVML_ERROR_FUNCTION_NOT_FOUND: a driver older than the GPM API


@dataclass(frozen=True)
class BandwidthSample:
    """DRAM traffic over one window, as GPM measured it."""

    window_seconds: float
    utilization_ratio: float  # 0-1 of the peak below
    peak_bytes_per_second: float

    @property
    def bytes_per_second(self) -> float:
        return self.utilization_ratio * self.peak_bytes_per_second

    @property
    def bytes(self) -> float:
        """Bytes moved over the window (read and written: GPM does not split them)."""
        return self.bytes_per_second * self.window_seconds


def load_nvml() -> Any:
    """The `pynvml` module of nvidia-ml-py, or None when it is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def normalise_uuid(uuid: str) -> str:
    """A GPU UUID as hex digits only: NVML says "GPU-3d6f4bfa-...", torch "3d6f4bfa-..."."""
    return re.sub(r"[^0-9a-f]", "", uuid.lower().removeprefix("gpu-"))


class GpmSampler:
    """One device's DRAM bandwidth, sample to sample. Never raises.

    `uuid`: the device as the worker saw it (`torch.cuda.get_device_properties(i).uuid`, with or
    without NVML's "GPU-" prefix); None takes NVML device `index`. Each `sample()` returns the
    bandwidth since the previous call (None on the first call and whenever GPM cannot answer).
    """

    def __init__(self, uuid: str | None = None, index: int = 0, *, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.reason = NVML_MISSING
        self.detail = ""
        self._nvml = nvml if nvml is not None else load_nvml()
        self._initialised = False  # nvmlInit succeeded: close() owes one nvmlShutdown
        self._handle: Any = None
        self._prev: Any = None
        self._prev_t = 0.0
        self.peak_bytes_per_second = 0.0
        self.device_name = ""
        if self._nvml is None:
            self.detail = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            self._open(uuid, index)
        except Exception as exc:  # noqa: BLE001 - an optional measurement, never the reader
            self._fail(NVML_FAILED, f"{type(exc).__name__}: {exc}")

    @property
    def available(self) -> bool:
        return self.reason == MEASURING and self._handle is not None

    def _fail(self, reason: str, detail: str) -> None:
        """Stop measuring for good: say why, give back the held sample and NVML itself."""
        self.reason, self.detail = reason, detail
        self._handle = None
        self.close()
        logger.info("moe_reuse: measured HBM bandwidth unavailable (%s): %s", reason, detail)

    def _open(self, uuid: str | None, index: int) -> None:
        nv = self._nvml
        nv.nvmlInit()
        self._initialised = True
        handle = None
        if uuid:
            want = normalise_uuid(uuid)
            for i in range(int(nv.nvmlDeviceGetCount())):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                if normalise_uuid(_text(nv.nvmlDeviceGetUUID(h))) == want:
                    handle = h
                    break
            if handle is None:
                self._fail(DEVICE_NOT_FOUND, f"no NVML device has UUID {uuid} (a MIG instance, "
                                             "or a GPU this process's NVML does not see)")
                return
        else:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        try:
            support = nv.nvmlGpmQueryDeviceSupport(handle)
        except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported / FunctionNotFound
            if getattr(exc, "value", None) not in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                raise
            support = None
        if not getattr(support, "isSupportedDevice", 0):
            self._fail(GPM_UNSUPPORTED, "the device does not support GPU performance monitoring "
                                        "(Hopper or newer, not disabled by the hypervisor)")
            return
        bus_bits = int(nv.nvmlDeviceGetMemoryBusWidth(handle))
        mem_mhz = int(nv.nvmlDeviceGetMaxClockInfo(handle, _CLOCK_MEM))
        self.peak_bytes_per_second = bus_bits / 8 * mem_mhz * 1e6 * 2
        if self.peak_bytes_per_second <= 0:
            raise RuntimeError(f"NVML reports a memory bus of {bus_bits} bits at {mem_mhz} MHz")
        self.device_name = _text(nv.nvmlDeviceGetName(handle))
        self._handle = handle
        self.reason, self.detail = MEASURING, ""

    def _take(self) -> Any:
        s = self._nvml.nvmlGpmSampleAlloc()
        try:
            self._nvml.nvmlGpmSampleGet(self._handle, s)
        except Exception:
            self._free(s)
            raise
        return s

    def sample(self) -> BandwidthSample | None:
        """Bandwidth since the previous call; None on the first call or when GPM fails."""
        if self._handle is None:
            return None
        nv = self._nvml
        try:
            now, cur = self.clock(), self._take()
        except Exception as exc:  # noqa: BLE001
            self._fail(NVML_FAILED, f"nvmlGpmSampleGet: {type(exc).__name__}: {exc}")
            return None
        prev, prev_t = self._prev, self._prev_t
        self._prev, self._prev_t = cur, now
        if prev is None:
            return None
        try:
            mg = nv.c_nvmlGpmMetricsGet_t()
            mg.version = nv.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = 1
            mg.sample1, mg.sample2 = prev, cur
            mg.metrics[0].metricId = _DRAM_BW_UTIL
            nv.nvmlGpmMetricsGet(mg)
            metric = mg.metrics[0]
            if int(getattr(metric, "nvmlReturn", 0)) != 0:
                raise RuntimeError(f"DRAM_BW_UTIL returned NVML error {int(metric.nvmlReturn)}")
            util = float(metric.value) / 100.0
            failed = ""
        except Exception as exc:  # noqa: BLE001
            failed = f"nvmlGpmMetricsGet: {type(exc).__name__}: {exc}"
        self._free(prev)
        if failed:
            self._fail(NVML_FAILED, failed)
            return None
        return BandwidthSample(max(now - prev_t, 0.0), min(max(util, 0.0), 1.0),
                               self.peak_bytes_per_second)

    def _free(self, s: Any) -> None:
        with contextlib.suppress(Exception):  # nothing left to do with it
            self._nvml.nvmlGpmSampleFree(s)

    def close(self) -> None:
        """Free the held sample and shut NVML down (its init is reference-counted). Idempotent;
        the sampler measures nothing afterwards."""
        self._handle = None
        if self._prev is not None:
            self._free(self._prev)
            self._prev = None
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


class HbmMeter:
    """One rank's measured HBM traffic as counters: bytes moved and the seconds they cover.

    `device`: what the worker published about its accelerator (`{"type": "cuda", "uuid": ...}`,
    `worker_runtime.publish_facts`). Anything but an NVIDIA GPU is `not_cuda`, decided without
    importing pynvml. Otherwise one `GpmSampler` on the worker's UUID, primed at construction;
    `tick()` closes a window once `interval_s` has passed (the live window, `window_s`) and adds
    utilisation x NVML's peak x the window's seconds. Never raises: a failure becomes `reason`.
    """

    def __init__(self, device: Mapping[str, Any] | None, *, interval_s: float, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = float(interval_s)
        self.clock = clock
        self.bytes = 0.0
        self.seconds = 0.0
        self.windows = 0
        self.sampler: GpmSampler | None = None
        self._reason, self._detail = NOT_CUDA, ""
        device = device or {}
        kind, uuid = str(device.get("type") or ""), str(device.get("uuid") or "")
        try:
            if kind != "cuda":
                self._detail = (f"the rank runs on {kind}" if kind else
                                "the worker published no device (a worker older than the reader)")
            elif not uuid:
                self._reason = DEVICE_NOT_FOUND
                self._detail = "the worker could not read its GPU's UUID"
            else:
                self.sampler = GpmSampler(uuid, nvml=nvml, clock=clock)
                self.sampler.sample()  # the first window starts here
        except Exception as exc:  # noqa: BLE001 - GpmSampler never raises; belt and braces
            self._fail(exc)
        self._last = self.clock()

    @property
    def reason(self) -> str:
        return self.sampler.reason if self.sampler is not None else self._reason

    @property
    def detail(self) -> str:
        return self.sampler.detail if self.sampler is not None else self._detail

    @property
    def measuring(self) -> bool:
        return self.sampler is not None and self.sampler.available

    def _fail(self, exc: BaseException) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self._reason, self._detail = NVML_FAILED, f"{type(exc).__name__}: {exc}"

    def tick(self) -> bool:
        """Sample when a window is due; True when what `snapshot()` says changed."""
        if not self.measuring:
            return False
        try:
            now = self.clock()
            if now - self._last < self.interval_s:
                return False
            self._last = now
            assert self.sampler is not None
            s = self.sampler.sample()
            if s is None:
                return not self.measuring  # a failure is news; a sampler that answers nothing
            self.bytes += s.bytes
            self.seconds += s.window_seconds
            self.windows += 1
            return True
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return True

    def restore(self, prev: Mapping[str, Any] | None) -> None:
        """Carry the counters of an earlier reader of the same worker (`RunReader._resume`)."""
        if prev and self.measuring:
            self.bytes = float(prev.get("bytes", 0.0))
            self.seconds = float(prev.get("seconds", 0.0))

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the rank's snapshot (`exporters.prometheus` exports it)."""
        measuring = self.measuring
        return {
            "source": "gpm", "reason": self.reason, "detail": self.detail,
            "bytes": self.bytes if measuring else 0.0,
            "seconds": self.seconds if measuring else 0.0,
            "peak_bytes_per_second": (self.sampler.peak_bytes_per_second
                                      if measuring and self.sampler is not None else 0.0),
            "device": self.sampler.device_name if self.sampler is not None else "",
        }

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
