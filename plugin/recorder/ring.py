"""Per-step expert counters on the device: the only code that runs inside the model forward.

Why a ring of per-step slots rather than one cumulative counter: the figures users need (distinct
experts touched per step, the largest expert load, the expert-local batch histogram) are functions
of one step's counts, and a counter read while a step is writing to it tears. Each step writes only
its own slot; the flusher copies finished slots off the device in batches, never the slot in use.

Layout: `counts[layer_slot, ring_slot, phase, expert]` (int32), with one column more than there
are experts: column E takes expert ids out of range (ids >= E, and the negative "no expert" ids
some kernels emit), so a bad id can never land in another slot, phase or layer, and is counted.
Phases are prefill, decode and a sink that absorbs padded rows. Ring slot `ring_steps` is the idle
slot: outside a real step (the compile warm-up's dummy batch, CUDA-graph capture, data-parallel dummy steps) every row points at
its sink, so those tokens are never counted.

The hot path (`capture`) is a few tensor ops per MoE layer, on preallocated buffers: a bounds
check that sends out-of-range ids to column E, an add that forms flat indices from `tok_base` and
the top-k ids, and an `index_add_` into that layer's counters. No host sync, no Python per token,
nothing that breaks torch.compile or CUDA-graph capture.

`tok_base` (host-written before the forward): per token its phase's offset within a slot,
phase*(E+1), which does not depend on the slot; then two elements more, the step's ring slot (for
the device clock's stamps) and that slot's flat base, ring_slot*3*(E+1). Moving from one step to
the next, or back to the idle slot after a step, is one element's write; the token rows are
rewritten only when the batch's layout changes. Each numpy call between two forwards runs with
caches the forward has just evicted (5 to 25 us each on this VM against about 1 us warm,
benchmarks/bench_recorder.py), so the protocol is counted in calls, not in bytes. A step of one
phase takes its token count from the scheduler where the seam passes it (the self-check compares
that with the layout's sum, off the step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import count_kernel, device_clock, step_calls

PREFILL, DECODE, PAD = 0, 1, 2
NUM_PHASES = 3
RING_BYTES_BUDGET = 16 * 1024 * 1024


def elements(a: Any) -> memoryview:
    """A flat array's memoryview: item writes and searches without numpy's machinery, which
    right after a forward costs about twice as much a call (benchmarks/bench_recorder.py)."""
    return memoryview(a)


@dataclass(frozen=True)
class RingLayout:
    """Shapes fixed at start-up; memory never grows with uptime."""

    num_layers: int
    num_experts: int
    top_k: int
    max_tokens: int
    ring_steps: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "max_tokens", "ring_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"RingLayout.{name} must be >= 1, got {getattr(self, name)}")

    @staticmethod
    def auto_ring_steps(num_layers: int, num_experts: int, requested: int = 0) -> int:
        """Ring length: as many steps as fit RING_BYTES_BUDGET, between 8 and 512."""
        if requested > 0:
            return requested
        per_step = num_layers * NUM_PHASES * (num_experts + 1) * 4
        return int(max(8, min(512, RING_BYTES_BUDGET // max(per_step, 1))))

    @property
    def idle_slot(self) -> int:
        return self.ring_steps

    @property
    def columns(self) -> int:
        """Experts plus the out-of-range column."""
        return self.num_experts + 1

    @property
    def slot_stride(self) -> int:
        return NUM_PHASES * self.columns


class RoutingRing:
    """Device counters plus the host-side protocol that fills `tok_base` around each step."""

    def __init__(self, layout: RingLayout, device: torch.device | str = "cpu",
                 stage: bool | None = None, driver: Any = None) -> None:
        """`stage`: write the token map through host staging buffers and copies (the default
        off the CPU); True on the CPU runs that path where tests can check it. `driver`: a
        stand-in for libcuda's calls (`step_calls.DriverCalls`; tests)."""
        self.layout = layout
        self.device = torch.device(device)
        lay = layout
        self.counts = torch.zeros(
            (lay.num_layers, lay.ring_steps + 1, NUM_PHASES, lay.columns),
            dtype=torch.int32,
            device=self.device,
        )
        # One contiguous flat view per layer: index_add_ needs a 1-D destination.
        self._layer_flat = [self.counts[i].view(-1) for i in range(lay.num_layers)]
        # A slot is zero when its step begins: the flusher zeroes the slots it has just copied
        # (`read_range`), before the session frees them, so no step pays for it. On CUDA that is
        # a kernel on the flusher's side stream after its copy, which the slot's next
        # begin_step waits for (the copy's event); it was a kernel on the step's stream. On CPU
        # the "device" is the host, and zeroing (188 KB, ~14 us, for a 61 x 256 model) would
        # sit on every step's critical path. On CPU through numpy: torch's zero_ of a strided
        # 61 x 3 x 257 view is an intra-op parallel region, which waits milliseconds for a pool
        # thread on a busy host. A step prepared but never finished leaves its slot dirty for
        # the next step, which clears it first (`clear_slot`, a path that normal steps never take).
        self._counts_np = self.counts.numpy() if self.counts.device.type == "cpu" else None
        self._ones = torch.ones(lay.max_tokens * lay.top_k, dtype=torch.int32, device=self.device)
        pad = PAD * lay.columns
        # two elements more than tokens: tok_base[SLOT] holds the step's ring slot on the device
        # (the idle slot between steps), where device_clock's stamps find it, and tok_base[BASE]
        # that slot's flat base, which the count adds to every row
        self.SLOT, self.BASE = lay.max_tokens, lay.max_tokens + 1
        self.tok_base = torch.full((lay.max_tokens + 2,), pad, dtype=torch.int64,
                                   device=self.device)
        # a plain bool: every attribute of a torch object a step reads costs 2 us after a forward
        self.on_cuda = pin = self.device.type == "cuda"
        # the idle slot's two elements (SLOT, BASE), what end_step writes or copies back
        self._idle_pair = (lay.idle_slot, lay.idle_slot * lay.slot_stride)
        self.tok_base[self.SLOT:] = torch.tensor(self._idle_pair)
        self._idle_host = torch.tensor(self._idle_pair, dtype=torch.int64, pin_memory=pin)
        self._base = self.tok_base[self.BASE:]  # a 1-element view: the count adds it
        self._rows_key: tuple[int, int] | None = None  # rows[:_rows_n] all of this (n, phase)
        self._rows_n = 0  # rows from here on hold the pad offset (host map and device map)
        # On CPU the host writes tok_base itself: the forward reads it after begin_step, on the
        # same thread, so a staging buffer and a copy would buy nothing. Elsewhere staging
        # buffers, round-robin so a non-blocking H2D copy never reads a host buffer that is being
        # refilled (an event guards each one); a step copies the rows it rewrote, if any, and
        # the two slot elements (16 bytes for a decode step whose layout the device holds).
        direct = self.device.type == "cpu" if stage is None else not stage
        self._tok_np = self.tok_base.numpy() if direct else None
        self._tok_mv = elements(self._tok_np) if direct else None  # its two element writes
        self._stage = [
            torch.empty((lay.max_tokens + 2,), dtype=torch.int64, pin_memory=pin)
            for _ in range(4 if self._tok_np is None else 0)
        ]
        self._stage_np = [t.numpy() for t in self._stage]
        self._stage_mv = [elements(a) for a in self._stage_np]
        # the step's copies and events: torch's calls, or the driver API's (opt-in, step_calls)
        self._calls = step_calls.make(self.device, self.tok_base, self._stage, self._idle_host,
                                      self.SLOT, driver)
        self._waited: tuple[Any, Any] = (None, None)  # the flush event the step stream waited on
        self._stage_events: list[torch.cuda.Event | None] = [None] * len(self._stage)
        self._stage_next = 0
        self._copy_events: dict[int, torch.cuda.Event] = {}
        # Device step time (CUDA): a timing-event pair per ring slot, made once here and recorded
        # on the stream by begin_step and mark_step_done, which run between forwards (outside any
        # captured graph). Host clocks would time the launch, not the step, on an async GPU
        # stream; the flusher reads the pair once the slot's copy is done (never the step thread).
        self._timing: list[tuple[Any, Any]] = (
            [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(lay.ring_steps)] if self.device.type == "cuda" else [])
        self._timing_slot = -1
        self.count_impl = "triton" if count_kernel.available(self.device) else "torch"
        # Collective time on the device (opt-in, CUDA): device_clock adds -t / +t around each
        # collective into comm_acc[slot, op]; zeroed at begin_step, copied with the counts.
        self.comm_ops = 2  # aggregate.COMM_OPS (all_reduce, all_to_all); aggregate imports this
        self.comm_acc = torch.zeros((lay.ring_steps + 1, self.comm_ops), dtype=torch.int64,
                                    device=self.device)
        self._comm_host = torch.zeros((lay.ring_steps, self.comm_ops), dtype=torch.int64,
                                      pin_memory=pin)
        self.comm_on_device = False  # enable_device_comm()

    # ---- hot path: inside the forward -------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the ring's tensors (device counters, token map, host staging)."""
        tensors = [self.counts, self._ones, self.tok_base, self._idle_host, *self._stage,
                   self.comm_acc, self._comm_host]
        return sum(t.numel() * t.element_size() for t in tensors)

    def capture(self, layer_slot: int, topk_ids: torch.Tensor) -> None:
        """Count one MoE layer's routing. Tensor ops only (traced by Dynamo, captured by graphs).

        On CUDA one Triton kernel (`count_kernel`); elsewhere three torch ops: ids out of range
        go to column E (clamp to [-1, E], then -1 mod E+1 = E), the token's row is added, and
        an `index_add_` counts."""
        E = self.layout.num_experts
        if self.count_impl == "triton" and not torch.compiler.is_compiling():
            # traced by Dynamo (a model-level routing source), the torch ops below are fused by
            # Inductor instead; inside vLLM's opaque MoE op this runs eagerly and launches once
            count_kernel.count_pairs(self._layer_flat[layer_slot], self.tok_base, topk_ids, E,
                                     self.BASE)
            return
        ids = topk_ids.clamp(-1, E).remainder(E + 1) + self._base
        idx = self.tok_base[: topk_ids.shape[0]].unsqueeze(1) + ids
        flat = idx.reshape(-1)
        self._layer_flat[layer_slot].index_add_(0, flat, self._ones[: flat.shape[0]])

    # ---- host side, between steps -----------------------------------------------------------
    def begin_step(self, ring_slot: int, phases: np.ndarray) -> None:
        """Point this step's rows at `ring_slot` (a free, zeroed slot). `phases`: one per token."""
        # int64 scalar: a Python int above 127 times an int8 array raises under NumPy 2 (NEP 50),
        # which with 127+ experts per layer (DeepSeek-V3, Qwen3-235B) faulted every first step
        rows = np.asarray(phases).astype(np.int64) * np.int64(self.layout.columns)
        self._begin(ring_slot, rows)

    def _begin(self, ring_slot: int, rows: np.ndarray | None,
               uniform: tuple[int, int] | None = None) -> None:
        """`rows`: each token's phase offset; or None and `uniform` = (tokens, phase) for a step
        whose tokens are all of one phase. Padded rows (past the step's tokens) go to the slot's
        pad sink."""
        lay = self.layout
        fill: np.ndarray | int
        if rows is None:
            assert uniform is not None, "_begin needs rows or uniform"
            n, fill = uniform[0], uniform[1] * lay.columns
        else:
            n, fill = int(rows.shape[0]), rows
        if n > lay.max_tokens:
            raise ValueError(f"step has {n} tokens, ring was sized for {lay.max_tokens}")
        # The map's rows [0, _rows_n) hold the last layout and the rest the pad offset, on the
        # device as on the host: a layout it holds already needs only the two slot elements.
        changed = rows is not None or uniform != self._rows_key
        upto = max(n, self._rows_n)  # rows to write: the step's, and the last step's past n
        if self._tok_np is not None:  # CPU: written in place (see __init__)
            host, elems = self._tok_np, self._tok_mv
            i = -1
        else:
            i = self._stage_next
            self._stage_next = (i + 1) % len(self._stage)
            event = self._stage_events[i]
            if event is not None:
                event.synchronize()  # only blocks if the device is 4 steps behind the host
            host = self._stage_np[i]  # stale past what is written here: only that is copied
            elems = self._stage_mv[i]
        if changed:
            host[:n] = fill
            if upto > n:
                host[n:upto] = PAD * lay.columns  # rows past n: the pad sink
            self._rows_n = n
            self._rows_key = uniform if rows is None else None
        assert elems is not None
        elems[self.BASE] = ring_slot * lay.slot_stride
        elems[self.SLOT] = ring_slot  # the slot, for the device clock's stamps
        calls, stream = self._calls, None
        if self.on_cuda:
            stream = self._step_stream = calls.stream()
            copy_done = self._copy_events.pop(ring_slot, None)
            # the flusher's D2H copy of this slot must finish first: one event covers a batch
            # of slots, so a stream that has waited on it once is past it for the rest
            if copy_done is not None and (copy_done, stream) != self._waited:
                calls.wait(stream, copy_done)
                self._waited = (copy_done, stream)
        if i >= 0:  # 16 bytes for a layout the device holds (most decode steps)
            if changed:
                calls.copy_rows(i, upto, stream)
            calls.copy_slot(i, stream)
        if self._timing:
            # The slot's begin event, after the copy, also guards staging buffer i (a record
            # of it S steps later marks a later point: waiting on that is still safe). One
            # record per step, on events made once: the host cost of the protocol on a GPU
            # worker is mostly these CUDA calls (benchmarks/bench_step_protocol.py --device cuda).
            begin = self._timing[ring_slot][0]
            calls.record(begin, stream)
            self._timing_slot = ring_slot
            if stream is not None:
                self._stage_events[i] = begin

    def begin_requests(self, ring_slot: int, is_decode: np.ndarray,
                       num_scheduled: np.ndarray, num_tokens: int = -1) -> None:
        """`begin_step` from the per-request layout. A step of one phase (every decode step)
        is n rows of one offset, which the map usually holds already: a search of the flags and
        two element writes. A mixed step repeats each request's offset over its tokens.
        `num_tokens`: the step's tokens where the caller knows them (-1: their sum)."""
        lay = self.layout
        if not (isinstance(is_decode, np.ndarray) and is_decode.dtype == np.bool_):
            is_decode = np.asarray(is_decode, dtype=bool)
        # the flags as bytes (0 or 1): searched in C without numpy's reduction machinery, which
        # right after a forward costs about 8 us against 1-2 for this (bench_recorder.py prints both)
        flags = elements(is_decode).tobytes()
        dec = 0 not in flags
        if dec or flags.count(0) == len(flags):
            n = num_tokens if num_tokens >= 0 else int(np.asarray(num_scheduled).sum())
            self._begin(ring_slot, None, (n, DECODE if dec else PREFILL))
            return
        offs = np.where(is_decode, DECODE * lay.columns, PREFILL * lay.columns)
        self._begin(ring_slot, np.repeat(offs, num_scheduled))

    def end_step(self) -> None:
        """Point every row back at the idle slot, so dummy forwards between steps count nothing:
        the two slot elements (the rows hold offsets within whichever slot is set)."""
        if self._tok_mv is not None:
            self._tok_mv[self.SLOT], self._tok_mv[self.BASE] = self._idle_pair
        else:
            self._calls.copy_idle()

    # ---- collective time on the device (CUDA, opt-in) -----------------------------------------
    def enable_device_comm(self) -> bool:
        """Time collectives with the GPU's clock (`device_clock`); False where it cannot."""
        self.comm_on_device = device_clock.available(self.device)
        return self.comm_on_device

    def comm_stamp(self, op: int, sign: int) -> None:
        """Inside the forward, around collective `op`: sign -1 before it, +1 after it."""
        device_clock.stamp(self.comm_acc, self.tok_base, self.SLOT, op, sign)

    def device_comm_ns(self, start: int, stop: int) -> np.ndarray | None:
        """Collective ns of ring slots [start, stop) as the flush copied them (after its event);
        None when collectives are not timed on the device."""
        if not self.comm_on_device:
            return None
        return device_clock.paired(self._comm_host[start:stop].numpy())

    def note_copied(self, ring_slots: list[int], event: torch.cuda.Event) -> None:
        for s in ring_slots:
            self._copy_events[s] = event

    def read_range(self, start: int, stop: int, out: torch.Tensor) -> torch.cuda.Event | None:
        """Copy ring slots [start, stop) into host tensor `out` [L, stop-start, 3, E+1].

        Called by the flusher thread. On CUDA the copy runs on a side stream, ordered after the
        last finished step's event, and the returned event marks its completion; the step thread
        never waits for it (the slot's next begin_step orders its step after it on the device).
        Either way the copied slots are zeroed here (after the copy), off the step's critical path.
        """
        src = self.counts[:, start:stop]
        if self.device.type != "cuda":
            out.copy_(src)
            if self.comm_on_device:
                self._comm_host[start:stop].copy_(self.comm_acc[start:stop])
            self._zero(start, stop)
            return None
        stream = self._side_stream()
        if self._last_step_event is not None:
            stream.wait_event(self._last_step_event)
        else:  # no step finished yet: after everything queued so far
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if out.is_contiguous():
                out.copy_(src, non_blocking=True)
            else:
                # One copy per layer: `out[l]` and `counts[l, start:stop]` are each contiguous.
                # A strided pinned destination makes torch stage through a pageable buffer, a
                # copy that blocks its caller until the stream reaches it (measured on an H200:
                # the flusher held for the whole queued step, and the engine's next steps behind
                # it; benchmarks/gpu_recorder_check.py, "read_range is non-blocking").
                for layer in range(src.shape[0]):
                    out[layer].copy_(src[layer], non_blocking=True)
            if self.comm_on_device:
                self._comm_host[start:stop].copy_(self.comm_acc[start:stop], non_blocking=True)
            self._zero(start, stop)  # after the copies, on the same stream; before the event
            ev = torch.cuda.Event()
            ev.record(stream)
        return ev

    def _zero(self, start: int, stop: int) -> None:
        """Free slots are zero (see __init__): the flusher's pass over what it has copied."""
        if self._counts_np is not None:
            self._counts_np[:, start:stop] = 0
        else:
            self.counts[:, start:stop].zero_()
        if self.comm_on_device:
            self.comm_acc[start:stop].zero_()

    def clear_slot(self, ring_slot: int) -> None:
        """Zero a slot the last step left dirty (prepared, never finished) before it is reused;
        on CUDA a kernel on the step's stream, ahead of the step's forward."""
        self._zero(ring_slot, ring_slot + 1)

    _side: torch.cuda.Stream | None = None
    _last_step_event: torch.cuda.Event | None = None
    _step_stream: Any = None  # the stream of the step in progress (CUDA), taken once per step

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def mark_step_done(self) -> None:
        """Record an event after the step's work so the flusher's copy can be ordered after it:
        the slot's end-timing event (made once), which the flusher also reads the step's device
        time from."""
        if not self._timing:
            return  # no events off CUDA (the flusher's copy is synchronous there)
        slot, self._timing_slot = self._timing_slot, -1
        stream = self._step_stream if slot >= 0 else self._stream()
        if slot >= 0:
            end = self._timing[slot][1]
            self._calls.record(end, stream)
            if stream is not None:
                self._last_step_event = end
        elif stream is not None:  # no step begun (a probe of the flush): an event of its own
            ev = torch.cuda.Event()
            ev.record(stream)
            self._last_step_event = ev

    def _stream(self) -> Any:
        """The ring's device's current stream (events go there even if another device is
        current), None off CUDA."""
        return torch.cuda.current_stream(self.device) if self.on_cuda else None

    def device_durations_ns(self, start: int, stop: int) -> np.ndarray | None:
        """Device time of ring slots [start, stop) from their event pairs: begin_step to
        mark_step_done as the stream ran them, in ns; -1 where a pair is not complete. None when
        the ring does not time on the device (CPU). Flusher thread, after the slots' copy."""
        if not self._timing:
            return None
        out = np.full(stop - start, -1, dtype=np.int64)
        for j, slot in enumerate(range(start, stop)):
            a, b = self._timing[slot]
            try:
                if b.query():
                    out[j] = int(a.elapsed_time(b) * 1e6)
            except RuntimeError:  # a pair never recorded (a dropped or aborted step)
                continue
        return out
