"""The version of the installed `vllm-moe-reuse` distribution.

`moe_reuse_info{version=...}` must name what pip installed, so it is read from the distribution's
metadata rather than from a constant in the source that a build could leave behind.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["DIST_NAME", "version"]

DIST_NAME = "vllm-moe-reuse"


def version() -> str:
    """The installed distribution's version, or "unknown" when run from a tree pip never saw."""
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"
