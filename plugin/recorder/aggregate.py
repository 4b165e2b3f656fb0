"""Off-step aggregation: a block of per-step counts -> cumulative totals (numpy only).

Runs in the flusher thread, never in the forward. Everything exported is a cumulative counter
(Prometheus derives rates), so a block of n steps is folded into `Totals` with vectorised numpy
and the per-step detail is dropped: memory stays fixed whatever the uptime.

HBM bytes per step (documented in the README, "How bytes are counted"):
- routed experts: for every MoE layer, distinct experts that received at least one token of the
  step (prefill or decode) x the bytes of one expert on this rank (all its weight and scale tensors);
- shared experts, dense FFN layers, attention projections and the LM head: read once per step;
- KV cache: sum over the step's requests of their context length (tokens already computed plus the
  scheduled ones) x KV bytes per token per rank (vLLM's own page size / block size, over layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ring import DECODE, PAD, PREFILL, elements

PHASES = ("prefill", "decode")
KINDS = ("decode", "prefill", "mixed")
KIND_DECODE, KIND_PREFILL, KIND_MIXED = 0, 1, 2
COMPONENTS = ("routed_experts", "shared_experts", "dense_ffn", "attention", "embedding", "kv_cache")
COMM_OPS = ("all_reduce", "all_to_all")
HIST_BOUNDS = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=np.int64)
# Bucket of each token count v (0 .. last bound + 1, larger counts clipped to the last): bucket i
# holds HIST_BOUNDS[i-1] < v <= HIST_BOUNDS[i] (searchsorted, side="left"), the overflow bucket
# len(HIST_BOUNDS) holds v > the last bound, and v = 0 (an untouched expert) goes to a sentinel
# bucket past it, dropped.
_BUCKET_OF = np.searchsorted(HIST_BOUNDS, np.arange(int(HIST_BOUNDS[-1]) + 2), side="left").astype(np.uint8)
_BUCKET_OF[0] = len(HIST_BOUNDS) + 1


@dataclass(frozen=True)
class ByteModel:
    """Bytes one step reads, per component, for this rank (measured from the loaded tensors)."""

    expert_bytes_per_layer: tuple[int, ...]
    shared_expert_bytes: int = 0
    dense_ffn_bytes: int = 0
    attention_bytes: int = 0
    embedding_bytes: int = 0
    kv_bytes_per_token: int = 0  # over every KV-cache group: what one token of full context costs
    kv_groups: tuple[tuple[float, int, int], ...] = ()
    """(bytes per token, sliding window or 0, attention chunk or 0) per kind of attention layer on
    this rank, from vLLM's KV-cache groups: a sliding-window layer reads at most its window of
    the context, a chunked-local one the tokens of the current chunk. Empty: all full."""
    recurrent_state_bytes: int = 0
    """A hybrid's recurrent state (Mamba, Gated DeltaNet, short convolutions) one request holds
    on this rank, over every such layer, from vLLM's Mamba cache specs: a request that has
    tokens computed reads it whole each step, whatever its context (a new one starts from
    zeros). Counted with the KV cache, in whose pool vLLM keeps it."""


def kv_read_bytes(bm: ByteModel, context: np.ndarray) -> np.ndarray:
    """KV bytes read per request whose context (tokens in its KV after the step) is `context`."""
    ctx = np.asarray(context, dtype=np.float64)
    if not bm.kv_groups:
        return ctx * bm.kv_bytes_per_token
    out = np.zeros_like(ctx)
    for per_token, window, chunk in bm.kv_groups:
        if window:
            eff = np.minimum(ctx, window)
        elif chunk:  # tokens since the start of the chunk the newest token is in
            eff = ctx - np.floor(np.maximum(ctx - 1, 0) / chunk) * chunk
        else:
            eff = ctx
        out += per_token * eff
    return out


MAX_RAW_REQUESTS = 256
"""Requests per step whose layout is kept raw (copied, derived by the flusher); a step with more
is derived on the spot (same figures, more work on the step thread). vLLM's GPU default
max_num_seqs is 256."""


class StepMeta:
    """Host-side ring of per-step facts that the device counters do not hold.

    The step thread only copies each step's layout (per request: scheduled tokens, decode or not,
    tokens already computed) into fixed per-slot buffers (`record`); the per-phase figures
    (tokens, requests, context, KV bytes, step kind, scheduled tokens) are derived for a whole
    block at once by the flusher (`derive`), off the engine's step. About 20 numpy calls fewer per
    step (benchmarks/bench_step_protocol.py).
    """

    def __init__(self, ring_steps: int, max_requests: int = MAX_RAW_REQUESTS) -> None:
        n, r = ring_steps, max(int(max_requests), 1)
        self.kind = np.zeros(n, dtype=np.int8)
        self.tokens = np.zeros((n, 2), dtype=np.int64)
        self.requests = np.zeros((n, 2), dtype=np.int64)
        self.context = np.zeros((n, 2), dtype=np.int64)
        self.kv_bytes = np.zeros((n, 2), dtype=np.float64)  # KV read, per KV-cache group's rule
        self.duration_ns = np.zeros(n, dtype=np.int64)
        self.comm_ns = np.zeros((n, len(COMM_OPS)), dtype=np.int64)
        self.scheduled = np.zeros(n, dtype=np.int64)  # the scheduler's own token count (self-check)
        # raw layouts, fixed at start-up: requests per slot (-1: derived), and per request
        self._n = np.full(n, -1, dtype=np.int64)
        self._sched = np.zeros((n, r), dtype=np.int64)
        self._decode = np.zeros((n, r), dtype=bool)
        self._computed = np.zeros((n, r), dtype=np.int64)
        self._total = np.zeros(n, dtype=np.int64)  # the scheduler's figure, -1: the layout's sum
        # the step thread's scalar writes go through memoryviews: numpy's item assignment right
        # after a forward costs twice as much (benchmarks/bench_recorder.py)
        self._total_mv, self._n_mv = elements(self._total), elements(self._n)
        self._duration_mv = elements(self.duration_ns)

    def record(self, slot: int, num_scheduled: np.ndarray, is_decode: np.ndarray,
               num_computed: np.ndarray, scheduled_total: int, bm: ByteModel) -> None:
        """Step thread: keep the layout raw (three copies), or derive it now if it is wider than
        the buffers."""
        n = len(num_scheduled)
        if n > self._sched.shape[1]:
            self._derive_now(slot, num_scheduled, is_decode, num_computed, scheduled_total, bm)
            return
        self._sched[slot, :n] = num_scheduled
        self._decode[slot, :n] = is_decode
        self._computed[slot, :n] = num_computed
        self._total_mv[slot] = scheduled_total
        self._n_mv[slot] = n

    def finish(self, slot: int, duration_ns: int) -> None:
        """Step thread: the step's host duration (the flusher prefers the device's, on CUDA)."""
        self._duration_mv[slot] = duration_ns

    def _derive_now(self, slot: int, num_scheduled: np.ndarray, is_decode: np.ndarray,
                    num_computed: np.ndarray, scheduled_total: int, bm: ByteModel) -> None:
        one = np.asarray(num_scheduled, dtype=np.int64)[None, :]
        self._set(np.array([slot]), one, np.asarray(is_decode, dtype=bool)[None, :],
                  np.asarray(num_computed, dtype=np.int64)[None, :],
                  np.ones_like(one, dtype=bool), np.array([scheduled_total]), bm)

    def derive(self, start: int, stop: int, bm: ByteModel) -> None:
        """Flusher: the per-phase figures of slots [start, stop) from their raw layouts."""
        n = self._n[start:stop]
        raw = np.nonzero(n >= 0)[0] + start
        if raw.size == 0:
            return
        # only the widest step's columns: the buffers are MAX_RAW_REQUESTS wide, a decode batch
        # is often a few dozen requests, and every pass below is over [steps, width] (a block of
        # 420 tiny-model steps of 16 requests: 4 ms a flush at full width)
        w = int(n.max())
        rows: slice | np.ndarray = slice(start, stop) if raw.size == stop - start else raw
        widths = self._n[rows]
        valid = np.arange(w)[None, :] < widths[:, None]
        self._set(raw, self._sched[rows, :w], self._decode[rows, :w], self._computed[rows, :w],
                  valid, self._total[rows], bm)

    def _set(self, slots: np.ndarray, sched: np.ndarray, decode: np.ndarray,
             computed: np.ndarray, valid: np.ndarray, total: np.ndarray, bm: ByteModel) -> None:
        """The per-phase figures of `slots` from [slot, request] layouts (`valid` masks the
        requests each slot really had)."""
        sched = np.where(valid, sched, 0)
        dec = decode & valid
        pre = valid & ~dec
        ctx = np.where(valid, computed + sched, 0)  # KV tokens after the step
        kv = kv_read_bytes(bm, ctx)
        if bm.recurrent_state_bytes:
            kv += np.where(valid & (computed > 0), float(bm.recurrent_state_bytes), 0.0)
        for ph, mask in ((PREFILL, pre), (DECODE, dec)):
            self.tokens[slots, ph] = (sched * mask).sum(axis=1)
            self.requests[slots, ph] = mask.sum(axis=1)
            self.context[slots, ph] = (ctx * mask).sum(axis=1)
            self.kv_bytes[slots, ph] = (kv * mask).sum(axis=1)
        # decode only, prefill only, or mixed
        has_p, has_d = self.tokens[slots, PREFILL] > 0, self.tokens[slots, DECODE] > 0
        self.kind[slots] = np.where(has_d & ~has_p, KIND_DECODE,
                                    np.where(has_p & ~has_d, KIND_PREFILL, KIND_MIXED))
        self.scheduled[slots] = np.where(total < 0, sched.sum(axis=1), total)
        self._n[slots] = -1

    def take(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop].copy() for k, v in vars(self).items() if not k.startswith("_")}

    def nbytes(self) -> int:
        return sum(int(v.nbytes) for v in vars(self).values() if isinstance(v, np.ndarray))


@dataclass
class Totals:
    """Cumulative counters for one rank. Shapes are fixed by (layers, experts) at start-up."""

    num_layers: int
    num_experts: int
    steps: np.ndarray = field(init=False)
    duration_s: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)
    padding_tokens: int = 0
    requests: np.ndarray = field(init=False)
    context: np.ndarray = field(init=False)
    assignments: np.ndarray = field(init=False)
    touched: np.ndarray = field(init=False)
    max_load: np.ndarray = field(init=False)
    hist_buckets: np.ndarray = field(init=False)
    hist_sum: np.ndarray = field(init=False)
    expert_tokens: np.ndarray = field(init=False)
    hbm_bytes: np.ndarray = field(init=False)
    comm_s: np.ndarray = field(init=False)
    invalid_ids: np.ndarray = field(init=False)
    dropped_steps: int = 0
    scheduled_tokens: int = 0
    selfcheck_mismatch: int = 0

    def __post_init__(self) -> None:
        L, E = self.num_layers, self.num_experts
        self.steps = np.zeros(len(KINDS), dtype=np.int64)
        self.duration_s = np.zeros(len(KINDS), dtype=np.float64)
        self.tokens = np.zeros(2, dtype=np.int64)
        self.requests = np.zeros(2, dtype=np.int64)
        self.context = np.zeros(2, dtype=np.int64)
        self.assignments = np.zeros((L, 2), dtype=np.int64)
        self.touched = np.zeros((L, 2), dtype=np.int64)
        self.max_load = np.zeros((L, 2), dtype=np.int64)
        self.hist_buckets = np.zeros((2, len(HIST_BOUNDS) + 1), dtype=np.int64)
        self.hist_sum = np.zeros(2, dtype=np.int64)
        self.expert_tokens = np.zeros((L, 2, E), dtype=np.int64)
        self.hbm_bytes = np.zeros(len(COMPONENTS), dtype=np.float64)
        self.comm_s = np.zeros(len(COMM_OPS), dtype=np.float64)
        self.invalid_ids = np.zeros(2, dtype=np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        out["padding_tokens"] = np.array(self.padding_tokens, dtype=np.int64)
        out["dropped_steps"] = np.array(self.dropped_steps, dtype=np.int64)
        out["scheduled_tokens"] = np.array(self.scheduled_tokens, dtype=np.int64)
        out["selfcheck_mismatch"] = np.array(self.selfcheck_mismatch, dtype=np.int64)
        return out


@dataclass(frozen=True)
class BlockStats:
    """Per-step derived figures of one flushed block (used by the live comparison window)."""

    decode_touched: np.ndarray  # [n] distinct experts touched by decode tokens, summed over layers
    decode_assign: np.ndarray  # [n] decode assignments summed over layers
    distinct_all: np.ndarray  # [L, n] distinct experts touched by any token
    expert_decode: np.ndarray  # [L, E] decode tokens per expert over the block


def fold_block(
    totals: Totals,
    counts: np.ndarray,
    meta: dict[str, np.ndarray],
    bytes_model: ByteModel,
    top_k: int,
) -> BlockStats:
    """Fold n finished steps into `totals`.

    counts: [L, n, 3, E+1] per-step expert counts from the device ring (column E: out-of-range
    ids); meta: StepMeta.take().

    Self-check: every MoE layer must have counted the scheduler's tokens x top-k assignments in
    each step (out-of-range ids included); any difference, summed over layers and steps, goes to
    `selfcheck_mismatch`. The expected side is the scheduler's own figure (`meta["scheduled"]`),
    never the recorder's.
    """
    E = counts.shape[3] - 1
    real = counts[:, :, :PAD]  # [L, n, 2, E+1], padding sink dropped (int32: sums are int64)
    c = real[..., :E]  # [L, n, 2, E]
    n = c.shape[1]
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return BlockStats(empty, empty, np.zeros((c.shape[0], 0), np.int64),
                          c.sum(axis=(1, 2), dtype=np.int64))
    kinds = meta["kind"].astype(np.int64)
    totals.steps += np.bincount(kinds, minlength=len(KINDS))[: len(KINDS)]
    totals.duration_s += (
        np.bincount(kinds, weights=meta["duration_ns"], minlength=len(KINDS))[: len(KINDS)] / 1e9
    )
    totals.tokens += meta["tokens"].sum(axis=0)
    totals.requests += meta["requests"].sum(axis=0)
    totals.context += meta["context"].sum(axis=0)
    totals.comm_s += meta["comm_ns"].sum(axis=0) / 1e9
    # Padding: rows in the sink of a real step (first layer; every layer routes the same rows).
    totals.padding_tokens += int(counts[0, :, PAD].sum(dtype=np.int64)) // max(top_k, 1)
    totals.invalid_ids += real[..., E].sum(axis=(0, 1), dtype=np.int64)
    scheduled = meta["scheduled"].astype(np.int64)
    totals.scheduled_tokens += int(scheduled.sum())
    counted = real.sum(axis=(2, 3), dtype=np.int64)  # [L, n]
    totals.selfcheck_mismatch += int(np.abs(counted - scheduled[None, :] * top_k).sum())

    present = c > 0
    per_phase = c.sum(axis=(1, 3), dtype=np.int64)  # [L, 2]
    totals.assignments += per_phase
    totals.touched += present.sum(axis=(1, 3), dtype=np.int64)
    totals.max_load += c.max(axis=3).sum(axis=1, dtype=np.int64)
    totals.expert_tokens += c.sum(axis=1, dtype=np.int64)
    # expert-local batch histogram: one table lookup per (layer, step, expert) instead of
    # extracting the touched entries and a binary search (a third of the fold before)
    buckets = _BUCKET_OF[np.minimum(c, len(_BUCKET_OF) - 1)]  # [L, n, 2, E], untouched: sentinel
    for p in range(2):
        totals.hist_buckets[p] += np.bincount(
            buckets[:, :, p].ravel(), minlength=len(HIST_BOUNDS) + 2)[: len(HIST_BOUNDS) + 1]
    totals.hist_sum += per_phase.sum(axis=0)

    distinct_all = (present[:, :, PREFILL] | present[:, :, DECODE]).sum(axis=2, dtype=np.int64)
    bm = bytes_model
    routed = float((distinct_all.sum(axis=1) * np.asarray(bm.expert_bytes_per_layer)).sum())
    kv = float(meta["kv_bytes"].sum()) if "kv_bytes" in meta else (
        float(meta["context"].sum()) * bm.kv_bytes_per_token)
    per_step = np.array(
        [0.0, bm.shared_expert_bytes, bm.dense_ffn_bytes, bm.attention_bytes, bm.embedding_bytes, 0.0]
    )
    totals.hbm_bytes += per_step * n
    totals.hbm_bytes[0] += routed
    totals.hbm_bytes[COMPONENTS.index("kv_cache")] += kv
    return BlockStats(
        decode_touched=present[:, :, DECODE].sum(axis=(0, 2), dtype=np.int64),
        decode_assign=c[:, :, DECODE].sum(axis=(0, 2), dtype=np.int64),
        distinct_all=distinct_all,
        expert_decode=c[:, :, DECODE].sum(axis=1, dtype=np.int64),
    )


UNRECORDED_DOC = (
    "MoE layers this rank runs whose routing the plugin does not record, by source: draft_model "
    "is a speculative-decoding drafter's (MTP, EAGLE, a draft model), whose forwards run other "
    "token counts than the step; unknown_layer a routing source vLLM's binder bound that the "
    "recorder was not sized for (a vLLM change; the self-check cannot see it). Their tokens, "
    "assignments and weight reads are in no moe_reuse series; 0 when every MoE layer the rank "
    "runs is recorded.")


def unrecorded_gauge(draft_moe_layers: int, unknown_layers: int = 0) -> dict[str, Any]:
    """`moe_reuse_unrecorded_moe_layers`, always present, so a blind spot shows on /metrics."""
    return {"doc": UNRECORDED_DOC, "labels": ["source"],
            "samples": [(("draft_model",), float(draft_moe_layers)),
                        (("unknown_layer",), float(unknown_layers))]}
