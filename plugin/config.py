"""The plugin's configuration: `--additional-config '{"moe_reuse": {...}}'`.

vLLM passes `additional_config` to every process unchanged, so parsing happens wherever it is
needed and always gives the same answer. Parsing is strict: an unknown key or a bad value is a
`ConfigError` that names the key, the value and what is accepted, because a silently ignored typo
in a monitoring flag is worse than a failed start. An empty object takes every default.
"""

from __future__ import annotations

import dataclasses
import difflib
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
    inject_fault_after_steps: int = 0
    """Testing only: raise inside the plugin after this many steps (0 = never)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(PluginConfig)}
_RANGES: dict[str, tuple[float, float]] = {
    "flush_interval_s": (0.01, 60.0),
    "ring_steps": (0, 65536),
    "max_expert_series": (1, 100000),
    "q": (1.0, 1000.0),
    "window_s": (1.0, 86400.0),
    "cold_fraction": (0.0, 1.0),
    "otlp_interval_s": (0.1, 3600.0),
    "inject_fault_after_steps": (0, 10**12),
}


def _check_value(key: str, value: Any) -> Any:
    default = getattr(PluginConfig, key)
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"moe_reuse.{key}: expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and ok and float(value) != int(value):
            ok = False
        if not ok:
            raise ConfigError(f"moe_reuse.{key}: expected a {kind.__name__}, got {value!r}")
        lo, hi = _RANGES[key]
        if not lo <= value <= hi:
            raise ConfigError(f"moe_reuse.{key}: {value!r} is out of range; accepted: {lo} to {hi}")
        return kind(value)
    if not isinstance(value, str):
        raise ConfigError(f"moe_reuse.{key}: expected a string, got {value!r}")
    return value


def parse_config(raw: Any) -> PluginConfig:
    """Validate the `moe_reuse` object and return the frozen config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"moe_reuse: expected a JSON object such as {{}} or {{\"q\": 5}}, got {raw!r}"
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"moe_reuse: unknown key {key!r}.{hint} Accepted keys: {', '.join(sorted(_FIELDS))}"
            )
        values[key] = _check_value(key, value)
    return PluginConfig(**values)


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
