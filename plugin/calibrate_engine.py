"""The serving stack's per-step overhead, for `moe-reuse calibrate --engine`.

A decode step is more than its kernels: the model runner prepares inputs and samples, every layer
dispatches its ops, and the framework keeps per-request state. The roofline cost model has no
term for that, and on a small machine it is several milliseconds per step. This stage measures it
where it is paid: a real vLLM server with the plugin serves a bundled tiny MoE (hidden 128:
kernels of tens of microseconds) at 1 and at 32 concurrent requests (at 32 with long and with
short outputs, so the contexts differ), once with 4 layers and once with 16. The plugin's own
counters give the mean decode step time, batch and context; the predictor, with the kernel rates
just measured, gives the tiny model's kernel time; the difference is the overhead. The six
points are fitted as fixed + per layer x layers + per sequence x sequences + per KV byte read
(the attention kernel's own rate, `kv_path_bandwidth_bytes_per_second`).

Every request is streamed, and the client times each inter-token gap, as a user of the server
would. Two more figures come from those gaps, for the latency what-if only:
- the serving gap: the median gap less the mean engine step, the time between two steps that is
  in neither (scheduling, output processing, detokenisation, one SSE chunk per sequence), fitted
  as fixed + per running sequence;
- the host's timing noise: the gaps at concurrency 1 (decode-only steps, nothing else running)
  over their median, at `JITTER_QUANTILES`.
And three loaded closed loops (48 clients with outputs of 16 and 48 tokens, 64 with 128, on the
4-layer model, in every pass, the median kept) give the front end's work per request and per
streamed token (the API server's, and the client's where it shares the API server's cores),
which caps the requests a second a closed loop of clients can send (`predictor.closed_loop`):
read from the batch each loop held, at the what-if's own rate for it (`model_demands`), not from
CPU time. The front end's CPU time was tried first and overstates its work under load: at 32
clients it charged 100 us a streamed token, so the front end could not have served the 250
requests a second of 32 tokens the benchmark's 64 clients reached (polling and GIL hand-offs
count as CPU time but yield to real work).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .calibrate_gaps import (
    PASSES,
    fastest_pass,
    jitter_ratios,
    load_tail_quantiles,
    pass_rounds,
    pooled_gaps,
)

Say = Callable[[str], None]
MODELS = ("qwen3-moe", "qwen3-moe-deep")  # 4 and 16 layers, otherwise the same
# (concurrency, output tokens, rounds): 384 tokens keep concurrent requests overlapping for
# most of their decode; the short run at the same concurrency reads a sixth of the context.
# The long 32-client run also gives the load tail (`load_tail_quantiles`): six rounds, several
# seconds, because the engine's stalls are rare and a second of serving may hold one or none.
RUNS = ((1, 384, 8), (32, 384, 6), (32, 64, 4))
LONG = max(t for _, t, _ in RUNS)
# (clients, output tokens): loaded closed loops, clients started spread over one request's
# duration (steady traffic, not waves), at least FRONT_S each, for the front end's work per
# request (`front_end_loop`); outputs threefold apart separate its per-token part. They run
# on the 4-layer model only, whose steps are the shortest, so that the front end binds: a loop
# whose engine holds nearly every client says little about the front end (a 128-token loop
# held 47 of 48 on the 16-layer model and put its work at 11 ms a request from the one client
# outside), so loops whose engine held over BOUND of the clients are left out of the fit.
# The third streams 128 tokens to 64 clients, a chat-length output at the load where the front
# end and the engine balance: the work a 128-token request carried from the two short loops
# alone (a + 128 x per token) ranged 9.8 to 14.3 ms over six calibrations, where a 64-client
# loop of 128 tokens read 10.0 to 10.6 in three passes; and near that balance the what-if's
# batch hangs on it (10.4 ms put 61 sequences of 64 in the engine, 14.3 ms 29, where the
# benchmark's steady load held 58: runs P-E and P-F, docs/predictor.md).
FRONT_RUNS = ((48, 16), (48, 48), (64, 128))
FRONT_PROMPT = 16  # tokens a loop's prompt holds
BOUND = 0.9
FRONT_S = 6.0
FLUSH_S = 1.0  # the plugin's default flush interval: calibrate the server as it is served
SETTLE_S = 2.2 * FLUSH_S  # for the last steps to reach /metrics


def _decode_step(before: str, after: str) -> tuple[float, float, float]:
    """(mean decode step seconds, mean decode tokens per step, mean context per token)."""
    from .harness.server import metric_delta

    def d(name: str, **labels: str) -> float:
        return metric_delta(before, after, name, **labels)

    steps = d("moe_reuse_steps_total", kind="decode")
    if steps <= 0:
        raise RuntimeError("the calibration server recorded no decode step")
    tokens = d("moe_reuse_tokens_total", phase="decode")
    context = d("moe_reuse_context_tokens_total", phase="decode")
    return (d("moe_reuse_step_duration_seconds_total", kind="decode") / steps, tokens / steps,
            context / max(tokens, 1.0))


def _measure(name: str, say: Say) -> tuple[list[dict[str, float]], list[float], dict[str, Any],
                                            dict[int, list[float]], list[dict[str, float]]]:
    """The model's measured points, its normalised gaps at concurrency 1 (gap / median), its
    config.json, the client's gaps of each long run by concurrency, and the front end's loaded
    loops."""
    from .harness.load import pct, random_prompts, run_concurrent, run_concurrent_streamed
    from .harness.server import VllmServer
    from .harness.tiny_models import build_model

    path = build_model(name, progress=say)
    config = json.loads((path / "config.json").read_text())
    cfg = {"moe_reuse": {"flush_interval_s": FLUSH_S, "window_s": 3600}}
    out = []
    noise: list[float] = []
    long_gaps: dict[int, list[float]] = {}
    seats = max([c for c, _, _ in RUNS] + [c for c, _ in FRONT_RUNS])  # no client waits for a seat
    with VllmServer(path, additional_config=cfg, max_num_seqs=seats,
                    split_cpus=True).start(
            progress=say) as srv:
        run_concurrent(srv.url, [(p, 16) for p in random_prompts(8, 16, 512, seed=0)], 8)
        time.sleep(SETTLE_S)  # as after every run: no step of one counted in the next
        passes: dict[tuple[int, int], list[dict[str, Any]]] = {}
        fronts: list[dict[str, float]] = []
        for k in range(PASSES):
            for c, tokens, rounds in RUNS:
                prompts = random_prompts(c, 16, 512, seed=c + tokens)
                gaps: list[float] = []
                before = srv.metrics_text()
                for _ in range(pass_rounds(rounds, k)):
                    res = run_concurrent_streamed(srv.url, [(p, tokens) for p in prompts], c)
                    gaps += [g for r in res for g in r["itl_seconds"]]
                time.sleep(SETTLE_S)
                step_s, batch, ctx = _decode_step(before, srv.metrics_text())
                passes.setdefault((c, tokens), []).append(
                    {"step_seconds": step_s, "batch_tokens": batch, "context_tokens": max(ctx, 1.0),
                     "itl_p50_seconds": pct(gaps, 50), "gaps": gaps})
            if name == MODELS[0]:  # in every pass, as the points: the fit takes the median
                fronts += [_front_end_loop(srv, c, tokens, say) for c, tokens in FRONT_RUNS]
        for c, tokens, _ in RUNS:
            mid = fastest_pass(passes[(c, tokens)])
            gaps = pooled_gaps(passes[(c, tokens)], mid)
            step_s, itl = mid["step_seconds"], mid["itl_p50_seconds"]  # the pooled median too
            out.append({"layers": float(config["num_hidden_layers"]), "concurrency": float(c),
                        "output_tokens": float(tokens), "batch_tokens": mid["batch_tokens"],
                        "context_tokens": mid["context_tokens"], "step_seconds": step_s,
                        "itl_p50_seconds": itl, "itl_p99_seconds": pct(gaps, 99),
                        "serving_gap_seconds": max(itl - step_s, 0.0)})
            if c == 1:
                median = pct(gaps, 50)
                noise += [g / median for g in gaps]
            if tokens == LONG:
                long_gaps[c] = gaps
            each = ", ".join(f"{q['step_seconds'] * 1e3:.2f}" for q in passes[(c, tokens)])
            say(f"{config['num_hidden_layers']} layers, concurrency {c}, {tokens} tokens: decode "
                f"step {step_s * 1e3:.2f} ms (passes: {each}) at "
                f"{mid['batch_tokens']:.1f} sequences, context {mid['context_tokens']:.0f}; "
                f"client gaps P50 {itl * 1e3:.2f} ms, P99 {pct(gaps, 99) * 1e3:.2f} ms")
    return out, noise, config, long_gaps, fronts


def _front_end_loop(srv: Any, clients: int, tokens: int, say: Say) -> dict[str, float]:
    """One loaded closed loop, over a window of steady load (after the clients' staggered start,
    before they drain): the requests a second it completed and the sequences the engine held,
    and the front end's work per request that explains the clients missing from the engine
    (`closed_loop.demand_from_loop`)."""
    from concurrent.futures import ThreadPoolExecutor

    from moe_reuse.predictor.closed_loop import demand_from_loop
    from moe_reuse.predictor.whatif import Workload

    from .harness.load import (
        closed_loop,
        complete_streamed,
        random_prompts,
        run_concurrent_streamed,
    )
    from .harness.server import metric_delta

    warm = run_concurrent_streamed(srv.url, [(p, tokens) for p in random_prompts(
        clients, FRONT_PROMPT, 512, seed=7 + tokens)], clients)
    duration = float(np.median([(r["ttft_seconds"] or 0.0) + sum(r["itl_seconds"]) for r in warm]))
    ramp = 2 * duration + SETTLE_S  # every client started, and its steps on /metrics
    n = clients * (math.ceil((ramp + FRONT_S + SETTLE_S) / max(duration, 1e-3)) + 2)
    prompts = random_prompts(n, FRONT_PROMPT, 512, seed=11 + tokens)

    def timed(r: tuple[list[int], int]) -> float:
        complete_streamed(srv.url, r[0], r[1])
        return time.monotonic()

    with ThreadPoolExecutor(1) as pool:
        loop = pool.submit(closed_loop, timed, [(p, tokens) for p in prompts], clients, duration)
        time.sleep(ramp)
        t0, before = time.monotonic(), srv.metrics_text()
        time.sleep(FRONT_S)
        t1, after = time.monotonic(), srv.metrics_text()
        ends = loop.result()
    # the loop's last steps reach /metrics a flush late: let them land before the next run
    # reads its start (they once put 5.4 sequences on the one-client run's next pass)
    time.sleep(SETTLE_S)

    def d(metric: str, **labels: str) -> float:
        return metric_delta(before, after, metric, **labels)

    steps = d("moe_reuse_steps_total")
    if steps <= 0:
        raise RuntimeError("the calibration server recorded no step in the front-end run")
    step = d("moe_reuse_step_duration_seconds_total") / steps
    # the rate from the clients' own clock (the counters reach /metrics a flush late), the
    # batch from the counters' ratio (which the lag does not bias)
    rate = sum(t0 <= t < t1 for t in ends) / (t1 - t0)
    # the engine holds a request from the step after its hand-off: half a step of alignment
    # and its prefill step before it decodes (the what-if's TTFT charges the engine the same)
    batch = d("moe_reuse_tokens_total", phase="decode") / steps + rate * 1.5 * step
    demand = demand_from_loop(clients, min(batch, clients), rate)
    say(f"front end, {clients} clients, {tokens} tokens: {rate:.0f} requests/s, engine held "
        f"{batch:.1f} sequences: {demand * 1e3:.2f} ms of front-end work a request at that rate")
    return {"concurrency": float(clients), "output_tokens": float(tokens), "batch": batch,
            "prompt_tokens": float(FRONT_PROMPT), "max_num_seqs": float(srv.max_num_seqs),
            # the what-if's default budget: a loop's steps carry its sequences and a few
            # 16-token prompts, far under any budget vLLM sets (2,048 tokens and up)
            "max_num_batched_tokens": float(Workload().max_num_batched_tokens),
            "requests_per_second": rate, "front_end_seconds": demand,
            # vLLM's own count over the window (a cross-check; it lags the clients by the
            # response's last chunk only)
            "vllm_requests_per_second": d("vllm:request_success_total") / (t1 - t0)}


def _kernels(points: list[dict[str, float]], configs: dict[float, Any], hw: Any) -> None:
    """The predicted kernel time and KV bytes of every point, on the spec as it stands."""
    from moe_reuse.predictor import Partition, model_from_hf_config, step_time

    for p in points:
        st = step_time(model_from_hf_config(configs[p["layers"]]), hw, Partition(),
                       p["batch_tokens"], p["context_tokens"])
        p["predicted_kernel_seconds"] = st.total_seconds - st.overhead_seconds
        p["kv_bytes"] = float(st.hbm_bytes.get("kv", 0.0))
        p["overhead_seconds"] = p["step_seconds"] - p["predicted_kernel_seconds"]


def _fit(rows: list[list[float]], y: list[float], scale: list[float] | None = None) -> list[float]:
    """Non-negative least squares (no negative cost from noise): a coefficient that comes out
    negative is fixed at 0 and the others refitted. `scale`: each point's residual is taken
    relative to it (a 2 ms step and a 10 ms one count alike, as the what-if is judged)."""
    a, b = np.array(rows, dtype=float), np.array(y, dtype=float)
    if scale is not None:
        w = 1.0 / np.maximum(np.array(scale, dtype=float), 1e-9)
        a, b = a * w[:, None], b * w
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol = np.linalg.lstsq(a[:, active], b, rcond=None)[0]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return [float(x) for x in coef]


def engine_overhead(spec: dict[str, Any], *, say: Say = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """({step_overhead_*, kv_path_bandwidth_*, serving_gap_*, step_jitter_ratios, load_tail_*},
    raw points).

    The time a step spends outside the predicted kernels is fitted as fixed + per layer x layers
    + per sequence x sequences + per KV byte x the KV bytes the step reads (the contexts differ
    between the runs, so the attention kernel's own rate separates from per-request costs);
    the last term becomes the KV path's bandwidth, and the other three are refitted with it."""
    from moe_reuse.predictor import hardware_from_dict

    base = {k: v for k, v in spec.items() if k != "notes"}
    hw = hardware_from_dict(base)
    points: list[dict[str, float]] = []
    noise: list[float] = []
    configs: dict[float, Any] = {}
    tails: list[list[float]] = []
    fronts: list[dict[str, float]] = []
    for name in MODELS:
        pts, gaps, config, long_gaps, loops = _measure(name, say)
        fronts += loops
        points += pts
        noise += gaps
        configs[float(config["num_hidden_layers"])] = config
        if name == MODELS[0]:  # the model the front-end loops ran on
            loop_config = config
        loaded = max(long_gaps)
        tails.append(load_tail_quantiles(long_gaps[1], long_gaps[loaded]))
    loaded_batch = [p["batch_tokens"] for p in points
                    if p["output_tokens"] == LONG and p["concurrency"] > 1]
    _kernels(points, configs, hw)
    steps = [p["step_seconds"] for p in points]
    per_byte = _fit([[1.0, p["layers"], p["batch_tokens"], p["kv_bytes"]] for p in points],
                    [p["overhead_seconds"] for p in points], steps)[3]
    fit: dict[str, Any] = {}
    if per_byte > 0:
        eff = hw.hbm_efficiency_ratio
        fit["kv_path_bandwidth_bytes_per_second"] = 1.0 / (eff * (1.0 / hw.kv_bytes_per_second
                                                                  + per_byte))
        hw = hardware_from_dict({**base, **fit})
        _kernels(points, configs, hw)
    coef = _fit([[1.0, p["layers"], p["batch_tokens"]] for p in points],
                [p["overhead_seconds"] for p in points], steps)
    # The gap between steps at a batch: from the long runs only, where the clients held their
    # concurrency; in the short ones requests arrive and leave every few steps and the client
    # gaps include steps the API server had not fed yet.
    steady = [p for p in points if p["output_tokens"] == max(r[1] for r in RUNS)]
    gap = _fit([[1.0, p["batch_tokens"]] for p in steady], [p["serving_gap_seconds"] for p in steady])
    fit.update({"step_overhead_seconds": coef[0],
                "step_overhead_per_layer_seconds": coef[1],
                "step_overhead_per_token_seconds": coef[2],
                "serving_gap_seconds": gap[0],
                "serving_gap_per_sequence_seconds": gap[1],
                "step_jitter_ratios": jitter_ratios(noise)})
    model_demands(fronts, loop_config, hardware_from_dict({**base, **fit}), say)
    fit.update(front_end_fit(fronts, say))
    if all(tails):
        fit["load_tail_seconds"] = [round(float(x), 6) for x in
                                    np.maximum.accumulate(np.mean(np.array(tails), axis=0))]
        fit["load_tail_sequences"] = round(float(np.mean(loaded_batch)), 2)
    return fit, {"models": list(MODELS), "points": points, "noise_gaps": len(noise),
                 "front_end_loops": fronts}


def model_demands(loops: list[dict[str, float]], config: dict[str, Any], hw: Any,
                  say: Say = print) -> None:
    """Each loop's front-end work in the what-if's own terms (`whatif.loop_demand`): the work
    that makes the what-if, with the engine just fitted, hold the batch the loop held. The work
    at the measured rate is kept beside it (`front_end_seconds_at_measured_rate`). Why: a
    loop's batch is steady where its measured rate is not (64 clients: 51 to 57 sequences in
    29 passes of 30, at 70 to 106 requests a second), and near the front end's saturation the
    batch the what-if gives back hangs on rate x work (read at the measured rate, 47 where the
    load held 57: run P-H, docs/predictor.md)."""
    from moe_reuse.predictor import Partition, model_from_hf_config
    from moe_reuse.predictor.deployment import DEFAULT_ACCOUNTING
    from moe_reuse.predictor.whatif import Deployment, Workload, loop_demand

    dep = Deployment(model_from_hf_config(config), Partition(), 1 << 40)
    for p in loops:
        work = Workload(int(p["prompt_tokens"]), int(p["output_tokens"]),
                        int(p["max_num_batched_tokens"]), int(p["max_num_seqs"]))
        p.setdefault("front_end_seconds_at_measured_rate", p["front_end_seconds"])
        p["front_end_seconds"] = loop_demand(dep, hw, int(p["concurrency"]), p["batch"], work,
                                             DEFAULT_ACCOUNTING)
        say(f"front end, {p['concurrency']:.0f} clients, {p['output_tokens']:.0f} tokens: "
            f"{p['front_end_seconds'] * 1e3:.2f} ms a request in the what-if's terms (at the "
            f"measured rate {p['front_end_seconds_at_measured_rate'] * 1e3:.2f})")


def front_end_fit(loops: list[dict[str, float]], say: Say = print) -> dict[str, float]:
    """`front_end_request_seconds` + `front_end_token_seconds` x output tokens, fitted over the
    loops where the front end bound (the engine held at most BOUND of the clients): per token
    from two output lengths or more, a flat cost a request from one; none (a front end that keeps up)
    from none, and said. A loop run in several passes counts once, by its median pass: the
    front end's readings spread by up to 30% within one calibration whose engine points kept
    within 7% (the client threads and the API server share a core, and how the GIL passes
    between 48 streams varies), so unlike a step they are not a fast host plus slow spells
    (run P-C in docs/predictor.md: 48-token loops of 5.47, 6.30 and 7.16 ms, the engine's
    points of those passes within 7%)."""
    by_key: dict[tuple[float, float], list[dict[str, float]]] = {}
    for p in loops:
        if p["batch"] <= BOUND * p["concurrency"]:
            by_key.setdefault((p["concurrency"], p["output_tokens"]), []).append(p)
    bound = [sorted(ps, key=lambda p: p["front_end_seconds"])[(len(ps) - 1) // 2]
             for ps in by_key.values()]
    if not bound:
        say("front end: no loop was front-end bound; the what-if will take it to keep up")
        return {}
    y = [p["front_end_seconds"] for p in bound]
    if len({p["output_tokens"] for p in bound}) < 2:
        return {"front_end_request_seconds": float(np.mean(y)), "front_end_token_seconds": 0.0}
    fe = _fit([[1.0, p["output_tokens"]] for p in bound], y, y)
    return {"front_end_request_seconds": fe[0], "front_end_token_seconds": fe[1]}
