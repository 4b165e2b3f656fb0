"""The engine's cores apart from the front end's, for a server the harness starts on a small host.

Why: vLLM's engine processes wait for each other by spinning. The shared-memory message queue
between the engine core and its workers yields in a loop for a second after each read, so under
load the engine core and the worker each keep a core busy even while the other computes. vLLM's
CPU backend binds the worker's OMP threads to some cores (on a 2-core host: the worker on core 0)
and leaves every other process to the kernel's scheduler. The API server, and a load generator on
the same host, then share a core with the spinning engine core, and the API server starves for
tens of milliseconds at a time; vLLM coalesces the tokens it could not stream, and a streaming
client receives whole responses in one read. Measured on the 2-core VM (bundled Qwen3-MoE, 32
output tokens, streamed, concurrency 1, 16 and 64, three rounds of each placement on one server):
with the default placement 336 of 816 requests, in 6 of 9 levels, arrived in one read; with the
engine core on the worker's core and the API server and the client on the other, none did
(`benchmarks/bench_cpu_split.py`, results/bench_cpu_split.txt). A serving host keeps its front
end off the engine's cores; `split_engine_cpus` does the same for the servers `moe-reuse
calibrate` and the latency benchmark start, so that both measure one stable arrangement. Where
vLLM binds nothing (GPU hosts), or the engine holds every core, it changes nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ENGINE_PREFIX = "VLLM::"  # vLLM titles its engine-core and worker processes so (setproctitle)


@dataclass(frozen=True)
class CpuSplit:
    engine: frozenset[int]  # the cores vLLM bound its workers to: the engine core joins them
    frontend: frozenset[int]  # the others: the API server and the caller (the client)


def plan_split(
    processes: Mapping[int, tuple[str, Mapping[int, frozenset[int]]]],
    allowed: Iterable[int],
) -> CpuSplit | None:
    """Pure: the split for a server's processes, ``{pid: (name, {tid: affinity})}``, on the cores
    ``allowed``; None when vLLM bound no engine thread to a strict subset of them, or bound it to
    all of them (nothing left for the front end)."""
    every = frozenset(allowed)
    engine: set[int] = set()
    for name, threads in processes.values():
        if name.startswith(ENGINE_PREFIX):
            for aff in threads.values():
                if aff and aff < every:
                    engine |= aff
    frontend = every - engine
    if not engine or not frontend:
        return None
    return CpuSplit(frozenset(engine), frontend)


def moves(
    processes: Mapping[int, tuple[str, Mapping[int, frozenset[int]]]], split: CpuSplit
) -> dict[int, frozenset[int]]:
    """Pure: ``{tid: new affinity}`` for the threads to move. An engine thread already bound
    inside the engine's cores keeps vLLM's binding (one OMP thread per core); every other engine
    thread gets the engine's cores, every front-end thread the front end's."""
    out: dict[int, frozenset[int]] = {}
    for name, threads in processes.values():
        target = split.engine if name.startswith(ENGINE_PREFIX) else split.frontend
        for tid, aff in threads.items():
            if target is split.engine and aff and aff <= split.engine:
                continue
            if aff != target:
                out[tid] = target
    return out


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            out.append(int(entry))
    return out


def group_processes(pgid: int) -> dict[int, tuple[str, dict[int, frozenset[int]]]]:
    """The live processes of process group ``pgid``: name and each thread's affinity."""
    out: dict[int, tuple[str, dict[int, frozenset[int]]]] = {}
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            threads = {int(tid): frozenset(os.sched_getaffinity(int(tid)))
                       for tid in os.listdir(f"/proc/{pid}/task")}
        except OSError:  # gone meanwhile
            continue
        out[pid] = (name, threads)
    return out


def split_engine_cpus(pgid: int) -> CpuSplit | None:
    """Move the server in process group ``pgid`` to its split (see the module's docstring) and
    return it; None, and nothing moved, where there is none. The caller pins itself (a client)."""
    processes = group_processes(pgid)
    split = plan_split(processes, os.sched_getaffinity(0) | _group_cores(processes))
    if split is None:
        return None
    for tid, cpus in moves(processes, split).items():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)
    return split


def _group_cores(processes: Mapping[int, tuple[str, Mapping[int, frozenset[int]]]]) -> set[int]:
    """Every core some thread of the group may use (the caller may already be pinned)."""
    return {c for _, threads in processes.values() for aff in threads.values() for c in aff}
