"""`moe-reuse baseline save`: a routing baseline from a running server, for the drift gauge.

Two sources: the server's /metrics (needs `per_expert_series: true`; works from any host and sums
the ranks), or the run's snapshot files (`--snapshot-dir`, same host, no opt-in needed). With
`--seconds N` the baseline is the delta of two reads N seconds apart (just that traffic);
without it, everything since start-up. The file format is in `live/drift.py`.
"""

from __future__ import annotations

import argparse
import time
import urllib.request
from pathlib import Path
from typing import Any

from ..metrics_text import samples

Counts = dict[int, dict[int, float]]


def expert_counts_from_metrics(text: str, phase: str = "decode",
                               model: str | None = None) -> tuple[Counts, int]:
    """({layer: {expert: tokens}} summed over ranks, top-k) from /metrics text."""
    out: Counts = {}
    top_k = int(next((s.labels["top_k"] for s in samples(text, "moe_reuse_info")
                      if "top_k" in s.labels), 1))
    for s in samples(text, "moe_reuse_expert_tokens_total", phase=phase):
        lab = s.labels
        if model and lab.get("model") != model:
            continue
        if lab["expert"] == "other":
            raise ValueError('per-expert series are capped (expert="other" present); raise '
                             "max_expert_series or use --snapshot-dir")
        row = out.setdefault(int(lab["layer"]), {})
        row[int(lab["expert"])] = row.get(int(lab["expert"]), 0.0) + float(s.value)
    return out, top_k


def expert_counts_from_snapshots(directory: Path, phase: str = "decode") -> tuple[Counts, int]:
    from ..recorder.aggregate import PHASES
    from ..snapshot import read_snapshots

    snaps = read_snapshots(directory)
    if not snaps:
        raise ValueError(f"no snapshots in {directory}")
    p = PHASES.index(phase)
    out: Counts = {}
    for snap in snaps:
        et = snap["totals"]["expert_tokens"]  # [L, 2, E]
        for li, layer in enumerate(snap["layer_ids"]):
            row = out.setdefault(int(layer), {})
            for e, v in enumerate(et[li, p].tolist()):
                row[e] = row.get(e, 0.0) + float(v)
    return out, int(snaps[0].get("top_k", 1))


def _read(args: argparse.Namespace) -> tuple[Counts, int]:
    if args.snapshot_dir:
        return expert_counts_from_snapshots(Path(args.snapshot_dir))
    with urllib.request.urlopen(args.url.rstrip("/") + "/metrics", timeout=30) as r:
        text = r.read().decode()
    counts, top_k = expert_counts_from_metrics(text, model=args.model)
    if not counts:
        raise ValueError("no moe_reuse_expert_tokens_total series on /metrics: start the server "
                         "with per_expert_series: true, or use --snapshot-dir on the server host")
    return counts, top_k


def cmd_baseline_save(args: argparse.Namespace) -> int:
    from .drift import make_baseline, save_baseline

    first, top_k = _read(args)
    if args.seconds > 0:
        time.sleep(args.seconds)
        second, _ = _read(args)
        counts = {layer: {e: second[layer].get(e, 0.0) - row.get(e, 0.0) for e in second[layer]}
                  for layer, row in first.items() if layer in second}
    else:
        counts = first
    num_experts = max(max(row) for row in counts.values()) + 1
    layers = {layer: [row.get(e, 0.0) for e in range(num_experts)] for layer, row in counts.items()}
    source = args.snapshot_dir or args.url
    baseline = make_baseline(layers, num_experts=num_experts, top_k=top_k, source=str(source))
    save_baseline(args.out, baseline)
    print(f"wrote {args.out}: {len(layers)} layers, {num_experts} experts, "
          f"{baseline['tokens']} decode tokens")
    return 0


def add_subcommands(subparsers: Any) -> None:
    b = subparsers.add_parser("baseline", help="routing baselines for the drift gauge")
    bs = b.add_subparsers(dest="baseline_cmd", required=True)
    s = bs.add_parser("save", help="save the routing distribution of a running server")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="server whose /metrics to read")
    s.add_argument("--snapshot-dir", default="",
                   help="read the run's snapshot files instead (same host, no opt-in needed)")
    s.add_argument("--model", default=None, help="served model name (if several)")
    s.add_argument("--seconds", type=float, default=0.0,
                   help="only the traffic of the next N seconds (two reads, delta)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_baseline_save)
