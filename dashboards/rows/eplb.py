"""The "Expert parallelism" row: what the EP advisor says a rebalance would gain.

Layout only: every expression comes from `queries`, scoped to the template variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    stat,
    timeseries,
)
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
)

from .. import queries as q
from ..config import Config
from ..panels import (
    DATASOURCE,
    UNIT_TIMES,
    UNIT_TOKENS,
    target,
    timeseries_panel,
)


def eplb_gain(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return timeseries_panel(
        "What EPLB would buy",
        "Predicted MoE time per decode step now / after vLLM's EPLB policy rebalances the "
        "experts on the live routing, for the served EP deployment and the what-if EP sizes "
        "(advisor_ep_sizes). Above 1 rebalancing helps; below 1 its replicas add more weight "
        f"reads than they save. MoeReuseRebalanceWouldHelp fires above "
        f"{1 + cfg.eplb_help_margin:g}x (served).",
        UNIT_TIMES,
    ).with_target(target(q.eplb_gain(s), "{{deployment}} EP{{ep}} r{{rank}}", "A")).with_target(
        target(q.eplb_net_gain(s), "EPLB on vs off, EP{{ep}} r{{rank}}", "B")
    )


def ep_balancedness(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return timeseries_panel(
        "EP balancedness",
        "Mean over max EP-rank load (vLLM's balancedness, 1 = every rank equally loaded) of the "
        "current placement and of the placement EPLB would choose, per deployment and EP size.",
        "percentunit",
    ).with_target(target(q.ep_balancedness(s), "{{deployment}} EP{{ep}} {{placement}}"))


def ep_rank_load(cfg: Config) -> timeseries.Panel:
    s = q.dashboard_scope(cfg)
    return timeseries_panel(
        "Load per EP rank (served)",
        "Token-expert assignments per decode step on each EP rank of the served placement, "
        "summed over MoE layers. Empty when expert parallelism is off.",
        UNIT_TOKENS,
    ).with_target(target(q.ep_rank_tokens(s), "EP rank {{ep_rank}} of {{ep}} (r{{rank}})"))


def eplb_deciding_term(cfg: Config) -> stat.Panel:
    s = q.dashboard_scope(cfg)
    return (
        stat.Panel()
        .title("What decides")
        .unit("none")
        .description(
            "rank_load: compute-bound steps, the slowest rank's load sets the MoE time; "
            "replica_reads: bandwidth-bound steps, the weight reads of every touched replica do."
        )
        .datasource(DATASOURCE)
        .with_target(
            target(q.eplb_deciding_term(s), "{{deployment}} EP{{ep}}: {{term}}", instant=True)
        )
        .text_mode(BigValueTextMode.NAME)
        .color_mode(BigValueColorMode.NONE)
        .graph_mode(BigValueGraphMode.NONE)
        .height(8)
        .span(6)
    )
