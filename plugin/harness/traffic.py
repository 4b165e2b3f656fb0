"""Mixed production traffic for the soak, fault and reliability runs, on the one load generator
(`load`: its client and its closed loop).

Streaming and not, varied lengths, shared prefixes, and clients that hang up. A production server
sees all of these at once, and each one exercises a different path of vLLM's scheduler that the
recorder must follow exactly: prefix-cache hits skip tokens, preemption under a small KV cache
recomputes them, and a client that disconnects aborts its request after the engine has already
computed some of its tokens. `LoadRequest.abort_after_tokens` closes the HTTP connection after
that many streamed tokens; vLLM notices on its next write and aborts the request.

    reqs = mixed_requests(2000, vocab_size=512, seed=0)
    results = run_load(srv.url, reqs, concurrency=64, model=srv.served_model_name)
    summary = summarize(results)  # {"completed": ..., "aborted": ..., "failed": ..., ...}
"""

from __future__ import annotations

import random
import time
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .load import NUM_SPECIAL_TOKENS, closed_loop, complete, complete_streamed


@dataclass(frozen=True)
class LoadRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    stream: bool = False
    abort_after_tokens: int | None = None  # streamed only: hang up after this many tokens


@dataclass(frozen=True)
class LoadResult:
    request: LoadRequest
    outcome: str  # "completed" | "aborted" | "failed"
    completion_tokens: int  # tokens the client received
    seconds: float
    error: str = ""


def mixed_requests(
    n: int,
    vocab_size: int,
    seed: int,
    *,
    prompt_lengths: tuple[int, int] = (8, 160),
    output_lengths: tuple[int, int] = (1, 48),
    stream_share: float = 0.5,
    abort_share: float = 0.1,
    shared_prefixes: int = 8,
    prefix_share: float = 0.4,
) -> list[LoadRequest]:
    """`n` requests of uniform random lengths: `prefix_share` of them start with one of
    `shared_prefixes` common prefixes (half their length, so the prefix cache hits), `stream_share`
    are streamed, and `abort_share` of all requests (streamed ones with 4+ output tokens) hang up
    after a random share of their output."""
    rng = random.Random(seed)
    lo = NUM_SPECIAL_TOKENS if vocab_size > 2 * NUM_SPECIAL_TOKENS else 0
    max_len = prompt_lengths[1]
    prefixes = [[rng.randrange(lo, vocab_size) for _ in range(max_len)] for _ in range(shared_prefixes)]
    out = []
    for _ in range(n):
        length = rng.randint(*prompt_lengths)
        tokens = [rng.randrange(lo, vocab_size) for _ in range(length)]
        if prefixes and rng.random() < prefix_share:
            shared = rng.choice(prefixes)
            cut = length // 2
            tokens[:cut] = shared[:cut]
        max_tokens = rng.randint(*output_lengths)
        stream = rng.random() < stream_share
        abort = None
        if stream and max_tokens >= 4 and rng.random() < abort_share / max(stream_share, 1e-9):
            abort = rng.randint(1, max_tokens - 2)
        out.append(LoadRequest(tuple(tokens), max_tokens, stream, abort))
    return out


def send(url: str, req: LoadRequest, model: str, timeout_s: float = 300) -> LoadResult:
    """One request; failures are returned (outcome "failed"), never raised."""
    t0 = time.monotonic()
    try:
        if req.stream:
            out = complete_streamed(url, list(req.prompt), req.max_tokens, model=model,
                                    timeout_s=timeout_s, abort_after_tokens=req.abort_after_tokens)
            outcome = "aborted" if out["aborted"] else "completed"
            tokens = int(out["completion_tokens"])
        else:
            out = complete(url, list(req.prompt), req.max_tokens, model=model, timeout_s=timeout_s)
            outcome, tokens = "completed", int(out["usage"]["completion_tokens"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, RuntimeError) as exc:
        return LoadResult(req, "failed", 0, time.monotonic() - t0, repr(exc)[:300])
    return LoadResult(req, outcome, tokens, time.monotonic() - t0)


def run_load(
    url: str,
    requests: Sequence[LoadRequest],
    concurrency: int,
    *,
    model: str,
    timeout_s: float = 300,
    on_result: Callable[[LoadResult], None] | None = None,
) -> list[LoadResult]:
    """Closed loop: at most `concurrency` requests in flight; results in request order."""

    def one(req: LoadRequest) -> LoadResult:
        res = send(url, req, model, timeout_s)
        if on_result is not None:
            on_result(res)
        return res

    return closed_loop(one, requests, concurrency)


def summarize(results: Sequence[LoadResult]) -> dict[str, Any]:
    """Counts by outcome and the tokens the clients received, for logs and closing notes."""
    out: dict[str, Any] = {"requests": len(results)}
    for kind in ("completed", "aborted", "failed"):
        out[kind] = sum(r.outcome == kind for r in results)
    out["streamed"] = sum(r.request.stream for r in results)
    out["prompt_tokens_sent"] = sum(len(r.request.prompt) for r in results)
    out["completion_tokens_received"] = sum(r.completion_tokens for r in results)
    out["errors"] = sorted({r.error for r in results if r.error})[:5]
    return out
