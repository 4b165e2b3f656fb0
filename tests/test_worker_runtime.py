"""The worker's assembly never goes blind silently: each way a bind can end without recording
publishes a status that /metrics exports (a stub worker stands in for vLLM's; the seam's fact
readers are replaced, the rest is the real code: status snapshot file, reader, families)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from moe_reuse.plugin import faults, worker_runtime  # noqa: E402
from moe_reuse.plugin.exporters.families import snapshot_families  # noqa: E402
from moe_reuse.plugin.snapshot import scan_snapshots  # noqa: E402
from moe_reuse.plugin.vllm import facts as seam_facts  # noqa: E402

LABELS = {"model": "m", "engine": "0", "rank": "0"}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOE_REUSE_SNAPSHOT_DIR", str(tmp_path))
    monkeypatch.setenv("MOE_REUSE_RUN_ID", "1-test")
    monkeypatch.setattr(worker_runtime, "_SESSION", None)
    monkeypatch.setattr(seam_facts, "labels", lambda worker: dict(LABELS))
    faults.reset()
    yield tmp_path
    faults.reset()


def _exported(tmp_path: Path) -> dict[str, list[tuple[dict[str, str], float]]]:
    result = scan_snapshots(tmp_path / "1-test")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in snapshot_families(result.fresh):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _enabled(tmp_path: Path) -> list[tuple[str, float]]:
    return [(lb["reason"], v) for lb, v in _exported(tmp_path).get("moe_reuse_enabled", [])]


def test_a_runner_of_neither_kind_is_reported_not_bound(tmp_path: Path) -> None:
    worker = SimpleNamespace(rank=0, model_runner=SimpleNamespace())  # no V1 or V2 step methods
    worker_runtime.on_model_loaded(worker, {"moe_reuse": {}})
    assert _enabled(tmp_path) == [("unsupported_runner", 0.0)]
    info = _exported(tmp_path)["moe_reuse_info"][0][0]
    assert info["runner"] == "unknown"
    assert worker_runtime._SESSION is None


def _v2_runner() -> Any:
    return SimpleNamespace(gather_batch_req_state=lambda *a: None, req_states=object(),
                           execute_model=lambda *a: None, sample_tokens=lambda *a: None)


def test_experts_declared_but_no_routing_source_is_no_moe_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    facts = SimpleNamespace(sources=[], declared_experts=64, extra_info={})
    monkeypatch.setattr(seam_facts, "model_facts", lambda worker: facts)
    worker_runtime.on_model_loaded(SimpleNamespace(rank=0, model_runner=_v2_runner()),
                                   {"moe_reuse": {}})
    assert _enabled(tmp_path) == [("no_moe_layers", 0.0)]
    assert _exported(tmp_path)["moe_reuse_errors_total"] == [({**LABELS, "stage": "bind"}, 1.0)]


def test_a_dense_model_says_not_moe_without_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    facts = SimpleNamespace(sources=[], declared_experts=0, extra_info={})
    monkeypatch.setattr(seam_facts, "model_facts", lambda worker: facts)
    worker_runtime.on_model_loaded(SimpleNamespace(rank=0, model_runner=_v2_runner()),
                                   {"moe_reuse": {}})
    assert _enabled(tmp_path) == [("not_moe", 0.0)]
    assert "moe_reuse_errors_total" not in _exported(tmp_path)


def test_a_bind_that_raises_is_bind_failed_and_never_reaches_vllm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(worker: Any) -> Any:
        raise RuntimeError("vLLM moved something")

    monkeypatch.setattr(seam_facts, "model_facts", boom)
    worker_runtime.on_model_loaded(SimpleNamespace(rank=0, model_runner=_v2_runner()),
                                   {"moe_reuse": {}})
    assert _enabled(tmp_path) == [("bind_failed", 0.0)]
    assert _exported(tmp_path)["moe_reuse_info"][0][0]["runner"] == "v2"


def test_the_benchmark_ablation_switch_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(worker_runtime.ABLATE_ENV, raising=False)
    assert worker_runtime.ablation() == ""
    for level in worker_runtime.ABLATE_LEVELS:
        monkeypatch.setenv(worker_runtime.ABLATE_ENV, level)
        assert worker_runtime.ablation() == level
    monkeypatch.setenv(worker_runtime.ABLATE_ENV, "everything")
    with pytest.raises(ValueError, match="MOE_REUSE_ABLATE='everything': use one of capture"):
        worker_runtime.ablation()
