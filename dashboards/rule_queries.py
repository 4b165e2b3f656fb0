"""PromQL of the recording rules and alerts: the recorded series' names, the cluster totals
across nodes, and every alert expression (on the recorded series).

The per-rank expressions the recording rules record come from `queries`, shared with the
dashboards; what lives here only the rules file uses. Each alert's threshold and `for` come from
`Config`.
"""

from __future__ import annotations

from .config import Config
from .queries import DECODE, Scope, rules_scope

# Recorded series of the rules file; `Config.rate_suffix` is appended (e.g. ":rate5m").
REC_DECODE_TOKENS_PER_EXPERT = "model_rank:moe_reuse_decode_tokens_per_expert"
REC_LAYER_DECODE_TOKENS_PER_EXPERT = "model_layer:moe_reuse_decode_tokens_per_expert"
REC_LAYER_LOAD_IMBALANCE = "model_layer:moe_reuse_decode_load_imbalance"
REC_DECODE_BATCH_TOKENS = "model_rank:moe_reuse_decode_batch_tokens"
REC_DECODE_TOKENS_RATE = "model_rank:moe_reuse_decode_tokens"
REC_TOKENS_RATE = "model_rank:moe_reuse_tokens"
REC_HBM_ACHIEVED = "model_rank:moe_reuse_hbm_achieved_bytes_per_second"
REC_HBM_MEASURED = "model_rank:moe_reuse_hbm_measured_bytes_per_second"
REC_MOE_COMM_SHARE = "model_rank:moe_reuse_moe_comm_time_ratio"
# Cluster level: one series per model across every node, target and rank (see cluster_*).
REC_CLUSTER_TOKENS_RATE = "model_phase:moe_reuse_tokens"
REC_CLUSTER_DECODE_TOKENS_PER_EXPERT = "model:moe_reuse_decode_tokens_per_expert"
REC_CLUSTER_HBM_READ_RATE = "model:moe_reuse_hbm_read_bytes"


# ------------------------------------------------------------------------------------------------
# Cluster totals: the same figures whichever reader exported a rank (vLLM's /metrics on the API
# server's node, `moe-reuse exporter` on the others) and however many nodes the ranks span.
# Every rank of an engine (its TP/PP ranks) computes all of that engine's tokens, so an engine's
# figure is the max over its ranks (which also drops a rank scraped twice); engines are summed.
# Per-layer counts are the max over the ranks that hold the layer (every TP rank, one PP stage),
# summed over the layers: under PP each stage holds only its own. Bytes are per rank (each reads
# its own shard), so they are summed over every rank.
# ------------------------------------------------------------------------------------------------


def cluster_tokens_rate(s: Scope) -> str:
    """Tokens the whole deployment computes per second, by phase."""
    return (f"sum by (model, phase) (max by (model, engine, phase) "
            f"(sum by (model, engine, rank, phase) ({s.rate('moe_reuse_tokens_total')})))")


def _per_layer(s: Scope, metric: str, *extra: str) -> str:
    return f"sum by (model) (max by (model, engine, layer) ({s.rate(metric, *extra)}))"


def cluster_decode_tokens_per_expert(s: Scope) -> str:
    """The deployment's decode reuse: assignments over experts touched, every layer of every
    engine once (a PP engine's stages hold different layers)."""
    return (f"{_per_layer(s, 'moe_reuse_expert_assignments_total', DECODE)}\n/\n"
            f"{_per_layer(s, 'moe_reuse_experts_touched_total', DECODE)}")


def cluster_hbm_read_rate(s: Scope) -> str:
    """Bytes every rank of the deployment reads from HBM per second, all components."""
    return f"sum by (model) ({s.rate('moe_reuse_hbm_read_bytes_total')})"


def rec(name: str, cfg: Config) -> str:
    """Full name of a recorded series, e.g. `model_rank:moe_reuse_decode_tokens:rate5m`."""
    return f"{name}:{cfg.rate_suffix}"


def alert_reuse_collapse(cfg: Config) -> str:
    """Decode tokens per touched expert below `fraction x ridge point` (the fallback figure while
    the ridge-point gauge is absent), with decode traffic going on."""
    s = rules_scope(cfg)
    tpe = f"{rec(REC_DECODE_TOKENS_PER_EXPERT, cfg)}{s.sel()}"
    return (
        f"{tpe}\n< (\n"
        f"  {cfg.reuse_collapse_ridge_fraction:g} * moe_reuse_ridge_point_tokens{s.sel()}\n"
        f"  or\n  0 * {tpe} + {cfg.reuse_collapse_fallback_tokens:g}\n)\n"
        f"and\n{rec(REC_DECODE_TOKENS_RATE, cfg)}{s.sel()} > "
        f"{cfg.reuse_collapse_min_decode_tokens_per_second:g}"
    )


def alert_dense_speedup_high(cfg: Config) -> str:
    s = rules_scope(cfg)
    return f"moe_reuse_dense_speedup_ratio{s.sel()} > {cfg.dense_speedup_threshold:g}"


def alert_dead_experts(cfg: Config) -> str:
    s = rules_scope(cfg)
    return (
        f"max without (layer) (moe_reuse_dead_experts{s.sel()}) >= {cfg.dead_experts_threshold}\n"
        f"and\n{rec(REC_TOKENS_RATE, cfg)}{s.sel()} >= "
        f"{cfg.dead_experts_min_tokens_per_second:g}"
    )


def alert_load_imbalance(cfg: Config) -> str:
    s = rules_scope(cfg)
    return (
        f"max without (layer) ({rec(REC_LAYER_LOAD_IMBALANCE, cfg)}{s.sel()})"
        f" > {cfg.load_imbalance_threshold:g}"
    )


def alert_routing_drift(cfg: Config) -> str:
    s = rules_scope(cfg)
    return (
        f"max without (layer) (moe_reuse_routing_drift_ratio{s.sel()})"
        f" > {cfg.routing_drift_threshold:g}"
    )


def alert_predictor_diverging(cfg: Config) -> str:
    s = rules_scope(cfg)
    m = f"moe_reuse_model_error_ratio{s.sel()}"
    return f"{m} > {cfg.model_error_upper:g}\nor\n{m} < {cfg.model_error_lower:g}"


def alert_plugin_disabled(cfg: Config) -> str:
    """Any reason but `not_moe` (a dense model: nothing to record, nothing wrong)."""
    s = rules_scope(cfg)
    sel = s.sel('reason!="not_moe"')
    return f"moe_reuse_enabled{sel} == 0"


def alert_rank_stale(cfg: Config) -> str:
    """A rank whose snapshot stopped being rewritten (it then exports only its age)."""
    s = rules_scope(cfg)
    return f"moe_reuse_snapshot_age_seconds{s.sel()} > {cfg.rank_stale_seconds:g}"


def alert_counting_mismatch(cfg: Config) -> str:
    """The recorder's self-check: counted assignments != scheduled tokens x top-k."""
    s = rules_scope(cfg)
    m = f"moe_reuse_selfcheck_mismatch_assignments_total{s.sel()}"
    w = cfg.selfcheck_window
    return f"increase({m}[{w}]) > 0\nor\n({m} > 0 unless {m} offset {w})"


def alert_plugin_errors(cfg: Config) -> str:
    """New errors in the window; the second arm catches a counter series that first appears
    with a non-zero value (which `increase` cannot see)."""
    s = rules_scope(cfg)
    m = f"moe_reuse_errors_total{s.sel()}"
    w = cfg.plugin_errors_window
    return f"increase({m}[{w}]) > 0\nor\n({m} > 0 unless {m} offset {w})"


def alert_rebalance_would_help(cfg: Config) -> str:
    s = rules_scope(cfg)
    sel = s.sel(f'deployment=~"{cfg.eplb_help_deployments}"')
    return f"moe_reuse_eplb_gain_ratio{sel} > {1 + cfg.eplb_help_margin:g}"


def alert_eplb_costs_more(cfg: Config) -> str:
    s = rules_scope(cfg)
    return f"moe_reuse_eplb_net_gain_ratio{s.sel()} < {1 - cfg.eplb_cost_margin:g}"
