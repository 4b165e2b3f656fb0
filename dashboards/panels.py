"""Small helpers shared by the dashboards: datasource reference, targets, template variables, and
the threshold, legend and time-series defaults every row uses (one look across rows)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE_VAR = "datasource"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VAR + "}")

# Custom Grafana units (the built-in list has no "times" or "tokens").
UNIT_TIMES = "suffix:×"
UNIT_TOKENS = "suffix: tok"
UNIT_TOKENS_PER_EXPERT = "suffix: tok/expert"
UNIT_EXPERTS = "suffix: experts"


def target(
    expr: str, legend: str = "", ref_id: str = "A", instant: bool = False
) -> prometheus.Dataquery:
    """One Prometheus query of a panel."""
    t = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(DATASOURCE)
    if legend:
        t = t.legend_format(legend)
    return t.instant() if instant else t.range()


def datasource_variable() -> dashboard.DatasourceVariable:
    return (
        dashboard.DatasourceVariable(DATASOURCE_VAR)
        .label("Data source")
        .type("prometheus")
        .current(VariableOption(selected=True, text="default", value="default"))
    )


def label_variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    """A multi-value variable over a label's values, `.*` for All."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def template_variables() -> list[dashboard.DatasourceVariable | dashboard.QueryVariable]:
    """datasource, model, engine, rank; each filtered by the ones before it."""
    return [
        datasource_variable(),
        label_variable("model", "Model", "label_values(moe_reuse_info, model)"),
        label_variable("engine", "Engine", 'label_values(moe_reuse_info{model=~"$model"}, engine)'),
        label_variable(
            "rank",
            "Rank",
            'label_values(moe_reuse_info{model=~"$model", engine=~"$engine"}, rank)',
        ),
    ]


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=v, color=c) for v, c in steps])
    )


def legend() -> common.VizLegendOptions:
    return (
        common.VizLegendOptions()
        .display_mode(LegendDisplayMode.LIST)
        .placement(LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def timeseries_panel(
    title: str, description: str, unit: str, h: int = 8, w: int = 8
) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .legend(legend())
        .height(h)
        .span(w)
    )
