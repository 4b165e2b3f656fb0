"""Alpha-beta costs of the collectives a decode step issues.

Each collective is a ring (all-reduce: reduce-scatter then all-gather, 2(n-1) steps) or a
pairwise exchange (all-to-all, n-1 steps); every step pays the link's start-up latency and
the bytes pay the per-GPU link bandwidth. A group whose GPUs sit in one node uses the
intra-node fabric; a group that spans nodes is costed entirely at the inter-node rates, since
a ring is as slow as its slowest hop.
"""

from __future__ import annotations

from .hardware import HardwareSpec


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


# Ring steps (latency multiplier) and bandwidth factor of each collective on n ranks.
_SHAPES = {
    "all_reduce": (lambda n: 2 * (n - 1), lambda n: 2 * (n - 1) / n),
    "all_gather": (lambda n: n - 1, lambda n: (n - 1) / n),
    "all_to_all": (lambda n: n - 1, lambda n: (n - 1) / n),
}


def collective_parts(
    hw: HardwareSpec,
    kind: str,
    n: int,
    message_bytes: float,
    span_gpus: int,
    *,
    node_gpus: int = 0,
    startup_seconds: float = -1.0,
    scale_out: bool = False,
) -> tuple[float, float]:
    """(start-up seconds, bandwidth seconds) of one collective, so callers can overlap them apart.

    `node_gpus` > 0 overrides the hardware's node size (which groups cross the scale-out
    fabric); `scale_out` costs the collective on the scale-out link whatever its span;
    `startup_seconds` >= 0 charges one start-up per collective instead of one link
    latency per ring step. With the defaults the sum equals the `*_seconds` functions above.
    """
    if n <= 1 or message_bytes <= 0:
        return 0.0, 0.0
    steps, factor = _SHAPES[kind]
    inside = not scale_out and span_gpus <= (node_gpus or hw.gpus_per_node)
    alpha, beta = (
        (hw.intra_node_latency_seconds, hw.intra_node_bandwidth_bytes_per_second)
        if inside
        else (hw.inter_node_latency_seconds, hw.inter_node_bandwidth_bytes_per_second)
    )
    startup = startup_seconds if startup_seconds >= 0 else steps(n) * alpha
    return startup, factor(n) * message_bytes / beta
