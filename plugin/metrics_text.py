"""The one parser of /metrics text: prometheus-client's, shared by every reader of a scrape.

`moe-reuse whatif --from-server`, `eplb`, `baseline`, the demo, dense-ab, the benchmarks and the
tests all read /metrics text. They used to do it five ways (regexes, line prefixes and the
prometheus-client parser), which disagreed at the edges: escaped label values, `_created`
samples, exemplars. Everything now goes through `samples()`, which parses a text once (the last
few texts are cached, keyed by the string itself, so a test that asks a hundred questions of one
scrape parses it once) and indexes the samples by name.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families


class Sample(NamedTuple):
    name: str  # the sample's own name (`x_total`, `x_created`, `x_bucket`, ...)
    labels: Mapping[str, str]
    value: float


@functools.lru_cache(maxsize=16)
def _index(text: str) -> Mapping[str, tuple[Sample, ...]]:
    by_name: dict[str, list[Sample]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            by_name.setdefault(s.name, []).append(
                Sample(s.name, MappingProxyType(dict(s.labels)), float(s.value)))
    return MappingProxyType({k: tuple(v) for k, v in by_name.items()})


def samples(text: str, name: str | None = None, **labels: str) -> list[Sample]:
    """The samples of `text` (all, or those named `name`) whose labels include `labels`."""
    index = _index(text)
    pool = index.get(name, ()) if name is not None else [s for v in index.values() for s in v]
    return [s for s in pool if all(s.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0.0 when there is none)."""
    return float(sum(s.value for s in samples(text, name, **labels)))


def first_labels(text: str, name: str, **labels: str) -> dict[str, str] | None:
    """The labels of the first sample named `name` (an info metric's), or None."""
    found = samples(text, name, **labels)
    return dict(found[0].labels) if found else None


def names(text: str) -> set[str]:
    """Every sample name in `text`."""
    return set(_index(text))
