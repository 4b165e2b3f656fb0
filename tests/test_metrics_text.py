"""The one /metrics parser (prometheus-client's), as every reader of a scrape uses it."""

from __future__ import annotations

from moe_reuse.plugin import metrics_text as mt

TEXT = (
    "# HELP moe_reuse_tokens_total Tokens.\n"
    "# TYPE moe_reuse_tokens_total counter\n"
    'moe_reuse_tokens_total{rank="0",phase="decode"} 10.0\n'
    'moe_reuse_tokens_total{rank="1",phase="decode"} 5.0\n'
    'moe_reuse_tokens_total{rank="0",phase="prefill"} 7.0\n'
    'moe_reuse_tokens_created{rank="0",phase="decode"} 1.7e9\n'
    '# TYPE moe_reuse_info gauge\n'
    'moe_reuse_info{model="a \\"quoted\\" {name}",runner="v2",top_k="8"} 1.0\n'
    'vllm:cache_config_info{block_size="16",mamba_block_size="{1: 2}"} 1.0\n'
)


def test_values_sum_over_matching_labels_and_absent_is_zero() -> None:
    assert mt.value(TEXT, "moe_reuse_tokens_total") == 22.0
    assert mt.value(TEXT, "moe_reuse_tokens_total", phase="decode") == 15.0
    assert mt.value(TEXT, "moe_reuse_tokens_total", phase="decode", rank="1") == 5.0
    assert mt.value(TEXT, "moe_reuse_tokens_total", phase="mixed") == 0.0
    assert mt.value(TEXT, "nothing_total") == 0.0
    # `_created` is its own sample name, never summed into the counter
    assert mt.value(TEXT, "moe_reuse_tokens_created") == 1.7e9


def test_label_values_are_unescaped_and_may_hold_braces() -> None:
    info = mt.first_labels(TEXT, "moe_reuse_info")
    assert info == {"model": 'a "quoted" {name}', "runner": "v2", "top_k": "8"}
    assert mt.first_labels(TEXT, "vllm:cache_config_info")["mamba_block_size"] == "{1: 2}"
    assert mt.first_labels(TEXT, "moe_reuse_info", runner="v1") is None


def test_samples_and_names() -> None:
    assert {s.labels["rank"] for s in mt.samples(TEXT, "moe_reuse_tokens_total")} == {"0", "1"}
    assert len(mt.samples(TEXT)) == 6
    assert "moe_reuse_info" in mt.names(TEXT) and "moe_reuse_tokens" not in mt.names(TEXT)


def test_one_parse_per_text() -> None:
    text = TEXT + 'x_total{a="1"} 1.0\n'
    mt._index.cache_clear()
    for _ in range(50):
        mt.value(text, "x_total", a="1")
    assert mt._index.cache_info().misses == 1
