"""The EP advisor's window figures and gauges (plugin/live/advisor.py), no server.

The rebalancing policy is injected: a hand-written placement here (so the expected figures are
worked out by hand), vLLM's own policy in tests/test_vllm_eplb.py and the integration test.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from moe_reuse.plugin.config import ConfigError, PluginConfig, parse_config
from moe_reuse.plugin.harness.tiny_models import model_spec
from moe_reuse.plugin.live.advisor import (
    ADVISOR_GAUGES,
    advisor_figures,
    advisor_gauges,
    batches_from_groups,
    window_advice,
)
from moe_reuse.plugin.live.spec import ServedFacts, build_specs
from moe_reuse.predictor import hardware_from_dict
from moe_reuse.predictor.eplb import ExpertCost

HW = hardware_from_dict({
    "name": "test-cpu", "hbm_capacity_gb": 16, "hbm_bandwidth_gb_per_s": 30,
    "peak_tflops": {"bf16": 0.3}, "intra_node_bandwidth_gb_per_s": 10, "gpus_per_node": 1})
SPECS = build_specs(ServedFacts(hf_config=model_spec("qwen3-moe")["config"],
                                weight_dtype="bfloat16", kv_dtype="bfloat16"), HW, 5.0)
E, K = 8, 2  # qwen3-moe tiny: 8 experts, top-2
COMPUTE_BOUND = ExpertCost(1.0, 1e-6, 1.0, 1.0)

# One MoE layer, 10 decode steps of 4 tokens (80 assignments): experts 0 and 1 hot.
COUNTS = np.array([[30.0, 30.0, 4, 4, 4, 4, 4, 0]])
GROUPS = {4: [10.0, 0.0, 0.0, 0.0]}


def by_hand_rebalance(load: np.ndarray, redundant: int, ep: int) -> np.ndarray:
    """Stand-in policy: experts 0 and 1 get one replica each, spread over both ranks."""
    assert (ep, redundant) == (2, 2), (ep, redundant)
    return np.array([[0, 1, 2, 3, 4, 0, 1, 5, 6, 7]] * load.shape[0])


def cfg(**kw: object) -> PluginConfig:
    base: dict[str, object] = {"advisor_ep_sizes": "2", "advisor_redundant_experts": 2}
    return replace(PluginConfig(), **{**base, **kw})  # type: ignore[arg-type]


def test_what_if_by_hand() -> None:
    fig = advisor_figures(COUNTS, batches_from_groups(GROUPS), SPECS, cfg(),
                          rebalance=by_hand_rebalance, cost=COMPUTE_BOUND)
    assert list(fig) == ["what_if:2"]
    e = fig["what_if:2"]
    # contiguous: rank 0 = experts 0-3 = 68 / 10 steps, rank 1 = 12 / 10
    assert e["current"].rank_assignments == pytest.approx((6.8, 1.2))
    assert e["current"].balancedness == pytest.approx(4.0 / 6.8)
    # by-hand EPLB: rank 0 = 15 + 15 + 4 + 4 + 4, rank 1 = 15 + 15 + 4 + 4 + 0 (per window)
    assert e["rebalanced"].rank_assignments == pytest.approx((4.2, 3.8))
    assert e["rebalanced"].balancedness == pytest.approx(4.0 / 4.2)
    assert e["gain"].gain == pytest.approx(6.8 / 4.2, rel=1e-5)  # compute-bound: slowest rank
    assert e["gain"].term == "rank_load" and e["net"] is None and e["redundant"] == 2


def test_gauges_carry_the_figures_with_bounded_labels() -> None:
    g = window_advice(COUNTS, GROUPS, SPECS, cfg(), [5], rebalance=by_hand_rebalance)
    assert set(g) == set(ADVISOR_GAUGES)
    for name, spec in g.items():
        for labels, value in spec["samples"]:
            assert len(labels) == len(spec["labels"]), name
            assert math.isfinite(value)
    bal = {tuple(lv): v for lv, v in g["ep_balancedness_ratio"]["samples"]}
    assert bal[("what_if", "2", "current")] == pytest.approx(4.0 / 6.8)
    assert bal[("what_if", "2", "rebalanced")] == pytest.approx(4.0 / 4.2)
    lay = {tuple(lv): v for lv, v in g["ep_layer_balancedness_ratio"]["samples"]}
    assert lay[("what_if", "2", "current", "5")] == pytest.approx(4.0 / 6.8)
    ranks = {tuple(lv): v for lv, v in g["ep_rank_tokens"]["samples"]}
    assert len(ranks) == 4  # 2 ranks x 2 placements, no layer x rank x expert series
    terms = [v for _, v in g["eplb_deciding_term"]["samples"]]
    assert sorted(terms) == [0.0, 1.0]
    gain = g["eplb_gain_ratio"]["samples"]
    assert len(gain) == 1 and gain[0][0] == ["what_if", "2"] and gain[0][1] > 0
    assert g["eplb_net_gain_ratio"]["samples"] == []  # no EPLB served


def test_served_eplb_reports_net_gain() -> None:
    served = SimpleNamespace(ep_size=2, eplb=True, phys_to_logical=np.array(
        [[0, 1, 2, 3, 4, 0, 1, 5, 6, 7]]), rank_of_slot=np.repeat([0, 1], 5))
    fig = advisor_figures(COUNTS, batches_from_groups(GROUPS), SPECS, cfg(advisor_ep_sizes=""),
                          served=served, rebalance=by_hand_rebalance, cost=COMPUTE_BOUND)
    e = fig["served:2"]
    assert set(e) >= {"current", "rebalanced", "contiguous"}
    # EPLB as served vs no EPLB: 6.8 / 4.2 in compute-bound steps, it pays for itself
    assert e["net"].gain == pytest.approx(6.8 / 4.2, rel=1e-5)
    g = advisor_gauges(fig, [5])
    assert g["eplb_net_gain_ratio"]["samples"] == [[["2"], pytest.approx(6.8 / 4.2, rel=1e-5)]]


def test_dp_scales_the_times_not_the_balancedness() -> None:
    dp2 = replace(SPECS, partition=replace(SPECS.partition, dp=2))
    one = advisor_figures(COUNTS, batches_from_groups(GROUPS), SPECS, cfg(),
                          rebalance=by_hand_rebalance, cost=COMPUTE_BOUND)["what_if:2"]
    two = advisor_figures(COUNTS, batches_from_groups(GROUPS), dp2, cfg(),
                          rebalance=by_hand_rebalance, cost=COMPUTE_BOUND)["what_if:2"]
    assert two["current"].balancedness == pytest.approx(one["current"].balancedness)
    assert two["current"].seconds == pytest.approx(2 * one["current"].seconds, rel=1e-5)


def test_idle_window_gives_no_gauges() -> None:
    assert window_advice(np.zeros((1, E)), {}, SPECS, cfg(), [5],
                         rebalance=by_hand_rebalance) == {}


def test_ep_sizes_key_is_checked() -> None:
    assert parse_config({"advisor_ep_sizes": "16, 8"}).advisor_ep_sizes == "16, 8"
    with pytest.raises(ConfigError, match="advisor_ep_sizes"):
        parse_config({"advisor_ep_sizes": "8,1"})
    with pytest.raises(ConfigError, match="advisor_redundant_experts"):
        parse_config({"advisor_redundant_experts": 5000})


def test_with_vllms_policy() -> None:
    pytest.importorskip("vllm")
    g = window_advice(COUNTS, GROUPS, SPECS, cfg(advisor_ep_sizes="2,4"), [5])
    bal = {tuple(lv): v for lv, v in g["ep_balancedness_ratio"]["samples"]}
    assert bal[("what_if", "4", "current")] == pytest.approx(2.0 / 6.0)  # rank 0: experts 0, 1
    assert bal[("what_if", "4", "rebalanced")] > bal[("what_if", "4", "current")]
    red = {tuple(lv): v for lv, v in g["eplb_redundant_experts"]["samples"]}
    assert red == {("what_if", "2"): 2.0, ("what_if", "4"): 4.0}  # 10 -> 12 slots on 4 ranks


def test_publish_advice_replaces_only_its_gauges_and_survives_a_fault() -> None:
    from moe_reuse.plugin.live.advisor import publish_advice

    session = SimpleNamespace(gauges={"dense_speedup_ratio": {"doc": "", "labels": [],
                                                              "samples": []},
                                      "eplb_gain_ratio": {"doc": "stale", "labels": [],
                                                          "samples": []}})
    w = SimpleNamespace(expert_tokens=COUNTS, groups=GROUPS)
    faults: list[BaseException] = []

    def boom() -> None:
        raise RuntimeError("no EplbState")

    publish_advice(session, w, SPECS, cfg(advisor_ep_sizes=""), [5], placement=boom,
                   on_fault=lambda _s, e: faults.append(e))
    assert len(faults) == 1 and "dense_speedup_ratio" in session.gauges
    assert "eplb_gain_ratio" not in session.gauges  # the stale advice is withdrawn
    served = SimpleNamespace(ep_size=2, eplb=False, phys_to_logical=np.arange(8)[None, :],
                             rank_of_slot=np.repeat([0, 1], 4))
    publish_advice(session, w, SPECS, cfg(advisor_ep_sizes=""), [5], placement=lambda: served)
    gain = session.gauges["eplb_gain_ratio"]["samples"]
    assert [lv for lv, _ in gain] == [["served", "2"]]
    assert "dense_speedup_ratio" in session.gauges
