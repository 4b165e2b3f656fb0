"""The hot path under torch.compile and CUDA graphs on a GPU (issue 18).

vLLM compiles the model with torch.compile and replays CUDA graphs; the recorder's capture must
neither break the graph nor miscount there. This compiles a two-layer routing function that calls
`RoutingRing.capture` (fullgraph=True: a graph break is an error), in the default mode and in
"reduce-overhead" (CUDA graphs), with the ring's CUDA path (the Triton kernel when eager; the torch
ops, fused by Inductor, when traced), steps it with fresh inputs and compares every step's ring slot
with an eager torch.bincount of the same routing.

    python benchmarks/gpu_compile_check.py --out $OUT/gpu_compile_check.json

Exit status: 0 all exact; 1 a mismatch or a compile failure; 2 no CUDA device (--device cpu runs
the same on the CPU, for the logic).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_recorder_check import import_recorder, make_batch, reference_counts  # noqa: E402


def run_mode(dev: torch.device, mode: str | None, steps: int, E: int = 64, K: int = 8,
             H: int = 256, B: int = 32) -> dict[str, Any]:
    ring_mod, _, _ = import_recorder()
    L = 2
    ring = ring_mod.RoutingRing(ring_mod.RingLayout(L, E, K, max_tokens=B, ring_steps=8), dev)
    gates = [torch.randn(E, H, device=dev) / H**0.5 for _ in range(L)]

    def route(x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = x
        for layer in range(L):
            ids = (h @ gates[layer].t()).softmax(-1).topk(K, dim=-1).indices
            ring.capture(layer, ids)
            out.append(ids)
            h = h + 0.1 * torch.tanh(h)
        return out

    fn = route if mode == "eager" else torch.compile(route, fullgraph=True, mode=mode)
    rng = np.random.default_rng(0)
    x = torch.zeros(B, H, device=dev)
    mismatched, error = 0, None
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            phases = make_batch(rng, int(rng.integers(B // 2, B + 1)))[3]
            slot = step % ring.layout.ring_steps
            ring.begin_step(slot, phases)
            x.copy_(torch.randn(B, H, device=dev))
            ids = fn(x)
            ring.end_step()
            ids = [t.clone() for t in ids]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ref = reference_counts(ids, phases, E)
            if not torch.equal(ring.counts[:, slot].to("cpu", torch.int64), ref):
                mismatched += 1
            ring.clear_slot(slot)  # read here, not flushed: free it as the flusher would
    except Exception as exc:  # noqa: BLE001 - reported
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    impl = ring.count_impl if mode == "eager" else "traced: torch ops, fused by Inductor"
    return {"mode": mode or "default", "count_impl": impl, "steps": steps,
            "mismatched": mismatched, "error": error, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="gpu_compile_check.json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (issue 18)", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    modes = ["eager", None] + (["reduce-overhead"] if dev.type == "cuda" else [])
    results = []
    for mode in modes:
        torch._dynamo.reset()
        r = run_mode(dev, mode, args.steps)
        ok = r["error"] is None and r["mismatched"] == 0
        r["ok"] = ok
        results.append(r)
        print(f"[{'PASS' if ok else 'FAIL'}] capture under {r['mode']} ({r['count_impl']} path): "
              f"{r['steps']} steps, {r['mismatched']} mismatched, error={r['error']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "results": results},
                                         indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
