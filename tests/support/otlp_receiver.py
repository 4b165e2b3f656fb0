"""A real OTLP/HTTP metrics receiver for tests: decodes the protobuf payloads it is sent.

    with OtlpReceiver() as rx:
        ...  # point the plugin's `otlp_endpoint` at rx.endpoint
        rx.wait(1)
        metrics(rx.requests[-1])["moe_reuse_tokens"].sum.data_points

No mocked exporter anywhere: the plugin's OpenTelemetry SDK exporter posts
`ExportMetricsServiceRequest` protobufs (opentelemetry-proto, a test extra) to this server.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)


class OtlpReceiver:
    """POST /v1/metrics (application/x-protobuf, optionally gzip or deflate) on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
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

    def wait(self, n: int, timeout: float = 20) -> bool:
        """Wait until at least n requests arrived; True if they did."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n and time.monotonic() < deadline:
                self.cond.wait(0.2)
            return len(self.requests) >= n

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metrics(req: ExportMetricsServiceRequest) -> dict[str, Any]:
    """Metric name -> Metric message of one request."""
    return {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def resource(req: ExportMetricsServiceRequest) -> dict[str, str]:
    """Resource attributes of the request's first resource."""
    return {a.key: a.value.string_value for a in req.resource_metrics[0].resource.attributes}


def attrs(point: Any) -> dict[str, str]:
    """Attributes of one data point."""
    return {a.key: a.value.string_value for a in point.attributes}


def value(point: Any) -> float:
    """A number data point's value, whichever of int or double it carries."""
    return float(point.as_double if point.WhichOneof("value") == "as_double" else point.as_int)
