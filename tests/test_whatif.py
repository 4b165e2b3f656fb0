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
