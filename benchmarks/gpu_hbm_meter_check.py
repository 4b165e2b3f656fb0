"""Measured HBM bandwidth end to end on a GPU (issue 18): worker status -> reader -> /metrics.

The plugin's own path, with real NVML: a CUDA worker session (raw mode, as in a vLLM worker)
publishes its device's UUID; the reader (`RunReader`, as in the API server) opens an `HbmMeter` on
it and samples GPM once per window; the exported families (`snapshot_families`, what /metrics
serves) carry `moe_reuse_hbm_measured_bytes_total` and `_seconds_total`. Meanwhile the GPU runs a
load of known bytes: device-to-device copies (each reads and writes the tensor once, and GPM counts
both directions). The exported bandwidth, rate(bytes)/rate(seconds), is printed beside the load's
own bytes over the same time, and their ratio.

    python benchmarks/gpu_hbm_meter_check.py --out $OUT/gpu_hbm_meter_check.json

Exit status: 0 within 15%; 1 outside it or not measuring; 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_recorder_check import import_recorder  # noqa: E402 - the namespace mapping

TOLERANCE = 0.15


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="load duration")
    ap.add_argument("--window", type=float, default=0.5, help="the meter's window (window_s)")
    ap.add_argument("--gib", type=float, default=2.0, help="size of the copied tensor")
    ap.add_argument("--out", default="gpu_hbm_meter_check.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (issue 18)", file=sys.stderr)
        return 2
    import_recorder()
    from moe_reuse.plugin import snapshot as snap_io
    from moe_reuse.plugin.exporters.families import snapshot_families
    from moe_reuse.plugin.reader.service import RunReader
    from moe_reuse.plugin.recorder import rawstream
    from moe_reuse.plugin.recorder.aggregate import ByteModel
    from moe_reuse.plugin.recorder.ring import RingLayout
    from moe_reuse.plugin.recorder.session import RecorderSession

    dev = torch.device("cuda", torch.cuda.current_device())
    uuid = str(torch.cuda.get_device_properties(dev).uuid)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    directory = Path(tempfile.mkdtemp(prefix="moe_reuse-gpu-", dir=base))
    os.chmod(directory, 0o700)
    L, E, K = 2, 8, 2
    dfd = snap_io.open_dir(directory, create=True)
    try:
        raw = rawstream.RawWriter(dfd, rawstream.raw_name("0", "0"), L, E + 1, 64)
    finally:
        os.close(dfd)
    status_path = directory / rawstream.status_name("0", "0")
    worker = RecorderSession(
        RingLayout(L, E, K, max_tokens=16, ring_steps=8), ByteModel((10, 10)), device=dev,
        labels={"model": "m", "engine": "0", "rank": "0"}, info={"version": "gpu-check"},
        layer_ids=[0, 1], publish=lambda st: snap_io.write_snapshot(status_path, st),
        raw=raw, flush_interval_s=0.0)
    worker.status_extra["device"] = {"type": "cuda", "uuid": uuid}  # what publish_facts sends
    worker.status_extra["config"] = {"window_s": args.window}
    worker.step_started()
    worker.step_prepared(np.array([1, 1]), np.array([True, True]), np.array([5, 6]))
    for layer in range(L):
        worker.capture_fn(layer)(torch.randint(0, E, (2, K), device=dev))
    worker.step_finished()
    torch.cuda.synchronize()
    worker.flush()

    run = RunReader(directory)
    run.poll()  # the reader opens the meter on the worker's GPU and primes GPM here
    src = torch.empty(int(args.gib * 2**30), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    per_copy = 2 * src.numel()  # read + write
    copies, polls = 0, 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.seconds:
        for _ in range(8):
            dst.copy_(src)
            copies += 1
        torch.cuda.synchronize()
        run.poll()
        polls += 1
    wall = time.monotonic() - t0
    snap = snap_io.read_snapshots(directory)[0]
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in snapshot_families([snap]):
        for s in fam.samples:
            if "hbm_measure" in s.name and not s.name.endswith("_created"):
                samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    run.close()
    worker.close()
    hbm = snap.get("hbm_measured", {})
    got_b = samples.get("moe_reuse_hbm_measured_bytes_total", [({}, 0.0)])[0][1]
    got_s = samples.get("moe_reuse_hbm_measured_seconds_total", [({}, 0.0)])[0][1]
    info = samples.get("moe_reuse_hbm_measurement_info", [({}, 0.0)])[0][0]
    load_bps = copies * per_copy / wall
    measured_bps = got_b / got_s if got_s else float("nan")
    ratio = measured_bps / load_bps if got_s else float("nan")
    out: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "uuid": uuid,
        "reason": hbm.get("reason"), "detail": hbm.get("detail"), "info_labels": info,
        "exported": {k: v for k, v in samples.items()}, "copies": copies, "polls": polls,
        "load_seconds": wall, "load_bytes_per_second": load_bps,
        "measured_bytes_per_second": measured_bps, "measured_seconds": got_s,
        "ratio_measured_over_load": ratio, "tolerance": TOLERANCE,
    }
    ok = info.get("reason") == "gpm" and abs(ratio - 1) <= TOLERANCE
    out["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"[{'PASS' if ok else 'FAIL'}] exported measured HBM bandwidth vs the load's bytes: "
          f"reason={info.get('reason')} measured {measured_bps / 1e9:.1f} GB/s over {got_s:.2f} s "
          f"(moe_reuse_hbm_measured_bytes_total {got_b:.4g}), load {load_bps / 1e9:.1f} GB/s "
          f"({copies} copies of {src.numel() / 2**30:.1f} GiB read + written in {wall:.2f} s), "
          f"ratio {ratio:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
