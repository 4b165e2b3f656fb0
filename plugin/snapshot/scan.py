"""Reading every rank's snapshot (the API server's collector, the per-node exporter), bounded in
files, bytes and wall time, with what was refused counted by reason.
"""

from __future__ import annotations

import collections
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .codec import decode
from .runs import pid_alive
from .trusted import (
    MAX_SNAPSHOT_BYTES,
    RUN_DIR_RE,
    SnapshotRefused,
    _open_ours,
    _read_capped,
    open_dir,
)
from .write import WRITTEN_HERE

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
_RANK_FILE = re.compile(r"^e[^/]*-r[^/]*\.npz$")


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


def is_stale(snap: dict[str, Any], age_s: float, flush_interval_s: float | None = None) -> bool:
    """Its writer died, or it stopped refreshing a snapshot it refreshes every flush."""
    pid = snap.get("pid")
    if isinstance(pid, int) and not pid_alive(pid):
        return True
    if snap.get("status_only"):
        return False  # written once (why a rank records nothing); alive while its writer is
    flush = flush_interval_s or snap.get("options", {}).get("flush_interval_s")
    return age_s > max(STALE_AFTER_S, 5 * float(flush or _MAX_FLUSH_INTERVAL_S))


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
