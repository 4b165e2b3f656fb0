"""Snapshots: how a worker's figures reach the API-server process without touching the step.

A worker's flusher writes one file per rank, `<dir>/<run_id>/e<engine>-r<rank>.npz`, by writing a
temporary file and renaming it over the old one. A reader therefore always sees one whole,
step-consistent snapshot (rename is atomic on POSIX), with no lock shared between processes and no
sequence counter to get wrong. The default directory is on tmpfs (/dev/shm), so this is a memory
copy. The format is numpy's npz with a JSON header and no pickle, so reading a snapshot can never
execute code.

The run id ties the API server to its own engines: `register()` sets MOE_REUSE_RUN_ID in the first
vLLM process that loads the plugin, before it spawns anything, and every child inherits it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

RUN_ID_ENV = "MOE_REUSE_RUN_ID"
DIR_ENV = "MOE_REUSE_SNAPSHOT_DIR"
DEFAULT_DIR = "/dev/shm/moe_reuse" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def ensure_run_id() -> str:
    """The run id of this server, created once by the first process and inherited after."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.environ[RUN_ID_ENV] = run_id
    return run_id


def run_dir(base: str | None = None, run_id: str | None = None) -> Path:
    base = base or os.environ.get(DIR_ENV) or DEFAULT_DIR
    return Path(base) / (run_id or ensure_run_id())


def snapshot_path(directory: Path, engine: str, rank: str) -> Path:
    return directory / f"e{engine}-r{rank}.npz"


def encode(snapshot: dict[str, Any]) -> bytes:
    header = {k: v for k, v in snapshot.items() if k != "totals"}
    arrays = {f"t_{k}": np.asarray(v) for k, v in snapshot["totals"].items()}
    buf = io.BytesIO()
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def decode(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        snap: dict[str, Any] = json.loads(bytes(z["header"]).decode())
        snap["totals"] = {k[2:]: z[k] for k in z.files if k.startswith("t_")}
    return snap


def write_snapshot(path: Path, snapshot: dict[str, Any]) -> None:
    """Atomically replace `path` with the encoded snapshot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode(snapshot))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    """Every rank's latest snapshot in `directory`, sorted by (engine, rank); unreadable skipped."""
    out = []
    try:
        paths = sorted(directory.glob("e*-r*.npz"))
    except OSError:
        return []
    for p in paths:
        try:
            out.append(decode(p.read_bytes()))
        except (OSError, ValueError, KeyError):
            continue  # a rank that vanished between glob and read
    return out
