"""Prometheus recording rules and alerts, built from `queries` and one `Config`.

`rules_file(cfg)` returns the rules file as a dict (the `groups:` document Prometheus loads and the
`spec` of a PrometheusRule); `render_rules(cfg)` its YAML text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from . import queries as q
from . import rule_queries as rq
from .config import Config

RECORDING_GROUP = "moe-reuse.rules"
ALERTING_GROUP = "moe-reuse.alerts"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def runbook_url(self, cfg: Config) -> str:
        return f"{cfg.runbook_base_url}#{self.name.lower()}"

    def to_rule(self, cfg: Config) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": self.name, "expr": self.expr}
        if self.for_ not in ("", "0", "0s"):
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity}
        rule["annotations"] = {
            "summary": self.summary,
            "description": self.description,
            "runbook_url": self.runbook_url(cfg),
        }
        return rule


def recording_rules(cfg: Config) -> list[dict[str, str]]:
    """`level:metric:operations` series the alerts and heavy panels build on."""
    s = q.rules_scope(cfg)
    pairs = [
        (rq.REC_DECODE_TOKENS_PER_EXPERT, q.decode_tokens_per_expert(s)),
        (rq.REC_LAYER_DECODE_TOKENS_PER_EXPERT, q.layer_decode_tokens_per_expert(s)),
        (rq.REC_LAYER_LOAD_IMBALANCE, q.layer_load_imbalance(s)),
        (rq.REC_DECODE_BATCH_TOKENS, q.decode_batch_tokens(s)),
        (rq.REC_DECODE_TOKENS_RATE, q.decode_tokens_rate(s)),
        (rq.REC_TOKENS_RATE, q.tokens_rate(s)),
        (rq.REC_HBM_ACHIEVED, q.hbm_achieved_bandwidth(s)),
        (rq.REC_HBM_MEASURED, q.hbm_measured_bandwidth(s)),
        (rq.REC_MOE_COMM_SHARE, q.moe_comm_share(s)),
        (rq.REC_CLUSTER_TOKENS_RATE, rq.cluster_tokens_rate(s)),
        (rq.REC_CLUSTER_DECODE_TOKENS_PER_EXPERT, rq.cluster_decode_tokens_per_expert(s)),
        (rq.REC_CLUSTER_HBM_READ_RATE, rq.cluster_hbm_read_rate(s)),
    ]
    return [{"record": rq.rec(name, cfg), "expr": expr} for name, expr in pairs]


VALUE2 = '{{ printf "%.2f" $value }}'
VALUE0 = '{{ printf "%.0f" $value }}'
_WHO = "{{ $labels.model }} (engine {{ $labels.engine }}, rank {{ $labels.rank }}, {{ $labels.instance }})"


def alerts(cfg: Config) -> list[Alert]:
    """Every alert, in the order of docs/monitoring.md."""
    return [
        Alert(
            "MoeReuseCollapse",
            rq.alert_reuse_collapse(cfg),
            cfg.reuse_collapse_for,
            cfg.reuse_collapse_severity,
            "MoE expert reuse collapsed far below the hardware ridge point.",
            f"{_WHO} decodes only {VALUE2} tokens per touched expert per step, "
            f"below {cfg.reuse_collapse_ridge_fraction:g} x the ridge point "
            f"(moe_reuse_ridge_point_tokens; {cfg.reuse_collapse_fallback_tokens:g} tokens "
            f"when that gauge is absent) for {cfg.reuse_collapse_for}: every expert's weights "
            "are streamed from HBM for almost no tokens, so decode is bandwidth-bound.",
        ),
        Alert(
            "MoeReuseDenseSpeedupHigh",
            rq.alert_dense_speedup_high(cfg),
            cfg.dense_speedup_for,
            cfg.dense_speedup_severity,
            "A quality-matched dense model would decode this workload much faster.",
            f"The predictor says the dense twin of {_WHO} would decode this workload "
            f"{VALUE2}x faster on this hardware (threshold "
            f"{cfg.dense_speedup_threshold:g}x, for {cfg.dense_speedup_for}).",
        ),
        Alert(
            "MoeReuseDeadExperts",
            rq.alert_dead_experts(cfg),
            cfg.dead_experts_for,
            cfg.dead_experts_severity,
            "Experts receive no tokens at all: the router may have collapsed.",
            f"{_WHO} has {VALUE0} experts without a single token over the export window "
            f"in its worst layer (threshold {cfg.dead_experts_threshold}) while serving at least "
            f"{cfg.dead_experts_min_tokens_per_second:g} tokens/s, for {cfg.dead_experts_for}.",
        ),
        Alert(
            "MoeReuseLoadImbalance",
            rq.alert_load_imbalance(cfg),
            cfg.load_imbalance_for,
            cfg.load_imbalance_severity,
            "Decode load across experts is badly imbalanced.",
            f"In the worst layer of {_WHO} the hottest expert gets {VALUE2}x "
            f"the mean decode tokens per touched expert (threshold "
            f"{cfg.load_imbalance_threshold:g}x, for {cfg.load_imbalance_for}); the step waits "
            "for the hottest expert.",
        ),
        Alert(
            "MoeReuseRoutingDrift",
            rq.alert_routing_drift(cfg),
            cfg.routing_drift_for,
            cfg.routing_drift_severity,
            "Expert routing drifted away from its saved baseline.",
            f"The expert distribution of the worst layer of {_WHO} is "
            f"{VALUE2} (Jensen-Shannon, base 2) away from the baseline "
            f"(threshold {cfg.routing_drift_threshold:g}, for {cfg.routing_drift_for}).",
        ),
        Alert(
            "MoeReusePredictorDiverging",
            rq.alert_predictor_diverging(cfg),
            cfg.model_error_for,
            cfg.model_error_severity,
            "The reuse predictor disagrees with the measurement.",
            f"predicted / measured {{{{ $labels.quantity }}}} of {_WHO} is "
            f"{VALUE2}, outside [{cfg.model_error_lower:g}, "
            f"{cfg.model_error_upper:g}] for {cfg.model_error_for}; the live dense-speedup "
            "figure cannot be trusted.",
        ),
        Alert(
            "MoeReusePluginDisabled",
            rq.alert_plugin_disabled(cfg),
            cfg.plugin_disabled_for,
            cfg.plugin_disabled_severity,
            "The MoE reuse plugin disabled itself.",
            f"moe_reuse_enabled is 0 on {_WHO} with reason {{{{ $labels.reason }}}}: the plugin "
            "records nothing there (fault: a runtime fault disabled it; bind_failed, "
            "no_moe_layers, unsupported_runner: it never started; no_rank_reporting: no worker "
            "published at all). vLLM keeps serving.",
        ),
        Alert(
            "MoeReuseRankStale",
            rq.alert_rank_stale(cfg),
            cfg.rank_stale_for,
            cfg.rank_stale_severity,
            "A rank stopped publishing its MoE reuse snapshot.",
            f"The snapshot of {_WHO} is {VALUE2} s old (threshold {cfg.rank_stale_seconds:g} s, "
            f"for {cfg.rank_stale_for}): the worker died or hangs, and its series are gone.",
        ),
        Alert(
            "MoeReuseCountingMismatch",
            rq.alert_counting_mismatch(cfg),
            "",
            cfg.selfcheck_severity,
            "The recorder's counts disagree with vLLM's scheduler.",
            f"{_WHO} counted expert assignments that differ from scheduled tokens x top-k over the "
            f"last {cfg.selfcheck_window} ({VALUE2} assignments): a routing source is missed or a "
            "vLLM change moved the step layout; the reuse figures cannot be trusted.",
        ),
        Alert(
            "MoeReusePluginErrors",
            rq.alert_plugin_errors(cfg),
            "",
            cfg.plugin_errors_severity,
            "The MoE reuse plugin caught runtime errors.",
            f"{_WHO} counted new moe_reuse_errors_total in stage {{{{ $labels.stage }}}} "
            f"over the last {cfg.plugin_errors_window}.",
        ),
        Alert(
            "MoeReuseRebalanceWouldHelp",
            rq.alert_rebalance_would_help(cfg),
            cfg.eplb_help_for,
            cfg.eplb_help_severity,
            "Rebalancing the experts across EP ranks would speed up decode.",
            f"vLLM's EPLB policy, rerun on the live routing of {_WHO}, is predicted to make the "
            f"MoE layers of a decode step {VALUE2}x faster ({{{{ $labels.deployment }}}} "
            f"deployment, EP {{{{ $labels.ep }}}}; threshold {1 + cfg.eplb_help_margin:g}x, for "
            f"{cfg.eplb_help_for}). See moe_reuse_eplb_deciding_term for why.",
        ),
        Alert(
            "MoeReuseEplbCostsMore",
            rq.alert_eplb_costs_more(cfg),
            cfg.eplb_cost_for,
            cfg.eplb_cost_severity,
            "EPLB is on and its replicas cost more than the balance they buy.",
            f"With EPLB's placement {_WHO} is predicted to run its MoE layers at {VALUE2}x "
            f"the speed of plain contiguous placement (EP {{{{ $labels.ep }}}}; threshold "
            f"{1 - cfg.eplb_cost_margin:g}, for {cfg.eplb_cost_for}): in bandwidth-bound decode "
            "every replica of a hot expert is one more weight read.",
        ),
    ]


def rules_file(cfg: Config) -> dict[str, Any]:
    """The rules document: one recording group, one alerting group."""
    groups: list[dict[str, Any]] = []
    for name, rules in (
        (RECORDING_GROUP, recording_rules(cfg)),
        (ALERTING_GROUP, [a.to_rule(cfg) for a in alerts(cfg)]),
    ):
        group: dict[str, Any] = {"name": name}
        if cfg.rules_interval:
            group["interval"] = cfg.rules_interval
        group["rules"] = rules
        groups.append(group)
    return {"groups": groups}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the PromQL reads as written."""


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)

GENERATED_HEADER = (
    "# Generated by `python -m moe_reuse.dashboards.generate` from dashboards/{rules,rule_queries,queries,config}.py.\n"
    "# Do not edit: change the Python and regenerate (CI fails when this file is stale).\n"
)


def dump_yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def render_rules(cfg: Config) -> str:
    return GENERATED_HEADER + dump_yaml(rules_file(cfg))
