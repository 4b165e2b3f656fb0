"""KV bytes per step follow each KV-cache group's rule, in a real server, on both runners.

- GPT-OSS alternates sliding-window and full-attention layers (`layer_types`): a sliding layer
  reads at most `sliding_window` tokens of the context, a full one all of it.
- Llama-4's chunked local attention: layers with RoPE attend only to the tokens of the current
  chunk (`attention_chunk_size`), the NoPE layers to the whole context.
- Qwen3-Next's Gated DeltaNet layers hold no KV but a recurrent state per request, which every
  step after the request's first reads whole (its conv and delta-rule state, from config.json).
Tiny random-weight models with a 64-token window or chunk (vLLM wants a chunk to be a multiple of
the KV block: 32 here) serve one request whose context runs past it; every step's KV read is
worked out here from config.json (K and V: KV heads x head dim x 2 bytes of bf16, per layer) and
from the context the step had, which the test knows because it sent the only request: the
prefill step ends with the prompt in the cache, each decode step with one token more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from matrix import FULL, runners

from moe_reuse.plugin.harness.load import complete, random_prompts
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model

pytestmark = pytest.mark.integration


def _layer_reads(cfg: dict, layer: int, c: int) -> int:
    """Tokens of KV a layer reads at context c, by its attention kind in config.json."""
    types = cfg.get("layer_types")
    if types and types[layer] == "sliding_attention":
        return min(c, cfg["sliding_window"])
    if cfg.get("attention_chunk_size") and cfg.get("no_rope_layers", [0] * 99)[layer] == 1:
        chunk = cfg["attention_chunk_size"]  # Llama-4: RoPE layers use the local chunk
        return c - ((c - 1) // chunk) * chunk
    return c


def _expected_kv_bytes(cfg: dict, contexts: list[int]) -> int:
    per_layer_token = 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2  # K+V, bf16
    return sum(per_layer_token * _layer_reads(cfg, layer, c)
               for c in contexts for layer in range(cfg["num_hidden_layers"]))


def _one_request_kv_bytes(srv: VllmServer, cfg: dict, prompt: int, n: int, seed: int) -> float:
    """Serve one request of `prompt` random tokens and `n` output tokens, the server's only
    one, and return the KV-cache bytes the plugin counted for it, once all its n steps (the
    prompt's, then n - 1 decodes) reached /metrics."""
    before = srv.metrics_text()
    out = complete(srv.url, random_prompts(1, prompt, cfg["vocab_size"], seed=seed)[0], n)
    assert out["usage"]["completion_tokens"] == n
    deadline = time.monotonic() + 30
    while True:
        text = srv.metrics_text()
        steps = sum(metric_value(text, "moe_reuse_steps_total", kind=k)
                    - metric_value(before, "moe_reuse_steps_total", kind=k)
                    for k in ("prefill", "decode", "mixed"))
        if steps >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert steps == n
    return (metric_value(text, "moe_reuse_hbm_read_bytes_total", component="kv_cache")
            - metric_value(before, "moe_reuse_hbm_read_bytes_total", component="kv_cache"))


# CI: each model on one runner, the two runners covered (MOE_REUSE_FULL_MATRIX=1: all four)
RUNS = ([(m, r) for m in ("gpt-oss", "llama4-chunked") for r in ("v1", "v2")] if FULL
        else [("gpt-oss", "v2"), ("llama4-chunked", "v1")])


@pytest.mark.parametrize("name, runner", RUNS, ids=[f"{m}-{r}" for m, r in RUNS])
def test_windowed_and_chunked_layers_read_only_their_part(name: str, runner: str) -> None:
    model = build_model(name)
    cfg = json.loads((Path(model) / "config.json").read_text())
    prompt, n = 120, 20  # contexts 120 (prefill), then 121..139: past 64 (and Llama-4's 128)
    with VllmServer(model, enforce_eager=True, runner=runner, enable_prefix_caching=False,
                    additional_config={"moe_reuse": {"flush_interval_s": 0.2}},
                    extra_args=["--block-size", "32"]).start() as srv:
        got = _one_request_kv_bytes(srv, cfg, prompt, n, seed=4)
        contexts = [prompt] + [prompt + i for i in range(1, n)]
        want = _expected_kv_bytes(cfg, contexts)
        full = (sum(contexts) * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
                * cfg["num_hidden_layers"])
        print(f"\n{name} {runner}: KV bytes {got:.0f}, expected {want} (all layers full: {full})")
        assert got == want
        assert want < full * 0.8  # the window or chunk really limits the read
        sliding = "sliding_attention" in (cfg.get("layer_types") or [])  # Llama-4 lists
        seen = "(64, -)" if sliding else "(-, 64)"  # chunked_attention layers there too
        assert seen in srv.log_text()  # the seam saw the windowed or chunked group


def _gdn_state_bytes(cfg: dict) -> int:
    """One request's Gated DeltaNet state in one layer, bf16 (vLLM's GDN cache): the conv over
    q, k and v keeps kernel - 1 columns; the delta rule's state is value heads x value dim x
    key dim."""
    k, v = (cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"],
            cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"])
    conv = (2 * k + v) * (cfg["linear_conv_kernel_dim"] - 1)
    return 2 * (conv + v * cfg["linear_key_head_dim"])


@pytest.mark.parametrize("runner", runners("v2"))
def test_a_hybrids_recurrent_state_is_read_each_step_with_the_kv(runner: str) -> None:
    model = build_model("qwen3-next")
    cfg = json.loads((Path(model) / "config.json").read_text())
    types = cfg["layer_types"]
    prompt, n = 40, 12
    with VllmServer(model, enforce_eager=True, runner=runner, enable_prefix_caching=False,
                    additional_config={"moe_reuse": {"flush_interval_s": 0.2}}).start() as srv:
        got = _one_request_kv_bytes(srv, cfg, prompt, n, seed=5)
        contexts = [prompt] + [prompt + i for i in range(1, n)]
        attention = types.count("full_attention")
        kv = sum(contexts) * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * attention
        state = (n - 1) * types.count("linear_attention") * _gdn_state_bytes(cfg)
        print(f"\nqwen3-next {runner}: KV-cache bytes {got:.0f}, expected {kv} KV + {state} state")
        assert got == kv + state
        assert "recurrent state" in srv.log_text()
