"""Latency what-if: ITL and TTFT percentiles of an MoE and its dense twin under load.

A continuous-batching scheduler (vLLM V1) runs one step at a time. Every step advances each
running sequence by one token; a step may also carry a chunk of some waiting request's prompt
(chunked prefill), up to `max_num_batched_tokens` tokens in all. So the inter-token gaps a
client sees are a mix of two step kinds: decode-only steps and mixed steps, and the P99 comes
from that mix, not from a constant factor. Everything here is pure: specs in, numbers out.

Per concurrency level N (N clients, each sending its next request when the last one ends):

* batch b = min(N, max_num_seqs, KV capacity / (prompt + output/2) tokens): the sequences the
  scheduler can really keep running; the other N - b wait in the queue.
* decode step t_d = step_time(b sequences at context prompt + output/2).
* prefill demand: a request spends about `output` decode steps, so b/output requests finish
  (and as many arrive) per step, each bringing `prompt` tokens: demand = b * prompt / output
  tokens per step. The token budget left by the decodes is budget = max_num_batched_tokens - b;
  one request's piece is chunk = min(prompt, budget). A mixed step carries
  c = min(max(chunk, demand), budget) prompt tokens (one piece when arrivals are sparse, a
  full budget when they crowd), and the mixed share of steps is f = min(1, demand / c).
* mixed step t_m = step_time(b + c tokens), the KV read charged once for the decodes and once
  per chunk for its prefix (flash attention reads the prefix once per chunk).
* ITL: every step emits one token per running sequence, so gaps follow the step mix a decoding
  request sees: the prefills of the b - 1 others, a share min(1, (b-1)/output * prompt / c) of
  its gaps are t_m, the rest t_d. P50 and P99 are the quantiles of that two-point mix (times
  the host's measured noise, where a calibrated spec has it), plus the serving stack's tail
  under load (`load_tail_seconds`, in proportion to the running sequences beyond one).
* TTFT: queue wait (N - b requests ahead, drained at b/(output x mean step) per second) plus
  the request's own ceil(prompt/budget) mixed steps plus half a step of alignment. P99 adds
  the prompts of the other requests that arrive in the same step (Poisson, P99 count) and are
  ahead of it in the chunk budget.
* throughput = b / mean step.

Routing: uniform by default; a measured `RoutingCurve` (distinct experts per layer against the
batch, from a live server) replaces it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .closed_loop import demand_from_loop, solve, wait_quantile
from .deployment import DEFAULT_ACCOUNTING, Accounting, Partition
from .errors import SpecError
from .hardware import HardwareSpec
from .memory import layout, memory_breakdown
from .quality import DEFAULT_Q, dense_twin
from .quantiles import load_tail, mix_quantile, poisson_quantile
from .reuse import RoutingCurve
from .search import search_partitions
from .specs import ModelSpec
from .timing import step_time

DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
"""vLLM's default per-step token budget on a GPU server."""


@dataclass(frozen=True)
class Workload:
    """Request shape and scheduler limits."""

    prompt_tokens: int = 1024
    output_tokens: int = 256
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = 0  # 0: the accounting's max_num_seqs (vLLM's default)

    def __post_init__(self) -> None:
        for name, low in (
            ("prompt_tokens", 1),
            ("output_tokens", 1),
            ("max_num_batched_tokens", 2),
            ("max_num_seqs", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise SpecError(name, f"must be an integer >= {low}, got {v!r}")


@dataclass(frozen=True)
class LevelResult:
    """One model at one concurrency level."""

    concurrency: int
    batch: float  # sequences the engine runs (mean; below the seats where the front end limits)
    step_seconds: float  # decode-only step
    mixed_step_seconds: float
    mixed_step_ratio: float  # share of steps that carry prefill
    itl_mixed_ratio: float  # share of a decoding request's gaps that are mixed steps
    prefill_tokens_per_mixed_step: float
    itl_p50_seconds: float
    itl_p99_seconds: float
    ttft_p50_seconds: float
    ttft_p99_seconds: float
    queue_seconds: float
    tokens_per_second: float
    limited_by: str  # concurrency, max_num_seqs, kv_cache or front_end
    serving_gap_seconds: float = 0.0  # between two steps, in neither (hardware spec)
    front_end_seconds: float = 0.0  # median time in the front end before the engine

    def to_dict(self) -> dict[str, float | int | str]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Deployment:
    """One model on its partition with its KV capacity (tokens per replica)."""

    model: ModelSpec
    partition: Partition
    kv_capacity_tokens: int
    routing: RoutingCurve | None = None


@dataclass(frozen=True)
class WhatIfResult:
    moe: Deployment
    dense: Deployment
    levels: tuple[tuple[LevelResult, LevelResult], ...]
    crossover_concurrency: int | None
    workload: Workload
    hardware: HardwareSpec
    accounting: Accounting = field(default=DEFAULT_ACCOUNTING)

    def to_dict(self) -> dict[str, object]:
        return {
            "levels": [
                {"concurrency": m.concurrency, "moe": m.to_dict(), "dense": d.to_dict()}
                for m, d in self.levels
            ],
            "crossover_concurrency": self.crossover_concurrency,
            "moe_partition": self.moe.partition.to_dict(),
            "dense_partition": self.dense.partition.to_dict(),
            "moe_kv_capacity_tokens": self.moe.kv_capacity_tokens,
            "dense_kv_capacity_tokens": self.dense.kv_capacity_tokens,
            "workload": {k: getattr(self.workload, k) for k in self.workload.__dataclass_fields__},
            "hardware": self.hardware.name,
            "measured_routing": self.moe.routing is not None,
        }


def _step(
    dep: Deployment,
    hw: HardwareSpec,
    acc: Accounting,
    tokens: float,
    context: float,
    sequences: float | None = None,
) -> float:
    distinct = None
    if dep.routing is not None and dep.model.is_moe:
        # the tokens one copy of the routed experts serves: one engine's, or under EP over DP
        # engines those of every engine it spans
        span = layout(dep.model, hw, dep.partition, acc).ep_span
        distinct = dep.routing.distinct(tokens * span / max(dep.partition.dp, 1))
    return step_time(
        dep.model, hw, dep.partition, tokens, context, acc, distinct_experts_per_layer=distinct,
        sequences=sequences,
    ).total_seconds


@dataclass(frozen=True)
class _Mix:
    """The step mix at one batch."""

    t_d: float  # decode-only step
    t_m: float  # mixed step
    f: float  # share of steps that carry prefill
    c: float  # prefill tokens a mixed step carries
    seen: float  # share of a decoding request's gaps that are mixed steps
    gap: float  # the serving stack's gap between steps
    p_d: float  # decode-only period (step + gap)
    p_m: float  # mixed period
    mean: float  # mean period
    arrivals: float  # requests arriving per step
    budget: float  # prefill tokens a step can carry beside the decodes
    chunks: int  # steps one prompt takes
    cycle: float  # one request's life in the engine


def _mix(dep: Deployment, hw: HardwareSpec, acc: Accounting, b: float, work: Workload) -> _Mix:
    p, o = work.prompt_tokens, work.output_tokens
    ctx = p + o / 2
    t_d = _step(dep, hw, acc, b, ctx)
    budget = max(work.max_num_batched_tokens - b, 1)
    arrivals = b / o  # requests finishing (and arriving) per step
    demand = arrivals * p  # prefill tokens per step
    chunk = min(p, budget)  # one request's prompt piece in one step
    c = min(max(chunk, demand), budget)  # prefill tokens a mixed step carries
    f = min(1.0, demand / c)
    # KV of a mixed step: the decodes' contexts plus each chunk's prefix (about half the
    # prompt on average) read once per chunk.
    ctx_mix = (b * ctx + (c / chunk) * p / 2) / (b + c)
    t_m = _step(dep, hw, acc, b + c, ctx_mix, sequences=b + c / chunk)
    # What a client sees between two tokens is a step plus the serving stack's gap between
    # steps (scheduling, output processing, one chunk streamed per sequence).
    gap = hw.serving_gap_seconds + hw.serving_gap_per_sequence_seconds * b
    p_d, p_m = t_d + gap, t_m + gap
    mean = f * p_m + (1 - f) * p_d
    # A decoding request's gaps see the prefills of the b - 1 others (its own prefill is its
    # TTFT, not a gap): the mix a client measures, times the host's noise where measured.
    seen = min(1.0, max(b - 1, 0.0) / o * p / c)
    chunks = math.ceil(p / budget)
    return _Mix(t_d, t_m, f, c, seen, gap, p_d, p_m, mean, arrivals, budget, chunks,
                o * mean + chunks * p_m)


def _seats(dep: Deployment, concurrency: int, work: Workload, acc: Accounting) -> tuple[int, int]:
    """(seats: the sequences the engine can run at once, max_num_seqs in force)."""
    p, o = work.prompt_tokens, work.output_tokens
    seqs_cap = work.max_num_seqs or acc.max_num_seqs or concurrency
    kv_cap = max(int(dep.kv_capacity_tokens // (p + o / 2)), 0)
    if kv_cap < 1:
        raise SpecError(
            "--prompt-len",
            f"one request ({p} + {o} tokens) does not fit the KV cache of "
            f"{dep.kv_capacity_tokens} tokens of {dep.model.name}",
            "shorten the prompt or output, or add GPUs",
        )
    return min(concurrency, seqs_cap, kv_cap), seqs_cap


def _shared(seats: int, concurrency: int, mean_batch: float) -> float:
    """The batch a request in the engine shares: itself and the others' mean share of the loop
    (the arrival theorem), as the seats allow; N where every client is seated."""
    return min(seats, 1 + mean_batch * (concurrency - 1) / concurrency)


def loop_demand(dep: Deployment, hw: HardwareSpec, clients: int, batch: float, work: Workload,
                acc: Accounting) -> float:
    """The front end's work per request that makes `clients` closed-loop clients hold `batch`
    sequences in the engine, in the what-if's own terms, for `moe-reuse calibrate`: the rate
    is the what-if's (the batch over its own engine residence at that batch), not the rate the
    loop measured. A 64-client loop held 51 to 57 sequences in 29 passes of 30 while its
    measured rate ranged from 70 to 106 requests a second; near the front end's saturation the
    batch the what-if solves for hangs on rate x work, and the work read at the measured rate
    put 47 sequences in the engine where the load held 57 (run P-H, docs/predictor.md). Read
    at its own rate, the what-if gives back the loop it was calibrated on."""
    seats, _ = _seats(dep, clients, work, acc)
    b = min(batch, float(seats))
    return demand_from_loop(clients, b, b / _mix(dep, hw, acc, _shared(seats, clients, b),
                                                 work).cycle)


def evaluate_level(
    dep: Deployment, hw: HardwareSpec, concurrency: int, work: Workload, acc: Accounting
) -> LevelResult:
    """The step mix and its latency percentiles for one model at one concurrency."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise SpecError("--concurrency", f"must be an integer >= 1, got {concurrency!r}")
    p, o = work.prompt_tokens, work.output_tokens
    seats, seqs_cap = _seats(dep, concurrency, work, acc)
    s_req, s_tok = hw.front_end_request_seconds, hw.front_end_token_seconds
    demand = s_req + o * s_tok  # the front end's work per request

    def shared(mean_batch: float) -> float:
        return _shared(seats, concurrency, mean_batch)

    loop = solve(concurrency, seats, demand, lambda n: _mix(dep, hw, acc, shared(n), work).cycle)
    b = loop.batch
    limited = ("front_end" if b < seats and loop.seat_queue_seconds == 0 else
               "concurrency" if seats == concurrency else
               "max_num_seqs" if seats == seqs_cap else "kv_cache")
    m = _mix(dep, hw, acc, shared(b), work)
    itl_p50, itl_p99 = (
        mix_quantile(q, m.seen, m.p_d, m.p_m, hw.step_jitter_ratios)
        + load_tail(hw.load_tail_seconds, hw.load_tail_sequences, q, shared(b)) for q in (0.5, 0.99))
    # The front end before the prompt reaches the engine: the request's own admission (its
    # streaming overlaps its decode) and its wait behind the other clients' work.
    waited = loop.front_end_residence_seconds - demand
    cap = (concurrency - 1) * demand
    fe50, fe99 = (s_req + wait_quantile(waited, loop.front_end_utilisation_ratio, q, cap)
                  for q in (0.5, 0.99))
    queue = loop.seat_queue_seconds
    ttft50 = queue + fe50 + m.chunks * m.p_m + m.mean / 2
    ahead = max(poisson_quantile(m.arrivals, 0.99) - 1, 0)
    ttft99 = queue + fe99 + math.ceil((ahead * p + p) / m.budget) * m.p_m + m.mean
    return LevelResult(
        concurrency=concurrency,
        batch=b,
        step_seconds=m.t_d,
        mixed_step_seconds=m.t_m,
        mixed_step_ratio=m.f,
        itl_mixed_ratio=m.seen,
        prefill_tokens_per_mixed_step=m.c,
        itl_p50_seconds=itl_p50,
        itl_p99_seconds=itl_p99,
        ttft_p50_seconds=ttft50,
        ttft_p99_seconds=ttft99,
        queue_seconds=queue,
        tokens_per_second=b / m.mean,
        limited_by=limited,
        serving_gap_seconds=m.gap,
        front_end_seconds=fe50,
    )


def deployment(
    model: ModelSpec,
    hw: HardwareSpec,
    gpus: int,
    context_tokens: int,
    acc: Accounting,
    *,
    partition: Partition | None = None,
    kv_capacity_tokens: int | None = None,
    routing: RoutingCurve | None = None,
) -> Deployment:
    """The model at its best partition (or the given one) and its KV capacity."""
    if partition is None:
        found = search_partitions(model, hw, gpus, context_tokens, accounting=acc)
        if not found.feasible or found.partition is None:
            raise SpecError(
                "--model",
                f"{model.name} does not fit {gpus} x {hw.name} at {context_tokens} tokens "
                "of context (out of memory on every partition)",
                "add --gpus, shorten --prompt-len/--output-len or use a narrower --weight-dtype",
            )
        partition = found.partition
    if kv_capacity_tokens is None:
        mem = memory_breakdown(model, hw, partition, context_tokens, acc)
        if not mem.feasible:
            raise SpecError("--model", f"{model.name} does not fit {partition} on {hw.name}")
        kv_capacity_tokens = mem.kv_capacity_tokens * partition.dp
    return Deployment(model, partition, int(kv_capacity_tokens), routing)


def _throughputs(m: Deployment, d: Deployment, hw: HardwareSpec, n: int, w: Workload, acc: Accounting) -> tuple[float, float]:
    return (
        evaluate_level(m, hw, n, w, acc).tokens_per_second,
        evaluate_level(d, hw, n, w, acc).tokens_per_second,
    )


def crossover(
    moe: Deployment, dense: Deployment, hw: HardwareSpec, levels: Sequence[int], work: Workload, acc: Accounting
) -> int | None:
    """Lowest concurrency (integer, within the levels' range) at which the dense twin's
    throughput exceeds the MoE's; None when it never does there."""
    lo_n, hi_n = 1, max(levels)
    m1, d1 = _throughputs(moe, dense, hw, lo_n, work, acc)
    if d1 > m1:
        return 1
    # Scan powers of two for the first dense win, then bisect.
    prev, n = 1, 2
    while True:
        n = min(n, hi_n)
        m, d = _throughputs(moe, dense, hw, n, work, acc)
        if d > m:
            lo, hi = prev, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                mm, dd = _throughputs(moe, dense, hw, mid, work, acc)
                lo, hi = (lo, mid) if dd > mm else (mid, hi)
            return hi
        if n >= hi_n:
            return None
        prev, n = n, n * 2


def whatif(
    model: ModelSpec,
    hw: HardwareSpec,
    gpus: int,
    concurrency: Sequence[int],
    work: Workload = Workload(),
    *,
    q: float = DEFAULT_Q,
    accounting: Accounting = DEFAULT_ACCOUNTING,
    moe_deployment: Deployment | None = None,
    dense_deployment: Deployment | None = None,
) -> WhatIfResult:
    """MoE against its dense twin at every concurrency level (same hardware and GPUs)."""
    if not model.is_moe:
        raise SpecError("--model", f"{model.name} has no routed experts", "whatif compares an MoE with its dense twin")
    if not concurrency:
        raise SpecError("--concurrency", "is empty", "pass e.g. 1,8,64,512,2000")
    for n in concurrency:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SpecError("--concurrency", f"levels must be integers >= 1, got {n!r}")
    ctx = work.prompt_tokens + work.output_tokens
    acc = accounting
    if work.max_num_seqs:
        acc = replace(acc, max_num_seqs=work.max_num_seqs)
    moe = moe_deployment or deployment(model, hw, gpus, ctx, acc)
    dense = dense_deployment or deployment(dense_twin(model, q), hw, gpus, ctx, acc)
    levels = tuple(
        (evaluate_level(moe, hw, n, work, acc), evaluate_level(dense, hw, n, work, acc))
        for n in concurrency
    )
    return WhatIfResult(moe, dense, levels, crossover(moe, dense, hw, concurrency, work, acc), work, hw, acc)
