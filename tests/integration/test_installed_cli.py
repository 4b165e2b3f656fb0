"""The installed console script, as a user runs it: `moe-reuse` from the environment's bin/, from a
directory that is not the checkout, and a real vLLM server whose plugin comes from that install.

Under `make test` the environment holds the built wheel (not an editable install), so these are the
user's `pip install` path; expected values come from the source tree's data files and from what
the test sent, never from the plugin's own figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

import moe_reuse.dashboards as moe_reuse_dashboards
from moe_reuse.plugin.harness.load import random_prompts, run_concurrent
from moe_reuse.plugin.harness.server import VllmServer, metric_value
from moe_reuse.plugin.harness.tiny_models import build_model, model_facts
from moe_reuse.plugin.metrics_text import samples

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "moe-reuse"


def moe_reuse(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.is_file(), f"console script not installed at {SCRIPT}"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def _presets(kind: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "predictor" / "data" / kind).glob("*.json"))


def test_predict_and_the_preset_lists(tmp_path: Path) -> None:
    run = moe_reuse("predict", "--model", "deepseek-v3", "--hardware", "h200", "--gpus", "8",
                    "--context", "8192", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("deepseek-v3 vs dense twin (q=5) on 8 x h200, context 8k tokens")
    assert "E=256 k=8" in run.stdout  # deepseek-v3.json: 256 routed experts, top-8
    case = json.loads(moe_reuse("predict", "--model", "deepseek-v3", "--hardware", "h200",
                                "--gpus", "8", "--context", "8k", "--json", cwd=tmp_path).stdout)
    assert case  # one JSON object
    models = json.loads(moe_reuse("models", "--json", cwd=tmp_path).stdout)
    assert sorted(m["name"] for m in models) == _presets("models")
    hardware = json.loads(moe_reuse("hardware", "--json", cwd=tmp_path).stdout)
    assert sorted(h["name"] for h in hardware) == _presets("hardware")


def test_sweep_writes_its_plot(tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    run = moe_reuse("sweep", "--model", "mixtral-8x7b", "--hardware", "h100-sxm", "--gpus", "2",
                    "--context", "4k", "--over", "context", "--values", "1k,8k,64k", "--csv",
                    "--out", str(png), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.strip().splitlines()) == 1 + 3  # header + one row per value
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_and_calibrate_help(tmp_path: Path) -> None:
    run = moe_reuse("config", cwd=tmp_path)
    assert run.returncode == 0 and "flush_interval_s" in run.stdout, run.stderr
    run = moe_reuse("calibrate", "--help", cwd=tmp_path)
    assert run.returncode == 0 and "--out" in run.stdout, run.stderr


@pytest.mark.skipif(
    Path(moe_reuse_dashboards.__file__ or "").resolve().is_relative_to(REPO / "dashboards"),
    reason="an editable install's `dashboards generate` writes into the checkout; `make test` "
    "runs this against the installed wheel",
)
def test_dashboards_generate_and_check_in_the_current_directory(tmp_path: Path) -> None:
    # an installed package has no repository around it: generate|check work on the cwd
    assert moe_reuse("dashboards", "check", cwd=tmp_path).returncode == 1  # nothing there yet
    run = moe_reuse("dashboards", "generate", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for committed in (REPO / "dashboards" / "generated").glob("*.json"):
        written = tmp_path / "dashboards" / "generated" / committed.name
        assert written.read_text() == committed.read_text(), committed.name
    assert moe_reuse("dashboards", "check", cwd=tmp_path).returncode == 0


def test_bad_preset_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    run = moe_reuse("predict", "--model", "no-such-model", "--hardware", "h200", "--gpus", "8",
                    "--context", "8k", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("moe-reuse: error: model: unknown preset 'no-such-model'")


@pytest.mark.integration
def test_server_with_the_installed_plugin_conserves_and_reports_its_version(tmp_path: Path) -> None:
    """vLLM loads the plugin through the installed entry point (the server is this interpreter's
    environment); every decode token is counted top-k times in every MoE layer, and
    `moe_reuse_info{version}` is the installed distribution's version."""
    facts = model_facts("qwen3-moe")
    cfg = {"moe_reuse": {"flush_interval_s": 0.2}}
    with VllmServer(build_model("qwen3-moe"), enforce_eager=True,
                    additional_config=cfg).start() as srv:
        before = srv.metrics_text()
        prompts = random_prompts(8, 24, facts.vocab_size, seed=5)
        sent = [(p[: 8 + i * 2], 4 + i) for i, p in enumerate(prompts)]
        outs = run_concurrent(srv.url, sent, concurrency=len(sent))
        assert [o["usage"]["completion_tokens"] for o in outs] == [n for _, n in sent]
        decode = sum(n - 1 for _, n in sent)  # the first output token comes from the prefill

        def delta(text: str, name: str, **labels: str) -> float:
            return metric_value(text, name, **labels) - metric_value(before, name, **labels)

        deadline = time.monotonic() + 30
        text = srv.metrics_text()
        while delta(text, "moe_reuse_tokens_total", phase="decode") < decode:
            assert time.monotonic() < deadline, "decode tokens never flushed"
            time.sleep(0.2)
            text = srv.metrics_text()
    assert delta(text, "moe_reuse_tokens_total", phase="decode") == decode
    for layer in facts.moe_layer_indices:
        assert delta(text, "moe_reuse_expert_assignments_total", layer=str(layer),
                     phase="decode") == decode * facts.top_k, layer
    info = samples(text, "moe_reuse_info")
    assert info, "no moe_reuse_info series"
    want = metadata.version("vllm-moe-reuse")
    assert all(s.labels["version"] == want for s in info), (want, info)
