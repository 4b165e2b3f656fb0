"""A Hugging Face `config.json` (already parsed) to a ModelSpec.

The plugin calls this on the model vLLM serves, so it reads the keys the families actually
use rather than transformers' defaults: MLA and shared experts with leading dense layers
(deepseek_v2/v3, glm4_moe, bailing, dots1), decoder_sparse_step and mlp_only_layers
(qwen2_moe/qwen3_moe), interleaved MoE layers and text_config nesting (llama4), sliding-window
layer types (gpt_oss), the MoE-layer rules of ernie4_5_moe (start, end, interval), afmoe and
lfm2_moe (leading dense layers), exaone_moe (`mlp_layer_types`), step3 (`moe_layers_enum`) and
jamba (expert layer period), per-layer lists (hunyuan), dbrx's nested `ffn_config`, the
one-block-per-layer hybrids (nemotron_h's `hybrid_override_pattern`), and plain dense configs
(llama, qwen2, qwen3), which become `num_experts == 0`. Every family's layer rule is the one
vLLM's model file applies; the rules live in `hf_layers`, this module sizes the layers. Pure:
no file access.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import SpecError
from .hf_layers import (
    SOURCE,
    block_layers,
    blocks_of,
    first_int,
    get_key,
    int_key,
    moe_layer_count,
    recurrent_layers,
    recurrent_mixer_params,
    recurrent_state_elements,
    sliding_layers,
)
from .specs import DTYPE_BYTES, ModelSpec, normalize_dtype

_GATED_ATTENTION_FAMILIES = ("qwen3_next", "qwen3_5")
"""Families whose attention gates its output per head (q_proj twice as wide; vLLM's
Qwen3NextAttention, `attn_output_gate`, on unless the config turns it off)."""

_UNGATED_FAMILIES = ("nemotron_h",)
"""Families whose MLPs and experts have no gate (up and down only: nemotron_h's relu2)."""


def _flatten_dbrx(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """dbrx's config.json: experts in `ffn_config`, KV heads in `attn_config`, `max_seq_len`."""
    ffn, attn = cfg["ffn_config"], cfg.get("attn_config")
    out = {**cfg}
    for key, src in (("moe_num_experts", "moe_num_experts"), ("moe_top_k", "moe_top_k"),
                     ("moe_intermediate_size", "ffn_hidden_size")):
        if ffn.get(src) is not None:
            out.setdefault(key, ffn[src])
    if isinstance(attn, Mapping) and attn.get("kv_n_heads") is not None:
        out.setdefault("num_key_value_heads", attn["kv_n_heads"])
    if cfg.get("max_seq_len") is not None:
        out.setdefault("max_position_embeddings", cfg["max_seq_len"])
    return out


def _dtypes(
    cfg: Mapping[str, Any], weight_dtype: str | None, kv_dtype: str | None
) -> tuple[str, str, str, str]:
    """(weight, expert weight, kv, activation) dtypes: overrides, else quantization_config/torch_dtype."""
    act = normalize_dtype(
        str(get_key(cfg, "torch_dtype", "dtype") or "bf16"), f"{SOURCE} torch_dtype"
    )
    if act not in ("bf16", "fp16", "fp32"):
        act = "bf16"
    weight, expert = act, ""
    quant = cfg.get("quantization_config")
    if isinstance(quant, Mapping):
        method = str(quant.get("quant_method", "")).lower()
        if method == "fp8" or "fp8" in str(quant.get("fmt", "")).lower():
            weight = "fp8"
        elif method == "mxfp4":
            expert = "mxfp4"
        elif quant.get("bits") in (4, 8):
            weight = "int4" if quant.get("bits") == 4 else "int8"
    if weight_dtype:
        weight, expert = normalize_dtype(weight_dtype, "weight_dtype"), ""
    kv = normalize_dtype(kv_dtype, "kv_dtype") if kv_dtype else act
    return weight, expert or weight, kv, act


def _ssm_state_dtype(cfg: Mapping[str, Any], model_type: str, act: str) -> str:
    """The SSM state's dtype as vLLM picks it with `--mamba-ssm-cache-dtype auto`: the config's
    own (nemotron_h `mamba_ssm_cache_dtype`, float32 where absent; Qwen3.5 `mamba_ssm_dtype`),
    else the model's dtype, as the convolution state always is."""
    given = cfg.get("mamba_ssm_cache_dtype") or cfg.get("mamba_ssm_dtype")
    if not given and model_type.startswith("nemotron_h"):
        given = "float32"
    try:
        return normalize_dtype(str(given), f"{SOURCE} mamba_ssm_cache_dtype") if given else act
    except SpecError:
        return act


def model_from_hf_config(
    config: Mapping[str, Any],
    *,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
    name: str | None = None,
) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json; errors name the missing or bad key."""
    if not isinstance(config, Mapping):
        raise SpecError(SOURCE, f"must be a JSON object, got {type(config).__name__}")
    cfg: Mapping[str, Any] = config
    if isinstance(config.get("text_config"), Mapping):  # llama4 and other multimodal wrappers
        cfg = {**config["text_config"]}
        for key in ("quantization_config", "torch_dtype", "tie_word_embeddings"):
            if key in config and key not in cfg:
                cfg[key] = config[key]  # type: ignore[index]
    if isinstance(cfg.get("ffn_config"), Mapping):  # dbrx nests its MoE and attention keys
        cfg = _flatten_dbrx(cfg)
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    hidden = int_key(cfg, "hidden_size", "d_model", "n_embd", required=True)
    layers = int_key(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers", required=True)
    heads = int_key(cfg, "num_attention_heads", "n_head", "n_heads", required=True)
    vocab = int_key(cfg, "vocab_size", required=True)
    kv_heads = int_key(cfg, "num_key_value_heads", default=heads) or heads
    experts = first_int(cfg, "n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
    top_k = first_int(
        cfg, "num_experts_per_tok", "experts_per_token", "moe_top_k", "num_experts_per_token",
        "moe_k", "moe_topk",
    )
    if experts and not top_k:
        raise SpecError(
            f"{SOURCE} num_experts_per_tok",
            "is missing for an MoE config",
            "add the router's top-k",
        )
    if experts and top_k > experts:
        raise SpecError(
            f"{SOURCE} num_experts_per_tok", f"top-k {top_k} exceeds the {experts} experts"
        )
    moe_layers = moe_layer_count(cfg, layers, experts)
    blocks = blocks_of(cfg)
    recurrent = recurrent_layers(cfg, layers)
    mixers = recurrent * recurrent_mixer_params(cfg, hidden)
    if blocks is not None:
        layers, moe_layers, recurrent = block_layers(blocks, experts > 0)
        mixers = blocks["mamba"] * recurrent_mixer_params(cfg, hidden)
        recurrent_mixers = blocks["mamba"]
    else:
        recurrent_mixers = recurrent
    is_llama4 = model_type.startswith("llama4")
    if experts:
        moe_inter = first_int(cfg, "moe_intermediate_size", "intermediate_size")
        if moe_inter <= 0:
            raise SpecError(f"{SOURCE} moe_intermediate_size", "is missing",
                            "the predictor needs each expert's width")
        latent = int_key(cfg, "moe_latent_size")
        if latent:  # nemotron_h latent MoE: routed experts work at moe_latent_size, not hidden
            moe_inter = max(1, round(moe_inter * latent / hidden))  # the same weights and flops
        dense_inter = (
            int_key(cfg, "intermediate_size_mlp") if is_llama4 else int_key(cfg, "intermediate_size")
        )
    else:
        moe_inter, dense_inter = (
            0,
            int_key(cfg, "intermediate_size", "ffn_dim", "n_inner", required=True),
        )
    if layers - moe_layers > 0 and dense_inter <= 0:
        raise SpecError(
            f"{SOURCE} intermediate_size",
            f"is missing but {layers - moe_layers} layers have a dense FFN",
        )
    shared, shared_inter = 0, 0
    if experts:
        n_shared = first_int(cfg, "n_shared_experts", "num_shared_experts", "moe_num_shared_experts",
                              "num_shared_expert")
        one_shared = int_key(cfg, "shared_expert_intermediate_size", "shared_intermediate_size",
                          "share_expert_dim")
        if n_shared:  # n shared experts, each as wide as a routed one unless the config says
            shared = n_shared
            shared_inter = int_key(cfg, "moe_shared_expert_intermediate_size") or moe_inter
        elif one_shared:
            shared, shared_inter = 1, one_shared
        elif is_llama4:
            shared, shared_inter = 1, moe_inter
    mla = cfg.get("kv_lora_rank") is not None
    if mla:
        nope = int_key(cfg, "qk_nope_head_dim", required=True)
        rope = int_key(cfg, "qk_rope_head_dim", required=True)
        attention: dict[str, Any] = {
            "attention_kind": "mla",
            "num_kv_heads": heads,
            "head_dim": nope + rope,
            "q_lora_rank": int_key(cfg, "q_lora_rank"),
            "kv_lora_rank": int_key(cfg, "kv_lora_rank"),
            "qk_nope_head_dim": nope,
            "qk_rope_head_dim": rope,
            "v_head_dim": int_key(cfg, "v_head_dim", required=True),
        }
    else:
        head_dim = int_key(cfg, "head_dim") or hidden // heads
        kind = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
        attention = {"attention_kind": kind, "num_kv_heads": kv_heads, "head_dim": head_dim,
                     "attention_output_gate": model_type.startswith(_GATED_ATTENTION_FAMILIES)
                     and bool(cfg.get("attn_output_gate", True))}
    window, window_layers = sliding_layers(cfg, model_type, layers)
    weight, expert, kv, act = _dtypes(cfg, weight_dtype, kv_dtype)
    plain, ssm = recurrent_state_elements(cfg, hidden)  # model dtype; SSM state dtype
    state_bytes = recurrent_mixers * round(
        plain * DTYPE_BYTES[act] + ssm * DTYPE_BYTES[_ssm_state_dtype(cfg, model_type, act)])
    return ModelSpec(
        name=name
        or str(cfg.get("_name_or_path") or config.get("_name_or_path") or model_type or "hf-model"),
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        vocab_size=vocab,
        intermediate_size=dense_inter if layers - moe_layers > 0 else max(dense_inter, 0),
        num_experts=experts if moe_layers else 0,
        experts_per_token=top_k if moe_layers else 0,
        moe_intermediate_size=moe_inter if moe_layers else 0,
        num_moe_layers=moe_layers,
        num_shared_experts=shared,
        shared_expert_intermediate_size=shared_inter,
        sliding_window_tokens=window,
        num_sliding_window_layers=window_layers,
        num_recurrent_layers=recurrent,
        recurrent_mixer_params=mixers,
        recurrent_state_bytes=state_bytes,
        gated_ffn=not model_type.startswith(_UNGATED_FAMILIES),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_dtype=weight,
        expert_weight_dtype=expert,
        kv_dtype=kv,
        activation_dtype=act,
        max_context_tokens=int(cfg.get("max_position_embeddings") or 0),
        **attention,
    )
