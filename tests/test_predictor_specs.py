"""Spec loading and validation, and Hugging Face config.json round trips for every family.

Config values below are the published config.json fields of each model; expected totals are the
model cards' parameter counts (tolerance 2%). Errors must name the offending field.
"""

from __future__ import annotations

import json

import pytest

from moe_reuse.predictor import (
    DEFAULT_ACCOUNTING,
    PAPER_ACCOUNTING,
    Accounting,
    HardwareSpec,
    ModelSpec,
    SpecError,
    hardware_from_dict,
    list_hardware_presets,
    list_model_presets,
    load_hardware_file,
    load_hardware_preset,
    load_model_preset,
    model_from_hf_config,
    resolve_model,
    total_params,
)
from moe_reuse.predictor.sizes import active_params

MODEL_PRESETS = [
    "deepseek-v3",
    "gpt-oss-120b",
    "grok-1",
    "mixtral-8x22b",
    "mixtral-8x7b",
    "qwen3-235b-a22b",
    "qwen3-30b-a3b",
    "qwen3-next-80b-a3b",
    "switch-c-2048",
]
HW_PRESETS = ["b200", "h100-sxm", "h200", "mi300x", "paper-reference"]


def test_preset_lists():
    assert list_model_presets() == MODEL_PRESETS
    assert list_hardware_presets() == HW_PRESETS


def test_paper_reference_units_converted_once():
    """Table 2 of the paper in SI units: 180 GB, 8.0 TB/s, 4.5/2.25 PFLOP/s, 900 GB/s."""
    hw = load_hardware_preset("paper-reference")
    assert hw.hbm_capacity_bytes == 180e9
    assert hw.hbm_bandwidth_bytes_per_second == 8.0e12
    assert hw.peak_flops_per_second["fp8"] == 4.5e15
    assert hw.peak_flops_per_second["bf16"] == 2.25e15
    assert hw.intra_node_bandwidth_bytes_per_second == 900e9
    assert hw.expert_bytes_per_second == hw.hbm_bytes_per_second


def test_hardware_file_and_expert_path(tmp_path):
    """A user file in human units; expert_path_bandwidth describes a slower fused-MoE path (CPU)."""
    path = tmp_path / "cpu.json"
    path.write_text(
        json.dumps(
            {
                "name": "cpu",
                "hbm_capacity_gib": 16,
                "hbm_bandwidth_gb_per_s": 40,
                "peak_tflops": {"bf16": 1.5},
                "intra_node_bandwidth_gb_per_s": 20,
                "gpus_per_node": 1,
                "hbm_efficiency_ratio": 0.5,
                "expert_path_bandwidth_gb_per_s": 10,
            }
        )
    )
    hw = load_hardware_file(path)
    assert hw.hbm_capacity_bytes == 16 * 2**30
    assert hw.hbm_bytes_per_second == 20e9
    assert hw.expert_bytes_per_second == 5e9
    assert hw.inter_node_bandwidth_bytes_per_second == 20e9  # defaults to the intra-node fabric


@pytest.mark.parametrize(
    "data, field",
    [
        ({"hbm_capacity_gb": -1}, "hbm_capacity_bytes"),
        ({"hbm_capacity_gb": 80, "hbm_capacity_bytes": 80e9}, "hbm_capacity_bytes"),
        ({"hbm_capcity_gb": 80}, "hbm_capcity_gb"),
        ({"peak_tflops": {"fp9": 1}}, "peak_flops_per_second.fp9"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
        ({"hbm_efficiency_ratio": 1.5}, "hbm_efficiency_ratio"),
    ],
)
def test_bad_hardware_names_field(data, field):
    base = {
        "hbm_capacity_gb": 80,
        "hbm_bandwidth_tb_per_s": 3.35,
        "peak_tflops": {"bf16": 989},
        "intra_node_bandwidth_gb_per_s": 450,
        "gpus_per_node": 8,
    }
    base.update(data)
    if "hbm_capacity_bytes" in data and "hbm_capacity_gb" in data:
        base["hbm_capacity_gb"] = 80
    with pytest.raises(SpecError) as err:
        hardware_from_dict(base)
    assert err.value.field.startswith(field.split(".")[0]) or field in str(err.value)


def test_missing_hardware_field_named():
    with pytest.raises(SpecError, match="hbm_bandwidth_bytes_per_second"):
        hardware_from_dict(
            {
                "hbm_capacity_gb": 80,
                "peak_tflops": {"bf16": 1},
                "intra_node_bandwidth_gb_per_s": 1,
                "gpus_per_node": 8,
            }
        )


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"experts_per_token": 300}, "experts_per_token"),
        ({"hidden_size": -7168}, "hidden_size"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"weight_dtype": "fp7"}, "weight_dtype"),
        ({"num_moe_layers": 70}, "num_moe_layers"),
        ({"attention_kind": "sparse"}, "attention_kind"),
    ],
)
def test_bad_model_names_field(changes, field):
    base = load_model_preset("deepseek-v3").to_dict()
    base.update(changes)
    with pytest.raises(SpecError) as err:
        ModelSpec(**base)
    assert err.value.field == field


def test_unknown_presets_listed_in_error():
    with pytest.raises(SpecError, match="deepseek-v3") as err:
        load_model_preset("deepseek-v4")
    assert err.value.field == "model"
    with pytest.raises(SpecError, match="paper-reference"):
        load_hardware_preset("tpu-v9")


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"cost_scope": "ffn"}, "cost_scope"),
        ({"ffn_shard_scope": "rack"}, "ffn_shard_scope"),
        ({"usable_hbm_ratio": 0.0}, "usable_hbm_ratio"),
        ({"ffn_overlap_ratio": 1.5}, "ffn_overlap_ratio"),
    ],
)
def test_bad_accounting_names_field(changes, field):
    with pytest.raises(SpecError, match=field):
        Accounting(**changes)


def test_default_profile_is_vllm_and_paper_profile_is_the_papers():
    """The default describes a vLLM deployment (gpu_memory_utilization 0.9, profile-run
    activations, CUDA graphs, comm buffers, 16-token blocks, MLA latent cache replicated over
    TP, physical step); the paper profile carries the paper's accounting (0.42, latent split,
    its Table 5 timing terms)."""
    from moe_reuse.predictor import PROFILES

    assert PROFILES["vllm"] is DEFAULT_ACCOUNTING and PROFILES["paper"] is PAPER_ACCOUNTING
    d, p = DEFAULT_ACCOUNTING, PAPER_ACCOUNTING
    assert (d.usable_hbm_ratio, d.cost_scope, d.mla_kv_sharding, d.kv_block_tokens) == (
        0.9,
        "full",
        "replicated",
        16,
    )
    assert d.activation_tokens == 8192 and d.cuda_graph_bytes > 0 and d.comm_buffer_bytes > 0
    assert (p.usable_hbm_ratio, p.cost_scope, p.mla_kv_sharding) == (0.42, "paper", "latent")
    assert p.activation_tokens == 0 and p.cuda_graph_bytes == 0 and p.kv_block_tokens == 1

def test_hardware_spec_in_code_is_checked():
    with pytest.raises(SpecError, match="intra_node_bandwidth_bytes_per_second"):
        HardwareSpec("x", 1e9, 1e9, {"bf16": 1e12}, 0.0, 0.0, 1e9, 0.0, 8)


# Published config.json fields (trimmed to what the predictor reads, plus some it must ignore).
HF_CONFIGS = {
    "deepseek_v3": (
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "hidden_size": 7168,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 61,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
            "n_shared_experts": 1,
            "n_routed_experts": 256,
            "num_experts_per_tok": 8,
            "first_k_dense_replace": 3,
            "moe_layer_freq": 1,
            "kv_lora_rank": 512,
            "q_lora_rank": 1536,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "vocab_size": 129280,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": False,
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": [128, 128],
            },
        },
        671e9,
        37e9,
    ),
    "deepseek_v2_lite": (
        {
            "model_type": "deepseek_v2",
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "n_shared_experts": 2,
            "n_routed_experts": 64,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "kv_lora_rank": 512,
            "q_lora_rank": None,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "vocab_size": 102400,
            "torch_dtype": "bfloat16",
        },
        15.7e9,
        2.66e9,
    ),  # card: 2.4B w/o embeddings
    "qwen3_moe": (
        {
            "model_type": "qwen3_moe",
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_hidden_layers": 48,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "vocab_size": 151936,
            "use_sliding_window": False,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        30.5e9,
        3.3e9,
    ),
    "qwen2_moe": (
        {
            "model_type": "qwen2_moe",
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "decoder_sparse_step": 1,
            "vocab_size": 151936,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "torch_dtype": "bfloat16",
        },
        14.3e9,
        2.7e9,
    ),
    "mixtral": (
        {
            "model_type": "mixtral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 32000,
            "sliding_window": None,
            "torch_dtype": "bfloat16",
        },
        46.7e9,
        12.9e9,
    ),
    "olmoe": (
        {
            "model_type": "olmoe",
            "hidden_size": 2048,
            "intermediate_size": 1024,
            "num_hidden_layers": 16,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "vocab_size": 50304,
            "torch_dtype": "bfloat16",
        },
        6.9e9,
        1.3e9,
    ),
    "llama4_scout": (
        {
            "model_type": "llama4",
            "architectures": ["Llama4ForConditionalGeneration"],
            "torch_dtype": "bfloat16",
            "text_config": {
                "model_type": "llama4_text",
                "hidden_size": 5120,
                "intermediate_size": 8192,
                "intermediate_size_mlp": 16384,
                "num_hidden_layers": 48,
                "num_attention_heads": 40,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "num_local_experts": 16,
                "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 1,
                "vocab_size": 202048,
                "attention_chunk_size": 8192,
            },
        },
        107.8e9,
        17.2e9,
    ),
    "llama4_maverick": (
        {
            "model_type": "llama4",
            "text_config": {
                "model_type": "llama4_text",
                "hidden_size": 5120,
                "intermediate_size": 8192,
                "intermediate_size_mlp": 16384,
                "num_hidden_layers": 48,
                "num_attention_heads": 40,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "num_local_experts": 128,
                "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 2,
                "vocab_size": 202048,
            },
        },
        398e9,
        17.2e9,
    ),
    "gpt_oss": (
        {
            "model_type": "gpt_oss",
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_hidden_layers": 36,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "num_local_experts": 128,
            "num_experts_per_tok": 4,
            "experts_per_token": 4,
            "vocab_size": 201088,
            "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"] * 18,
            "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "mxfp4"},
        },
        116.8e9,
        5.7e9,
    ),  # card: 5.1B without embeddings
    "llama_dense": (
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        8.03e9,
        8.03e9,
    ),
    "qwen2_dense": (
        {
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "use_sliding_window": False,
            "torch_dtype": "bfloat16",
        },
        7.6e9,
        7.6e9,
    ),
    "qwen3_dense": (
        {
            "model_type": "qwen3",
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 151936,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        },
        8.2e9,
        8.2e9,
    ),
}


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_hf_config_round_trip(family, tmp_path):
    """config.json -> file -> --model path -> ModelSpec: totals and actives within 2-4% of the cards."""
    config, total, active = HF_CONFIGS[family]
    path = tmp_path / family / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    model = resolve_model(str(path))
    assert model == model_from_hf_config(config, name=family)
    assert total_params(model) == pytest.approx(total, rel=0.02)
    assert active_params(model) == pytest.approx(active, rel=0.04)
    assert model.is_moe == ("dense" not in family)


def test_hf_config_family_details():
    """MLA, shared experts, leading dense layers, interleaving, windows and dtypes are read."""
    ds = model_from_hf_config(HF_CONFIGS["deepseek_v3"][0])
    assert (ds.attention_kind, ds.kv_lora_rank, ds.num_moe_layers, ds.num_shared_experts) == (
        "mla",
        512,
        58,
        1,
    )
    assert ds.weight_dtype == "fp8" and ds.kv_dtype == "bf16"
    blank = {"name": "", "max_context_tokens": 0}  # the test config carries no context window
    assert ds.to_dict() | blank == load_model_preset("deepseek-v3").to_dict() | blank
    mav = model_from_hf_config(HF_CONFIGS["llama4_maverick"][0])
    assert (
        mav.num_moe_layers == 24 and mav.intermediate_size == 16384 and mav.num_shared_experts == 1
    )
    oss = model_from_hf_config(HF_CONFIGS["gpt_oss"][0])
    assert (oss.num_sliding_window_layers, oss.sliding_window_tokens, oss.expert_weight_dtype) == (
        18,
        128,
        "mxfp4",
    )
    qwen2 = model_from_hf_config(HF_CONFIGS["qwen2_moe"][0])
    assert (
        qwen2.num_shared_experts,
        qwen2.shared_intermediate,
        qwen2.num_sliding_window_layers,
    ) == (1, 5632, 0)
    assert (
        model_from_hf_config(
            HF_CONFIGS["llama_dense"][0], weight_dtype="fp8", kv_dtype="fp8"
        ).kv_dtype
        == "fp8"
    )
    lite = model_from_hf_config(HF_CONFIGS["deepseek_v2_lite"][0])
    assert lite.q_lora_rank == 0 and lite.num_moe_layers == 26 and lite.num_shared_experts == 2


@pytest.mark.parametrize(
    "drop, field",
    [
        ("hidden_size", "config.json hidden_size"),
        ("num_hidden_layers", "config.json num_hidden_layers"),
        ("num_experts_per_tok", "config.json num_experts_per_tok"),
        ("v_head_dim", "config.json v_head_dim"),
    ],
)
def test_hf_config_missing_field_named(drop, field):
    config = dict(HF_CONFIGS["deepseek_v3"][0])
    del config[drop]
    with pytest.raises(SpecError) as err:
        model_from_hf_config(config)
    assert err.value.field == field


def test_hf_config_k_above_e():
    config = dict(HF_CONFIGS["mixtral"][0], num_experts_per_tok=9)
    with pytest.raises(SpecError, match="num_experts_per_tok"):
        model_from_hf_config(config)
