"""Structural tests of the cost model: scaling laws of the closed forms and breakdowns that sum.

These do not compare with published numbers; each states the relation it checks. Float
comparisons use a relative tolerance of 1e-9 (pure arithmetic, no fitting).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from moe_reuse.predictor import (
    Accounting,
    Partition,
    SpecError,
    dense_twin,
    expected_distinct_experts,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    load_hardware_preset,
    load_model_preset,
    memory_breakdown,
    reuse_from_counts,
    reuse_uniform,
    search_partitions,
    step_time,
    tokens_per_expert_uniform,
    total_params,
    weight_bytes_breakdown,
)
from moe_reuse.predictor.sizes import active_params

REL = 1e-9
HW = load_hardware_preset("paper-reference")
P = Partition(tp=8, kvp=8, ep=8)


@pytest.fixture(scope="module")
def ds():
    return load_model_preset("deepseek-v3")


@pytest.mark.parametrize(
    "name",
    [
        "deepseek-v3",
        "qwen3-235b-a22b",
        "grok-1",
        "switch-c-2048",
        "mixtral-8x7b",
        "mixtral-8x22b",
        "qwen3-30b-a3b",
        "gpt-oss-120b",
        "qwen3-next-80b-a3b",
    ],
)
def test_preset_parameter_counts_match_published_totals(name):
    """Total parameters within 2% of the model cards (DeepSeek-V3 671B without MTP, etc.)."""
    published = {
        "deepseek-v3": 671e9,
        "qwen3-235b-a22b": 235e9,
        "grok-1": 314e9,
        "switch-c-2048": 1571e9,
        "mixtral-8x7b": 46.7e9,
        "mixtral-8x22b": 141e9,
        "qwen3-30b-a3b": 30.5e9,
        "gpt-oss-120b": 116.8e9,
        "qwen3-next-80b-a3b": 80e9,
    }
    assert total_params(load_model_preset(name)) == pytest.approx(published[name], rel=0.02)


def test_doubling_layers_doubles_layer_bytes_and_flops(ds):
    """2x layers (dense and MoE alike) gives 2x per-layer weight bytes, KV bytes and layer FLOPs."""
    twice = replace(ds, num_layers=2 * ds.num_layers, num_moe_layers=2 * ds.num_moe_layers)
    w1, w2 = weight_bytes_breakdown(ds), weight_bytes_breakdown(twice)
    fixed = w1.embedding_bytes + w1.lm_head_bytes
    assert w2.total_bytes - fixed == pytest.approx(2 * (w1.total_bytes - fixed), rel=REL)
    assert kv_bytes_per_sequence(twice, 4096) == pytest.approx(
        2 * kv_bytes_per_sequence(ds, 4096), rel=REL
    )
    part = Partition(tp=8, kvp=16, ep=8)
    s1 = step_time(ds, HW, part, 64, 8192)
    s2 = step_time(twice, HW, part, 64, 8192)
    for key in ("projections", "attention", "dense_ffn", "shared_ffn", "routed_ffn"):
        assert s2.flops[key] == pytest.approx(2 * s1.flops[key], rel=REL), key
    assert s2.flops["lm_head"] == pytest.approx(s1.flops["lm_head"], rel=REL)


def test_doubling_k_doubles_routed_flops(ds):
    """2x top-k doubles routed-expert GEMM FLOPs (router FLOPs unchanged) and nothing else."""
    k2 = replace(ds, experts_per_token=2 * ds.experts_per_token)
    s1, s2 = step_time(ds, HW, P, 128, 4096), step_time(k2, HW, P, 128, 4096)
    router = 2 * 128 / (P.dp * P.pp) * ds.num_moe_layers * ds.hidden_size * ds.num_experts
    assert s2.flops["routed_ffn"] - router == pytest.approx(
        2 * (s1.flops["routed_ffn"] - router), rel=REL
    )
    for key in ("projections", "attention", "dense_ffn", "shared_ffn", "lm_head"):
        assert s2.flops[key] == s1.flops[key]


def test_doubling_batch_doubles_flops_and_kv_bytes_not_weights(ds):
    """FLOPs and KV bytes scale with B; dense and attention weight bytes do not."""
    s1, s2 = step_time(ds, HW, P, 100, 4096), step_time(ds, HW, P, 200, 4096)
    assert s2.hbm_bytes["kv"] == pytest.approx(2 * s1.hbm_bytes["kv"], rel=REL)
    assert s2.flops["attention"] == pytest.approx(2 * s1.flops["attention"], rel=REL)
    assert s2.hbm_bytes["projections"] == s1.hbm_bytes["projections"]


def test_measured_machine_refinements():
    """HardwareSpec refinements (calibrate): overlap r adds (1 - r) * min(compute, HBM), the
    per-step overhead adds itself, a measured expert-path FLOP rate replaces the peak for the
    routed experts only; the critical-path split still sums to the step; defaults change nothing."""
    model = load_model_preset("qwen3-30b-a3b")
    base = step_time(model, HW, Partition(tp=1), 64, 4096)
    assert base.unhidden_seconds == 0 and base.overhead_seconds == 0
    hw = replace(HW, compute_memory_overlap_ratio=0.25, step_overhead_seconds=1e-3,
                 step_overhead_per_layer_seconds=1e-4, step_overhead_per_token_seconds=2e-5)
    s = step_time(model, hw, Partition(tp=1), 64, 4096)
    c, h = s.compute_total_seconds, s.hbm_total_seconds
    assert (c, h) == (base.compute_total_seconds, base.hbm_total_seconds)
    assert s.total_seconds == pytest.approx(
        max(c, h) + 0.75 * min(c, h) + s.comm_exposed_total_seconds
        + 1e-3 + model.num_layers * 1e-4 + 64 * 2e-5, rel=REL)
    assert sum(s.critical_seconds().values()) == pytest.approx(s.total_seconds, rel=REL)
    peak = HW.peak_flops(model.expert_weight_dtype)
    slow = step_time(model, replace(HW, expert_path_flops_per_second=peak / 4), Partition(tp=1),
                     64, 4096)
    assert slow.compute_seconds["routed_ffn"] == pytest.approx(
        4 * base.compute_seconds["routed_ffn"], rel=REL)
    others = [k for k in base.compute_seconds if k != "routed_ffn"]
    assert [slow.compute_seconds[k] for k in others] == [base.compute_seconds[k] for k in others]
    with pytest.raises(SpecError, match="compute_memory_overlap_ratio"):
        replace(HW, compute_memory_overlap_ratio=1.5)


@pytest.mark.parametrize(
    "name", ["deepseek-v3", "qwen3-235b-a22b", "gpt-oss-120b", "switch-c-2048"]
)
@pytest.mark.parametrize("context", [1024, 131072, 4 << 20])
def test_breakdowns_sum_to_totals(name, context):
    """Compute, HBM and communication breakdowns sum to their totals; total = max + exposed;
    the critical-path split sums to the step; weight parts sum to the total bytes."""
    model = load_model_preset(name)
    result = search_partitions(
        model, HW, 64, context, accounting=Accounting(tp_policy="search", max_pp=2)
    )
    if not result.feasible:
        pytest.skip("infeasible at this context")
    s = result.step
    assert sum(s.compute_seconds.values()) == pytest.approx(s.compute_total_seconds, rel=REL)
    assert sum(s.hbm_seconds.values()) == pytest.approx(s.hbm_total_seconds, rel=REL)
    assert sum(s.comm_seconds.values()) == pytest.approx(s.comm_total_seconds, rel=REL)
    assert sum(s.comm_exposed_seconds.values()) == pytest.approx(
        s.comm_exposed_total_seconds, rel=REL
    )
    assert s.total_seconds == pytest.approx(
        max(s.compute_total_seconds, s.hbm_total_seconds) + s.comm_exposed_total_seconds, rel=REL
    )
    assert sum(s.critical_seconds().values()) == pytest.approx(s.total_seconds, rel=REL)
    for k, v in s.comm_exposed_seconds.items():
        assert 0 <= v <= s.comm_seconds[k] + 1e-15
    w = weight_bytes_breakdown(model)
    parts = (
        w.routed_total_bytes,
        w.shared_total_bytes,
        w.router_total_bytes,
        w.dense_ffn_total_bytes,
        w.attention_total_bytes,
        w.embedding_bytes,
        w.lm_head_bytes,
    )
    assert sum(parts) == pytest.approx(w.total_bytes, rel=REL)
    m = result.memory
    assert (
        m.attention_bytes
        + m.embedding_bytes
        + m.dense_ffn_bytes
        + m.shared_ffn_bytes
        + m.routed_ffn_bytes
        + m.router_bytes
    ) == pytest.approx(m.weights_bytes, rel=REL)


@pytest.mark.parametrize("name", ["deepseek-v3", "grok-1", "switch-c-2048"])
def test_weights_cost_scope_times_only_the_weight_path(name):
    """cost_scope="weights": KV, attention core and exposed communication are zero in the timed
    breakdowns, the rest equal the full step's; bytes, FLOPs and raw communication still report
    the physical step; breakdowns still sum to totals and total = max + exposed (= max)."""
    model = load_model_preset(name)
    full = step_time(model, HW, P, 64, 131072)
    w = step_time(model, HW, P, 64, 131072, Accounting(cost_scope="weights"))
    assert w.hbm_seconds["kv"] == 0 and w.compute_seconds["attention"] == 0
    assert w.comm_exposed_total_seconds == 0
    for k in w.hbm_seconds:
        if k != "kv":
            assert w.hbm_seconds[k] == full.hbm_seconds[k]
    for k in w.compute_seconds:
        if k != "attention":
            assert w.compute_seconds[k] == full.compute_seconds[k]
    assert w.hbm_bytes == full.hbm_bytes and w.flops == full.flops
    assert w.comm_seconds == full.comm_seconds
    assert sum(w.hbm_seconds.values()) == pytest.approx(w.hbm_total_seconds, rel=REL)
    assert sum(w.compute_seconds.values()) == pytest.approx(w.compute_total_seconds, rel=REL)
    assert w.total_seconds == pytest.approx(
        max(w.compute_total_seconds, w.hbm_total_seconds), rel=REL
    )
    assert sum(w.critical_seconds().values()) == pytest.approx(w.total_seconds, rel=REL)
    assert w.total_seconds < full.total_seconds


def test_weight_breakdown_per_expert_matches_shapes(ds):
    """One DeepSeek-V3 routed expert is 3 x 7168 x 2048 FP8 bytes; 256 x 58 of them make the pool."""
    w = weight_bytes_breakdown(ds)
    assert w.routed_expert_bytes == 3 * 7168 * 2048
    assert w.routed_total_bytes == 256 * 58 * w.routed_expert_bytes
    assert w.shared_experts_bytes_per_moe_layer == w.routed_expert_bytes
    assert w.dense_ffn_bytes_per_dense_layer == 3 * 7168 * 18432
    assert kv_bytes_per_token(ds) == 61 * 576 * 2  # MLA latent + RoPE key, BF16


def test_memory_fills_budget_at_b_max(ds):
    """B_max is the largest batch whose KV fits: B_max fits, B_max + 1 does not."""
    m = memory_breakdown(ds, HW, P, 131072)
    assert m.weights_bytes + m.batch_max * m.kv_bytes_per_sequence <= m.budget_bytes
    assert m.weights_bytes + (m.batch_max + 1) * m.kv_bytes_per_sequence > m.budget_bytes


def test_partition_factors_shard_memory(ds):
    """Doubling KV-parallel halves per-GPU KV per sequence; doubling the FFN group halves expert bytes;
    MLA's 'replicated' cache holds tp times the 'tokens' split."""
    a = memory_breakdown(ds, HW, Partition(tp=8, kvp=4, ep=8), 131072)
    b = memory_breakdown(ds, HW, Partition(tp=8, kvp=8, ep=8), 131072)
    assert b.kv_bytes_per_sequence == pytest.approx(a.kv_bytes_per_sequence / 2, rel=REL)
    assert b.routed_ffn_bytes == pytest.approx(a.routed_ffn_bytes / 2, rel=REL)
    rep = memory_breakdown(ds, HW, P, 131072, Accounting(mla_kv_sharding="replicated"))
    tok = memory_breakdown(ds, HW, P, 131072, Accounting(mla_kv_sharding="tokens"))
    assert rep.kv_bytes_per_sequence == pytest.approx(8 * tok.kv_bytes_per_sequence, rel=REL)


def test_sliding_window_caps_kv():
    """gpt-oss: half the layers keep only 128 tokens, so KV per token tends to half at long context."""
    m = load_model_preset("gpt-oss-120b")
    full = kv_bytes_per_token(m)
    assert kv_bytes_per_token(m, 128) == pytest.approx(full, rel=REL)
    assert kv_bytes_per_token(m, 1 << 20) == pytest.approx(
        full / 2 * (1 + 128 / (1 << 20)), rel=REL
    )


def test_reuse_uniform_formulas():
    """b_e = B*k/E and E(1-(1-k/E)^B), with the edge values."""
    assert tokens_per_expert_uniform(244, 8, 256) == 244 * 8 / 256
    assert expected_distinct_experts(256, 8, 0) == 0
    assert expected_distinct_experts(256, 8, 1) == pytest.approx(8, rel=REL)
    assert expected_distinct_experts(256, 8, 244) == pytest.approx(
        256 * (1 - (1 - 8 / 256) ** 244), rel=REL
    )
    assert expected_distinct_experts(8, 8, 3) == 8
    assert reuse_uniform(1, 8, 256) == pytest.approx(1.0, rel=REL)
    with pytest.raises(SpecError, match="top_k"):
        expected_distinct_experts(8, 9, 1)


def test_reuse_from_counts():
    """Measured counts: distinct experts, tokens per touched expert, max load, imbalance."""
    distinct, per_expert, max_load, imbalance = reuse_from_counts([4, 0, 2, 0, 0, 6, 0, 0])
    assert (distinct, per_expert, max_load) == (3, 4.0, 6)
    assert imbalance == pytest.approx(6 / (12 / 8), rel=REL)
    assert tuple(reuse_from_counts([0, 0])) == (0, 0.0, 0, 0.0)
    with pytest.raises(SpecError, match="counts"):
        reuse_from_counts([1, -1])


def test_measured_distinct_experts_replace_uniform(ds):
    """Live use: a measured distinct-expert count sets the routed bytes; counts give the same."""
    uniform = step_time(ds, HW, P, 16, 4096)
    measured = step_time(ds, HW, P, 16, 4096, distinct_experts_per_layer=32)
    counts = [4] * 32 + [0] * 224
    from_counts = step_time(ds, HW, P, 16, 4096, expert_counts=counts)
    assert measured.distinct_experts_per_layer == 32 == from_counts.distinct_experts_per_layer
    assert measured.hbm_bytes["routed_ffn"] == pytest.approx(
        from_counts.hbm_bytes["routed_ffn"], rel=REL
    )
    ratio = (
        measured.hbm_bytes["routed_ffn"] - ds.num_moe_layers * ds.hidden_size * ds.num_experts
    ) / (uniform.hbm_bytes["routed_ffn"] - ds.num_moe_layers * ds.hidden_size * ds.num_experts)
    assert ratio == pytest.approx(32 / uniform.distinct_experts_per_layer, rel=REL)


def test_dense_twin_keeps_attention_and_scales_ffn(ds):
    """The twin keeps attention/KV/embeddings and has q*s*N parameters; larger q, larger twin."""
    t3, t5 = dense_twin(ds, 3), dense_twin(ds, 5)
    assert kv_bytes_per_token(t5) == kv_bytes_per_token(ds)
    assert total_params(t3) < total_params(t5)
    assert active_params(t5) == total_params(t5)
    with pytest.raises(SpecError, match="q"):
        dense_twin(ds, 0.001)
    with pytest.raises(SpecError, match="model"):
        dense_twin(t5, 5)


def test_search_picks_highest_throughput_feasible(ds):
    """The search's answer is at least as fast as every other feasible candidate it tried."""
    acc = Accounting(tp_policy="search", max_pp=2, max_dp=4)
    best = search_partitions(ds, HW, 32, 32768, accounting=acc)
    from moe_reuse.predictor import candidate_partitions, max_batch

    for part in candidate_partitions(ds, HW, 32, acc):
        b = max_batch(ds, HW, part, 32768, acc)
        if b >= 1:
            assert step_time(
                ds, HW, part, b, 32768, acc
            ).tokens_per_second <= best.tokens_per_second * (1 + 1e-9)


def test_fixed_batch_must_fit(ds):
    """--batch evaluates both models at one batch; a batch above B_max is infeasible."""
    fits = search_partitions(ds, HW, 64, 131072, batch=64)
    assert fits.feasible and fits.batch == 64
    assert not search_partitions(ds, HW, 64, 131072, batch=10**6).feasible
    assert math.isfinite(fits.tokens_per_second)
