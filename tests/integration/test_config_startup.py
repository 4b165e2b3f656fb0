"""A bad `moe_reuse` configuration stops a real vLLM server in its front-end process.

The front end validates the plugin's config when vLLM builds its engine config, before it spawns
the engine core or any worker; so the server exits with the message and the log never shows an
engine core starting or a worker loading the model. One case needs the served model (the ring
budget depends on its MoE layers and experts) and one a file, so the whole start-up check runs,
not only the JSON parsing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moe_reuse.plugin.harness.server import ServerFailed, VllmServer
from moe_reuse.plugin.harness.tiny_models import build_model

pytestmark = pytest.mark.integration

# Lean: each case is a vLLM front end start (about 40 s here); the unit table in
# tests/test_config.py has every message, these prove the path on a real server.
# Log lines that only appear once the engine core or a worker process exists.
SPAWNED = ("EngineCore", "Initializing a V1 LLM engine", "Starting to load model", "VLLM::Worker")


def _baseline_of_another_model(tmp: Path) -> str:
    path = tmp / "baseline-16-experts.json"
    path.write_text(json.dumps({
        "version": 1, "kind": "moe_reuse_routing_baseline", "num_experts": 16, "top_k": 2,
        "phase": "decode", "tokens": 100, "source": "another model",
        "layers": {str(i): [1.0] * 16 for i in range(4)},
    }))
    return str(path)


CASES: list[tuple[str, Any, str]] = [
    ("unknown_key", {"flush_interval": 1},
     "moe_reuse: unknown key 'flush_interval'. Did you mean 'flush_interval_s'?"),
    ("ring_over_budget", {"ring_steps": 65536},
     "moe_reuse.ring_steps: 65536 steps need 27 MiB of device counters for"),
    ("baseline_of_another_model", "BASELINE", "has 16 experts per layer but"),
]


@pytest.mark.parametrize("bad, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_stops_startup_before_any_worker(bad: Any, needle: str, tmp_path: Path) -> None:
    if bad == "BASELINE":
        bad = {"routing_baseline": _baseline_of_another_model(tmp_path)}
    srv = VllmServer(build_model("qwen3-moe"), enforce_eager=True,
                     additional_config={"moe_reuse": bad}, startup_timeout_s=120)
    with pytest.raises(ServerFailed, match="exited with code"):
        srv.start()
    log = srv.log_text()
    assert needle in log
    assert "ConfigError" in log  # raised as the plugin's error, not some later failure
    spawned = [s for s in SPAWNED if s in log]
    assert not spawned, f"start-up went past the front end: {spawned}"
