from pathlib import Path

from sidecar.alerting import alert_labels, alertmanager_alert, alertname, runbook_link, webhook_body
from sidecar.incidents import new_incident
from sidecar.model import Finding, Severity
from sidecar.rules import CATALOG
from tests.sidecar.incidents.findings import bleed, duplicate

RAW_USER = "alice@example.com"


def test_alertname_per_rule_family():
    assert alertname("bleed.owner_vs_ambient") == "PathwatchBleed"
    assert alertname("duplicate.execution") == "PathwatchDuplicate"
    assert alertname("delivery.undelivered") == "PathwatchDelivery"
    assert alertname("custom_thing.rule") == "PathwatchCustomThing"


def test_runbook_pages_follow_the_alert_rules():
    assert runbook_link("bleed.shared_instance", "https://d/r/") == "https://d/r/PathwatchCrossUserBleed.md"
    assert runbook_link("delivery.no_connection").endswith("/docs/runbooks/PathwatchUndeliveredEventsHigh.md")
    assert runbook_link("custom.rule", "https://d") == "https://d/PathwatchCustom.md"


def test_every_rule_links_a_runbook_that_exists():
    runbooks = Path(__file__).resolve().parents[3] / "docs" / "runbooks"
    for rule_id in CATALOG:
        page = runbook_link(rule_id, "x").removeprefix("x/")
        assert (runbooks / page).is_file(), f"{rule_id}: no runbook {page}"


def test_labels_carry_the_fingerprint_parts():
    incident = new_incident(bleed("t1"), sample_limit=5)
    assert alert_labels(incident) == {
        "alertname": "PathwatchBleed", "severity": "critical", "rule": "bleed.owner_vs_ambient",
        "role": "execution_engine", "implementation": "demo.engines.UserExecutionEngine",
        "entry_point": "/ws", "incident_id": incident.id, "service": "pathwatch",
        "component": "pathwatch", "category": "isolation"}


def test_missing_parts_are_left_out_of_the_labels():
    finding = Finding(rule="bleed.leaked_context", severity=Severity.CRITICAL, summary="leaked")
    assert set(alert_labels(new_incident(finding, 5))) == {
        "alertname", "severity", "rule", "incident_id", "service", "component", "category"}


def test_alert_links_back_to_the_incident():
    incident = new_incident(duplicate("d1"), sample_limit=5)
    alert = alertmanager_alert(incident, external_url="https://pw.example/", runbook_url="https://d/r")
    assert alert["generatorURL"] == f"https://pw.example/api/v1/incidents/{incident.id}"
    assert alert["annotations"]["runbook_url"] == "https://d/r/PathwatchDuplicateExecution.md"
    assert alert["annotations"]["summary"] == "run executed by two engines"
    assert "d1" in alert["annotations"]["description"]
    assert alert["startsAt"].endswith("Z")
    assert "generatorURL" not in alertmanager_alert(incident)


def test_no_user_id_reaches_the_alert():
    finding = bleed("t1")
    finding.details = {"ambient_user": RAW_USER, "owner": RAW_USER}
    finding.run_id = RAW_USER
    body = webhook_body(new_incident(finding, sample_limit=5))
    assert RAW_USER not in repr(body)
    assert body["incident"]["rule"] == "bleed.owner_vs_ambient"
