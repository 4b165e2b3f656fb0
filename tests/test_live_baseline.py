"""`moe-reuse baseline save` parsing (from /metrics text and from snapshot files) and the CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from moe_reuse.plugin import calibrate
from moe_reuse.plugin.live.baseline_cli import (
    add_subcommands,
    cmd_baseline_save,
    expert_counts_from_metrics,
    expert_counts_from_snapshots,
)
from moe_reuse.plugin.live.drift import load_baseline
from moe_reuse.plugin.recorder.aggregate import Totals
from moe_reuse.plugin.snapshot import snapshot_path, write_snapshot

TEXT = """
# TYPE moe_reuse_expert_tokens_total counter
moe_reuse_expert_tokens_total{engine="0",expert="0",layer="1",model="m",phase="decode",rank="0"} 6.0
moe_reuse_expert_tokens_total{engine="0",expert="1",layer="1",model="m",phase="decode",rank="0"} 2.0
moe_reuse_expert_tokens_total{engine="0",expert="0",layer="1",model="m",phase="decode",rank="1"} 1.0
moe_reuse_expert_tokens_total{engine="0",expert="0",layer="1",model="m",phase="prefill",rank="0"} 99.0
moe_reuse_info{engine="0",model="m",rank="0",top_k="2"} 1.0
"""


def test_counts_from_metrics_sum_ranks_and_skip_prefill() -> None:
    assert expert_counts_from_metrics(TEXT) == ({1: {0: 7.0, 1: 2.0}}, 2)
    with pytest.raises(ValueError, match="capped"):
        expert_counts_from_metrics(TEXT.replace('expert="1"', 'expert="other"'))


def test_baseline_from_snapshots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = Totals(2, 4)
    t.expert_tokens[0, 1] = [1, 2, 3, 4]  # decode
    t.expert_tokens[1, 1] = [4, 3, 2, 1]
    t.expert_tokens[0, 0] = 100  # prefill: ignored
    snap = {"labels": {"model": "m", "engine": "0", "rank": "0"}, "info": {}, "layer_ids": [2, 5],
            "top_k": 2, "enabled": True, "errors": {}, "totals": t.arrays(), "gauges": {}}
    write_snapshot(snapshot_path(tmp_path, "0", "0"), snap)
    counts, top_k = expert_counts_from_snapshots(tmp_path)
    assert top_k == 2 and counts == {2: {0: 1, 1: 2, 2: 3, 3: 4}, 5: {0: 4, 1: 3, 2: 2, 3: 1}}
    out = tmp_path / "b.json"
    rc = cmd_baseline_save(argparse.Namespace(url="", snapshot_dir=str(tmp_path), model=None,
                                              seconds=0.0, out=str(out)))
    assert rc == 0
    b = load_baseline(out)
    assert b["layers"]["2"] == [1, 2, 3, 4] and b["top_k"] == 2 and b["num_experts"] == 4
    json.dumps(b)


def test_cli_parses() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_subcommands(sub)
    calibrate.add_subcommands(sub)
    a = ap.parse_args(["baseline", "save", "--url", "http://h:1", "--out", "x.json", "--seconds", "5"])
    assert a.func is cmd_baseline_save and a.seconds == 5
    a = ap.parse_args(["calibrate", "--threads", "1"])
    assert a.threads == 1
