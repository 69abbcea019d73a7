import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from sidecar import rules
from sidecar.alerting import (AlertDispatcher, alert_labels, alertmanager_alert, alertname,
                              runbook_link, webhook_body)
from sidecar.api import openapi_document
from sidecar.config import AlertingConfig
from sidecar.incidents import IncidentStore, merge_finding, new_incident
from sidecar.model import Finding, Severity
from sidecar.rules import CATALOG
from tests.sidecar.alerting.servers import Collector
from tests.sidecar.incidents.findings import bleed, duplicate
from tests.support import wait_until

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


def test_the_alert_names_the_service_of_the_finding_that_raised_it_in_an_annotation():
    incident = new_incident(bleed("t1", service="checkout"), sample_limit=5)
    merge_finding(incident, bleed("t2", service="billing"), sample_limit=5)
    alert = alertmanager_alert(incident)
    assert alert["annotations"]["service_name"] == "billing"  # the newest finding's
    assert "service(s) checkout, billing" in alert["annotations"]["description"]
    # not a label: a label that changed between a page and its refresh would be a second alert
    assert alert["labels"] == alert_labels(new_incident(bleed("t1"), sample_limit=5))
    body = webhook_body(incident)
    assert body["service_name"] == "billing"
    assert body["incident"]["services"] == ["checkout", "billing"]


def test_an_incident_whose_findings_named_no_service_has_no_service_annotation():
    incident = new_incident(bleed("t1"), sample_limit=5)
    assert "service_name" not in alertmanager_alert(incident)["annotations"]
    assert webhook_body(incident)["service_name"] is None


def test_no_user_id_reaches_the_alert():
    finding = bleed("t1")
    finding.details = {"ambient_user": RAW_USER, "owner": RAW_USER}
    finding.run_id = RAW_USER
    body = webhook_body(new_incident(finding, sample_limit=5))
    assert RAW_USER not in repr(body)
    assert body["incident"]["rule"] == "bleed.owner_vs_ambient"


# -- the webhook's body as documented (sidecar/openapi.yaml webhooks.incidentPaged, docs/sidecar.md) --

DOCS = Path(__file__).resolve().parents[3] / "docs" / "sidecar.md"


def _documented(name: str) -> dict:
    return openapi_document()["components"]["schemas"][name]


def _check_documented(body: object) -> None:
    """Valid against the documented schema, every error listed."""
    schema = {"$ref": "#/components/schemas/WebhookPayload",
              "components": openapi_document()["components"]}
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
              for error in validator.iter_errors(body)]
    assert errors == []


@pytest.mark.parametrize("external_url", ["", "http://127.0.0.1:9464"])
def test_the_webhook_gets_the_documented_body_and_the_documentation_names_every_field(external_url):
    store = IncidentStore(":memory:")
    bare = Finding(rule=rules.DELIVERY_MISSING_REQUIRED_EVENTS, severity=Severity.CRITICAL,
                   summary="a run missed required events", detected_ns=1)  # no culprit parts
    with Collector() as webhook:
        alerts = AlertDispatcher(AlertingConfig(webhook_url=webhook.url, external_url=external_url),
                                 ledger=store)
        alerts.notify([incident for incident, _ in store.record(
            [bleed("t1", service="checkout"), bleed("t2", at_s=1), duplicate("d1"), bare])])
        bodies = wait_until(lambda: len(webhook.received()) == 2 and webhook.received(),
                            message="both critical incidents paged")
        alerts.close()
    for body in bodies:
        _check_documented(body)
        # every field sent is documented and every documented one is sent (additionalProperties
        # false and required, but the optional ones): nothing undocumented, nothing stale
        assert set(body) == set(_documented("WebhookPayload")["properties"])
        alert = _documented("WebhookAlert")["properties"]
        assert set(body["alert"]) == set(alert) - ({"generatorURL"} if not external_url else set())
        assert set(body["incident"]) == set(_documented("Incident")["properties"])
    annotations = [set(body["alert"]["annotations"]) for body in bodies]  # service_name: not bare's
    assert set.union(*annotations) == set(_documented("WebhookAlert")["properties"]["annotations"]
                                          ["properties"])
    assert set.intersection(*annotations) == set(
        _documented("WebhookAlert")["properties"]["annotations"]["required"])
    assert sorted(body["service_name"] or "" for body in bodies) == ["", "checkout"]
    labels = [set(body["alert"]["labels"]) for body in bodies]
    assert set.union(*labels) == set(_documented("WebhookAlert")["properties"]["labels"]["properties"])
    assert set.intersection(*labels) == set(
        _documented("WebhookAlert")["properties"]["labels"]["required"])


def test_the_documented_example_of_the_webhook_body_is_valid_and_complete():
    text = DOCS.read_text("utf-8")
    section = text[text.index("## The webhook's body"):]
    example = json.loads(section[section.index("```json") + len("```json"):section.index("\n```\n")])
    _check_documented(example)
    fields = {"version", "source", "service_name", "alert", "incident"} | {
        f"alert.{name}" for name in example["alert"]}
    table = section[section.index("| field | what |"):section.index("\n\n", section.index("| field"))]
    for field in fields - {"alert.startsAt", "alert.endsAt"}:
        assert f"| `{field}` |" in table, field
    assert "| `alert.startsAt`, `alert.endsAt` |" in table


def test_a_resolved_alert_never_ends_before_it_starts():
    # Alertmanager refuses (400) an alert whose endsAt is before its startsAt: a resolve of an
    # incident younger than the clock allowance ends at its start
    incident = new_incident(bleed("t1"), 10)
    alert = alertmanager_alert(incident, ended_ns=incident.first_seen_ns - 60 * 10**9)
    assert alert["endsAt"] == alert["startsAt"]
