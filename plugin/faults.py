"""Fault injection for tests: `MOE_REUSE_INJECT_FAULT="stage:N[,stage:N...]"`.

Why an environment variable and not a config key: a config key sits in the user-facing table and
in vLLM's compile hash, where somebody may set it in production by accident. The environment of a
test server is the test's own business, and every vLLM process inherits it.

`check(stage)` is called at each plugin stage (the seam decides where); it counts the calls of that
stage in this process and raises `InjectedFault` from the N-th call on (N >= 1), so an injected
fault is persistent, like a real broken dependency. The plugin must then count it with its stage,
say so in `moe_reuse_enabled`, log one line (not one per call) and keep serving. The exception is
`snapshot_write`, which fails on the N-th call only: a write that keeps failing could never carry
the count out of the worker (its rank would just go stale, which `test_snapshot` covers).

Stages (one per place the plugin runs code in a vLLM process):
- `bind`: binding the recorder to a worker's model (`load_model` callback);
- `step`: the per-step protocol around `execute_model` (`after_steps("step")` is also the old
  `inject_fault_after_steps`: the N-th finished step raises);
- `flush`: the flusher thread folding finished slots;
- `snapshot_write`: writing a rank's snapshot file;
- `live_window`: closing a live-comparison window;
- `otlp_push`: the OpenTelemetry exporter's push;
- `collector`: the snapshot collector in the API server, at scrape time.
"""

from __future__ import annotations

import os
import threading

ENV = "MOE_REUSE_INJECT_FAULT"
STAGES = ("bind", "step", "flush", "snapshot_write", "live_window", "otlp_push", "collector")
ONE_SHOT = frozenset({"snapshot_write"})


class InjectedFault(RuntimeError):
    """Raised on purpose by `MOE_REUSE_INJECT_FAULT` (tests of fault isolation)."""


def parse(value: str) -> dict[str, int]:
    """`"step:3,collector:1"` -> {"step": 3, "collector": 1}; errors name the variable and fix."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        stage, sep, n = part.partition(":")
        stage = stage.strip()
        if stage not in STAGES:
            raise ValueError(f"{ENV}: unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
        try:
            count = int(n) if sep else 1
        except ValueError:
            raise ValueError(
                f"{ENV}: {part!r} needs a whole number of calls after the colon, e.g. {stage}:3"
            ) from None
        if count < 1:
            raise ValueError(f"{ENV}: {part!r}: the call count must be >= 1")
        out[stage] = count
    return out


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plan: dict[str, int] | None = None
        self.calls: dict[str, int] = {}


_STATE = _State()


def plan() -> dict[str, int]:
    """The faults asked for in this process (read once; `reset()` reads the variable again)."""
    with _STATE.lock:
        if _STATE.plan is None:
            _STATE.plan = parse(os.environ.get(ENV, ""))
        return dict(_STATE.plan)


def after(stage: str) -> int:
    """N for `stage` (0: no fault asked for). For callers that count calls themselves."""
    if stage not in STAGES:
        raise ValueError(f"unknown fault stage {stage!r}; accepted: {', '.join(STAGES)}")
    current = _STATE.plan
    if current is None:
        current = plan()
    return current.get(stage, 0)


def check(stage: str) -> None:
    """Raise InjectedFault when this call of `stage` is the N-th or a later one. Cheap when unset."""
    n = after(stage)
    if not n:
        return
    with _STATE.lock:
        calls = _STATE.calls[stage] = _STATE.calls.get(stage, 0) + 1
    if calls == n or (calls > n and stage not in ONE_SHOT):
        raise InjectedFault(f"{ENV}={stage}:{n} reached (call {calls})")


def reset() -> None:
    """Forget the plan and the call counts (tests that change the variable)."""
    with _STATE.lock:
        _STATE.plan = None
        _STATE.calls = {}
