"""The serving front end in the latency what-if: a closed loop of N clients between one front-end
process and the engine (`predictor.closed_loop`), and what it changes in `evaluate_level`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from moe_reuse.predictor import SpecError, load_hardware_preset, load_model_preset
from moe_reuse.predictor.closed_loop import (
    demand_from_loop,
    front_end_residence,
    solve,
    wait_quantile,
)
from moe_reuse.predictor.deployment import DEFAULT_ACCOUNTING
from moe_reuse.predictor.whatif import Workload, deployment, evaluate_level, loop_demand

DS = load_model_preset("deepseek-v3")
H200 = load_hardware_preset("h200")
WORK = Workload(prompt_tokens=1024, output_tokens=256)


def const(z: float):
    return lambda b: z


def test_one_client_alternates_between_the_front_end_and_the_engine():
    """N = 1: no one to wait for; the request is in the front end D and in the engine Z, so the
    engine holds it Z / (D + Z) of the time (exact mean-value analysis)."""
    loop = solve(1, 1, 0.004, const(0.1))
    assert loop.front_end_residence_seconds == pytest.approx(0.004)
    assert loop.requests_per_second == pytest.approx(1 / 0.104, rel=1e-6)
    assert loop.batch == pytest.approx(0.1 / 0.104, rel=1e-6)
    assert loop.seat_queue_seconds == 0


def test_the_loop_closes_and_never_beats_the_front_ends_ceiling():
    """Every N: N = X (R + Z) and b = X Z; X < 1 / D and it approaches that ceiling as N grows;
    the batch grows with N, always below it; and calibrate's inverse gives D back."""
    d, z = 0.004, 0.1
    last = 0.0
    for n in (2, 8, 32, 64, 256, 2000):
        loop = solve(n, n, d, const(z))
        x, r = loop.requests_per_second, loop.front_end_residence_seconds
        assert n == pytest.approx(x * (r + z), rel=1e-6)
        assert loop.batch == pytest.approx(x * z, rel=1e-6)
        assert x < 1 / d and last < loop.batch < n
        assert demand_from_loop(n, loop.batch, x) == pytest.approx(d, rel=1e-6)
        last = loop.batch
    assert x == pytest.approx(1 / d, rel=0.02)


def test_without_front_end_work_every_client_is_seated_or_queued_for_a_seat():
    """D = 0 is the front end that always keeps up: b = min(N, seats), the rest wait for a
    seat for (N - b) Z / b, the what-if's queue before the front end existed."""
    assert solve(64, 64, 0.0, const(0.1)).batch == 64
    loop = solve(64, 16, 0.0, const(0.1))
    assert loop.batch == 16 and loop.seat_queue_seconds == pytest.approx(48 * 0.1 / 16)
    with pytest.raises(ValueError, match="clients"):
        solve(0, 1, 0.0, const(0.1))


def test_the_front_end_wait_quantiles():
    """An M/M/1 wait: none below utilisation 1 - q; the quantile over the mean is
    ln(rho / (1 - q)) / rho; capped at everybody else's work."""
    assert wait_quantile(0.01, 0.4, 0.5, 1.0) == 0.0
    assert wait_quantile(0.01, 0.9, 0.99, 1.0) == pytest.approx(0.01 * math.log(90) / 0.9)
    assert wait_quantile(0.01, 0.9, 0.99, 0.02) == 0.02
    assert wait_quantile(0.0, 0.9, 0.99, 1.0) == 0.0
    with pytest.raises(ValueError, match="rate"):
        demand_from_loop(8, 4.0, 0.0)
    assert front_end_residence(8, 0.004, 300.0) == math.inf  # past the ceiling


@pytest.fixture(scope="module")
def moe():
    return deployment(DS, H200, 8, WORK.prompt_tokens + WORK.output_tokens, DEFAULT_ACCOUNTING)


FE = {"front_end_request_seconds": 5e-3, "front_end_token_seconds": 150e-6}


def test_a_front_end_that_cannot_keep_up_limits_the_batch_and_lengthens_ttft(moe):
    """At 2,000 clients DeepSeek-V3's engine could seat far more than the front end admits:
    the batch is what the front end lets through (limited_by front_end), the throughput stays
    under its ceiling, the ITL is the smaller batch's, and the TTFT carries the wait."""
    hw = replace(H200, **FE)
    base = evaluate_level(moe, H200, 2000, WORK, DEFAULT_ACCOUNTING)
    lv = evaluate_level(moe, hw, 2000, WORK, DEFAULT_ACCOUNTING)
    demand = 5e-3 + WORK.output_tokens * 150e-6
    assert lv.limited_by == "front_end" and lv.batch < base.batch
    assert lv.tokens_per_second / WORK.output_tokens < 1.01 / demand  # (tokens/s counts b/step)
    assert lv.step_seconds < base.step_seconds and lv.itl_p50_seconds < base.itl_p50_seconds
    assert lv.ttft_p50_seconds > base.ttft_p50_seconds and lv.front_end_seconds > 0.1
    assert lv.ttft_p99_seconds >= lv.ttft_p50_seconds
    # at one client the front end adds its admission to the TTFT and takes nothing else
    one, one_base = (evaluate_level(moe, h, 1, WORK, DEFAULT_ACCOUNTING) for h in (hw, H200))
    assert one.ttft_p50_seconds == pytest.approx(one_base.ttft_p50_seconds + 5e-3, rel=1e-3)
    assert one.itl_p50_seconds == pytest.approx(one_base.itl_p50_seconds)


def test_loop_demand_gives_back_the_work_that_made_the_loop(moe):
    """Read backwards at the what-if's own rate, a loop the what-if solved gives back the front
    end's work it was solved with, at every concurrency the front end binds; and the work
    grows with the batch missing from the engine."""
    for n in (100, 300, 2000):
        for req, tok in ((5e-3, 150e-6), (20e-3, 400e-6)):
            lv = evaluate_level(moe, replace(H200, front_end_request_seconds=req,
                                             front_end_token_seconds=tok), n, WORK,
                                DEFAULT_ACCOUNTING)
            assert lv.limited_by == "front_end"
            back = loop_demand(moe, H200, n, lv.batch, WORK, DEFAULT_ACCOUNTING)
            assert back == pytest.approx(req + WORK.output_tokens * tok, rel=1e-6)
    fewer, more = (loop_demand(moe, H200, 2000, b, WORK, DEFAULT_ACCOUNTING) for b in (100, 130))
    assert fewer > more > 0


def test_no_front_end_figures_leave_the_what_if_as_it_was(moe):
    """Zero front-end work is the default: every figure equals the same spec without the
    fields (the presets carry none)."""
    for n in (1, 64, 2000):
        a = evaluate_level(moe, H200, n, WORK, DEFAULT_ACCOUNTING)
        b = evaluate_level(moe, replace(H200, **{k: 0.0 for k in FE}), n, WORK, DEFAULT_ACCOUNTING)
        assert a == b and a.front_end_seconds == 0.0
    assert evaluate_level(moe, H200, 64, WORK, DEFAULT_ACCOUNTING).batch == 64


def test_front_end_fields_are_checked_by_name_and_load_in_their_units(tmp_path):
    from moe_reuse.predictor import load_hardware_file

    for field in FE:
        with pytest.raises(SpecError, match=field):
            replace(H200, **{field: -1e-3})
    data = {**{k: v for k, v in H200.to_dict().items() if v is not None and k not in FE},
            "front_end_request_ms": 1.4, "front_end_token_us": 98.0}
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    hw = load_hardware_file(str(path))
    assert hw.front_end_request_seconds == pytest.approx(1.4e-3)
    assert hw.front_end_token_seconds == pytest.approx(98e-6)


def test_calibrate_fits_the_front_end_only_from_loops_it_bound():
    """Loops whose engine held nearly every client say little about the front end: left out;
    one output length left gives a flat cost a request; none gives no figures (said); a loop run
    in several passes counts by its median pass."""
    from moe_reuse.plugin.calibrate_engine import front_end_fit

    def loop(tokens: float, held: float, demand: float) -> dict[str, float]:
        return {"concurrency": 48.0, "output_tokens": tokens, "batch": held,
                "front_end_seconds": demand}

    said: list[str] = []
    two = [loop(16, 12, 4e-3), loop(48, 30, 6e-3), loop(128, 47, 12e-3)]
    fit = front_end_fit(two, said.append)
    assert fit["front_end_request_seconds"] == pytest.approx(3e-3)
    assert fit["front_end_token_seconds"] == pytest.approx(62.5e-6)
    assert front_end_fit([loop(16, 12, 4e-3), loop(128, 47, 12e-3)], said.append) == {
        "front_end_request_seconds": 4e-3, "front_end_token_seconds": 0.0}
    assert front_end_fit([loop(128, 47, 12e-3)], said.append) == {} and "no loop" in said[-1]
    # the same loops in three passes: each length counts by its median pass
    passes = [loop(16, 12, 3.6e-3), loop(48, 30, 5.1e-3), loop(48, 31, 7.4e-3),
              loop(16, 11, 4.4e-3), *two]
    assert front_end_fit(passes, said.append) == pytest.approx(fit)
