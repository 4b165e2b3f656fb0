"""Closed-form parameter, weight-byte, KV-byte and FLOP counts of one model.

These are the per-layer building blocks every estimator multiplies by layer counts and
divides by partition factors. They are exposed on their own because the plugin needs the
per-expert and per-layer bytes for live HBM accounting. Norms and biases are left out: they
are below 0.1% of any preset model and would only add fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .specs import ModelSpec, dtype_bytes


def ffn_matrices(model: ModelSpec) -> int:
    """Gated FFNs (SwiGLU) have gate, up and down projections; plain ones have two."""
    return 3 if model.gated_ffn else 2


def attention_params_per_layer(model: ModelSpec) -> int:
    h, n = model.hidden_size, model.num_attention_heads
    if model.attention_kind == "mla":
        qk = model.qk_nope_head_dim + model.qk_rope_head_dim
        q = h * model.q_lora_rank + model.q_lora_rank * n * qk if model.q_lora_rank else h * n * qk
        kv_a = h * (model.kv_lora_rank + model.qk_rope_head_dim)
        kv_b = model.kv_lora_rank * n * (model.qk_nope_head_dim + model.v_head_dim)
        return q + kv_a + kv_b + n * model.v_head_dim * h
    d = model.head_dim
    q = h * n * d * (2 if model.attention_output_gate else 1)
    return q + 2 * h * model.num_kv_heads * d + n * d * h


def mixer_params_per_layer(model: ModelSpec) -> float:
    """Token-mixer weights per layer, averaged over the layers: attention on the KV layers plus
    the recurrent mixers' own weights where the spec gives them (else attention-sized)."""
    attention = attention_params_per_layer(model)
    if not model.recurrent_mixer_params:
        return float(attention)
    return (model.num_kv_layers * attention + model.recurrent_mixer_params) / model.num_layers


def expert_params(model: ModelSpec) -> int:
    """Parameters of one routed expert."""
    return (
        ffn_matrices(model) * model.hidden_size * model.moe_intermediate_size if model.is_moe else 0
    )


def shared_params_per_moe_layer(model: ModelSpec) -> int:
    return (
        model.num_shared_experts
        * ffn_matrices(model)
        * model.hidden_size
        * model.shared_intermediate
    )


def router_params_per_moe_layer(model: ModelSpec) -> int:
    return model.hidden_size * model.num_experts if model.is_moe else 0


def dense_ffn_params_per_layer(model: ModelSpec) -> int:
    return ffn_matrices(model) * model.hidden_size * model.intermediate_size


def embedding_params(model: ModelSpec) -> int:
    return model.vocab_size * model.hidden_size


def lm_head_params(model: ModelSpec) -> int:
    return 0 if model.tie_word_embeddings else model.vocab_size * model.hidden_size


def non_ffn_params(model: ModelSpec) -> int:
    """Token mixers and embeddings: what a dense twin keeps unchanged."""
    return (
        round(model.num_layers * mixer_params_per_layer(model))
        + embedding_params(model)
        + lm_head_params(model)
    )


def total_params(model: ModelSpec) -> int:
    moe = model.num_moe_layers * (
        model.num_experts * expert_params(model)
        + shared_params_per_moe_layer(model)
        + router_params_per_moe_layer(model)
    )
    return non_ffn_params(model) + model.num_dense_layers * dense_ffn_params_per_layer(model) + moe


def active_params(model: ModelSpec) -> int:
    """Parameters one token multiplies by (top-k routed experts instead of all of them)."""
    moe = model.num_moe_layers * (
        model.experts_per_token * expert_params(model)
        + shared_params_per_moe_layer(model)
        + router_params_per_moe_layer(model)
    )
    return non_ffn_params(model) + model.num_dense_layers * dense_ffn_params_per_layer(model) + moe


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes by kind. Per-layer fields are for one layer; totals multiply them out.

    `total_bytes` is the sum of the *_total_bytes fields, which the tests check.
    """

    routed_expert_bytes: float  # one routed expert in one MoE layer
    shared_experts_bytes_per_moe_layer: float
    router_bytes_per_moe_layer: float
    dense_ffn_bytes_per_dense_layer: float
    attention_bytes_per_layer: float
    embedding_bytes: float
    lm_head_bytes: float
    routed_total_bytes: float
    shared_total_bytes: float
    router_total_bytes: float
    dense_ffn_total_bytes: float
    attention_total_bytes: float
    total_bytes: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def weight_bytes_breakdown(model: ModelSpec) -> WeightBytes:
    """Resident weight bytes of the whole model, split the way HBM accounting needs them."""
    w = dtype_bytes(model.weight_dtype)
    we = dtype_bytes(model.expert_weight_dtype)
    routed = expert_params(model) * we
    shared = shared_params_per_moe_layer(model) * w
    router = router_params_per_moe_layer(model) * w
    dense = dense_ffn_params_per_layer(model) * w
    attn = mixer_params_per_layer(model) * w
    emb = embedding_params(model) * w
    head = lm_head_params(model) * w
    routed_t = routed * model.num_experts * model.num_moe_layers
    shared_t = shared * model.num_moe_layers
    router_t = router * model.num_moe_layers
    dense_t = dense * model.num_dense_layers
    attn_t = attn * model.num_layers
    total = routed_t + shared_t + router_t + dense_t + attn_t + emb + head
    return WeightBytes(
        routed,
        shared,
        router,
        dense,
        attn,
        emb,
        head,
        routed_t,
        shared_t,
        router_t,
        dense_t,
        attn_t,
        total,
    )


def kv_bytes_per_token_per_layer(model: ModelSpec) -> float:
    """Cache bytes one token adds to one attention layer.

    MLA caches the compressed latent plus the decoupled RoPE key, shared by all heads; the
    other layouts cache K and V for every KV head (MQA is GQA with one KV head).
    """
    b = dtype_bytes(model.kv_dtype)
    if model.attention_kind == "mla":
        return (model.kv_lora_rank + model.qk_rope_head_dim) * b
    return 2 * model.num_kv_heads * model.head_dim * b


def kv_bytes_per_token(model: ModelSpec, context_tokens: int | None = None) -> float:
    """Average cache bytes per context token over all layers.

    Without a context, every layer counts in full (the long-context limit ignores nothing only
    when there is no sliding window). With one, sliding-window layers only keep their window.
    """
    per_layer = kv_bytes_per_token_per_layer(model)
    if context_tokens is None or context_tokens <= 0:
        return per_layer * model.num_kv_layers
    return kv_bytes_per_sequence(model, context_tokens) / context_tokens


def kv_bytes_per_sequence(model: ModelSpec, context_tokens: float) -> float:
    """Cache bytes of one sequence holding `context_tokens` tokens."""
    per_layer = kv_bytes_per_token_per_layer(model)
    swa = model.num_sliding_window_layers
    full = model.num_kv_layers - swa
    window = min(context_tokens, model.sliding_window_tokens) if swa else 0.0
    return per_layer * (full * context_tokens + swa * window)


def attended_tokens_per_layer(model: ModelSpec, context_tokens: float) -> float:
    """Context positions one new token attends to, averaged over layers (a recurrent layer
    attends to none: its per-token work does not grow with the context)."""
    swa = model.num_sliding_window_layers
    window = min(context_tokens, model.sliding_window_tokens) if swa else 0.0
    return ((model.num_kv_layers - swa) * context_tokens + swa * window) / model.num_layers


def attention_core_flops_per_token_per_position(model: ModelSpec) -> float:
    """FLOPs of QK^T and PV for one new token against one cached position, one layer.

    MLA is counted in its absorbed decode form (queries meet the latent directly), which is
    what serving kernels run.
    """
    n = model.num_attention_heads
    if model.attention_kind == "mla":
        return (
            2.0 * n * (model.kv_lora_rank + model.qk_rope_head_dim) + 2.0 * n * model.kv_lora_rank
        )
    return 4.0 * n * model.head_dim


def attention_output_width(model: ModelSpec) -> int:
    """Width of the concatenated head outputs before the output projection."""
    if model.attention_kind == "mla":
        return model.num_attention_heads * model.v_head_dim
    return model.num_attention_heads * model.head_dim
