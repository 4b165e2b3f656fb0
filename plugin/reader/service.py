"""The reader: one thread per host that turns every rank's raw stream into exported snapshots.

Workers only count and copy (`recorder.rawstream`); this thread does the rest, off the engine's
processes: for each rank it finds (`w<engine>-r<rank>.npz`, the worker's status, refreshed every
flush), it maps the rank's raw ring, folds new steps into totals, runs the live comparison, the
EP advisor and the OTLP push (`RankReader` + `live.attach`), samples the rank's GPU's measured
HBM bandwidth once per live window (`reader.gpm`, NVML GPM: here, never in the worker; on every
poll, so idle time is measured too and the measurement does not depend on the live comparison
being up), and writes the rank's snapshot
(`e<engine>-r<rank>.npz`), which the API server's collector and `moe-reuse exporter` serve. In
Prometheus multiprocess mode it also writes the value files.

It runs in the process that builds vLLM's engine config (the API server, or the launcher of
several API servers, or a headless node's launcher; `frontend.on_engine_config`) and in
`moe-reuse exporter`. One reader per run directory: whoever holds the flock on `reader.lock`
reads; the others retry each second, so a reader that dies is replaced and picks up the totals
where the last snapshot left them (`raw.cursor`), with nothing counted twice.

Never raises into its host: everything per rank is caught, counted on that rank
(`errors{stage="reader"}` or the live stages) and logged once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import snapshot as snap_io
from ..recorder.rawstream import RawReader
from .rank import RankReader

logger = logging.getLogger("vllm.moe_reuse")

_STATUS_FILE = re.compile(r"^w([^/]*)-r([^/]*)\.npz$")
_SNAPSHOT_FILE = re.compile(r"^e([^/]*)-r([^/]*)\.npz$")
POLL_S = 0.1
IDLE_POLL_S = 0.5
"""The reader polls every POLL_S while steps arrive and backs off, doubling, to IDLE_POLL_S while
polls find none: the workers flush about once a second, so most polls between two flushes find
nothing, and each costs a directory check, a listing and a stat per rank (64 us warm, several
times that in a busy API server). A rank's raw ring holds seconds of steps, so 0.5 s is safe."""
LOCK_NAME = "reader.lock"


class _Rank:
    """A rank being read: its status file's identity, its reader and its raw ring."""

    def __init__(self, reader: RankReader, raw: RawReader | None, mtime: float) -> None:
        self.reader, self.raw, self.mtime = reader, raw, mtime
        self.dirty = True


class RunReader:
    """Every rank of one run directory (one vLLM server's processes on this host)."""

    def __init__(self, directory: Path, bridge: Any = None,
                 attach_live: Callable[[RankReader, dict[str, Any]], None] | None = None, *,
                 nvml: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.bridge = bridge
        self.attach_live = attach_live
        self.nvml, self.clock = nvml, clock  # the HBM measurement's (a stand-in in tests)
        self.ranks: dict[str, _Rank] = {}
        self._lock_fd: int | None = None
        self._next_try = 0.0
        self._logged: set[str] = set()
        self._bridged_status: dict[str, float] = {}  # status-only snapshot -> mtime bridged

    # ---- leadership --------------------------------------------------------------------------
    def leader(self, now: float) -> bool:
        if self._lock_fd is not None:
            return True
        if now < self._next_try:
            return False
        self._next_try = now + 1.0
        try:
            dfd = snap_io.open_dir(self.directory)
        except (FileNotFoundError, snap_io.SnapshotRefused):
            return False
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
        except OSError:
            return False
        finally:
            os.close(dfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        logger.info("moe_reuse: reading the ranks of %s in process %d", self.directory, os.getpid())
        return True

    def close(self) -> None:
        for r in self.ranks.values():
            if r.raw is not None:
                r.raw.close()
            r.reader.close()
            snap_io.WRITTEN_HERE.forget(self._snapshot_path(r.reader))
        self.ranks.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.error(msg, *args)

    # ---- one poll ----------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> int:
        """Fold what every rank published since the last poll; returns the steps folded."""
        now = time.monotonic() if now is None else now
        if not self.leader(now):
            return 0
        try:
            dfd = snap_io.open_dir(self.directory)
        except FileNotFoundError:
            self.close()
            return 0
        except snap_io.SnapshotRefused as exc:
            self._log_once("dir", "moe_reuse: the reader refuses %s: %s", self.directory, exc)
            return 0
        folded = 0
        try:
            listing = os.listdir(dfd)
            names = sorted(n for n in listing if _STATUS_FILE.match(n))
            for key in set(self.ranks) - set(names):  # the worker left: its snapshot goes too
                gone = self.ranks.pop(key)
                if gone.raw is not None:
                    gone.raw.close()
                gone.reader.close()
                path = self._snapshot_path(gone.reader)
                snap_io.WRITTEN_HERE.forget(path)
                with contextlib.suppress(OSError):
                    os.unlink(path.name, dir_fd=dfd)
            for name in names:
                try:
                    folded += self._poll_rank(dfd, name)
                except Exception as exc:  # noqa: BLE001 - one rank, never the host process
                    self._log_once(f"rank:{name}", "moe_reuse: the reader skips %s/%s: %s: %s",
                                   self.directory, name, type(exc).__name__, exc)
            if self.bridge is not None:
                self._bridge_status_only(dfd, listing, names)
        finally:
            os.close(dfd)
        return folded

    def _bridge_status_only(self, dfd: int, listing: list[str], status_names: list[str]) -> None:
        """A rank that records nothing (failed to bind, not applicable) writes only a status
        snapshot, `e<engine>-r<rank>.npz`, and no raw ring: in Prometheus multiprocess mode its
        `enabled{reason=...} 0` must still reach the value files, so /metrics is never blind
        without saying so."""
        read = {f"e{n[1:]}" for n in status_names}  # snapshots this reader writes itself
        self._bridged_status = {k: v for k, v in self._bridged_status.items() if k in listing}
        for name in listing:
            if not _SNAPSHOT_FILE.match(name) or name in read:
                continue
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if self._bridged_status.get(name) == st.st_mtime:
                    continue
                data, _ = snap_io.read_trusted(dfd, name, snap_io.MAX_SNAPSHOT_BYTES)
                snap = snap_io.decode(data)
                self._bridged_status[name] = st.st_mtime
                if snap.get("status_only"):
                    self.bridge.publish(snap)
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - one file, never the host process
                self._log_once(f"status:{name}", "moe_reuse: the reader skips %s/%s: %s: %s",
                               self.directory, name, type(exc).__name__, exc)

    def _poll_rank(self, dfd: int, name: str) -> int:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        rank = self.ranks.get(name)
        if rank is None or st.st_mtime != rank.mtime:
            data, _ = snap_io.read_trusted(dfd, name, snap_io.MAX_SNAPSHOT_BYTES)
            status = snap_io.decode(data)
            if rank is not None and status.get("pid") != rank.reader.status.get("pid"):
                if rank.raw is not None:  # a new worker for this rank: new ring, new counters
                    rank.raw.close()
                rank.reader.close()
                rank = None
            if rank is None:
                rank = self._new_rank(dfd, status, st.st_mtime)
                self.ranks[name] = rank
            else:
                rank.reader.update_status(status)
                rank.mtime = st.st_mtime
            rank.dirty = True
        folded = 0
        if rank.raw is not None:
            counts, meta, missed = rank.raw.take()
            folded = counts.shape[1]
            if folded or missed:
                rank.reader.add_block(counts, meta, missed)
                rank.dirty = True
            elif rank.reader.tick():
                rank.dirty = True
        if rank.reader.measure_hbm():
            rank.dirty = True
        if rank.dirty:
            self._publish(rank)
        return folded

    def _new_rank(self, dfd: int, status: dict[str, Any], mtime: float) -> _Rank:
        reader = RankReader(status)
        reader.start_hbm(nvml=self.nvml, clock=self.clock)
        raw = None
        raw_file = status.get("raw")
        if raw_file:
            try:
                raw = RawReader(dfd, str(raw_file))
            except Exception:
                reader.close()
                raise
            if (raw.layers, raw.columns) != (len(reader.layer_ids), reader.num_experts + 1):
                raw.close()
                reader.close()
                raise ValueError(f"{raw_file}: ring shape {raw.layers} x {raw.columns} does not "
                                 "match the worker's status")
            self._resume(dfd, reader, raw, status)
        if self.attach_live is not None and raw is not None:
            self.attach_live(reader, status)
        return _Rank(reader, raw, mtime)

    def _resume(self, dfd: int, reader: RankReader, raw: RawReader, status: dict[str, Any]) -> None:
        """Take over from an earlier reader of this run: its last snapshot of the same worker
        holds the totals up to its cursor, so nothing is lost or counted twice."""
        lab = reader.labels
        try:
            data, _ = snap_io.read_trusted(dfd, f"e{lab['engine']}-r{lab['rank']}.npz",
                                         snap_io.MAX_SNAPSHOT_BYTES)
            prev = snap_io.decode(data)
        except (OSError, ValueError, KeyError):
            return
        pos = prev.get("raw") or {}
        if prev.get("pid") != status.get("pid") or not isinstance(pos.get("cursor"), int):
            return
        current = reader.totals.arrays()
        for key, value in prev["totals"].items():
            mine = getattr(reader.totals, key, None)
            if key not in current or np.shape(value) != np.shape(current[key]):
                continue
            if isinstance(mine, np.ndarray):
                mine[...] = value
            elif key != "dropped_steps":
                setattr(reader.totals, key, int(value))
        raw.cursor = min(int(pos["cursor"]), raw.written())
        reader.missed_steps = int(pos.get("missed", 0))
        if reader.hbm is not None:
            reader.hbm.restore(prev.get("hbm_measured"))
        logger.info("moe_reuse: resumed rank %s of %s at step %d", lab.get("rank"),
                    self.directory, raw.cursor)

    def _snapshot_path(self, reader: RankReader) -> Path:
        return snap_io.snapshot_path(self.directory, reader.labels["engine"],
                                     reader.labels["rank"])

    def _publish(self, rank: _Rank) -> None:
        reader = rank.reader
        snap = reader.snapshot()
        snap["raw"] = {"cursor": rank.raw.cursor if rank.raw is not None else 0,
                       "missed": reader.missed_steps}
        path = self._snapshot_path(reader)
        def write(s: dict[str, Any]) -> None:  # remembered: this process's collector reads it
            snap_io.write_snapshot(path, s, remember=True)

        if snap_io.publish_counted(write, lambda: snap, reader.errors, reader.degraded):
            rank.dirty = False
        if self.bridge is not None:
            try:
                self.bridge.publish(snap)
            except Exception as exc:  # noqa: BLE001
                self._log_once("bridge", "moe_reuse: multiprocess value files not written: %s",
                               exc)


class ReaderService:
    """The reader thread over one run directory, or every run under a node's base."""

    def __init__(self, directory: Callable[[], Path], *, whole_base: bool = False,
                 poll_s: float = POLL_S, bridge: Any = None,
                 attach_live: Callable[[RankReader, dict[str, Any]], None] | None = None) -> None:
        self.directory, self.whole_base, self.poll_s = directory, whole_base, poll_s
        self.bridge, self.attach_live = bridge, attach_live
        self.runs: dict[Path, RunReader] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_dirs(self) -> list[Path]:
        d = self.directory()
        if not self.whole_base:
            return [d]
        try:
            names = sorted(n for n in os.listdir(d) if snap_io.RUN_DIR_RE.match(n))
        except OSError:
            return []
        return [d / n for n in names]

    def poll(self) -> int:
        folded = 0
        dirs = self.run_dirs()
        for gone in set(self.runs) - set(dirs):
            self.runs.pop(gone).close()
        for d in dirs:
            run = self.runs.get(d)
            if run is None:
                run = self.runs[d] = RunReader(d, self.bridge, self.attach_live)
            folded += run.poll()
        return folded

    def start(self) -> ReaderService:
        self._thread = threading.Thread(target=self._loop, name="moe_reuse-reader", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        wait = self.poll_s
        while not self._stop.is_set():
            folded = 0
            try:
                folded = self.poll()
            except Exception as exc:  # noqa: BLE001 - never into the host process
                logger.error("moe_reuse: reader poll failed: %s: %s", type(exc).__name__, exc)
            wait = self.poll_s if folded else min(2 * wait, max(IDLE_POLL_S, self.poll_s))
            self._stop.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.poll()  # what the workers wrote last
        finally:
            for run in self.runs.values():
                run.close()
            self.runs.clear()
