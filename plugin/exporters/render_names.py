"""Remember prometheus_client's escaping, so a scrape of /metrics escapes each name and value once.

Why: prometheus_client 0.22 added UTF-8 metric and label names, and since then its renderers
escape names on every sample. The text renderer checks every label name of every sample
against two regular expressions; the OpenMetrics renderer, which Prometheus 2.x asks for first,
also rewrites every sample's name character by character in Python (`_escape` with the
`underscores` scheme: one function call and one StringIO write per character). That is two
thirds of rendering our 2,472 default samples for 8 DeepSeek-V3-shaped ranks
(`benchmarks/bench_scrape.py`), and the same cost lands on vLLM's own series.

Names are few (a few dozen metric and label names in a whole /metrics) while samples are
thousands, and each escape is a pure function of its arguments (the string, the escaping scheme
and, for `_escape`, the rune predicate). So the three escapers of
`prometheus_client.openmetrics.exposition` (`escape_metric_name`, `escape_label_name`,
`_escape`), and its name check (`_is_valid_legacy_metric_name`, a regular expression on every
sample's name when the scrape asks for UTF-8 names, as Prometheus 3.x does), are put behind
functools' bounded LRU cache, which calls the original on a miss and returns what it returned:
the rendered bytes are the same, byte for byte (checked at install on strings that need
escaping, and by tests/test_render_names.py on whole scrapes of every Accept header Prometheus
sends). `_escape` also escapes label values and help texts; those are remembered too, because a
cache hit (in C) is cheaper than the three `str.replace` calls behind a Python call it saves,
and label values are bounded like the series themselves. The cache is capped (`MAX_ENTRIES`
entries a function, least recently used first out), so a process that makes label values
without end costs about what it cost before, never memory.

The patch is process-wide (it is the renderer's module that vLLM's /metrics handler calls), it
is installed where the reader serves /metrics (vLLM's API server through `frontend`, and the
per-node exporter), `MOE_REUSE_RENDER_CACHE=0` turns it off, and a prometheus_client without
these functions (before 0.22, where names are not escaped per sample) is left as it is.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("vllm.moe_reuse")

MAX_ENTRIES = 4096
"""Remembered escapes per function: far above the names and label values of any /metrics
(vLLM's own and ours, per-expert series on, are under 1,000), low enough that a pathological
caller never grows the process."""

_PATCHED = ("escape_metric_name", "escape_label_name", "_escape", "_is_valid_legacy_metric_name")
"""The OpenMetrics module's escapers, and its name check, which the renderers call on every
sample's name where the scrape asks for UTF-8 names (`escaping=allow-utf-8`: Prometheus 3.x)."""
_MARK = "__moe_reuse_remembers__"

# names that exercise every branch the remembered escapes take: legacy, UTF-8, leading digit,
# colon, dot, quote, backslash and newline
_PROBES = ("moe_reuse_steps_total", "vllm:num_requests_running", "a.b", "0abc", "ünï",
           'q"uo\\te\nx', "")


def _remember(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` behind a bounded LRU cache (functools' C one: a hit costs less than the
    Python call it replaces), marked so `install` and `uninstall` know it."""
    remembered = functools.lru_cache(maxsize=MAX_ENTRIES)(original)
    setattr(remembered, _MARK, original)
    return remembered


def install() -> bool:
    """Wrap the escapers once per process; True if they are (now or already) wrapped.

    Never raises: anything unexpected leaves prometheus_client as it was, with one log line."""
    if os.environ.get("MOE_REUSE_RENDER_CACHE", "1").strip() == "0":
        return False
    try:
        from prometheus_client.openmetrics import exposition as om
    except Exception:  # noqa: BLE001 - no OpenMetrics renderer, nothing to speed up
        return False
    if not all(callable(getattr(om, name, None)) for name in _PATCHED):
        return False  # prometheus_client < 0.22: names are not escaped per sample
    if all(hasattr(getattr(om, name), _MARK) for name in _PATCHED):
        return True
    originals = {name: getattr(om, name) for name in _PATCHED}
    wrapped = {name: _remember(fn) for name, fn in originals.items()}
    try:
        _check(om, originals, wrapped)
    except Exception as e:  # noqa: BLE001 - a renderer we do not know: leave it alone
        logger.warning("moe_reuse: prometheus_client's name escaping left as it is (%s)", e)
        return False
    for name, fn in wrapped.items():
        setattr(om, name, fn)
    logger.info("moe_reuse: /metrics renders with prometheus_client's escapes remembered "
                "(MOE_REUSE_RENDER_CACHE=0 turns it off)")
    return True


def uninstall() -> None:
    """Put the original escapers back (tests; a process that wants them back)."""
    try:
        from prometheus_client.openmetrics import exposition as om
    except Exception:  # noqa: BLE001
        return
    for name in _PATCHED:
        original = getattr(getattr(om, name, None), _MARK, None)
        if original is not None:
            setattr(om, name, original)


def _check(om: Any, originals: dict[str, Callable[..., Any]],
           wrapped: dict[str, Callable[..., Any]]) -> None:
    """Each wrapped escaper answers what the original answers, twice (a miss, then a hit), on
    every scheme this prometheus_client names; raises on the first difference."""
    schemes = [getattr(om, s) for s in ("UNDERSCORES", "DOTS", "VALUES", "ALLOWUTF8")
               if isinstance(getattr(om, s, None), str)]
    rune = getattr(om, "_is_legacy_labelname_rune", None)
    for s in _PROBES:
        for scheme in schemes:
            calls: list[tuple[str, tuple[Any, ...]]] = [
                ("escape_metric_name", (s, scheme)), ("escape_label_name", (s, scheme))]
            if rune is not None and s:  # the rune predicate refuses an empty character
                calls.append(("_escape", (s, scheme, rune)))
            calls.append(("_is_valid_legacy_metric_name", (s,)))
            for name, args in calls:
                want = originals[name](*args)
                for _ in range(2):
                    got = wrapped[name](*args)
                    if got != want:
                        raise ValueError(f"{name}{args!r}: {got!r} != {want!r}")
