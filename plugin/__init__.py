"""vllm-moe-reuse plugin: live MoE expert-reuse telemetry inside vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process (front end,
engine core, each worker), possibly more than once, so it is idempotent, cheap, and imports vLLM
only inside the seam. The reader and the collector start only in the process that builds vLLM's
engine config (the API server; `frontend.on_engine_config`), never in an engine core or a worker.
Installed but not enabled, it changes nothing: the hooks it installs are
pass-throughs unless `--additional-config '{"moe_reuse": {...}}'` is given, and it never touches
vLLM's config (so not its compile cache either).
"""

from __future__ import annotations

import logging

__all__ = ["register"]

_registered = False
logger = logging.getLogger("vllm.moe_reuse")


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from .snapshot import ensure_run_id

    ensure_run_id()  # before vLLM spawns anything, so every child shares this server's run id
    try:
        from . import frontend, worker_runtime
        from .vllm import hooks

        hooks.install_config_validation(frontend.on_engine_config)
        hooks.install_worker_hook(worker_runtime.on_model_loaded)
    except ImportError as exc:  # vLLM missing: the predictor and CLI still work
        logger.debug("moe_reuse: vLLM hooks not installed: %s", exc)
