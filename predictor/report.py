"""What the predictor's subcommands print for people: one case, or a sweep as a table.

Pure string formatting over the estimators' results (the JSON and CSV outputs are the data
itself); kept apart from the argument handling in `cli`.
"""

from __future__ import annotations

from typing import Any

from .search import CaseResult
from .sweep import ROW_KEYS, format_tokens


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def format_case(case: CaseResult) -> str:
    """Human-readable summary of one case."""
    m = case.model
    lines = [
        f"{m.name} vs dense twin (q={case.q:g}) on {case.gpus} x {case.hardware.name}, "
        f"context {format_tokens(int(case.context_tokens))} tokens"
        + (f", fixed batch {case.fixed_batch}" if case.fixed_batch else ", each at its own B_max"),
        f"  E={m.num_experts} k={m.experts_per_token}  s={case.sparsity:.4g}  q*s={case.qs:.3g} "
        f"({'q*s < 1: MoE moves more FFN bytes per token' if case.qs < 1 else 'q*s >= 1'})",
        f"  routing factor E/k={case.routing_factor:.3g}  capacity factor B_dense/B_moe={_fmt(case.capacity_factor)}"
        f"  reuse gap={_fmt(case.reuse_gap)}",
        f"  dense speedup (decode throughput)={_fmt(case.dense_speedup)}  FFN-phase only={_fmt(case.ffn_speedup)}",
    ]
    if case.accounting.cost_scope == "weights":
        lines.append(
            "  cost scope 'weights': weight path only "
            "(KV reads, attention core and communication left off the step)"
        )
    elif case.accounting.cost_scope == "paper":
        lines.append(
            "  paper profile: weight path plus exposed communication "
            "(KV reads and attention core left off the step, as the paper's eq. 2)"
        )
    for label, r in (("MoE  ", case.moe), ("dense", case.dense)):
        if not r.feasible or r.step is None:
            lines.append(f"  {label}: infeasible (out of memory on every partition)")
            continue
        s = r.step
        lines.append(
            f"  {label}: B={r.batch}  {r.tokens_per_second:,.0f} tok/s  {s.total_seconds * 1e3:.3g} ms/step  "
            f"{s.bound}-bound  comm exposed {s.comm_exposed_total_seconds * 1e3:.3g} ms  [{r.partition}]"
        )
    return "\n".join(lines)


SWEEP_TABLE_HEADS = {
    "context_tokens": "context", "gpus": "gpus", "q": "q", "moe_batch": "B_moe",
    "dense_batch": "B_dense", "moe_tokens_per_second": "MoE tok/s",
    "dense_tokens_per_second": "dense tok/s", "capacity_factor": "B_d/B_m",
    "dense_speedup": "speedup", "moe_partition": "MoE partition",
}
"""The sweep's columns the text table shows, with their headings, in the CSV's order."""


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The sweep's rows as an aligned text table (the CSV has every column)."""
    cols = [k for k in ROW_KEYS if k in SWEEP_TABLE_HEADS]
    heads = [SWEEP_TABLE_HEADS[k] for k in cols]
    body = [
        [format_tokens(r[c]) if c == "context_tokens" else _fmt(r[c]) for c in cols] for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)
