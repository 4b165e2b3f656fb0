"""The "Hardware" row: HBM bandwidth (achieved, measured by the GPU, modelled) and the MoE
collectives' share of a step.

Layout only: every expression comes from `queries`, scoped to the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    common,
    stat,
    timeseries,
)
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    StackingMode,
)

from .. import queries as q
from ..config import Config
from ..panels import (
    DATASOURCE,
    target,
    timeseries_panel,
)


def hbm_bandwidth_achieved_vs_peak(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
            "HBM bandwidth: achieved vs peak",
            "Bytes the steps had to read from HBM (given the actual routing) divided by the "
            "steps' wall time, against the hardware's spec peak.",
            "Bps",
        )
        .with_target(target(q.hbm_achieved_bandwidth(s), "achieved r{{rank}}", "A"))
        .with_target(target(q.hbm_peak_bandwidth(s), "peak r{{rank}}", "B"))
    )


def hbm_bandwidth_measured_vs_modelled(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
            "HBM bandwidth: measured (GPM) vs modelled",
            "`measured`: the HBM traffic the GPU itself counted (NVML GPU performance monitoring, "
            "Hopper and newer: reads and writes of the whole device, other processes included) "
            "over wall time; `modelled`: the bytes the byte model says the steps had to read, "
            "over the same wall time. Measured at or above modelled is expected. No measured "
            "series where the GPU is not measured: see 'HBM measurement'.",
            "Bps",
            w=12,
        )
        .with_target(target(q.hbm_measured_bandwidth(s), "measured r{{rank}}", "A"))
        .with_target(target(q.hbm_modelled_bandwidth(s), "modelled r{{rank}}", "B"))
    )


def hbm_modelled_share(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("HBM traffic the byte model explains")
        .description(
            "Modelled HBM reads / measured HBM traffic (GPM), over wall time. Near 100% the "
            "byte model accounts for what the memory system moved; well below, something it "
            "does not model moves bytes (writes, activations, other processes on the GPU). Empty "
            "where the GPU is not measured."
        )
        .unit("percentunit")
        .decimals(0)
        .datasource(DATASOURCE)
        .with_target(target(q.hbm_modelled_over_measured(s), "r{{rank}}"))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.NONE)
        .height(8)
        .span(6)
    )


def hbm_measurement(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("HBM measurement")
        .description(
            "Whether each rank's GPU measures its HBM bandwidth, and why not: gpm (measuring), "
            "nvml_missing (pip install nvidia-ml-py), nvml_failed, device_not_found, "
            "gpm_unsupported (pre-Hopper, or GPM disabled), not_cuda (not an NVIDIA GPU). "
            "docs/metrics.md has each reason's fix."
        )
        .unit("none")
        .datasource(DATASOURCE)
        .with_target(target(q.hbm_measurement(s), "r{{rank}}: {{reason}}", instant=True))
        .text_mode(BigValueTextMode.NAME)
        .color_mode(BigValueColorMode.NONE)
        .graph_mode(BigValueGraphMode.NONE)
        .height(8)
        .span(6)
    )


def hbm_bytes_per_step(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return (
        timeseries_panel(
            "HBM bytes per step",
            "HBM bytes read per step by component (routed and shared experts, dense FFN, "
            "attention, embedding, KV cache); the parts stack to the total.",
            "bytes",
        )
        .with_target(target(q.hbm_bytes_per_step_by_component(s), "{{component}} r{{rank}}"))
        .stacking(common.StackingConfig().mode(StackingMode.NORMAL))
        .fill_opacity(30)
    )


def moe_comm_share_of_step_time(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return timeseries_panel(
        "MoE all-to-all / all-reduce share of step time",
        "Time in the MoE layers' collectives (EP all-to-all dispatch+combine, TP output "
        "all-reduce) as a share of step time. 0 when the deployment has no MoE collective "
        '(moe_reuse_moe_comm_info{mode="none"}).',
        "percentunit",
    ).with_target(target(q.moe_comm_share(s), "r{{rank}}"))
