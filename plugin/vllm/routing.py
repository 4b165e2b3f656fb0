"""Routing sources: where vLLM exposes each MoE layer's top-k expert ids, and how we listen.

vLLM 0.32 knows three kinds of routing source, and binds its own routed-experts capturer
(`--enable-return-routed-experts`) to all three through `bind_routed_experts_capturer(model, c)`,
which calls `c.capture(layer_id, topk_ids)`:
- `BaseRouter.set_capture_fn` on `MoERunner` routers (every CPU model, most GPU ones);
- a `RoutedExpertsSink` on `MoERunner.routed_experts` for monolithic MoE kernels, where routing
  happens inside the kernel (common on GPU);
- model-level `RoutedExpertsCaptureSource` modules (DeepSeek-V4, Kimi-K3 GPU models).

We bind through that same function, so every kind is covered and stays covered when vLLM adds one.
Capture hooks are single slots, so binding must never silently evict another listener:
- a hook that already holds a function (another plugin's) is chained: ours runs, then theirs;
- vLLM's own later bind (its aux-output connector binds at KV-cache init, after we did) is
  intercepted and its capturer becomes a downstream of ours, so `--enable-return-routed-experts`
  keeps returning routed experts with the plugin on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

logger = logging.getLogger("vllm.moe_reuse")

SOURCE_KINDS = ("router", "sink", "model")


class Capturer(Protocol):
    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class RoutingSource:
    """One place routing can be observed: kind (router, sink, model) and the model layer id."""

    kind: str
    layer_id: int


def find_routing_sources(model: torch.nn.Module,
                         skip: frozenset[int] = frozenset()) -> list[RoutingSource]:
    """Every routing source vLLM's binder would bind, sorted by layer id (no side effects).

    Mirrors the classification of `bind_routed_experts_capturer`; only used to size the recorder
    before binding, so a kind this misses is still bound (and counted in `unexpected_layers`).
    Modules whose `id()` is in `skip` are not counted (a drafter's modules shared with the target).
    """
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import (
        RoutedExpertsCaptureSource,
    )

    out: list[RoutingSource] = []
    for module in model.modules():
        if id(module) in skip:
            continue
        if isinstance(module, RoutedExpertsCaptureSource):
            out.append(RoutingSource("model", int(module.layer_id)))
        elif isinstance(module, MoERunner):
            quant = getattr(module, "_quant_method", None)
            kind = "sink" if getattr(quant, "is_monolithic", False) else "router"
            out.append(RoutingSource(kind, int(module.layer_id)))
    return sorted(out, key=lambda s: s.layer_id)


class FanoutCapturer:
    """The capturer we bind: counts into `record(slot, ids)`, then feeds every downstream capturer.

    `capture` runs inside the forward (traced by Dynamo on CPU, run inside the opaque MoE op and
    captured by CUDA graphs on GPU): dict lookups and calls only, no host sync.
    """

    def __init__(self, slots: dict[int, int], record: Callable[[int, torch.Tensor], None]) -> None:
        self.slots = dict(slots)
        self.record = record
        self.downstream: list[Capturer] = []
        self.unexpected_layers: set[int] = set()

    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        slot = self.slots.get(layer_id)
        if slot is not None:
            self.record(slot, topk_ids)
        else:
            self.unexpected_layers.add(layer_id)
        for d in self.downstream:
            d.capture(layer_id, topk_ids)


def _hook_slots(model: torch.nn.Module) -> list[tuple[Any, str]]:
    """(object, attribute) of every capture hook in the model: module and router `capture_fn`,
    and the routed-experts `routing_sink`."""
    slots: list[tuple[Any, str]] = []
    for module in model.modules():
        if hasattr(module, "capture_fn"):
            slots.append((module, "capture_fn"))
        router = getattr(module, "router", None)
        if router is not None and hasattr(router, "capture_fn"):
            slots.append((router, "capture_fn"))
        experts = getattr(module, "routed_experts", None)
        if experts is not None and hasattr(experts, "routing_sink"):
            slots.append((experts, "routing_sink"))
    return slots


def _chain(ours: Callable[[torch.Tensor], None], theirs: Callable[[torch.Tensor], None]) -> Any:
    def chained(topk_ids: torch.Tensor) -> None:
        ours(topk_ids)
        theirs(topk_ids)

    return chained


def bind(model: torch.nn.Module, capturer: FanoutCapturer) -> int:
    """Bind `capturer` to every routing source through vLLM's own binder; chain existing hooks.

    Returns the number of hooks bound. Raises what vLLM's binder raises (unsupported monolithic
    kernel or router, or no source at all): the caller reports it as a bind failure.
    """
    from vllm.model_executor.layers.fused_moe import routed_experts_capturer as rec

    before = {(id(o), a): getattr(o, a) for o, a in _hook_slots(model)}
    _original_binder(rec)(model, capturer)
    bound = 0
    for obj, attr in _hook_slots(model):
        old = before.get((id(obj), attr))
        new = getattr(obj, attr)
        if new is None or new is old:
            continue
        bound += 1
        if old is None:
            continue
        if attr == "routing_sink":  # another listener's sink: call it after ours
            new.capture_fn = _chain(new.capture_fn, old.capture_fn)
        else:
            setattr(obj, attr, _chain(new, old))
        logger.info("moe_reuse: chained to an existing capture hook on %s", type(obj).__name__)
    model._moe_reuse_capturer = capturer  # type: ignore[assignment]
    _intercept_vllm_binds(rec)
    return bound


def _original_binder(rec: Any) -> Callable[[torch.nn.Module, Any], None]:
    fn = rec.bind_routed_experts_capturer
    return getattr(fn, "_moe_reuse_original", fn)


def _intercept_vllm_binds(rec: Any) -> None:
    """Make later binds on a model we record join our fan-out instead of replacing our hooks.

    vLLM's aux-output connector imported the binder by name, so its module is patched too.
    """
    original = _original_binder(rec)
    if getattr(rec.bind_routed_experts_capturer, "_moe_reuse_original", None) is not None:
        return

    @functools.wraps(original)
    def bind_routed_experts_capturer(model: torch.nn.Module, capturer: Any) -> None:
        ours = getattr(model, "_moe_reuse_capturer", None)
        if ours is None or capturer is ours:
            original(model, capturer)
            return
        ours.downstream.append(capturer)
        logger.info("moe_reuse: %s joins the plugin's routing capture (not replacing it)",
                    type(capturer).__name__)

    bind_routed_experts_capturer._moe_reuse_original = original  # type: ignore[attr-defined]
    rec.bind_routed_experts_capturer = bind_routed_experts_capturer
    try:
        from vllm.distributed.aux_output_connector import worker as aux

        if getattr(aux, "bind_routed_experts_capturer", None) is original:
            aux.bind_routed_experts_capturer = bind_routed_experts_capturer
    except ImportError:
        pass
