"""Start-up checks that need files or the served model, run once in the front-end process.

`parse_config` (config.py) checks what the JSON alone can tell: types, ranges, unknown keys, URL
syntax. What it cannot tell without reading a file or knowing the model is checked here, before
vLLM spawns any engine or worker, so the user sees one message naming the key and the fix instead
of a plugin that disables itself minutes later, or a drift gauge computed against another model:

- `hardware`: a preset name (a typo gets the nearest one), `auto`, or a hardware JSON file that
  exists and is a valid spec (predictor.loading's own validators);
- `routing_baseline`: a readable baseline file whose expert and MoE-layer counts match the
  served model, or a path not written yet in an existing directory (saved later from this server
  with `moe-reuse baseline save --out`, then picked up without a restart);
- `ring_steps`: the device ring it asks for fits the counters' memory budget for this model;
- `max_expert_series`: with per-expert series on, it holds the per-layer overflow series;
- `MOE_REUSE_INJECT_FAULT`: the testing knob, when set, parses.

Inputs are plain data: `served` is the front end's summary of the model (`num_layers`,
`num_experts`, `hf_config` as a dict; any of them may be missing, and a check that needs a missing
figure is skipped rather than guessed).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, PluginConfig

__all__ = ["ModelShape", "model_shape", "validate_for_model"]


@dataclass(frozen=True)
class ModelShape:
    """The served model's figures the checks compare against (None: unknown, check skipped)."""

    name: str = "the served model"
    num_layers: int | None = None
    moe_layers: int | None = None
    num_experts: int | None = None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def model_shape(served: Mapping[str, Any]) -> ModelShape:
    """Layers, MoE layers and experts of the served model from the front end's summary.

    vLLM's own figures (`num_layers`, `num_experts`) win; the MoE-layer count comes from the
    predictor's reading of the HF config, used only when it agrees with vLLM on the experts.
    """
    from moe_reuse.predictor import model_from_hf_config
    from moe_reuse.predictor.errors import SpecError

    name = str(served.get("model") or "the served model")
    layers = _int_or_none(served.get("num_layers"))
    experts = _int_or_none(served.get("num_experts"))
    moe_layers = None
    hf = served.get("hf_config")
    if isinstance(hf, Mapping):
        try:
            spec = model_from_hf_config(hf)
        except (SpecError, ValueError, TypeError):
            spec = None
        if spec is not None:
            layers = layers if layers is not None else spec.num_layers
            experts = experts if experts is not None else spec.num_experts
            if spec.num_experts == experts:
                moe_layers = spec.num_moe_layers
    if experts == 0:
        moe_layers = 0
    return ModelShape(name, layers, moe_layers, experts)


def validate_for_model(cfg: PluginConfig, served: Mapping[str, Any]) -> None:
    """Every check that needs a file or the served model; raises ConfigError naming the key."""
    _check_fault_knob()
    if not cfg.enabled:
        return  # an inert plugin reads no file and sizes no ring
    shape = model_shape(served)
    check_hardware(cfg.hardware)
    if cfg.routing_baseline:
        check_routing_baseline(cfg.routing_baseline, shape)
    if cfg.ring_steps:
        check_ring_steps(cfg.ring_steps, shape)
    if cfg.per_expert_series:
        check_expert_series_cap(cfg.max_expert_series, shape)


def check_expert_series_cap(cap: int, shape: ModelShape) -> None:
    """The cap must hold at least the overflow series (one per MoE layer and phase)."""
    if not shape.moe_layers:
        return
    floor = 2 * shape.moe_layers
    if cap < floor:
        raise ConfigError(
            f"moe_reuse.max_expert_series: {cap} cannot hold one expert=\"other\" series per MoE "
            f"layer and phase of {shape.name} ({shape.moe_layers} MoE layers x 2 phases = "
            f"{floor}); use at least {floor}, or turn per_expert_series off"
        )


def _check_fault_knob() -> None:
    from . import faults

    try:
        faults.reset()
        faults.plan()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# ---- hardware --------------------------------------------------------------------------------
def check_hardware(setting: str) -> None:
    """A preset name, `auto`, or a path to a valid hardware JSON file."""
    from moe_reuse.predictor import list_hardware_presets, load_hardware_file
    from moe_reuse.predictor.errors import SpecError

    s = setting.strip()
    presets = list_hardware_presets()
    accepted = f"auto, {', '.join(presets)}, or a path to a hardware JSON file"
    if s == "auto":
        from .live.spec import calibrated_hardware_path

        path = calibrated_hardware_path()
        if path.is_file():
            try:
                load_hardware_file(path)
            except SpecError as exc:
                raise ConfigError(
                    f"moe_reuse.hardware: auto picks {path} (written by `moe-reuse calibrate`), "
                    f"which is not a valid hardware spec: {exc}; run `moe-reuse calibrate` again "
                    "or delete the file"
                ) from None
        return
    if s.endswith(".json") or "/" in s or Path(s).expanduser().is_file():
        path = Path(s).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"moe_reuse.hardware: no file at {path}; give an existing hardware JSON file "
                f"(`moe-reuse calibrate` writes one) or one of: {accepted}"
            )
        try:
            load_hardware_file(path)
        except SpecError as exc:
            raise ConfigError(
                f"moe_reuse.hardware: {path} is not a valid hardware spec: {exc}"
            ) from None
        return
    if s.lower() in presets:
        return
    key = s.lower()
    prefixed = [p for p in presets if p.startswith(key)]  # "h100" -> "h100-sxm", not "h200"
    close = prefixed[:1] if len(prefixed) == 1 else difflib.get_close_matches(
        key, ["auto", *presets], n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"moe_reuse.hardware: unknown preset {s!r}.{hint} Accepted: {accepted}")


# ---- routing baseline ------------------------------------------------------------------------
def check_routing_baseline(setting: str, shape: ModelShape) -> None:
    """The baseline file exists, parses, and was saved from a model of this shape."""
    from .live.drift import BASELINE_KIND

    path = Path(setting).expanduser()
    key = "moe_reuse.routing_baseline"
    fix = 'save one with `moe-reuse baseline save --out FILE`, or set "" to disable drift'
    if not path.exists():
        if path.parent.is_dir():
            return  # saved later from this server (`baseline save --out`); drift starts then
        raise ConfigError(f"{key}: no file at {path} and no directory {path.parent} to save one "
                          f"in; {fix}")
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{key}: {path} is not valid JSON{where}; {fix}") from None
    if not isinstance(data, Mapping) or data.get("kind") != BASELINE_KIND:
        raise ConfigError(f"{key}: {path} is not a routing baseline (no kind={BASELINE_KIND!r}); {fix}")
    experts = data.get("num_experts")
    layers = data.get("layers")
    if _int_or_none(experts) is None or not isinstance(layers, Mapping) or not layers:
        raise ConfigError(f"{key}: {path} lacks num_experts or layers; {fix}")
    for lid, row in layers.items():
        if not str(lid).isdigit() or not isinstance(row, list) or len(row) != experts:
            raise ConfigError(
                f"{key}: {path} layer {lid!r} must be a layer index with {experts} values; {fix}"
            )
    other = f"; it was saved from another model: {fix}"
    if shape.num_experts is not None and experts != shape.num_experts:
        raise ConfigError(
            f"{key}: {path} has {experts} experts per layer but {shape.name} has "
            f"{shape.num_experts}{other}"
        )
    if shape.moe_layers is not None and len(layers) != shape.moe_layers:
        raise ConfigError(
            f"{key}: {path} has {len(layers)} MoE layers but {shape.name} has "
            f"{shape.moe_layers}{other}"
        )
    top = max(int(lid) for lid in layers)
    if shape.num_layers is not None and top >= shape.num_layers:
        raise ConfigError(
            f"{key}: {path} has layer {top} but {shape.name} has {shape.num_layers} layers{other}"
        )


# ---- device ring -----------------------------------------------------------------------------
def ring_bytes(moe_layers: int, num_experts: int, ring_steps: int) -> int:
    """Device bytes of the counters for `ring_steps` slots (the idle slot not included)."""
    from .recorder.ring import RingLayout

    layout = RingLayout(moe_layers, num_experts, top_k=1, max_tokens=1, ring_steps=ring_steps)
    return moe_layers * ring_steps * layout.slot_stride * 4


def max_ring_steps(moe_layers: int, num_experts: int) -> int:
    """The largest explicit ring that fits the budget (never below what auto would pick)."""
    from .recorder.ring import RING_BYTES_BUDGET, RingLayout

    per_step = ring_bytes(moe_layers, num_experts, 1)
    auto = RingLayout.auto_ring_steps(moe_layers, num_experts, 0)
    return max(RING_BYTES_BUDGET // per_step, auto)


def check_ring_steps(ring_steps: int, shape: ModelShape) -> None:
    """An explicit ring size must fit the same memory budget the automatic size respects."""
    from .recorder.ring import RING_BYTES_BUDGET

    if not shape.moe_layers or not shape.num_experts:
        return  # unknown or dense: nothing will be allocated, or nothing to size it by
    limit = max_ring_steps(shape.moe_layers, shape.num_experts)
    if ring_steps <= limit:
        return
    per_step = ring_bytes(shape.moe_layers, shape.num_experts, 1)
    mib = 1024 * 1024
    raise ConfigError(
        f"moe_reuse.ring_steps: {ring_steps} steps need {ring_steps * per_step / mib:.0f} MiB of "
        f"device counters for {shape.name} ({shape.moe_layers} MoE layers x "
        f"{shape.num_experts} experts: {per_step / 1024:.1f} KiB per step), over the "
        f"{RING_BYTES_BUDGET // mib} MiB budget; use at most {limit}, or 0 to size it automatically"
    )
