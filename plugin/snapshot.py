"""Snapshots: how a worker's figures reach the API-server process without touching the step.

A worker's flusher writes one file per rank, `<dir>/<run_id>/e<engine>-r<rank>.npz`, by writing a
temporary file and renaming it over the old one. A reader therefore always sees one whole,
step-consistent snapshot (rename is atomic on POSIX), with no lock shared between processes and no
sequence counter to get wrong. The default directory is on tmpfs (/dev/shm), so this is a memory
copy. The format is numpy's npz (a JSON header and one blob of totals) and no pickle, so reading
a snapshot can never execute code.

The run id ties the API server to its own engines: `register()` sets MOE_REUSE_RUN_ID in the first
vLLM process that loads the plugin, before it spawns anything, and every child inherits it. That
first process also removes the run directories of servers that no longer exist (the run id starts
with the pid of the process that made it), so files never pile up across restarts, however a
server ended (SIGTERM, SIGKILL, OOM).

The directory is a local attack surface (/dev/shm is shared by every user of the host), so:
- the default base is per user (`/dev/shm/moe_reuse-<uid>`), and the base and run directories are
  created with mode 0700;
- a directory we use must be ours (owned by this user, not a symlink, not writable by group or
  others), and its ancestors must be owned by root or us and, if writable by others, sticky;
- files are opened relative to the checked directory with O_NOFOLLOW (and O_NONBLOCK, so a FIFO
  cannot hang a scrape), must be regular files of ours, and are read up to MAX_SNAPSHOT_BYTES;
- what is refused is counted by reason (`ScanResult.refused`), and the collector exports it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import faults

logger = logging.getLogger("vllm.moe_reuse")

RUN_ID_ENV = "MOE_REUSE_RUN_ID"
DIR_ENV = "MOE_REUSE_SNAPSHOT_DIR"
DEFAULT_DIR = str(
    Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    / f"moe_reuse-{os.geteuid()}"
)
MAX_SNAPSHOT_BYTES = 8 * 1024 * 1024
"""Read cap per rank file: a 61-layer, 256-expert rank with every live gauge is under 1 MiB, and
the cap keeps a scrape well under 100 ms whatever a file holds (also its unpacked npz members)."""
MAX_RANK_FILES = 512
MAX_SCAN_BYTES = 32 * 1024 * 1024
"""Bytes one scan may read over all rank files; files past it are skipped and counted as
`over_budget`. With MAX_RANK_FILES this bounds a scan whatever the directory holds (an 8-rank,
61-layer server with per-expert series writes about 2 MiB in all)."""
SCAN_BUDGET_S = 0.02
"""A fail-safe on wall time (same policy), for a file system that stalls or a directory of
hundreds of ranks; about six times a normal scan of an 8-rank node (3 ms), so a busy API server
does not drop healthy ranks, and with the exporter's series budget (SERIES_PER_SCRAPE) a scrape
stays under 100 ms whatever the directory holds."""
STALE_AFTER_S = 10.0
"""A rank whose snapshot has not been rewritten for max(this, 5 flush intervals) is stale: the
flusher rewrites it every `flush_interval_s` whether or not there was traffic. With the flush
interval unknown, the longest one accepted (60 s) is assumed."""
_MAX_FLUSH_INTERVAL_S = 60.0
REASONS = ("symlink", "foreign_owner", "writable_by_others", "not_a_regular_file", "too_large",
           "corrupt", "unreadable", "over_budget")
_RANK_FILE = re.compile(r"^e[^/]*-r[^/]*\.npz$")
RUN_DIR_RE = re.compile(r"^(\d+)-[0-9a-f]+$")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SnapshotRefused(OSError):
    """A snapshot path we will not trust; `reason` is one of REASONS (the exported label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def ensure_run_id() -> str:
    """The run id of this server, created once by the first process and inherited after.

    The process that creates it is the server's first; it clears the leftovers of dead servers.
    """
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.environ[RUN_ID_ENV] = run_id
        with contextlib.suppress(Exception):  # housekeeping must never stop a server
            removed = remove_stale_runs(keep=run_id)
            if removed:
                logger.info("moe_reuse: removed %d snapshot directories of servers that no longer "
                            "run: %s", len(removed), ", ".join(removed[:8]))
    return run_id


RANKS_PER_NODE_ENV = "MOE_REUSE_RANKS_PER_NODE"
"""With `{node}` in MOE_REUSE_SNAPSHOT_DIR, rank r writes under node r // this: a way to make one
host look like several nodes (each with its own /dev/shm), which is how the per-node exporter is
tested. Unset: every rank is node 0."""


def base_dir(rank: int | str | None = None) -> Path:
    """The snapshot base directory; a `{node}` in MOE_REUSE_SNAPSHOT_DIR becomes the node of
    `rank` (0 for the API server, which runs on the first node)."""
    raw = os.environ.get(DIR_ENV) or DEFAULT_DIR
    if "{node}" in raw:
        per_node = int(os.environ.get(RANKS_PER_NODE_ENV) or 0)
        node = int(str(rank)) // per_node if per_node > 0 and str(rank).isdigit() else 0
        raw = raw.replace("{node}", str(node))
    return Path(raw)


def run_dir(base: str | None = None, run_id: str | None = None) -> Path:
    return Path(base or base_dir()) / (run_id or ensure_run_id())


def rank_run_dir(rank: int | str) -> Path:
    """Where a worker of `rank` writes (its node's base; see RANKS_PER_NODE_ENV)."""
    return run_dir(str(base_dir(rank)))


def snapshot_path(directory: Path, engine: str, rank: str) -> Path:
    return directory / f"e{engine}-r{rank}.npz"


# ---- encoding (pure) ---------------------------------------------------------------------------
_DTYPE_KINDS = frozenset("biuf")  # plain numbers only: a header can never name an object dtype


def encode(snapshot: dict[str, Any]) -> bytes:
    """Two npz members: `header` (JSON, with every total's dtype, shape and offset) and `blob`
    (the totals' bytes back to back). One member per total cost the reader a zip member and an
    npy header parse each (about 3 ms a rank of a 61-layer model); this decodes in a tenth of that.
    """
    header = {k: v for k, v in snapshot.items() if k != "totals"}
    header.setdefault("pid", os.getpid())  # the writer: a reader can tell when it died
    layout, parts, offset = [], [], 0
    for name, value in snapshot["totals"].items():
        a = np.asarray(value)  # not ascontiguousarray: that makes a 0-d total 1-d
        layout.append([name, a.dtype.str, list(a.shape), offset, a.nbytes])
        parts.append(a.tobytes())
        offset += a.nbytes
    header["arrays"] = layout
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
             blob=np.frombuffer(b"".join(parts), dtype=np.uint8))
    return buf.getvalue()


def _member(zf: zipfile.ZipFile, name: str) -> bytes:
    """The raw bytes of a one-dimensional uint8 npy member (its header checked, not eval'd)."""
    data = zf.read(name + ".npy")
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2, 3):
        raise ValueError(f"npz member {name!r} is not an npy array")
    size = 4 if data[6] > 1 else 2
    start = 8 + size + int.from_bytes(data[8:8 + size], "little")
    head = data[8 + size:start].decode("latin1")
    if "'descr': '|u1'" not in head or "'fortran_order': False" not in head:
        raise ValueError(f"npz member {name!r} is not a byte array")
    return data[start:]


def decode(data: bytes, max_bytes: int = MAX_SNAPSHOT_BYTES) -> dict[str, Any]:
    """Bytes -> snapshot. Refuses compressed or oversized members (no zip bombs), never unpickles,
    and checks every array's dtype and bounds against the blob before viewing it."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos):
            raise ValueError("compressed npz members are not ours")
        if sum(i.file_size for i in infos) > max_bytes:
            raise ValueError("npz members larger than the read cap")
        snap: dict[str, Any] = json.loads(_member(zf, "header").decode())
        blob = bytearray(_member(zf, "blob"))  # writable: readers may update totals in place
    totals = {}
    for name, dtype, shape, offset, nbytes in snap.pop("arrays"):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if (dt.kind not in _DTYPE_KINDS or offset < 0 or offset + nbytes > len(blob)
                or count * dt.itemsize != nbytes):
            raise ValueError(f"snapshot array {name!r} does not fit its blob")
        totals[name] = np.frombuffer(blob, dtype=dt, count=count, offset=offset).reshape(tuple(shape))
    snap["totals"] = totals
    return snap


# ---- trusted directories -----------------------------------------------------------------------
def _check_ours(st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise SnapshotRefused("foreign_owner", f"{what} is owned by uid {st.st_uid}, not by us "
                                               f"(uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise SnapshotRefused("writable_by_others", f"{what} is writable by group or others "
                                                    f"(mode {stat.S_IMODE(st.st_mode):o})")


def _check_ancestors(path: Path) -> None:
    """Every existing ancestor of `path` must be root's or ours, and sticky if others can write."""
    p = Path(os.path.realpath(path))
    for anc in [p, *p.parents]:
        try:
            st = os.stat(anc)
        except FileNotFoundError:
            continue
        if st.st_uid not in (0, os.geteuid()):
            raise SnapshotRefused("foreign_owner", f"{anc} is owned by uid {st.st_uid}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise SnapshotRefused("writable_by_others", f"{anc} is writable by others and not "
                                                        "sticky")


def _why_not(dir_fd: int, name: str, what: str, exc: OSError) -> SnapshotRefused:
    """Why an open failed, as a refusal reason (a symlink, someone else's, or unreadable)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return SnapshotRefused("unreadable", f"{what}: {exc.strerror or exc}")
    if stat.S_ISLNK(st.st_mode):
        return SnapshotRefused("symlink", f"{what} is a symlink")
    if st.st_uid != os.geteuid():
        return SnapshotRefused("foreign_owner", f"{what} is owned by uid {st.st_uid}, not by us")
    if isinstance(exc, NotADirectoryError):
        return SnapshotRefused("not_a_regular_file", f"{what} is not a directory")
    return SnapshotRefused("unreadable", f"{what}: {exc.strerror or exc}")


def _open_subdir(parent_fd: int, name: str, what: str, create: bool) -> int:
    """openat(name) as a directory we own, without following a symlink; mkdir 0700 if asked."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent_fd)
    try:
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _why_not(parent_fd, name, what, exc) from None
    try:
        _check_ours(os.fstat(fd), what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(directory: Path, create: bool = False) -> int:
    """A file descriptor of `directory` (<base>/<run id>, or a base alone) after every check.

    Raises FileNotFoundError when it does not exist (and `create` is false), SnapshotRefused when
    it or an ancestor is not trustworthy.
    """
    directory = Path(os.path.abspath(directory))
    ours = [directory.parent, directory] if RUN_DIR_RE.match(directory.name) else [directory]
    top = ours[0].parent
    if create:
        top.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_ancestors(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for d in ours:
            nxt = _open_subdir(fd, d.name, str(d), create)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---- writing (worker) --------------------------------------------------------------------------
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


# ---- reading (API server) ----------------------------------------------------------------------
@dataclass
class RankFile:
    """One rank's latest snapshot, how old it is and whether it is still being refreshed."""

    snapshot: dict[str, Any]
    age_s: float
    stale: bool


@dataclass
class ScanResult:
    ranks: list[RankFile] = field(default_factory=list)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    messages: list[str] = field(default_factory=list)  # why, for one log line per cause

    @property
    def fresh(self) -> list[dict[str, Any]]:
        return [r.snapshot for r in self.ranks if not r.stale]


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def is_stale(snap: dict[str, Any], age_s: float, flush_interval_s: float | None = None) -> bool:
    """Its writer died, or it stopped refreshing a snapshot it refreshes every flush."""
    pid = snap.get("pid")
    if isinstance(pid, int) and not pid_alive(pid):
        return True
    if snap.get("status_only"):
        return False  # written once (why a rank records nothing); alive while its writer is
    flush = flush_interval_s or snap.get("options", {}).get("flush_interval_s")
    return age_s > max(STALE_AFTER_S, 5 * float(flush or _MAX_FLUSH_INTERVAL_S))


@contextlib.contextmanager
def _open_ours(dfd: int, name: str) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """A file of ours in a checked directory, open: regular, not a symlink, our owner."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _why_not(dfd, name, name, exc) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SnapshotRefused("not_a_regular_file", f"{name} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        _check_ours(st, name)
        yield f, st


def _read_capped(f: BinaryIO, st: os.stat_result, name: str, max_bytes: int) -> bytes:
    if st.st_size > max_bytes:
        raise SnapshotRefused("too_large", f"{name} has {st.st_size} bytes, over the "
                                           f"{max_bytes}-byte cap")
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SnapshotRefused("too_large", f"{name} grew over the {max_bytes}-byte cap")
    return data


def read_trusted(dfd: int, name: str, max_bytes: int = MAX_SNAPSHOT_BYTES
                 ) -> tuple[bytes, os.stat_result]:
    """A file of ours in a checked directory: regular, not a symlink, at most `max_bytes`."""
    with _open_ours(dfd, name) as (f, st):
        return _read_capped(f, st, name, max_bytes), st


def _read_rank(dfd: int, name: str, max_bytes: int) -> tuple[dict[str, Any], os.stat_result, int]:
    """(snapshot, stat, bytes read) of one rank file: from memory when this process wrote it
    (`WRITTEN_HERE`, after the same trusted open and fstat), else read and decoded."""
    with _open_ours(dfd, name) as (f, st):
        known = WRITTEN_HERE.recall(st)
        if known is not None:
            return known, st, 0
        data = _read_capped(f, st, name, max_bytes)
    return decode(data, max_bytes), st, len(data)


def scan_snapshots(directory: Path, *, now: float | None = None,
                   max_bytes: int = MAX_SNAPSHOT_BYTES,
                   flush_interval_s: float | None = None,
                   budget_s: float = SCAN_BUDGET_S,
                   max_total_bytes: int = MAX_SCAN_BYTES,
                   clock: Any = time.perf_counter) -> ScanResult:
    """Every rank's latest snapshot in `directory`, sorted by (engine, rank), with refusals.

    Never raises for what the directory holds: a missing directory is an empty result, and
    anything untrustworthy or unreadable is counted in `refused` by reason and skipped. Bounded:
    once `budget_s` of wall time or `max_total_bytes` are spent, the remaining files are skipped
    and counted as `over_budget` (one message), so a scrape never stalls on a full directory.
    """
    t_start = clock()
    spent = 0
    out = ScanResult()
    dfd = _open_or_refuse(directory, out)
    if dfd is None:
        return out
    try:
        names = sorted(n for n in os.listdir(dfd) if _RANK_FILE.match(n))[:MAX_RANK_FILES]
        t = time.time() if now is None else now
        for i, name in enumerate(names):
            if clock() - t_start > budget_s or spent > max_total_bytes:
                out.refused["over_budget"] += len(names) - i
                out.messages.append(f"{directory}: {len(names) - i} rank files left unread: the "
                                    f"scan's budget ({budget_s * 1000:.0f} ms, "
                                    f"{max_total_bytes} bytes) is spent")
                break
            try:
                snap, st, size = _read_rank(dfd, name, max_bytes)
                spent += size
            except FileNotFoundError:
                continue  # a rank that vanished between listing and opening
            except SnapshotRefused as exc:
                out.refused[exc.reason] += 1
                out.messages.append(f"{directory}/{exc}")
                continue
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                out.refused["corrupt"] += 1
                out.messages.append(f"{directory}/{name} is not a snapshot: {exc}")
                continue
            age = max(t - st.st_mtime, 0.0)
            out.ranks.append(RankFile(snap, age, is_stale(snap, age, flush_interval_s)))
    finally:
        os.close(dfd)
    return out


def _open_or_refuse(directory: Path, out: ScanResult) -> int | None:
    """open_dir, or None: missing (nothing to read) or refused (counted in `out`)."""
    try:
        return open_dir(directory)
    except FileNotFoundError:
        return None
    except SnapshotRefused as exc:
        out.refused[exc.reason] += 1
        out.messages.append(str(exc))
        return None


def scan_base(base: Path, *, flush_interval_s: float | None = None,
              budget_s: float = SCAN_BUDGET_S, clock: Any = time.perf_counter) -> ScanResult:
    """`scan_snapshots` over every run directory under `base`, in one shared budget: what a
    per-node exporter reads (the node's ranks, whichever server's run they belong to). A refused
    base is counted like a refused run directory."""
    t0 = clock()
    out = ScanResult()
    bfd = _open_or_refuse(base, out)
    if bfd is None:
        return out
    try:
        runs = sorted(n for n in os.listdir(bfd) if RUN_DIR_RE.match(n))[:MAX_RANK_FILES]
    finally:
        os.close(bfd)
    for name in runs:
        part = scan_snapshots(base / name, flush_interval_s=flush_interval_s,
                              budget_s=max(budget_s - (clock() - t0), 0.0), clock=clock)
        out.ranks.extend(part.ranks)
        out.refused.update(part.refused)
        out.messages.extend(part.messages)
    return out


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    """Every live rank's latest snapshot in `directory`, sorted by (engine, rank)."""
    return scan_snapshots(directory).fresh


# ---- housekeeping ------------------------------------------------------------------------------
def remove_stale_runs(base: Path | None = None, keep: str | None = None) -> list[str]:
    """Remove `<base>/<pid>-<hex>` directories whose creating process no longer exists.

    Only directories we own and trust are touched, through file descriptors (no symlink is
    followed); a live server's directory is kept whoever owns it.
    """
    try:
        bfd = open_dir(base or base_dir())
    except (FileNotFoundError, SnapshotRefused):
        return []
    removed = []
    try:
        for name in os.listdir(bfd):
            m = RUN_DIR_RE.match(name)
            if not m or name == keep or pid_alive(int(m.group(1))):
                continue
            try:
                rfd = _open_subdir(bfd, name, name, create=False)
            except (OSError, SnapshotRefused):
                continue
            try:
                for entry in os.listdir(rfd):
                    st = os.stat(entry, dir_fd=rfd, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(entry, dir_fd=rfd)
            finally:
                os.close(rfd)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=bfd)
                removed.append(name)
    finally:
        os.close(bfd)
    return sorted(removed)
