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
device-to-host copy), `whole` (the plugin as users run it: + folding, window, snapshots; the
reader and exporters live in the API server, which an offline engine does not have).

    python benchmarks/bench_overhead_engine.py [--model qwen3-moe] [--arms aa,capture,protocol,copy,whole]
        [--batch 16] [--tokens 256] [--waves 30] [--json out.json]
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
import time
from pathlib import Path
from typing import Any

ARMS = ("aa", "capture", "protocol", "copy", "whole")
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


def child(args: argparse.Namespace) -> int:
    """One engine: build it, warm it, then run a wave per line read on stdin."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if args.arm in ("capture", "protocol", "copy"):
        os.environ["MOE_REUSE_ABLATE"] = args.arm
    from vllm import LLM, SamplingParams

    from moe_reuse.plugin.harness.load import random_prompts

    cfg: dict[str, Any] = {} if args.arm in ("baseline", "aa") else {"moe_reuse": {}}
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
        self.pause()

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def wave(self, seed: int) -> dict[str, Any]:
        os.killpg(self.proc.pid, signal.SIGCONT)
        time.sleep(SETTLE_S)
        assert self.proc.stdin is not None
        c0 = group_cpu_seconds(self.proc.pid)
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        out: dict[str, Any] = json.loads(self._read(120))
        out["cpu_seconds"] = group_cpu_seconds(self.proc.pid) - c0
        self.pause()
        return out

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
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--waves", type=int, default=400, help="waves per arm")
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
    from moe_reuse.plugin.harness.tiny_models import build_model

    model_dir = build_model(args.model)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "moe-reuse-bench-engine"
    logs.mkdir(exist_ok=True)
    engines: dict[str, Engine] = {}
    try:
        for arm in ["baseline", *arms]:  # one at a time: start-up is the heaviest phase
            print(f"starting {arm} ...", flush=True)
            engines[arm] = Engine(arm, args, model_dir, logs / f"{arm}.log")
            engines[arm].ready()
        seconds: dict[str, list[float]] = {a: [] for a in engines}
        cpu: dict[str, list[float]] = {a: [] for a in engines}
        for i in range(args.waves):
            order = list(engines) if i % 2 == 0 else list(reversed(engines))
            for arm in order:
                r = engines[arm].wave(100 + i)
                if r["tokens"] != args.batch * args.tokens:
                    raise SystemExit(f"arm {arm}: {r['tokens']} tokens, not {args.batch * args.tokens}")
                seconds[arm].append(r["seconds"])
                cpu[arm].append(r["cpu_seconds"])
            print(f"wave {i:2d}: " + " ".join(f"{a} {seconds[a][-1] * 1e3:6.1f}/{cpu[a][-1] * 1e3:6.0f}"
                                              for a in engines) + " ms wall/CPU", flush=True)
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
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
