"""`moe-reuse whatif --from-server URL`: read a running server's deployment for the predictor.

The predictor does no I/O; this module scrapes the server (``/metrics`` with prometheus-client's
parser, the one the baseline command uses, and ``/v1/models``), reads the served config.json,
and hands `moe_reuse.predictor.whatif_server.ServerFacts` (a frozen dataclass) back:

* model: the served config.json (``/v1/models`` ``root``), dtypes from it and the KV cache dtype;
* partition: ``moe_reuse_info``'s ``tp``, ``pp`` and ``ep`` (vLLM's parallel config, which the plugin
  publishes at bind; a plugin that does not: TP = the ranks that export ``moe_reuse_info``, PP 1).
  One engine: data-parallel engines are replicas, each serving its share of the concurrency. Under
  DP attention + EP (``ep`` = ``tp`` x ``dp``: the experts sharded over every engine's GPUs) no
  engine stands alone, so the partition is the whole deployment, ``dp`` included, and the
  concurrency levels are the deployment's;
* KV capacity: ``vllm:cache_config_info`` num_gpu_blocks x block_size (vLLM's own figure, one
  engine's; times ``dp`` for the whole deployment);
* scheduler limits: ``moe_reuse_info``'s ``max_num_batched_tokens`` and ``max_num_seqs`` (vLLM's
  resolved scheduler config, which the plugin publishes at bind);
* routing: distinct experts per MoE layer per decode step against the decode batch, from
  ``moe_reuse_experts_touched_total{phase="decode"}``, ``moe_reuse_steps_total{kind=decode|mixed}``
  and ``moe_reuse_batch_requests_total{phase="decode"}``, fitted to a `RoutingCurve`;
* hardware: the spec named by ``moe_reuse_info``'s ``hardware`` label (a preset, the
  ``moe-reuse calibrate`` file, or the shipped generic CPU spec).
"""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from moe_reuse.predictor import (
    HardwareSpec,
    Partition,
    SpecError,
    list_hardware_presets,
    load_hardware_file,
    load_hardware_preset,
    model_from_hf_config,
)
from moe_reuse.predictor.reuse import RoutingCurve
from moe_reuse.predictor.whatif_server import ServerFacts

from ..metrics_text import samples
from .spec import resolve_hardware

_TIMEOUT_S = 30


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            return str(r.read().decode())
    except OSError as exc:
        raise SpecError("--from-server", f"cannot read {url}: {exc}", "is the server up?") from None


def hardware_by_name(name: str) -> HardwareSpec:
    """The spec the plugin used: a preset, else the calibrated/generic spec `auto` resolves to."""
    if name in list_hardware_presets():
        return load_hardware_preset(name)
    generic = Path(__file__).with_name("data") / "cpu-generic.json"
    if name == "cpu-generic":
        return load_hardware_file(generic)
    hw = resolve_hardware("auto")
    if hw.name != name:
        raise SpecError(
            "--from-server",
            f"the server's plugin uses hardware {name!r}, which is not a preset and not the "
            f"spec found here ({hw.name!r})",
            "run whatif on the server host, or pass --hardware with that spec's file",
        )
    return hw


def parse_metrics(text: str) -> dict[str, Any]:
    """Plain facts from /metrics text: info labels, ranks, cache config, routing means."""
    info: dict[str, str] = {}
    ranks: set[str] = set()
    cache: dict[str, str] = {}
    touched: dict[str, float] = defaultdict(float)  # rank -> sum over layers
    layers: dict[str, set[str]] = defaultdict(set)
    steps: dict[str, float] = defaultdict(float)
    batch: dict[str, float] = defaultdict(float)
    for s in samples(text):
        lab = s.labels
        if s.name == "moe_reuse_info":
            info = dict(lab)
            ranks.add(lab.get("rank", "0"))
        elif s.name == "vllm:cache_config_info":
            cache = dict(lab)
        elif s.name == "moe_reuse_experts_touched_total" and lab.get("phase") == "decode":
            touched[lab.get("rank", "0")] += s.value
            layers[lab.get("rank", "0")].add(lab.get("layer", ""))
        elif s.name == "moe_reuse_steps_total" and lab.get("kind") in ("decode", "mixed"):
            steps[lab.get("rank", "0")] += s.value
        elif s.name == "moe_reuse_batch_requests_total" and lab.get("phase") == "decode":
            batch[lab.get("rank", "0")] += s.value
    if not info:
        raise SpecError(
            "--from-server", "no moe_reuse_info on /metrics",
            "start the server with --additional-config '{\"moe_reuse\": {}}'",
        )
    distinct = mean_batch = 0.0
    live = [r for r in steps if steps[r] > 0 and layers.get(r)]
    if live:
        distinct = sum(touched[r] / (len(layers[r]) * steps[r]) for r in live) / len(live)
        mean_batch = sum(batch[r] / steps[r] for r in live) / len(live)
    return {
        "info": info,
        "ranks": len(ranks) or 1,
        "cache": cache,
        "distinct_per_layer": distinct,
        "decode_batch": mean_batch,
    }


def facts_from(
    metrics_text: str, models_json: dict[str, Any], hw: HardwareSpec | None = None, url: str = ""
) -> ServerFacts:
    """ServerFacts from the two documents (the config.json is read from the served root)."""
    m = parse_metrics(metrics_text)
    data = (models_json.get("data") or [{}])[0]
    root = Path(str(data.get("root") or data.get("id") or ""))
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise SpecError(
            "--from-server", f"the served model's config.json is not readable here ({cfg_path})",
            "run whatif on the server host, or use --model with the config.json",
        )
    config = json.loads(cfg_path.read_text())
    cache = m["cache"]
    kv_dtype = cache.get("cache_dtype", "auto")
    model = model_from_hf_config(
        config, kv_dtype=None if kv_dtype == "auto" else kv_dtype, name=str(data.get("id") or root.name)
    )
    try:
        blocks, block = int(cache["num_gpu_blocks"]), int(cache["block_size"])
    except (KeyError, ValueError):
        raise SpecError(
            "--from-server", "vllm:cache_config_info lacks num_gpu_blocks/block_size", "is this vLLM >= 0.10?"
        ) from None
    routing = None
    if m["distinct_per_layer"] > 0 and m["decode_batch"] > 0 and model.is_moe:
        routing = RoutingCurve.fit(
            model.num_experts, model.experts_per_token, m["decode_batch"], m["distinct_per_layer"]
        )
    hardware = hw or hardware_by_name(m["info"].get("hardware", ""))
    partition = served_partition(m)
    return ServerFacts(
        model=model,
        hardware=hardware,
        partition=partition,
        kv_capacity_tokens=blocks * block * partition.dp,
        routing=routing,
        max_num_seqs=_info_int(m["info"], "max_num_seqs"),
        max_num_batched_tokens=_info_int(m["info"], "max_num_batched_tokens"),
        max_model_len=int(data.get("max_model_len") or 0),
        url=url,
    )


def served_partition(m: dict[str, Any]) -> Partition:
    """One engine's partition from the parallel sizes the plugin publishes (see the module doc)."""
    info = m["info"]
    tp = _info_int(info, "tp") or m["ranks"]
    pp, dp, ep = (_info_int(info, k) or 1 for k in ("pp", "dp", "ep"))
    if dp > 1 and ep > tp:  # DP attention + EP: the experts span the engines
        return Partition(tp=tp, pp=pp, dp=dp, ep=ep)
    return Partition(tp=tp, pp=pp, ep=ep)


def _info_int(info: dict[str, str], key: str) -> int:
    """A count the plugin publishes in moe_reuse_info (0: a plugin that does not, or not a count)."""
    try:
        return max(int(info.get(key) or 0), 0)
    except ValueError:
        return 0


def read_server(url: str, hw: HardwareSpec | None = None) -> ServerFacts:
    """Scrape `url` (/metrics and /v1/models) into ServerFacts."""
    base = url.rstrip("/")
    models = json.loads(_get(base + "/v1/models"))
    return facts_from(_get(base + "/metrics"), models, hw, url=base)
