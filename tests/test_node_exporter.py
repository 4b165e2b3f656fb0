"""`moe-reuse exporter` (exporters/node.py): the per-node reader over every run of a snapshot base,
and the `{node}` placeholder that makes one host look like several nodes (snapshot.base_dir)."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from test_snapshot import snap

from moe_reuse.plugin.exporters.node import parse_listen, serve
from moe_reuse.plugin.metrics_text import names, samples
from moe_reuse.plugin.snapshot import base_dir, snapshot_path, write_snapshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exporter_serves_every_live_run_of_its_base(tmp_path: Path) -> None:
    """Two server runs on one node (say two engines started apart): both runs' ranks exported,
    with the reader's own series, on the exporter's port only."""
    base = tmp_path / "node1"
    write_snapshot(snapshot_path(base / f"{os.getpid()}-aaaa0001", "0", "2"), snap("2"))
    other = snap("3")
    other["labels"]["engine"] = "1"
    write_snapshot(snapshot_path(base / f"{os.getpid()}-bbbb0002", "1", "3"), other)
    port, stop = _free_port(), threading.Event()
    t = threading.Thread(target=serve, args=(base, "127.0.0.1", port, stop), daemon=True)
    t.start()
    try:
        for _ in range(50):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        text = text.decode()
    finally:
        stop.set()
        t.join(timeout=10)
    ranks = {(s.labels["engine"], s.labels["rank"])
             for s in samples(text, "moe_reuse_expert_assignments_total")}
    assert ranks == {("0", "2"), ("1", "3")}
    assert {s.labels["rank"] for s in samples(text, "moe_reuse_snapshot_age_seconds")} == {"2", "3"}
    assert samples(text, "moe_reuse_snapshot_refused_total")
    assert not any(n.startswith(("process_", "python_")) for n in names(text))


def test_exporter_of_an_empty_or_untrusted_base_serves_only_its_own_health(tmp_path: Path) -> None:
    from moe_reuse.plugin.exporters.node import node_registry

    fams = {m.name: m for m in node_registry(tmp_path / "missing").collect()}
    assert list(fams) == ["moe_reuse_snapshot_refused"]
    assert all(s.value == 0 for s in fams["moe_reuse_snapshot_refused"].samples)
    bad = tmp_path / "open"
    bad.mkdir(mode=0o777)
    os.chmod(bad, 0o777)
    fams = {m.name: m for m in node_registry(bad).collect()}
    refused = {s.labels["reason"]: s.value for s in fams["moe_reuse_snapshot_refused"].samples}
    assert refused["writable_by_others"] == 1


@pytest.mark.parametrize("text, want", [("127.0.0.1:9477", ("127.0.0.1", 9477)),
                                        (":9100", ("127.0.0.1", 9100)),
                                        ("9100", ("127.0.0.1", 9100)),
                                        ("0.0.0.0:80", ("0.0.0.0", 80)),
                                        ("[::1]:9477", ("::1", 9477))])
def test_listen_addresses(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text, msg", [("host:abc", "the port is not a number"),
                                       ("host:0", "outside 1..65535"),
                                       ("70000", "outside 1..65535")])
def test_bad_listen_names_the_flag(text: str, msg: str) -> None:
    with pytest.raises(SystemExit, match=f"--listen.*{msg}"):
        parse_listen(text)


def test_node_placeholder_splits_ranks_into_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_REUSE_SNAPSHOT_DIR", "/dev/shm/x/node{node}")
    assert base_dir() == base_dir(1) == Path("/dev/shm/x/node0")  # no ranks per node: one node
    monkeypatch.setenv("MOE_REUSE_RANKS_PER_NODE", "2")
    assert [base_dir(r).name for r in (0, 1, 2, 3, 5)] == ["node0", "node0", "node1", "node1",
                                                          "node2"]
    assert base_dir().name == "node0"  # the API server: the first node


def test_exporter_pushes_the_node_s_ranks_over_otlp_to_a_real_receiver(tmp_path: Path) -> None:
    """`--listen off --otlp-endpoint`: both runs' ranks reach a real OTLP/HTTP receiver, each
    point with its model/engine/rank, the resource naming the node."""
    pytest.importorskip("opentelemetry.proto.collector.metrics.v1.metrics_service_pb2")
    from otlp_receiver import OtlpReceiver, attrs, metrics, resource, value

    base = tmp_path / "node1"
    write_snapshot(snapshot_path(base / f"{os.getpid()}-aaaa0001", "0", "2"), snap("2"))
    write_snapshot(snapshot_path(base / f"{os.getpid()}-bbbb0002", "0", "3"), snap("3"))
    rx, stop = OtlpReceiver(), threading.Event()
    t = threading.Thread(target=serve, args=(base, "", 0, stop), daemon=True,
                         kwargs={"otlp_endpoint": rx.endpoint, "otlp_interval_s": 0.3})
    t.start()
    try:
        deadline = time.monotonic() + 15  # the first export may come before the first update
        while not any("moe_reuse_expert_assignments" in metrics(r) for r in rx.requests):
            assert time.monotonic() < deadline, "no OTLP request carried the ranks' points"
            rx.wait(len(rx.requests) + 1)
    finally:
        stop.set()
        t.join(timeout=20)
        rx.close()
    req = next(r for r in rx.requests if "moe_reuse_expert_assignments" in metrics(r))
    assert resource(req)["node"] == socket.gethostname()
    asg = metrics(req)["moe_reuse_expert_assignments"]
    by_rank: dict[str, float] = {}
    for p in asg.sum.data_points:
        by_rank[attrs(p)["rank"]] = by_rank.get(attrs(p)["rank"], 0) + value(p)
    assert by_rank == {"2": 6 * 2 * 2, "3": 6 * 2 * 2}  # 2 layers x 2 phases, 6 each


def test_exporter_with_nothing_to_export_refuses_to_start() -> None:
    from moe_reuse.plugin.cli import main

    with pytest.raises(SystemExit, match="--listen off needs --otlp-endpoint"):
        main(["exporter", "--listen", "off"])
    with pytest.raises(SystemExit, match="--otlp-interval-s must be > 0"):
        main(["exporter", "--listen", "off", "--otlp-endpoint", "http://x:4318/v1/metrics",
              "--otlp-interval-s", "0"])
