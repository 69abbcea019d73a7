"""The Prometheus alert rules: valid, unit-tested by promtool, labelled, and each with a runbook."""

from __future__ import annotations

import re

import pytest
import yaml

from dashboards.queries import metric_names, selector_labels
from sidecar.model import Severity
from sidecar.rules import CATALOG
from tests.dashboards.catalog import sidecar_metrics, target_labels
from tests.dashboards.tooling import (
    RULE_TESTS,
    RULES,
    RUNBOOK_BASE,
    RUNBOOKS,
    alert_rules,
    promtool,
)

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
        "PathwatchStateEvictingAtCapacity",
        "PathwatchBackendDroppingSpans", "PathwatchSidecarAbsent", "PathwatchDeployRegression",
        "PathwatchRetiredImplementationRevived", "PathwatchEntryPointPathsAboveOne"}
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
