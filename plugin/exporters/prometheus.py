"""Snapshots -> vLLM's /metrics: the collector the API server (or the per-node exporter) registers.

- One API server: `SnapshotCollector` is registered in prometheus_client's global REGISTRY inside
  the API-server process and reads the workers' snapshot files at scrape time.
- `--api-server-count > 1`: vLLM switches /metrics to prometheus multiprocess mode, which only reads
  the per-process value files in PROMETHEUS_MULTIPROC_DIR. `MultiprocessBridge` (multiprocess.py)
  writes the same families into those files through prometheus_client's own value classes.

The families themselves come from `families.snapshot_families`, a pure function.
"""

from __future__ import annotations

import collections
import gc
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from .. import faults
from ..snapshot import ScanResult, scan_base, scan_snapshots
from .families import SERIES_PER_SCRAPE, reader_families, series_budget, snapshot_families

logger = logging.getLogger("vllm.moe_reuse")


class SnapshotCollector:
    """Custom collector for the API server's REGISTRY: reads the rank snapshots at scrape time.

    A scrape of vLLM's /metrics must never fail or stall because of us: reading is bounded
    (snapshot.MAX_SNAPSHOT_BYTES per rank), refusals are counted and logged once per cause, and a
    fault here drops only our series for that scrape, counted in errors_total{stage="collector"}.
    """

    def __init__(self, directory: Callable[[], Path], frontend: Any = None,
                 whole_base: bool = False) -> None:
        self._directory = directory
        self._scan = scan_base if whole_base else scan_snapshots  # base: every run under it
        self._frontend = frontend
        self._refused: collections.Counter[str] = collections.Counter()
        self._errors = 0
        self._logged: set[str] = set()

    def _active(self) -> bool:
        """Installed but not asked for: no series at all (unless something was refused)."""
        return self._frontend is None or getattr(self._frontend, "config", None) is not None

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged and len(self._logged) < 64:
            self._logged.add(key)
            logger.warning(msg, *args)

    def collect(self) -> Iterable[Metric]:
        """The families of this scrape, built with the cyclic GC paused: they are thousands of
        small acyclic objects that would otherwise trigger a dozen collections per scrape and,
        every few scrapes, a full one that doubles the scrape (benchmarks/bench_scrape.py)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._collect()
        finally:
            if was_enabled:
                gc.enable()

    def _collect(self) -> list[Metric]:
        failed = False
        try:
            faults.check("collector")
            cfg = getattr(self._frontend, "config", None)
            result = self._scan(self._directory(),
                                flush_interval_s=getattr(cfg, "flush_interval_s", None))
            self._refused.update(result.refused)
            for msg in result.messages:
                self._log_once(msg, "moe_reuse: refused a snapshot path: %s", msg)
            fresh = result.fresh
            _, over = series_budget(fresh)
            if over:
                self._refused["over_budget"] += len(over)
                self._log_once("series_budget", "moe_reuse: %d of %d ranks export only their "
                               "status: their series would take a scrape of /metrics past its "
                               "budget of %d samples (counted in moe_reuse_snapshot_refused_total"
                               "{reason=\"over_budget\"})", len(over), len(fresh),
                               SERIES_PER_SCRAPE)
            fams = snapshot_families(fresh, self._frontend, over)
        except Exception as exc:  # noqa: BLE001 - a scrape must never fail because of us
            failed = True
            self._errors += 1
            self._log_once("collector", "moe_reuse: the snapshot collector failed: %s: %s "
                           "(scrapes go on without the plugin's series; counted in "
                           "moe_reuse_errors_total{stage=\"collector\"})", type(exc).__name__, exc)
            result, fams = ScanResult(), []
        if not (self._active() or self._refused or self._errors or result.ranks):
            return fams
        try:
            return reader_families(result, self._refused, self._errors, fams, failed_now=failed,
                                   model=str(getattr(self._frontend, "model", "") or ""))
        except Exception:  # noqa: BLE001
            return fams

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: families depend on which ranks are up
