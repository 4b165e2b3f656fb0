"""Unit tests of the recording core with torch alone (no vLLM): ring, step protocol, folding."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from moe_reuse.plugin.recorder.aggregate import (
    COMPONENTS,
    HIST_BOUNDS,
    ByteModel,
    Totals,
    fold_block,
)
from moe_reuse.plugin.recorder.ring import DECODE, PAD, PREFILL, RingLayout, RoutingRing
from moe_reuse.plugin.recorder.session import RecorderSession

L, E, K = 3, 8, 2


def _session(ring_steps: int = 8, **kw) -> tuple[RecorderSession, list[dict]]:
    published: list[dict] = []
    s = RecorderSession(
        RingLayout(L, E, K, max_tokens=64, ring_steps=ring_steps),
        ByteModel((100, 200, 300), shared_expert_bytes=7, dense_ffn_bytes=11, attention_bytes=13,
                  embedding_bytes=17, kv_bytes_per_token=2),
        labels={"model": "m", "engine": "0", "rank": "0"}, info={"version": "t"},
        layer_ids=[1, 2, 3], publish=published.append, **kw,
    )
    return s, published


def _step(s: RecorderSession, sched, computed, prompt, routing: list[torch.Tensor]) -> None:
    s.step_started()
    c = np.array(computed)
    s.step_prepared(np.array(sched), c >= np.array(prompt), c)
    for layer, ids in enumerate(routing):
        s.capture_fn(layer)(ids)
    s.step_finished()


def test_capture_counts_by_phase_and_sends_padding_to_the_sink() -> None:
    ring = RoutingRing(RingLayout(1, E, K, max_tokens=16, ring_steps=4))
    ring.begin_step(2, np.array([PREFILL, DECODE, DECODE], dtype=np.int8))
    ids = torch.tensor([[0, 1], [1, 2], [1, 7], [5, 6]])  # 4th row: padding
    ring.capture(0, ids)
    ring.end_step()
    c = ring.counts[0, 2]
    assert c[PREFILL].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]  # last column: invalid ids
    assert c[DECODE].tolist() == [0, 2, 1, 0, 0, 0, 0, 1, 0]
    assert c[PAD].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0]
    # between steps everything goes to the idle slot (warm-up and dummy batches are not counted)
    ring.capture(0, torch.tensor([[3, 4]] * 5))
    assert int(ring.counts[0, :4].sum()) == 8 and int(ring.counts[0, 4].sum()) == 10


def test_capture_is_traceable_by_torch_compile_without_graph_breaks() -> None:
    ring = RoutingRing(RingLayout(2, E, K, max_tokens=32, ring_steps=4))

    def forward(ids0: torch.Tensor, ids1: torch.Tensor) -> None:
        ring.capture(0, ids0)
        ring.capture(1, ids1)

    compiled = torch.compile(forward, fullgraph=True, dynamic=True)
    for slot, n in enumerate((3, 5, 9)):  # one slot each: on CPU the flusher's read frees one
        ring.begin_step(slot, np.full(n, DECODE, dtype=np.int8))
        ids = torch.randint(0, E, (n, K))
        compiled(ids, ids)
        ring.end_step()
        assert ring.counts[0, slot, DECODE].sum().item() == n * K
        assert ring.counts[1, slot, DECODE].tolist() == torch.bincount(
            ids.flatten(), minlength=E + 1).tolist()


class _HostDriver:
    """libcuda's three step calls on host memory: the copy is a memmove of the same pointers
    and byte counts (`step_calls.DriverCalls`), so a wrong offset or length shows in the counts.
    `fail_after`: that many copies succeed, then every call returns CUresult 201."""

    def __init__(self, fail_after: int = -1) -> None:
        self.fail_after, self.copies = fail_after, 0

    def cuMemcpyHtoDAsync_v2(self, dst: int, src: int, n: int, stream: int) -> int:
        if self.copies == self.fail_after:
            return 201
        self.copies += 1
        ctypes.memmove(dst, src, n)
        return 0

    def cuEventRecord(self, event: int, stream: int) -> int:
        return 0

    def cuStreamWaitEvent(self, stream: int, event: int, flags: int) -> int:
        return 0


@pytest.mark.parametrize("stage", ["in-place", "staged", "staged-driver", "staged-driver-failing"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_changing_layouts_count_every_row_in_its_own_slot_and_phase(compiled: bool,
                                                                     stage: str) -> None:
    """The token map keeps each row's phase offset across steps and rewrites it only when the
    layout changes (a step of one phase over as many tokens as last time costs two element
    writes, or one 16-byte copy through a staging buffer). Walk it through every change that
    could leave a stale row: decode steps that shrink and grow, a mixed step, a prefill-only
    step, forwards with padded rows past the step's tokens, and dummy forwards between steps;
    the expected counts come from the rows sent, token by token. `staged` runs the GPU's path
    (round-robin staging buffers whose contents are four steps old, partial copies) on the CPU;
    `staged-driver` makes those copies through the driver calls' pointers, and `-failing` has
    the driver fail mid-run, from which torch's calls take over without a step lost."""
    S, T = 6, 24
    driver = {"staged-driver": _HostDriver(), "staged-driver-failing": _HostDriver(7)}.get(stage)
    ring = RoutingRing(RingLayout(1, E, K, max_tokens=T, ring_steps=S),
                       stage=stage != "in-place", driver=driver)

    def forward(ids: torch.Tensor) -> None:
        ring.capture(0, ids)

    fwd = torch.compile(forward, fullgraph=True, dynamic=True) if compiled else forward
    gen = torch.Generator().manual_seed(3)
    want = np.zeros((S + 1, 3, E + 1), dtype=np.int64)
    layouts = [  # (per-request decode flags, scheduled tokens per request, padded rows)
        ([True] * 4, [1] * 4, 0), ([True] * 4, [1] * 4, 3), ([True] * 2, [1] * 2, 0),
        ([True] * 5, [1] * 5, 0), ([False, True, True], [6, 1, 1], 2), ([False] * 2, [3, 4], 0),
        ([True] * 7, [1] * 7, 0), ([True] * 3, [1] * 3, 4), ([False], [1], 0), ([True], [1], 0),
        # more steps than staging buffers (4) on one layout after a wider mixed one, then again
        ([True, False], [1, 9], 0), *[([True] * 3, [1] * 3, 5)] * 6, ([False, True], [2, 1], 1),
        ([False, True], [2, 1], 0), *[([True] * 3, [1] * 3, 2)] * 5,
    ]
    for step, (decode, sched, pad) in enumerate(layouts):
        slot = step % S
        ring.counts[0, slot] = 0  # the flusher's zeroing of a read slot
        want[slot] = 0
        ring.begin_requests(slot, np.array(decode), np.array(sched))
        rows = np.repeat(np.where(decode, DECODE, PREFILL), sched).tolist() + [PAD] * pad
        ids = torch.randint(0, E, (len(rows), K), generator=gen)
        fwd(ids)
        for phase, pair in zip(rows, ids.tolist()):
            for e in pair:
                want[slot, phase, e] += 1
        ring.end_step()
        idle = torch.randint(0, E, (T, K), generator=gen)  # a dummy forward between steps
        fwd(idle)
        for pair in idle.tolist():
            for e in pair:
                want[S, PAD, e] += 1
        got = ring.counts[0].numpy()
        assert np.array_equal(got[slot], want[slot]), (step, got[slot], want[slot])
        assert np.array_equal(got[S].sum(axis=0), want[S].sum(axis=0)), step  # all idle
    if driver is not None:  # the rows travel only when the layout changed
        keys = [(sum(sched), all(decode)) if len(set(decode)) == 1 else None
                for decode, sched, _ in layouts]
        row_copies = sum(k is None or k != prev for k, prev in zip(keys, [0, *keys]))
        assert row_copies == 14  # of 24 steps
        assert ring._calls.failed == ("cuMemcpyHtoDAsync" if driver.fail_after >= 0 else "")
        assert driver.copies == (driver.fail_after if driver.fail_after >= 0
                                 else 2 * len(layouts) + row_copies)


def test_out_of_range_expert_ids_land_in_the_invalid_column_not_in_an_expert() -> None:
    """A negative or >= E id (masked routing, a kernel bug) is counted apart, never as expert 0."""
    ring = RoutingRing(RingLayout(1, E, K, max_tokens=16, ring_steps=4))
    ring.begin_step(0, np.array([DECODE, DECODE], dtype=np.int8))
    ring.capture(0, torch.tensor([[-1, 3], [E, E + 5]]))
    ring.end_step()
    c = ring.counts[0, 0, DECODE]
    assert c[E].item() == 3 and c[3].item() == 1 and int(c.sum()) == 4


def test_session_conservation_phases_bytes_and_histogram() -> None:
    s, pub = _session()
    # step 1: two prefilling requests (5 and 3 tokens); step 2: both decode 1 token
    routing1 = [torch.tensor([[0, 1]] * 8)] * L
    _step(s, [5, 3], [0, 0], [5, 3], routing1)
    routing2 = [torch.tensor([[2, 3], [2, 4]])] * L
    _step(s, [1, 1], [5, 3], [5, 3], routing2)
    s.flush()
    t = pub[-1]["totals"]
    assert t["tokens"].tolist() == [8, 2]
    assert t["steps"].tolist() == [1, 1, 0]  # decode, prefill, mixed
    assert t["assignments"].tolist() == [[16, 4]] * L
    assert t["touched"].tolist() == [[2, 3]] * L  # prefill {0,1}; decode {2,3,4}
    assert t["max_load"].tolist() == [[8, 2]] * L
    assert t["requests"].tolist() == [2, 2]
    assert t["context"].tolist() == [8, 6 + 4]
    # histogram: decode loads {2:2, 3:1, 4:1} per layer -> buckets le=1: 2, le=2: 1
    hist = t["hist_buckets"][1]
    assert hist[0] == 2 * L and hist[1] == L and hist.sum() == 3 * L
    assert t["hist_sum"].tolist() == [16 * L, 4 * L]
    # bytes: routed = distinct experts per step per layer x bytes/expert; step 1: 2, step 2: 3
    hbm = dict(zip(COMPONENTS, t["hbm_bytes"].tolist()))
    assert hbm["routed_experts"] == (2 + 3) * (100 + 200 + 300)
    assert hbm["shared_experts"] == 2 * 7 and hbm["embedding"] == 2 * 17
    assert hbm["kv_cache"] == (8 + 10) * 2
    assert len(HIST_BOUNDS) + 1 == hist.shape[0]


def test_ring_wraps_and_never_overwrites_unread_steps() -> None:
    s, pub = _session(ring_steps=4)
    one = [torch.tensor([[0, 1]])] * L
    for _ in range(6):  # 4 fit, 2 are dropped (the flusher did not run)
        _step(s, [1], [4], [1], one)
    s.flush()
    t = pub[-1]["totals"]
    assert t["steps"][0] == 4 and int(t["dropped_steps"]) == 2
    for _ in range(3):  # wraps around the ring end
        _step(s, [1], [4], [1], one)
    s.flush()
    t = pub[-1]["totals"]
    assert t["steps"][0] == 7 and t["assignments"][0, 1] == 7 * K


def test_a_step_prepared_but_never_finished_leaves_nothing_in_the_next_step() -> None:
    """Free slots are zeroed by the flush, after its copy; a step whose forward counted into its
    slot but never reached `step_finished` is not flushed, and the next step takes the same slot.
    Its counts must not carry over (conservation: only finished steps' tokens are counted)."""
    s, pub = _session(ring_steps=4)
    s.step_started()
    s.step_prepared(np.array([3]), np.array([False]), np.array([0]))
    for layer in range(L):
        s.capture_fn(layer)(torch.tensor([[5, 6]] * 3))  # abandoned: no step_finished
    _step(s, [1], [4], [1], [torch.tensor([[0, 1]])] * L)
    s.flush()
    t = pub[-1]["totals"]
    assert t["tokens"].tolist() == [0, 1]
    assert t["assignments"].tolist() == [[0, K]] * L
    assert not s.ring.counts[:, :4].any()  # the flush zeroed what it copied


def test_fault_disables_counts_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    s, pub = _session(inject_fault_after_steps=2)
    one = [torch.tensor([[0, 1]])] * L
    for _ in range(4):
        _step(s, [1], [4], [1], one)
    s.flush()
    snap = pub[-1]
    assert snap["enabled"] is False
    assert snap["errors"] == {"step_finished": 1}
    assert sum("disabled after a fault" in r.message for r in caplog.records) == 1


def test_fold_block_empty_and_padding() -> None:
    tot = Totals(1, 4)
    counts = np.zeros((1, 2, 3, 5), dtype=np.int32)
    counts[0, 0, PAD, 1] = 6  # 3 padded rows at top-2
    meta = {
        "kind": np.zeros(2, np.int8), "tokens": np.zeros((2, 2), np.int64),
        "requests": np.zeros((2, 2), np.int64), "context": np.zeros((2, 2), np.int64),
        "duration_ns": np.array([10**9, 2 * 10**9]), "comm_ns": np.zeros((2, 2), np.int64),
        "scheduled": np.zeros(2, np.int64),
    }
    fold_block(tot, counts, meta, ByteModel((8,)), top_k=2)
    assert tot.padding_tokens == 3
    assert tot.duration_s[0] == pytest.approx(3.0)
    assert tot.assignments.sum() == 0


def test_selfcheck_is_zero_when_every_layer_counts_and_catches_a_missing_layer() -> None:
    """The self-check compares each layer's count with the scheduler's tokens x top-k."""
    s, _ = _session()
    routing = [torch.randint(0, E, (3, K)) for _ in range(L)]
    _step(s, [1, 2], [10, 0], [5, 5], routing)
    s.flush()
    assert s.totals.selfcheck_mismatch == 0 and s.totals.scheduled_tokens == 3
    _step(s, [1, 2], [11, 2], [5, 5], routing[:-1])  # the last MoE layer never reported
    s.flush()
    assert s.totals.selfcheck_mismatch == 3 * K and s.totals.scheduled_tokens == 6


def test_a_failed_snapshot_write_is_retried_and_recording_goes_on() -> None:
    """The flusher's write fails once: counted with its stage, degraded, nothing lost; the next
    flush writes everything and clears the degraded state."""
    published: list[dict] = []
    fail = [True]

    def publish(snap: dict) -> None:
        if fail[0]:
            fail[0] = False
            raise OSError(28, "No space left on device")
        published.append(snap)

    s, _ = _session()
    s.publish = publish
    _step(s, [2, 1], [0, 5], [2, 3], [torch.tensor([[0, 1], [2, 3], [4, 5]])] * L)
    s.flush()
    assert s.enabled and s.errors == {"snapshot_write": 1} and s.degraded == {"snapshot_write"}
    assert published == []
    s.flush()
    assert s.degraded == set() and s.errors == {"snapshot_write": 1}
    snap = published[-1]
    assert snap["enabled"] and snap["degraded"] == []
    assert snap["totals"]["assignments"].sum() == 3 * K * L  # the step before the failure


@pytest.mark.parametrize("experts, top_k", [(128, 8), (256, 8), (384, 8)])
def test_wide_routers_count_every_id_in_both_phases(experts: int, top_k: int) -> None:
    """127+ experts per layer (Qwen3-235B 128, DeepSeek-V3 256, Kimi-K2 384): a token's ring row
    is phase x (experts + 1), past int8's range. The first step once faulted there
    (`OverflowError: Python integer 257 out of bounds for int8` under NumPy 2), which disabled
    the recorder on every such model."""
    layers = 2
    s = RecorderSession(
        RingLayout(layers, experts, top_k, max_tokens=64, ring_steps=8), ByteModel((1,) * layers),
        labels={"model": "m", "engine": "0", "rank": "0"}, info={}, layer_ids=[0, 1],
        publish=lambda _: None,
    )
    gen = torch.Generator().manual_seed(experts)
    steps = [([7, 1, 1], [0, 30, 40], [7, 5, 5]), ([1, 1, 1], [7, 31, 41], [7, 5, 5])]
    want = np.zeros((layers, 2, experts), dtype=np.int64)
    for sched, computed, prompt in steps:
        n = sum(sched)
        phase = np.repeat(np.array(computed) >= np.array(prompt), sched).astype(int)
        routing = [torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(n)])
                   for _ in range(layers)]
        for li, ids in enumerate(routing):
            for row, ph in zip(ids.tolist(), phase.tolist()):
                np.add.at(want[li, ph], row, 1)
        _step(s, sched, computed, prompt, routing)
    s.flush()
    assert s.enabled and not s.errors, s.errors
    assert (s.totals.expert_tokens == want).all()
    assert s.totals.assignments.tolist() == [[7 * top_k, 5 * top_k]] * layers


def test_raw_layouts_derived_by_the_flusher_equal_the_ones_derived_on_the_step() -> None:
    """StepMeta keeps up to MAX_RAW_REQUESTS requests per step raw and derives the per-phase
    figures at fold time; wider steps are derived on the spot. Both give the same totals and the
    same per-step meta the live window reads, windows and chunks in the KV bytes included."""
    from moe_reuse.plugin.recorder.aggregate import StepMeta

    bm = ByteModel((100, 200, 300), kv_bytes_per_token=3, kv_groups=((2.0, 16, 0), (1.0, 0, 8)))
    rng = np.random.default_rng(5)
    metas: list[list[dict]] = []
    sessions = []
    for width in (64, 1):  # raw, then every step wider than the buffers
        s, _ = _session(ring_steps=8)
        s.bytes_model = bm
        s.meta = StepMeta(8, max_requests=width)
        got: list[dict] = []
        s.listeners.append(lambda stats, meta, sess, got=got: got.append(meta))
        sessions.append(s)
        metas.append(got)
    for _ in range(13):  # wraps the 8-slot ring
        n = int(rng.integers(1, 6))
        sched = rng.integers(1, 5, size=n)
        computed = rng.integers(0, 40, size=n)
        prompt = rng.integers(1, 40, size=n)
        routing = [torch.randint(0, E, (int(sched.sum()), K))] * L
        for s in sessions:
            _step(s, sched.tolist(), computed.tolist(), prompt.tolist(), routing)
            if s._completed - s._read >= 3:
                s.flush()
    for s in sessions:
        s.flush()
    a, b = (s.totals.arrays() for s in sessions)
    a.pop("duration_s"), b.pop("duration_s")  # wall time: the only figure that may differ
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []
    for k in ("tokens", "requests", "context", "kv_bytes", "kind", "scheduled"):
        assert np.array_equal(np.concatenate([m[k] for m in metas[0]]),
                              np.concatenate([m[k] for m in metas[1]])), k
    assert a["tokens"].sum() > 0 and sessions[0].enabled and not sessions[0].errors


@pytest.mark.parametrize("ablate", ["protocol", "copy"])
def test_ablated_sessions_keep_stepping_but_fold_and_publish_nothing(ablate: str) -> None:
    """bench_overhead's partial plugins: the step protocol runs on every step and never finds the
    ring full (each slot is consumed), yet nothing is folded or published; a typo is refused."""
    s, published = _session(ring_steps=4, ablate=ablate)
    ids = [torch.tensor([[0, 1], [2, 3]]) for _ in range(L)]
    for i in range(10):  # 2.5 rings: without consuming, steps past the 4th would be dropped
        _step(s, [1, 1], [5 + i, 5 + i], [3, 3], ids)
        if ablate == "copy" and i % 2:
            s.flush()
    s.flush()
    assert s._read == s._completed == 10
    assert s.totals.dropped_steps == 0
    assert int(s.totals.arrays()["tokens"].sum()) == 0  # nothing folded
    assert published == [] and s.enabled
    with pytest.raises(ValueError, match="ablate"):
        _session(ablate="captur")


@pytest.mark.parametrize("experts, top_k, most", [(8, 2, 40), (4, 2, 20000), (256, 8, 300)])
def test_fold_equals_a_per_entry_fold(experts: int, top_k: int, most: int) -> None:
    """The vectorised fold against the definition, entry by entry: per layer and phase the
    assignments, touched experts, largest load and the expert-local batch histogram (counts past
    the last bound, 4096, in the overflow bucket); out-of-range ids apart; the padding sink out."""
    rng = np.random.default_rng(experts)
    layers, n = 3, 6
    counts = rng.integers(0, most, size=(layers, n, 3, experts + 1)).astype(np.int32)
    counts[rng.random(counts.shape) < 0.4] = 0  # untouched experts
    one = np.ones((n, 2), np.int64)
    meta = {"kind": np.zeros(n, np.int8), "duration_ns": np.ones(n), "tokens": one,
            "requests": one, "context": one, "comm_ns": np.zeros((n, 2), np.int64),
            "scheduled": np.ones(n, np.int64), "kv_bytes": np.zeros(n)}
    t = Totals(layers, experts)
    stats = fold_block(t, counts, meta, ByteModel((1.0,) * layers, 0, 0, 0, 0), top_k)
    hist = np.zeros((2, len(HIST_BOUNDS) + 1), np.int64)
    for li in range(layers):
        for p in (PREFILL, DECODE):
            block = counts[li, :, p, :experts]
            assert t.assignments[li, p] == block.sum()
            assert t.touched[li, p] == (block > 0).sum()
            assert t.max_load[li, p] == block.max(axis=1).sum()
            for v in block[block > 0].tolist():
                hist[p, min(sum(v > b for b in HIST_BOUNDS), len(HIST_BOUNDS))] += 1
    assert np.array_equal(t.hist_buckets, hist)
    assert list(t.hist_sum) == [int(counts[:, :, p, :experts].sum()) for p in (PREFILL, DECODE)]
    assert list(t.invalid_ids) == [int(counts[:, :, p, experts].sum()) for p in (PREFILL, DECODE)]
    union = (counts[:, :, PREFILL, :experts] > 0) | (counts[:, :, DECODE, :experts] > 0)
    assert np.array_equal(stats.distinct_all, union.sum(axis=2))
    assert stats.expert_decode.dtype == np.int64
