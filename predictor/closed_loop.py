"""N closed-loop clients between a serving front end and the engine: the batch they really form.

A client's request passes the front end (vLLM's API server: HTTP, tokenisation, hand-off to the
engine) before its prompt reaches the engine, and every token it streams back passes the front
end again (detokenisation, one SSE chunk). The front end is one process, so its work queues:
with `D = front_end_request_seconds + output x front_end_token_seconds` of it per request, it
serves at most 1/D requests a second however many clients wait. Under that ceiling a closed loop
of N clients keeps fewer than N sequences in the engine: the rest are queued at the front end,
and their wait is time to first token. On a 2-core host the front end saturates at about 250
requests a second (calibrate measures D); a GPU server's API server does the same, only later.

The model is mean-value analysis of a closed network of two stations, in Schweitzer's
approximation (the queue an arriving request finds is the N-client queue scaled by (N-1)/N):
- the front end, a queue with demand D per request: residence R = D / (1 - X D (N-1)/N);
- the engine, where a request stays Z(b) (its prefill steps and `output` decode steps at the
  batch b it shares), so b = X Z(b) (Little's law);
- the loop closes when N = X (R + Z(b)), solved for b by bisection (b grows with X, and the
  front end's residence with it).

Pure: a step-time function in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ClosedLoop:
    """The loop's steady state at one concurrency."""

    batch: float  # sequences in the engine (mean)
    requests_per_second: float
    front_end_residence_seconds: float  # R: a request's own front-end work plus its wait
    front_end_utilisation_ratio: float  # X D
    seat_queue_seconds: float  # waiting for a free engine seat (max_num_seqs, KV), after R


def front_end_residence(clients: int, demand_s: float, rate: float) -> float:
    """R = D / (1 - X D (N-1)/N); infinite where the front end cannot keep up."""
    if demand_s <= 0:
        return 0.0
    busy = rate * demand_s * (clients - 1) / clients
    return demand_s / (1.0 - busy) if busy < 1.0 else math.inf


def solve(clients: int, seats: float, demand_s: float,
          residence: Callable[[float], float]) -> ClosedLoop:
    """The batch N clients form, at most `seats`, with `demand_s` of front-end work per request;
    `residence(b)`: a request's time in the engine at batch b (its prefill and decode steps)."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    seats = min(float(seats), float(clients))

    def excess(b: float) -> tuple[float, float, float]:
        x = b / residence(b)
        r = front_end_residence(clients, demand_s, x)
        return b + x * r - clients, x, r

    over, x, r = excess(seats)
    if over <= 0:  # every seat taken: the clients left over queue for one after the front end
        return ClosedLoop(seats, x, r, min(x * demand_s, 1.0), -over / x)
    lo, hi = 0.0, seats
    for _ in range(60):
        mid = (lo + hi) / 2
        if excess(mid)[0] <= 0:  # mid > 0: it starts at seats / 2 and stays above lo >= 0
            lo = mid
        else:
            hi = mid
    b = max(lo, 1e-9)
    _, x, r = excess(b)
    return ClosedLoop(b, x, r, min(x * demand_s, 1.0), 0.0)


def demand_from_loop(clients: int, batch: float, rate: float) -> float:
    """The model read backwards, for `moe-reuse calibrate`: the front end's work per request D
    that makes N clients hold `batch` sequences in the engine at `rate` requests a second.
    By Little's law a request spends R = (N - b) / X outside the engine per cycle; R = D / (1 -
    X D (N-1)/N) gives D = R / (1 + X R (N-1)/N)."""
    if clients < 1 or rate <= 0:
        raise ValueError(f"need clients >= 1 and a rate > 0, got {clients}, {rate}")
    outside = max(clients - batch, 0.0) / rate
    return outside / (1.0 + rate * outside * (clients - 1) / clients)


def wait_quantile(mean_wait_s: float, utilisation: float, q: float, cap_s: float) -> float:
    """A front-end wait quantile: a single server's (M/M/1) wait, P(W > t) = rho exp(-t rho /
    mean), at most `cap_s` (every other client's work ahead); 0 where rho <= 1 - q."""
    if mean_wait_s <= 0 or utilisation <= 0:
        return 0.0
    rho = min(utilisation, 1.0)
    if rho <= 1.0 - q:
        return 0.0
    return min(mean_wait_s * math.log(rho / (1.0 - q)) / rho, cap_s)
