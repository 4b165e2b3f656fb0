"""EP over data-parallel engines (vLLM's DP attention + EP), against first principles.

`vllm serve --data-parallel-size D --tensor-parallel-size T --enable-expert-parallel` runs D
engines whose attention, dense FFN and shared experts are per engine (TP T), while the routed
experts are sharded over all T x D GPUs (EP = T x D). Each relation below follows from that
layout alone, not from the predictor's own numbers: every token-expert assignment is computed
once somewhere, each GPU holds E / ep whole experts, and those experts serve every engine's
tokens. Float comparisons use a relative tolerance of 1e-9 (pure arithmetic).
"""

from __future__ import annotations

import pytest

from moe_reuse.predictor import (
    Partition,
    SpecError,
    expected_distinct_experts,
    load_hardware_preset,
    load_model_preset,
    memory_breakdown,
    step_time,
    weight_bytes_breakdown,
)
from moe_reuse.predictor.memory import layout
from moe_reuse.predictor.sizes import expert_params, router_params_per_moe_layer

REL = 1e-9
HW = load_hardware_preset("h200")


@pytest.fixture(scope="module")
def ds():
    return load_model_preset("deepseek-v3")


@pytest.mark.parametrize(("tp", "dp"), [(1, 8), (2, 4), (4, 2), (1, 2)])
def test_ep_over_engines_spans_them_with_whole_experts(ds, tp, dp):
    lay = layout(ds, HW, Partition(tp=tp, dp=dp, ep=tp * dp))
    assert (lay.ffn_group, lay.ep_span, lay.routed_group, lay.etp) == (tp, dp, tp * dp, 1)


@pytest.mark.parametrize(("part", "words"), [
    (Partition(tp=2, dp=4, ep=6), "must divide num_experts"),  # 256 % 6
    (Partition(tp=2, dp=4, ep=32), "must span whole data-parallel engines"),  # 16 engines
    (Partition(tp=4, dp=1, ep=8), "must span whole data-parallel engines"),  # one engine
    (Partition(tp=8, ep=16), "must span whole data-parallel engines"),
])
def test_ep_that_fits_no_layout_names_the_field(ds, part, words):
    with pytest.raises(SpecError, match=f"ep: .*{words}"):
        layout(ds, HW, part)


def test_each_gpu_holds_its_share_of_the_experts_and_its_engines_attention(ds):
    """DP8 x EP8 against one TP8 x EP8 engine: the same routed bytes per GPU (E/8 experts each),
    attention and shared experts 8 times larger (per engine, TP 1 instead of 8)."""
    w = weight_bytes_breakdown(ds)
    dpep = memory_breakdown(ds, HW, Partition(tp=1, dp=8, ep=8), 4096)
    tpep = memory_breakdown(ds, HW, Partition(tp=8, ep=8), 4096)
    assert dpep.routed_ffn_bytes == pytest.approx(w.routed_total_bytes / 8, rel=REL)
    assert dpep.routed_ffn_bytes == pytest.approx(tpep.routed_ffn_bytes, rel=REL)
    assert dpep.attention_bytes == pytest.approx(8 * tpep.attention_bytes, rel=REL)
    assert dpep.shared_ffn_bytes == pytest.approx(w.shared_total_bytes, rel=REL)


@pytest.mark.parametrize(("tp", "dp"), [(1, 8), (2, 4), (8, 1)])
def test_every_assignment_is_computed_once_across_the_gpus(ds, tp, dp):
    """Routed FLOPs over all GPUs = 2 x tokens x k x expert params x MoE layers, plus the
    router once per token per GPU of its engine, whatever the layout."""
    batch = 64
    st = step_time(ds, HW, Partition(tp=tp, dp=dp, ep=tp * dp), batch, 2048)
    gpus = tp * dp
    experts = 2.0 * batch * ds.experts_per_token * expert_params(ds) * ds.num_moe_layers
    router = 2.0 * batch * tp * router_params_per_moe_layer(ds) * ds.num_moe_layers
    assert gpus * st.flops["routed_ffn"] == pytest.approx(experts + router, rel=REL)


def test_the_experts_serve_every_engines_tokens(ds):
    """At 8 sequences per engine, an expert GPU of DP8 x EP8 reads the experts that all 64
    pooled tokens touched (uniform routing), its eighth of them, and each token reaches it
    from its engine by the all-to-all: the same expert reads as one engine of 64 on TP8 x EP8."""
    per_engine, dp = 8, 8
    st = step_time(ds, HW, Partition(tp=1, dp=dp, ep=dp), per_engine * dp, 2048)
    pooled = per_engine * dp
    distinct = expected_distinct_experts(ds.num_experts, ds.experts_per_token, pooled)
    assert st.distinct_experts_per_layer == pytest.approx(distinct, rel=REL)
    assert st.tokens_per_expert == pytest.approx(pooled * ds.experts_per_token / distinct, rel=REL)
    w = weight_bytes_breakdown(ds)
    routed = ds.num_moe_layers * (distinct * w.routed_expert_bytes / dp + w.router_bytes_per_moe_layer)
    assert st.hbm_bytes["routed_ffn"] == pytest.approx(routed, rel=REL)
    one_engine = step_time(ds, HW, Partition(tp=8, ep=8), pooled, 2048)
    assert st.hbm_bytes["routed_ffn"] == pytest.approx(one_engine.hbm_bytes["routed_ffn"], rel=REL)
    assert st.comm_seconds["ffn"] > 0  # dispatch and combine between the engines' GPUs
    # an engine alone (no EP over engines) would read the experts its own 8 tokens touch
    alone = expected_distinct_experts(ds.num_experts, ds.experts_per_token, per_engine)
    assert st.distinct_experts_per_layer > alone


def test_a_measured_routing_is_taken_to_describe_the_pooled_tokens(ds):
    st = step_time(ds, HW, Partition(tp=1, dp=8, ep=8), 64, 2048, distinct_experts_per_layer=100.0)
    w = weight_bytes_breakdown(ds)
    routed = ds.num_moe_layers * (100.0 * w.routed_expert_bytes / 8 + w.router_bytes_per_moe_layer)
    assert st.hbm_bytes["routed_ffn"] == pytest.approx(routed, rel=REL)


def test_the_search_tries_ep_over_engines_only_where_dp_is_allowed(ds):
    """Default accounting (max_dp 1): no candidate spans engines, so no default answer moves.
    With max_dp 8 on 8 GPUs the search tries DP8 x EP8 and every candidate is a valid layout."""
    from moe_reuse.predictor import Accounting, candidate_partitions

    assert all(layout(ds, HW, p).ep_span == 1 for p in candidate_partitions(ds, HW, 8))
    acc = Accounting(tp_policy="search", max_dp=8)
    parts = candidate_partitions(ds, HW, 8, acc)
    spans = {(p.tp, p.dp, p.ep): layout(ds, HW, p, acc).ep_span for p in parts}
    assert spans[(1, 8, 8)] == 8 and spans[(2, 4, 8)] == 4 and spans[(1, 8, 2)] == 2
    assert spans[(8, 1, 8)] == 1
    assert len(parts) == len(set(parts))
