"""OTLP push against a real receiver: an HTTP server in the test decodes the protobuf payloads.

No mocked exporter: the plugin's OtelBridge runs the SDK's PeriodicExportingMetricReader with the
OTLP/HTTP exporter; the receiver parses `ExportMetricsServiceRequest` (opentelemetry-proto) and the
test checks metric names, kinds, attributes, resource attributes and values.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

pytest.importorskip("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2")

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (  # noqa: E402
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from moe_reuse.plugin.live.otel import OtelBridge, families_to_points  # noqa: E402
from moe_reuse.plugin.recorder.aggregate import Totals  # noqa: E402


class Receiver:
    """A minimal OTLP/HTTP metrics receiver (POST /v1/metrics, application/x-protobuf)."""

    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                enc = self.headers.get("Content-Encoding", "")
                if enc == "gzip":
                    body = gzip.decompress(body)
                elif enc == "deflate":
                    body = zlib.decompress(body)
                req = ExportMetricsServiceRequest()
                req.ParseFromString(body)
                with outer.cond:
                    outer.requests.append(req)
                    outer.cond.notify_all()
                out = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/metrics" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"

    def wait(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n and time.monotonic() < deadline:
                self.cond.wait(0.2)

    def close(self) -> None:
        self.server.shutdown()


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


def _metrics(req: ExportMetricsServiceRequest) -> dict[str, Any]:
    out = {}
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = m
    return out


def _resource(req: ExportMetricsServiceRequest) -> dict[str, str]:
    rm = req.resource_metrics[0]
    return {a.key: a.value.string_value for a in rm.resource.attributes}


def _attrs(point: Any) -> dict[str, str]:
    return {a.key: a.value.string_value for a in point.attributes}


def test_families_to_points_pure() -> None:
    pts = families_to_points(make_snapshot(2.5))
    kind, _, samples = pts["moe_reuse_dense_speedup_ratio"]
    assert kind == "gauge" and samples == [({"model": "m", "engine": "0", "rank": "0"}, 2.5)]
    kind, _, samples = pts["moe_reuse_steps"]
    assert kind == "counter" and {s[0]["kind"]: s[1] for s in samples} == {
        "decode": 10, "prefill": 2, "mixed": 1}
    assert "moe_reuse_expert_batch_tokens" not in pts  # histogram: /metrics only


def test_otlp_http_push_to_real_receiver() -> None:
    rx = Receiver()
    bridge = OtelBridge(rx.endpoint, 0.5, {"model": "m", "engine": "0", "rank": "0"})
    try:
        bridge.update(make_snapshot(2.5))
        assert bridge.flush()
        rx.wait(1)
        assert rx.requests, "no OTLP request reached the receiver"
        req = rx.requests[-1]
        res = _resource(req)
        assert res["service.name"] == "vllm-moe-reuse" and res["model"] == "m"
        assert res["rank"] == "0" and res["host.name"]
        m = _metrics(req)
        g = m["moe_reuse_dense_speedup_ratio"]
        assert g.WhichOneof("data") == "gauge"
        assert g.gauge.data_points[0].as_double == pytest.approx(2.5)
        assert _attrs(g.gauge.data_points[0])["model"] == "m"
        steps = m["moe_reuse_steps"]
        assert steps.WhichOneof("data") == "sum" and steps.sum.is_monotonic
        by_kind = {_attrs(p)["kind"]: p.as_double or p.as_int for p in steps.sum.data_points}
        assert by_kind == {"decode": 10, "prefill": 2, "mixed": 1}
        drift = {_attrs(p)["layer"]: p.as_double for p in m["moe_reuse_routing_drift_ratio"].gauge.data_points}
        assert drift == pytest.approx({"0": 0.1, "1": 0.3})
        sec = {_attrs(p)["source"]: p.as_double for p in m["moe_reuse_step_seconds"].gauge.data_points}
        assert sec == pytest.approx({"measured": 0.02, "predicted": 0.018})
        # the next snapshot's values are what the next export carries (periodic reader)
        n = len(rx.requests)
        bridge.update(make_snapshot(0.7))
        rx.wait(n + 1)
        last = _metrics(rx.requests[-1])["moe_reuse_dense_speedup_ratio"]
        assert last.gauge.data_points[0].as_double == pytest.approx(0.7)
    finally:
        bridge.shutdown()
        rx.close()
    assert np.isfinite(len(rx.requests))
