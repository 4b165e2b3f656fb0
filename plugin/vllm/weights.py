"""Bytes the served model holds on this rank, per component, read from the loaded modules.

Plain data out (`ByteModel`): routed-expert bytes per MoE layer, and the per-step constant parts
(shared experts, dense FFN and router gates, attention, LM head). KV bytes per token come from
vLLM's own KV-cache groups once the cache exists.
"""

from __future__ import annotations

from typing import Any

import torch


def _logical_weight_bytes(m: Any, item: int) -> int:
    if hasattr(m, "input_size_per_partition") and hasattr(m, "output_size_per_partition"):
        return int(m.input_size_per_partition) * int(m.output_size_per_partition) * item
    if hasattr(m, "input_size") and hasattr(m, "output_size"):  # ReplicatedLinear: not split
        return int(m.input_size) * int(m.output_size) * item
    if hasattr(m, "num_embeddings_per_partition") and hasattr(m, "embedding_dim"):
        return int(m.num_embeddings_per_partition) * int(m.embedding_dim) * item
    return 0


def tensor_bytes(m: torch.nn.Module) -> int:
    """Bytes of the tensors a linear or embedding module holds itself on this rank, as loaded.

    Every parameter and buffer counts at its own dtype: an FP8 or INT8 weight is one byte per
    element, a GPTQ/AWQ `qweight` is packed int32 (eight 4-bit values each) with its `scales`,
    `qzeros` and `g_idx`, an MXFP4 weight is uint8 blocks with their scales, and the bias too.
    One exception, the CPU backend: after loading it prepacks unquantized linear weights into a
    kernel handle and replaces `weight` with an empty tensor of the original dtype; the bytes it
    reads are then input x output (per partition) x that dtype.
    """
    total = 0
    own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
    for name, t in own:
        if name == "weight" and t.numel() == 0:
            total += _logical_weight_bytes(m, t.element_size())
        else:
            total += t.numel() * t.element_size()
    return total


def _descendant_ids(roots: list[torch.nn.Module]) -> set[int]:
    return {id(d) for r in roots for d in r.modules()}


def byte_model(model: torch.nn.Module, runners: list[Any], *, holds_lm_head: bool = True,
               ) -> dict[str, Any]:
    """Bytes per routed expert per layer and the per-step constant parts of this rank (the
    fields of `recorder.aggregate.ByteModel`, as a plain dict), all as loaded (`tensor_bytes`).

    Roles come from vLLM's module types and the references vLLM hands the MoE runner, not from
    names: routed experts are the runner's per-expert tensors (first dimension = local experts:
    weights, scales, zero points); shared experts the module vLLM passed as `shared_experts`;
    router gates the runner's `gate`; attention every linear under a module that owns an
    `Attention`/`MLAAttention` layer, and every linear inside a state-space mixer (`MambaBase`:
    Mamba, Gated DeltaNet, short convolutions), which holds its own projections where an
    attention op's are its siblings (a hybrid's decoder layer also holds its MLP); the LM head a
    `ParallelLMHead` (a tied head is the embedding, read once per step either way); every other
    linear is dense FFN. Models whose MoE block calls its shared experts itself (no reference on
    the runner) fall back to the name.
    Only the rank that computes the logits (`holds_lm_head`: the last PP stage) reads the whole
    vocabulary matrix each step; an earlier stage's embedding lookup reads only the scheduled
    tokens' rows, so it counts none of it.
    """
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    expert_bytes: list[int] = []
    shared_roots: list[torch.nn.Module] = []
    gates: list[torch.nn.Module] = []
    for r in runners:
        n_local = int(getattr(r, "local_num_experts", 0) or r.router.global_num_experts)
        se = getattr(getattr(r, "_shared_experts", None), "_layer", None)
        gate = getattr(r, "gate", None)
        not_routed = _descendant_ids([x for x in (se, gate) if isinstance(x, torch.nn.Module)])
        routed = 0
        for mname, sub in r.named_modules():
            if id(sub) in not_routed or "shared" in mname:
                continue  # the runner also registers its gate (and may hold the shared experts)
            own = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
            routed += sum(t.numel() * t.element_size() for name, t in own
                          if "shared" not in name and t.dim() >= 2 and t.shape[0] == n_local)
        expert_bytes.append(routed // max(n_local, 1))
        if isinstance(se, torch.nn.Module):
            shared_roots.append(se)
        if isinstance(gate, torch.nn.Module):
            gates.append(gate)
    shared_ids, gate_ids = _descendant_ids(shared_roots), _descendant_ids(gates)
    attn_owners = [c if isinstance(c, MambaBase) else m for m in model.modules()
                   for c in m.children() if isinstance(c, AttentionLayerBase)]
    attn_ids = _descendant_ids(attn_owners)
    runner_ids = _descendant_ids(list(runners))
    shared = dense = attention = 0
    lm_head = embed = 0
    for name, m in model.named_modules():
        if isinstance(m, VocabParallelEmbedding):
            if isinstance(m, ParallelLMHead):
                lm_head = tensor_bytes(m)
            else:
                embed = tensor_bytes(m)
            continue
        if not isinstance(m, LinearBase) or (id(m) in runner_ids and id(m) not in gate_ids
                                             and id(m) not in shared_ids):
            continue
        nbytes = tensor_bytes(m)
        if id(m) in shared_ids or (not shared_roots and "shared_expert" in name):
            shared += nbytes
        elif id(m) in attn_ids and id(m) not in gate_ids:
            attention += nbytes
        else:
            dense += nbytes  # dense FFN layers and the MoE router gates
    return {
        "expert_bytes_per_layer": tuple(expert_bytes), "shared_expert_bytes": shared,
        "dense_ffn_bytes": dense, "attention_bytes": attention,
        "embedding_bytes": (lm_head or embed) if holds_lm_head else 0,
    }


def kv_groups(model_runner: Any) -> list[tuple[float, int, int]]:
    """(KV bytes per token of context, sliding window or 0, attention chunk or 0) on this rank,
    summed over the attention layers that share a window and chunk; [] before vLLM has sized
    the cache.

    From vLLM's KV-cache groups: each group's spec (or, for `UniformTypeKVCacheSpecs`, each
    layer's) gives the page bytes per block, hence per token. A sliding window or an attention
    chunk is read from the spec whichever class carries it: `SlidingWindowSpec`,
    `ChunkedLocalAttentionSpec`, or a `FullAttentionSpec` that records one (vLLM allocates full
    blocks for those when the hybrid allocator is off, but the layer still reads only its window).
    Specs that hold no per-token state (Mamba and other state-space caches) are skipped.
    """
    acc: dict[tuple[int, int], float] = {}
    for sp in _layer_specs(model_runner):
        if not hasattr(sp, "head_size") or not getattr(sp, "block_size", 0):
            continue  # not an attention cache: no bytes per token of context
        page = getattr(sp, "real_page_size_bytes", None) or sp.page_size_bytes
        window = int(getattr(sp, "sliding_window", None) or 0)
        chunk = int(getattr(sp, "attention_chunk_size", None) or 0)
        acc[(window, chunk)] = acc.get((window, chunk), 0.0) + page / sp.block_size
    return [(per_token, w, c) for (w, c), per_token in sorted(acc.items())]


def recurrent_state_bytes(model_runner: Any) -> int:
    """The recurrent state one request holds on this rank, over every layer whose cache is a
    state rather than per-token KV (vLLM's `MambaSpec`: Mamba, Gated DeltaNet, short
    convolutions), as vLLM sized it: the state's own bytes (`real_page_size_bytes`), not the
    page padded to the attention layers' size; 0 without such layers or before the cache is
    sized."""
    return sum(int(getattr(sp, "real_page_size_bytes", None) or sp.page_size_bytes)
               for sp in _layer_specs(model_runner)
               if getattr(sp, "shapes", None) is not None and not hasattr(sp, "head_size"))


def _layer_specs(model_runner: Any) -> list[Any]:
    """One KV-cache spec per layer on this rank, from vLLM's KV-cache groups (a group's spec
    for each of its layers, or `UniformTypeKVCacheSpecs`' own per layer); [] before vLLM has
    sized the cache."""
    cfg = getattr(model_runner, "kv_cache_config", None)
    out: list[Any] = []
    for group in getattr(cfg, "kv_cache_groups", []) or []:
        spec = group.kv_cache_spec
        per_layer = getattr(spec, "kv_cache_specs", None)
        out += list(per_layer.values()) if per_layer else [spec] * len(group.layer_names)
    return out


def kv_bytes_per_token(model_runner: Any) -> int:
    """KV bytes one token of full context costs on this rank, over every KV-cache group; 0 before
    vLLM has sized the cache."""
    return int(sum(per_token for per_token, _, _ in kv_groups(model_runner)))
