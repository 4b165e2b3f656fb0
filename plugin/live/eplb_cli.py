"""`moe-reuse eplb --url URL [--ep 8] [--redundant 32]`: the EP advisor from a running server.

Without `--ep`/`--redundant` it prints the server's own advisor gauges (per layer: current and
rebalanced balancedness, predicted gain; then the totals and the deciding term). With either, it
computes the what-if here for that EP size and redundant-expert count: the per-expert decode
counts come from the opt-in series (`per_expert_series: true`; summed over ranks), the batch size
from the recorder's counters, the compute/bandwidth balance from `moe_reuse_ridge_point_tokens`,
and the rebalanced placement from vLLM's EPLB policy through the seam (needs vLLM installed).
One /metrics parser: prometheus-client's, as in `baseline_cli`.
"""

from __future__ import annotations

import argparse
import math
import time
import urllib.request
from collections import defaultdict
from typing import Any

import numpy as np

from moe_reuse.predictor.eplb import (
    ExpertCost,
    compare,
    contiguous_placement,
    evaluate,
    redundant_for,
    slot_placement,
)

from ..metrics_text import samples
from .baseline_cli import expert_counts_from_metrics


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=30) as r:
        text: str = r.read().decode()
    return text


def server_view(text: str, model: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """{(deployment, ep): {"layers": {layer: {placement: bal, "gain": g}}, "balancedness": {...},
    "gain": g, "term": t, "net": g}} from the advisor gauges (first exporting rank wins)."""
    out: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"layers": defaultdict(dict), "balancedness": {}})
    net: dict[str, float] = {}
    seen: dict[tuple[str, str, str], str] = {}
    for s in samples(text):
        lab = s.labels
        if model and lab.get("model") != model:
            continue
        key = (lab.get("deployment", ""), lab.get("ep", ""))
        who = f'{lab.get("engine")}/{lab.get("rank")}'
        if seen.setdefault((s.name, *key), who) != who:
            continue  # one exporting rank per figure (all ranks see the same routing)
        v = float(s.value)
        if s.name == "moe_reuse_ep_layer_balancedness_ratio":
            out[key]["layers"][lab["layer"]][lab["placement"]] = v
        elif s.name == "moe_reuse_eplb_layer_gain_ratio":
            out[key]["layers"][lab["layer"]]["gain"] = v
        elif s.name == "moe_reuse_ep_balancedness_ratio":
            out[key]["balancedness"][lab["placement"]] = v
        elif s.name == "moe_reuse_eplb_gain_ratio":
            out[key]["gain"] = v
        elif s.name == "moe_reuse_eplb_deciding_term" and v == 1:
            out[key]["term"] = lab["term"]
        elif s.name == "moe_reuse_eplb_net_gain_ratio":
            net[lab["ep"]] = v
    for (dep, ep), entry in out.items():
        if dep == "served" and ep in net:
            entry["net"] = net[ep]
    return {k: v for k, v in out.items() if k[0]}


def _scalars(text: str, model: str | None) -> dict[str, float]:
    """Decode tokens, decode(+mixed) steps and the ridge point, summed / first over ranks."""
    got = {"tokens": 0.0, "steps": 0.0, "ridge": math.nan}
    for s in samples(text):
        if model and s.labels.get("model") != model:
            continue
        if s.name == "moe_reuse_tokens_total" and s.labels.get("phase") == "decode":
            got["tokens"] += float(s.value)
        elif s.name == "moe_reuse_steps_total" and s.labels.get("kind") in ("decode", "mixed"):
            got["steps"] += float(s.value)
        elif s.name == "moe_reuse_ridge_point_tokens" and math.isnan(got["ridge"]):
            got["ridge"] = float(s.value)
    return got


def local_view(text: str, ep: int, redundant: int, model: str | None = None,
               before: str | None = None) -> dict[str, Any]:
    """The what-if for (ep, redundant) computed here from the server's counters (the delta since
    `before`, another /metrics text, when given)."""
    from ..vllm.eplb import rebalance

    counts, top_k = expert_counts_from_metrics(text, model=model)
    sc = _scalars(text, model)
    if before is not None:
        c0, _ = expert_counts_from_metrics(before, model=model)
        counts = {lay: {e: v - c0.get(lay, {}).get(e, 0.0) for e, v in row.items()}
                  for lay, row in counts.items()}
        s0 = _scalars(before, model)
        sc["tokens"] -= s0["tokens"]
        sc["steps"] -= s0["steps"]
    if not counts:
        raise ValueError("no moe_reuse_expert_tokens_total series on /metrics: start the server "
                         "with per_expert_series: true")
    layers = sorted(counts)
    experts = max(max(row) for row in counts.values()) + 1
    c = np.array([[counts[lay].get(e, 0.0) for e in range(experts)] for lay in layers])
    if c.sum() <= 0 or sc["steps"] <= 0:
        raise ValueError("no decode traffic counted yet")
    ridge = sc["ridge"] if math.isfinite(sc["ridge"]) and sc["ridge"] > 0 else 1.0
    cost = ExpertCost(1.0, ridge, 1.0, 1.0)  # the ratio needs only compute vs bandwidth balance
    tokens = float(c.sum()) / len(layers) / max(top_k, 1)
    batch = max(sc["tokens"] / sc["steps"], 1.0)
    batches = [(batch, tokens / batch)]
    red = redundant_for(experts, ep, redundant)
    p2l, _ = rebalance(c, red, ep)
    cur = evaluate(c, batches, contiguous_placement(len(layers), experts, ep), cost)
    reb = evaluate(c, batches, slot_placement(p2l, ep), cost)
    cmp = compare(cur, reb)
    return {
        "layers": {str(lay): {"current": cur.layer_balancedness[i],
                              "rebalanced": reb.layer_balancedness[i], "gain": cmp.layer_gain[i]}
                   for i, lay in enumerate(layers)},
        "balancedness": {"current": cur.balancedness, "rebalanced": reb.balancedness},
        "gain": cmp.gain, "term": cmp.term, "redundant": red, "batch": batch, "ridge": ridge,
    }


def _fmt(v: Any) -> str:
    return f"{v:10.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>10s}"


def render(title: str, entry: dict[str, Any]) -> str:
    lines = [title, f"{'layer':>6s} {'current':>10s} {'rebalanced':>10s} {'gain':>10s}"]
    for lay in sorted(entry["layers"], key=int):
        row = entry["layers"][lay]
        lines.append(f"{lay:>6s} {_fmt(row.get('current'))} {_fmt(row.get('rebalanced'))} "
                     f"{_fmt(row.get('gain'))}")
    bal = entry["balancedness"]
    lines.append(f"{'all':>6s} {_fmt(bal.get('current'))} {_fmt(bal.get('rebalanced'))} "
                 f"{_fmt(entry.get('gain'))}   decided by {entry.get('term', '?')}")
    if "net" in entry:
        lines.append(f"EPLB on: without it / with it = {entry['net']:.3f} "
                     f"({'EPLB pays for itself' if entry['net'] >= 1 else 'EPLB costs more'})")
    return "\n".join(lines)


def cmd_eplb(args: argparse.Namespace) -> int:
    text = _fetch(args.url)
    if args.ep is None and args.redundant is None:
        view = server_view(text, args.model)
        if not view:
            print("no EP advisor gauges on /metrics yet (a window must close with decode traffic;"
                  " or pass --ep/--redundant to compute a what-if here)")
            return 1
        for (dep, size), entry in sorted(view.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
            print(render(f"{dep} deployment, EP {size} (balancedness: mean / max rank load)",
                         entry))
            print()
        return 0
    before = None
    if args.seconds > 0:
        before = text
        time.sleep(args.seconds)
        text = _fetch(args.url)
    ep = args.ep or 8
    red = 32 if args.redundant is None else args.redundant
    entry = local_view(text, ep, red, args.model, before)
    print(render(f"what-if EP {ep}, {entry['redundant']} redundant experts (B = "
                 f"{entry['batch']:.1f} tokens/step, ridge {entry['ridge']:.1f} tokens/expert)",
                 entry))
    return 0


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eplb", help="expert-parallel advisor: balancedness per layer and what EPLB would buy")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server whose /metrics to read")
    p.add_argument("--ep", type=int, default=None,
                   help="compute a what-if for this EP size here (needs per_expert_series)")
    p.add_argument("--redundant", type=int, default=None,
                   help="redundant experts for the what-if (default 32)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="what-if over the next N seconds only (two reads, delta)")
    p.add_argument("--model", default=None, help="served model name (if several)")
    p.set_defaults(func=cmd_eplb)
