"""Wiring of the live comparison into a rank's reader (the reader thread, never the worker).

`attach(session, cfg, served, kv_capacity)` takes the deployment as plain facts, builds the
predictor specs (MoE and dense twin) and adds two block listeners: `LiveMonitor` (window figures
-> gauges) and, when `otlp_endpoint` is set, the OTel bridge. `attach_reader(reader, status)` is
the reader's entry: the facts come from the worker's published status (`worker_runtime.
publish_facts`), so nothing here runs in a vLLM worker.

Fault policy: a failure here never reaches vLLM and never stops the recorder. It is counted with
its stage in `session.errors` (`moe_reuse_errors_total{stage=...}`: live_setup, live_window,
live_advisor, otlp_push), logged once per stage, the live gauges are withdrawn, and the part is
marked degraded (`moe_reuse_enabled{reason="degraded"} 1`: recording, but a part is down) until
it next succeeds; the recorder's own counters keep flowing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import faults
from ..config import PluginConfig
from . import drift as drift_mod
from .advisor import ADVISOR_GAUGES, publish_advice
from .spec import LiveSpecs, ServedFacts, build_specs, resolve_hardware
from .window import WINDOW_GAUGES, WindowAccumulator, window_figures, window_gauges

logger = logging.getLogger("vllm.moe_reuse")

LIVE_GAUGES = WINDOW_GAUGES  # what a window publishes, and withdraws when the live part faults


def live_fault(session: Any, exc: BaseException, stage: str = "live_setup") -> None:
    """Count and log a live-comparison failure at `stage` (one log line per stage), mark the
    part degraded; never raises, never disables the recorder."""
    try:
        first = stage not in session.errors
        session.errors[stage] = session.errors.get(stage, 0) + 1
        session.degraded.add(stage)
        if first:
            logger.error("moe_reuse: %s failed (recording continues; counted in "
                         "moe_reuse_errors_total{stage=\"%s\"}): %s: %s", stage, stage,
                         type(exc).__name__, exc)
    except Exception:  # noqa: BLE001
        pass


def _recovered(session: Any, stage: str) -> None:
    degraded = getattr(session, "degraded", None)
    if degraded:
        degraded.discard(stage)


class LiveMonitor:
    """Block listener: fold blocks into the window; on close, publish the live gauges."""

    def __init__(self, specs: LiveSpecs, cfg: PluginConfig, layer_ids: list[int], *,
                 kv_capacity: Callable[[], int | None], baseline: np.ndarray | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 placement: Callable[[], Any] | None = None) -> None:
        self.specs, self.cfg, self.layer_ids = specs, cfg, list(layer_ids)
        self.placement = placement  # served EP placement through the seam (EP advisor)
        self.kv_capacity_fn = kv_capacity
        self.baseline = baseline
        self._baseline_mtime: float | None = None
        self.clock = clock
        self.acc = WindowAccumulator(len(layer_ids), specs.model.num_experts, cfg.window_s, clock())
        self.kv_capacity: int | None = None
        self.last_figures: dict[str, Any] = {}
        self.windows = 0

    def _capacity(self) -> int | None:
        if self.kv_capacity is None:
            try:
                self.kv_capacity = self.kv_capacity_fn()
            except Exception:  # noqa: BLE001 - not allocated yet
                self.kv_capacity = None
        return self.kv_capacity

    def _reload_baseline(self) -> None:
        """(Re)load `routing_baseline` when the file appears or changes (one stat per window), so
        `moe-reuse baseline save` takes effect without a restart."""
        path = self.cfg.routing_baseline
        if not path:
            return
        try:
            mtime = Path(path).expanduser().stat().st_mtime
        except OSError:
            return
        if mtime != self._baseline_mtime:
            self._baseline_mtime = mtime
            self.baseline = drift_mod.baseline_matrix(
                drift_mod.load_baseline(path), self.layer_ids, self.specs.model.num_experts)
            logger.info("moe_reuse: routing baseline loaded from %s", path)

    def publish(self, session: Any, fig: dict[str, Any]) -> None:
        fresh = window_gauges(fig, self.layer_ids)
        gauges = {k: v for k, v in session.gauges.items() if k not in LIVE_GAUGES}
        gauges.update(fresh)
        session.gauges = gauges

    def static_figures(self, session: Any) -> dict[str, Any]:
        w = self.acc.data.__class__(len(self.layer_ids), self.specs.model.num_experts)
        return window_figures(w, self.specs, kv_capacity_moe=self._capacity(),
                              kv_bytes_per_token=session.bytes_model.kv_bytes_per_token,
                              cold_fraction=self.cfg.cold_fraction, baseline=None)

    def __call__(self, stats: Any, meta: dict[str, np.ndarray], session: Any) -> None:
        try:
            self.acc.add_block(stats, meta, session.bytes_model)
            now = self.clock()
            if not self.acc.due(now):
                if self.windows == 0 and "kv_capacity_tokens" not in session.gauges:
                    self.publish(session, self.static_figures(session))
                return
            self._close(now, session)
        except Exception as exc:  # noqa: BLE001 - never into the flusher (it would disable all)
            self._failed(session, exc)

    def tick(self, session: Any) -> bool:
        """A poll that brought no steps: close a window whose time is up if it holds decode
        steps, so the last burst of traffic is judged on time rather than when the next request
        comes (a short burst on a fast engine fits inside one window). True if one closed."""
        try:
            now = self.clock()
            if not (self.acc.data.steps and self.acc.due(now)):
                return False
            self._close(now, session)
            return True
        except Exception as exc:  # noqa: BLE001
            self._failed(session, exc)
            with contextlib.suppress(Exception):  # dropped, not retried on every idle poll
                self.acc.close(self.clock())
            return True

    def _failed(self, session: Any, exc: BaseException) -> None:
        live_fault(session, exc, "live_window")
        session.gauges = {k: v for k, v in session.gauges.items()
                          if k not in LIVE_GAUGES and k not in ADVISOR_GAUGES}

    def _close(self, now: float, session: Any) -> None:
        """End the window, publish its figures and the advisor's. Raises (the callers catch)."""
        faults.check("live_window")
        w = self.acc.close(now)
        self._reload_baseline()
        fig = window_figures(w, self.specs, kv_capacity_moe=self._capacity(),
                             kv_bytes_per_token=session.bytes_model.kv_bytes_per_token,
                             cold_fraction=self.cfg.cold_fraction, baseline=self.baseline)
        self.last_figures = fig
        self.windows += 1
        self.publish(session, fig)
        _recovered(session, "live_window")
        if publish_advice(session, w, self.specs, self.cfg, self.layer_ids,
                          placement=self.placement,
                          on_fault=lambda s, e: live_fault(s, e, "live_advisor")):
            _recovered(session, "live_advisor")


def attach(session: Any, cfg: PluginConfig, facts: ServedFacts,
           kv_capacity: Callable[[], int | None],
           placement: Callable[[], Any] | None = None) -> None:
    """Attach the live comparison (and the OTel push) to `session`. Never raises."""
    try:
        hw = resolve_hardware(cfg.hardware, facts.device)
        specs = build_specs(facts, hw, cfg.q)
        monitor = LiveMonitor(specs, cfg, session.layer_ids, kv_capacity=kv_capacity,
                              placement=placement)
        monitor._reload_baseline()  # a bad baseline file is reported at start-up
        session.listeners.append(monitor)
        session.live_monitor = monitor
        session.info["hardware"] = hw.name
        logger.info("moe_reuse: live comparison on: hardware %s, q=%g, qs=%.3f, dense twin %s "
                    "(intermediate %d), compute/memory overlap %.2f, step overhead %.2g s, window %gs",
                    hw.name, cfg.q, specs.qs, specs.dense.name, specs.dense.intermediate_size,
                    hw.compute_memory_overlap_ratio, hw.step_overhead_seconds, cfg.window_s)
    except Exception as exc:  # noqa: BLE001
        live_fault(session, exc)
    if cfg.otlp_endpoint:
        attach_otel(session, cfg)


def attach_otel(session: Any, cfg: PluginConfig) -> None:
    try:
        from .otel import OtelBridge

        bridge = OtelBridge(cfg.otlp_endpoint, cfg.otlp_interval_s, session.labels)

        def push(_stats: Any, _meta: Any, s: Any) -> None:
            try:
                faults.check("otlp_push")
                bridge.update(s.snapshot())
                _recovered(s, "otlp_push")
            except Exception as exc:  # noqa: BLE001
                live_fault(s, exc, "otlp_push")

        session.listeners.append(push)
        atexit.register(bridge.shutdown)
        logger.info("moe_reuse: pushing metrics over OTLP to %s every %gs", cfg.otlp_endpoint,
                    cfg.otlp_interval_s)
    except Exception as exc:  # noqa: BLE001
        live_fault(session, exc, "otlp_push")


def placement_from_status(status: dict[str, Any]) -> Any:
    """The served EP placement the worker published (None: EP off), as the seam's plain type."""
    if status.get("placement_error"):
        raise RuntimeError(status["placement_error"])
    info = status.get("placement")
    if not info:
        return None
    from ..vllm.eplb import ServedPlacement

    arrays = status.get("totals", {})
    return ServedPlacement(np.asarray(arrays["placement_p2l"], dtype=np.int64),
                           np.asarray(arrays["placement_rank_of_slot"], dtype=np.int64),
                           int(info["ep_size"]), bool(info["eplb"]),
                           int(info["num_redundant_experts"]), str(info["policy"]))


def attach_reader(reader: Any, status: dict[str, Any]) -> None:
    """The reader's wiring: the live comparison (and OTLP) from the worker's published facts."""
    from ..config import parse_config

    try:
        cfg = parse_config(status.get("config") or {})
    except Exception as exc:  # noqa: BLE001
        live_fault(reader, exc)
        return
    served = status.get("served")
    if not served:
        live_fault(reader, RuntimeError(status.get("served_error")
                                        or "the worker published no served facts"))
        if cfg.otlp_endpoint:
            attach_otel(reader, cfg)
        return
    facts = ServedFacts(**served)
    attach(reader, cfg, facts, kv_capacity=lambda: reader.status.get("kv_capacity"),
           placement=lambda: placement_from_status(reader.status))
