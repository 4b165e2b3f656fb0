"""Frozen input types of the cost model: the model and the hardware (deployment.py holds the
accounting policy and the partition).

Everything inside is in SI base units with the unit in the field name (bytes,
bytes_per_second, flops_per_second, seconds). Conversion from GB, TB/s and TFLOP/s happens
once, in `loading.py`; these classes only check that values are in range, so that a spec
built in code (the plugin does that) gets the same checks as one read from a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

from .errors import SpecError

# Bytes per parameter or cache element. MXFP4 carries one 8-bit scale per 32 values.
DTYPE_BYTES: Mapping[str, float] = MappingProxyType(
    {
        "fp32": 4.0,
        "bf16": 2.0,
        "fp16": 2.0,
        "fp8": 1.0,
        "int8": 1.0,
        "int4": 0.5,
        "fp4": 0.5,
        "mxfp4": 4.25 / 8.0,
        "nvfp4": 4.5 / 8.0,
    }
)
_DTYPE_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "float32": "fp32",
        "float": "fp32",
        "bfloat16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        "fp8_e4m3": "fp8",
        "fp8_e5m2": "fp8",
        "float8_e4m3fn": "fp8",
        "e4m3": "fp8",
        "auto": "bf16",
    }
)
ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
MLA_KV_SHARDINGS = ("latent", "replicated", "tokens")
TP_POLICIES = ("max", "search")
FFN_SHARD_SCOPES = ("stage", "node")
COST_SCOPES = ("full", "weights", "paper")
COLLECTIVES = (
    "tp_all_reduce",
    "kv_combine",
    "ffn_all_reduce",
    "moe_dispatch_combine",
    "moe_expert_all_reduce",
    "moe_all_gather",
)


def normalize_dtype(value: str, field_name: str) -> str:
    """Map a dtype spelling (`bfloat16`, `float8_e4m3fn`, ...) to a key of DTYPE_BYTES."""
    key = str(value).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise SpecError(
            field_name, f"unknown dtype {value!r}", f"use one of {', '.join(DTYPE_BYTES)}"
        )
    return key


def dtype_bytes(dtype: str) -> float:
    return DTYPE_BYTES[dtype]


def check_int(obj: object, name: str, minimum: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(name, f"must be >= {minimum}, got {value}")


def check_float(
    obj: object, name: str, minimum: float, *, strict: bool, maximum: float | None = None
) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(name, f"must be a number, got {value!r}")
    if value != value or (strict and value <= minimum) or (not strict and value < minimum):
        raise SpecError(name, f"must be {'>' if strict else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SpecError(name, f"must be <= {maximum}, got {value}")


@dataclass(frozen=True)
class ModelSpec:
    """One decoder-only transformer, dense or MoE, as the cost model sees it.

    Layers are described by counts, not by index lists: the model is position-independent, so
    "which" layers are MoE or sliding-window only matters through how many there are.
    `num_experts == 0` is a dense model. Routed experts and shared experts are separate so the
    plugin can account them separately; `shared_expert_intermediate_size` is per shared expert.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_moe_layers: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    gated_ffn: bool = True
    attention_kind: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window_tokens: int = 0
    num_sliding_window_layers: int = 0
    tie_word_embeddings: bool = False
    weight_dtype: str = "bf16"
    expert_weight_dtype: str = ""
    kv_dtype: str = "bf16"
    activation_dtype: str = "bf16"
    max_context_tokens: int = 0  # the model's context window (0: unknown); whatif checks it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("name", "must be a non-empty string")
        for name in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            check_int(self, name, 1)
        for name in (
            "intermediate_size",
            "num_experts",
            "experts_per_token",
            "moe_intermediate_size",
            "num_moe_layers",
            "num_shared_experts",
            "shared_expert_intermediate_size",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "sliding_window_tokens",
            "num_sliding_window_layers",
            "max_context_tokens",
        ):
            check_int(self, name, 0)
        if self.attention_kind not in ATTENTION_KINDS:
            raise SpecError(
                "attention_kind",
                f"unknown kind {self.attention_kind!r}",
                f"use one of {', '.join(ATTENTION_KINDS)}",
            )
        if (
            self.num_kv_heads > self.num_attention_heads
            or self.num_attention_heads % self.num_kv_heads
        ):
            raise SpecError(
                "num_kv_heads",
                f"{self.num_kv_heads} must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.attention_kind == "mla" and (
            self.kv_lora_rank <= 0
            or self.v_head_dim <= 0
            or self.qk_nope_head_dim + self.qk_rope_head_dim <= 0
        ):
            raise SpecError(
                "kv_lora_rank",
                "MLA needs kv_lora_rank, qk_nope_head_dim/qk_rope_head_dim and v_head_dim > 0",
            )
        if self.num_experts > 0:
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise SpecError(
                    "experts_per_token",
                    f"top-k must be in 1..num_experts={self.num_experts}, got {self.experts_per_token}",
                )
            if self.moe_intermediate_size <= 0:
                raise SpecError("moe_intermediate_size", "must be > 0 for an MoE model")
            if not 1 <= self.num_moe_layers <= self.num_layers:
                raise SpecError(
                    "num_moe_layers",
                    f"must be in 1..num_layers={self.num_layers}, got {self.num_moe_layers}",
                )
        elif self.experts_per_token or self.num_moe_layers:
            raise SpecError(
                "num_experts", "is 0 (dense) but experts_per_token or num_moe_layers is set"
            )
        if self.num_layers - self.num_moe_layers > 0 and self.intermediate_size <= 0:
            raise SpecError(
                "intermediate_size",
                f"{self.num_layers - self.num_moe_layers} dense layers need intermediate_size > 0",
            )
        if self.num_sliding_window_layers > self.num_layers:
            raise SpecError("num_sliding_window_layers", f"exceeds num_layers={self.num_layers}")
        if self.num_sliding_window_layers and not self.sliding_window_tokens:
            raise SpecError(
                "sliding_window_tokens", "must be > 0 when num_sliding_window_layers > 0"
            )
        for name in ("weight_dtype", "kv_dtype", "activation_dtype"):
            object.__setattr__(self, name, normalize_dtype(getattr(self, name), name))
        expert = self.expert_weight_dtype or self.weight_dtype
        object.__setattr__(
            self, "expert_weight_dtype", normalize_dtype(expert, "expert_weight_dtype")
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and self.num_moe_layers > 0

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def sparsity(self) -> float:
        """s = k/E, the fraction of routed-expert parameters one token touches (1.0 if dense)."""
        return self.experts_per_token / self.num_experts if self.is_moe else 1.0

    @property
    def shared_intermediate(self) -> int:
        return self.shared_expert_intermediate_size or self.moe_intermediate_size

    def with_dtypes(
        self, weight_dtype: str | None = None, kv_dtype: str | None = None
    ) -> ModelSpec:
        """The same model stored differently; expert dtype follows the weight dtype."""
        changes: dict[str, Any] = {}
        if weight_dtype:
            changes["weight_dtype"] = weight_dtype
            changes["expert_weight_dtype"] = weight_dtype
        if kv_dtype:
            changes["kv_dtype"] = kv_dtype
        return replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


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


__all__ = [
    "ATTENTION_KINDS",
    "COST_SCOPES",
    "DTYPE_BYTES",
    "HardwareSpec",
    "ModelSpec",
    "dtype_bytes",
    "normalize_dtype",
]
