"""Routing baselines, drift (Jensen-Shannon divergence) and dead/cold experts. Pure numpy.

A baseline is a JSON file: the per-layer expert distribution of decode tokens of a reference
workload. `moe-reuse baseline save` writes it (see `live/baseline_cli.py`), the `routing_baseline`
config key loads it, and every window exports the divergence of the live distribution from it.

File format (version 1)::

    {"version": 1, "kind": "moe_reuse_routing_baseline", "num_experts": E, "top_k": k,
     "phase": "decode", "tokens": N, "source": "...",
     "layers": {"<layer id>": [count or share per expert, ... E values]}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BASELINE_KIND = "moe_reuse_routing_baseline"
MIN_TOKENS_PER_EXPERT = 20.0
"""Dead/cold are only judged when the window gave each expert this many tokens on average: with
uniform routing the chance that a live expert sees none of them is then e^-20."""


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint supports)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / m[mask])).sum())

    return min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), 1.0)


def dead_and_cold(counts: np.ndarray, cold_fraction: float,
                  min_tokens_per_expert: float = MIN_TOKENS_PER_EXPERT) -> tuple[np.ndarray, np.ndarray] | None:
    """Per layer: experts with zero tokens (dead) and below cold_fraction of the fair share
    (cold, dead included). counts: [L, E]. None when the window is too thin to judge."""
    c = np.asarray(counts, dtype=np.float64)
    L, E = c.shape
    total = c.sum(axis=1)
    if E == 0 or L == 0 or total.min() / E < min_tokens_per_expert:
        return None
    fair = total[:, None] / E
    dead = (c == 0).sum(axis=1)
    cold = (c < cold_fraction * fair).sum(axis=1)
    return dead, cold


def make_baseline(layer_counts: Mapping[int, Sequence[float]], *, num_experts: int, top_k: int,
                  source: str) -> dict[str, Any]:
    layers = {str(int(k)): [float(x) for x in v] for k, v in sorted(layer_counts.items())}
    for key, row in layers.items():
        if len(row) != num_experts:
            raise ValueError(f"layer {key}: {len(row)} experts, expected {num_experts}")
    tokens = sum(sum(r) for r in layers.values()) / max(len(layers), 1) / max(top_k, 1)
    if tokens <= 0:
        raise ValueError("the baseline has no routed tokens; send traffic first")
    return {"version": 1, "kind": BASELINE_KIND, "num_experts": num_experts, "top_k": top_k,
            "phase": "decode", "tokens": round(tokens), "source": source, "layers": layers}


def save_baseline(path: str | Path, baseline: Mapping[str, Any]) -> None:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
    tmp.replace(p)


def load_baseline(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).expanduser().read_text())
    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND:
        raise ValueError(f"{path} is not a moe_reuse routing baseline (missing kind={BASELINE_KIND!r})")
    return data


def baseline_matrix(baseline: Mapping[str, Any], layer_ids: Sequence[int], num_experts: int) -> np.ndarray:
    """[L, E] baseline counts in the order of `layer_ids`; rows of layers it lacks are NaN."""
    if int(baseline.get("num_experts", num_experts)) != num_experts:
        raise ValueError(f"baseline has {baseline.get('num_experts')} experts, the model {num_experts}")
    out = np.full((len(layer_ids), num_experts), np.nan)
    layers = baseline.get("layers", {})
    for i, lid in enumerate(layer_ids):
        row = layers.get(str(int(lid)))
        if row is not None:
            out[i] = np.asarray(row, dtype=np.float64)
    return out


def drift_per_layer(window_counts: np.ndarray, base: np.ndarray) -> list[float]:
    out = []
    for live, ref in zip(np.asarray(window_counts), base):
        out.append(float("nan") if np.isnan(ref).any() else js_divergence(live, ref))
    return out


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
