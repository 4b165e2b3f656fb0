"""`promtool test rules` cases for every recording rule and alert (fire and must-not-fire).

The cases (input series, evaluation times, which targets must and must not alert, with which
value) are written out here by hand against the default thresholds of `Config`; only the expected
annotation text is rendered from the alert's templates, since promtool compares it verbatim.
Written to deploy/prometheus/tests/moe-reuse-rules.test.yml by the generator.
"""

from __future__ import annotations

import re
from typing import Any

from . import rule_queries as rq
from .config import Config
from .rules import alerts

RULES_FILE_FROM_TESTS = "../moe-reuse-rules.yml"


def _labels(instance: str, **extra: str) -> dict[str, str]:
    return {
        "job": "vllm",
        "instance": instance,
        "model": "m",
        "engine": "0",
        "rank": "0",
        **extra,
    }


def _series(metric: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


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


A, B, C, D = "a:8000", "b:8000", "c:8000", "d:8000"
DEC, PRE = {"phase": "decode"}, {"phase": "prefill"}


def _recording_tests(cfg: Config) -> dict[str, Any]:
    """One target with two layers and prefill traffic that must be left out; a second target
    without a MoE collective for the comm-share fallback."""
    a = _labels(A)
    l0, l1 = {"layer": "0"}, {"layer": "1"}
    series = [
        _series("moe_reuse_expert_assignments_total", {**a, **l0, **DEC}, "0+120x30"),
        _series("moe_reuse_expert_assignments_total", {**a, **l1, **DEC}, "0+240x30"),
        _series("moe_reuse_expert_assignments_total", {**a, **l0, **PRE}, "0+6000x30"),
        _series("moe_reuse_expert_assignments_total", {**a, **l1, **PRE}, "0+6000x30"),
        _series("moe_reuse_experts_touched_total", {**a, **l0, **DEC}, "0+60x30"),
        _series("moe_reuse_experts_touched_total", {**a, **l1, **DEC}, "0+60x30"),
        _series("moe_reuse_experts_touched_total", {**a, **l0, **PRE}, "0+600x30"),
        _series("moe_reuse_experts_touched_total", {**a, **l1, **PRE}, "0+600x30"),
        _series("moe_reuse_max_expert_tokens_total", {**a, **l0, **DEC}, "0+180x30"),
        _series("moe_reuse_max_expert_tokens_total", {**a, **l1, **DEC}, "0+480x30"),
        _series("moe_reuse_max_expert_tokens_total", {**a, **l0, **PRE}, "0+9000x30"),
        _series("moe_reuse_steps_total", {**a, "kind": "decode"}, "0+30x30"),
        _series("moe_reuse_steps_total", {**a, "kind": "mixed"}, "0+30x30"),
        _series("moe_reuse_steps_total", {**a, "kind": "prefill"}, "0+6x30"),
        _series("moe_reuse_tokens_total", {**a, **DEC}, "0+120x30"),
        _series("moe_reuse_tokens_total", {**a, **PRE}, "0+6000x30"),
        _series("moe_reuse_step_duration_seconds_total", {**a, "kind": "decode"}, "0+15x30"),
        _series("moe_reuse_step_duration_seconds_total", {**a, "kind": "mixed"}, "0+15x30"),
        _series("moe_reuse_step_duration_seconds_total", {**a, "kind": "prefill"}, "0+30x30"),
        _series("moe_reuse_hbm_read_bytes_total", {**a, "component": "routed_experts"}, "0+6e9x30"),
        _series("moe_reuse_hbm_read_bytes_total", {**a, "component": "attention"}, "0+3e9x30"),
        _series("moe_reuse_moe_comm_seconds_total", {**a, "op": "all_reduce"}, "0+6x30"),
        _series("moe_reuse_moe_comm_info", {**a, "mode": "tp_all_reduce"}, "1x30"),
        _series("moe_reuse_moe_comm_info", {**_labels(B), "mode": "none"}, "1x30"),
        # a measures its GPU (GPM), b does not: b's info series only, no counters
        _series("moe_reuse_hbm_measured_bytes_total", a, "0+9e9x30"),
        _series("moe_reuse_hbm_measured_seconds_total", a, "0+60x30"),
        _series("moe_reuse_hbm_measurement_info", {**a, "source": "gpm", "reason": "gpm"},
                "1x30"),
        _series("moe_reuse_hbm_measurement_info",
                {**_labels(B), "source": "gpm", "reason": "not_cuda"}, "1x30"),
    ]

    def expect(name: str, samples: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
        return {
            "expr": rq.rec(name, cfg),
            "eval_time": "10m",
            "exp_samples": [
                {"labels": _sel(rq.rec(name, cfg), lbl), "value": v} for lbl, v in samples
            ],
        }

    return {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            # (120 + 240) assignments / (60 + 60) touched per minute; prefill left out.
            expect(rq.REC_DECODE_TOKENS_PER_EXPERT, [(a, 3.0)]),
            expect(rq.REC_LAYER_DECODE_TOKENS_PER_EXPERT, [({**a, **l0}, 2.0), ({**a, **l1}, 4.0)]),
            # layer 0: (180 / 60 decode+mixed steps) / (120 / 60) = 1.5; layer 1: 8 / 4 = 2.
            expect(rq.REC_LAYER_LOAD_IMBALANCE, [({**a, **l0}, 1.5), ({**a, **l1}, 2.0)]),
            # 120 decode tokens over 60 decode+mixed steps.
            expect(rq.REC_DECODE_BATCH_TOKENS, [(a, 2.0)]),
            expect(rq.REC_DECODE_TOKENS_RATE, [(a, 2.0)]),
            expect(rq.REC_TOKENS_RATE, [(a, 102.0)]),
            # 9e9 bytes per minute over 60 s of steps per minute.
            expect(rq.REC_HBM_ACHIEVED, [(a, 1.5e8)]),
            # 9e9 bytes measured per 60 s of wall time; b is not measured: no sample, not 0.
            expect(rq.REC_HBM_MEASURED, [(a, 1.5e8)]),
            # 6 s of all-reduce per 60 s of steps; target b has no collective: 0, not absent.
            expect(rq.REC_MOE_COMM_SHARE, [(a, 0.1), (_labels(B), 0.0)]),
        ],
    }


def _sel(metric: str, labels: dict[str, str]) -> str:
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _collapse(cfg: Config) -> dict[str, Any]:
    a, b, c, d = (_labels(i) for i in (A, B, C, D))
    l0 = {"layer": "0", **DEC}
    series = [
        # a: 1 token per touched expert, ridge 20 tokens -> below 0.1 x 20: collapse.
        _series("moe_reuse_expert_assignments_total", {**a, **l0}, "0+60x40"),
        _series("moe_reuse_experts_touched_total", {**a, **l0}, "0+60x40"),
        _series("moe_reuse_tokens_total", {**a, **DEC}, "0+60x40"),
        _series("moe_reuse_ridge_point_tokens", a, "20x40"),
        # b: 4 tokens per touched expert, above 0.1 x 20: healthy.
        _series("moe_reuse_expert_assignments_total", {**b, **l0}, "0+240x40"),
        _series("moe_reuse_experts_touched_total", {**b, **l0}, "0+60x40"),
        _series("moe_reuse_tokens_total", {**b, **DEC}, "0+30x40"),
        _series("moe_reuse_ridge_point_tokens", b, "20x40"),
        # c: no ridge-point gauge: 1 < fallback 2 tokens: collapse.
        _series("moe_reuse_expert_assignments_total", {**c, **l0}, "0+60x40"),
        _series("moe_reuse_experts_touched_total", {**c, **l0}, "0+60x40"),
        _series("moe_reuse_tokens_total", {**c, **DEC}, "0+60x40"),
        # d: idle (no decode at all): no reuse to speak of, no alert.
        _series("moe_reuse_expert_assignments_total", {**d, **l0}, "100x40"),
        _series("moe_reuse_experts_touched_total", {**d, **l0}, "100x40"),
        _series("moe_reuse_tokens_total", {**d, **DEC}, "100x40"),
        _series("moe_reuse_ridge_point_tokens", d, "20x40"),
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
    a, b, c = (_labels(i) for i in (A, B, C))
    name = "MoeReuseDenseSpeedupHigh"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_dense_speedup_ratio", a, "3x60"),
            _series("moe_reuse_dense_speedup_ratio", b, "1.5x60"),  # below 2x
            _series("moe_reuse_dense_speedup_ratio", c, "3x20 1x40"),  # never 30m in a row
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [(a, 3.0)]),
        ],
    }


def _dead_experts(cfg: Config) -> dict[str, Any]:
    a, b, c = (_labels(i) for i in (A, B, C))
    name = "MoeReuseDeadExperts"
    return {
        "interval": "1m",
        "input_series": [
            # a: 2 dead experts in layer 1 under 2 tokens/s.
            _series("moe_reuse_dead_experts", {**a, "layer": "0"}, "0x40"),
            _series("moe_reuse_dead_experts", {**a, "layer": "1"}, "2x40"),
            _series("moe_reuse_tokens_total", {**a, **PRE}, "0+120x40"),
            # b: 2 dead experts but idle: no traffic, nothing to conclude.
            _series("moe_reuse_dead_experts", {**b, "layer": "0"}, "2x40"),
            _series("moe_reuse_tokens_total", {**b, **PRE}, "500x40"),
            # c: busy and every expert used.
            _series("moe_reuse_dead_experts", {**c, "layer": "0"}, "0x40"),
            _series("moe_reuse_tokens_total", {**c, **PRE}, "0+120x40"),
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "10m", []),
            _alert_case(cfg, name, "25m", [(a, 2.0)]),
        ],
    }


def _load_imbalance(cfg: Config) -> dict[str, Any]:
    a, b = _labels(A), _labels(B)
    l0, l1 = {"layer": "0", **DEC}, {"layer": "1", **DEC}
    series = [
        # a, layer 0: max 12 tokens per step over a mean of 2 per touched expert: 6x.
        _series("moe_reuse_steps_total", {**a, "kind": "decode"}, "0+60x40"),
        _series("moe_reuse_expert_assignments_total", {**a, **l0}, "0+120x40"),
        _series("moe_reuse_experts_touched_total", {**a, **l0}, "0+60x40"),
        _series("moe_reuse_max_expert_tokens_total", {**a, **l0}, "0+720x40"),
        # a, layer 1: balanced (1x).
        _series("moe_reuse_expert_assignments_total", {**a, **l1}, "0+60x40"),
        _series("moe_reuse_experts_touched_total", {**a, **l1}, "0+60x40"),
        _series("moe_reuse_max_expert_tokens_total", {**a, **l1}, "0+60x40"),
        # b: 2x, below 4x.
        _series("moe_reuse_steps_total", {**b, "kind": "decode"}, "0+60x40"),
        _series("moe_reuse_expert_assignments_total", {**b, **l0}, "0+120x40"),
        _series("moe_reuse_experts_touched_total", {**b, **l0}, "0+60x40"),
        _series("moe_reuse_max_expert_tokens_total", {**b, **l0}, "0+240x40"),
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
    a, b = _labels(A), _labels(B)
    name = "MoeReuseRoutingDrift"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_routing_drift_ratio", {**a, "layer": "0"}, "0.05x60"),
            _series("moe_reuse_routing_drift_ratio", {**a, "layer": "1"}, "0.5x60"),
            _series("moe_reuse_routing_drift_ratio", {**b, "layer": "0"}, "0.1x60"),
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [(a, 0.5)]),
        ],
    }


def _predictor(cfg: Config) -> dict[str, Any]:
    a, b = _labels(A), _labels(B)
    name = "MoeReusePredictorDiverging"
    qty = "quantity"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_model_error_ratio", {**a, qty: "step_seconds"}, "3x60"),
            _series("moe_reuse_model_error_ratio", {**a, qty: "step_bytes"}, "1x60"),
            _series("moe_reuse_model_error_ratio", {**a, qty: "tokens_per_expert"}, "0.25x60"),
            _series("moe_reuse_model_error_ratio", {**b, qty: "step_seconds"}, "1.5x60"),
            _series("moe_reuse_model_error_ratio", {**b, qty: "step_bytes"}, "0.6x60"),
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
    a, b = _labels(A, reason="fault"), _labels(B, reason="recording")
    c, d = _labels(C, reason="not_moe"), _labels(D, reason="bind_failed")
    name = "MoeReusePluginDisabled"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_enabled", a, "_x4 0x10"),  # disabled from 4m on
            _series("moe_reuse_enabled", b, "1x15"),
            _series("moe_reuse_enabled", c, "0x15"),  # a dense model: never an alert
            _series("moe_reuse_enabled", d, "_x6 0x10"),  # never bound, from 6m on
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "3m", []),
            _alert_case(cfg, name, "4m", []),  # pending for 1m
            _alert_case(cfg, name, "8m", [(a, 0.0), (d, 0.0)]),
        ],
    }


def _rank_stale(cfg: Config) -> dict[str, Any]:
    a, b = _labels(A), _labels(B, rank="1")
    name = "MoeReuseRankStale"
    lim = cfg.rank_stale_seconds
    return {
        "interval": "1m",
        "input_series": [  # a: writes every second until 5m, then its age grows 60 s a minute
            _series("moe_reuse_snapshot_age_seconds", a, "0.5x5 60+60x15"),
            _series("moe_reuse_snapshot_age_seconds", b, "0.5x20"),
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "4m", []),
            _alert_case(cfg, name, "15m", [(a, 600.0)] if lim < 480 else []),
        ],
    }


def _counting_mismatch(cfg: Config) -> dict[str, Any]:
    a, b, c = _labels(A), _labels(B), _labels(C)
    name = "MoeReuseCountingMismatch"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_selfcheck_mismatch_assignments_total", a, "0x5 8+8x20"),  # from 6m
            _series("moe_reuse_selfcheck_mismatch_assignments_total", b, "_x3 16x20"),  # appears
            _series("moe_reuse_selfcheck_mismatch_assignments_total", c, "0x25"),  # exact
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "2m", []),
            _alert_case(cfg, name, "8m", [(a, 24.0), (b, 16.0)]),
        ],
    }


def _plugin_errors(cfg: Config) -> dict[str, Any]:
    a, b, c = _labels(A, stage="flush"), _labels(B, stage="capture"), _labels(C, stage="flush")
    name = "MoeReusePluginErrors"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_errors_total", a, "0x5 1x20"),  # 0 -> 1 at 6m
            _series("moe_reuse_errors_total", b, "_x3 1x20"),  # appears at 3m with 1
            _series("moe_reuse_errors_total", c, "0x25"),  # never
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "2m", []),
            _alert_case(cfg, name, "7m", [(a, 1.0), (b, 1.0)]),
            _alert_case(cfg, name, "20m", []),  # nothing new in the last 10m
        ],
    }


def _rebalance_would_help(cfg: Config) -> dict[str, Any]:
    a, b, c, d = (_labels(i) for i in (A, B, C, D))
    served, what_if = {"deployment": "served", "ep": "8"}, {"deployment": "what_if", "ep": "8"}
    name = "MoeReuseRebalanceWouldHelp"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_eplb_gain_ratio", {**a, **served}, "1.5x60"),
            _series("moe_reuse_eplb_gain_ratio", {**b, **served}, "1.05x60"),  # within 10%
            _series("moe_reuse_eplb_gain_ratio", {**c, **served}, "1.5x20 1x40"),  # not 30m
            _series("moe_reuse_eplb_gain_ratio", {**d, **what_if}, "3x60"),  # what-if only
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [({**a, **served}, 1.5)]),
        ],
    }


def _eplb_costs_more(cfg: Config) -> dict[str, Any]:
    a, b, c = (_labels(i, ep="16") for i in (A, B, C))
    name = "MoeReuseEplbCostsMore"
    return {
        "interval": "1m",
        "input_series": [
            _series("moe_reuse_eplb_net_gain_ratio", a, "0.8x60"),
            _series("moe_reuse_eplb_net_gain_ratio", b, "0.97x60"),  # within 5%
            _series("moe_reuse_eplb_net_gain_ratio", c, "1.3x60"),  # EPLB pays for itself
        ],
        "alert_rule_test": [
            _alert_case(cfg, name, "20m", []),
            _alert_case(cfg, name, "40m", [(a, 0.8)]),
        ],
    }


def _cluster_tests(cfg: Config) -> dict[str, Any]:
    """Two nodes: engine 0 is TP=2 with rank 0 on the API server's node (job vllm) and rank 1 on
    a node read by `moe-reuse exporter`; engine 1 (another DP engine) lives on the second node.
    The cluster rules count each engine once (its TP ranks compute the same tokens) and every
    rank's bytes."""
    n0 = {**_labels(A), "node": "n0"}
    e0r1 = {**_labels("n1:9477"), "job": "moe-reuse-exporter", "node": "n1", "rank": "1"}
    e1r0 = {**_labels("n1:9477"), "job": "moe-reuse-exporter", "node": "n1", "engine": "1"}
    l0, l1 = {"layer": "0"}, {"layer": "1"}
    series = []
    for lab, tok, asg, tch, hbm in ((n0, 120, 120, 60, "6e9"), (e0r1, 120, 120, 60, "6e9"),
                                    (e1r0, 60, 120, 60, "3e9")):
        series += [
            _series("moe_reuse_tokens_total", {**lab, **DEC}, f"0+{tok}x30"),
            _series("moe_reuse_tokens_total", {**lab, **PRE}, f"0+{5 * tok}x30"),
            _series("moe_reuse_expert_assignments_total", {**lab, **l0, **DEC}, f"0+{asg}x30"),
            _series("moe_reuse_expert_assignments_total", {**lab, **l1, **DEC}, f"0+{asg}x30"),
            _series("moe_reuse_expert_assignments_total", {**lab, **l0, **PRE}, "0+9000x30"),
            _series("moe_reuse_experts_touched_total", {**lab, **l0, **DEC}, f"0+{tch}x30"),
            _series("moe_reuse_experts_touched_total", {**lab, **l1, **DEC}, f"0+{tch}x30"),
            _series("moe_reuse_hbm_read_bytes_total", {**lab, "component": "routed_experts"},
                    f"0+{hbm}x30"),
        ]

    def expect(name: str, samples: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
        return {"expr": rq.rec(name, cfg), "eval_time": "10m",
                "exp_samples": [{"labels": _sel(rq.rec(name, cfg), lbl), "value": v}
                                for lbl, v in samples]}

    return {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            # engine 0 once (120/min), engine 1 (60/min): 3 decode tokens/s; prefill 5x.
            expect(rq.REC_CLUSTER_TOKENS_RATE, [({"model": "m", **DEC}, 3.0),
                                               ({"model": "m", **PRE}, 15.0)]),
            # (240 + 240) assignments / (120 + 120) touched a minute; engine 0 counted once.
            expect(rq.REC_CLUSTER_DECODE_TOKENS_PER_EXPERT, [({"model": "m"}, 2.0)]),
            # every rank's bytes: (6e9 + 6e9 + 3e9) a minute.
            expect(rq.REC_CLUSTER_HBM_READ_RATE, [({"model": "m"}, 2.5e8)]),
        ],
    }


def tests_file(cfg: Config) -> dict[str, Any]:
    return {
        "rule_files": [RULES_FILE_FROM_TESTS],
        "evaluation_interval": "1m",
        "tests": [
            _recording_tests(cfg),
            _cluster_tests(cfg),
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
