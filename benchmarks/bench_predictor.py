"""Speed of the predictor: one partition search, and a 1k-16M context sweep for one model.

Targets (issue): a full partition search for one case in at most 50 ms, a 1k-to-16M context
sweep for one model in at most 1 s. Both are timed for the default search (the paper's
operating points: TP fills the node, EP searched), for the same search under PAPER_ACCOUNTING
(cost_scope="weights", the headline's accounting) and for the widest one (every TP, PP up to
8, DP up to the GPU count). Run: python benchmarks/bench_predictor.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from moe_reuse.predictor import (
    PAPER_ACCOUNTING,
    Accounting,
    candidate_partitions,
    load_hardware_preset,
    load_model_preset,
)
from moe_reuse.predictor.search import evaluate_case, search_partitions
from moe_reuse.predictor.sweep import DEFAULT_CONTEXTS, sweep

WIDE = Accounting(tp_policy="search", max_pp=8, max_dp=1 << 20)


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), max(samples)


def main() -> None:
    hw = load_hardware_preset("paper-reference")
    model = load_model_preset("deepseek-v3")
    print(f"{'benchmark':58} {'median':>9} {'max':>9} {'target':>7}")
    for label, acc in (("default", Accounting()), ("paper", PAPER_ACCOUNTING), ("wide", WIDE)):
        n = len(candidate_partitions(model, hw, 64, acc))
        med, worst = timed(
            lambda acc=acc: search_partitions(model, hw, 64, 131072, accounting=acc), 20
        )
        print(
            f"{f'search deepseek-v3, 64 GPUs, 128k ({label}, {n} partitions)':58} {med * 1e3:8.2f}ms "
            f"{worst * 1e3:8.2f}ms {'50ms':>7}"
        )
        med, worst = timed(lambda acc=acc: evaluate_case(model, hw, 64, 131072, accounting=acc), 10)
        print(
            f"{f'case (MoE + dense twin searches, {label})':58} {med * 1e3:8.2f}ms {worst * 1e3:8.2f}ms {'':>7}"
        )
        med, worst = timed(lambda acc=acc: sweep(model, hw, gpus=64, accounting=acc), 5)
        print(
            f"{f'sweep 1k..16M ({len(DEFAULT_CONTEXTS)} contexts x 2 searches, {label})':58} "
            f"{med * 1e3:8.1f}ms {worst * 1e3:8.1f}ms {'1000ms':>7}"
        )


if __name__ == "__main__":
    main()
