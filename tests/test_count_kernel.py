"""The one-kernel hot path (Triton, used on CUDA) counts exactly what the torch path counts.

CI has no GPU: the kernel runs here through Triton's interpreter on CPU tensors (a subprocess, as
TRITON_INTERPRET must be set before Triton loads), against the torch path of the same ring, on
routing with out-of-range ids (>= E and negative), padded rows and both phases. On a GPU,
benchmarks/gpu_recorder_check.py checks the compiled kernel inside CUDA graphs against an eager
bincount.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from moe_reuse.plugin.recorder.ring import RingLayout, RoutingRing, DECODE, PREFILL
    rng = np.random.default_rng(0)
    for E, K, n in ((8, 2, 5), (256, 8, 67), (128, 8, 1), (60, 4, 33)):
        rings = {}
        for impl in ("triton", "torch"):
            r = RoutingRing(RingLayout(3, E, K, max_tokens=80, ring_steps=4))
            r.count_impl = impl
            rings[impl] = r
        for step in range(3):
            phases = rng.choice([PREFILL, DECODE], size=n - 1 if n > 1 else 1).astype(np.int8)
            ids = torch.from_numpy(rng.integers(-3, E + 4, size=(n, K))).to(torch.int32)
            for r in rings.values():
                r.begin_step(step, phases)
                for layer in range(3):
                    r.capture(layer, ids if layer != 1 else ids.t().contiguous().t())
                r.end_step()
        a, b = rings["triton"].counts, rings["torch"].counts
        assert torch.equal(a, b), (E, K, n, (a - b).abs().sum())
        assert int(a[:, :3].sum()) == 3 * 3 * n * K  # every pair counted once, padding included
        assert int(a[:, :3, :, E].sum()) > 0  # out-of-range ids reached column E
    print("ok")
""")


def test_triton_kernel_counts_like_the_torch_path() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", MOE_REUSE_COUNT_KERNEL="triton")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_torch_path_is_the_default_off_cuda() -> None:
    import torch

    from moe_reuse.plugin.recorder import count_kernel

    if os.environ.get("MOE_REUSE_COUNT_KERNEL"):
        pytest.skip("forced by the environment")
    assert not count_kernel.available(torch.device("cpu"))
