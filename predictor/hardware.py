"""The accelerator and its fabric, as the cost model sees them (a frozen input, like ModelSpec).

SI base units with the unit in the field name; conversion from GB, TB/s and TFLOP/s happens once,
in `loading.py`. The measured-machine refinements (`moe-reuse calibrate`) live here too: overlap,
step overheads, the host's step-time jitter and the serving stack's tail under load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from .errors import SpecError
from .specs import check_float, check_int, normalize_dtype


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator type plus its fabric.

    `peak_flops_per_second` maps a dtype to dense (non-sparse) peak. The efficiency ratios
    scale the peaks to what kernels sustain. `expert_path_bandwidth_bytes_per_second` is the
    rate at which the fused-MoE path streams expert weights; it defaults to the HBM rate and
    exists because some backends (CPU) stream experts slower than a dense GEMV does.

    Three refinements describe a measured machine (`moe-reuse calibrate`); their defaults give
    the paper's model exactly:
    - `expert_path_flops_per_second`: the fused-MoE kernel's math rate at decode-sized expert
      batches (a few tokens per expert run far below the GEMM peak); default: the peak.
    - `compute_memory_overlap_ratio`: how far math hides weight streaming. A step takes
      max(C, M) + (1 - ratio) * min(C, M); 1 (default) is the paper's max(C, M).
    - `step_overhead_seconds` + `step_overhead_per_layer_seconds` x layers +
      `step_overhead_per_token_seconds` x sequences: time per step outside the kernels (input
      preparation and sampling, per-layer op dispatch and kernel launches, per-request
      bookkeeping; a decode step has one token per sequence, a prefill chunk many); default 0.
    - `kv_path_bandwidth_bytes_per_second`: the rate at which the attention kernel reads the
      KV cache (a paged-attention kernel on a CPU runs far below the memory's rate); default:
      the HBM rate.

    Two more describe how a serving stack delivers steps to a streaming client; only the latency
    what-if uses them (the live gauge compares `step_time` with the engine's own step):
    - `serving_gap_seconds` + `serving_gap_per_sequence_seconds` x running sequences: the time
      between two steps that is in no step (the scheduler, output processing, detokenisation,
      one SSE chunk per sequence), so the inter-token period is the step plus this gap;
    - `step_jitter_ratios`: the host's timing noise, the inter-token gap of decode-only steps
      over its median at `JITTER_QUANTILES` (1.0 at the median); empty: no noise;
    - `load_tail_seconds` at `load_tail_sequences` running sequences: the tail the serving stack
      adds under load, in seconds at `JITTER_QUANTILES`, over the concurrency-1 noise (every
      running sequence stalls at once now and then); the what-if adds it to a gap quantile in
      proportion to the running sequences beyond one, up to `load_tail_sequences`;
    - `front_end_request_seconds` + `front_end_token_seconds` x output tokens: the serving front
      end's work per request (vLLM's API server, and a client sharing its cores); it queues in
      one process, which caps the requests a second a closed loop of clients can send, and so
      the batch they form (`closed_loop`); default 0, a front end that always keeps up.
    """

    name: str
    hbm_capacity_bytes: float
    hbm_bandwidth_bytes_per_second: float
    peak_flops_per_second: Mapping[str, float]
    intra_node_bandwidth_bytes_per_second: float
    intra_node_latency_seconds: float
    inter_node_bandwidth_bytes_per_second: float
    inter_node_latency_seconds: float
    gpus_per_node: int
    hbm_efficiency_ratio: float = 1.0
    compute_efficiency_ratio: float = 1.0
    expert_path_bandwidth_bytes_per_second: float | None = None
    expert_path_flops_per_second: float | None = None
    kv_path_bandwidth_bytes_per_second: float | None = None
    compute_memory_overlap_ratio: float = 1.0
    step_overhead_seconds: float = 0.0
    step_overhead_per_layer_seconds: float = 0.0
    step_overhead_per_token_seconds: float = 0.0
    serving_gap_seconds: float = 0.0
    serving_gap_per_sequence_seconds: float = 0.0
    step_jitter_ratios: tuple[float, ...] = ()
    load_tail_seconds: tuple[float, ...] = ()
    load_tail_sequences: float = 0.0
    front_end_request_seconds: float = 0.0
    front_end_token_seconds: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("name", "must be a non-empty string")
        for name in (
            "hbm_capacity_bytes",
            "hbm_bandwidth_bytes_per_second",
            "intra_node_bandwidth_bytes_per_second",
            "inter_node_bandwidth_bytes_per_second",
        ):
            check_float(self, name, 0.0, strict=True)
        for name in ("intra_node_latency_seconds", "inter_node_latency_seconds"):
            check_float(self, name, 0.0, strict=False)
        check_int(self, "gpus_per_node", 1)
        for name in ("hbm_efficiency_ratio", "compute_efficiency_ratio"):
            check_float(self, name, 0.0, strict=True, maximum=1.0)
        for name in ("expert_path_bandwidth_bytes_per_second", "expert_path_flops_per_second",
                     "kv_path_bandwidth_bytes_per_second"):
            if getattr(self, name) is not None:
                check_float(self, name, 0.0, strict=True)
        check_float(self, "compute_memory_overlap_ratio", 0.0, strict=False, maximum=1.0)
        check_float(self, "step_overhead_seconds", 0.0, strict=False)
        check_float(self, "step_overhead_per_layer_seconds", 0.0, strict=False)
        check_float(self, "step_overhead_per_token_seconds", 0.0, strict=False)
        check_float(self, "serving_gap_seconds", 0.0, strict=False)
        check_float(self, "serving_gap_per_sequence_seconds", 0.0, strict=False)
        check_float(self, "front_end_request_seconds", 0.0, strict=False)
        check_float(self, "front_end_token_seconds", 0.0, strict=False)
        _check_jitter(self.step_jitter_ratios)
        object.__setattr__(self, "step_jitter_ratios", tuple(float(r) for r in self.step_jitter_ratios))
        _check_jitter(self.load_tail_seconds, "load_tail_seconds", minimum=0.0)
        object.__setattr__(self, "load_tail_seconds", tuple(float(r) for r in self.load_tail_seconds))
        check_float(self, "load_tail_sequences", 0.0, strict=False)
        if self.load_tail_seconds and not self.load_tail_sequences > 1:
            raise SpecError("load_tail_sequences", f"got {self.load_tail_sequences!r} with a load tail",
                            "give the running sequences (> 1) the tail was measured at")
        if not isinstance(self.peak_flops_per_second, Mapping) or not self.peak_flops_per_second:
            raise SpecError("peak_flops_per_second", "must map at least one dtype to FLOP/s")
        peaks: dict[str, float] = {}
        for dtype, value in self.peak_flops_per_second.items():
            key = normalize_dtype(dtype, f"peak_flops_per_second.{dtype}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SpecError(
                    f"peak_flops_per_second.{dtype}", f"must be a number > 0, got {value!r}"
                )
            peaks[key] = float(value)
        object.__setattr__(self, "peak_flops_per_second", MappingProxyType(peaks))

    def peak_flops(self, dtype: str) -> float:
        """Sustained FLOP/s for math in `dtype`; narrower dtypes fall back to the next wider peak."""
        order = ("fp4", "mxfp4", "nvfp4", "int4", "fp8", "int8", "bf16", "fp16", "fp32")
        start = order.index(dtype) if dtype in order else order.index("bf16")
        for key in order[start:]:
            if key in self.peak_flops_per_second:
                return self.peak_flops_per_second[key] * self.compute_efficiency_ratio
        return max(self.peak_flops_per_second.values()) * self.compute_efficiency_ratio

    def expert_flops(self, dtype: str) -> float:
        """Sustained FLOP/s of the fused-MoE expert path (the peak unless measured)."""
        if self.expert_path_flops_per_second is not None:
            return self.expert_path_flops_per_second * self.compute_efficiency_ratio
        return self.peak_flops(dtype)

    @property
    def hbm_bytes_per_second(self) -> float:
        return self.hbm_bandwidth_bytes_per_second * self.hbm_efficiency_ratio

    @property
    def expert_bytes_per_second(self) -> float:
        raw = self.expert_path_bandwidth_bytes_per_second or self.hbm_bandwidth_bytes_per_second
        return raw * self.hbm_efficiency_ratio

    @property
    def kv_bytes_per_second(self) -> float:
        raw = self.kv_path_bandwidth_bytes_per_second or self.hbm_bandwidth_bytes_per_second
        return raw * self.hbm_efficiency_ratio

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["peak_flops_per_second"] = dict(self.peak_flops_per_second)
        out["step_jitter_ratios"] = list(self.step_jitter_ratios)
        out["load_tail_seconds"] = list(self.load_tail_seconds)
        return out


# Quantiles at which `HardwareSpec.step_jitter_ratios` gives the host's timing noise.
JITTER_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999)


def _check_jitter(ratios: object, field: str = "step_jitter_ratios", minimum: float | None = None) -> None:
    """A list at `JITTER_QUANTILES`, non-decreasing; each > 0 (ratios) or >= `minimum`."""
    what = "> 0" if minimum is None else f">= {minimum:g}"
    fix = (f"give {len(JITTER_QUANTILES)} values, non-decreasing and {what}, at quantiles "
           f"{list(JITTER_QUANTILES)} (`moe-reuse calibrate` measures them), or none")
    if not isinstance(ratios, (tuple, list)):
        raise SpecError(field, f"must be a list, got {type(ratios).__name__}", fix)
    if not ratios:
        return
    if len(ratios) != len(JITTER_QUANTILES) or any(
        isinstance(r, bool) or not isinstance(r, (int, float))
        or not (r > 0 if minimum is None else r >= minimum) for r in ratios
    ) or any(b < a for a, b in zip(ratios, ratios[1:])):
        raise SpecError(field, f"got {list(ratios)!r}", fix)


__all__ = ["JITTER_QUANTILES", "HardwareSpec"]
