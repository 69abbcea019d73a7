"""Small factories over grafana-foundation-sdk builders, so every panel is made the same way.

Every panel and every query point at the ``${datasource}`` variable; every panel gets an explicit id
(the generated JSON must not change between runs, and links to ``viewPanel=<id>`` must stay valid).
Every metric selector of every query is scoped to the ``$namespace`` variable (``scoped()``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

DATASOURCE_VARIABLE = "datasource"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${%s}" % DATASOURCE_VARIABLE)
TAG = "pathwatch"
# The namespace the prometheus-operator's PodMonitor / ServiceMonitor put on a sidecar's series (the
# alert rules keep it apart): a multi-select over the namespaces of pathwatch_build_info, which every
# sidecar exports. "All" is `.*`, which also matches a series without the label (a plain Prometheus
# scrape config sets none), so the dashboards work there too.
NAMESPACE_VARIABLE = "namespace"
NAMESPACE_MATCHER = 'namespace=~"$%s"' % NAMESPACE_VARIABLE
_METRIC_SELECTOR = re.compile(r"\b(pathwatch_[a-zA-Z0-9_]+)\b(?!\s*\()(\{([^}]*)\})?")


def scoped(expr: str) -> str:
    """Add the ``$namespace`` matcher to every ``pathwatch_*`` selector of a query."""
    def scope(match: re.Match[str]) -> str:
        name, body = match.group(1), match.group(3)
        if not body:
            return f"{name}{{{NAMESPACE_MATCHER}}}"
        if "namespace" in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body):
            raise ValueError(f"{expr}: the namespace comes from the ${NAMESPACE_VARIABLE} variable")
        return f"{name}{{{NAMESPACE_MATCHER},{body}}}"
    return _METRIC_SELECTOR.sub(scope, expr)

# Colours by meaning, not by taste: green = fine, orange = look at it, red = act.
GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = "__auto"
    exemplar: bool = False  # findings carry the trace id as exemplar: a dot links to the trace
    instant: bool = False


def thresholds(base: str, *steps: tuple[float, str]) -> dash.ThresholdsConfig:
    """``thresholds(GREEN, (1, RED))``: green below 1, red from 1 up."""
    return (dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color=base)]
                   + [Threshold(value=value, color=color) for value, color in steps]))


def _targets(queries: Sequence[Query]) -> list[Dataquery]:
    ref_ids = "ABCDEFGH"
    if len(queries) > len(ref_ids):
        raise ValueError(f"a panel takes at most {len(ref_ids)} queries, got {len(queries)}")
    targets = []
    for ref_id, query in zip(ref_ids, queries):
        target = (Dataquery().expr(scoped(query.expr)).legend_format(query.legend).ref_id(ref_id)
                  .datasource(DATASOURCE).exemplar(query.exemplar))
        targets.append(target.instant() if query.instant else target.range())
    return targets


PanelBuilder = TypeVar("PanelBuilder", timeseries.Panel, stat.Panel, bargauge.Panel)


def _common(builder: PanelBuilder, panel_id: int, title: str, description: str,
            queries: Sequence[Query], unit: str, limits: dash.ThresholdsConfig, width: int,
            height: int) -> PanelBuilder:
    if not queries:
        raise ValueError(f"panel {panel_id} ({title!r}) has no query")
    return (builder.id(panel_id).title(title).description(description).datasource(DATASOURCE)
            .targets(_targets(queries)).unit(unit).thresholds(limits).span(width).height(height))


def timeseries_panel(panel_id: int, title: str, description: str, queries: Sequence[Query], *,
                     unit: str = "short", limits: dash.ThresholdsConfig | None = None,
                     bars: bool = False, min_value: float | None = 0, max_value: float | None = None,
                     width: int = 12, height: int = 8) -> timeseries.Panel:
    panel = _common(timeseries.Panel(), panel_id, title, description, queries, unit,
                    limits or thresholds(GREEN), width, height)
    panel = (panel.line_width(1).fill_opacity(10)
             .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
             .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.TABLE)
                     .placement(common.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"])))
    if limits is not None:
        # draw the thresholds as a line so "above one" or "below 90 %" reads at a glance
        panel = panel.thresholds_style(
            GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED))
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    return panel


def stat_panel(panel_id: int, title: str, description: str, queries: Sequence[Query], *,
               unit: str = "short", limits: dash.ThresholdsConfig | None = None,
               width: int = 6, height: int = 8) -> stat.Panel:
    panel = _common(stat.Panel(), panel_id, title, description, queries, unit,
                    limits or thresholds(GREEN), width, height)
    return (panel.graph_mode(common.BigValueGraphMode.AREA)
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def bargauge_panel(panel_id: int, title: str, description: str, queries: Sequence[Query], *,
                   unit: str = "short", limits: dash.ThresholdsConfig | None = None,
                   width: int = 12, height: int = 8) -> bargauge.Panel:
    panel = _common(bargauge.Panel(), panel_id, title, description, queries, unit,
                    limits or thresholds(GREEN), width, height)
    return (panel.display_mode(common.BarGaugeDisplayMode.BASIC)
            .orientation(common.VizOrientation.HORIZONTAL).show_unfilled(True).min(0)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))


def row(panel_id: int, title: str) -> dash.Row:
    return dash.Row(title).id(panel_id)


def new_dashboard(uid: str, title: str, description: str) -> dash.Dashboard:
    return (dash.Dashboard(title).uid(uid).description(description).tags([TAG])
            .editable().tooltip(DashboardCursorSync.CROSSHAIR).timezone("browser")
            .time("now-1h", "now").refresh("30s")
            .with_variable(dash.DatasourceVariable(DATASOURCE_VARIABLE).label("Data source")
                           .type("prometheus"))
            .with_variable(dash.QueryVariable(NAMESPACE_VARIABLE).label("Namespace")
                           .description("Namespaces of the sidecars (pathwatch_build_info); All also "
                                        "shows series without a namespace label.")
                           .query(f"label_values(pathwatch_build_info, {NAMESPACE_VARIABLE})")
                           .datasource(DATASOURCE).multi(True).include_all(True).all_value(".*")
                           .current(VariableOption(selected=True, text="All", value="$__all"))
                           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                           .sort(VariableSort.ALPHABETICAL_ASC))
            .link(dash.DashboardLink("pathwatch").type(DashboardLinkType.DASHBOARDS).tags([TAG])
                  .as_dropdown(True).include_vars(True).keep_time(True)))
