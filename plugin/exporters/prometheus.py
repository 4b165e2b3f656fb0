"""Snapshots -> Prometheus metric families, and the two ways they reach vLLM's /metrics.

`snapshot_families` is a pure function (like client_python's process collector): every scrape
builds fresh families from the latest snapshots, so nothing here holds state that can drift.

- One API server: `SnapshotCollector` is registered in prometheus_client's global REGISTRY inside
  the API-server process and reads the workers' snapshot files at scrape time.
- `--api-server-count > 1`: vLLM switches /metrics to prometheus multiprocess mode, which only reads
  the per-process value files in PROMETHEUS_MULTIPROC_DIR. `MultiprocessBridge` runs in each worker
  and writes the same families into those files through prometheus_client's own value classes.

Metric names, labels and intended PromQL are documented in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ..recorder.aggregate import COMM_OPS, COMPONENTS, HIST_BOUNDS, KINDS, PHASES
from ..snapshot import read_snapshots

BASE_LABELS = ("model", "engine", "rank")
P = "moe_reuse_"


class _Families:
    """Name -> family, so samples of several ranks merge into one family per metric."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}

    def counter(self, name: str, doc: str, labels: Iterable[str]) -> CounterMetricFamily:
        fam = self.by_name.get(name)
        if fam is None:
            fam = CounterMetricFamily(P + name, doc, labels=list(labels))
            self.by_name[name] = fam
        return fam  # type: ignore[return-value]

    def gauge(self, name: str, doc: str, labels: Iterable[str]) -> GaugeMetricFamily:
        fam = self.by_name.get(name)
        if fam is None:
            fam = GaugeMetricFamily(P + name, doc, labels=list(labels))
            self.by_name[name] = fam
        return fam  # type: ignore[return-value]

    def histogram(self, name: str, doc: str, labels: Iterable[str]) -> HistogramMetricFamily:
        fam = self.by_name.get(name)
        if fam is None:
            fam = HistogramMetricFamily(P + name, doc, labels=list(labels))
            self.by_name[name] = fam
        return fam  # type: ignore[return-value]


def _add_rank(f: _Families, snap: dict[str, Any], options: dict[str, Any]) -> None:
    lab = snap["labels"]
    base = [str(lab.get(k, "")) for k in BASE_LABELS]
    t = snap["totals"]
    layers = [str(i) for i in snap["layer_ids"]]
    info = snap["info"]
    info_keys = sorted(info)
    f.gauge("info", "Static facts of the served MoE model and the plugin.",
            [*BASE_LABELS, *info_keys]).add_metric(base + [str(info[k]) for k in info_keys], 1)
    f.gauge("enabled", "1 while the recorder records; 0 after a runtime fault disabled it.",
            BASE_LABELS).add_metric(base, 1.0 if snap["enabled"] else 0.0)
    errs = f.counter("errors", "Runtime faults caught inside the plugin, by stage.",
                     [*BASE_LABELS, "stage"])
    for stage, n in sorted(snap["errors"].items()):
        errs.add_metric(base + [stage], n)
    f.counter("dropped_steps", "Steps not recorded because the device ring was full.",
              BASE_LABELS).add_metric(base, float(t["dropped_steps"]))
    steps = f.counter("steps", "Forward steps recorded, by kind.", [*BASE_LABELS, "kind"])
    dur = f.counter("step_duration_seconds", "Wall time of recorded steps (host, off the forward).",
                    [*BASE_LABELS, "kind"])
    for i, kind in enumerate(KINDS):
        steps.add_metric(base + [kind], float(t["steps"][i]))
        dur.add_metric(base + [kind], float(t["duration_s"][i]))
    tok = f.counter("tokens", "Computed tokens by phase, padding excluded.", [*BASE_LABELS, "phase"])
    req = f.counter("batch_requests", "Sum over steps of the requests in each step.",
                    [*BASE_LABELS, "phase"])
    ctx = f.counter("context_tokens", "Sum over steps of the requests' context lengths.",
                    [*BASE_LABELS, "phase"])
    for i, ph in enumerate(PHASES):
        tok.add_metric(base + [ph], float(t["tokens"][i]))
        req.add_metric(base + [ph], float(t["requests"][i]))
        ctx.add_metric(base + [ph], float(t["context"][i]))
    f.counter("padding_tokens", "Padded rows routed through the MoE layers (not counted elsewhere).",
              BASE_LABELS).add_metric(base, float(t["padding_tokens"]))
    lbl = [*BASE_LABELS, "layer", "phase"]
    asg = f.counter("expert_assignments", "Routed (token, expert) assignments per MoE layer.", lbl)
    tch = f.counter("experts_touched", "Sum over steps of distinct experts touched.", lbl)
    mxl = f.counter("max_expert_tokens", "Sum over steps of the largest per-expert load.", lbl)
    for li, layer in enumerate(layers):
        for pi, ph in enumerate(PHASES):
            asg.add_metric(base + [layer, ph], float(t["assignments"][li, pi]))
            tch.add_metric(base + [layer, ph], float(t["touched"][li, pi]))
            mxl.add_metric(base + [layer, ph], float(t["max_load"][li, pi]))
    hist = f.histogram("expert_batch_tokens",
                       "Expert-local batch: tokens per touched expert per (step, layer).",
                       [*BASE_LABELS, "phase"])
    for pi, ph in enumerate(PHASES):
        cum = np.cumsum(t["hist_buckets"][pi])
        buckets = [(str(float(b)), float(c)) for b, c in zip(HIST_BOUNDS, cum[:-1])]
        buckets.append(("+Inf", float(cum[-1])))
        hist.add_metric(base + [ph], buckets, float(t["hist_sum"][pi]))
    hbm = f.counter("hbm_read_bytes", "Bytes the steps read from HBM given the actual routing.",
                    [*BASE_LABELS, "component"])
    for i, comp in enumerate(COMPONENTS):
        hbm.add_metric(base + [comp], float(t["hbm_bytes"][i]))
    mode = snap.get("comm_mode", "none")
    f.gauge("moe_comm_info", "Which collective the MoE layers use here (none: no series).",
            [*BASE_LABELS, "mode"]).add_metric(base + [mode], 1)
    if mode != "none":
        comm = f.counter("moe_comm_seconds", "Time in the MoE layers' collectives.",
                         [*BASE_LABELS, "op"])
        op = "all_to_all" if mode == "ep_all_to_all" else "all_reduce"
        comm.add_metric(base + [op], float(t["comm_s"][COMM_OPS.index(op)]))
    if options.get("per_expert_series"):
        _per_expert(f, base, layers, t["expert_tokens"], int(options.get("max_expert_series", 2000)))
    for name, spec in sorted(snap.get("gauges", {}).items()):
        g = f.gauge(name, spec["doc"], [*BASE_LABELS, *spec["labels"]])
        for labels, value in spec["samples"]:
            g.add_metric(base + [str(x) for x in labels], float(value))


def _per_expert(f: _Families, base: list[str], layers: list[str], et: np.ndarray, cap: int) -> None:
    """Opt-in per-expert counters, capped: the busiest (layer, expert) pairs, the rest in 'other'."""
    fam = f.counter("expert_tokens", "Tokens routed to each expert (opt-in, capped).",
                    [*BASE_LABELS, "layer", "expert", "phase"])
    L, _, E = et.shape
    total = et.sum(axis=1)  # [L, E]
    n_pairs = L * E
    keep = np.ones((L, E), dtype=bool)
    if n_pairs * 2 > cap:  # two phases per pair
        budget = max(cap // 2 - len(layers), 0)  # keep one 'other' per layer and phase
        order = np.argsort(-total, axis=None, kind="stable")
        keep = np.zeros(n_pairs, dtype=bool)
        keep[order[:budget]] = True
        keep = keep.reshape(L, E)
    for li, layer in enumerate(layers):
        for pi, ph in enumerate(PHASES):
            for e in np.nonzero(keep[li])[0]:
                fam.add_metric(base + [layer, str(int(e)), ph], float(et[li, pi, e]))
            if not keep[li].all():
                fam.add_metric(base + [layer, "other", ph], float(et[li, pi][~keep[li]].sum()))


def snapshot_families(snapshots: list[dict[str, Any]]) -> list[Metric]:
    """Pure: the latest snapshot of every rank -> metric families (one per name)."""
    f = _Families()
    for snap in snapshots:
        _add_rank(f, snap, snap.get("options", {}))
    return list(f.by_name.values())


class SnapshotCollector:
    """Custom collector for the API server's REGISTRY: reads the rank snapshots at scrape time."""

    def __init__(self, directory: Callable[[], Path]) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        try:
            return snapshot_families(read_snapshots(self._directory()))
        except Exception:  # noqa: BLE001 - a scrape must never fail because of us
            return []

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: families depend on which ranks are up
