"""The worker/reader split with torch alone: the raw ring, and the reader against in-process folding.

A worker-mode session (raw ring + status file, exactly what `worker_runtime` binds) and an
in-process session are driven through the same steps; the reader's snapshot of the first must equal
the second's, key by key. The raw ring's own guarantees (lapping counted, a slot reused mid-copy
never folded) and the reader's takeover (a second reader resumes from the first one's snapshot,
nothing lost or counted twice) are checked on the real files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_reuse.plugin import snapshot as snap_io
from moe_reuse.plugin.reader.service import ReaderService, RunReader
from moe_reuse.plugin.recorder import rawstream
from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession
from moe_reuse.plugin.snapshot import scan as snap_scan

L, E, K = 3, 8, 2
BM = ByteModel((100, 200, 300), shared_expert_bytes=7, dense_ffn_bytes=11, attention_bytes=13,
               embedding_bytes=17, kv_bytes_per_token=2, kv_groups=((1.5, 16, 0), (0.5, 0, 0)))
LABELS = {"model": "m", "engine": "0", "rank": "3"}


def _layout(ring_steps: int = 8) -> RingLayout:
    return RingLayout(L, E, K, max_tokens=64, ring_steps=ring_steps)


def _worker_session(directory: Path, cap: int = 64) -> RecorderSession:
    dfd = snap_io.open_dir(directory, create=True)
    try:
        raw = rawstream.RawWriter(dfd, rawstream.raw_name("0", "3"), L, E + 1, cap)
    finally:
        os.close(dfd)
    path = directory / rawstream.status_name("0", "3")
    s = RecorderSession(_layout(), BM, labels=LABELS, info={"version": "t"}, layer_ids=[1, 2, 3],
                        publish=lambda st: snap_io.write_snapshot(path, st, fault_stage=None),
                        raw=raw, flush_interval_s=0.0)
    s.status_extra["options"] = {"flush_interval_s": 0.2}
    return s


def _local_session() -> RecorderSession:
    return RecorderSession(_layout(), BM, labels=LABELS, info={"version": "t"},
                           layer_ids=[1, 2, 3], publish=lambda _s: None)


def _drive(sessions: list[RecorderSession], steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        n = int(rng.integers(1, 6))
        sched = rng.integers(1, 5, size=n)
        computed = rng.integers(0, 40, size=n)
        prompt = rng.integers(1, 40, size=n)
        routing = [torch.randint(0, E, (int(sched.sum()), K)) for _ in range(L)]
        for s in sessions:
            s.step_started()
            s.step_prepared(sched, computed >= prompt, computed)
            for layer, ids in enumerate(routing):
                s.capture_fn(layer)(ids)
            s.step_finished()
            if s._completed - s._read >= 3:
                s.flush()
    for s in sessions:
        s.flush()


def _same_totals(a: dict, b: dict) -> list[str]:
    a, b = dict(a), dict(b)
    a.pop("duration_s"), b.pop("duration_s")  # wall time: the only figure that may differ
    return sorted(k for k in set(a) | set(b) if not np.array_equal(a.get(k), b.get(k)))


def test_the_reader_derives_what_in_process_folding_derives(tmp_path: Path) -> None:
    worker, local = _worker_session(tmp_path), _local_session()
    assert worker.totals is None and worker.reader is None  # the worker keeps no totals
    _drive([worker, local], steps=29, seed=3)
    run = RunReader(tmp_path)
    assert run.poll() == 29
    got = snap_io.read_snapshots(tmp_path)
    assert len(got) == 1
    snap, want = got[0], local.snapshot()
    assert _same_totals(snap["totals"], want["totals"]) == []
    assert snap["totals"]["tokens"].sum() > 0 and snap["totals"]["selfcheck_mismatch"] == 0
    for key in ("labels", "layer_ids", "top_k", "enabled", "reason", "errors", "degraded"):
        assert snap[key] == want[key], key
    assert snap["pid"] == os.getpid() and snap["raw"] == {"cursor": 29, "missed": 0}
    # the worker's buffers (its raw ring among them) reach the exported gauges
    buffers = {tuple(k): v for k, v in snap["gauges"]["buffer_bytes"]["samples"]}
    assert buffers[("raw_ring",)] == rawstream.file_bytes(L, E + 1, 64)
    run.close()


def _exposition(snap: dict) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from moe_reuse.plugin.exporters.families import snapshot_families

    class _C:
        def collect(self) -> list:
            return snapshot_families([snap])

    reg = CollectorRegistry()
    reg.register(_C())  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_a_scan_in_the_reader_s_process_takes_the_snapshot_it_wrote_from_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector beside the reader (vLLM's API server) neither reads nor decodes the files
    that reader wrote, and renders exactly what decoding them renders; a file replaced since by
    another process is decoded."""
    worker = _worker_session(tmp_path)
    _drive([worker], steps=11, seed=5)
    run = RunReader(tmp_path)
    assert run.poll() == 11
    decode = snap_io.decode
    with monkeypatch.context() as m:
        m.setattr(snap_scan, "decode", lambda *a, **k: pytest.fail("decoded a file written here"))
        mem = snap_io.scan_snapshots(tmp_path).ranks[0].snapshot
    snap_io.WRITTEN_HERE.clear()
    disk = snap_io.scan_snapshots(tmp_path).ranks[0].snapshot
    assert mem is not disk and mem["totals"]["tokens"].sum() > 0
    assert _exposition(mem) == _exposition(disk)
    _drive([worker], steps=4, seed=6)
    assert run.poll() == 4  # written (and remembered) again
    other = {**disk, "labels": {**disk["labels"], "model": "other"}}
    snap_io.write_snapshot(tmp_path / "e0-r3.npz", other)  # as another process would: not ours
    decoded: list[int] = []
    monkeypatch.setattr(snap_scan, "decode", lambda *a, **k: decoded.append(1) or decode(*a, **k))
    assert snap_io.scan_snapshots(tmp_path).ranks[0].snapshot["labels"]["model"] == "other"
    assert decoded == [1]
    run.close()


def test_the_memory_of_written_snapshots_keeps_one_per_path_and_is_bounded(tmp_path: Path) -> None:
    memo = snap_io._WrittenHere(cap=2)
    sts = {}
    for name in ("a", "b", "a", "c"):
        (tmp_path / name).write_bytes(name.encode() * 3)
        sts[name] = (tmp_path / name).stat()
        memo.remember(tmp_path / name, sts[name], {"name": name})
    assert memo.recall(sts["a"]) == {"name": "a"} and memo.recall(sts["c"]) == {"name": "c"}
    assert memo.recall(sts["b"]) is None  # the oldest path, past the cap
    (tmp_path / "a").write_bytes(b"changed")  # same inode, another size and mtime
    assert memo.recall((tmp_path / "a").stat()) is None
    memo.forget(tmp_path / "c")
    assert memo.recall(sts["c"]) is None


def test_a_second_reader_takes_over_where_the_first_left(tmp_path: Path) -> None:
    worker, local = _worker_session(tmp_path), _local_session()
    first, second = RunReader(tmp_path), RunReader(tmp_path)
    _drive([worker, local], steps=11, seed=5)
    assert first.poll(now=0.0) == 11
    assert second.poll(now=0.0) == 0 and not second.leader(now=5.0)  # the lock is held
    first.close()  # its process died: the lock goes with it
    _drive([worker, local], steps=7, seed=6)
    assert second.poll(now=10.0) == 7  # only the steps the first had not read
    snap = snap_io.read_snapshots(tmp_path)[0]
    assert _same_totals(snap["totals"], local.snapshot()["totals"]) == []
    second.close()


def test_a_worker_that_leaves_takes_its_snapshot_along(tmp_path: Path) -> None:
    worker = _worker_session(tmp_path)
    _drive([worker], steps=3, seed=1)
    run = RunReader(tmp_path)
    run.poll()
    st = (tmp_path / "e0-r3.npz").stat()
    assert snap_io.WRITTEN_HERE.recall(st) is not None
    (tmp_path / rawstream.status_name("0", "3")).unlink()
    run.poll()
    assert not (tmp_path / "e0-r3.npz").exists() and run.ranks == {}
    assert snap_io.WRITTEN_HERE.recall(st) is None  # nor kept in memory
    run.close()


class _Bridge:
    def __init__(self) -> None:
        self.published: list[dict] = []

    def publish(self, snap: dict) -> None:
        self.published.append(snap)


def test_a_rank_that_records_nothing_still_reaches_the_multiprocess_files(tmp_path: Path) -> None:
    """A rank that failed to bind writes only `e*.npz` (status only, no raw ring); in
    multiprocess mode the reader is the one writer of value files, so it bridges that too."""
    worker = _worker_session(tmp_path)
    _drive([worker], steps=2, seed=2)
    failed = {"version": 1, "status_only": True, "applicable": True, "enabled": False,
              "reason": "bind_failed", "labels": {"model": "m", "engine": "0", "rank": "5"},
              "info": {}, "errors": {"bind": 1}, "totals": {}}
    snap_io.write_snapshot(tmp_path / "e0-r5.npz", failed, fault_stage=None)
    bridge = _Bridge()
    run = RunReader(tmp_path, bridge)
    run.poll(now=0.0)
    ranks = sorted((p["labels"]["rank"], bool(p.get("status_only"))) for p in bridge.published)
    assert ranks == [("3", False), ("5", True)]  # the recording rank via its reader, 5 as is
    bridge.published.clear()
    run.poll(now=1.0)
    assert [p["labels"]["rank"] for p in bridge.published] == []  # unchanged: not bridged again
    run.close()


def _block(n: int, first: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    counts = np.zeros((L, n, 3, E + 1), dtype=np.int32)
    counts[0, :, 1, 0] = np.arange(first, first + n)  # step i carries i in one cell
    meta = {k: np.zeros((n,) + rawstream.META_DTYPE[k].shape, dtype=rawstream.META_DTYPE[k].base)
            for k in rawstream.META_FIELDS}
    meta["scheduled"] = np.arange(first, first + n)
    return counts, meta


def test_raw_ring_counts_what_a_slow_reader_missed_and_never_folds_a_reused_slot(
        tmp_path: Path) -> None:
    dfd = snap_io.open_dir(tmp_path, create=True)
    try:
        w = rawstream.RawWriter(dfd, "w0-r0.raw", L, E + 1, 8)
        r = rawstream.RawReader(dfd, "w0-r0.raw")
    finally:
        os.close(dfd)
    w.append(*_block(5, 0))
    counts, meta, missed = r.take()
    assert counts.shape == (L, 5, 3, E + 1) and missed == 0
    assert meta["scheduled"].tolist() == counts[0, :, 1, 0].tolist() == [0, 1, 2, 3, 4]
    w.append(*_block(6, 5))
    w.append(*_block(6, 11))  # the reader is now 12 behind an 8-step ring: 4 steps lost
    counts, meta, missed = r.take()
    assert missed == 4 and meta["scheduled"].tolist() == list(range(9, 17))
    w.append(*_block(3, 17))
    w.stamps[17 % 8] = -1  # the writer began reusing step 17's slot while it was being copied
    counts, meta, missed = r.take()
    assert missed == 1 and meta["scheduled"].tolist() == [18, 19]
    assert r.take()[0].shape[1] == 0


def test_raw_ring_refuses_a_file_that_is_not_a_ring(tmp_path: Path) -> None:
    (tmp_path / "w0-r0.raw").write_bytes(b"\0" * 8192)
    os.chmod(tmp_path, 0o700)
    dfd = snap_io.open_dir(tmp_path)
    try:
        with pytest.raises(ValueError, match="not a raw ring"):
            rawstream.RawReader(dfd, "w0-r0.raw")
    finally:
        os.close(dfd)


def test_raw_ring_capacity_holds_seconds_of_a_large_model_and_stays_bounded() -> None:
    big = rawstream.capacity(61, 257, device_ring_steps=16)
    assert big >= 150 and rawstream.file_bytes(61, 257, big) <= 33 * 1024 * 1024
    assert 32768 < rawstream.capacity(4, 9, device_ring_steps=16) <= rawstream.MAX_RECORDS
    assert rawstream.capacity(61, 257, device_ring_steps=256) == 1024  # four device rings


def test_a_restarted_worker_is_read_from_its_new_ring(tmp_path: Path) -> None:
    """Same rank, new worker process (new pid, a new ring file under the same name): the reader
    drops the old mapping and counts the new worker's steps from zero."""
    worker = _worker_session(tmp_path)
    _drive([worker], steps=5, seed=2)
    run = RunReader(tmp_path)
    assert run.poll() == 5
    worker.raw.close()
    again, local = _worker_session(tmp_path), _local_session()
    real_status = again.status
    again.status = lambda: {**real_status(), "pid": os.getpid() + 1}  # type: ignore[method-assign]
    _drive([again, local], steps=4, seed=9)
    assert run.poll() == 4
    snap = snap_io.decode((tmp_path / "e0-r3.npz").read_bytes())  # (its pid is not alive)
    assert snap["pid"] == os.getpid() + 1 and snap["raw"]["cursor"] == 4
    assert _same_totals(snap["totals"], local.snapshot()["totals"]) == []
    run.close()


def _served_qwen3() -> dict:
    from moe_reuse.plugin.harness.tiny_models import model_spec

    return {"hf_config": model_spec("qwen3-moe")["config"], "weight_dtype": "bfloat16",
            "kv_dtype": "bfloat16", "tp": 1, "ep": 1, "dp": 1, "pp": 1, "kv_fixed_size": True,
            "device": "cpu"}


def test_the_live_comparison_runs_in_the_reader_from_the_published_facts(tmp_path: Path) -> None:
    """The worker publishes the deployment as plain data; the reader builds the predictor specs
    from it and exports the live gauges. Facts the worker could not read are the reader's
    `live_setup` fault: counted, degraded, recording goes on."""
    from moe_reuse.plugin.live.attach import attach_reader

    worker = _worker_session(tmp_path)
    worker.status_extra.update(served=_served_qwen3(), config={"window_s": 1.0},
                               kv_capacity=4096)
    _drive([worker], steps=6, seed=4)
    run = RunReader(tmp_path, attach_live=attach_reader)
    assert run.poll() == 6
    snap = snap_io.read_snapshots(tmp_path)[0]
    assert snap["gauges"]["kv_capacity_tokens"]["samples"], sorted(snap["gauges"])
    assert snap["errors"] == {} and snap["reason"] == "recording"
    assert snap["info"]["hardware"]  # resolved by the reader (hardware=auto on a CPU)
    run.close()

    other = tmp_path / "other"
    worker = _worker_session(other)
    worker.status_extra.update(served_error="RuntimeError: no hf_config", config={})
    _drive([worker], steps=2, seed=4)
    run = RunReader(other, attach_live=attach_reader)
    run.poll()
    snap = snap_io.read_snapshots(other)[0]
    assert snap["errors"] == {"live_setup": 1} and snap["degraded"] == ["live_setup"]
    assert snap["enabled"] and snap["totals"]["tokens"].sum() > 0  # recording goes on
    run.close()


def test_the_reader_backs_off_while_nothing_arrives_and_polls_fast_again_when_steps_do() -> None:
    """Most polls between two flushes find nothing: the wait doubles up to IDLE_POLL_S, and a
    poll that folds steps brings it back to poll_s (scripted polls; the waits recorded)."""
    svc = ReaderService(lambda: Path("/nonexistent"), poll_s=0.1)
    folded = iter([5, 0, 0, 0, 0, 3, 0])
    waits: list[float] = []

    def poll() -> int:
        n = next(folded, None)
        if n is None:
            svc._stop.set()
            return 0
        return n

    svc.poll = poll  # type: ignore[method-assign]
    svc._stop.wait = waits.append  # type: ignore[method-assign, assignment]
    svc._loop()
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.1, 0.2, 0.4])
