"""The what-if bench's steady-load arithmetic (benchmarks/bench_whatif_server.py): which stretch
of a closed-loop pass it compares with the what-if, and the streams it held there. The bench
itself drives a real server; these are its pure helpers, on hand-made streams."""

from __future__ import annotations

import pytest
from bench_loader import bench_module

bench = bench_module("bench_whatif_server")


def stream(start: float, ttft: float | None, gaps: list[float]) -> dict:
    return {"start_seconds": start, "ttft_seconds": ttft, "itl_seconds": gaps}


def test_the_steady_window_runs_from_the_last_clients_start_to_the_last_request():
    """Four clients started over 1 s (the stagger), each then sending more: the stretch that
    holds every client starts at the first start plus the stagger and ends at the last send."""
    res = [stream(10.0 + 0.25 * i, 0.1, [0.1] * 5) for i in range(4)]
    res += [stream(11.0 + 0.3 * i, 0.1, [0.1] * 5) for i in range(4)]
    assert bench.steady_window(res, 1.0) == (11.0, pytest.approx(11.9))
    assert bench.steady_window(res, 0.0) == (10.0, pytest.approx(11.9))


def test_each_gap_is_placed_at_its_arrival_on_the_clients_clock():
    assert bench.timed_gaps(stream(1.0, 0.5, [0.1, 0.2])) == [
        (pytest.approx(1.6), 0.1), (pytest.approx(1.8), 0.2)]
    assert bench.timed_gaps(stream(1.0, None, [])) == []


def test_streams_count_each_request_between_its_first_and_last_token_inside_the_window():
    """One stream decoding through the whole window, one through its second half, one that
    ended before it and one with no token: 1.5 streams held on average."""
    res = [stream(0.0, 1.0, [1.0] * 10),   # tokens from 1 to 11: all of [2, 4)
           stream(2.0, 1.0, [0.5] * 4),    # from 3 to 5: half of it
           stream(0.0, 0.5, [0.5]),        # from 0.5 to 1: before it
           stream(0.0, None, [])]          # never reached the engine
    assert bench.streams(res, 2.0, 4.0) == pytest.approx(1.5)
