"""The plugin's cost on vLLM's own decode loop, without HTTP: offline engines side by side.

`bench_overhead.py` measures what users see, through the API server, with a client on the same
two cores; there an A/A pair of identical servers reads anywhere from 0.9 to 1.3, because the
client, the API server and request arrival decide how many sequences each step carries. This
bench takes those out. Each arm is one `vllm.LLM` (the offline engine, its EngineCore and worker
processes as `vllm serve` runs them) in a child process of its own, started once and then kept
paused (SIGSTOP of its process group) while the others run. A wave submits `--batch` requests at
once with the same prompt length and `--tokens` output tokens (ignore_eos), so every wave is one
prefill step then `--tokens - 1` decode steps of exactly `--batch` sequences, in every arm. The
children are woken in turn, one wave each (A B C ..., then reversed), and the figures are each
arm's wall time and CPU time (every process of the engine, from /proc) per wave against the
engines without the plugin in the same round (baseline and `aa`): the mean of the log ratios,
with its 95% confidence interval, since on this VM one wave's time varies by about 13% (sd)
from the next and only many rounds resolve a cost of 1 or 2%. The `aa` arm (a second engine
without the plugin) read against baseline alone is the method's floor: it must read 0 within
its interval.

Arms, as in `bench_overhead.py --ablation` (`MOE_REUSE_ABLATE`, see worker_runtime): `aa`,
`capture` (routing hooks only), `protocol` (+ the host step protocol), `copy` (+ the flusher's
device-to-host copy), `whole` (the plugin as users run it: + the reader's folding, window and
snapshots, which run in the API process, here the offline `LLM`'s own process).

`paused` and `held` are not engines of their own but modes of the `whole` engine, set through
`collective_rpc` between waves, whose waves alternate with `whole`'s in that one engine: no
engine-to-engine offset at all, the only figures on this VM that resolve a cost below the 3% by
which two identical engines can differ. `paused`: the session records nothing (no step protocol,
no fold; the compiled count ops still run, into the idle slot; the status is still published
once a second). `held`: the session records, but its flusher is held off until the wave ends
(then it folds, outside the wave's time), so nothing reaches the reader in the API process
during the wave either. `unread`: the session records and its flusher runs, but the reader in
the API process (here the offline `LLM`'s own process, as `frontend.on_engine_config` starts it)
skips its polls until the wave ends (then it folds, outside the wave's time). So `held` against
`paused` is the step protocol, `unread` against `held` the worker's flusher (copy, step records,
raw-ring append, status file), `whole` against `unread` the reader's work in the API process
(fold, live window, snapshots; it shares this VM's two cores with the engine), and `paused`
against the engines without the plugin is the compiled count ops.
`python benchmarks/bench_recorder.py` times the step protocol between forwards of a compiled toy
model, torch only.

A wave should last at least the flush interval (1 s): the worker flushes and the reader folds
about once a second while the engine runs, and a paused engine's timers run on, so each wave
carries one flush and one fold whatever its length. Waves of 448 tokens (the default, about 1 s
on the tiny model) carry them at serving's rate; waves of 64 (0.14 s) at seven times that rate,
which read the fold at +1.6% where 448-token waves read +1.1% (results/bench_overhead_engine.txt).

    python benchmarks/bench_overhead_engine.py [--model qwen3-moe] [--arms aa,whole,paused,held]
        [--batch 16] [--tokens 448] [--waves 100] [--json out.json]
    (--arms aa,whole,paused,held,unread splits the host side three ways)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ARMS = ("aa", "capture", "protocol", "copy", "whole", "paused", "held", "unread")
VIRTUAL = ("paused", "held", "unread")  # modes of the whole arm's engine, not engines of their own
TAG = "@@wave "
TICK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 0.1  # after SIGCONT, before a wave


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every process in a process group (Linux /proc): the engine's
    own work, which a co-tenant's steal time does not inflate as it does wall time."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def _set_recording(worker: Any, mode: str) -> bool:
    """Run in the worker (collective_rpc), between waves: `paused` (the session records nothing),
    `held` (it records, but the flusher is held off until `resume`, which flushes outside the
    wave) or `resume`."""
    from moe_reuse.plugin import worker_runtime

    session = worker_runtime._SESSION
    if session is None:
        return False
    if mode == "held":
        session._lock.acquire()  # the flusher's flush() waits on it for the whole wave
    elif mode == "paused":
        with session._lock:  # never while the flusher is folding
            session.enabled = False
    else:
        if session._lock.locked() and session.enabled:
            session._lock.release()
        session.enabled = True
        session.flush()
    return True


class _ReaderHold:
    """`unread`, in the child: the reader thread of this process skips its polls while set; on
    release the backlog is folded here, outside the wave. A bench-only wrapper of
    `ReaderService.poll` (the plugin has no pause), serialised so the two never fold at once."""

    def __init__(self) -> None:
        from moe_reuse.plugin.reader.service import ReaderService

        self.held, self.lock = False, threading.Lock()
        self.services: set[Any] = set()
        poll = ReaderService.poll

        def held_poll(svc: Any) -> int:
            with self.lock:
                self.services.add(svc)
                return 0 if self.held else poll(svc)

        self.poll = poll
        ReaderService.poll = held_poll  # type: ignore[method-assign]

    def hold(self) -> None:
        with self.lock:
            self.held = True

    def release(self) -> None:
        with self.lock:
            self.held = False
            for svc in self.services:
                self.poll(svc)


def child(args: argparse.Namespace) -> int:
    """One engine: build it, warm it, then run a wave per seed read on stdin (or pause, resume)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of _set_recording
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if args.arm in ("capture", "protocol", "copy"):
        os.environ["MOE_REUSE_ABLATE"] = args.arm
    from vllm import LLM, SamplingParams

    from moe_reuse.plugin.harness.load import random_prompts

    cfg: dict[str, Any] = {} if args.arm in ("baseline", "aa") else {"moe_reuse": {}}
    reader = _ReaderHold() if args.arm == "whole" else None
    llm = LLM(model=args.model_dir, max_model_len=1024, max_num_seqs=args.batch,
              enforce_eager=args.eager, additional_config=cfg, seed=0)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]

    def wave(seed: int) -> tuple[float, float, int]:
        prompts = [{"prompt_token_ids": p} for p in random_prompts(args.batch, 16, vocab, seed)]
        c0, t0 = time.process_time(), time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)  # type: ignore[arg-type]
        dt = time.perf_counter() - t0
        return dt, time.process_time() - c0, sum(len(o.outputs[0].token_ids) for o in outs)

    wave(0)  # the first waves pay one-off costs (kernel primitives per batch shape)
    wave(1)
    print(TAG + "ready", flush=True)
    for line in sys.stdin:
        if reader is not None and (line.strip() == "unread" or
                                   (line.strip() == "resume" and reader.held)):
            if line.strip() == "unread":
                reader.hold()
            else:
                reader.release()
            print(TAG + "{}", flush=True)
            continue
        if line.strip() in VIRTUAL or line.strip() == "resume":  # outside the wave's time
            if not all(llm.collective_rpc(_set_recording, args=(line.strip(),))):
                raise SystemExit("paused: this engine has no plugin session to pause")
            print(TAG + "{}", flush=True)
            continue
        dt, cpu, tokens = wave(int(line))
        print(TAG + json.dumps({"seconds": dt, "front_cpu_seconds": cpu, "tokens": tokens}),
              flush=True)
    return 0


class Engine:
    """A child engine process, paused between its waves."""

    def __init__(self, arm: str, args: argparse.Namespace, model_dir: Path, log: Path) -> None:
        cmd = [sys.executable, __file__, "--child", "--arm", arm, "--model-dir", str(model_dir),
               "--batch", str(args.batch), "--tokens", str(args.tokens)]
        if args.eager:
            cmd.append("--eager")
        self.arm = arm
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)

    def _read(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                if line.startswith(TAG):
                    return line[len(TAG):].strip()
                self.log.write(line)
            elif self.proc.poll() is not None:
                break
        raise SystemExit(f"arm {self.arm}: no answer (see {self.log.name})")

    def ready(self) -> None:
        self._read(600)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def wave(self, seed: int, mode: str = "") -> dict[str, Any]:
        os.killpg(self.proc.pid, signal.SIGCONT)
        time.sleep(SETTLE_S)
        if mode:
            self._say(mode)
        c0 = group_cpu_seconds(self.proc.pid)
        out: dict[str, Any] = self._say(str(seed))
        out["cpu_seconds"] = group_cpu_seconds(self.proc.pid) - c0
        if mode:
            self._say("resume")
        self.pause()
        return out

    def _say(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._read(120))
        return answer

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", default="baseline", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="qwen3-moe", help="bundled tiny model (big-moe: realistic)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--batch", type=int, default=16, help="sequences in every decode step")
    ap.add_argument("--tokens", type=int, default=448,
                    help="output tokens per request (a wave of about a flush interval)")
    ap.add_argument("--waves", type=int, default=100, help="waves per arm")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--report", help="print the report of a saved run's waves.json again")
    args = ap.parse_args()
    if args.child:
        return child(args)
    arms = args.arms.split(",")
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        return report(args, [a for a in arms if a in saved["seconds"]], saved["seconds"], saved["cpu"])
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"--arms: {bad} not among {', '.join(ARMS)}")
    if any(a in VIRTUAL for a in arms) and "whole" not in arms:
        raise SystemExit("--arms: paused, held and unread run in the whole arm's engine; "
                         "add whole")
    from moe_reuse.plugin.harness.tiny_models import build_model

    model_dir = build_model(args.model)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "moe-reuse-bench-engine"
    logs.mkdir(exist_ok=True)
    engines: dict[str, Engine] = {}
    try:
        for arm in ["baseline", *arms]:  # one at a time: start-up is the heaviest phase
            if arm in VIRTUAL:
                continue
            print(f"starting {arm} ...", flush=True)
            engines[arm] = Engine(arm, args, model_dir, logs / f"{arm}.log")
            engines[arm].ready()
        for engine in engines.values():  # none is paused while another starts: an engine
            engine.pause()  # stopped through a cold compile came back to an executor timeout
        names = ["baseline", *arms]
        seconds: dict[str, list[float]] = {a: [] for a in names}
        cpu: dict[str, list[float]] = {a: [] for a in names}
        for i in range(args.waves):
            order = names if i % 2 == 0 else list(reversed(names))
            for arm in order:
                engine = engines["whole" if arm in VIRTUAL else arm]
                r = engine.wave(100 + i, mode=arm if arm in VIRTUAL else "")
                if r["tokens"] != args.batch * args.tokens:
                    raise SystemExit(f"arm {arm}: {r['tokens']} tokens, not {args.batch * args.tokens}")
                seconds[arm].append(r["seconds"])
                cpu[arm].append(r["cpu_seconds"])
            print(f"wave {i:2d}: " + " ".join(f"{a} {seconds[a][-1] * 1e3:6.1f}/{cpu[a][-1] * 1e3:6.0f}"
                                              for a in names) + " ms wall/CPU", flush=True)
    finally:
        for e in engines.values():
            e.stop()
    (logs / "waves.json").write_text(json.dumps({"seconds": seconds, "cpu": cpu}))
    return report(args, arms, seconds, cpu)


def report(args: argparse.Namespace, arms: list[str], seconds: dict[str, list[float]],
           cpu: dict[str, list[float]]) -> int:
    steps = args.tokens  # one prefill step and tokens - 1 decode steps, `batch` sequences each
    print(f"\nmodel {args.model}, {'eager' if args.eager else 'compiled'}, V1 runner, batch "
          f"{args.batch}, {args.tokens} tokens, {args.waves} waves per arm; baseline "
          f"{statistics.median(seconds['baseline']) / steps * 1e3:.3f} ms a step, "
          f"{statistics.median(cpu['baseline']) / steps * 1e3:.3f} ms CPU a step")
    out: dict[str, Any] = {"model": args.model, "eager": args.eager, "batch": args.batch,
                           "tokens": args.tokens, "waves": args.waves, "arms": {},
                           "baseline_step_seconds": statistics.median(seconds["baseline"]) / steps,
                           "baseline_cpu_step_seconds": statistics.median(cpu["baseline"]) / steps,
                           "waves_seconds": seconds, "waves_cpu_seconds": cpu}
    print(f"{'arm':9s} {'ms/step':>8s} | {'wall cost vs no plugin, 95% CI':>32s} {'vs baseline':>12s} | "
          f"{'CPU cost vs no plugin, 95% CI':>31s}")
    for arm in arms:
        row: dict[str, Any] = {"step_seconds": statistics.median(seconds[arm]) / steps}
        text = f"{arm:9s} {row['step_seconds'] * 1e3:8.3f} |"
        for kind, xs in (("wall", seconds), ("cpu", cpu)):
            # the reference: the engines without the plugin, baseline and (for the others) aa,
            # their geometric mean per round; aa's own figure is against baseline alone: the
            # method's floor, which must read 0 within its interval
            refs = ["baseline"] if arm == "aa" or "aa" not in xs else ["baseline", "aa"]
            logs = [math.log(xs[arm][k]) - statistics.mean(math.log(xs[r][k]) for r in refs)
                    for k in range(len(xs[arm]))]
            mean, half = statistics.mean(logs), 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
            vs_base = statistics.mean(math.log(a / b) for a, b in zip(xs[arm], xs["baseline"]))
            row[kind] = {"cost_percent": 100 * math.expm1(mean),
                         "ci95_percent": [100 * math.expm1(mean - half), 100 * math.expm1(mean + half)],
                         "reference": refs, "cost_vs_baseline_percent": 100 * math.expm1(vs_base),
                         "sd_log_ratio": statistics.stdev(logs)}
            lo, hi = row[kind]["ci95_percent"]
            text += f" {100 * math.expm1(mean):+7.2f}% [{lo:+6.2f}%, {hi:+6.2f}%]"
            text += f" {100 * math.expm1(vs_base):+11.2f}% |" if kind == "wall" else ""
        out["arms"][arm] = row
        print(text)
    # in the whole arm's engine, wave by wave (no engine offset): whole against paused is the
    # host side; held against paused the step protocol alone; whole against held the flusher
    # and the reader, which unread splits (the worker's flusher, then the API process's reader)
    pairs = [(a, b, what) for a, b, what in (
        ("whole", "paused", "the host side"), ("held", "paused", "the step protocol"),
        ("whole", "held", "the flusher and the reader"),
        ("unread", "held", "the worker's flusher"),
        ("whole", "unread", "the reader in the API process")) if a in arms and b in arms]
    out["same_engine"] = {}
    for a, b, what in pairs:
        text = f"{a} against {b}, the same engine ({what}):"
        row = out["same_engine"][f"{a}/{b}"] = {}
        for kind, xs in (("wall", seconds), ("cpu", cpu)):
            logs = [math.log(x / y) for x, y in zip(xs[a], xs[b])]
            mean, half = statistics.mean(logs), 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
            ci = [100 * math.expm1(mean - half), 100 * math.expm1(mean + half)]
            row[kind] = {"cost_percent": 100 * math.expm1(mean), "ci95_percent": ci}
            text += f" {kind} {100 * math.expm1(mean):+.2f}% [{ci[0]:+.2f}%, {ci[1]:+.2f}%]"
        print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
