"""The "Serving" and "Predictor" rows: vLLM's own batch, KV cache, latency and throughput,
and the live predictor's error beside them.

Layout only: every expression comes from `queries`, scoped to the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    timeseries,
)

from .. import queries as q
from ..config import Config
from ..panels import (
    UNIT_TIMES,
    UNIT_TOKENS,
    target,
    thresholds,
    timeseries_panel,
)


def batch_size_and_requests(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
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
    return timeseries_panel(
        "KV cache usage",
        "vLLM's KV-cache usage (vllm:kv_cache_usage_perc, a 0..1 fraction). A full cache caps "
        "the decode batch, and with it the reuse.",
        "percentunit",
    ).with_target(target(q.kv_cache_usage(s), "{{model_name}} e{{engine}}"))


def p99_inter_token_latency(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return timeseries_panel(
        "P99 inter-token latency",
        "vLLM's own inter-token latency histogram (vllm:inter_token_latency_seconds), 99th "
        "percentile, beside the decode throughput; read it against the MoE state above.",
        "s",
    ).with_target(target(q.inter_token_latency_p99(s), "p99 {{model_name}} e{{engine}}"))


def decode_throughput(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
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
        timeseries_panel(
            "Model error (predicted / measured)",
            "Predictor over measurement for step time, step bytes and tokens per expert; 1 is "
            f"exact. MoeReusePredictorDiverging fires outside [{lo:g}, {hi:g}].",
            UNIT_TIMES,
        )
        .with_target(target(q.model_error(s), "{{quantity}} r{{rank}}"))
        .thresholds(thresholds((None, "red"), (lo, "green"), (hi, "red")))
    )


def step_time_measured_vs_predicted(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
            "Decode step time: measured vs predicted",
            "Decode step time from the predictor's window (measured and predicted), and the "
            "recorder's mean step time by step kind.",
            "s",
        )
        .with_target(target(q.step_seconds(s), "{{source}} r{{rank}}", "A"))
        .with_target(target(q.step_duration_mean(s), "mean {{kind}} step r{{rank}}", "B"))
    )
