"""The live comparison on a real vLLM server (one server, eager, the V1 runner, the rigged
Qwen3-MoE). The live comparison sits downstream of the step protocol; the demo (tests/integration/
test_demo_server.py) runs it on Model Runner V2 and checks its figures every wave. This test stays
on V1 for CI's time budget: its traffic takes 3.6 minutes through V2's Triton interpreter here
against 1.5 on V1.

The rigged model's router can never pick expert 7 in any layer, and otherwise serves like any
Qwen3-MoE, so one server start checks three things:

1. every live gauge of docs/metrics.md is on /metrics with sane values (qs = 5*2/8, E/k = 4,
   positive measured and predicted step time and bytes, exactly one FFN regime, KV capacity from
   vLLM's allocated cache, a finite dense-speedup gauge);
2. the dead expert is detected: `dead_experts{layer}` = 1 in every MoE layer (and it is cold);
3. drift: a baseline saved with `moe-reuse baseline save --url` from diverse random-token traffic
   is picked up without a restart; the same kind of traffic keeps the divergence low, and traffic
   from another domain (one repeated prompt, which collapses routing) raises it;
4. OpenTelemetry: the worker pushes the same metrics over OTLP/HTTP to a real receiver started
   here, which decodes the protobuf payloads: resource attributes name the model and rank, the
   live gauges are there, and each push is a consistent snapshot (decode assignments per layer =
   decode tokens x top-k, exactly).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pytest
from otlp_receiver import OtlpReceiver, attrs, metrics, resource, value

from moe_reuse.plugin.harness.load import random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts
from moe_reuse.plugin.live.baseline_cli import cmd_baseline_save
from moe_reuse.plugin.metrics_text import samples

pytestmark = pytest.mark.integration

WINDOW_S = 3.0


def by(text: str, name: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in samples(text, name) if label in s.labels}


def one(text: str, name: str) -> float:
    vals = [s.value for s in samples(text, name)]
    assert len(vals) == 1, f"{name}: {vals}"
    return vals[0]


def traffic(url: str, prompts: list[list[int]], max_tokens: int = 24, concurrency: int = 8) -> None:
    run_concurrent(url, [(p, max_tokens) for p in prompts], concurrency)


def wait_windows(n: int = 2) -> None:
    time.sleep(n * WINDOW_S + 1.5)


def test_live_gauges_dead_expert_and_drift(tmp_path: Path) -> None:
    model_dir = build_model("qwen3-moe-rigged")
    facts = model_facts(model_dir)
    baseline = tmp_path / "baseline.json"
    rx = OtlpReceiver()
    cfg = {"moe_reuse": {"window_s": WINDOW_S, "q": 5.0, "per_expert_series": True,
                         "routing_baseline": str(baseline), "otlp_endpoint": rx.endpoint,
                         "otlp_interval_s": 1.0}}
    vocab = facts.vocab_size
    with rx, VllmServer(model_dir, enforce_eager=True, additional_config=cfg,
                        runner="v1").start() as srv:
        # diverse traffic (near-uniform routing), long enough for a judged window
        diverse = random_prompts(48, 24, vocab, seed=1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2 * WINDOW_S + 2:
            traffic(srv.url, diverse)
        text = srv.metrics_text()

        # 1. the live gauges, sane values
        assert one(text, "moe_reuse_qs_ratio") == pytest.approx(5.0 * 2 / 8)
        assert one(text, "moe_reuse_routing_factor_ratio") == pytest.approx(4.0)
        assert one(text, "moe_reuse_capacity_factor_ratio") == pytest.approx(1.0)  # CPU: fixed KV
        assert one(text, "moe_reuse_reuse_gap_ratio") == pytest.approx(4.0)
        kv = by(text, "moe_reuse_kv_capacity_tokens", "model_kind")
        assert kv["moe"] > 1000 and kv["dense"] == kv["moe"]
        assert one(text, "moe_reuse_hbm_peak_bytes_per_second") > 1e9
        assert one(text, "moe_reuse_ridge_point_tokens") > 0
        x = one(text, "moe_reuse_dense_speedup_ratio")
        assert math.isfinite(x) and 0.05 < x < 20
        sec = by(text, "moe_reuse_step_seconds", "source")
        assert 0 < sec["measured"] < 5 and 0 < sec["predicted"] < 5
        byt = by(text, "moe_reuse_step_bytes", "source")
        assert byt["measured"] > 0 and byt["predicted"] > 0
        assert 0.5 < byt["predicted"] / byt["measured"] < 2.0
        tpe = by(text, "moe_reuse_tokens_per_expert", "source")
        assert set(tpe) == {"measured", "predicted_uniform", "predicted_distinct"}
        assert 1.0 <= tpe["measured"] <= 8 * 2 and tpe["predicted_distinct"] >= 1.0
        err = by(text, "moe_reuse_model_error_ratio", "quantity")
        assert set(err) == {"step_seconds", "step_bytes", "tokens_per_expert"}
        assert all(v > 0 for v in err.values())
        regime = by(text, "moe_reuse_ffn_regime", "regime")
        assert sorted(regime.values()) == [0.0, 1.0]

        # 2. the dead expert: expert 7 never picked, in every MoE layer
        dead = by(text, "moe_reuse_dead_experts", "layer")
        cold = by(text, "moe_reuse_cold_experts", "layer")
        assert set(dead) == {str(i) for i in facts.moe_layer_indices}
        assert all(v == 1 for v in dead.values()), dead
        assert all(v >= 1 for v in cold.values()), cold
        assert "moe_reuse_routing_drift_ratio" not in text  # no baseline yet

        # 3. drift: save a baseline of diverse traffic over a few seconds, picked up live
        import threading

        saver = threading.Thread(target=cmd_baseline_save, args=(argparse.Namespace(
            url=srv.url, snapshot_dir="", model=None, seconds=2 * WINDOW_S, out=str(baseline)),))
        saver.start()
        t0 = time.monotonic()
        while saver.is_alive():
            traffic(srv.url, diverse)
        saver.join()
        assert baseline.exists()
        fresh = random_prompts(48, 24, vocab, seed=2)  # same domain, other prompts
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2 * WINDOW_S + 2:
            traffic(srv.url, fresh)
        same = by(srv.metrics_text(), "moe_reuse_routing_drift_ratio", "layer")
        assert set(same) == {str(i) for i in facts.moe_layer_indices}
        # another domain: one repeated prompt, decode collapses onto few experts
        other = [[5, 6, 7, 8] * 6] * 48
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2 * WINDOW_S + 2:
            traffic(srv.url, other)
        changed = by(srv.metrics_text(), "moe_reuse_routing_drift_ratio", "layer")
        mean_same = sum(same.values()) / len(same)
        mean_changed = sum(changed.values()) / len(changed)
        assert mean_same < 0.1, same
        assert mean_changed > 2 * mean_same and mean_changed > 0.1, (same, changed)
        final = srv.metrics_text()
        assert not [s.labels["stage"] for s in samples(final, "moe_reuse_errors_total")
                    if s.labels["stage"].startswith(("live_", "otlp_push"))], \
            "the live comparison reported an error"

        # 4. the OTLP push: a real receiver, protobuf decoded
        assert rx.wait(3), "no OTLP export reached the receiver"
        req = rx.requests[-1]
        res = resource(req)
        assert res["service.name"] == "vllm-moe-reuse" and res["rank"] == "0"
        assert res["model"] == srv.served_model_name
        m = metrics(req)
        for name in ("moe_reuse_dense_speedup_ratio", "moe_reuse_step_seconds",
                     "moe_reuse_dead_experts", "moe_reuse_routing_drift_ratio"):
            assert m[name].WhichOneof("data") == "gauge", name
        dead_otlp = {attrs(p)["layer"]: value(p) for p in m["moe_reuse_dead_experts"].gauge.data_points}
        assert set(dead_otlp) == {str(i) for i in facts.moe_layer_indices}
        tokens = m["moe_reuse_tokens"]
        assert tokens.WhichOneof("data") == "sum" and tokens.sum.is_monotonic
        decode = [value(p) for p in tokens.sum.data_points if attrs(p)["phase"] == "decode"]
        assert len(decode) == 1 and 0 < decode[0] <= by(final, "moe_reuse_tokens_total", "phase")["decode"]
        assign = {attrs(p)["layer"]: value(p) for p in m["moe_reuse_expert_assignments"].sum.data_points
                  if attrs(p)["phase"] == "decode"}
        assert assign == {str(i): decode[0] * facts.top_k for i in facts.moe_layer_indices}
