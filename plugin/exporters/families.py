"""Snapshots -> Prometheus metric families: the pure function every exporter shares.

`snapshot_families` is a pure function (like client_python's process collector): every scrape
builds fresh families from the latest snapshots, so nothing here holds state that can drift. The
API server's collector (`prometheus.SnapshotCollector`), the multiprocess bridge
(`multiprocess.MultiprocessBridge`), the per-node exporter and the OTLP export all render these
families; `reader_families` adds what the reading side itself knows (refusals, its own faults).
Series budgets keep a scrape bounded whatever the directory holds.

Metric names, labels and intended PromQL are documented in docs/metrics.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from ..recorder.aggregate import COMM_OPS, COMPONENTS, HIST_BOUNDS, KINDS, PHASES
from ..snapshot import REASONS, ScanResult

logger = logging.getLogger("vllm.moe_reuse")
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


ENABLED_DOC = ("1 while the recorder records (reason recording, or degraded when a part such as "
               "the live comparison or the OTLP push is failing: see errors_total by stage); 0 "
               "when it does not, with the reason: fault, bind_failed, no_moe_layers, "
               "unsupported_runner, not_moe, no_rank_reporting, collector_fault.")


def _add_status(f: _Families, snap: dict[str, Any]) -> list[str]:
    """info, enabled{reason} and errors: what every rank exports, recording or not."""
    lab = snap["labels"]
    base = [str(lab.get(k, "")) for k in BASE_LABELS]
    info = snap["info"]
    info_keys = sorted(info)
    f.gauge("info", "Static facts of the served MoE model and the plugin.",
            [*BASE_LABELS, *info_keys]).add_metric(base + [str(info[k]) for k in info_keys], 1)
    reason = str(snap.get("reason") or ("recording" if snap["enabled"] else "fault"))
    if snap["enabled"] and snap.get("degraded"):
        reason = "degraded"  # recording, but a part (live comparison, OTLP push) is down
    f.gauge("enabled", ENABLED_DOC, [*BASE_LABELS, "reason"]).add_metric(
        base + [reason], 1.0 if snap["enabled"] else 0.0)
    errs = f.counter("errors", "Faults caught inside the plugin, by stage.",
                     [*BASE_LABELS, "stage"])
    for stage, n in sorted(snap["errors"].items()):
        errs.add_metric(base + [stage], n)
    return base


def _add_rank(f: _Families, snap: dict[str, Any], options: dict[str, Any]) -> None:
    base = _add_status(f, snap)  # a dense model: enabled{reason="not_moe"} 0 and no counters
    if snap.get("status_only") or not snap.get("applicable", True):
        return
    t = snap["totals"]
    layers = [str(i) for i in snap["layer_ids"]]
    f.counter("scheduled_tokens", "Tokens the scheduler sent to this rank's forward steps (the "
              "self-check's expected side; vLLM's figure, not the recorder's).",
              BASE_LABELS).add_metric(base, float(t.get("scheduled_tokens", 0)))
    f.counter("selfcheck_mismatch_assignments",
              "Assignments counted minus scheduled tokens x top-k, in absolute value, summed over "
              "MoE layers and steps: 0 while counting is exact.",
              BASE_LABELS).add_metric(base, float(t.get("selfcheck_mismatch", 0)))
    inv = f.counter("invalid_expert_ids", "Routed ids outside [0, experts) (e.g. -1 'no expert'), "
                    "counted apart from every expert.", [*BASE_LABELS, "phase"])
    for i, ph in enumerate(PHASES):
        inv.add_metric(base + [ph], float(t["invalid_ids"][i]) if "invalid_ids" in t else 0.0)
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
    _add_layers(f, base, layers, t, bool(options.get("per_expert_series")))
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
    _add_hbm_measured(f, base, snap.get("hbm_measured"))
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


HBM_MEASUREMENT_DOC = (
    "Whether this rank's HBM bandwidth is measured by the GPU (1, always present): reason gpm "
    "(measuring), nvml_missing (pip install nvidia-ml-py), nvml_failed, device_not_found, "
    "gpm_unsupported (pre-Hopper or GPM disabled), not_cuda (not an NVIDIA GPU). PromQL: "
    'moe_reuse_hbm_measurement_info{reason!="gpm"} == 1')


def _add_hbm_measured(f: _Families, base: list[str], m: dict[str, Any] | None) -> None:
    """HBM traffic as the GPU measured it (NVML GPM, `reader.gpm.HbmMeter`), beside the byte
    model's `hbm_read_bytes_total`. The info series is always there (for every rank a reader
    reads); the counters and the peak only while measuring, never as zeros.

    Intended PromQL (per model, engine, rank):
    - measured bandwidth: rate(moe_reuse_hbm_measured_bytes_total[5m])
      / rate(moe_reuse_hbm_measured_seconds_total[5m])
    - modelled over wall time: sum without (component) (rate(moe_reuse_hbm_read_bytes_total[5m]))
    - their ratio (modelled / measured, 1 = the byte model explains all the device's traffic;
      GPM counts reads and writes of the whole device, other processes included, so below 1 is
      expected): the second over the first
    - measured against NVML's peak: the first / moe_reuse_hbm_measured_peak_bytes_per_second
    """
    if not m:
        return  # an in-process session, or a snapshot older than the measurement
    reason = str(m.get("reason") or "nvml_failed")
    f.gauge("hbm_measurement_info", HBM_MEASUREMENT_DOC, [*BASE_LABELS, "source", "reason"]
            ).add_metric(base + [str(m.get("source") or "gpm"), reason], 1)
    if reason != "gpm":
        return
    f.counter("hbm_measured_bytes", "Bytes the GPU moved to and from HBM (NVML GPM DRAM "
              "bandwidth utilisation x NVML's peak x window seconds; reads and writes of the whole "
              "device, other processes included). PromQL: rate(moe_reuse_hbm_measured_bytes_total"
              "[5m]) / rate(moe_reuse_hbm_measured_seconds_total[5m])", BASE_LABELS
              ).add_metric(base, float(m.get("bytes", 0.0)))
    f.counter("hbm_measured_seconds", "Wall time the measured HBM bytes cover (GPM windows).",
              BASE_LABELS).add_metric(base, float(m.get("seconds", 0.0)))
    f.gauge("hbm_measured_peak_bytes_per_second", "The device's theoretical HBM bandwidth as "
            "NVML gives it (memory bus width x max memory clock x 2), the base of GPM's "
            "utilisation.", BASE_LABELS).add_metric(base, float(m.get("peak_bytes_per_second", 0)))


_PREFILL, _DECODE = PHASES.index("prefill"), PHASES.index("decode")
LAYER_FAMILIES = (
    ("expert_assignments", "assignments", "Routed (token, expert) assignments per MoE layer."),
    ("experts_touched", "touched", "Sum over steps of distinct experts touched."),
    ("max_expert_tokens", "max_load", "Sum over steps of the largest per-expert load."),
)


def _add_layers(f: _Families, base: list[str], layers: list[str], t: dict[str, Any],
                detail: bool) -> None:
    """The per-(layer, phase) counters: most of a rank's series, so built as samples directly
    (one label dict per (layer, phase), shared by the families) rather than add_metric.

    Without `detail` (per_expert_series), prefill's `experts_touched` is one series per rank
    summed over layers (`layer=""`, which Prometheus stores as no layer label) and prefill's
    `max_expert_tokens` is not exported: a prefill chunk touches nearly every expert, the reuse
    that matters is decode's, and a 61-layer rank exports 245 per-layer series instead of 366
    (about 310 in all instead of 430; prometheus_client's render is linear in samples:
    benchmarks/bench_scrape.py). The rank total keeps prefill's routed-expert bytes
    reconcilable (`hbm_read_bytes_total` over `experts_touched_total` is the bytes per expert
    read, both phases)."""
    head = dict(zip(BASE_LABELS, base))
    labels = [[{**head, "layer": layer, "phase": ph} for ph in PHASES] for layer in layers]
    rows = range(len(layers))
    for name, key, doc in LAYER_FAMILIES:
        fam = f.counter(name, doc, [*BASE_LABELS, "layer", "phase"])
        total, values = fam.name + "_total", t[key].tolist()
        phases = range(len(PHASES)) if detail or key == "assignments" else (_DECODE,)
        fam.samples.extend([Sample(total, labels[li][pi], float(values[li][pi]))
                            for li in rows for pi in phases])
        if key == "touched" and not detail and layers:
            fam.samples.append(Sample(total, {**head, "layer": "", "phase": "prefill"},
                                      float(t[key][:, _PREFILL].sum())))


def rank_series(snap: dict[str, Any], expert_cap: int = 0) -> int:
    """About how many samples `_add_rank` gives one rank (what a scrape pays to render)."""
    if snap.get("status_only") or not snap.get("applicable", True):
        return 4 + len(snap.get("errors", {}))
    n_layers = len(snap.get("layer_ids", ()))
    gauges = sum(len(g.get("samples", ())) for g in snap.get("gauges", {}).values())
    per_layer = 3 * len(PHASES) if expert_cap else len(PHASES) + 2
    measured = 4 if snap.get("hbm_measured") else 0
    return len(PHASES) * (len(HIST_BOUNDS) + 3) + per_layer * n_layers + gauges + \
        len(COMPONENTS) + 25 + measured + expert_cap


def _per_expert(f: _Families, base: list[str], layers: list[str], et: np.ndarray, cap: int) -> None:
    """Opt-in per-expert counters, capped: the busiest (layer, expert) pairs, the rest in 'other'."""
    fam = f.counter("expert_tokens", "Tokens routed to each expert (opt-in, capped).",
                    [*BASE_LABELS, "layer", "expert", "phase"])
    L, _, E = et.shape
    keep = np.ones((L, E), dtype=bool)
    if cap < L * E * 2:  # two phases per pair
        budget = min(max(cap // 2 - len(layers), 0), L * E)  # one 'other' per layer and phase
        keep = np.zeros(L * E, dtype=bool)
        if budget:  # the busiest pairs (argpartition: linear, where a full sort cost 2 ms/rank)
            keep[np.argpartition(-et.sum(axis=1), budget - 1, axis=None)[:budget]] = True
        keep = keep.reshape(L, E)
    other = np.where(keep[:, None, :], 0, et).sum(axis=2).tolist()  # [L, phase]
    values = et.tolist()
    head = dict(zip(BASE_LABELS, base))
    name = fam.name + "_total"
    for li, layer in enumerate(layers):
        kept = np.nonzero(keep[li])[0].tolist()
        for pi, ph in enumerate(PHASES):
            row = values[li][pi]
            for e in kept:
                fam.samples.append(Sample(name, {**head, "layer": layer, "expert": str(e),
                                                 "phase": ph}, float(row[e])))
            if len(kept) < E:
                fam.samples.append(Sample(name, {**head, "layer": layer, "expert": "other",
                                                 "phase": ph}, float(other[li][pi])))


def frontend_families(f: _Families, frontend: Any, snapshots: list[dict[str, Any]]) -> None:
    """What the API-server process knows without any worker: the vLLM version check, and a
    `no_rank_reporting` status when the plugin was asked for but no rank has published."""
    if frontend is None or getattr(frontend, "config", None) is None:
        return
    f.gauge("vllm_info", "The running vLLM and whether it is in this release's tested range.",
            ["version", "tested_range", "supported"]).add_metric(
        [frontend.vllm_version, frontend.tested_range, str(bool(frontend.supported)).lower()], 1)
    if frontend.config.enabled and not snapshots:
        f.gauge("enabled", ENABLED_DOC, [*BASE_LABELS, "reason"]).add_metric(
            [frontend.model, "", "", "no_rank_reporting"], 0.0)


EXPERT_SERIES_PER_SCRAPE = 1000
"""Per-expert series one scrape carries over all ranks. prometheus_client renders about 20 us per
sample on a 2-core host, and the plugin's other series are already about 310 per rank of a
61-layer model, so when several ranks export per-expert series each rank's cap becomes
min(max_expert_series, this / ranks), never below the one `expert="other"` series per layer and
phase that keeps the sum exact (benchmarks/bench_scrape.py measures a scrape)."""


def _expert_caps(snapshots: list[dict[str, Any]]) -> dict[int, int]:
    """Rank index -> the per-expert series cap it gets in this scrape (see above)."""
    on = [i for i, s in enumerate(snapshots) if s.get("options", {}).get("per_expert_series")]
    if not on:
        return {}
    share = EXPERT_SERIES_PER_SCRAPE // len(on)
    caps = {}
    for i in on:
        opts = snapshots[i]["options"]
        floor = 2 * len(snapshots[i].get("layer_ids", ()))
        caps[i] = max(min(int(opts.get("max_expert_series", 2000)), share), floor)
    return caps


SERIES_PER_SCRAPE = 4500
"""Samples one scrape carries over all ranks (per-expert ones included): about 55 ms of rendering
on a 2-core host, which with the scan's 20 ms budget keeps a scrape of /metrics under 100 ms
whatever the snapshot directory holds. An 8-rank, 61-layer node needs about 2,470 (plus the
per-expert budget above). Ranks past it, in (engine, rank) order, export only their status
(info, enabled, errors, snapshot age), counted in snapshot_refused_total{reason="over_budget"}."""


def series_budget(snapshots: list[dict[str, Any]],
                  budget: int = SERIES_PER_SCRAPE) -> tuple[dict[int, int], set[int]]:
    """Pure: (rank index -> its per-expert cap, indices of ranks past the scrape's budget)."""
    caps = _expert_caps(snapshots)
    spent, over = 0, set()
    for i, snap in enumerate(snapshots):
        n = rank_series(snap, caps.get(i, 0))
        if spent + n > budget and not snap.get("status_only"):
            over.add(i)
            n = rank_series({**snap, "status_only": True})
        spent += n
    return caps, over


def snapshot_families(snapshots: list[dict[str, Any]], frontend: Any = None,
                      over_budget: set[int] | None = None) -> list[Metric]:
    """Pure: the latest snapshot of every rank (and the front end's state) -> metric families.

    `over_budget`: ranks that export only their status (see SERIES_PER_SCRAPE); by default the
    budget is applied here."""
    f = _Families()
    caps, over = series_budget(snapshots)
    if over_budget is not None:
        over = over_budget
    for i, snap in enumerate(snapshots):
        opts = snap.get("options", {})
        if i in caps:
            opts = {**opts, "max_expert_series": caps[i]}
        _add_rank(f, {**snap, "status_only": True} if i in over else snap, opts)
    frontend_families(f, frontend, snapshots)
    return list(f.by_name.values())


def reader_families(result: ScanResult, refused: Mapping[str, int], collector_errors: int,
                    fams: list[Metric] | None = None, *, failed_now: bool = False,
                    model: str = "") -> list[Metric]:
    """Pure: what the reader itself knows, merged into `fams`: each rank's snapshot age (stale
    ranks included, which export nothing else), refusals by reason, and its own faults (a scrape
    whose collection failed says so: `enabled{reason="collector_fault"} 0`)."""
    f = _Families()
    for m in fams or []:
        f.by_name[m.name[len(P):]] = m
    if result.ranks:
        age = f.gauge("snapshot_age_seconds", "Seconds since the rank last rewrote its snapshot; "
                      "a stale rank (writer gone, or not refreshed for 5 flush intervals) exports "
                      "only this. PromQL: max by (model, engine, rank) "
                      "(moe_reuse_snapshot_age_seconds) > 30", BASE_LABELS)
        for r in result.ranks:
            if r.snapshot.get("status_only") and not r.stale:
                continue  # written once, on purpose: its age says nothing (MoeReuseRankStale)
            lab = r.snapshot.get("labels", {})
            age.add_metric([str(lab.get(k, "")) for k in BASE_LABELS], round(r.age_s, 3))
    ref = f.counter("snapshot_refused", "Snapshot files or directories the reader refused, by "
                    "reason (symlink, foreign_owner, writable_by_others, not_a_regular_file, "
                    "too_large, corrupt, unreadable, over_budget). PromQL: "
                    "sum by (reason) (rate(moe_reuse_snapshot_refused_total[5m])) > 0", ["reason"])
    for reason in REASONS:
        ref.add_metric([reason], float(refused.get(reason, 0)))
    if collector_errors:  # the API server's own stage: no model, engine or rank labels
        errs = f.counter("errors", "Faults caught inside the plugin, by stage.",
                         [*BASE_LABELS, "stage"])
        errs.samples.append(Sample(P + "errors_total", {"stage": "collector"},
                                   float(collector_errors)))
    if failed_now:  # this scrape has none of the ranks' series: not blind without saying so
        f.gauge("enabled", ENABLED_DOC, [*BASE_LABELS, "reason"]).add_metric(
            [model, "", "", "collector_fault"], 0.0)
    return list(f.by_name.values())
