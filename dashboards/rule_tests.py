"""`promtool test rules` cases for every alert (fire and must-not-fire), and the tests file with
the recording rules' cases (recording_rule_tests.py).

The cases (input series, evaluation times, which targets must and must not alert, with which
value) are written out here by hand against the default thresholds of `Config`; only the expected
annotation text is rendered from the alert's templates, since promtool compares it verbatim.
Written to deploy/prometheus/tests/moe-reuse-rules.test.yml by the generator.
"""

from __future__ import annotations

import re
from typing import Any

from . import promtool_cases as pc
from .config import Config
from .promtool_cases import DEC, PRE, A, B, C, D
from .recording_rule_tests import cluster_tests, pipeline_tests, recording_tests
from .rules import alerts

RULES_FILE_FROM_TESTS = "../moe-reuse-rules.yml"


_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def render(template: str, labels: dict[str, str], value: float) -> str:
    """Renders the two template forms the alerts use: `$labels.NAME` and
    `printf "%.Nf" $value`."""

    def one(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr.startswith("$labels."):
            return labels.get(expr[len("$labels.") :], "")
        pm = re.fullmatch(r'printf "(%\.\d+f)" \$value', expr)
        if pm:
            return pm.group(1) % value
        raise ValueError(f"unsupported template {expr!r}")

    return _TEMPLATE.sub(one, template)


def _expected(cfg: Config, alert: str, labels: dict[str, str], value: float) -> dict[str, Any]:
    a = next(a for a in alerts(cfg) if a.name == alert)
    return {
        "exp_labels": {"severity": a.severity, **labels},
        "exp_annotations": {
            "summary": a.summary,
            "description": render(a.description, labels, value),
            "runbook_url": a.runbook_url(cfg),
        },
    }


def _alert_case(
    cfg: Config, alert: str, at: str, fired: list[tuple[dict[str, str], float]]
) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [_expected(cfg, alert, lbl, v) for lbl, v in fired],
    }


def _collapse(cfg: Config) -> dict[str, Any]:
    a, b, c, d = (pc.labels(i) for i in (A, B, C, D))
    l0 = {"layer": "0", **DEC}
    series = [
        # a: 1 token per touched expert, ridge 20 tokens -> below 0.1 x 20: collapse.
        pc.series("moe_reuse_expert_assignments_total", {**a, **l0}, "0+60x40"),
        pc.series("moe_reuse_experts_touched_total", {**a, **l0}, "0+60x40"),
        pc.series("moe_reuse_tokens_total", {**a, **DEC}, "0+60x40"),
        pc.series("moe_reuse_ridge_point_tokens", a, "20x40"),
        # b: 4 tokens per touched expert, above 0.1 x 20: healthy.
        pc.series("moe_reuse_expert_assignments_total", {**b, **l0}, "0+240x40"),
        pc.series("moe_reuse_experts_touched_total", {**b, **l0}, "0+60x40"),
        pc.series("moe_reuse_tokens_total", {**b, **DEC}, "0+30x40"),
        pc.series("moe_reuse_ridge_point_tokens", b, "20x40"),
        # c: no ridge-point gauge: 1 < fallback 2 tokens: collapse.
        pc.series("moe_reuse_expert_assignments_total", {**c, **l0}, "0+60x40"),
        pc.series("moe_reuse_experts_touched_total", {**c, **l0}, "0+60x40"),
        pc.series("moe_reuse_tokens_total", {**c, **DEC}, "0+60x40"),
        # d: idle (no decode at all): no reuse to speak of, no alert.
        pc.series("moe_reuse_expert_assignments_total", {**d, **l0}, "100x40"),
        pc.series("moe_reuse_experts_touched_total", {**d, **l0}, "100x40"),
        pc.series("moe_reuse_tokens_total", {**d, **DEC}, "100x40"),
        pc.series("moe_reuse_ridge_point_tokens", d, "20x40"),
    ]
    name = "MoeReuseCollapse"
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            _alert_case(cfg, name, "5m", []),  # pending, not yet for 10m
            _alert_case(cfg, name, "25m", [(a, 1.0), (c, 1.0)]),
        ],
    }


def _dense_speedup(cfg: Config) -> dict[str, Any]:
    a, b, c = (pc.labels(i) for i in (A, B, C))
    name = "MoeReuseDenseSpeedupHigh"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_dense_speedup_ratio", a, "3x60"),
            pc.series("moe_reuse_dense_speedup_ratio", b, "1.5x60"),  # below 2x
            pc.series("moe_reuse_dense_speedup_ratio", c, "3x20 1x40"),  # never 30m in a row
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [(a, 3.0)]),
        ],
    }


def _dead_experts(cfg: Config) -> dict[str, Any]:
    a, b, c = (pc.labels(i) for i in (A, B, C))
    name = "MoeReuseDeadExperts"
    return {
        "interval": "1m",
        "input_series": [
            # a: 2 dead experts in layer 1 under 2 tokens/s.
            pc.series("moe_reuse_dead_experts", {**a, "layer": "0"}, "0x40"),
            pc.series("moe_reuse_dead_experts", {**a, "layer": "1"}, "2x40"),
            pc.series("moe_reuse_tokens_total", {**a, **PRE}, "0+120x40"),
            # b: 2 dead experts but idle: no traffic, nothing to conclude.
            pc.series("moe_reuse_dead_experts", {**b, "layer": "0"}, "2x40"),
            pc.series("moe_reuse_tokens_total", {**b, **PRE}, "500x40"),
            # c: busy and every expert used.
            pc.series("moe_reuse_dead_experts", {**c, "layer": "0"}, "0x40"),
            pc.series("moe_reuse_tokens_total", {**c, **PRE}, "0+120x40"),
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "10m", []),
            _alert_case(cfg, name, "25m", [(a, 2.0)]),
        ],
    }


def _load_imbalance(cfg: Config) -> dict[str, Any]:
    a, b = pc.labels(A), pc.labels(B)
    l0, l1 = {"layer": "0", **DEC}, {"layer": "1", **DEC}
    series = [
        # a, layer 0: max 12 tokens per step over a mean of 2 per touched expert: 6x.
        pc.series("moe_reuse_steps_total", {**a, "kind": "decode"}, "0+60x40"),
        pc.series("moe_reuse_expert_assignments_total", {**a, **l0}, "0+120x40"),
        pc.series("moe_reuse_experts_touched_total", {**a, **l0}, "0+60x40"),
        pc.series("moe_reuse_max_expert_tokens_total", {**a, **l0}, "0+720x40"),
        # a, layer 1: balanced (1x).
        pc.series("moe_reuse_expert_assignments_total", {**a, **l1}, "0+60x40"),
        pc.series("moe_reuse_experts_touched_total", {**a, **l1}, "0+60x40"),
        pc.series("moe_reuse_max_expert_tokens_total", {**a, **l1}, "0+60x40"),
        # b: 2x, below 4x.
        pc.series("moe_reuse_steps_total", {**b, "kind": "decode"}, "0+60x40"),
        pc.series("moe_reuse_expert_assignments_total", {**b, **l0}, "0+120x40"),
        pc.series("moe_reuse_experts_touched_total", {**b, **l0}, "0+60x40"),
        pc.series("moe_reuse_max_expert_tokens_total", {**b, **l0}, "0+240x40"),
    ]
    name = "MoeReuseLoadImbalance"
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            _alert_case(cfg, name, "10m", []),
            _alert_case(cfg, name, "25m", [(a, 6.0)]),
        ],
    }


def _routing_drift(cfg: Config) -> dict[str, Any]:
    a, b = pc.labels(A), pc.labels(B)
    name = "MoeReuseRoutingDrift"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_routing_drift_ratio", {**a, "layer": "0"}, "0.05x60"),
            pc.series("moe_reuse_routing_drift_ratio", {**a, "layer": "1"}, "0.5x60"),
            pc.series("moe_reuse_routing_drift_ratio", {**b, "layer": "0"}, "0.1x60"),
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [(a, 0.5)]),
        ],
    }


def _predictor(cfg: Config) -> dict[str, Any]:
    a, b = pc.labels(A), pc.labels(B)
    name = "MoeReusePredictorDiverging"
    qty = "quantity"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_model_error_ratio", {**a, qty: "step_seconds"}, "3x60"),
            pc.series("moe_reuse_model_error_ratio", {**a, qty: "step_bytes"}, "1x60"),
            pc.series("moe_reuse_model_error_ratio", {**a, qty: "tokens_per_expert"}, "0.25x60"),
            pc.series("moe_reuse_model_error_ratio", {**b, qty: "step_seconds"}, "1.5x60"),
            pc.series("moe_reuse_model_error_ratio", {**b, qty: "step_bytes"}, "0.6x60"),
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(
                cfg,
                name,
                "40m",
                [({**a, qty: "step_seconds"}, 3.0), ({**a, qty: "tokens_per_expert"}, 0.25)],
            ),
        ],
    }


def _plugin_disabled(cfg: Config) -> dict[str, Any]:
    a, b = pc.labels(A, reason="fault"), pc.labels(B, reason="recording")
    c, d = pc.labels(C, reason="not_moe"), pc.labels(D, reason="bind_failed")
    name = "MoeReusePluginDisabled"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_enabled", a, "_x4 0x10"),  # disabled from 4m on
            pc.series("moe_reuse_enabled", b, "1x15"),
            pc.series("moe_reuse_enabled", c, "0x15"),  # a dense model: never an alert
            pc.series("moe_reuse_enabled", d, "_x6 0x10"),  # never bound, from 6m on
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "3m", []),
            _alert_case(cfg, name, "4m", []),  # pending for 1m
            _alert_case(cfg, name, "8m", [(a, 0.0), (d, 0.0)]),
        ],
    }


def _rank_stale(cfg: Config) -> dict[str, Any]:
    a, b = pc.labels(A), pc.labels(B, rank="1")
    name = "MoeReuseRankStale"
    lim = cfg.rank_stale_seconds
    return {
        "interval": "1m",
        "input_series": [  # a: writes every second until 5m, then its age grows 60 s a minute
            pc.series("moe_reuse_snapshot_age_seconds", a, "0.5x5 60+60x15"),
            pc.series("moe_reuse_snapshot_age_seconds", b, "0.5x20"),
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "4m", []),
            _alert_case(cfg, name, "15m", [(a, 600.0)] if lim < 480 else []),
        ],
    }


def _counting_mismatch(cfg: Config) -> dict[str, Any]:
    a, b, c = pc.labels(A), pc.labels(B), pc.labels(C)
    name = "MoeReuseCountingMismatch"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_selfcheck_mismatch_assignments_total", a, "0x5 8+8x20"),  # from 6m
            pc.series("moe_reuse_selfcheck_mismatch_assignments_total", b, "_x3 16x20"),  # appears
            pc.series("moe_reuse_selfcheck_mismatch_assignments_total", c, "0x25"),  # exact
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "2m", []),
            _alert_case(cfg, name, "8m", [(a, 24.0), (b, 16.0)]),
        ],
    }


def _plugin_errors(cfg: Config) -> dict[str, Any]:
    a, b, c = pc.labels(A, stage="flush"), pc.labels(B, stage="capture"), pc.labels(C, stage="flush")
    name = "MoeReusePluginErrors"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_errors_total", a, "0x5 1x20"),  # 0 -> 1 at 6m
            pc.series("moe_reuse_errors_total", b, "_x3 1x20"),  # appears at 3m with 1
            pc.series("moe_reuse_errors_total", c, "0x25"),  # never
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "2m", []),
            _alert_case(cfg, name, "7m", [(a, 1.0), (b, 1.0)]),
            _alert_case(cfg, name, "20m", []),  # nothing new in the last 10m
        ],
    }


def _rebalance_would_help(cfg: Config) -> dict[str, Any]:
    a, b, c, d = (pc.labels(i) for i in (A, B, C, D))
    served, what_if = {"deployment": "served", "ep": "8"}, {"deployment": "what_if", "ep": "8"}
    name = "MoeReuseRebalanceWouldHelp"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_eplb_gain_ratio", {**a, **served}, "1.5x60"),
            pc.series("moe_reuse_eplb_gain_ratio", {**b, **served}, "1.05x60"),  # within 10%
            pc.series("moe_reuse_eplb_gain_ratio", {**c, **served}, "1.5x20 1x40"),  # not 30m
            pc.series("moe_reuse_eplb_gain_ratio", {**d, **what_if}, "3x60"),  # what-if only
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [({**a, **served}, 1.5)]),
        ],
    }


def _eplb_costs_more(cfg: Config) -> dict[str, Any]:
    a, b, c = (pc.labels(i, ep="16") for i in (A, B, C))
    name = "MoeReuseEplbCostsMore"
    return {
        "interval": "1m",
        "input_series": [
            pc.series("moe_reuse_eplb_net_gain_ratio", a, "0.8x60"),
            pc.series("moe_reuse_eplb_net_gain_ratio", b, "0.97x60"),  # within 5%
            pc.series("moe_reuse_eplb_net_gain_ratio", c, "1.3x60"),  # EPLB pays for itself
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [(a, 0.8)]),
        ],
    }


def tests_file(cfg: Config) -> dict[str, Any]:
    return {
        "rule_files": [RULES_FILE_FROM_TESTS],
        "evaluation_interval": "1m",
        "tests": [
            recording_tests(cfg),
            cluster_tests(cfg),
            pipeline_tests(cfg),
            _collapse(cfg),
            _dense_speedup(cfg),
            _dead_experts(cfg),
            _load_imbalance(cfg),
            _routing_drift(cfg),
            _predictor(cfg),
            _plugin_disabled(cfg),
            _plugin_errors(cfg),
            _rank_stale(cfg),
            _counting_mismatch(cfg),
            _rebalance_would_help(cfg),
            _eplb_costs_more(cfg),
        ],
    }
