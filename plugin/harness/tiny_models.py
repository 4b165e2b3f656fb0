"""Tiny random-weight checkpoints for tests, the demo and benchmarks, built locally in seconds.

The model specs are data (``model_specs.json``); this module turns a spec into a checkpoint
directory (config.json, safetensors weights, generation_config.json and a local byte-level BPE
tokenizer) that both transformers and vLLM load. Checkpoints are cached under
``$MOE_REUSE_MODEL_CACHE`` (default ``~/.cache/moe_reuse/models``) in ``<name>-<spec hash>``;
builds go to a temporary directory that is renamed into place, so concurrent builders are safe.

``model_facts`` mirrors the rules vLLM 0.32 uses to place MoE blocks, so ``moe_layer_indices``
equals the ``runner.layer_id`` of the MoE runner modules vLLM builds (``extract_layer_index`` of
the module name, i.e. the decoder-layer index); tests/integration/test_recorder_server.py checks this
against a live server.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from moe_reuse.plugin.harness import _tokenizer
from moe_reuse.predictor.loading import packaged_data

__all__ = [
    "MODEL_NAMES",
    "SMALL_MODEL_NAMES",
    "ModelFacts",
    "build_model",
    "default_cache_dir",
    "model_facts",
    "model_spec",
]

BUILDER_VERSION = 1  # bump when the build procedure changes in a way the spec does not capture
SIDECAR = "moe_reuse_model.json"


@cache
def _raw_specs() -> Mapping[str, Any]:
    text = packaged_data("moe_reuse.plugin.harness", "model_specs.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def _names() -> tuple[str, ...]:
    return tuple(k for k in _raw_specs() if not k.startswith("_"))


MODEL_NAMES: tuple[str, ...] = _names()
"""Every model the factory builds. ``big-moe`` (about 1.6 GB) is built only when asked for."""
SMALL_MODEL_NAMES: tuple[str, ...] = tuple(
    n for n in MODEL_NAMES if not _raw_specs()[n].get("lazy")
)


@dataclass(frozen=True)
class ModelFacts:
    name: str
    architecture: str
    num_layers: int
    moe_layer_indices: tuple[int, ...]  # vLLM runner.layer_id values of the MoE layers
    num_experts: int  # routed experts per MoE layer (0 for dense)
    top_k: int
    num_shared_experts: int
    vocab_size: int
    hidden_size: int
    is_mla: bool
    max_model_len: int
    dead_experts: tuple[int, ...] = ()  # experts the rigged router can never pick
    moe_intermediate_size: int = 0
    dtype: str = "bfloat16"


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get("MOE_REUSE_MODEL_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/moe_reuse/models").expanduser()


def model_spec(name: str) -> dict[str, Any]:
    """The full spec of ``name``: architecture, merged config.json content, rig."""
    specs = _raw_specs()
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(MODEL_NAMES)}")
    raw = specs[name]
    config = copy.deepcopy(specs["_common"]["config"])
    config.update(copy.deepcopy(raw["config"]))
    config["architectures"] = [raw["architecture"]]
    config["model_type"] = raw["model_type"]
    config["torch_dtype"] = raw.get("dtype", "bfloat16")
    return {
        "name": name,
        "architecture": raw["architecture"],
        "config": config,
        "rig": copy.deepcopy(raw.get("rig", {})),
        "builder_version": BUILDER_VERSION,
    }


def _spec_hash(spec: Mapping[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _dead_experts(spec: Mapping[str, Any]) -> tuple[int, ...]:
    dead = spec.get("rig", {}).get("dead_expert")
    return () if dead is None else (int(dead),)


# --------------------------------------------------------------------------------------------
# Facts: the MoE placement rules of vLLM 0.32's model files, keyed by architecture.
# --------------------------------------------------------------------------------------------


def _facts_from_config(name: str, cfg: Mapping[str, Any], dead: tuple[int, ...]) -> ModelFacts:
    arch = (cfg.get("architectures") or ["?"])[0]
    text = cfg.get("text_config") or cfg
    n = int(text["num_hidden_layers"])
    experts = top_k = shared = 0
    moe_inter = 0
    moe: list[int] = []
    is_mla = False
    if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3NextForCausalLM"):
        # qwen3_moe.py / qwen2_moe.py / qwen3_next.py: not in mlp_only_layers and
        # (i+1) % decoder_sparse_step == 0
        experts, top_k = int(text["num_experts"]), int(text["num_experts_per_tok"])
        step = int(text.get("decoder_sparse_step", 1))
        only = set(text.get("mlp_only_layers") or [])
        moe = [i for i in range(n) if i not in only and experts > 0 and (i + 1) % step == 0]
        moe_inter = int(text["moe_intermediate_size"])
        if arch != "Qwen3MoeForCausalLM" and int(text.get("shared_expert_intermediate_size", 0)):
            shared = 1
    elif arch == "MixtralForCausalLM":
        experts, top_k = int(text["num_local_experts"]), int(text["num_experts_per_tok"])
        moe, moe_inter = list(range(n)), int(text["intermediate_size"])
    elif arch == "OlmoeForCausalLM":
        experts, top_k = int(text["num_experts"]), int(text["num_experts_per_tok"])
        moe, moe_inter = list(range(n)), int(text["intermediate_size"])
    elif arch in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        # deepseek_v2.py: n_routed_experts and i >= first_k_dense_replace and i % moe_layer_freq == 0
        experts, top_k = int(text["n_routed_experts"]), int(text["num_experts_per_tok"])
        first, freq = int(text.get("first_k_dense_replace", 0)), int(text.get("moe_layer_freq", 1))
        moe = [i for i in range(n) if experts and i >= first and i % freq == 0]
        shared = int(text.get("n_shared_experts") or 0)
        moe_inter = int(text["moe_intermediate_size"])
        is_mla = True
    elif arch == "Glm4MoeForCausalLM":
        # glm4_moe.py: n_routed_experts is not None and i >= first_k_dense_replace
        experts, top_k = int(text["n_routed_experts"]), int(text["num_experts_per_tok"])
        moe = [i for i in range(n) if i >= int(text.get("first_k_dense_replace", 1))]
        shared = int(text.get("n_shared_experts") or 0)
        moe_inter = int(text["moe_intermediate_size"])
    elif arch == "Ernie4_5_MoeForCausalLM":
        # ernie45_moe.py: (i + 1) % moe_layer_interval == 0 and start <= i <= end
        experts, top_k = int(text["moe_num_experts"]), int(text["moe_k"])
        start, step = int(text.get("moe_layer_start_index", 0)), int(text.get("moe_layer_interval", 1))
        end = int(text.get("moe_layer_end_index", n - 1))
        moe = [i for i in range(n) if experts > 0 and (i + 1) % step == 0 and start <= i <= end]
        shared = int(text.get("moe_num_shared_experts") or 0)
        moe_inter = int(text["moe_intermediate_size"])
    elif arch in ("Llama4ForCausalLM", "Llama4ForConditionalGeneration"):
        # llama4.py: step > 0 and (i + 1) % interleave_moe_layer_step == 0; always one shared expert
        experts, top_k = int(text["num_local_experts"]), int(text["num_experts_per_tok"])
        step = int(text.get("interleave_moe_layer_step", 1))
        moe = [i for i in range(n) if step > 0 and (i + 1) % step == 0]
        shared, moe_inter = 1, int(text["intermediate_size"])
    elif arch == "Lfm2MoeForCausalLM":  # lfm2_moe.py: layer_idx >= num_dense_layers, no shared
        experts, top_k = int(text["num_experts"]), int(text["num_experts_per_tok"])
        moe = list(range(int(text.get("num_dense_layers", 0)), n))
        moe_inter = int(text["moe_intermediate_size"])
    elif arch == "GptOssForCausalLM":  # gpt_oss.py: every layer is MoE, no shared expert
        experts, top_k = int(text["num_local_experts"]), int(text["num_experts_per_tok"])
        moe, moe_inter = list(range(n)), int(text["intermediate_size"])
    elif arch not in ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"):
        raise ValueError(f"model_facts does not know the MoE layout of {arch}")
    return ModelFacts(
        name=name,
        architecture=arch,
        num_layers=n,
        moe_layer_indices=tuple(moe),
        num_experts=experts,
        top_k=top_k,
        num_shared_experts=shared,
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        is_mla=is_mla,
        max_model_len=int(text.get("max_position_embeddings", 0)),
        dead_experts=dead,
        moe_intermediate_size=moe_inter,
        dtype=str(
            cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or "bfloat16"
        ),
    )


def model_facts(name_or_path: str | os.PathLike[str]) -> ModelFacts:
    """Facts of a known model name (no build needed) or of a checkpoint directory."""
    if isinstance(name_or_path, str) and name_or_path in MODEL_NAMES:
        spec = model_spec(name_or_path)
        return _facts_from_config(name_or_path, spec["config"], _dead_experts(spec))
    path = pathlib.Path(name_or_path)
    cfg = json.loads((path / "config.json").read_text())
    name, dead = path.name, ()
    side = path / SIDECAR
    if side.exists():
        meta = json.loads(side.read_text())
        name, dead = meta["name"], tuple(meta.get("dead_experts", ()))
    return _facts_from_config(name, cfg, dead)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """Return the checkpoint directory of ``name``, building it first if it is not cached."""
    spec = model_spec(name)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"{name}-{_spec_hash(spec)}"
    if (final / SIDECAR).exists():
        return final
    say = progress or (lambda _msg: None)
    with _BUILD_LOCK:
        if (final / SIDECAR).exists():  # another thread of this process built it meanwhile
            return final
        return _build(name, spec, root, final, say)


_BUILD_LOCK = threading.Lock()
"""One build at a time in a process: transformers' lazy imports and its `from_config(dtype=)`,
which sets torch's process-wide default dtype and puts back the one it saw, are not thread-safe
(two threads building at once left bfloat16 as the default for the whole process). Processes
building the same model race on the final rename instead (`_build`)."""


def _build(name: str, spec: Mapping[str, Any], root: pathlib.Path, final: pathlib.Path,
           say: Callable[[str], None]) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
    try:
        t0 = time.monotonic()
        say(f"building {name} into {final}")
        _write_checkpoint(spec, tmp, say)
        (tmp / SIDECAR).write_text(
            json.dumps(
                {
                    "name": name,
                    "spec_hash": _spec_hash(spec),
                    "dead_experts": list(_dead_experts(spec)),
                    "spec": spec,
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
        try:
            os.rename(tmp, final)
        except OSError:
            # Another builder won the race (the target exists and is not empty): use theirs.
            if not (final / SIDECAR).exists():
                raise
        say(f"built {name} in {time.monotonic() - t0:.1f} s")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_checkpoint(
    spec: Mapping[str, Any], out: pathlib.Path, say: Callable[[str], None]
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg_dict = dict(spec["config"])
    model_type = cfg_dict.pop("model_type")
    cfg_dict.pop("architectures")
    dtype = getattr(torch, cfg_dict.pop("torch_dtype"))
    config = AutoConfig.for_model(model_type, **cfg_dict)
    config.architectures = [spec["architecture"]]
    seed = int(_spec_hash(spec)[:8], 16)
    before = torch.get_default_dtype()
    try:
        torch.manual_seed(seed)
        say(f"initialising {spec['architecture']} weights")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _rig(model, spec.get("rig", {}), config)
        say("saving weights")
        model.save_pretrained(out, safe_serialization=True)
        del model
    finally:
        torch.set_default_dtype(before)  # from_config(dtype=) sets it process-wide
    # transformers drops keys it does not model (e.g. DeepSeek-V3's topk_method/scoring_func);
    # vLLM reads them from config.json, so write the spec's values back on top.
    saved = json.loads((out / "config.json").read_text())
    for key, value in spec["config"].items():
        if key not in ("torch_dtype",):
            saved[key] = value
    saved["torch_dtype"] = spec["config"]["torch_dtype"]
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    gen = GenerationConfig(
        bos_token_id=_tokenizer.BOS_TOKEN_ID,
        eos_token_id=[_tokenizer.EOS_TOKEN_ID, _tokenizer.IM_END_TOKEN_ID],
        pad_token_id=_tokenizer.PAD_TOKEN_ID,
        do_sample=False,
    )
    gen.save_pretrained(out)
    say("building tokenizer")
    _tokenizer.build_tokenizer(
        out, int(spec["config"]["vocab_size"]), int(spec["config"]["max_position_embeddings"])
    )


def _rig(model: Any, rig: Mapping[str, Any], config: Any) -> None:
    """Make expert ``rig['dead_expert']`` unselectable in every MoE layer's router.

    The routers here are bias-free (logits = x @ W.T), so no single row can lose to all inputs by
    itself. Instead the dead expert's row is zero (its logit is exactly 0 for every x) and the live
    rows are arranged in antipodal pairs (w, -w): for any x, one row of each pair scores |w.x| >= 0.
    With at least top_k pairs, top_k live experts always score >= the dead one (strictly, unless x
    is orthogonal to a pair's w), and softmax/top-k are monotone, so the dead expert is never picked.
    """
    dead = rig.get("dead_expert")
    if dead is None:
        return
    import torch

    top_k = int(config.num_experts_per_tok)
    rigged = 0
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if not pname.endswith(".mlp.gate.weight") or param.dim() != 2:
                continue
            n_exp = param.shape[0]
            live = [e for e in range(n_exp) if e != dead]
            if len(live) // 2 < top_k:
                raise ValueError(f"need >= {2 * top_k} live experts to rig top-{top_k} routing")
            for a, b in zip(live[0::2], live[1::2], strict=False):
                param[b] = -param[a]
            param[dead] = 0
            rigged += 1
    if rigged == 0:
        raise ValueError("rig: no '.mlp.gate.weight' router found in the model")


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_reuse.plugin.harness.tiny_models [NAME ...]``: build, print path and facts."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument(
        "names", nargs="*", help=f"default: the small models ({', '.join(SMALL_MODEL_NAMES)})"
    )
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    for name in args.names or SMALL_MODEL_NAMES:
        path = build_model(name, args.cache_dir, progress=lambda m: print(f"  {m}", flush=True))
        print(path)
        print(f"  {model_facts(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
