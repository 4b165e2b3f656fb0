"""Worker-side wiring that is not vLLM-specific: where snapshots go and what listens to them.

Kept apart from the seam so the seam stays about vLLM internals only.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from typing import Any

from .config import PluginConfig
from .exporters.multiprocess import MultiprocessBridge, multiprocess_mode
from .recorder.session import Publisher, RecorderSession
from .snapshot import run_dir, snapshot_path, write_snapshot

logger = logging.getLogger("vllm.moe_reuse")


def make_publisher(cfg: PluginConfig, labels: dict[str, str]) -> Publisher:
    """Snapshot -> file for the API server's collector (+ multiprocess value files if enabled)."""
    path = snapshot_path(run_dir(), labels["engine"], labels["rank"])
    bridge = MultiprocessBridge() if multiprocess_mode() else None
    options = {"per_expert_series": cfg.per_expert_series, "max_expert_series": cfg.max_expert_series}

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


def attach_live(session: RecorderSession, cfg: PluginConfig, worker: Any) -> None:
    """Attach the live predictor comparison (per flushed block, off the step)."""
    try:
        from .live.attach import attach
    except ImportError:
        return
    attach(session, cfg, worker)
