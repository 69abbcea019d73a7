"""Read the PromQL out of generated dashboards, and make it runnable outside Grafana.

The dashboard tests use this to check every query against the sidecar's metric catalog; the
end-to-end test uses ``render_for_prometheus`` to send each panel's query to a real Prometheus,
which does not know Grafana's ``$__rate_interval`` / ``$__range`` macros.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# PromQL tokens we can find without a full parser: our own metric names all carry the prefix.
_METRIC = re.compile(r"\b(pathwatch_[a-zA-Z0-9_]+|up)\b(?!\s*\()")
_SELECTOR = re.compile(r"\b(pathwatch_[a-zA-Z0-9_]+|up)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_MATCHER_VALUE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data: rows are skipped, panels inside collapsed rows are included."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def render_for_prometheus(expr: str, *, interval: str = "15s", rate_interval: str = "1m",
                          range_: str = "5m") -> str:
    """Replace the Grafana macros our dashboards use with fixed durations."""
    for macro, value in (("$__rate_interval", rate_interval), ("${__rate_interval}", rate_interval),
                         ("$__interval", interval), ("${__interval}", interval),
                         ("$__range", range_), ("${__range}", range_)):
        expr = expr.replace(macro, value)
    if "$" in expr:
        raise ValueError(f"unrendered Grafana variable left in query: {expr}")
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names (``pathwatch_*`` and ``up``) an expression reads."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names matched inside its braces) for every ``metric{...}`` selector."""
    return [(name, set(_MATCHER.findall(body))) for name, body in _SELECTOR.findall(expr)]


def selector_matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) for every quoted matcher inside a ``metric{...}`` selector."""
    return [(name, label, op, value) for name, body in _SELECTOR.findall(expr)
            for label, op, value in _MATCHER_VALUE.findall(body)]


def grouping_labels(expr: str) -> set[str]:
    """Label names used in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    labels: set[str] = set()
    for body in _GROUPING.findall(_STRING.sub('""', expr)):
        labels.update(part.strip() for part in body.split(",") if part.strip())
    return labels
