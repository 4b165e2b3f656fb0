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
