"""KV bytes per step, per KV-cache group: full attention reads the whole context, a sliding
window at most its window, chunked local attention the tokens of the current chunk.

The specs are vLLM's own classes (as vLLM builds them for GPT-OSS, Gemma-style hybrids and
Llama-4); the expected bytes are worked out here from heads x head size x dtype, never from the
plugin's byte model.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from moe_reuse.plugin.recorder.aggregate import ByteModel, kv_read_bytes
from moe_reuse.plugin.vllm.weights import kv_bytes_per_token, kv_groups

kvi = pytest.importorskip("vllm.v1.kv_cache_interface")

HEADS, HEAD, BLOCK = 4, 64, 16
PER_TOKEN_BF16 = 2 * HEADS * HEAD * 2  # K and V, bf16


def _runner(*groups: tuple[object, int]) -> NS:
    return NS(kv_cache_config=NS(kv_cache_groups=[
        NS(kv_cache_spec=spec, layer_names=[f"l{i}" for i in range(n)]) for spec, n in groups]))


def test_gpt_oss_style_alternating_full_and_sliding_groups() -> None:
    full = kvi.FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD,
                                 dtype=torch.bfloat16)
    swa = kvi.SlidingWindowSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD,
                                dtype=torch.bfloat16, sliding_window=128)
    runner = _runner((full, 12), (swa, 12))
    assert kv_groups(runner) == [(12 * PER_TOKEN_BF16, 0, 0), (12 * PER_TOKEN_BF16, 128, 0)]
    assert kv_bytes_per_token(runner) == 24 * PER_TOKEN_BF16
    bm = ByteModel((1,), kv_bytes_per_token=24 * PER_TOKEN_BF16, kv_groups=tuple(kv_groups(runner)))
    ctx = np.array([50, 128, 129, 1000])
    want = [12 * PER_TOKEN_BF16 * (c + min(c, 128)) for c in ctx]
    assert kv_read_bytes(bm, ctx).tolist() == want


def test_llama4_style_chunked_local_attention_reads_the_current_chunk() -> None:
    full = kvi.FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD,
                                 dtype=torch.bfloat16)
    local = kvi.ChunkedLocalAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD,
                                          dtype=torch.bfloat16, attention_chunk_size=100)
    runner = _runner((full, 1), (local, 3))  # Llama-4: 3 of every 4 layers are chunked
    bm = ByteModel((1,), kv_groups=tuple(kv_groups(runner)))
    # after the step the request has c tokens; the newest is in chunk (c - 1) // 100
    for c, in_chunk in ((1, 1), (99, 99), (100, 100), (101, 1), (250, 50), (300, 100)):
        got = kv_read_bytes(bm, np.array([c]))[0]
        assert got == PER_TOKEN_BF16 * (c + 3 * in_chunk), c


def test_a_full_spec_that_records_a_window_is_read_as_a_window_and_fp8_halves_it() -> None:
    """Hybrid allocator off: vLLM gives sliding-window layers a FullAttentionSpec that records
    the window; and an FP8 KV cache is one byte per element."""
    spec = kvi.FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD,
                                 dtype=torch.float8_e4m3fn, sliding_window=64)
    runner = _runner((spec, 2))
    assert kv_groups(runner) == [(2 * (2 * HEADS * HEAD * 1), 64, 0)]


def test_uniform_type_specs_count_each_layer_once_and_mamba_holds_no_tokens() -> None:
    a = kvi.FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD,
                              dtype=torch.bfloat16)
    b = kvi.FullAttentionSpec(block_size=BLOCK, num_kv_heads=2 * HEADS, head_size=HEAD,
                              dtype=torch.bfloat16)
    uniform = kvi.UniformTypeKVCacheSpecs(block_size=BLOCK, kv_cache_specs={"x": a, "y": b})
    mamba = NS(block_size=BLOCK, page_size_bytes=10**6, shapes=((1,),))  # no head_size
    runner = _runner((uniform, 2), (mamba, 3))
    assert kv_groups(runner) == [(PER_TOKEN_BF16 * 3, 0, 0)]


def test_no_cache_yet_and_no_groups_fall_back_to_full_context() -> None:
    assert kv_groups(NS()) == [] and kv_bytes_per_token(NS()) == 0
    bm = ByteModel((1,), kv_bytes_per_token=10)
    assert kv_read_bytes(bm, np.array([5, 7])).tolist() == [50, 70]


def test_a_hybrids_recurrent_state_is_read_whole_by_each_request_that_has_one() -> None:
    """Qwen3-Next-style Gated DeltaNet layers: vLLM's MambaSpec, its page padded to the
    attention page. A request with tokens computed reads its state whole each step, whatever
    its context; a new one starts from zeros; wider steps than the raw buffers agree."""
    from moe_reuse.plugin.recorder.aggregate import DECODE, PREFILL, StepMeta
    from moe_reuse.plugin.vllm.weights import recurrent_state_bytes

    conv, ssm = (3, 2 * 128 + 128), (1, 64, 64)  # one rank's conv columns and heads x v x k
    state = (3 * 384 + 64 * 64) * 2  # bf16 both
    gdn = kvi.MambaSpec(block_size=BLOCK, shapes=(conv, ssm), dtypes=(torch.bfloat16,) * 2,
                        page_size_padded=4 * state)
    full = kvi.FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD,
                                 dtype=torch.bfloat16)
    runner = _runner((full, 1), (gdn, 3))
    assert recurrent_state_bytes(runner) == 3 * state  # the state, not the padded page
    assert kv_groups(runner) == [(PER_TOKEN_BF16, 0, 0)]
    assert recurrent_state_bytes(NS()) == 0 and recurrent_state_bytes(_runner((full, 2))) == 0
    bm = ByteModel((1,), kv_bytes_per_token=PER_TOKEN_BF16, kv_groups=tuple(kv_groups(runner)),
                   recurrent_state_bytes=recurrent_state_bytes(runner))
    # a new prompt of 9, a prefill chunk continuing at 40, two decodes at contexts 10 and 500
    sched, dec, done = np.array([9, 8, 1, 1]), np.array([0, 0, 1, 1], bool), np.array([0, 40, 9, 499])
    for width in (8, 2):  # raw and derived by the flusher; derived on the spot
        meta = StepMeta(4, max_requests=width)
        meta.record(0, sched, dec, done, int(sched.sum()), bm)
        meta.derive(0, 1, bm)
        assert meta.kv_bytes[0, PREFILL] == PER_TOKEN_BF16 * (9 + 48) + 3 * state
        assert meta.kv_bytes[0, DECODE] == PER_TOKEN_BF16 * (10 + 500) + 2 * 3 * state
