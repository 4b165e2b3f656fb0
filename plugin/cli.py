"""`moe-reuse`: one command line for the demo, the predictor, dashboards and calibration.

Each area owns its subcommands (`add_subcommands(subparsers)`); this module only assembles them,
so the predictor's commands keep working without vLLM or torch installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (module, needs vLLM/torch): modules whose import fails are left out with a note in --help.
_AREAS = (
    "moe_reuse.plugin.harness.demo",
    "moe_reuse.predictor.cli",
    "moe_reuse.dashboards.generate",
    "moe_reuse.plugin.calibrate",
    "moe_reuse.plugin.live.baseline_cli",
    "moe_reuse.plugin.live.eplb_cli",
    "moe_reuse.plugin.harness.dense_ab",
    "moe_reuse.plugin.exporters.node",
)


def _config_cmd(args: argparse.Namespace) -> int:
    from .config import describe_keys

    print('--additional-config \'{"moe_reuse": {...}}\' keys (an empty object takes the defaults):')
    for key, default, doc in describe_keys():
        print(f"  {key:26s} default {default:12s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-reuse",
        description="Live MoE expert-reuse telemetry for vLLM, and the reuse-fragmentation predictor.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    missing = []
    for name in _AREAS:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
            continue
        module.add_subcommands(sub)
    cfg = sub.add_parser("config", help="list the plugin's configuration keys")
    cfg.set_defaults(func=_config_cmd)
    if missing:
        parser.epilog = "unavailable here: " + "; ".join(missing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
