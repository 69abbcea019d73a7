"""GET /api/v1/findings: the recent findings one by one, filtered, behind the token like the rest."""

from __future__ import annotations

import dataclasses

import pytest

from tests.sidecar.incidents.findings import bleed, duplicate
from tests.sidecar.test_api import TOKEN, client, store, telemetry  # noqa: F401 (fixtures)


def test_lists_recent_findings_oldest_first_with_their_incident(store, telemetry):
    body = client(store, telemetry).get("/api/v1/findings").json()
    assert [f["trace_id"] for f in body["findings"]] == ["t1", "t2", "d1"]
    first = body["findings"][0]
    assert first["rule"] == "bleed.owner_vs_ambient" and first["seq"] == 1
    assert first["incident_id"] == bleed("t1").fingerprint
    assert first["detected"].endswith("Z")
    assert (body["count"], body["last_seq"], body["next_after"], body["evicted"]) == (3, 3, 3, 0)
    page = client(store, telemetry).get("/api/v1/findings", params={"limit": "2"}).json()
    assert (page["count"], page["last_seq"], page["next_after"], page["first_seq"]) == (2, 3, 2, 1)


def test_filters_by_run_rule_and_sequence(store, telemetry):
    store.record([dataclasses.replace(duplicate("d2"), run_id="run-7")])
    api = client(store, telemetry)
    assert [f["trace_id"] for f in api.get("/api/v1/findings", params={"run_id": "run-7"}).json()["findings"]] \
        == ["d2"]
    assert [f["trace_id"] for f in api.get("/api/v1/findings",
                                           params={"rule": "duplicate.execution"}).json()["findings"]] \
        == ["d1", "d2"]
    assert [f["seq"] for f in api.get("/api/v1/findings", params={"after": "2"}).json()["findings"]] == [3, 4]


@pytest.mark.parametrize(("params", "parameter"), [
    ({"limit": "-1"}, "limit"),
    # int() refuses more than 4300 digits: these were a 500
    ({"limit": "9" * 5000}, "limit"), ({"after": "9" * 5000}, "after"),
    ({"after": str(2**63)}, "after"),  # a seq is a 64-bit integer, as the description says
    ({"since": "2026-11-26T12:00:00.\u0967\u0968Z"}, "since"),  # Devanagari digits: read as .12
])
def test_bad_parameter_is_named(store, telemetry, params, parameter):
    response = client(store, telemetry).get("/api/v1/findings", params=params)
    assert response.status_code == 400 and response.json()["parameter"] == parameter
    assert parameter in response.json()["error"]


def test_needs_the_token_when_one_is_set(store, telemetry):
    api = client(store, telemetry, token=TOKEN)
    assert api.get("/api/v1/findings").status_code == 401
    authorized = api.get("/api/v1/findings", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorized.status_code == 200 and authorized.json()["count"] == 3


class StoreWithoutFindings:
    """An incident reader that keeps no ring of recent findings."""

    def get(self, incident_id):
        return None

    def list_incidents(self, query):
        return []


def test_without_a_ring_of_findings_the_answer_has_the_same_fields(telemetry):
    # the description's FindingList: "limit" was missing from this answer
    response = client(StoreWithoutFindings(), telemetry).get("/api/v1/findings", params={"limit": "7"})
    assert response.status_code == 200
    assert response.json() == {"findings": [], "count": 0, "limit": 7, "last_seq": 0, "next_after": 0,
                               "first_seq": 0, "capacity": 0, "evicted": 0}
