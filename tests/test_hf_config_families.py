"""config.json of MoE families beyond the bundled tiny models, read as vLLM's model files read them.

The live comparison and `whatif --from-server` build the predictor's spec from the served
config.json, so each family's keys for its experts, top-k, shared experts and MoE-layer rule must
be read, or the plugin says "live setup failed" and has no dense gauge. Expected values come from
the model cards (total and active parameters) and from the layer rule in vLLM's model file for
the family, cited per case; none from the predictor.
"""

from __future__ import annotations

import pytest

from moe_reuse.predictor import (
    Partition,
    SpecError,
    load_hardware_preset,
    memory_breakdown,
    model_from_hf_config,
    step_time,
    total_params,
)
from moe_reuse.predictor.sizes import active_params

ERNIE_21B = {  # baidu/ERNIE-4.5-21B-A3B-PT: 21B total, 3B active
    "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
    "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 28,
    "num_attention_heads": 20, "num_key_value_heads": 4, "vocab_size": 103424,
    "max_position_embeddings": 131072, "moe_num_experts": 64, "moe_k": 6,
    "moe_layer_start_index": 1, "moe_layer_end_index": 27, "moe_layer_interval": 1,
    "moe_num_shared_experts": 2, "moe_intermediate_size": 1536, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
DBRX = {  # databricks/dbrx-instruct: 132B total, 36B active
    "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": 6144, "n_heads": 48,
    "n_layers": 40, "max_seq_len": 32768, "vocab_size": 100352,
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "rope_theta": 500000},
    "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4},
    "torch_dtype": "bfloat16",
}
HUNYUAN_A13B = {  # tencent/Hunyuan-A13B-Instruct: 80B total, 13B active; per-layer lists
    "architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan_v1_moe",
    "hidden_size": 4096, "intermediate_size": 3072, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128167,
    "num_experts": 64, "moe_topk": [8] * 32, "moe_intermediate_size": [3072] * 32,
    "num_shared_expert": [1] * 32, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(("config", "experts", "top_k", "moe_layers", "total_b", "active_b"), [
    (ERNIE_21B, 64, 6, 27, 21.0, 3.0),
    (DBRX, 16, 4, 40, 132.0, 36.0),
    (HUNYUAN_A13B, 64, 8, 32, 80.0, 13.0),
])
def test_families_match_their_model_cards(config, experts, top_k, moe_layers, total_b, active_b):
    """Experts, top-k and MoE layers as the config states them; totals within 5% of the card."""
    m = model_from_hf_config(config)
    assert (m.num_experts, m.experts_per_token, m.num_moe_layers) == (experts, top_k, moe_layers)
    assert total_params(m) / 1e9 == pytest.approx(total_b, rel=0.05)
    assert active_params(m) / 1e9 == pytest.approx(active_b, rel=0.12)  # cards round to 1 digit


BASE = {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "intermediate_size": 512,
        "moe_intermediate_size": 128, "num_experts": 16, "num_experts_per_tok": 2}


@pytest.mark.parametrize(("extra", "moe_layers", "shared"), [
    # vllm/model_executor/models/ernie45_moe.py: start <= i <= end and (i + 1) % interval == 0
    ({"moe_layer_start_index": 2, "moe_layer_end_index": 6, "moe_layer_interval": 2}, 2, (0, 0)),
    # jamba.py reads layers_num_experts; transformers derives it from period and offset
    ({"expert_layer_period": 2, "expert_layer_offset": 1}, 4, (0, 0)),
    ({"layers_num_experts": [1, 16] * 4}, 4, (0, 0)),
    # exaone_moe.py: mlp_layer_types[i] == "sparse"
    ({"mlp_layer_types": ["dense"] + ["sparse"] * 7, "num_shared_experts": 1}, 7, (1, 128)),
    # step3_text.py: moe_layers_enum "i,j,..." with one shared expert of share_expert_dim
    ({"moe_layers_enum": "4,5,6,7", "share_expert_dim": 640}, 4, (1, 640)),
    # afmoe.py / lfm2_moe.py: layer_idx >= num_dense_layers; afmoe's shared = k x moe width
    ({"num_dense_layers": 2, "num_shared_experts": 2}, 6, (2, 128)),
    # bailing_moe.py: first_k_dense_replace, shared width moe_shared_expert_intermediate_size
    ({"first_k_dense_replace": 1, "num_shared_experts": 1,
      "moe_shared_expert_intermediate_size": 384}, 7, (1, 384)),
    # granitemoeshared.py: one shared MLP of shared_intermediate_size
    ({"shared_intermediate_size": 1024}, 8, (1, 1024)),
])
def test_each_familys_moe_layer_rule(extra, moe_layers, shared):
    m = model_from_hf_config({**BASE, **extra})
    assert m.num_moe_layers == moe_layers
    assert (m.num_shared_experts, m.shared_expert_intermediate_size) == shared


@pytest.mark.parametrize(("extra", "field"), [
    ({"mlp_layer_types": "sparse"}, "mlp_layer_types"),
    ({"moe_layers_enum": "4,x"}, "moe_layers_enum"),
    ({"num_experts_per_tok": None, "moe_topk": []}, "moe_topk"),
    ({"num_experts_per_tok": None, "moe_topk": ["8"]}, "moe_topk"),
])
def test_bad_family_keys_name_the_field(extra, field):
    with pytest.raises(SpecError, match=f"config.json {field}"):
        model_from_hf_config({**BASE, **extra})


QWEN3_NEXT = {  # Qwen/Qwen3-Next-80B-A3B-Instruct: 80B total, 3B active; 3 of 4 layers linear
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "vocab_size": 151936, "intermediate_size": 5120, "num_experts": 512,
    "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "full_attention_interval": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
    + ["full_attention"] + (["linear_attention"] * 3 + ["full_attention"]) * 10,
    "torch_dtype": "bfloat16",
}


def test_a_hybrids_recurrent_layers_hold_no_kv_cache():
    """Qwen3-Next caches K and V in its 12 full-attention layers only: 12 x (K + V) x 2 heads x
    256 x 2 bytes = 24,576 bytes per token, a quarter of what 48 attention layers would hold."""
    from moe_reuse.predictor import kv_bytes_per_token

    m = model_from_hf_config(QWEN3_NEXT)
    assert (m.num_recurrent_layers, m.num_kv_layers, m.num_moe_layers) == (36, 12, 48)
    per_token = 12 * 2 * 2 * 256 * 2
    assert kv_bytes_per_token(m) == per_token
    assert total_params(m) / 1e9 == pytest.approx(80.0, rel=0.05)
    hw = load_hardware_preset("h200")
    assert memory_breakdown(m, hw, Partition(), 4096).kv_bytes_per_token == per_token
    assert step_time(m, hw, Partition(), 1, 1000).hbm_bytes["kv"] == per_token * 1000


@pytest.mark.parametrize(("extra", "recurrent"), [
    ({"attn_layer_period": 4, "attn_layer_offset": 1}, 6),  # jamba: attention at 1 and 5
    ({"layers_block_type": ["mamba"] * 6 + ["attention"] * 2}, 6),  # granite hybrid, older key
    ({"layer_types": ["conv", "conv", "full_attention", "conv"] * 2}, 6),  # lfm2
    ({"attn_type_list": [0, 1] * 4}, 4),  # minimax: 0 = lightning (linear) attention
    ({"layer_types": ["sliding_attention", "full_attention"] * 4, "sliding_window": 64}, 0),
])
def test_recurrent_layers_by_family(extra, recurrent):
    assert model_from_hf_config({**BASE, **extra}).num_recurrent_layers == recurrent


def test_a_model_without_an_attention_layer_is_refused_by_name():
    with pytest.raises(SpecError, match="num_recurrent_layers: 8 of 8 layers leave no attention"):
        model_from_hf_config({**BASE, "layer_types": ["mamba"] * 8})
