"""`promtool test rules` cases for the recording rules: per-rank figures on one target (prefill
traffic left out), the cluster totals across two nodes (each engine counted once), and a
pipeline-parallel engine whose stages hold different layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import promtool_cases as pc
from . import rule_queries as rq
from .config import Config
from .promtool_cases import DEC, PRE, A, B

Expect = Callable[[str, list[tuple[dict[str, str], float]]], dict[str, Any]]


def _expecter(cfg: Config) -> Expect:
    """`expect(name, [(labels, value), ...])`: a recorded series' samples at 10 minutes."""

    def expect(name: str, samples: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
        return {"expr": rq.rec(name, cfg), "eval_time": "10m",
                "exp_samples": [{"labels": pc.sel(rq.rec(name, cfg), lbl), "value": v}
                                for lbl, v in samples]}

    return expect


def recording_tests(cfg: Config) -> dict[str, Any]:
    """One target with two layers and prefill traffic that must be left out; a second target
    without a MoE collective for the comm-share fallback."""
    a = pc.labels(A)
    l0, l1 = {"layer": "0"}, {"layer": "1"}
    series = [
        pc.series("moe_reuse_expert_assignments_total", {**a, **l0, **DEC}, "0+120x30"),
        pc.series("moe_reuse_expert_assignments_total", {**a, **l1, **DEC}, "0+240x30"),
        pc.series("moe_reuse_expert_assignments_total", {**a, **l0, **PRE}, "0+6000x30"),
        pc.series("moe_reuse_expert_assignments_total", {**a, **l1, **PRE}, "0+6000x30"),
        pc.series("moe_reuse_experts_touched_total", {**a, **l0, **DEC}, "0+60x30"),
        pc.series("moe_reuse_experts_touched_total", {**a, **l1, **DEC}, "0+60x30"),
        pc.series("moe_reuse_experts_touched_total", {**a, **l0, **PRE}, "0+600x30"),
        pc.series("moe_reuse_experts_touched_total", {**a, **l1, **PRE}, "0+600x30"),
        pc.series("moe_reuse_max_expert_tokens_total", {**a, **l0, **DEC}, "0+180x30"),
        pc.series("moe_reuse_max_expert_tokens_total", {**a, **l1, **DEC}, "0+480x30"),
        pc.series("moe_reuse_max_expert_tokens_total", {**a, **l0, **PRE}, "0+9000x30"),
        pc.series("moe_reuse_steps_total", {**a, "kind": "decode"}, "0+30x30"),
        pc.series("moe_reuse_steps_total", {**a, "kind": "mixed"}, "0+30x30"),
        pc.series("moe_reuse_steps_total", {**a, "kind": "prefill"}, "0+6x30"),
        pc.series("moe_reuse_tokens_total", {**a, **DEC}, "0+120x30"),
        pc.series("moe_reuse_tokens_total", {**a, **PRE}, "0+6000x30"),
        pc.series("moe_reuse_step_duration_seconds_total", {**a, "kind": "decode"}, "0+15x30"),
        pc.series("moe_reuse_step_duration_seconds_total", {**a, "kind": "mixed"}, "0+15x30"),
        pc.series("moe_reuse_step_duration_seconds_total", {**a, "kind": "prefill"}, "0+30x30"),
        pc.series("moe_reuse_hbm_read_bytes_total", {**a, "component": "routed_experts"}, "0+6e9x30"),
        pc.series("moe_reuse_hbm_read_bytes_total", {**a, "component": "attention"}, "0+3e9x30"),
        pc.series("moe_reuse_moe_comm_seconds_total", {**a, "op": "all_reduce"}, "0+6x30"),
        pc.series("moe_reuse_moe_comm_info", {**a, "mode": "tp_all_reduce"}, "1x30"),
        pc.series("moe_reuse_moe_comm_info", {**pc.labels(B), "mode": "none"}, "1x30"),
        # a measures its GPU (GPM), b does not: b's info series only, no counters
        pc.series("moe_reuse_hbm_measured_bytes_total", a, "0+9e9x30"),
        pc.series("moe_reuse_hbm_measured_seconds_total", a, "0+60x30"),
        pc.series("moe_reuse_hbm_measurement_info", {**a, "source": "gpm", "reason": "gpm"},
                "1x30"),
        pc.series("moe_reuse_hbm_measurement_info",
                {**pc.labels(B), "source": "gpm", "reason": "not_cuda"}, "1x30"),
    ]

    expect = _expecter(cfg)

    return {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            # (120 + 240) assignments / (60 + 60) touched per minute; prefill left out.
            expect(rq.REC_DECODE_TOKENS_PER_EXPERT, [(a, 3.0)]),
            expect(rq.REC_LAYER_DECODE_TOKENS_PER_EXPERT, [({**a, **l0}, 2.0), ({**a, **l1}, 4.0)]),
            # layer 0: (180 / 60 decode+mixed steps) / (120 / 60) = 1.5; layer 1: 8 / 4 = 2.
            expect(rq.REC_LAYER_LOAD_IMBALANCE, [({**a, **l0}, 1.5), ({**a, **l1}, 2.0)]),
            # 120 decode tokens over 60 decode+mixed steps.
            expect(rq.REC_DECODE_BATCH_TOKENS, [(a, 2.0)]),
            expect(rq.REC_DECODE_TOKENS_RATE, [(a, 2.0)]),
            expect(rq.REC_TOKENS_RATE, [(a, 102.0)]),
            # 9e9 bytes per minute over 60 s of steps per minute.
            expect(rq.REC_HBM_ACHIEVED, [(a, 1.5e8)]),
            # 9e9 bytes measured per 60 s of wall time; b is not measured: no sample, not 0.
            expect(rq.REC_HBM_MEASURED, [(a, 1.5e8)]),
            # 6 s of all-reduce per 60 s of steps; target b has no collective: 0, not absent.
            expect(rq.REC_MOE_COMM_SHARE, [(a, 0.1), (pc.labels(B), 0.0)]),
        ],
    }


def cluster_tests(cfg: Config) -> dict[str, Any]:
    """Two nodes: engine 0 is TP=2 with rank 0 on the API server's node (job vllm) and rank 1 on
    a node read by `moe-reuse exporter`; engine 1 (another DP engine) lives on the second node.
    The cluster rules count each engine once (its TP ranks compute the same tokens) and every
    rank's bytes."""
    n0 = {**pc.labels(A), "node": "n0"}
    e0r1 = {**pc.labels("n1:9477"), "job": "moe-reuse-exporter", "node": "n1", "rank": "1"}
    e1r0 = {**pc.labels("n1:9477"), "job": "moe-reuse-exporter", "node": "n1", "engine": "1"}
    l0, l1 = {"layer": "0"}, {"layer": "1"}
    series = []
    for lab, tok, asg, tch, hbm in ((n0, 120, 120, 60, "6e9"), (e0r1, 120, 120, 60, "6e9"),
                                    (e1r0, 60, 120, 60, "3e9")):
        series += [
            pc.series("moe_reuse_tokens_total", {**lab, **DEC}, f"0+{tok}x30"),
            pc.series("moe_reuse_tokens_total", {**lab, **PRE}, f"0+{5 * tok}x30"),
            pc.series("moe_reuse_expert_assignments_total", {**lab, **l0, **DEC}, f"0+{asg}x30"),
            pc.series("moe_reuse_expert_assignments_total", {**lab, **l1, **DEC}, f"0+{asg}x30"),
            pc.series("moe_reuse_expert_assignments_total", {**lab, **l0, **PRE}, "0+9000x30"),
            pc.series("moe_reuse_experts_touched_total", {**lab, **l0, **DEC}, f"0+{tch}x30"),
            pc.series("moe_reuse_experts_touched_total", {**lab, **l1, **DEC}, f"0+{tch}x30"),
            pc.series("moe_reuse_hbm_read_bytes_total", {**lab, "component": "routed_experts"},
                    f"0+{hbm}x30"),
        ]

    expect = _expecter(cfg)

    return {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            # engine 0 once (120/min), engine 1 (60/min): 3 decode tokens/s; prefill 5x.
            expect(rq.REC_CLUSTER_TOKENS_RATE, [({"model": "m", **DEC}, 3.0),
                                               ({"model": "m", **PRE}, 15.0)]),
            # (240 + 240) assignments / (120 + 120) touched a minute; engine 0 counted once.
            expect(rq.REC_CLUSTER_DECODE_TOKENS_PER_EXPERT, [({"model": "m"}, 2.0)]),
            # every rank's bytes: (6e9 + 6e9 + 3e9) a minute.
            expect(rq.REC_CLUSTER_HBM_READ_RATE, [({"model": "m"}, 2.5e8)]),
        ],
    }


def pipeline_tests(cfg: Config) -> dict[str, Any]:
    """One PP=2 engine: stage 0 (rank 0) holds layer 0, stage 1 (rank 1) layer 1, and each
    computes every token. The cluster's decode reuse is over both stages' layers, and its
    tokens are the engine's once."""
    r0, r1 = pc.labels(A), {**pc.labels(A), "rank": "1"}
    series = []
    for lab, layer, asg, tch in ((r0, "0", 120, 60), (r1, "1", 240, 60)):
        series += [
            pc.series("moe_reuse_tokens_total", {**lab, **DEC}, "0+60x30"),
            pc.series("moe_reuse_expert_assignments_total", {**lab, "layer": layer, **DEC},
                      f"0+{asg}x30"),
            pc.series("moe_reuse_experts_touched_total", {**lab, "layer": layer, **DEC},
                      f"0+{tch}x30"),
        ]

    expect = _expecter(cfg)

    return {
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            # (120 + 240) assignments / (60 + 60) touched a minute, not one stage's 240 / 60.
            expect(rq.REC_CLUSTER_DECODE_TOKENS_PER_EXPERT, [({"model": "m"}, 3.0)]),
            # both stages compute the same 60 tokens a minute: 1 a second, not 2.
            expect(rq.REC_CLUSTER_TOKENS_RATE, [({"model": "m", **DEC}, 1.0)]),
        ],
    }
