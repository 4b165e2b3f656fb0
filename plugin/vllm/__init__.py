"""THE seam to vLLM internals: the only package that imports vLLM.

It installs hooks and returns plain data; it imports nothing else of the plugin, so it is a leaf of
the import graph and a vLLM upgrade touches only these modules:
- `hooks`: the front-end config check and the worker's load_model callback;
- `runners`: the step protocol on Model Runner V2 and V1 (`StepLayout`);
- `routing`: the routing sources (router, monolithic-kernel sink, model-level), bound through
  vLLM's own `bind_routed_experts_capturer`, chained with any other listener;
- `facts`: the served model and deployment as plain data (`ModelFacts`, dtypes, KV capacity);
- `weights`: bytes the loaded model holds per component;
- `comm`: MoE collective timing;
- `kernels`: vLLM's CPU kernels for calibration.

The plugin's assembly (`moe_reuse.plugin.worker_runtime`) is the only caller while serving.
Tested range: see `tested_range()`; outside it the plugin logs one line, exports it, and relies on
its self-check.
"""

from __future__ import annotations
