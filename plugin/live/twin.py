"""Build the quality-matched dense twin of a served MoE checkpoint (for the A/B benchmark).

Same attention, KV layout, embeddings, vocabulary and dtypes as the MoE; every layer gets one
dense gated FFN whose width makes N_dense = q*s*N_total (`moe_reuse.predictor.dense_twin`).
Random weights, like the MoE test models: only shapes matter for throughput.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from moe_reuse.predictor import dense_twin, model_from_hf_config

_MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
             "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef", "output_router_logits",
             "num_local_experts", "shared_expert_intermediate_size")


def twin_config(moe_config: dict[str, Any], q: float) -> tuple[dict[str, Any], int]:
    """A Qwen3 (dense) config.json for the twin of a Qwen3-MoE config, and its FFN width."""
    model = model_from_hf_config(moe_config)
    width = dense_twin(model, q).intermediate_size
    cfg = {k: v for k, v in moe_config.items() if k not in _MOE_KEYS}
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", intermediate_size=width)
    return cfg, width


def build_dense_twin(moe_dir: str | os.PathLike[str], q: float, *,
                     say: Callable[[str], None] = lambda _m: None) -> pathlib.Path:
    """Checkpoint directory of the dense twin of `moe_dir` (cached next to it)."""
    from moe_reuse.plugin.harness import tiny_models

    moe_dir = pathlib.Path(moe_dir)
    moe_cfg = json.loads((moe_dir / "config.json").read_text())
    if moe_cfg.get("model_type") != "qwen3_moe":
        raise ValueError("the dense-twin builder handles Qwen3-MoE checkpoints")
    cfg, width = twin_config(moe_cfg, q)
    final = moe_dir.parent / f"{moe_dir.name}-dense-q{q:g}"
    if (final / "config.json").exists() and (final / "tokenizer.json").exists():
        return final
    keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in (
        "transformers_version", "architectures", "model_type", "torch_dtype", "dtype")}
    keep["torch_dtype"] = str(moe_cfg.get("torch_dtype") or "bfloat16")
    keep["model_type"] = "qwen3"
    keep["architectures"] = ["Qwen3ForCausalLM"]
    spec = {"name": final.name, "architecture": "Qwen3ForCausalLM", "config": keep, "rig": {}}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".twin-", dir=moe_dir.parent))
    try:
        say(f"building dense twin (FFN width {width}) into {final}")
        tiny_models._write_checkpoint(spec, tmp, say)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
