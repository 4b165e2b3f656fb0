"""OTLP push against a real receiver: an HTTP server in the test decodes the protobuf payloads.

No mocked exporter: the plugin's OtelBridge runs the SDK's PeriodicExportingMetricReader with the
OTLP/HTTP exporter; the receiver parses `ExportMetricsServiceRequest` (opentelemetry-proto) and the
test checks metric names, kinds, attributes, resource attributes and values.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

pytest.importorskip("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2")

from otlp_receiver import OtlpReceiver, attrs, metrics, resource, value  # noqa: E402

from moe_reuse.plugin.live.otel import OtelBridge, families_to_points  # noqa: E402
from moe_reuse.plugin.recorder.aggregate import Totals  # noqa: E402


def make_snapshot(speedup: float) -> dict[str, Any]:
    t = Totals(2, 4)
    t.steps[:] = [10, 2, 1]
    t.tokens[:] = [64, 40]
    t.expert_tokens[:] = 5
    return {
        "version": 1, "time": time.time(), "labels": {"model": "m", "engine": "0", "rank": "0"},
        "info": {"version": "t", "top_k": "2"}, "layer_ids": [0, 1], "top_k": 2, "enabled": True,
        "errors": {}, "comm_mode": "none", "totals": t.arrays(),
        "gauges": {
            "dense_speedup_ratio": {"doc": "x", "labels": [], "samples": [[[], speedup]]},
            "step_seconds": {"doc": "s", "labels": ["source"],
                             "samples": [[["measured"], 0.02], [["predicted"], 0.018]]},
            "routing_drift_ratio": {"doc": "d", "labels": ["layer"],
                                    "samples": [[["0"], 0.1], [["1"], 0.3]]},
        },
        "options": {},
    }


def test_families_to_points_pure() -> None:
    pts = families_to_points(make_snapshot(2.5))
    kind, _, samples = pts["moe_reuse_dense_speedup_ratio"]
    assert kind == "gauge" and samples == [({"model": "m", "engine": "0", "rank": "0"}, 2.5)]
    kind, _, samples = pts["moe_reuse_steps"]
    assert kind == "counter" and {s[0]["kind"]: s[1] for s in samples} == {
        "decode": 10, "prefill": 2, "mixed": 1}
    assert "moe_reuse_expert_batch_tokens" not in pts  # histogram: /metrics only


def test_otlp_http_push_to_real_receiver() -> None:
    rx = OtlpReceiver()
    bridge = OtelBridge(rx.endpoint, 0.5, {"model": "m", "engine": "0", "rank": "0"})
    try:
        bridge.update(make_snapshot(2.5))
        assert bridge.flush()
        rx.wait(1)
        assert rx.requests, "no OTLP request reached the receiver"
        req = rx.requests[-1]
        res = resource(req)
        assert res["service.name"] == "vllm-moe-reuse" and res["model"] == "m"
        assert res["rank"] == "0" and res["host.name"]
        m = metrics(req)
        g = m["moe_reuse_dense_speedup_ratio"]
        assert g.WhichOneof("data") == "gauge"
        assert g.gauge.data_points[0].as_double == pytest.approx(2.5)
        assert attrs(g.gauge.data_points[0])["model"] == "m"
        steps = m["moe_reuse_steps"]
        assert steps.WhichOneof("data") == "sum" and steps.sum.is_monotonic
        by_kind = {attrs(p)["kind"]: value(p) for p in steps.sum.data_points}
        assert by_kind == {"decode": 10, "prefill": 2, "mixed": 1}
        drift = {attrs(p)["layer"]: p.as_double for p in m["moe_reuse_routing_drift_ratio"].gauge.data_points}
        assert drift == pytest.approx({"0": 0.1, "1": 0.3})
        sec = {attrs(p)["source"]: p.as_double for p in m["moe_reuse_step_seconds"].gauge.data_points}
        assert sec == pytest.approx({"measured": 0.02, "predicted": 0.018})
        # the next snapshot's values are what the next export carries (periodic reader)
        n = len(rx.requests)
        bridge.update(make_snapshot(0.7))
        rx.wait(n + 1)
        last = metrics(rx.requests[-1])["moe_reuse_dense_speedup_ratio"]
        assert last.gauge.data_points[0].as_double == pytest.approx(0.7)
    finally:
        bridge.shutdown()
        rx.close()
