"""The expert-parallel advisor: per-rank load and what vLLM's EPLB would buy, per window.

Runs in the flusher thread once per closed window (like `window.py`), off the step. Inputs are
the window's per-expert decode token counts ([layers, experts]), its decode batch sizes, the
predictor specs and the plugin config; the placements come from the vLLM seam
(`plugin/vllm/eplb.py`) as plain arrays, and the arithmetic is `predictor/eplb.py`.

Deployments evaluated (label `deployment`, with `ep` the EP size):
- `served`: the placement vLLM really uses (EP on only). `current` is that placement;
  `rebalanced` is vLLM's EPLB policy rerun on this window's counts with the served number of
  redundant experts; with EPLB on, `contiguous` is the plain placement without replicas, so
  `eplb_net_gain_ratio` = T(contiguous) / T(current) says whether EPLB pays for itself.
- `what_if`: each size of `advisor_ep_sizes`, on any server: `current` is vLLM's default
  contiguous placement, `rebalanced` its EPLB policy with `advisor_redundant_experts`.

Scale: the counts are this rank's. Balancedness does not depend on scale; the step times use the
counts and batch sizes times the served DP size (each DP rank routes its own tokens; the model
takes them to share one distribution). Under TP-only EP every rank routes every token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moe_reuse.predictor.eplb import (
    TERMS,
    ExpertCost,
    Placement,
    compare,
    contiguous_placement,
    evaluate,
    expert_cost,
    redundant_for,
    slot_placement,
)

from ..config import PluginConfig, parse_ep_sizes
from .spec import LiveSpecs

Rebalance = Callable[[np.ndarray, int, int], np.ndarray]  # (load, redundant, ep) -> phys_to_log

ADVISOR_GAUGES = (
    "ep_balancedness_ratio", "ep_layer_balancedness_ratio", "ep_rank_tokens",
    "ep_rank_experts_touched", "ep_moe_step_seconds", "eplb_gain_ratio", "eplb_layer_gain_ratio",
    "eplb_deciding_term", "eplb_net_gain_ratio", "eplb_redundant_experts",
)


def vllm_rebalance(load: np.ndarray, redundant: int, ep: int) -> np.ndarray:
    """vLLM's default EPLB policy through the seam (imported lazily: vLLM is loaded already
    where this runs, and the CLI pays the import only when it needs the policy)."""
    from ..vllm.eplb import rebalance

    return rebalance(load, redundant, ep)[0]


def batches_from_groups(groups: Mapping[int, Sequence[float]]) -> list[tuple[float, float]]:
    """WindowData.groups ({B: [steps, ...]}) -> [(B, steps)]."""
    return [(float(b), float(g[0])) for b, g in sorted(groups.items()) if g[0] > 0]


def _fit_batches(counts: np.ndarray, batches: Sequence[tuple[float, float]], top_k: int,
                 scale: float) -> list[tuple[float, float]]:
    """Batch sizes times `scale`, step counts rescaled so the steps carry exactly the tokens in
    `counts` (the counts also hold decode tokens of mixed steps, which the groups leave out)."""
    tokens = float(counts.sum()) / counts.shape[0] / max(top_k, 1)
    carried = sum(b * n for b, n in batches)
    f = tokens / carried if carried > 0 else 0.0
    return [(b * scale, n * f) for b, n in batches]


def _served_placements(served: Any, num_experts: int, num_layers: int,
                       counts: np.ndarray, rebalance: Rebalance) -> dict[str, Placement]:
    ep = int(served.ep_size)
    p2l = np.asarray(served.phys_to_logical)
    cur = Placement(p2l, np.asarray(served.rank_of_slot), ep)
    out = {"current": cur}
    red = int(p2l.shape[1]) - num_experts
    out["rebalanced"] = slot_placement(rebalance(counts, red, ep), ep)
    if served.eplb:
        out["contiguous"] = contiguous_placement(num_layers, num_experts, ep)
    return out


def advisor_figures(counts: np.ndarray, batches: Sequence[tuple[float, float]], specs: LiveSpecs,
                    cfg: PluginConfig, *, served: Any = None,
                    rebalance: Rebalance = vllm_rebalance,
                    cost: ExpertCost | None = None) -> dict[str, Any]:
    """Pure apart from `rebalance`: one window -> {(deployment, ep): {placement: figures,
    "gain": Comparison, "net": Comparison | None, "redundant": int}}. Empty when idle."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.sum() <= 0 or not batches:
        return {}
    L, E = c.shape
    k = specs.model.experts_per_token
    scale = float(max(specs.partition.dp, 1))
    fitted = _fit_batches(c, batches, k, scale)
    load = c * scale
    cost = cost or expert_cost(specs.model, specs.hardware)
    setups: dict[tuple[str, int], dict[str, Placement]] = {}
    if served is not None and int(served.ep_size) > 1:
        setups[("served", int(served.ep_size))] = _served_placements(served, E, L, c, rebalance)
    for ep in parse_ep_sizes(cfg.advisor_ep_sizes):
        red = redundant_for(E, ep, cfg.advisor_redundant_experts)
        setups[("what_if", ep)] = {
            "current": contiguous_placement(L, E, ep),
            "rebalanced": slot_placement(rebalance(c, red, ep), ep),
        }
    out: dict[str, Any] = {}
    for key, places in setups.items():
        figs = {name: evaluate(load, fitted, p, cost) for name, p in places.items()}
        entry: dict[str, Any] = dict(figs)
        entry["gain"] = compare(figs["current"], figs["rebalanced"])
        entry["net"] = compare(figs["contiguous"], figs["current"]) if "contiguous" in figs else None
        entry["redundant"] = int(places["rebalanced"].phys_to_logical.shape[1]) - E
        out[f"{key[0]}:{key[1]}"] = entry
    return out


def _g(doc: str, labels: list[str], samples: list[tuple[list[str], float]]) -> dict[str, Any]:
    ok = [[list(lv), float(v)] for lv, v in samples
          if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return {"doc": doc, "labels": labels, "samples": ok}


def advisor_gauges(fig: Mapping[str, Any], layer_ids: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Pure: advisor figures -> `session.gauges` entries (names without the moe_reuse_ prefix),
    the format of `window.window_gauges`. Names and labels: docs/metrics.md ("EP advisor")."""
    bal, lbal, rtok, rtouch, secs = [], [], [], [], []
    gain, lgain, term, net, red = [], [], [], [], []
    layers = [str(x) for x in layer_ids]
    for key, entry in fig.items():
        dep, ep = key.split(":")
        for pl in ("current", "rebalanced", "contiguous"):
            f = entry.get(pl)
            if f is None:
                continue
            base = [dep, ep, pl]
            bal.append((base, f.balancedness))
            secs.append((base, f.seconds))
            lbal += [([*base, lay], v) for lay, v in zip(layers, f.layer_balancedness)]
            rtok += [([*base, str(r)], v) for r, v in enumerate(f.rank_assignments)]
            rtouch += [([*base, str(r)], v) for r, v in enumerate(f.rank_reads)]
        g = entry["gain"]
        gain.append(([dep, ep], g.gain))
        lgain += [([dep, ep, lay], v) for lay, v in zip(layers, g.layer_gain)]
        term += [([dep, ep, t], 1.0 if g.term == t else 0.0) for t in TERMS]
        red.append(([dep, ep], float(entry["redundant"])))
        if entry.get("net") is not None:
            net.append(([ep], entry["net"].gain))
    dl, pl_ = ["deployment", "ep"], ["deployment", "ep", "placement"]
    return {
        "ep_balancedness_ratio": _g(
            "Mean over max EP-rank load, summed over MoE layers (vLLM's balancedness), this window.",
            pl_, bal),
        "ep_layer_balancedness_ratio": _g("Mean over max EP-rank load per MoE layer.",
                                          [*pl_, "layer"], lbal),
        "ep_rank_tokens": _g("Token-expert assignments per decode step on each EP rank, summed "
                             "over MoE layers.", [*pl_, "ep_rank"], rtok),
        "ep_rank_experts_touched": _g("Expert replicas read per decode step on each EP rank, "
                                      "summed over MoE layers (expected).", [*pl_, "ep_rank"], rtouch),
        "ep_moe_step_seconds": _g("Predicted routed-expert time per decode step (slowest rank per "
                                  "layer, summed over layers).", pl_, secs),
        "eplb_gain_ratio": _g("Predicted MoE time now / after vLLM's EPLB rebalancing: above 1 it "
                              "helps, below 1 it makes decode slower.", dl, gain),
        "eplb_layer_gain_ratio": _g("eplb_gain_ratio per MoE layer.", [*dl, "layer"], lgain),
        "eplb_deciding_term": _g("What decides the gain (1 = current): rank_load (compute-bound, "
                                 "slowest rank) or replica_reads (bandwidth-bound, weight reads).",
                                 [*dl, "term"], term),
        "eplb_net_gain_ratio": _g("EPLB on: predicted MoE time without EPLB (contiguous, no "
                                  "replicas) / with the served placement; below 1 EPLB costs more "
                                  "than it gives.", ["ep"], net),
        "eplb_redundant_experts": _g("Redundant experts given to the EPLB policy.", dl, red),
    }


def window_advice(counts: np.ndarray, groups: Mapping[int, Sequence[float]], specs: LiveSpecs,
                  cfg: PluginConfig, layer_ids: Sequence[int], *, served: Any = None,
                  rebalance: Rebalance = vllm_rebalance) -> dict[str, dict[str, Any]]:
    """The hook for the live monitor: one closed window (WindowData.expert_tokens and .groups)
    -> advisor gauges, {} when the window had no decode traffic."""
    fig = advisor_figures(counts, batches_from_groups(groups), specs, cfg, served=served,
                          rebalance=rebalance)
    return advisor_gauges(fig, layer_ids) if fig else {}


def publish_advice(session: Any, w: Any, specs: LiveSpecs, cfg: PluginConfig,
                   layer_ids: Sequence[int], *, placement: Callable[[], Any] | None = None,
                   on_fault: Callable[[Any, BaseException], None] | None = None) -> bool:
    """Replace the advisor gauges in `session.gauges` with those of the closed window `w`
    (a `WindowData`). Called by the live monitor after its own gauges; never raises: a failure
    withdraws only the advisor gauges, goes to `on_fault` (the live monitor's `live_fault`) and
    returns False.
    `placement` reads the served placement through the seam (None or returning None: EP off)."""
    ok = True
    try:
        served = placement() if placement is not None else None
        fresh = window_advice(w.expert_tokens, w.groups, specs, cfg, layer_ids, served=served)
    except Exception as exc:  # noqa: BLE001 - never into the flusher
        fresh, ok = {}, False
        if on_fault is not None:
            on_fault(session, exc)
    gauges = {k: v for k, v in session.gauges.items() if k not in ADVISOR_GAUGES}
    gauges.update(fresh)
    session.gauges = gauges
    return ok
