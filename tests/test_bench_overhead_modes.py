"""bench_overhead_engine's `unread` mode (benchmarks/bench_overhead_engine.py): the reader of the
engine's own process skips its polls while the wave runs, and folds the backlog on release,
outside the wave, never beside a poll of its thread. The bench itself drives real engines;
this is its wrapper of `ReaderService.poll`, on a stand-in poll."""

from __future__ import annotations

from typing import Any

import pytest
from bench_loader import bench_module

from moe_reuse.plugin.reader.service import ReaderService

bench = bench_module("bench_overhead_engine")


def test_a_held_reader_polls_nothing_until_released_then_folds_under_the_lock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    hold: Any = None

    def poll(svc: Any) -> int:
        assert hold is None or hold.lock.locked()  # never beside the reader thread's own poll
        calls.append(svc)
        return 7

    monkeypatch.setattr(ReaderService, "poll", poll)  # restored after the test
    hold = bench._ReaderHold()
    svc = object()
    assert ReaderService.poll(svc) == 7 and calls == [svc]  # not held: polls as before
    hold.hold()
    assert ReaderService.poll(svc) == 0 and ReaderService.poll(svc) == 0
    assert calls == [svc]  # held: the wave's polls fold nothing
    hold.release()
    assert calls == [svc, svc] and not hold.held  # the backlog, folded once, on release
    assert ReaderService.poll(svc) == 7 and len(calls) == 3
