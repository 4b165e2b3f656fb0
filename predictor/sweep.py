"""What-if sweeps over context, GPU count or q, and their plot.

`sweep_rows` is pure and returns one flat row per point (table and CSV read the same rows);
`plot_sweep` is the only place that imports matplotlib, lazily and with the Agg backend, so
the predictor stays importable without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .deployment import DEFAULT_ACCOUNTING, Accounting
from .errors import SpecError
from .hardware import HardwareSpec
from .search import CaseResult, evaluate_case
from .specs import ModelSpec

DEFAULT_CONTEXTS = tuple(1024 * 2**i for i in range(15))  # 1k .. 16M tokens
DEFAULT_GPU_COUNTS = (8, 16, 32, 64, 128, 256)
DEFAULT_QS = (1.0, 2.0, 3.0, 5.0, 8.0)
AXES = ("context", "gpus", "q")


@dataclass(frozen=True)
class SweepPoint:
    axis: str
    value: float
    case: CaseResult


def sweep(
    model: ModelSpec,
    hw: HardwareSpec,
    *,
    axis: str = "context",
    values: Sequence[float] | None = None,
    gpus: int = 64,
    context_tokens: int = 131072,
    q: float = 5.0,
    batch: int | None = None,
    accounting: Accounting = DEFAULT_ACCOUNTING,
) -> list[SweepPoint]:
    """Evaluate the MoE and its dense twin at every value of one axis, the others fixed."""
    if axis not in AXES:
        raise SpecError("--over", f"unknown axis {axis!r}", f"use one of {', '.join(AXES)}")
    if values is None:
        values = {"context": DEFAULT_CONTEXTS, "gpus": DEFAULT_GPU_COUNTS, "q": DEFAULT_QS}[axis]
    if not values:
        raise SpecError("--values", "is empty")
    points = []
    for v in values:
        if axis == "context":
            case = evaluate_case(model, hw, gpus, int(v), q=q, batch=batch, accounting=accounting)
        elif axis == "gpus":
            case = evaluate_case(
                model, hw, int(v), context_tokens, q=q, batch=batch, accounting=accounting
            )
        else:
            case = evaluate_case(
                model, hw, gpus, context_tokens, q=float(v), batch=batch, accounting=accounting
            )
        points.append(SweepPoint(axis, float(v), case))
    return points


ROW_KEYS = (
    "context_tokens",
    "gpus",
    "q",
    "moe_batch",
    "dense_batch",
    "moe_tokens_per_second",
    "dense_tokens_per_second",
    "capacity_factor",
    "reuse_gap",
    "dense_speedup",
    "moe_partition",
    "dense_partition",
)


def sweep_rows(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        c = p.case
        rows.append(
            {
                "context_tokens": int(c.context_tokens),
                "gpus": c.gpus,
                "q": c.q,
                "moe_batch": c.moe.batch,
                "dense_batch": c.dense.batch,
                "moe_tokens_per_second": c.moe.tokens_per_second if c.moe.feasible else None,
                "dense_tokens_per_second": c.dense.tokens_per_second if c.dense.feasible else None,
                "capacity_factor": c.capacity_factor,
                "reuse_gap": c.reuse_gap,
                "dense_speedup": c.dense_speedup,
                "moe_partition": str(c.moe.partition) if c.moe.partition else "infeasible",
                "dense_partition": str(c.dense.partition) if c.dense.partition else "infeasible",
            }
        )
    return rows


PLOT_GROUPS = (
    ("KV reads", ("hbm:kv",)),
    ("FFN/expert weight reads", ("hbm:dense_ffn", "hbm:shared_ffn", "hbm:routed_ffn")),
    ("attention/LM-head weight reads", ("hbm:projections", "hbm:lm_head")),
    (
        "compute (compute-bound step)",
        tuple(
            f"compute:{k}"
            for k in (
                "projections",
                "attention",
                "dense_ffn",
                "shared_ffn",
                "routed_ffn",
                "lm_head",
            )
        ),
    ),
    ("exposed communication", ("comm:attention", "comm:ffn", "comm:pipeline")),
)


def _breakdown_per_token(case: CaseResult, which: str) -> dict[str, float]:
    """Per-token seconds by plot group; the groups sum to the per-token time."""
    result = case.moe if which == "moe" else case.dense
    if not result.step:
        return {}
    step = result.step
    parts = step.critical_seconds()
    return {name: sum(parts.get(k, 0.0) for k in keys) / step.batch for name, keys in PLOT_GROUPS}


def plot_sweep(points: Sequence[SweepPoint], path: str, *, title: str = "") -> str:
    """Write a PNG: throughput of both models against the axis, and per-token time breakdowns."""
    try:
        import matplotlib
    except ImportError:
        raise SpecError(
            "--out",
            "writing the plot needs matplotlib",
            "pip install matplotlib, or pass --no-plot",
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = points[0].axis
    xs = [p.value for p in points]
    fig, (ax_tp, ax_moe, ax_dense) = plt.subplots(1, 3, figsize=(17, 5))
    for which, label, style in (("moe", "MoE", "o-"), ("dense", "dense twin", "s--")):
        ys = [
            (p.case.moe if which == "moe" else p.case.dense).tokens_per_second or float("nan")
            for p in points
        ]
        ax_tp.plot(xs, ys, style, label=label)
    ax_tp.set_ylabel("decode tokens/s (at each model's B_max)")
    ax_tp.set_yscale("log")
    ax_tp.legend()
    ax_tp.set_title("throughput")
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    idx = list(range(len(points)))
    for ax, which, name in ((ax_moe, "moe", "MoE"), (ax_dense, "dense", "dense twin")):
        parts = [_breakdown_per_token(p.case, which) for p in points]
        totals = [sum(part.values()) for part in parts]
        bottom = [0.0] * len(points)
        for (group, _), color in zip(PLOT_GROUPS, colors, strict=True):
            share = [
                100.0 * part.get(group, 0.0) / t if t > 0 else 0.0
                for part, t in zip(parts, totals, strict=True)
            ]
            ax.bar(idx, share, bottom=bottom, label=group, color=color)
            bottom = [b + v for b, v in zip(bottom, share, strict=True)]
        for i, t in zip(idx, totals, strict=True):
            if t > 0:
                ax.text(i, 101, f"{t * 1e6:.3g}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(idx)
        ax.set_xticklabels([_fmt_axis(axis, x) for x in xs], rotation=60, fontsize=7)
        ax.set_ylim(0, 125)
        ax.set_ylabel("share of per-token time (%); label: total in us")
        ax.set_title(f"{name}: per-token time breakdown")
        ax.legend(fontsize=7, loc="lower left")
    if axis != "q":
        ax_tp.set_xscale("log", base=2)
    ax_tp.set_xlabel({"context": "context tokens", "gpus": "GPUs", "q": "q"}[axis])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_axis(axis: str, x: float) -> str:
    if axis == "context":
        return format_tokens(int(x))
    return f"{x:g}"


def format_tokens(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
