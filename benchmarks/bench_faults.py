"""Throughput with a fault injected at each plugin stage, side by side with no fault, in one run.

A fault inside the plugin must not cost the server anything: the recorder stops (or the one part
degrades), counts it and logs once. For each configuration, one real vLLM server (the plugin on,
the live comparison and an OTLP push on, so every stage runs) serves the same waves of requests
while a scraper reads /metrics every second, as Prometheus would; the baseline (no fault) runs
first and last, so its two figures show the noise of this machine. Printed per configuration:
decode throughput (generated tokens / wall second, median over waves) and its ratio to the mean
of the two baselines, the median scrape time of /metrics, and what the plugin said (errors by
stage, the enabled reason).

    python benchmarks/bench_faults.py [--runner v1] [--waves 5] [--requests 96] [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts
from moe_reuse.plugin.harness.traffic import mixed_requests, run_load
from moe_reuse.plugin.metrics_text import samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from otlp_receiver import OtlpReceiver  # noqa: E402 - the tests' real receiver, not shipped

CONFIGS = [
    ("baseline", ""),
    ("bind", "bind:1"),
    ("step", "step:50"),
    ("flush", "flush:5"),
    ("snapshot_write", "snapshot_write:5"),
    ("live_window", "live_window:2"),
    ("otlp_push", "otlp_push:2"),
    ("collector", "collector:3"),
    ("baseline (again)", ""),
]


def _scraper(url: str, stop: threading.Event, times: list[float]) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                r.read()
            times.append(time.perf_counter() - t0)
        except OSError:
            times.append(float("nan"))
        stop.wait(1.0)


def run_config(name: str, inject: str, args: argparse.Namespace, otlp: str) -> dict[str, Any]:
    facts = model_facts(args.model)
    cfg = {"moe_reuse": {"flush_interval_s": 0.5, "window_s": 2.0, "otlp_endpoint": otlp,
                         "otlp_interval_s": 1.0}}
    env = {"MOE_REUSE_INJECT_FAULT": inject} if inject else {}
    with VllmServer(build_model(args.model), enforce_eager=True, runner=args.runner,
                    additional_config=cfg, env=env).start() as srv:
        stop, scrapes = threading.Event(), []
        th = threading.Thread(target=_scraper, args=(srv.url, stop, scrapes), daemon=True)
        th.start()
        rates = []
        for w in range(args.waves + 1):
            reqs = mixed_requests(args.requests, facts.vocab_size, seed=100 + w,
                                  output_lengths=(16, 48), abort_share=0.0, stream_share=0.5)
            t0 = time.monotonic()
            res = run_load(srv.url, reqs, args.concurrency, model=srv.served_model_name)
            wall = time.monotonic() - t0
            if w:  # the first wave warms up
                rates.append(sum(r.completion_tokens for r in res) / wall)
        stop.set()
        th.join()
        text = srv.metrics_text()
        errors = {s.labels["stage"]: s.value for s in samples(text, "moe_reuse_errors_total")}
        reasons = [s.labels["reason"] for s in samples(text, "moe_reuse_enabled")]
        ok = [t for t in scrapes if t == t]
        return {"config": name, "inject": inject, "tokens_per_s": statistics.median(rates),
                "waves": rates, "scrape_ms_median": 1000 * statistics.median(ok) if ok else None,
                "scrape_ms_max": 1000 * max(ok) if ok else None,
                "scrape_failures": len(scrapes) - len(ok), "errors": errors, "enabled": reasons,
                "log_lines_fault": sum(srv.log_text().count(s) for s in (
                    "disabled after a fault", "failed (recording continues",
                    "could not write the snapshot", "could not bind", "collector failed")),
                "scheduled_tokens": metric_value(text, "moe_reuse_scheduled_tokens_total")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runner", choices=("v1", "v2"), default="v1")
    ap.add_argument("--model", default="qwen3-moe")
    ap.add_argument("--waves", type=int, default=5)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/bench_faults.json")
    args = ap.parse_args()
    rows = []
    with OtlpReceiver() as otlp:
        for name, inject in CONFIGS:
            row = run_config(name, inject, args, otlp.endpoint)
            rows.append(row)
            print(f"{name:18s} {row['tokens_per_s']:8.1f} tok/s  scrape {row['scrape_ms_median']:.1f}"
                  f" ms (max {row['scrape_ms_max']:.1f}, {row['scrape_failures']} failed)  "
                  f"errors {row['errors']}  enabled {row['enabled']}  fault log lines "
                  f"{row['log_lines_fault']}", flush=True)
    base = statistics.mean(r["tokens_per_s"] for r in rows if r["config"].startswith("baseline"))
    print(f"\n{'config':18s} {'tok/s':>8s} {'vs baseline':>12s}")
    for r in rows:
        r["ratio_to_baseline"] = r["tokens_per_s"] / base
        print(f"{r['config']:18s} {r['tokens_per_s']:8.1f} {r['ratio_to_baseline']:12.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
