"""What a scrape of /metrics renders, and how Prometheus asks for it, without a server.

Shared by the cardinality and render tests and benchmarks/bench_scrape.py: a rank's snapshot with
chosen per-expert totals (from a real `RecorderSession`, so its keys are the ones the families
read, with the counts set directly instead of recorded), and the Accept headers Prometheus sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession


def rank_snapshot(rank: int, expert_tokens: np.ndarray, *, top_k: int, per_expert: bool,
                  max_expert_series: int, layer_ids: Sequence[int] | None = None,
                  model: str = "ds", **options: Any) -> dict[str, Any]:
    """Rank `rank`'s snapshot whose `expert_tokens[layer, phase, expert]` are the given counts and
    whose assignments are their sums (so every layer conserves); `options` adds to the snapshot's
    exporter options (e.g. `flush_interval_s`)."""
    layers, phases, experts = expert_tokens.shape
    if phases != 2:
        raise ValueError(f"expert_tokens is [layer, phase, expert] with 2 phases, not {phases}")
    s = RecorderSession(
        RingLayout(layers, experts, top_k, 8, 8), ByteModel((1,) * layers),
        labels={"model": model, "engine": "0", "rank": str(rank)}, info={"top_k": str(top_k)},
        layer_ids=list(layer_ids) if layer_ids is not None else list(range(layers)),
        publish=lambda _: None,
    )
    s.totals.expert_tokens[:] = expert_tokens
    s.totals.assignments[:] = expert_tokens.sum(axis=2)
    snap = s.snapshot()
    snap["options"] = {"per_expert_series": per_expert, "max_expert_series": max_expert_series,
                       **options}
    return snap


PROMETHEUS_ACCEPT = {
    "2.x": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
           "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "3.x": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
           "application/openmetrics-text;version=0.0.1;escaping=allow-utf-8;q=0.4,"
           "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
           "text/plain;version=0.0.4;escaping=allow-utf-8;q=0.2,*/*;q=0.1",
}
"""The Accept headers Prometheus sends (2.x: `strings /usr/bin/prometheus` of Debian's 2.42; 3.x:
scrape.acceptHeader with the default UTF-8 name validation, which adds escaping=allow-utf-8).
Both send Accept-Encoding: gzip by default."""
