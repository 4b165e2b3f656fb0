"""Shared pieces of the promtool cases: input series on a target's labels, selectors, targets.

The cases themselves are in `recording_rule_tests` (recording rules, cluster totals) and
`rule_tests` (alerts, and the whole tests file).
"""

from __future__ import annotations

A, B, C, D = "a:8000", "b:8000", "c:8000", "d:8000"
DEC, PRE = {"phase": "decode"}, {"phase": "prefill"}


def labels(instance: str, **extra: str) -> dict[str, str]:
    return {
        "job": "vllm",
        "instance": instance,
        "model": "m",
        "engine": "0",
        "rank": "0",
        **extra,
    }


def series(metric: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


def sel(metric: str, labels: dict[str, str]) -> str:
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
