"""Snapshot transport and the Prometheus exporters (pure families, collector, multiprocess)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from moe_reuse.plugin.exporters import prometheus
from moe_reuse.plugin.exporters.families import (
    EXPERT_SERIES_PER_SCRAPE,
    SERIES_PER_SCRAPE,
    rank_series,
    snapshot_families,
)
from moe_reuse.plugin.exporters.prometheus import SnapshotCollector
from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession
from moe_reuse.plugin.snapshot import (
    decode,
    encode,
    read_snapshots,
    scan_snapshots,
    snapshot_path,
    write_snapshot,
)


def _snap(layers: int = 2, experts: int = 4, rank: str = "0", **opts) -> dict:
    s = RecorderSession(
        RingLayout(layers, experts, 2, 8, 8), ByteModel((1,) * layers),
        labels={"model": "m", "engine": "0", "rank": rank}, info={"top_k": "2"},
        layer_ids=list(range(1, layers + 1)), publish=lambda _: None,
    )
    s.totals.assignments[:] = 6
    s.totals.expert_tokens[:] = np.arange(experts)
    snap = s.snapshot()
    snap["options"] = opts
    return snap


def _text(snaps: list[dict]) -> str:
    reg = CollectorRegistry()

    class C:
        def collect(self):
            return snapshot_families(snaps)

    reg.register(C())  # type: ignore[arg-type]
    return generate_latest(reg).decode()


def test_encode_decode_roundtrip_without_pickle() -> None:
    snap = _snap()
    back = decode(encode(snap))
    assert back["labels"] == snap["labels"]
    for k, v in snap["totals"].items():
        assert np.array_equal(back["totals"][k], v), k


def _with_shape(shape: object) -> bytes:
    """A snapshot file whose header gives its one array `shape` (the JSON padded to its length)."""
    import io
    import json
    import zipfile

    good = encode({"labels": {"rank": "1"}, "totals": {"x": np.zeros((20, 20), np.int64)}})
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        raw, blob = zf.read("header.npy"), zf.read("blob.npy")
    start = raw.index(b'\n{"') + 1  # the JSON after the npy header
    head = json.loads(raw[start:].decode())
    head["arrays"][0][2] = shape
    text = json.dumps(head).encode()
    assert len(text) <= len(raw) - start
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        out.writestr("header.npy", raw[:start] + text.ljust(len(raw) - start))
        out.writestr("blob.npy", blob)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [[-1, 2], [2.0, 2], ["2"], [True], "22", None])
def test_a_header_with_a_bad_array_shape_is_a_corrupt_file_and_the_rest_still_read(
        shape: object, tmp_path: Path) -> None:
    """The header is the file's JSON: a shape that is not a list of non-negative ints is a
    corrupt snapshot (counted by the scan), never an exception out of it (which would drop every
    rank's series from that scrape) or a wrong view."""
    with pytest.raises(ValueError, match="bad shape"):
        decode(_with_shape(shape))
    write_snapshot(tmp_path / "e0-r0.npz", _snap())
    bad = tmp_path / "e0-r1.npz"
    bad.write_bytes(_with_shape(shape))
    bad.chmod(0o600)
    result = scan_snapshots(tmp_path)
    assert [r.snapshot["labels"]["rank"] for r in result.ranks] == ["0"]
    assert dict(result.refused) == {"corrupt": 1}


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for name, data in members.items():
            out.writestr(name, data)
    return buf.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _with_header(header: object) -> bytes:
    """A snapshot file whose JSON header is `header` (its npy framing intact)."""
    import json

    m = _members(encode(_snap()))
    raw = m["header.npy"]
    start = raw.index(b"\n{") + 1
    return _zip({"header.npy": raw[:start] + json.dumps(header).encode(), "blob.npy": m["blob.npy"]})


def _past_the_end() -> bytes:
    """The central directory gives the blob more bytes than the file holds."""
    data = bytearray(_zip(_members(encode(_snap()))))
    at = data.index(b"PK\x01\x02")  # central directory entries, in the order written
    while bytes(data[at + 46:at + 46 + int.from_bytes(data[at + 28:at + 30], "little")]) != b"blob.npy":
        at = data.index(b"PK\x01\x02", at + 4)
    big = (len(data) + 4096).to_bytes(4, "little")
    data[at + 20:at + 24] = big
    data[at + 24:at + 28] = big
    return bytes(data)


def _bad_local_header() -> bytes:
    import io
    import zipfile

    data = bytearray(_zip(_members(encode(_snap()))))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        off = zf.getinfo("blob.npy").header_offset
    data[off:off + 4] = b"XXXX"
    return bytes(data)


HOSTILE_FILES = {
    "an extra member": lambda: _zip({**_members(encode(_snap())), "x.npy": b"\0" * 8}),
    "a member missing": lambda: _zip({"blob.npy": _members(encode(_snap()))["blob.npy"]}),
    "a member past the end of the file": _past_the_end,
    "a broken local header": _bad_local_header,
    "a header that is a list": lambda: _with_header([1, 2]),
    "a header without arrays": lambda: _with_header({"labels": {"rank": "1"}}),
    "an array with an unknown dtype": lambda: _with_header(
        {"labels": {"rank": "1"}, "arrays": [["x", "zz", [2], 0, 16]]}),
    "an array with a float offset": lambda: _with_header(
        {"labels": {"rank": "1"}, "arrays": [["x", "<i8", [2], 0.5, 16]]}),
    "an array with a list for a name": lambda: _with_header(
        {"labels": {"rank": "1"}, "arrays": [[["x"], "<i8", [2], 0, 16]]}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_a_file_that_is_not_a_snapshot_s_shape_is_corrupt_and_the_rest_still_read(
        case: str, tmp_path: Path) -> None:
    """Decoding reads members in place from the central directory's offsets and the header's
    JSON, so every way those can lie is a corrupt file (a ValueError the scan counts), never an
    exception out of the scan (which would drop every rank's series from that scrape)."""
    data = HOSTILE_FILES[case]()
    with pytest.raises(ValueError):
        decode(data)
    write_snapshot(tmp_path / "e0-r0.npz", _snap())
    bad = tmp_path / "e0-r1.npz"
    bad.write_bytes(data)
    bad.chmod(0o600)
    result = scan_snapshots(tmp_path)
    assert [r.snapshot["labels"]["rank"] for r in result.ranks] == ["0"]
    assert dict(result.refused) == {"corrupt": 1}


def test_a_scanned_snapshot_s_totals_are_exact_and_can_be_updated(tmp_path: Path) -> None:
    """The scan reads a rank file once into a writable buffer and the totals view it (no copy
    per array); decoding read-only bytes copies the blob once: both give the written totals,
    and both can be updated in place, as the reader's window does."""
    snap = _snap()
    write_snapshot(tmp_path / "e0-r0.npz", snap)
    [rank] = scan_snapshots(tmp_path).ranks
    from_bytes = decode(encode(snap))
    for k, v in snap["totals"].items():
        for got in (rank.snapshot["totals"][k], from_bytes["totals"][k]):
            assert np.array_equal(got, v), k
            assert got.flags.writeable, k


def test_names_units_and_counters() -> None:
    text = _text([_snap()])
    assert 'moe_reuse_expert_assignments_total{engine="0",layer="1",model="m",phase="decode",rank="0"} 6.0' in text
    assert "# TYPE moe_reuse_hbm_read_bytes_total counter" in text
    assert "# TYPE moe_reuse_expert_batch_tokens histogram" in text
    assert 'moe_reuse_moe_comm_info{engine="0",mode="none",model="m",rank="0"} 1.0' in text
    assert "moe_reuse_moe_comm_seconds" not in text
    assert ":" not in "".join(ln.split("{")[0] for ln in text.splitlines() if not ln.startswith("#"))


def test_two_ranks_merge_into_one_family_each() -> None:
    text = _text([_snap(rank="0"), _snap(rank="1")])
    assert text.count("# TYPE moe_reuse_tokens_total counter") == 1
    assert 'rank="1"' in text and 'rank="0"' in text


def _all_live_gauges(layers: int) -> dict:
    """Every live comparison gauge, per-layer ones included (dead, cold, drift)."""
    from moe_reuse.plugin.live.window import window_gauges

    fig = {"qs": 0.16, "routing_factor": 32.0, "ridge_point_tokens": 150.0,
           "hbm_peak_bytes_per_second": 4.8e12, "decode_steps": 10, "capacity_factor": 1.1,
           "reuse_gap": 35.0, "kv_capacity_moe": 1e6, "kv_capacity_dense": 1.1e6,
           "dense_speedup": 4.5, "tokens_per_expert_measured": 3.0,
           "tokens_per_expert_uniform": 2.9, "tokens_per_expert_distinct": 3.1,
           "step_bytes_measured": 1e10, "step_bytes_predicted": 1e10,
           "step_seconds_measured": 0.03, "step_seconds_predicted": 0.03,
           "error_step_seconds": 1.0, "error_step_bytes": 1.0, "error_tokens_per_expert": 1.0,
           "regime": "bandwidth_bound", "dead": [0] * layers, "cold": [1] * layers,
           "drift": [0.01] * layers}
    return window_gauges(fig, list(range(1, layers + 1)))


def test_default_cardinality_for_a_61_layer_256_expert_model_is_under_1000() -> None:
    """Defaults, every live gauge included: per-layer summaries only, under 1,000 series."""
    snap = _snap(layers=61, experts=256)
    snap["gauges"] = _all_live_gauges(61)
    text = _text([snap])
    series = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert 'moe_reuse_routing_drift_ratio{engine="0",layer="61"' in text
    assert len(series) <= 1000, len(series)
    assert not any("expert=" in ln for ln in series)


def test_prefill_experts_touched_is_one_rank_total_unless_per_expert_series_is_on() -> None:
    """Decode's touched experts per layer always; prefill's per layer only with per_expert_series,
    otherwise one series per rank (layer="": no layer label once Prometheus ingests it) holding
    the sum over layers, so the total over every series is the snapshot's either way."""
    def touched_rows(**opts) -> dict[str, float]:
        snap = _snap(layers=3, **opts)
        snap["totals"]["touched"][:] = np.array([[5, 1], [7, 2], [9, 3]])  # [layer, phase]
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in _text([snap]).splitlines()
                                         if ln.startswith("moe_reuse_experts_touched_total{"))}

    default, detail = touched_rows(), touched_rows(per_expert_series=True)
    assert sum(default.values()) == sum(detail.values()) == 27
    pre = {k: v for k, v in default.items() if 'phase="prefill"' in k}
    assert pre == {'moe_reuse_experts_touched_total{engine="0",layer="",model="m",'
                   'phase="prefill",rank="0"}': 21.0}
    assert sum('phase="decode"' in k for k in default) == 3
    assert sorted(v for k, v in detail.items() if 'phase="prefill"' in k) == [5.0, 7.0, 9.0]


def test_per_expert_series_are_capped_with_an_overflow_series() -> None:
    text = _text([_snap(layers=61, experts=256, per_expert_series=True, max_expert_series=2000)])
    rows = [ln for ln in text.splitlines() if ln.startswith("moe_reuse_expert_tokens_total{")]
    assert len(rows) <= 2000 and any('expert="other"' in r for r in rows)
    # nothing lost: per layer and phase, kept + other == the layer's total
    total = sum(float(r.rsplit(" ", 1)[1]) for r in rows)
    assert total == 61 * 2 * sum(range(256))


def test_collector_reads_atomically_written_rank_files(tmp_path: Path) -> None:
    write_snapshot(snapshot_path(tmp_path, "0", "0"), _snap(rank="0"))
    write_snapshot(snapshot_path(tmp_path, "0", "1"), _snap(rank="1"))
    (tmp_path / "e0-r9.npz").write_bytes(b"torn")  # unreadable files are skipped
    assert [s["labels"]["rank"] for s in read_snapshots(tmp_path)] == ["0", "1"]
    fams = list(SnapshotCollector(lambda: tmp_path).collect())
    assert any(f.name == "moe_reuse_tokens" for f in fams)
    assert not list(tmp_path.glob(".tmp-*"))


def test_multiprocess_bridge_matches_single_process_exposition(tmp_path: Path) -> None:
    """Write through the bridge in a child with PROMETHEUS_MULTIPROC_DIR, read with
    MultiProcessCollector, and compare with the single-process exposition sample by sample."""
    snap_file = tmp_path / "snap.npz"
    write_snapshot(snap_file, _snap())
    mp = tmp_path / "mp"
    mp.mkdir()
    code = textwrap.dedent(f"""
        from pathlib import Path
        from moe_reuse.plugin.snapshot import decode
        from moe_reuse.plugin.exporters.multiprocess import MultiprocessBridge
        b = MultiprocessBridge()
        snap = decode(Path({str(snap_file)!r}).read_bytes())
        b.publish(snap); b.publish(snap)
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        reg = CollectorRegistry(); multiprocess.MultiProcessCollector(reg)
        print(generate_latest(reg).decode())
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    single = _text([decode(snap_file.read_bytes())])

    def samples(t: str) -> dict[str, float]:
        rows = {}
        for ln in t.splitlines():
            if ln.startswith("moe_reuse_") and "_created" not in ln:
                k, v = ln.rsplit(" ", 1)
                rows[k] = float(v)
        return rows

    a, b = samples(single), samples(out)
    assert a == b


def test_rank_series_estimate_covers_what_a_rank_exports() -> None:
    """The budget is only as good as the estimate: never below the real count, at most 10% above."""
    for layers, experts, opts in [(61, 256, {}), (61, 256, {"per_expert_series": True}),
                                  (2, 4, {}), (48, 128, {"per_expert_series": True})]:
        snap = _snap(layers, experts, **opts)
        n = sum(len(f.samples) for f in snapshot_families([snap])
                if f.name not in ("moe_reuse_vllm_info",))
        est = rank_series(snap, min(2000, EXPERT_SERIES_PER_SCRAPE) if opts else 0)
        assert n <= est <= 1.1 * n + 10, (layers, experts, opts, n, est)


def test_a_scrape_past_its_series_budget_keeps_status_and_says_so(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """40 ranks of a 61-layer model: ranks in (engine, rank) order keep their series until the
    budget is spent; the rest that were read export info/enabled/errors and their age. Every rank
    without its series (not read within the scan's budget, or past the series budget) is counted
    as over_budget."""
    run = tmp_path / "4000001-abcdef01"
    for r in range(40):
        write_snapshot(snapshot_path(run, "0", f"{r:02d}"), _snap(61, 256, rank=f"{r:02d}"))
    # every rank read (the scan's own wall-time budget is tested in test_snapshot.py)
    monkeypatch.setattr(prometheus, "scan_snapshots", functools.partial(scan_snapshots,
                                                                        budget_s=60.0))
    col = SnapshotCollector(lambda: run)
    fams = list(col.collect())
    samples = [s for f in fams for s in f.samples]
    assert len(samples) <= SERIES_PER_SCRAPE + 40 * 4  # status and age of every rank on top
    detailed = {s.labels["rank"] for s in samples if s.name == "moe_reuse_steps_total"}
    n = len(detailed)
    assert detailed == {f"{r:02d}" for r in range(n)} and 0 < n < 40
    status = {s.labels["rank"] for s in samples if s.name == "moe_reuse_enabled"}
    ages = {s.labels["rank"] for s in samples if s.name == "moe_reuse_snapshot_age_seconds"}
    assert detailed < status == ages == {f"{r:02d}" for r in range(40)}
    refused = {s.labels["reason"]: s.value for s in samples
               if s.name == "moe_reuse_snapshot_refused_total"}
    assert refused["over_budget"] == 40 - n
