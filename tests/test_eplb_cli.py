"""`moe-reuse eplb`: reading the advisor gauges and the per-expert series back from /metrics.

The /metrics text is rendered by the plugin's own exporter from a snapshot (no hand-written
exposition), so the CLI is tested against what a server really serves.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from moe_reuse.plugin.config import PluginConfig
from moe_reuse.plugin.exporters.families import snapshot_families
from moe_reuse.plugin.harness.tiny_models import model_spec
from moe_reuse.plugin.live.advisor import window_advice
from moe_reuse.plugin.live.eplb_cli import add_subcommands, local_view, render, server_view
from moe_reuse.plugin.live.spec import ServedFacts, build_specs
from moe_reuse.plugin.recorder.aggregate import KINDS, PHASES, Totals
from moe_reuse.predictor import hardware_from_dict

HW = hardware_from_dict({
    "name": "test-cpu", "hbm_capacity_gb": 16, "hbm_bandwidth_gb_per_s": 30,
    "peak_tflops": {"bf16": 0.3}, "intra_node_bandwidth_gb_per_s": 10, "gpus_per_node": 1})
SPECS = build_specs(ServedFacts(hf_config=model_spec("qwen3-moe")["config"],
                                weight_dtype="bfloat16", kv_dtype="bfloat16"), HW, 5.0)
# One MoE layer, 10 decode steps of 4 tokens (80 assignments): experts 0 and 1 hot.
COUNTS = np.array([[30.0, 30.0, 4, 4, 4, 4, 4, 0]])
GROUPS = {4: [10.0, 0.0, 0.0, 0.0]}


def by_hand_rebalance(load: np.ndarray, redundant: int, ep: int) -> np.ndarray:
    """Stand-in policy: experts 0 and 1 get one replica each, spread over both ranks."""
    return np.array([[0, 1, 2, 3, 4, 0, 1, 5, 6, 7]] * load.shape[0])


class _Fixed:
    def __init__(self, fams: list) -> None:  # type: ignore[type-arg]
        self.fams = fams

    def collect(self):  # type: ignore[no-untyped-def]
        return self.fams


def metrics_text(gauges: dict, counts: np.ndarray | None = None, steps: int = 0,  # type: ignore[type-arg]
                 tokens: int = 0, ridge: float | None = None) -> str:
    L, E = (1, 8) if counts is None else counts.shape
    t = Totals(L, E)
    if counts is not None:
        t.expert_tokens[:, PHASES.index("decode")] = counts
    t.steps[KINDS.index("decode")] = steps
    t.tokens[PHASES.index("decode")] = tokens
    g = dict(gauges)
    if ridge is not None:
        g["ridge_point_tokens"] = {"doc": "ridge", "labels": [], "samples": [[[], ridge]]}
    snap = {"labels": {"model": "m", "engine": "0", "rank": "0"}, "info": {}, "layer_ids": [5],
            "top_k": 2, "enabled": True, "errors": {}, "totals": t.arrays(), "gauges": g,
            "options": {"per_expert_series": counts is not None}}
    reg = CollectorRegistry()
    reg.register(_Fixed(snapshot_families([snap])))  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_server_view_reads_the_advisor_gauges() -> None:
    cfg = replace(PluginConfig(), advisor_ep_sizes="2", advisor_redundant_experts=2)
    gauges = window_advice(COUNTS, GROUPS, SPECS, cfg, [5], rebalance=by_hand_rebalance)
    view = server_view(metrics_text(gauges))
    e = view[("what_if", "2")]
    assert e["layers"]["5"]["current"] == pytest.approx(4.0 / 6.8)
    assert e["layers"]["5"]["rebalanced"] == pytest.approx(4.0 / 4.2)
    assert e["balancedness"]["current"] == pytest.approx(4.0 / 6.8)
    assert e["gain"] > 0 and e["term"] in ("rank_load", "replica_reads")
    out = render("x", e)
    assert "0.588" in out and "0.952" in out


def test_local_view_from_the_per_expert_series() -> None:
    pytest.importorskip("vllm")
    # 10 decode steps of 4 tokens, top-2; experts 0 and 1 hot (as in test_live_advisor)
    text = metrics_text({}, counts=COUNTS.astype(np.int64), steps=10, tokens=40, ridge=1e6)
    e = local_view(text, ep=2, redundant=2)
    assert e["redundant"] == 2 and e["batch"] == pytest.approx(4.0)
    # contiguous on 2 ranks: rank 0 holds experts 0-3: 68 of 80 assignments
    assert e["balancedness"]["current"] == pytest.approx(40 / 68)
    assert e["balancedness"]["rebalanced"] > e["balancedness"]["current"]
    # ridge 1e6 tokens per expert: deeply bandwidth-bound, decided by replica reads
    assert e["term"] == "replica_reads"
    with pytest.raises(ValueError, match="per_expert_series"):
        local_view(metrics_text({}), ep=2, redundant=2)


def test_cli_parses() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_subcommands(sub)
    a = ap.parse_args(["eplb", "--url", "http://h:1", "--ep", "8", "--redundant", "32"])
    assert (a.url, a.ep, a.redundant) == ("http://h:1", 8, 32)
