"""The demo's read-out of /metrics: figures from exposition text made by prometheus-client."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from moe_reuse.plugin.harness import demo


class _Fixed:
    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self.families = families

    def collect(self):  # type: ignore[no-untyped-def]
        return iter(self.families)


def _text(speedup: float | None, measured_s: float = 0.002, predicted_s: float = 0.004) -> str:
    fams = []
    info = GaugeMetricFamily("moe_reuse_info", "x", labels=["hardware", "model"])
    info.add_metric(["cpu-generic", "m"], 1)
    fams.append(info)
    if speedup is not None:
        fams.append(GaugeMetricFamily("moe_reuse_dense_speedup_ratio", "x", value=speedup))
        fams.append(GaugeMetricFamily("moe_reuse_qs_ratio", "x", value=1.25))
        fams.append(GaugeMetricFamily("moe_reuse_routing_factor_ratio", "x", value=4))
        fams.append(GaugeMetricFamily("moe_reuse_ridge_point_tokens", "x", value=10.5))
        for name, vals in (("moe_reuse_step_seconds", {"measured": measured_s, "predicted": predicted_s}),
                           ("moe_reuse_step_bytes", {"measured": 1e6, "predicted": 2e6}),
                           ("moe_reuse_tokens_per_expert",
                            {"measured": 1.5, "predicted_distinct": 1.25, "predicted_uniform": 0.5})):
            g = GaugeMetricFamily(name, "x", labels=["source"])
            for src, v in vals.items():
                g.add_metric([src], v)
            fams.append(g)
        reg = GaugeMetricFamily("moe_reuse_ffn_regime", "x", labels=["regime"])
        reg.add_metric(["compute_bound"], 0)
        reg.add_metric(["bandwidth_bound"], 1)
        fams.append(reg)
    registry = CollectorRegistry()
    registry.register(_Fixed(fams))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_live_figures_reads_the_window_gauges() -> None:
    assert demo.live_figures(_text(None)) is None
    f = demo.live_figures(_text(0.5))
    assert f == {
        "hardware": "cpu-generic", "dense_speedup": 0.5, "qs": 1.25, "routing_factor": 4.0,
        "tpe_measured": 1.5, "tpe_predicted": 1.25, "tpe_uniform": 0.5, "compute_bound": False,
        "ridge": 10.5, "step_measured_s": 0.002, "step_predicted_s": 0.004,
        "bytes_measured": 1e6, "bytes_predicted": 2e6,
    }
    assert demo.comparison_line(f) == (
        "      predictor: tok/expert 1.25 (measured 1.50); step 4.00 ms (measured 2.00, ratio 2.00); "
        "dense twin x0.50 as fast")
    assert "no decode window closed" in demo.comparison_line(None)


def test_summary_rows_and_the_calibrate_hint() -> None:
    off = demo.summary_lines([(1, None), (8, demo.live_figures(_text(0.5)))])
    assert off[2].split() == ["c", "tok/expert", "meas/pred", "step", "ms", "meas/pred", "pred/meas",
                              "dense", "twin"]
    assert off[3].split() == ["8", "1.50", "/", "1.25", "2.00", "/", "4.00", "2.00", "x0.50"]
    assert any("moe-reuse calibrate` (a few minutes)" in ln for ln in off)
    assert "bandwidth-bound (ridge 10.5" in off[-1]
    good = demo.summary_lines([(8, demo.live_figures(_text(0.5, predicted_s=0.0021)))])
    assert not any("(a few minutes)" in ln for ln in good) and len(good) == 5
    assert "no decode window closed" in demo.summary_lines([(1, None)])[1]


def test_wave_length_is_checked_before_anything_starts() -> None:
    with pytest.raises(ValueError, match=r"wave_seconds: must be >= 5 .* got 2"):
        demo.run_demo(wave_seconds=2.0, say=lambda _m: pytest.fail("started"))


def test_cli_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from moe_reuse.plugin import cli

    assert cli.main(["demo", "--seconds", "1"]) == 2
    assert "--seconds: must be >= 5" in capsys.readouterr().err
    assert cli.main(["demo", "--waves", "1,x"]) == 2
    assert "--waves: expected comma-separated integers" in capsys.readouterr().err
