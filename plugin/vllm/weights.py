"""Bytes the served model holds on this rank, per component, read from the loaded modules.

Plain data out (`ByteModel`): routed-expert bytes per MoE layer, and the per-step constant parts
(shared experts, dense FFN and router gates, attention, LM head). KV bytes per token come from
vLLM's own KV-cache groups once the cache exists.
"""

from __future__ import annotations

from typing import Any

import torch


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


def byte_model(model: torch.nn.Module, runners: list[Any]) -> dict[str, Any]:
    """Bytes per routed expert per layer and the per-step constant parts of this rank (the
    fields of `recorder.aggregate.ByteModel`, as a plain dict)."""
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
    return {
        "expert_bytes_per_layer": tuple(expert_bytes), "shared_expert_bytes": shared,
        "dense_ffn_bytes": dense, "attention_bytes": attention,
        "embedding_bytes": lm_head or embed,
    }


def kv_bytes_per_token(model_runner: Any) -> int:
    """KV bytes one token of context costs on this rank, over every KV-cache group; 0 before
    vLLM has sized the cache."""
    cfg = getattr(model_runner, "kv_cache_config", None)
    total = 0.0
    for group in getattr(cfg, "kv_cache_groups", []) or []:
        spec = group.kv_cache_spec
        total += len(group.layer_names) * spec.page_size_bytes / spec.block_size
    return int(total)


