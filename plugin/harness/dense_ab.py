"""`moe-reuse dense-ab`: the dense-twin A/B that checks the `dense_speedup_ratio` gauge.

Builds the quality-matched dense twin of a served test MoE (same attention and KV layout, FFN
sized by N_dense = q*s*N_total), serves both on the same vLLM build, one server at a time,
alternating MoE, dense, MoE, ... and measures decode throughput at several concurrency levels.
For the MoE passes it also reads the plugin's live gauges (dense_speedup_ratio X, step_seconds
measured and predicted) from /metrics while the level runs.

Decode throughput: every request streams; its decode rate is (tokens - 1) / (last token time -
first token time); a level's throughput is the sum of its concurrent requests' rates, averaged
over the waves of the level. Each wave sends `c` requests with random-token prompts and
ignore_eos, so the decode batch is `c` for the whole wave.

Routing regimes (`--regimes`, default both, one run): `uniform` serves the test MoE as built
(random weights, random-token prompts: near-uniform routing); `concentrated` serves a copy whose
routers are rigged toward `--hot-experts` experts (`routing_rig.py`; every other weight
identical, so one dense twin serves both). Each `moe` in `--order` runs one pass per regime. Per
level it reports the distinct experts a decode step touched per layer (the recorder's counters),
the gauge, and what the gauge would have said with the pre-issue-12 formula and with the shipped
generic CPU spec instead of this machine's calibration (both replayed offline from the level's
measured figures through the same window code, one batch group).

    moe-reuse dense-ab --model big-moe --levels 1,2,4,8,16,32,64
    (or python benchmarks/dense_twin_ab.py with the same flags)

Hardware for the gauge (`--hardware calibrate`, the default): `moe-reuse calibrate` runs once
before the first server starts (kernels pinned to core 0 with one thread, as vLLM's CPU worker
runs, then the serving stack's per-step overhead), and the same file serves every MoE pass (so the passes differ only by the machine's drift, which the
alternation exposes); `--hardware` also takes a preset or a file.

Writes a JSON file with every pass and prints the side-by-side table (medians and ranges).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..live.twin import build_dense_twin
from .load import latency_percentiles, random_prompts, run_concurrent_streamed
from .routing_rig import concentrated_copy
from .server import VllmServer, metric_value
from .tiny_models import build_model, model_facts

REGIMES = ("uniform", "concentrated")
LATENCY_KEYS = ("itl_p50_seconds", "itl_p99_seconds", "ttft_p50_seconds", "ttft_p99_seconds")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_level(url: str, model: str, c: int, *, seconds: float, max_tokens: int, prompt_len: int,
              vocab: int, seed: int, on_midpoint: Any = None, midpoint_s: float = 0.0) -> dict[str, Any]:
    """Waves of `c` concurrent streamed requests for at least `seconds`: decode throughput, and
    the client-timed inter-token gaps and TTFTs of every request (P50/P99)."""
    t0 = time.monotonic()
    rates: list[float] = []
    streamed: list[dict[str, Any]] = []
    waves = 0
    mid_done = threading.Event()
    mid: dict[str, Any] = {}

    def midpoint() -> None:
        while time.monotonic() - t0 < midpoint_s:
            time.sleep(0.2)
        if on_midpoint is not None:
            mid.update(on_midpoint())
        mid_done.set()

    watcher = threading.Thread(target=midpoint, daemon=True)
    watcher.start()
    while waves == 0 or time.monotonic() - t0 < seconds or not mid_done.is_set():
        prompts = random_prompts(c, prompt_len, vocab, seed + waves * 1000 + c)
        res = run_concurrent_streamed(url, [(p, max_tokens) for p in prompts], c, model=model,
                                      timeout_s=600, clock=time.perf_counter)
        streamed.extend(res)
        # each client's decode rate: the tokens after its first over the time they took
        rates.append(sum(len(r["itl_seconds"]) / sum(r["itl_seconds"]) for r in res
                         if r["itl_seconds"] and sum(r["itl_seconds"]) > 0))
        waves += 1
    watcher.join(timeout=60)
    return {"concurrency": c, "waves": waves, "decode_tokens_per_second": statistics.median(rates),
            "wave_rates": rates, **latency_percentiles(streamed), **mid}


def read_counters(text: str) -> dict[str, float]:
    """The recorder's decode counters (summed over layers): for per-level deltas."""
    steps = sum(metric_value(text, "moe_reuse_steps_total", kind=k) for k in ("decode", "mixed"))
    return {
        "steps": steps,
        "touched": metric_value(text, "moe_reuse_experts_touched_total", phase="decode"),
        "tokens": metric_value(text, "moe_reuse_tokens_total", phase="decode"),
        "requests": metric_value(text, "moe_reuse_batch_requests_total", phase="decode"),
        "context": metric_value(text, "moe_reuse_context_tokens_total", phase="decode"),
    }


def level_routing(before: dict[str, float], after: dict[str, float], layers: int) -> dict[str, float]:
    """Per decode step over a level: batch, context per request, distinct experts per layer."""
    d = {k: after[k] - before[k] for k in before}
    if d["steps"] <= 0 or d["requests"] <= 0:
        return {}
    return {"batch_measured": d["tokens"] / d["steps"],
            "context_per_request": d["context"] / d["requests"],
            "distinct_experts_per_step": d["touched"] / d["steps"] / max(layers, 1)}


def read_gauges(url: str, before: dict[str, float] | None = None, layers: int = 1) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()

    def get(name: str, **labels: str) -> float:
        try:
            return metric_value(text, name, **labels)
        except Exception:  # noqa: BLE001
            return float("nan")

    out: dict[str, Any] = {
        "gauge_x": get("moe_reuse_dense_speedup_ratio"),
        "routing_cost": get("moe_reuse_routing_cost_ratio"),
        "step_seconds_measured": get("moe_reuse_step_seconds", source="measured"),
        "step_seconds_predicted": get("moe_reuse_step_seconds", source="predicted"),
        "step_seconds_predicted_uniform": get("moe_reuse_step_seconds", source="predicted_uniform"),
        "tokens_per_expert_measured": get("moe_reuse_tokens_per_expert", source="measured"),
        "regime_compute_bound": get("moe_reuse_ffn_regime", regime="compute_bound"),
        "step_bytes_measured": get("moe_reuse_step_bytes", source="measured"),
        "step_bytes_predicted": get("moe_reuse_step_bytes", source="predicted"),
        "hardware": _info_label(text, "hardware"),
    }
    if before is not None:
        out.update(level_routing(before, read_counters(text), layers))
    return out


def _info_label(text: str, label: str) -> str:
    from ..metrics_text import first_labels

    return (first_labels(text, "moe_reuse_info") or {}).get(label, "?")


def replay(level: dict[str, Any], specs: Any) -> dict[str, float]:
    """The level's gauge recomputed under `specs` from its measured figures (one batch group:
    measured batch, context, step time and distinct experts), with the current formula and with
    the pre-issue-12 one (calibrated against the uniform-routing prediction)."""
    import math

    from ..live.window import WindowData, dense_estimate, predict_group, window_figures

    need = ("batch_measured", "context_per_request", "distinct_experts_per_step",
            "step_seconds_measured")
    if any(not math.isfinite(float(level.get(k, math.nan))) for k in need):
        return {}
    b = max(round(level["batch_measured"]), 1)
    w = WindowData(specs.model.num_moe_layers, specs.model.num_experts, steps=1,
                   decode_tokens=float(b))
    w.groups[b] = [1.0, level["context_per_request"], level["step_seconds_measured"], 1.0,
                   level["distinct_experts_per_step"]]
    fig = window_figures(w, specs, kv_capacity_moe=None, kv_bytes_per_token=0.0,
                         cold_fraction=0.05, baseline=None)
    pg = predict_group(specs, b, level["context_per_request"], level["distinct_experts_per_step"])
    t = level["step_seconds_measured"]
    old = t / dense_estimate(t, pg.moe_uniform.total_seconds, pg.dense.total_seconds)
    return {"x": fig["dense_speedup"], "x_old_formula": old,
            "step_seconds_predicted": fig["step_seconds_predicted"]}


def calibrate_hardware(out: Path) -> str:
    """Run `moe-reuse calibrate` (kernels pinned to core 0 with one thread, as vLLM's CPU worker
    runs, then the serving stack's per-step overhead) into `out`."""
    import subprocess

    say(f"calibrating into {out}")
    subprocess.run([sys.executable, "-m", "moe_reuse.plugin.calibrate", "calibrate", "--out",
                    str(out)], check=True)
    return str(out)


def run_pass(kind: str, model_dir: Path, args: argparse.Namespace, vocab: int,
             regime: str = "") -> list[dict[str, Any]]:
    extra: dict[str, Any] = {}
    layers = len(model_facts(model_dir).moe_layer_indices)
    if kind == "moe":
        extra["additional_config"] = {"moe_reuse": {
            "window_s": args.window_s, "q": args.q, "hardware": args.hardware}}
    srv = VllmServer(model_dir, enforce_eager=args.eager, max_num_seqs=max(args.levels),
                     max_model_len=1024, served_model_name=kind,
                     startup_timeout_s=args.startup_timeout_s, **extra)
    say(f"starting {kind} server ({model_dir.name}{', ' + regime + ' routing' if regime else ''})")
    out = []
    with srv.start(progress=lambda m: say(f"  {m}")):
        # warm-up: one short wave at the top level
        run_level(srv.url, kind, max(args.levels), seconds=0, max_tokens=8,
                  prompt_len=args.prompt_len, vocab=vocab, seed=7)
        for c in args.levels:
            gauge = None
            if kind == "moe":
                # the recorder's counters lag the steps by up to a flush: let the previous level's
                # last steps land before taking this level's starting point
                time.sleep(args.settle_s)
                before = read_counters(srv.metrics_text())

                def gauge(before: dict[str, float] = before) -> dict[str, Any]:
                    return read_gauges(srv.url, before, layers)
            r = run_level(srv.url, kind, c, seconds=args.level_seconds, max_tokens=args.max_tokens,
                          prompt_len=args.prompt_len, vocab=vocab, seed=11, on_midpoint=gauge,
                          midpoint_s=2 * args.window_s + 3)
            r["kind"] = kind
            r["regime"] = regime
            out.append(r)
            msg = f"  {kind} c={c}: {r['decode_tokens_per_second']:.1f} tok/s ({r['waves']} waves)"
            if kind == "moe":
                msg += (f"; {r.get('distinct_experts_per_step', float('nan')):.1f} experts/layer/step"
                        f", gauge X={r['gauge_x']:.3f}, routing cost {r['routing_cost']:.3f}, step "
                        f"{r['step_seconds_measured'] * 1e3:.1f} ms measured / "
                        f"{r['step_seconds_predicted'] * 1e3:.1f} ms predicted")
            say(msg)
    return out


def _med(xs: list[float]) -> float:
    import math

    ok = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(ok) if ok else float("nan")


def summarize(passes: list[list[dict[str, Any]]], levels: list[int]) -> list[dict[str, Any]]:
    """One row per (regime, level): medians over the passes (ranges where they matter)."""
    rows = []
    regimes = sorted({r["regime"] for p in passes for r in p if r["kind"] == "moe"},
                     key=lambda g: REGIMES.index(g) if g in REGIMES else len(REGIMES))
    for regime in regimes:
        for c in levels:
            moe = [r for p in passes for r in p
                   if r["kind"] == "moe" and r["regime"] == regime and r["concurrency"] == c]
            dense = [r for p in passes for r in p if r["kind"] == "dense" and r["concurrency"] == c]
            if not moe or not dense:
                continue
            m_tps = [r["decode_tokens_per_second"] for r in moe]
            d_tps = [r["decode_tokens_per_second"] for r in dense]
            xs = [r["gauge_x"] for r in moe]
            meas = statistics.median(d_tps) / statistics.median(m_tps)
            x = _med(xs)
            sm = _med([r["step_seconds_measured"] for r in moe])
            sp = _med([r["step_seconds_predicted"] for r in moe])
            row = {
                "regime": regime, "concurrency": c, "gauge_x": x,
                "gauge_x_range": [min(xs), max(xs)], "measured_ratio": meas,
                "measured_ratio_range": [min(d_tps) / max(m_tps), max(d_tps) / min(m_tps)],
                "x_over_measured": x / meas, "moe_tokens_per_second": statistics.median(m_tps),
                "dense_tokens_per_second": statistics.median(d_tps),
                "moe_step_seconds_measured": sm, "moe_step_seconds_predicted": sp,
                "moe_step_seconds_predicted_uniform": _med(
                    [r["step_seconds_predicted_uniform"] for r in moe]),
                "step_predicted_over_measured": sp / sm,
                "routing_cost": _med([r["routing_cost"] for r in moe]),
                "distinct_experts_per_step": _med(
                    [r.get("distinct_experts_per_step", float("nan")) for r in moe]),
                "tokens_per_expert": _med([r["tokens_per_expert_measured"] for r in moe]),
                "compute_bound": _med([r["regime_compute_bound"] for r in moe]),
                "hardware": moe[0].get("hardware", "?"),
            }
            for tag in ("replay", "generic"):
                for key in ("x", "x_old_formula", "step_seconds_predicted"):
                    row[f"{tag}_{key}"] = _med([r.get(tag, {}).get(key, float("nan")) for r in moe])
            for kind, runs in (("moe", moe), ("dense", dense)):
                for key in LATENCY_KEYS:
                    row[f"{kind}_{key}"] = _med([r.get(key, float("nan")) for r in runs])
            row["old_formula_x_over_measured"] = row["replay_x_old_formula"] / meas
            row["generic_x_over_measured"] = row["generic_x"] / meas
            row["generic_step_predicted_over_measured"] = row["generic_step_seconds_predicted"] / sm
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| routing | c | experts/layer/step | gauge X | measured dense/MoE | X / measured | "
          "routing cost | step pred (ms) | step meas (ms) | pred/meas | old formula X / measured "
          "| generic spec X / measured | generic step pred/meas |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['regime']} | {r['concurrency']} | {r['distinct_experts_per_step']:.1f} | "
              f"{r['gauge_x']:.3f} ({r['gauge_x_range'][0]:.3f}-{r['gauge_x_range'][1]:.3f}) | "
              f"{r['measured_ratio']:.3f} ({r['measured_ratio_range'][0]:.3f}-"
              f"{r['measured_ratio_range'][1]:.3f}) | {r['x_over_measured']:.3f} | "
              f"{r['routing_cost']:.3f} | {r['moe_step_seconds_predicted'] * 1e3:.1f} | "
              f"{r['moe_step_seconds_measured'] * 1e3:.1f} | "
              f"{r['step_predicted_over_measured']:.3f} | "
              f"{r['old_formula_x_over_measured']:.3f} | {r['generic_x_over_measured']:.3f} | "
              f"{r['generic_step_predicted_over_measured']:.3f} |")
    print()
    print("| routing | c | MoE ITL P50 / P99 (ms) | dense ITL P50 / P99 (ms) | MoE TTFT P50 / P99 (ms) "
          "| dense TTFT P50 / P99 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r.get(f'{k}_itl_p50_seconds', float('nan')) * 1e3:.2f} / "
                 f"{r.get(f'{k}_itl_p99_seconds', float('nan')) * 1e3:.2f}" for k in ("moe", "dense")]
        cells += [f"{r.get(f'{k}_ttft_p50_seconds', float('nan')) * 1e3:.1f} / "
                  f"{r.get(f'{k}_ttft_p99_seconds', float('nan')) * 1e3:.1f}" for k in ("moe", "dense")]
        print(f"| {r['regime']} | {r['concurrency']} | " + " | ".join(cells) + " |")


def replay_specs(moe_dir: Path, hardware: str, q: float) -> dict[str, Any]:
    """Specs for the offline replays: the gauge's own hardware, and the shipped generic CPU spec
    (what hardware=auto resolves to on a CPU without a calibration file)."""
    import os

    from ..live.spec import CALIBRATED_FILE_ENV, ServedFacts, build_specs, resolve_hardware

    cfg = json.loads((moe_dir / "config.json").read_text())
    facts = ServedFacts(hf_config=cfg, weight_dtype="bfloat16", kv_dtype="bfloat16")
    saved = os.environ.get(CALIBRATED_FILE_ENV)
    os.environ[CALIBRATED_FILE_ENV] = str(moe_dir / "no-calibration-file.json")
    try:
        generic = resolve_hardware("auto", "cpu")
    finally:
        if saved is None:
            os.environ.pop(CALIBRATED_FILE_ENV, None)
        else:
            os.environ[CALIBRATED_FILE_ENV] = saved
    own = resolve_hardware(hardware, "cpu")
    return {"replay": build_specs(facts, own, q), "generic": build_specs(facts, generic, q)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moe-reuse dense-ab", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="big-moe", help="tiny test model name (Qwen3-MoE)")
    ap.add_argument("--q", type=float, default=5.0)
    ap.add_argument("--levels", default="1,2,4,8,16,32,64")
    ap.add_argument("--order", default="moe,dense,moe",
                    help="passes, alternating A/B; each moe pass runs once per routing regime")
    ap.add_argument("--regimes", default=",".join(REGIMES),
                    help="routing regimes of the MoE passes: uniform (the model as built, "
                         "random-token prompts), concentrated (routers rigged toward "
                         "--hot-experts experts)")
    ap.add_argument("--hot-experts", type=int, default=16,
                    help="experts the concentrated regime's routers prefer (even, >= 2 top-k)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--window-s", type=float, default=4.0, help="gauge window for the MoE server")
    ap.add_argument("--level-seconds", type=float, default=12.0)
    ap.add_argument("--hardware", default="calibrate",
                    help="hardware spec for the gauge: calibrate (measure once, before the first "
                         "server), auto, a preset or a file")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--settle-s", type=float, default=3.0,
                    help="idle seconds before each MoE level, so the recorder has flushed the "
                         "previous level's steps before the level's counters are read")
    ap.add_argument("--startup-timeout-s", type=float, default=900.0,
                    help="per server start (torch.compile of the big model on a busy 2-core VM "
                         "took over 5 minutes)")
    ap.add_argument("--out", default="benchmarks/results/dense_twin_ab.json")


def run(args: argparse.Namespace) -> int:
    args.levels = [int(x) for x in str(args.levels).split(",")]
    t0 = time.monotonic()
    if args.hardware == "calibrate":
        args.hardware = calibrate_hardware(Path(args.out).with_name(Path(args.out).stem + "-hw.json"))
    regimes = [g.strip() for g in str(args.regimes).split(",") if g.strip()]
    bad = [g for g in regimes if g not in REGIMES]
    if bad or not regimes:
        raise SystemExit(f"--regimes: unknown {bad or regimes!r}; choose from {', '.join(REGIMES)}")
    moe_dir = build_model(args.model, progress=say)
    twin_dir = build_dense_twin(moe_dir, args.q, say=say)
    dirs = {"uniform": moe_dir}
    if "concentrated" in regimes:
        dirs["concentrated"] = concentrated_copy(moe_dir, args.hot_experts, say=say)
    vocab = model_facts(moe_dir).vocab_size
    specs = replay_specs(moe_dir, args.hardware, args.q)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if not callable(v)}
    passes: list[list[dict[str, Any]]] = []
    rows: list[dict[str, Any]] = []
    plan = [(k, g) for k in args.order.split(",") for g in (regimes if k == "moe" else [""])]
    for kind, regime in plan:
        p = run_pass(kind, dirs[regime] if kind == "moe" else twin_dir, args, vocab, regime)
        for r in p:
            if kind == "moe":
                r.update({tag: replay(r, sp) for tag, sp in specs.items()})
        passes.append(p)
        kinds = {r["kind"] for p in passes for r in p}
        rows = summarize(passes, args.levels) if kinds == {"moe", "dense"} else []
        out.write_text(json.dumps({"args": settings, "passes": passes, "rows": rows,
                                   "elapsed_s": time.monotonic() - t0}, indent=1) + "\n")
    print_table(rows)
    say(f"done in {time.monotonic() - t0:.0f} s; wrote {out}")
    return 0


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser("dense-ab", help="A/B the dense-speedup gauge against a served dense twin")
    add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    raise SystemExit(main())
