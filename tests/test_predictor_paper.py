"""Reproduction of Adhinarayanan & Jayasena, "The qs Inequality" (arXiv 2603.08960).

Table 1 and the closed-form columns of Table 3 are exact. Table 3's batches are reproduced
within the issue's 35% by the paper profile's memory accounting (one global calibrated
constant, usable_hbm_ratio 0.42, no per-model constants); every qualitative Table 3 result is
exact under the paper profile and under its two timing variants (WEIGHTS: the weight path
alone; PHYSICAL: every term, phase-window overlap), which share its memory model. Table 4's
dense speedups at 1k and 128k are reproduced by the paper profile within 25%; Table 5's
dominating terms for the MoE rows too (the rest is a strict xfail that states why). The
headline 4.5x is reproduced under WEIGHTS. Switch-C out of memory on 64 GPUs is a strict xfail.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from moe_reuse.predictor import (
    DEFAULT_ACCOUNTING,
    DEFAULT_Q,
    PAPER_ACCOUNTING,
    Accounting,
    dense_twin,
    evaluate_case,
    load_hardware_preset,
    load_model_preset,
    q_from_losses,
    qs_verdict,
    search_partitions,
    sparsity,
)
from moe_reuse.predictor.loading import load_table1

CONTEXT = 131072


def printed(x: float, places: int) -> float:
    """Round half up, as the paper prints (0.03125 -> 0.0313)."""
    return float(Decimal(repr(x)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


B_TOLERANCE = 0.35  # the tolerance on every Table 3 batch

# (model, GPUs, q, (E, k), printed s, printed q*s, B_moe, B_dense)
TABLE3 = [
    ("qwen3-235b-a22b", 64, 5, (128, 8), 0.0625, 0.313, 86, 89),
    ("deepseek-v3", 32, 5, (256, 8), 0.0313, 0.156, 100, 130),
    ("deepseek-v3", 64, 5, (256, 8), 0.0313, 0.156, 244, 267),
    ("grok-1", 64, 5, (8, 2), 0.25, 1.25, 127, 114),
    ("grok-1", 64, 3, (8, 2), 0.25, 0.75, 127, 143),
    ("grok-1", 64, 2, (8, 2), 0.25, 0.5, 127, 158),
]
IDS = [f"{m}-{g}gpu-q{q}" for m, g, q, *_ in TABLE3]

# The paper profile and two timing variants on its memory model (same batches): the weight path
# alone (the paper's differential view) and the physical step (the default's timing knobs).
WEIGHTS = replace(PAPER_ACCOUNTING, cost_scope="weights")
PHYSICAL = replace(
    PAPER_ACCOUNTING,
    **{
        k: getattr(DEFAULT_ACCOUNTING, k)
        for k in (
            "cost_scope",
            "attention_overlap_ratio",
            "ffn_overlap_ratio",
            "node_gpus",
            "collective_latency_seconds",
            "moe_comm_overlap_ratio",
            "scale_out_collectives",
            "ep_policy",
            "latency_exposed",
        )
    },
)
ACCOUNTINGS = {"paper": PAPER_ACCOUNTING, "weights": WEIGHTS, "physical": PHYSICAL}

_CACHE: dict[tuple[str, int, float, Accounting, int], object] = {}


def case(
    name: str, gpus: int, q: float, accounting: Accounting = PAPER_ACCOUNTING, context: int = CONTEXT
) -> Any:
    key = (name, gpus, q, accounting, context)
    if key not in _CACHE:
        _CACHE[key] = evaluate_case(
            load_model_preset(name),
            load_hardware_preset("paper-reference"),
            gpus,
            context,
            q=q,
            accounting=accounting,
        )
    return _CACHE[key]


@pytest.mark.parametrize("row", load_table1(), ids=lambda r: r["name"])
def test_table1_sparsity_exact_and_qs_below_one(row):
    """Table 1: s = k/E exactly (printed to 2 significant figures) and q*s < 1 at the paper's
    q (5, and 3 which its printed q*s values use)."""
    s = sparsity(row["num_experts"], row["top_k"])
    assert s == row["top_k"] / row["num_experts"]
    assert float(f"{s:.2g}") == pytest.approx(row["paper_s"], rel=1e-9)
    for q in (DEFAULT_Q, 3.0):
        assert q * s < 1
        assert qs_verdict(q, s) == "moe-disadvantaged"
    if "paper_qs" in row:  # printed from the rounded s at q = 3
        assert 3 * row["paper_s"] == pytest.approx(row["paper_qs"], abs=0.0005)


def test_q_from_deepspeed_moe_losses():
    """Paper eq. 6: q = (L_dense/L_moe)^(1/0.076); DeepSpeed-MoE losses give 3.67 and 5.31."""
    assert q_from_losses(2.34, 2.12) == pytest.approx(3.67, abs=0.005)
    assert q_from_losses(2.60, 2.29) == pytest.approx(5.31, abs=0.005)


@pytest.mark.parametrize("row", TABLE3, ids=IDS)
def test_table3_closed_form_columns_exact(row):
    """Table 3: s, q*s, E/k exact; r_moe = s*B given the paper's B (printed to 2 decimals)."""
    name, gpus, q, (e, k), s_printed, qs_printed, b_moe, _ = row
    model = load_model_preset(name)
    assert (model.num_experts, model.experts_per_token) == (e, k)
    c = case(name, gpus, q)
    assert c.sparsity == k / e
    assert printed(c.sparsity, 4) == s_printed
    assert printed(c.qs, 3) == qs_printed
    assert c.routing_factor == e / k
    # The paper prints 3.125 as 3.12 and 7.625 as 7.63, so compare to half a printed unit.
    assert c.sparsity * b_moe == pytest.approx(
        {86: 5.38, 100: 3.12, 244: 7.63, 127: 31.75}[b_moe], abs=0.0051
    )


@pytest.mark.parametrize("acc", list(ACCOUNTINGS), ids=list(ACCOUNTINGS))
@pytest.mark.parametrize("row", TABLE3, ids=IDS)
def test_table3_batches_within_35_percent(row, acc):
    """Table 3 B_moe and B_dense within 35% of the paper's, one accounting for all rows (the
    paper profile and its timing variants, which leave every batch unchanged)."""
    name, gpus, q, _, _, _, b_moe, b_dense = row
    c = case(name, gpus, q, ACCOUNTINGS[acc])
    assert c.moe.feasible and c.dense.feasible
    assert abs(c.moe.batch / b_moe - 1) <= B_TOLERANCE, (c.moe.batch, b_moe)
    assert abs(c.dense.batch / b_dense - 1) <= B_TOLERANCE, (c.dense.batch, b_dense)
    assert c.r_moe == c.sparsity * c.moe.batch
    assert c.reuse_gap == pytest.approx(c.routing_factor * c.capacity_factor)


@pytest.mark.parametrize("acc", list(ACCOUNTINGS), ids=list(ACCOUNTINGS))
def test_table3_capacity_factor_directions(acc):
    """Table 3 qualitative: B_dense/B_moe > 1 for DeepSeek-V3 (larger on 32 GPUs than on 64) and
    Qwen3; for Grok-1 < 1 at q = 5 and > 1 at q = 3 and 2 (exact)."""
    a = ACCOUNTINGS[acc]
    ds32, ds64 = (
        case("deepseek-v3", 32, 5, a).capacity_factor,
        case("deepseek-v3", 64, 5, a).capacity_factor,
    )
    assert ds32 > ds64 > 1
    assert case("qwen3-235b-a22b", 64, 5, a).capacity_factor > 1
    assert case("grok-1", 64, 5, a).capacity_factor < 1
    assert case("grok-1", 64, 3, a).capacity_factor > 1
    assert case("grok-1", 64, 2, a).capacity_factor > case("grok-1", 64, 3, a).capacity_factor


@pytest.mark.parametrize("acc", list(ACCOUNTINGS), ids=list(ACCOUNTINGS))
@pytest.mark.parametrize("row", TABLE3, ids=IDS)
def test_table3_routing_factor_dominates_gap(row, acc):
    """Table 3: the reuse gap is mostly routing: E/k exceeds the capacity factor in every row."""
    c = case(*row[:3], ACCOUNTINGS[acc])
    assert c.routing_factor > c.capacity_factor
    assert c.reuse_gap == pytest.approx(c.routing_factor * c.capacity_factor)


def test_switch_c_infeasible_where_dense_twin_fits():
    """The abstract: Switch-C-2048 can become infeasible where its dense twin is viable. Under the
    paper profile that boundary is 16 GPUs (1.57 TB of FP8 experts need > 16 x 76 GB)."""
    c = case("switch-c-2048", 16, 5)
    assert not c.moe.feasible and c.moe.batch is None
    assert c.dense.feasible
    assert c.capacity_factor is None and c.dense_speedup is None


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced: the DeepSeek-V3 batches need the expert pool sharded over all 64 "
    "GPUs, where Switch-C's 1.57 TB of FP8 is 24.7 GB per GPU and fits (B = 101); the only "
    "FFN group that makes it OOM within 35% (16 GPUs) gives DeepSeek-V3 the same capacity "
    "factor on 32 and 64 GPUs; see docs/predictor.md",
)
@pytest.mark.parametrize("acc", list(ACCOUNTINGS), ids=list(ACCOUNTINGS))
def test_switch_c_infeasible_on_64_gpus(acc):
    """Table 3: Switch-C-2048 out of memory on 64 GPUs."""
    assert not case("switch-c-2048", 64, 5, ACCOUNTINGS[acc]).moe.feasible


def test_switch_c_preset_matches_published_config():
    """Switch-C as published (Fedus et al., Table 9): d_model 2080, d_ff 6144, 32 heads of d_kv 64,
    15 encoder + 15 decoder blocks, 2048 experts in every FFN (expert frequency 1), non-gated:
    1.571T parameters. Every-other-layer experts would give half that."""
    from moe_reuse.predictor import total_params

    m = load_model_preset("switch-c-2048")
    assert (m.hidden_size, m.moe_intermediate_size, m.num_attention_heads, m.head_dim) == (
        2080,
        6144,
        32,
        64,
    )
    assert m.num_layers == m.num_moe_layers == 30 and m.num_experts == 2048
    assert not m.gated_ffn
    assert total_params(m) == pytest.approx(1.571e12, rel=0.001)


def test_headline_our_figure():
    """Headline case (DeepSeek-V3, 64 GPUs, 128k), the paper's memory with the physical step
    (PHYSICAL: every term, KV reads included): 1.0x (tolerance 0.85-1.2), not the paper's 4.5x:
    at 128k both models are bound by reading what they hold, and KV reads are about 80% of the
    MoE step."""
    c = case("deepseek-v3", 64, 5, PHYSICAL)
    assert 0.85 <= c.dense_speedup <= 1.2
    step = c.moe.step
    assert step.hbm_seconds["kv"] > 0.7 * step.hbm_total_seconds


HEADLINE = 4.5  # paper abstract: dense twin 4.5x the MoE's decode throughput, DeepSeek-V3, 128k
HEADLINE_TOLERANCE = 0.10  # relative; the paper prints two significant figures ("4.5x")


@pytest.mark.parametrize(
    "row", [*TABLE3, ("switch-c-2048", 64, 5)], ids=[*IDS, "switch-c-64gpu-q5"]
)
def test_cost_scope_leaves_batches_unchanged(row):
    """The timing knobs only change how a step is timed: B_max, feasibility and memory are the
    same under the paper profile and its WEIGHTS and PHYSICAL variants, in every Table 3 row."""
    paper, weights, physical = (case(*row[:3], a) for a in (PAPER_ACCOUNTING, WEIGHTS, PHYSICAL))
    for a, b in (
        (paper.moe, weights.moe),
        (paper.dense, weights.dense),
        (paper.moe, physical.moe),
        (paper.dense, physical.dense),
    ):
        assert (a.feasible, a.batch) == (b.feasible, b.batch)
        assert a.memory == b.memory


def test_headline_dense_twin_4_5x():
    """Paper headline (Adhinarayanan & Jayasena, arXiv 2603.08960, abstract): for DeepSeek-V3 at
    128k context the quality-matched dense twin has about 4.5x the MoE's decode throughput.
    Reproduced on 64 GPUs under WEIGHTS (the paper profile with cost_scope="weights": the step
    timed on the weight path only), within 10%: 4.55x at our own B_max (248 and 283)."""
    c = case("deepseek-v3", 64, 5, WEIGHTS)
    assert abs(c.dense_speedup / HEADLINE - 1) <= HEADLINE_TOLERANCE, c.dense_speedup
    # Same batches as the paper profile (memory does not depend on cost_scope) ...
    default = case("deepseek-v3", 64, 5)
    assert (c.moe.batch, c.dense.batch) == (default.moe.batch, default.dense.batch)
    # ... and the step is the weight path: no KV read, attention core or communication in it.
    for side in (c.moe.step, c.dense.step):
        assert side.hbm_seconds["kv"] == 0 and side.compute_seconds["attention"] == 0
        assert side.comm_exposed_total_seconds == 0
        assert side.hbm_bytes["kv"] > 0  # still reported
    # The MoE streams its expert pool: routed-expert reads dominate its step.
    assert c.moe.step.hbm_seconds["routed_ffn"] > 0.8 * c.moe.step.total_seconds


def test_headline_at_the_papers_own_batches():
    """Under WEIGHTS at the paper's Table 3 batches (B_moe 244, B_dense 267 on 64 GPUs) the
    figure is 4.39x, also within 10% of 4.5x: the headline does not hinge on our batches."""
    hw = load_hardware_preset("paper-reference")
    moe = load_model_preset("deepseek-v3")
    twin = dense_twin(moe, 5)
    m = search_partitions(moe, hw, 64, CONTEXT, batch=244, accounting=WEIGHTS)
    d = search_partitions(twin, hw, 64, CONTEXT, batch=267, accounting=WEIGHTS)
    ratio = d.tokens_per_second / m.tokens_per_second
    assert abs(ratio / HEADLINE - 1) <= HEADLINE_TOLERANCE, ratio


def test_headline_qs_direction_under_paper_accounting():
    """Under WEIGHTS the throughput verdict follows the qs inequality: the dense twin wins
    where q*s < 1 (DeepSeek-V3, Qwen3, Grok-1 at q = 3 and 2) and loses for Grok-1 at q = 5
    (q*s = 1.25); DeepSeek-V3's larger capacity factor on 32 GPUs makes the gap larger there.
    (The paper profile adds exposed all-to-all, which penalises every MoE, Grok-1 included.)"""
    p = WEIGHTS
    assert case("deepseek-v3", 32, 5, p).dense_speedup > case("deepseek-v3", 64, 5, p).dense_speedup
    assert case("qwen3-235b-a22b", 64, 5, p).dense_speedup > 1
    assert case("grok-1", 64, 5, p).dense_speedup < 1
    assert 1 < case("grok-1", 64, 3, p).dense_speedup < case("grok-1", 64, 2, p).dense_speedup


def test_dense_twin_parameter_count():
    """Paper eq. 8: N_dense = q*s*N_total, exact to one FFN column."""
    from moe_reuse.predictor import total_params

    m = load_model_preset("deepseek-v3")
    twin = dense_twin(m, 5)
    target = 5 * m.sparsity * total_params(m)
    column = 3 * m.hidden_size * m.num_layers
    assert abs(total_params(twin) - target) <= column
    assert twin.kv_lora_rank == m.kv_lora_rank and twin.attention_kind == "mla" and not twin.is_moe


# Table 4 (DeepSeek-V3, 64 GPUs, FP8 weights, BF16 KV): relative decode throughput, MoE at 1k =
# 100: 1k MoE 100, Dense-5 214 (batches 31,349 and 34,263); 128k MoE 5, Dense-5 23 (244, 267).
TABLE4 = {1024: (214 / 100, 31349, 34263), 131072: (23 / 5, 244, 267)}
SPEEDUP_TOLERANCE = 0.25  # the issue's tolerance on Table 4's dense speedups


@pytest.mark.parametrize("context", list(TABLE4), ids=["1k", "128k"])
def test_table4_dense_speedup_within_25_percent(context):
    """Table 4: the paper profile gives the dense twin's speedup at 1k (2.14) and 128k (4.6)
    within 25% (ours 1.87 and 4.16), at batches within Table 3's 35%, with one set of knobs."""
    speedup, b_moe, b_dense = TABLE4[context]
    c = case("deepseek-v3", 64, 5, PAPER_ACCOUNTING, context)
    assert abs(c.dense_speedup / speedup - 1) <= SPEEDUP_TOLERANCE, c.dense_speedup
    assert abs(c.moe.batch / b_moe - 1) <= B_TOLERANCE
    assert abs(c.dense.batch / b_dense - 1) <= B_TOLERANCE


def _table5_terms(context: int) -> dict[str, dict[str, float]]:
    """Per-token HBM, compute and exposed communication, MoE compute at 1k = 1 (Table 5 units)."""
    unit_case = case("deepseek-v3", 64, 5, PAPER_ACCOUNTING, 1024)
    unit = unit_case.moe.step.compute_total_seconds / unit_case.moe.batch
    c = case("deepseek-v3", 64, 5, PAPER_ACCOUNTING, context)
    out = {}
    for label, r in (("moe", c.moe), ("dense", c.dense)):
        s = r.step
        out[label] = {
            "hbm": s.hbm_total_seconds / r.batch / unit,
            "compute": s.compute_total_seconds / r.batch / unit,
            "comm": s.comm_exposed_total_seconds / r.batch / unit,
        }
    return out


# Table 5: per-token time, MoE compute at 1k = 1: (HBM, compute, exposed comm).
TABLE5 = {
    (1024, "moe"): (3, 1, 17),
    (1024, "dense"): (1, 10, 0),
    (131072, "moe"): (433, 32, 23),
    (131072, "dense"): (72, 48, 5),
}


@pytest.mark.parametrize("context", [1024, 131072], ids=["1k", "128k"])
def test_table5_moe_dominating_term(context):
    """Table 5, MoE rows: exposed communication dominates at 1k (the paper's exposed
    all-to-all), weight streaming (HBM) at 128k; the 1k communication term is within a factor
    of 3.2 (half a decade) of the paper's 17."""
    t = _table5_terms(context)["moe"]
    if context == 1024:
        assert t["comm"] > t["hbm"] and t["comm"] > t["compute"]
        assert 17 / 3.2 <= t["comm"] <= 17 * 3.2
    else:
        assert t["hbm"] > t["compute"] and t["hbm"] >= t["comm"]


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced: Table 5 puts the dense twin's 128k HBM at 72 and the MoE's at 433 "
    "with the same MLA cache and batches within 10%; KV reads are equal per token for both, "
    "so the 6x gap must be weight traffic, which cannot then also exceed compute for the "
    "dense twin (its weights per token at 128k are 0.2 ms / 267); see docs/predictor.md",
)
def test_table5_every_entry_order_of_magnitude_and_dense_dominating_terms():
    """Table 5: every entry within half a decade, dense compute-bound at 1k, HBM-bound at 128k."""
    for (context, label), paper in TABLE5.items():
        ours = _table5_terms(context)[label]
        for key, value in zip(("hbm", "compute", "comm"), paper, strict=True):
            if value == 0:
                assert ours[key] < 0.5
            else:
                assert 1 / 3.2 <= ours[key] / value <= 3.2, (context, label, key, ours[key])
    dense1k, dense128k = _table5_terms(1024)["dense"], _table5_terms(131072)["dense"]
    assert dense1k["compute"] > max(dense1k["hbm"], dense1k["comm"])
    assert dense128k["hbm"] > max(dense128k["compute"], dense128k["comm"])
