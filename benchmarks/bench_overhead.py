"""Overhead of the plugin on decode throughput, measured side by side in one run.

Two real vLLM servers serve the same tiny MoE checkpoint with the same settings, one with the
plugin (`--additional-config '{"moe_reuse": {}}'`: recorder, flusher, live comparison) and one
without. Both stay up; load waves alternate between them (A B, B A, A B, ...) so drift on this
shared machine hits both alike. Only one server runs at a time: the other is paused (SIGSTOP of
its process group), because an idle vLLM worker wakes now and then and spins for about a second,
which would land on the other server's wave. Each wave: N concurrent requests with random-token
prompts and a fixed output length (ignore_eos).

Two figures per wave, each compared as plugin/baseline:
- decode throughput = generated tokens / wave wall time (what users see);
- CPU seconds per generated token, summed over every process of the server (API server, engine
  core, workers), from /proc, also printed per process role (where the cost lands). Co-tenants
  of a shared machine change wall time far more than the CPU time the server itself needs, so
  this is the steadier measure of the plugin's own cost.
Reported: the ratio of the medians and the median of the per-pair ratios (each plugin wave
against the baseline wave next to it, which cancels slow drift) with its interquartile range.
The whole experiment runs twice, once with each server started first, and the overhead is the
geometric mean of the two: on this machine the server started first was consistently about 5%
slower, which one order alone would book as overhead (or hide). `--aa` runs both servers without
the plugin: a self-check of the method (ratios must read 1).

`--ablation` attributes the cost: one baseline server (no plugin) stays up, and against it, one at
a time, servers with more and more of the plugin (`MOE_REUSE_ABLATE`, see worker_runtime): `aa`
(no plugin: the A/A floor), `capture` (routing hooks only), `protocol` (+ the host step protocol
and collective timing), `copy` (+ the flusher's device-to-host copy), `whole` (+ folding, live
comparison, snapshots, exporters). Every arm is started after the baseline, as the A/A arm is, so
the start-order effect is the same in each and the A/A arm measures it; each arm's cost is read
against the A/A floor (arm ratio / A/A ratio), and each step's share as the difference from the
arm before it. Results are also written as JSON (`--json`).

    python benchmarks/bench_overhead.py [--model qwen3-moe] [--waves 24] [--concurrency 16]
    python benchmarks/bench_overhead.py --ablation [--model big-moe] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

from moe_reuse.plugin.harness.load import random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts

TICK = os.sysconf("SC_CLK_TCK")


def role_of(comm: str) -> str:
    """vLLM names its processes (`VLLM::EngineCore`, `VLLM::Worker...`); the rest is the API server."""
    if comm.startswith("VLLM::EngineCor"):
        return "engine_core"
    if comm.startswith("VLLM::Worker"):
        return "worker"
    return "api_server"


def group_cpu_seconds(pgid: int) -> dict[str, float]:
    """User + system CPU seconds of every live process in a process group (Linux /proc), by role."""
    total: dict[str, float] = {"api_server": 0.0, "engine_core": 0.0, "worker": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, IndexError, ValueError):
            continue
        fields = rest.split()
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            total[role_of(name)] += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


ITL = "vllm:inter_token_latency_seconds"


def wave(srv: VllmServer, vocab: int, n: int, out_tokens: int, seed: int
         ) -> tuple[float, float, dict[str, float], float]:
    """(generated tokens per second, server CPU seconds per generated token, the same by process
    role, the engine's mean time between decode steps) of one wave. The last is vLLM's own
    inter-token latency (engine-core timestamps, read from /metrics before and after the wave):
    it leaves out the client, the API server and the requests' arrival, which on two cores move
    a wave's wall time far more than the plugin does."""
    prompts = random_prompts(n, 16, vocab, seed=seed)
    assert srv.pid is not None
    m0 = srv.metrics_text()
    c0, t0 = group_cpu_seconds(srv.pid), time.perf_counter()
    res = run_concurrent(srv.url, [(p, out_tokens) for p in prompts], concurrency=n)
    dt, c1 = time.perf_counter() - t0, group_cpu_seconds(srv.pid)
    m1 = srv.metrics_text()
    tokens = sum(r["usage"]["completion_tokens"] for r in res)
    by_role = {k: (c1[k] - c0[k]) / tokens for k in c1}
    gaps = metric_value(m1, ITL + "_count") - metric_value(m0, ITL + "_count")
    itl = (metric_value(m1, ITL + "_sum") - metric_value(m0, ITL + "_sum")) / gaps if gaps else math.nan
    return tokens / dt, sum(by_role.values()), by_role, itl


def summary(name: str, pairs: list[float], a: list[float], b: list[float], unit: str) -> str:
    q = statistics.quantiles(pairs, n=4) if len(pairs) >= 2 else [pairs[0]] * 3
    return (f"{name}: plugin median {statistics.median(a):.6g} {unit}, baseline "
            f"{statistics.median(b):.6g} {unit}; ratio of medians "
            f"{statistics.median(a) / statistics.median(b):.4f}; median pair ratio "
            f"{statistics.median(pairs):.4f} (IQR {q[0]:.3f}-{q[2]:.3f})")


def alternate(a: VllmServer, b: VllmServer, args: argparse.Namespace, vocab: int, label: str,
              ) -> dict[str, Any]:
    """Waves alternated A B, B A, ... between two started, paused servers; per-wave figures and
    the median pair ratios (a over b)."""
    tps: dict[str, list[float]] = {"a": [], "b": []}
    cpt: dict[str, list[float]] = {"a": [], "b": []}
    itl: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(args.waves):
        for name, srv in (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a)):
            srv.resume()
            time.sleep(0.3)  # let it settle after SIGCONT
            r, c, _, g = wave(srv, vocab, args.concurrency, args.output_tokens, seed=100 + i)
            srv.pause()
            tps[name].append(r)
            cpt[name].append(c)
            itl[name].append(g)
        print(f"  {label} wave {i:2d}: {tps['a'][-1]:7.1f} vs {tps['b'][-1]:7.1f} tok/s, "
              f"ratio {tps['a'][-1] / tps['b'][-1]:.3f}; engine step {itl['a'][-1] * 1e3:.3f} vs "
              f"{itl['b'][-1] * 1e3:.3f} ms, ratio {itl['b'][-1] / itl['a'][-1]:.3f}", flush=True)
    tp = [x / y for x, y in zip(tps["a"], tps["b"])]
    cp = [x / y for x, y in zip(cpt["a"], cpt["b"])]
    sp = [y / x for x, y in zip(itl["a"], itl["b"]) if x > 0 and y > 0] or [math.nan]  # b/a
    q = statistics.quantiles(tp, n=4) if len(tp) >= 2 else [tp[0]] * 3
    qs = statistics.quantiles(sp, n=4) if len(sp) >= 2 else [sp[0]] * 3
    return {"throughput_ratio": statistics.median(tp), "throughput_iqr": [q[0], q[2]],
            "cpu_per_token_ratio": statistics.median(cp),
            "step_speed_ratio": statistics.median(sp), "step_speed_iqr": [qs[0], qs[2]],
            "step_seconds": statistics.median(itl["a"]),
            "baseline_step_seconds": statistics.median(itl["b"]),
            "tok_per_s": statistics.median(tps["a"]), "baseline_tok_per_s": statistics.median(tps["b"])}


ARMS = ("aa", "capture", "protocol", "copy", "whole")


def run_ablation(args: argparse.Namespace, path: Any, vocab: int) -> dict[str, Any]:
    common = {"enforce_eager": args.eager, "max_num_seqs": max(args.concurrency, 16)}
    base = VllmServer(path, **common)
    out: dict[str, Any] = {}
    try:
        print("starting the baseline server ...", flush=True)
        base.start()
        wave(base, vocab, args.concurrency, 16, seed=0)
        base.pause()
        for arm in args.arms.split(","):
            if arm not in ARMS:
                raise SystemExit(f"--arms: {arm!r} is not one of {', '.join(ARMS)}")
            env = {"MOE_REUSE_ABLATE": arm} if arm not in ("aa", "whole") else {}
            cfg = None if arm == "aa" else {"moe_reuse": json.loads(args.plugin_config)}
            srv = VllmServer(path, additional_config=cfg, env=env, **common)
            try:
                print(f"starting arm {arm} ...", flush=True)
                srv.start()
                wave(srv, vocab, args.concurrency, 16, seed=0)
                srv.pause()
                out[arm] = alternate(srv, base, args, vocab, arm)
            finally:
                srv.stop()
    finally:
        base.stop()
    floor = out.get("aa", {}).get("throughput_ratio", 1.0)
    cfloor = out.get("aa", {}).get("cpu_per_token_ratio", 1.0)
    print(f"\nmodel {args.model}, {'eager' if args.eager else 'compiled'}, concurrency "
          f"{args.concurrency}, {args.output_tokens} tokens per request, {args.waves} waves per arm")
    sfloor = out.get("aa", {}).get("step_speed_ratio", 1.0)
    print(f"{'arm':9s} {'tput ratio':>10s} {'IQR':>13s} {'vs A/A':>7s} {'cost':>7s} {'step':>7s}"
          f" {'CPU/tok':>8s} {'vs A/A':>7s} {'engine step speed (IQR)':>24s} {'vs A/A':>7s}")
    prev = 0.0
    for arm, r in out.items():
        rel = r["throughput_ratio"] / floor
        cost = 100 * (1 - rel)
        r.update({"vs_aa": rel, "cost_percent": cost, "step_percent": cost - prev,
                  "cpu_vs_aa": r["cpu_per_token_ratio"] / cfloor,
                  "step_vs_aa": r["step_speed_ratio"] / sfloor})
        print(f"{arm:9s} {r['throughput_ratio']:10.4f} {r['throughput_iqr'][0]:6.3f}-"
              f"{r['throughput_iqr'][1]:6.3f} {rel:7.4f} {cost:+6.2f}% {cost - prev:+6.2f}% "
              f"{r['cpu_per_token_ratio']:8.4f} {r['cpu_vs_aa']:7.4f} "
              f"{r['step_speed_ratio']:8.4f} ({r['step_speed_iqr'][0]:.3f}-"
              f"{r['step_speed_iqr'][1]:.3f}) {r['step_vs_aa']:7.4f}")
        if arm != "aa":
            prev = cost
    return {"model": args.model, "eager": args.eager, "concurrency": args.concurrency,
            "output_tokens": args.output_tokens, "waves": args.waves, "arms": out}


def run_once(args: argparse.Namespace, path: Any, vocab: int, swap: bool
             ) -> tuple[float, float, float]:
    """One alternated experiment; returns the median pair ratios (throughput, CPU per token,
    engine step speed: baseline step time / plugin step time)."""
    common = {"enforce_eager": args.eager, "max_num_seqs": max(args.concurrency, 16)}
    plugin_cfg = None if args.aa else {"moe_reuse": json.loads(args.plugin_config)}
    servers = {
        "plugin": VllmServer(path, additional_config=plugin_cfg, **common),
        "baseline": VllmServer(path, **common),
    }
    start_order = list(reversed(servers)) if swap else list(servers)
    try:
        for name in start_order:
            print(f"starting {name} server ...", flush=True)
            servers[name].start()
        for srv in servers.values():  # warm both (first requests pay one-off costs)
            wave(srv, vocab, args.concurrency, 16, seed=0)
            srv.pause()
        tps: dict[str, list[float]] = {k: [] for k in servers}
        cpt: dict[str, list[float]] = {k: [] for k in servers}
        itl: dict[str, list[float]] = {k: [] for k in servers}
        tps_pairs: list[float] = []
        cpt_pairs: list[float] = []
        step_pairs: list[float] = []
        roles: dict[str, dict[str, list[float]]] = {k: {} for k in servers}
        for i in range(args.waves):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                servers[name].resume()
                time.sleep(0.3)  # let it settle after SIGCONT
                r, c, by_role, g = wave(servers[name], vocab, args.concurrency,
                                    args.output_tokens, seed=100 + i)
                servers[name].pause()
                tps[name].append(r)
                cpt[name].append(c)
                itl[name].append(g)
                for role, v in by_role.items():
                    roles[name].setdefault(role, []).append(v)
            tps_pairs.append(tps["plugin"][-1] / tps["baseline"][-1])
            cpt_pairs.append(cpt["plugin"][-1] / cpt["baseline"][-1])
            step_pairs.append(itl["baseline"][-1] / itl["plugin"][-1])  # NaN: a wave of no gaps
            print(f"wave {i:2d} plugin {tps['plugin'][-1]:7.1f} tok/s {cpt['plugin'][-1] * 1e3:6.3f}"
                  f" ms CPU/tok | baseline {tps['baseline'][-1]:7.1f} tok/s "
                  f"{cpt['baseline'][-1] * 1e3:6.3f} ms CPU/tok | ratios {tps_pairs[-1]:.3f} "
                  f"{cpt_pairs[-1]:.3f} step {step_pairs[-1]:.3f}", flush=True)
        print(f"started first: {start_order[0]}")
        print(summary("  decode throughput (plugin/baseline; 1 = no overhead)", tps_pairs,
                      tps["plugin"], tps["baseline"], "tok/s"))
        print(summary("  server CPU per token (plugin/baseline; 1 = no overhead)", cpt_pairs,
                      cpt["plugin"], cpt["baseline"], "s/tok"))
        step_pairs = [x for x in step_pairs if x == x] or [math.nan]
        print(summary("  engine step speed (baseline step / plugin step; 1 = no overhead)",
                      step_pairs, [1 / x for x in itl["plugin"]], [1 / x for x in itl["baseline"]],
                      "steps/s"))
        for role in roles["plugin"]:
            a, b = roles["plugin"][role], roles["baseline"][role]
            pairs = [x / y for x, y in zip(a, b) if y > 0]
            if pairs:
                print(f"    {role:11s} CPU per token: plugin {statistics.median(a) * 1e6:7.1f} us, "
                      f"baseline {statistics.median(b) * 1e6:7.1f} us; median pair ratio "
                      f"{statistics.median(pairs):.4f}")
        return (statistics.median(tps_pairs), statistics.median(cpt_pairs),
                statistics.median(step_pairs))
    finally:
        for srv in servers.values():
            srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-moe", help="bundled tiny model (big-moe: realistic)")
    ap.add_argument("--waves", type=int, default=24, help="waves per server (alternated)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--plugin-config", default="{}",
                    help='the plugin side\'s moe_reuse object, e.g. \'{"enabled": false}\'')
    ap.add_argument("--one-order", action="store_true",
                    help="one experiment (plugin server started first) instead of both orders")
    ap.add_argument("--aa", action="store_true",
                    help="self-check: both servers without the plugin (the ratios must read 1)")
    ap.add_argument("--ablation", action="store_true",
                    help="attribute the cost: arms with more and more of the plugin vs a baseline")
    ap.add_argument("--arms", default=",".join(ARMS), help="the --ablation arms, in order")
    ap.add_argument("--json", help="--ablation: also write the results here")
    args = ap.parse_args()
    facts = model_facts(args.model)
    path = build_model(args.model)
    if args.ablation:
        res = run_ablation(args, path, facts.vocab_size)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    results = [run_once(args, path, facts.vocab_size, swap) for swap in
               ((False,) if args.one_order else (False, True))]
    tput = math.prod(r[0] for r in results) ** (1 / len(results))
    cpu = math.prod(r[1] for r in results) ** (1 / len(results))
    step = math.prod(r[2] for r in results) ** (1 / len(results))
    print(f"model {args.model}, {'eager' if args.eager else 'compiled'}, concurrency "
          f"{args.concurrency}, {args.output_tokens} tokens per request, {args.waves} waves per "
          f"server and order{', A/A self-check (no plugin on either)' if args.aa else ''}; "
          f"plugin config {args.plugin_config}")
    print("per start order (plugin first, baseline first): median pair ratios throughput "
          + ", ".join(f"{r[0]:.4f}" for r in results) + "; CPU per token "
          + ", ".join(f"{r[1]:.4f}" for r in results) + "; engine step speed "
          + ", ".join(f"{r[2]:.4f}" for r in results))
    print(f"overhead (geometric mean over start orders): throughput {100 * (1 - tput):+.2f}%, "
          f"CPU per token {100 * (cpu - 1):+.2f}%, engine step {100 * (1 - step):+.2f}% "
          f"(target <= 2%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
