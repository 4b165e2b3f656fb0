"""Device step time (CUDA): the ring's per-slot event pairs replace the host's span of a step.

On an asynchronous GPU stream the host's clock around a step times the launch, not the step (and a
replayed CUDA graph runs no Python at all), so on CUDA the flusher takes each step's duration from
a timing-event pair recorded by begin_step and mark_step_done. CI has no GPU: these tests put
stand-in events on a CPU ring to check the wiring (which slot, which steps, the fallback when a pair
is incomplete); benchmarks/gpu_recorder_check.py checks the real events against timings taken
outside the graph on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession

L, E, K = 2, 8, 2


class FakeEvent:
    """A timing event whose record() takes the next time of a shared device clock (ms)."""

    def __init__(self, clock: list[float], done: bool = True) -> None:
        self.clock, self.done, self.t = clock, done, None

    def record(self, stream=None) -> None:  # noqa: ANN001 - torch's signature
        self.t = self.clock[0]

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: FakeEvent) -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("event not recorded")
        return end.t - self.t


def _session(host_step_ns: int) -> tuple[RecorderSession, list[float]]:
    ticks = iter(range(0, 10**12, host_step_ns))
    s = RecorderSession(
        RingLayout(L, E, K, max_tokens=16, ring_steps=8), ByteModel((10, 10)),
        labels={"model": "m", "engine": "0", "rank": "0"}, info={"version": "t"},
        layer_ids=[0, 1], publish=lambda _s: None, clock=lambda: next(ticks),
    )
    clock = [0.0]
    ring = s.ring
    ring._timing = [(FakeEvent(clock), FakeEvent(clock)) for _ in range(ring.layout.ring_steps)]
    return s, clock


def _step(s: RecorderSession, clock: list[float], device_ms: float) -> None:
    s.step_started()
    s.step_prepared(np.array([1, 1]), np.array([True, True]), np.array([5, 9]))
    for layer in range(L):
        s.capture_fn(layer)(torch.tensor([[0, 1], [2, 3]]))
    clock[0] += device_ms  # the stream runs the step between the two records
    s.step_finished()
    clock[0] += 0.25  # gap before the next step's begin (not part of any step)


def test_flushed_step_time_is_the_device_pair_not_the_host_span() -> None:
    s, clock = _session(host_step_ns=1_000)  # the host sees 1 us per step (a launch)
    device_ms = [2.0, 3.5, 1.25, 7.0, 0.5]
    for ms in device_ms:
        _step(s, clock, ms)
    s.flush()
    assert int(s.totals.steps.sum()) == len(device_ms)
    assert np.isclose(s.totals.duration_s.sum(), sum(device_ms) / 1e3)


def test_ring_wraps_and_every_slot_keeps_its_own_pair() -> None:
    s, clock = _session(host_step_ns=1_000)
    got = 0.0
    for i in range(3 * s.ring.layout.ring_steps):  # flush often enough that nothing drops
        _step(s, clock, 1.0 + i)
        got += 1.0 + i
        if i % 3 == 2:
            s.flush()
    s.flush()
    assert s.dropped_steps == 0
    assert np.isclose(s.totals.duration_s.sum(), got / 1e3)


def test_an_incomplete_pair_keeps_the_host_span() -> None:
    s, clock = _session(host_step_ns=1_000_000)  # 1 ms per step on the host clock
    for ev in s.ring._timing[1]:
        ev.done = False
    for ms in (4.0, 4.0, 4.0):
        _step(s, clock, ms)
    s.flush()
    # slots 0 and 2 from the device (4 ms each), slot 1 from the host (1 ms)
    assert np.isclose(s.totals.duration_s.sum(), (4.0 + 1.0 + 4.0) / 1e3)


def test_cpu_ring_times_nothing_on_the_device() -> None:
    s, _ = _session(host_step_ns=1_000)
    s.ring._timing = []
    assert s.ring.device_durations_ns(0, 4) is None


# ---- collective time on the device (opt-in on CUDA: cuda_comm_timing "device") ---------------


def test_device_clock_stamps_sum_per_step_and_reach_the_totals(monkeypatch) -> None:  # noqa: ANN001
    """The stamps add -t before and +t after each collective into acc[slot from tok_base, op];
    the flush copies the slot with the counts, zeroes it, and the session folds it into
    comm_s. A stand-in stamp (the real one is a PTX kernel) does the same arithmetic on the CPU."""
    from moe_reuse.plugin.recorder import device_clock

    now = [1_000_000]

    def fake_stamp(acc, tok_base, slot_at, col, sign):  # noqa: ANN001, ANN202
        acc[int(tok_base[slot_at]), col] += sign * now[0]

    monkeypatch.setattr(device_clock, "stamp", fake_stamp)
    s, clock = _session(host_step_ns=1_000)
    s.ring.comm_on_device = True
    per_step = [(700, 0), (1_500, 2_000), (0, 9_000)]  # ns of (all_reduce, all_to_all)
    for ar, a2a in per_step:
        s.step_started()
        s.step_prepared(np.array([1]), np.array([True]), np.array([3]))
        for op, dur in ((0, ar), (1, a2a)):
            for _ in range(2):  # two layers, each half the step's time
                s.ring.comm_stamp(op, -1)
                now[0] += dur // 2
                s.ring.comm_stamp(op, 1)
                now[0] += 50  # time between collectives is not counted
        s.step_finished()
    # between steps (a dummy forward): stamps land on the idle slot, never in a step
    s.ring.comm_stamp(0, -1)
    now[0] += 10**6
    s.ring.comm_stamp(0, 1)
    s.flush()
    want = np.array([sum(p[0] for p in per_step), sum(p[1] for p in per_step)]) / 1e9
    assert np.allclose(s.totals.comm_s, want)


def test_unclosed_stamp_pairs_read_as_zero() -> None:
    from moe_reuse.plugin.recorder import device_clock

    got = device_clock.paired(np.array([[5, -1_700_000_000_000_000_000], [0, 4 * 10**12]]))
    assert got.tolist() == [[5, 0], [0, 0]]


def test_device_clock_is_off_unless_asked_and_on_cuda() -> None:
    s, _ = _session(host_step_ns=1_000)
    assert s.ring.device_comm_ns(0, 2) is None  # not enabled: the host figures stand
    assert s.ring.enable_device_comm() is False  # CPU: no PTX clock
