"""Unit tests of the tiny-model factory and the server harness's pure parts (no vLLM server)."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import pytest
import torch
import vllm_figures

from moe_reuse.plugin.harness import load, server, tiny_models
from moe_reuse.plugin.harness.tiny_models import (
    MODEL_NAMES,
    SMALL_MODEL_NAMES,
    build_model,
    model_facts,
)

EXPECTED_MOE_LAYERS = {
    "qwen3-moe": (0, 1, 2, 3),
    "qwen3-moe-deep": tuple(range(16)),  # calibrate --engine: per-layer overhead
    "qwen3-moe-rigged": (0, 1, 2, 3),
    "qwen3-moe-wide": (0, 1, 2, 3),  # 256 experts, top-8: DeepSeek-V3's router width
    "mixtral": (0, 1, 2, 3),
    "deepseek-v3": (1, 2, 3),  # first_k_dense_replace = 1
    "llama4": (1, 3),  # interleave_moe_layer_step = 2
    "llama4-chunked": (1, 3),  # llama4 with a 64-token attention chunk (KV bytes test)
    "qwen2-moe": (0, 1, 2, 3),
    "olmoe": (0, 1, 2, 3),
    "glm4-moe": (1, 2, 3),  # first_k_dense_replace = 1
    "ernie45-moe": (1, 2, 3),  # moe_layer_start_index = 1
    "qwen3-next": (0, 1, 2, 3),  # every layer MoE; layers 0 and 2 Gated DeltaNet, 1 and 3 attention
    "gpt-oss": (0, 1, 2, 3),
    "lfm2-moe": (1, 2, 3),  # num_dense_layers = 1; layers 0 and 2 short convolutions
    "dense": (),
    "big-moe": tuple(range(8)),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def built(cache: pathlib.Path) -> dict[str, pathlib.Path]:
    return {name: build_model(name, cache) for name in SMALL_MODEL_NAMES}


def test_names() -> None:
    assert set(EXPECTED_MOE_LAYERS) == set(MODEL_NAMES)
    assert "big-moe" not in SMALL_MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_facts_by_name(name: str) -> None:
    f = model_facts(name)
    assert f.name == name
    assert f.moe_layer_indices == EXPECTED_MOE_LAYERS[name]
    assert f.vocab_size == 512
    if f.moe_layer_indices:
        assert 0 < f.top_k < f.num_experts
    else:
        assert f.num_experts == f.top_k == 0


def test_specific_facts() -> None:
    ds = model_facts("deepseek-v3")
    assert (ds.is_mla, ds.num_experts, ds.top_k, ds.num_shared_experts) == (True, 16, 4, 1)
    assert model_facts("qwen2-moe").num_shared_experts == 1
    assert model_facts("llama4").num_shared_experts == 1
    assert model_facts("qwen3-moe-rigged").dead_experts == (7,)
    big = model_facts("big-moe")
    assert (big.hidden_size, big.num_experts, big.top_k, big.num_layers) == (1024, 64, 4, 8)
    expert_bytes_per_layer = big.num_experts * 3 * big.hidden_size * big.moe_intermediate_size * 2
    assert expert_bytes_per_layer > 100e6  # far beyond any CPU cache


@pytest.mark.parametrize("name", SMALL_MODEL_NAMES)
def test_built_checkpoint(name: str, built: dict[str, pathlib.Path]) -> None:
    path = built[name]
    assert path.name.startswith(name + "-")
    facts = model_facts(path)
    assert facts == model_facts(name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [facts.architecture]
    assert (path / "model.safetensors").exists()
    if name == "deepseek-v3":
        assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
        assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576  # the CPU MLA kernel's size
        assert (cfg["n_group"], cfg["topk_group"], cfg["first_k_dense_replace"]) == (4, 2, 1)


def test_tokenizer_loads(built: dict[str, pathlib.Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built["qwen3-moe"]))
    assert len(tok) == 512
    assert tok.eos_token_id == 0 and tok.pad_token_id == 3
    text = "expert routing reuse, 42 tokens!"
    ids = tok(text).input_ids
    assert ids and all(load.NUM_SPECIAL_TOKENS <= i < 512 for i in ids)
    assert tok.decode(ids) == text
    assert isinstance(tok.decode(list(range(512))), str)  # every id decodes
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(chat, str) and chat.endswith("<|im_start|>assistant\n")


def test_rigged_router_cannot_pick_dead_expert(built: dict[str, pathlib.Path]) -> None:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(built["qwen3-moe-rigged"] / "model.safetensors"))
    gates = [w.float() for k, w in weights.items() if k.endswith(".mlp.gate.weight")]
    assert len(gates) == 4
    torch.manual_seed(0)
    x = torch.randn(20000, 128) * torch.rand(20000, 1) * 10  # any direction, any scale
    for w in gates:
        assert torch.count_nonzero(w[7]) == 0
        top = (x @ w.T).topk(2, dim=-1).indices
        assert not (top == 7).any()


def test_cache_reuse_and_hash(built: dict[str, pathlib.Path], cache: pathlib.Path) -> None:
    t0 = time.monotonic()
    again = build_model("qwen3-moe", cache)
    assert again == built["qwen3-moe"]
    assert time.monotonic() - t0 < 0.5
    # distinct specs get distinct directories
    assert len({p.name for p in built.values()}) == len(built)
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temp dirs left


def test_env_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("MOE_REUSE_MODEL_CACHE", str(tmp_path))
    assert tiny_models.default_cache_dir() == tmp_path


def test_concurrent_builders(tmp_path: pathlib.Path) -> None:
    out: list[pathlib.Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(build_model("dense", tmp_path))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    dtype = torch.get_default_dtype()
    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(out)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [out[0].name]
    # the builders' bfloat16 does not leak into the process (transformers sets the default dtype)
    assert torch.get_default_dtype() == dtype == torch.float32


def test_a_builder_that_loses_the_rename_uses_the_winners(tmp_path: pathlib.Path) -> None:
    # another process renamed its build into place first: this one's rename fails, it keeps theirs
    won = build_model("dense", tmp_path)
    spec = tiny_models.model_spec("dense")
    sidecar = (won / tiny_models.SIDECAR).read_text()
    assert tiny_models._build("dense", spec, tmp_path, won, lambda _m: None) == won
    assert [p.name for p in tmp_path.iterdir()] == [won.name]  # its own build removed
    assert (won / tiny_models.SIDECAR).read_text() == sidecar


def test_unknown_model() -> None:
    with pytest.raises(KeyError):
        build_model("no-such-model")


# ------------------------------------------------------------------------------------------------
# server.py pure helpers
# ------------------------------------------------------------------------------------------------


def test_random_prompts() -> None:
    a = load.random_prompts(5, 64, 512, seed=3)
    assert a == load.random_prompts(5, 64, 512, seed=3)
    assert a != load.random_prompts(5, 64, 512, seed=4)
    assert all(len(p) == 64 and min(p) >= load.NUM_SPECIAL_TOKENS and max(p) < 512 for p in a)
    assert len({tuple(p) for p in a}) == 5


def test_metric_value() -> None:
    text = (
        "# HELP vllm:prefix_cache_hits_total x\n"
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 256.0\n'
        'vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9\n'
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1024.0\n'
    )
    assert vllm_figures.prefix_cache_hits(text) == (256.0, 1024.0)
    assert server.metric_value(text, "vllm:prefix_cache_hits_total", engine="1") == 0.0
    later = text.replace("} 256.0", "} 300.0")
    assert server.metric_delta(text, later, "vllm:prefix_cache_hits_total", engine="0") == 44.0
    assert server.metric_delta(text, later, "vllm:prefix_cache_queries_total") == 0.0


def test_prefix_caching_reads_what_the_server_resolved() -> None:
    line = ('vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="False",'
            'engine="0",mamba_block_size="{1: 2}"} 1.0\n')
    assert vllm_figures.prefix_caching("# HELP x\n" + line) == (False, 16)
    assert vllm_figures.prefix_caching(line.replace('"False"', '"True"').replace('"16"', '"128"')) == (True, 128)
    with pytest.raises(LookupError, match="cache_config_info is not on /metrics"):
        vllm_figures.prefix_caching('vllm:prefix_cache_hits_total{engine="0"} 1.0\n')
    with pytest.raises(LookupError, match="lacks enable_prefix_caching"):
        vllm_figures.prefix_caching('vllm:cache_config_info{engine="0"} 1.0\n')


def test_server_command(tmp_path: pathlib.Path) -> None:
    srv = server.VllmServer(
        tmp_path / "m-abc",
        port=1234,
        enforce_eager=True,
        additional_config={"moe_reuse": {"x": 1}},
        enable_prefix_caching=False,
        extra_args=["--seed", "1"],
        log_path=str(tmp_path / "log"),
    )
    cmd = srv.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name") + 1] == "m-abc"
    assert cmd[cmd.index("--port") + 1] == "1234"
    assert "--enforce-eager" in cmd and "--no-enable-prefix-caching" in cmd
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {"moe_reuse": {"x": 1}}
    assert cmd[-2:] == ["--seed", "1"]
    assert srv.url == "http://127.0.0.1:1234"
    env = srv.process_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] and env["VLLM_CACHE_ROOT"]


def test_start_failure_reports_log_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    srv = server.VllmServer(
        tmp_path / "missing-model", log_path=str(tmp_path / "log"), startup_timeout_s=120
    )
    srv.command = lambda: ["bash", "-c", "echo boom-marker; exit 3"]  # type: ignore[method-assign]
    with pytest.raises(server.ServerFailed, match="boom-marker"):
        srv.start()
    assert srv.pid is None
    assert "boom-marker" in srv.log_text()


def test_stop_kills_whole_group(tmp_path: pathlib.Path) -> None:
    srv = server.VllmServer(tmp_path / "m", log_path=str(tmp_path / "log"), startup_timeout_s=2)
    # A leader that ignores SIGINT/SIGTERM with a child: stop() must still leave no process.
    script = "trap '' INT TERM; (trap '' INT TERM; sleep 300) & sleep 300"
    srv.command = lambda: ["bash", "-c", script]  # type: ignore[method-assign]
    srv.stop_timeouts_s = (1.0, 1.0)
    launched: list[str] = []
    with pytest.raises(server.ServerFailed, match="not ready"):
        srv.start(launched.append)
    pgid = int(launched[0].split()[2])  # "launched pid N on port ..."
    assert srv.pid is None
    assert not server._group_alive(pgid)  # start() stopped the whole group after the timeout


def test_server_command_vllm_cli(tmp_path: pathlib.Path) -> None:
    srv = server.VllmServer(tmp_path / "m", launcher="vllm_cli", log_path=str(tmp_path / "log"))
    cmd = srv.command()
    assert cmd[1:5] == ["-m", "moe_reuse.plugin.harness.vllm_cli", "serve", str(tmp_path / "m")]
    assert "--model" not in cmd
    with pytest.raises(ValueError):
        server.VllmServer(tmp_path / "m", launcher="nope")


def test_latency_percentiles_pool_every_gap_and_ttft() -> None:
    streamed = [{"itl_seconds": [0.01] * 100 + [0.5, 0.6], "ttft_seconds": 0.1},
                {"itl_seconds": [], "ttft_seconds": None},  # hung up before its first token
                {"itl_seconds": [0.02] * 98, "ttft_seconds": 0.3}]
    got = load.latency_percentiles(streamed)
    assert got["itl_samples"] == 200 and got["ttft_samples"] == 2
    # nearest rank: the 100th of 200 sorted gaps is the last 0.01, the 198th the last 0.02
    assert got["itl_p50_seconds"] == 0.01 and got["itl_p99_seconds"] == 0.02
    assert got["ttft_p50_seconds"] == 0.1 and got["ttft_p99_seconds"] == 0.3
    assert load.pct([1.0, 2.0, 3.0, 4.0], 75) == 3.0 and load.pct([5.0], 99) == 5.0
    assert load.pct([], 50) != load.pct([], 50)  # NaN
