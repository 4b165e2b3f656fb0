"""The worker's assembly: from the seam's plain facts to a running recorder session.

This is the one place that puts the pieces together, outside the seam (which only installs hooks
and returns plain data) and outside the recorder (which never sees vLLM):

    seam.facts.model_facts(worker) -> RecorderSession -> seam.routing.bind (capture hooks)
    -> seam.runners.wrap_steps (step protocol) -> seam.comm.install (collective timing)
    -> flusher thread: raw steps to the rank's ring, status every flush, for the reader.

The worker only counts and copies: folding, the live comparison, the advisor, snapshots and every
exporter run in the reader (`moe_reuse.plugin.reader`), in the API server's process or in
`moe-reuse exporter`. What the reader needs to know about this rank is published here as plain
data once at bind (the byte model, layer ids, the served deployment, the config) and refreshed
with the status (KV capacity once allocated, the EP placement when it changes).

Never silently blind: every way the bind can end without recording (no routing source on a model
that declares experts, an unknown runner, an exception) publishes a status snapshot with
`enabled = 0`, the reason and `errors{stage="bind"}`, which the API server exports.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from . import compat, faults
from .config import ConfigError, PluginConfig, config_from_additional
from .recorder import rawstream
from .recorder.aggregate import ByteModel, unrecorded_gauge
from .recorder.ring import RingLayout
from .recorder.session import Publisher, RecorderSession
from .snapshot import open_dir, rank_run_dir, snapshot_path, write_snapshot

logger = logging.getLogger("vllm.moe_reuse")

_SESSION: RecorderSession | None = None  # this worker process's session (one rank)
# Testing only: skip counting layer slot 0, to prove the self-check catches broken counting.
BREAK_COUNTING_ENV = "MOE_REUSE_TEST_BREAK_COUNTING"
# Testing only: size the recorder without the last MoE layer, as if the sizing missed a routing
# source vLLM's binder binds, to prove /metrics says so (the self-check cannot see that layer).
UNSIZED_LAYER_ENV = "MOE_REUSE_TEST_UNSIZED_LAYER"
# Benchmarks only (bench_overhead --ablation): bind part of the plugin, to attribute its cost.
# capture: the routing hooks alone (every count lands in the idle sink: no step protocol);
# protocol: + the step protocol and collective timing, each slot consumed at once (no copy);
# copy: + the flusher's device-to-host copy of finished slots (nothing derived or published).
# Live comparison, snapshots and exporters run only without it.
ABLATE_ENV = "MOE_REUSE_ABLATE"
ABLATE_LEVELS = ("capture", "protocol", "copy")


def ablation() -> str:
    value = os.environ.get(ABLATE_ENV, "")
    if value and value not in ABLATE_LEVELS:
        raise ValueError(f"{ABLATE_ENV}={value!r}: use one of {', '.join(ABLATE_LEVELS)} or unset it")
    return value


def _options(cfg: PluginConfig) -> dict[str, Any]:
    return {"per_expert_series": cfg.per_expert_series, "max_expert_series": cfg.max_expert_series,
            "flush_interval_s": cfg.flush_interval_s}


def _remove_at_exit(directory: Any, *names: str) -> None:
    def _remove() -> None:
        for name in names:
            with contextlib.suppress(OSError):
                (directory / name).unlink()

    atexit.register(_remove)


def make_publisher(cfg: PluginConfig, labels: dict[str, str]) -> Publisher:
    """A whole snapshot -> the rank's exported file (status-only snapshots, written here)."""
    path = snapshot_path(rank_run_dir(labels["rank"]), labels["engine"], labels["rank"])
    options = _options(cfg)

    def publish(snapshot: dict[str, Any]) -> None:
        snapshot["options"] = options
        write_snapshot(path, snapshot)

    _remove_at_exit(path.parent, path.name)
    return publish


def make_raw_stream(layout: RingLayout, labels: dict[str, str]
                    ) -> tuple[rawstream.RawWriter, Publisher]:
    """The rank's raw ring and its status publisher (`w<engine>-r<rank>.raw` / `.npz`)."""
    directory = rank_run_dir(labels["rank"])
    engine, rank = labels["engine"], labels["rank"]
    dfd = open_dir(directory, create=True)
    try:
        cap = rawstream.capacity(layout.num_layers, layout.columns, layout.ring_steps)
        writer = rawstream.RawWriter(dfd, rawstream.raw_name(engine, rank), layout.num_layers,
                                     layout.columns, cap)
    finally:
        os.close(dfd)
    status_path = directory / rawstream.status_name(engine, rank)

    def publish(status: dict[str, Any]) -> None:
        write_snapshot(status_path, status, fault_stage=None)

    _remove_at_exit(directory, status_path.name, writer.name)
    return writer, publish


def publish_status(cfg: PluginConfig, labels: dict[str, str], info: dict[str, str], *,
                   reason: str, applicable: bool = True, stage: str = "bind") -> None:
    """A snapshot that says why this rank records nothing (no counters, just the status)."""
    snap = {
        "version": 1, "status_only": True, "applicable": applicable, "labels": dict(labels),
        "info": dict(info), "enabled": False, "reason": reason,
        "errors": {stage: 1} if applicable else {}, "totals": {},
    }
    try:
        make_publisher(cfg, labels)(snap)
    except Exception as exc:  # noqa: BLE001 - the status is best effort; serving goes on
        logger.error("moe_reuse: could not publish the plugin status: %s", exc)


class _Steps:
    """The seam's `StepSink`, adapted onto the session (and KV bytes, known from the first step)."""

    def __init__(self, session: RecorderSession, worker: Any, seam_facts: Any) -> None:
        self.session, self.worker, self.seam_facts = session, worker, seam_facts
        self.step_started = session.step_started
        self.step_finished = session.step_finished
        self.fault = session.fault

    def step_prepared(self, layout: Any) -> None:
        s = self.session
        if s.bytes_model.kv_bytes_per_token == 0:
            groups = tuple(self.seam_facts.kv_groups(self.worker))
            kv = int(sum(g[0] for g in groups))
            state = int(self.seam_facts.recurrent_state_bytes(self.worker))
            s.bytes_model = dataclasses.replace(s.bytes_model, kv_bytes_per_token=kv,
                                                kv_groups=groups, recurrent_state_bytes=state)
            if state:
                logger.info("moe_reuse: recurrent state %d B a request on this rank, read each "
                            "step with the KV cache", state)
            if any(w or c for _, w, c in groups):
                logger.info("moe_reuse: KV bytes per token by attention kind (window, chunk): %s",
                            ", ".join(f"{b:.0f} B ({w or '-'}, {c or '-'})" for b, w, c in groups))
        s.step_prepared(layout.num_scheduled, layout.is_decode, layout.num_computed,
                        layout.scheduled_total)


def on_model_loaded(worker: Any, additional_config: Any) -> None:
    """The seam's worker callback. Raises only ConfigError; anything else is reported, not raised."""
    global _SESSION
    cfg = config_from_additional(additional_config)
    if cfg is None or _SESSION is not None:
        return
    if not cfg.enabled:
        logger.info("moe_reuse: loaded but disabled by config (enabled=false)")
        return
    from .vllm import facts as seam_facts

    labels = {"model": "unknown", "engine": "0", "rank": str(getattr(worker, "rank", 0))}
    info = {"version": compat.plugin_version(), "vllm_version": seam_facts.vllm_version()}
    try:
        labels = seam_facts.labels(worker)
        _SESSION = _bind(worker, cfg, labels, info)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - never take the server down
        logger.exception("moe_reuse: could not bind, serving without it: %s", exc)
        publish_status(cfg, labels, info, reason="bind_failed")


def _bind(worker: Any, cfg: PluginConfig, labels: dict[str, str],
          info: dict[str, str]) -> RecorderSession | None:
    from .vllm import comm, routing, runners
    from .vllm import facts as seam_facts

    runner = worker.model_runner
    kind = runners.runner_kind(runner)
    info["runner"] = kind or "unknown"
    faults.check("bind")
    if kind is None:
        logger.error("moe_reuse: unsupported model runner %s; recording nothing",
                     type(runner).__name__)
        publish_status(cfg, labels, info, reason="unsupported_runner")
        return None
    facts = seam_facts.model_facts(worker)
    info.update(facts.extra_info)
    if not facts.sources:
        if facts.declared_experts > 0:
            logger.error("moe_reuse: %s declares %d experts but no routing source was found; "
                         "recording nothing", labels["model"], facts.declared_experts)
            publish_status(cfg, labels, info, reason="no_moe_layers")
        else:
            logger.info("moe_reuse: %s has no MoE layers; nothing to record", labels["model"])
            publish_status(cfg, labels, info, reason="not_moe", applicable=False)
        return None
    layer_ids, byte_facts = facts.layer_ids, facts.byte_model
    if os.environ.get(UNSIZED_LAYER_ENV):
        layer_ids = layer_ids[:-1]
        byte_facts = {**byte_facts, "expert_bytes_per_layer":
                      tuple(byte_facts["expert_bytes_per_layer"])[:len(layer_ids)]}
    layout = RingLayout(
        num_layers=len(layer_ids), num_experts=facts.num_experts, top_k=facts.top_k,
        max_tokens=facts.max_tokens,
        ring_steps=RingLayout.auto_ring_steps(len(layer_ids), facts.num_experts, cfg.ring_steps),
    )
    ablate = ablation()
    bytes_model = ByteModel(**byte_facts)
    info.update({
        "moe_layers": str(len(layer_ids)), "experts": str(facts.num_experts),
        "top_k": str(facts.top_k), "shared_experts": str(int(bytes_model.shared_expert_bytes > 0)),
        "compile_mode": facts.compile_mode, "hardware": cfg.hardware, "comm_mode": facts.comm_mode,
    })
    raw, publish = make_raw_stream(layout, labels) if ablate != "capture" else (None, None)
    session = RecorderSession(
        layout, bytes_model, device=facts.device, labels=labels, info=info, layer_ids=layer_ids,
        publish=publish or (lambda _s: None), raw=raw, flush_interval_s=cfg.flush_interval_s,
        inject_fault_after_steps=faults.after("step"),
        ablate=ablate if ablate in ("protocol", "copy") else "",
    )
    session.gauges["unrecorded_moe_layers"] = unrecorded_gauge(facts.draft_moe_layers)
    if facts.draft_moe_layers:
        logger.warning("moe_reuse: the speculative drafter's %d MoE layers are not recorded "
                       "(moe_reuse_unrecorded_moe_layers); the target's are", facts.draft_moe_layers)
    record: Any = session.record
    if os.environ.get(BREAK_COUNTING_ENV):
        def skip_slot0(slot: int, ids: Any, _r: Any = session.record) -> None:
            if slot != 0:
                _r(slot, ids)

        record = skip_slot0
    capturer = routing.FanoutCapturer({lid: i for i, lid in enumerate(layer_ids)}, record)
    routing.bind(worker.model_runner.get_model(), capturer)

    logged = [0]

    def unrecorded(s: RecorderSession, draft: int = facts.draft_moe_layers) -> None:
        # a routing source the sizing missed fires on the first forward: its captures are dropped
        unknown = len(capturer.unexpected_layers)
        if unknown != logged[0]:
            logged[0] = unknown
            logger.error("moe_reuse: routing from MoE layers %s that the recorder was not sized "
                         "for is not recorded", sorted(capturer.unexpected_layers))
        s.gauges["unrecorded_moe_layers"] = unrecorded_gauge(draft, unknown)

    session.status_hooks.append(unrecorded)
    if ablate:
        logger.warning("moe_reuse: %s=%s: a partial plugin for benchmarks, exporting nothing",
                       ABLATE_ENV, ablate)
    if ablate != "capture":
        runners.wrap_steps(runner, _Steps(session, worker, seam_facts))
        stamp = (session.ring.comm_stamp if cfg.cuda_comm_timing == "device"
                 and session.ring.enable_device_comm() else None)
        info["comm_timing"] = comm.install(facts.comm_mode, facts.device, session.add_comm_ns,
                                           stamp=stamp)
    if not ablate:
        publish_facts(session, cfg, worker, facts.device)
    if ablate in ("", "copy"):
        session.start()
    logger.info(
        "moe_reuse: recording %d MoE layers (ids %s), %d experts, top-%d, ring %d steps, "
        "runner %s, sources %s, %s", len(layer_ids), layer_ids[:8], facts.num_experts,
        facts.top_k, layout.ring_steps, kind, info.get("sources"), labels,
    )
    return session


def publish_facts(session: RecorderSession, cfg: PluginConfig, worker: Any,
                  device: str = "cpu") -> None:
    """The deployment, as plain data for the reader's live comparison (read through the seam
    once here), and hooks for the facts that come later: the KV capacity once vLLM sized the
    cache, the EP placement whenever EPLB moves experts. `device` (the model's, e.g. "cuda:0")
    is published with its GPU UUID, which the reader's HBM measurement opens in NVML."""
    from .vllm import eplb as eplb_seam
    from .vllm import facts as f

    extra = session.status_extra
    extra["options"] = _options(cfg)
    extra["config"] = cfg.to_dict()
    extra["device"] = f.device_identity(device)
    try:
        weight, kv = f.served_dtypes(worker)
        tp, ep, dp, pp = f.parallel_sizes(worker)
        extra["served"] = {
            "hf_config": json.loads(json.dumps(f.served_hf_config(worker), default=str)),
            "weight_dtype": weight, "kv_dtype": kv, "tp": tp, "ep": ep, "dp": dp, "pp": pp,
            "kv_fixed_size": f.kv_cache_fixed_size(worker), "device": f.device_name(),
            "last_pp_stage": f.last_pp_stage()}
    except Exception as exc:  # noqa: BLE001 - the reader reports it (live_setup)
        extra["served_error"] = f"{type(exc).__name__}: {exc}"
    lay = session.layout
    seen_modules = [-1]

    def refresh(s: RecorderSession) -> None:
        # which of the plugin's modules this worker has loaded: the split's check (none of the
        # reader's, the live comparison's, the predictor's or the exporters'). Scanned again only
        # when the module count changed: a scan of a vLLM worker's ~10k modules took ~3 ms of
        # the worker's GIL every second (py-spy, bench_overhead_engine).
        if len(sys.modules) != seen_modules[0]:
            seen_modules[0] = len(sys.modules)
            s.status_extra["worker_modules"] = sorted(
                m for m in list(sys.modules) if m.startswith(("moe_reuse", "opentelemetry")))
        if s.status_extra.get("kv_capacity") is None:
            s.status_extra["kv_capacity"] = f.kv_capacity_tokens(worker)
        try:
            placed = eplb_seam.served_placement(worker, lay.num_layers, lay.num_experts)
        except Exception as exc:  # noqa: BLE001 - the reader's advisor reports it
            s.status_extra["placement_error"] = f"{type(exc).__name__}: {exc}"
            return
        s.status_extra.pop("placement_error", None)
        if placed is None:
            return
        s.status_extra["placement"] = {
            "ep_size": placed.ep_size, "eplb": placed.eplb,
            "num_redundant_experts": placed.num_redundant_experts, "policy": placed.policy}
        s.status_extra["totals"] = {"placement_p2l": placed.phys_to_logical,
                                    "placement_rank_of_slot": placed.rank_of_slot}

    session.status_hooks.append(refresh)
