"""The seam's routing bind on the three kinds of source vLLM knows, with stand-in layers.

The stand-ins subclass vLLM's real classes (MoERunner, BaseRouter, FusedMoEExpertsMonolithic) and
skip their constructors, so vLLM's own `bind_routed_experts_capturer` classifies them exactly as it
classifies a served model's layers: a router hook, a monolithic kernel's routing sink, and a
model-level capture source (DeepSeek-V4, Kimi-K3). What is checked: every source counts into its
slot, a hook another listener set first still gets every call, and vLLM's own later bind (the
`--enable-return-routed-experts` capturer) joins the fan-out instead of replacing the plugin.
The same paths on a served model are in tests/integration/test_runners_v2.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.layers.fused_moe import routed_experts_capturer as rec  # noqa: E402
from vllm.model_executor.layers.fused_moe.layer import MoERunner  # noqa: E402
from vllm.model_executor.layers.fused_moe.modular_kernel import (  # noqa: E402
    FusedMoEExpertsMonolithic,
)
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter  # noqa: E402

from moe_reuse.plugin.vllm import routing  # noqa: E402

K = 2


class _Router(BaseRouter):
    def __init__(self) -> None:  # vLLM's constructor needs a full MoE config; the hook does not
        self.capture_fn = None

    def _compute_routing(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    @property
    def routing_method_type(self) -> Any:
        raise NotImplementedError

    def fire(self, ids: torch.Tensor) -> None:  # what BaseRouter.select_experts does
        if self.capture_fn is not None:
            self.capture_fn(ids)


class _Monolithic(FusedMoEExpertsMonolithic):
    def __init__(self) -> None:
        self.moe_config = SimpleNamespace(ep_size=1, use_ep=False, dp_size=1, max_num_tokens=8,
                                          experts_per_token=K, device="cpu")

    def supports_routing_replay_capture(self) -> bool:
        return True

    activation_format = _supports_current_device = _supports_no_act_and_mul = None  # type: ignore
    _supports_quant_scheme = _supports_activation = _supports_parallel_config = None  # type: ignore


def _runner(layer: int, monolithic: bool) -> MoERunner:
    r = MoERunner.__new__(MoERunner)
    torch.nn.Module.__init__(r)
    r.layer_name = f"model.layers.{layer}.mlp.experts"
    quant = SimpleNamespace(is_monolithic=monolithic)
    if monolithic:
        quant.moe_kernel = SimpleNamespace(impl=SimpleNamespace(fused_experts=_Monolithic()))
    r.routed_experts = SimpleNamespace(quant_method=quant, routing_sink=None)
    r.router = None if monolithic else _Router()
    return r


class _ModelSource(torch.nn.Module):
    """A model-level source: any module with `layer_id` and `capture_fn` (vLLM's Protocol)."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer_id = layer
        self.capture_fn = None

    def fire(self, ids: torch.Tensor) -> None:
        if self.capture_fn is not None:
            self.capture_fn(ids)


def _model() -> torch.nn.Module:
    m = torch.nn.Module()
    m.a, m.b, m.c = _runner(1, False), _runner(3, True), _ModelSource(5)
    return m


def _fire(m: Any, ids: list[torch.Tensor]) -> None:
    m.a.router.fire(ids[0])
    m.b.routed_experts.routing_sink.capture_fn(ids[1])  # what a monolithic kernel's op calls
    m.c.fire(ids[2])


class _Log:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[list[int]]]] = []

    def capture(self, layer_id: int, ids: torch.Tensor) -> None:
        self.calls.append((layer_id, ids.tolist()))


def _ids() -> list[torch.Tensor]:
    return [torch.tensor([[i, i + 1]]) for i in range(3)]


def test_all_three_kinds_are_found_and_counted_in_their_slots() -> None:
    m = _model()
    sources = routing.find_routing_sources(m)
    assert [(s.kind, s.layer_id) for s in sources] == [("router", 1), ("sink", 3), ("model", 5)]
    got: list[tuple[int, list[list[int]]]] = []
    cap = routing.FanoutCapturer({1: 0, 3: 1, 5: 2}, lambda slot, ids: got.append((slot, ids.tolist())))
    assert routing.bind(m, cap) == 3
    _fire(m, _ids())
    assert got == [(0, [[0, 1]]), (1, [[1, 2]]), (2, [[2, 3]])]
    assert cap.unexpected_layers == set()


def test_a_hook_set_before_us_keeps_receiving_every_call() -> None:
    m = _model()
    theirs: list[list[list[int]]] = []
    m.a.router.capture_fn = lambda ids: theirs.append(ids.tolist())
    m.c.capture_fn = lambda ids: theirs.append(ids.tolist())
    got: list[int] = []
    routing.bind(m, routing.FanoutCapturer({1: 0, 3: 1, 5: 2}, lambda s, _ids: got.append(s)))
    _fire(m, _ids())
    assert got == [0, 1, 2] and theirs == [[[0, 1]], [[2, 3]]]


def test_vllm_binding_its_own_capturer_later_joins_the_fanout() -> None:
    """`--enable-return-routed-experts`: vLLM binds at KV-cache init, after the plugin did."""
    m = _model()
    got: list[int] = []
    routing.bind(m, routing.FanoutCapturer({1: 0, 3: 1, 5: 2}, lambda s, _ids: got.append(s)))
    vllm_capturer = _Log()
    rec.bind_routed_experts_capturer(m, vllm_capturer)  # the patched name, as vLLM calls it
    _fire(m, _ids())
    assert got == [0, 1, 2]
    assert vllm_capturer.calls == [(1, [[0, 1]]), (3, [[1, 2]]), (5, [[2, 3]])]


def test_a_model_the_plugin_does_not_record_is_bound_by_vllm_as_before() -> None:
    m = _model()
    vllm_capturer = _Log()
    rec.bind_routed_experts_capturer(m, vllm_capturer)
    _fire(m, _ids())
    assert [c[0] for c in vllm_capturer.calls] == [1, 3, 5]


def test_unknown_layers_are_noted_not_counted_and_a_model_without_sources_fails_loudly() -> None:
    m = _model()
    got: list[int] = []
    cap = routing.FanoutCapturer({1: 0}, lambda s, _ids: got.append(s))
    routing.bind(m, cap)
    _fire(m, _ids())
    assert got == [0] and cap.unexpected_layers == {3, 5}
    with pytest.raises(ValueError, match="No supported MoE router"):
        routing.bind(torch.nn.Linear(2, 2), routing.FanoutCapturer({}, lambda s, _ids: None))


def test_a_drafters_own_moe_layers_are_counted_as_unrecorded() -> None:
    """`facts.draft_moe_layers`: the drafter's routing sources, not the ones it shares with the
    target (an MTP head may reuse target modules), and 0 without a drafter or a model-free one."""
    from moe_reuse.plugin.vllm import facts

    target = _model()
    draft = torch.nn.Module()
    draft.own_a, draft.own_b, draft.shared = _runner(1, False), _ModelSource(2), target.a
    runner = SimpleNamespace(get_draft_model=lambda: draft)
    assert facts.draft_moe_layers(runner, target) == 2
    assert facts.draft_moe_layers(SimpleNamespace(get_draft_model=lambda: None), target) == 0
    assert facts.draft_moe_layers(SimpleNamespace(), target) == 0  # a runner without drafters

    def broken() -> None:
        raise RuntimeError("drafter not loaded")

    assert facts.draft_moe_layers(SimpleNamespace(get_draft_model=broken), target) == 0
