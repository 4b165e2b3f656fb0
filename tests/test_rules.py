"""The generated Prometheus rules: promtool check/test, naming, and the config seam."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from moe_reuse.dashboards import rule_queries as rq
from moe_reuse.dashboards.config import DEFAULT
from moe_reuse.dashboards.generate import REPO_ROOT, RULE_TESTS_PATH, RULES_PATH
from moe_reuse.dashboards.rule_tests import tests_file as promtool_tests
from moe_reuse.dashboards.rules import alerts, recording_rules, render_rules, rules_file

RULES = REPO_ROOT / RULES_PATH
RULE_TESTS = REPO_ROOT / RULE_TESTS_PATH
EXPECTED_ALERTS = {
    "MoeReuseCollapse",
    "MoeReuseDenseSpeedupHigh",
    "MoeReuseDeadExperts",
    "MoeReuseLoadImbalance",
    "MoeReuseRoutingDrift",
    "MoeReusePredictorDiverging",
    "MoeReusePluginDisabled",
    "MoeReusePluginErrors",
    "MoeReuseRankStale",
    "MoeReuseCountingMismatch",
    "MoeReuseRebalanceWouldHelp",
    "MoeReuseEplbCostsMore",
}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None,
    reason="promtool not on PATH (apt-get install -y prometheus); CI installs it",
)


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


@needs_promtool
def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(recording_rules(DEFAULT)) + len(alerts(DEFAULT))
    assert f"SUCCESS: {n} rules found" in out.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    out = _promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests are not vacuous: rules with other thresholds fail them."""
    (tmp_path / "tests").mkdir()
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    cfg = replace(DEFAULT, load_imbalance_threshold=7.0, dense_speedup_threshold=5.0)
    (tmp_path / "moe-reuse-rules.yml").write_text(render_rules(cfg))
    out = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path / "tests")
    assert out.returncode != 0
    assert "MoeReuseLoadImbalance" in out.stdout + out.stderr
    assert "MoeReuseDenseSpeedupHigh" in out.stdout + out.stderr


@needs_promtool
def test_rules_with_short_test_config_are_valid(tmp_path: Path) -> None:
    cfg = replace(DEFAULT, rate_interval="20s", reuse_collapse_for="5s", rules_interval="1s")
    path = tmp_path / "rules.yml"
    path.write_text(render_rules(cfg))
    out = _promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "model_rank:moe_reuse_decode_tokens_per_expert:rate20s" in path.read_text()


def test_every_alert_and_recording_rule_has_a_unit_test() -> None:
    doc = promtool_tests(DEFAULT)
    tested_alerts: dict[str, list[bool]] = {}
    tested_records: set[str] = set()
    for t in doc["tests"]:
        for case in t.get("alert_rule_test", []):
            tested_alerts.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
        for case in t.get("promql_expr_test", []):
            tested_records.add(case["expr"])
    assert set(tested_alerts) == {a.name for a in alerts(DEFAULT)} == EXPECTED_ALERTS
    for name, fired in tested_alerts.items():
        assert True in fired, f"{name}: no case where it fires"
        assert False in fired, f"{name}: no case where it must not fire"
    assert tested_records == {r["record"] for r in recording_rules(DEFAULT)}


def test_every_firing_case_also_has_targets_that_must_not_fire() -> None:
    """Each alert test has input series for more targets than the ones expected to fire."""
    for t in promtool_tests(DEFAULT)["tests"]:
        cases = t.get("alert_rule_test", [])
        if not cases:
            continue
        instances = set(
            re.findall(r'instance="([^"]+)"', " ".join(s["series"] for s in t["input_series"]))
        )
        fired = {a["exp_labels"]["instance"] for c in cases for a in c["exp_alerts"]}
        assert instances - fired, f"{cases[0]['alertname']}: every target fires"


def test_rule_names_follow_the_mixin_conventions() -> None:
    for r in recording_rules(DEFAULT):
        level, metric, ops = r["record"].split(":")
        assert re.fullmatch(r"[a-z_]+", level) and metric.startswith("moe_reuse_")
        assert ops == "rate5m"
    for a in rules_file(DEFAULT)["groups"][1]["rules"]:
        assert re.fullmatch(r"MoeReuse[A-Z][A-Za-z]+", a["alert"])
        assert a["labels"]["severity"] in {"info", "warning", "critical"}
        ann = a["annotations"]
        assert ann["summary"] and ann["description"]
        assert ann["runbook_url"].endswith("docs/monitoring.md#" + a["alert"].lower())


def test_runbook_anchors_exist_in_docs() -> None:
    doc = (REPO_ROOT / "docs" / "monitoring.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", doc, re.M)
    }
    for a in alerts(DEFAULT):
        assert a.name.lower() in headings, f"docs/monitoring.md has no '### {a.name}' runbook"


def test_collapse_threshold_is_tied_to_the_ridge_point() -> None:
    expr = rq.alert_reuse_collapse(replace(DEFAULT, reuse_collapse_ridge_fraction=0.25))
    assert "0.25 * moe_reuse_ridge_point_tokens" in expr
    assert rq.rec(rq.REC_DECODE_TOKENS_PER_EXPERT, DEFAULT) in expr


def test_thresholds_come_from_the_config() -> None:
    cfg = replace(
        DEFAULT,
        dense_speedup_threshold=3.5,
        load_imbalance_threshold=6.5,
        routing_drift_threshold=0.35,
        model_error_lower=0.4,
        model_error_upper=2.5,
        dead_experts_threshold=3,
        reuse_collapse_for="7m",
        selector='job="vllm"',
    )
    by_name = {r["alert"]: r for r in rules_file(cfg)["groups"][1]["rules"]}
    assert "> 3.5" in by_name["MoeReuseDenseSpeedupHigh"]["expr"]
    assert "> 6.5" in by_name["MoeReuseLoadImbalance"]["expr"]
    assert "> 0.35" in by_name["MoeReuseRoutingDrift"]["expr"]
    assert "> 2.5" in by_name["MoeReusePredictorDiverging"]["expr"]
    assert "< 0.4" in by_name["MoeReusePredictorDiverging"]["expr"]
    assert ">= 3" in by_name["MoeReuseDeadExperts"]["expr"]
    assert by_name["MoeReuseCollapse"]["for"] == "7m"
    for rule in by_name.values():
        assert 'job="vllm"' in rule["expr"]
    for rule in rules_file(cfg)["groups"][0]["rules"]:
        # every raw series the recording rules read carries the selector
        for sel in re.findall(r"moe_reuse_[a-z_]+(\{[^}]*\})?\[", rule["expr"]):
            assert 'job="vllm"' in sel


def test_committed_rules_parse_as_yaml_with_two_groups() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert [g["name"] for g in doc["groups"]] == ["moe-reuse.rules", "moe-reuse.alerts"]
