"""Writing a snapshot (the worker's status, the reader's exported figures): atomically, by a
temporary file renamed over the old one, so a reader always sees one whole, step-consistent
snapshot with no lock shared between processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import faults
from .codec import encode
from .trusted import open_dir

logger = logging.getLogger("vllm.moe_reuse")


def publish_counted(publish: Callable[[dict[str, Any]], None],
                    build: Callable[[], dict[str, Any]], errors: dict[str, int],
                    degraded: set[str]) -> bool:
    """Publish a snapshot, or count why not. A write that fails (tmpfs full, a refused
    directory) loses nothing: the counts stay with the writer and the next flush retries. It is
    counted in `errors["snapshot_write"]`, logged once, and the writer is degraded until a write
    succeeds; a snapshot that gets written says the writing works again, so it carries no
    `snapshot_write` degradation (one that never succeeds goes stale: MoeReuseRankStale)."""
    try:
        snapshot = build()
        snapshot["degraded"] = [d for d in snapshot.get("degraded", []) if d != "snapshot_write"]
        publish(snapshot)
    except Exception as exc:  # noqa: BLE001 - counted; never the host process
        first = "snapshot_write" not in errors
        errors["snapshot_write"] = errors.get("snapshot_write", 0) + 1
        degraded.add("snapshot_write")
        if first:
            logger.error("moe_reuse: could not write the snapshot (recording continues, retried "
                         "every flush; counted in moe_reuse_errors_total{stage=\"snapshot_write\"}"
                         "): %s: %s", type(exc).__name__, exc)
        return False
    degraded.discard("snapshot_write")
    return True


class _WrittenHere:
    """Rank snapshots this process wrote, by file identity (device, inode, size, mtime in ns).

    The reader writes every rank's snapshot each flush inside the API-server process, and the
    collector in that same process reads them on every scrape of /metrics, on the server's
    event loop. A file whose identity is the one written here is that snapshot, already in
    memory, so the scan neither reads nor decodes it (about 0.5 ms a rank of a 61-layer,
    256-expert model: benchmarks/bench_scrape.py). A file another process wrote, or one
    replaced since, has another identity and is read as before. One entry per path written (the
    latest) until the reader removes or stops writing it, and at most `cap` paths (a 61-layer,
    256-expert rank's snapshot holds about 0.3 MB). The snapshot is shared, not copied: nothing
    reading it mutates it (families are built from it; the writer built it for this write)."""

    def __init__(self, cap: int = 64) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._path_key: dict[str, tuple[int, int]] = {}
        self._by_key: dict[tuple[int, int], tuple[tuple[int, int], dict[str, Any]]] = {}

    def remember(self, path: Path, st: os.stat_result, snapshot: dict[str, Any]) -> None:
        key = (st.st_dev, st.st_ino)
        with self._lock:
            old = self._path_key.pop(str(path), None)
            if old is not None:
                self._by_key.pop(old, None)
            self._path_key[str(path)] = key
            self._by_key[key] = ((st.st_size, st.st_mtime_ns), snapshot)
            while len(self._path_key) > self.cap:
                self._by_key.pop(self._path_key.pop(next(iter(self._path_key))), None)

    def forget(self, path: Path) -> None:
        with self._lock:
            key = self._path_key.pop(str(path), None)
            if key is not None:
                self._by_key.pop(key, None)

    def recall(self, st: os.stat_result) -> dict[str, Any] | None:
        hit = self._by_key.get((st.st_dev, st.st_ino))
        return hit[1] if hit is not None and hit[0] == (st.st_size, st.st_mtime_ns) else None

    def clear(self) -> None:
        with self._lock:
            self._path_key.clear()
            self._by_key.clear()


WRITTEN_HERE = _WrittenHere()


def write_snapshot(path: Path, snapshot: dict[str, Any],
                   fault_stage: str | None = "snapshot_write", *, remember: bool = False) -> None:
    """Atomically replace `path` with the encoded snapshot, inside a checked directory.
    (The worker's status goes through here too, with no injectable fault: `snapshot_write` is
    the reader's write of the exported snapshot, which it `remember`s for this process's scans.)"""
    if fault_stage:
        faults.check(fault_stage)
    data = encode(snapshot)
    dfd = open_dir(path.parent, create=True)
    tmp = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            st = os.fstat(f.fileno())  # the renamed file keeps its inode, size and mtime
        os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        if remember:
            WRITTEN_HERE.remember(path, st, snapshot)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        os.close(dfd)
