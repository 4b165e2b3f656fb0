"""vLLM's CPU kernels, as plain callables, for `moe-reuse calibrate` (never used while serving)."""

from __future__ import annotations

from typing import Any


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
