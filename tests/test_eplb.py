"""predictor/eplb.py: per-rank load, balancedness and MoE-layer time of a placement.

Hand-computed cases first (every figure worked out in the comments), then properties over
seeded random traffic (conservation of tokens across ranks and replicas, uniform routing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_reuse.predictor.eplb import (
    ExpertCost,
    Placement,
    compare,
    contiguous_placement,
    evaluate,
    redundant_for,
    slot_placement,
)
from moe_reuse.predictor.errors import SpecError

# Unit costs: one assignment takes 1 s of math; one replica read 1 s of streaming. Scaling one
# side by 1e-6 makes a step purely bandwidth- or compute-bound.
COMPUTE_BOUND = ExpertCost(1.0, 1e-6, 1.0, 1.0)
BANDWIDTH_BOUND = ExpertCost(1e-6, 1.0, 1.0, 1.0)


def test_contiguous_placement_is_vllms_linear_map() -> None:
    # determine_expert_map: E // ep each, the first E % ep ranks one more.
    p = contiguous_placement(2, 8, 3)
    assert p.rank_of_slot.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert p.phys_to_logical.shape == (2, 8)
    assert p.replica_counts(8).tolist() == [[1] * 8, [1] * 8]


def test_redundant_rounds_up_to_a_multiple_of_ep() -> None:
    assert redundant_for(256, 64, 32) == 64  # 288 -> 320 slots
    assert redundant_for(256, 32, 32) == 32  # 288 = 9 x 32
    assert redundant_for(8, 16, 0) == 8
    with pytest.raises(SpecError, match="redundant"):
        redundant_for(8, 2, -1)


# Two ranks, skewed counts. One layer, E = 2, top-1, two decode steps of B = 4 tokens:
# expert 0 got 6 of the 8 tokens, expert 1 got 2 (per token: q0 = 0.75, q1 = 0.25).
COUNTS = np.array([[6.0, 2.0]])
BATCHES = [(4.0, 2.0)]


def test_skewed_two_ranks_before_rebalancing() -> None:
    p = contiguous_placement(1, 2, 2)  # rank 0: expert 0, rank 1: expert 1
    f = evaluate(COUNTS, BATCHES, p, COMPUTE_BOUND)
    # per step: rank 0 = 6 / 2 = 3 assignments, rank 1 = 2 / 2 = 1
    assert f.rank_assignments == pytest.approx((3.0, 1.0))
    # balancedness = mean 2 / max 3
    assert f.balancedness == pytest.approx(2 / 3)
    assert f.layer_balancedness == pytest.approx((2 / 3,))
    # touched per step: 1 - (1 - q)^4: expert 0: 1 - 0.25^4, expert 1: 1 - 0.75^4
    assert f.rank_reads == pytest.approx((1 - 0.25**4, 1 - 0.75**4))
    # compute-bound: the slowest rank's 3 assignments x 1 s
    assert f.seconds == pytest.approx(3.0, rel=1e-5)
    assert f.layer_term == ("rank_load",)
    g = evaluate(COUNTS, BATCHES, p, BANDWIDTH_BOUND)
    assert g.seconds == pytest.approx(1 - 0.25**4, rel=1e-5)  # rank 0 reads expert 0
    assert g.layer_term == ("replica_reads",)


def test_one_replica_each_evens_load_but_adds_reads() -> None:
    # EPLB with 2 redundant experts on 2 ranks: slots [0, 1 | 0, 1], every expert twice.
    after = slot_placement(np.array([[0, 1, 0, 1]]), 2)
    assert after.replica_counts(2).tolist() == [[2, 2]]
    before = contiguous_placement(1, 2, 2)
    c_before = evaluate(COUNTS, BATCHES, before, COMPUTE_BOUND)
    c_after = evaluate(COUNTS, BATCHES, after, COMPUTE_BOUND)
    # each replica carries half its expert's tokens: rank load 3/2 + 1/2 = 2 per step on both
    assert c_after.rank_assignments == pytest.approx((2.0, 2.0))
    assert c_after.balancedness == pytest.approx(1.0)
    # compute-bound: 3 s -> 2 s, rebalancing helps 1.5x, decided by the slowest rank's load
    cmp_c = compare(c_before, c_after)
    assert cmp_c.gain == pytest.approx(1.5, rel=1e-5)
    assert cmp_c.term == "rank_load"
    # bandwidth-bound: a replica of expert 0 is touched with 1 - (1 - 0.75/2)^4, one of expert 1
    # with 1 - (1 - 0.25/2)^4; each rank reads both: 0.847412109375 + 0.413818359375
    b_before = evaluate(COUNTS, BATCHES, before, BANDWIDTH_BOUND)
    b_after = evaluate(COUNTS, BATCHES, after, BANDWIDTH_BOUND)
    reads = (1 - 0.625**4) + (1 - 0.875**4)
    assert reads == pytest.approx(1.26123046875)
    assert b_after.rank_reads == pytest.approx((reads, reads))
    cmp_b = compare(b_before, b_after)
    # 0.99609375 / 1.26123046875 = 0.7898: the replicas make decode slower
    assert cmp_b.gain == pytest.approx((1 - 0.25**4) / reads, rel=1e-5)
    assert cmp_b.gain < 1
    assert cmp_b.term == "replica_reads"


def test_partial_overlap_adds_the_unhidden_part() -> None:
    # overlap 0.5: time = max(C, M) + 0.5 x min(C, M); rank 0: C = 3, M = 1 - 0.25^4
    cost = ExpertCost(1.0, 1.0, 1.0, 1.0, overlap_ratio=0.5)
    f = evaluate(COUNTS, BATCHES, contiguous_placement(1, 2, 2), cost)
    m0 = 1 - 0.25**4
    assert f.seconds == pytest.approx(3.0 + 0.5 * m0)
    assert f.layer_bound_seconds[0] + f.layer_unhidden_seconds[0] == pytest.approx(f.seconds)


def test_breakdowns_sum() -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, size=(4, 16)).astype(float)
    f = evaluate(counts, [(20.0, 5.0), (30.0, 2.0)], contiguous_placement(4, 16, 4),
                 ExpertCost(2.0, 3.0, 5.0, 7.0, overlap_ratio=0.3))
    assert sum(f.layer_seconds) == pytest.approx(f.seconds)
    for t, b, u in zip(f.layer_seconds, f.layer_bound_seconds, f.layer_unhidden_seconds):
        assert b + u == pytest.approx(t)


def test_bad_input_names_the_field() -> None:
    p = contiguous_placement(1, 2, 2)
    with pytest.raises(SpecError, match="counts"):
        evaluate(np.array([[1.0, -1.0]]), BATCHES, p, COMPUTE_BOUND)
    with pytest.raises(SpecError, match="batches"):
        evaluate(COUNTS, [], p, COMPUTE_BOUND)
    with pytest.raises(SpecError, match="placement"):
        evaluate(COUNTS, BATCHES, slot_placement(np.array([[0, 0]]), 2), COMPUTE_BOUND)
    with pytest.raises(SpecError, match="phys_to_logical"):
        slot_placement(np.array([[0, 1, 0]]), 2)
    with pytest.raises(SpecError, match="rank_of_slot"):
        Placement(np.array([[0, 1]]), np.array([0, 2]), 2)


def _random_placement(rng: np.random.Generator, layers: int, experts: int, ep: int,
                      redundant: int) -> Placement:
    """Every expert once plus `redundant` random replicas, shuffled, P / ep slots per rank."""
    rows = []
    for _ in range(layers):
        row = np.concatenate([np.arange(experts), rng.integers(0, experts, redundant)])
        rows.append(rng.permutation(row))
    return slot_placement(np.array(rows), ep)


@pytest.mark.parametrize("seed", range(12))
def test_tokens_are_conserved_across_ranks_and_replicas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, experts = int(rng.integers(1, 5)), int(rng.choice([4, 8, 16]))
    ep = int(rng.choice([2, 4]))
    redundant = redundant_for(experts, ep, int(rng.integers(0, 8)))
    counts = rng.gamma(0.5, 10.0, size=(layers, experts))
    steps = float(rng.integers(1, 20))
    batches = [(float(counts.sum(axis=1).mean()) / steps, steps)]
    for p in (contiguous_placement(layers, experts, ep),
              _random_placement(rng, layers, experts, ep, redundant)):
        f = evaluate(counts, batches, p, COMPUTE_BOUND)
        assert sum(f.rank_assignments) == pytest.approx(counts.sum() / steps)
        assert len(f.rank_assignments) == ep
        assert 0 < f.balancedness <= 1 + 1e-12
        # replicas read: never more than the slots, never fewer than with one copy each
        assert sum(f.rank_reads) <= p.phys_to_logical.size + 1e-9


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_uniform_routing_is_balanced_and_rebalancing_gains_nothing(ep: int) -> None:
    experts, layers = 16, 3
    counts = np.full((layers, experts), 40.0)
    batches = [(32.0, 10.0)]
    before = contiguous_placement(layers, experts, ep)
    # a permutation of the experts (what EPLB does without redundant experts)
    rng = np.random.default_rng(ep)
    after = slot_placement(np.array([rng.permutation(experts) for _ in range(layers)]), ep)
    for cost in (COMPUTE_BOUND, BANDWIDTH_BOUND, ExpertCost(1.0, 1.0, 1.0, 1.0, 0.5)):
        fb, fa = evaluate(counts, batches, before, cost), evaluate(counts, batches, after, cost)
        assert fb.balancedness == pytest.approx(1.0)
        assert fa.balancedness == pytest.approx(1.0)
        assert compare(fb, fa).gain == pytest.approx(1.0, abs=1e-12)


def test_uniform_routing_with_replicas_costs_reads_when_bandwidth_bound() -> None:
    # every expert twice: load stays balanced, but each replica is a second read
    counts = np.full((1, 8), 10.0)
    batches = [(4.0, 10.0)]  # 4 tokens x top-2 over 8 experts: sparse, bandwidth-bound
    before = contiguous_placement(1, 8, 4)
    after = slot_placement(np.array([[0, 1, 2, 3, 4, 5, 6, 7] * 2]), 4)
    fb, fa = (evaluate(counts, batches, p, BANDWIDTH_BOUND) for p in (before, after))
    assert fa.balancedness == pytest.approx(1.0)
    cmp = compare(fb, fa)
    assert cmp.gain < 1 and cmp.term == "replica_reads"
    cb, ca = (evaluate(counts, batches, p, COMPUTE_BOUND) for p in (before, after))
    assert compare(cb, ca).gain == pytest.approx(1.0, rel=1e-5)


def test_idle_layer_has_no_balancedness() -> None:
    counts = np.array([[0.0, 0.0], [3.0, 1.0]])
    f = evaluate(counts, [(2.0, 2.0)], contiguous_placement(2, 2, 2), COMPUTE_BOUND)
    assert math.isnan(f.layer_balancedness[0])
    assert f.layer_balancedness[1] == pytest.approx(2 / 3)
    assert f.balancedness == pytest.approx(2 / 3)  # (0 + 1) / (0 + 1.5)
