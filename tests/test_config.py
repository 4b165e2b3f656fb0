"""`--additional-config '{"moe_reuse": {...}}'` parsing: strict, with messages naming key and fix."""

from __future__ import annotations

import pytest

from moe_reuse.plugin.config import ConfigError, PluginConfig, config_from_additional, parse_config


def test_absent_means_not_enabled_and_empty_means_defaults() -> None:
    assert config_from_additional({}) is None
    assert config_from_additional(None) is None
    assert config_from_additional({"other_plugin": {}}) is None
    assert config_from_additional({"moe_reuse": {}}) == PluginConfig()
    assert parse_config(None) == PluginConfig()


def test_values_are_typed_and_ints_accepted_for_floats() -> None:
    cfg = parse_config({"q": 3, "flush_interval_s": 0.5, "per_expert_series": True, "ring_steps": 64})
    assert (cfg.q, cfg.flush_interval_s, cfg.per_expert_series, cfg.ring_steps) == (3.0, 0.5, True, 64)
    assert isinstance(cfg.q, float)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"qq": 5}, "unknown key 'qq'. Did you mean 'q'?"),
        ({"q": 0.5}, "moe_reuse.q: 0.5 is out of range; accepted: 1.0 to 1000.0"),
        ({"q": "5"}, "moe_reuse.q: expected a float, got '5'"),
        ({"ring_steps": 2.5}, "moe_reuse.ring_steps: expected a int, got 2.5"),
        ({"enabled": 1}, "moe_reuse.enabled: expected true or false, got 1"),
        ({"hardware": 3}, "moe_reuse.hardware: expected a string, got 3"),
        ([1], "moe_reuse: expected a JSON object"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value)


def test_unknown_key_lists_accepted_keys() -> None:
    with pytest.raises(ConfigError, match="Accepted keys: .*flush_interval_s.*per_expert_series"):
        parse_config({"zzz": 1})
