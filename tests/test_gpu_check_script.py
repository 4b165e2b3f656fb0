"""CPU-only tests of benchmarks/gpu_recorder_check.py (issue 6).

These test the script's refusal to run without a GPU and the logic of its pure helpers (routing,
the sync-free expert order, the eager reference counter, the MoE layer's expert compute) on tiny
shapes. They make no claim about the GPU: the checks themselves only run on a CUDA device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_loader import BENCHMARKS, bench_module

from moe_reuse.plugin.recorder.ring import DECODE, PAD, PREFILL, RingLayout, RoutingRing

SCRIPT = BENCHMARKS / "gpu_recorder_check.py"
G = bench_module("gpu_recorder_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is only observable without CUDA")
@pytest.mark.parametrize("extra", [[], ["--quick"], ["--device", "cpu"]])
def test_script_exits_2_with_message_without_cuda(extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *extra, "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device: this check needs a GPU (issue 6)" in proc.stderr
    assert not out.exists()  # nothing is written: no CPU result stands in for a GPU one


def test_main_refuses_a_cpu_device_even_when_asked() -> None:
    assert G.main(["--device", "cpu"]) == 2


def test_parse_args_defaults_and_quick() -> None:
    full = G.parse_args([])
    assert full.device == "cuda" and full.batches == G.DEFAULT_BATCHES
    assert full.batches[0] == 1 and full.batches[-1] == 512
    assert full.flush_batches == {64, 512}
    quick = G.parse_args(["--quick"])
    assert quick.batches == G.QUICK_BATCHES and quick.rounds < full.rounds
    assert G.parse_args(["--batches", "8,16"]).flush_batches == {16}
    with pytest.raises(SystemExit):
        G.parse_args(["--models", "nope"])


def test_model_shapes_are_the_issue_s() -> None:
    q, d = G.MODELS["qwen3-235b"], G.MODELS["deepseek-v3"]
    assert (q.hidden, q.num_experts, q.top_k, q.intermediate, q.scoring) == (
        4096, 128, 8, 1536, "softmax")
    assert (d.hidden, d.num_experts, d.top_k, d.intermediate, d.n_group, d.topk_group,
            d.n_shared, d.scoring) == (7168, 256, 8, 2048, 8, 4, 1, "sigmoid_grouped")


def test_softmax_topk_matches_a_sort() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 16)
    w, ids = G.softmax_topk(logits, 4, renormalize=True)
    probs = logits.softmax(-1)
    ref = probs.argsort(dim=-1, descending=True)[:, :4]
    assert torch.equal(ids.sort(-1).values, ref.sort(-1).values)
    assert torch.allclose(w.sum(-1), torch.ones(7))
    w_raw, _ = G.softmax_topk(logits, 4, renormalize=False)
    assert torch.allclose(w_raw, probs.gather(1, ids))


def _naive_grouped_topk(logits, bias, k, n_group, topk_group, scale):
    scores = torch.sigmoid(logits.float())
    biased = scores + bias
    e = logits.shape[1]
    per = e // n_group
    ids_all, w_all = [], []
    for t in range(logits.shape[0]):
        groups = []
        for g in range(n_group):
            vals = sorted(biased[t, g * per:(g + 1) * per].tolist(), reverse=True)
            groups.append((vals[0] + vals[1], g))
        keep = {g for _, g in sorted(groups, reverse=True)[:topk_group]}
        cand = [(float(biased[t, i]), i) for i in range(e) if i // per in keep]
        chosen = [i for _, i in sorted(cand, reverse=True)[:k]]
        w = scores[t, chosen]
        ids_all.append(chosen)
        w_all.append((w / w.sum() * scale).tolist())
    return ids_all, w_all


def test_grouped_topk_matches_a_per_token_reference() -> None:
    torch.manual_seed(1)
    n_group, topk_group, k, e = 4, 2, 3, 16
    logits, bias = torch.randn(9, e), torch.randn(e) * 0.3
    w, ids = G.grouped_topk(logits, bias, k, n_group, topk_group, routed_scaling=2.5)
    ref_ids, ref_w = _naive_grouped_topk(logits, bias, k, n_group, topk_group, 2.5)
    for t in range(9):
        order = ids[t].argsort()
        assert sorted(ids[t].tolist()) == sorted(ref_ids[t])
        ref_map = dict(zip(ref_ids[t], ref_w[t]))
        for j in order.tolist():
            assert abs(float(w[t, j]) - ref_map[int(ids[t, j])]) < 1e-5
        # every chosen expert lies in one of the topk_group kept groups
        assert len({int(i) // (e // n_group) for i in ids[t]}) <= topk_group


def test_expert_order_is_a_stable_argsort_without_sorting() -> None:
    torch.manual_seed(2)
    for n, e in [(1, 4), (13, 5), (64, 16), (40, 3)]:
        flat = torch.randint(0, e, (n,))
        perm, counts, rank = G.expert_order(flat, e)
        assert torch.equal(perm, torch.argsort(flat, stable=True))
        assert torch.equal(counts.long(), torch.bincount(flat, minlength=e))
        for j in range(n):  # rank = earlier pairs of the same expert
            assert int(rank[j]) == int((flat[:j] == flat[j]).sum())


def test_reference_counts_phases_padding_and_layers() -> None:
    ids0 = torch.tensor([[0, 1], [1, 2], [1, 7], [5, 6]])
    ids1 = torch.tensor([[3, 4], [3, 4], [3, 4], [3, 4]])
    phases = np.array([PREFILL, DECODE, DECODE], dtype=np.int8)  # 4th row is padding
    ref = G.reference_counts([ids0, ids1], phases, 8)
    assert ref.shape == (2, 3, 9)  # column 8: out-of-range ids
    assert ref[0, PREFILL].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert ref[0, DECODE].tolist() == [0, 2, 1, 0, 0, 0, 0, 1, 0]
    assert ref[0, PAD].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0]
    assert ref[1, DECODE, 3] == 2 and ref[1, PAD, 4] == 1 and int(ref[1].sum()) == 8


def test_reference_counts_agree_with_the_ring_on_cpu() -> None:
    """Same protocol as the GPU count check, on the CPU ring: a logic test of the reference.
    (On CPU the flusher's read zeroes a slot for its next use, so each step is read, as the
    session does, before its slot comes round again.)"""
    rng = np.random.default_rng(0)
    L, E, K, B = 3, 16, 4, 24
    ring = RoutingRing(RingLayout(L, E, K, max_tokens=32, ring_steps=4))
    out = torch.zeros((L, 1, 3, E + 1), dtype=torch.int32)
    for step in range(6):
        phases = G.make_batch(rng, int(rng.integers(1, B + 1)))[3]
        ids = [torch.from_numpy(rng.integers(0, E, (B, K))) for _ in range(L)]
        ring.begin_step(step % 4, phases)
        for layer, t in enumerate(ids):
            ring.capture(layer, t)
        ring.end_step()
        assert torch.equal(ring.counts[:, step % 4].long(), G.reference_counts(ids, phases, E))
        ring.read_range(step % 4, step % 4 + 1, out)
        assert torch.equal(out[:, 0].long(), G.reference_counts(ids, phases, E))
        assert not ring.counts[:, step % 4].any()  # free again, and zero


def test_make_batch_matches_the_session_s_phase_derivation() -> None:
    rng = np.random.default_rng(3)
    for n in [1, 2, 7, 64, 512]:
        sched, computed, prompt, phases = G.make_batch(rng, n)
        assert int(sched.sum()) == n == phases.shape[0]
        is_decode = computed >= prompt
        assert np.all(sched[is_decode] == 1)
        same = np.repeat(np.where(is_decode, DECODE, PREFILL).astype(np.int8), sched)
        assert np.array_equal(phases, same)  # what RecorderSession.step_prepared computes


def _tiny_layer(impl: str, scoring: str, ep: int = 2, cap: float = 1e9):
    shape = G.MoEShape("tiny", 32, 8, 2, 16, scoring, n_group=4, topk_group=2,
                       n_shared=1 if scoring != "softmax" else 0, routed_scaling=2.5)
    gen = torch.Generator().manual_seed(0)
    return G.MoELayer(shape, ep=ep, max_tokens=16, device="cpu", dtype=torch.float32,
                      generator=gen, impl=impl, capacity_factor=cap)


@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid_grouped"])
def test_moe_layer_expert_compute_matches_per_pair_reference(impl: str, scoring: str) -> None:
    layer = _tiny_layer(impl, scoring)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(5))
    seen: list[torch.Tensor] = []
    out, ids = layer(x, seen.append)
    assert len(seen) == 1 and seen[0] is ids and ids.shape == (10, 2)
    ref = G.reference_moe(layer, x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_bmm_capacity_drops_only_overflow_pairs() -> None:
    layer = _tiny_layer("bmm", "softmax", ep=8, cap=0.01)  # 1 local expert, capacity 1
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(6))
    out, _ = layer(x, None)
    assert torch.isfinite(out).all()
    assert int((out.abs().sum(-1) > 0).sum()) == 1  # one pair kept, the rest dropped


def test_block_routes_differently_per_layer_and_counts_every_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    shape = G.MoEShape("tiny", 32, 8, 2, 16, "softmax")
    block = G.MoEBlock([G.MoELayer(shape, ep=1, max_tokens=8, device="cpu",
                                   dtype=torch.float32, generator=gen) for _ in range(3)])
    calls: list[int] = []
    caps = [lambda ids, i=i: calls.append(i) for i in range(3)]
    h, ids = block(torch.randn(8, 32, generator=gen), caps)
    assert calls == [0, 1, 2] and len(ids) == 3 and h.shape == (8, 32)
    assert not all(torch.equal(ids[0], t) for t in ids[1:])
