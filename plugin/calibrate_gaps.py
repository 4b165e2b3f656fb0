"""The inter-token gaps' statistics, for `moe-reuse calibrate --engine` (`calibrate_engine`).

Calibration streams every request and times each gap between two tokens, as a user of the
server would. The 2-core hosts it runs on have slow spells, so the runs are split into passes
and each point takes its fastest one (a slow spell only ever adds time); the gaps of all passes
are pooled at that pass's level, and the host's noise and what load adds to the tail are read
from them at `JITTER_QUANTILES`. Pure functions over lists of seconds: no server, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The runs' rounds (`calibrate_engine.RUNS`) are split over PASSES passes, and each point takes
# its fastest pass: the 2-core VM has slow spells of ten seconds to minutes (one that fell on a
# calibration's 32-client run put 37 us a sequence on the step, against 13 to 17 in the others,
# and the what-if 33 to 58% high from 16 clients up; in another the three passes of the
# one-client run took 2.30, 2.38 and 1.86 ms a step, and the benchmark right after 1.92), and
# another tenant's work only ever adds time. Each pass's gaps are scaled to the chosen pass's
# median before they are pooled, so a slow pass adds gaps to the tail, not its own level.
PASSES = 3


def pass_rounds(rounds: int, k: int) -> int:
    """Rounds of a run that pass k takes: `rounds` spread over PASSES, at least one each."""
    return max(1, rounds // PASSES + (k < rounds % PASSES))


def fastest_pass(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """The pass with the shortest mean step: a slow spell in the others does not reach it."""
    return min(passes, key=lambda q: q["step_seconds"])


def pooled_gaps(passes: list[dict[str, Any]], chosen: dict[str, Any]) -> list[float]:
    """Every pass's gaps, each pass scaled to the chosen pass's median gap."""
    return [g * chosen["itl_p50_seconds"] / q["itl_p50_seconds"]
            for q in passes for g in q["gaps"]]


def load_tail_quantiles(gaps_at_one: list[float], gaps_loaded: list[float]) -> list[float]:
    """What load adds to the gaps' tail, in seconds at `JITTER_QUANTILES`: the loaded run's
    quantiles less its median times the one-client run's noise ratios at the same quantile,
    none below the median (a faster-than-median gap is no tail), non-decreasing; none from
    fewer than 1,000 gaps in either run.

    Why this form: the what-if scales the host's noise (`step_jitter_ratios`, the one-client
    gaps over their median) with the step, then adds this tail, so the tail is what the loaded
    run holds beyond its median's own noise, and the what-if gives back the run it came from.
    (Taken as each run's offset above its median instead, a 3 ms step's noise would count
    twice, once scaled and once in the tail: +1.4 to +2.4 ms at P99 on the 2-core VM, the
    what-if's 32- and 64-client P99 40 to 54% high with 128-token outputs.) Why additive: the
    engine stalls now and then for every running sequence at once (vLLM's own inter-token
    histogram shows it), for a time that does not scale with the step."""
    from moe_reuse.predictor.hardware import JITTER_QUANTILES

    if min(len(gaps_at_one), len(gaps_loaded)) < 1000:
        return []
    one, loaded = np.asarray(gaps_at_one, dtype=float), np.asarray(gaps_loaded, dtype=float)
    qs = np.asarray(JITTER_QUANTILES)
    ratios = np.quantile(one, qs) / np.median(one)
    extra = np.quantile(loaded, qs) - np.median(loaded) * ratios
    extra = np.where(qs <= 0.5, 0.0, np.maximum(extra, 0.0))
    return [float(x) for x in np.maximum.accumulate(extra)]


def jitter_ratios(normalised_gaps: list[float]) -> list[float]:
    """The noise quantiles a hardware spec carries (`JITTER_QUANTILES`), 1.0 at the median;
    none from fewer than 1,000 gaps (the 99.9th percentile would be one gap)."""
    from moe_reuse.predictor.hardware import JITTER_QUANTILES

    if len(normalised_gaps) < 1000:
        return []
    q = np.quantile(np.asarray(normalised_gaps, dtype=float), JITTER_QUANTILES)
    q = np.maximum.accumulate(np.maximum(q, 1e-3))
    return [round(float(x), 4) for x in q]
