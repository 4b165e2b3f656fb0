"""The "Reuse" row: the headline gauge, measured against predicted tokens per expert, the
FFN regime and the plugin's own status.

Layout only: every expression comes from `queries`, scoped to the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    common,
    gauge,
    stat,
    timeseries,
)
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
)

from .. import queries as q
from ..config import Config
from ..panels import (
    DATASOURCE,
    UNIT_TIMES,
    UNIT_TOKENS_PER_EXPERT,
    target,
    thresholds,
    timeseries_panel,
)


def dense_would_be_faster(cfg: Config) -> gauge.Panel:
    s = q.dashboard_scope(cfg)
    t = cfg.dense_speedup_threshold
    return (
        gauge.Panel()
        .title("Dense would be X times faster")
        .description(
            "How many times faster the quality-matched dense twin would decode this workload on "
            "this hardware (predictor, per export window). Above 1 the MoE loses its advantage; "
            f"MoeReuseDenseSpeedupHigh fires above {t:g}x."
        )
        .unit(UNIT_TIMES)
        .decimals(2)
        .min(0)
        .max(max(4.0, 2 * t))
        .thresholds(thresholds((None, "green"), (1.0, "yellow"), (t, "red")))
        .datasource(DATASOURCE)
        .with_target(target(q.dense_speedup(s), "{{model}} e{{engine}} r{{rank}}"))
        .height(8)
        .span(6)
    )


def tokens_per_expert_measured_vs_predicted(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
            "Tokens per expert: measured vs predicted",
            "Decode tokens per touched expert per step (expert-local batch). `live` is computed "
            "from the recorder's counters; `measured`, `predicted_uniform` (B*k/E) and "
            "`predicted_distinct` (B*k / E(1-(1-k/E)^B)) come from the predictor's window; "
            "`ridge point` is where the expert FFN turns compute-bound. Far below it, every "
            "expert's weights are streamed for almost no tokens.",
            UNIT_TOKENS_PER_EXPERT,
            w=12,
        )
        .with_target(target(q.decode_tokens_per_expert(s), "live {{model}} r{{rank}}", "A"))
        .with_target(target(q.tokens_per_expert_gauge(s), "{{source}} {{model}} r{{rank}}", "B"))
        .with_target(target(q.ridge_point_tokens(s), "ridge point {{model}} r{{rank}}", "C"))
    )


def ffn_regime(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("FFN regime")
        .description(
            "Regime of the expert FFN at the live expert-local batch: bandwidth_bound (below "
            "the ridge point) or compute_bound. Shown by name; the value is always 1."
        )
        .unit("none")
        .datasource(DATASOURCE)
        .with_target(target(q.ffn_regime(s), "{{regime}}", instant=True))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("/.*/"))
        .graph_mode(BigValueGraphMode.NONE)
        .color_mode(BigValueColorMode.NONE)
        .text_mode(BigValueTextMode.NAME)
        .height(4)
        .span(6)
    )


def qs_and_reuse_gap(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
            "q·s and reuse gap",
            "q x s of the predictor, and the reuse gap: routing factor (E/k) x capacity factor "
            "(B_dense_max / B_moe_max from vLLM's real KV capacity), i.e. how many times less "
            "reuse the MoE gets than its dense twin at full batch.",
            UNIT_TIMES,
            h=4,
            w=6,
        )
        .with_target(target(q.qs(s), "q·s r{{rank}}", "A"))
        .with_target(target(q.reuse_gap(s), "reuse gap r{{rank}}", "B"))
    )


def routing_cost(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("Routing makes the MoE x times as costly")
        .description(
            "The MoE's decode step predicted under the routing the server really sees over the "
            "same under uniform routing (per export window). Below 1 the routing concentrates on "
            "fewer experts than uniform and each step reads fewer expert weights; above 1 it is "
            "dearer. The dense-speedup gauge already includes this."
        )
        .unit(UNIT_TIMES)
        .decimals(2)
        .datasource(DATASOURCE)
        .with_target(target(q.routing_cost(s), "{{model}} e{{engine}} r{{rank}}"))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.NONE)
        .height(4)
        .span(6)
    )


def plugin_status(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("Plugin status")
        .description(
            "`enabled` is 1 while the plugin records and 0, with the reason, when it does not "
            "(fault, bind_failed, no_moe_layers, unsupported_runner, no_rank_reporting; "
            "MoeReusePluginDisabled); `errors` counts the faults it caught "
            "(MoeReusePluginErrors); `dropped steps/s` are steps the flusher missed; `age` is "
            "how old each rank's snapshot is (MoeReuseRankStale); `miscounted` is the "
            "self-check, assignments counted minus scheduled tokens x top-k "
            "(MoeReuseCountingMismatch), 0 while counting is exact; `unrecorded MoE layers` "
            "are layers the rank runs that nothing counts (a speculative drafter's: MTP, EAGLE, "
            "a draft model; or a routing source the recorder was not sized for), 0 when the "
            "figures cover every MoE layer."
        )
        .unit("short")
        .datasource(DATASOURCE)
        .with_target(target(q.plugin_enabled(s), "enabled ({{reason}}) r{{rank}}", "A",
                            instant=True))
        .with_target(target(q.plugin_errors(s), "errors r{{rank}}", "B", instant=True))
        .with_target(
            target(q.dropped_steps_rate(s), "dropped steps/s r{{rank}}", "C", instant=True)
        )
        .with_target(target(q.snapshot_age(s), "age s r{{rank}}", "D", instant=True))
        .with_target(target(q.selfcheck_mismatch(s), "miscounted r{{rank}}", "E", instant=True))
        .with_target(target(q.unrecorded_moe_layers(s), "unrecorded MoE layers r{{rank}}", "F",
                            instant=True))
        .graph_mode(BigValueGraphMode.NONE)
        .height(8)
        .span(6)
    )
