"""Per-GPU HBM accounting: resident weights under a partition, KV per sequence, B_max.

The paper does not publish its accounting; this is ours, with every knob in `Accounting`:

* budget = usable_hbm_ratio * hbm_capacity_bytes - reserved_bytes.
* Attention weights (and the vocabulary-parallel embedding and LM head) are split over TP
  and replicated over KV-parallel groups and DP replicas.
* FFN weights (dense FFN, shared experts, routed experts) are split over the FFN group: all
  tp*kvp GPUs of a pipeline stage when ffn_shard_scope == "stage", at most one node when it is
  "node". Routed experts are split as EP (whole experts) x expert-TP (slices of each expert).
  Routers are tiny and replicated.
* PP splits the layers; a stage also holds the larger of the embedding and LM head.
* KV of one sequence is split over KV-parallel groups (by position), over PP (by layer) and
  over TP by KV head: each rank holds ceil(kv_heads/tp) heads, so ranks beyond the KV-head
  count hold copies. MLA's cache is shared by all heads; mla_kv_sharding says how TP ranks
  hold it (latent channels split with the RoPE key replicated, whole, or split by position).
* B_max = floor(dp * (budget - weights) / KV-per-sequence-per-replica-GPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import SpecError
from .sizes import kv_bytes_per_sequence, weight_bytes_breakdown
from .specs import DEFAULT_ACCOUNTING, Accounting, HardwareSpec, ModelSpec, Partition


@dataclass(frozen=True)
class Layout:
    """Derived sharding factors of one partition for one model."""

    ffn_group: int  # GPUs sharing one copy of the FFN weights
    ffn_replicas: int  # copies of the FFN weights inside one stage
    etp: int  # slices of each routed expert
    kv_tp_fraction: float  # share of one sequence's cache one TP rank holds


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
    if model.is_moe:
        if model.num_experts % p.ep or group % p.ep:
            raise SpecError(
                "ep",
                f"{p.ep} must divide num_experts={model.num_experts} and the FFN group of {group} GPUs",
            )
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
        ffn_group=group, ffn_replicas=stage // group, etp=group // p.ep, kv_tp_fraction=fraction
    )


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU bytes; the weight parts sum to weights_bytes."""

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

    @property
    def feasible(self) -> bool:
        return self.batch_max >= 1

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["feasible"] = self.feasible
        return out


def hbm_budget_bytes(hw: HardwareSpec, acc: Accounting = DEFAULT_ACCOUNTING) -> float:
    return acc.usable_hbm_ratio * hw.hbm_capacity_bytes - acc.reserved_bytes


def kv_bytes_per_sequence_per_gpu(
    model: ModelSpec,
    hw: HardwareSpec,
    p: Partition,
    context_tokens: float,
    acc: Accounting = DEFAULT_ACCOUNTING,
) -> float:
    lay = layout(model, hw, p, acc)
    return kv_bytes_per_sequence(model, context_tokens) * lay.kv_tp_fraction / (p.pp * p.kvp)


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
    routed = w.routed_total_bytes / (lay.ffn_group * p.pp)
    router = w.router_total_bytes / p.pp
    weights = attention + embedding + dense + shared + routed + router
    budget = hbm_budget_bytes(hw, acc)
    kv = kv_bytes_per_sequence(model, context_tokens) * lay.kv_tp_fraction / (p.pp * p.kvp)
    room = budget - weights
    batch_max = int(math.floor(p.dp * room / kv * (1 + 1e-12))) if room > 0 else 0
    return MemoryBreakdown(
        attention, embedding, dense, shared, routed, router, weights, budget, kv, max(batch_max, 0)
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
