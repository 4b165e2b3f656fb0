"""The analytical reuse-fragmentation predictor (Adhinarayanan & Jayasena, arXiv 2603.08960).

A pure cost model of MoE decode against its quality-matched dense twin: frozen specs in,
breakdowns out, no vLLM or torch import and no I/O outside `loading`. Importing this package
does no work. See docs/predictor.md for the accounting and the reproduction of the paper.
"""

from .deployment import DEFAULT_ACCOUNTING, PAPER_ACCOUNTING, PROFILES, Accounting, Partition
from .errors import SpecError
from .hardware import HardwareSpec
from .hf_config import model_from_hf_config
from .loading import (
    hardware_from_dict,
    list_hardware_presets,
    list_model_presets,
    load_hardware_file,
    load_hardware_preset,
    load_model_file,
    load_model_preset,
    model_from_dict,
    resolve_hardware,
    resolve_model,
)
from .memory import MemoryBreakdown, kv_bytes_per_sequence_per_gpu, max_batch, memory_breakdown
from .quality import DEFAULT_Q, KAPLAN_ALPHA, dense_twin, q_from_losses, qs_verdict, sparsity
from .reuse import (
    MeasuredReuse,
    expected_distinct_experts,
    reuse_from_counts,
    reuse_uniform,
    tokens_per_expert_uniform,
)
from .search import CaseResult, SearchResult, candidate_partitions, evaluate_case, search_partitions
from .sizes import (
    WeightBytes,
    active_params,
    kv_bytes_per_sequence,
    kv_bytes_per_token,
    total_params,
    weight_bytes_breakdown,
)
from .specs import ModelSpec
from .stages import stage_pass, without_lm_head
from .timing import StepTime, step_time

__all__ = [
    "DEFAULT_ACCOUNTING",
    "DEFAULT_Q",
    "KAPLAN_ALPHA",
    "PAPER_ACCOUNTING",
    "PROFILES",
    "Accounting",
    "CaseResult",
    "HardwareSpec",
    "MeasuredReuse",
    "MemoryBreakdown",
    "ModelSpec",
    "Partition",
    "SearchResult",
    "SpecError",
    "StepTime",
    "WeightBytes",
    "active_params",
    "candidate_partitions",
    "dense_twin",
    "evaluate_case",
    "expected_distinct_experts",
    "hardware_from_dict",
    "kv_bytes_per_sequence",
    "kv_bytes_per_sequence_per_gpu",
    "kv_bytes_per_token",
    "list_hardware_presets",
    "list_model_presets",
    "load_hardware_file",
    "load_hardware_preset",
    "load_model_file",
    "load_model_preset",
    "max_batch",
    "memory_breakdown",
    "model_from_dict",
    "model_from_hf_config",
    "q_from_losses",
    "qs_verdict",
    "resolve_hardware",
    "resolve_model",
    "reuse_from_counts",
    "reuse_uniform",
    "search_partitions",
    "sparsity",
    "stage_pass",
    "step_time",
    "tokens_per_expert_uniform",
    "total_params",
    "weight_bytes_breakdown",
    "without_lm_head",
]
