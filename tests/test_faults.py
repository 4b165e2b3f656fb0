"""`MOE_REUSE_INJECT_FAULT`: the testing knob that makes a plugin stage raise (plugin/faults.py)."""

from __future__ import annotations

import pytest

from moe_reuse.plugin import faults


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
    yield
    faults.reset()


def test_unset_never_raises() -> None:
    for stage in faults.STAGES:
        for _ in range(5):
            faults.check(stage)
        assert faults.after(stage) == 0


def test_raises_from_the_nth_call_of_that_stage_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "step:3, collector")
    faults.reset()
    assert faults.plan() == {"step": 3, "collector": 1}
    faults.check("step")
    faults.check("step")
    faults.check("flush")  # another stage: untouched
    for _ in range(2):  # persistent, like a broken dependency
        with pytest.raises(faults.InjectedFault, match="step:3"):
            faults.check("step")
    with pytest.raises(faults.InjectedFault):
        faults.check("collector")


@pytest.mark.parametrize("value, message", [
    ("steps:1", "MOE_REUSE_INJECT_FAULT: unknown stage 'steps'; accepted: bind, step, flush, "
                "snapshot_write, live_window, otlp_push, collector"),
    ("step:x", "MOE_REUSE_INJECT_FAULT: 'step:x' needs a whole number of calls after the colon, "
               "e.g. step:3"),
    ("flush:0", "MOE_REUSE_INJECT_FAULT: 'flush:0': the call count must be >= 1"),
])
def test_bad_values_name_the_variable(value: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        faults.parse(value)
    assert str(err.value) == message


def test_unknown_stage_in_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown fault stage"):
        faults.check("nowhere")


def test_snapshot_write_fails_once_so_the_count_can_still_be_published(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "snapshot_write:2")
    faults.reset()
    faults.check("snapshot_write")
    with pytest.raises(faults.InjectedFault):
        faults.check("snapshot_write")
    faults.check("snapshot_write")  # the next write goes through, carrying errors and enabled=0
