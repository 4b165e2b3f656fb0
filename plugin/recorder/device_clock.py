"""Collective time on CUDA, taken by the GPU itself, inside CUDA graphs, read back with the counts.

Host clocks around a collective time its launch on a GPU, and a replayed CUDA graph runs no Python
at all. CUDA events recorded inside a graph do time it (benchmarks/gpu_recorder_check.py, check 3),
but a captured event is the same event on every replay: reading it needs a host wait before the
next replay, which the step must never do.

So the time is written where the counts are: a one-thread kernel reads the GPU's nanosecond
`%globaltimer` and atomically adds it, negated before the collective and as is after it, into
`acc[ring_slot, op]`. The ring slot comes from the device (`tok_base[max_tokens]`, filled by the
same H2D copy as the token rows), so a kernel captured once writes each replay's own slot, and the
pairs sum to the collective's duration for the step. The flusher copies `acc` with the counts and
never waits in the step.

CUDA with Triton only (the asm is PTX). Off by default: see plugin/vllm/comm.py for when it is
safe to turn on (`cuda_comm_timing: "device"`).
"""

from __future__ import annotations

from typing import Any

import torch

try:  # optional: vLLM's GPU builds ship Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _stamp(acc_ptr, tok_base_ptr, SLOT_AT: tl.constexpr, COL: tl.constexpr,  # type: ignore[no-untyped-def]  # noqa: ANN001
               NCOLS: tl.constexpr, SIGN: tl.constexpr):
        slot = tl.load(tok_base_ptr + SLOT_AT)
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                        is_pure=False, pack=1)
        tl.atomic_add(acc_ptr + slot * NCOLS + COL, now * SIGN, sem="relaxed")


def available(device: torch.device) -> bool:
    """NVIDIA GPUs with Triton (the clock is PTX: not on ROCm, whose torch.cuda is HIP)."""
    return (triton is not None and device.type == "cuda"
            and not getattr(torch.version, "hip", None))


def stamp(acc: torch.Tensor, tok_base: torch.Tensor, slot_at: int, col: int, sign: int) -> None:
    """Add `sign` x the GPU's nanosecond clock to acc[tok_base[slot_at], col] (one tiny kernel,
    stream-ordered: it runs when the stream reaches it)."""
    _stamp[(1,)](acc, tok_base, SLOT_AT=slot_at, COL=col, NCOLS=acc.shape[1], SIGN=sign)


def paired(values: Any) -> Any:
    """Per-step sums of (end - start) pairs; a step whose pairs did not close (a collective that
    raised between its stamps) is negative or absurd and reads as 0."""
    import numpy as np

    v = np.asarray(values, dtype=np.int64)
    return np.where((v >= 0) & (v < 3_600 * 10**9), v, 0)
