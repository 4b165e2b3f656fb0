"""The recorder's GPU path (issue 6): CUDA-graph counting, no host syncs, in-graph timing,
overhead at real MoE sizes, and the asynchronous device-to-host flush.

Runs at the torch level, without vLLM: the recorder's own code (`RoutingRing`, `RecorderSession`)
and a multi-layer MoE block built from plain torch ops with real routing:

- Qwen3-235B-A22B layer shapes: hidden 4096, 128 experts, top-8 softmax (renormalised),
  moe_intermediate 1536.
- DeepSeek-V3 layer shapes: hidden 7168, 256 experts, top-8 grouped top-k (n_group 8,
  topk_group 4, sigmoid scoring + correction bias, routed scaling 2.5), moe_intermediate 2048,
  1 shared expert.

Expert compute is capturable and realistic in bytes and FLOPs: pairs are put in expert order
without a sort or a host sync, then `torch._grouped_mm` (fallback: a capacity-padded `bmm` over
all local experts). `--ep N` models one rank of an N-way expert-parallel deployment: routing and
counting are over all experts (as on a real EP rank, whose router sees all logical experts), the
rank holds E/N experts and computes the balanced per-rank share of the B*top_k pairs (expert
id mod E/N). Each layer has its own weights. There is no second GPU, so the all-to-all is a
labelled stand-in: the dispatch permute (`index_select` of the hidden states into expert order,
the same bytes a dispatch moves), timed inside the graph.

Checks (all on the GPU; the script refuses to run without one, exit status 2):
1. counts: CUDA graphs of the block with the recorder's in-graph ops, one per batch size, replayed
   with new inputs, random prefill/decode mixes and padded rows; every step's ring slot must equal
   an eager torch.bincount of the topk ids that graph replay routed (exact).
2. no host syncs: the step protocol + replay under torch.cuda.set_sync_debug_mode("error"), and a
   blocking probe (a long GPU sleep queued first: the host side of a step must not wait for it;
   this also catches event waits, which the sync debug mode does not see).
3. timing: CUDA events with external=True recorded inside the graph (step, dispatch stand-in),
   compared with events around graph.replay() and with the dispatch op timed eagerly.
4. overhead: block step time with and without recording, arms alternated in one run, medians and
   the ratio; target <= 0.5% at batch >= 64.
5. flush: `read_range` returns before its copy is done, the main stream finishes steps while a
   flush copy is still pending, replay throughput with the flusher thread copying continuously vs
   without, and the session's folded totals equal the eager reference exactly.
6. (issue 18) step time: the session's flushed step durations (the ring's per-slot event pairs)
   against the outer span of the same steps; collective time with the recorder's device clock
   (stamps around the dispatch stand-in, inside the graph) against the op timed eagerly, and
   folded by the session exactly; the overhead of the one-kernel hot path beside the torch-op
   path; `--layers real` for the models' MoE layer counts.
7. (issue 18) HBM bandwidth: NVML GPM (the plugin's `reader.gpm.GpmSampler`) over a window of
   replays of the block plus a KV-like read, against the bytes the block had to read.
Results and their reading: docs/gpu.md.

    python benchmarks/gpu_recorder_check.py --quick --out $OUT/gpu_recorder_check.json
    python benchmarks/gpu_recorder_check.py --out $OUT/gpu_recorder_check.json

Exit status: 0 all checks passed and the overhead target met; 1 a check failed; 2 no CUDA device;
3 every check passed but the overhead target was missed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import platform
import statistics
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from math import nan
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
NO_CUDA_MESSAGE = "no CUDA device: this check needs a GPU (issue 6)"
OVERHEAD_TARGET = 0.005  # at most 0.5% ...
OVERHEAD_TARGET_MIN_BATCH = 64  # ... at batch 64 and above


def import_recorder() -> tuple[Any, Any, Any]:
    """(ring, session, aggregate) modules of this checkout, installed or not.

    On the GPU machine the repo is copied but not pip-installed: map the `moe_reuse` namespace
    onto the checkout (what setup.py's package_dir does), so the code under test is this tree's.
    """
    try:
        from moe_reuse.plugin.recorder import aggregate, ring, session
    except ImportError:
        pkg = types.ModuleType("moe_reuse")
        pkg.__path__ = [str(REPO)]
        sys.modules["moe_reuse"] = pkg
        from moe_reuse.plugin.recorder import aggregate, ring, session
    return ring, session, aggregate


# ---- model shapes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int
    num_experts: int
    top_k: int
    intermediate: int
    scoring: str  # "softmax" | "sigmoid_grouped"
    n_group: int = 1
    topk_group: int = 1
    n_shared: int = 0
    routed_scaling: float = 1.0
    renormalize: bool = True
    kv_width: int = 1024  # KV elements per token per layer (bf16): GQA K+V, or MLA's latent
    moe_layers: int = 4  # the model's MoE layer count (--layers real)




MODELS = {
    "qwen3-235b": MoEShape("qwen3-235b", 4096, 128, 8, 1536, "softmax", kv_width=4 * 128 * 2,
                           moe_layers=94),
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", 2048, 128, 8, 768, "softmax", kv_width=4 * 128 * 2,
                              moe_layers=48),
    "deepseek-v3": MoEShape(
        "deepseek-v3", 7168, 256, 8, 2048, "sigmoid_grouped", n_group=8, topk_group=4,
        n_shared=1, routed_scaling=2.5, kv_width=512 + 64, moe_layers=58,
    ),
}
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUICK_BATCHES = (1, 64, 512)


# ---- pure helpers (tested on CPU by tests/test_gpu_check_script.py) --------------------------
def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-style routing: softmax over experts, top-k. Returns (weights fp32, ids int64)."""
    probs = logits.float().softmax(dim=-1)
    w, ids = probs.topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def grouped_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    routed_scaling: float = 1.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (noaux_tc): sigmoid scores, selection on score + correction bias;
    groups ranked by the sum of their two best biased scores, the best `topk_group` groups kept,
    top-k experts inside them; weights are the unbiased scores, renormalised, times the routed
    scaling factor. No data-dependent shapes and no host sync (capturable)."""
    b, e = logits.shape
    scores = logits.float().sigmoid()
    biased = scores + bias.float()
    group_scores = biased.view(b, n_group, e // n_group).topk(2, dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand(b, n_group, e // n_group).reshape(b, e)
    masked = biased.masked_fill(score_mask == 0, float("-inf"))
    ids = masked.topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * routed_scaling, ids


def expert_order(
    flat_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable expert order of (token, k) pairs without a sort and without a host sync.

    Returns (perm, counts, rank): perm[i] is the pair at position i of the expert-sorted order
    (equal to a stable argsort of flat_ids), counts[e] the pairs of expert e (int32), rank[j] the
    position of pair j inside its expert's group.
    """
    n = flat_ids.shape[0]
    onehot = torch.zeros((n, num_experts), dtype=torch.int32, device=flat_ids.device)
    onehot.scatter_(1, flat_ids.unsqueeze(1), 1)
    rank = onehot.cumsum(0, dtype=torch.int32).gather(1, flat_ids.unsqueeze(1)).squeeze(1) - 1
    counts = onehot.sum(0, dtype=torch.int32)
    start = counts.cumsum(0, dtype=torch.int32) - counts
    pos = start[flat_ids].long() + rank.long()
    arange = torch.arange(n, device=flat_ids.device)
    perm = torch.empty_like(flat_ids).scatter_(0, pos, arange)
    return perm, counts, rank


def reference_counts(
    ids_per_layer: list[torch.Tensor], phases: np.ndarray, num_experts: int
) -> torch.Tensor:
    """Eager reference of one step's ring slot: [L, 3, E + 1] int64 (column E: out-of-range ids), via torch.bincount on the CPU.

    ids_per_layer: each [B, K] (the batch as the graph ran it, padded rows included); phases:
    one per real token (the first len(phases) rows), every later row counts in the PAD phase.
    """
    from moe_reuse.plugin.recorder.ring import NUM_PHASES, PAD

    out = []
    for ids in ids_per_layer:
        ids = ids.detach().to("cpu", torch.int64)
        ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)  # column E: invalid
        b = ids.shape[0]
        row_phase = torch.full((b,), PAD, dtype=torch.int64)
        n = min(int(phases.shape[0]), b)
        row_phase[:n] = torch.from_numpy(np.asarray(phases[:n], dtype=np.int64))
        flat = (row_phase.unsqueeze(1) * (num_experts + 1) + ids).reshape(-1)
        counts = torch.bincount(flat, minlength=NUM_PHASES * (num_experts + 1))
        out.append(counts.view(NUM_PHASES, num_experts + 1))
    return torch.stack(out)


def make_batch(
    rng: np.random.Generator, n_tokens: int, decode_share: float = 0.75
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A vLLM-like batch layout of n_tokens: decode requests (1 token each, context >= prompt)
    and prefill chunks. Returns (num_scheduled, num_computed, num_prompt, phases per token), in
    the form RecorderSession.step_prepared takes and with the phases it derives."""
    from moe_reuse.plugin.recorder.ring import DECODE, PREFILL

    n_dec = int(rng.binomial(n_tokens, decode_share)) if n_tokens > 1 else int(rng.integers(0, 2))
    sched, computed, prompt = [], [], []
    for _ in range(n_dec):
        p = int(rng.integers(8, 512))
        sched.append(1)
        prompt.append(p)
        computed.append(p + int(rng.integers(0, 256)))
    left = n_tokens - n_dec
    while left > 0:
        chunk = int(rng.integers(1, left + 1))
        p = chunk + int(rng.integers(0, 64))
        sched.append(chunk)
        prompt.append(p)
        computed.append(p - chunk)
        left -= chunk
    order = rng.permutation(len(sched))
    s = np.array(sched, dtype=np.int64)[order]
    c = np.array(computed, dtype=np.int64)[order]
    p = np.array(prompt, dtype=np.int64)[order]
    phases = np.repeat(np.where(c >= p, DECODE, PREFILL).astype(np.int8), s)
    return s, c, p, phases


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ---- the MoE block ----------------------------------------------------------------------------
class MoELayer:
    """One MoE layer in plain torch ops: router -> top-k -> [recorder capture] -> dispatch permute
    -> grouped expert GEMMs (SwiGLU) -> weighted combine (+ shared expert)."""

    def __init__(
        self,
        shape: MoEShape,
        *,
        ep: int,
        max_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype,
        generator: torch.Generator,
        impl: str = "grouped_mm",
        capacity_factor: float = 2.0,
    ) -> None:
        self.shape = shape
        s = shape
        if s.num_experts % ep:
            raise ValueError(f"--ep {ep} must divide {s.num_experts} experts")
        self.local_experts = s.num_experts // ep
        self.impl = impl
        self.capacity_factor = capacity_factor
        dev = torch.device(device)

        def rand(*size: int, scale: float) -> torch.Tensor:
            t = torch.randn(size, device=dev, dtype=torch.float32, generator=generator)
            return (t * scale).to(dtype)

        h, i, el = s.hidden, s.intermediate, self.local_experts
        self.gate = rand(s.num_experts, h, scale=h**-0.5)
        self.bias = (
            torch.randn(s.num_experts, device=dev, generator=generator) * 0.05
            if s.scoring == "sigmoid_grouped"
            else None
        )
        self.w13 = rand(el, 2 * i, h, scale=h**-0.5)  # nn.Linear layout [out, in] per expert
        self.w2 = rand(el, h, i, scale=i**-0.5)
        si = s.n_shared * i
        self.ws13 = rand(2 * si, h, scale=h**-0.5) if si else None
        self.ws2 = rand(h, si, scale=si**-0.5) if si else None
        # Dispatch stand-in bracket (layer 0 only): external events recorded inside the graph.
        self.dispatch_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        # the recorder's device clock around the dispatch stand-in (RoutingRing.comm_stamp)
        self.stamp: Callable[[int, int], None] | None = None
        self.last_tok: torch.Tensor | None = None  # the dispatch op's index (kept for re-timing)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shape
        logits = F.linear(x, self.gate)
        if s.scoring == "softmax":
            return softmax_topk(logits, s.top_k, s.renormalize)
        assert self.bias is not None
        return grouped_topk(
            logits, self.bias, s.top_k, s.n_group, s.topk_group, s.routed_scaling, s.renormalize
        )

    def __call__(
        self, x: torch.Tensor, capture: Callable[[torch.Tensor], None] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w, ids = self.route(x)
        if capture is not None:
            capture(ids)  # the recorder's hot path: an add and an index_add_
        out = self.experts(x, ids, w)
        if self.ws13 is not None and self.ws2 is not None:
            gu = F.linear(x, self.ws13)
            g, u = gu.chunk(2, dim=-1)
            out = out + F.linear(F.silu(g) * u, self.ws2)
        return out, ids

    def experts(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, k = ids.shape
        el = self.local_experts
        flat = (ids % el).reshape(-1)  # this rank's balanced share of the pairs (see --ep)
        perm, counts, rank = expert_order(flat, el)
        tok = perm // k
        ev = self.dispatch_events
        if ev is not None:
            ev[0].record()
        if self.stamp is not None:
            self.stamp(1, -1)  # ALL_TO_ALL, before
        xs = x.index_select(0, tok)  # dispatch stand-in: hidden states into expert order
        if self.stamp is not None:
            self.stamp(1, 1)  # after
        if ev is not None:
            ev[1].record()
        self.last_tok = tok
        wsorted = w.reshape(-1).index_select(0, perm).unsqueeze(1)
        if self.impl == "grouped_mm":
            offs = counts.cumsum(0, dtype=torch.int32)
            hmid = torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs)
            g, u = hmid.chunk(2, dim=-1)
            y = torch._grouped_mm(
                (F.silu(g) * u).contiguous(), self.w2.transpose(-2, -1), offs=offs
            )
        else:
            y = self._bmm_capacity(xs, flat.index_select(0, perm), rank.index_select(0, perm), b)
        y = (y.float() * wsorted).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)  # combine

    def _bmm_capacity(
        self, xs: torch.Tensor, e_sorted: torch.Tensor, r_sorted: torch.Tensor, b: int
    ) -> torch.Tensor:
        """Fallback without grouped GEMM: [E, C, H] padded per expert, two bmm over all local
        experts (reads every local expert: realistic when most are touched, i.e. batch >= 64).
        Pairs beyond capacity C are dropped (their output is zero); counting is unaffected."""
        el, n = self.local_experts, xs.shape[0]
        cap = max(1, min(n, math.ceil(self.capacity_factor * n / el)))
        keep = r_sorted < cap
        dest = torch.where(keep, e_sorted * cap + r_sorted.long(), torch.full_like(e_sorted, el * cap))
        buf = torch.zeros((el * cap + 1, xs.shape[1]), dtype=xs.dtype, device=xs.device)
        buf.index_copy_(0, dest, xs)  # duplicates only at the dump row
        hmid = torch.bmm(buf[: el * cap].view(el, cap, -1), self.w13.transpose(-2, -1))
        g, u = hmid.chunk(2, dim=-1)
        out = torch.bmm(F.silu(g) * u, self.w2.transpose(-2, -1)).reshape(el * cap, -1)
        out = torch.cat([out, out.new_zeros((1, out.shape[1]))])
        return out.index_select(0, dest) * keep.unsqueeze(1).to(out.dtype)


class MoEBlock:
    def __init__(self, layers: list[MoELayer]) -> None:
        self.layers = layers
        # KV-like read (the bandwidth check): per layer, one [rows, kv_width] buffer read whole
        # by a reduction, the bytes attention reads from the KV cache at decode
        self.kv: list[torch.Tensor] | None = None

    def __call__(
        self, x: torch.Tensor, captures: list[Callable[[torch.Tensor], None]] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = x
        all_ids = []
        for i, layer in enumerate(self.layers):
            out, ids = layer(rms_norm(h), captures[i] if captures is not None else None)
            h = h + out
            if self.kv is not None:
                # reads every byte of the buffer once; x0 keeps the routing as without it
                h = h + (self.kv[i % len(self.kv)].sum(0).mean() * 0).to(h.dtype)
            all_ids.append(ids)
        return h, all_ids


def reference_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Slow per-pair reference of MoELayer (no capacity drops), for the self-test and tests."""
    w, ids = layer.route(x)
    el = layer.local_experts
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) % el
            gu = layer.w13[e].float() @ x[t].float()
            g, u = gu.chunk(2)
            out[t] += float(w[t, j]) * (layer.w2[e].float() @ (F.silu(g) * u))
    if layer.ws13 is not None and layer.ws2 is not None:
        gu = F.linear(x.float(), layer.ws13.float())
        g, u = gu.chunk(2, dim=-1)
        out += F.linear(F.silu(g) * u, layer.ws2.float())
    return out


# ---- small GPU utilities ----------------------------------------------------------------------
@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def capture_graph(
    fn: Callable[[], Any], warmup: int = 3
) -> tuple[torch.cuda.CUDAGraph, Any]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the session's flusher thread may be alive (idle) while later graphs capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def sleep_cycles_per_ms() -> float:
    torch.cuda._sleep(1_000)  # load the kernel
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    a.record()
    torch.cuda._sleep(cycles)
    b.record()
    b.synchronize()
    return cycles / max(a.elapsed_time(b), 1e-3)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def new_timing_event(external: bool = False) -> torch.cuda.Event:
    if external:
        return torch.cuda.Event(enable_timing=True, external=True)
    return torch.cuda.Event(enable_timing=True)


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    def check(self, name: str, ok: bool, **detail: Any) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), **detail})
        brief = ", ".join(f"{k}={_fmt(v)}" for k, v in detail.items() if not isinstance(v, list))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {brief}", flush=True)
        return bool(ok)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- the run ----------------------------------------------------------------------------------
class ModelRun:
    """Everything for one model: the block, one RecorderSession (its ring is captured into every
    graph, as in vLLM: one ring, one graph per batch size) and the per-batch checks."""

    def __init__(self, args: argparse.Namespace, shape: MoEShape, report: Report) -> None:
        ring_mod, session_mod, aggregate_mod = import_recorder()
        self.R, self.S, self.A = ring_mod, session_mod, aggregate_mod
        self.args, self.shape, self.report = args, shape, report
        self.dev = torch.device(args.device)
        self.max_b = max(args.batches)
        gen = torch.Generator(device=self.dev)
        gen.manual_seed(args.seed)
        L = shape.moe_layers if args.layers == "real" else int(args.layers)
        self.L = L
        # Layer 0 has its own weights (its dispatch events are recorded once per graph); the
        # others cycle through `--weight-sets` sets, so a 58-layer DeepSeek-V3 block fits one GPU.
        # Each set is far larger than L2, so a repeated set is read from HBM again, as a distinct
        # layer would be; routing differs per layer (it depends on the layer's input).
        sets = [MoELayer(shape, ep=args.ep, max_tokens=self.max_b, device=self.dev,
                         dtype=torch.bfloat16, generator=gen, impl=args.impl_resolved)
                for _ in range(min(L, args.weight_sets + 1))]
        self.block = MoEBlock([sets[0]] + [sets[1 + (i - 1) % (len(sets) - 1)]
                                           for i in range(1, L)] if L > 1 else sets)
        E = shape.num_experts
        self.published: collections.deque[dict[str, Any]] = collections.deque(maxlen=2)
        expert_bytes = 3 * shape.hidden * shape.intermediate * 2
        self.session = session_mod.RecorderSession(
            ring_mod.RingLayout(L, E, shape.top_k, max_tokens=self.max_b,
                                ring_steps=ring_mod.RingLayout.auto_ring_steps(L, E)),
            aggregate_mod.ByteModel((expert_bytes,) * L),
            device=self.dev, labels={"model": shape.name, "engine": "0", "rank": "0"},
            info={"version": "gpu-check"}, layer_ids=list(range(L)),
            publish=self.published.append, flush_interval_s=args.flush_interval,
        )
        self.ring = self.session.ring
        self.g_rec_torch: torch.cuda.CUDAGraph | None = None
        self.captures = [self.session.capture_fn(i) for i in range(L)]
        self.pool = torch.randn((args.inputs, self.max_b, shape.hidden), device=self.dev,
                                generator=gen).to(torch.bfloat16)
        self.rng = np.random.default_rng(args.seed)
        self.cpm = sleep_cycles_per_ms()
        self.results: dict[str, Any] = {"shape": asdict(shape), "ep": args.ep,
                                        "local_experts": self.block.layers[0].local_experts,
                                        "ring_steps": self.ring.layout.ring_steps, "batches": {}}

    # -- per batch ---------------------------------------------------------------------------
    def run_batch(self, b: int) -> dict[str, Any]:
        name = f"{self.shape.name} b={b}"
        res: dict[str, Any] = {}
        x = torch.zeros((b, self.shape.hidden), device=self.dev, dtype=torch.bfloat16)
        self.x = x
        layer0 = self.block.layers[0]
        g_base, _ = capture_graph(lambda: self.block(x, None))
        g_rec, (_, ids_rec) = capture_graph(lambda: self.block(x, self.captures))
        self.g_rec_torch = None
        if self.ring.count_impl != "torch":  # the torch-op path, for the overhead comparison
            impl, self.ring.count_impl = self.ring.count_impl, "torch"
            try:
                self.g_rec_torch, _ = capture_graph(lambda: self.block(x, self.captures))
            finally:
                self.ring.count_impl = impl
        try:
            ev = (new_timing_event(True), new_timing_event(True))
            step_ev = (new_timing_event(True), new_timing_event(True))
        except TypeError as exc:  # torch without external events
            ev = step_ev = None
            res["timing_error"] = f"torch.cuda.Event(external=True) unsupported: {exc}"

        def timed_fn() -> Any:
            assert step_ev is not None
            step_ev[0].record()
            layer0.dispatch_events = ev
            if self.R.device_clock.available(self.dev):
                layer0.stamp = self.ring.comm_stamp
            try:
                out = self.block(x, self.captures)
            finally:
                layer0.dispatch_events = None
                layer0.stamp = None
            step_ev[1].record()
            return out

        g_time = tok_time = None
        if ev is not None:
            try:
                g_time, _ = capture_graph(timed_fn)
                tok_time = layer0.last_tok
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                res["timing_error"] = f"capture with external events failed: {exc!r}"
        self._phase_cache = [self._phases(b) for _ in range(16)]
        res["counts"] = self.check_counts(name, g_rec, ids_rec, b)
        res["sync"] = self.check_no_sync(name, g_rec, b)
        if g_time is not None and ev is not None and step_ev is not None and tok_time is not None:
            res["timing"] = self.check_timing(name, g_time, step_ev, ev, tok_time, b)
        else:
            self.report.check(f"{name} in-graph timing", False, error=res.get("timing_error"))
        res["overhead"] = self.check_overhead(name, g_base, g_rec, b)
        if b in self.args.flush_batches:
            res["flush"] = self.check_flush(name, g_rec, ids_rec, b)
        del g_base, g_rec, g_time
        self.g_rec_torch = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return res

    def _load_input(self, step: int, b: int) -> None:
        self.x.copy_(self.pool[step % self.pool.shape[0], :b])  # D2D into the static input

    def _phases(self, b: int) -> np.ndarray:
        n_real = int(self.rng.integers(max(1, b - b // 4), b + 1))  # some padded rows
        return make_batch(self.rng, n_real)[3]

    # -- 1. counts --------------------------------------------------------------------------
    def check_counts(
        self, name: str, g: torch.cuda.CUDAGraph, ids: list[torch.Tensor], b: int
    ) -> dict[str, Any]:
        ring, E = self.ring, self.shape.num_experts
        S = ring.layout.ring_steps
        self._free_all_slots()  # the last batch's direct-protocol checks left counts behind
        idle_before = ring.counts[:, ring.layout.idle_slot].clone()
        steps, mismatched, step_no = self.args.replays, 0, 0
        first_bad: dict[str, Any] | None = None
        distinct = set()
        eager_match: list[float] = []
        while step_no < steps:
            chunk = min(S, steps - step_no, 64)
            hist, phases_list = [], []
            for j in range(chunk):  # pipelined: no host sync inside a chunk
                phases = self._phases(b)
                ring.begin_step(j, phases)
                self._load_input(step_no + j, b)
                g.replay()
                ring.end_step()
                ring.mark_step_done()
                hist.append([t.clone() for t in ids])  # D2D, after the replay on the same stream
                phases_list.append(phases)
            # the flusher's read: copy the slots, then zero them for their next use
            host = torch.empty((self.L, chunk, 3, E + 1), dtype=torch.int32, pin_memory=True)
            ring.read_range(0, chunk, host).synchronize()  # after the last step's event
            torch.cuda.synchronize()
            got = host.to(torch.int64)  # [L, chunk, 3, E + 1]
            for j in range(chunk):
                ref = reference_counts(hist[j], phases_list[j], E)
                if not torch.equal(got[:, j], ref):
                    mismatched += 1
                    if first_bad is None:
                        diff = (got[:, j] - ref).abs()
                        first_bad = {"step": step_no + j, "abs_diff_sum": int(diff.sum())}
                distinct.add(hash(ref.numpy().tobytes()))
            if step_no == 0:  # graph routing vs an eager run of the same input
                for j in range(min(4, chunk)):
                    self._load_input(j, b)
                    _, eager_ids = self.block(self.x, None)
                    eq = [torch.equal(a, c) for a, c in zip(eager_ids, hist[j])]
                    eager_match.append(sum(eq) / len(eq))
            step_no += chunk
        torch.cuda.synchronize()
        idle_same = torch.equal(idle_before, ring.counts[:, ring.layout.idle_slot])
        out = {"steps": steps, "mismatched_steps": mismatched, "distinct_step_counts":
               len(distinct), "idle_slot_unchanged": idle_same,
               "eager_routing_match": med(eager_match), "first_mismatch": first_bad}
        self.report.check(
            f"{name} counts exact in CUDA graph", mismatched == 0 and idle_same
            and len(distinct) > 1, steps=steps, mismatched=mismatched, idle_unchanged=idle_same,
            distinct=len(distinct), eager_routing_match=out["eager_routing_match"],
        )
        return out

    # -- 2. no host syncs --------------------------------------------------------------------
    def _protocol_step(self, g: torch.cuda.CUDAGraph, slot: int, step: int, b: int) -> None:
        self.ring.begin_step(slot, self._phase_cache[step % len(self._phase_cache)])
        self._load_input(step, b)
        g.replay()
        self.ring.end_step()
        self.ring.mark_step_done()

    def check_no_sync(self, name: str, g: torch.cuda.CUDAGraph, b: int) -> dict[str, Any]:
        S = self.ring.layout.ring_steps
        error = None
        steps = 0
        try:
            for c in range(self.args.sync_chunks):
                # <= 3 steps in flight: the ring's 4 staging buffers never need to wait
                with sync_debug("error"):
                    for j in range(3):
                        self._protocol_step(g, (3 * c + j) % S, 3 * c + j, b)
                        steps += 1
                torch.cuda.synchronize()
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
        # Blocking probe: a long GPU sleep first; the host side of 3 steps must not wait for it.
        torch.cuda.synchronize()
        sleep_ms = self.args.probe_sleep_ms
        torch.cuda._sleep(int(sleep_ms * self.cpm))
        t0 = time.perf_counter()
        for j in range(3):
            self._protocol_step(g, j % S, j, b)
        host_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        # Back-pressure (informational): more steps than staging buffers while the GPU sleeps.
        torch.cuda._sleep(int(sleep_ms * self.cpm))
        per_step = []
        for j in range(8):
            t = time.perf_counter()
            self._protocol_step(g, j % S, j, b)
            per_step.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        ok = error is None and host_ms < 0.25 * sleep_ms
        out = {"steps_under_error_mode": steps, "error": error, "probe_sleep_ms": sleep_ms,
               "probe_host_ms_3_steps": host_ms, "backpressure_host_ms_per_step": per_step}
        self.report.check(f"{name} no host sync in step protocol + replay", ok, error=error,
                          steps=steps, host_ms_3_steps_behind_sleep=host_ms, sleep_ms=sleep_ms)
        return out

    # -- 3. timing inside graphs ---------------------------------------------------------------
    def check_timing(
        self, name: str, g: torch.cuda.CUDAGraph, step_ev: tuple, disp_ev: tuple,
        tok: torch.Tensor, b: int,
    ) -> dict[str, Any]:
        outer = (new_timing_event(), new_timing_event())
        in_step, out_step, in_disp, eager_disp, stamp_ms = [], [], [], [], []
        error = None
        ring = self.ring
        stamping = self.R.device_clock.available(self.dev)
        ring.comm_on_device = stamping  # clear_slot zeroes the slot's collective time
        try:
            for i in range(self.args.timing_reps):
                slot = i % ring.layout.ring_steps
                self.ring.begin_step(slot, self._phase_cache[0])
                self._load_input(i, b)
                torch.cuda._sleep(int(0.5 * self.cpm))  # GPU busy while the host launches
                outer[0].record()
                g.replay()
                outer[1].record()
                self.ring.end_step()
                self.ring.mark_step_done()
                outer[1].synchronize()
                in_step.append(step_ev[0].elapsed_time(step_ev[1]))
                in_disp.append(disp_ev[0].elapsed_time(disp_ev[1]))
                out_step.append(outer[0].elapsed_time(outer[1]))
                if stamping:
                    stamp_ms.append(int(ring.comm_acc[slot, 1].item()) / 1e6)
                ring.clear_slot(slot)  # read here, not flushed: free it as the flusher would
            for _ in range(self.args.timing_reps):  # the dispatch op alone, eager, same shapes
                torch.cuda._sleep(int(0.2 * self.cpm))
                outer[0].record()
                self.x.index_select(0, tok)
                outer[1].record()
                outer[1].synchronize()
                eager_disp.append(outer[0].elapsed_time(outer[1]))
        except Exception as exc:  # noqa: BLE001
            error = repr(exc)
        session_comm = self.check_session_comm(g, b) if stamping and error is None else {}
        ring.comm_on_device = False
        out = {"error": error, "in_graph_step_ms": med(in_step), "outer_step_ms": med(out_step),
               "in_graph_dispatch_ms": med(in_disp), "eager_dispatch_ms": med(eager_disp),
               "dispatch_note": "all-to-all stand-in: local dispatch permute (index_select of "
               "B*top_k hidden rows into expert order); one GPU, no peer traffic",
               "dispatch_bytes": 2 * b * self.shape.top_k * self.shape.hidden * 2}
        ok = error is None
        if ok:
            s_in, s_out = out["in_graph_step_ms"], out["outer_step_ms"]
            d_in, d_out = out["in_graph_dispatch_ms"], out["eager_dispatch_ms"]
            # in-graph step <= whole replay, and within launch latency + 5% of it
            step_ok = 0 < s_in <= s_out * 1.001 + 0.002 and s_out - s_in <= 0.05 * s_out + 0.03
            disp_ok = d_in > 0 and abs(d_in - d_out) <= max(0.25 * d_out, 0.005)
            out.update(step_consistent=step_ok, dispatch_consistent=disp_ok)
            ok = step_ok and disp_ok
        self.report.check(f"{name} in-graph event timing (external=True)", ok, error=error,
                          in_step_ms=out["in_graph_step_ms"], outer_step_ms=out["outer_step_ms"],
                          in_dispatch_ms=out["in_graph_dispatch_ms"],
                          eager_dispatch_ms=out["eager_dispatch_ms"])
        # the recorder's device clock (collective time on CUDA, opt-in), same replays
        d_in, d_eager = out["in_graph_dispatch_ms"], out["eager_dispatch_ms"]
        st = med(stamp_ms)
        stamp_ok = (stamping and error is None and len(stamp_ms) == len(in_disp)
                    and all(0 < v <= e + 0.002 for v, e in zip(stamp_ms, in_disp))
                    and st >= 0.5 * d_eager)
        sess_ok = bool(session_comm) and abs(session_comm["ratio"] - 1) <= 1e-6
        out.update(device_clock_dispatch_ms=st, device_clock_per_rep_ms=stamp_ms,
                   device_clock_ok=stamp_ok, device_clock_session=session_comm)
        self.report.check(f"{name} device-clock collective time in graph (stamps in ring)",
                          stamp_ok and sess_ok, available=stamping, stamp_ms=st,
                          in_graph_event_ms=d_in, eager_ms=d_eager,
                          session_comm_ms=session_comm.get("comm_ms"),
                          session_expected_ms=session_comm.get("expected_ms"))
        return out

    def _free_all_slots(self) -> None:
        """Before a check through the session: the checks that drive the ring's protocol
        directly (no flusher) leave counts in slots the session will take, which its flusher
        would zero after copying them; start from free, zero slots, as in a server."""
        torch.cuda.synchronize()
        self.session.flush()
        S = self.ring.layout.ring_steps
        self.ring.counts[:, :S].zero_()
        self.ring.comm_acc[:S].zero_()
        torch.cuda.synchronize()

    def check_session_comm(self, g: torch.cuda.CUDAGraph, b: int) -> dict[str, Any]:
        """The production path: session steps replaying the stamped graph; the flusher folds
        the slots' collective time into totals.comm_s (all_to_all)."""
        sess, ring = self.session, self.ring
        self._free_all_slots()
        c0 = float(sess.totals.comm_s[1])
        per = []
        k = min(12, ring.layout.ring_steps // 2)
        # the expected side reads each slot on the device before any flush: the flusher thread
        # (if running) waits on the session's lock, as a flush zeroes the slots it has copied
        with sess._lock:
            for j in range(k):
                bt = make_batch(self.rng, b)
                self._session_step(g, j, b, bt)
                torch.cuda.synchronize()
                per.append(int(ring.comm_acc[(sess._steps_begun - 1) % ring.layout.ring_steps,
                                             1].item()) / 1e6)
        sess.flush()
        got = (float(sess.totals.comm_s[1]) - c0) * 1e3
        exp = sum(per)
        return {"steps": k, "comm_ms": got, "expected_ms": exp,
                "ratio": got / exp if exp > 0 else float("nan")}

    # -- 4. overhead --------------------------------------------------------------------------
    def check_overhead(
        self, name: str, g_base: torch.cuda.CUDAGraph, g_rec: torch.cuda.CUDAGraph, b: int
    ) -> dict[str, Any]:
        ring, S = self.ring, self.ring.layout.ring_steps
        n = self.args.steps_per_round
        e0, e1 = new_timing_event(), new_timing_event()
        waits = 0

        def arm(kind: str, round_no: int) -> float:
            nonlocal waits
            torch.cuda._sleep(int(1.0 * self.cpm))  # the host queues ahead: no launch gap timed
            e0.record()
            for j in range(n):
                step = round_no * n + j
                if kind in ("rec", "rec_torch"):
                    nxt = ring._stage_events[ring._stage_next]  # diagnostic: back-pressure count
                    if nxt is not None and not nxt.query():
                        waits += 1
                    ring.begin_step(step % S, self._phase_cache[step % len(self._phase_cache)])
                self._load_input(step, b)
                graphs[kind].replay()
                if kind in ("rec", "rec_torch"):
                    ring.end_step()
                    ring.mark_step_done()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / n

        # capture_only: the recording graph with every row at the idle sink (no step protocol);
        # rec_torch: the same recording through the torch-op path instead of the one kernel
        graphs = {"base": g_base, "rec": g_rec, "capture_only": g_rec}
        if self.g_rec_torch is not None:
            graphs["rec_torch"] = self.g_rec_torch
        arms = tuple(graphs)
        for k in arms:  # warm-up
            arm(k, 0)
        per: dict[str, list[float]] = {k: [] for k in arms}
        for r in range(self.args.rounds):
            order = arms if r % 2 == 0 else tuple(reversed(arms))
            for k in order:
                per[k].append(arm(k, r))
        m = {k: med(v) for k, v in per.items()}
        ratio = m["rec"] / m["base"]
        paired = med([a / c for a, c in zip(per["rec"], per["base"])])
        out = {"step_ms_median": m, "step_ms": per, "ratio_rec_over_base": ratio,
               "count_impl": self.ring.count_impl,
               "ratio_rec_torch_over_base": (m["rec_torch"] / m["base"] if "rec_torch" in m
                                             else None),
               "paired_ratio_median": paired, "overhead_pct": 100 * (ratio - 1),
               "in_graph_us_per_layer": 1e3 * (m["capture_only"] - m["base"]) / self.L,
               "protocol_us_per_step": 1e3 * (m["rec"] - m["capture_only"]),
               "stage_backpressure_waits": waits, "steps_per_round": n,
               "rounds": self.args.rounds}
        target = b >= OVERHEAD_TARGET_MIN_BATCH
        out["target_applies"] = target
        out["target_met"] = (ratio - 1) <= OVERHEAD_TARGET if target else None
        print(f"  overhead {name}: base {m['base']:.4f} ms, rec {m['rec']:.4f} ms, capture-only "
              f"{m['capture_only']:.4f} ms -> ratio {ratio:.5f} ({100 * (ratio - 1):+.3f}%), "
              f"paired {paired:.5f}, torch-op path {100 * (m.get('rec_torch', nan) / m['base'] - 1):+.3f}%"
              + (f" [target <= 0.5%: "
              f"{'met' if out['target_met'] else 'MISSED'}]" if target else ""), flush=True)
        return out

    # -- 5. flush -------------------------------------------------------------------------------
    def check_flush(
        self, name: str, g: torch.cuda.CUDAGraph, ids: list[torch.Tensor], b: int
    ) -> dict[str, Any]:
        ring, L, E = self.ring, self.L, self.shape.num_experts
        S = ring.layout.ring_steps
        out: dict[str, Any] = {}
        sleep_ms = self.args.probe_sleep_ms
        n = min(8, S // 4)
        # (a) read_range returns before its copy is done (the copy waits on the last step).
        host = torch.empty((L, S, 3, E + 1), dtype=torch.int32,
                           pin_memory=self.dev.type == "cuda")
        for j in range(n):
            self._protocol_step(g, j, j, b)
        torch.cuda.synchronize()
        expected = ring.counts[:, :n].cpu()

        def probe(reader: Callable[[], Any]) -> tuple[float, bool, bool]:
            torch.cuda._sleep(int(sleep_ms * self.cpm))
            ring.mark_step_done()  # the flusher's copy is ordered after this event
            t0 = time.perf_counter()
            ev = reader()
            dt = (time.perf_counter() - t0) * 1e3
            pending = not ev.query()
            ev.synchronize()
            return dt, pending, torch.equal(host[:, 2 : 2 + n], expected)

        host.zero_()
        dt, pending, same = probe(lambda: ring.read_range(0, n, host[:, 2 : 2 + n]))
        out["read_range"] = {"host_ms": dt, "copy_pending_at_return": pending, "data_ok": same}

        def per_layer() -> torch.cuda.Event:  # the proposed fix (docs/gpu.md), for comparison
            side = ring._side_stream()
            side.wait_event(ring._last_step_event)
            with torch.cuda.stream(side):
                for layer in range(L):
                    host[layer, 2 : 2 + n].copy_(ring.counts[layer, 0:n], non_blocking=True)
                e = torch.cuda.Event()
                e.record(side)
            return e

        for j in range(n):  # read_range zeroed the slots it copied: the same steps again
            self._protocol_step(g, j, j, b)
        torch.cuda.synchronize()
        expected = ring.counts[:, :n].cpu()
        host.zero_()
        dt2, pending2, same2 = probe(per_layer)
        out["read_range_per_layer_copies"] = {"host_ms": dt2, "copy_pending_at_return": pending2,
                                              "data_ok": same2}
        self.report.check(f"{name} read_range is non-blocking", pending and same
                          and dt < 0.25 * sleep_ms, host_ms=dt, sleep_ms=sleep_ms,
                          copy_pending_at_return=pending, data_ok=same,
                          per_layer_variant_host_ms=dt2, per_layer_pending=pending2)
        # (b) the main stream never waits on the flush copy: queue a sleep before the copy on the
        # side stream, then run steps on other slots; they must finish while the copy is pending.
        # read_range is called from a second thread, as the flusher does, so that a copy that
        # blocks its caller cannot stall the steps issued here.
        torch.cuda.synchronize()
        t0, t1 = new_timing_event(), new_timing_event()
        t0.record()
        self._protocol_step(g, n, n, b)
        t1.record()
        t1.synchronize()
        # the copy must still be pending after the 3 steps below: sleep well past them
        side_ms = max(3 * sleep_ms, 2 * 3 * t0.elapsed_time(t1) + sleep_ms)
        out["side_sleep_ms"] = side_ms
        with torch.cuda.stream(ring._side_stream()):
            torch.cuda._sleep(int(side_ms * self.cpm))
        got: dict[str, Any] = {}
        th = threading.Thread(target=lambda: got.update(ev=ring.read_range(0, n, host[:, 2:2 + n])))
        th.start()
        time.sleep(0.002)  # let the flusher thread enqueue (or block in) its copy first
        for j in range(3):
            self._protocol_step(g, n + j, n + j, b)
        main_ev = torch.cuda.Event()
        main_ev.record()
        main_ev.synchronize()
        copy_pending = th.is_alive() or not got["ev"].query()
        th.join()
        torch.cuda.synchronize()
        out["main_finished_while_copy_pending"] = copy_pending
        self.report.check(f"{name} main stream never waits on the flush copy", copy_pending,
                          main_steps_done_while_copy_pending=copy_pending)
        # (c) the session with its flusher thread: exact totals vs the eager reference.
        out["session"] = self.check_session(name, g, ids, b)
        return out

    def _session_step(self, g: torch.cuda.CUDAGraph, step: int, b: int,
                      batch: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        sess = self.session
        sess.step_started()
        sess.step_prepared(batch[0], batch[1] >= batch[2], batch[1])
        self._load_input(step, b)
        g.replay()
        sess.step_finished()

    def check_session(
        self, name: str, g: torch.cuda.CUDAGraph, ids: list[torch.Tensor], b: int
    ) -> dict[str, Any]:
        sess, L, E = self.session, self.L, self.shape.num_experts
        sess.flush_interval_s = self.args.flush_interval  # flush continuously during this check
        if sess._thread is None:
            sess.start()
        self._free_all_slots()
        before = sess.totals.expert_tokens.copy()
        dropped0 = sess.totals.dropped_steps
        ref = torch.zeros((L, 3, E + 1), dtype=torch.int64)
        hist: list[tuple[list[torch.Tensor], np.ndarray]] = []
        batches = []
        for _ in range(16):
            n_real = int(self.rng.integers(max(1, b - b // 4), b + 1))
            batches.append(make_batch(self.rng, n_real))
        error = None
        steps = self.args.session_steps
        try:
            for c in range(0, steps, 3):  # the flusher runs too: sync debug mode is global
                with sync_debug("error"):
                    for j in range(c, min(c + 3, steps)):
                        bt = batches[j % len(batches)]
                        self._session_step(g, j, b, bt)
                        hist.append(([t.clone() for t in ids], bt[3]))
                torch.cuda.synchronize()
                for h, ph in hist:
                    ref += reference_counts(h, ph, E)
                hist.clear()
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
        torch.cuda.synchronize()
        sess.flush()
        got = sess.totals.expert_tokens - before
        dropped = sess.totals.dropped_steps - dropped0
        exact = np.array_equal(got, ref[:, :2, :E].numpy())
        ok = error is None and sess.enabled and not sess.errors and dropped == 0 and exact
        out = {"steps": steps, "error": error, "enabled": sess.enabled, "errors":
               dict(sess.errors), "dropped_steps": dropped, "totals_exact": exact}
        self.report.check(f"{name} session + flusher: totals exact, no faults under sync debug",
                          ok, **out)
        # Replay throughput: ring protocol without flushes vs the session with its flusher
        # copying continuously (flush_interval_s small), alternated.
        S = self.ring.layout.ring_steps
        e0, e1 = new_timing_event(), new_timing_event()
        nsteps = self.args.steps_per_round
        counter = [0]

        def arm(kind: str) -> float:
            torch.cuda._sleep(int(1.0 * self.cpm))
            e0.record()
            for _ in range(nsteps):
                k = counter[0]
                counter[0] += 1
                if kind == "session_flushing":
                    self._session_step(g, k, b, batches[k % len(batches)])
                else:
                    self.ring.begin_step(k % S, batches[k % len(batches)][3])
                    self._load_input(k, b)
                    g.replay()
                    self.ring.end_step()
                    self.ring.mark_step_done()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / nsteps

        # the ring-only arm writes slots the session has not read: keep them apart
        reads0 = sess._read
        per: dict[str, list[float]] = {"ring_no_flush": [], "session_flushing": []}
        folded0 = int(sess.totals.steps.sum())
        for r in range(self.args.rounds):
            for k in (per if r % 2 == 0 else reversed(list(per))):
                if k == "ring_no_flush":
                    torch.cuda.synchronize()
                    sess.flush()  # every session slot read: the ring arm may reuse any slot
                per[k].append(arm(k))
        torch.cuda.synchronize()
        sess.flush()
        flushes = sess._read - reads0
        m = {k: med(v) for k, v in per.items()}
        ratio = m["session_flushing"] / m["ring_no_flush"]
        out_tp = {"step_ms_median": m, "ratio": ratio, "steps_folded":
                  int(sess.totals.steps.sum()) - folded0, "session_steps_read": flushes,
                  "flush_interval_s": sess.flush_interval_s}
        self.report.check(f"{name} replay throughput unchanged with concurrent flushes",
                          ratio <= 1.01 and sess.enabled, ratio=ratio,
                          ring_ms=m["ring_no_flush"], session_ms=m["session_flushing"])
        out["throughput"] = out_tp
        out["device_step_time"] = self.check_device_step_time(name, g, b, batches)
        sess.flush_interval_s = 1.0  # production default while the other checks run
        return out

    # -- 6. step time from device events (the session's flushed durations) --------------------
    def check_device_step_time(self, name: str, g: torch.cuda.CUDAGraph, b: int,
                               batches: list[Any]) -> dict[str, Any]:
        """The session's step durations on CUDA come from the ring's per-slot event pairs
        (begin_step .. mark_step_done, outside the graph); their sum must match the span of the
        same steps timed outside (events around the whole run), while the host's own span of each
        step (what the recorder used before) times only the launch when the GPU runs behind."""
        sess = self.session
        torch.cuda.synchronize()
        sess.flush()
        d0, n0 = float(sess.totals.duration_s.sum()), int(sess.totals.steps.sum())
        e0, e1 = new_timing_event(), new_timing_event()
        steps = min(24, self.ring.layout.ring_steps // 2)
        host_ns = 0
        torch.cuda._sleep(int(self.args.probe_sleep_ms * self.cpm))  # the host runs ahead
        e0.record()
        for j in range(steps):
            t = time.perf_counter_ns()
            self._session_step(g, j, b, batches[j % len(batches)])
            host_ns += time.perf_counter_ns() - t
        e1.record()
        e1.synchronize()
        sess.flush()
        outer_ms = e0.elapsed_time(e1)
        dev_ms = (float(sess.totals.duration_s.sum()) - d0) * 1e3
        folded = int(sess.totals.steps.sum()) - n0
        ratio = dev_ms / outer_ms if outer_ms > 0 else float("nan")
        out = {"steps": steps, "steps_folded": folded, "outer_ms": outer_ms,
               "device_event_sum_ms": dev_ms, "ratio_device_over_outer": ratio,
               "host_span_sum_ms": host_ns / 1e6,
               "host_ratio_over_outer": host_ns / 1e6 / outer_ms if outer_ms > 0 else None}
        ok = folded == steps and 0.85 <= ratio <= 1.02
        self.report.check(f"{name} session step time from device events = outer span", ok,
                          steps=steps, folded=folded, outer_ms=outer_ms, device_ms=dev_ms,
                          ratio=ratio, host_span_ms=host_ns / 1e6)
        return out

    # -- 7. HBM bandwidth measured by the GPU (NVML GPM) against the bytes the block reads -------
    def check_gpm(self, b: int) -> dict[str, Any]:
        """GPM's DRAM bandwidth over a window of graph replays of the block with a KV-like read,
        against the bytes the block had to read in that window: router weights, the local experts
        each step's routing touched, the shared expert, the KV buffer. Activations are not in the
        model (listed apart); GPM counts reads and writes of the whole device."""
        from moe_reuse.plugin.reader import gpm as gpm_mod

        name = f"{self.shape.name} b={b}"
        props = torch.cuda.get_device_properties(self.dev)
        uuid = str(getattr(props, "uuid", "") or "") or None
        sampler = gpm_mod.GpmSampler(uuid=uuid)
        if sampler.reason == gpm_mod.DEVICE_NOT_FOUND and torch.cuda.device_count() == 1:
            sampler = gpm_mod.GpmSampler(index=0)  # the one GPU (UUID forms differ by version)
        out: dict[str, Any] = {"reason": sampler.reason, "detail": sampler.detail, "uuid": uuid,
                               "nvml_peak_bytes_per_second": sampler.peak_bytes_per_second,
                               "device_name": sampler.device_name}
        if not sampler.available:
            self.report.check(f"{name} GPM DRAM bandwidth vs bytes read", False,
                              reason=sampler.reason, detail=sampler.detail)
            return out
        s, L = self.shape, self.L
        rows = b * self.args.kv_context
        self.block.kv = [torch.randn((rows, s.kv_width), device=self.dev).to(torch.bfloat16)
                         for _ in range(min(L, 4))]  # layers cycle through them (>> L2 each)
        try:
            x = torch.zeros((b, s.hidden), device=self.dev, dtype=torch.bfloat16)
            self.x = x
            el = self.block.layers[0].local_experts
            touched = []  # per pool input: local experts touched, summed over layers
            for i in range(self.pool.shape[0]):
                self._load_input(i, b)
                _, ids = self.block(x, None)
                touched.append(el * L if self.args.impl_resolved == "bmm"  # reads them all
                               else sum(int(torch.unique(t % el).numel()) for t in ids))
            expert_b = 3 * s.hidden * s.intermediate * 2
            fixed = L * (s.num_experts * s.hidden * 2 + s.n_shared * expert_b
                         + rows * s.kv_width * 2)
            g, _ = capture_graph(lambda: self.block(x, None))
            e0, e1 = new_timing_event(), new_timing_event()
            e0.record()
            for i in range(5):
                self._load_input(i, b)
                g.replay()
            e1.record()
            e1.synchronize()
            step_ms = e0.elapsed_time(e1) / 5
            n = int(min(4000, max(8, self.args.gpm_window_s * 1e3 / max(step_ms, 1e-3))))
            torch.cuda.synchronize()
            sampler.sample()  # prime: the window starts here
            time.sleep(0.3)
            idle = sampler.sample()
            e0.record()
            for i in range(n):
                self._load_input(i, b)
                g.replay()
            e1.record()
            e1.synchronize()
            busy = sampler.sample()
            busy_ms = e0.elapsed_time(e1)
        finally:
            self.block.kv = None
        modelled = float(sum(fixed + touched[i % len(touched)] * expert_b for i in range(n)))
        acts = n * L * b * s.top_k * (2 * s.hidden + 3 * s.intermediate) * 2  # every pair runs
        sampler.close()
        if busy is None:
            self.report.check(f"{name} GPM DRAM bandwidth vs bytes read", False,
                              reason=sampler.reason, detail=sampler.detail)
            out.update(reason=sampler.reason, detail=sampler.detail)
            return out
        ratio = busy.bytes / modelled if modelled else float("nan")
        out.update({
            "steps": n, "step_ms": step_ms, "window_s": busy.window_seconds,
            "busy_ms": busy_ms, "gpm_utilization": busy.utilization_ratio,
            "gpm_bytes_per_second": busy.bytes_per_second, "gpm_bytes": busy.bytes,
            "modelled_bytes": modelled, "modelled_bytes_per_second_wall":
            modelled / busy.window_seconds, "modelled_bytes_per_second_busy":
            modelled / (busy_ms / 1e3), "ratio_gpm_over_modelled": ratio,
            "activation_bytes_estimate": acts, "kv_bytes_per_step": L * rows * s.kv_width * 2,
            "expert_bytes_per_step_mean": expert_b * float(np.mean(touched)),
            "idle_utilization": idle.utilization_ratio if idle is not None else None,
        })
        ok = 0.8 <= ratio <= 1.5
        self.report.check(
            f"{name} GPM DRAM bandwidth vs bytes read", ok, gpm_GBps=busy.bytes_per_second / 1e9,
            modelled_GBps_wall=modelled / busy.window_seconds / 1e9, ratio=ratio,
            gpm_util=busy.utilization_ratio, window_s=busy.window_seconds,
            idle_util=out["idle_utilization"])
        return out

    def close(self) -> None:
        self.session.close()


def self_test_impl(dev: torch.device) -> tuple[str, dict[str, Any]]:
    """Pick the expert-compute implementation that is correct on this GPU (small shapes)."""
    shape = MoEShape("selftest", 256, 16, 4, 128, "sigmoid_grouped", n_group=4, topk_group=2,
                     n_shared=1, routed_scaling=2.5)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    info: dict[str, Any] = {}
    x = torch.randn((24, shape.hidden), device=dev, generator=gen).to(torch.bfloat16)
    for impl in ("grouped_mm", "bmm"):
        try:
            gen.manual_seed(1)
            layer = MoELayer(shape, ep=2, max_tokens=24, device=dev, dtype=torch.bfloat16,
                             generator=gen, impl=impl, capacity_factor=1e9)
            got, _ = layer(x, None)
            ref = reference_moe(layer, x)
            err = float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            info[impl] = {"rel_err": err}
            if dev.type == "cuda":  # must also run without host syncs and replay in a graph
                with sync_debug("error"):
                    layer(x, None)
                g, (static_out, _) = capture_graph(lambda layer=layer: layer(x, None))
                g.replay()
                torch.cuda.synchronize()
                info[impl]["graph_matches_eager"] = bool(torch.equal(static_out, got))
            if err < 3e-2:
                return impl, info
        except Exception as exc:  # noqa: BLE001
            info[impl] = {"error": repr(exc)}
    raise RuntimeError(f"no expert-compute implementation passed the self-test: {info}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="a CUDA device (cuda, cuda:N); no CPU")
    ap.add_argument("--quick", action="store_true", help="batches 1, 64, 512 and fewer rounds")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--batches", default="", help="comma list (default 1..512, powers of 2)")
    ap.add_argument("--layers", default="4",
                    help="MoE layers in the block, or 'real' (the model's MoE layer count)")
    ap.add_argument("--weight-sets", type=int, default=8,
                    help="distinct expert-weight sets the layers after the first cycle through")
    ap.add_argument("--ep", type=int, default=8, help="expert-parallel size modelled (see doc)")
    ap.add_argument("--impl", choices=("auto", "grouped_mm", "bmm"), default="auto")
    ap.add_argument("--replays", type=int, default=0, help="count-check replays per batch")
    ap.add_argument("--rounds", type=int, default=0, help="A/B rounds per batch")
    ap.add_argument("--steps-per-round", type=int, default=0)
    ap.add_argument("--probe-sleep-ms", type=float, default=20.0)
    ap.add_argument("--flush-interval", type=float, default=0.005,
                    help="flusher period in the flush checks (s); production default is 1.0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpm-batches", default="64,512",
                    help="batches of the GPM bandwidth check (empty: none)")
    ap.add_argument("--gpm-window-s", type=float, default=1.0)
    ap.add_argument("--kv-context", type=int, default=2048,
                    help="context tokens per sequence of the KV-like read (GPM check)")
    ap.add_argument("--out", default="gpu_recorder_check.json")
    args = ap.parse_args(argv)
    q = args.quick
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.model_list:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; known: {list(MODELS)}")
    args.batches = (tuple(int(v) for v in args.batches.split(",") if v.strip())
                    or (QUICK_BATCHES if q else DEFAULT_BATCHES))
    args.replays = args.replays or (24 if q else 96)
    args.rounds = args.rounds or (6 if q else 16)
    args.steps_per_round = args.steps_per_round or (10 if q else 25)
    args.timing_reps = 10 if q else 30
    args.sync_chunks = 4 if q else 10
    args.session_steps = 30 if q else 90
    args.inputs = 16
    args.gpm_batch_list = [int(v) for v in args.gpm_batches.split(",") if v.strip()]
    fb = [b for b in args.batches if b >= OVERHEAD_TARGET_MIN_BATCH]
    args.flush_batches = {min(fb), max(fb)} if fb else {max(args.batches)}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    return run_all(args, dev)


def run_all(args: argparse.Namespace, dev: torch.device) -> int:
    report = Report()
    impl_info: dict[str, Any] = {}
    if args.impl == "auto":
        args.impl_resolved, impl_info = self_test_impl(dev)
    else:
        args.impl_resolved = args.impl
    props = torch.cuda.get_device_properties(dev)
    summary: dict[str, Any] = {
        "issue": 18, "quick": args.quick,
        "env": {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": props.name,
                "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                "python": platform.python_version()},
        "config": {"layers": args.layers, "ep": args.ep, "batches": list(args.batches),
                   "impl": args.impl_resolved, "impl_selftest": impl_info,
                   "replays": args.replays, "rounds": args.rounds,
                   "steps_per_round": args.steps_per_round, "weight_sets": args.weight_sets,
                   "moe_layers": {m: (MODELS[m].moe_layers if args.layers == "real"
                                      else int(args.layers)) for m in args.model_list}},
        "models": {},
    }
    print(f"GPU {props.name} torch {torch.__version__}; expert compute: {args.impl_resolved}; "
          f"layers {args.layers}, ep {args.ep}, batches {list(args.batches)}", flush=True)
    t_start = time.time()

    def save() -> None:  # after every batch: a run cut short still leaves its results
        summary["checks"] = report.checks
        summary["wall_s"] = time.time() - t_start
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))

    for model in args.model_list:
        run = ModelRun(args, MODELS[model], report)
        summary["models"][model] = run.results
        try:
            for b in args.batches:
                print(f"== {model} batch {b} (+{time.time() - t_start:.0f} s)", flush=True)
                try:
                    run.results["batches"][str(b)] = run.run_batch(b)
                except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported
                    report.check(f"{model} b={b} run", False, error=repr(exc))
                    run.results["batches"][str(b)] = {"crash": repr(exc)}
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                save()
            gpm: dict[str, Any] = {}
            for b in [v for v in args.gpm_batch_list if v <= run.max_b]:
                print(f"== {model} GPM bandwidth, batch {b}", flush=True)
                try:
                    gpm[str(b)] = run.check_gpm(b)
                except Exception as exc:  # noqa: BLE001
                    report.check(f"{model} b={b} GPM run", False, error=repr(exc))
                    gpm[str(b)] = {"crash": repr(exc)}
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                run.results["gpm"] = gpm
                save()
        finally:
            run.close()
        summary["models"][model] = run.results
        del run
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    overhead = []
    for model, res in summary["models"].items():
        for b, r in res["batches"].items():
            o = r.get("overhead")
            if o:
                overhead.append({"model": model, "batch": int(b), "ratio": o["ratio_rec_over_base"],
                                 "count_impl": o.get("count_impl"),
                                 "ratio_torch_ops": o.get("ratio_rec_torch_over_base"),
                                 "in_graph_us_per_layer": o.get("in_graph_us_per_layer"),
                                 "protocol_us_per_step": o.get("protocol_us_per_step"),
                                 "overhead_pct": o["overhead_pct"], "target_met": o["target_met"]})
    summary["overhead_table"] = overhead
    summary["checks"] = report.checks
    summary["all_checks_passed"] = all(c["ok"] for c in report.checks) and bool(report.checks)
    summary["overhead_target_met"] = all(o["target_met"] is not False for o in overhead)
    summary["wall_s"] = time.time() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    print("\noverhead (recording / baseline, median step time of the MoE block):")
    for o in overhead:
        flag = "" if o["target_met"] is None else (" ok" if o["target_met"] else " MISSED")
        rt = o["ratio_torch_ops"]
        print(f"  {o['model']:14s} b={o['batch']:4d}  {o['overhead_pct']:+.3f}%{flag}"
              f"  ({o['count_impl']}; torch ops {100 * (rt - 1) if rt else nan:+.3f}%; in graph "
              f"{o['in_graph_us_per_layer']:.2f} us/layer, protocol "
              f"{o['protocol_us_per_step']:.1f} us/step)")
    failed = [c["name"] for c in report.checks if not c["ok"]]
    print(f"\n{len(report.checks) - len(failed)}/{len(report.checks)} checks passed; "
          f"overhead target {'met' if summary['overhead_target_met'] else 'MISSED'}; "
          f"summary written to {args.out}")
    if failed:
        print("failed: " + "; ".join(failed))
        return 1
    return 0 if summary["overhead_target_met"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
