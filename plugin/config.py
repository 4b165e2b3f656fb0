"""The plugin's configuration: `--additional-config '{"moe_reuse": {...}}'`.

vLLM passes `additional_config` to every process unchanged, so parsing happens wherever it is
needed and always gives the same answer. Parsing is strict: an unknown key or a bad value is a
`ConfigError` that names the key, the value and what is accepted, because a silently ignored typo
in a monitoring flag is worse than a failed start. An empty object takes every default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONFIG_KEY = "moe_reuse"


class ConfigError(ValueError):
    """A bad `moe_reuse` configuration; the message names the key and the fix."""


@dataclass(frozen=True)
class PluginConfig:
    """Every key of `--additional-config '{"moe_reuse": {...}}'` (see README, Configuration)."""

    enabled: bool = True
    """Record and export. `false` keeps the plugin loaded but inert."""
    flush_interval_s: float = 1.0
    """How often the flusher copies finished steps off the device and publishes a snapshot."""
    ring_steps: int = 0
    """Device ring size in steps; 0 sizes it automatically (at most 16 MiB of counters)."""
    per_expert_series: bool = False
    """Export `moe_reuse_expert_tokens_total{layer,expert,phase}` (opt-in: high cardinality)."""
    max_expert_series: int = 2000
    """Cap on per-expert series per rank; the rest are summed into `expert="other"`."""
    hardware: str = "auto"
    """Hardware spec for the live predictor: a preset name, a JSON file from
    `moe-reuse calibrate`, or `auto` (the calibrated file if present, else a preset for the GPU)."""
    q: float = 5.0
    """Quality-equivalence factor of the dense twin (the paper's Dense-5)."""
    window_s: float = 30.0
    """Window of the live comparison gauges (predicted vs measured, drift, cold experts)."""
    cold_fraction: float = 0.05
    """An expert is cold below this fraction of its fair share of tokens over a window."""
    routing_baseline: str = ""
    """Path of a saved routing baseline (`moe-reuse baseline save`); empty disables drift."""
    otlp_endpoint: str = ""
    """OTLP/HTTP metrics endpoint (e.g. http://collector:4318/v1/metrics); empty disables."""
    otlp_interval_s: float = 10.0
    """Push interval of the OTLP exporter."""
    advisor_ep_sizes: str = "8,16,32,64"
    """EP sizes the EPLB advisor evaluates as what-ifs on any server (comma-separated integers,
    2 to 1024; empty: only the served EP deployment): vLLM's contiguous placement vs its EPLB."""
    cuda_comm_timing: str = "off"
    """MoE collective time on CUDA: `off`, or `device` (the GPU's clock, inside CUDA graphs;
    exact with --enforce-eager, may block vLLM's all-reduce fusion when compiled: docs/gpu.md)."""
    advisor_redundant_experts: int = 32
    """Redundant experts the advisor gives vLLM's EPLB policy for the what-ifs (rounded up per EP
    size until experts + redundant divides by it, as vLLM requires)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def inject_fault_after_steps(self) -> int:
        """Not a key: the testing knob moved to `MOE_REUSE_INJECT_FAULT=step:N` (plugin/faults.py).
        Kept for callers that still read it here; 0 when the variable does not ask for it."""
        from .faults import after

        return after("step")


_FIELDS = {f.name: f for f in dataclasses.fields(PluginConfig)}
_RANGES: dict[str, tuple[float, float]] = {
    "flush_interval_s": (0.01, 60.0),
    "ring_steps": (0, 65536),
    "max_expert_series": (1, 100000),
    "q": (1.0, 1000.0),
    "window_s": (1.0, 86400.0),
    "cold_fraction": (0.0, 1.0),
    "otlp_interval_s": (0.1, 3600.0),
    "advisor_redundant_experts": (0, 1023),  # vLLM's MAX_EXPERT_REDUNDANCY
}
_MOVED = {
    "inject_fault_after_steps": "it is a testing knob: set the environment variable "
    "MOE_REUSE_INJECT_FAULT=step:N instead (plugin/faults.py)",
}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _show(value: Any) -> str:
    """A value as the user wrote it in JSON (true, null, "x"), else Python's repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_value(key: str, value: Any) -> Any:
    default = getattr(PluginConfig, key)
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"moe_reuse.{key}: expected true or false, got {_show(value)}")
        return value
    if kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and ok and not (math.isfinite(value) and float(value) == int(value)):
            ok = False
        if not ok:
            raise ConfigError(f"moe_reuse.{key}: expected {_TYPE_NAMES[kind]}, got {_show(value)}")
        lo, hi = _RANGES[key]
        if not lo <= value <= hi:
            raise ConfigError(
                f"moe_reuse.{key}: {_show(value)} is out of range; accepted: {lo} to {hi}"
            )
        return kind(value)
    if not isinstance(value, str):
        raise ConfigError(f"moe_reuse.{key}: expected a string, got {_show(value)}")
    return _check_string(key, value)


def _check_string(key: str, value: str) -> str:
    """Syntax of the string keys (no file access: files are checked in config_checks)."""
    if key == "advisor_ep_sizes":
        parse_ep_sizes(value)
    if key == "cuda_comm_timing" and value not in ("off", "device"):
        raise ConfigError(f'moe_reuse.cuda_comm_timing: {_show(value)} is not a mode; accepted: '
                          '"off" (the default) or "device" (time collectives with the GPU clock)')
    if key == "hardware" and not value.strip():
        raise ConfigError(
            'moe_reuse.hardware: empty; use "auto", a preset name or a path to a hardware JSON file'
        )
    if key == "otlp_endpoint" and value:
        try:
            url = urllib.parse.urlsplit(value)
            ok = url.scheme in ("http", "https") and bool(url.hostname)
            url.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(
                f"moe_reuse.otlp_endpoint: {_show(value)} is not an http(s) URL; expected e.g. "
                '"http://collector:4318/v1/metrics", or "" to disable OpenTelemetry'
            )
    return value


def _check_together(cfg: PluginConfig) -> None:
    """Keys that are only wrong in combination."""
    if cfg.window_s < cfg.flush_interval_s:
        raise ConfigError(
            f"moe_reuse.window_s: {_show(cfg.window_s)} is shorter than flush_interval_s "
            f"{_show(cfg.flush_interval_s)}; a window closes on a flush, so make window_s at "
            "least flush_interval_s"
        )


def parse_config(raw: Any) -> PluginConfig:
    """Validate the `moe_reuse` object and return the frozen config.

    `null` is an error rather than the defaults: it usually comes from a templating tool that
    lost the object, and `{}` says "defaults" without ambiguity.
    """
    if raw is None:
        raise ConfigError(
            "moe_reuse: null is not a configuration; use {} for every default, or leave the "
            "moe_reuse key out to keep the plugin off"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"moe_reuse: expected a JSON object such as {{}} or {{\"q\": 5}}, got {_show(raw)}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _MOVED:
            raise ConfigError(f"moe_reuse: {key!r} is not a key any more; {_MOVED[key]}")
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"moe_reuse: unknown key {key!r}.{hint} Accepted keys: {', '.join(sorted(_FIELDS))}"
            )
        values[key] = _check_value(key, value)
    cfg = PluginConfig(**values)
    _check_together(cfg)
    return cfg


def parse_ep_sizes(value: str) -> tuple[int, ...]:
    """`advisor_ep_sizes` as sorted unique ints; a ConfigError names the key and the fix."""
    out: set[int] = set()
    for part in value.replace(" ", "").split(","):
        if part and not (part.isdigit() and 2 <= int(part) <= 1024):
            raise ConfigError(f"moe_reuse.advisor_ep_sizes: {part!r} is not an EP size; accepted: "
                              'comma-separated integers 2 to 1024, e.g. "8,16,32,64", or ""')
        if part:
            out.add(int(part))
    return tuple(sorted(out))


def config_from_additional(additional_config: Any) -> PluginConfig | None:
    """The plugin's config if `moe_reuse` is present in vLLM's additional_config, else None.

    None means the plugin was not asked for: it must then change nothing at all.
    """
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    return parse_config(additional_config[CONFIG_KEY])


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every key, for the README and `moe-reuse config`."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(PluginConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return [(name, repr(f.default), docs.get(name, "")) for name, f in _FIELDS.items()]
