"""Overhead of the recorder on decode throughput, measured side by side in one run.

Two real vLLM servers serve the same tiny MoE checkpoint with the same settings, one with the
plugin (`--additional-config '{"moe_reuse": {}}'`) and one without. Both stay up; load waves
alternate between them (A B A B ...) so drift on this shared machine hits both alike, and only one
server is loaded at a time. Each wave: N concurrent requests with random prompts and a fixed
output length (ignore_eos); decode throughput = generated tokens / wave wall time.
Prints per-wave figures, medians, ranges and the ratio plugin/baseline.

    python benchmarks/bench_overhead.py [--model qwen3-moe] [--waves 6] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

from moe_reuse.plugin.harness.server import VllmServer, random_prompts, run_concurrent
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts


def wave(url: str, vocab: int, n: int, out_tokens: int, seed: int) -> float:
    prompts = random_prompts(n, 16, vocab, seed=seed)
    t0 = time.perf_counter()
    res = run_concurrent(url, [(p, out_tokens) for p in prompts], concurrency=n)
    dt = time.perf_counter() - t0
    return sum(r["usage"]["completion_tokens"] for r in res) / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-moe")
    ap.add_argument("--waves", type=int, default=6, help="waves per server (alternated)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-tokens", type=int, default=96)
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    facts = model_facts(args.model)
    path = build_model(args.model)
    servers = {
        "plugin": VllmServer(path, enforce_eager=args.eager, additional_config={"moe_reuse": {}}),
        "baseline": VllmServer(path, enforce_eager=args.eager),
    }
    try:
        for name, srv in servers.items():
            print(f"starting {name} server ...", flush=True)
            srv.start()
        for srv in servers.values():  # warm both (first requests pay one-off costs)
            wave(srv.url, facts.vocab_size, args.concurrency, 8, seed=0)
        results: dict[str, list[float]] = {k: [] for k in servers}
        for i in range(args.waves):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                tps = wave(servers[name].url, facts.vocab_size, args.concurrency,
                           args.output_tokens, seed=100 + i)
                results[name].append(tps)
                print(f"wave {i} {name:8s} {tps:8.1f} tok/s", flush=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in results.items():
            print(f"{k:8s} median {med[k]:8.1f} tok/s  range {min(v):.1f}-{max(v):.1f}")
        ratio = med["plugin"] / med["baseline"]
        print(f"decode throughput ratio plugin/baseline = {ratio:.4f}  "
              f"(overhead {100 * (1 - ratio):+.2f}%; target <= 2%)")
    finally:
        for srv in servers.values():
            srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
