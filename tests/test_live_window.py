"""Unit tests of the live comparison: window figures, gauges, drift, dead/cold, specs (no vLLM)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moe_reuse.plugin.config import PluginConfig
from moe_reuse.plugin.harness.tiny_models import model_spec
from moe_reuse.plugin.live import drift
from moe_reuse.plugin.live.attach import LiveMonitor
from moe_reuse.plugin.live.spec import ServedFacts, build_specs, resolve_hardware
from moe_reuse.plugin.live.twin import twin_config
from moe_reuse.plugin.live.window import (
    WINDOW_GAUGES,
    WindowAccumulator,
    predict_group,
    ridge_point_tokens,
    window_figures,
    window_gauges,
)
from moe_reuse.plugin.reader.rank import RankReader
from moe_reuse.plugin.recorder.aggregate import BlockStats, ByteModel
from moe_reuse.predictor import expected_distinct_experts, hardware_from_dict, step_time
from moe_reuse.predictor.sizes import weight_bytes_breakdown

HW = hardware_from_dict({
    "name": "test-cpu", "hbm_capacity_gb": 16, "hbm_bandwidth_gb_per_s": 30,
    "expert_path_bandwidth_gb_per_s": 20, "peak_tflops": {"bf16": 0.3},
    "intra_node_bandwidth_gb_per_s": 10, "gpus_per_node": 1})


def big_specs(q: float = 5.0, kv_fixed: bool = True):  # type: ignore[no-untyped-def]
    facts = ServedFacts(hf_config=model_spec("big-moe")["config"], weight_dtype="bfloat16",
                        kv_dtype="bfloat16", kv_fixed_size=kv_fixed)
    return build_specs(facts, HW, q)


def block(B: int, n: int, L: int = 8, E: int = 64, k: int = 4, dur_s: float = 0.02,
          ctx: int = 100, kind: int = 0,
          seed: int = 0) -> tuple[BlockStats, dict[str, np.ndarray]]:
    """n decode steps of batch B with uniform random routing."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((L, n, E), dtype=np.int64)
    for li in range(L):
        for s in range(n):
            for _ in range(B):
                counts[li, s, rng.choice(E, k, replace=False)] += 1
    present = counts > 0
    stats = BlockStats(decode_touched=present.sum(axis=(0, 2)), decode_assign=counts.sum(axis=(0, 2)),
                       distinct_all=present.sum(axis=2), expert_decode=counts.sum(axis=1))
    meta = {"kind": np.full(n, kind, np.int8), "tokens": np.tile([0, B], (n, 1)),
            "requests": np.tile([0, B], (n, 1)), "context": np.tile([0, B * ctx], (n, 1)),
            "duration_ns": np.full(n, int(dur_s * 1e9)), "comm_ns": np.zeros((n, 2), np.int64)}
    return stats, meta


BM = ByteModel(expert_bytes_per_layer=(3 * 1024 * 512 * 2,) * 8, attention_bytes=8 * 2 * 2621440,
               embedding_bytes=512 * 1024 * 2, kv_bytes_per_token=8 * 2 * 2 * 128 * 2)


def test_dense_twin_size_and_qs() -> None:
    s = big_specs()
    assert s.qs == pytest.approx(5 * 4 / 64)
    assert s.routing_factor == 16
    from moe_reuse.predictor import total_params

    assert total_params(s.dense) == pytest.approx(s.qs * total_params(s.model), rel=1e-3)
    cfg, width = twin_config(model_spec("big-moe")["config"], 5.0)
    assert width == s.dense.intermediate_size and "num_experts" not in cfg
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 128


def test_window_tokens_per_expert_and_bytes() -> None:
    s = big_specs()
    acc = WindowAccumulator(8, 64, window_s=1.0, now=0.0)
    stats, meta = block(B=16, n=20)
    acc.add_block(stats, meta, BM)
    assert not acc.due(0.5) and acc.due(1.0)
    w = acc.close(1.0)
    fig = window_figures(w, s, kv_capacity_moe=100_000, kv_bytes_per_token=BM.kv_bytes_per_token,
                         cold_fraction=0.05, baseline=None)
    assert fig["tokens_per_expert_uniform"] == pytest.approx(16 * 4 / 64)
    # measured and distinct expectation agree under uniform routing
    assert fig["tokens_per_expert_measured"] == pytest.approx(fig["tokens_per_expert_distinct"], rel=0.05)
    assert fig["error_tokens_per_expert"] == pytest.approx(1.0, rel=0.05)
    # bytes: predictor and recorder count the same weights here (to within router/norm bytes)
    assert fig["error_step_bytes"] == pytest.approx(1.0, rel=0.05)
    # predicted: the experts the block really touched; predicted_uniform: the expectation
    touched = float(stats.distinct_all.mean())
    st = step_time(s.model, HW, s.partition, 16, 100, distinct_experts_per_layer=touched)
    uni = step_time(s.model, HW, s.partition, 16, 100)
    assert fig["distinct_experts_per_layer"] == pytest.approx(touched)
    assert fig["step_seconds_predicted"] == pytest.approx(st.total_seconds)
    assert fig["step_seconds_predicted_uniform"] == pytest.approx(uni.total_seconds)
    assert fig["routing_cost"] == pytest.approx(st.total_seconds / uni.total_seconds)
    assert fig["routing_cost"] == pytest.approx(1.0, rel=0.05)  # uniform routing: about 1
    assert fig["step_seconds_measured"] == pytest.approx(0.02)
    assert fig["capacity_factor"] == 1.0 and fig["reuse_gap"] == 16.0  # CPU: fixed KV size


def test_gauge_calibration_by_measured_time() -> None:
    s = big_specs()
    for B in (1, 64):
        stats, _ = block(B=B, n=3)
        touched = float(stats.distinct_all.mean())
        mt = step_time(s.model, HW, s.partition, B, 100,
                       distinct_experts_per_layer=touched).total_seconds
        dt = step_time(s.dense, HW, s.dense_partition, B, 100).total_seconds
        for meas, expect in ((mt, mt / dt), (mt + 0.01, (mt + 0.01) / (dt + 0.01)),
                             (mt * 0.5, 1 * mt / dt)):
            acc = WindowAccumulator(8, 64, 1.0, 0.0)
            acc.add_block(*block(B=B, n=3, dur_s=meas), BM)
            fig = window_figures(acc.close(1.0), s, kv_capacity_moe=None, kv_bytes_per_token=0,
                                 cold_fraction=0.05, baseline=None)
            assert fig["dense_speedup"] == pytest.approx(expect, rel=1e-6)
    # q=5 twin of a 64-expert top-4 model: MoE faster at B=1 (bandwidth), dense faster at B=8
    x1 = step_time(s.model, HW, s.partition, 1, 100).total_seconds / step_time(
        s.dense, HW, s.dense_partition, 1, 100).total_seconds
    x8 = step_time(s.model, HW, s.partition, 8, 100).total_seconds / step_time(
        s.dense, HW, s.dense_partition, 8, 100).total_seconds
    assert x1 < 1 < x8


def test_regime_and_ridge() -> None:
    s = big_specs()
    ridge = ridge_point_tokens(s)
    assert ridge == pytest.approx(0.3e12 / 20e9)
    for B, regime in ((4, "bandwidth_bound"), (1024, "compute_bound")):
        acc = WindowAccumulator(8, 64, 1.0, 0.0)
        acc.add_block(*block(B=B, n=1), BM)
        fig = window_figures(acc.close(1.0), s, kv_capacity_moe=None, kv_bytes_per_token=0,
                             cold_fraction=0.05, baseline=None)
        assert fig["regime"] == regime


def test_prefill_and_mixed_steps_are_ignored() -> None:
    acc = WindowAccumulator(8, 64, 1.0, 0.0)
    acc.add_block(*block(B=8, n=5, kind=1), BM)
    acc.add_block(*block(B=8, n=5, kind=2), BM)
    w = acc.close(1.0)
    assert w.steps == 0
    fig = window_figures(w, big_specs(), kv_capacity_moe=None, kv_bytes_per_token=0,
                         cold_fraction=0.05, baseline=None)
    g = window_gauges(fig, list(range(8)))
    assert "dense_speedup_ratio" not in g and "qs_ratio" in g


def test_gauges_names_match_docs() -> None:
    acc = WindowAccumulator(8, 64, 1.0, 0.0)
    acc.add_block(*block(B=32, n=30), BM)
    base = np.ones((8, 64))
    fig = window_figures(acc.close(1.0), big_specs(), kv_capacity_moe=50_000,
                         kv_bytes_per_token=BM.kv_bytes_per_token, cold_fraction=0.05, baseline=base)
    g = window_gauges(fig, list(range(8)))
    assert set(g) == set(WINDOW_GAUGES)
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    for name, spec in g.items():
        assert f"`moe_reuse_{name}`" in docs
        json.dumps(spec)
        for labels, value in spec["samples"]:
            assert len(labels) == len(spec["labels"]) and math.isfinite(value)
    labels = {tuple(lv) for lv, _ in g["tokens_per_expert"]["samples"]}
    assert labels == {("measured",), ("predicted_uniform",), ("predicted_distinct",)}
    for name in ("step_seconds", "step_bytes"):
        assert {tuple(lv) for lv, _ in g[name]["samples"]} == {
            ("measured",), ("predicted",), ("predicted_uniform",)}
    assert {tuple(lv) for lv, _ in g["kv_capacity_tokens"]["samples"]} == {("moe",), ("dense",)}


def test_capacity_factor_on_gpu_grows_with_freed_weights() -> None:
    s = big_specs(kv_fixed=False)
    dense = s.dense_kv_capacity_tokens(10_000, 32768)
    assert dense > 10_000  # the twin's weights are smaller, so it gets more KV


def dp_ep_specs(dp: int, kv_fixed: bool = True):  # type: ignore[no-untyped-def]
    """vLLM's DP attention + EP as the seam reports it: tp 1, dp engines, ep = tp x dp."""
    facts = ServedFacts(hf_config=model_spec("big-moe")["config"], weight_dtype="bfloat16",
                        kv_dtype="bfloat16", kv_fixed_size=kv_fixed, tp=1, dp=dp, ep=dp)
    return build_specs(facts, HW, 5.0)


def test_dp_attention_with_ep_predicts_reads_for_every_engines_tokens() -> None:
    """Each engine's recorder counts its own batch B (vLLM routes before the dispatch), but its
    GPU's experts serve the 4B tokens of all four engines. Uniform routing measured at B must
    predict uniform routing at 4B; a skewed measurement stays skewed (fewer experts than uniform
    at 4B) while more than the engine's own B touched."""
    s = dp_ep_specs(4)
    assert s.ep_span == 4
    E, k, B = s.model.num_experts, s.model.experts_per_token, 8
    uniform_b, uniform_4b = (expected_distinct_experts(E, k, n) for n in (B, 4 * B))
    pg = predict_group(s, B, 100.0, uniform_b)
    assert pg.moe_route.distinct_experts_per_layer == pytest.approx(uniform_4b, rel=1e-6)
    assert pg.moe_uniform.distinct_experts_per_layer == pytest.approx(uniform_4b, rel=1e-9)
    skewed = predict_group(s, B, 100.0, 0.6 * uniform_b).moe_route.distinct_experts_per_layer
    assert 0.6 * uniform_b < skewed < uniform_4b
    one = predict_group(big_specs(), B, 100.0, uniform_b)  # one engine: the measurement as is
    assert one.moe_route.distinct_experts_per_layer == pytest.approx(uniform_b, rel=1e-9)


def test_dp_attention_with_ep_frees_only_each_gpus_share_of_the_experts() -> None:
    """On a GPU the dense twin's cache grows by the weights it does not hold: per GPU, the
    engine's non-expert MoE weights less the twin's, plus a quarter of the routed experts."""
    s = dp_ep_specs(4, kv_fixed=False)
    per_token = 32768.0
    w = weight_bytes_breakdown(s.model)
    freed = (w.total_bytes - w.routed_total_bytes - weight_bytes_breakdown(s.dense).total_bytes
             + w.routed_total_bytes / 4)
    assert s.dense_kv_capacity_tokens(10_000, per_token) == int(10_000 + freed / per_token)
    assert s.dense_kv_capacity_tokens(10_000, per_token) < big_specs(
        kv_fixed=False).dense_kv_capacity_tokens(10_000, per_token)


def test_a_pipeline_ranks_step_is_one_stage_pass_of_its_batch() -> None:
    """Under PP 2 a rank's step runs its own batch B through half the layers once (vLLM keeps two
    batches in flight). Its predicted routed, projection and KV reads are half of the one-stage
    step's at the same B and the same measured routing; the LM head is priced once per pass."""
    model = model_spec("big-moe")["config"]
    assert model["num_hidden_layers"] % 2 == 0
    one = big_specs()
    facts = ServedFacts(hf_config=model, weight_dtype="bfloat16", kv_dtype="bfloat16", pp=2)
    two = build_specs(facts, HW, 5.0)
    B, distinct = 8, 20.0
    a, b = (predict_group(s, B, 100.0, distinct).moe_route for s in (one, two))
    assert b.batch == B and b.distinct_experts_per_layer == a.distinct_experts_per_layer
    for part in ("routed_ffn", "projections", "kv", "shared_ffn", "dense_ffn"):
        assert b.hbm_bytes[part] == pytest.approx(a.hbm_bytes[part] / 2, rel=1e-9), part
    assert b.hbm_bytes["lm_head"] == pytest.approx(a.hbm_bytes["lm_head"], rel=1e-9)
    assert sum(b.hbm_seconds.values()) == pytest.approx(b.hbm_total_seconds, rel=1e-9)


def test_only_the_last_pipeline_stage_is_priced_the_lm_head() -> None:
    """vLLM computes the logits on the last stage only: a stage before it is predicted the same
    pass without the LM head's reads and compute (the recorder's bytes of a first stage hold no
    vocabulary matrix either), for the MoE and its dense twin alike; parts still sum to totals."""
    model = model_spec("big-moe")["config"]
    served = {"hf_config": model, "weight_dtype": "bfloat16", "kv_dtype": "bfloat16", "pp": 2}
    last = build_specs(ServedFacts(**served), HW, 5.0)
    first = build_specs(ServedFacts(**served, last_pp_stage=False), HW, 5.0)
    assert last.holds_lm_head and not first.holds_lm_head
    B, distinct = 8, 20.0
    a, b = predict_group(last, B, 100.0, distinct), predict_group(first, B, 100.0, distinct)
    for x, y in ((a.moe_route, b.moe_route), (a.moe_uniform, b.moe_uniform), (a.dense, b.dense)):
        assert x.hbm_bytes["lm_head"] > 0 and y.hbm_bytes["lm_head"] == 0
        assert y.flops["lm_head"] == 0 and y.compute_seconds["lm_head"] == 0
        for part in ("routed_ffn", "projections", "kv", "shared_ffn", "dense_ffn"):
            assert y.hbm_bytes[part] == x.hbm_bytes[part], part
        assert sum(y.hbm_seconds.values()) == pytest.approx(y.hbm_total_seconds, rel=1e-12)
        assert sum(y.compute_seconds.values()) == pytest.approx(y.compute_total_seconds, rel=1e-12)
        head = x.hbm_seconds["lm_head"]  # decode at B = 8 is HBM-bound on both
        assert x.hbm_total_seconds > x.compute_total_seconds
        assert y.total_seconds < x.total_seconds
        assert x.total_seconds - y.total_seconds >= head * (1 - 1e-9)


def test_js_divergence_and_dead_cold() -> None:
    p = np.array([1, 1, 1, 1.0])
    assert drift.js_divergence(p, p) == pytest.approx(0.0)
    assert drift.js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    counts = np.full((2, 8), 100)
    counts[0, 7] = 0
    counts[1, 3] = 4  # below 5% of the fair share (~88)
    dead, cold = drift.dead_and_cold(counts, 0.05)
    assert dead.tolist() == [1, 0] and cold.tolist() == [1, 1]
    assert drift.dead_and_cold(np.ones((2, 8)), 0.05) is None  # too thin to judge


def test_thin_windows_carry_expert_counts() -> None:
    acc = WindowAccumulator(1, 8, 1.0, 0.0)
    from types import SimpleNamespace

    thin = SimpleNamespace(expert_decode=np.full((1, 8), 10), decode_touched=np.zeros(0),
                           decode_assign=np.zeros(0), distinct_all=np.zeros((1, 0)))
    meta = {k: np.zeros((0, 2) if k in ("tokens", "requests", "context", "comm_ns") else 0)
            for k in ("kind", "tokens", "requests", "context", "duration_ns", "comm_ns")}
    acc.add_block(thin, meta, BM)
    acc.close(1.0)
    acc.add_block(thin, meta, BM)
    w = acc.close(2.0)
    assert w.expert_tokens.sum() == 160 and drift.dead_and_cold(w.expert_tokens, 0.05) is not None


def test_baseline_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    b = drift.make_baseline({3: [1, 2, 3, 4], 5: [4, 3, 2, 1]}, num_experts=4, top_k=2, source="t")
    drift.save_baseline(tmp_path / "b.json", b)
    m = drift.baseline_matrix(drift.load_baseline(tmp_path / "b.json"), [3, 5, 9], 4)
    assert m[0].tolist() == [1, 2, 3, 4] and np.isnan(m[2]).all()
    out = drift.drift_per_layer(np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1]]), m)
    assert out[0] == pytest.approx(0) and out[1] > 0.05 and math.isnan(out[2])


def test_monitor_publishes_and_never_raises() -> None:
    from types import SimpleNamespace

    t = [0.0]
    cfg = PluginConfig(window_s=1.0)
    mon = LiveMonitor(big_specs(), cfg, list(range(8)), kv_capacity=lambda: 4096, baseline=None,
                      clock=lambda: t[0])
    session = SimpleNamespace(gauges={"other": {"doc": "", "labels": [], "samples": []}},
                              bytes_model=BM, errors={}, degraded=set())
    mon(*block(B=4, n=5), session)
    assert "qs_ratio" in session.gauges and "dense_speedup_ratio" not in session.gauges
    t[0] = 1.5
    mon(*block(B=4, n=5), session)
    assert session.gauges["dense_speedup_ratio"]["samples"][0][1] > 0
    assert "other" in session.gauges
    mon(None, {}, session)  # garbage: counted, gauges withdrawn, no exception
    assert session.errors == {"live_window": 1} and "dense_speedup_ratio" not in session.gauges
    assert session.degraded == {"live_window"}  # exported as enabled{reason="degraded"} 1
    t[0] = 3.0
    mon(*block(B=4, n=5), session)  # the next window that closes fine clears it
    assert session.degraded == set() and "dense_speedup_ratio" in session.gauges


def test_a_due_window_closes_on_an_idle_poll_once_it_holds_decode_steps() -> None:
    """A burst shorter than window_s (a fast engine) used to wait for the next request to be
    judged: windows closed only when a block arrived. An idle poll (`tick`) closes a due window
    that holds decode steps, and leaves an empty one open (idle time makes no windows)."""
    from types import SimpleNamespace

    t = [0.0]
    mon = LiveMonitor(big_specs(), PluginConfig(window_s=1.0), list(range(8)),
                      kv_capacity=lambda: 4096, baseline=None, clock=lambda: t[0])
    session = SimpleNamespace(gauges={}, bytes_model=BM, errors={}, degraded=set())
    assert not mon.tick(session)  # nothing yet, not due
    mon(*block(B=4, n=5), session)  # the whole burst, inside the first window
    t[0] = 0.5
    assert not mon.tick(session) and mon.windows == 0  # not due yet
    t[0] = 1.2
    assert mon.tick(session) and mon.windows == 1
    assert session.gauges["dense_speedup_ratio"]["samples"][0][1] > 0
    t[0] = 5.0
    assert not mon.tick(session) and mon.windows == 1  # an idle window is not closed
    broken = SimpleNamespace(gauges={}, bytes_model=None, errors={}, degraded=set())
    mon.acc.data.steps = 1  # a due window whose figures fail: counted once, then dropped
    assert mon.tick(broken) and broken.errors == {"live_window": 1}
    assert not mon.tick(broken) and broken.errors == {"live_window": 1}
    reader = RankReader.__new__(RankReader)  # the reader's side: listeners with and without tick
    reader.listeners, reader.broken, reader.gauges = [lambda *a: None, mon], False, {}
    reader.bytes_model = BM
    mon(*block(B=4, n=5), reader)  # the dropped window restarted at 5.0: not due
    assert mon.windows == 1
    t[0] = 6.5
    assert reader.tick() and mon.windows == 2
    reader.broken = True  # a rank whose folding failed runs no listener
    mon(*block(B=4, n=5), reader)
    t[0] = 8.0
    assert not reader.tick() and mon.windows == 2


def test_resolve_hardware(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MOE_REUSE_HARDWARE_FILE", str(tmp_path / "none.json"))
    assert resolve_hardware("auto").name == "cpu-generic"
    assert resolve_hardware("auto", "NVIDIA H100 80GB HBM3").name == "h100-sxm"
    assert resolve_hardware("h200").name == "h200"
    f = tmp_path / "hw.json"
    f.write_text(json.dumps({"name": "x", "hbm_capacity_gb": 1, "hbm_bandwidth_gb_per_s": 10,
                             "peak_tflops": {"bf16": 0.1}, "intra_node_bandwidth_gb_per_s": 1,
                             "gpus_per_node": 1, "notes": {"a": 1}}))
    monkeypatch.setenv("MOE_REUSE_HARDWARE_FILE", str(f))
    assert resolve_hardware("auto").name == "x"
    assert resolve_hardware(str(f)).name == "x"
