"""The predictor's subcommands: predict, sweep, whatif, models, hardware.

`add_subcommands` plugs them into the top-level `moe-reuse` parser (owned by the plugin).
Handlers return an exit status; a user mistake (a `SpecError`) becomes one line on stderr,
`moe-reuse: error: <field>: <problem>`, and status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from .deployment import PROFILES, Accounting
from .errors import SpecError
from .loading import (
    list_hardware_presets,
    list_model_presets,
    load_hardware_preset,
    load_model_preset,
    resolve_hardware,
    resolve_model,
)
from .quality import DEFAULT_Q
from .report import format_case, sweep_table
from .search import evaluate_case
from .sizes import active_params, kv_bytes_per_token, total_params
from .sweep import AXES, ROW_KEYS, plot_sweep, sweep, sweep_rows

PROG = "moe-reuse"


def parse_tokens(text: str, field: str = "--context") -> int:
    """'131072', '128k' (x1024) or '16M' (x1024^2) to a positive token count."""
    raw = str(text).strip()
    scale = 1
    if raw[-1:].lower() == "k":
        raw, scale = raw[:-1], 1 << 10
    elif raw[-1:].lower() == "m":
        raw, scale = raw[:-1], 1 << 20
    try:
        value = float(raw) * scale
    except ValueError:
        raise SpecError(
            field, f"{text!r} is not a token count", "use e.g. 131072, 128k or 16M"
        ) from None
    if value < 1 or value != int(value):
        raise SpecError(field, f"must be a whole number of tokens >= 1, got {text!r}")
    return int(value)


def _positive_int(text: str, field: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SpecError(field, f"{text!r} is not an integer") from None
    if value < 1:
        raise SpecError(field, f"must be >= 1, got {value}")
    return value


def _positive_float(text: str, field: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(field, f"{text!r} is not a number") from None
    if not value > 0:
        raise SpecError(field, f"must be > 0, got {text}")
    return value


def accounting_from_overrides(items: list[str] | None, profile: str = "vllm") -> Accounting:
    """`--set key=value` pairs applied to a profile's accounting (`--profile`, default vllm)."""
    if profile not in PROFILES:
        raise SpecError("--profile", f"unknown profile {profile!r}", f"use one of {', '.join(PROFILES)}")
    acc = PROFILES[profile]
    if not items:
        return acc
    types = {f.name: type(getattr(acc, f.name)) for f in fields(acc)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise SpecError(
                "--set", f"{item!r} is not KEY=VALUE with a known key", f"keys: {', '.join(types)}"
            )
        kind = types[key]
        try:
            if kind is bool:
                if value.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                changes[key] = value.strip().lower() in ("true", "1")
                continue
            changes[key] = (
                value if kind is str else kind(float(value)) if kind is int else kind(value)
            )
        except ValueError:
            raise SpecError(f"--set {key}", f"{value!r} is not a valid {kind.__name__}") from None
    return replace(acc, **changes)


def _load(args: argparse.Namespace) -> tuple[Any, Any, Accounting]:
    model = resolve_model(args.model, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
    hw = resolve_hardware(args.hardware)
    return model, hw, accounting_from_overrides(args.set, getattr(args, "profile", "vllm"))


def _predict(args: argparse.Namespace) -> int:
    model, hw, acc = _load(args)
    context = parse_tokens(args.context)
    gpus = _positive_int(str(args.gpus), "--gpus")
    q = _positive_float(str(args.q), "--q")
    batch = _positive_int(str(args.batch), "--batch") if args.batch is not None else None
    case = evaluate_case(model, hw, gpus, context, q=q, batch=batch, accounting=acc)
    if args.json:
        print(json.dumps(case.to_dict(detail=args.detail), indent=2, sort_keys=True))
    else:
        print(format_case(case))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    model, hw, acc = _load(args)
    if args.values:
        parts = [v for v in args.values.split(",") if v.strip()]
        if args.over == "context":
            values: list[float] | None = [float(parse_tokens(v, "--values")) for v in parts]
        elif args.over == "gpus":
            values = [float(_positive_int(v, "--values")) for v in parts]
        else:
            values = [_positive_float(v, "--values") for v in parts]
    else:
        values = None
    batch = _positive_int(str(args.batch), "--batch") if args.batch is not None else None
    points = sweep(
        model,
        hw,
        axis=args.over,
        values=values,
        gpus=_positive_int(str(args.gpus), "--gpus"),
        context_tokens=parse_tokens(args.context),
        q=_positive_float(str(args.q), "--q"),
        batch=batch,
        accounting=acc,
    )
    rows = sweep_rows(points)
    if args.csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue())
    else:
        print(sweep_table(rows))
    if not args.no_plot:
        title = f"{model.name} vs dense twin, {hw.name}"
        path = plot_sweep(points, args.out, title=title)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name in list_model_presets():
        m = load_model_preset(name)
        rows.append(
            {
                "name": name,
                "num_experts": m.num_experts,
                "experts_per_token": m.experts_per_token,
                "sparsity": m.sparsity,
                "total_params": total_params(m),
                "active_params": active_params(m),
                "attention": m.attention_kind,
                "weight_dtype": m.weight_dtype,
                "kv_bytes_per_token": kv_bytes_per_token(m),
                "recurrent_state_bytes": m.recurrent_state_bytes,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'preset':18} {'E':>5} {'k':>2} {'s':>8} {'total':>8} {'active':>7} {'attn':>4} {'weights':>7} {'KV/token':>9} {'state/seq':>9}"
    )
    for r in rows:
        print(
            f"{r['name']:18} {r['num_experts']:>5} {r['experts_per_token']:>2} {r['sparsity']:>8.4g} "
            f"{r['total_params'] / 1e9:>7.1f}B {r['active_params'] / 1e9:>6.1f}B {r['attention']:>4} "
            f"{r['weight_dtype']:>7} {r['kv_bytes_per_token'] / 1024:>7.1f}KiB "
            f"{r['recurrent_state_bytes'] / 2**20:>6.1f}MiB"
        )
    return 0


def _hardware(args: argparse.Namespace) -> int:
    rows = [load_hardware_preset(n) for n in list_hardware_presets()]
    if args.json:
        print(json.dumps([h.to_dict() for h in rows], indent=2))
        return 0
    print(
        f"{'preset':16} {'HBM':>7} {'HBM BW':>9} {'FP8':>10} {'BF16':>10} {'link':>9} {'node':>4}"
    )
    for h in rows:
        fp8 = h.peak_flops_per_second.get("fp8")
        print(
            f"{h.name:16} {h.hbm_capacity_bytes / 1e9:>5.0f}GB {h.hbm_bandwidth_bytes_per_second / 1e12:>6.2f}TB/s "
            f"{(fp8 or 0) / 1e12:>7.0f}TF/s {h.peak_flops_per_second.get('bf16', 0) / 1e12:>7.0f}TF/s "
            f"{h.intra_node_bandwidth_bytes_per_second / 1e9:>6.0f}GB/s {h.gpus_per_node:>4}"
        )
    return 0


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except SpecError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def _common(p: argparse.ArgumentParser, *, need_gpus: bool) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="preset name (see `moe-reuse models`) or path to a config.json",
    )
    p.add_argument(
        "--hardware",
        default="paper-reference",
        help="preset name (see `moe-reuse hardware`) or JSON file",
    )
    p.add_argument(
        "--gpus",
        required=need_gpus,
        default=None if need_gpus else 64,
        help="GPUs in the deployment",
    )
    p.add_argument(
        "--context",
        required=need_gpus,
        default=None if need_gpus else "128k",
        help="context tokens per sequence: 131072, 128k, 16M",
    )
    p.add_argument(
        "--q", default=DEFAULT_Q, help="quality-equivalence factor for the dense twin (default 5)"
    )
    p.add_argument(
        "--batch",
        default=None,
        help="evaluate both models at this batch instead of each one's B_max",
    )
    p.add_argument(
        "--weight-dtype", default=None, help="override the weight dtype (fp8, bf16, ...)"
    )
    p.add_argument("--kv-dtype", default=None, help="override the KV-cache dtype")
    add_profile_arguments(p)


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    """--profile and --set, shared by predict, sweep and whatif."""
    p.add_argument(
        "--profile",
        choices=list(PROFILES),
        default="vllm",
        help="accounting profile: vllm (default: how vLLM serves) or paper (the paper's tables); "
        "see docs/predictor.md",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override an accounting knob of the profile, e.g. --set usable_hbm_ratio=0.85 "
        "(repeatable)",
    )


def add_subcommands(subparsers: Any) -> None:
    """Add predict, sweep, models and hardware to an argparse subparsers object."""
    p = subparsers.add_parser("predict", help="MoE vs its quality-matched dense twin for one case")
    _common(p, need_gpus=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--detail", action="store_true", help="with --json: add step and memory breakdowns"
    )
    p.set_defaults(func=_guard(_predict))

    s = subparsers.add_parser(
        "sweep", help="sweep context, GPU count or q; print a table or CSV and plot"
    )
    _common(s, need_gpus=False)
    s.add_argument(
        "--over", choices=AXES, default="context", help="axis to sweep (default context, 1k..16M)"
    )
    s.add_argument("--values", default=None, help="comma-separated values for the axis")
    s.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    s.add_argument(
        "--out", default="moe-reuse-sweep.png", help="PNG path (default moe-reuse-sweep.png)"
    )
    s.add_argument("--no-plot", action="store_true", help="skip the PNG")
    s.set_defaults(func=_guard(_sweep))

    from .whatif_cli import add_whatif_subcommand, run_whatif

    add_whatif_subcommand(subparsers, add_profile_arguments)
    subparsers.choices["whatif"].set_defaults(func=_guard(run_whatif))

    m = subparsers.add_parser("models", help="list the model presets")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_guard(_models))

    h = subparsers.add_parser("hardware", help="list the hardware presets")
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=_guard(_hardware))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Analytical MoE reuse-fragmentation predictor"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry for `python -m moe_reuse.predictor`."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
