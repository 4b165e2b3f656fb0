"""Serve every small tiny model with a real vLLM server (eager) and check what the harness claims.

Per model: the server starts, a token-id completion returns the right usage, the MoE runners vLLM
built carry exactly ``model_facts(...).moe_layer_indices`` as ``runner.layer_id``, and every MoE
layer routes top_k ids for every scheduled token (for the rigged model: never the dead expert).
Servers run one at a time (the machine has 2 cores) and are always stopped. About 30-90 s per model.
"""

from __future__ import annotations

import pathlib

import pytest

from moe_reuse.plugin.harness.probe import PROBE_CLS
from moe_reuse.plugin.harness.server import (
    VllmServer,
    complete,
    prefix_cache_hits,
    random_prompts,
    run_concurrent,
)
from moe_reuse.plugin.harness.tiny_models import SMALL_MODEL_NAMES, build_model, model_facts

pytestmark = pytest.mark.integration

PROMPT_LEN, MAX_TOKENS, N_REQ = 24, 8, 6


@pytest.mark.parametrize("name", SMALL_MODEL_NAMES)
def test_serve_model(name: str, tmp_path: pathlib.Path) -> None:
    path = build_model(name)
    facts = model_facts(path)
    srv = VllmServer(
        path,
        enforce_eager=True,
        extra_args=["--worker-extension-cls", PROBE_CLS],
        env={"VLLM_SERVER_DEV_MODE": "1"},
        log_path=str(tmp_path / "server.log"),
        max_model_len=256,
        max_num_seqs=8,
    )
    with srv.start():
        (layers,) = srv.collective_rpc("moe_probe_layers")
        assert tuple(sorted(entry["layer_id"] for entry in layers)) == facts.moe_layer_indices
        assert all(entry["router"] == "CPURouter" for entry in layers)
        srv.collective_rpc("moe_probe_count_start")

        prompts = random_prompts(N_REQ, PROMPT_LEN, facts.vocab_size, seed=7)
        one = complete(srv.url, prompts[0], MAX_TOKENS)
        assert one["usage"]["prompt_tokens"] == PROMPT_LEN
        assert one["usage"]["completion_tokens"] == MAX_TOKENS
        assert isinstance(one["choices"][0]["text"], str)
        outs = run_concurrent(srv.url, [(p, MAX_TOKENS) for p in prompts[1:]], concurrency=4)
        assert [o["usage"]["completion_tokens"] for o in outs] == [MAX_TOKENS] * (N_REQ - 1)

        (counts,) = srv.collective_rpc("moe_probe_counts")
        hits, _queries = prefix_cache_hits(srv.metrics_text())
        scheduled = N_REQ * (PROMPT_LEN + MAX_TOKENS - 1) - hits
        assert sorted(int(k) for k in counts) == list(facts.moe_layer_indices)
        for layer, per_expert in counts.items():
            assert len(per_expert) <= facts.num_experts
            assert sum(per_expert) == scheduled * facts.top_k, layer
            for dead in facts.dead_experts:
                assert dead >= len(per_expert) or per_expert[dead] == 0, (layer, per_expert)


def test_prefix_cache_hits_skip_the_moe_layers(tmp_path: pathlib.Path) -> None:
    """vLLM's CPU block size is 128, so a repeated 300-token prompt hits 2 full blocks (256)."""
    path = build_model("qwen3-moe")
    facts = model_facts(path)
    srv = VllmServer(
        path,
        enforce_eager=True,
        enable_prefix_caching=True,
        extra_args=["--worker-extension-cls", PROBE_CLS],
        env={"VLLM_SERVER_DEV_MODE": "1"},
        log_path=str(tmp_path / "server.log"),
        max_model_len=512,
        max_num_seqs=4,
    )
    with srv.start():
        srv.collective_rpc("moe_probe_count_start")
        (prompt,) = random_prompts(1, 300, facts.vocab_size, seed=11)
        for _ in range(2):  # sequential: the second request finds the first one's blocks
            complete(srv.url, prompt, 4)
        hits, queries = prefix_cache_hits(srv.metrics_text())
        (counts,) = srv.collective_rpc("moe_probe_counts")
    assert (hits, queries) == (256.0, 600.0)
    scheduled = 2 * (300 + 4 - 1) - hits
    assert all(sum(c) == scheduled * facts.top_k for c in counts.values())
