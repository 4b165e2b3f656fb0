"""Writes every generated monitoring artifact; `--check` fails when a committed one is stale.

    python -m moe_reuse.dashboards.generate          # rewrite the files
    python -m moe_reuse.dashboards.generate --check  # exit 1 listing stale files (CI)
    moe-reuse dashboards generate|check              # same, from the project CLI

Outputs (paths relative to the repository root):
- dashboards/generated/<uid>.json       Grafana dashboards (sorted keys, indent 2)
- deploy/prometheus/moe-reuse-rules.yml Prometheus recording rules and alerts
- deploy/prometheus/tests/...     promtool unit tests of every rule and alert (rule_tests.py)
- deploy/k8s/prometheusrule.yaml        the same rules as a prometheus-operator PrometheusRule
- deploy/k8s/grafana-dashboards.yaml    the dashboards as a ConfigMap for Grafana's sidecar
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from .config import DEFAULT, Config
from .overview import overview
from .rule_tests import tests_file
from .rules import GENERATED_HEADER, dump_yaml, render_rules, rules_file


def _default_root() -> Path:
    """The checkout this module runs from, else the current directory.

    From a checkout (an editable install) the outputs belong to the repository. An installed wheel
    has no repository around it (this file sits in site-packages), so `moe-reuse dashboards
    generate|check` works on the current directory, as `make test` runs from the checkout.
    """
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


REPO_ROOT = _default_root()
GENERATED_DIR = "dashboards/generated"
RULES_PATH = "deploy/prometheus/moe-reuse-rules.yml"
RULE_TESTS_PATH = "deploy/prometheus/tests/moe-reuse-rules.test.yml"
K8S_RULE_PATH = "deploy/k8s/prometheusrule.yaml"
K8S_DASHBOARDS_PATH = "deploy/k8s/grafana-dashboards.yaml"
K8S_NAME = "vllm-moe-reuse"
K8S_COMMON_LABELS = {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/part-of": K8S_NAME}

DASHBOARDS: dict[str, Callable[[Config], Any]] = {"moe-reuse-overview": overview}


def dashboard_json(build: Callable[[Config], Any], cfg: Config) -> str:
    """A dashboard as sorted, indented JSON text."""
    return json.dumps(build(cfg).build(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def dashboard_dicts(cfg: Config = DEFAULT) -> dict[str, dict[str, Any]]:
    """uid -> dashboard model (parsed JSON)."""
    return {uid: json.loads(dashboard_json(b, cfg)) for uid, b in DASHBOARDS.items()}


def k8s_prometheus_rule(cfg: Config) -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": f"{K8S_NAME}-rules",
            "labels": {**K8S_COMMON_LABELS, "prometheus": "k8s", "role": "alert-rules"},
        },
        "spec": rules_file(cfg),
    }
    return GENERATED_HEADER + dump_yaml(doc)


def k8s_dashboards_configmap(cfg: Config) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{K8S_NAME}-dashboards",
            # Grafana's dashboard sidecar (kube-prometheus-stack) picks up this label.
            "labels": {**K8S_COMMON_LABELS, "grafana_dashboard": "1"},
        },
        "data": {f"{uid}.json": dashboard_json(b, cfg) for uid, b in DASHBOARDS.items()},
    }
    return GENERATED_HEADER + dump_yaml(doc)


def artifacts(cfg: Config = DEFAULT) -> dict[str, str]:
    """Repository-relative path -> file content, for every generated file."""
    out = {f"{GENERATED_DIR}/{uid}.json": dashboard_json(b, cfg) for uid, b in DASHBOARDS.items()}
    out[RULES_PATH] = render_rules(cfg)
    out[RULE_TESTS_PATH] = GENERATED_HEADER + dump_yaml(tests_file(cfg))
    out[K8S_RULE_PATH] = k8s_prometheus_rule(cfg)
    out[K8S_DASHBOARDS_PATH] = k8s_dashboards_configmap(cfg)
    return out


def stale_files(root: Path = REPO_ROOT, cfg: Config = DEFAULT) -> list[str]:
    """Generated files that are missing or differ from what the generator makes now, plus
    leftover dashboards the generator no longer makes."""
    want = artifacts(cfg)
    stale = [p for p, text in want.items() if _read(root / p) != text]
    gen_dir = root / GENERATED_DIR
    if gen_dir.is_dir():
        stale += [
            f"{GENERATED_DIR}/{f.name}"
            for f in sorted(gen_dir.glob("*.json"))
            if f"{GENERATED_DIR}/{f.name}" not in want
        ]
    return stale


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def write(root: Path = REPO_ROOT, cfg: Config = DEFAULT) -> list[str]:
    """Writes every artifact whose content changed; returns the paths written."""
    written = []
    for rel, text in artifacts(cfg).items():
        path = root / rel
        if _read(path) != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(rel)
    gen_dir = root / GENERATED_DIR
    for f in sorted(gen_dir.glob("*.json")):
        if f"{GENERATED_DIR}/{f.name}" not in artifacts(cfg):
            f.unlink()
            written.append(f"{GENERATED_DIR}/{f.name} (removed)")
    return written


def run(check: bool, root: Path = REPO_ROOT) -> int:
    if check:
        stale = stale_files(root)
        if stale:
            print(
                "Stale generated monitoring files (run `python -m moe_reuse.dashboards.generate`):"
            )
            for p in stale:
                print(f"  {p}")
            return 1
        print("Generated monitoring files are up to date.")
        return 0
    written = write(root)
    for p in written:
        print(f"wrote {p}")
    if not written:
        print("Generated monitoring files are up to date.")
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Adds `dashboards generate|check` to a top-level CLI (argparse subparsers action)."""
    p = subparsers.add_parser(
        "dashboards", help="generate or check the Grafana dashboards, rules and k8s manifests"
    )
    sub = p.add_subparsers(dest="dashboards_command", required=True)
    gen = sub.add_parser("generate", help="write the generated files")
    gen.set_defaults(func=lambda args: run(check=False))
    chk = sub.add_parser("check", help="exit 1 when a committed generated file is stale")
    chk.set_defaults(func=lambda args: run(check=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_reuse.dashboards.generate")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 listing stale files instead of writing"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO_ROOT,
        help="repository root (default: this checkout, or the current directory when installed)",
    )
    args = parser.parse_args(argv)
    return run(check=args.check, root=args.root)


if __name__ == "__main__":
    sys.exit(main())
