"""A worker extension that lets tests look inside a live vLLM worker (test use only).

Start the server with ``extra_args=["--worker-extension-cls", PROBE_CLS]`` and
``env={"VLLM_SERVER_DEV_MODE": "1"}``, then call ``srv.collective_rpc("<method>")``:

- ``moe_probe_layers``: ``[{"name", "layer_id", "router"}]`` for every MoE runner module, where
  ``layer_id`` is ``runner.layer_id`` (what the plugin keys its counters by).
- ``moe_probe_count_start``: binds a counting capture function to every ``BaseRouter``. Only counts
  in eager mode (``--enforce-eager``): under torch.compile the graph was traced before the bind.
  It replaces any capture function already bound (the plugin's), so use it on plugin-free servers.
- ``moe_probe_counts``: ``{layer_id: [count per expert]}`` of the logical top-k ids seen so far.
"""

from __future__ import annotations

from typing import Any

PROBE_CLS = "moe_reuse.plugin.harness.probe.MoeProbe"


class MoeProbe:
    def _moe_runners(self) -> list[tuple[str, Any]]:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import (
            MoERunnerInterface,
        )

        model = self.get_model()  # type: ignore[attr-defined]
        return [(n, m) for n, m in model.named_modules() if isinstance(m, MoERunnerInterface)]

    def moe_probe_layers(self) -> list[dict[str, Any]]:
        return [
            {
                "name": n,
                "layer_id": int(m.layer_id),
                "router": type(getattr(m, "router", None)).__name__,
            }
            for n, m in self._moe_runners()
        ]

    def moe_probe_count_start(self) -> int:
        import torch
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

        self._moe_probe_counts: dict[int, torch.Tensor] = {}
        bound = 0
        for _, runner in self._moe_runners():
            router = getattr(runner, "router", None)
            if not isinstance(router, BaseRouter):
                continue
            layer = int(runner.layer_id)
            counts = self._moe_probe_counts.setdefault(layer, torch.zeros(4096, dtype=torch.int64))

            def capture(topk_ids: torch.Tensor, counts: torch.Tensor = counts) -> None:
                counts += torch.bincount(topk_ids.reshape(-1).long(), minlength=counts.numel())[
                    : counts.numel()
                ]

            router.set_capture_fn(capture)
            bound += 1
        return bound

    def moe_probe_counts(self) -> dict[str, list[int]]:
        counts = getattr(self, "_moe_probe_counts", {})
        out = {}
        for layer, c in sorted(counts.items()):
            nz = c.nonzero()
            last = int(nz.max()) + 1 if nz.numel() else 0
            out[str(layer)] = [int(x) for x in c[:last]]
        return out
