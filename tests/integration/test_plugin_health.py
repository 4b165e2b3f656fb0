"""Never blind without saying so, on Model Runner V2 (every GPU server's runner), in a real server.

- A bind that fails (here injected at the `bind` stage) leaves serving untouched and shows on
  /metrics as `moe_reuse_enabled{reason="bind_failed"} 0` with `errors_total{stage="bind"}`, the
  rank's info (runner included) and no counters, which MoeReusePluginDisabled alerts on.
- The self-check reads 0 under load in every conservation run (test_recorder_server.py); here the
  counting is broken on purpose (layer slot 0 never counted, MOE_REUSE_TEST_BREAK_COUNTING) and it
  must equal what the test sent: every computed token x top-k, once per step of the broken layer.
  In the same server the recorder is sized without the last MoE layer
  (MOE_REUSE_TEST_UNSIZED_LAYER), as if it missed a routing source vLLM binds: the self-check
  cannot see a layer it has no slot for, so /metrics must say so,
  `moe_reuse_unrecorded_moe_layers{source="unknown_layer"} 1`.
"""

from __future__ import annotations

import time

import pytest
from test_recorder_server import _CliServer

from moe_reuse.plugin.harness.load import complete, random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts
from moe_reuse.plugin.metrics_text import samples

pytestmark = pytest.mark.integration

FLUSH = {"flush_interval_s": 0.2}


@pytest.mark.parametrize("api_servers", [1, 2])
def test_bind_failure_keeps_serving_and_says_so_on_metrics(api_servers: int) -> None:
    """With two API servers /metrics comes from Prometheus multiprocess value files, which only
    the reader writes: the failed rank's status must reach them too."""
    cls, extra = (VllmServer, []) if api_servers == 1 else (
        _CliServer, ["--api-server-count", str(api_servers)])
    with cls(build_model("qwen3-moe"), enforce_eager=True, runner="v2",
             additional_config={"moe_reuse": FLUSH}, extra_args=extra,
             env={"MOE_REUSE_INJECT_FAULT": "bind:1"}).start() as srv:
        out = complete(srv.url, random_prompts(1, 12, 512, seed=3)[0], 6)
        assert out["usage"]["completion_tokens"] == 6
        time.sleep(0.5)  # the reader polls every 0.1 s
        text = srv.metrics_text()
        assert metric_value(text, "moe_reuse_enabled", reason="bind_failed") == 0
        assert 'reason="bind_failed"' in text and 'reason="recording"' not in text
        assert metric_value(text, "moe_reuse_errors_total", stage="bind") == 1
        info = samples(text, "moe_reuse_info")
        assert len(info) == 1 and info[0].labels["runner"] == "v2"
        assert "moe_reuse_tokens_total" not in text
        assert "moe_reuse_snapshot_age_seconds{" not in text  # alive: not a stale-rank alert
        log = srv.log_text()
        assert log.count("moe_reuse: could not bind, serving without it") == 1


def test_selfcheck_catches_a_layer_that_is_not_counted() -> None:
    facts = model_facts("qwen3-moe")
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True, runner="v2",
                    additional_config={"moe_reuse": FLUSH},
                    env={"MOE_REUSE_TEST_BREAK_COUNTING": "1",
                         "MOE_REUSE_TEST_UNSIZED_LAYER": "1"}).start() as srv:
        before = srv.metrics_text()
        prompts = random_prompts(6, 30, facts.vocab_size, seed=17)
        sent = [(p[: 10 + 3 * i], 4 + i) for i, p in enumerate(prompts)]
        run_concurrent(srv.url, sent, concurrency=len(sent))
        computed = sum(len(p) for p, _ in sent) + sum(n - 1 for _, n in sent)
        deadline = time.monotonic() + 30
        text = srv.metrics_text()
        while time.monotonic() < deadline:
            text = srv.metrics_text()
            if metric_value(text, "moe_reuse_scheduled_tokens_total") >= computed:
                break
            time.sleep(0.2)

        def d(name: str, **lb: str) -> float:
            return metric_value(text, name, **lb) - metric_value(before, name, **lb)

        assert d("moe_reuse_scheduled_tokens_total") == computed
        assert d("moe_reuse_selfcheck_mismatch_assignments_total") == computed * facts.top_k
        assert metric_value(text, "moe_reuse_enabled", reason="recording") == 1  # still records
        counted = {s.labels["layer"] for s in samples(text, "moe_reuse_expert_assignments_total")}
        assert counted == {str(i) for i in facts.moe_layer_indices[:-1]}
        assert metric_value(text, "moe_reuse_unrecorded_moe_layers", source="unknown_layer") == 1
        assert metric_value(text, "moe_reuse_unrecorded_moe_layers", source="draft_model") == 0
