"""Time of one decode step: max(compute, HBM) + exposed communication (paper eq. 10).

A measured machine may add `(1 - overlap) * min(compute, HBM)` and a per-step overhead (fixed,
per layer and per token; HardwareSpec refinements from `moe-reuse calibrate`, zero on the presets).

With `Accounting.cost_scope == "weights"` only the weight path is timed (KV reads, attention
core and communication left off), the paper's differential view behind its 4.5x headline.

A step advances every in-flight sequence by one token. With pp stages the batch is cut into
pp microbatches and a step takes pp stage-times; all parts below are per step and per GPU
(every GPU of a stage does the same work). Expert reads follow the reuse model: a routed
expert is read once per step if any token of the FFN group's microbatch chose it, so the
bytes scale with the distinct experts touched, uniform expectation by default, or a measured
value for live use. EP over DP engines (vLLM's DP attention + EP) pools the tokens of the
engines it spans for the routed experts: each of its GPUs reads its share of the experts that
the pooled tokens touched, and dispatch/combine move each GPU's tokens to the experts' GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import comm
from .deployment import DEFAULT_ACCOUNTING, Accounting, Partition
from .errors import SpecError
from .hardware import HardwareSpec
from .memory import layout
from .reuse import expected_distinct_experts, reuse_from_counts
from .sizes import (
    attended_tokens_per_layer,
    attention_core_flops_per_token_per_position,
    attention_output_width,
    dense_ffn_params_per_layer,
    expert_params,
    kv_bytes_per_sequence,
    mixer_params_per_layer,
    router_params_per_moe_layer,
    shared_params_per_moe_layer,
    weight_bytes_breakdown,
)
from .specs import ModelSpec, dtype_bytes

COMPUTE_PARTS = ("projections", "attention", "dense_ffn", "shared_ffn", "routed_ffn", "lm_head")
HBM_PARTS = ("projections", "kv", "dense_ffn", "shared_ffn", "routed_ffn", "lm_head")
COMM_PARTS = ("attention", "ffn", "pipeline")


@dataclass(frozen=True)
class StepTime:
    """One decode step. Each *_seconds mapping sums to its *_total_seconds field."""

    batch: float
    context_tokens: float
    partition: Partition
    compute_seconds: Mapping[str, float]
    hbm_seconds: Mapping[str, float]
    comm_seconds: Mapping[str, float]
    comm_exposed_seconds: Mapping[str, float]
    compute_total_seconds: float
    hbm_total_seconds: float
    comm_total_seconds: float
    comm_exposed_total_seconds: float
    total_seconds: float
    flops: Mapping[str, float] = field(default_factory=dict)
    unhidden_seconds: float = 0.0  # (1 - overlap) * min(compute, HBM): the part not hidden
    overhead_seconds: float = 0.0  # the hardware's fixed per-step overhead
    hbm_bytes: Mapping[str, float] = field(default_factory=dict)
    distinct_experts_per_layer: float = 0.0
    tokens_per_expert: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def seconds_per_token(self) -> float:
        """Per-token time: step time over the tokens the step produces."""
        return self.total_seconds / self.batch if self.batch > 0 else 0.0

    @property
    def bound(self) -> str:
        return "compute" if self.compute_total_seconds > self.hbm_total_seconds else "hbm"

    def critical_seconds(self) -> dict[str, float]:
        """The step time split into parts that sum to total_seconds: the parts of the bound
        side (HBM or compute) plus the exposed communication."""
        side = self.compute_seconds if self.bound == "compute" else self.hbm_seconds
        out = {f"{self.bound}:{k}": v for k, v in side.items()}
        out.update({f"comm:{k}": v for k, v in self.comm_exposed_seconds.items()})
        if self.unhidden_seconds:
            out["overlap:unhidden"] = self.unhidden_seconds
        if self.overhead_seconds:
            out["overhead:step"] = self.overhead_seconds
        return out

    @property
    def ffn_seconds(self) -> float:
        """FFN phase alone: max(FFN compute, FFN HBM) + its exposed communication."""
        parts = ("dense_ffn", "shared_ffn", "routed_ffn")
        return (
            max(
                sum(self.compute_seconds[k] for k in parts), sum(self.hbm_seconds[k] for k in parts)
            )
            + self.comm_exposed_seconds["ffn"]
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "batch": self.batch,
            "context_tokens": self.context_tokens,
            "partition": self.partition.to_dict(),
            "compute_seconds": dict(self.compute_seconds),
            "hbm_seconds": dict(self.hbm_seconds),
            "comm_seconds": dict(self.comm_seconds),
            "comm_exposed_seconds": dict(self.comm_exposed_seconds),
            "compute_total_seconds": self.compute_total_seconds,
            "hbm_total_seconds": self.hbm_total_seconds,
            "comm_total_seconds": self.comm_total_seconds,
            "comm_exposed_total_seconds": self.comm_exposed_total_seconds,
            "total_seconds": self.total_seconds,
            "unhidden_seconds": self.unhidden_seconds,
            "overhead_seconds": self.overhead_seconds,
            "tokens_per_second": self.tokens_per_second,
            "bound": self.bound,
            "flops": dict(self.flops),
            "hbm_bytes": dict(self.hbm_bytes),
            "distinct_experts_per_layer": self.distinct_experts_per_layer,
            "tokens_per_expert": self.tokens_per_expert,
        }


def step_time(
    model: ModelSpec,
    hw: HardwareSpec,
    partition: Partition,
    batch: float,
    context_tokens: float,
    accounting: Accounting = DEFAULT_ACCOUNTING,
    *,
    distinct_experts_per_layer: float | None = None,
    expert_counts: Sequence[int] | None = None,
    sequences: float | None = None,
) -> StepTime:
    """Evaluate one decode step of `batch` sequences (global) at `context_tokens` each.

    `sequences`: the requests the step carries when it is not one token each (a step with
    prefill chunks); the per-request overhead counts them, the kernels count `batch` tokens.

    distinct_experts_per_layer / expert_counts replace the uniform-routing expectation with a
    measurement (mean distinct experts per MoE layer for the whole step, or one layer's
    per-expert token counts); when the FFN group holds several weight copies the measurement is
    taken to describe each copy's share, and under EP over DP engines the tokens of every
    engine the experts serve (`Layout.ep_span` engines).
    """
    if batch <= 0:
        raise SpecError("batch", f"must be > 0, got {batch}")
    if context_tokens <= 0:
        raise SpecError("context_tokens", f"must be > 0, got {context_tokens}")
    p, acc = partition, accounting
    lay = layout(model, hw, p, acc)
    w = weight_bytes_breakdown(model)
    pp = p.pp
    micro = batch / (p.dp * pp)  # tokens one stage processes at a time
    group_tokens = micro / lay.ffn_replicas  # tokens one copy of the FFN weights serves
    # tokens one copy of the routed experts serves: EP over DP engines pools their tokens
    routed_tokens = group_tokens * lay.ep_span
    fr = lay.routed_group
    layers, dense_layers, moe_layers = (
        model.num_layers / pp,
        model.num_dense_layers / pp,
        model.num_moe_layers / pp,
    )
    f = lay.ffn_group
    act = dtype_bytes(model.activation_dtype)

    # FLOPs per GPU per stage pass.
    fl_proj = 2.0 * micro * layers * mixer_params_per_layer(model) / p.tp
    attended = attended_tokens_per_layer(model, context_tokens)
    fl_attn = (
        micro
        * layers
        * attention_core_flops_per_token_per_position(model)
        * attended
        / (p.tp * p.kvp)
    )
    fl_dense = 2.0 * group_tokens * dense_layers * dense_ffn_params_per_layer(model) / f
    fl_shared = 2.0 * group_tokens * moe_layers * shared_params_per_moe_layer(model) / f
    fl_routed = (
        2.0
        * moe_layers
        * (
            routed_tokens * model.experts_per_token * expert_params(model) / fr
            + group_tokens * router_params_per_moe_layer(model)
        )
    )
    fl_head = 2.0 * micro * model.vocab_size * model.hidden_size / p.tp  # tied or not, it runs

    # Distinct experts each FFN-weight copy reads per MoE layer.
    distinct = 0.0
    per_expert = 0.0
    if model.is_moe:
        if expert_counts is not None:
            distinct = float(reuse_from_counts(expert_counts).distinct)
        elif distinct_experts_per_layer is not None:
            if not 0 <= distinct_experts_per_layer <= model.num_experts:
                raise SpecError(
                    "distinct_experts_per_layer",
                    f"must be in 0..{model.num_experts}, got {distinct_experts_per_layer}",
                )
            distinct = float(distinct_experts_per_layer)
        else:
            distinct = expected_distinct_experts(
                model.num_experts, model.experts_per_token, routed_tokens
            )
        per_expert = routed_tokens * model.experts_per_token / distinct if distinct > 0 else 0.0

    # HBM bytes per GPU per stage pass.
    by_proj = layers * w.attention_bytes_per_layer / p.tp
    by_kv = micro * (kv_bytes_per_sequence(model, context_tokens) * lay.kv_tp_fraction / p.kvp
                     + model.recurrent_state_bytes / p.tp) / pp  # a hybrid's state: once a step
    by_dense = dense_layers * w.dense_ffn_bytes_per_dense_layer / f
    by_shared = moe_layers * w.shared_experts_bytes_per_moe_layer / f
    by_routed = moe_layers * (distinct * w.routed_expert_bytes / fr + w.router_bytes_per_moe_layer)
    by_head = (w.lm_head_bytes or w.embedding_bytes) / p.tp

    wdt, edt = model.weight_dtype, model.expert_weight_dtype
    flops = {
        "projections": fl_proj,
        "attention": fl_attn,
        "dense_ffn": fl_dense,
        "shared_ffn": fl_shared,
        "routed_ffn": fl_routed,
        "lm_head": fl_head,
    }
    dtypes = {
        "projections": wdt,
        "attention": model.kv_dtype,
        "dense_ffn": wdt,
        "shared_ffn": wdt,
        "routed_ffn": edt,
        "lm_head": wdt,
    }
    compute = {k: pp * flops[k] / hw.peak_flops(dtypes[k]) for k in COMPUTE_PARTS}
    compute["routed_ffn"] = pp * fl_routed / hw.expert_flops(edt)
    hbm_bytes = {
        "projections": by_proj,
        "kv": by_kv,
        "dense_ffn": by_dense,
        "shared_ffn": by_shared,
        "routed_ffn": by_routed,
        "lm_head": by_head,
    }
    hbm = {k: pp * v / hw.hbm_bytes_per_second for k, v in hbm_bytes.items()}
    hbm["routed_ffn"] = pp * by_routed / hw.expert_bytes_per_second
    hbm["kv"] = pp * by_kv / hw.kv_bytes_per_second

    # Communication per stage pass: (start-up, bandwidth) seconds per phase.
    scale_out = {k.strip() for k in acc.scale_out_collectives.split(",")}

    node = acc.node_gpus or hw.gpus_per_node

    def coll(name: str, kind: str, n: int, size: float, span: int) -> tuple[float, float]:
        # A named scale-out collective takes the inter-node link once its n ranks, packed
        # into nodes of `node` GPUs, span more than one node; the rest stay on the fabric
        # their span gives (one NVLink domain on the paper's platform).
        if name in scale_out:
            return comm.collective_parts(
                hw, kind, n, size, n, node_gpus=node,
                startup_seconds=acc.collective_latency_seconds,
            )
        return comm.collective_parts(
            hw, kind, n, size, span, startup_seconds=acc.collective_latency_seconds
        )

    def add(acc_pair: list[float], pair: tuple[float, float], times: float) -> None:
        acc_pair[0] += times * pair[0]
        acc_pair[1] += times * pair[1]

    c_attn = [0.0, 0.0]
    if p.kvp > 1:
        send = micro * attention_output_width(model) / p.tp * act
        add(c_attn, coll("kv_combine", "all_to_all", p.kvp, send, p.tp * p.kvp), layers)
    add(c_attn, coll("tp_all_reduce", "all_reduce", p.tp, micro * model.hidden_size * act, p.tp), layers)
    hidden_msg = group_tokens * model.hidden_size * act
    c_dense = [0.0, 0.0]
    c_moe = [0.0, 0.0]
    add(c_dense, coll("ffn_all_reduce", "all_reduce", f, hidden_msg, f), dense_layers)
    if model.is_moe:
        if p.ep > 1:
            routed_msg = routed_tokens * model.hidden_size * act
            send = routed_msg * model.experts_per_token / p.ep
            add(c_moe, coll("moe_dispatch_combine", "all_to_all", p.ep, send, fr), 2 * moe_layers)
            add(c_moe, coll("moe_expert_all_reduce", "all_reduce", lay.etp, send, fr), moe_layers)
            add(c_moe, coll("moe_all_gather", "all_gather", p.ep, routed_msg, fr), moe_layers)
        else:
            add(c_moe, coll("ffn_all_reduce", "all_reduce", f, hidden_msg, f), moe_layers)
    c_pipe = (
        comm.send_seconds(hw, micro * model.hidden_size * act, 2 * p.stage_gpus) if pp > 1 else 0.0
    )
    comm_raw = {
        "attention": pp * sum(c_attn),
        "ffn": pp * (sum(c_dense) + sum(c_moe)),
        "pipeline": pp * c_pipe,
    }

    attn_window = max(compute["projections"] + compute["attention"], hbm["projections"] + hbm["kv"])
    ffn_window = max(
        compute["dense_ffn"] + compute["shared_ffn"] + compute["routed_ffn"],
        hbm["dense_ffn"] + hbm["shared_ffn"] + hbm["routed_ffn"],
    )

    def expose(parts: list[float], hide: float) -> float:
        lat, bw = pp * parts[0], pp * parts[1]
        if acc.latency_exposed:
            return lat + max(0.0, bw - hide)
        return max(0.0, lat + bw - hide)

    exposed = {
        "attention": expose(c_attn, acc.attention_overlap_ratio * attn_window),
        "ffn": (
            expose([c_dense[0] + c_moe[0], c_dense[1] + c_moe[1]], acc.ffn_overlap_ratio * ffn_window)
            if acc.moe_comm_overlap_ratio < 0  # one FFN window hides both (the default)
            else expose(c_dense, acc.ffn_overlap_ratio * ffn_window)
            + expose(c_moe, acc.moe_comm_overlap_ratio * ffn_window)
        ),
        "pipeline": comm_raw["pipeline"],
    }
    if acc.cost_scope == "weights":
        # The paper's differential view: time only the weight path. KV reads, the attention
        # core and communication count as common to MoE and dense twin and are left off the
        # step; flops, hbm_bytes and comm_seconds still report what the step physically does.
        compute["attention"] = 0.0
        hbm["kv"] = 0.0
        exposed = dict.fromkeys(exposed, 0.0)
    elif acc.cost_scope == "paper":
        # The paper's Table 5 terms: the weight path (its eq. 2: attention and KV traffic are the
        # same for MoE and dense twin) plus communication, exposed as the knobs say.
        compute["attention"] = 0.0
        hbm["kv"] = 0.0
    compute_total = sum(compute.values())
    hbm_total = sum(hbm.values())
    exposed_total = sum(exposed.values())
    unhidden = (1.0 - hw.compute_memory_overlap_ratio) * min(compute_total, hbm_total)
    overhead = (
        hw.step_overhead_seconds
        + hw.step_overhead_per_layer_seconds * model.num_layers / pp
        + hw.step_overhead_per_token_seconds * (batch if sequences is None else sequences) / p.dp
    )
    return StepTime(
        batch=batch,
        context_tokens=context_tokens,
        partition=p,
        compute_seconds=compute,
        hbm_seconds=hbm,
        comm_seconds=comm_raw,
        comm_exposed_seconds=exposed,
        compute_total_seconds=compute_total,
        hbm_total_seconds=hbm_total,
        comm_total_seconds=sum(comm_raw.values()),
        comm_exposed_total_seconds=exposed_total,
        total_seconds=max(compute_total, hbm_total) + unhidden + exposed_total + overhead,
        flops={k: pp * v for k, v in flops.items()},
        unhidden_seconds=unhidden,
        overhead_seconds=overhead,
        hbm_bytes={k: pp * v for k, v in hbm_bytes.items()},
        distinct_experts_per_layer=distinct,
        tokens_per_expert=per_expert,
    )
