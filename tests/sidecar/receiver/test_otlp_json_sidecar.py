"""OTLP/JSON against the real sidecar process (``python -m sidecar``): spans posted as JSON are
analysed like spans posted as protobuf — a bleed becomes an incident, a clean run nothing — and bad
JSON is answered and counted as bad protobuf is, without hurting the process."""

from __future__ import annotations

import gzip
import json
import random

import httpx
import pytest

from sidecar.rules import BLEED_OWNER_VS_AMBIENT
from tests.e2e.fixture_sidecar import Sidecar
from tests.sidecar.receiver.otlp_payloads import (make_request, make_span, otlp_json,
                                                  otlp_json_document, run_spans)
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)
JSON = {"Content-Type": "application/json"}
MAX_MESSAGE_BYTES = 64 * 1024
SPANS_PER_RUN = 12  # request, execute, 5 emits, 5 writes (run_spans)
# whether each event's write answered its emit is judged delivery_deadline_s +
# delivery_export_allowance_s after the emit's receipt (2 + 6 s by default), long after the run is
# judged (run_idle_s): "a clean run is nothing" looked before any delivery finding could come. A
# run's spans come in one request here: no allowance, a deadline within the idle time, so once a
# run is judged so are its events
RULES = {"run_idle_s": 0.5, "delivery_deadline_s": 0.3, "delivery_export_allowance_s": 0.0}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    with Sidecar(tmp_path_factory.mktemp("otlp-json"), rules=RULES,
                 receiver={"max_message_bytes": MAX_MESSAGE_BYTES}) as process:
        yield process
        assert process.stop() == 0, process.log()


def post_json(sidecar: Sidecar, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"http://{sidecar.http_endpoint}/v1/traces", content=body,
                      headers={**JSON, **headers}, timeout=20)


def http_requests(sidecar: Sidecar, status: str) -> float:
    return sidecar.metric("pathwatch_receiver_requests_total", protocol="http", status=status)


def http_spans(sidecar: Sidecar, outcome: str) -> float:
    return sidecar.metric("pathwatch_receiver_spans_total", protocol="http", outcome=outcome)


def test_a_bleed_sent_as_json_is_an_incident_and_a_clean_run_is_nothing(sidecar):
    clean = run_spans(1, random.Random(11))
    response = post_json(sidecar, otlp_json(make_request(clean)))
    assert response.status_code == 200 and response.json() == {}
    assert response.headers["content-type"] == "application/json"
    wait_until(lambda: sidecar.metric("pathwatch_runs_completed_total", outcome="complete") == 1,
               timeout=20, message="the clean JSON run judged complete")
    assert sidecar.incidents() == []

    bleed = run_spans(2, random.Random(12), bleed=True)
    # as the JS SDK writes it: upper-case hex is fine too, and 64-bit integers as numbers
    response = post_json(sidecar, gzip.compress(otlp_json(make_request(bleed), upper_hex=True,
                                                          int64_as_numbers=True)),
                         **{"Content-Encoding": "gzip"})
    assert response.status_code == 200 and response.json() == {}
    (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT), timeout=20,
                             message="the bleed incident from spans sent as JSON")
    assert incident["sample_trace_ids"] == [bleed[0].trace_id.hex()]
    assert (incident["severity"], incident["role"], incident["entry_point"]) == (
        "critical", "execution_engine", "/ws")
    assert [i["rule"] for i in sidecar.incidents()] == [BLEED_OWNER_VS_AMBIENT]
    assert http_spans(sidecar, "accepted") == 2 * SPANS_PER_RUN
    assert sidecar.metric("pathwatch_receiver_invalid_attributes_total") == 0


def test_bad_json_is_400_in_json_counted_and_analyses_nothing(sidecar):
    before_400, before_spans = http_requests(sidecar, "400"), sidecar.metric(
        "pathwatch_receiver_spans_total")
    for body, expected in [
        (b"{not json", "malformed JSON"),
        (b"[]", "must be a JSON object"),
        (json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
            {"traceId": "01" * 16, "spanId": "02" * 8, "endTimeUnixNano": "later"}]}]}]}).encode(),
         "resourceSpans[0].scopeSpans[0].spans[0].endTimeUnixNano: "),
        # json.loads would keep the last: the span dropped without a word
        (otlp_json(make_request([make_span({})]))[:-1] + b', "resourceSpans": []}',
         "key 'resourceSpans' given twice"),
    ]:
        response = post_json(sidecar, body)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert expected in response.json()["message"]
    assert http_requests(sidecar, "400") == before_400 + 4
    assert sidecar.metric("pathwatch_receiver_spans_total") == before_spans


def test_a_bad_hex_id_rejects_its_span_alone(sidecar):
    before_invalid, before_accepted = http_spans(sidecar, "invalid"), http_spans(sidecar, "accepted")
    document = otlp_json_document(make_request([make_span({}), make_span({}, name="bad")]))
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["traceId"] = "g" * 32
    response = post_json(sidecar, json.dumps(document).encode())
    assert response.status_code == 200
    partial = response.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1"
    assert "spans[1] 'bad': traceId must be 32 hex digits" in partial["errorMessage"]
    assert http_spans(sidecar, "invalid") == before_invalid + 1
    assert http_spans(sidecar, "accepted") == before_accepted + 1


def test_an_attribute_nested_too_deep_costs_its_value_alone(sidecar):
    # protobuf's JSON parser refused the whole request for it (400, not retried: its spans lost)
    before = http_spans(sidecar, "accepted"), sidecar.metric(
        "pathwatch_receiver_invalid_attributes_total", attribute="pathwatch.run.id")
    value: dict = {"stringValue": "leaf"}
    for _ in range(60):
        value = {"arrayValue": {"values": [value]}}
    document = otlp_json_document(make_request([make_span({"pathwatch.run.id": "r"}),
                                                make_span({"pathwatch.run.id": "r"})]))
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[0]["attributes"].append({"key": "another.instrumentations", "value": value})
    spans[1]["attributes"].append({"key": "pathwatch.run.id", "value": value})
    response = post_json(sidecar, json.dumps(document).encode())
    assert (response.status_code, response.json()) == (200, {})
    assert (http_spans(sidecar, "accepted"), sidecar.metric(
        "pathwatch_receiver_invalid_attributes_total", attribute="pathwatch.run.id")) == (
        before[0] + 2, before[1] + 1)


def test_json_bodies_have_the_body_limit_gzip_included(sidecar):
    before = http_requests(sidecar, "413")
    padded = b'{"resourceSpans": []' + b" " * MAX_MESSAGE_BYTES + b"}"
    assert post_json(sidecar, padded).status_code == 413
    bomb = gzip.compress(padded)
    assert len(bomb) < MAX_MESSAGE_BYTES
    response = post_json(sidecar, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert "max_message_bytes" in response.json()["message"]
    assert http_requests(sidecar, "413") == before + 2


def test_still_ready_afterwards(sidecar):
    assert httpx.get(f"{sidecar.api_url}/readyz", timeout=5).status_code == 200
