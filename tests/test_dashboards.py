"""The generated Grafana dashboards: staleness, panel hygiene, and the metric contract."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from moe_reuse.dashboards import generate
from moe_reuse.dashboards.config import DEFAULT
from moe_reuse.dashboards.generate import REPO_ROOT, artifacts, dashboard_dicts, stale_files
from moe_reuse.dashboards.rules import rules_file

DOCS_METRICS = REPO_ROOT / "docs" / "metrics.md"
VLLM_LOGGERS = "vllm/v1/metrics/loggers.py"
# vLLM's own series the dashboards may use beside ours (names as exported).
VLLM_METRICS = {
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:generation_tokens_total",
}
OUR_LABELS = {"model", "engine", "rank", "layer", "phase", "kind", "stage", "component", "op",
              "mode", "source", "quantity", "regime", "model_kind", "expert", "le",
              "deployment", "ep", "placement", "term", "ep_rank"}  # fmt: skip
TARGET_LABELS = {"job", "instance", "pod"}
VLLM_LABELS = {"model_name", "engine", "le"}


def _documented_metrics() -> set[str]:
    text = DOCS_METRICS.read_text()
    names = set(re.findall(r"^\| `(moe_reuse_[a-z_]+)`", text, re.M))
    assert len(names) > 30, "could not parse docs/metrics.md"
    return names


def _panels() -> list[tuple[str, dict[str, Any]]]:
    return [
        (uid, p) for uid, d in dashboard_dicts().items() for p in d["panels"] if p["type"] != "row"
    ]


def _exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for _, p in _panels() for t in p.get("targets", [])]


def test_committed_files_are_up_to_date() -> None:
    stale = stale_files()
    assert stale == [], (
        f"stale generated files {stale}: run `python -m moe_reuse.dashboards.generate`"
    )


def test_check_mode_fails_on_stale_and_passes_after_generate(tmp_path: Path, capsys: Any) -> None:
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    assert "dashboards/generated/moe-reuse-overview.json" in capsys.readouterr().out
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert generate.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / generate.RULES_PATH).write_text("groups: []\n")
    (tmp_path / generate.GENERATED_DIR / "leftover.json").write_text("{}")
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert generate.RULES_PATH in out and "leftover.json" in out


def test_cli_subcommands() -> None:
    parser = argparse.ArgumentParser(prog="moe-reuse")
    generate.add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dashboards", "check"])
    assert args.func(args) == 0


def test_generated_json_is_sorted_and_indented() -> None:
    for rel, text in artifacts().items():
        if rel.endswith(".json"):
            assert text.startswith('{\n  "annotations"') and text.endswith("}\n")


def test_stable_uids_and_ids() -> None:
    dashes = dashboard_dicts()
    assert set(dashes) == {"moe-reuse-overview"}
    for uid, d in dashes.items():
        assert d["uid"] == uid
        ids = [p["id"] for p in d["panels"]]
        assert ids == list(range(1, len(ids) + 1))
        titles = [p["title"] for p in d["panels"]]
        assert len(titles) == len(set(titles))


def test_every_panel_has_a_unit_description_and_the_datasource_variable() -> None:
    for _, p in _panels():
        assert p.get("description"), p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"


def test_template_variables() -> None:
    for d in dashboard_dicts().values():
        var = {v["name"]: v for v in d["templating"]["list"]}
        assert list(var) == ["datasource", "model", "engine", "rank"]
        assert var["datasource"]["type"] == "datasource"
        assert var["datasource"]["query"] == "prometheus"
        for name in ("model", "engine", "rank"):
            assert var[name]["type"] == "query" and var[name]["includeAll"]
            assert f", {name})" in var[name]["query"]


def test_overview_covers_the_issue() -> None:
    titles = " | ".join(p["title"] for _, p in _panels()).lower()
    for needle in ("dense would be", "tokens per expert", "layer × expert",
                   "imbalance", "dead", "hbm bandwidth", "all-to-all", "batch", "kv cache",
                   "q·s", "regime", "model error", "p99 inter-token latency"):  # fmt: skip
        assert needle in titles, needle
    kinds = {p["type"] for _, p in _panels()}
    assert {"gauge", "heatmap", "timeseries", "stat"} <= kinds


def test_panel_queries_use_only_known_metrics_and_labels() -> None:
    documented = _documented_metrics()
    histograms = {m + s for m in documented for s in ("_bucket", "_sum", "_count")}
    for title, expr in _exprs():
        for name in re.findall(r"\b(moe_reuse_[a-z_]+)", expr):
            assert name in documented or name in histograms, f"{title}: unknown metric {name}"
        for name in re.findall(r"(vllm:[a-z_]+)", expr):
            assert name in VLLM_METRICS, f"{title}: unexpected vLLM metric {name}"
        labels = set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", expr))
        for grp in re.findall(r"(?:by|without|ignoring|on)\s*\(([^)]*)\)", expr):
            labels |= {x.strip() for x in grp.split(",") if x.strip()}
        assert labels <= OUR_LABELS | TARGET_LABELS | VLLM_LABELS, f"{title}: {labels}"
        # vLLM's series carry model_name, ours model.
        for sel in re.findall(r"vllm:[a-z_]+(\{[^}]*\})", expr):
            assert "model=" not in sel.replace("model_name", "")


def test_vllm_metric_names_exist_in_the_installed_vllm() -> None:
    vllm = pytest.importorskip("vllm")
    source = (Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py").read_text()
    for name in VLLM_METRICS:
        base = re.sub(r"_(bucket|total)$", "", name)
        assert f'"{base}"' in source, f"{name} not in {VLLM_LOGGERS}"
    assert 'labelnames = ["model_name", "engine"]' in source


def test_rules_use_only_documented_metrics() -> None:
    documented = _documented_metrics()
    for group in rules_file(DEFAULT)["groups"]:
        for r in group["rules"]:
            for name in re.findall(r"(?<![:\w])(moe_reuse_[a-z_]+)", r["expr"]):
                assert name in documented, f"{r.get('record') or r.get('alert')}: {name}"


def test_cardinality() -> None:
    """Per-expert series appear only under a topk cap; nothing aggregates by expert into a rule;
    a dashboard asks for a bounded number of queries."""
    for title, expr in _exprs():
        if "moe_reuse_expert_tokens_total" in expr:
            assert re.match(r"topk\((\d+),", expr), title
            assert int(re.match(r"topk\((\d+),", expr).group(1)) <= DEFAULT.heatmap_max_series  # type: ignore[union-attr]
    for group in rules_file(DEFAULT)["groups"]:
        for r in group["rules"]:
            assert "moe_reuse_expert_tokens_total" not in r["expr"]
            assert "expert)" not in r["expr"]
    # 38 before the measured HBM bandwidth (GPM), which added measured vs modelled, the share
    # the byte model explains, and why a rank is not measured; 43 with the MoE layers a rank
    # does not record (a speculative drafter's)
    assert len(_exprs()) <= 43
