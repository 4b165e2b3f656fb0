"""Collective timing's installation (plugin/vllm/comm.py): host clocks on CPU, nothing by default on
CUDA, the device clock's stamps when asked for, around vLLM's own function (which stays)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moe_reuse.plugin.vllm import comm

moe_runner = pytest.importorskip("vllm.model_executor.layers.fused_moe.runner.moe_runner")
parallel_state = pytest.importorskip("vllm.distributed.parallel_state")


@pytest.fixture
def all_reduce(monkeypatch):  # noqa: ANN001, ANN201
    calls: list[str] = []

    def vllm_all_reduce(x: torch.Tensor) -> torch.Tensor:
        calls.append("all_reduce")
        return x * 2

    monkeypatch.setattr(moe_runner, "tensor_model_parallel_all_reduce", vllm_all_reduce)
    return calls


def test_cuda_without_device_timing_installs_nothing(all_reduce) -> None:  # noqa: ANN001
    before = moe_runner.tensor_model_parallel_all_reduce
    assert comm.install("tp_all_reduce", "cuda:0", lambda op, ns: None) == "off"
    assert moe_runner.tensor_model_parallel_all_reduce is before


def test_device_stamps_bracket_vllms_own_all_reduce(all_reduce) -> None:  # noqa: ANN001
    calls = all_reduce

    def stamp(op: int, sign: int) -> None:
        calls.append(f"stamp {op} {sign:+d}")

    assert comm.install("tp_all_reduce", "cuda:0", lambda op, ns: None, stamp=stamp) == "device"
    out = moe_runner.tensor_model_parallel_all_reduce(torch.ones(2))
    assert out.tolist() == [2.0, 2.0]  # vLLM's function ran, its result returned unchanged
    assert calls == [f"stamp {comm.ALL_REDUCE} -1", "all_reduce", f"stamp {comm.ALL_REDUCE} +1"]


def test_device_stamps_bracket_ep_dispatch_and_combine(monkeypatch) -> None:  # noqa: ANN001
    calls: list[str] = []
    manager = SimpleNamespace(dispatch=lambda *a, **k: calls.append("dispatch") or "d",
                              combine=lambda *a, **k: calls.append("combine") or "c")
    group = SimpleNamespace(device_communicator=SimpleNamespace(all2all_manager=manager))
    monkeypatch.setattr(parallel_state, "get_ep_group", lambda: group)

    def stamp(op: int, sign: int) -> None:
        calls.append(f"{op}{sign:+d}")

    assert comm.install("ep_all_to_all", "cuda:1", lambda op, ns: None, stamp=stamp) == "device"
    assert manager.dispatch(1, k=2) == "d" and manager.combine(3) == "c"
    a = comm.ALL_TO_ALL
    assert calls == [f"{a}-1", "dispatch", f"{a}+1", f"{a}-1", "combine", f"{a}+1"]


def test_host_clock_on_cpu_for_ep(monkeypatch) -> None:  # noqa: ANN001
    manager = SimpleNamespace(dispatch=lambda x: x, combine=lambda x: x)
    group = SimpleNamespace(device_communicator=SimpleNamespace(all2all_manager=manager))
    monkeypatch.setattr(parallel_state, "get_ep_group", lambda: group)
    got: list[tuple[int, int]] = []
    assert comm.install("ep_all_to_all", "cpu", lambda op, ns: got.append((op, ns))) == "host"
    manager.dispatch(1)
    manager.combine(2)
    assert [op for op, _ in got] == [comm.ALL_TO_ALL, comm.ALL_TO_ALL]
    assert all(ns >= 0 for _, ns in got)


def test_no_manager_means_off(monkeypatch) -> None:  # noqa: ANN001
    group = SimpleNamespace(device_communicator=SimpleNamespace())
    monkeypatch.setattr(parallel_state, "get_ep_group", lambda: group)
    assert comm.install("ep_all_to_all", "cuda:0", lambda op, ns: None,
                        stamp=lambda op, sign: None) == "off"
    assert comm.install("none", "cpu", lambda op, ns: None) == "off"
