"""A Hugging Face `config.json` (already parsed) to a ModelSpec.

The plugin calls this on the model vLLM serves, so it reads the keys the families actually
use rather than transformers' defaults: MLA and shared experts with leading dense layers
(deepseek_v2/v3, glm4_moe, bailing, dots1), decoder_sparse_step and mlp_only_layers
(qwen2_moe/qwen3_moe), interleaved MoE layers and text_config nesting (llama4), sliding-window
layer types (gpt_oss), the MoE-layer rules of ernie4_5_moe (start, end, interval), afmoe and
lfm2_moe (leading dense layers), exaone_moe (`mlp_layer_types`), step3 (`moe_layers_enum`) and
jamba (expert layer period), per-layer lists (hunyuan), dbrx's nested `ffn_config`, and plain
dense configs (llama, qwen2, qwen3), which become `num_experts == 0`. Every family's layer rule
is the one vLLM's model file applies. Pure: no file access.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import SpecError
from .specs import ModelSpec, normalize_dtype

_SOURCE = "config.json"


def _get(cfg: Mapping[str, Any], *keys: str) -> Any:
    """The first key present with a non-null value."""
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


def _int(cfg: Mapping[str, Any], *keys: str, required: bool = False, default: int = 0) -> int:
    value = _get(cfg, *keys)
    if value is None:
        if required:
            raise SpecError(
                f"{_SOURCE} {keys[0]}", "is missing", "the predictor needs it to size the model"
            )
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{_SOURCE} {keys[0]}", f"must be an integer, got {value!r}")
    return value


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


def _layer_list(cfg: Mapping[str, Any], key: str) -> Sequence[Any] | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SpecError(f"{_SOURCE} {key}", f"must be a list with one entry per layer, got {value!r}")
    return value


def _first_int(cfg: Mapping[str, Any], *keys: str) -> int:
    """An integer key that some families give per layer (hunyuan's moe_topk, num_experts): the
    first entry of such a list (vLLM builds every MoE layer alike)."""
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        return 0
    value = cfg[key]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise SpecError(f"{_SOURCE} {key}", "is an empty list")
        return _int({key: value[0]}, key)
    return _int(cfg, key)


def _moe_layer_count(cfg: Mapping[str, Any], num_layers: int, num_experts: int) -> int:
    """MoE layers by the rule vLLM's model file applies for the family that sets these keys."""
    if num_experts <= 0:
        return 0
    kinds = _layer_list(cfg, "mlp_layer_types")  # exaone_moe: "sparse" / "dense" per layer
    if kinds is not None:
        return sum(1 for t in kinds[:num_layers] if t == "sparse")
    per_layer = _layer_list(cfg, "layers_num_experts")  # jamba (vLLM reads this list)
    if per_layer is not None:
        return sum(1 for n in per_layer[:num_layers] if isinstance(n, int) and n > 1)
    if "expert_layer_period" in cfg:  # jamba: what layers_num_experts is derived from
        period = max(1, _int(cfg, "expert_layer_period", default=1))
        offset = _int(cfg, "expert_layer_offset")
        return sum(1 for i in range(num_layers) if i % period == offset)
    if "moe_layer_start_index" in cfg or "moe_layer_interval" in cfg:  # ernie4_5_moe
        start = _int(cfg, "moe_layer_start_index")
        end = _int(cfg, "moe_layer_end_index", default=num_layers - 1)
        if end < 0:
            end = num_layers - 1
        step = max(1, _int(cfg, "moe_layer_interval", default=1))
        return sum(1 for i in range(num_layers) if start <= i <= end and (i + 1) % step == 0)
    if isinstance(cfg.get("moe_layers_enum"), str):  # step3: "3,4,5,..."
        try:
            ids = {int(i) for i in cfg["moe_layers_enum"].split(",") if i.strip()}
        except ValueError:
            raise SpecError(f"{_SOURCE} moe_layers_enum", "must list layer indices separated by commas") from None
        return len({i for i in ids if 0 <= i < num_layers})
    if "num_dense_layers" in cfg:  # afmoe, lfm2_moe: the first num_dense_layers are dense
        return max(num_layers - _int(cfg, "num_dense_layers"), 0)
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:  # deepseek_v2 / v3
        first = _int(cfg, "first_k_dense_replace")
        freq = max(1, _int(cfg, "moe_layer_freq", default=1))
        return sum(1 for i in range(num_layers) if i >= first and i % freq == 0)
    if cfg.get("moe_layers") is not None:  # llama4 explicit list
        layers = cfg["moe_layers"]
        if not isinstance(layers, Sequence):
            raise SpecError(f"{_SOURCE} moe_layers", "must be a list of layer indices")
        return len({int(i) for i in layers if 0 <= int(i) < num_layers})
    if "interleave_moe_layer_step" in cfg:  # llama4
        step = max(1, _int(cfg, "interleave_moe_layer_step", default=1))
        return len(range(step - 1, num_layers, step))
    if "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:  # qwen2_moe / qwen3_moe
        step = max(1, _int(cfg, "decoder_sparse_step", default=1))
        dense_only = set(cfg.get("mlp_only_layers") or [])
        return sum(1 for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)
    return num_layers


_RECURRENT_MARKS = ("linear", "mamba", "conv", "deltanet", "kda", "recurrent", "ssm")


def _recurrent_layers(cfg: Mapping[str, Any], num_layers: int) -> int:
    """Layers of a hybrid whose token mixer keeps a fixed state instead of a KV cache:
    `layer_types` / `layers_block_type` entries such as linear_attention (qwen3_next, minimax),
    mamba (granitemoehybrid, jamba) or conv (lfm2); jamba's attention period; minimax's
    `attn_type_list` (0 = linear). Unknown entries count as attention, as before."""
    for key in ("layer_types", "layers_block_type"):
        types = cfg.get(key)
        if isinstance(types, Sequence) and not isinstance(types, str) and types:
            return sum(1 for t in list(types)[:num_layers]
                       if isinstance(t, str) and any(m in t.lower() for m in _RECURRENT_MARKS))
    if "attn_layer_period" in cfg:  # jamba: attention where i % period == offset, Mamba elsewhere
        period = max(1, _int(cfg, "attn_layer_period", default=1))
        offset = _int(cfg, "attn_layer_offset")
        return num_layers - sum(1 for i in range(num_layers) if i % period == offset)
    kinds = cfg.get("attn_type_list")
    if isinstance(kinds, Sequence) and not isinstance(kinds, str):
        return sum(1 for k in list(kinds)[:num_layers] if k == 0)
    return 0


def _sliding_layers(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int, int]:
    """(window_tokens, layers using it). Chunked attention (llama4) is costed as a window."""
    if cfg.get("use_sliding_window") is False:
        return 0, 0
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, Sequence) and not isinstance(layer_types, str) and layer_types:
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
        chunked = sum(1 for t in layer_types if t == "chunked_attention")
        if sliding and _get(cfg, "sliding_window"):
            return int(cfg["sliding_window"]), sliding
        if chunked and _get(cfg, "attention_chunk_size"):
            return int(cfg["attention_chunk_size"]), chunked
        return 0, 0
    if model_type == "gpt_oss" and _get(cfg, "sliding_window"):
        return int(cfg["sliding_window"]), (num_layers + 1) // 2
    if model_type == "llama4_text" and _get(cfg, "attention_chunk_size"):
        interval = max(1, _int(cfg, "no_rope_layer_interval", default=4))
        return int(cfg["attention_chunk_size"]), num_layers - num_layers // interval
    if model_type in ("mistral", "mixtral") and _get(cfg, "sliding_window"):
        return int(cfg["sliding_window"]), num_layers
    if cfg.get("use_sliding_window") is True and _get(cfg, "sliding_window"):
        # qwen2: layers from max_window_layers on use the window.
        count = max(0, num_layers - _int(cfg, "max_window_layers", default=0))
        return (int(cfg["sliding_window"]), count) if count else (0, 0)
    return 0, 0


def _dtypes(
    cfg: Mapping[str, Any], weight_dtype: str | None, kv_dtype: str | None
) -> tuple[str, str, str, str]:
    """(weight, expert weight, kv, activation) dtypes: overrides, else quantization_config/torch_dtype."""
    act = normalize_dtype(
        str(_get(cfg, "torch_dtype", "dtype") or "bf16"), f"{_SOURCE} torch_dtype"
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


def model_from_hf_config(
    config: Mapping[str, Any],
    *,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
    name: str | None = None,
) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json; errors name the missing or bad key."""
    if not isinstance(config, Mapping):
        raise SpecError(_SOURCE, f"must be a JSON object, got {type(config).__name__}")
    cfg: Mapping[str, Any] = config
    if isinstance(config.get("text_config"), Mapping):  # llama4 and other multimodal wrappers
        cfg = {**config["text_config"]}
        for key in ("quantization_config", "torch_dtype", "tie_word_embeddings"):
            if key in config and key not in cfg:
                cfg[key] = config[key]  # type: ignore[index]
    if isinstance(cfg.get("ffn_config"), Mapping):  # dbrx nests its MoE and attention keys
        cfg = _flatten_dbrx(cfg)
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    hidden = _int(cfg, "hidden_size", "d_model", "n_embd", required=True)
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers", required=True)
    heads = _int(cfg, "num_attention_heads", "n_head", "n_heads", required=True)
    vocab = _int(cfg, "vocab_size", required=True)
    kv_heads = _int(cfg, "num_key_value_heads", default=heads) or heads
    experts = _first_int(cfg, "n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
    top_k = _first_int(
        cfg, "num_experts_per_tok", "experts_per_token", "moe_top_k", "num_experts_per_token",
        "moe_k", "moe_topk",
    )
    if experts and not top_k:
        raise SpecError(
            f"{_SOURCE} num_experts_per_tok",
            "is missing for an MoE config",
            "add the router's top-k",
        )
    if experts and top_k > experts:
        raise SpecError(
            f"{_SOURCE} num_experts_per_tok", f"top-k {top_k} exceeds the {experts} experts"
        )
    moe_layers = _moe_layer_count(cfg, layers, experts)
    is_llama4 = model_type.startswith("llama4")
    if experts:
        moe_inter = _first_int(cfg, "moe_intermediate_size", "intermediate_size")
        if moe_inter <= 0:
            raise SpecError(f"{_SOURCE} moe_intermediate_size", "is missing",
                            "the predictor needs each expert's width")
        dense_inter = (
            _int(cfg, "intermediate_size_mlp") if is_llama4 else _int(cfg, "intermediate_size")
        )
    else:
        moe_inter, dense_inter = (
            0,
            _int(cfg, "intermediate_size", "ffn_dim", "n_inner", required=True),
        )
    if layers - moe_layers > 0 and dense_inter <= 0:
        raise SpecError(
            f"{_SOURCE} intermediate_size",
            f"is missing but {layers - moe_layers} layers have a dense FFN",
        )
    shared, shared_inter = 0, 0
    if experts:
        n_shared = _first_int(cfg, "n_shared_experts", "num_shared_experts", "moe_num_shared_experts",
                              "num_shared_expert")
        one_shared = _int(cfg, "shared_expert_intermediate_size", "shared_intermediate_size",
                          "share_expert_dim")
        if n_shared:  # n shared experts, each as wide as a routed one unless the config says
            shared = n_shared
            shared_inter = _int(cfg, "moe_shared_expert_intermediate_size") or moe_inter
        elif one_shared:
            shared, shared_inter = 1, one_shared
        elif is_llama4:
            shared, shared_inter = 1, moe_inter
    mla = cfg.get("kv_lora_rank") is not None
    if mla:
        nope = _int(cfg, "qk_nope_head_dim", required=True)
        rope = _int(cfg, "qk_rope_head_dim", required=True)
        attention: dict[str, Any] = {
            "attention_kind": "mla",
            "num_kv_heads": heads,
            "head_dim": nope + rope,
            "q_lora_rank": _int(cfg, "q_lora_rank"),
            "kv_lora_rank": _int(cfg, "kv_lora_rank"),
            "qk_nope_head_dim": nope,
            "qk_rope_head_dim": rope,
            "v_head_dim": _int(cfg, "v_head_dim", required=True),
        }
    else:
        head_dim = _int(cfg, "head_dim") or hidden // heads
        kind = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
        attention = {"attention_kind": kind, "num_kv_heads": kv_heads, "head_dim": head_dim}
    window, window_layers = _sliding_layers(cfg, model_type, layers)
    recurrent = _recurrent_layers(cfg, layers)
    weight, expert, kv, act = _dtypes(cfg, weight_dtype, kv_dtype)
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
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_dtype=weight,
        expert_weight_dtype=expert,
        kv_dtype=kv,
        activation_dtype=act,
        max_context_tokens=int(cfg.get("max_position_embeddings") or 0),
        **attention,
    )
