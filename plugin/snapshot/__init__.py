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

The package: `runs` (where files live, housekeeping), `trusted` (what a path must be), `codec`
(the format), `write` and `scan`; everything users of the package need is re-exported here.
"""

from __future__ import annotations

from .codec import decode, encode
from .runs import (
    DEFAULT_DIR,
    DIR_ENV,
    RANKS_PER_NODE_ENV,
    RUN_ID_ENV,
    base_dir,
    ensure_run_id,
    pid_alive,
    rank_run_dir,
    remove_stale_runs,
    run_dir,
    snapshot_path,
)
from .scan import (
    MAX_RANK_FILES,
    MAX_SCAN_BYTES,
    SCAN_BUDGET_S,
    STALE_AFTER_S,
    RankFile,
    ScanResult,
    is_stale,
    read_snapshots,
    scan_base,
    scan_snapshots,
)
from .trusted import (
    MAX_SNAPSHOT_BYTES,
    REASONS,
    RUN_DIR_RE,
    SnapshotRefused,
    open_dir,
    read_trusted,
)
from .write import WRITTEN_HERE, _WrittenHere, publish_counted, write_snapshot

__all__ = [
    "_WrittenHere",
    "base_dir",
    "decode",
    "DEFAULT_DIR",
    "DIR_ENV",
    "encode",
    "ensure_run_id",
    "is_stale",
    "MAX_RANK_FILES",
    "MAX_SCAN_BYTES",
    "MAX_SNAPSHOT_BYTES",
    "open_dir",
    "pid_alive",
    "publish_counted",
    "rank_run_dir",
    "RankFile",
    "RANKS_PER_NODE_ENV",
    "read_snapshots",
    "read_trusted",
    "REASONS",
    "remove_stale_runs",
    "run_dir",
    "RUN_DIR_RE",
    "RUN_ID_ENV",
    "scan_base",
    "SCAN_BUDGET_S",
    "scan_snapshots",
    "ScanResult",
    "snapshot_path",
    "SnapshotRefused",
    "STALE_AFTER_S",
    "write_snapshot",
    "WRITTEN_HERE",
]
