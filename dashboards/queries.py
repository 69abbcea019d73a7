"""Read the PromQL out of generated dashboards, and make it runnable outside Grafana.

The dashboard tests use this to check every query against the sidecar's metric catalog; the
end-to-end test uses ``render_for_prometheus`` to send each panel's query to a real Prometheus,
which does not know Grafana's ``$__rate_interval`` (and ``_ms``) / ``$__range`` macros.
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


_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _milliseconds(duration: str) -> str:
    """``"5s"`` -> ``"5000"``, as Grafana renders ``$__rate_interval_ms`` (one unit only)."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", duration)
    if match is None:
        raise ValueError(f"not a duration Grafana would render: {duration!r}")
    return str(int(match.group(1)) * _UNIT_MS[match.group(2)])


def render_for_prometheus(expr: str, *, interval: str = "15s", rate_interval: str = "1m",
                          range_: str = "5m", namespace: str = ".*") -> str:
    """Replace the Grafana macros our dashboards use with fixed durations, and the ``$namespace``
    variable with a regex (``.*`` is its "All"; one namespace, or ``a|b`` as Grafana renders a
    multi-value selection)."""
    expr = expr.replace("${namespace}", namespace).replace("$namespace", namespace)
    # the _ms forms first: "$__rate_interval" is a prefix of "$__rate_interval_ms"
    for macro, value in (("$__rate_interval_ms", _milliseconds(rate_interval)),
                         ("${__rate_interval_ms}", _milliseconds(rate_interval)),
                         ("$__interval_ms", _milliseconds(interval)),
                         ("${__interval_ms}", _milliseconds(interval)),
                         ("$__rate_interval", rate_interval), ("${__rate_interval}", rate_interval),
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
