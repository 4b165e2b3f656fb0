"""Weight reuse under top-k routing: how many tokens share one read of an expert.

The uniform-routing formulas are the paper's model; `reuse_from_counts` is the same quantity
taken from a measured per-expert token count vector, so the plugin can put the measured
distribution next to the uniform expectation at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .errors import SpecError


def _check_routing(num_experts: float, top_k: float, batch_tokens: float) -> None:
    if num_experts <= 0:
        raise SpecError("num_experts", f"must be > 0, got {num_experts}")
    if not 0 < top_k <= num_experts:
        raise SpecError("top_k", f"must be in (0, num_experts={num_experts}], got {top_k}")
    if batch_tokens < 0:
        raise SpecError("batch_tokens", f"must be >= 0, got {batch_tokens}")


def tokens_per_expert_uniform(batch_tokens: float, top_k: int, num_experts: int) -> float:
    """b_e = B*k/E = s*B: tokens routed to an average expert in one step (paper eq. 1)."""
    _check_routing(num_experts, top_k, batch_tokens)
    return batch_tokens * top_k / num_experts


def expected_distinct_experts(num_experts: int, top_k: int, batch_tokens: float) -> float:
    """E*(1-(1-k/E)^B): experts touched by B tokens routed uniformly and independently.

    Each token picks k distinct experts, so one given expert is missed by one token with
    probability 1-k/E; B may be fractional (a mean microbatch).
    """
    _check_routing(num_experts, top_k, batch_tokens)
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch_tokens)


def reuse_uniform(batch_tokens: float, top_k: int, num_experts: int) -> float:
    """Tokens per expert *read*: B*k over the experts actually touched (>= 1 when B >= 1)."""
    distinct = expected_distinct_experts(num_experts, top_k, batch_tokens)
    return batch_tokens * top_k / distinct if distinct > 0 else 0.0


class MeasuredReuse(NamedTuple):
    """Reuse statistics of one layer's per-expert token counts.

    distinct: experts with at least one token (each costs one weight read);
    tokens_per_touched_expert: mean tokens per expert read (the measured reuse);
    max_load: tokens on the busiest expert; imbalance: max_load over the mean over all experts.
    """

    distinct: int
    tokens_per_touched_expert: float
    max_load: int
    imbalance: float


def reuse_from_counts(counts: Sequence[int]) -> MeasuredReuse:
    """Distinct experts, tokens per touched expert, max load and imbalance from a count vector.

    Unpacks as a 4-tuple: `distinct, reuse, max_load, imbalance = reuse_from_counts(c)`.
    An all-zero vector (an idle step) gives zeros rather than dividing by zero.
    """
    if len(counts) == 0:
        raise SpecError("counts", "is empty; pass one count per expert")
    total = 0
    distinct = 0
    max_load = 0
    for c in counts:
        if c < 0:
            raise SpecError("counts", f"token counts must be >= 0, got {c}")
        total += c
        if c:
            distinct += 1
            if c > max_load:
                max_load = int(c)
    if total == 0:
        return MeasuredReuse(0, 0.0, 0, 0.0)
    mean = total / len(counts)
    return MeasuredReuse(distinct, total / distinct, max_load, max_load / mean)


@dataclass(frozen=True)
class RoutingCurve:
    """Measured routing: an effective expert count E_eff fitted so that uniform routing over
    E_eff experts touches the measured number of distinct experts at the measured batch.

    Skewed routing concentrates tokens on fewer experts: E_eff < E. distinct(b) =
    min(E, E_eff (1 - (1 - k/E_eff)^b)) then gives the curve at every other batch.
    """

    num_experts: int
    top_k: int
    effective_experts: float
    measured_batch: float = 0.0
    measured_distinct: float = 0.0

    def distinct(self, batch_tokens: float) -> float:
        e = max(self.effective_experts, float(self.top_k))
        return min(float(self.num_experts), expected_distinct_experts(e, self.top_k, batch_tokens))  # type: ignore[arg-type]

    @classmethod
    def fit(cls, num_experts: int, top_k: int, batch: float, distinct: float) -> RoutingCurve:
        """Solve E_eff(1-(1-k/E_eff)^batch) = distinct by bisection on E_eff in [k, E]."""
        if batch <= 0 or distinct <= 0:
            raise SpecError("routing", f"needs a batch and distinct experts > 0, got {batch}, {distinct}")
        lo, hi = float(top_k), float(num_experts)
        target = min(distinct, expected_distinct_experts(num_experts, top_k, batch))
        for _ in range(80):
            mid = (lo + hi) / 2
            if expected_distinct_experts(mid, top_k, batch) < target:  # type: ignore[arg-type]
                lo = mid
            else:
                hi = mid
        return cls(num_experts, top_k, (lo + hi) / 2, batch, distinct)
