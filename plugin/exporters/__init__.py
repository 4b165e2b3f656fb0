"""Exporters: snapshot -> Prometheus families, multiprocess bridge, OpenTelemetry."""
