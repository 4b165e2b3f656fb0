"""The "MoE reuse / overview" dashboard: one function per panel, named after the panel.

Layout only: every expression comes from `queries`, scoped to the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    common,
    dashboard,
    gauge,
    heatmap,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    Threshold,
    ThresholdsMode,
)

from . import queries as q
from .config import Config
from .panels import (
    DATASOURCE,
    UNIT_EXPERTS,
    UNIT_TIMES,
    UNIT_TOKENS,
    UNIT_TOKENS_PER_EXPERT,
    target,
    template_variables,
)

UID = "moe-reuse-overview"
TITLE = "MoE reuse / overview"


def _thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=v, color=c) for v, c in steps])
    )


def _legend() -> common.VizLegendOptions:
    return (
        common.VizLegendOptions()
        .display_mode(LegendDisplayMode.LIST)
        .placement(LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def _timeseries(
    title: str, description: str, unit: str, h: int = 8, w: int = 8
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .legend(_legend())
        .height(h)
        .span(w)
    )


# ------------------------------------------------------------------------------------------------
# Headline
# ------------------------------------------------------------------------------------------------


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
        .thresholds(_thresholds((None, "green"), (1.0, "yellow"), (t, "red")))
        .datasource(DATASOURCE)
        .with_target(target(q.dense_speedup(s), "{{model}} e{{engine}} r{{rank}}"))
        .height(8)
        .span(6)
    )


def tokens_per_expert_measured_vs_predicted(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
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
        _timeseries(
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
            "(MoeReuseCountingMismatch), 0 while counting is exact."
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
        .graph_mode(BigValueGraphMode.NONE)
        .height(8)
        .span(6)
    )


# ------------------------------------------------------------------------------------------------
# Routing
# ------------------------------------------------------------------------------------------------


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
    return _timeseries(
        "Load imbalance",
        "Per layer: the hottest expert's decode tokens over the mean decode tokens per touched "
        "expert (1 = balanced). The grouped GEMM waits for the hottest expert. "
        f"MoeReuseLoadImbalance fires above {cfg.load_imbalance_threshold:g}.",
        UNIT_TIMES,
    ).with_target(target(q.layer_load_imbalance(s), "L{{layer}} r{{rank}}"))


def dead_and_cold_experts(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
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
    return _timeseries(
        "Routing drift",
        "Per layer: Jensen-Shannon divergence (base 2, 0..1) of the window's expert "
        "distribution from the saved baseline. MoeReuseRoutingDrift fires above "
        f"{cfg.routing_drift_threshold:g}.",
        "percentunit",
    ).with_target(target(q.routing_drift(s), "L{{layer}} r{{rank}}"))


# ------------------------------------------------------------------------------------------------
# Hardware
# ------------------------------------------------------------------------------------------------


def hbm_bandwidth_achieved_vs_peak(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
            "HBM bandwidth: achieved vs peak",
            "Bytes the steps had to read from HBM (given the actual routing) divided by the "
            "steps' wall time, against the hardware's spec peak.",
            "Bps",
        )
        .with_target(target(q.hbm_achieved_bandwidth(s), "achieved r{{rank}}", "A"))
        .with_target(target(q.hbm_peak_bandwidth(s), "peak r{{rank}}", "B"))
    )


def hbm_bandwidth_measured_vs_modelled(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
            "HBM bandwidth: measured (GPM) vs modelled",
            "`measured`: the HBM traffic the GPU itself counted (NVML GPU performance monitoring, "
            "Hopper and newer: reads and writes of the whole device, other processes included) "
            "over wall time; `modelled`: the bytes the byte model says the steps had to read, "
            "over the same wall time. Measured at or above modelled is expected. No measured "
            "series where the GPU is not measured: see 'HBM measurement'.",
            "Bps",
            w=12,
        )
        .with_target(target(q.hbm_measured_bandwidth(s), "measured r{{rank}}", "A"))
        .with_target(target(q.hbm_modelled_bandwidth(s), "modelled r{{rank}}", "B"))
    )


def hbm_modelled_share(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("HBM traffic the byte model explains")
        .description(
            "Modelled HBM reads / measured HBM traffic (GPM), over wall time. Near 100% the "
            "byte model accounts for what the memory system moved; well below, something it "
            "does not model moves bytes (writes, activations, other processes on the GPU). Empty "
            "where the GPU is not measured."
        )
        .unit("percentunit")
        .decimals(0)
        .datasource(DATASOURCE)
        .with_target(target(q.hbm_modelled_over_measured(s), "r{{rank}}"))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.NONE)
        .height(8)
        .span(6)
    )


def hbm_measurement(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("HBM measurement")
        .description(
            "Whether each rank's GPU measures its HBM bandwidth, and why not: gpm (measuring), "
            "nvml_missing (pip install nvidia-ml-py), nvml_failed, device_not_found, "
            "gpm_unsupported (pre-Hopper, or GPM disabled), not_cuda (not an NVIDIA GPU). "
            "docs/metrics.md has each reason's fix."
        )
        .unit("none")
        .datasource(DATASOURCE)
        .with_target(target(q.hbm_measurement(s), "r{{rank}}: {{reason}}", instant=True))
        .text_mode(BigValueTextMode.NAME)
        .color_mode(BigValueColorMode.NONE)
        .graph_mode(BigValueGraphMode.NONE)
        .height(8)
        .span(6)
    )


def hbm_bytes_per_step(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
            "HBM bytes per step",
            "HBM bytes read per step by component (routed and shared experts, dense FFN, "
            "attention, embedding, KV cache); the parts stack to the total.",
            "bytes",
        )
        .with_target(target(q.hbm_bytes_per_step_by_component(s), "{{component}} r{{rank}}"))
        .stacking(common.StackingConfig().mode(StackingMode.NORMAL))
        .fill_opacity(30)
    )


def moe_comm_share_of_step_time(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return _timeseries(
        "MoE all-to-all / all-reduce share of step time",
        "Time in the MoE layers' collectives (EP all-to-all dispatch+combine, TP output "
        "all-reduce) as a share of step time. 0 when the deployment has no MoE collective "
        '(moe_reuse_moe_comm_info{mode="none"}).',
        "percentunit",
    ).with_target(target(q.moe_comm_share(s), "r{{rank}}"))


# ------------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------------


def batch_size_and_requests(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
            "Decode batch and requests",
            "Decode batch B (decode tokens per step with decode tokens, from the recorder) beside "
            "vLLM's running and waiting requests.",
            UNIT_TOKENS,
        )
        .with_target(target(q.decode_batch_tokens(s), "decode batch r{{rank}}", "A"))
        .with_target(target(q.requests_running(s), "running e{{engine}}", "B"))
        .with_target(target(q.requests_waiting(s), "waiting e{{engine}}", "C"))
    )


def kv_cache_usage(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return _timeseries(
        "KV cache usage",
        "vLLM's KV-cache usage (vllm:kv_cache_usage_perc, a 0..1 fraction). A full cache caps "
        "the decode batch, and with it the reuse.",
        "percentunit",
    ).with_target(target(q.kv_cache_usage(s), "{{model_name}} e{{engine}}"))


def p99_inter_token_latency(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return _timeseries(
        "P99 inter-token latency",
        "vLLM's own inter-token latency histogram (vllm:inter_token_latency_seconds), 99th "
        "percentile, beside the decode throughput; read it against the MoE state above.",
        "s",
    ).with_target(target(q.inter_token_latency_p99(s), "p99 {{model_name}} e{{engine}}"))


def decode_throughput(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
            "Token throughput",
            "Decode tokens computed per second (recorder) and tokens generated per second (vLLM).",
            "suffix: tok/s",
        )
        .with_target(target(q.decode_tokens_rate(s), "decode r{{rank}}", "A"))
        .with_target(target(q.generation_tokens_rate(s), "generated e{{engine}}", "B"))
    )


# ------------------------------------------------------------------------------------------------
# Predictor
# ------------------------------------------------------------------------------------------------


def model_error(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    lo, hi = cfg.model_error_lower, cfg.model_error_upper
    return (
        _timeseries(
            "Model error (predicted / measured)",
            "Predictor over measurement for step time, step bytes and tokens per expert; 1 is "
            f"exact. MoeReusePredictorDiverging fires outside [{lo:g}, {hi:g}].",
            UNIT_TIMES,
        )
        .with_target(target(q.model_error(s), "{{quantity}} r{{rank}}"))
        .thresholds(_thresholds((None, "red"), (lo, "green"), (hi, "red")))
    )


def step_time_measured_vs_predicted(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        _timeseries(
            "Decode step time: measured vs predicted",
            "Decode step time from the predictor's window (measured and predicted), and the "
            "recorder's mean step time by step kind.",
            "s",
        )
        .with_target(target(q.step_seconds(s), "{{source}} r{{rank}}", "A"))
        .with_target(target(q.step_duration_mean(s), "mean {{kind}} step r{{rank}}", "B"))
    )


# ------------------------------------------------------------------------------------------------
# Expert parallelism (EP advisor)
# ------------------------------------------------------------------------------------------------


def eplb_gain(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return _timeseries(
        "What EPLB would buy",
        "Predicted MoE time per decode step now / after vLLM's EPLB policy rebalances the "
        "experts on the live routing, for the served EP deployment and the what-if EP sizes "
        "(advisor_ep_sizes). Above 1 rebalancing helps; below 1 its replicas add more weight "
        f"reads than they save. MoeReuseRebalanceWouldHelp fires above "
        f"{1 + cfg.eplb_help_margin:g}x (served).",
        UNIT_TIMES,
    ).with_target(target(q.eplb_gain(s), "{{deployment}} EP{{ep}} r{{rank}}", "A")).with_target(
        target(q.eplb_net_gain(s), "EPLB on vs off, EP{{ep}} r{{rank}}", "B")
    )


def ep_balancedness(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return _timeseries(
        "EP balancedness",
        "Mean over max EP-rank load (vLLM's balancedness, 1 = every rank equally loaded) of the "
        "current placement and of the placement EPLB would choose, per deployment and EP size.",
        "percentunit",
    ).with_target(target(q.ep_balancedness(s), "{{deployment}} EP{{ep}} {{placement}}"))


def ep_rank_load(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return _timeseries(
        "Load per EP rank (served)",
        "Token-expert assignments per decode step on each EP rank of the served placement, "
        "summed over MoE layers. Empty when expert parallelism is off.",
        UNIT_TOKENS,
    ).with_target(target(q.ep_rank_tokens(s), "EP rank {{ep_rank}} of {{ep}} (r{{rank}})"))


def eplb_deciding_term(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("What decides")
        .unit("none")
        .description(
            "rank_load: compute-bound steps, the slowest rank's load sets the MoE time; "
            "replica_reads: bandwidth-bound steps, the weight reads of every touched replica do."
        )
        .datasource(DATASOURCE)
        .with_target(
            target(q.eplb_deciding_term(s), "{{deployment}} EP{{ep}}: {{term}}", instant=True)
        )
        .text_mode(BigValueTextMode.NAME)
        .color_mode(BigValueColorMode.NONE)
        .graph_mode(BigValueGraphMode.NONE)
        .height(8)
        .span(6)
    )


# ------------------------------------------------------------------------------------------------
# Dashboard
# ------------------------------------------------------------------------------------------------


def overview(cfg: Config) -> dashboard.Dashboard:
    rows: list[tuple[str, list[object]]] = [
        (
            "Reuse",
            [
                dense_would_be_faster(cfg),
                tokens_per_expert_measured_vs_predicted(cfg),
                plugin_status(cfg),
                ffn_regime(cfg),
                qs_and_reuse_gap(cfg),
                routing_cost(cfg),
            ],
        ),
        (
            "Routing",
            [
                expert_load_heatmap(cfg),
                hottest_experts(cfg),
                load_imbalance(cfg),
                dead_and_cold_experts(cfg),
                routing_drift(cfg),
            ],
        ),
        (
            "Hardware",
            [
                hbm_bandwidth_achieved_vs_peak(cfg),
                hbm_bytes_per_step(cfg),
                moe_comm_share_of_step_time(cfg),
                hbm_bandwidth_measured_vs_modelled(cfg),
                hbm_modelled_share(cfg),
                hbm_measurement(cfg),
            ],
        ),
        (
            "Serving",
            [
                batch_size_and_requests(cfg),
                kv_cache_usage(cfg),
                p99_inter_token_latency(cfg),
                decode_throughput(cfg),
            ],
        ),
        ("Predictor", [model_error(cfg), step_time_measured_vs_predicted(cfg)]),
        (
            "Expert parallelism",
            [eplb_gain(cfg), ep_balancedness(cfg), ep_rank_load(cfg), eplb_deciding_term(cfg)],
        ),
    ]
    d = (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Live MoE expert reuse from the vllm-moe-reuse plugin, on vLLM's own /metrics: "
            "tokens per expert against the ridge point, the dense-twin speedup, routing health, "
            "HBM bandwidth, MoE collectives, and vLLM's latency beside them."
        )
        .tags(["vllm", "moe", "moe-reuse"])
        .refresh(cfg.dashboard_refresh)
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .editable()
        .variables(template_variables())  # type: ignore[arg-type]
    )
    panel_id = 1
    for title, panels in rows:
        d = d.with_row(dashboard.Row(title).id(panel_id))
        panel_id += 1
        for p in panels:
            d = d.with_panel(p.id(panel_id))  # type: ignore[attr-defined]
            panel_id += 1
    return d
