"""The Prometheus alert rules: valid, unit-tested by promtool, labelled, and each with a runbook."""

from __future__ import annotations

import re

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dashboards.queries import (
    constant_labels,
    grouping_labels,
    iter_panels,
    metric_names,
    or_terms,
    result_labels,
    selector_labels,
    selector_matchers,
)
from sidecar.alerting.outcomes import AlertOutcomes
from sidecar.model import Severity
from sidecar.receiver.export import ACCEPTED, SPAN_OUTCOMES
from sidecar.rules import CATALOG
from sidecar.testing import SidecarProcess, free_port
from tests.dashboards.catalog import (
    closed_label_values,
    monitor_labels,
    sidecar_metrics,
    target_labels,
    unknown_label_values,
)
from tests.dashboards.tooling import (
    DASHBOARD_FILES,
    RULE_TESTS,
    RULES,
    RUNBOOK_BASE,
    ROOT,
    RUNBOOKS,
    alert_rules,
    load_dashboard,
    promtool,
)
from tests.e2e.fixture_runs import RETIRED_ENGINE, send_runs
from tests.support import wait_until

ALERTS = [rule["alert"] for rule in alert_rules()]
CATEGORIES = {"isolation", "consolidation", "delivery", "coverage"}


def test_rule_file_passes_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_rule_unit_tests_pass_in_promtool() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_can_fail(tmp_path) -> None:
    # guards the guard: a wrong expectation must make `promtool test rules` exit non-zero
    (tmp_path / "pathwatch-rules.yaml").write_text(RULES.read_text())
    tests = yaml.safe_load(RULE_TESTS.read_text())
    first = tests["tests"][0]
    first["alert_rule_test"] = [{"eval_time": "10m", "alertname": "PathwatchCrossUserBleed",
                                 "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}]
    tests["tests"] = [first]
    path = tmp_path / "broken.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    assert promtool("test", "rules", str(path)).returncode != 0


def test_the_expected_alerts_exist() -> None:
    assert set(ALERTS) == {
        "PathwatchCrossUserBleed", "PathwatchDuplicateExecution", "PathwatchDuplicateEmission",
        "PathwatchRetiredImplementationCalled", "PathwatchCanonicalShareRegressed",
        "PathwatchUndeliveredEventsHigh", "PathwatchRunsMissingRequiredEvents",
        "PathwatchSidecarRefusingSpans", "PathwatchSidecarLosingFindings",
        "PathwatchAlertPagesFailing", "PathwatchStateEvictingAtCapacity",
        "PathwatchBackendDroppingSpans", "PathwatchBackendProcessesVanished",
        "PathwatchBackendInstrumentationFaults", "PathwatchDetectorEvidenceDropped",
        "PathwatchSidecarUnhealthy", "PathwatchSpanAttributesInvalid", "PathwatchSidecarAbsent",
        "PathwatchDeployRegression",
        "PathwatchRetiredImplementationRevived", "PathwatchEntryPointPathsAboveOne",
        "PathwatchConsolidationLedgerNotPersisted"}
    assert len(ALERTS) == len(set(ALERTS))


@pytest.mark.parametrize("rule", alert_rules(), ids=ALERTS)
def test_alert_has_routing_labels_and_annotations(rule: dict) -> None:
    labels, annotations = rule["labels"], rule["annotations"]
    assert labels["severity"] in {Severity.CRITICAL.value, Severity.WARNING.value}
    assert labels["component"] == "pathwatch"
    assert labels["category"] in CATEGORIES
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert annotations["runbook_url"] == f"{RUNBOOK_BASE}{rule['alert']}.md"
    assert "for" in rule


def test_bleed_pages_at_once() -> None:
    bleed = next(r for r in alert_rules() if r["alert"] == "PathwatchCrossUserBleed")
    assert bleed["labels"]["severity"] == "critical"
    assert bleed["for"] == "0m"
    # it keys on severity=critical: that must mean exactly the bleed family of the catalog
    critical = {r.family for r in CATALOG.values() if r.severity is Severity.CRITICAL}
    assert critical == {"bleed"}


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_has_a_runbook_page_listed_in_the_index(alert: str) -> None:
    page = RUNBOOKS / f"{alert}.md"
    assert page.is_file(), f"missing runbook {page}"
    text = page.read_text()
    assert text.startswith(f"# {alert}"), f"{page} must start with '# {alert}'"
    for section in ("## What it means", "## Find the offending trace", "## What to do"):
        assert section in text, f"{page} lacks '{section}'"
    assert f"({alert}.md)" in (RUNBOOKS / "README.md").read_text()


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [case for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in group.get("alert_rule_test", [])]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no case where it fires"
        assert any(c["exp_alerts"] == [] for c in mine), f"{alert}: no case where it stays quiet"


def test_alert_expressions_read_only_exported_metrics_and_labels() -> None:
    catalog = sidecar_metrics()
    for rule in alert_rules():
        used = metric_names(rule["expr"])
        assert used and used <= set(catalog), (rule["alert"], used - set(catalog))
        for metric, labels in selector_labels(rule["expr"]):
            assert labels <= catalog[metric] | target_labels(), (rule["alert"], metric, labels)
        for rule_id in re.findall(r'rule="([^"]+)"', rule["expr"]):
            assert rule_id in CATALOG, (rule["alert"], rule_id)
        for rule_id in re.findall(r"rule=([a-z_]+\.[a-z_]+)", rule["annotations"]["description"]):
            assert rule_id in CATALOG, (rule["alert"], rule_id)


def _made_labels(expr: str) -> set[str]:
    """Labels an expression creates itself (``label_replace(v, "dst", ...)``)."""
    return set(re.findall(r'label_replace\s*\(.*?,\s*"([a-zA-Z_][a-zA-Z0-9_]*)"', expr, re.S))


def test_alert_expressions_group_only_by_labels_their_metrics_have() -> None:
    # `sum by (namespace, rule, entrypoint)` would silently drop the misspelt label from the alert
    catalog = sidecar_metrics()
    for rule in alert_rules():
        expr = rule["expr"]
        known = set().union(*(catalog[m] for m in metric_names(expr))) | monitor_labels()
        unknown = grouping_labels(expr) - known - _made_labels(expr)
        assert not unknown, (rule["alert"], unknown)


def test_alert_expressions_match_only_label_values_the_sidecar_sets() -> None:
    problems = [f"{rule['alert']}: {problem}" for rule in alert_rules()
                for problem in unknown_label_values(selector_matchers(rule["expr"]))]
    assert problems == []


_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def test_rule_unit_tests_feed_series_the_sidecar_exports() -> None:
    # a unit test on a metric, label or value the sidecar does not produce proves nothing
    catalog = sidecar_metrics()
    groups = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    series = [item["series"] for group in groups for item in group["input_series"]]
    assert len(series) > 30
    for text in series:
        match = _SERIES.match(text)
        assert match, text
        metric, body = match.groups()
        pairs = _PAIR.findall(body)
        assert metric in catalog, f"{text}: not exported by the sidecar"
        labels = {label for label, _ in pairs}
        assert labels <= catalog[metric] | monitor_labels(), (text, labels - catalog[metric])
        assert unknown_label_values([(metric, label, "=", value) for label, value in pairs]) == [], text


def test_counters_the_coverage_alerts_increase_exist_at_zero_on_a_real_sidecar(tmp_path) -> None:
    # increase() needs a sample before the first event: the sidecar creates the detector-error series
    # at start and a service's heartbeat counters (its vanished processes too) at its first
    # heartbeat, both at 0 (a one-off event on a series born at its final value is also caught by
    # the rules' `_created` term)
    def samples(sidecar: SidecarProcess, name: str, label: str) -> dict[str, float]:
        return {sample.labels[label]: sample.value
                for family in text_string_to_metric_families(sidecar.metrics())
                for sample in family.samples if sample.name == name}

    with SidecarProcess({"receiver": {"http_endpoint": ""}}, state_dir=tmp_path) as sidecar:
        assert samples(sidecar, "pathwatch_detector_errors_total", "detector") == {
            name: 0.0 for name in ("bleed", "duplicates", "delivery", "inventory", "deploys",
                                   "pipeline.consume", "pipeline.tick")}
        assert samples(sidecar, "pathwatch_backend_dropped_spans_total", "service_name") == {}
        send_runs(sidecar.grpc_endpoint, version="1", runs=1, dropped_spans=0)
        wait_until(lambda: samples(sidecar, "pathwatch_backend_last_heartbeat_timestamp_seconds",
                                   "service_name"), timeout=20, message="the heartbeat on /metrics")
        # the heartbeat reports 0 dropped spans, 1 instrumentation error and no evicted-emits total;
        # no process of it has vanished
        for name, total in (("pathwatch_backend_dropped_spans_total", 0.0),
                            ("pathwatch_backend_instrumentation_errors_total", 1.0),
                            ("pathwatch_backend_pending_emits_evicted_total", 0.0),
                            ("pathwatch_backend_processes_vanished_total", 0.0)):
            assert samples(sidecar, name, "service_name") == {"backend": total}, name
        assert sidecar.stop() == 0


# `<counter>{sel}` and `(time() - <counter>_created{sel} < seconds)`: a series created within the
# window; one hour ago: `<counter>{sel} offset 1h` and `(time() - 3600 - <counter>_created{sel} offset 1h
# < seconds)`
_NEW_SERIES = re.compile(
    r"(pathwatch_[a-z_]+)_total(\{[^}]*\}|)((?: offset \d+h)?)\s+and"
    r" \(time\(\) - (?:(\d+) - )?\1_created\2\3 < (\d+)\)")
_INCREASE = re.compile(
    r"(?:increase|rate)\((pathwatch_[a-z_]+)_total(\{[^}]*\}|)\[(\d+)m\]((?: offset \d+h)?)\)")
# counters whose series the sidecar does not pre-create at 0 (or, detector errors, the incident
# store's, liveness failures and vanished backend processes, may be first scraped non-zero): their
# alerts need the new-series term beside increase() or rate()
_BORN_NON_ZERO = {"pathwatch_findings", "pathwatch_calls", "pathwatch_alerts_sent",
                  "pathwatch_detector_errors", "pathwatch_events_undelivered",
                  "pathwatch_events_emitted", "pathwatch_state_evictions",
                  "pathwatch_incidents_refused", "pathwatch_incident_store_errors",
                  "pathwatch_backend_processes_vanished", "pathwatch_detector_evidence_dropped",
                  "pathwatch_liveness_failures", "pathwatch_receiver_invalid_attributes",
                  "pathwatch_ledger_errors"}


# a series' value in each life of it (from its `_created`) after its first minute: the counters
# learnt from the backend's heartbeat totals (dropped spans, instrumentation errors, forgotten
# emits), whose first heartbeats after a sidecar's start carry past totals (a restart in place
# brings the series back lower: a reset, which increase() counted as new drops)
_LIFE_AFTER_FIRST_MINUTE = re.compile(
    r"min_over_time\(\((pathwatch_[a-z_]+)_total\s+and \(time\(\) - \1_created >= 60\)\)\[10m:\d+s\]\)")
_HEARTBEAT_TOTALS = {"pathwatch_backend_dropped_spans", "pathwatch_backend_instrumentation_errors",
                     "pathwatch_backend_pending_emits_evicted"}


def test_backend_drops_are_the_rise_after_each_life_s_first_minute() -> None:
    [expr] = [r["expr"] for r in alert_rules() if r["alert"] == "PathwatchBackendDroppingSpans"]
    assert _LIFE_AFTER_FIRST_MINUTE.findall(expr) == ["pathwatch_backend_dropped_spans"]
    [expr] = [r["expr"] for r in alert_rules() if r["alert"] == "PathwatchBackendInstrumentationFaults"]
    assert _LIFE_AFTER_FIRST_MINUTE.findall(expr) == ["pathwatch_backend_instrumentation_errors",
                                                      "pathwatch_backend_pending_emits_evicted"]
    for rule in alert_rules():
        # heartbeat totals are read only so; nothing else is
        assert set(_LIFE_AFTER_FIRST_MINUTE.findall(rule["expr"])) <= _HEARTBEAT_TOTALS, rule["alert"]
        read = metric_names(rule["expr"]) & {f"{name}_total" for name in _HEARTBEAT_TOTALS}
        assert not [m for m, *_ in _INCREASE.findall(rule["expr"]) if m in _HEARTBEAT_TOTALS], (
            rule["alert"], "increase() counts a restarted sidecar's relearnt totals")
        assert {f"{m}_total" for m in _LIFE_AFTER_FIRST_MINUTE.findall(rule["expr"])} == read, (
            rule["alert"])


def test_new_series_terms_read_the_creation_time_over_the_alerts_own_window() -> None:
    # `x unless x offset N` is true for every old series after one failed scrape (staleness
    # markers), a scrape gap or on empty storage, and paged an old bleed again: a new series is told
    # by its `_created` instead, over the same window and selector as the alert's increase()
    terms = []
    for rule in alert_rules():
        expr = rule["expr"]
        assert not re.search(r"\bunless\b[^\n]*\boffset\b", expr), rule["alert"]
        found = _NEW_SERIES.findall(expr)
        lives = _LIFE_AFTER_FIRST_MINUTE.findall(expr)
        assert len(found) + len(lives) == expr.count("_created"), (
            rule["alert"], "a _created term of another shape")
        increases = {(metric, selector, offset): int(minutes) * 60
                     for metric, selector, minutes, offset in _INCREASE.findall(expr)}
        for metric, selector, offset, shift, seconds in found:
            # an offset term's `time()` is moved back by the same offset
            assert int(shift or 0) == (int(offset.split()[1][:-1]) * 3600 if offset else 0), (
                rule["alert"], metric, offset, shift)
            assert increases.get((metric, selector, offset)) == int(seconds), (
                rule["alert"], metric, selector, offset)
        needed = {key for key in increases if key[0] in _BORN_NON_ZERO}
        assert needed == {(metric, selector, offset) for metric, selector, offset, _, _ in found}, (
            rule["alert"])
        terms += [(rule["alert"], metric) for metric, *_ in found]
    assert len(terms) == 26, terms


def test_a_real_sidecar_exports_the_creation_times_the_rules_read_even_if_the_env_disables_them(
        tmp_path) -> None:
    # prometheus_client drops every `_created` series when PROMETHEUS_DISABLE_CREATED_SERIES is set
    # (common advice for Python services): the rules' new-series terms would then never fire
    config = {"receiver": {"http_endpoint": ""}, "rules": {"run_idle_s": 0.5},
              "alerting": {"webhook_url": f"http://127.0.0.1:{free_port()}/hook"}}  # nobody there
    wanted = {"pathwatch_findings", "pathwatch_calls", "pathwatch_alerts_sent",
              "pathwatch_detector_errors", "pathwatch_incidents_refused",
              "pathwatch_incident_store_errors"}

    def samples(sidecar: SidecarProcess) -> dict[str, list]:
        found: dict[str, list] = {}
        for family in text_string_to_metric_families(sidecar.metrics()):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(sample)
        return found

    with SidecarProcess(config, state_dir=tmp_path,
                        env={"PROMETHEUS_DISABLE_CREATED_SERIES": "true"}) as sidecar:
        send_runs(sidecar.grpc_endpoint, version="1", runs=1, owner="bob")  # a bleed, pushed
        send_runs(sidecar.grpc_endpoint, version="1", runs=1, engine=RETIRED_ENGINE)
        def all_there() -> dict[str, list] | None:
            found = samples(sidecar)
            bleed = any(s.labels["severity"] == "critical" for s in found.get("pathwatch_findings_total", []))
            retired = any(s.labels["retired"] == "true" for s in found.get("pathwatch_calls_total", []))
            pushed = found.get("pathwatch_alerts_sent_total")
            return found if bleed and retired and pushed else None

        served = wait_until(all_there, timeout=60,
                            message="a bleed finding, a retired call and an alert push on /metrics")
        assert sidecar.stop() == 0
    for name in wanted:
        totals = {tuple(sorted(s.labels.items())) for s in served[f"{name}_total"]}
        created = {tuple(sorted(s.labels.items())) for s in served.get(f"{name}_created", [])}
        assert totals <= created, f"{name}: series without their _created: {totals - created}"


def test_replayed_spans_are_in_the_refusal_alerts_unit_test() -> None:
    # replays (retries of accepted requests) are not a loss: the quiet case must feed them
    text = RULE_TESTS.read_text()
    assert 'pathwatch_receiver_spans_total{protocol="grpc",outcome="replayed"' in text

# --- the runbooks' queries and references ----------------------------------------------------------

RUNBOOK_PAGES = sorted(RUNBOOKS.glob("*.md"))
_CODE = re.compile(r"`([^`\n]+)`")
_FENCED = re.compile(r"^\s*```.*?^\s*```", re.M | re.S)
_LOOSE_SELECTOR = re.compile(r"\b(pathwatch_[a-zA-Z0-9_]+|up)\s*\{([^}]*)\}")
_LOOSE_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def runbook_promql(text: str) -> list[str]:
    """Inline code that names a metric: what an operator pastes into Prometheus."""
    return [code for code in _CODE.findall(text)
            if re.search(r"\bpathwatch_[a-z_]+|\bup\{", code) and not code.startswith("pw ")]


# the pages with something to check (seven name no metric, two quote no panel): a case per page
# that checks nothing would pass whatever the page says
PAGES_WITH_QUERIES = [page for page in RUNBOOK_PAGES if runbook_promql(page.read_text())]


@pytest.mark.parametrize("page", PAGES_WITH_QUERIES, ids=[p.name for p in PAGES_WITH_QUERIES])
def test_runbook_queries_use_exported_metrics_labels_and_values(page) -> None:
    catalog = sidecar_metrics()
    codes = runbook_promql(page.read_text())
    assert codes
    for code in codes:
        used = metric_names(code)
        assert used <= set(catalog), f"{page.name}: `{code}` reads {used - set(catalog)}"
        for metric, body in _LOOSE_SELECTOR.findall(code):   # `metric{service=...}` is a template
            labels = set(_LOOSE_MATCHER.findall(body))
            assert labels <= catalog[metric] | target_labels(), (page.name, code, labels)
        assert unknown_label_values(selector_matchers(code)) == [], (page.name, code)
        known = set().union(*(catalog[m] for m in used)) | monitor_labels() if used else set()
        assert grouping_labels(code) <= known, (page.name, code)


def test_the_runbook_query_check_catches_a_wrong_name() -> None:
    assert metric_names("`pathwatch_receiver_spans_total`") <= set(sidecar_metrics())
    assert not metric_names("pathwatch_receiver_spans") <= set(sidecar_metrics())  # no _total
    assert runbook_promql("see `pathwatch_foo_total{x=...}` and `pw '/api/v1/x'`") == [
        "pathwatch_foo_total{x=...}"]


def _titles(name: str) -> set[str]:
    dashboard = load_dashboard(f"pathwatch-{name}.json")
    return {p["title"] for p in dashboard["panels"]} | {p["title"] for p in iter_panels(dashboard)}


def _quoted_panels(page) -> list[tuple[str, str]]:
    """(dashboard, quoted title): once a page names a dashboard (**pathwatch / delivery**), what it
    quotes are titles of that dashboard's panels or rows, until it names another one. Titles may
    wrap across lines; a quote inside inline code is PromQL (`reason="x"`), and one in a fenced
    block a log line or a command, no title."""
    text = " ".join(_CODE.sub("", _FENCED.sub("", page.read_text())).split())
    dashboard, quoted = None, []
    for match in re.finditer(r'\*\*pathwatch / (\w+)\*\*|"([^"]+)"', text):
        if match.group(1):
            dashboard = match.group(1)
        elif dashboard is not None:
            quoted.append((dashboard, match.group(2)))
    return quoted


PAGES_QUOTING_PANELS = [page for page in RUNBOOK_PAGES if _quoted_panels(page)]


def test_the_runbook_checks_find_the_pages_they_check() -> None:
    # the extractors above still read the pages: most have queries and quote panels
    assert len(PAGES_WITH_QUERIES) >= 12 and len(PAGES_QUOTING_PANELS) >= 15
    assert {page.name for page in PAGES_QUOTING_PANELS} >= {"PathwatchCrossUserBleed.md",
                                                            "PathwatchUndeliveredEventsHigh.md"}
    assert {page.name for page in PAGES_NAMING_CHART_VALUES} >= {
        "PathwatchAlertPagesFailing.md", "PathwatchSidecarLosingFindings.md"}


@pytest.mark.parametrize("page", PAGES_QUOTING_PANELS, ids=[p.name for p in PAGES_QUOTING_PANELS])
def test_runbook_panel_references_exist_in_the_named_dashboard(page) -> None:
    # an operator searches the named dashboard for what the page quotes
    assert len(DASHBOARD_FILES) == 3
    titles = {name: _titles(name) for name in ("isolation", "consolidation", "delivery")}
    quoted = _quoted_panels(page)
    assert quoted
    for dashboard, title in quoted:
        assert title in titles[dashboard], f"{page.name}: {title!r} is not a panel of pathwatch / {dashboard}"


# Alerts no panel can show, and why; dashboards/README.md lists them with the reason and the
# runbook's "Find the offending trace" says where to look instead. Every other alert of the rules
# file must have a panel (an alert added without one fails here, it is not skipped).
WITHOUT_A_PANEL = {
    "PathwatchSidecarAbsent": "the dashboards read what sidecars export, and an absent sidecar "
                              "exports nothing (the namespace variable drops a namespace whose "
                              "sidecars all vanished); Prometheus's targets page shows it",
}
NO_PANEL_NOTE = "No panel shows it"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return " ".join(text[start:end if end >= 0 else None].split())


def panels_naming_the_runbook(alert: str) -> list[tuple[str, dict]]:
    """(dashboard, panel) of every panel whose description names the alert's runbook."""
    return [(name, panel) for name in ("isolation", "consolidation", "delivery")
            for panel in iter_panels(load_dashboard(f"pathwatch-{name}.json"))
            if f"docs/runbooks/{alert}.md" in panel["description"]]


_BRACED = re.compile(r"\b(pathwatch_[a-zA-Z0-9_]+|up)\s*\{([^}]*)\}")
_MATCHERS = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) of every selector; a bare metric name has no matchers."""
    braced = [(name, _MATCHERS.findall(body)) for name, body in _BRACED.findall(expr)]
    bare = metric_names(_BRACED.sub("", expr))
    return braced + [(name, []) for name in sorted(bare)]


def _matches(op: str, pattern: str, value: str) -> bool:
    return {"=": value == pattern, "!=": value != pattern,
            "=~": re.fullmatch(pattern, value) is not None,
            "!~": re.fullmatch(pattern, value) is None}[op]


def admits(metric: str, panel: list[tuple[str, str, str]], alert: list[tuple[str, str, str]]) -> bool:
    """Whether a panel's selector on ``metric`` keeps every series the alert's selector reads: on a
    closed label (rule, severity, outcome, status ...) every value the alert lets through, on an
    open one only the alert's own matcher ($namespace aside: "All" keeps every series)."""
    closed = closed_label_values()
    for label, op, value in panel:
        if label == "namespace":
            continue
        alert_on_label = [(o, v) for name, o, v in alert if name == label]
        known = closed.get((metric, label))
        if known is None:
            if (op, value) not in alert_on_label:
                return False
            continue
        read = {v for v in known if all(_matches(o, p, v) for o, p in alert_on_label)}
        if not all(_matches(op, value, v) for v in read):
            return False
    return True


def test_the_selector_check_catches_a_panel_that_filters_out_the_alerts_series() -> None:
    # guards the guard: "Delivery findings by rule" reads pathwatch_findings_total, but not the bleed
    findings = "pathwatch_findings_total"
    bleed = [("severity", "=", "critical")]
    assert not admits(findings, [("rule", "=~", "delivery[.].*")], bleed)
    assert admits(findings, [("namespace", "=~", "$namespace"), ("severity", "=", "critical")], bleed)
    assert admits(findings, [("rule", "=~", "duplicate[.].*")], [("rule", "=", "duplicate.emission")])
    assert not admits(findings, [("rule", "=~", "duplicate[.].*")], [])
    assert not admits("pathwatch_calls_total", [("entry_point", "=", "/ws")], [])
    requests = "pathwatch_receiver_requests_total"
    assert admits(requests, [("status", "!~", "OK|200")],
                  [("status", "=~", "INVALID_ARGUMENT|400|413|415")])
    assert not admits(requests, [("status", "=~", "413|415")],
                      [("status", "=~", "INVALID_ARGUMENT|400|413|415")])
    assert selectors('sum(x{a="b"}) or pathwatch_y_total and pathwatch_z_total{c!~"d"}') == [
        ("pathwatch_z_total", [("c", "!~", "d")]), ("pathwatch_y_total", [])]


@pytest.mark.parametrize("alert", ALERTS)
def test_an_operator_paged_by_the_alert_finds_its_panel(alert: str) -> None:
    # alerts paged on counters no panel showed, or on panels that did not say so: every panel that
    # names the alert's runbook reads every series the alert reads, names the alert, and the
    # runbook's "Find the offending trace" names it (dashboard, then panel title)
    [rule] = [r for r in alert_rules() if r["alert"] == alert]
    section = _section((RUNBOOKS / f"{alert}.md").read_text(), "Find the offending trace")
    found = panels_naming_the_runbook(alert)
    if alert in WITHOUT_A_PANEL:
        assert found == [], f"{alert} has a panel: drop it from WITHOUT_A_PANEL"
        assert NO_PANEL_NOTE in section, f"{alert}.md does not say that no panel shows it"
        listed = " ".join((ROOT / "dashboards" / "README.md").read_text().split())
        assert f"{alert} ({NO_PANEL_NOTE.lower()}" in listed, "dashboards/README.md lacks the reason"
        return
    assert found, f"no panel names docs/runbooks/{alert}.md: add one or a documented exemption"
    fired_on = [(m, matchers) for m, matchers in selectors(rule["expr"])
                if not m.endswith("_created")]
    assert fired_on
    for dashboard, panel in found:
        title = panel["title"]
        assert alert in panel["description"].replace(f"docs/runbooks/{alert}.md", ""), title
        read = [s for target in panel["targets"] for s in selectors(target["expr"])]
        for metric, matchers in fired_on:
            assert any(m == metric and admits(metric, mine, matchers) for m, mine in read), (
                f"{dashboard} / {title} does not show {metric}{matchers}, which {alert} reads")
        named = section.find(f"**pathwatch / {dashboard}**")
        assert 0 <= named < section.find(f'"{title}"'), f"{alert}.md does not point at {title!r}"


# Labels an alert keeps that its panels need not split by, and why (dashboards/README.md says the
# same). A label the panel's own selector pins to one value (`rule="delivery.missing_required_events"`)
# needs no split either: the panel shows that value only.
NOT_SPLIT_ON_PANELS = {
    "namespace": "every panel query is scoped to the dashboards' Namespace variable ($namespace): "
                 "the operator selects the alert's namespace there, and a panel of one namespace "
                 "has nothing to split (docs/runbooks/README.md says so)",
}


def _legend_names(legend: str, label: str) -> bool:
    return re.search(r"\{\{\s*%s\s*\}\}" % re.escape(label), legend) is not None


def split_problems(alert_expr: str, panel: dict) -> list[str]:
    """What the panel does not split that the alert fires per: for each ``or`` operand of the
    alert and each metric it reads, some operand of one of the panel's queries must read that
    metric's series (``admits``), keep every label the alert's operand keeps (NOT_SPLIT_ON_PANELS
    and labels the panel's selector pins aside) and name each in its legend; a label the alert sets
    to a constant (``label_replace(v, "problem", "detector_errors", "", "")``) must be that query's
    legend text (its queries read one metric each)."""
    shown = [(target.get("legendFormat", ""), term) for target in panel["targets"]
             for term in or_terms(target["expr"])]
    problems = []
    for alert_term in or_terms(alert_expr):
        kept = result_labels(alert_term)
        assert kept is not None, f"the alert does not aggregate: {alert_term}"
        needed = kept - set(NOT_SPLIT_ON_PANELS)
        constants = constant_labels(alert_term)
        for metric, matchers in selectors(alert_term):
            if metric.endswith("_created"):
                continue
            misses = []
            for legend, term in shown:
                for read, mine in selectors(term):
                    if read != metric or not admits(metric, mine, matchers):
                        continue
                    wanted = needed - {label for label, op, _ in mine if op == "="}
                    keeps = result_labels(term)
                    grouped = wanted if keeps is None else keeps | set(constant_labels(term))
                    miss = sorted(wanted - grouped)
                    miss += [f"{{{{{label}}}}} in the legend" for label in sorted(wanted)
                             if not _legend_names(legend, label)]
                    miss += [f"{label}={value} in the legend" for label, value in constants.items()
                             if value not in legend]
                    misses.append(miss)
            if not misses:
                problems.append(f"does not read {metric}{matchers}")
            elif all(misses):
                problems.append(f"shows {metric} without {min(misses, key=len)}")
    return list(dict.fromkeys(problems))  # the `or` operands of an alert read alike


@pytest.mark.parametrize("alert", [a for a in ALERTS if a not in WITHOUT_A_PANEL])
def test_the_alerts_panel_splits_what_it_shows_by_the_labels_the_alert_fires_per(alert: str) -> None:
    # PathwatchUndeliveredEventsHigh fires per event type, yet its panel was one ratio over every
    # event type: an operator paged for one event type could not see which on the panel the alert
    # named. Every panel that names an alert's runbook shows its series per label the alert keeps.
    [rule] = [r for r in alert_rules() if r["alert"] == alert]
    found = panels_naming_the_runbook(alert)
    assert found
    problems = {f"{dashboard} / {panel['title']}": split_problems(rule["expr"], panel)
                for dashboard, panel in found}
    assert {title: missing for title, missing in problems.items() if missing} == {}, alert


def target(expr: str, legend: str) -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


def test_the_split_check_catches_a_panel_that_merges_what_the_alert_fires_per() -> None:
    # guards the guard, on the alerts' own expressions; the first panel is the stat the delivery
    # dashboard had: one ratio over every event type
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    ratio = ("(sum(rate(pathwatch_events_undelivered_total[5m])) > 0)"
             " / (sum(rate(pathwatch_events_emitted_total[5m])) > 0)"
             " or on () 0 * count(pathwatch_build_info)")
    assert sorted(split_problems(rules["PathwatchUndeliveredEventsHigh"],
                                 {"targets": [target(ratio, "undelivered")]})) == [
        f"shows pathwatch_events_{counter}_total without"
        " ['event_type', '{{event_type}} in the legend']" for counter in ("emitted", "undelivered")]
    per_type = ratio.replace("sum(", "sum by (event_type) (").replace(" / (", " / on (event_type) (")
    assert split_problems(rules["PathwatchUndeliveredEventsHigh"],
                          {"targets": [target(per_type, "{{event_type}}")]}) == []
    assert split_problems(rules["PathwatchUndeliveredEventsHigh"],
                          {"targets": [target(per_type, "undelivered")]}) != []  # legend
    by_rule = 'sum by (rule) (rate(pathwatch_findings_total{severity="critical"}[5m]))'
    assert split_problems(rules["PathwatchCrossUserBleed"], {"targets": [target(by_rule, "{{rule}}")]})
    # a constant label: which problem, told by the legend of the query that reads its counter
    losing = [target("sum by (detector) (rate(pathwatch_detector_errors_total[5m]))", "{{detector}}"),
              target("sum(rate(pathwatch_incidents_refused_total[5m]))", "incidents_refused"),
              target("sum(rate(pathwatch_incident_store_errors_total[5m]))", "incident_store_errors")]
    assert split_problems(rules["PathwatchSidecarLosingFindings"], {"targets": losing}) == [
        "shows pathwatch_detector_errors_total without ['problem=detector_errors in the legend']"]
    # a label the panel pins to the alert's one value needs no split; a pattern does
    missing = 'pathwatch_findings_total{rule="delivery.missing_required_events"}'
    pinned = f"sum by (role, implementation, entry_point) (rate({missing}[5m]))"
    legend = "{{role}} / {{implementation}} @ {{entry_point}}"
    assert split_problems(rules["PathwatchRunsMissingRequiredEvents"],
                          {"targets": [target(pinned, legend)]}) == []
    assert split_problems(rules["PathwatchRunsMissingRequiredEvents"],
                          {"targets": [target(pinned.replace('rule="', 'rule=~"'), legend)]})
    # namespace is exempt: the Namespace variable selects it
    assert set(NOT_SPLIT_ON_PANELS) == {"namespace"}
    assert "namespace" in result_labels(or_terms(rules["PathwatchUndeliveredEventsHigh"])[0])


def test_the_labels_read_off_each_alert_cover_the_labels_its_unit_tests_fire_with() -> None:
    # result_labels() reads aggregations, it is no PromQL parser: what promtool says each alert
    # fires with (its firing cases' exp_labels, the rule's own labels aside) must be among the
    # labels the split check asks the panels for (a label empty in a case's series drops out)
    cases = [case for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in group.get("alert_rule_test", [])]
    for rule in alert_rules():
        if rule["alert"] in WITHOUT_A_PANEL:
            continue
        read = set().union(*(result_labels(term) | set(constant_labels(term))
                             for term in or_terms(rule["expr"])))
        fired = {label for case in cases if case["alertname"] == rule["alert"]
                 for alert in case["exp_alerts"] for label in alert.get("exp_labels", {})}
        fired -= set(rule["labels"])
        assert fired and fired <= read, (rule["alert"], fired - read)


def test_every_alert_without_a_panel_is_an_alert_of_the_rules_file() -> None:
    assert set(WITHOUT_A_PANEL) <= set(ALERTS)
    assert len(ALERTS) - len(WITHOUT_A_PANEL) >= 20


def test_the_eviction_runbook_names_the_setting_that_bounds_each_state_table(tmp_path) -> None:
    # a real sidecar with each state.max_* at a distinct value: the capacity each table publishes
    # says which key bounds it; the runbook's table must say the same (it once told operators to
    # raise state.max_connections, which bounds nothing, and named tables that do not exist)
    knobs = {"max_traces": 101, "max_runs": 103, "max_events": 107, "max_instances": 109,
             "max_connections": 113}

    text = (RUNBOOKS / "PathwatchStateEvictingAtCapacity.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and cells[1] != "bounded by":
            for table in re.findall(r"`([a-z_]+)`", cells[0]):
                rows[table] = cells[1]
    # incidents: published, not in the table
    expected = set(rows) | {"incidents"}
    last: dict[str, float] = {}

    def capacities(sidecar: SidecarProcess) -> dict[str, float] | None:
        # each detector publishes its tables on its own first tick: wait for all the runbook names
        # (a count threshold once returned before the consolidation tracker's two had published)
        last.clear()
        last.update({sample.labels["table"]: sample.value
                     for family in text_string_to_metric_families(sidecar.metrics())
                     for sample in family.samples if sample.name == "pathwatch_state_capacity"})
        return dict(last) if expected <= set(last) else None

    with SidecarProcess({"receiver": {"http_endpoint": ""}, "state": knobs},
                        state_dir=tmp_path) as sidecar:
        try:
            published = wait_until(lambda: capacities(sidecar), timeout=30,
                                   message="every state table the runbook names on /metrics")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; never published: {sorted(expected - set(last))}") from None
        assert sidecar.stop() == 0
    by_value = {value: f"state.{key}" for key, value in knobs.items()}
    for table, capacity in published.items():
        if table == "incidents":  # evicts by its own rules, never counted here: said in the text
            assert "table `incidents`" in text and table not in rows
            continue
        assert table in rows, f"the runbook does not name table {table!r}"
        key = by_value.get(capacity)
        if key is None:  # a multiple of one (duplicates' held findings: one per run and event type)
            key = next((f"state.{name}" for name, value in knobs.items()
                        if capacity % value == 0 and capacity // value <= 16), None)
        assert key != "state.max_connections"
        if key:
            assert rows[table].startswith(f"`{key}`"), (table, key, rows[table])
        else:
            assert rows[table].startswith(f"fixed ({capacity:,.0f} "), (table, capacity, rows[table])
    assert "heartbeats" in rows and "heartbeats" in published  # its own tracker, published alike
    assert "`state.max_connections` bounds no table" in " ".join(text.split())


def test_every_receiver_outcome_but_accepted_is_explained_in_the_refusal_runbook() -> None:
    text = (RUNBOOKS / "PathwatchSidecarRefusingSpans.md").read_text()
    for outcome in set(SPAN_OUTCOMES) - {ACCEPTED}:
        assert f'`outcome="{outcome}"`' in text, (
            f"PathwatchSidecarRefusingSpans.md does not explain {outcome!r}")


def test_alert_outcome_matchers_are_checked_against_what_the_dispatcher_counts() -> None:
    # PathwatchAlertPagesFailing selects outcome=~"failed|dropped": a misspelt outcome would make it
    # silent for good, so the outcomes are a closed set the label-value check knows
    assert closed_label_values()[("pathwatch_alerts_sent_total", "outcome")] == AlertOutcomes.ALL
    [rule] = [rule for rule in alert_rules() if rule["alert"] == "PathwatchAlertPagesFailing"]
    matchers = [m for m in selector_matchers(rule["expr"]) if m[0] == "pathwatch_alerts_sent_total"]
    assert matchers and unknown_label_values(matchers) == []
    assert unknown_label_values(selector_matchers(
        'pathwatch_alerts_sent_total{outcome=~"failure|dropped"}'))


def test_the_docs_name_every_alert_outcome() -> None:
    text = (ROOT / "docs" / "sidecar.md").read_text()
    start = text.index("pathwatch_alerts_sent_total{sink,outcome}")
    listed = text[start:text.index("PathwatchAlertPagesFailing", start)]
    assert [o for o in sorted(AlertOutcomes.ALL) if o not in listed] == []


_CHART_VALUE = re.compile(r"`((?:config|secrets|persistence|monitoring|sidecar)\.[A-Za-z_.]*[A-Za-z_])`")


def _schema_has(schema: dict, dotted: str) -> bool:
    node = schema
    for key in dotted.split("."):
        properties = node.get("properties", {})
        if key not in properties:
            return False
        node = properties[key]
    return True


# the pages that name a chart value (three today; a case per page naming none would check nothing)
PAGES_NAMING_CHART_VALUES = [page for page in RUNBOOK_PAGES if _CHART_VALUE.findall(page.read_text())]


@pytest.mark.parametrize("page", PAGES_NAMING_CHART_VALUES, ids=[p.name for p in PAGES_NAMING_CHART_VALUES])
def test_the_chart_values_a_runbook_names_exist(page) -> None:
    import json
    schema = json.loads((ROOT / "helm" / "pathwatch" / "values.schema.json").read_text())
    named = _CHART_VALUE.findall(page.read_text())
    assert named
    unknown = [value for value in named if not _schema_has(schema, value)
               and not _schema_has(schema["properties"]["config"], value)]   # sidecar.yaml's own keys
    assert unknown == [], f"{page.name}: {unknown}"


def test_the_alert_pages_runbook_sends_the_chart_s_credentials_to_its_secrets() -> None:
    # it sent them to `config.alerting` "in the chart", where the chart refuses a secret: the
    # webhook's URL and Alertmanager's password or bearer token are kept in its Secret
    text = " ".join((RUNBOOKS / "PathwatchAlertPagesFailing.md").read_text().split())
    assert "(`config.alerting` in the chart)" not in text
    for value in ("secrets.webhookUrl", "secrets.alertmanagerPassword", "secrets.alertmanagerBearerToken"):
        assert f"`{value}`" in text, value
