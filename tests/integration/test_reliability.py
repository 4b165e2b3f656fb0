"""Reliability in a real server: production traffic with nothing lost, and faults at every stage.

Load (real HTTP, `harness.traffic` on `harness.load`): thousands of requests at concurrency 64, mixed prompt and output
lengths, streamed and not, shared prefixes (prefix caching on), 10% of clients hanging up
mid-stream, and a KV cache of 64 blocks of 32 tokens, so small that vLLM preempts requests and
recomputes them. What "really computed" means comes from vLLM itself, not from the plugin: with
`--enable-logging-iteration-details` the engine logs, every step, the context and generation
tokens it scheduled (`harness.server.engine_iterations`), which includes recomputation after
preemption and every token computed for a request that was aborted later. Conservation:
- per MoE layer, prefill + decode assignments = (context + generation tokens) x top-k, exactly;
- per phase: vLLM splits by "has the request produced a token yet", the runner (and the plugin)
  by "is the runner still computing tokens the request had when it was (re)admitted", so the two
  differ only by recomputation after a preemption that vLLM books as generation. That difference
  R = plugin prefill - vLLM context = vLLM generation - plugin decode is 0 without preemptions and
  otherwise X <= R <= X + 4 x preemptions, where X = generation tokens - generation requests
  (a resumed request's recompute chunk is one generation request of many tokens; only the
  request count of those chunks is not in the log).

Faults (`MOE_REUSE_INJECT_FAULT`): each stage is injected in a real server under traffic; every
request still completes, the fault is counted with its stage, `moe_reuse_enabled` says so, and
it is logged once. Throughput with each fault against a server without one is measured side by
side in `benchmarks/bench_faults.py` (not a timed test).
"""

from __future__ import annotations

import time

import pytest
from matrix import FULL
from otlp_receiver import OtlpReceiver
from vllm_figures import engine_iterations, prefix_cache_hits

from moe_reuse.plugin.harness.load import random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts
from moe_reuse.plugin.harness.traffic import mixed_requests, run_load, summarize

pytestmark = pytest.mark.integration

FLUSH = {"flush_interval_s": 0.2}
SMALL_KV = ["--block-size", "32", "--num-gpu-blocks-override", "64"]
# V2 runs under Triton's interpreter here (about 35x slower per step than V1): 2,000 requests
# take about 25 minutes there, so CI sends 120 on V2 and the full 2,000 on V1.
LOAD_RUNS = [("v1", "qwen3-moe", 2000), ("v2", "mixtral", 2000 if FULL else 120)]


def _drained(srv: VllmServer, timeout: float = 120.0) -> str:
    """/metrics once the engine has nothing running or waiting (aborts land a step late)."""
    deadline = time.monotonic() + timeout
    while True:
        text = srv.metrics_text()
        busy = (metric_value(text, "vllm:num_requests_running")
                + metric_value(text, "vllm:num_requests_waiting"))
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


@pytest.mark.parametrize("runner, name, n", LOAD_RUNS, ids=[f"{r}-{m}-{n}" for r, m, n in LOAD_RUNS])
def test_load_with_preemption_and_aborts_conserves_every_token(runner: str, name: str, n: int) -> None:
    facts = model_facts(name)
    with VllmServer(build_model(name), enforce_eager=True, runner=runner,
                    additional_config={"moe_reuse": FLUSH}, enable_prefix_caching=True,
                    max_model_len=256, max_num_seqs=64,
                    extra_args=["--enable-logging-iteration-details", *SMALL_KV]).start() as srv:
        before = srv.metrics_text()
        log_start = len(srv.log_text())
        reqs = mixed_requests(n, facts.vocab_size, seed=13, prompt_lengths=(8, 160),
                              output_lengths=(1, 48), abort_share=0.1)
        t0 = time.monotonic()
        results = run_load(srv.url, reqs, 64, model=srv.served_model_name)
        wall = time.monotonic() - t0
        summary = summarize(results)
        assert summary["failed"] == 0, summary["errors"]
        assert summary["aborted"] >= n // 20 and 0 < summary["streamed"] < n

        # wait until the engine is idle and the plugin has flushed what the log says it ran
        deadline = time.monotonic() + 60
        while True:
            text = _drained(srv)
            it = engine_iterations(srv.log_text()[log_start:])
            computed = it["context_tokens"] + it["generation_tokens"]
            counted = (metric_value(text, "moe_reuse_scheduled_tokens_total")
                       - metric_value(before, "moe_reuse_scheduled_tokens_total"))
            if counted >= computed or time.monotonic() > deadline:
                break
            time.sleep(0.5)

        def d(metric: str, **lb: str) -> float:
            return metric_value(text, metric, **lb) - metric_value(before, metric, **lb)

        preemptions = d("vllm:num_preemptions_total")
        hits = prefix_cache_hits(text)[0] - prefix_cache_hits(before)[0]
        # vLLM 0.32 has no counter of client aborts: they are the requests it never finished
        finished = d("vllm:request_success_total")
        aborted_by_vllm = n - finished
        prefill, decode = (d("moe_reuse_tokens_total", phase=p) for p in ("prefill", "decode"))
        x = it["generation_tokens"] - it["generation_requests"]
        r = prefill - it["context_tokens"]
        print(f"\n{runner} {name}: {n} requests in {wall:.0f} s {summary}; vLLM: "
              f"{it['iterations']} steps, context {it['context_tokens']}, generation "
              f"{it['generation_tokens']} in {it['generation_requests']} request-steps, "
              f"{preemptions:.0f} preemptions, {hits:.0f} prefix-cache hit tokens, "
              f"{aborted_by_vllm:.0f} aborted; plugin: prefill {prefill:.0f} decode {decode:.0f} "
              f"(R = {r:.0f}, X = {x})")

        # the traffic did what it was meant to, by vLLM's own counters
        assert preemptions > 0, "the KV cache was not small enough to preempt"
        assert hits > 0
        assert summary["completed"] <= finished <= n  # a hang-up on the last token may finish
        # A client hangs up after at most max_tokens - 2 streamed tokens, but the engine runs
        # ahead of what the API server has streamed (under this load by many steps), so some of
        # the hung-up requests finish before vLLM sees the disconnect: the aborts must reach vLLM,
        # not all of them in time. How many do depends on how far the stream lags the engine, which
        # is the host's load: CI saw 172 of 196 once (0.88) and 93 of 196 another time (0.47).
        assert summary["aborted"] > 0 and aborted_by_vllm >= summary["aborted"] * 0.25
        assert it["iterations"] > 0 and computed > 0

        # conservation: every token vLLM computed, x top-k, on every MoE layer
        k = facts.top_k
        assert d("moe_reuse_scheduled_tokens_total") == computed
        assert prefill + decode == computed
        assert d("moe_reuse_selfcheck_mismatch_assignments_total") == 0
        assert d("moe_reuse_invalid_expert_ids_total", phase="prefill") == 0
        assert d("moe_reuse_invalid_expert_ids_total", phase="decode") == 0
        assert d("moe_reuse_padding_tokens_total") == 0
        for layer in facts.moe_layer_indices:
            pre = d("moe_reuse_expert_assignments_total", layer=str(layer), phase="prefill")
            dec = d("moe_reuse_expert_assignments_total", layer=str(layer), phase="decode")
            assert (pre, dec) == (prefill * k, decode * k), layer
            assert pre + dec == computed * k, layer
        # per phase, against vLLM's split (see the module docstring)
        assert decode == it["generation_tokens"] - r
        assert x <= r <= x + 4 * preemptions, (r, x, preemptions)
        assert metric_value(text, "moe_reuse_enabled", reason="recording") == 1


def _wait_for(srv: VllmServer, pred, timeout: float = 60.0) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    text = srv.metrics_text()
    while not pred(text) and time.monotonic() < deadline:
        time.sleep(0.3)
        text = srv.metrics_text()
    return text


# (id, runner, injected faults, extra config, expected enabled reason (value), stages counted,
#  the log line each stage writes once)
FAULTS = [
    ("flush", "v1", "flush:3", {}, ("fault", 0), {"flush"},
     {"moe_reuse: disabled after a fault in flush"}),
    ("snapshot_write", "v2", "snapshot_write:2", {}, ("recording", 1), {"snapshot_write"},
     {"moe_reuse: could not write the snapshot"}),
    ("live_window+otlp_push", "v1", "live_window:2,otlp_push:1", {"window_s": 1.0},
     ("degraded", 1), {"live_window", "otlp_push"},
     {"moe_reuse: live_window failed", "moe_reuse: otlp_push failed"}),
    ("collector", "v2", "collector:3", {}, ("collector_fault", 0), {"collector"},
     {"moe_reuse: the snapshot collector failed"}),
]


@pytest.mark.parametrize("case", FAULTS, ids=[c[0] for c in FAULTS])
def test_a_fault_at_each_stage_keeps_serving_and_says_so(case) -> None:  # type: ignore[no-untyped-def]
    _id, runner, inject, extra, (reason, value), stages, lines = case
    facts = model_facts("qwen3-moe")
    cfg = {**FLUSH, **extra}
    with OtlpReceiver() as otlp:
        if "otlp_push" in inject:
            cfg["otlp_endpoint"] = otlp.endpoint
            cfg["otlp_interval_s"] = 1.0
        with VllmServer(build_model("qwen3-moe"), enforce_eager=True, runner=runner,
                        additional_config={"moe_reuse": cfg},
                        env={"MOE_REUSE_INJECT_FAULT": inject}).start() as srv:
            sent = [(p, 6) for p in random_prompts(24, 20, facts.vocab_size, seed=5)]
            for _ in range(3):  # several waves, so every stage runs many times after its fault
                outs = run_concurrent(srv.url, sent, concurrency=8)
                assert [o["usage"]["completion_tokens"] for o in outs] == [6] * len(sent)
                time.sleep(1.2)
            text = _wait_for(srv, lambda t: all(
                metric_value(t, "moe_reuse_errors_total", stage=s) >= 1 for s in stages)
                and metric_value(t, "moe_reuse_enabled", reason=reason) == value)
            for s in stages:
                assert metric_value(text, "moe_reuse_errors_total", stage=s) >= 1, s
            assert metric_value(text, "moe_reuse_enabled", reason=reason) == value
            if "collector" in inject:
                # every scrape from the 3rd on fails inside the collector: /metrics still answers,
                # with vLLM's series, the collector's error count and enabled{reason=
                # "collector_fault"} 0, and none of the ranks' series
                for _ in range(3):
                    t = srv.metrics_text()
                    assert "vllm:num_requests_running" in t
                    assert metric_value(t, "moe_reuse_enabled", reason="collector_fault") == 0
                    assert "moe_reuse_tokens_total" not in t
            elif value == 1:  # the recorder kept counting through a fault in another part
                assert metric_value(text, "moe_reuse_tokens_total") >= 3 * len(sent) * 20
            log = srv.log_text()
            for line in lines:
                assert log.count(line) == 1, (line, log.count(line))
