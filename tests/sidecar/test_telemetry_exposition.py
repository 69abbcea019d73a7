"""Label values the backend chose (role, implementation, entry point: admitted by the receiver up to
512 characters, any UTF-8) survive both exposition formats: the text format passes
`promtool check metrics` and an OpenMetrics scrape parses back to the same values, with the
findings' trace-id exemplar within OpenMetrics' 128-rune limit."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from sidecar.api import create_api
from sidecar.config import RulesConfig, StateConfig
from sidecar.incidents import IncidentStore
from sidecar.inventory import Inventory
from sidecar.telemetry import Telemetry
from tests.dashboards.tooling import promtool_check_metrics
from tests.sidecar.detectors.factory import S, T0, Trace

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
HOSTILE = {
    "role": 'role "quoted"\nsecond line',
    "implementation": "pkg\\Engine" + "é" * 500,  # 510 characters, non-ASCII
    "entry_point": "/ws/{id}\t# not a comment",
}


def _scrape(telemetry: Telemetry, accept: str | None) -> str:
    app = create_api(IncidentStore(":memory:"), Inventory(), telemetry.registry, lambda: True, None)
    headers = {"Accept": accept} if accept else {}
    with TestClient(app) as client:
        response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    return response.text


def _hostile_telemetry() -> Telemetry:
    telemetry = Telemetry(CollectorRegistry())
    inventory = Inventory(RulesConfig(), StateConfig(), telemetry)
    span = Trace(entry_point=HOSTILE["entry_point"]).execute(HOSTILE["implementation"])
    span.role = HOSTILE["role"]
    inventory.consume([span], T0 + 86_400 * S)
    inventory.tick(T0 + 86_400 * S)
    telemetry.findings.labels(rule="bleed.owner_vs_ambient", severity="critical", **HOSTILE).inc(
        exemplar={"trace_id": TRACE})
    return telemetry


def test_backend_chosen_label_values_pass_promtool_in_the_text_format():
    text = _scrape(_hostile_telemetry(), None)
    assert "second line" in text and "pathwatch_calls_total{" in text
    result = promtool_check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_backend_chosen_label_values_round_trip_through_openmetrics_with_the_exemplar():
    text = _scrape(_hostile_telemetry(), "application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    calls = [s for s in families["pathwatch_calls"].samples if s.name == "pathwatch_calls_total"]
    assert [(s.labels["role"], s.labels["implementation"], s.labels["entry_point"], s.value)
            for s in calls] == [(HOSTILE["role"], HOSTILE["implementation"], HOSTILE["entry_point"], 1.0)]
    findings = [s for s in families["pathwatch_findings"].samples if s.name == "pathwatch_findings_total"]
    assert len(findings) == 1 and all(findings[0].labels[k] == v for k, v in HOSTILE.items())
    exemplar = findings[0].exemplar
    assert exemplar.labels == {"trace_id": TRACE}
    assert sum(len(k) + len(v) for k, v in exemplar.labels.items()) <= 128
