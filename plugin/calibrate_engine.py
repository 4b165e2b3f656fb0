"""The serving stack's per-step overhead, for `moe-reuse calibrate --engine`.

A decode step is more than its kernels: the model runner prepares inputs, samples, and the
framework keeps per-request state. The roofline cost model has no term for that, and on a small
machine it is several milliseconds per step. This stage measures it where it is paid: a real vLLM
server with the plugin serves the bundled tiny MoE (hidden 128, 4 layers: kernels of a few tens of
microseconds) at 1 and at 32 concurrent requests. The plugin's own step-time counters give the
mean decode step time; the predictor, with the kernel rates just measured, gives the tiny model's
kernel time; the difference is the overhead, fitted as fixed + per token through the two points.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

Say = Callable[[str], None]
BATCHES = (1, 32)


def _decode_step(text_before: str, text_after: str) -> tuple[float, float, float]:
    """(mean decode step seconds, mean decode tokens per step, mean context per request)."""
    from .harness.server import metric_value

    def d(name: str, **labels: str) -> float:
        return metric_value(text_after, name, **labels) - metric_value(text_before, name, **labels)

    steps = d("moe_reuse_steps_total", kind="decode")
    if steps <= 0:
        raise RuntimeError("the calibration server recorded no decode step")
    tokens = d("moe_reuse_tokens_total", phase="decode")
    context = d("moe_reuse_context_tokens_total", phase="decode")
    return (d("moe_reuse_step_duration_seconds_total", kind="decode") / steps, tokens / steps,
            context / max(tokens, 1.0))


def engine_overhead(spec: dict[str, Any], *, say: Say = print,
                    model: str = "qwen3-moe") -> tuple[float, float, dict[str, Any]]:
    """(fixed seconds per step, seconds per token, raw figures) of this machine's serving stack."""
    from moe_reuse.predictor import Partition, hardware_from_dict, model_from_hf_config, step_time

    from .harness.server import VllmServer, random_prompts, run_concurrent
    from .harness.tiny_models import build_model

    path = build_model(model, progress=say)
    tiny = model_from_hf_config(json.loads((path / "config.json").read_text()))
    hw = hardware_from_dict({k: v for k, v in spec.items() if k != "notes"})
    points: list[dict[str, float]] = []
    cfg = {"moe_reuse": {"flush_interval_s": 0.2, "window_s": 3600}}
    with VllmServer(path, additional_config=cfg, max_num_seqs=max(BATCHES)).start(
            progress=say) as srv:
        run_concurrent(srv.url, [(p, 16) for p in random_prompts(8, 16, 512, seed=0)], 8)
        for b in BATCHES:
            before = srv.metrics_text()
            prompts = random_prompts(b, 16, 512, seed=b)
            for _ in range(max(2, 64 // b)):  # at least ~64 requests' worth of decode steps
                run_concurrent(srv.url, [(p, 96) for p in prompts], b)
            time.sleep(0.5)  # two flush intervals
            step_s, batch, ctx = _decode_step(before, srv.metrics_text())
            kernels = step_time(tiny, hw, Partition(), batch, max(ctx, 1.0)).total_seconds
            points.append({"concurrency": b, "batch_tokens": batch, "step_seconds": step_s,
                           "predicted_kernel_seconds": kernels,
                           "overhead_seconds": max(step_s - kernels, 0.0)})
            say(f"concurrency {b}: decode step {step_s * 1e3:.2f} ms at {batch:.1f} tokens, "
                f"kernels {kernels * 1e3:.3f} ms")
    (lo, hi) = points
    per_token = max((hi["overhead_seconds"] - lo["overhead_seconds"])
                    / max(hi["batch_tokens"] - lo["batch_tokens"], 1e-9), 0.0)
    fixed = max(lo["overhead_seconds"] - per_token * lo["batch_tokens"], 0.0)
    return fixed, per_token, {"model": model, "points": points}
