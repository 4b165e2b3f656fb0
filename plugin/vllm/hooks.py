"""Where the plugin enters vLLM's processes: two wrappers, each calling back into the plugin.

- Front end: `EngineArgs.create_engine_config` is wrapped so the plugin validates its config (and
  the served model against it) before any engine process is spawned; a `ConfigError` stops start-up
  with its message. The callback receives plain data only.
- Worker: `Worker.load_model` (CPUWorker inherits it, V1 and V2 runners alike) is wrapped so the
  plugin binds after the model is loaded and before compilation and warm-up, the only moment the
  compiled graph still picks up a routing hook (binding later records nothing under torch.compile).

Both wrappers are idempotent (vLLM calls `register()` in every process, possibly more than once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

FrontendCallback = Callable[[Any, dict[str, Any]], None]
WorkerCallback = Callable[[Any, Any], None]


def served_model_summary(config: Any) -> dict[str, Any]:
    """Plain facts of the model the front end is about to serve (for config validation)."""
    mc = config.model_config
    out: dict[str, Any] = {"model": str(mc.model)}
    try:
        out["num_layers"] = int(mc.get_total_num_hidden_layers())
        out["num_experts"] = int(mc.get_num_experts() or 0)
        out["top_k"] = int(mc.get_num_experts_per_tok() or 0)
        out["hf_config"] = mc.hf_config.to_dict()
    except Exception:  # noqa: BLE001 - validation then skips the model-dependent checks
        pass
    return out


def _wrap_once(cls: Any, name: str, after: Callable[[Any, Any], None]) -> None:
    """Wrap `cls.name` so that `after(self, result)` runs after it (once, however often called)."""
    orig = getattr(cls, name)
    if getattr(orig, "_moe_reuse", False):
        return

    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        after(self, result)
        return result

    wrapper._moe_reuse = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)


def install_config_validation(callback: FrontendCallback) -> None:
    """`callback(additional_config, served_model_summary)` runs on every engine config built."""
    from vllm.engine.arg_utils import EngineArgs

    _wrap_once(EngineArgs, "create_engine_config", lambda _self, config: callback(
        config.additional_config, served_model_summary(config)))


def install_worker_hook(callback: WorkerCallback) -> None:
    """`callback(worker, additional_config)` runs once the worker's model is loaded."""
    from vllm.v1.worker.gpu_worker import Worker

    _wrap_once(Worker, "load_model", lambda worker, _result: callback(
        worker, getattr(worker.vllm_config, "additional_config", None)))
