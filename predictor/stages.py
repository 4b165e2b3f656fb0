"""A pipeline stage's share of a predicted step, as vLLM runs pipeline parallelism.

`step_time` follows the paper: a pipelined step is pp stage passes of batch/pp tokens, and every
pass carries the whole model's per-layer work over pp plus one LM head. The live comparison
predicts one rank of a running vLLM pipeline instead, whose step is one pass of its own batch
through its own layers, and where only the last stage computes the logits. Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .timing import StepTime


def stage_pass(step: StepTime, holds_lm_head: bool = True) -> StepTime:
    """One stage's pass of one microbatch: every figure of a pipelined step over pp.

    `step_time` prices a step as pp stage-times of batch/pp tokens (every GPU runs each of the pp
    microbatches through its layers). vLLM's pipeline keeps pp scheduled batches in flight and a
    rank's step is one such pass: predict that with `step_time` at pp x the rank's batch, then
    take this. Parts still sum to their totals; pp == 1 returns the step unchanged.

    The paper's model spreads the LM head over the stages (each pass carries one); in vLLM only
    the last stage computes the logits, so a stage that does not (`holds_lm_head=False`) gets
    the pass without its LM-head compute and reads (`without_lm_head`).
    """
    pp = step.partition.pp
    if pp == 1:
        return step

    def per(m: Mapping[str, float]) -> dict[str, float]:
        return {k: v / pp for k, v in m.items()}

    if not holds_lm_head:
        return without_lm_head(stage_pass(step))
    return replace(
        step,
        batch=step.batch / pp,
        compute_seconds=per(step.compute_seconds),
        hbm_seconds=per(step.hbm_seconds),
        comm_seconds=per(step.comm_seconds),
        comm_exposed_seconds=per(step.comm_exposed_seconds),
        compute_total_seconds=step.compute_total_seconds / pp,
        hbm_total_seconds=step.hbm_total_seconds / pp,
        comm_total_seconds=step.comm_total_seconds / pp,
        comm_exposed_total_seconds=step.comm_exposed_total_seconds / pp,
        total_seconds=step.total_seconds / pp,
        flops=per(step.flops),
        unhidden_seconds=step.unhidden_seconds / pp,
        overhead_seconds=step.overhead_seconds / pp,
        hbm_bytes=per(step.hbm_bytes),
    )


def without_lm_head(step: StepTime) -> StepTime:
    """`step` with its LM head's compute, reads and flops removed (a pipeline stage before the
    last). Totals are re-derived as `step_time` composes them: the overlap's unhidden share
    scales with min(compute, HBM), exposed communication and fixed overhead are unchanged."""
    compute = {**step.compute_seconds, "lm_head": 0.0}
    hbm = {**step.hbm_seconds, "lm_head": 0.0}
    c_total, h_total = sum(compute.values()), sum(hbm.values())
    low = min(step.compute_total_seconds, step.hbm_total_seconds)
    unhidden = step.unhidden_seconds * min(c_total, h_total) / low if low > 0 else 0.0
    return replace(
        step,
        compute_seconds=compute,
        hbm_seconds=hbm,
        compute_total_seconds=c_total,
        hbm_total_seconds=h_total,
        total_seconds=max(c_total, h_total) + unhidden + step.comm_exposed_total_seconds
        + step.overhead_seconds,
        flops={**step.flops, "lm_head": 0.0},
        unhidden_seconds=unhidden,
        hbm_bytes={**step.hbm_bytes, "lm_head": 0.0},
    )
