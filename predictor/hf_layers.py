"""Layer rules of Hugging Face configs: which layers are MoE, recurrent or windowed.

Each family's rule is the one vLLM's model file applies (see `hf_config`, which builds the
ModelSpec from these counts). The key readers here name the config key in every error.
Pure: no file access.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .errors import SpecError

SOURCE = "config.json"


def get_key(cfg: Mapping[str, Any], *keys: str) -> Any:
    """The first key present with a non-null value."""
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


def int_key(cfg: Mapping[str, Any], *keys: str, required: bool = False, default: int = 0) -> int:
    value = get_key(cfg, *keys)
    if value is None:
        if required:
            raise SpecError(
                f"{SOURCE} {keys[0]}", "is missing", "the predictor needs it to size the model"
            )
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{SOURCE} {keys[0]}", f"must be an integer, got {value!r}")
    return value


def layer_list(cfg: Mapping[str, Any], key: str) -> Sequence[Any] | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SpecError(f"{SOURCE} {key}", f"must be a list with one entry per layer, got {value!r}")
    return value


def first_int(cfg: Mapping[str, Any], *keys: str) -> int:
    """An integer key that some families give per layer (hunyuan's moe_topk, num_experts): the
    first entry of such a list (vLLM builds every MoE layer alike)."""
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        return 0
    value = cfg[key]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise SpecError(f"{SOURCE} {key}", "is an empty list")
        return int_key({key: value[0]}, key)
    return int_key(cfg, key)


def moe_layer_count(cfg: Mapping[str, Any], num_layers: int, num_experts: int) -> int:
    """MoE layers by the rule vLLM's model file applies for the family that sets these keys."""
    if num_experts <= 0:
        return 0
    kinds = layer_list(cfg, "mlp_layer_types")  # exaone_moe: "sparse" / "dense" per layer
    if kinds is not None:
        return sum(1 for t in kinds[:num_layers] if t == "sparse")
    per_layer = layer_list(cfg, "layers_num_experts")  # jamba (vLLM reads this list)
    if per_layer is not None:
        return sum(1 for n in per_layer[:num_layers] if isinstance(n, int) and n > 1)
    if "expert_layer_period" in cfg:  # jamba: what layers_num_experts is derived from
        period = max(1, int_key(cfg, "expert_layer_period", default=1))
        offset = int_key(cfg, "expert_layer_offset")
        return sum(1 for i in range(num_layers) if i % period == offset)
    if "moe_layer_start_index" in cfg or "moe_layer_interval" in cfg:  # ernie4_5_moe
        start = int_key(cfg, "moe_layer_start_index")
        end = int_key(cfg, "moe_layer_end_index", default=num_layers - 1)
        if end < 0:
            end = num_layers - 1
        step = max(1, int_key(cfg, "moe_layer_interval", default=1))
        return sum(1 for i in range(num_layers) if start <= i <= end and (i + 1) % step == 0)
    if isinstance(cfg.get("moe_layers_enum"), str):  # step3: "3,4,5,..."
        try:
            ids = {int(i) for i in cfg["moe_layers_enum"].split(",") if i.strip()}
        except ValueError:
            raise SpecError(f"{SOURCE} moe_layers_enum", "must list layer indices separated by commas") from None
        return len({i for i in ids if 0 <= i < num_layers})
    if "num_dense_layers" in cfg:  # afmoe, lfm2_moe: the first num_dense_layers are dense
        return max(num_layers - int_key(cfg, "num_dense_layers"), 0)
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:  # deepseek_v2 / v3
        first = int_key(cfg, "first_k_dense_replace")
        freq = max(1, int_key(cfg, "moe_layer_freq", default=1))
        return sum(1 for i in range(num_layers) if i >= first and i % freq == 0)
    if cfg.get("moe_layers") is not None:  # llama4 explicit list
        layers = cfg["moe_layers"]
        if not isinstance(layers, Sequence):
            raise SpecError(f"{SOURCE} moe_layers", "must be a list of layer indices")
        return len({int(i) for i in layers if 0 <= int(i) < num_layers})
    if "interleave_moe_layer_step" in cfg:  # llama4
        step = max(1, int_key(cfg, "interleave_moe_layer_step", default=1))
        return len(range(step - 1, num_layers, step))
    if "decoder_sparse_step" in cfg or "mlp_only_layers" in cfg:  # qwen2_moe / qwen3_moe
        step = max(1, int_key(cfg, "decoder_sparse_step", default=1))
        dense_only = set(cfg.get("mlp_only_layers") or [])
        return sum(1 for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)
    return num_layers


BLOCK_KINDS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def blocks_of(cfg: Mapping[str, Any]) -> Counter[str] | None:
    """Block counts of a hybrid whose every layer is ONE block (nemotron_h): a Mamba mixer,
    attention, a dense MLP or an MoE, from `hybrid_override_pattern` (vLLM builds one layer per
    character) or from a `layers_block_type` list that names FFN blocks ("moe", "mlp"). None
    for the usual layer of mixer + FFN (granitemoehybrid's list names only mixers)."""
    pattern = cfg.get("hybrid_override_pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise SpecError(f"{SOURCE} hybrid_override_pattern",
                            f"must be a non-empty string, got {pattern!r}")
        bad = sorted(set(pattern) - set(BLOCK_KINDS))
        if bad:
            raise SpecError(f"{SOURCE} hybrid_override_pattern", f"has unknown blocks {bad}",
                            "use M (Mamba), * (attention), - (MLP) and E (MoE), as vLLM does")
        return Counter(BLOCK_KINDS[c] for c in pattern)
    types = cfg.get("layers_block_type")
    if not isinstance(types, Sequence) or isinstance(types, str):
        return None
    kinds = [str(t).lower() for t in types]
    if not any(k in ("moe", "mlp") for k in kinds):
        return None
    bad = sorted(set(kinds) - set(BLOCK_KINDS.values()))
    if bad:
        raise SpecError(f"{SOURCE} layers_block_type", f"has unknown blocks {bad}",
                        "use mamba, attention, mlp and moe")
    return Counter(kinds)


def block_layers(blocks: Counter[str], has_experts: bool) -> tuple[int, int, int]:
    """(layers, MoE layers, recurrent layers) of a one-block-per-layer hybrid, as the cost model's
    layers of mixer + FFN: one layer per FFN block (MLP or MoE), of which as many hold a KV cache
    as there are attention blocks. Exact for the FFN weights and the KV cache; the Mamba blocks'
    weights join as `recurrent_mixer_params`."""
    ffn = blocks["moe"] + blocks["mlp"]
    attention = blocks["attention"]
    field = f"{SOURCE} hybrid_override_pattern"
    if not attention:
        raise SpecError(field, "has no attention block (*)",
                        "the cost model sizes a KV cache: the model needs one attention layer")
    if attention > ffn:
        raise SpecError(field, f"has {attention} attention blocks but {ffn} FFN blocks (-, E)",
                        "the cost model pairs every attention layer with an FFN")
    return ffn, blocks["moe"] if has_experts else 0, ffn - attention


def shape_int(cfg: Mapping[str, Any], *keys: str) -> int:
    """A shape key read leniently: 0 where absent or not an integer ("auto")."""
    value = get_key(cfg, *keys)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _Mamba(NamedTuple):
    """A Mamba mixer's shape: Mamba2 has heads (heads x head_dim = inner), Mamba1 (jamba) none;
    conv_dim is the channels its depthwise conv runs over (x, and Mamba2's B and C)."""

    heads: int
    state: int
    inner: int
    conv_dim: int
    kernel: int


def _mamba_shape(cfg: Mapping[str, Any], hidden: int) -> _Mamba | None:
    heads = shape_int(cfg, "mamba_num_heads", "mamba_n_heads")
    state = shape_int(cfg, "ssm_state_size", "mamba_d_state")
    head_dim = shape_int(cfg, "mamba_head_dim", "mamba_d_head")
    inner = heads * head_dim or shape_int(cfg, "mamba_expand", "expand") * hidden
    if not (state and inner):
        return None
    groups = (shape_int(cfg, "n_groups", "mamba_n_groups") or 1) if heads else 0
    kernel = shape_int(cfg, "conv_kernel", "mamba_d_conv") or 4
    return _Mamba(heads, state, inner, inner + 2 * groups * state, kernel)


class _DeltaNet(NamedTuple):
    """A Gated DeltaNet mixer's shape: key = key heads x key dim, value = value heads x value
    dim; its conv runs over q, k and v."""

    v_heads: int
    k_dim: int
    v_dim: int
    key: int
    value: int
    kernel: int


def _deltanet_shape(cfg: Mapping[str, Any]) -> _DeltaNet | None:
    k_heads = shape_int(cfg, "linear_num_key_heads")
    v_heads = shape_int(cfg, "linear_num_value_heads")
    k_dim = shape_int(cfg, "linear_key_head_dim")
    v_dim = shape_int(cfg, "linear_value_head_dim")
    if not (k_heads and v_heads and k_dim and v_dim):
        return None
    kernel = shape_int(cfg, "linear_conv_kernel_dim") or 4
    return _DeltaNet(v_heads, k_dim, v_dim, k_heads * k_dim, v_heads * v_dim, kernel)


def mamba2_params(cfg: Mapping[str, Any], hidden: int) -> int:
    """Weights of one Mamba2 mixer (nemotron_h, granitemoehybrid spellings), as vLLM's
    MambaMixer2 holds them: in_proj to z, xBC and dt; the depthwise conv; A, D, dt_bias; the
    gated norm; out_proj. 0 (the mixer is then costed as attention) where the config does not
    give the shape: a better estimate, never a reason to refuse the model."""
    m = _mamba_shape(cfg, hidden)
    if m is None or not m.heads:
        return 0
    conv_bias = m.conv_dim if cfg.get("use_conv_bias", cfg.get("mamba_conv_bias", True)) else 0
    return (hidden * (m.inner + m.conv_dim + m.heads) + m.conv_dim * m.kernel + conv_bias
            + 3 * m.heads + m.inner + m.inner * hidden)


def gated_deltanet_params(cfg: Mapping[str, Any], hidden: int) -> int:
    """Weights of one Gated DeltaNet mixer (qwen3_next, qwen3_5_moe linear attention), as vLLM's
    GDN layer holds them: in_proj_qkvz (q, k of key_dim, v, z of value_dim), in_proj_ba (b, a
    per value head), the depthwise conv over q, k, v, dt_bias and A_log, the gated norm, out_proj.
    0 where the config does not give the shape."""
    d = _deltanet_shape(cfg)
    if d is None:
        return 0
    return (hidden * (2 * d.key + 2 * d.value) + hidden * 2 * d.v_heads
            + (2 * d.key + d.value) * d.kernel + 2 * d.v_heads + d.v_dim + d.value * hidden)


def short_conv_params(cfg: Mapping[str, Any], hidden: int) -> int:
    """Weights of one LFM2 short-convolution mixer (lfm2, lfm2_moe), as vLLM's ShortConv holds
    them at width hidden: in_proj to B, C and x, the depthwise conv of `conv_L_cache` taps,
    out_proj, and their biases with `conv_bias`. 4 x hidden^2 against attention's 2 + 2 x
    kv_heads / heads (2.5 on LFM2-8B-A1B's GQA): costing it as attention left a third of each
    conv layer's reads out. 0 where the config does not give the taps."""
    taps = shape_int(cfg, "conv_L_cache")
    if not taps:
        return 0
    return 4 * hidden * hidden + taps * hidden + (5 * hidden if cfg.get("conv_bias") else 0)


def recurrent_mixer_params(cfg: Mapping[str, Any], hidden: int) -> int:
    """One recurrent mixer's weights by the shape keys its family gives; 0 if none (linear
    attention, minimax and bailing's, is costed as attention: it has the same projections)."""
    return (mamba2_params(cfg, hidden) or gated_deltanet_params(cfg, hidden)
            or short_conv_params(cfg, hidden))


def _linear_attention(cfg: Mapping[str, Any]) -> bool:
    """Lightning-style linear attention (minimax's `attn_type_list`, bailing's
    `layer_group_size`): a heads x head_dim x head_dim state a layer, no conv."""
    return "attn_type_list" in cfg or int_key(cfg, "layer_group_size") > 1


def recurrent_state_elements(cfg: Mapping[str, Any], hidden: int) -> tuple[int, int]:
    """(elements in the model's dtype, elements in the SSM state's dtype) one sequence holds in
    one recurrent mixer, as vLLM's `MambaStateShapeCalculator` sizes its cache (one rank, no
    speculative rows): a Mamba conv keeps kernel - 1 columns of its channels, and its SSM state
    is inner x state (Mamba2's heads x head_dim x state); Gated DeltaNet's conv keeps as many
    over q, k and v, and its state is value heads x value dim x key dim; LFM2's short conv
    keeps conv_L_cache - 1 columns of hidden; linear attention (minimax, bailing) a heads x
    head_dim x head_dim state in the model's dtype. (0, 0) where the config does not give the
    shape, as for the weights. Why it matters: every running sequence's state is read (and
    written back) each step, MiBs a sequence a layer on the full-size hybrids."""
    m = _mamba_shape(cfg, hidden)
    if m is not None:
        return m.conv_dim * (m.kernel - 1), m.inner * m.state
    d = _deltanet_shape(cfg)
    if d is not None:
        return (2 * d.key + d.value) * (d.kernel - 1), d.v_heads * d.v_dim * d.k_dim
    taps = shape_int(cfg, "conv_L_cache")
    if taps:
        return hidden * (taps - 1), 0
    heads = shape_int(cfg, "num_attention_heads")
    if _linear_attention(cfg) and heads:
        head_dim = shape_int(cfg, "head_dim") or hidden // heads
        return heads * head_dim * head_dim, 0
    return 0, 0


RECURRENT_MARKS = ("linear", "mamba", "conv", "deltanet", "kda", "recurrent", "ssm")


def recurrent_layers(cfg: Mapping[str, Any], num_layers: int) -> int:
    """Layers of a hybrid whose token mixer keeps a fixed state instead of a KV cache:
    `layer_types` / `layers_block_type` entries such as linear_attention (qwen3_next, minimax),
    mamba (granitemoehybrid, jamba) or conv (lfm2); jamba's attention period; minimax's
    `attn_type_list` (0 = linear); bailing's `layer_group_size` (each group's last layer is full
    attention). Unknown entries count as attention, as before."""
    for key in ("layer_types", "layers_block_type"):
        types = cfg.get(key)
        if isinstance(types, Sequence) and not isinstance(types, str) and types:
            return sum(1 for t in list(types)[:num_layers]
                       if isinstance(t, str) and any(m in t.lower() for m in RECURRENT_MARKS))
    if "attn_layer_period" in cfg:  # jamba: attention where i % period == offset, Mamba elsewhere
        period = max(1, int_key(cfg, "attn_layer_period", default=1))
        offset = int_key(cfg, "attn_layer_offset")
        return num_layers - sum(1 for i in range(num_layers) if i % period == offset)
    kinds = cfg.get("attn_type_list")
    if isinstance(kinds, Sequence) and not isinstance(kinds, str):
        return sum(1 for k in list(kinds)[:num_layers] if k == 0)
    group = int_key(cfg, "layer_group_size")
    if group > 1:  # bailing_moe_linear.is_linear_layer: full attention closes each group
        return sum(1 for i in range(num_layers) if (i + 1) % group)
    return 0


def sliding_layers(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int, int]:
    """(window_tokens, layers using it). Chunked attention (llama4) is costed as a window."""
    if cfg.get("use_sliding_window") is False:
        return 0, 0
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, Sequence) and not isinstance(layer_types, str) and layer_types:
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
        chunked = sum(1 for t in layer_types if t == "chunked_attention")
        if sliding and get_key(cfg, "sliding_window"):
            return int(cfg["sliding_window"]), sliding
        if chunked and get_key(cfg, "attention_chunk_size"):
            return int(cfg["attention_chunk_size"]), chunked
        return 0, 0
    if model_type == "gpt_oss" and get_key(cfg, "sliding_window"):
        return int(cfg["sliding_window"]), (num_layers + 1) // 2
    if model_type == "llama4_text" and get_key(cfg, "attention_chunk_size"):
        interval = max(1, int_key(cfg, "no_rope_layer_interval", default=4))
        return int(cfg["attention_chunk_size"]), num_layers - num_layers // interval
    if model_type in ("mistral", "mixtral") and get_key(cfg, "sliding_window"):
        return int(cfg["sliding_window"]), num_layers
    if cfg.get("use_sliding_window") is True and get_key(cfg, "sliding_window"):
        # qwen2: layers from max_window_layers on use the window.
        count = max(0, num_layers - int_key(cfg, "max_window_layers", default=0))
        return (int(cfg["sliding_window"]), count) if count else (0, 0)
    return 0, 0
