"""The export window: blocks of measured steps -> predicted-vs-measured figures -> gauges.

Runs in the recorder's flusher thread, once per flushed block (vectorised numpy) and once per
window (the predictor, a few calls per distinct decode batch size). Nothing here touches the step.

How the gauge `dense_speedup_ratio` is formed (docs/live.md has the long version and a worked
example):

1. Only decode steps count (the gauge is about decode). Steps are grouped by decode batch B; each
   group also carries the distinct experts its steps touched per MoE layer (the recorder's count).
2. For each group the predictor gives three step times on the same hardware spec and partition,
   with the hardware's measured refinements where the spec has them (`moe-reuse calibrate`):
   T_moe_route(B, ctx): the MoE reading the experts the window's routing really touched;
   T_moe_uni(B, ctx): the MoE under uniform routing (the textbook figure, exported beside it);
   T_dense_pred(B, ctx): the dense twin (no router, so no routing to measure).
3. Calibration by the measured MoE time T_moe_meas(B) against T_moe_route, never T_moe_uni: the
   residual r = T_moe_meas - T_moe_route is then only time the cost model does not explain
   (framework overhead, sampling, scheduling, kernel start), which the dense twin, served by the
   same engine with the same attention, pays too: T_dense_est = T_dense_pred + r. If the model
   over-predicts (r < 0), both are scaled: T_dense_est = T_dense_pred * T_moe_meas / T_moe_route.
   Because T_moe_route already holds the routing, neither branch can cancel what routing explains
   (scaling by T_moe_meas / T_moe_uni did: it turned X back into the uniform-routing ratio).
4. X = sum_B n_B T_moe_meas(B) / sum_B n_B T_dense_est(B): how many times faster the dense twin
   decodes the same steps. X < 1 means the MoE is the faster one.
5. routing_cost = sum_B n_B T_moe_route(B) / sum_B n_B T_moe_uni(B): how much dearer (> 1) or
   cheaper (< 1) the measured routing makes the MoE's step than uniform routing would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_reuse.predictor import StepTime, expected_distinct_experts, stage_pass, step_time
from moe_reuse.predictor.reuse import RoutingCurve
from moe_reuse.predictor.specs import dtype_bytes

from . import drift as drift_mod
from .spec import LiveSpecs

KIND_DECODE = 0

# Every gauge `window_gauges` can publish (names without the moe_reuse_ prefix); attach.py withdraws
# these on a fault, docs/metrics.md documents each.
WINDOW_GAUGES = (
    "dense_speedup_ratio", "routing_cost_ratio", "tokens_per_expert", "step_bytes",
    "step_seconds", "model_error_ratio", "ffn_regime", "ridge_point_tokens", "qs_ratio",
    "routing_factor_ratio", "capacity_factor_ratio", "reuse_gap_ratio",
    "hbm_peak_bytes_per_second", "kv_capacity_tokens", "routing_drift_ratio", "cold_experts",
    "dead_experts",
)


@dataclass
class WindowData:
    """Sums over the decode steps of one window (per rank)."""

    num_layers: int
    num_experts: int
    start: float = 0.0
    steps: int = 0
    decode_tokens: float = 0.0
    context_tokens: float = 0.0  # sum over steps of the decode requests' context lengths
    requests: float = 0.0
    duration_s: float = 0.0
    touched: float = 0.0  # distinct (layer, expert) reads by decode tokens
    assignments: float = 0.0
    bytes_measured: float = 0.0
    # B -> [n, ctx, dur, reqs, distinct]: steps, summed context, seconds, requests, and the sum
    # over steps of the mean (over MoE layers) distinct experts the step's tokens touched
    groups: dict[int, list[float]] = field(default_factory=dict)
    carried: int = 0  # windows whose expert counts were too thin to judge and were carried in
    expert_tokens: np.ndarray = field(init=False)  # [L, E] decode tokens (all steps)

    def __post_init__(self) -> None:
        self.expert_tokens = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)


class WindowAccumulator:
    """Folds blocks into a window and closes it every `window_s` seconds (monotonic clock)."""

    def __init__(self, num_layers: int, num_experts: int, window_s: float, now: float) -> None:
        self.num_layers, self.num_experts, self.window_s = num_layers, num_experts, window_s
        self.data = WindowData(num_layers, num_experts, start=now)

    def add_block(self, stats: Any, meta: dict[str, np.ndarray], bytes_model: Any) -> None:
        d = self.data
        d.expert_tokens += np.asarray(stats.expert_decode, dtype=np.int64)
        kind = np.asarray(meta["kind"])
        dec = np.asarray(meta["tokens"])[:, 1]
        mask = (kind == KIND_DECODE) & (dec > 0)
        if not mask.any():
            return
        B = dec[mask].astype(np.int64)
        ctx = np.asarray(meta["context"])[mask, 1].astype(np.float64)
        reqs = np.asarray(meta["requests"])[mask, 1].astype(np.float64)
        dur = np.asarray(meta["duration_ns"])[mask].astype(np.float64) / 1e9
        d.steps += int(mask.sum())
        d.decode_tokens += float(B.sum())
        d.context_tokens += float(ctx.sum())
        d.requests += float(reqs.sum())
        d.duration_s += float(dur.sum())
        d.touched += float(np.asarray(stats.decode_touched)[mask].sum())
        d.assignments += float(np.asarray(stats.decode_assign)[mask].sum())
        bm = bytes_model
        per_layer = np.asarray(bm.expert_bytes_per_layer, dtype=np.float64)
        distinct = np.asarray(stats.distinct_all)[:, mask]  # [L, steps]: decode-only steps
        routed = (distinct * per_layer[:, None]).sum()
        step_distinct = (distinct.mean(axis=0) if distinct.shape[0] else
                         np.zeros(int(mask.sum())))
        const = bm.shared_expert_bytes + bm.dense_ffn_bytes + bm.attention_bytes + bm.embedding_bytes
        kv = (np.asarray(meta["kv_bytes"])[mask, 1].sum() if "kv_bytes" in meta
              else ctx.sum() * bm.kv_bytes_per_token)
        d.bytes_measured += float(routed + const * mask.sum() + kv)
        for b in np.unique(B):
            sel = b == B
            g = d.groups.setdefault(int(b), [0.0, 0.0, 0.0, 0.0, 0.0])
            g[0] += float(sel.sum())
            g[1] += float(ctx[sel].sum())
            g[2] += float(dur[sel].sum())
            g[3] += float(reqs[sel].sum())
            g[4] += float(step_distinct[sel].sum())

    def due(self, now: float) -> bool:
        return now - self.data.start >= self.window_s

    def close(self, now: float, max_carry: int = 10) -> WindowData:
        """End the window. Expert counts too thin to judge dead/cold experts are carried into the
        next window (at most `max_carry` windows), so light traffic still gets judged."""
        out = self.data
        self.data = WindowData(self.num_layers, self.num_experts, start=now)
        thin = drift_mod.dead_and_cold(out.expert_tokens, 0.05) is None
        if thin and out.carried < max_carry and out.expert_tokens.any():
            self.data.expert_tokens += out.expert_tokens
            self.data.carried = out.carried + 1
        return out


def ridge_point_tokens(specs: LiveSpecs) -> float:
    """Tokens per expert at which one expert read costs as long as its math (the expert path).

    One weight byte serves 2/bytes_per_param FLOPs per token, so t tokens give an arithmetic
    intensity of 2t/bytes_per_param; the ridge is the expert path's FLOP/s (measured by
    calibrate, else the peak) over its bytes/s.
    """
    hw, m = specs.hardware, specs.model
    per_param = dtype_bytes(m.expert_weight_dtype)
    return hw.expert_flops(m.expert_weight_dtype) / hw.expert_bytes_per_second * per_param / 2.0


def dense_estimate(t_meas: float, t_moe_route: float, t_dense: float) -> float:
    """The dense twin's step on this machine, calibrated by the MoE's measured step.

    `t_moe_route` must be the MoE's prediction under the routing the window measured: then the
    difference t_meas - t_moe_route holds no routing effect and is only what the cost model leaves
    out (serving-stack time, the machine running faster or slower than its spec), which the twin,
    served by the same engine, shares. A positive residual is added; a negative one cannot be a
    shared constant (the twin's step may be shorter than it), so the machine is taken to run
    uniformly faster than its spec and the twin's prediction is scaled instead.
    """
    r = t_meas - t_moe_route
    if r >= 0 or t_moe_route <= 0:
        return t_dense + r
    return t_dense * t_meas / t_moe_route


@dataclass(frozen=True)
class GroupPrediction:
    """The predictor's three steps for one decode-batch group of a window."""

    moe_route: StepTime  # the experts the window's routing touched
    moe_uniform: StepTime  # uniform routing (the textbook expectation)
    dense: StepTime  # the quality-matched dense twin


def predict_group(specs: LiveSpecs, batch: int, context_per_seq: float,
                  distinct_per_layer: float | None) -> GroupPrediction:
    """Predict one group: the MoE under measured and under uniform routing, and the dense twin.

    distinct_per_layer: mean distinct experts the group's steps touched per MoE layer (None or
    <= 0 when the recorder saw no MoE layer: the uniform figure stands in). Under PP a rank's
    step is one stage's pass of one of the pp batches in flight, so the prediction is the
    predictor's step at pp x the batch, one stage pass of it (`stage_pass`), with the LM head
    only on the last stage.
    """
    m, hw, dp, pp = specs.model, specs.hardware, specs.partition.dp, specs.partition.pp
    tokens = batch * dp * pp
    head = specs.holds_lm_head
    uni = stage_pass(step_time(m, hw, specs.partition, tokens, context_per_seq), head)
    if distinct_per_layer is not None and distinct_per_layer > 0:
        d = min(float(distinct_per_layer), float(m.num_experts))
        span = specs.ep_span
        if span > 1:  # measured on this engine's batch; the experts serve `span` engines' tokens
            d = RoutingCurve.fit(m.num_experts, m.experts_per_token, batch, d).distinct(batch * span)
        route = stage_pass(step_time(m, hw, specs.partition, tokens, context_per_seq,
                                     distinct_experts_per_layer=d), head)
    else:
        route = uni
    dense = stage_pass(step_time(specs.dense, hw, specs.dense_partition, tokens, context_per_seq),
                       head)
    return GroupPrediction(route, uni, dense)


def window_figures(w: WindowData, specs: LiveSpecs, *, kv_capacity_moe: int | None,
                   kv_bytes_per_token: float, cold_fraction: float,
                   baseline: np.ndarray | None) -> dict[str, Any]:
    """Pure: one closed window -> every live figure (plain floats; NaN where undefined)."""
    m, hw = specs.model, specs.hardware
    k, E = m.experts_per_token, m.num_experts
    fig: dict[str, Any] = {
        "qs": specs.qs, "routing_factor": specs.routing_factor,
        "ridge_point_tokens": ridge_point_tokens(specs),
        "hbm_peak_bytes_per_second": hw.hbm_bandwidth_bytes_per_second,
        "decode_steps": w.steps,
    }
    if kv_capacity_moe:
        dense_cap = specs.dense_kv_capacity_tokens(kv_capacity_moe, kv_bytes_per_token)
        fig["kv_capacity_moe"] = float(kv_capacity_moe)
        fig["kv_capacity_dense"] = float(dense_cap)
        fig["capacity_factor"] = dense_cap / kv_capacity_moe
        fig["reuse_gap"] = fig["routing_factor"] * fig["capacity_factor"]
    if w.steps > 0:
        n = float(w.steps)
        t_meas = t_route = t_uni = t_dense_pred = t_dense_est = 0.0
        bytes_route = bytes_uni = 0.0
        uni_num = dist_den = distinct_sum = 0.0
        for b, g in sorted(w.groups.items()):
            cnt, ctx, dur, reqs = g[0], g[1], g[2], g[3]
            distinct = g[4] / cnt if len(g) > 4 and cnt > 0 else None
            per_seq_ctx = max(ctx / max(reqs, 1.0), 1.0)
            pg = predict_group(specs, b, per_seq_ctx, distinct)
            r_s, u_s, d_s = (pg.moe_route.total_seconds, pg.moe_uniform.total_seconds,
                             pg.dense.total_seconds)
            t_meas += dur
            t_route += cnt * r_s
            t_uni += cnt * u_s
            t_dense_pred += cnt * d_s
            t_dense_est += cnt * dense_estimate(dur / cnt, r_s, d_s)
            bytes_route += cnt * sum(pg.moe_route.hbm_bytes.values())
            bytes_uni += cnt * sum(pg.moe_uniform.hbm_bytes.values())
            distinct_sum += cnt * pg.moe_route.distinct_experts_per_layer
            uni_num += cnt * b * k
            dist_den += cnt * expected_distinct_experts(E, k, b)
        measured_tpe = w.assignments / w.touched if w.touched > 0 else math.nan
        fig.update({
            "batch_tokens": w.decode_tokens / n,
            "tokens_per_expert_measured": measured_tpe,
            "tokens_per_expert_uniform": uni_num / n / E,
            "tokens_per_expert_distinct": uni_num / dist_den if dist_den > 0 else math.nan,
            "distinct_experts_per_layer": distinct_sum / n,
            "step_bytes_measured": w.bytes_measured / n,
            "step_bytes_predicted": bytes_route / n,
            "step_bytes_predicted_uniform": bytes_uni / n,
            "step_seconds_measured": t_meas / n,
            "step_seconds_predicted": t_route / n,
            "step_seconds_predicted_uniform": t_uni / n,
            "routing_cost": t_route / t_uni if t_uni > 0 else math.nan,
            "dense_step_seconds_predicted": t_dense_pred / n,
            "dense_step_seconds_estimated": t_dense_est / n,
            "dense_speedup": t_meas / t_dense_est if t_dense_est > 0 else math.nan,
        })
        fig["error_step_seconds"] = _ratio(fig["step_seconds_predicted"],
                                           fig["step_seconds_measured"])
        fig["error_step_bytes"] = _ratio(fig["step_bytes_predicted"], fig["step_bytes_measured"])
        fig["error_tokens_per_expert"] = _ratio(fig["tokens_per_expert_distinct"], measured_tpe)
        fig["regime"] = ("compute_bound" if measured_tpe >= fig["ridge_point_tokens"]
                         else "bandwidth_bound")
    judged = drift_mod.dead_and_cold(w.expert_tokens, cold_fraction)
    if judged is not None:
        fig["dead"], fig["cold"] = judged[0].tolist(), judged[1].tolist()
    if baseline is not None and w.expert_tokens.sum() > 0:
        fig["drift"] = drift_mod.drift_per_layer(w.expert_tokens, baseline)
    return fig


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _g(doc: str, labels: list[str], samples: list[tuple[list[str], float]]) -> dict[str, Any]:
    return {"doc": doc, "labels": labels,
            "samples": [[list(lv), float(v)] for lv, v in samples if _ok(v)]}


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def window_gauges(fig: dict[str, Any], layer_ids: list[int]) -> dict[str, dict[str, Any]]:
    """Pure: window figures -> `session.gauges` entries (names without the moe_reuse_ prefix).

    Names and labels are fixed by docs/metrics.md ("Live comparison with the predictor").
    """
    out: dict[str, dict[str, Any]] = {
        "qs_ratio": _g("q x s of the served model and the configured q.", [], [([], fig["qs"])]),
        "routing_factor_ratio": _g("E/k.", [], [([], fig["routing_factor"])]),
        "ridge_point_tokens": _g("Hardware ridge point as tokens per expert (expert path).", [],
                                 [([], fig["ridge_point_tokens"])]),
        "hbm_peak_bytes_per_second": _g("Peak memory bandwidth of the hardware spec.", [],
                                        [([], fig["hbm_peak_bytes_per_second"])]),
    }
    if "capacity_factor" in fig:
        out["capacity_factor_ratio"] = _g("B_dense_max / B_moe_max from vLLM's real KV capacity.",
                                          [], [([], fig["capacity_factor"])])
        out["reuse_gap_ratio"] = _g("Routing factor x capacity factor.", [], [([], fig["reuse_gap"])])
        out["kv_capacity_tokens"] = _g(
            "KV cache capacity in tokens (moe: vLLM's allocated cache; dense: the twin's).",
            ["model_kind"], [(["moe"], fig["kv_capacity_moe"]), (["dense"], fig["kv_capacity_dense"])])
    if fig.get("decode_steps", 0) > 0:
        out["dense_speedup_ratio"] = _g(
            "How many times faster the quality-matched dense twin would decode this window's "
            "workload on this hardware (predictor under the window's measured routing, "
            "calibrated by the measured MoE step time).",
            [], [([], fig["dense_speedup"])])
        if "routing_cost" in fig:
            out["routing_cost_ratio"] = _g(
                "MoE decode step predicted under the window's measured routing / predicted under "
                "uniform routing (> 1: the routing makes the MoE dearer, < 1: cheaper). "
                "PromQL: moe_reuse_routing_cost_ratio, or max by (model) (...) across ranks.",
                [], [([], fig["routing_cost"])])
        out["tokens_per_expert"] = _g(
            "Decode tokens per touched expert per step (window average over layers).", ["source"],
            [(["measured"], fig["tokens_per_expert_measured"]),
             (["predicted_uniform"], fig["tokens_per_expert_uniform"]),
             (["predicted_distinct"], fig["tokens_per_expert_distinct"])])
        out["step_bytes"] = _g(
            "HBM bytes per decode step (predicted: under the measured routing; "
            "predicted_uniform: under uniform routing).", ["source"],
            [(["measured"], fig["step_bytes_measured"]),
             (["predicted"], fig["step_bytes_predicted"]),
             (["predicted_uniform"], fig.get("step_bytes_predicted_uniform", math.nan))])
        out["step_seconds"] = _g(
            "Decode step time (predicted: under the measured routing; predicted_uniform: under "
            "uniform routing).", ["source"],
            [(["measured"], fig["step_seconds_measured"]),
             (["predicted"], fig["step_seconds_predicted"]),
             (["predicted_uniform"], fig.get("step_seconds_predicted_uniform", math.nan))])
        out["model_error_ratio"] = _g("Predicted / measured.", ["quantity"],
                                      [(["step_seconds"], fig["error_step_seconds"]),
                                       (["step_bytes"], fig["error_step_bytes"]),
                                       (["tokens_per_expert"], fig["error_tokens_per_expert"])])
        out["ffn_regime"] = _g("FFN regime at the live expert-local batch (1 = current).", ["regime"],
                               [([r], 1.0 if fig["regime"] == r else 0.0)
                                for r in ("bandwidth_bound", "compute_bound")])
    layers = [str(x) for x in layer_ids]
    if "dead" in fig:
        out["dead_experts"] = _g("Experts with zero decode tokens over the window.", ["layer"],
                                 list(zip([[lay] for lay in layers], fig["dead"])))
        out["cold_experts"] = _g("Experts below cold_fraction of their fair share over the window.",
                                 ["layer"], list(zip([[lay] for lay in layers], fig["cold"])))
    if "drift" in fig:
        out["routing_drift_ratio"] = _g(
            "Jensen-Shannon divergence (bits) of the window's expert distribution from the baseline.",
            ["layer"], list(zip([[lay] for lay in layers], fig["drift"])))
    return out
