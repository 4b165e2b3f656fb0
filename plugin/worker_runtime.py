"""The worker's assembly: from the seam's plain facts to a running recorder session.

This is the one place that puts the pieces together, outside the seam (which only installs hooks
and returns plain data) and outside the recorder (which never sees vLLM):

    seam.facts.model_facts(worker) -> RecorderSession -> seam.routing.bind (capture hooks)
    -> seam.runners.wrap_steps (step protocol) -> seam.comm.install (collective timing)
    -> live comparison -> flusher thread -> snapshots for the reader.

Never silently blind: every way the bind can end without recording (no routing source on a model
that declares experts, an unknown runner, an exception) publishes a status snapshot with
`enabled = 0`, the reason and `errors{stage="bind"}`, which the API server exports.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
from typing import Any

from . import compat, faults
from .config import ConfigError, PluginConfig, config_from_additional
from .exporters.multiprocess import MultiprocessBridge, multiprocess_mode
from .recorder.aggregate import ByteModel
from .recorder.ring import RingLayout
from .recorder.session import Publisher, RecorderSession
from .snapshot import rank_run_dir, snapshot_path, write_snapshot

logger = logging.getLogger("vllm.moe_reuse")

_SESSION: RecorderSession | None = None  # this worker process's session (one rank)
# Testing only: skip counting layer slot 0, to prove the self-check catches broken counting.
BREAK_COUNTING_ENV = "MOE_REUSE_TEST_BREAK_COUNTING"
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


def make_publisher(cfg: PluginConfig, labels: dict[str, str]) -> Publisher:
    """Snapshot -> file for the API server's collector (+ multiprocess value files if enabled)."""
    path = snapshot_path(rank_run_dir(labels["rank"]), labels["engine"], labels["rank"])
    bridge = MultiprocessBridge() if multiprocess_mode() else None
    options = {"per_expert_series": cfg.per_expert_series, "max_expert_series": cfg.max_expert_series,
               "flush_interval_s": cfg.flush_interval_s}

    def publish(snapshot: dict[str, Any]) -> None:
        snapshot["options"] = options
        write_snapshot(path, snapshot)
        if bridge is not None:
            bridge.publish(snapshot)

    def _remove() -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    atexit.register(_remove)
    return publish


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
            s.bytes_model = dataclasses.replace(s.bytes_model, kv_bytes_per_token=kv,
                                                kv_groups=groups)
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
    layer_ids = facts.layer_ids
    layout = RingLayout(
        num_layers=len(layer_ids), num_experts=facts.num_experts, top_k=facts.top_k,
        max_tokens=facts.max_tokens,
        ring_steps=RingLayout.auto_ring_steps(len(layer_ids), facts.num_experts, cfg.ring_steps),
    )
    ablate = ablation()
    bytes_model = ByteModel(**facts.byte_model)
    info.update({
        "moe_layers": str(len(layer_ids)), "experts": str(facts.num_experts),
        "top_k": str(facts.top_k), "shared_experts": str(int(bytes_model.shared_expert_bytes > 0)),
        "compile_mode": facts.compile_mode, "hardware": cfg.hardware, "comm_mode": facts.comm_mode,
    })
    session = RecorderSession(
        layout, bytes_model, device=facts.device, labels=labels, info=info, layer_ids=layer_ids,
        publish=make_publisher(cfg, labels), flush_interval_s=cfg.flush_interval_s,
        inject_fault_after_steps=faults.after("step"),
        ablate=ablate if ablate in ("protocol", "copy") else "",
    )
    record: Any = session.record
    if os.environ.get(BREAK_COUNTING_ENV):
        def skip_slot0(slot: int, ids: Any, _r: Any = session.record) -> None:
            if slot != 0:
                _r(slot, ids)

        record = skip_slot0
    capturer = routing.FanoutCapturer({lid: i for i, lid in enumerate(layer_ids)}, record)
    routing.bind(worker.model_runner.get_model(), capturer)
    if ablate:
        logger.warning("moe_reuse: %s=%s: a partial plugin for benchmarks, exporting nothing",
                       ABLATE_ENV, ablate)
    if ablate != "capture":
        runners.wrap_steps(runner, _Steps(session, worker, seam_facts))
        info["comm_timing"] = comm.install(facts.comm_mode, facts.device, session.add_comm_ns)
    if not ablate:
        attach_live(session, cfg, worker)
    if ablate in ("", "copy"):
        session.start()
    logger.info(
        "moe_reuse: recording %d MoE layers (ids %s), %d experts, top-%d, ring %d steps, "
        "runner %s, sources %s, %s", len(layer_ids), layer_ids[:8], facts.num_experts,
        facts.top_k, layout.ring_steps, kind, info.get("sources"), labels,
    )
    return session


def attach_live(session: RecorderSession, cfg: PluginConfig, worker: Any) -> None:
    """Attach the live predictor comparison (per flushed block, off the step)."""
    try:
        from .live.attach import attach
        from .live.spec import ServedFacts
        from .vllm import facts as f
    except ImportError:
        return
    try:
        weight, kv = f.served_dtypes(worker)
        tp, ep, dp, pp = f.parallel_sizes(worker)
        served = ServedFacts(
            hf_config=f.served_hf_config(worker), weight_dtype=weight, kv_dtype=kv, tp=tp, ep=ep,
            dp=dp, pp=pp, kv_fixed_size=f.kv_cache_fixed_size(worker), device=f.device_name())
    except Exception as exc:  # noqa: BLE001
        from .live.attach import live_fault

        live_fault(session, exc)
        return
    from .vllm import eplb as eplb_seam

    lay = session.layout
    attach(session, cfg, served, kv_capacity=lambda: f.kv_capacity_tokens(worker),
           placement=lambda: eplb_seam.served_placement(worker, lay.num_layers, lay.num_experts))
