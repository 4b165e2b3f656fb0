"""The "MoE reuse / overview" dashboard: its rows in order, each row's panels from its module
under `rows/` (one function per panel, named after the panel), ids assigned here.

Layout only: every expression comes from `queries`, scoped to the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync

from .config import Config
from .panels import template_variables
from .rows.eplb import (
    ep_balancedness,
    ep_rank_load,
    eplb_deciding_term,
    eplb_gain,
)
from .rows.hardware import (
    hbm_bandwidth_achieved_vs_peak,
    hbm_bandwidth_measured_vs_modelled,
    hbm_bytes_per_step,
    hbm_measurement,
    hbm_modelled_share,
    moe_comm_share_of_step_time,
)
from .rows.reuse import (
    dense_would_be_faster,
    ffn_regime,
    plugin_status,
    qs_and_reuse_gap,
    routing_cost,
    tokens_per_expert_measured_vs_predicted,
)
from .rows.routing import (
    dead_and_cold_experts,
    expert_load_heatmap,
    hottest_experts,
    load_imbalance,
    routing_drift,
)
from .rows.serving import (
    batch_size_and_requests,
    decode_throughput,
    kv_cache_usage,
    model_error,
    p99_inter_token_latency,
    step_time_measured_vs_predicted,
)

UID = "moe-reuse-overview"
TITLE = "MoE reuse / overview"


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
