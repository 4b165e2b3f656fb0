"""Two "nodes" on one host: the API server's /metrics and `moe-reuse exporter`, one Prometheus.

A TP=2 server whose ranks write their snapshots into two different directories, as ranks on two
nodes do (each node has its own /dev/shm): `MOE_REUSE_SNAPSHOT_DIR=<tmp>/node{node}` with one rank
per node. The API server reads node 0 (rank 0) onto vLLM's /metrics; the installed
`moe-reuse exporter` reads node 1 (rank 1) on a port of its own; one real Prometheus scrapes both
with the generated rules.

Expected values come from what the test sent and vLLM's own figures: every rank conserves
(assignments = tokens x top-k per MoE layer and phase, bytes per step from config.json, TP split
in two), each reader exports only its node's rank, and the cluster recording rules count the
engine once: the cluster's token rate equals one rank's rate (a rule that summed the TP ranks
would give twice), its HBM rate the sum of both ranks'.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from matrix import runners
from split_check import check_split
from test_monitoring_e2e import MonitoringStack, WebhookReceiver, _free_port, _wait_for
from test_recorder_server import FLUSH, _check_conservation, _workload

from moe_reuse.dashboards.config import DEFAULT
from moe_reuse.dashboards.rules import render_rules
from moe_reuse.plugin.harness.load import run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts

pytestmark = pytest.mark.integration
# V2 (every GPU server's runner) in CI; V1 as well in the full matrix.
RUNNERS = runners("v2")


def _exporter_cmd() -> list[str]:
    exe = shutil.which("moe-reuse", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "moe_reuse.plugin.cli"]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def _rate(stack: MonitoringStack, expr: str) -> dict[tuple[str, ...], float]:
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")):
            float(r["value"][1]) for r in stack.query(expr)}


def _check_split(shm: Path) -> None:
    """Each node's worker only counted and copied; that node's reader folded its raw ring."""
    for node, rank in ((0, "0"), (1, "1")):
        (run,) = [d for d in (shm / f"node{node}").iterdir() if d.is_dir()]
        check_split(run, "0", rank)


@pytest.mark.parametrize("runner", RUNNERS)
def test_tp2_ranks_on_two_nodes_conserve_and_the_cluster_rules_count_the_engine_once(
        runner: str, tmp_path: Path) -> None:
    facts = model_facts("qwen3-moe")
    shm = tmp_path / "shm"
    env = {"MOE_REUSE_SNAPSHOT_DIR": str(shm / "node{node}"), "MOE_REUSE_RANKS_PER_NODE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    port = _free_port()
    with VllmServer(build_model("qwen3-moe"), additional_config={"moe_reuse": FLUSH},
                    runner=runner, enforce_eager=True,
                    extra_args=["--tensor-parallel-size", "2"], env=env).start() as srv:
        exporter = subprocess.Popen(
            [*_exporter_cmd(), "exporter", "--snapshot-dir", str(shm / "node1"),
             "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        node1 = f"http://127.0.0.1:{port}/metrics"
        rules = tmp_path / "rules.yml"
        rules.write_text(render_rules(DEFAULT))
        try:
            _wait_for(lambda: "moe_reuse_steps_total" in _get(node1), 60, "the exporter")
            with WebhookReceiver() as hook, MonitoringStack(
                    [srv.url.split("//")[1], f"127.0.0.1:{port}"], rules, hook.url,
                    tmp_path / "prom") as stack:
                # both ranks scraped once before the traffic, so every rate sees all of it
                _wait_for(lambda: len(stack.query("moe_reuse_tokens_total")) == 4, 60,
                          "Prometheus to scrape both ranks")
                before = srv.metrics_text() + _get(node1)
                sent = _workload(facts.vocab_size, seed=13)
                run_concurrent(srv.url, sent, concurrency=len(sent))
                want_decode = sum(n - 1 for _, n in sent)

                def flushed() -> str | None:
                    t = srv.metrics_text() + "\n" + _get(node1)
                    ok = all(metric_value(t, "moe_reuse_tokens_total", rank=r, phase="decode")
                             - metric_value(before, "moe_reuse_tokens_total", rank=r,
                                            phase="decode") >= want_decode for r in ("0", "1"))
                    return t if ok else None

                text = _wait_for(flushed, 60, "both ranks to publish")
                _check_split(shm)
                vllm_text, node1_text = srv.metrics_text(), _get(node1)
                # each reader exports its own node's rank only
                assert metric_value(vllm_text, "moe_reuse_info", rank="1") == 0
                assert metric_value(node1_text, "moe_reuse_info", rank="0") == 0
                assert metric_value(vllm_text, "moe_reuse_steps_total", rank="0") > 0
                assert metric_value(node1_text, "moe_reuse_steps_total", rank="0") == 0
                assert metric_value(node1_text, "moe_reuse_steps_total", rank="1") > 0
                # conservation on both nodes, against what was sent and vLLM's prefix hits
                _check_conservation(text, before, facts, sent, ranks=("0", "1"))

                # Prometheus: both targets up, their final counters scraped; rules count once
                assert stack.target_up()
                tok = "sum by (rank, phase) (moe_reuse_tokens_total)"

                def scraped() -> bool:
                    got = _rate(stack, tok)
                    return all(got.get((("phase", "decode"), ("rank", r)), 0)
                               >= metric_value(text, "moe_reuse_tokens_total", rank=r,
                                               phase="decode") for r in ("0", "1"))

                _wait_for(scraped, 60, "Prometheus to scrape both ranks' final counters")
                time.sleep(3)  # a few rule evaluations over the final samples
                cluster = _rate(stack, "model_phase:moe_reuse_tokens:rate5m")
                one = _rate(stack, 'sum by (model, phase) (rate(moe_reuse_tokens_total'
                                   '{rank="0"}[5m]))')
                both = _rate(stack, "sum by (model, phase) (rate(moe_reuse_tokens_total[5m]))")
                assert set(cluster) == set(one) and len(cluster) == 2, (cluster, one)
                for key, v in cluster.items():
                    assert v > 0 and abs(v / one[key] - 1) < 0.15, (key, v, one[key])
                    assert both[key] > 1.7 * v  # a rule summing TP ranks would be this
                hbm = _rate(stack, "model:moe_reuse_hbm_read_bytes:rate5m")
                per_rank = _rate(stack, "sum by (model) (rate(moe_reuse_hbm_read_bytes_total"
                                        '{rank="0"}[5m]))')
                ((_, h),) = hbm.items()
                ((_, h0),) = per_rank.items()
                assert 1.7 * h0 < h < 2.3 * h0, (h, h0)  # both ranks read their own half
                reuse = _rate(stack, "model:moe_reuse_decode_tokens_per_expert:rate5m")
                assert len(reuse) == 1 and list(reuse.values())[0] >= 1.0
                assert stack.rule_health() == []
                print(f"\n{runner}: cluster tokens/s {cluster}, rank 0 alone {one}, ranks "
                      f"summed {both}; HBM B/s cluster {h:.4g}, rank 0 {h0:.4g}; reuse {reuse}")
        finally:
            os.killpg(exporter.pid, signal.SIGTERM)
            out, _ = exporter.communicate(timeout=20)
        assert exporter.returncode == 0, out.decode(errors="replace")[-2000:]
