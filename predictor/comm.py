"""Alpha-beta costs of the collectives a decode step issues.

Each collective is a ring (all-reduce: reduce-scatter then all-gather, 2(n-1) steps) or a
pairwise exchange (all-to-all, n-1 steps); every step pays the link's start-up latency and
the bytes pay the per-GPU link bandwidth. A group whose GPUs sit in one node uses the
intra-node fabric; a group that spans nodes is costed entirely at the inter-node rates, since
a ring is as slow as its slowest hop.
"""

from __future__ import annotations

from .specs import HardwareSpec


def link(hw: HardwareSpec, span_gpus: int) -> tuple[float, float]:
    """(latency_seconds, bandwidth_bytes_per_second) for a group spanning `span_gpus` GPUs."""
    if span_gpus <= hw.gpus_per_node:
        return hw.intra_node_latency_seconds, hw.intra_node_bandwidth_bytes_per_second
    return hw.inter_node_latency_seconds, hw.inter_node_bandwidth_bytes_per_second


def all_reduce_seconds(hw: HardwareSpec, n: int, message_bytes: float, span_gpus: int) -> float:
    """Ring all-reduce of a `message_bytes` buffer held by each of n ranks."""
    if n <= 1 or message_bytes <= 0:
        return 0.0
    alpha, beta = link(hw, span_gpus)
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * message_bytes / beta


def all_gather_seconds(hw: HardwareSpec, n: int, gathered_bytes: float, span_gpus: int) -> float:
    """Ring all-gather whose result is `gathered_bytes` on every rank."""
    if n <= 1 or gathered_bytes <= 0:
        return 0.0
    alpha, beta = link(hw, span_gpus)
    return (n - 1) * alpha + (n - 1) / n * gathered_bytes / beta


def all_to_all_seconds(
    hw: HardwareSpec, n: int, send_bytes_per_rank: float, span_gpus: int
) -> float:
    """Pairwise all-to-all where every rank sends `send_bytes_per_rank` spread over the others."""
    if n <= 1 or send_bytes_per_rank <= 0:
        return 0.0
    alpha, beta = link(hw, span_gpus)
    return (n - 1) * alpha + (n - 1) / n * send_bytes_per_rank / beta


def send_seconds(hw: HardwareSpec, message_bytes: float, span_gpus: int) -> float:
    """Point-to-point send between pipeline stages."""
    if message_bytes <= 0:
        return 0.0
    alpha, beta = link(hw, span_gpus)
    return alpha + message_bytes / beta
