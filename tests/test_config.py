"""`--additional-config '{"moe_reuse": {...}}'`: strict parsing and the start-up checks.

Every bad configuration gets one exact message naming the key and the fix. The table covers what
the JSON alone shows (`parse_config`) and what needs a file or the served model
(`validate_for_model`, run in the front end before any worker is spawned).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moe_reuse.plugin import faults
from moe_reuse.plugin.config import (
    ConfigError,
    PluginConfig,
    config_from_additional,
    describe_keys,
    parse_config,
)
from moe_reuse.plugin.config_checks import (
    check_routing_baseline,
    max_ring_steps,
    model_shape,
    ring_bytes,
    validate_for_model,
)
from moe_reuse.plugin.harness.tiny_models import model_facts, model_spec

# every documented key, sorted (other features add keys; the message must list them all)
ACCEPTED = "Accepted keys: " + ", ".join(sorted(k for k, _, _ in describe_keys()))
PRESETS = "auto, b200, h100-sxm, h200, mi300x, paper-reference, or a path to a hardware JSON file"
BASELINE_FIX = 'save one with `moe-reuse baseline save --out FILE`, or set "" to disable drift'


def served(name: str = "qwen3-moe") -> dict[str, Any]:
    """The front end's summary of a served model, as plain data (no server needed)."""
    f = model_facts(name)
    return {"model": name, "num_layers": f.num_layers, "num_experts": f.num_experts,
            "top_k": f.top_k, "hf_config": model_spec(name)["config"]}


def test_absent_means_not_enabled_and_empty_means_defaults() -> None:
    assert config_from_additional({}) is None
    assert config_from_additional(None) is None
    assert config_from_additional({"other_plugin": {}}) is None
    assert config_from_additional({"moe_reuse": {}}) == PluginConfig()


def test_values_are_typed_and_ints_accepted_for_floats() -> None:
    cfg = parse_config({"q": 3, "flush_interval_s": 0.5, "per_expert_series": True, "ring_steps": 64})
    assert (cfg.q, cfg.flush_interval_s, cfg.per_expert_series, cfg.ring_steps) == (3.0, 0.5, True, 64)
    assert isinstance(cfg.q, float)
    assert parse_config({"otlp_endpoint": "https://otel.example:4318/v1/metrics"}).otlp_endpoint


# (raw moe_reuse object, exact message): what the JSON alone shows.
PARSE_CASES: list[tuple[Any, str]] = [
    (None, "moe_reuse: null is not a configuration; use {} for every default, or leave the "
           "moe_reuse key out to keep the plugin off"),
    ([1], 'moe_reuse: expected a JSON object such as {} or {"q": 5}, got [1]'),
    ("{}", 'moe_reuse: expected a JSON object such as {} or {"q": 5}, got "{}"'),
    ({"qq": 5}, f"moe_reuse: unknown key 'qq'. Did you mean 'q'? {ACCEPTED}"),
    ({"flush_interval": 1},
     f"moe_reuse: unknown key 'flush_interval'. Did you mean 'flush_interval_s'? {ACCEPTED}"),
    ({"per_expert": True},
     f"moe_reuse: unknown key 'per_expert'. Did you mean 'per_expert_series'? {ACCEPTED}"),
    ({"zzz": 1}, f"moe_reuse: unknown key 'zzz'. {ACCEPTED}"),
    ({"inject_fault_after_steps": 3},
     "moe_reuse: 'inject_fault_after_steps' is not a key any more; it is a testing knob: set the "
     "environment variable MOE_REUSE_INJECT_FAULT=step:N instead (plugin/faults.py)"),
    ({"enabled": 1}, "moe_reuse.enabled: expected true or false, got 1"),
    ({"enabled": "yes"}, 'moe_reuse.enabled: expected true or false, got "yes"'),
    ({"per_expert_series": None}, "moe_reuse.per_expert_series: expected true or false, got null"),
    ({"q": "5"}, 'moe_reuse.q: expected a number, got "5"'),
    ({"q": True}, "moe_reuse.q: expected a number, got true"),
    ({"q": 0.5}, "moe_reuse.q: 0.5 is out of range; accepted: 1.0 to 1000.0"),
    ({"q": float("nan")}, "moe_reuse.q: NaN is out of range; accepted: 1.0 to 1000.0"),
    ({"ring_steps": 2.5}, "moe_reuse.ring_steps: expected an integer, got 2.5"),
    ({"ring_steps": -1}, "moe_reuse.ring_steps: -1 is out of range; accepted: 0 to 65536"),
    ({"ring_steps": 10**6}, "moe_reuse.ring_steps: 1000000 is out of range; accepted: 0 to 65536"),
    ({"max_expert_series": 0}, "moe_reuse.max_expert_series: 0 is out of range; accepted: 1 to 100000"),
    ({"flush_interval_s": 0}, "moe_reuse.flush_interval_s: 0 is out of range; accepted: 0.01 to 60.0"),
    ({"cold_fraction": 1.5}, "moe_reuse.cold_fraction: 1.5 is out of range; accepted: 0.0 to 1.0"),
    ({"otlp_interval_s": [10]}, "moe_reuse.otlp_interval_s: expected a number, got [10]"),
    ({"window_s": 2, "flush_interval_s": 5},
     "moe_reuse.window_s: 2.0 is shorter than flush_interval_s 5.0; a window closes on a flush, "
     "so make window_s at least flush_interval_s"),
    ({"hardware": 3}, "moe_reuse.hardware: expected a string, got 3"),
    ({"hardware": " "},
     'moe_reuse.hardware: empty; use "auto", a preset name or a path to a hardware JSON file'),
    ({"routing_baseline": False}, "moe_reuse.routing_baseline: expected a string, got false"),
    ({"otlp_endpoint": "collector:4318"},
     'moe_reuse.otlp_endpoint: "collector:4318" is not an http(s) URL; expected e.g. '
     '"http://collector:4318/v1/metrics", or "" to disable OpenTelemetry'),
    ({"otlp_endpoint": "http://"},
     'moe_reuse.otlp_endpoint: "http://" is not an http(s) URL; expected e.g. '
     '"http://collector:4318/v1/metrics", or "" to disable OpenTelemetry'),
    ({"otlp_endpoint": "http://collector:port/v1/metrics"},
     'moe_reuse.otlp_endpoint: "http://collector:port/v1/metrics" is not an http(s) URL; expected '
     'e.g. "http://collector:4318/v1/metrics", or "" to disable OpenTelemetry'),
    ({"cuda_comm_timing": "events"},
     'moe_reuse.cuda_comm_timing: "events" is not a mode; accepted: "off" (the default) or '
     '"device" (time collectives with the GPU clock)'),
    ({"cuda_comm_timing": True}, "moe_reuse.cuda_comm_timing: expected a string, got true"),
]


@pytest.mark.parametrize("raw, message", PARSE_CASES, ids=[m[:48] for _, m in PARSE_CASES])
def test_bad_json_gets_the_exact_message(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_additional({"moe_reuse": raw})
    assert str(err.value) == message


def _baseline(path: Path, experts: int, layer_ids: list[int], **extra: Any) -> str:
    body = {"version": 1, "kind": "moe_reuse_routing_baseline", "num_experts": experts,
            "top_k": 2, "phase": "decode", "tokens": 100, "source": "test",
            "layers": {str(i): [1.0] * experts for i in layer_ids}, **extra}
    path.write_text(json.dumps(body))
    return str(path)


def _file_cases(tmp: Path) -> list[tuple[dict[str, Any], str]]:
    """(moe_reuse object, exact message) for the checks that need a file or the model."""
    bad_hw = tmp / "hw.json"
    bad_hw.write_text(json.dumps({"name": "x", "hbm_bandwidth_tb_per_s": 1.0}))
    not_json = tmp / "broken.json"
    not_json.write_text("{not json")
    unreadable = tmp / "dir.json"
    unreadable.mkdir()
    other = "; it was saved from another model: " + BASELINE_FIX
    qwen = served()["model"]
    from moe_reuse.predictor import load_hardware_file
    from moe_reuse.predictor.errors import SpecError

    with pytest.raises(SpecError) as hw_err:
        load_hardware_file(bad_hw)
    return [
        ({"hardware": "h20"}, f"moe_reuse.hardware: unknown preset 'h20'. Did you mean 'h200'? "
                              f"Accepted: {PRESETS}"),
        ({"hardware": "H100"}, "moe_reuse.hardware: unknown preset 'H100'. Did you mean "
                               f"'h100-sxm'? Accepted: {PRESETS}"),
        ({"hardware": "tpu"}, f"moe_reuse.hardware: unknown preset 'tpu'. Accepted: {PRESETS}"),
        ({"hardware": str(tmp / "missing.json")},
         f"moe_reuse.hardware: no file at {tmp / 'missing.json'}; give an existing hardware JSON "
         f"file (`moe-reuse calibrate` writes one) or one of: {PRESETS}"),
        ({"hardware": str(bad_hw)},
         f"moe_reuse.hardware: {bad_hw} is not a valid hardware spec: {hw_err.value}"),
        ({"routing_baseline": str(tmp / "nodir" / "nope.json")},
         f"moe_reuse.routing_baseline: no file at {tmp / 'nodir' / 'nope.json'} and no directory "
         f"{tmp / 'nodir'} to save one in; {BASELINE_FIX}"),
        ({"routing_baseline": str(unreadable)},
         f"moe_reuse.routing_baseline: cannot read {unreadable}: Is a directory"),
        ({"routing_baseline": str(not_json)},
         f"moe_reuse.routing_baseline: {not_json} is not valid JSON (Expecting property name "
         f"enclosed in double quotes at line 1); {BASELINE_FIX}"),
        ({"routing_baseline": str(bad_hw)},
         f"moe_reuse.routing_baseline: {bad_hw} is not a routing baseline (no "
         f"kind='moe_reuse_routing_baseline'); {BASELINE_FIX}"),
        ({"routing_baseline": _baseline(tmp / "e16.json", 16, [0, 1, 2, 3])},
         f"moe_reuse.routing_baseline: {tmp / 'e16.json'} has 16 experts per layer but {qwen} has "
         f"8{other}"),
        ({"routing_baseline": _baseline(tmp / "l3.json", 8, [1, 2, 3])},
         f"moe_reuse.routing_baseline: {tmp / 'l3.json'} has 3 MoE layers but {qwen} has 4{other}"),
        ({"routing_baseline": _baseline(tmp / "l9.json", 8, [0, 1, 2, 9])},
         f"moe_reuse.routing_baseline: {tmp / 'l9.json'} has layer 9 but {qwen} has 4 layers{other}"),
        ({"routing_baseline": _baseline(tmp / "short.json", 8, [0], layers={"0": [1.0, 2.0]})},
         f"moe_reuse.routing_baseline: {tmp / 'short.json'} layer '0' must be a layer index with 8 "
         f"values; {BASELINE_FIX}"),
        ({"ring_steps": 65536},
         f"moe_reuse.ring_steps: 65536 steps need 27 MiB of device counters for {qwen} (4 MoE "
         "layers x 8 experts: 0.4 KiB per step), over the 16 MiB budget; use at most 38836, or 0 "
         "to size it automatically"),
    ]


def test_bad_files_and_model_mismatches_get_the_exact_message(tmp_path: Path) -> None:
    cases = _file_cases(tmp_path)
    assert len(PARSE_CASES) + len(cases) >= 25
    for raw, message in cases:
        cfg = parse_config(raw)  # syntactically fine: only the start-up check can tell
        with pytest.raises(ConfigError) as err:
            validate_for_model(cfg, served())
        assert str(err.value) == message, raw


def test_good_files_and_presets_pass(tmp_path: Path) -> None:
    hw = tmp_path / "hw.json"
    hw.write_text(Path(__file__).parents[1].joinpath("predictor/data/hardware/h200.json").read_text())
    ok = _baseline(tmp_path / "ok.json", 8, [0, 1, 2, 3])
    for raw in ({}, {"hardware": "H200"}, {"hardware": str(hw)}, {"routing_baseline": ok},
                {"ring_steps": 38836}, {"enabled": False, "hardware": "nonsense-but-inert"}):
        validate_for_model(parse_config(raw), served())


def test_model_dependent_checks_follow_the_model() -> None:
    """The same ring size is fine for a small model and too big for DeepSeek-V3's shape; an
    unknown model shape skips the checks that need it rather than guessing."""
    ds = {"model": "ds", "num_layers": 61, "num_experts": 256}
    ds_cfg = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
              "num_attention_heads": 128, "vocab_size": 129280, "n_routed_experts": 256,
              "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "intermediate_size": 18432,
              "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_shared_experts": 1,
              "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
              "qk_rope_head_dim": 64, "v_head_dim": 128}
    shape = model_shape({**ds, "hf_config": ds_cfg})
    assert (shape.num_layers, shape.moe_layers, shape.num_experts) == (61, 58, 256)
    assert max_ring_steps(58, 256) == 16 * 2**20 // ring_bytes(58, 256, 1) == 93
    with pytest.raises(ConfigError, match="use at most 93"):
        validate_for_model(parse_config({"ring_steps": 512}), {**ds, "hf_config": ds_cfg})
    validate_for_model(parse_config({"ring_steps": 512}), served())
    validate_for_model(parse_config({"ring_steps": 512}), {"model": "unknown"})
    # a baseline's expert count is still checked when only vLLM's figures are known
    assert model_shape({"num_experts": 8}).moe_layers is None


def test_baseline_check_accepts_a_baseline_of_this_model(tmp_path: Path) -> None:
    f = model_facts("llama4")  # MoE on every second layer: ids 1 and 3
    path = _baseline(tmp_path / "b.json", f.num_experts, list(f.moe_layer_indices))
    check_routing_baseline(path, model_shape(served("llama4")))


def test_bad_fault_knob_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "stepp:3")
    with pytest.raises(ConfigError) as err:
        validate_for_model(PluginConfig(), served())
    assert str(err.value) == (
        "MOE_REUSE_INJECT_FAULT: unknown stage 'stepp'; accepted: bind, step, flush, "
        "snapshot_write, live_window, otlp_push, collector")
    monkeypatch.delenv(faults.ENV)
    faults.reset()


def test_the_testing_knob_is_not_a_documented_key() -> None:
    assert "inject_fault_after_steps" not in {k for k, _, _ in describe_keys()}
    readme = Path(__file__).parents[1].joinpath("README.md").read_text()
    assert "inject_fault" not in readme
