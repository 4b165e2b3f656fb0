"""The suite runs on two pytest-xdist workers (`make test`: `-n 2`), each with its own vLLM servers.

Why two: a vLLM server's start-up is three single-threaded Python processes importing vLLM one
after the other (API server, engine core, worker: about 40 of a test's 50 s on a 2-core host), so
one test at a time leaves a core idle for most of the run. Measured on a 2-core VM: two
single-server tests took 72 s side by side against 48 + 50 s one after the other, and the whole
`CI=true` suite 1,701 s on two workers against 2,804 s in one process.

What this file adds:
- each xdist worker's servers bind their vLLM worker's OpenMP threads to a core of their own.
  vLLM's CPU backend binds its first worker to core 0 whatever else runs, so two servers started
  side by side would otherwise spin on the same core while the other one idles. A test that sets
  `VLLM_CPU_OMP_THREADS_BIND` itself (the TP=2 and PP=2 servers: `0|1`) keeps its own;
- a test that leaves torch's default dtype changed fails (tests share a worker process, in an
  order that varies from run to run).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest


def pytest_configure() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist
    if not worker.startswith("gw") or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpus[int(worker[2:]) % len(cpus)])


@pytest.fixture(autouse=True)
def _torch_default_dtype_kept() -> Iterator[None]:
    """A test that leaves torch's process-wide default dtype changed fails itself, rather than
    whichever test its xdist worker runs next (as test_tiny_models' concurrent builders once left
    bfloat16 for test_gpu_check_script)."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_default_dtype() != torch.float32:
        left = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        pytest.fail(f"the test left torch's default dtype at {left} (float32 put back)")
