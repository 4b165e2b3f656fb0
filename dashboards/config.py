"""The one place where selectors, intervals, alert thresholds and `for` durations are set.

Every query, recording rule, alert and dashboard is a function of a `Config`. The generated files
under `dashboards/generated/`, `deploy/prometheus/` and `deploy/k8s/` come from `DEFAULT`; tests build
variants (short `for`s, thresholds that make an alert fire) with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """Selectors, intervals and alert thresholds (see docs/monitoring.md for what each one means)."""

    # --- selectors -----------------------------------------------------------------------------
    # Extra label matchers put on every moe_reuse_* series in rules and alerts, e.g. 'job="vllm"'.
    selector: str = ""
    # Same, for vLLM's own `vllm:*` series used beside ours.
    vllm_selector: str = ""
    # Window of the recording rules (and of the alerts built on them); also their name suffix.
    rate_interval: str = "5m"
    # Window of the dashboards' rates (Grafana fills it from the scrape interval).
    dashboard_rate_interval: str = "$__rate_interval"

    # --- rule groups ---------------------------------------------------------------------------
    # Evaluation interval of the generated rule groups; None keeps Prometheus' global one.
    rules_interval: str | None = None
    runbook_base_url: str = (
        "https://github.com/vllm-moe-reuse/vllm-moe-reuse/blob/main/docs/monitoring.md"
    )

    # --- MoeReuseCollapse ----------------------------------------------------------------------
    # Fires when decode tokens per touched expert stay below this fraction of the hardware's
    # ridge point (`moe_reuse_ridge_point_tokens`): the experts' weights are streamed from HBM
    # for almost no tokens each.
    reuse_collapse_ridge_fraction: float = 0.1
    # Used instead of `fraction x ridge point` while the ridge-point gauge is absent.
    reuse_collapse_fallback_tokens: float = 2.0
    # Decode tokens per second below which the alert stays quiet (an idle server is no collapse).
    reuse_collapse_min_decode_tokens_per_second: float = 0.0
    reuse_collapse_for: str = "10m"
    reuse_collapse_severity: str = "warning"

    # --- MoeReuseDenseSpeedupHigh --------------------------------------------------------------
    # Dense twin would decode this workload more than this many times faster.
    dense_speedup_threshold: float = 2.0
    dense_speedup_for: str = "30m"
    dense_speedup_severity: str = "info"

    # --- MoeReuseDeadExperts -------------------------------------------------------------------
    # At least this many experts of one layer received no token over the export window ...
    dead_experts_threshold: int = 1
    # ... while the rank computed at least this many tokens per second (enough traffic that a
    # healthy router would have touched every expert).
    dead_experts_min_tokens_per_second: float = 1.0
    dead_experts_for: str = "15m"
    dead_experts_severity: str = "critical"

    # --- MoeReuseLoadImbalance -----------------------------------------------------------------
    # Hottest expert's decode tokens / mean tokens per touched expert, worst layer.
    load_imbalance_threshold: float = 4.0
    load_imbalance_for: str = "15m"
    load_imbalance_severity: str = "warning"

    # --- MoeReuseRoutingDrift ------------------------------------------------------------------
    # Jensen-Shannon divergence (base 2, 0..1) from the saved baseline, worst layer.
    routing_drift_threshold: float = 0.2
    routing_drift_for: str = "30m"
    routing_drift_severity: str = "warning"

    # --- MoeReusePredictorDiverging ------------------------------------------------------------
    # predicted / measured outside [lower, upper] for any quantity.
    model_error_lower: float = 0.5
    model_error_upper: float = 2.0
    model_error_for: str = "30m"
    model_error_severity: str = "info"

    # --- MoeReusePluginDisabled / MoeReusePluginErrors -----------------------------------------
    plugin_disabled_for: str = "1m"
    plugin_disabled_severity: str = "warning"
    plugin_errors_window: str = "10m"
    plugin_errors_severity: str = "warning"

    # --- MoeReuseRankStale: a rank's snapshot not rewritten for this long (worker gone or hung;
    # the flusher rewrites it every flush_interval_s, traffic or not).
    rank_stale_seconds: float = 60.0
    rank_stale_for: str = "2m"
    rank_stale_severity: str = "warning"

    # --- MoeReuseCountingMismatch: counted assignments differ from the scheduler's tokens x top-k
    # (the recorder's self-check; 0 while counting is exact).
    selfcheck_window: str = "10m"
    selfcheck_severity: str = "warning"

    # --- MoeReuseRebalanceWouldHelp / MoeReuseEplbCostsMore (EP advisor) -------------------------
    # Fires when vLLM's EPLB policy, rerun on the window's counts, is predicted to cut the MoE
    # time per decode step by more than this margin (eplb_gain_ratio > 1 + margin) ...
    eplb_help_margin: float = 0.1
    # ... for these deployments (regex on the `deployment` label; "served|what_if" includes the
    # hypothetical EP sizes of `advisor_ep_sizes`, which fire on any skewed server).
    eplb_help_deployments: str = "served"
    eplb_help_for: str = "30m"
    eplb_help_severity: str = "info"
    # EPLB is on and the served placement is predicted slower than plain contiguous placement
    # by more than this margin (eplb_net_gain_ratio < 1 - margin): replicas cost more reads
    # than the balance they buy.
    eplb_cost_margin: float = 0.05
    eplb_cost_for: str = "30m"
    eplb_cost_severity: str = "warning"

    # --- dashboards ----------------------------------------------------------------------------
    # Largest number of per-expert cells the heatmap asks for (topk over the opt-in series).
    heatmap_max_series: int = 512
    # Number of hottest experts listed in the "Hottest experts" panel.
    hot_experts_top_n: int = 10
    dashboard_refresh: str = "30s"

    @property
    def rate_suffix(self) -> str:
        """Operations suffix of recording-rule names, e.g. `rate5m`."""
        return "rate" + self.rate_interval


DEFAULT = Config()
