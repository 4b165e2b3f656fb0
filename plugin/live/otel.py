"""The plugin's metrics through OpenTelemetry (OTLP over HTTP or gRPC), pushed from each worker.

For clusters that push to a collector, including multi-node deployments where workers do not
share a host with the API server: every rank runs its own MeterProvider and pushes what it
recorded. The instruments are observable: their callbacks read the latest snapshot, which the
recorder's flusher hands over once per flushed block, so the OTel export thread never touches
live counters.

The same families as /metrics, built by the same pure function
(`exporters.families.snapshot_families`): counters become ObservableCounters (monotonic,
cumulative; the name without `_total`, which a collector's Prometheus exporter adds back),
gauges ObservableGauges with the same name and labels. The one histogram
(`moe_reuse_expert_batch_tokens`) is not pushed: OTel has no observable histogram; its sum and
count are on /metrics. Resource attributes: service.name, model, engine, rank, host.name.

Enabled by the `otlp_endpoint` config key: `http(s)://host:4318/v1/metrics` (OTLP/HTTP protobuf)
or `grpc://host:4317` (OTLP/gRPC, needs opentelemetry-exporter-otlp-proto-grpc).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..exporters.families import snapshot_families

SERVICE_NAME = "vllm-moe-reuse"


def make_exporter(endpoint: str) -> Any:
    if endpoint.startswith("grpc://"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=endpoint[len("grpc://"):], insecure=True)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(endpoint=endpoint)


Points = dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]]


def families_to_points(snapshot: dict[str, Any] | list[dict[str, Any]]) -> Points:
    """Pure: snapshot (or several ranks' snapshots, as `moe-reuse exporter` pushes them) ->
    {name: (kind, doc, [(attributes, value)])} for counters and gauges."""
    snaps = snapshot if isinstance(snapshot, list) else [snapshot]
    out: Points = {}
    for fam in snapshot_families(snaps):
        if fam.type not in ("counter", "gauge"):
            continue
        wanted = {fam.name, fam.name + "_total"}
        points = [(dict(s.labels), float(s.value)) for s in fam.samples if s.name in wanted]
        out[fam.name] = (fam.type, fam.documentation, points)
    return out


class OtelBridge:
    """One MeterProvider per rank; `update(snapshot)` from the flusher, export on its own thread."""

    def __init__(self, endpoint: str, interval_s: float, labels: dict[str, str], *,
                 exporter: Any = None) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        attrs = {"service.name": SERVICE_NAME, "host.name": socket.gethostname(),
                 **{k: str(v) for k, v in labels.items()}}
        self.reader = PeriodicExportingMetricReader(
            exporter or make_exporter(endpoint), export_interval_millis=interval_s * 1000.0)
        self.provider = MeterProvider(metric_readers=[self.reader], resource=Resource.create(attrs))
        self.meter = self.provider.get_meter("moe_reuse")
        self._lock = threading.Lock()
        self._latest: Points = {}
        self._instruments: set[str] = set()

    def update(self, snapshot: dict[str, Any] | list[dict[str, Any]]) -> None:
        latest = families_to_points(snapshot)
        with self._lock:
            self._latest = latest
        for name, (kind, doc, _) in latest.items():
            if name in self._instruments:
                continue
            self._instruments.add(name)
            create = (self.meter.create_observable_counter if kind == "counter"
                      else self.meter.create_observable_gauge)
            create(name, callbacks=[self._callback(name)], description=doc)

    def _callback(self, name: str) -> Callable[[Any], Iterable[Any]]:
        from opentelemetry.metrics import Observation

        def observe(_options: Any) -> Iterable[Any]:
            with self._lock:
                entry = self._latest.get(name)
            if entry is None:
                return []
            return [Observation(v, attrs) for attrs, v in entry[2]]

        return observe

    def flush(self, timeout_ms: float = 10_000) -> bool:
        return bool(self.provider.force_flush(timeout_millis=timeout_ms))

    def shutdown(self) -> None:
        self.provider.shutdown()
