"""Frozen input types of the cost model: the model, and the dtype and range checks every spec
shares (hardware.py holds the hardware, deployment.py the accounting policy and the partition).

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
    # the query projection also emits a per-head output gate (Qwen3-Next): twice as wide
    attention_output_gate: bool = False
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    sliding_window_tokens: int = 0
    num_sliding_window_layers: int = 0
    # hybrids: layers whose token mixer is recurrent (Mamba, linear attention, short convolution)
    # keep a fixed state per sequence and no per-token KV cache
    num_recurrent_layers: int = 0
    # the weights of all mixers without a KV cache together, where the config gives their shape
    # (Mamba2, Gated DeltaNet); 0 costs each recurrent layer's mixer as an attention layer
    recurrent_mixer_params: int = 0
    # every recurrent mixer's per-sequence state together (convolution and SSM state, as vLLM
    # caches it): held once a sequence whatever its context, read once a step
    recurrent_state_bytes: int = 0
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
            "num_recurrent_layers",
            "recurrent_mixer_params",
            "recurrent_state_bytes",
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
        if self.num_recurrent_layers >= self.num_layers:
            raise SpecError(
                "num_recurrent_layers",
                f"{self.num_recurrent_layers} of {self.num_layers} layers leave no attention layer",
                "the cost model sizes a KV cache: give the model at least one attention layer",
            )
        if self.num_sliding_window_layers + self.num_recurrent_layers > self.num_layers:
            raise SpecError(
                "num_sliding_window_layers",
                f"{self.num_sliding_window_layers} plus num_recurrent_layers="
                f"{self.num_recurrent_layers} exceed num_layers={self.num_layers}",
            )
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
    def num_kv_layers(self) -> int:
        """Layers with a KV cache (attention, full or windowed)."""
        return self.num_layers - self.num_recurrent_layers

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


__all__ = [
    "ATTENTION_KINDS",
    "COST_SCOPES",
    "DTYPE_BYTES",
    "ModelSpec",
    "dtype_bytes",
    "normalize_dtype",
]
