"""vLLM's own figures, read independently of the plugin: what the integration tests compare the
plugin's counters with (never the plugin's counters themselves).

- `engine_iterations`: the scheduler's per-step token counts from vLLM's log
  (`--enable-logging-iteration-details`);
- `prefix_caching`, `prefix_cache_hits`: the prefix cache as the server resolved and counted it,
  from vLLM's own /metrics series;
- `routed_experts`: the per-token expert ids vLLM itself returns (`--enable-return-routed-experts`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moe_reuse.plugin.metrics_text import first_labels
from moe_reuse.plugin.metrics_text import value as metric_value

_ITERATION = re.compile(
    r"Iteration\((\d+)\): (\d+) context requests, (\d+) context tokens, (\d+) generation "
    r"requests, (\d+) generation tokens")


def engine_iterations(log_text: str) -> dict[str, int]:
    """Sum of vLLM's own per-step figures from its log (``--enable-logging-iteration-details``):
    each engine step logs the requests and tokens it scheduled, split as vLLM splits them (a
    "context" request has no output token yet, everything else is "generation"). This is the
    scheduler's count of the tokens the model really computed, recomputation after preemption and
    the tokens of requests aborted later included, independent of the plugin."""
    out = {"iterations": 0, "context_requests": 0, "context_tokens": 0,
           "generation_requests": 0, "generation_tokens": 0}
    for m in _ITERATION.finditer(log_text):
        out["iterations"] += 1
        for key, g in (("context_requests", 2), ("context_tokens", 3),
                       ("generation_requests", 4), ("generation_tokens", 5)):
            out[key] += int(m.group(g))
    return out


def prefix_caching(metrics_text: str) -> tuple[bool, int]:
    """(prefix caching on, KV block size in tokens) as the server resolved them, from the
    ``vllm:cache_config_info`` labels on ``/metrics`` (the platform may override the flags)."""
    labels = first_labels(metrics_text, "vllm:cache_config_info")
    if labels is None:
        raise LookupError("vllm:cache_config_info is not on /metrics (vLLM changed its metric names?)")
    if "enable_prefix_caching" not in labels or "block_size" not in labels:
        raise LookupError(f"vllm:cache_config_info lacks enable_prefix_caching or block_size: {labels}")
    return labels["enable_prefix_caching"] == "True", int(labels["block_size"])


def prefix_cache_hits(metrics_text: str) -> tuple[float, float]:
    """(hit tokens, queried tokens) of vLLM's prefix cache, from ``/metrics`` text."""
    return (
        metric_value(metrics_text, "vllm:prefix_cache_hits_total"),
        metric_value(metrics_text, "vllm:prefix_cache_queries_total"),
    )


def routed_experts(choice: Mapping[str, Any]) -> Any:
    """The `routed_experts` of a completion choice (`--enable-return-routed-experts`) as a numpy
    array of shape (tokens, layers, top-k), or None when vLLM returned none. vLLM sends it as a
    base64 `.npy` file; one row per token the model computed for the request (prompt + completion
    - 1), indexed by vLLM's layer index."""
    import base64
    import io

    import numpy as np

    data = choice.get("routed_experts")
    if data is None:
        return None
    return np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)
