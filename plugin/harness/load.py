"""The one load generator: every request the demo, dense-ab, calibrate, the benchmarks and the
tests send goes through here (stdlib only).

- one request: `complete` (POST /v1/completions with token ids), `complete_streamed` (client-timed
  TTFT and inter-token gaps, optionally hanging up mid-stream);
- one driver, `closed_loop`: at most `concurrency` requests in flight, a client sending its next
  request when its last one ends; `run_concurrent`, `run_concurrent_streamed` and `traffic.run_load`
  (mixed production traffic, failures returned not raised) are it with a different request;
  `drive_for` keeps the same loop up for a fixed time instead of a fixed list;
- prompts: `random_prompts` here, `traffic.mixed_requests` for production-like traffic;
- figures: `pct`, `latency_percentiles`.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = [
    "NUM_SPECIAL_TOKENS",
    "closed_loop",
    "complete",
    "complete_streamed",
    "drive_for",
    "latency_percentiles",
    "pct",
    "post_json",
    "random_prompts",
    "run_concurrent",
    "run_concurrent_streamed",
    "served_model",
]

T = TypeVar("T")
R = TypeVar("R")
NUM_SPECIAL_TOKENS = 4  # the tiny models' tokenizer: ids 0..3 are special (see _tokenizer.py)


# ---- one request -----------------------------------------------------------------------------


def post_json(url: str, body: Mapping[str, Any], timeout_s: float) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:2000]
        raise RuntimeError(f"POST {url} -> HTTP {e.code}: {detail}") from e
    return json.loads(raw) if raw else None


def served_model(url: str, timeout_s: float = 10) -> str:
    """The first model id of GET /v1/models (not cached: a port may be reused by another server)."""
    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=timeout_s) as r:
        return str(json.load(r)["data"][0]["id"])


def _completion_body(url: str, prompt_token_ids: list[int], max_tokens: int, model: str | None,
                     ignore_eos: bool, temperature: float, timeout_s: float) -> dict[str, Any]:
    """The /v1/completions request both `complete` and `complete_streamed` send."""
    return {
        "model": model or served_model(url, timeout_s),
        "prompt": list(prompt_token_ids),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": ignore_eos,
    }


def complete(
    url: str,
    prompt_token_ids: list[int],
    max_tokens: int,
    *,
    model: str | None = None,
    ignore_eos: bool = True,
    temperature: float = 0.0,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """POST /v1/completions with a token-id prompt; ``["usage"]`` has prompt/completion_tokens.

    Pass ``model`` (``srv.served_model_name``) in timed loops: without it each call first asks
    /v1/models.
    """
    body = _completion_body(url, prompt_token_ids, max_tokens, model, ignore_eos, temperature,
                            timeout_s)
    out: dict[str, Any] = post_json(url.rstrip("/") + "/v1/completions", body, timeout_s)
    return out


def complete_streamed(
    url: str,
    prompt_token_ids: list[int],
    max_tokens: int,
    *,
    model: str | None = None,
    ignore_eos: bool = True,
    temperature: float = 0.0,
    timeout_s: float = 120,
    clock: Callable[[], float] = time.monotonic,
    abort_after_tokens: int | None = None,
) -> dict[str, Any]:
    """Streamed POST /v1/completions, timed by the client: TTFT and every inter-token gap.

    Returns ``{"ttft_seconds", "itl_seconds": [...], "completion_tokens", "prompt_tokens",
    "aborted", "start_seconds"}`` (`start_seconds`: when it was sent, on `clock`).
    ``abort_after_tokens``: hang up once that many tokens arrived (a client that disconnects
    mid-stream; vLLM aborts the request on its next write).
    vLLM sends one SSE chunk per engine step that produced output; with
    ``continuous_usage_stats`` each chunk says how many tokens it completed so far, so a chunk
    carrying n tokens counts as n gaps of (its gap / n).
    """
    body = {
        **_completion_body(url, prompt_token_ids, max_tokens, model, ignore_eos, temperature,
                           timeout_s),
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    req = urllib.request.Request(
        url.rstrip("/") + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = clock()
    events: list[tuple[float, int]] = []  # (arrival, new tokens) per SSE event
    done = prompt = 0
    aborted = False
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        for raw in r:
            # The client shares the machine with the server it times: read the two usage
            # counts without decoding the event (a JSON parse per token per stream costs a
            # good part of a core at 32 streams and turns the client into the bottleneck).
            if not raw.startswith(b"data:"):
                continue
            m = _COMPLETION.search(raw)
            if m is None:
                continue
            tokens = int(m.group(1))
            if not prompt:
                p = _PROMPT.search(raw)
                prompt = int(p.group(1)) if p else 0
            if tokens <= done:
                continue
            events.append((clock(), tokens - done))
            done = tokens
            if abort_after_tokens is not None and done >= abort_after_tokens:
                r.close()
                aborted = True
                break
    ttft, gaps = delivery_gaps(start, events)
    return {"ttft_seconds": ttft, "itl_seconds": gaps, "completion_tokens": done,
            "prompt_tokens": prompt, "aborted": aborted, "start_seconds": start}


_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')
_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
BURST_S = 250e-6  # events closer than this came in one read: no server step is that short


def delivery_gaps(start: float, events: Sequence[tuple[float, int]],
                  burst_s: float = BURST_S) -> tuple[float | None, list[float]]:
    """(TTFT, inter-token gaps) from a stream's (arrival, new tokens) events.

    Events that arrive within `burst_s` of the previous one were read together (the server
    wrote them while the client was busy, a TCP segment carried several): one delivery. The
    first delivery is the TTFT (tokens beyond the first came with it); each later delivery's
    gap from the one before is split evenly over the tokens it carries, as a chunk carrying n
    tokens counts as n gaps. Without this, a burst reads as one long gap and n - 1 gaps of ~0.
    """
    deliveries: list[tuple[float, int]] = []  # (first arrival, tokens)
    last = float("-inf")
    for at, n in events:
        if deliveries and at - last < burst_s:
            deliveries[-1] = (deliveries[-1][0], deliveries[-1][1] + n)
        else:
            deliveries.append((at, n))
        last = at
    if not deliveries:
        return None, []
    gaps: list[float] = []
    for (prev, _), (at, n) in zip(deliveries, deliveries[1:]):
        gaps.extend([(at - prev) / n] * n)
    return deliveries[0][0] - start, gaps


# ---- the driver: a closed loop ---------------------------------------------------------------


def closed_loop(fn: Callable[[T], R], items: Sequence[T], concurrency: int,
                stagger_s: float = 0.0) -> list[R]:
    """The one driver of every load here: `fn` on each item, at most `concurrency` in flight (a
    client sends its next request when its last one ends), results in item order; the first
    exception is raised once all have finished. `stagger_s`: the clients start spread evenly
    over that many seconds (one request's duration spreads arrivals as steady traffic does,
    instead of waves that start and end together)."""
    if not items:
        return []
    workers = max(1, min(concurrency, len(items)))

    def delayed(i: int, x: T) -> R:
        time.sleep(stagger_s * i / workers)
        return fn(x)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(delayed, i, x) if i < workers and stagger_s > 0 else pool.submit(fn, x)
                   for i, x in enumerate(items)]
        return [f.result() for f in futures]


def run_concurrent(
    url: str, requests: Sequence[tuple[list[int], int]], concurrency: int, **kw: Any
) -> list[dict[str, Any]]:
    """``complete`` for each ``(prompt_token_ids, max_tokens)``, at most ``concurrency`` in flight."""
    return closed_loop(lambda r: complete(url, r[0], r[1], **kw), requests, concurrency)


def run_concurrent_streamed(
    url: str, requests: Sequence[tuple[list[int], int]], concurrency: int, *,
    stagger_s: float = 0.0, **kw: Any
) -> list[dict[str, Any]]:
    """``complete_streamed`` for each request, at most ``concurrency`` in flight."""
    return closed_loop(lambda r: complete_streamed(url, r[0], r[1], **kw), requests, concurrency,
                       stagger_s)


def drive_for(
    url: str, requests: list[tuple[list[int], int]], concurrency: int, seconds: float,
    model: str | None = None, at: float | None = None, probe: Callable[[], Any] | None = None,
) -> tuple[list[dict[str, Any]], Any]:
    """Keep `concurrency` requests in flight for `seconds`, cycling through `requests`.

    `probe` runs once `at` seconds in (before the wave drains), so what it reads comes from
    steady load at this concurrency. Returns (the completed requests' results, the probe's value).
    """
    deadline = time.monotonic() + seconds
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        j = i
        while time.monotonic() < deadline and not errors:
            p, n = requests[j % len(requests)]
            j += concurrency
            try:
                r = complete(url, p, n, model=model)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                with lock:
                    errors.append(e)
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    value = None
    if probe is not None:
        time.sleep(max(0.0, at if at is not None else seconds))
        value = probe()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, value


# ---- prompts ---------------------------------------------------------------------------------


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` uniform random token ids, avoiding the special ids 0..3."""
    rng = random.Random(seed)
    lo = NUM_SPECIAL_TOKENS if vocab_size > 2 * NUM_SPECIAL_TOKENS else 0
    return [[rng.randrange(lo, vocab_size) for _ in range(length)] for _ in range(n)]


# ---- figures ---------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    s = sorted(values)
    if not s:
        return float("nan")
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def latency_percentiles(streamed: Sequence[dict[str, Any]]) -> dict[str, float]:
    """P50 and P99 of every inter-token gap and of every TTFT that `complete_streamed` timed."""
    itl = [g for r in streamed for g in r["itl_seconds"]]
    ttft = [r["ttft_seconds"] for r in streamed if r["ttft_seconds"] is not None]
    return {"itl_p50_seconds": pct(itl, 50), "itl_p99_seconds": pct(itl, 99),
            "ttft_p50_seconds": pct(ttft, 50), "ttft_p99_seconds": pct(ttft, 99),
            "itl_samples": float(len(itl)), "ttft_samples": float(len(ttft))}
