"""Soak: a server with the plugin under steady load for a long time; does any memory grow?

A real vLLM server (the plugin on, per-expert series on, the live comparison on, snapshots every
`--flush` s) serves the mixed traffic of `harness.traffic` (streamed and not, aborted clients, shared
prefixes) without a pause, from `--concurrency` closed-loop clients. Every `--every` seconds the
script samples:
- the resident memory (VmRSS, from /proc) of every process in the server's process group
  (API server, engine core, workers), by role;
- the recorder's buffers as the plugin reports them (`moe_reuse_buffer_bytes`: device ring and
  host copy, fixed at start-up);
- the bytes and files under the snapshot directory (its run directory and every other one);
- the requests done and the tokens the plugin counted, so the curve shows it was busy.

After the warm-up (`--warmup`, default a fifth of the run) each series must stay within 5% of its
first post-warm-up sample; the script prints the curve as a table, the verdict per series, and
writes it all as JSON (`--out`).

    python benchmarks/soak.py --minutes 20 [--runner v1|v2] [--model qwen3-moe] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from moe_reuse.plugin import snapshot as snap_mod
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts
from moe_reuse.plugin.harness.traffic import LoadResult, mixed_requests, run_load

PAGE = os.sysconf("SC_PAGE_SIZE")


def _group_rss(pgid: int) -> dict[str, int]:
    """VmRSS bytes of every process in the process group, keyed by role (cmdline / comm)."""
    out: dict[str, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError, ProcessLookupError):
            continue
        role = comm if comm.startswith("VLLM") else ("api_server" if "python" in comm else comm)
        key = role
        n = 1
        while key in out:
            n += 1
            key = f"{role}#{n}"
        out[key] = rss
    return out


def _dir_usage(base: Path) -> tuple[int, int]:
    total = files = 0
    for root, _dirs, names in os.walk(base):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--every", type=float, default=30.0, help="sampling period, seconds")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds (default: a fifth)")
    ap.add_argument("--runner", choices=("v1", "v2"), default="v1")
    ap.add_argument("--model", default="qwen3-moe")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--flush", type=float, default=1.0)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args()

    facts = model_facts(args.model)
    duration = args.minutes * 60
    warmup = duration / 5 if args.warmup is None else args.warmup
    cfg = {"moe_reuse": {"flush_interval_s": args.flush, "per_expert_series": True,
                         "window_s": 10.0}}
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    done = {"requests": 0, "failed": 0}

    def on_result(r: LoadResult) -> None:
        done["requests"] += 1
        done["failed"] += r.outcome == "failed"

    with VllmServer(build_model(args.model), enforce_eager=args.eager, runner=args.runner,
                    additional_config=cfg, enable_prefix_caching=True,
                    max_model_len=512).start(print) as srv:
        assert srv.pid is not None
        pgid = os.getpgid(srv.pid)

        def traffic() -> None:
            seed = 0
            while not stop.is_set():
                reqs = mixed_requests(args.concurrency * 8, facts.vocab_size, seed=seed,
                                      prompt_lengths=(8, 300), output_lengths=(1, 64))
                run_load(srv.url, reqs, args.concurrency, model=srv.served_model_name,
                         on_result=on_result)
                seed += 1

        threads = [threading.Thread(target=traffic, daemon=True)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        base = snap_mod.base_dir()
        print(f"soak: {args.minutes:g} min, sample every {args.every:g} s, warm-up {warmup:.0f} s, "
              f"runner {args.runner}, {args.model}, concurrency {args.concurrency}, "
              f"snapshots under {base}")
        while True:
            now = time.monotonic() - t0
            text = srv.metrics_text()
            rss = _group_rss(pgid)
            dir_bytes, dir_files = _dir_usage(base)
            s = {
                "t_s": round(now, 1),
                "rss_bytes": rss,
                "rss_total_bytes": sum(rss.values()),
                "ring_bytes": metric_value(text, "moe_reuse_buffer_bytes", buffer="device_ring"),
                "host_copy_bytes": metric_value(text, "moe_reuse_buffer_bytes", buffer="host_copy"),
                "snapshot_dir_bytes": dir_bytes,
                "snapshot_dir_files": dir_files,
                "requests_done": done["requests"],
                "requests_failed": done["failed"],
                "tokens_counted": metric_value(text, "moe_reuse_scheduled_tokens_total"),
                "selfcheck_mismatch": metric_value(
                    text, "moe_reuse_selfcheck_mismatch_assignments_total"),
                "errors": metric_value(text, "moe_reuse_errors_total"),
            }
            samples.append(s)
            print(f"t={s['t_s']:7.1f}s rss={s['rss_total_bytes'] / 2**20:8.1f} MiB "
                  + " ".join(f"{k}={v / 2**20:.1f}" for k, v in sorted(rss.items()))
                  + f" ring={s['ring_bytes'] / 2**10:.0f} KiB dir={dir_bytes / 2**10:.0f} KiB "
                  f"({dir_files} files) req={s['requests_done']} tok={s['tokens_counted']:.0f}",
                  flush=True)
            if now >= duration:
                break
            time.sleep(max(0.0, args.every - (time.monotonic() - t0 - now)))
        stop.set()

    verdict = _verdict(samples, warmup)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "samples": samples,
                                          "verdict": verdict}, indent=1))
    print(json.dumps(verdict, indent=1))
    print("FLAT" if all(v["flat"] for v in verdict.values()) else "GREW")


def _verdict(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s["t_s"] >= warmup] or samples[-1:]
    series = {"rss_total_bytes": [s["rss_total_bytes"] for s in after],
              "ring_bytes": [s["ring_bytes"] for s in after],
              "host_copy_bytes": [s["host_copy_bytes"] for s in after],
              "snapshot_dir_bytes": [s["snapshot_dir_bytes"] for s in after]}
    roles = sorted({k for s in after for k in s["rss_bytes"]})
    for role in roles:
        series[f"rss_bytes[{role}]"] = [s["rss_bytes"].get(role, 0) for s in after]
    out = {}
    for name, vals in series.items():
        first, last, hi = vals[0], vals[-1], max(vals)
        growth = (hi - first) / first if first else 0.0
        out[name] = {"first": first, "last": last, "max": hi, "max_growth": round(growth, 4),
                     "flat": growth <= 0.05}
    return out


if __name__ == "__main__":
    main()
