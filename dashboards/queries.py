"""The PromQL of the dashboards and of what the recording rules record, kept apart from layout
(rule_queries.py adds the recorded names, cluster totals and alert expressions).

Every function takes a `Scope` (label matchers and rate window) and returns one expression. The
dashboards call them with Grafana's template variables and `$__rate_interval`; the recording rules
with `Config.selector` and `Config.rate_interval`. Metric names and labels follow docs/metrics.md.

Aggregations use `sum without (...)` over the labels they fold (`layer`, `phase`, `kind`,
`component`, `op`), so every result keeps the target labels (`job`, `instance`, ...) and the
plugin's `model`, `engine`, `rank`: two replicas of one model never get summed into one figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class Scope:
    """Where a query looks: matchers for our series, for vLLM's, and the rate window."""

    matchers: str = ""
    vllm_matchers: str = ""
    interval: str = "5m"

    def sel(self, *extra: str) -> str:
        """`{extra..., matchers}` for a moe_reuse_* series (empty braces are dropped)."""
        parts = [p for p in (*extra, self.matchers) if p]
        return "{" + ", ".join(parts) + "}" if parts else ""

    def vsel(self, *extra: str) -> str:
        """Same for vLLM's own series (labels `model_name`, `engine`)."""
        parts = [p for p in (*extra, self.vllm_matchers) if p]
        return "{" + ", ".join(parts) + "}" if parts else ""

    def rate(self, metric: str, *extra: str) -> str:
        return f"rate({metric}{self.sel(*extra)}[{self.interval}])"


def rules_scope(cfg: Config) -> Scope:
    """Scope of the recording rules and alerts."""
    return Scope(cfg.selector, cfg.vllm_selector, cfg.rate_interval)


def dashboard_scope(cfg: Config) -> Scope:
    """Scope of the dashboards: template variables `$model`, `$engine`, `$rank`."""
    ours = 'model=~"$model", engine=~"$engine", rank=~"$rank"'
    vllm = 'model_name=~"$model", engine=~"$engine"'
    return Scope(
        ", ".join(p for p in (ours, cfg.selector) if p),
        ", ".join(p for p in (vllm, cfg.vllm_selector) if p),
        cfg.dashboard_rate_interval,
    )


DECODE = 'phase="decode"'
DECODE_STEPS = 'kind=~"decode|mixed"'
NO_COMM = 'mode="none"'

# ------------------------------------------------------------------------------------------------
# Reuse (tokens per expert)
# ------------------------------------------------------------------------------------------------


def decode_tokens_per_expert(s: Scope) -> str:
    """Live reuse: decode tokens per touched expert per step, averaged over layers.

    = routed decode assignments / distinct experts touched by decode tokens, both summed over
    steps and layers. Below the ridge point the experts' FFN is bandwidth-bound.
    """
    return (
        f"sum without (layer, phase) ({s.rate('moe_reuse_expert_assignments_total', DECODE)})\n"
        f"/\nsum without (layer, phase) ({s.rate('moe_reuse_experts_touched_total', DECODE)})"
    )


def layer_decode_tokens_per_expert(s: Scope) -> str:
    """Decode tokens per touched expert, per MoE layer."""
    return (
        f"sum without (phase) ({s.rate('moe_reuse_expert_assignments_total', DECODE)})\n"
        f"/\nsum without (phase) ({s.rate('moe_reuse_experts_touched_total', DECODE)})"
    )


def tokens_per_expert_gauge(s: Scope) -> str:
    """Exporter's window figure by `source`: measured, predicted_uniform (B*k/E),
    predicted_distinct (B*k / E(1-(1-k/E)^B))."""
    return f"moe_reuse_tokens_per_expert{s.sel()}"


def ridge_point_tokens(s: Scope) -> str:
    """Hardware ridge point as tokens per expert: reuse below it is bandwidth-bound."""
    return f"moe_reuse_ridge_point_tokens{s.sel()}"


def dense_speedup(s: Scope) -> str:
    """How many times faster the quality-matched dense twin would decode this workload."""
    return f"moe_reuse_dense_speedup_ratio{s.sel()}"


def routing_cost(s: Scope) -> str:
    """MoE decode step predicted under the window's measured routing / under uniform routing:
    below 1 the routing makes the MoE cheaper than uniform routing would, above 1 dearer."""
    return f"moe_reuse_routing_cost_ratio{s.sel()}"


# ------------------------------------------------------------------------------------------------
# Routing health
# ------------------------------------------------------------------------------------------------


def layer_load_imbalance(s: Scope) -> str:
    """Per layer: the hottest expert's decode tokens per step over the mean decode tokens per
    touched expert (1 = every touched expert got the same load).

    = (sum of per-step maxima / steps with decode tokens) / (assignments / experts touched). The
    grouped GEMM waits for the hottest expert, so this is the slowdown over a balanced router at
    the same reuse. (The per-step maxima are divided by the step count; without it the ratio
    would scale with the step rate.)
    """
    return (
        f"(\n  sum without (phase) ({s.rate('moe_reuse_max_expert_tokens_total', DECODE)})\n"
        f"  / ignoring (layer) group_left\n"
        f"  sum without (kind) ({s.rate('moe_reuse_steps_total', DECODE_STEPS)})\n)\n"
        f"/\n(\n  sum without (phase) ({s.rate('moe_reuse_expert_assignments_total', DECODE)})\n"
        f"  /\n  sum without (phase) ({s.rate('moe_reuse_experts_touched_total', DECODE)})\n)"
    )


def dead_experts(s: Scope) -> str:
    """Experts with zero tokens over the export window, per layer (router collapse)."""
    return f"moe_reuse_dead_experts{s.sel()}"


def cold_experts(s: Scope) -> str:
    """Experts below 5% of their fair share over the export window, per layer."""
    return f"moe_reuse_cold_experts{s.sel()}"


def routing_drift(s: Scope) -> str:
    """Jensen-Shannon divergence (base 2, 0..1) of each layer's expert distribution from the
    saved baseline."""
    return f"moe_reuse_routing_drift_ratio{s.sel()}"


def expert_load_share(s: Scope, max_series: int) -> str:
    """Share of each layer's tokens that each expert received (opt-in per-expert series).

    1/E for a perfectly balanced router; experts beyond the plugin's cap are summed into
    `expert="other"`. Capped at `max_series` cells.
    """
    per_expert = f"sum without (phase) ({s.rate('moe_reuse_expert_tokens_total')})"
    per_layer = f"sum without (expert, phase) ({s.rate('moe_reuse_expert_tokens_total')})"
    return f"topk({max_series},\n  {per_expert}\n  / ignoring (expert) group_left\n  {per_layer}\n)"


def hottest_experts(s: Scope, n: int) -> str:
    """The `n` (layer, expert) cells with the largest share of their layer's tokens."""
    return expert_load_share(s, n)


# ------------------------------------------------------------------------------------------------
# Hardware
# ------------------------------------------------------------------------------------------------


def hbm_achieved_bandwidth(s: Scope) -> str:
    """Achieved HBM read bandwidth while stepping: bytes the steps had to read / step time."""
    return (
        f"sum without (component) ({s.rate('moe_reuse_hbm_read_bytes_total')})\n"
        f"/\nsum without (kind) ({s.rate('moe_reuse_step_duration_seconds_total')})"
    )


def hbm_peak_bandwidth(s: Scope) -> str:
    """Hardware spec peak HBM bandwidth."""
    return f"moe_reuse_hbm_peak_bytes_per_second{s.sel()}"


def hbm_measured_bandwidth(s: Scope) -> str:
    """HBM bandwidth as the GPU measured it (NVML GPM: reads and writes of the whole device,
    other processes included) over wall time. No series where the rank is not measured
    (`moe_reuse_hbm_measurement_info` says why)."""
    return (
        f"{s.rate('moe_reuse_hbm_measured_bytes_total')}\n"
        f"/\n{s.rate('moe_reuse_hbm_measured_seconds_total')}"
    )


def hbm_modelled_bandwidth(s: Scope) -> str:
    """The byte model's HBM reads over wall time (not step time: the measured figure's base)."""
    return f"sum without (component) ({s.rate('moe_reuse_hbm_read_bytes_total')})"


def hbm_modelled_over_measured(s: Scope) -> str:
    """Share of the device's measured HBM traffic that the byte model's reads account for (1:
    all of it; writes, other processes and what the model leaves out keep it below 1)."""
    return f"({hbm_modelled_bandwidth(s)})\n/\n({hbm_measured_bandwidth(s)})"


def hbm_measurement(s: Scope) -> str:
    """Whether HBM bandwidth is measured, and why not (one series per rank, `reason`)."""
    return f"moe_reuse_hbm_measurement_info{s.sel()} == 1"


def hbm_bytes_per_step_by_component(s: Scope) -> str:
    """HBM bytes read per step, by component (routed/shared experts, attention, KV, ...)."""
    return (
        f"{s.rate('moe_reuse_hbm_read_bytes_total')}\n/ ignoring (component) group_left\n"
        f"sum without (kind) ({s.rate('moe_reuse_steps_total')})"
    )


def moe_comm_share(s: Scope) -> str:
    """Share of step time spent in the MoE layers' collectives, by `op` (all_to_all under EP,
    all_reduce under TP). A deployment without one (`moe_reuse_moe_comm_info{mode="none"}`)
    reads 0 rather than no data."""
    return (
        f"sum without (op) ({s.rate('moe_reuse_moe_comm_seconds_total')})\n"
        f"/\nsum without (kind) ({s.rate('moe_reuse_step_duration_seconds_total')})\n"
        f"or\nsum without (mode) (moe_reuse_moe_comm_info{s.sel(NO_COMM)}) * 0"
    )


def moe_comm_share_by_op(s: Scope) -> str:
    """Share of step time in each MoE collective (`op`)."""
    return (
        f"{s.rate('moe_reuse_moe_comm_seconds_total')}\n/ ignoring (op) group_left\n"
        f"sum without (kind) ({s.rate('moe_reuse_step_duration_seconds_total')})"
    )


# ------------------------------------------------------------------------------------------------
# Serving (batch, KV, latency)
# ------------------------------------------------------------------------------------------------


def decode_batch_tokens(s: Scope) -> str:
    """Decode batch B: decode tokens per step that had decode tokens (decode or mixed)."""
    return (
        f"sum without (phase) ({s.rate('moe_reuse_tokens_total', DECODE)})\n"
        f"/\nsum without (kind) ({s.rate('moe_reuse_steps_total', DECODE_STEPS)})"
    )


def decode_tokens_rate(s: Scope) -> str:
    """Decode tokens computed per second."""
    return f"sum without (phase) ({s.rate('moe_reuse_tokens_total', DECODE)})"


def tokens_rate(s: Scope) -> str:
    """Tokens computed per second, prefill and decode."""
    return f"sum without (phase) ({s.rate('moe_reuse_tokens_total')})"


def step_duration_mean(s: Scope) -> str:
    """Mean wall time of a step, by step kind."""
    return (
        f"{s.rate('moe_reuse_step_duration_seconds_total')}\n/\n{s.rate('moe_reuse_steps_total')}"
    )


def requests_running(s: Scope) -> str:
    """vLLM: requests in the running batch."""
    return f"vllm:num_requests_running{s.vsel()}"


def requests_waiting(s: Scope) -> str:
    """vLLM: requests waiting to be scheduled."""
    return f"vllm:num_requests_waiting{s.vsel()}"


def kv_cache_usage(s: Scope) -> str:
    """vLLM: KV cache usage, 0..1 (vLLM's `_perc` is a fraction)."""
    return f"vllm:kv_cache_usage_perc{s.vsel()}"


def inter_token_latency_p99(s: Scope) -> str:
    """vLLM: P99 inter-token latency from its own histogram."""
    inner = f"rate(vllm:inter_token_latency_seconds_bucket{s.vsel()}[{s.interval}])"
    return f"histogram_quantile(0.99, sum without (instance, pod) ({inner}))"


def generation_tokens_rate(s: Scope) -> str:
    """vLLM: generated tokens per second."""
    return f"rate(vllm:generation_tokens_total{s.vsel()}[{s.interval}])"


# ------------------------------------------------------------------------------------------------
# Predictor
# ------------------------------------------------------------------------------------------------


def qs(s: Scope) -> str:
    """q x s of the predictor."""
    return f"moe_reuse_qs_ratio{s.sel()}"


def reuse_gap(s: Scope) -> str:
    """Routing factor (E/k) x capacity factor: how much less reuse the MoE gets than dense."""
    return f"moe_reuse_reuse_gap_ratio{s.sel()}"


def ffn_regime(s: Scope) -> str:
    """The FFN regime at the live expert-local batch (one series, `regime` label, value 1)."""
    return f"moe_reuse_ffn_regime{s.sel()} == 1"


def model_error(s: Scope) -> str:
    """Predicted / measured, by `quantity` (step_seconds, step_bytes, tokens_per_expert)."""
    return f"moe_reuse_model_error_ratio{s.sel()}"


def step_seconds(s: Scope) -> str:
    """Decode step time, measured and predicted."""
    return f"moe_reuse_step_seconds{s.sel()}"


# ------------------------------------------------------------------------------------------------
# Plugin health
# ------------------------------------------------------------------------------------------------


def plugin_enabled(s: Scope) -> str:
    """1 while the plugin records, 0 once a runtime fault disabled it."""
    return f"moe_reuse_enabled{s.sel()}"


def plugin_errors(s: Scope) -> str:
    """Runtime faults caught inside the plugin; 0 while the counter has no series yet."""
    return (
        f"sum without (stage) (moe_reuse_errors_total{s.sel()})\nor\nmoe_reuse_enabled{s.sel()} * 0"
    )


def dropped_steps_rate(s: Scope) -> str:
    """Steps overwritten in the device ring before the flusher read them, per second."""
    return s.rate("moe_reuse_dropped_steps_total")


def snapshot_age(s: Scope) -> str:
    """Seconds since each rank last published (a stale rank exports only this)."""
    return f"max by (rank) (moe_reuse_snapshot_age_seconds{s.sel()})"


def selfcheck_mismatch(s: Scope) -> str:
    """Assignments the self-check found miscounted over the rate window (0 while exact)."""
    return f"sum by (rank) (increase(moe_reuse_selfcheck_mismatch_assignments_total{s.sel()}[{s.interval}]))"


def unrecorded_moe_layers(s: Scope) -> str:
    """MoE layers a rank runs that the plugin does not record (a speculative drafter's, or a
    routing source it was not sized for; 0 else)."""
    return f"sum by (rank) (moe_reuse_unrecorded_moe_layers{s.sel()})"


# ------------------------------------------------------------------------------------------------
# EP advisor (plugin/live/advisor.py; docs/eplb.md)
# ------------------------------------------------------------------------------------------------


def eplb_gain(s: Scope) -> str:
    """Predicted MoE time per decode step now / after vLLM's EPLB rebalancing, by `deployment`
    (served, what_if) and `ep`: above 1 rebalancing helps, below 1 it makes decode slower."""
    return f"moe_reuse_eplb_gain_ratio{s.sel()}"


def eplb_net_gain(s: Scope) -> str:
    """EPLB on: predicted MoE time without EPLB / with the served placement (below 1: EPLB
    costs more than it gives)."""
    return f"moe_reuse_eplb_net_gain_ratio{s.sel()}"


def ep_balancedness(s: Scope) -> str:
    """Mean over max EP-rank load (vLLM's balancedness), by deployment, ep and placement."""
    return f"moe_reuse_ep_balancedness_ratio{s.sel()}"


def ep_rank_tokens(s: Scope, deployment: str = "served") -> str:
    """Token-expert assignments per decode step on each EP rank (current placement)."""
    sel = s.sel(f'deployment=~"{deployment}"', 'placement="current"')
    return f"moe_reuse_ep_rank_tokens{sel}"


def eplb_deciding_term(s: Scope) -> str:
    """Which term decides the gain: rank_load (compute-bound) or replica_reads (bandwidth)."""
    return f"moe_reuse_eplb_deciding_term{s.sel()} == 1"


