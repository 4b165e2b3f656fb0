"""Bridge for prometheus multiprocess mode (`--api-server-count > 1`).

In that mode vLLM's /metrics is a fresh registry with only a MultiProcessCollector, which reads the
per-process value files in PROMETHEUS_MULTIPROC_DIR; a collector in the API server's REGISTRY
disappears. So the reader (`moe_reuse.plugin.reader`, in the launcher of those API servers)
writes every rank's families into those files, through prometheus_client's metric objects (their multiprocess value class maps to the files). The families come from the same
pure `snapshot_families` as in single-server mode, so both modes export identical series.

Counters and histogram buckets are set to the snapshot's cumulative totals (the file holds this
process's value; MultiProcessCollector sums across processes, and every rank has its own labels).
Gauges use `multiprocess_mode="mostrecent"`.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import Metric

from ..recorder.aggregate import HIST_BOUNDS
from .families import snapshot_families


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class MultiprocessBridge:
    """Mirror snapshot families into prometheus_client multiprocess value files."""

    def __init__(self) -> None:
        # A private registry: the objects exist only to own value files, never to be collected here.
        self._registry = CollectorRegistry()
        # prometheus_client picks its value class when first imported; the process running the
        # reader (vLLM's launcher of several API servers) may have imported it before vLLM set
        # PROMETHEUS_MULTIPROC_DIR, and would then keep values in memory nobody reads.
        if multiprocess_mode() and values.ValueClass.__name__ != "MmapedValue":
            values.ValueClass = values.MultiProcessValue()
        self._metrics: dict[str, Any] = {}

    def _metric(self, fam: Metric, labelnames: tuple[str, ...]) -> Any:
        key = fam.name
        m = self._metrics.get(key)
        if m is None:
            doc = fam.documentation or fam.name
            if fam.type == "counter":
                m = Counter(fam.name, doc, labelnames, registry=self._registry)
            elif fam.type == "histogram":
                m = Histogram(fam.name, doc, labelnames, registry=self._registry,
                              buckets=[float(b) for b in HIST_BOUNDS] + [float("inf")])
            else:
                m = Gauge(fam.name, doc, labelnames, registry=self._registry,
                          multiprocess_mode="mostrecent")
            self._metrics[key] = m
        return m

    def publish(self, snapshot: dict[str, Any]) -> None:
        for fam in snapshot_families([snapshot]):
            if not fam.samples:
                continue
            labelnames = tuple(k for k in fam.samples[0].labels if k != "le")
            m = self._metric(fam, labelnames)
            if fam.type == "histogram":
                self._set_histogram(m, fam, labelnames)
                continue
            for s in fam.samples:
                if fam.type == "counter" and not s.name.endswith("_total"):
                    continue  # CounterMetricFamily also yields _created samples
                child = m.labels(*[s.labels[k] for k in labelnames])
                if fam.type == "counter":
                    child._value.set(s.value)
                else:
                    child.set(s.value)

    @staticmethod
    def _set_histogram(m: Any, fam: Metric, labelnames: tuple[str, ...]) -> None:
        by_series: dict[tuple[str, ...], dict[str, float]] = {}
        sums: dict[tuple[str, ...], float] = {}
        for s in fam.samples:
            key = tuple(s.labels[k] for k in labelnames)
            if s.name.endswith("_bucket"):
                by_series.setdefault(key, {})[s.labels["le"]] = s.value
            elif s.name.endswith("_sum"):
                sums[key] = s.value
        for key, buckets in by_series.items():
            child = m.labels(*key)
            prev = 0.0
            for i, bound in enumerate(child._upper_bounds):
                le = "+Inf" if bound == float("inf") else str(float(bound))
                cum = buckets.get(le, prev)
                child._buckets[i].set(cum - prev)  # files hold per-bucket, not cumulative, counts
                prev = cum
            child._sum.set(sums.get(key, 0.0))
