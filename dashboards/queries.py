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


_AGGREGATION = re.compile(
    r"\b(?:sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)\s*"
    r"(?:(by|without)\s*\(([^)]*)\)\s*)?\(")
_CONSTANT_LABEL = re.compile(
    r'label_replace\s*\(.*?,\s*"([a-zA-Z_][a-zA-Z0-9_]*)"\s*,\s*"((?:[^"\\]|\\.)*)"\s*,\s*""\s*,'
    r'\s*""\s*\)', re.S)


def _blank_strings(expr: str) -> str:
    """The expression with every string's content blanked, its length and offsets kept."""
    return _STRING.sub(lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)


def or_terms(expr: str) -> list[str]:
    """The operands of an expression's top-level ``or`` (outside any parentheses); ``[expr]`` if
    it has none. Each is a union of its own: an alert fires with each one's labels."""
    blank = _blank_strings(expr)
    depth, start, terms = 0, 0, []
    for match in re.finditer(r"[()]|\bor\b", blank):
        if match.group() == "(":
            depth += 1
        elif match.group() == ")":
            depth -= 1
        elif depth == 0:
            terms.append(expr[start:match.start()].strip())
            start = match.end()
    terms.append(expr[start:].strip())
    return terms


def result_labels(expr: str) -> set[str] | None:
    """The labels an expression's result keeps, as far as its aggregations tell: the ``by`` labels
    of its outermost aggregations (those fewest parentheses deep; one without ``by`` keeps none),
    or None if it aggregates nothing (its series' labels pass through). Read one ``or_terms()``
    operand at a time. Not a parser: ``without`` and a ``by`` after the aggregation's argument are
    refused rather than misread."""
    blank = _blank_strings(expr)
    if re.search(r"\)\s*by\s*\(", blank):
        raise ValueError(f"a `by` after the aggregation's argument: {expr}")
    found: list[tuple[int, set[str]]] = []
    for match in _AGGREGATION.finditer(blank):
        if match.group(1) == "without":
            raise ValueError(f"`without` is not read: {expr}")
        depth = blank.count("(", 0, match.start()) - blank.count(")", 0, match.start())
        labels = {part.strip() for part in (match.group(2) or "").split(",") if part.strip()}
        found.append((depth, labels))
    if not found:
        return None
    outermost = min(depth for depth, _ in found)
    return set().union(*(labels for depth, labels in found if depth == outermost))


def constant_labels(expr: str) -> dict[str, str]:
    """Labels an expression sets to a constant itself: ``label_replace(v, "dst", "value", "", "")``."""
    return dict(_CONSTANT_LABEL.findall(expr))
