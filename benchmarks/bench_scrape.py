"""What the plugin adds to one scrape of /metrics, for normal and hostile snapshot directories.

The API server's `SnapshotCollector` reads every rank's snapshot file at scrape time and builds
the families; prometheus_client then renders them. Both are on the scrape's critical path, so
both are timed here, apart and together as /metrics runs them (`generate_latest` over a
registry holding the collector), median of `--repeat` scrapes per case. Prometheus asks for
OpenMetrics first by default, which prometheus_client renders 1.6 to 2 times as slowly (it
escapes every sample's name character by character): `om render ms` renders the same families so.
`prom 2.x ms` and `prom 3.x ms` are the whole scrape as vLLM's /metrics serves each Prometheus
(its Accept header through prometheus_client's `choose_encoder`, then gzip): 3.x asks for UTF-8
names (`escaping=allow-utf-8`), which skips that character-by-character escape.
- `8 ranks`: a 61-layer, 256-expert model (DeepSeek-V3's shape) on 8 ranks, per-expert series on;
- `8 ranks, per-expert off`: the default series, the files written by another process (the
  per-node exporter reading a run whose reader is the API server);
- `8 ranks, default, in-process`: the same files written by this process's reader (vLLM's API
  server, the default deployment), which the scan takes from memory (`snapshot.WRITTEN_HERE`);
- `8 ranks + junk`: the same plus 200 files the reader must refuse (symlinks, a FIFO, oversized,
  corrupt, zip bombs, foreign names);
- `512 ranks`: a directory at the rank-file cap.
Each case runs twice, side by side: with prometheus_client's own escapers (`orig`), then with
the escapes remembered as the plugin installs them where it serves /metrics (`memo`,
`moe_reuse.plugin.exporters.render_names`); the last lines print memo/orig per column.
The budgets: 100 ms a scrape whatever the directory holds (issue 13); 20 ms for the default
series of 8 ranks, 100 ms with per-expert series (issue 15).
Last run: benchmarks/results/bench_scrape.txt.

    python benchmarks/bench_scrape.py [--repeat 20] [--cases default,per-expert,...]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics

from moe_reuse.plugin.exporters import render_names
from moe_reuse.plugin.exporters.prometheus import SnapshotCollector
from moe_reuse.plugin.snapshot import (
    MAX_SNAPSHOT_BYTES,
    WRITTEN_HERE,
    snapshot_path,
    write_snapshot,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from scrape_inputs import PROMETHEUS_ACCEPT, rank_snapshot  # noqa: E402

LAYERS, EXPERTS, TOP_K = 61, 256, 8
RUN = "4000000-abcdef01"


def ds_rank(rank: int, per_expert: bool, rng: np.random.Generator) -> dict[str, Any]:
    """A DeepSeek-V3-shaped rank (61 MoE layers from layer 3, 256 experts), random loads."""
    et = rng.integers(0, 1000, size=(LAYERS, 2, EXPERTS))
    return rank_snapshot(rank, et, top_k=TOP_K, per_expert=per_expert, max_expert_series=2000,
                         layer_ids=range(3, 3 + LAYERS), flush_interval_s=1.0)


def junk(d: Path, n: int) -> None:
    big = d / "big.bin"
    big.write_bytes(b"\0" * (MAX_SNAPSHOT_BYTES + 1))
    for i in range(n):
        kind = i % 5
        p = d / f"e9-r{i}.npz"
        if kind == 0:
            p.symlink_to("/etc/passwd")
        elif kind == 1 and not (d / "e9-rfifo.npz").exists():
            os.mkfifo(d / "e9-rfifo.npz")
        elif kind == 2:
            os.link(big, p)  # oversized
        elif kind == 3:
            p.write_bytes(os.urandom(4096))  # corrupt
        else:
            with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:  # a zip bomb
                zf.writestr("header.npy", b"\0" * (64 << 20))


def served(reg: CollectorRegistry, accept: str) -> bytes:
    """What vLLM's /metrics does for a Prometheus scrape (prometheus_client's make_asgi_app:
    choose_encoder by the Accept header, then gzip)."""
    encoder, _ = choose_encoder(accept)
    return gzip.compress(encoder(reg))


def time_scrapes(base: Path, repeat: int) -> tuple[float, ...]:
    """Median ms of: the collector (read + families), prometheus_client's rendering of its
    families (text, then OpenMetrics), the whole scrape (`generate_latest` over a registry
    holding the collector), and the whole scrape as each Prometheus asks for it (`served`);
    the slowest whole scrape, and the text's bytes."""
    os.environ["MOE_REUSE_SNAPSHOT_DIR"] = str(base)
    collector = SnapshotCollector(lambda: base / RUN)
    reg = CollectorRegistry()
    reg.register(collector)  # type: ignore[arg-type]
    t_collect, t_render, t_om, t_total, size = [], [], [], [], 0
    t_prom: dict[str, list[float]] = {k: [] for k in PROMETHEUS_ACCEPT}
    for _ in range(repeat):
        t0 = time.perf_counter()
        fams = list(collector.collect())
        t1 = time.perf_counter()
        fixed = CollectorRegistry()
        fixed.register(_Fixed(fams))  # type: ignore[arg-type]
        generate_latest(fixed)
        t2 = time.perf_counter()
        openmetrics.generate_latest(fixed)
        t3 = time.perf_counter()
        size = len(generate_latest(reg))
        t4 = time.perf_counter()
        t_collect.append(t1 - t0)
        t_render.append(t2 - t1)
        t_om.append(t3 - t2)
        t_total.append(t4 - t3)
        for version, accept in PROMETHEUS_ACCEPT.items():
            t5 = time.perf_counter()
            served(reg, accept)
            t_prom[version].append(time.perf_counter() - t5)
    return (1000 * statistics.median(t_collect), 1000 * statistics.median(t_render),
            1000 * statistics.median(t_om), 1000 * statistics.median(t_total),
            *(1000 * statistics.median(t) for t in t_prom.values()),
            1000 * max(t_total), size)


class _Fixed:
    def __init__(self, fams: list[Any]) -> None:
        self.fams = fams

    def collect(self) -> list[Any]:
        return self.fams


CASES = {
    "per-expert": ("8 ranks, per-expert on", 8, True, 0, False),
    "files": ("8 ranks, per-expert off", 8, False, 0, False),
    "default": ("8 ranks, default, in-process", 8, False, 0, True),
    "junk": ("8 ranks + 200 junk files", 8, True, 200, False),
    "512": ("512 ranks, per-expert off", 512, False, 0, False),
}
COLUMNS = ("collector ms", "render ms", "om render ms", "scrape ms", "prom 2.x ms", "prom 3.x ms",
           "max ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, of {', '.join(CASES)}")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # the render is prometheus_client's, and its cost depends on the version (0.22 added UTF-8
    # name escaping per label: text renders about twice as slowly as 0.21's)
    print(f"prometheus_client {importlib.metadata.version('prometheus_client')}")
    print(f"{'case':29s} {'escapes':7s} " + " ".join(f"{c:>{max(len(c), 7)}s}" for c in COLUMNS)
          + f" {'bytes':>9s}")
    ratios: dict[str, list[float]] = {}
    for key in args.cases.split(","):
        name, ranks, pe, n_junk, here = CASES[key]
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            d = base / RUN
            d.mkdir(parents=True, mode=0o700)
            if n_junk:  # first: zip bombs take seconds to write, and the ranks must be fresh
                junk(d, n_junk)
            snaps = [ds_rank(r, pe, rng) for r in range(ranks)]
            rows = {}
            for escapes in ("orig", "memo"):
                # written afresh for each: a rank not rewritten for 10 s is stale (STALE_AFTER_S)
                for r, snap in enumerate(snaps):
                    write_snapshot(snapshot_path(d, "0", str(r)), snap, remember=here)
                gc.collect()
                gc.freeze()  # as vLLM's API server does once it has started (freeze_gc_heap)
                render_names.uninstall()
                if escapes == "memo" and not render_names.install():
                    raise SystemExit("render_names.install() refused this prometheus_client")
                rows[escapes] = time_scrapes(base, args.repeat)
                *ms, size = rows[escapes]
                print(f"{name:29s} {escapes:7s} "
                      + " ".join(f"{v:{max(len(c), 7)}.1f}" for c, v in zip(COLUMNS, ms))
                      + f" {int(size):9d}", flush=True)
                gc.unfreeze()
                WRITTEN_HERE.clear()
            ratios[name] = [m / o for m, o in zip(rows["memo"][:-1], rows["orig"][:-1])]
    print("memo/orig, side by side in this run:")
    for name, r in ratios.items():
        print(f"{name:29s} {'ratio':7s} "
              + " ".join(f"{v:{max(len(c), 7)}.2f}" for c, v in zip(COLUMNS, r)))


if __name__ == "__main__":
    main()
