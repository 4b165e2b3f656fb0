"""Which vLLM versions this release was tested with, and whether the running one is among them.

The range is declared once, in pyproject.toml's `gpu` extra (`vllm>=...,<...`), and read back from
the installed distribution's metadata, so the check and the package can never disagree. Outside
the range the plugin still runs (one log line, `moe_reuse_vllm_info{supported="false"}`), and the
self-check (`moe_reuse_selfcheck_mismatch_assignments_total`) tells whether counting still holds.
"""

from __future__ import annotations

import re
from importlib import metadata

DIST = "vllm-moe-reuse"
FALLBACK_RANGE = ">=0.32,<0.33"


def tested_range() -> str:
    """The `vllm` specifier of the `gpu` extra, e.g. ">=0.32,<0.33"."""
    try:
        for req in metadata.requires(DIST) or []:
            m = re.match(r"^\s*vllm\s*([<>=!~][^;]*)", req)
            if m and "extra" in req and "gpu" in req:
                return m.group(1).replace(" ", "")
    except metadata.PackageNotFoundError:
        pass
    return FALLBACK_RANGE


def _key(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version.split("+")[0])[:3]
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))


def is_supported(version: str, spec: str | None = None) -> bool:
    """True when `version` satisfies every clause of `spec` (>=, >, <=, <, ==, !=)."""
    spec = spec or tested_range()
    if not re.search(r"\d", version):
        return False
    v = _key(version)
    ops = {
        ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    }
    for clause in filter(None, spec.split(",")):
        m = re.match(r"(>=|<=|==|!=|>|<)\s*(.+)", clause.strip())
        if not m:
            continue
        op, bound = m.groups()
        if bound.endswith(".*") and op == "==":
            prefix = _key(bound[:-2])[: bound.count(".")]
            if v[: len(prefix)] != prefix:
                return False
            continue
        if not ops[op](v, _key(bound)):
            return False
    return True


def plugin_version() -> str:
    """The installed distribution's version (what `moe_reuse_info{version}` reports)."""
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return "unknown"
