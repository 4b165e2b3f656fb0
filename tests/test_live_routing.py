"""The dense-speedup gauge under skewed routing (issue 12): worked out by hand, no vLLM.

A window whose decode tokens all route to 8 of 64 experts reads an eighth of the expert weights
the uniform expectation reads at B = 64. The gauge must show what that routing does to the MoE's
step; the old formula (calibrate against the uniform prediction, scale both when the MoE runs
faster than that) cancelled it and showed the uniform-routing ratio whatever the routing.
"""

from __future__ import annotations

import numpy as np
import pytest

from moe_reuse.plugin.harness.tiny_models import model_spec
from moe_reuse.plugin.live.spec import ServedFacts, build_specs
from moe_reuse.plugin.live.window import WindowAccumulator, window_figures, window_gauges
from moe_reuse.plugin.recorder.aggregate import BlockStats, ByteModel
from moe_reuse.predictor import hardware_from_dict, step_time
from moe_reuse.predictor.sizes import weight_bytes_breakdown

# A CPU-like spec with every refinement the calibrated specs carry (overlap < 1, overheads).
HW = hardware_from_dict({
    "name": "test-cpu", "hbm_capacity_gb": 16, "hbm_bandwidth_gb_per_s": 25,
    "hbm_efficiency_ratio": 0.6, "expert_path_bandwidth_gb_per_s": 16, "expert_path_tflops": 0.1,
    "peak_tflops": {"bf16": 0.2}, "compute_memory_overlap_ratio": 0.55,
    "step_overhead_per_layer_us": 400, "step_overhead_per_token_us": 150,
    "intra_node_bandwidth_gb_per_s": 10, "gpus_per_node": 1})
L, E, K, B, CTX, HOT = 8, 64, 4, 64, 100, 8
BM = ByteModel(expert_bytes_per_layer=(3 * 1024 * 512 * 2,) * L, attention_bytes=8 * 2 * 2621440,
               embedding_bytes=512 * 1024 * 2, kv_bytes_per_token=8 * 2 * 2 * 128 * 2)


def specs():  # type: ignore[no-untyped-def]
    facts = ServedFacts(hf_config=model_spec("big-moe")["config"], weight_dtype="bfloat16",
                        kv_dtype="bfloat16")
    return build_specs(facts, HW, 5.0)


def skewed_block(n: int, dur_s: float):  # type: ignore[no-untyped-def]
    """n decode steps of batch B; token i of every layer picks experts 4i..4i+3 mod HOT, so each
    step touches exactly HOT experts per layer, B*K/HOT tokens each."""
    counts = np.zeros((L, n, E), dtype=np.int64)
    for i in range(B):
        counts[:, :, [(K * i + j) % HOT for j in range(K)]] += 1
    present = counts > 0
    stats = BlockStats(decode_touched=present.sum(axis=(0, 2)), decode_assign=counts.sum(axis=(0, 2)),
                       distinct_all=present.sum(axis=2), expert_decode=counts.sum(axis=1))
    meta = {"kind": np.zeros(n, np.int8), "tokens": np.tile([0, B], (n, 1)),
            "requests": np.tile([0, B], (n, 1)), "context": np.tile([0, B * CTX], (n, 1)),
            "duration_ns": np.full(n, round(dur_s * 1e9)), "comm_ns": np.zeros((n, 2), np.int64)}
    return stats, meta


def hand_routed_step(s) -> float:  # type: ignore[no-untyped-def]
    """The MoE step at B with HOT experts read per layer, from the uniform step's breakdown:
    swap the routed-expert read time for HOT experts' bytes, recompose the step."""
    uni = step_time(s.model, HW, s.partition, B, CTX)
    assert uni.comm_exposed_total_seconds == 0.0  # one device: no collective to expose
    per_expert = weight_bytes_breakdown(s.model).routed_expert_bytes
    saved = (uni.distinct_experts_per_layer - HOT) * per_expert * s.model.num_moe_layers
    hbm = uni.hbm_total_seconds - saved / HW.expert_bytes_per_second
    compute = uni.compute_total_seconds  # same tokens x top-k assignments, same math
    return (max(compute, hbm) + (1 - HW.compute_memory_overlap_ratio) * min(compute, hbm)
            + uni.overhead_seconds)


def window(s, dur_s: float):  # type: ignore[no-untyped-def]
    acc = WindowAccumulator(L, E, 1.0, 0.0)
    acc.add_block(*skewed_block(20, dur_s), BM)
    return window_figures(acc.close(1.0), s, kv_capacity_moe=None, kv_bytes_per_token=0,
                          cold_fraction=0.05, baseline=None)


@pytest.mark.parametrize("unexplained_s", [0.0, 0.004])
def test_gauge_follows_skewed_routing(unexplained_s: float) -> None:
    s = specs()
    t_uni = step_time(s.model, HW, s.partition, B, CTX).total_seconds
    t_route = hand_routed_step(s)
    t_dense = step_time(s.dense, HW, s.dense_partition, B, CTX).total_seconds
    assert t_route < 0.6 * t_uni  # the skew matters: far fewer expert bytes
    # The server runs as the cost model says under the real routing, plus time it does not model.
    t_meas = t_route + unexplained_s
    fig = window(s, t_meas)

    # Expected X by hand: the residual is only the unexplained time, which the twin pays too.
    expect = t_meas / (t_dense + unexplained_s)
    assert fig["dense_speedup"] == pytest.approx(expect, rel=1e-6)
    assert fig["step_seconds_predicted"] == pytest.approx(t_route, rel=1e-9)
    assert fig["step_seconds_predicted_uniform"] == pytest.approx(t_uni, rel=1e-9)
    assert fig["routing_cost"] == pytest.approx(t_route / t_uni, rel=1e-9)
    assert fig["distinct_experts_per_layer"] == HOT
    assert fig["error_step_seconds"] == pytest.approx(t_route / t_meas, rel=1e-6)

    # What the old formula gave: measured below the uniform prediction -> both scaled by
    # measured / uniform-predicted, i.e. the uniform-routing ratio whatever the routing did.
    old = t_meas / (t_dense * t_meas / t_uni) if t_meas < t_uni else t_meas / (
        t_dense + t_meas - t_uni)
    assert old == pytest.approx(t_uni / t_dense) or unexplained_s > 0
    assert abs(fig["dense_speedup"] / old - 1) > 0.3  # the old formula fails this test

    g = window_gauges(fig, list(range(L)))
    assert g["routing_cost_ratio"]["samples"] == [[[], pytest.approx(t_route / t_uni)]]
    sec = {lv[0]: v for lv, v in g["step_seconds"]["samples"]}
    assert sec["predicted"] == pytest.approx(t_route) and sec["predicted_uniform"] == pytest.approx(t_uni)


def test_scaling_branch_keeps_the_routing() -> None:
    """A machine uniformly faster than its spec (r < 0 under the measured routing): both scaled,
    by measured / routed-predicted, so X is the routed ratio, not the uniform one."""
    s = specs()
    t_route = hand_routed_step(s)
    t_dense = step_time(s.dense, HW, s.dense_partition, B, CTX).total_seconds
    t_uni = step_time(s.model, HW, s.partition, B, CTX).total_seconds
    fig = window(s, 0.8 * t_route)
    assert fig["dense_speedup"] == pytest.approx(t_route / t_dense, rel=1e-6)
    assert fig["dense_speedup"] < 0.7 * (t_uni / t_dense)
