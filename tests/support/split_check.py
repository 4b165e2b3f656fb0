"""The worker/reader split, checked on a real server's run directory (shared by the tests).

A worker only counts and copies: its process has none of the reader's, the live comparison's,
the predictor's or the exporters' modules loaded (the worker lists the plugin's modules it has in
its status file), and the rank's exported snapshot was folded by a reader from the worker's raw
ring (the snapshot's raw cursor: up to every step the worker wrote, none missed).
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_reuse.plugin import snapshot as snap_io
from moe_reuse.plugin.recorder.rawstream import RawReader, raw_name, status_name

FORBIDDEN_IN_WORKER = ("moe_reuse.predictor", "moe_reuse.plugin.live", "moe_reuse.plugin.reader",
                       "moe_reuse.plugin.exporters")  # (OTel: vLLM's workers load its SDK)


def check_split(run: Path, engine: str = "0", rank: str = "0") -> None:
    status = snap_io.decode((run / status_name(engine, rank)).read_bytes())
    mods = status["worker_modules"]
    assert "moe_reuse.plugin.recorder.session" in mods
    assert [m for m in mods if m.startswith(FORBIDDEN_IN_WORKER)] == [], mods
    snap = snap_io.decode((run / f"e{engine}-r{rank}.npz").read_bytes())
    dfd = snap_io.open_dir(run)
    try:
        ring = RawReader(dfd, raw_name(engine, rank))
        written = ring.written()
        ring.close()
    finally:
        os.close(dfd)
    assert written > 0 and snap["raw"]["missed"] == 0, (written, snap["raw"])
    assert 0 < snap["raw"]["cursor"] <= written, (snap["raw"], written)
    assert snap["pid"] == status["pid"], (snap["pid"], status["pid"])
