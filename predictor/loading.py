"""The edge: presets and user files to validated specs, units converted once to SI.

Hardware files may use human units with the unit in the key (`hbm_capacity_gb`,
`hbm_bandwidth_tb_per_s`, `peak_tflops`, `intra_node_latency_us`, ...) or the SI keys the
dataclass uses; each field may be given once. GB and TB are decimal (1e9, 1e12), as vendors
quote them; `*_gib` keys are binary. Unknown keys are errors, so a typo cannot silently leave
a default in place. The *_from_dict functions are pure; only the load_* functions read files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SpecError
from .hardware import HardwareSpec
from .hf_config import model_from_hf_config
from .specs import ModelSpec

_PACKAGE = __name__.rpartition(".")[0]  # moe_reuse.predictor, where data/ ships

# SI field -> accepted (key, factor) spellings.
_HW_UNITS: dict[str, tuple[tuple[str, float], ...]] = {
    "hbm_capacity_bytes": (
        ("hbm_capacity_bytes", 1.0),
        ("hbm_capacity_gb", 1e9),
        ("hbm_capacity_gib", 2.0**30),
    ),
    "hbm_bandwidth_bytes_per_second": (
        ("hbm_bandwidth_bytes_per_second", 1.0),
        ("hbm_bandwidth_tb_per_s", 1e12),
        ("hbm_bandwidth_gb_per_s", 1e9),
    ),
    "intra_node_bandwidth_bytes_per_second": (
        ("intra_node_bandwidth_bytes_per_second", 1.0),
        ("intra_node_bandwidth_gb_per_s", 1e9),
    ),
    "inter_node_bandwidth_bytes_per_second": (
        ("inter_node_bandwidth_bytes_per_second", 1.0),
        ("inter_node_bandwidth_gb_per_s", 1e9),
    ),
    "intra_node_latency_seconds": (
        ("intra_node_latency_seconds", 1.0),
        ("intra_node_latency_us", 1e-6),
    ),
    "inter_node_latency_seconds": (
        ("inter_node_latency_seconds", 1.0),
        ("inter_node_latency_us", 1e-6),
    ),
    "expert_path_bandwidth_bytes_per_second": (
        ("expert_path_bandwidth_bytes_per_second", 1.0),
        ("expert_path_bandwidth_gb_per_s", 1e9),
    ),
    "kv_path_bandwidth_bytes_per_second": (
        ("kv_path_bandwidth_bytes_per_second", 1.0),
        ("kv_path_bandwidth_gb_per_s", 1e9),
    ),
    "expert_path_flops_per_second": (
        ("expert_path_flops_per_second", 1.0),
        ("expert_path_tflops", 1e12),
    ),
    "step_overhead_seconds": (
        ("step_overhead_seconds", 1.0),
        ("step_overhead_ms", 1e-3),
    ),
    "step_overhead_per_layer_seconds": (
        ("step_overhead_per_layer_seconds", 1.0),
        ("step_overhead_per_layer_us", 1e-6),
    ),
    "step_overhead_per_token_seconds": (
        ("step_overhead_per_token_seconds", 1.0),
        ("step_overhead_per_token_us", 1e-6),
    ),
    "serving_gap_seconds": (
        ("serving_gap_seconds", 1.0),
        ("serving_gap_ms", 1e-3),
    ),
    "serving_gap_per_sequence_seconds": (
        ("serving_gap_per_sequence_seconds", 1.0),
        ("serving_gap_per_sequence_us", 1e-6),
    ),
    "front_end_request_seconds": (
        ("front_end_request_seconds", 1.0),
        ("front_end_request_ms", 1e-3),
    ),
    "front_end_token_seconds": (
        ("front_end_token_seconds", 1.0),
        ("front_end_token_us", 1e-6),
    ),
}
_HW_FLOPS = (("peak_flops_per_second", 1.0), ("peak_tflops", 1e12))
_HW_PLAIN = (
    "name",
    "gpus_per_node",
    "hbm_efficiency_ratio",
    "compute_efficiency_ratio",
    "compute_memory_overlap_ratio",
    "step_jitter_ratios",
    "load_tail_seconds",
    "load_tail_sequences",
    "description",
)
_HW_IGNORED = ("notes", "source")
_HW_REQUIRED = (
    "hbm_capacity_bytes",
    "hbm_bandwidth_bytes_per_second",
    "peak_flops_per_second",
    "intra_node_bandwidth_bytes_per_second",
    "gpus_per_node",
)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(key, f"must be a number, got {value!r}")
    return float(value)


def hardware_from_dict(data: Mapping[str, Any], *, default_name: str = "custom") -> HardwareSpec:
    """Build a HardwareSpec from a preset or user mapping, converting units once."""
    if not isinstance(data, Mapping):
        raise SpecError("hardware", f"must be a JSON object, got {type(data).__name__}")
    known = {k for spellings in _HW_UNITS.values() for k, _ in spellings}
    known |= {k for k, _ in _HW_FLOPS} | set(_HW_PLAIN) | set(_HW_IGNORED)
    for key in data:
        if key not in known:
            raise SpecError(
                key,
                "unknown hardware key",
                "check the spelling; see docs/predictor.md for the keys",
            )
    out: dict[str, Any] = {"name": data.get("name", default_name)}
    for si, spellings in _HW_UNITS.items():
        given = [(k, f) for k, f in spellings if k in data]
        if len(given) > 1:
            raise SpecError(given[1][0], f"duplicates {given[0][0]}", "give each quantity once")
        if given:
            key, factor = given[0]
            out[si] = _number(data[key], key) * factor
    flops = [(k, f) for k, f in _HW_FLOPS if k in data]
    if len(flops) > 1:
        raise SpecError(
            "peak_tflops", "duplicates peak_flops_per_second", "give each quantity once"
        )
    if flops:
        key, factor = flops[0]
        table = data[key]
        if not isinstance(table, Mapping) or not table:
            raise SpecError(key, 'must map dtypes to FLOP rates, e.g. {"bf16": 989.5}')
        out["peak_flops_per_second"] = {
            d: _number(v, f"{key}.{d}") * factor for d, v in table.items()
        }
    for key in _HW_PLAIN[1:]:
        if key in data:
            out[key] = data[key]
    missing = [f for f in _HW_REQUIRED if f not in out]
    if missing:
        raise SpecError(
            missing[0],
            "is missing",
            "hardware needs capacity, bandwidth, peak FLOP/s, intra-node link and gpus_per_node",
        )
    # A single-node description needs no inter-node fabric; fall back to the intra-node one.
    out.setdefault("intra_node_latency_seconds", 0.0)
    out.setdefault(
        "inter_node_bandwidth_bytes_per_second", out["intra_node_bandwidth_bytes_per_second"]
    )
    out.setdefault("inter_node_latency_seconds", out["intra_node_latency_seconds"])
    return HardwareSpec(**out)


def model_from_dict(data: Mapping[str, Any], *, default_name: str = "custom") -> ModelSpec:
    """Build a ModelSpec from our preset format (the dataclass fields; `description` allowed)."""
    if not isinstance(data, Mapping):
        raise SpecError("model", f"must be a JSON object, got {type(data).__name__}")
    fields = set(ModelSpec.__dataclass_fields__)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("description", "notes", "source"):
            continue
        if key not in fields:
            raise SpecError(
                key,
                "unknown model key",
                "use the ModelSpec field names, or pass a Hugging Face config.json",
            )
        kwargs[key] = value
    kwargs.setdefault("name", default_name)
    required = (
        "hidden_size",
        "num_layers",
        "num_attention_heads",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
    )
    for key in required:
        if key not in kwargs:
            raise SpecError(key, "is missing from the model spec")
    return ModelSpec(**kwargs)


class MissingDataError(SpecError):
    """A data file the installed package should carry is absent: a partial or broken install."""


def packaged_data(package: str, *parts: str) -> Any:
    """A file or folder shipped inside `package`, found through `importlib.resources`.

    The import system, not `__file__`, knows where an installed wheel, a zip or a checkout keeps
    its files. Absent data means the install is incomplete (a wheel built without its package
    data, a hand-copied tree), which is the user's to fix, so it gets a message, not a traceback.
    """
    root = resources.files(package)
    node = root
    for part in parts:
        node = node.joinpath(part)
    if not (node.is_file() or node.is_dir()):
        raise MissingDataError(
            "/".join((*package.split("."), *parts)),
            f"is missing from this installation of vllm-moe-reuse (looked in {root})",
            "reinstall from a complete wheel: in a checkout run `python -m build`, then "
            "`pip install --force-reinstall dist/vllm_moe_reuse-*.whl`",
        )
    return node


def _preset_dir(kind: str) -> Any:
    return packaged_data(_PACKAGE, "data", kind)


def _preset_names(kind: str) -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir(kind).iterdir() if p.name.endswith(".json"))


def list_model_presets() -> list[str]:
    return _preset_names("models")


def list_hardware_presets() -> list[str]:
    return _preset_names("hardware")


def _read_preset(kind: str, name: str, field: str) -> dict[str, Any]:
    key = name.strip().lower()
    names = _preset_names(kind)
    if key not in names:
        raise SpecError(
            field,
            f"unknown preset {name!r}",
            f"choose one of {', '.join(names)}"
            + (
                " or give a path to a config.json"
                if kind == "models"
                else " or a path to a JSON file"
            ),
        )
    data: dict[str, Any] = json.loads(_preset_dir(kind).joinpath(f"{key}.json").read_text())
    return data


def load_model_preset(name: str) -> ModelSpec:
    return model_from_dict(_read_preset("models", name, "model"), default_name=name)


def load_hardware_preset(name: str) -> HardwareSpec:
    return hardware_from_dict(_read_preset("hardware", name, "hardware"), default_name=name)


def _read_json(path: str | Path, field: str) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(field, f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(field, f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_hardware_file(path: str | Path) -> HardwareSpec:
    return hardware_from_dict(_read_json(path, "hardware"), default_name=Path(path).stem)


def load_model_file(
    path: str | Path, *, weight_dtype: str | None = None, kv_dtype: str | None = None
) -> ModelSpec:
    """A Hugging Face config.json (has model_type/architectures) or a file in our preset format."""
    data = _read_json(path, "model")
    if isinstance(data, Mapping) and (
        "model_type" in data or "architectures" in data or "text_config" in data
    ):
        name = Path(path).parent.name or Path(path).stem
        return model_from_hf_config(data, weight_dtype=weight_dtype, kv_dtype=kv_dtype, name=name)
    return model_from_dict(data, default_name=Path(path).stem).with_dtypes(weight_dtype, kv_dtype)


def _looks_like_path(arg: str) -> bool:
    return arg.endswith(".json") or "/" in arg or "\\" in arg or Path(arg).is_file()


def resolve_model(
    arg: str, *, weight_dtype: str | None = None, kv_dtype: str | None = None
) -> ModelSpec:
    """`--model`: a preset name or a path to a config.json (a directory holding one works too)."""
    path = Path(arg)
    if path.is_dir():
        path = path / "config.json"
        return load_model_file(path, weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    if _looks_like_path(arg):
        return load_model_file(path, weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    return load_model_preset(arg).with_dtypes(weight_dtype, kv_dtype)


def resolve_hardware(arg: str) -> HardwareSpec:
    """`--hardware`: a preset name or a path to a hardware JSON file."""
    if _looks_like_path(arg):
        return load_hardware_file(arg)
    return load_hardware_preset(arg)


def load_table1() -> list[dict[str, Any]]:
    """The paper's Table 1 rows (name, num_experts, top_k, printed s and q*s)."""
    text = packaged_data(_PACKAGE, "data", "table1.json").read_text()
    rows: list[dict[str, Any]] = json.loads(text)["rows"]
    return rows
