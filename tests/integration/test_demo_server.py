"""The main job (`make demo`) end to end: a real server, real load, its printed figures."""

from __future__ import annotations

import re

import pytest

from moe_reuse.plugin.harness.demo import run_demo
from moe_reuse.plugin.harness.tiny_models import model_facts

pytestmark = pytest.mark.integration


def test_demo_conserves_and_compares_every_wave() -> None:
    lines: list[str] = []
    assert run_demo("qwen3-moe", waves=(1, 8), wave_seconds=5.0, enforce_eager=True,
                    say=lines.append) == 0
    text = "\n".join(lines)
    assert "model runner: v2 (Model Runner V2" in text  # V2 by default, and it says so
    facts = model_facts("qwen3-moe")
    layers = len(facts.moe_layer_indices)
    for phase in ("prefill", "decode"):
        m = re.search(rf"{phase}\s*: (\d+) tokens computed of (\d+) sent.*?(\d+) assignments = "
                      rf"(\d+) x (\d+) x (\d+): OK", text)
        assert m, text
        tok, sent, asg = int(m[1]), int(m[2]), int(m[3])
        assert asg == tok * facts.top_k * layers and tok > 0
        if phase == "decode":
            assert tok == sent  # no decode token is a prefix-cache hit
    table = lines[lines.index(next(ln for ln in lines if ln.strip().startswith("c  tok/expert"))) + 1:]
    rows = {int(r.split()[0]): r.split() for r in table[:2]}
    assert set(rows) == {1, 8}, text
    # c=1: one decode token per step, so each touched expert got exactly one token
    assert rows[1][1:4] == ["1.00", "/", "1.00"], rows[1]
    assert float(rows[8][1]) >= 1.0
    for r in rows.values():
        meas_ms, pred_ms = float(r[4]), float(r[6])
        assert 0 < meas_ms < 1000 and 0 < pred_ms < 1000
        assert r[8].startswith("x") and 0.05 < float(r[8][1:]) < 20
