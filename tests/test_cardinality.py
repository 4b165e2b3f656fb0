"""Cardinality under stress: per-expert series on, 61 layers x 256 experts x 8 ranks.

Synthetic snapshots in the real format (a RecorderSession's own `snapshot()`), skewed routing so
the cap has to choose, read back through prometheus_client's parser from the exposition text.
Checks: each rank stays within `max_expert_series`, and all ranks together within the scrape's
budget (`EXPERT_SERIES_PER_SCRAPE`, shared evenly: rendering is what a scrape pays per series);
per (rank, layer, phase) the `expert="other"` series holds exactly the experts that were not kept;
every series together equals the layer totals (`moe_reuse_expert_assignments_total`), rank by rank
and overall.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from scrape_inputs import rank_snapshot

from moe_reuse.plugin.config import ConfigError, parse_config
from moe_reuse.plugin.config_checks import validate_for_model
from moe_reuse.plugin.exporters.families import EXPERT_SERIES_PER_SCRAPE, snapshot_families
from moe_reuse.plugin.metrics_text import samples
from moe_reuse.plugin.recorder.aggregate import PHASES

LAYERS, EXPERTS, RANKS, TOP_K = 61, 256, 8, 8
LAYER_IDS = list(range(3, 3 + LAYERS))  # DeepSeek-V3 style: the first dense layers carry no MoE


def _rank_snapshot(rank: int, rng: np.random.Generator, cap: int) -> dict[str, Any]:
    # Zipf-skewed loads, some experts never routed (dead), distinct per rank, layer and phase.
    weights = rng.zipf(1.3, size=(LAYERS, 2, EXPERTS)).astype(np.float64)
    weights[:, :, rng.choice(EXPERTS, 5, replace=False)] = 0
    et = np.floor(weights / weights.sum(axis=2, keepdims=True) * 100_000).astype(np.int64)
    return rank_snapshot(rank, et, top_k=TOP_K, per_expert=True, max_expert_series=cap,
                         layer_ids=LAYER_IDS)


def _exposition(snaps: list[dict[str, Any]]) -> str:
    reg = CollectorRegistry()

    class Snapshots:
        def collect(self) -> Any:
            return snapshot_families(snaps)

    reg.register(Snapshots())  # type: ignore[arg-type]
    return generate_latest(reg).decode()


@pytest.mark.parametrize("cap, ranks", [(2000, RANKS), (500, RANKS), (2000, 1), (100000, 2)])
def test_per_expert_series_capped_per_rank_and_conserved(cap: int, ranks: int) -> None:
    """Each rank gets min(its cap, the scrape's budget / ranks) series, at least the overflow."""
    rng = np.random.default_rng(61)
    snaps = [_rank_snapshot(r, rng, cap) for r in range(ranks)]
    want = max(min(cap, EXPERT_SERIES_PER_SCRAPE // ranks), 2 * LAYERS)
    t0 = time.perf_counter()
    text = _exposition(snaps)
    build_s = time.perf_counter() - t0

    per_rank: dict[str, int] = defaultdict(int)
    series: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    assignments: dict[tuple[str, str, str], float] = {}
    for smp in samples(text):
        lab = smp.labels
        if smp.name == "moe_reuse_expert_tokens_total":
            per_rank[lab["rank"]] += 1
            series[(lab["rank"], lab["layer"], lab["phase"])][lab["expert"]] = smp.value
        elif smp.name == "moe_reuse_expert_assignments_total":
            assignments[(lab["rank"], lab["layer"], lab["phase"])] = smp.value

    assert set(per_rank) == {str(r) for r in range(ranks)}
    assert all(n <= want for n in per_rank.values()), dict(per_rank)
    assert min(per_rank.values()) > want - 2 * LAYERS  # the cap is used, not wasted
    assert sum(per_rank.values()) <= max(EXPERT_SERIES_PER_SCRAPE, 2 * LAYERS * ranks)
    for snap in snaps:
        rank = snap["labels"]["rank"]
        et = snap["totals"]["expert_tokens"]
        for li, layer in enumerate(LAYER_IDS):
            for pi, phase in enumerate(PHASES):
                got = series[(rank, str(layer), phase)]
                kept = [int(e) for e in got if e != "other"]
                for e in kept:  # kept experts carry their own exact count
                    assert got[str(e)] == et[li, pi, e]
                # the overflow series carries exactly the experts that were not kept
                rest = np.setdiff1d(np.arange(EXPERTS), kept)
                assert got["other"] == et[li, pi, rest].sum()
                assert sum(got.values()) == assignments[(rank, str(layer), phase)]
    everything = sum(sum(v.values()) for v in series.values())
    assert everything == sum(assignments.values()) == sum(
        int(s["totals"]["expert_tokens"].sum()) for s in snaps)
    print(f"cap {cap}: {sum(per_rank.values())} expert series over {ranks} ranks, "
          f"families built and exposed in {build_s * 1000:.0f} ms")


def test_a_cap_below_one_overflow_series_per_layer_stops_start_up() -> None:
    """Fewer than 2 x MoE layers series cannot hold even the per-layer overflow series."""
    served = {"model": "ds", "num_layers": 64, "num_experts": EXPERTS}
    with pytest.raises(ConfigError) as err:
        validate_for_model(parse_config({"per_expert_series": True, "max_expert_series": 100}),
                           {**served, "hf_config": _ds_config()})
    assert str(err.value) == (
        "moe_reuse.max_expert_series: 100 cannot hold one expert=\"other\" series per MoE layer "
        "and phase of ds (61 MoE layers x 2 phases = 122); use at least 122, or turn "
        "per_expert_series off")
    validate_for_model(parse_config({"max_expert_series": 100}),  # off: the cap is unused
                       {**served, "hf_config": _ds_config()})


def _ds_config() -> dict[str, Any]:
    return {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 64,
            "num_attention_heads": 128, "vocab_size": 129280, "n_routed_experts": EXPERTS,
            "num_experts_per_tok": TOP_K, "moe_intermediate_size": 2048,
            "intermediate_size": 18432, "first_k_dense_replace": 3, "moe_layer_freq": 1,
            "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128}
