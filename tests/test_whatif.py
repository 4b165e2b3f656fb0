"""Latency what-if (issue 16, part 1): the step-mix model, the CLI contract and bad input.

Unit tests over the pure model (`moe_reuse.predictor.whatif`) and the CLI; the real-server
comparison is tests/integration/test_whatif_server.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from moe_reuse.predictor import (
    DEFAULT_ACCOUNTING,
    Partition,
    SpecError,
    expected_distinct_experts,
    load_hardware_preset,
    load_model_preset,
    step_time,
)
from moe_reuse.predictor.cli import main
from moe_reuse.predictor.whatif import (
    Deployment,
    RoutingCurve,
    Workload,
    evaluate_level,
    whatif,
)

H200 = load_hardware_preset("h200")
DS = load_model_preset("deepseek-v3")
LEVELS = [1, 8, 64, 512, 2000]


@pytest.fixture(scope="module")
def result():
    return whatif(DS, H200, 8, LEVELS)


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_schema_from_the_issue(capsys):
    """`--json` prints {"levels": [{"concurrency", "moe", "dense"}], "crossover_concurrency"}; each
    model has batch, step_seconds, ITL and TTFT P50/P99 and tokens_per_second."""
    code, out, _ = run(
        capsys, "whatif", "--model", "deepseek-v3", "--hardware", "h200", "--gpus", "8",
        "--concurrency", "1,8,64,512,2000", "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert [lv["concurrency"] for lv in data["levels"]] == LEVELS
    keys = {"batch", "step_seconds", "itl_p50_seconds", "itl_p99_seconds", "ttft_p50_seconds",
            "ttft_p99_seconds", "tokens_per_second"}
    for lv in data["levels"]:
        for side in ("moe", "dense"):
            assert keys <= set(lv[side])
            assert lv[side]["itl_p99_seconds"] >= lv[side]["itl_p50_seconds"] > 0
            assert lv[side]["ttft_p99_seconds"] >= lv[side]["ttft_p50_seconds"] > 0
    assert data["crossover_concurrency"] is None or isinstance(data["crossover_concurrency"], int)


def test_p99_comes_from_the_step_mix_not_a_constant_factor(result):
    """At concurrency 1 no step carries prefill while decoding (P99 = P50 = the decode step); with
    more requests a share of steps carries chunked prefill and P99 is the mixed step's time; the
    P99/P50 ratio changes with load."""
    ratios = []
    for m, _ in result.levels:
        assert m.itl_p50_seconds in (m.step_seconds, m.mixed_step_seconds)
        assert m.itl_p99_seconds == (m.mixed_step_seconds if m.itl_mixed_ratio >= 0.01 else m.step_seconds)
        assert m.itl_mixed_ratio <= m.mixed_step_ratio
        ratios.append(m.itl_p99_seconds / m.itl_p50_seconds)
    first = result.levels[0][0]
    assert first.itl_mixed_ratio == 0 and ratios[0] == 1.0
    assert len({round(r, 3) for r in ratios}) >= 3


def test_step_times_are_the_predictors_steps(result):
    """The decode-only step is step_time at the batch and the mean context prompt + output/2."""
    m = result.levels[2][0]
    expected = step_time(DS, H200, result.moe.partition, m.batch, 1024 + 128).total_seconds
    assert m.step_seconds == pytest.approx(expected)
    assert m.mixed_step_seconds > m.step_seconds


def test_batch_capped_by_kv_and_max_num_seqs(result):
    """The batch the scheduler forms: min(concurrency, max_num_seqs, KV capacity / footprint)."""
    for m, d in result.levels:
        for x, dep in ((m, result.moe), (d, result.dense)):
            kv = dep.kv_capacity_tokens // (1024 + 128)
            assert x.batch == min(x.concurrency, 1024, kv)
    top_moe, top_dense = result.levels[-1]
    assert top_moe.limited_by == "kv_cache" and top_dense.limited_by == "max_num_seqs"
    assert top_moe.queue_seconds > 0 and top_moe.ttft_p50_seconds > top_moe.queue_seconds


def test_chunked_prefill_budget_shares_steps():
    """Demand b*prompt/output tokens per step; a mixed step carries one prompt piece
    min(prompt, max_num_batched_tokens - b) or the whole demand, within the budget; the mixed
    share is demand / that. A smaller budget raises it and lengthens TTFT (more chunks)."""
    dep = Deployment(DS, Partition(tp=8), 500_000)
    wide = evaluate_level(dep, H200, 64, Workload(4096, 128, 8192), DEFAULT_ACCOUNTING)
    narrow = evaluate_level(dep, H200, 64, Workload(4096, 128, 1024), DEFAULT_ACCOUNTING)
    demand = 64 * 4096 / 128
    assert wide.mixed_step_ratio == pytest.approx(demand / min(max(4096, demand), 8192 - 64))
    assert narrow.mixed_step_ratio == 1.0 and narrow.prefill_tokens_per_mixed_step == 1024 - 64
    assert narrow.mixed_step_ratio >= wide.mixed_step_ratio
    assert narrow.ttft_p50_seconds > wide.ttft_p50_seconds


def test_crossover_is_where_dense_throughput_first_exceeds(result):
    """The crossover is the lowest concurrency at which the dense twin's throughput exceeds the
    MoE's (bisected to the integer)."""
    c = result.crossover_concurrency
    assert c is not None
    moe, dense = result.moe, result.dense
    w, acc = result.workload, result.accounting
    at = evaluate_level(dense, H200, c, w, acc).tokens_per_second > evaluate_level(moe, H200, c, w, acc).tokens_per_second
    assert at
    if c > 1:
        before = evaluate_level(dense, H200, c - 1, w, acc).tokens_per_second
        assert before <= evaluate_level(moe, H200, c - 1, w, acc).tokens_per_second


def test_no_crossover_is_null(capsys):
    """Grok-1 with q = 8 (q*s = 2: the twin is twice the MoE's total size): the dense twin never
    overtakes in the range, and the JSON says null."""
    grok = load_model_preset("grok-1")
    r = whatif(grok, H200, 8, [1, 2, 4], Workload(512, 64), q=8.0)
    assert r.crossover_concurrency is None
    assert r.to_dict()["crossover_concurrency"] is None


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "1,,x"], "--concurrency"),
        (["--prompt-len", "200000"], "--prompt-len"),
        (["--prompt-len", "160000", "--output-len", "5000"], "--output-len"),
        (["--model", "switch-c-2048", "--gpus", "1"], "--model"),
        (["--prompt-len", "0"], "--prompt-len"),
    ],
)
def test_bad_input_names_the_argument(capsys, argv, field):
    base = ["whatif", "--model", "deepseek-v3", "--hardware", "h200", "--gpus", "8"]
    code, _, err = run(capsys, *base, *argv)
    assert code == 2
    assert err.startswith(f"moe-reuse: error: {field}:"), err


def test_routing_curve_fit_round_trip():
    """A uniform measurement fits E_eff = E; a skewed one (fewer distinct experts) fits E_eff < E
    and predicts fewer distinct experts at every batch."""
    e, k = 128, 8
    uniform = RoutingCurve.fit(e, k, 16, expected_distinct_experts(e, k, 16))
    assert uniform.effective_experts == pytest.approx(e, rel=1e-6)
    skew = RoutingCurve.fit(e, k, 16, 60.0)
    assert skew.effective_experts < e
    assert skew.distinct(16) == pytest.approx(60.0, rel=1e-6)
    for b in (1, 4, 64, 512):
        assert skew.distinct(b) <= expected_distinct_experts(e, k, b) + 1e-9
    assert math.isclose(skew.distinct(10_000), min(e, skew.effective_experts), rel_tol=1e-3)


def test_measured_routing_changes_the_moe_step():
    """A server whose routing touches fewer experts than uniform streams fewer expert bytes."""
    model = load_model_preset("qwen3-30b-a3b")
    skew = RoutingCurve.fit(model.num_experts, model.experts_per_token, 16, 40.0)
    base = Deployment(model, Partition(), 100_000)
    live = replace(base, routing=skew)
    w = Workload(256, 64)
    assert (evaluate_level(live, H200, 16, w, DEFAULT_ACCOUNTING).step_seconds
            < evaluate_level(base, H200, 16, w, DEFAULT_ACCOUNTING).step_seconds)


def test_profile_paper_reaches_whatif(capsys):
    """--profile paper applies to whatif too (its accounting has no max_num_seqs cap)."""
    code, out, _ = run(
        capsys, "whatif", "--model", "deepseek-v3", "--hardware", "paper-reference", "--gpus", "64",
        "--concurrency", "1,4096", "--profile", "paper", "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["levels"][1]["dense"]["batch"] == 4096


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "w.png"
    code, _, err = run(
        capsys, "whatif", "--model", "deepseek-v3", "--hardware", "h200", "--concurrency", "1,64",
        "--plot", str(path),
    )
    assert code == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(path) in err


def test_infeasible_deployment_raises_spec_error():
    with pytest.raises(SpecError, match="does not fit"):
        whatif(load_model_preset("switch-c-2048"), H200, 1, [1])


# ---- what a streaming client sees on a measured host (moe-reuse calibrate) --------------------
NOISE = (0.8, 0.9, 0.95, 1.0, 1.05, 1.2, 1.5, 3.0, 4.0, 6.0)  # at JITTER_QUANTILES


def test_the_serving_gap_adds_to_every_step_but_not_to_the_engine_step(result):
    """ITL = step + the gap between steps (fixed + per running sequence); the reported
    step_seconds stays the engine's step, which the live gauge compares with."""
    hw = replace(H200, serving_gap_seconds=1e-3, serving_gap_per_sequence_seconds=1e-5)
    moe = result.moe
    for n in (1, 64):
        base = evaluate_level(moe, H200, n, result.workload, DEFAULT_ACCOUNTING)
        lv = evaluate_level(moe, hw, n, result.workload, DEFAULT_ACCOUNTING)
        gap = 1e-3 + 1e-5 * lv.batch
        assert lv.step_seconds == base.step_seconds and lv.serving_gap_seconds == pytest.approx(gap)
        assert lv.itl_p50_seconds == pytest.approx(base.itl_p50_seconds + gap)
        assert lv.tokens_per_second < base.tokens_per_second


def test_host_noise_widens_p99_through_the_step_mix_not_a_constant(result):
    """With measured noise, P99 is the 0.99 quantile of (step mix x noise): at concurrency 1
    (decode steps only) it is the decode period times the noise's own P99; under load the mixed
    steps' share moves it further, so P99/P50 is not one constant."""
    hw = replace(H200, step_jitter_ratios=NOISE)
    one = evaluate_level(result.moe, hw, 1, result.workload, DEFAULT_ACCOUNTING)
    assert one.itl_mixed_ratio == 0
    assert one.itl_p50_seconds == pytest.approx(one.step_seconds, rel=1e-6)
    assert one.itl_p99_seconds == pytest.approx(3.0 * one.step_seconds, rel=1e-6)
    ratios = set()
    for n in (8, 64, 512):
        lv = evaluate_level(result.moe, hw, n, result.workload, DEFAULT_ACCOUNTING)
        plain = evaluate_level(result.moe, H200, n, result.workload, DEFAULT_ACCOUNTING)
        assert lv.itl_p99_seconds >= plain.itl_p99_seconds * 0.999
        ratios.add(round(lv.itl_p99_seconds / lv.itl_p50_seconds, 3))
    assert len(ratios) >= 2


def test_noise_ratios_are_checked_by_name():
    for bad in ((1.0, 2.0), (1.0,) * 9 + (0.5,), (0.0,) * 10, "fast"):
        with pytest.raises(SpecError, match="step_jitter_ratios"):
            replace(H200, step_jitter_ratios=bad)


TAIL = (0.0, 0.0, 0.0, 0.0, 1e-3, 2e-3, 4e-3, 8e-3, 9e-3, 12e-3)  # seconds at JITTER_QUANTILES


def test_the_load_tail_grows_with_the_running_sequences_and_leaves_the_median(result):
    """The serving stack's tail under load (calibrate's 32-client run over its one-client run)
    is added to a gap quantile in proportion to the running sequences beyond one, all of it from
    the sequences it was measured at: nothing at concurrency 1, half at 16.5 of 32, all at 64;
    the median gains nothing (the tail is zero there)."""
    noisy = replace(H200, step_jitter_ratios=NOISE)
    hw = replace(noisy, load_tail_seconds=TAIL, load_tail_sequences=32.0)
    w = result.workload
    for n, share in ((1, 0.0), (16, 15 / 31), (32, 1.0), (64, 1.0)):
        lv = evaluate_level(result.moe, hw, n, w, DEFAULT_ACCOUNTING)
        base = evaluate_level(result.moe, noisy, n, w, DEFAULT_ACCOUNTING)
        assert lv.itl_p50_seconds == pytest.approx(base.itl_p50_seconds)
        assert lv.itl_p99_seconds == pytest.approx(base.itl_p99_seconds + share * 8e-3)
        assert lv.step_seconds == base.step_seconds and lv.ttft_p99_seconds == base.ttft_p99_seconds


def test_load_tail_fields_are_checked_by_name():
    for bad in ((1e-3,) * 9, (2e-3,) + (1e-3,) * 9, (-1e-3,) * 10, "slow"):
        with pytest.raises(SpecError, match="load_tail_seconds"):
            replace(H200, load_tail_seconds=bad, load_tail_sequences=32.0)
    with pytest.raises(SpecError, match="load_tail_sequences"):
        replace(H200, load_tail_seconds=TAIL)  # measured at no load


def test_calibrate_turns_a_loaded_runs_gaps_into_the_load_tail():
    """The loaded run's quantiles less its median times the one-client noise ratio: an
    additive tail, zero up to the median, non-decreasing; none from fewer than 1,000 gaps.
    The what-if, given the noise and this tail, gives back the loaded run's quantiles."""
    from moe_reuse.plugin.calibrate_gaps import jitter_ratios, load_tail_quantiles
    from moe_reuse.predictor.hardware import JITTER_QUANTILES
    from moe_reuse.predictor.quantiles import load_tail, mix_quantile

    one = [2e-3] * 985 + [3e-3] * 15  # P99 1.5 x the median
    loaded = [4e-3] * 970 + [12e-3] * 30  # 3% of the gaps stalled 8 ms
    tail = load_tail_quantiles(one, loaded)
    assert len(tail) == len(JITTER_QUANTILES) and tail == sorted(tail)
    assert all(t == 0 for t, q in zip(tail, JITTER_QUANTILES, strict=True) if q <= 0.5)
    # 12 ms less the loaded median's own noise, 4 ms x 1.5 (not 12 - 4 - (3 - 2): the noise
    # of a 4 ms step is twice a 2 ms step's)
    assert tail[JITTER_QUANTILES.index(0.99)] == pytest.approx(6e-3, abs=2e-5)
    ratios = jitter_ratios([g / 2e-3 for g in one])
    p99 = mix_quantile(0.99, 0.0, 4e-3, 4e-3, ratios) + load_tail(tail, 32.0, 0.99, 32.0)
    assert p99 == pytest.approx(12e-3, rel=0.01)  # the what-if gives the loaded run back
    assert load_tail_quantiles(one, one) == [0.0] * len(JITTER_QUANTILES)
    assert load_tail_quantiles(one, [2 * g for g in one]) == [0.0] * len(JITTER_QUANTILES)
    assert load_tail_quantiles(one[:999], loaded) == []
    replace(H200, load_tail_seconds=tuple(tail), load_tail_sequences=32.0)  # a valid spec


def test_calibrate_turns_gaps_into_noise_quantiles():
    from moe_reuse.plugin.calibrate_gaps import jitter_ratios

    assert jitter_ratios([1.0] * 999) == []  # too few for a 99.9th percentile
    gaps = [1.0] * 900 + [2.0] * 90 + [5.0] * 10
    r = jitter_ratios(gaps)
    assert r[3] == 1.0 and r == sorted(r) and r[-1] == 5.0
    replace(H200, step_jitter_ratios=tuple(r))  # a valid spec


def test_a_calibrated_file_carries_the_serving_figures_through_loading(tmp_path):
    from moe_reuse.predictor import load_hardware_file

    data = {**{k: v for k, v in H200.to_dict().items() if v is not None}, "serving_gap_ms": 1.5, "serving_gap_per_sequence_us": 40.0,
            "step_jitter_ratios": list(NOISE), "load_tail_seconds": list(TAIL),
            "load_tail_sequences": 31.9}
    for k in ("serving_gap_seconds", "serving_gap_per_sequence_seconds"):
        data.pop(k)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    hw = load_hardware_file(str(path))
    assert hw.serving_gap_seconds == pytest.approx(1.5e-3)
    assert hw.serving_gap_per_sequence_seconds == pytest.approx(40e-6)
    assert hw.step_jitter_ratios == NOISE
    assert hw.load_tail_seconds == TAIL and hw.load_tail_sequences == 31.9


def test_staggered_clients_start_spread_over_the_given_time():
    import threading
    import time

    from moe_reuse.plugin.harness.load import closed_loop

    starts: dict[int, float] = {}
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            starts[x] = time.monotonic()
        return x

    t0 = time.monotonic()
    assert closed_loop(fn, list(range(8)), 4, stagger_s=0.4) == list(range(8))
    first = [starts[i] - t0 for i in range(4)]  # the four clients' first requests
    assert first[0] < 0.05 and 0.08 < first[1] < 0.15 and 0.25 < first[3] < 0.4


def test_a_burst_read_at_once_is_one_delivery_split_over_its_tokens():
    """The client's ITL: events read together (within 250 us) are one delivery; its gap from the
    last delivery is split over its tokens, as a multi-token chunk's is."""
    from moe_reuse.plugin.harness.load import delivery_gaps

    ttft, gaps = delivery_gaps(0.0, [(0.010, 1), (0.014, 1), (0.030, 1), (0.03001, 1),
                                     (0.03002, 2), (0.034, 1)])
    assert ttft == pytest.approx(0.010)
    assert gaps == pytest.approx([0.004] + [0.004] * 4 + [0.004])  # 16 ms over 4 tokens
    assert delivery_gaps(0.0, []) == (None, [])
    ttft, gaps = delivery_gaps(0.0, [(0.01, 3), (0.01001, 1)])  # all with the first token
    assert ttft == pytest.approx(0.01) and gaps == []


def test_the_kv_path_rate_and_per_sequence_overhead_enter_the_step():
    """A slower KV path lengthens the KV term only; a step with prefill chunks pays the
    per-request overhead per sequence, not per token."""
    slow = replace(H200, kv_path_bandwidth_bytes_per_second=H200.hbm_bandwidth_bytes_per_second / 4)
    a = step_time(DS, H200, Partition(tp=8), 64, 4096)
    b = step_time(DS, slow, Partition(tp=8), 64, 4096)
    assert b.hbm_seconds["kv"] == pytest.approx(4 * a.hbm_seconds["kv"])
    assert b.hbm_seconds["routed_ffn"] == a.hbm_seconds["routed_ffn"]
    hw = replace(H200, step_overhead_per_token_seconds=1e-4)
    tokens = step_time(DS, hw, Partition(tp=8), 96, 1024)
    seqs = step_time(DS, hw, Partition(tp=8), 96, 1024, sequences=65)
    assert tokens.overhead_seconds == pytest.approx(96e-4)
    assert seqs.overhead_seconds == pytest.approx(65e-4)


def test_calibrate_recovers_the_overheads_and_kv_rate_it_was_given(monkeypatch):
    """The engine stage's fit, on points made by a known spec: it must give that spec back."""
    from moe_reuse.plugin import calibrate_engine as ce
    from moe_reuse.plugin.harness.tiny_models import model_spec
    from moe_reuse.predictor import hardware_from_dict, model_from_hf_config
    from moe_reuse.predictor.closed_loop import demand_from_loop

    base = {k: v for k, v in load_hardware_preset("h200").to_dict().items() if v is not None}
    true = hardware_from_dict({**base, "kv_path_bandwidth_bytes_per_second": 3e9,
                               "step_overhead_seconds": 1e-3,
                               "step_overhead_per_layer_seconds": 150e-6,
                               "step_overhead_per_token_seconds": 40e-6})

    def fake(name):
        config = model_spec(name)["config"]
        model = model_from_hf_config(config)
        pts = []
        for c, tokens, _ in ce.RUNS:
            ctx = 16 + tokens / 2
            st = step_time(model, true, Partition(), c, ctx)
            pts.append({"layers": float(config["num_hidden_layers"]), "concurrency": float(c),
                        "output_tokens": float(tokens), "batch_tokens": float(c),
                        "context_tokens": ctx, "step_seconds": st.total_seconds,
                        "itl_p50_seconds": st.total_seconds + 1e-3 + 2e-5 * c,
                        "itl_p99_seconds": 0.0, "serving_gap_seconds": 1e-3 + 2e-5 * c})
        long_gaps = {1: [2e-3] * 995 + [3e-3] * 5, 32: [4e-3] * 970 + [12e-3] * 30}  # P99 at 1: 2 ms
        # loops a front end of 6 ms + 200 us a token made, as the what-if has them: the batch
        # its closed loop holds; the rate a loop measured reads 20% low (a host whose engine
        # ran slower than the fit), which the work must not take from it
        served = hardware_from_dict({**{k: v for k, v in true.to_dict().items() if v is not None},
                                     "serving_gap_seconds": 1e-3,
                                     "serving_gap_per_sequence_seconds": 2e-5,
                                     "front_end_request_seconds": 6e-3,
                                     "front_end_token_seconds": 200e-6})
        loops = []
        for c, tokens in ce.FRONT_RUNS if name == ce.MODELS[0] else ():  # as _measure
            work = Workload(ce.FRONT_PROMPT, tokens, 8192, 64)
            lv = evaluate_level(Deployment(model, Partition(), 1 << 40), served, c, work,
                                DEFAULT_ACCOUNTING)
            assert lv.batch < ce.BOUND * c  # front-end bound, so in the fit
            rate = 0.8 * lv.tokens_per_second / tokens
            loops.append({"concurrency": float(c), "output_tokens": float(tokens),
                          "prompt_tokens": float(ce.FRONT_PROMPT), "max_num_seqs": 64.0,
                          "max_num_batched_tokens": 8192.0, "requests_per_second": rate,
                          "batch": lv.batch,
                          "front_end_seconds": demand_from_loop(c, lv.batch, rate)})
        return pts, [1.0] * 600, config, long_gaps, loops

    monkeypatch.setattr(ce, "_measure", lambda name, say: fake(name))
    fit, raw = ce.engine_overhead(base, say=lambda _m: None)
    assert fit["kv_path_bandwidth_bytes_per_second"] == pytest.approx(3e9, rel=0.05)
    assert fit["step_overhead_seconds"] == pytest.approx(1e-3, rel=0.05)
    assert fit["step_overhead_per_layer_seconds"] == pytest.approx(150e-6, rel=0.05)
    assert fit["step_overhead_per_token_seconds"] == pytest.approx(40e-6, rel=0.05)
    assert fit["serving_gap_seconds"] == pytest.approx(1e-3)
    assert fit["serving_gap_per_sequence_seconds"] == pytest.approx(2e-5)
    assert fit["step_jitter_ratios"] == [1.0] * 10 and len(raw["points"]) == 2 * len(ce.RUNS)
    assert fit["load_tail_seconds"][7] == pytest.approx(8e-3, abs=2e-5)  # at the P99
    assert fit["load_tail_sequences"] == 32.0  # the long loaded run's batch
    assert fit["front_end_request_seconds"] == pytest.approx(6e-3, rel=1e-3)
    assert fit["front_end_token_seconds"] == pytest.approx(200e-6, rel=1e-3)
    at_rate = [p["front_end_seconds_at_measured_rate"] for p in raw["front_end_loops"]]
    assert all(a > 1.08 * p["front_end_seconds"] for a, p in zip(at_rate, raw["front_end_loops"]))


def test_calibrate_takes_each_point_from_its_fastest_pass():
    """A slow spell over some passes does not reach the point; their gaps join its tail at the
    chosen pass's level; every pass runs a round."""
    from moe_reuse.plugin import calibrate_engine
    from moe_reuse.plugin import calibrate_gaps as ce

    passes = [{"step_seconds": s, "itl_p50_seconds": s + 5e-4, "gaps": [s + 5e-4] * 9 + [3 * s]}
              for s in (2.3e-3, 3.7e-3, 1.5e-3)]  # two slow ones
    chosen = ce.fastest_pass(passes)
    assert chosen["step_seconds"] == 1.5e-3
    pooled = ce.pooled_gaps(passes, chosen)
    assert len(pooled) == 30 and sorted(pooled)[14] == pytest.approx(2e-3)  # its median
    assert max(pooled) == pytest.approx(2e-3 * 3 * 3.7e-3 / 4.2e-3)  # a slow pass's tail, scaled
    for _, _, rounds in calibrate_engine.RUNS:
        split = [ce.pass_rounds(rounds, k) for k in range(ce.PASSES)]
        assert sum(split) == max(rounds, ce.PASSES) and min(split) >= 1
