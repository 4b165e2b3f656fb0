"""The recorder's own cost on the CPU, torch only (no vLLM), side by side in one run.

Three figures, the first two printed as ratios against the work they ride on:

1. In the forward: a toy MoE block (router softmax top-k + per-expert gated FFN, shapes of the
   bundled tiny models or larger) compiled with torch.compile, with and without the recorder's
   capture op in each layer, alternated (A B A B ...); the ratio of the best times.
2. Off the forward, per step: the host protocol the seam runs around every step
   (`step_started`, `step_prepared`, `step_finished`, plus the amortised flush), best of 7,
   against the decode step time of the same toy block.
3. Single calls of the kind the protocol makes (a numpy reduction against a bytes search, numpy
   item writes against memoryview ones), each timed as the first call after a forward and in a
   loop: after a forward every call pays for caches the forward evicted, numpy's machinery most.

    python benchmarks/bench_recorder.py [--layers 4] [--experts 8] [--top-k 2] [--hidden 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch

from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession


class ToyMoe(torch.nn.Module):
    def __init__(self, layers: int, experts: int, top_k: int, hidden: int, inter: int,
                 session: RecorderSession | None) -> None:
        super().__init__()
        self.top_k = top_k
        self.gates = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, hidden) * 0.02) for _ in range(layers)])
        self.w13 = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.02) for _ in range(layers)])
        self.w2 = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, hidden, inter) * 0.02) for _ in range(layers)])
        self.captures = [session.capture_fn(i) for i in range(layers)] if session else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.gates)):
            probs = torch.softmax(x @ self.gates[i].t(), dim=-1)
            w, ids = torch.topk(probs, self.top_k, dim=-1)
            if self.captures is not None:
                self.captures[i](ids)
            # dense evaluation of the chosen experts (gather their weights per token)
            h = torch.einsum("th,tkih->tki", x, self.w13[i][ids])
            g, u = h.chunk(2, dim=-1)
            y = torch.einsum("tki,tkhi->tkh", torch.nn.functional.silu(g) * u, self.w2[i][ids])
            x = x + (w.unsqueeze(-1) * y).sum(dim=1)
        return x


def best_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L, E, k, B = args.layers, args.experts, args.top_k, args.batch
    layout = RingLayout(L, E, k, max_tokens=8192, ring_steps=RingLayout.auto_ring_steps(L, E))
    session = RecorderSession(
        layout, ByteModel((1,) * L), labels={"model": "toy", "engine": "0", "rank": "0"}, info={},
        layer_ids=list(range(L)), publish=lambda _s: None, flush_interval_s=1e9)
    plain = ToyMoe(L, E, k, args.hidden, args.inter, None)
    recorded = ToyMoe(L, E, k, args.hidden, args.inter, session)
    recorded.load_state_dict(plain.state_dict())
    # the batch dimension dynamic, as vLLM compiles its forward (one graph for every batch size)
    fns = {"plain": torch.compile(plain), "recorded": torch.compile(recorded)}
    x = torch.randn(B, args.hidden)
    torch._dynamo.mark_dynamic(x, 0)
    sched = np.ones(B, dtype=np.int32)
    computed = np.full(B, 100, dtype=np.int32)
    prompt = np.full(B, 16, dtype=np.int32)

    def recorded_step() -> None:  # the recorder's step protocol around the forward, as in vLLM
        session.step_started()
        session.step_prepared(sched, computed >= prompt, computed)
        fns["recorded"](x)
        session.step_finished()

    with torch.no_grad():
        for fn in fns.values():  # compile and warm up
            for _ in range(3):
                fn(x)
        for _ in range(3):
            recorded_step()
        session.flush()
        times: dict[str, float] = {"plain": float("inf"), "recorded": float("inf")}
        for _ in range(args.rounds):  # alternated
            times["plain"] = min(times["plain"], best_time(lambda: fns["plain"](x), 50))
            times["recorded"] = min(times["recorded"], best_time(lambda: fns["recorded"](x), 50))
        session.flush()

        def host_protocol() -> None:
            for i in range(1000):
                session.step_started()
                session.step_prepared(sched, computed >= prompt, computed)
                session.step_finished()
                if i % 100 == 99:
                    session.flush()

        host = best_time(host_protocol, args.rounds) / 1000

        # the same protocol between forwards, as the engine runs it: each numpy call then runs
        # with caches the forward has just evicted, several times slower than in a tight loop
        def interleaved(with_protocol: bool) -> float:
            n = 200
            t0 = time.perf_counter()
            for i in range(n):
                if with_protocol:
                    recorded_step()
                    if i % 100 == 99:
                        session.flush()
                else:
                    fns["recorded"](x)
            return (time.perf_counter() - t0) / n

        inter: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3 * args.rounds):
            for flag in (False, True):
                inter[flag].append(interleaved(flag))
        between = statistics.median(inter[True]) - statistics.median(inter[False])
        calls = time_calls(lambda: fns["plain"](x), B)
    print(f"toy MoE block: {L} layers, {E} experts, top-{k}, hidden {args.hidden}, batch {B}, "
          f"{args.threads} thread(s), torch.compile (batch dimension dynamic)")
    print(f"forward without recorder {times['plain'] * 1e6:8.1f} us, with capture ops "
          f"{times['recorded'] * 1e6:8.1f} us: ratio {times['recorded'] / times['plain']:.4f}")
    print(f"host protocol per step (incl. amortised flush) {host * 1e6:.1f} us = "
          f"{100 * host / times['plain']:.2f}% of this toy step; on vLLM's measured decode steps "
          f"see benchmarks/bench_overhead.py")
    print(f"host protocol per step between forwards (median of {3 * args.rounds} runs of 200 "
          f"steps, alternated with the forward alone): {between * 1e6:.1f} us = "
          f"{100 * between / times['plain']:.2f}% of this toy step")
    print("one call, right after a forward / in a loop (median us): why the protocol counts calls")
    for name, (cold, warm) in calls.items():
        print(f"  {name:44s} {cold:6.2f} / {warm:5.2f}")
    return 0


def time_calls(forward: Any, batch: int, n: int = 300) -> dict[str, tuple[float, float]]:
    """Single operations of the kind the step protocol makes, each timed as the first call
    after a compiled forward (caches evicted) and in a tight loop."""
    flags = np.ones(batch, dtype=bool)
    arr = np.zeros(64, dtype=np.int64)
    view = memoryview(arr)  # what ring.elements returns
    ops = {
        "numpy reduction (flags.all())": lambda: bool(flags.all()),
        "bytes search (0 not in flags as bytes)": lambda: 0 not in memoryview(flags).tobytes(),
        "numpy item write x2": lambda: arr.__setitem__(1, 5) or arr.__setitem__(2, 7),
        "memoryview item write x2": lambda: view.__setitem__(1, 5) or view.__setitem__(2, 7),
    }
    out = {}
    for name, op in ops.items():
        cold, warm = [], []
        for _ in range(n):
            forward()
            t0 = time.perf_counter_ns()
            op()
            cold.append(time.perf_counter_ns() - t0)
        for _ in range(n):
            t0 = time.perf_counter_ns()
            op()
            warm.append(time.perf_counter_ns() - t0)
        out[name] = (statistics.median(cold) / 1e3, statistics.median(warm) / 1e3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
