"""What a streaming client sees with vLLM's default placement of its processes, and with the
engine's cores apart from the front end's (`harness/cpus.py`), side by side on one server.

One server (the bundled tiny MoE, compiled, default placement at start). Rounds alternate the
placement: `default` (the engine core, the API server and this client free on every core; vLLM
binds only its worker) and `split` (`split_engine_cpus`: the engine core on the worker's cores, the
API server and this client on the others). Each round drives every level with streamed requests
(the shared load generator) and prints, per level, how many requests arrived in one read (the API
server starved while the engine produced the whole response, and vLLM coalesced it), the
inter-token gaps the client timed, and their P50 and P99.

    flock /tmp/moe-reuse-vllm.lock python benchmarks/bench_cpu_split.py [--rounds 3]

Last run: benchmarks/results/bench_cpu_split.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from moe_reuse.plugin.harness.cpus import group_processes, split_engine_cpus
from moe_reuse.plugin.harness.load import (
    latency_percentiles,
    random_prompts,
    run_concurrent_streamed,
)
from moe_reuse.plugin.harness.server import VllmServer
from moe_reuse.plugin.harness.tiny_models import build_model


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def unsplit(pgid: int, cpus: frozenset[int]) -> None:
    """Back to vLLM's own placement: every thread the worker's binding did not pin, on every core."""
    for name, threads in group_processes(pgid).values():
        if not name.startswith("VLLM::Worker"):
            for tid in threads:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)
    os.sched_setaffinity(0, cpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-moe")
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument("--rounds", type=int, default=3, help="default then split, this many times")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    model_dir = build_model(args.model, progress=say)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    every = frozenset(os.sched_getaffinity(0))
    rows = []
    with VllmServer(model_dir, max_num_seqs=max(levels)).start(say) as srv:
        assert srv.pid is not None
        warm = random_prompts(16, 32, vocab, seed=1)
        run_concurrent_streamed(srv.url, [(p, args.output_len) for p in warm], 16,
                                model=srv.served_model_name)
        print(f"{'round':>5} {'placement':>9} {'conc':>5} | {'whole responses':>15} | "
              f"{'gaps':>6} {'ITL P50 ms':>10} {'ITL P99 ms':>10}")
        for rnd in range(args.rounds):
            for placement in ("default", "split"):
                split = None
                if placement == "split":
                    split = split_engine_cpus(srv.pid)
                    if split is None:
                        raise SystemExit("no split on this host: vLLM bound its worker to no "
                                         "subset of the cores")
                    os.sched_setaffinity(0, split.frontend)
                else:
                    unsplit(srv.pid, every)
                for c in levels:
                    n = c * max(3, 1000 // ((args.output_len - 1) * c))
                    prompts = random_prompts(n, 32, vocab, seed=100 + c + rnd)
                    res = run_concurrent_streamed(srv.url, [(p, args.output_len) for p in prompts],
                                                  c, model=srv.served_model_name)
                    lat = latency_percentiles(res)
                    whole = sum(1 for r in res if not r["itl_seconds"])
                    rows.append({"round": rnd, "placement": placement, "concurrency": c,
                                 "requests": len(res), "whole_responses": whole,
                                 "gaps": int(lat["itl_samples"]),
                                 "itl_p50_seconds": lat["itl_p50_seconds"],
                                 "itl_p99_seconds": lat["itl_p99_seconds"]})
                    print(f"{rnd:>5} {placement:>9} {c:>5} | {whole:>6} of {len(res):>5} | "
                          f"{int(lat['itl_samples']):>6} {lat['itl_p50_seconds'] * 1e3:>10.2f} "
                          f"{lat['itl_p99_seconds'] * 1e3:>10.2f}", flush=True)
        unsplit(srv.pid, every)
    for placement in ("default", "split"):
        mine = [r for r in rows if r["placement"] == placement]
        print(f"{placement}: {sum(r['whole_responses'] for r in mine)} of "
              f"{sum(r['requests'] for r in mine)} requests arrived whole; levels with any: "
              f"{sum(1 for r in mine if r['whole_responses'])} of {len(mine)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
