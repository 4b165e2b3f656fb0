"""Which cases of the integration matrix a run takes.

CI's 2-core machine runs one runner per feature (the one whose seam the feature most depends
on, mostly Model Runner V2, which every GPU server runs); `MOE_REUSE_FULL_MATRIX=1` runs every
feature on both runners and the slow variants. One switch, read here, so every module agrees.
"""

from __future__ import annotations

import os

FULL = os.environ.get("MOE_REUSE_FULL_MATRIX") == "1"
"""The full matrix: both runners for every feature, and the slow variants."""


def runners(ci: str) -> list[str]:
    """Both model runners in the full matrix, else CI's one (`"v1"` or `"v2"`)."""
    if ci not in ("v1", "v2"):
        raise ValueError(f"runners(ci={ci!r}): name the runner CI takes, 'v1' or 'v2'")
    return ["v1", "v2"] if FULL else [ci]
