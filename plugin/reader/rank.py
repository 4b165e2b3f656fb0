"""One rank, read: raw steps -> cumulative totals, live windows, exported snapshot.

`RankReader` is everything derived from a rank's raw stream, and it runs outside the worker: in the
API server's reader thread, in `moe-reuse exporter`, or in-process where a test or a benchmark
drives a `RecorderSession` directly (`LocalSink`). The same code in every place, so the figures
never depend on where they were derived.

It is built from the worker's status (plain data the worker publishes at bind and refreshes every
flush: labels, layer ids, byte model, the served deployment, its config) and keeps its own errors
and degraded parts (live_window, live_advisor, otlp_push, reader), merged with the worker's in the
snapshot it exports. A fault in the live comparison is handled by the live package (counted,
degraded, withdrawn); a fault in the fold marks this rank's reading broken (`errors{stage=
"reader"}`, enabled{reason="fault"}) without touching the worker or any other rank.

The reader (`RunReader`) also measures the rank's GPU here: `start_hbm` opens an `HbmMeter` on the
device the worker published (NVML GPM, `reader.gpm`) and `measure_hbm`, called on every poll,
samples it at most once per live window. In-process sessions never start one: NVML is never
touched from a vLLM worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..recorder.aggregate import ByteModel, Totals, fold_block
from .gpm import HbmMeter

logger = logging.getLogger("vllm.moe_reuse")


def byte_model_from(data: dict[str, Any]) -> ByteModel:
    """The worker's byte model, back from plain data (lists -> the dataclass's tuples)."""
    return ByteModel(
        expert_bytes_per_layer=tuple(int(b) for b in data.get("expert_bytes_per_layer", ())),
        shared_expert_bytes=int(data.get("shared_expert_bytes", 0)),
        dense_ffn_bytes=int(data.get("dense_ffn_bytes", 0)),
        attention_bytes=int(data.get("attention_bytes", 0)),
        embedding_bytes=int(data.get("embedding_bytes", 0)),
        kv_bytes_per_token=int(data.get("kv_bytes_per_token", 0)),
        kv_groups=tuple((float(b), int(w), int(c)) for b, w, c in data.get("kv_groups", ())),
        recurrent_state_bytes=int(data.get("recurrent_state_bytes", 0)),
    )


class RankReader:
    """Totals, live gauges and the exported snapshot of one rank (a `session` to the listeners)."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.labels = dict(status["labels"])
        self.layer_ids = [int(x) for x in status["layer_ids"]]
        self.num_experts = int(status["num_experts"])
        self.top_k = int(status["top_k"])
        self.totals = Totals(len(self.layer_ids), self.num_experts)
        self.info: dict[str, str] = dict(status.get("info", {}))
        self.errors: dict[str, int] = {}  # the reader's own (merged with the worker's)
        self.degraded: set[str] = set()
        self.gauges: dict[str, Any] = {}
        self.listeners: list[Any] = []
        self.missed_steps = 0  # raw steps lapped by the writer before this reader took them
        self.broken = False
        self.status: dict[str, Any] = {}
        self.bytes_model: ByteModel
        self.hbm: HbmMeter | None = None  # measured HBM traffic (start_hbm; the reader only)
        self.update_status(status)

    def update_status(self, status: dict[str, Any]) -> None:
        self.status = status
        self.bytes_model = byte_model_from(status.get("byte_model", {}))
        for k, v in status.get("info", {}).items():
            if k != "hardware" or "hardware" not in self.info:
                self.info[k] = v

    # ---- measured HBM bandwidth (NVML GPM) -----------------------------------------------------
    def start_hbm(self, *, nvml: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        """Open the measurement of this rank's device (once; never raises). Sampled every
        `window_s` of the worker's config, the live window's length, so the measured and the
        live figures cover windows of the same size."""
        if self.hbm is not None:
            return
        try:
            window_s = float((self.status.get("config") or {}).get("window_s") or 30.0)
        except (TypeError, ValueError):
            window_s = 30.0
        self.hbm = HbmMeter(self.status.get("device"), interval_s=window_s, nvml=nvml, clock=clock)

    def measure_hbm(self) -> bool:
        """Close a measured window when one is due; True when the snapshot should be rewritten."""
        return self.hbm.tick() if self.hbm is not None else False

    def close(self) -> None:
        """Give back what the reader holds for this rank (NVML's samples and init)."""
        if self.hbm is not None:
            self.hbm.close()

    # ---- folding -----------------------------------------------------------------------------
    def add_block(self, counts: np.ndarray, meta: dict[str, np.ndarray], missed: int = 0) -> None:
        """Fold n raw steps ([L, n, 3, C] counts and their step records) and run the listeners."""
        self.missed_steps += int(missed)
        if self.broken:
            return
        try:
            stats = fold_block(self.totals, counts, meta, self.bytes_model, self.top_k)
        except Exception as exc:  # noqa: BLE001 - one rank's reading, never the server
            self.broken = True
            self.errors["reader"] = self.errors.get("reader", 0) + 1
            logger.error("moe_reuse: the reader could not fold rank %s's steps, exporting its "
                         "status only: %s: %s", self.labels.get("rank"), type(exc).__name__, exc)
            return
        for listener in self.listeners:
            listener(stats, meta, self)

    def tick(self) -> bool:
        """A poll with no new steps: the listeners that keep time (the live window) may close
        what is due. True if the exported figures changed."""
        changed = False
        for listener in self.listeners:
            tick = getattr(listener, "tick", None)
            if tick is not None and not self.broken:
                changed = bool(tick(self)) or changed
        return changed

    # ---- what is exported ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The rank's exported snapshot: the worker's status with the reader's figures."""
        st = self.status
        errors = dict(st.get("errors", {}))
        for k, v in self.errors.items():
            errors[k] = errors.get(k, 0) + v
        enabled = bool(st.get("enabled", True)) and not self.broken
        reason = st.get("reason", "recording") if not self.broken else "fault"
        totals = {k: v.copy() for k, v in self.totals.arrays().items()}
        totals["dropped_steps"] = np.array(int(st.get("dropped_steps", 0)) + self.missed_steps,
                                           dtype=np.int64)
        gauges = dict(st.get("gauges", {}))
        gauges.update(self.gauges)
        extra = {"hbm_measured": self.hbm.snapshot()} if self.hbm is not None else {}
        return {
            "version": 1,
            "time": float(st.get("time", time.time())),
            "pid": int(st.get("pid", 0)),
            "labels": dict(self.labels),
            "info": dict(self.info),
            "layer_ids": list(self.layer_ids),
            "top_k": self.top_k,
            "enabled": enabled,
            "reason": reason,
            "errors": errors,
            "degraded": sorted(set(st.get("degraded", ())) | self.degraded),
            "comm_mode": self.info.get("comm_mode", "none"),
            "options": dict(st.get("options", {})),
            "totals": totals,
            "gauges": gauges,
            **extra,
        }
