"""Where snapshots live: the run id, the per-user base directory, one directory per server run,
and the housekeeping that removes the runs of servers that no longer exist.

The run id ties the API server to its own engines: `register()` sets MOE_REUSE_RUN_ID in the first
vLLM process that loads the plugin, before it spawns anything, and every child inherits it. That
first process also removes the run directories of servers that no longer exist (the run id starts
with the pid of the process that made it), so files never pile up across restarts, however a
server ended (SIGTERM, SIGKILL, OOM).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
import uuid
from pathlib import Path

from .trusted import RUN_DIR_RE, SnapshotRefused, _open_subdir, open_dir

logger = logging.getLogger("vllm.moe_reuse")

RUN_ID_ENV = "MOE_REUSE_RUN_ID"
DIR_ENV = "MOE_REUSE_SNAPSHOT_DIR"
DEFAULT_DIR = str(
    Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    / f"moe_reuse-{os.geteuid()}"
)


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
