"""The front-end (API-server) process: config validation before spawn, and blind-spot reporting.

The API server does not depend on any worker, so it is where "the plugin is blind" must show up:
if the plugin was asked for and no rank has published anything (a worker that failed to bind
before it could write, a runner we do not know, a snapshot directory we refuse), the collector
still exports `moe_reuse_enabled{reason="no_rank_reporting"} 0`. It also exports which vLLM runs
and whether that version is in the tested range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import compat, config_checks
from .config import PluginConfig, config_from_additional

logger = logging.getLogger("vllm.moe_reuse")


@dataclass
class FrontendState:
    """What this process learned when vLLM built its config (None: the plugin was not asked for)."""

    config: PluginConfig | None = None
    model: str = ""
    vllm_version: str = "unknown"
    supported: bool = True
    tested_range: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


STATE = FrontendState()


def on_engine_config(additional_config: Any, served: dict[str, Any]) -> None:
    """Validate `moe_reuse` against the served model; raises ConfigError before any spawn."""
    cfg = config_from_additional(additional_config)
    if cfg is None:
        return
    config_checks.validate_for_model(cfg, served)
    STATE.config = cfg
    STATE.model = str(served.get("model", ""))
    check_vllm_version()
    start_reader()


_READER: Any = None


def start_reader() -> None:
    """Start this host's reader thread (once per process): the process that builds vLLM's
    engine config is the API server, or the launcher of several, or a headless node's launcher,
    never an engine core or a worker. In Prometheus multiprocess mode it writes the value files."""
    global _READER
    if _READER is not None:
        return
    _READER = False
    try:
        register_collector()
    except Exception as exc:  # noqa: BLE001
        logger.error("moe_reuse: could not register the collector: %s: %s", type(exc).__name__, exc)
    try:
        import atexit

        from .exporters.multiprocess import MultiprocessBridge, multiprocess_mode
        from .live.attach import attach_reader
        from .reader.service import ReaderService
        from .snapshot import run_dir

        bridge = MultiprocessBridge() if multiprocess_mode() else None
        _READER = ReaderService(run_dir, bridge=bridge, attach_live=attach_reader).start()
        atexit.register(_READER.stop)
    except Exception as exc:  # noqa: BLE001 - serving goes on; the ranks then go stale
        logger.error("moe_reuse: could not start the reader: %s: %s", type(exc).__name__, exc)


def check_vllm_version() -> None:
    """Log one line when the running vLLM is outside the tested range (exported either way)."""
    try:
        import vllm

        version = str(vllm.__version__)
    except Exception:  # noqa: BLE001
        version = "unknown"
    STATE.vllm_version = version
    STATE.tested_range = compat.tested_range()
    STATE.supported = compat.is_supported(version, STATE.tested_range)
    if not STATE.supported:
        logger.warning("moe_reuse: vLLM %s is outside the tested range vllm%s; recording anyway, "
                       "watch moe_reuse_selfcheck_mismatch_assignments_total", version,
                       STATE.tested_range)


def register_collector() -> None:
    """Expose the ranks' snapshots on this process's /metrics (single-API-server mode; with
    several, vLLM serves the multiprocess files the reader writes), and have prometheus_client
    escape each name once, not once a sample (`render_names`: it is most of a scrape's cost)."""
    from prometheus_client import REGISTRY

    from .exporters import render_names
    from .exporters.prometheus import SnapshotCollector
    from .snapshot import run_dir

    render_names.install()
    REGISTRY.register(SnapshotCollector(run_dir, frontend=STATE))  # type: ignore[arg-type]
