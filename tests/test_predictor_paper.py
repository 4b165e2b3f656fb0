"""Reproduction of Adhinarayanan & Jayasena, "The qs Inequality" (arXiv 2603.08960).

Table 1 and the closed-form columns of Table 3 are exact. Table 3's batches are reproduced
within the issue's 35% by the default accounting (one global calibrated constant,
usable_hbm_ratio, no per-model constants); every qualitative Table 3 result is exact. The two
paper claims the model does not reproduce are strict xfails that state why.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest

from moe_reuse.predictor import (
    DEFAULT_Q,
    dense_twin,
    evaluate_case,
    load_hardware_preset,
    load_model_preset,
    q_from_losses,
    qs_verdict,
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

_CACHE: dict[tuple[str, int, float], object] = {}


def case(name: str, gpus: int, q: float):
    key = (name, gpus, q)
    if key not in _CACHE:
        _CACHE[key] = evaluate_case(
            load_model_preset(name), load_hardware_preset("paper-reference"), gpus, CONTEXT, q=q
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


@pytest.mark.parametrize("row", TABLE3, ids=IDS)
def test_table3_batches_within_35_percent(row):
    """Table 3 B_moe and B_dense within 35% of the paper's, same default accounting for all rows."""
    name, gpus, q, _, _, _, b_moe, b_dense = row
    c = case(name, gpus, q)
    assert c.moe.feasible and c.dense.feasible
    assert abs(c.moe.batch / b_moe - 1) <= B_TOLERANCE, (c.moe.batch, b_moe)
    assert abs(c.dense.batch / b_dense - 1) <= B_TOLERANCE, (c.dense.batch, b_dense)
    assert c.r_moe == c.sparsity * c.moe.batch
    assert c.reuse_gap == pytest.approx(c.routing_factor * c.capacity_factor)


def test_table3_capacity_factor_directions():
    """Table 3 qualitative: B_dense/B_moe > 1 for DeepSeek-V3 (larger on 32 GPUs than on 64) and
    Qwen3; for Grok-1 < 1 at q = 5 and > 1 at q = 3 and 2 (exact)."""
    ds32, ds64 = (
        case("deepseek-v3", 32, 5).capacity_factor,
        case("deepseek-v3", 64, 5).capacity_factor,
    )
    assert ds32 > ds64 > 1
    assert case("qwen3-235b-a22b", 64, 5).capacity_factor > 1
    assert case("grok-1", 64, 5).capacity_factor < 1
    assert case("grok-1", 64, 3).capacity_factor > 1
    assert case("grok-1", 64, 2).capacity_factor > case("grok-1", 64, 3).capacity_factor


@pytest.mark.parametrize("row", TABLE3, ids=IDS)
def test_table3_routing_factor_dominates_gap(row):
    """Table 3: the reuse gap is mostly routing: E/k exceeds the capacity factor in every row."""
    c = case(*row[:3])
    assert c.routing_factor > c.capacity_factor
    assert c.reuse_gap == pytest.approx(c.routing_factor * c.capacity_factor)


def test_switch_c_infeasible_where_dense_twin_fits():
    """The abstract: Switch-C-2048 can become infeasible where its dense twin is viable. Under the
    default accounting that boundary is 16 GPUs (1.57 TB of FP8 experts need > 16 x 76 GB)."""
    c = case("switch-c-2048", 16, 5)
    assert not c.moe.feasible and c.moe.batch is None
    assert c.dense.feasible
    assert c.capacity_factor is None and c.dense_speedup is None


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced: with weights sharded over all 64 GPUs (needed for the "
    "DeepSeek-V3/Qwen3 batches above) Switch-C's 24.5 GB per GPU fits; see docs/predictor.md",
)
def test_switch_c_infeasible_on_64_gpus():
    """Table 3: Switch-C-2048 out of memory on 64 GPUs."""
    assert not case("switch-c-2048", 64, 5).moe.feasible


def test_headline_our_figure():
    """Headline case (DeepSeek-V3, 64 GPUs, 128k): our figure is 1.0x (tolerance 0.85-1.2), not the
    paper's 4.5x: at 128k both models are bound by KV reads (about 80% of the MoE step)."""
    c = case("deepseek-v3", 64, 5)
    assert 0.85 <= c.dense_speedup <= 1.2
    step = c.moe.step
    assert step.hbm_seconds["kv"] > 0.7 * step.hbm_total_seconds


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced: the paper's 4.5x needs the 128k KV read to be a small "
    "part of the step; with its own Table 3 batches it is not; see docs/predictor.md",
)
def test_headline_dense_twin_4_5x():
    """Paper headline: dense twin about 4.5x the MoE's decode throughput (tolerance 35%)."""
    assert abs(case("deepseek-v3", 64, 5).dense_speedup / 4.5 - 1) <= 0.35


def test_dense_twin_parameter_count():
    """Paper eq. 8: N_dense = q*s*N_total, exact to one FFN column."""
    from moe_reuse.predictor import total_params

    m = load_model_preset("deepseek-v3")
    twin = dense_twin(m, 5)
    target = 5 * m.sparsity * total_params(m)
    column = 3 * m.hidden_size * m.num_layers
    assert abs(total_params(twin) - target) <= column
    assert twin.kv_lora_rank == m.kv_lora_rank and twin.attention_kind == "mla" and not twin.is_moe
