"""The live spec sizes weights as the checkpoint stores them, like the recorder does."""

from __future__ import annotations

from moe_reuse.plugin.harness.tiny_models import model_spec
from moe_reuse.plugin.live.spec import ServedFacts, build_specs, resolve_hardware


def _spec(hf: dict, weight_dtype: str = "bfloat16"):  # type: ignore[no-untyped-def]
    facts = ServedFacts(hf_config=hf, weight_dtype=weight_dtype, kv_dtype="bfloat16")
    return build_specs(facts, resolve_hardware("auto", "cpu"), 5.0).model


def test_a_quantized_checkpoint_keeps_its_weight_dtype_over_the_activation_dtype() -> None:
    hf = model_spec("qwen3-moe")["config"]
    assert _spec(hf).weight_dtype == "bf16"
    fp8 = {**hf, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}}
    assert _spec(fp8).weight_dtype == "fp8"  # vLLM's model_config.dtype says bfloat16
    gptq = {**hf, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    assert _spec(gptq).weight_dtype == "int4"
    mxfp4 = {**hf, "quantization_config": {"quant_method": "mxfp4"}}
    got = _spec(mxfp4)
    assert (got.weight_dtype, got.expert_weight_dtype) == ("bf16", "mxfp4")
    assert _spec(hf, weight_dtype="fp8").weight_dtype == "fp8"  # --quantization fp8 at load
