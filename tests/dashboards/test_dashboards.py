"""The checked-in dashboards: generated, well-formed, and querying only what the sidecar exports."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from dashboards.queries import (
    constant_labels,
    grouping_labels,
    iter_panels,
    metric_names,
    or_terms,
    panel_exprs,
    render_for_prometheus,
    result_labels,
    selector_labels,
    selector_matchers,
)
from sidecar.rules import CATALOG
from sidecar.testing import SidecarProcess
from tests.dashboards.catalog import (
    closed_label_values,
    sidecar_families,
    sidecar_metrics,
    target_labels,
    unknown_label_values,
)
from tests.dashboards.tooling import DASHBOARD_FILES, DASHBOARDS, load_dashboard, promtool

@pytest.fixture
def grafana_sdk() -> None:
    # a failure, not a skip: `make test` installs the `test` extra, and a skip here would leave the
    # checked-in dashboards unchecked against their generator without a word
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        pytest.fail("grafana-foundation-sdk is not installed (it is in the `test` extra: "
                    "pip install -e '.[test]')")


needs_sdk = pytest.mark.usefixtures("grafana_sdk")

EXPECTED_UIDS = {
    "pathwatch-consolidation.json": "pathwatch-consolidation",
    "pathwatch-isolation.json": "pathwatch-isolation",
    "pathwatch-delivery.json": "pathwatch-delivery",
}


def all_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every panel."""
    return [(name, panel["title"], expr)
            for name in DASHBOARD_FILES
            for panel in iter_panels(load_dashboard(name))
            for expr in panel_exprs(panel)]


def panels(name: str) -> list[dict[str, Any]]:
    return list(iter_panels(load_dashboard(name)))


@needs_sdk
@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_checked_in_json_is_what_the_generator_produces(name: str) -> None:
    from dashboards.generate import DASHBOARDS as BUILDERS
    from dashboards.generate import render

    assert (DASHBOARDS / name).read_text() == render(BUILDERS[name]), (
        f"{name} is stale: run `python -m dashboards.generate` and commit the result")


@needs_sdk
def test_check_mode_reports_a_stale_file(tmp_path, capsys) -> None:
    from dashboards.generate import main

    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    stale = tmp_path / "pathwatch-delivery.json"
    stale.write_text(stale.read_text().replace("pathwatch / delivery", "edited by hand"))
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "pathwatch-delivery.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_uid_is_stable_and_datasource_variable_is_prometheus(name: str) -> None:
    dashboard = load_dashboard(name)
    assert dashboard["uid"] == EXPECTED_UIDS[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_the_namespace_variable_is_a_multi_select_over_every_sidecar_with_all_matching_no_label(
        name: str) -> None:
    # the alert rules keep `namespace` (set by the prometheus-operator's monitors) apart; so can the
    # dashboards. "All" is `.*`: it matches a series without the label too (plain Prometheus).
    variables = {v["name"]: v for v in load_dashboard(name)["templating"]["list"]}
    namespace = variables["namespace"]
    assert namespace["type"] == "query"
    assert namespace["query"] == "label_values(pathwatch_build_info, namespace)"
    assert "pathwatch_build_info" in sidecar_metrics()  # every sidecar exports it, always
    assert namespace["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert namespace["multi"] is True and namespace["includeAll"] is True
    assert namespace["allValue"] == ".*"
    assert namespace["current"]["value"] == "$__all"


_BARE_METRIC = re.compile(r"\b(pathwatch_[a-zA-Z0-9_]+)\b(?!\s*[({])")


def test_every_selector_of_every_query_is_scoped_to_the_namespace_variable() -> None:
    for name, title, expr in all_queries():
        assert not _BARE_METRIC.findall(expr), f"{name} / {title}: a selector without $namespace"
        selectors = selector_labels(expr)
        assert selectors, (name, title)
        namespace = [(m, op, value) for m, label, op, value in selector_matchers(expr)
                     if label == "namespace"]
        assert len(namespace) == len(selectors), f"{name} / {title}: {expr}"
        assert {(op, value) for _, op, value in namespace} == {("=~", "$namespace")}, (name, title)


@needs_sdk
def test_scoping_adds_the_matcher_and_refuses_a_namespace_of_its_own() -> None:
    from dashboards.kit import scoped

    assert scoped('sum(rate(pathwatch_x_total{a="b"}[5m])) / count(pathwatch_build_info)') == (
        'sum(rate(pathwatch_x_total{namespace=~"$namespace",a="b"}[5m]))'
        ' / count(pathwatch_build_info{namespace=~"$namespace"})')
    with pytest.raises(ValueError, match="namespace"):
        scoped('pathwatch_x_total{namespace="shop"}')


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_panel_has_a_query_an_explicit_unique_id_and_the_datasource_variable(name: str) -> None:
    dashboard = load_dashboard(name)
    ids = [p["id"] for p in dashboard["panels"]]  # rows too: Grafana wants them unique as well
    ids += [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}: {sorted(ids)}"
    shown = panels(name)
    assert len(shown) >= 7
    for panel in shown:
        assert isinstance(panel.get("id"), int) and panel["id"] > 0, panel["title"]
        assert panel_exprs(panel), f"{name}: panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']!r} has no unit"
        assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"], panel["title"]


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_line_of_panels_is_full_width(name: str) -> None:
    # panels are laid out left to right by their widths: a line whose widths do not sum to 24 leaves
    # a hole, or a panel added to a full line pushes the rest onto lines of their own
    lines: dict[int, int] = {}
    for panel in panels(name):
        lines[panel["gridPos"]["y"]] = lines.get(panel["gridPos"]["y"], 0) + panel["gridPos"]["w"]
    assert set(lines.values()) == {24}, f"{name}: widths per line (by y): {lines}"


def test_panels_cover_the_questions_each_dashboard_answers() -> None:
    titles = {name: {p["title"] for p in panels(name)} for name in DASHBOARD_FILES}
    assert {"Calls per implementation", "Canonical share per role",
            "Retired implementations still called", "Implementations per entry point",
            "Idle since, per implementation", "Retired implementations revived",
            "Paths per entry point", "Findings per run, by version", "Runs per version",
            "Deploy findings by rule", "Safe to delete, per implementation",
            } <= titles["pathwatch-consolidation.json"]
    assert {"Bleed findings by rule", "Bleed findings by implementation",
            "Open critical incidents"} <= titles["pathwatch-isolation.json"]
    assert {"Emitted vs written", "Undelivered by type and reason", "Delivery latency",
            "Runs missing required events", "Backend-dropped spans", "Backend processes vanished",
            "Backend instrumentation faults", "Receiver spans by outcome", "Span attributes ignored",
            "Detector evidence dropped", "Sidecar liveness failures",
            "Export requests rejected", "Export requests refused by reason",
            "State entries vs capacity", "Alert pushes by sink and outcome",
            "Alertmanager clock skew"} <= titles["pathwatch-delivery.json"]


def test_the_alert_pipeline_panels_read_the_alert_metrics_by_sink() -> None:
    # the sidecar's own pages: what happened to them per sink and outcome, and Alertmanager's clock
    # (these queries go through every generic check below as well: metric names, labels, PromQL)
    catalog = sidecar_metrics()
    exprs = {p["title"]: panel_exprs(p) for p in panels("pathwatch-delivery.json")}
    for title, metric, labels in (
            ("Alert pushes by sink and outcome", "pathwatch_alerts_sent_total", {"sink", "outcome"}),
            ("Alertmanager clock skew", "pathwatch_alerts_clock_skew_seconds", {"sink"})):
        (expr,) = exprs[title]
        assert metric in metric_names(expr) and metric in catalog, (title, expr)
        assert labels <= grouping_labels(expr) and labels <= catalog[metric], (title, expr)
    (pushes,) = exprs["Alert pushes by sink and outcome"]
    assert 'rate(pathwatch_alerts_sent_total{namespace=~"$namespace"}[$__rate_interval])' in pushes


def test_the_receiver_panel_explains_every_outcome() -> None:
    from sidecar.receiver.export import SPAN_OUTCOMES

    [panel] = [p for p in panels("pathwatch-delivery.json") if p["title"] == "Receiver spans by outcome"]
    for outcome in SPAN_OUTCOMES:
        assert outcome in panel["description"], f"the panel does not say what {outcome!r} means"


def test_the_refusal_panel_shows_every_reason_per_protocol_and_explains_it() -> None:
    # pathwatch_receiver_refused_requests_total (why the receivers refused: the answers alone do not
    # tell a full budget from too many spans) was on no panel
    from sidecar.receiver.refusals import REASONS

    [panel] = [p for p in panels("pathwatch-delivery.json")
               if p["title"] == "Export requests refused by reason"]
    [expr] = panel_exprs(panel)
    assert "pathwatch_receiver_refused_requests_total" in metric_names(expr)
    assert grouping_labels(expr) >= {"protocol", "reason"}
    assert {label for name, label, _, _ in selector_matchers(expr)
            if name.startswith("pathwatch_receiver_refused_requests")} == {"namespace"}, (
        "the panel filters out a reason or a protocol")
    for reason in REASONS:
        assert re.search(rf"\b{reason}\b", panel["description"]), (
            f"the panel does not say what {reason!r} means")
    # beside the panel that shows what PathwatchSidecarRefusingSpans fires on, which points at it
    [spans] = [p for p in panels("pathwatch-delivery.json") if p["title"] == "Receiver spans by outcome"]
    assert spans["gridPos"]["y"] == panel["gridPos"]["y"]
    assert "Export requests refused by reason" in spans["description"]


def test_the_evidence_panel_explains_every_reason() -> None:
    from sidecar.detectors import bleed, delivery, duplicates

    [panel] = [p for p in panels("pathwatch-delivery.json") if p["title"] == "Detector evidence dropped"]
    for detector in (bleed, duplicates, delivery):
        for reason in detector.DROPPED_REASONS:
            assert re.search(rf"\b{reason}\b", panel["description"]), (
                f"the panel does not say what {reason!r} means")


def test_the_catalog_is_what_a_real_sidecar_serves(tmp_path: Path) -> None:
    # the queries are checked against the catalog: it must hold every family the running sidecar
    # declares on /metrics (collectors registered beside Telemetry too), and nothing it does not
    with SidecarProcess({"receiver": {"http_endpoint": ""}}, state_dir=tmp_path) as sidecar:
        scraped = httpx.get(f"{sidecar.api_url}/metrics", timeout=10,
                            headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert sidecar.stop() == 0
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    served = {family.name: family.type for family in text_string_to_metric_families(scraped.text)}
    assert served == sidecar_families()


def test_every_metric_a_query_reads_is_exported_by_the_sidecar() -> None:
    catalog = sidecar_metrics()
    queries = all_queries()
    assert len(queries) >= 25
    for name, title, expr in queries:
        used = metric_names(expr)
        assert used, f"{name} / {title}: no pathwatch metric in {expr!r}"
        unknown = used - set(catalog)
        assert not unknown, f"{name} / {title}: not exported by sidecar.telemetry: {unknown}"


def test_every_label_a_query_matches_or_groups_by_exists_on_its_metrics() -> None:
    catalog = sidecar_metrics()
    for name, title, expr in all_queries():
        for metric, labels in selector_labels(expr):
            missing = labels - catalog[metric] - target_labels() - {"namespace"}  # $namespace
            assert not missing, f"{name} / {title}: {metric} has no label {missing}"
        known = set().union(*(catalog[m] for m in metric_names(expr))) | target_labels()
        unknown = grouping_labels(expr) - known
        assert not unknown, f"{name} / {title}: grouping by labels no metric has: {unknown}"


def test_every_label_value_a_query_matches_is_one_the_sidecar_sets() -> None:
    problems = [f"{name} / {title}: {problem}" for name, title, expr in all_queries()
                for problem in unknown_label_values(selector_matchers(expr))]
    assert problems == []


def test_the_label_value_check_catches_a_wrong_value() -> None:
    # guards the guard: a value the sidecar never sets, on a real metric and label, must be reported
    for expr in ('rate(pathwatch_receiver_spans_total{outcome="rejected"}[5m])',
                 'pathwatch_receiver_spans_total{outcome=~"refused|rejected"}',
                 'pathwatch_calls_total{canonical="yes"}',
                 'pathwatch_state_evictions_total{reason!="full"}',
                 'pathwatch_findings_total{rule=~"bleeding[.].*"}'):
        assert unknown_label_values(selector_matchers(expr)), expr
    assert unknown_label_values(selector_matchers(
        'pathwatch_receiver_spans_total{outcome=~"refused|invalid|replayed",protocol="grpc"}')) == []
    assert closed_label_values()[("pathwatch_receiver_spans_total", "outcome")] >= {
        "accepted", "refused", "invalid", "replayed"}


def test_legends_name_only_labels_the_query_keeps() -> None:
    for name in DASHBOARD_FILES:
        for panel in panels(name):
            for target in panel["targets"]:
                legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                missing = legend - grouping_labels(target["expr"])
                assert not missing, f"{name} / {panel['title']}: legend uses {missing}, not in the result"


def test_no_query_adds_receiver_outcomes_together() -> None:
    # a replayed span (an exporter's retry of a request already accepted) was counted as accepted
    # the first time: summing outcomes counts it twice. Keep outcome, or pick the outcomes wanted.
    receiver_queries = [(name, title, expr) for name, title, expr in all_queries()
                        if "pathwatch_receiver_spans_total" in expr]
    assert receiver_queries, "no panel reads pathwatch_receiver_spans_total: nothing checked"
    for name, title, expr in receiver_queries:
        picks = [m for m in selector_matchers(expr)
                 if m[0] == "pathwatch_receiver_spans_total" and m[1] == "outcome"]
        assert picks or "outcome" in grouping_labels(expr), (
            f"{name} / {title}: sums pathwatch_receiver_spans_total over every outcome")


def test_rule_ids_in_queries_are_in_the_rule_catalog() -> None:
    families = {rule.family for rule in CATALOG.values()}
    for name, title, expr in all_queries():
        for rule_id in re.findall(r'rule="([^"]+)"', expr):
            assert rule_id in CATALOG, f"{name} / {title}: unknown rule id {rule_id!r}"
        for pattern in re.findall(r'rule=~"([^"]+)"', expr):
            assert any(re.fullmatch(pattern, rule_id) for rule_id in CATALOG), (name, title, pattern)
            assert pattern.split("[")[0] in families, (name, title, pattern)


def test_finding_panels_ask_for_exemplars_so_dots_link_to_traces() -> None:
    for name in DASHBOARD_FILES:
        for panel in panels(name):
            for target in panel["targets"]:
                reads_findings = "pathwatch_findings_total" in target["expr"]
                if reads_findings and not target.get("instant"):
                    assert target["exemplar"] is True, f"{name} / {panel['title']}"
    bleed = [t for p in panels("pathwatch-isolation.json") for t in p["targets"]
             if 'severity="critical"' in t["expr"] and t.get("exemplar")]
    assert len(bleed) >= 2


def test_every_query_is_valid_promql(tmp_path) -> None:
    # promtool parses recording-rule expressions: a cheap, real parser for every panel query
    queries = all_queries()
    rules = [{"record": f"pathwatch:panel_query:{i}", "expr": render_for_prometheus(expr)}
             for i, (_, _, expr) in enumerate(queries)]
    path = tmp_path / "panel-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_no_query_tells_a_new_series_by_its_absence_in_the_past() -> None:
    # `x unless x offset N` is true for every series after one failed scrape (staleness markers), a
    # scrape gap or with empty storage: a new series is told by its `_created` (rules, per_second())
    for name, title, expr in all_queries():
        assert not re.search(r"\bunless\b[^()]*\boffset\b", expr), f"{name} / {title}: {expr}"


def test_finding_rate_panels_count_a_series_born_within_the_window() -> None:
    # a finding's series is born at 1: rate() alone read 0 for a finding that happened once
    finding_rates = [(name, title, expr) for name, title, expr in all_queries()
                     if "rate(pathwatch_findings_total" in expr]
    assert finding_rates, "no panel takes rate(pathwatch_findings_total): nothing checked"
    for name, title, expr in finding_rates:
        assert "time() - pathwatch_findings_created" in expr, f"{name} / {title}"


# series whose non-zero birth is past counts (a backend's dropped spans, learnt from a heartbeat's
# total): they take neither. The receiver's series are created at 0 at its start, but a new pod's
# first scrape can come after its first refusals: they count from their `_created` too.
BORN_AT_ZERO_OR_PAST = {"pathwatch_backend_dropped_spans_total"}


def test_every_counter_rate_counts_a_series_born_within_the_window() -> None:
    # other series are born at their first count or batch (calls, emits, writes, completed runs,
    # evictions, latencies are flushed in batches): rate() alone never saw that first count
    checked = 0
    for name, title, expr in all_queries():
        for metric in set(re.findall(r"\b(?:rate|increase)\((pathwatch_[a-z_]+)", expr)):
            if metric not in BORN_AT_ZERO_OR_PAST:
                created = re.sub(r"_(total|bucket)$", "_created", metric)
                assert f"time() - {created}" in expr, f"{name} / {title}: {metric}"
                checked += 1
    assert checked >= 10, f"only {checked} rate()/increase() of a counter found in the panels"


def test_render_for_prometheus_replaces_grafana_macros_and_refuses_leftovers() -> None:
    rendered = render_for_prometheus("rate(x[$__rate_interval]) + increase(x[$__range])",
                                     rate_interval="30s", range_="10m")
    assert rendered == "rate(x[30s]) + increase(x[10m])"
    assert render_for_prometheus("x / ($__rate_interval_ms / 1000) + rate(x[$__rate_interval])",
                                 rate_interval="2m") == "x / (120000 / 1000) + rate(x[2m])"
    with pytest.raises(ValueError, match=r"\$job"):
        render_for_prometheus('up{job="$job"}')


def test_result_labels_are_the_outermost_aggregations_labels_per_or_operand() -> None:
    # what the alert->panel split check (test_rules.py) reads off alerts and panels
    assert or_terms('sum by (a) (x) or on (a) (y or z) or label_replace(w, "p", "or", "", "")') == [
        "sum by (a) (x)", "on (a) (y or z)", 'label_replace(w, "p", "or", "", "")']
    assert result_labels("count by (a, b) (sum by (a, b, c) (rate(x[5m])) > 0)") == {"a", "b"}
    assert result_labels("(sum(x) > 0) / (sum(y) > 0)") == set()
    assert result_labels("sum(sum by (a) (x))") == set()
    assert result_labels("sum by (a) (x) / on (a) (sum by (a) (y) > 0)") == {"a"}
    assert result_labels("x - min_over_time(x[10m])") is None  # no aggregation: every label kept
    for unread in ("sum without (a) (x)", "sum(x) by (a)"):
        with pytest.raises(ValueError):
            result_labels(unread)
    assert constant_labels('label_replace(sum by (d) (x), "problem", "detector_errors", "", "")') == {
        "problem": "detector_errors"}
    assert constant_labels('label_replace(x, "dst", "$1", "src", "(.*)")') == {}


def test_a_retired_implementation_called_once_within_the_hour_is_not_revived(tmp_path) -> None:
    # its series was born at its one call 35 minutes before the next: increase() over the hour before
    # read 0 for it, and the panel called it "revived after an hour of silence"
    [expr] = [t["expr"] for p in panels("pathwatch-consolidation.json")
              if p["title"] == "Retired implementations revived" for t in p["targets"]]
    labels = ('{role="execution_engine",implementation="demo.Old",canonical="false",retired="true",'
              'entry_point="/ws",nested="false"}')
    new = labels.replace("demo.Old", "demo.Dead")  # first called at 40m: revived
    series = [(f"pathwatch_calls_total{labels}", "_x5 1x34 2x10"),
              (f"pathwatch_calls_created{labels}", "_x5 300x44"),
              (f"pathwatch_calls_total{new}", "_x40 1x5"),
              (f"pathwatch_calls_created{new}", "_x40 2400x5")]
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [{"expr": render_for_prometheus(expr), "eval_time": "45m",
                              "exp_samples": [{"labels": '{role="execution_engine",'
                                                         'implementation="demo.Dead"}',
                                               "value": 1}]}]}]}
    path = tmp_path / "revived.test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_safe_to_delete_is_vetoed_by_a_sidecar_that_restarts_or_is_briefly_unscraped(tmp_path) -> None:
    # gateway replicas, each its own ledger: a legacy class called through replica b only within
    # the window is safe on a (its last call there long ago), in use on b. While b restarted (or
    # missed scrapes) its series was stale and `min by` heard a alone: the panel said 1, "safe to
    # delete on every sidecar", about a class called minutes before
    [expr] = [t["expr"] for p in panels("pathwatch-consolidation.json")
              if p["title"] == "Safe to delete, per implementation" for t in p["targets"]]
    metric = "pathwatch_implementation_safe_to_delete"
    legacy, dead = ('{role="execution_engine",implementation="demo.Legacy",instance="%s"}',
                    '{role="execution_engine",implementation="demo.Dead",instance="%s"}')
    watched = "pathwatch_ledger_window_watched{instance=\"%s\"}"
    series = [(metric + legacy % "a:9464", "1x60"),
              (metric + legacy % "b:9464", "0x10 stale _x14 0x34"),  # b down from 11 m to 25 m
              (metric + dead % "a:9464", "1x60"),
              (metric + dead % "b:9464", "1x10 stale _x14 1x34"),
              (watched % "a:9464", "1x60"), (watched % "b:9464", "1x10 stale _x14 1x34")]
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [
            {"expr": render_for_prometheus(expr), "eval_time": eval_time,
             "exp_samples": [{"labels": '{role="execution_engine",implementation="demo.Legacy"}',
                              "value": 0},
                             {"labels": '{role="execution_engine",implementation="demo.Dead"}',
                              "value": 1}]}
            for eval_time in ("5m", "12m", "20m", "24m", "30m")]}]}
    path = tmp_path / "safe_to_delete.test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_safe_to_delete_is_vetoed_by_a_sidecar_without_a_row_that_has_not_watched_a_window(
        tmp_path) -> None:
    # replica b never saw demo.Legacy (no series of it), replica a saw its last call long ago (1).
    # While b had not watched a whole window since a span loss (pathwatch_ledger_window_watched 0:
    # Legacy's call may be among the spans lost) min by heard a alone and said 1
    [expr] = [t["expr"] for p in panels("pathwatch-consolidation.json")
              if p["title"] == "Safe to delete, per implementation" for t in p["targets"]]
    series = [('pathwatch_implementation_safe_to_delete{role="execution_engine",'
               'implementation="demo.Legacy",instance="a:9464"}', "1x60"),
              ('pathwatch_ledger_window_watched{instance="a:9464"}', "1x60"),
              ('pathwatch_ledger_window_watched{instance="b:9464"}', "1x10 0x20 1x30")]
    legacy = '{role="execution_engine",implementation="demo.Legacy"}'
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [
            {"expr": render_for_prometheus(expr), "eval_time": eval_time,
             "exp_samples": [{"labels": legacy, "value": value}]}
            for eval_time, value in (("5m", 1), ("12m", 0), ("30m", 0), ("45m", 0), ("50m", 1))]}]}
    path = tmp_path / "vouch.test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_backend_dropped_spans_read_no_drop_when_a_sidecar_restarted_in_place_relearns_past_ones(
        tmp_path) -> None:
    # a sidecar restarted in place (the same series) counts each live backend process's whole total
    # again at its first heartbeat, lower than before: a counter reset, whose value rate() read as
    # drops (a spike of every past drop); a real drop after it still shows
    [expr] = [t["expr"] for p in panels("pathwatch-delivery.json")
              if p["title"] == "Backend-dropped spans" for t in p["targets"]]
    labels = '{service_name="api",job="pathwatch",instance="gw-0:9464"}'
    series = [(f"pathwatch_backend_dropped_spans_total{labels}", "1500x20 stale _ 300 1000x16 1060x10"),
              (f"pathwatch_backend_dropped_spans_created{labels}", "-3600x20 stale _ 1380x27"),
              (f"pathwatch_backend_last_heartbeat_timestamp_seconds{labels}",
               "0+60x20 stale _ 1380+60x27")]
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [
            {"expr": render_for_prometheus(expr, rate_interval="2m"), "eval_time": eval_time,
             "exp_samples": [{"labels": '{service_name="api"}', "value": value}]}
            for eval_time, value in (("10m", 0), ("23m", 0), ("24m", 0), ("25m", 0), ("30m", 0),
                                     ("42m", 0.5))]}]}
    path = tmp_path / "dropped.test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
