"""`moe-reuse dense-ab` routing regimes: the rigged-router copy, per-level routing figures, the
offline replay, and the per-regime table (no vLLM; the served A/B itself is a benchmark)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moe_reuse.plugin.harness import dense_ab
from moe_reuse.plugin.harness.routing_rig import concentrated_copy
from moe_reuse.plugin.harness.tiny_models import model_spec
from moe_reuse.plugin.live.spec import ServedFacts, build_specs
from moe_reuse.plugin.live.window import WindowAccumulator, window_figures
from moe_reuse.plugin.recorder.aggregate import BlockStats, ByteModel
from moe_reuse.predictor import hardware_from_dict

HW = hardware_from_dict({
    "name": "test-cpu", "hbm_capacity_gb": 16, "hbm_bandwidth_gb_per_s": 25,
    "expert_path_bandwidth_gb_per_s": 16, "expert_path_tflops": 0.1, "peak_tflops": {"bf16": 0.2},
    "compute_memory_overlap_ratio": 0.55, "step_overhead_per_layer_us": 400,
    "step_overhead_per_token_us": 150, "intra_node_bandwidth_gb_per_s": 10, "gpus_per_node": 1})


def fake_checkpoint(tmp: Path, experts: int = 32, hidden: int = 32, top_k: int = 2) -> Path:
    import torch
    from safetensors.torch import save_file

    d = tmp / "moe"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_experts": experts,
                                               "num_experts_per_tok": top_k}))
    (d / "moe_reuse_model.json").write_text(json.dumps({"name": "moe"}))
    g = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.mlp.gate.weight": torch.randn(experts, hidden, generator=g),
               "model.layers.0.mlp.experts.0.up_proj.weight": torch.randn(4, hidden, generator=g)},
              str(d / "model.safetensors"))
    return d


def test_concentrated_copy_routes_every_token_to_the_hot_experts(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    src = fake_checkpoint(tmp_path)
    hot = concentrated_copy(src, hot=16)
    assert hot.name == "moe-hot16" and concentrated_copy(src, hot=16) == hot  # cached
    a, b = load_file(str(src / "model.safetensors")), load_file(str(hot / "model.safetensors"))
    name = "model.layers.0.mlp.experts.0.up_proj.weight"
    assert torch.equal(a[name], b[name])  # only the router changes
    w = b["model.layers.0.mlp.gate.weight"]
    top = (torch.randn(4096, 32, generator=torch.Generator().manual_seed(1)) @ w.T).topk(2).indices
    assert set(top.unique().tolist()) == set(range(16))  # every hot expert used, no cold one
    unrigged = (torch.randn(4096, 32) @ a["model.layers.0.mlp.gate.weight"].T).topk(2).indices
    assert len(unrigged.unique()) == 32
    assert json.loads((hot / "moe_reuse_model.json").read_text())["name"] == "moe-hot16"
    with pytest.raises(ValueError, match="hot"):
        concentrated_copy(src, hot=3)  # odd: no antipodal pairs
    with pytest.raises(ValueError, match="hot"):
        concentrated_copy(src, hot=2)  # one pair cannot fill top-2


def test_level_routing_from_counter_deltas() -> None:
    before = {"steps": 10.0, "touched": 800.0, "tokens": 40.0, "requests": 40.0, "context": 2000.0}
    after = {"steps": 110.0, "touched": 800.0 + 100 * 8 * 12, "tokens": 40.0 + 100 * 16,
             "requests": 40.0 + 100 * 16, "context": 2000.0 + 100 * 16 * 50}
    got = dense_ab.level_routing(before, after, layers=8)
    assert got == {"batch_measured": 16.0, "context_per_request": 50.0,
                   "distinct_experts_per_step": 12.0}
    assert dense_ab.level_routing(before, before, layers=8) == {}


def big_specs():  # type: ignore[no-untyped-def]
    facts = ServedFacts(hf_config=model_spec("big-moe")["config"], weight_dtype="bfloat16",
                        kv_dtype="bfloat16")
    return build_specs(facts, HW, 5.0)


def test_replay_matches_the_live_window() -> None:
    """One level replayed offline gives the gauge the server's window gives for the same steps."""
    s = big_specs()
    B, n, hot, dur = 16, 12, 16, 0.05
    counts = np.zeros((8, n, 64), dtype=np.int64)
    for i in range(B):
        counts[:, :, [(4 * i + j) % hot for j in range(4)]] += 1
    present = counts > 0
    stats = BlockStats(present.sum(axis=(0, 2)), counts.sum(axis=(0, 2)), present.sum(axis=2),
                       counts.sum(axis=1))
    meta = {"kind": np.zeros(n, np.int8), "tokens": np.tile([0, B], (n, 1)),
            "requests": np.tile([0, B], (n, 1)), "context": np.tile([0, B * 48], (n, 1)),
            "duration_ns": np.full(n, int(dur * 1e9)), "comm_ns": np.zeros((n, 2), np.int64)}
    acc = WindowAccumulator(8, 64, 1.0, 0.0)
    acc.add_block(stats, meta, ByteModel((3 * 1024 * 512 * 2,) * 8, 1e7, 1e6, 8192))
    live = window_figures(acc.close(1.0), s, kv_capacity_moe=None, kv_bytes_per_token=0,
                          cold_fraction=0.05, baseline=None)
    level = {"batch_measured": 16.0, "context_per_request": 48.0,
             "distinct_experts_per_step": 16.0, "step_seconds_measured": dur}
    got = dense_ab.replay(level, s)
    assert got["x"] == pytest.approx(live["dense_speedup"], rel=1e-9)
    assert got["step_seconds_predicted"] == pytest.approx(live["step_seconds_predicted"])
    # the pre-issue-12 formula: calibrated against the uniform prediction
    t_uni = live["step_seconds_predicted_uniform"]
    assert got["x_old_formula"] == pytest.approx(t_uni / live["dense_step_seconds_predicted"])
    assert got["x_old_formula"] > 1.3 * got["x"]
    assert dense_ab.replay({"batch_measured": math.nan}, s) == {}


def _level(regime: str, c: int, tps: float, x: float, kind: str = "moe") -> dict[str, object]:
    r: dict[str, object] = {"kind": kind, "regime": regime, "concurrency": c,
                            "decode_tokens_per_second": tps, "itl_p50_seconds": 1 / tps,
                            "itl_p99_seconds": 3 / tps, "ttft_p50_seconds": 0.02,
                            "ttft_p99_seconds": 0.05}
    if kind == "moe":
        r.update(gauge_x=x, routing_cost=0.5, step_seconds_measured=0.05,
                 step_seconds_predicted=0.045, step_seconds_predicted_uniform=0.09,
                 tokens_per_expert_measured=4.0, regime_compute_bound=0.0, hardware="hw",
                 distinct_experts_per_step=16.0,
                 replay={"x": x, "x_old_formula": 1.4, "step_seconds_predicted": 0.045},
                 generic={"x": 0.9, "x_old_formula": 2.0, "step_seconds_predicted": 0.06})
    return r


def test_summarize_one_row_per_regime_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    passes = [[_level("uniform", 4, 100.0, 1.1)], [_level("concentrated", 4, 200.0, 0.6)],
              [_level("", 4, 120.0, 0.0, kind="dense")], [_level("uniform", 4, 110.0, 1.2)]]
    rows = dense_ab.summarize(passes, [4])
    assert [(r["regime"], r["concurrency"]) for r in rows] == [("uniform", 4), ("concentrated", 4)]
    uni, conc = rows
    assert uni["measured_ratio"] == pytest.approx(120 / 105)
    assert uni["gauge_x"] == pytest.approx(1.15)
    assert conc["measured_ratio"] == pytest.approx(0.6) and conc["x_over_measured"] == pytest.approx(1.0)
    assert conc["old_formula_x_over_measured"] == pytest.approx(1.4 / 0.6)
    assert conc["generic_step_predicted_over_measured"] == pytest.approx(1.2)
    # latency percentiles per model: medians over the passes
    assert uni["moe_itl_p50_seconds"] == pytest.approx((1 / 100 + 1 / 110) / 2)
    assert uni["dense_itl_p99_seconds"] == pytest.approx(3 / 120)
    assert conc["moe_ttft_p99_seconds"] == pytest.approx(0.05)
    dense_ab.print_table(rows)
    out = capsys.readouterr().out
    assert "| concentrated | 4 | 16.0 |" in out
    assert "| uniform | 4 | 9.55 / 28.64 | 8.33 / 25.00 | 20.0 / 50.0 | 20.0 / 50.0 |" in out


def test_regimes_option_is_checked() -> None:
    with pytest.raises(SystemExit, match="--regimes"):
        dense_ab.main(["--regimes", "uniform,skewed", "--hardware", "h200"])
