"""render_names: prometheus_client's escapes remembered, and every scrape byte for byte the same.

The expected bytes are prometheus_client's own rendering with its original escapers, over the
same registry, for every Accept header a Prometheus (or a person with curl) sends."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as om
from scrape_inputs import PROMETHEUS_ACCEPT, rank_snapshot

from moe_reuse.plugin.exporters import render_names
from moe_reuse.plugin.exporters.families import snapshot_families

ACCEPT = [
    "",  # curl
    "text/plain;version=0.0.4",
    *PROMETHEUS_ACCEPT.values(),  # Prometheus 2.x (Debian's 2.42) and 3.x (UTF-8 names on)
    *(f"text/plain;version=1.0.0;escaping={e}"
      for e in ("underscores", "dots", "values", "allow-utf-8")),
    *(f"application/openmetrics-text;version=1.0.0;escaping={e}"
      for e in ("underscores", "dots", "values", "allow-utf-8")),
]


@pytest.fixture(autouse=True)
def originals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MOE_REUSE_RENDER_CACHE", raising=False)
    render_names.uninstall()
    yield
    render_names.uninstall()


def _rank(rank: int, per_expert: bool) -> dict[str, Any]:
    et = np.random.default_rng(rank).integers(0, 1000, size=(5, 2, 16))
    return rank_snapshot(rank, et, top_k=4, per_expert=per_expert, max_expert_series=64,
                         layer_ids=range(1, 6), model='odd "model"\\name\n')


def _registry() -> CollectorRegistry:
    """Our families for 3 ranks, per-expert series on one, beside the kinds of series vLLM's
    /metrics holds (counters, a histogram, info, a colon in the name, UTF-8 names and values)."""
    reg = CollectorRegistry()
    snaps = [_rank(0, True), _rank(1, False), _rank(2, False)]

    class Ours:
        def collect(self) -> Any:
            return snapshot_families(snaps)

    class Utf8:
        def collect(self) -> Any:
            g = GaugeMetricFamily("vllm.cache.usage", "UTF-8 name", labels=["the.label", "ok"])
            g.add_metric(["ünï", "x"], 0.5)
            yield g

    reg.register(Ours())  # type: ignore[arg-type]
    reg.register(Utf8())  # type: ignore[arg-type]
    c = Counter("vllm:prompt_tokens", "prompt", ["model_name", "engine"], registry=reg)
    c.labels("m", "0").inc(7)
    Gauge("vllm:num_requests_running", "running", registry=reg).set(3)
    h = Histogram("vllm:e2e_request_latency_seconds", "latency", ["model_name"], registry=reg)
    h.labels("m").observe(0.3)
    Info("vllm_build", "build", registry=reg).info({"version": "0.32.0"})
    return reg


def _scrapes(reg: CollectorRegistry) -> dict[str, bytes]:
    return {accept: choose_encoder(accept)[0](reg) for accept in ACCEPT}


def test_every_scrape_renders_the_same_bytes_with_the_escapes_remembered(
        caplog: pytest.LogCaptureFixture) -> None:
    reg = _registry()
    want = _scrapes(reg)
    with caplog.at_level(logging.INFO, logger="vllm.moe_reuse"):
        assert render_names.install()
        assert render_names.install()
    assert caplog.text.count("escapes remembered") == 1  # said once, when it is installed
    assert all(hasattr(getattr(om, n), "cache_info") for n in ("_escape", "escape_label_name"))
    for _ in range(2):  # the first scrape fills the caches, the second reads them
        got = _scrapes(reg)
        for accept in ACCEPT:
            assert got[accept] == want[accept], accept
    # the renders differ between schemes (dots, values, underscores): a test that can fail
    assert len(set(want.values())) >= 4
    assert om._escape.cache_info().hits > 0  # type: ignore[attr-defined]


def test_install_is_idempotent_and_uninstall_puts_the_originals_back() -> None:
    before = {n: getattr(om, n) for n in render_names._PATCHED}
    assert render_names.install()
    patched = {n: getattr(om, n) for n in before}
    assert all(patched[n] is not before[n] for n in before)
    assert render_names.install()
    assert {n: getattr(om, n) for n in before} == patched  # not wrapped twice
    render_names.uninstall()
    assert {n: getattr(om, n) for n in before} == before


def test_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    original = om._escape
    monkeypatch.setenv("MOE_REUSE_RENDER_CACHE", "0")
    assert not render_names.install()
    assert om._escape is original


def test_a_prometheus_client_without_the_escapers_is_left_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(om, "escape_label_name")
    original = om._escape
    assert not render_names.install()
    assert om._escape is original


def test_an_escaper_that_is_not_a_pure_function_is_not_remembered(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = iter(range(10**6))
    monkeypatch.setattr(om, "escape_label_name", lambda s, e="underscores": f"{s}{next(calls)}")
    impure = om.escape_label_name
    with caplog.at_level(logging.WARNING, logger="vllm.moe_reuse"):
        assert not render_names.install()
    assert om.escape_label_name is impure
    assert not hasattr(om._escape, "cache_info")  # nothing patched: all or none
    assert "left as it is" in caplog.text and "escape_label_name" in caplog.text


def test_the_memory_is_bounded_whatever_the_label_values() -> None:
    assert render_names.install()
    reg = CollectorRegistry()
    g = Gauge("many_values", "one series per value", ["v"], registry=reg)
    for i in range(render_names.MAX_ENTRIES + 500):
        g.labels(str(i)).set(i)
    want_last = b'many_values{v="%d"} %d.0' % (render_names.MAX_ENTRIES + 499,
                                             render_names.MAX_ENTRIES + 499)
    assert want_last in choose_encoder("")[0](reg)
    info = om._escape.cache_info()  # type: ignore[attr-defined]
    assert info.currsize <= render_names.MAX_ENTRIES
    assert info.misses >= render_names.MAX_ENTRIES + 500
