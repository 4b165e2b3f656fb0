"""The serving stack's per-step overhead, for `moe-reuse calibrate --engine`.

A decode step is more than its kernels: the model runner prepares inputs and samples, every layer
dispatches its ops, and the framework keeps per-request state. The roofline cost model has no
term for that, and on a small machine it is several milliseconds per step. This stage measures it
where it is paid: a real vLLM server with the plugin serves a bundled tiny MoE (hidden 128:
kernels of tens of microseconds) at 1 and at 32 concurrent requests, once with 4 layers and once
with 16. The plugin's own counters give the mean decode step time and batch; the predictor, with
the kernel rates just measured, gives the tiny model's kernel time; the difference is the
overhead. The four points are fitted as fixed + per layer x layers + per token x tokens.

Every request is streamed, and the client times each inter-token gap, as a user of the server
would. Two more figures come from those gaps, for the latency what-if only:
- the serving gap: the median gap less the mean engine step, the time between two steps that is
  in neither (scheduling, output processing, detokenisation, one SSE chunk per sequence), fitted
  as fixed + per running sequence;
- the host's timing noise: the gaps at concurrency 1 (decode-only steps, nothing else running)
  over their median, at `JITTER_QUANTILES`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Say = Callable[[str], None]
MODELS = ("qwen3-moe", "qwen3-moe-deep")  # 4 and 16 layers, otherwise the same
CONCURRENCY = (1, 32)
OUTPUT_TOKENS = 384  # long enough that concurrent requests overlap for most of their decode


def _decode_step(before: str, after: str) -> tuple[float, float, float]:
    """(mean decode step seconds, mean decode tokens per step, mean context per token)."""
    from .harness.server import metric_value

    def d(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    steps = d("moe_reuse_steps_total", kind="decode")
    if steps <= 0:
        raise RuntimeError("the calibration server recorded no decode step")
    tokens = d("moe_reuse_tokens_total", phase="decode")
    context = d("moe_reuse_context_tokens_total", phase="decode")
    return (d("moe_reuse_step_duration_seconds_total", kind="decode") / steps, tokens / steps,
            context / max(tokens, 1.0))


def _measure(name: str, hw: Any, say: Say) -> tuple[list[dict[str, float]], list[float]]:
    """The model's points, and its normalised gaps at concurrency 1 (gap / median)."""
    from moe_reuse.predictor import Partition, model_from_hf_config, step_time

    from .harness.load import pct, random_prompts, run_concurrent, run_concurrent_streamed
    from .harness.server import VllmServer
    from .harness.tiny_models import build_model

    path = build_model(name, progress=say)
    tiny = model_from_hf_config(json.loads((path / "config.json").read_text()))
    cfg = {"moe_reuse": {"flush_interval_s": 0.2, "window_s": 3600}}
    out = []
    noise: list[float] = []
    with VllmServer(path, additional_config=cfg, max_num_seqs=max(CONCURRENCY)).start(
            progress=say) as srv:
        run_concurrent(srv.url, [(p, 16) for p in random_prompts(8, 16, 512, seed=0)], 8)
        for c in CONCURRENCY:
            before = srv.metrics_text()
            prompts = random_prompts(c, 16, 512, seed=c)
            gaps: list[float] = []
            for _ in range(max(1, 8 // c)):
                res = run_concurrent_streamed(srv.url, [(p, OUTPUT_TOKENS) for p in prompts], c)
                gaps += [g for r in res for g in r["itl_seconds"]]
            time.sleep(0.5)  # two flush intervals
            step_s, batch, ctx = _decode_step(before, srv.metrics_text())
            kernels = step_time(tiny, hw, Partition(), batch, max(ctx, 1.0)).total_seconds
            itl = pct(gaps, 50)
            out.append({"layers": float(tiny.num_layers), "concurrency": float(c),
                        "batch_tokens": batch, "step_seconds": step_s,
                        "predicted_kernel_seconds": kernels,
                        "overhead_seconds": max(step_s - kernels, 0.0),
                        "itl_p50_seconds": itl, "itl_p99_seconds": pct(gaps, 99),
                        "serving_gap_seconds": max(itl - step_s, 0.0)})
            if c == 1:
                noise += [g / itl for g in gaps]
            say(f"{tiny.num_layers} layers, concurrency {c}: decode step {step_s * 1e3:.2f} ms at "
                f"{batch:.1f} tokens, kernels {kernels * 1e3:.3f} ms; client gaps P50 "
                f"{itl * 1e3:.2f} ms, P99 {pct(gaps, 99) * 1e3:.2f} ms")
    return out, noise


def engine_overhead(spec: dict[str, Any], *, say: Say = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """({step_overhead_seconds, _per_layer_seconds, _per_token_seconds}, raw points)."""
    from moe_reuse.predictor import hardware_from_dict

    hw = hardware_from_dict({k: v for k, v in spec.items() if k != "notes"})
    points: list[dict[str, float]] = []
    noise: list[float] = []
    for name in MODELS:
        pts, gaps = _measure(name, hw, say)
        points += pts
        noise += gaps
    a = np.array([[1.0, p["layers"], p["batch_tokens"]] for p in points])
    y = np.array([p["overhead_seconds"] for p in points])
    coef = np.maximum(np.linalg.lstsq(a, y, rcond=None)[0], 0.0)  # no negative overheads
    g = np.array([[1.0, p["batch_tokens"]] for p in points])
    gy = np.array([p["serving_gap_seconds"] for p in points])
    gap = np.maximum(np.linalg.lstsq(g, gy, rcond=None)[0], 0.0)
    fit: dict[str, Any] = {"step_overhead_seconds": float(coef[0]),
                           "step_overhead_per_layer_seconds": float(coef[1]),
                           "step_overhead_per_token_seconds": float(coef[2]),
                           "serving_gap_seconds": float(gap[0]),
                           "serving_gap_per_sequence_seconds": float(gap[1]),
                           "step_jitter_ratios": jitter_ratios(noise)}
    return fit, {"models": list(MODELS), "points": points, "noise_gaps": len(noise)}


def jitter_ratios(normalised_gaps: list[float]) -> list[float]:
    """The noise quantiles a hardware spec carries (`JITTER_QUANTILES`), 1.0 at the median;
    none from fewer than 1,000 gaps (the 99.9th percentile would be one gap)."""
    from moe_reuse.predictor.specs import JITTER_QUANTILES

    if len(normalised_gaps) < 1000:
        return []
    q = np.quantile(np.asarray(normalised_gaps, dtype=float), JITTER_QUANTILES)
    q = np.maximum.accumulate(np.maximum(q, 1e-3))
    return [round(float(x), 4) for x in q]
