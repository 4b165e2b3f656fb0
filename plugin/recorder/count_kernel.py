"""The hot path on CUDA in one kernel per MoE layer.

In torch ops, counting one layer's routing is a bounds check, an add and an `index_add_`: on an
H200, inside a CUDA graph, those small kernels cost about 17 us per layer (DeepSeek-V3 shapes,
benchmarks/gpu_recorder_check.py), which at real decode batch sizes is several per cent of a
layer. This Triton kernel does the same in one launch: per (token, k) pair, the id is bounds-
checked (out of range -> column E), the token's row comes from `tok_base` (its phase's offset
plus the step's slot base, `tok_base[base_at]`), and one atomic add counts it. Same counters,
same layout, same result as the torch path (tests/test_count_kernel.py runs both through
Triton's interpreter and compares).

Used on CUDA when Triton imports; the torch path stays for CPU and as the fallback
(`MOE_REUSE_COUNT_KERNEL=torch` forces it). Graph capture: the launch is a plain kernel node; the
grid depends only on the batch shape, fixed per captured graph.
"""

from __future__ import annotations

import os

import torch

try:  # an optional import: vLLM's GPU builds ship Triton, CPU-only installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 1024


def available(device: torch.device) -> bool:
    """Whether the one-kernel path runs on `device` (CUDA with Triton, not forced off)."""
    if os.environ.get("MOE_REUSE_COUNT_KERNEL", "").lower() == "torch":
        return False
    if os.environ.get("MOE_REUSE_COUNT_KERNEL", "").lower() == "triton":
        return triton is not None  # forced (tests: Triton's interpreter on CPU tensors)
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _count_pairs(ids_ptr, tok_base_ptr, counts_ptr, n_pairs, num_experts, base_at,  # type: ignore[no-untyped-def]  # noqa: ANN001
                     TOP_K: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_pairs
        ids = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int64)
        ids = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
        base = tl.load(tok_base_ptr + base_at)  # the step's slot, as a flat offset
        row = tl.load(tok_base_ptr + offs // TOP_K, mask=mask, other=0) + base
        ones = tl.full((BLOCK_SIZE,), 1, dtype=tl.int32)
        tl.atomic_add(counts_ptr + row + ids, ones, mask=mask, sem="relaxed")


def count_pairs(layer_flat: torch.Tensor, tok_base: torch.Tensor, topk_ids: torch.Tensor,
                num_experts: int, base_at: int) -> None:
    """Add one layer's (token, k) pairs to its flat int32 counters (one kernel launch); a
    token's row is tok_base[token] + tok_base[base_at]."""
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    n_tokens, top_k = ids.shape
    n_pairs = n_tokens * top_k
    if n_pairs == 0:
        return
    grid = (triton.cdiv(n_pairs, BLOCK),)
    _count_pairs[grid](ids, tok_base, layer_flat, n_pairs, num_experts, base_at, TOP_K=top_k,
                       BLOCK_SIZE=BLOCK)
