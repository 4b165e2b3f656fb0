"""KV bytes per step follow each KV-cache group's rule, in a real server, on both runners.

Llama-4's chunked local attention: layers with RoPE attend only to the tokens of the current
chunk (`attention_chunk_size`), the NoPE layers to the whole context. A tiny Llama-4 with a
64-token chunk (vLLM wants it a multiple of the KV block: 32 here) serves one request whose
context runs past two chunk boundaries; every step's
KV read is worked out here from config.json (K and V, KV heads x head dim x 2 bytes of bf16, per
layer) and from the context the step had, which the test knows because it sent the only request:
the prefill step ends with the prompt in the cache, each decode step with one token more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from moe_reuse.plugin.harness.server import VllmServer, complete, metric_value, random_prompts
from moe_reuse.plugin.harness.tiny_models import build_model

pytestmark = pytest.mark.integration


def _expected_kv_bytes(cfg: dict, contexts: list[int]) -> int:
    per_layer_token = 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2  # K+V, bf16
    chunk = cfg["attention_chunk_size"]
    total = 0
    for c in contexts:
        for layer in range(cfg["num_hidden_layers"]):
            chunked = cfg["no_rope_layers"][layer] == 1  # RoPE layers use the local chunk
            read = c - ((c - 1) // chunk) * chunk if chunked else c
            total += per_layer_token * read
    return total


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_chunked_local_attention_reads_the_current_chunk(runner: str) -> None:
    model = build_model("llama4-chunked")
    cfg = json.loads((Path(model) / "config.json").read_text())
    prompt, n = 120, 20  # contexts 120 (prefill), then 121..139: past the 64 and 128 boundaries
    with VllmServer(model, enforce_eager=True, runner=runner, enable_prefix_caching=False,
                    additional_config={"moe_reuse": {"flush_interval_s": 0.2}},
                    extra_args=["--block-size", "32"]).start() as srv:
        before = srv.metrics_text()
        out = complete(srv.url, random_prompts(1, prompt, cfg["vocab_size"], seed=4)[0], n)
        assert out["usage"]["completion_tokens"] == n
        want_steps = 1 + (n - 1)
        deadline = time.monotonic() + 30
        while True:
            text = srv.metrics_text()
            steps = sum(metric_value(text, "moe_reuse_steps_total", kind=k)
                        - metric_value(before, "moe_reuse_steps_total", kind=k)
                        for k in ("prefill", "decode", "mixed"))
            if steps >= want_steps or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert steps == want_steps
        got = (metric_value(text, "moe_reuse_hbm_read_bytes_total", component="kv_cache")
               - metric_value(before, "moe_reuse_hbm_read_bytes_total", component="kv_cache"))
        contexts = [prompt] + [prompt + i for i in range(1, n)]
        want = _expected_kv_bytes(cfg, contexts)
        full = sum(contexts) * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 4
        print(f"\n{runner}: KV bytes {got:.0f}, expected {want} (all layers full: {full})")
        assert got == want
        assert want < full * 0.6  # the chunk really limits the read
        assert "(-, 64)" in srv.log_text()  # the seam saw the chunked group
