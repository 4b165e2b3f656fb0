"""Hybrid MoEs with Mamba2 mixers: Nemotron-H's one block per layer, Granite-4.0-H's mixer + MoE.

Nemotron-3 Nano's config.json has 52 "layers", but vLLM builds one block per character of
`hybrid_override_pattern` (nemotron_h.py: M Mamba, * attention, - MLP, E MoE): 23 MoE blocks,
6 attention blocks, 23 Mamba blocks. Read as 52 layers of attention + MoE, the spec had 2.3x the
MoE layers and 8.7x the KV cache. Granite-4.0-H's 36 Mamba2 mixers hold 3.7B weights; costed as
attention layers they were 1.5B, so its active weights (what a decode step reads) were 25% low.
Expected values come from the model cards and from the configs by hand; none from the predictor.
"""

from __future__ import annotations

import dataclasses

import pytest

from moe_reuse.predictor import (
    Partition,
    SpecError,
    kv_bytes_per_token,
    load_hardware_preset,
    max_batch,
    memory_breakdown,
    model_from_hf_config,
    step_time,
    total_params,
)
from moe_reuse.predictor.sizes import active_params, expert_params

PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
NEMOTRON_NANO = {  # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16: 31.6B total, 3.6B active
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "vocab_size": 131072,
    "hidden_size": 2688, "intermediate_size": 1856, "num_hidden_layers": 52,
    "hybrid_override_pattern": PATTERN, "num_attention_heads": 32, "num_key_value_heads": 2,
    "head_dim": 128, "mamba_num_heads": 64, "mamba_head_dim": 64, "ssm_state_size": 128,
    "n_groups": 8, "conv_kernel": 4, "expand": 2, "n_routed_experts": 128, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712, "mlp_hidden_act": "relu2",
    "max_position_embeddings": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
# the same model with its blocks named in a list (transformers' newer spelling)
_NAMES = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
NEMOTRON_LIST = {k: v for k, v in NEMOTRON_NANO.items() if k != "hybrid_override_pattern"} | {
    "layers_block_type": [_NAMES[c] for c in PATTERN]}
GRANITE_H_SMALL = {  # ibm-granite/granite-4.0-h-small: 32B total, 9B active
    "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid",
    "hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 100352, "num_local_experts": 72,
    "num_experts_per_tok": 10, "intermediate_size": 768, "shared_intermediate_size": 1536,
    "layer_types": (["mamba"] * 9 + ["attention"]) * 4, "mamba_n_heads": 128,
    "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_conv_bias": True, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

# One Mamba2 mixer of Nemotron-3 Nano by hand (vLLM's MambaMixer2): in_proj 2688 x (4096 z +
# 6144 xBC + 64 dt), conv 6144 x 4 + bias 6144, A/D/dt_bias 3 x 64, norm 4096, out_proj 4096 x 2688
NANO_MAMBA = 2688 * (4096 + 6144 + 64) + 6144 * 4 + 6144 + 3 * 64 + 4096 + 4096 * 2688
NANO_ATTENTION = 2688 * 32 * 128 + 2 * 2688 * 2 * 128 + 32 * 128 * 2688  # q, k, v, o


@pytest.mark.parametrize("config", [NEMOTRON_NANO, NEMOTRON_LIST], ids=["pattern", "list"])
def test_nemotron_h_blocks_are_counted_as_vllm_builds_them(config):
    m = model_from_hf_config(config)
    # one cost-model layer per FFN block (23 E), 6 of them with a KV cache
    assert (m.num_layers, m.num_moe_layers, m.num_kv_layers) == (23, 23, 6)
    assert (m.num_experts, m.experts_per_token, m.num_shared_experts) == (128, 6, 1)
    assert not m.gated_ffn  # relu2: up and down projections only
    assert expert_params(m) == 2 * 2688 * 1856
    assert kv_bytes_per_token(m) == 6 * 2 * 2 * 128 * 2  # 6 layers x (K + V) x 2 heads x 128 x bf16
    assert total_params(m) / 1e9 == pytest.approx(31.6, rel=0.01)
    assert active_params(m) / 1e9 == pytest.approx(3.6, rel=0.03)


def test_every_mixers_weights_are_read_each_step():
    """A decode step reads every mixer's weights once: 6 attention and 23 Mamba2 blocks."""
    m = model_from_hf_config(NEMOTRON_NANO)
    hw = load_hardware_preset("h200")
    step = step_time(m, hw, Partition(), 1, 1000)
    assert step.hbm_bytes["projections"] == pytest.approx(
        2 * (6 * NANO_ATTENTION + 23 * NANO_MAMBA), rel=1e-9)
    # the 6 attention layers' KV of 1000 tokens, and the 23 Mamba2 mixers' state read whole
    assert step.hbm_bytes["kv"] == 6144 * 1000 + 23 * NANO_STATE
    assert memory_breakdown(m, hw, Partition(), 4096).kv_bytes_per_token == 6144


# One Mamba2 mixer's state per sequence, by hand (vLLM's MambaStateShapeCalculator): the conv
# over xBC (4096 + 2 x 8 groups x 128 = 6144 channels) keeps kernel - 1 = 3 columns in bf16;
# the SSM state is 64 heads x 64 x 128 in float32, vLLM's default for nemotron_h
NANO_STATE = 6144 * 3 * 2 + 64 * 64 * 128 * 4


def test_the_recurrent_state_is_read_once_a_sequence_a_step_and_takes_cache_room():
    """Every running sequence's state is read each step whatever its context; it is split over
    TP by heads (not by KV heads: Nemotron's 2 KV heads are replicated at TP 8); it is taken
    from the KV pool, so fewer sequences fit."""
    m = model_from_hf_config(NEMOTRON_NANO)
    assert m.recurrent_state_bytes == 23 * NANO_STATE
    hw = load_hardware_preset("h200")
    one, eight = (step_time(m, hw, Partition(), b, 1000).hbm_bytes["kv"] for b in (1, 8))
    assert eight == pytest.approx(8 * one)
    short = step_time(m, hw, Partition(), 1, 10).hbm_bytes["kv"]
    assert one - short == pytest.approx(6144 * 990)  # the state does not grow with the context
    tp8 = step_time(m, hw, Partition(tp=8), 1, 1000).hbm_bytes["kv"]
    assert tp8 == pytest.approx(6144 * 1000 / 2 + 23 * NANO_STATE / 8)
    ssm = model_from_hf_config({**NEMOTRON_NANO, "mamba_ssm_cache_dtype": "bfloat16"})
    assert ssm.recurrent_state_bytes == 23 * (6144 * 3 * 2 + 64 * 64 * 128 * 2)
    stateless = dataclasses.replace(m, recurrent_state_bytes=0)
    assert max_batch(m, hw, Partition(), 4096) < max_batch(stateless, hw, Partition(), 4096)


def test_granite_hybrid_mamba_mixers_match_the_model_card():
    m = model_from_hf_config(GRANITE_H_SMALL)
    assert (m.num_layers, m.num_moe_layers, m.num_recurrent_layers) == (40, 40, 36)
    assert total_params(m) / 1e9 == pytest.approx(32.0, rel=0.03)
    assert active_params(m) / 1e9 == pytest.approx(9.0, rel=0.05)


def test_mixer_shape_keys_that_are_not_numbers_fall_back_to_attention_sized_mixers():
    """transformers writes mamba_d_head "auto"; the inner width then comes from mamba_expand.
    Without any Mamba shape the mixers are costed as attention layers, never refused."""
    auto = model_from_hf_config({**GRANITE_H_SMALL, "mamba_d_head": "auto"})
    assert auto.recurrent_mixer_params == model_from_hf_config(GRANITE_H_SMALL).recurrent_mixer_params
    bare = {k: v for k, v in GRANITE_H_SMALL.items() if not k.startswith("mamba_")}
    assert model_from_hf_config(bare).recurrent_mixer_params == 0


def test_latent_moe_experts_are_sized_at_the_latent_width():
    """nemotron_h's latent MoE (moe_latent_size): routed experts multiply at the latent width,
    so each holds 2 x latent x moe_intermediate_size weights, not 2 x hidden x ..."""
    m = model_from_hf_config({**NEMOTRON_NANO, "moe_latent_size": 1024})
    assert expert_params(m) == pytest.approx(2 * 1024 * 1856, rel=1e-3)


@pytest.mark.parametrize(("pattern", "match"), [
    ("MEMEX", r"hybrid_override_pattern: has unknown blocks \['X'\]"),
    ("MEMEME", "hybrid_override_pattern: has no attention block"),
    ("M*E**", "hybrid_override_pattern: has 3 attention blocks but 1 FFN blocks"),
    ("", "hybrid_override_pattern: must be a non-empty string"),
])
def test_bad_patterns_name_the_key(pattern, match):
    with pytest.raises(SpecError, match=match):
        model_from_hf_config({**NEMOTRON_NANO, "hybrid_override_pattern": pattern})


def test_a_plain_layer_list_of_mixers_is_not_read_as_blocks():
    """Granite's older `layers_block_type` names only mixers: every layer still has its MoE."""
    cfg = {k: v for k, v in GRANITE_H_SMALL.items() if k != "layer_types"}
    m = model_from_hf_config({**cfg, "layers_block_type": GRANITE_H_SMALL["layer_types"]})
    assert (m.num_layers, m.num_moe_layers, m.num_recurrent_layers) == (40, 40, 36)


QWEN3_NEXT_GDN = {  # Qwen/Qwen3-Next-80B-A3B-Instruct with its Gated DeltaNet shape keys
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 2048,
    "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
    "vocab_size": 151936, "intermediate_size": 5120, "num_experts": 512,
    "num_experts_per_tok": 10, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 12,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "torch_dtype": "bfloat16",
}
# One Gated DeltaNet mixer by hand (vLLM's GDN layer; key 16 x 128 = 2048, value 32 x 128 = 4096):
# in_proj_qkvz 2048 x (2 x 2048 + 2 x 4096), in_proj_ba 2048 x 2 x 32, conv (2 x 2048 + 4096) x 4,
# dt_bias and A_log 2 x 32, norm 128, out_proj 4096 x 2048
QWEN3_NEXT_GDN_PARAMS = (2048 * 12288 + 2048 * 64 + 8192 * 4 + 64 + 128 + 4096 * 2048)


def test_gated_deltanet_mixers_are_costed_by_their_weights():
    from moe_reuse.predictor.sizes import attention_params_per_layer

    m = model_from_hf_config(QWEN3_NEXT_GDN)
    assert (m.num_recurrent_layers, m.num_kv_layers) == (36, 12)
    assert m.recurrent_mixer_params == 36 * QWEN3_NEXT_GDN_PARAMS
    # vLLM's Qwen3NextAttention: q_proj emits the query and a per-head output gate
    assert attention_params_per_layer(m) == (2048 * 16 * 256 * 2 + 2 * 2048 * 2 * 256
                                             + 16 * 256 * 2048)
    # per sequence and mixer: the conv over q, k, v (2 x 2048 + 4096) keeps 3 columns, the
    # state is 32 value heads x 128 x 128, both bf16 (vLLM's GDN cache)
    assert m.recurrent_state_bytes == 36 * (8192 * 3 + 32 * 128 * 128) * 2
    off = model_from_hf_config({**QWEN3_NEXT_GDN, "attn_output_gate": False})
    assert attention_params_per_layer(off) == 2048 * 16 * 256 * 2 + 2 * 2048 * 2 * 256
    assert total_params(m) / 1e9 == pytest.approx(80.0, rel=0.02)


def test_jamba_mamba1_state():
    """ai21labs/AI21-Jamba-Mini-1.5's shape: Mamba1 mixers (no heads) in 28 of 32 layers, each
    request holding a conv of 2 x 4096 channels x 3 columns and an SSM state of 8192 x 16, bf16
    (vLLM's mamba1_state_shape)."""
    jamba = {
        "architectures": ["JambaForCausalLM"], "model_type": "jamba", "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 65536, "intermediate_size": 14336, "num_experts": 16,
        "num_experts_per_tok": 2, "expert_layer_period": 2, "expert_layer_offset": 1,
        "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4,
        "mamba_expand": 2, "mamba_dt_rank": 256, "torch_dtype": "bfloat16",
    }
    m = model_from_hf_config(jamba)
    assert (m.num_recurrent_layers, m.num_kv_layers) == (28, 4)
    assert m.recurrent_state_bytes == 28 * (8192 * 3 + 8192 * 16) * 2


def test_the_qwen3_next_preset_is_its_config_json():
    """The bundled preset is what model_from_hf_config makes of the model's config.json, so the
    data file cannot drift from the rules (its recurrent state included)."""
    from moe_reuse.predictor import load_model_preset

    preset = load_model_preset("qwen3-next-80b-a3b")
    assert preset == model_from_hf_config({**QWEN3_NEXT_GDN, "max_position_embeddings": 262144},
                                          name="qwen3-next-80b-a3b")
    assert preset.recurrent_state_bytes == 39518208  # 37.7 MiB a sequence


LFM2_MOE = {  # shaped after LiquidAI/LFM2-8B-A1B: 18 short-conv and 6 attention layers
    "architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "hidden_size": 2048,
    "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 65536, "intermediate_size": 7168, "moe_intermediate_size": 1792,
    "num_experts": 32, "num_experts_per_tok": 4, "num_dense_layers": 2, "conv_L_cache": 3,
    "conv_bias": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "layer_types": (["conv", "conv", "full_attention", "conv"] * 6),
}


def test_lfm2_short_conv_mixers_and_state():
    """vLLM's ShortConv at width hidden: in_proj to 3 x hidden, a 3-tap depthwise conv, out_proj
    (4 h^2 + 3 h weights, no biases), and a conv state of L_cache - 1 = 2 columns of hidden a
    sequence, in the model's dtype (short_conv_state_shape / _dtype). They were costed as
    attention (3 h^2 here) with no state."""
    m = model_from_hf_config(LFM2_MOE)
    h = 2048
    assert (m.num_recurrent_layers, m.num_kv_layers) == (18, 6)
    assert m.recurrent_mixer_params == 18 * (4 * h * h + 3 * h)
    assert m.recurrent_state_bytes == 18 * h * 2 * 2
    biased = model_from_hf_config({**LFM2_MOE, "conv_bias": True})
    assert biased.recurrent_mixer_params - m.recurrent_mixer_params == 18 * 5 * h
    assert active_params(m) / 1e9 == pytest.approx(1.5, rel=0.12)  # the card: 1.5B active


SMALL_MOE = {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000, "intermediate_size": 512,
             "moe_intermediate_size": 128, "num_experts": 16, "num_experts_per_tok": 2}


@pytest.mark.parametrize(("extra", "linear"), [
    ({"layer_group_size": 4}, 6),  # bailing_moe_linear: layers 3 and 7 close their groups
    ({"attn_type_list": [0, 1] * 4}, 4),  # minimax: 0 = lightning attention
])
def test_linear_attention_keeps_a_head_dim_squared_state_per_head(extra, linear):
    """linear_attention_state_shape: heads x head_dim x head_dim a sequence a layer, in the
    model's dtype, and no KV cache on those layers (4 heads of 64)."""
    m = model_from_hf_config({**SMALL_MOE, **extra, "torch_dtype": "bfloat16"})
    assert (m.num_recurrent_layers, m.num_kv_layers) == (linear, 8 - linear)
    assert m.recurrent_state_bytes == linear * 4 * 64 * 64 * 2
    assert m.recurrent_mixer_params == 0  # projections as attention's
