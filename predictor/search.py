"""Partition search and the MoE-versus-dense-twin case behind `moe-reuse predict`.

For every partition of the GPUs (tp inside a node, kvp x dp x pp over the rest, ep over the
FFN group or over whole DP engines) the search finds B_max, evaluates a decode step at that batch (or at a fixed
batch) and keeps the highest throughput. Following the paper, each model is evaluated at its
own B_max, so the batch of the winning partition is the B that Table 3 reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .deployment import DEFAULT_ACCOUNTING, Accounting, Partition
from .errors import SpecError
from .hardware import HardwareSpec
from .memory import MemoryBreakdown, memory_breakdown
from .quality import DEFAULT_Q, dense_twin, qs_verdict
from .specs import ModelSpec
from .timing import StepTime, step_time


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_partitions(
    model: ModelSpec, hw: HardwareSpec, gpus: int, accounting: Accounting = DEFAULT_ACCOUNTING
) -> list[Partition]:
    """Every partition the search tries for `gpus` GPUs, valid for the model's shapes."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise SpecError("gpus", f"must be an integer >= 1, got {gpus!r}")
    out: list[Partition] = []
    divs = _divisors(gpus)
    tps = [
        t
        for t in divs
        if t <= min(hw.gpus_per_node, accounting.max_tp) and model.num_attention_heads % t == 0
    ]
    if accounting.tp_policy == "max":
        tps = tps[-1:]
    for tp in tps:
        for pp in divs:
            if pp > accounting.max_pp or pp > model.num_layers or gpus % (tp * pp):
                continue
            rest = gpus // (tp * pp)
            for kvp in _divisors(rest):
                dp = rest // kvp
                if dp > accounting.max_dp:
                    continue
                stage = tp * kvp
                group = (
                    stage
                    if accounting.ffn_shard_scope == "stage" or stage <= hw.gpus_per_node
                    else _gcd(stage, hw.gpus_per_node)
                )
                eps = (
                    [e for e in _divisors(group) if model.num_experts % e == 0]
                    if model.is_moe
                    else [1]
                )
                if model.is_moe and group == stage:  # EP over s whole engines (DP attention + EP)
                    eps += [group * s for s in _divisors(dp)[1:]
                            if model.num_experts % (group * s) == 0]
                if accounting.ep_policy == "max":
                    eps = eps[-1:]
                out.extend(Partition(tp=tp, kvp=kvp, pp=pp, dp=dp, ep=ep) for ep in eps)
    return out


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@dataclass(frozen=True)
class SearchResult:
    """The best partition for one model, or `feasible=False` when none fits."""

    model_name: str
    gpus: int
    context_tokens: float
    feasible: bool
    partition: Partition | None
    batch: int | None
    step: StepTime | None
    memory: MemoryBreakdown | None
    candidates: int

    @property
    def tokens_per_second(self) -> float:
        return self.step.tokens_per_second if self.step else 0.0

    def to_dict(self, *, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model_name,
            "feasible": self.feasible,
            "batch": self.batch,
            "tokens_per_second": self.tokens_per_second if self.feasible else None,
            "partition": self.partition.to_dict() if self.partition else None,
            "seconds_per_token": self.step.seconds_per_token if self.step else None,
            "step_seconds": self.step.total_seconds if self.step else None,
        }
        if detail and self.step and self.memory:
            out["step"] = self.step.to_dict()
            out["memory"] = self.memory.to_dict()
        return out


def search_partitions(
    model: ModelSpec,
    hw: HardwareSpec,
    gpus: int,
    context_tokens: float,
    *,
    batch: int | None = None,
    accounting: Accounting = DEFAULT_ACCOUNTING,
) -> SearchResult:
    """Highest-throughput feasible partition at B_max (or at `batch`, which must fit)."""
    if context_tokens <= 0:
        raise SpecError("context_tokens", f"must be > 0, got {context_tokens}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise SpecError("batch", f"must be an integer >= 1, got {batch!r}")
    candidates = candidate_partitions(model, hw, gpus, accounting)
    best: tuple[float, Partition, int, StepTime, MemoryBreakdown] | None = None
    memo: dict[tuple[int, int, int, int, int], MemoryBreakdown] = {}
    for part in candidates:
        key = (part.tp, part.kvp, part.pp, part.dp, part.ep)
        mem = memo.get(key)
        if mem is None:
            mem = memo[key] = memory_breakdown(model, hw, part, context_tokens, accounting)
        if mem.batch_max < 1 or (batch is not None and batch > mem.batch_max):
            continue
        b = batch if batch is not None else mem.batch_max
        step = step_time(model, hw, part, b, context_tokens, accounting)
        tps = step.tokens_per_second
        if best is None or tps > best[0] * (1 + 1e-9):
            best = (tps, part, b, step, mem)
    if best is None:
        return SearchResult(
            model.name, gpus, context_tokens, False, None, None, None, None, len(candidates)
        )
    _, part, b, step, mem = best
    return SearchResult(model.name, gpus, context_tokens, True, part, b, step, mem, len(candidates))


@dataclass(frozen=True)
class CaseResult:
    """One MoE against its quality-matched dense twin (what `predict --json` prints)."""

    model: ModelSpec
    hardware: HardwareSpec
    gpus: int
    context_tokens: float
    q: float
    moe: SearchResult
    dense: SearchResult
    fixed_batch: int | None
    accounting: Accounting

    @property
    def sparsity(self) -> float:
        return self.model.sparsity

    @property
    def qs(self) -> float:
        return self.q * self.model.sparsity

    @property
    def routing_factor(self) -> float:
        """E/k: the reuse lost to routing at equal batch."""
        return self.model.num_experts / self.model.experts_per_token

    @property
    def capacity_factor(self) -> float | None:
        """B_dense / B_moe: the reuse lost to the resident expert pool (None if either OOMs)."""
        if self.moe.batch and self.dense.batch:
            return self.dense.batch / self.moe.batch
        return None

    @property
    def reuse_gap(self) -> float | None:
        """r_dense / r_moe = routing factor * capacity factor (paper eq. 9)."""
        cap = self.capacity_factor
        return self.routing_factor * cap if cap is not None else None

    @property
    def r_moe(self) -> float | None:
        return self.sparsity * self.moe.batch if self.moe.batch else None

    @property
    def r_dense(self) -> float | None:
        return float(self.dense.batch) if self.dense.batch else None

    @property
    def dense_speedup(self) -> float | None:
        """Dense decode throughput over MoE decode throughput."""
        if self.moe.feasible and self.dense.feasible and self.moe.tokens_per_second > 0:
            return self.dense.tokens_per_second / self.moe.tokens_per_second
        return None

    @property
    def ffn_speedup(self) -> float | None:
        """Dense over MoE throughput of the FFN phase alone (attention and KV left out)."""
        if self.moe.step and self.dense.step and self.dense.step.ffn_seconds > 0:
            moe_rate = self.moe.step.batch / self.moe.step.ffn_seconds
            return (self.dense.step.batch / self.dense.step.ffn_seconds) / moe_rate
        return None

    def to_dict(self, *, detail: bool = False) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "hardware": self.hardware.name,
            "gpus": self.gpus,
            "context_tokens": self.context_tokens,
            "q": self.q,
            "num_experts": self.model.num_experts,
            "experts_per_token": self.model.experts_per_token,
            "sparsity": self.sparsity,
            "qs": self.qs,
            "qs_verdict": qs_verdict(self.q, self.sparsity),
            "routing_factor": self.routing_factor,
            "capacity_factor": self.capacity_factor,
            "reuse_gap": self.reuse_gap,
            "r_moe": self.r_moe,
            "r_dense": self.r_dense,
            "dense_speedup": self.dense_speedup,
            "ffn_speedup": self.ffn_speedup,
            "fixed_batch": self.fixed_batch,
            "moe": self.moe.to_dict(detail=detail),
            "dense": self.dense.to_dict(detail=detail),
            "accounting": self.accounting.to_dict(),
        }


def evaluate_case(
    model: ModelSpec,
    hw: HardwareSpec,
    gpus: int,
    context_tokens: float,
    q: float = DEFAULT_Q,
    batch: int | None = None,
    accounting: Accounting = DEFAULT_ACCOUNTING,
) -> CaseResult:
    """Search the best partition for the MoE and for its dense twin and compare them."""
    if not model.is_moe:
        raise SpecError(
            "model",
            f"{model.name} has no routed experts",
            "predict compares an MoE with its dense twin",
        )
    twin = dense_twin(model, q)
    moe = search_partitions(model, hw, gpus, context_tokens, batch=batch, accounting=accounting)
    dense = search_partitions(twin, hw, gpus, context_tokens, batch=batch, accounting=accounting)
    return CaseResult(model, hw, gpus, context_tokens, q, moe, dense, batch, accounting)
