"""Measured HBM bandwidth (NVML GPM) with a stand-in NVML: the sampler, the rank's meter, the
reader's wiring and the exported families.

The stand-in has the functions of nvidia-ml-py's `pynvml` the sampler calls, with their shapes
(`nvmlGpmMetricsGet` fills `metrics[i].value` in percent, `nvmlGpmQueryDeviceSupport` returns a
struct with `isSupportedDevice`, errors carry `.value` like `NVMLError`), and counts what is
allocated and freed, initialised and shut down. nvidia-ml-py itself is not installed for the tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from moe_reuse.plugin import snapshot as snap_io
from moe_reuse.plugin.exporters.families import rank_series, snapshot_families
from moe_reuse.plugin.live.otel import families_to_points
from moe_reuse.plugin.reader import gpm
from moe_reuse.plugin.reader.gpm import GpmSampler, HbmMeter, normalise_uuid
from moe_reuse.plugin.reader.rank import RankReader
from moe_reuse.plugin.reader.service import RunReader
from moe_reuse.plugin.recorder import rawstream
from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession

UUID_A = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
UUID_B = "GPU-ffeeddcc-9999-8888-7777-666655554444"
BUS_BITS, MEM_MHZ = 5120, 2619  # H100 SXM: 5120-bit HBM3 at 2619 MHz
PEAK = BUS_BITS / 8 * MEM_MHZ * 1e6 * 2  # 3.35 TB/s


class NvmlError(Exception):
    """Like pynvml.NVMLError: the NVML return code in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class _Metric:
    def __init__(self) -> None:
        self.metricId, self.nvmlReturn, self.value = 0, 0, 0.0


class FakeNvml:
    """Two GPUs; device 1 (UUID_B) is the one the worker runs on in most tests."""

    NVML_GPM_METRICS_GET_VERSION = 1

    def __init__(self, *, util_percent: float = 40.0, supported: bool = True) -> None:
        self.util_percent = util_percent
        self.supported = supported
        self.support_raises: int | None = None  # an NVML error code from QueryDeviceSupport
        self.fail_init = self.fail_sample_get = self.fail_metrics = False
        self.metric_return = 0
        self.inits = self.shutdowns = 0
        self.allocs = self.frees = 0
        self.live: set[int] = set()
        self._next = 0
        self.uuids = [UUID_A, UUID_B]

        class MetricsGet:
            def __init__(self) -> None:
                self.version = self.numMetrics = 0
                self.sample1: Any = None
                self.sample2: Any = None
                self.metrics = [_Metric() for _ in range(4)]

        self.c_nvmlGpmMetricsGet_t = MetricsGet

    # ---- init and devices --------------------------------------------------------------------
    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NvmlError(9)  # NVML_ERROR_DRIVER_NOT_LOADED
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Any:
        return ("handle", i)

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return self.uuids[h[1]]

    def nvmlDeviceGetName(self, h: Any) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlGpmQueryDeviceSupport(self, h: Any) -> Any:
        if self.support_raises is not None:
            raise NvmlError(self.support_raises)
        return SimpleNamespace(version=1, isSupportedDevice=int(self.supported))

    def nvmlDeviceGetMemoryBusWidth(self, h: Any) -> int:
        return BUS_BITS

    def nvmlDeviceGetMaxClockInfo(self, h: Any, clock_type: int) -> int:
        assert clock_type == 2  # NVML_CLOCK_MEM
        return MEM_MHZ

    # ---- GPM ---------------------------------------------------------------------------------
    def nvmlGpmSampleAlloc(self) -> int:
        self._next += 1
        self.allocs += 1
        self.live.add(self._next)
        return self._next

    def nvmlGpmSampleFree(self, s: int) -> None:
        assert s in self.live, "freed twice or never allocated"
        self.live.discard(s)
        self.frees += 1

    def nvmlGpmSampleGet(self, h: Any, s: int) -> int:
        if self.fail_sample_get:
            raise NvmlError(999)  # NVML_ERROR_UNKNOWN
        return s

    def nvmlGpmMetricsGet(self, mg: Any) -> Any:
        if self.fail_metrics:
            raise NvmlError(999)
        assert mg.version == 1 and mg.numMetrics == 1
        assert mg.sample1 in self.live and mg.sample2 in self.live and mg.sample1 != mg.sample2
        m = mg.metrics[0]
        assert m.metricId == 10  # NVML_GPM_METRIC_DRAM_BW_UTIL
        m.nvmlReturn, m.value = self.metric_return, self.util_percent
        return mg


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Untouchable:
    """An NVML that must not be used at all (not_cuda is decided without it)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"NVML was touched: {name}")


def _balanced(nv: FakeNvml) -> None:
    assert nv.allocs == nv.frees and not nv.live, (nv.allocs, nv.frees, nv.live)
    assert nv.inits == nv.shutdowns, (nv.inits, nv.shutdowns)


# ---- the sampler ---------------------------------------------------------------------------------
def test_two_samples_give_utilisation_times_nvml_peak_over_the_clock_window() -> None:
    nv, clock = FakeNvml(util_percent=40.0), Clock()
    s = GpmSampler(UUID_B, nvml=nv, clock=clock)
    assert s.reason == gpm.MEASURING and s.available and s.detail == ""
    assert s.peak_bytes_per_second == pytest.approx(3.352e12, rel=1e-3) == PEAK
    assert s.device_name == "NVIDIA H100 80GB HBM3"
    assert s.sample() is None  # the first call only starts the window
    clock.t += 2.5
    got = s.sample()
    assert got is not None
    assert got.window_seconds == pytest.approx(2.5)
    assert got.utilization_ratio == pytest.approx(0.4)
    assert got.peak_bytes_per_second == PEAK
    assert got.bytes_per_second == pytest.approx(0.4 * PEAK)
    assert got.bytes == pytest.approx(0.4 * PEAK * 2.5)
    nv.util_percent = 130.0  # out of range: clamped, never above the peak
    clock.t += 1.0
    got = s.sample()
    assert got is not None and got.utilization_ratio == 1.0
    assert nv.allocs == 3 and nv.frees == 2  # one sample held for the next window
    s.close()
    s.close()  # idempotent
    _balanced(nv)
    assert s.sample() is None and not s.available


@pytest.mark.parametrize("uuid", [UUID_B, UUID_B.removeprefix("GPU-"), UUID_B.upper(),
                                  "ffeeddcc999988887777666655554444"])
def test_the_worker_uuid_matches_with_or_without_nvml_prefix(uuid: str) -> None:
    nv = FakeNvml()
    s = GpmSampler(uuid, nvml=nv)
    assert s.available
    assert s._handle == ("handle", 1)
    s.close()
    _balanced(nv)


def test_normalise_uuid() -> None:
    assert normalise_uuid("GPU-AbC-1") == normalise_uuid("abc1") == "abc1"


def test_index_when_no_uuid_is_given() -> None:
    nv = FakeNvml()
    s = GpmSampler(index=0, nvml=nv)
    assert s.available and s._handle == ("handle", 0)
    s.close()


def test_an_unknown_uuid_is_device_not_found() -> None:
    nv = FakeNvml()
    s = GpmSampler("GPU-12345678-0000-0000-0000-000000000000", nvml=nv)
    assert s.reason == gpm.DEVICE_NOT_FOUND and not s.available
    assert "12345678" in s.detail
    assert s.sample() is None
    _balanced(nv)  # nvmlInit was given back at once


def test_a_device_without_gpm_is_gpm_unsupported() -> None:
    nv = FakeNvml(supported=False)
    s = GpmSampler(UUID_B, nvml=nv)
    assert s.reason == gpm.GPM_UNSUPPORTED and s.sample() is None
    _balanced(nv)
    for code in (3, 13):  # NOT_SUPPORTED, FUNCTION_NOT_FOUND (a driver without the GPM API)
        nv = FakeNvml()
        nv.support_raises = code
        assert GpmSampler(UUID_B, nvml=nv).reason == gpm.GPM_UNSUPPORTED
        _balanced(nv)


def test_other_nvml_errors_on_the_support_query_are_nvml_failed() -> None:
    nv = FakeNvml()
    nv.support_raises = 15  # GPU_IS_LOST
    s = GpmSampler(UUID_B, nvml=nv)
    assert s.reason == gpm.NVML_FAILED and "NvmlError" in s.detail
    _balanced(nv)


def test_nvml_failing_at_init_is_nvml_failed_not_an_exception() -> None:
    nv = FakeNvml()
    nv.fail_init = True
    s = GpmSampler(UUID_B, nvml=nv)
    assert s.reason == gpm.NVML_FAILED and "NvmlError" in s.detail
    assert s.sample() is None
    assert nv.inits == nv.shutdowns == 0  # a failed init owes no shutdown


@pytest.mark.parametrize("where", ["sample_get", "metrics", "metric_return"])
def test_nvml_failing_at_a_sample_is_nvml_failed_and_frees_everything(where: str) -> None:
    nv, clock = FakeNvml(), Clock()
    s = GpmSampler(UUID_B, nvml=nv, clock=clock)
    assert s.sample() is None
    clock.t += 1.0
    if where == "sample_get":
        nv.fail_sample_get = True
    elif where == "metrics":
        nv.fail_metrics = True
    else:
        nv.metric_return = 3
    assert s.sample() is None
    assert s.reason == gpm.NVML_FAILED and not s.available
    assert s.sample() is None  # and stays so, quietly
    _balanced(nv)


def test_without_nvidia_ml_py_the_reason_is_nvml_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert gpm.load_nvml() is None
    s = GpmSampler(UUID_B)
    assert s.reason == gpm.NVML_MISSING and "nvidia-ml-py" in s.detail
    assert s.sample() is None
    s.close()
    m = HbmMeter({"type": "cuda", "uuid": UUID_B}, interval_s=1.0)
    assert m.reason == gpm.NVML_MISSING and not m.measuring


# ---- the rank's meter ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", [{"type": "cpu", "uuid": ""}, {"type": "rocm", "uuid": ""},
                                    {}, None])
def test_not_cuda_without_touching_nvml(device: dict[str, str] | None) -> None:
    m = HbmMeter(device, interval_s=1.0, nvml=Untouchable())
    assert m.reason == gpm.NOT_CUDA and not m.measuring and m.detail
    assert m.tick() is False
    snap = m.snapshot()
    assert snap["reason"] == "not_cuda" and snap["bytes"] == snap["seconds"] == 0.0
    m.close()


def test_cuda_without_a_uuid_is_device_not_found() -> None:
    m = HbmMeter({"type": "cuda", "uuid": ""}, interval_s=1.0, nvml=Untouchable())
    assert m.reason == gpm.DEVICE_NOT_FOUND


def test_the_meter_samples_once_per_window_and_sums_bytes_and_seconds() -> None:
    nv, clock = FakeNvml(util_percent=25.0), Clock()
    m = HbmMeter({"type": "cuda", "uuid": UUID_B.removeprefix("GPU-")}, interval_s=30.0,
                 nvml=nv, clock=clock)
    assert m.measuring and m.reason == "gpm"
    clock.t += 10
    assert m.tick() is False and m.seconds == 0.0  # not due yet
    clock.t += 20
    assert m.tick() is True
    assert m.seconds == pytest.approx(30.0) and m.bytes == pytest.approx(0.25 * PEAK * 30)
    nv.util_percent = 50.0
    clock.t += 31
    assert m.tick() is True
    assert m.seconds == pytest.approx(61.0)
    assert m.bytes == pytest.approx(0.25 * PEAK * 30 + 0.5 * PEAK * 31)
    snap = m.snapshot()
    assert snap == {"source": "gpm", "reason": "gpm", "detail": "", "bytes": m.bytes,
                    "seconds": m.seconds, "peak_bytes_per_second": PEAK,
                    "device": "NVIDIA H100 80GB HBM3"}
    nv.fail_sample_get = True
    clock.t += 30
    assert m.tick() is True  # the failure is news: the snapshot changes
    assert m.reason == "nvml_failed" and m.snapshot()["bytes"] == 0.0
    assert m.tick() is False
    m.close()
    _balanced(nv)


def test_restore_carries_an_earlier_readers_counters() -> None:
    m = HbmMeter({"type": "cuda", "uuid": UUID_B}, interval_s=1.0, nvml=FakeNvml())
    m.restore({"bytes": 5e12, "seconds": 7.0})
    assert (m.bytes, m.seconds) == (5e12, 7.0)
    off = HbmMeter({"type": "cpu"}, interval_s=1.0)
    off.restore({"bytes": 5e12, "seconds": 7.0})
    assert off.bytes == 0.0


# ---- the exported families -----------------------------------------------------------------------
def _snap(hbm: dict[str, Any] | None) -> dict[str, Any]:
    s = RecorderSession(RingLayout(2, 4, 2, 8, 8), ByteModel((1, 1)),
                        labels={"model": "m", "engine": "0", "rank": "1"}, info={},
                        layer_ids=[1, 2], publish=lambda _: None)
    snap = s.snapshot()
    if hbm is not None:
        snap["hbm_measured"] = hbm
    return snap


def _samples(snap: dict[str, Any]) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in snapshot_families([snap]):
        for s in fam.samples:
            if "hbm_measure" in s.name and not s.name.endswith("_created"):
                out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


BASE = {"model": "m", "engine": "0", "rank": "1"}


def test_a_measuring_rank_exports_info_counters_and_peak() -> None:
    m = {"source": "gpm", "reason": "gpm", "detail": "", "bytes": 6e12, "seconds": 3.0,
         "peak_bytes_per_second": PEAK, "device": "H100"}
    got = _samples(_snap(m))
    assert got == {
        "moe_reuse_hbm_measurement_info": [({**BASE, "source": "gpm", "reason": "gpm"}, 1.0)],
        "moe_reuse_hbm_measured_bytes_total": [(BASE, 6e12)],
        "moe_reuse_hbm_measured_seconds_total": [(BASE, 3.0)],
        "moe_reuse_hbm_measured_peak_bytes_per_second": [(BASE, PEAK)],
    }
    # the series budget counts them; OTLP pushes the same families
    snap = _snap(m)
    n = sum(len(f.samples) for f in snapshot_families([snap]))
    assert rank_series(snap) - rank_series(_snap(None)) == 4 and n <= rank_series(snap)
    points = families_to_points(snap)
    assert points["moe_reuse_hbm_measured_bytes"][0] == "counter"
    assert points["moe_reuse_hbm_measured_bytes"][2] == [(BASE, 6e12)]
    assert points["moe_reuse_hbm_measurement_info"][2][0][0]["reason"] == "gpm"


@pytest.mark.parametrize("reason", ["nvml_missing", "nvml_failed", "device_not_found",
                                    "gpm_unsupported", "not_cuda"])
def test_a_rank_not_measured_exports_only_the_reason(reason: str) -> None:
    m = {"source": "gpm", "reason": reason, "detail": "x", "bytes": 0.0, "seconds": 0.0,
         "peak_bytes_per_second": 0.0, "device": ""}
    assert _samples(_snap(m)) == {
        "moe_reuse_hbm_measurement_info": [({**BASE, "source": "gpm", "reason": reason}, 1.0)]}


def test_a_snapshot_without_the_measurement_exports_none_of_it() -> None:
    assert _samples(_snap(None)) == {}  # in-process sessions: no reader, no NVML


# ---- the reader's wiring -------------------------------------------------------------------------
L, E, K = 2, 4, 2
LABELS = {"model": "m", "engine": "0", "rank": "0"}


def _worker(directory: Path, device: dict[str, str], window_s: float = 5.0) -> RecorderSession:
    dfd = snap_io.open_dir(directory, create=True)
    try:
        raw = rawstream.RawWriter(dfd, rawstream.raw_name("0", "0"), L, E + 1, 64)
    finally:
        os.close(dfd)
    path = directory / rawstream.status_name("0", "0")
    s = RecorderSession(RingLayout(L, E, K, max_tokens=16, ring_steps=8), ByteModel((10, 10)),
                        labels=LABELS, info={"version": "t"}, layer_ids=[0, 1],
                        publish=lambda st: snap_io.write_snapshot(path, st, fault_stage=None),
                        raw=raw, flush_interval_s=0.0)
    s.status_extra["device"] = device
    s.status_extra["config"] = {"window_s": window_s}
    return s


def _step(s: RecorderSession) -> None:
    s.step_started()
    s.step_prepared(torch.tensor([1, 1]).numpy(), torch.tensor([True, True]).numpy(),
                    torch.tensor([5, 6]).numpy())
    for layer in range(L):
        s.capture_fn(layer)(torch.randint(0, E, (2, K)))
    s.step_finished()
    s.flush()


def test_the_reader_measures_the_workers_gpu_once_per_window(tmp_path: Path) -> None:
    nv, clock = FakeNvml(util_percent=30.0), Clock()
    worker = _worker(tmp_path, {"type": "cuda", "uuid": UUID_B.removeprefix("GPU-")})
    _step(worker)
    run = RunReader(tmp_path, nvml=nv, clock=clock)
    assert run.poll() == 1
    hbm = snap_io.read_snapshots(tmp_path)[0]["hbm_measured"]
    assert hbm["reason"] == "gpm" and hbm["seconds"] == 0.0
    assert hbm["peak_bytes_per_second"] == PEAK
    clock.t += 5.0
    assert run.poll() == 0  # no step, but a window is due: the snapshot is rewritten
    hbm = snap_io.read_snapshots(tmp_path)[0]["hbm_measured"]
    assert hbm["seconds"] == pytest.approx(5.0) and hbm["bytes"] == pytest.approx(0.3 * PEAK * 5)
    text = _samples(snap_io.read_snapshots(tmp_path)[0])
    assert text["moe_reuse_hbm_measured_seconds_total"][0][1] == pytest.approx(5.0)
    # a second reader takes over: the counters go on from the first one's snapshot
    run.close()
    _balanced(nv)
    second = RunReader(tmp_path, nvml=nv, clock=clock)
    second.poll(now=10.0)
    clock.t += 5.0
    second.poll(now=20.0)
    hbm = snap_io.read_snapshots(tmp_path)[0]["hbm_measured"]
    assert hbm["seconds"] == pytest.approx(10.0)
    # the worker leaves: its meter goes with it (samples freed, NVML shut down)
    (tmp_path / rawstream.status_name("0", "0")).unlink()
    second.poll(now=30.0)
    assert second.ranks == {}
    _balanced(nv)
    second.close()


def test_a_cpu_rank_is_not_cuda_and_nvml_is_never_touched(tmp_path: Path) -> None:
    worker = _worker(tmp_path, {"type": "cpu", "uuid": ""})
    _step(worker)
    run = RunReader(tmp_path, nvml=Untouchable())
    run.poll()
    snap = snap_io.read_snapshots(tmp_path)[0]
    assert snap["hbm_measured"]["reason"] == "not_cuda"
    assert list(_samples(snap)) == ["moe_reuse_hbm_measurement_info"]
    run.close()


def test_a_reader_whose_nvml_fails_keeps_reading(tmp_path: Path) -> None:
    nv, clock = FakeNvml(), Clock()
    nv.fail_sample_get = True  # the priming sample already fails
    worker = _worker(tmp_path, {"type": "cuda", "uuid": UUID_B})
    _step(worker)
    run = RunReader(tmp_path, nvml=nv, clock=clock)
    assert run.poll() == 1
    snap = snap_io.read_snapshots(tmp_path)[0]
    assert snap["hbm_measured"]["reason"] == "nvml_failed" and snap["enabled"]
    assert "reader" not in snap["errors"]
    run.close()
    _balanced(nv)


def test_rank_reader_measures_only_when_started() -> None:
    """In-process sessions build a RankReader too, in the worker: no meter, no NVML there."""
    status = {"labels": LABELS, "layer_ids": [0], "num_experts": 4, "top_k": 2,
              "device": {"type": "cuda", "uuid": UUID_B}, "config": {"window_s": 2.0}}
    reader = RankReader(status)
    assert reader.hbm is None and reader.measure_hbm() is False
    assert "hbm_measured" not in reader.snapshot()
    nv, clock = FakeNvml(), Clock()
    reader.start_hbm(nvml=nv, clock=clock)
    assert reader.hbm is not None and reader.hbm.interval_s == 2.0
    clock.t += 2.0
    assert reader.measure_hbm() is True
    assert reader.snapshot()["hbm_measured"]["seconds"] == pytest.approx(2.0)
    reader.close()
    _balanced(nv)


# ---- the worker's side ---------------------------------------------------------------------------
def test_the_worker_publishes_its_device_and_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_reuse.plugin.vllm import facts

    assert facts.device_identity("cpu") == {"type": "cpu", "uuid": ""}
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: SimpleNamespace(uuid="ffeeddcc-9999-8888-7777-666655554444"))
    assert facts.device_identity("cuda:0") == {
        "type": "cuda", "uuid": "ffeeddcc-9999-8888-7777-666655554444"}

    def broken(dev: Any) -> Any:
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    assert facts.device_identity("cuda:0") == {"type": "cuda", "uuid": ""}  # never raises
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert facts.device_identity("cuda:0") == {"type": "rocm", "uuid": ""}
    assert facts.device_identity("not a device") == {"type": "", "uuid": ""}
