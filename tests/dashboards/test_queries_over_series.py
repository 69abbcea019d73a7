"""Panel queries evaluated exactly over synthetic series (promtool): their tails and edges.

A live Prometheus sees an edge only when a scrape happens to fall on it; ``promtool test rules``
evaluates PromQL over chosen samples at chosen times, so these tests pin what a panel reads right
after a burst, while idle, and on series born between two scrapes. 15 s scrapes, the rate interval
rendered as 1 m (Grafana's ``$__rate_interval`` for them).
"""

from __future__ import annotations

from dashboards.queries import iter_panels, render_for_prometheus
from tests.dashboards.tooling import load_dashboard, promql_mismatches

TARGET = 'job="pathwatch",instance="pod-a:9464"'
EMITTED = f'pathwatch_events_emitted_total{{event_type="agent_started",{TARGET}}}'
UNDELIVERED = ('pathwatch_events_undelivered_total{event_type="agent_started",reason="no_connection",'
               f'{TARGET}}}')
BUILD_INFO = f'pathwatch_build_info{{service_version="test",{TARGET}}}'


def panel_query(dashboard: str, title: str) -> str:
    [expr] = [t["expr"] for p in iter_panels(load_dashboard(dashboard)) if p["title"] == title
              for t in p["targets"]]
    return expr


def created(total: str) -> str:
    return total.replace("_total{", "_created{", 1)


def rounded(expr: str) -> str:
    """Rates over extrapolated windows are not exact: compare to 1e-4 (+Inf stays +Inf)."""
    return f"round({render_for_prometheus(expr, rate_interval='1m')}, 0.0001)"


# An event is counted undelivered a deadline plus allowance (8 s by default) after its emit is
# counted, so a scrape can fall between the two: the undelivered ones stay in the rate window a
# scrape longer than the emits. name: (series, times 1 of 10 is undelivered, the tail's times)
# (sample i is at i * 15 s: 41 is 10m15s)
UNDELIVERED_TAILS = {
    # old series: 10 emits counted by the 10m15s scrape, 1 of them undelivered by the 10m30s one
    "a burst on old series": (
        [(EMITTED, "100x40 110x40"), (created(EMITTED), "0x80"),
         (UNDELIVERED, "5x41 6x39"), (created(UNDELIVERED), "0x80"), (BUILD_INFO, "1x80")],
        ("10m30s", "10m45s", "11m"), ("11m5s", "11m15s")),
    # the clean-clone CI's case: an event type's first 10 emits (series born at 10m, scraped at
    # 10m15s) and its first undelivered one (born 8 s later, scraped at 10m30s)
    "the first burst, its series born a scrape apart": (
        [(EMITTED, "_x41 10x39"), (created(EMITTED), "_x41 600x39"),
         (UNDELIVERED, "_x42 1x38"), (created(UNDELIVERED), "_x42 608x38"), (BUILD_INFO, "1x80")],
        ("10m30s", "10m45s"), ("11m", "11m5s")),
}


def test_the_undelivered_ratio_reads_0_not_inf_once_a_bursts_emits_left_the_window(
        tmp_path) -> None:
    # 1 of 10 undelivered while both are in the window; then, for a scrape, only the undelivered one
    # is: undelivered / 0 read +Inf (before 572b107), the stat's last value, red. 0 from then on.
    expr = rounded(panel_query("pathwatch-delivery.json", "Undelivered ratio"))
    for name, (series, busy, tail) in UNDELIVERED_TAILS.items():
        checks = [(expr, t, {"{}": 0.1}) for t in busy]
        checks += [(expr, t, {"{}": 0.0}) for t in (*tail, "11m30s", "12m", "19m")]
        assert promql_mismatches(tmp_path, series, checks) == "", name


def test_the_undelivered_tail_series_do_reach_undelivered_over_nothing_emitted(tmp_path) -> None:
    # guards the guard: without the `> 0` on the emitted side (the query before 572b107) the same
    # series read +Inf at the tail, so the test above does see the edge
    expr = panel_query("pathwatch-delivery.json", "Undelivered ratio")
    unguarded = expr.replace(" / (sum(", " / sum(").replace(")) > 0) or on ()", ")) or on ()")
    assert unguarded.count("> 0") == expr.count("> 0") - 1, unguarded
    for name, (series, _, tail) in UNDELIVERED_TAILS.items():
        checks = [(rounded(unguarded), t, {"{}": float("inf")}) for t in tail]
        assert promql_mismatches(tmp_path, series, checks) == "", name
