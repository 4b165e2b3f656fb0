"""Expert parallelism: per-rank load, balancedness, and the MoE-layer time of a placement.

Pure functions over plain arrays (numpy, no I/O, no vLLM or torch): the live advisor
(`plugin/live/advisor.py`) feeds them a window's per-expert token counts and a placement, and the
vLLM seam (`plugin/vllm/eplb.py`) supplies the placements vLLM itself would use.

The model. A placement puts P physical expert slots on `num_ranks` ranks; each slot holds one
logical expert, and a logical expert with n replicas sends each token to one of them (vLLM hashes
the token index), so each replica carries 1/n of the expert's tokens. Per MoE layer and rank:

- load (token-expert assignments per step) = sum over the rank's slots of tokens / replicas;
- replicas read per step = sum over its slots of P(touched), with P(touched) =
  1 - (1 - q/n)^B for a step of B tokens when a token picks the expert with probability q
  (the paper's distinct-expert expectation, taken per replica and per measured batch size);
- time = max(C, M) + (1 - overlap) * min(C, M), C = load x FLOPs per assignment / expert FLOP/s,
  M = replicas read x expert bytes / expert-path bytes/s (the predictor's composition).

The layer waits for its slowest rank (dispatch and combine synchronise the EP group), so a
compute-bound step is set by the busiest rank's load and a bandwidth-bound one by the rank that
reads the most replicas. Replication evens the first and can raise the second: a replica of a hot
expert is a second read of the same weights. The all-to-all volume does not depend on where the
experts sit and is left out (the ratio of two placements does not need it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import SpecError
from .hardware import HardwareSpec
from .sizes import expert_params, weight_bytes_breakdown
from .specs import ModelSpec

TERMS = ("rank_load", "replica_reads")  # compute-bound: slowest rank's load; bandwidth: reads


@dataclass(frozen=True)
class Placement:
    """Where every physical expert slot lives.

    phys_to_logical: [layers, slots] logical expert of each slot (vLLM's physical_to_logical_map;
    -1 marks an empty slot); rank_of_slot: [slots] the EP rank holding each slot.
    """

    phys_to_logical: np.ndarray
    rank_of_slot: np.ndarray
    num_ranks: int

    def __post_init__(self) -> None:
        p2l, ranks = np.asarray(self.phys_to_logical), np.asarray(self.rank_of_slot)
        if p2l.ndim != 2:
            raise SpecError("phys_to_logical", f"must be [layers, slots], got shape {p2l.shape}")
        if ranks.shape != (p2l.shape[1],):
            raise SpecError("rank_of_slot", f"must have one rank per slot ({p2l.shape[1]}), "
                            f"got shape {ranks.shape}")
        if self.num_ranks < 1 or (ranks.size and not 0 <= ranks.min() <= ranks.max() < self.num_ranks):
            raise SpecError("rank_of_slot", f"ranks must lie in 0..{self.num_ranks - 1}")

    @property
    def num_layers(self) -> int:
        return int(self.phys_to_logical.shape[0])

    def replica_counts(self, num_experts: int) -> np.ndarray:
        """[layers, experts] replicas of each logical expert (vLLM's logical_replica_count)."""
        p2l = np.asarray(self.phys_to_logical)
        out = np.zeros((p2l.shape[0], num_experts), dtype=np.int64)
        for li in range(p2l.shape[0]):
            row = p2l[li]
            out[li] = np.bincount(row[row >= 0], minlength=num_experts)[:num_experts]
        return out


def contiguous_placement(num_layers: int, num_experts: int, num_ranks: int) -> Placement:
    """vLLM's default ("linear") placement without EPLB: rank r holds a contiguous block of
    E // ep experts, the first E % ep ranks one more (`determine_expert_map`)."""
    if num_ranks < 1 or num_experts < 1:
        raise SpecError("ep", f"need ep >= 1 and experts >= 1, got ep={num_ranks}, E={num_experts}")
    base, rem = divmod(num_experts, num_ranks)
    sizes = [base + (1 if r < rem else 0) for r in range(num_ranks)]
    ranks = np.repeat(np.arange(num_ranks), sizes)
    p2l = np.tile(np.arange(num_experts, dtype=np.int64), (num_layers, 1))
    return Placement(p2l, ranks, num_ranks)


def slot_placement(phys_to_logical: np.ndarray, num_ranks: int) -> Placement:
    """EPLB's layout: P slots, P / ep consecutive slots per rank (P must divide evenly)."""
    p2l = np.asarray(phys_to_logical, dtype=np.int64)
    slots = p2l.shape[-1]
    if slots % num_ranks:
        raise SpecError("phys_to_logical", f"{slots} slots do not divide over {num_ranks} ranks")
    return Placement(p2l, np.repeat(np.arange(num_ranks), slots // num_ranks), num_ranks)


def redundant_for(num_experts: int, num_ranks: int, redundant: int) -> int:
    """Smallest redundant-expert count >= `redundant` that vLLM accepts at this EP size
    ((experts + redundant) must divide by ep)."""
    if redundant < 0:
        raise SpecError("redundant", f"must be >= 0, got {redundant}")
    return -(-(num_experts + redundant) // num_ranks) * num_ranks - num_experts


@dataclass(frozen=True)
class ExpertCost:
    """Cost of one routed expert on one rank: FLOPs per token-expert assignment, weight bytes
    per read, and the expert path's sustained rates."""

    flops_per_assignment: float
    bytes_per_read: float
    flops_per_second: float
    bytes_per_second: float
    overlap_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name in ("flops_per_assignment", "bytes_per_read", "flops_per_second",
                     "bytes_per_second"):
            if not getattr(self, name) > 0:
                raise SpecError(name, f"must be > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.overlap_ratio <= 1.0:
            raise SpecError("overlap_ratio", f"must be in [0, 1], got {self.overlap_ratio!r}")

    @property
    def ridge_assignments(self) -> float:
        """Assignments per replica read at which math and weight streaming take equally long."""
        return (self.bytes_per_read / self.bytes_per_second
                / (self.flops_per_assignment / self.flops_per_second))


def expert_cost(model: ModelSpec, hw: HardwareSpec) -> ExpertCost:
    """The predictor's routed-expert figures for `model` on `hw` (as in `timing.step_time`)."""
    dt = model.expert_weight_dtype
    return ExpertCost(2.0 * expert_params(model), weight_bytes_breakdown(model).routed_expert_bytes,
                      hw.expert_flops(dt), hw.expert_bytes_per_second,
                      hw.compute_memory_overlap_ratio)


Batches = Sequence[tuple[float, float]]  # (tokens per step B, number of such steps)


@dataclass(frozen=True)
class PlacementFigures:
    """One placement under one window's traffic. Per-step figures are means over its steps.

    `layer_seconds` sums to `seconds`; each layer's time is its slowest rank's
    `compute_seconds`-or-`memory_seconds` bound plus `unhidden_seconds` (the parts sum).
    """

    rank_assignments: tuple[float, ...]  # per rank, per step, summed over layers
    rank_reads: tuple[float, ...]  # replicas read per rank per step, summed over layers
    layer_balancedness: tuple[float, ...]  # mean over max rank load (NaN: idle layer)
    balancedness: float  # sum over layers of the mean rank load / sum of the max (vLLM's figure)
    layer_seconds: tuple[float, ...]
    layer_bound_seconds: tuple[float, ...]
    layer_unhidden_seconds: tuple[float, ...]
    layer_term: tuple[str, ...]  # "rank_load" (compute-bound) or "replica_reads"
    seconds: float


def _check_counts(counts: np.ndarray, placement: Placement) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != placement.num_layers:
        raise SpecError("counts", f"must be [layers={placement.num_layers}, experts], got {c.shape}")
    if (c < 0).any():
        raise SpecError("counts", "token counts must be >= 0")
    return c


def _per_slot(counts: np.ndarray, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """[layers, slots] tokens per replica (window total) and the replica count behind it."""
    p2l = np.asarray(placement.phys_to_logical)
    E = counts.shape[1]
    reps = placement.replica_counts(E)
    missing = (reps == 0) & (counts > 0)
    if missing.any():
        li, e = map(int, np.argwhere(missing)[0])
        raise SpecError("placement", f"logical expert {e} of layer {li} has tokens but no slot")
    safe = np.where(p2l >= 0, p2l, 0)
    rows = np.arange(p2l.shape[0])[:, None]
    n = np.where(p2l >= 0, reps[rows, safe], 1)
    tok = np.where(p2l >= 0, counts[rows, safe] / np.maximum(n, 1), 0.0)
    return tok, n


def _by_rank(per_slot: np.ndarray, placement: Placement) -> np.ndarray:
    out = np.zeros((per_slot.shape[0], placement.num_ranks))
    np.add.at(out.T, np.asarray(placement.rank_of_slot), per_slot.T)
    return out


def evaluate(counts: np.ndarray, batches: Batches, placement: Placement,
             cost: ExpertCost) -> PlacementFigures:
    """Per-rank load, balancedness and predicted MoE-layer time of `placement` for a window whose
    decode steps routed `counts` ([layers, experts] token-expert assignments, window total) and
    had the batch sizes `batches`."""
    c = _check_counts(counts, placement)
    steps = float(sum(n for _, n in batches))
    tokens = float(sum(b * n for b, n in batches))
    if steps <= 0 or tokens <= 0:
        raise SpecError("batches", "need at least one step with tokens")
    tok, reps = _per_slot(c, placement)
    load = _by_rank(tok, placement) / steps  # [L, R] assignments per step
    q = np.clip(np.where(reps > 0, tok * reps, 0.0) / tokens, 0.0, 1.0)  # token picks the expert
    p_touch = np.zeros_like(tok)
    for b, n in batches:
        p_touch += (n / steps) * (1.0 - (1.0 - q / reps) ** b)
    p_touch[np.asarray(placement.phys_to_logical) < 0] = 0.0
    reads = _by_rank(p_touch, placement)  # [L, R] replicas read per step
    compute = load * cost.flops_per_assignment / cost.flops_per_second
    memory = reads * cost.bytes_per_read / cost.bytes_per_second
    bound = np.maximum(compute, memory)
    unhidden = (1.0 - cost.overlap_ratio) * np.minimum(compute, memory)
    rank_time = bound + unhidden
    slow = np.argmax(rank_time, axis=1)
    rows = np.arange(rank_time.shape[0])
    mean, peak = load.mean(axis=1), load.max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        layer_bal = np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), math.nan)
    total_peak = float(peak.sum())
    terms = tuple(TERMS[0] if compute[li, s] >= memory[li, s] else TERMS[1]
                  for li, s in enumerate(slow))
    layer_s = rank_time[rows, slow]
    return PlacementFigures(
        rank_assignments=tuple(float(x) for x in load.sum(axis=0)),
        rank_reads=tuple(float(x) for x in reads.sum(axis=0)),
        layer_balancedness=tuple(float(x) for x in layer_bal),
        balancedness=float(mean.sum()) / total_peak if total_peak > 0 else math.nan,
        layer_seconds=tuple(float(x) for x in layer_s),
        layer_bound_seconds=tuple(float(x) for x in bound[rows, slow]),
        layer_unhidden_seconds=tuple(float(x) for x in unhidden[rows, slow]),
        layer_term=terms,
        seconds=float(layer_s.sum()),
    )


@dataclass(frozen=True)
class Comparison:
    """Two placements of the same traffic: `gain` = before.seconds / after.seconds (above 1 the
    second is faster). `term` names what decides: the bound of the slower placement's layers
    (weighted by their time): "rank_load" when the slowest rank's math sets it (compute-bound),
    "replica_reads" when the weight reads of the touched replicas do (bandwidth-bound)."""

    before: PlacementFigures
    after: PlacementFigures
    gain: float
    layer_gain: tuple[float, ...]
    term: str


def compare(before: PlacementFigures, after: PlacementFigures) -> Comparison:
    gain = before.seconds / after.seconds if after.seconds > 0 else math.nan
    layer_gain = tuple(b / a if a > 0 else math.nan
                       for b, a in zip(before.layer_seconds, after.layer_seconds))
    slower = before if before.seconds >= after.seconds else after
    weight = {t: 0.0 for t in TERMS}
    for t, s in zip(slower.layer_term, slower.layer_seconds):
        weight[t] += s
    term = max(TERMS, key=lambda t: weight[t])
    return Comparison(before, after, gain, layer_gain, term)
