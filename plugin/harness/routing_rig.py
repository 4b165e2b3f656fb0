"""A concentrated-routing copy of a test MoE: routers rigged so every token picks `hot` experts.

Random-weight test models route random tokens near-uniformly; real traffic often does not (issue
12: natural-text prompts on a random-weight model touched a small set of experts). To test the
live gauge against a routing regime that is concentrated by construction, not by accident of the
prompts, this copies a Qwen3-MoE checkpoint and rewrites only its routers (bias-free: logits =
x @ W.T). The first `hot` rows become `hot/2` antipodal pairs (w, -w), scaled by `gain`: for any
x one row of each pair scores gain*|w.x| >= 0, so every token has `hot/2` hot experts with large
positive logits and, with hot/2 >= top_k, its top-k lie among the hot experts (the cold rows
score about |w.x|, gain times less). Each layer then reads at most `hot` of its experts per step.
Every other tensor is byte-identical, so the dense twin of the original serves both regimes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

ROUTER_SUFFIX = ".mlp.gate.weight"


def concentrated_copy(moe_dir: str | os.PathLike[str], hot: int = 16, gain: float = 20.0, *,
                      say: Callable[[str], None] = lambda _m: None) -> pathlib.Path:
    """Checkpoint directory of `moe_dir` with routers rigged toward `hot` experts (cached beside
    it as `<name>-hot<hot>`)."""
    import torch
    from safetensors.torch import load_file, save_file

    src = pathlib.Path(moe_dir)
    cfg = json.loads((src / "config.json").read_text())
    top_k, n_exp = int(cfg["num_experts_per_tok"]), int(cfg["num_experts"])
    if hot % 2 or hot // 2 < top_k or hot > n_exp:
        raise ValueError(f"hot: need an even count with hot/2 >= top_k={top_k} and hot <= "
                         f"{n_exp} experts, got {hot}")
    final = src.parent / f"{src.name}-hot{hot}"
    if (final / "config.json").exists():
        return final
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".hot-", dir=src.parent))
    try:
        say(f"rigging routers of {src.name} toward {hot} of {n_exp} experts into {final}")
        rigged = 0
        for f in src.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
                continue
            tensors = load_file(str(f))
            for name, w in tensors.items():
                if not name.endswith(ROUTER_SUFFIX):
                    continue
                with torch.no_grad():
                    for a in range(0, hot, 2):
                        w[a + 1] = -w[a]
                    w[:hot] *= gain
                rigged += 1
            save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        if rigged == 0:
            raise ValueError(f"no '*{ROUTER_SUFFIX}' router found in {src}")
        side = tmp / "moe_reuse_model.json"
        if side.exists():
            meta = json.loads(side.read_text())
            meta["name"] = f"{meta.get('name', src.name)}-hot{hot}"
            meta["routing_rig"] = {"hot_experts": list(range(hot)), "gain": gain}
            side.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, final)
        say(f"rigged {rigged} routers")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
