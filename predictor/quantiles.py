"""Quantiles the latency what-if needs, as pure math: of inter-token gaps drawn from a mix of two
step kinds, each times the host's measured timing noise, and of Poisson arrivals.

The noise is the step-time ratio distribution `moe-reuse calibrate` measures on the host
(`HardwareSpec.step_jitter_ratios`, at `JITTER_QUANTILES`); without it the mix is two points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .hardware import JITTER_QUANTILES


def poisson_quantile(mean: float, q: float) -> int:
    """Smallest n with P(X <= n) >= q for X ~ Poisson(mean)."""
    if mean <= 0:
        return 0
    term = math.exp(-mean) if mean < 700 else 0.0
    if term == 0.0:  # normal approximation for large means
        return int(math.ceil(mean + 2.326 * math.sqrt(mean)))
    total, n = term, 0
    while total < q and n < 100000:
        n += 1
        term *= mean / n
        total += term
    return n


def jitter_cdf(ratios: Sequence[float], r: float) -> float:
    """P(noise ratio <= r), piecewise linear between the measured quantiles."""
    if r < ratios[0]:
        return 0.0
    if r >= ratios[-1]:
        return 1.0
    for i in range(len(ratios) - 1):
        a, b = ratios[i], ratios[i + 1]
        if a <= r < b:
            qa, qb = JITTER_QUANTILES[i], JITTER_QUANTILES[i + 1]
            return qa + (qb - qa) * (r - a) / (b - a)
    return 1.0


def mix_quantile(q: float, mixed_share: float, decode_s: float, mixed_s: float,
                 ratios: Sequence[float]) -> float:
    """The q-quantile of inter-token gaps: decode-only periods with probability 1 - share,
    mixed ones otherwise, each times the host's noise (`ratios`; none: a two-point mix)."""
    if not ratios:  # exactly one of the two step kinds
        low, high = sorted((decode_s, mixed_s))
        share_low = 1.0 - mixed_share if decode_s <= mixed_s else mixed_share
        return low if share_low >= q else high

    def cdf(x: float) -> float:
        return ((1.0 - mixed_share) * jitter_cdf(ratios, x / decode_s)
                + mixed_share * jitter_cdf(ratios, x / mixed_s))

    lo = min(decode_s, mixed_s) * ratios[0]
    hi = max(decode_s, mixed_s) * ratios[-1]
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return hi


def load_tail(tail: Sequence[float], sequences_measured: float, q: float, sequences: float) -> float:
    """The serving stack's tail under load at quantile q (`HardwareSpec.load_tail_seconds`,
    piecewise linear between `JITTER_QUANTILES`) for `sequences` running sequences: none at one,
    all of it from the sequences it was measured at."""
    if not tail or sequences <= 1 or sequences_measured <= 1:
        return 0.0
    share = min(1.0, (sequences - 1) / (sequences_measured - 1))
    qs = JITTER_QUANTILES
    if q <= qs[0]:
        return share * tail[0]
    for i in range(len(qs) - 1):
        if qs[i] <= q <= qs[i + 1]:
            return share * (tail[i] + (tail[i + 1] - tail[i]) * (q - qs[i]) / (qs[i + 1] - qs[i]))
    return share * tail[-1]
