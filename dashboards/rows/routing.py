"""The "Routing" row: where the tokens go (per-expert load, imbalance, dead and cold experts,
drift).

Layout only: every expression comes from `queries`, scoped to the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    heatmap,
    table,
    timeseries,
)

from .. import queries as q
from ..config import Config
from ..panels import (
    DATASOURCE,
    UNIT_EXPERTS,
    UNIT_TIMES,
    target,
    timeseries_panel,
)


def expert_load_heatmap(cfg: Config) -> heatmap.Panel:
    s = q.dashboard_scope(cfg)
    return (
        heatmap.Panel()
        .title("Expert load (layer × expert)")
        .description(
            "Share of each layer's tokens that each expert received, one row per (layer, "
            "expert). 1/E everywhere is a balanced router; hot rows are overloaded experts, empty "
            "rows dead ones. Needs the opt-in per-expert series "
            '(`--additional-config \'{"moe_reuse": {"per_expert_series": true}}\'`); experts '
            'past the plugin\'s cap are summed into expert="other".'
        )
        .unit("percentunit")
        .datasource(DATASOURCE)
        .with_target(
            target(q.expert_load_share(s, cfg.heatmap_max_series), "L{{layer}} E{{expert}}")
        )
        .calculate(False)
        .cell_gap(0)
        .color(heatmap.HeatmapColorOptions().scheme("Oranges").steps(64))
        .y_axis(heatmap.YAxisConfig().unit("none").axis_label("layer / expert"))
        .cell_values(heatmap.CellValues().unit("percentunit"))
        .height(12)
        .span(16)
    )


def hottest_experts(cfg: Config) -> table.Panel:
    s = q.dashboard_scope(cfg)
    return (
        table.Panel()
        .title("Hottest experts")
        .description(
            f"The {cfg.hot_experts_top_n} (layer, expert) cells with the largest share of their "
            "layer's tokens now (opt-in per-expert series)."
        )
        .unit("percentunit")
        .datasource(DATASOURCE)
        .with_target(
            target(
                q.hottest_experts(s, cfg.hot_experts_top_n), "L{{layer}} E{{expert}}", instant=True
            )
        )
        .height(12)
        .span(8)
    )


def load_imbalance(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return timeseries_panel(
        "Load imbalance",
        "Per layer: the hottest expert's decode tokens over the mean decode tokens per touched "
        "expert (1 = balanced). The grouped GEMM waits for the hottest expert. "
        f"MoeReuseLoadImbalance fires above {cfg.load_imbalance_threshold:g}.",
        UNIT_TIMES,
    ).with_target(target(q.layer_load_imbalance(s), "L{{layer}} r{{rank}}"))


def dead_and_cold_experts(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
            "Dead and cold experts",
            "Per layer: experts with zero tokens (dead) and below 5% of their fair share (cold) "
            "over the export window. Dead experts under load mean router collapse "
            "(MoeReuseDeadExperts).",
            UNIT_EXPERTS,
        )
        .with_target(target(q.dead_experts(s), "dead L{{layer}} r{{rank}}", "A"))
        .with_target(target(q.cold_experts(s), "cold L{{layer}} r{{rank}}", "B"))
    )


def routing_drift(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return timeseries_panel(
        "Routing drift",
        "Per layer: Jensen-Shannon divergence (base 2, 0..1) of the window's expert "
        "distribution from the saved baseline. MoeReuseRoutingDrift fires above "
        f"{cfg.routing_drift_threshold:g}.",
        "percentunit",
    ).with_target(target(q.routing_drift(s), "L{{layer}} r{{rank}}"))
