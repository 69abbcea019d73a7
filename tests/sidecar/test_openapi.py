"""The API description (sidecar/openapi.yaml, served as /api/v1/openapi.json) against the API itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.api import create_api, openapi_document
from sidecar.incidents import IncidentStore
from sidecar.telemetry import Telemetry
from tests.sidecar.test_api import TOKEN, client

SPEC_PATH = Path(__file__).resolve().parents[2] / "sidecar" / "openapi.yaml"


@pytest.fixture
def store():
    store = IncidentStore(":memory:")
    yield store
    store.close()


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


def test_the_served_description_is_the_packaged_file(store, telemetry):
    response = client(store, telemetry).get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == yaml.safe_load(SPEC_PATH.read_text("utf-8")) == openapi_document()
    assert response.json()["openapi"].startswith("3.1")


def test_the_description_needs_the_token_as_the_rest_of_the_api(store, telemetry):
    api = client(store, telemetry, token=TOKEN)
    assert api.get("/api/v1/openapi.json").status_code == 401
    authorized = api.get("/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorized.status_code == 200 and authorized.json()["info"]["title"]


def operations(spec: dict) -> dict[str, set[str]]:
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {path: {m.upper() for m in item if m in methods} for path, item in spec["paths"].items()}


def test_every_route_is_described_with_its_methods(store, telemetry):
    app = create_api(store, None, telemetry.registry, lambda: True, None)
    served = {route.path: set(route.methods) - {"HEAD"} for route in app.routes}
    assert operations(openapi_document()) == served


def query_parameters(spec: dict, path: str) -> dict[str, dict]:
    components = spec["components"]["parameters"]
    found = {}
    for parameter in spec["paths"][path]["get"]["parameters"]:
        if "$ref" in parameter:
            parameter = components[parameter["$ref"].rpartition("/")[2]]
        found[parameter["name"]] = parameter
    return found


def schema(spec: dict, name: str) -> dict:
    return spec["components"]["schemas"][name]


def test_the_filters_are_the_ones_the_queries_accept():
    # an unknown query parameter is a 400: the description must list exactly the accepted ones
    from sidecar.incidents import query, recent

    spec = openapi_document()
    incidents = query_parameters(spec, "/api/v1/incidents")
    findings = query_parameters(spec, "/api/v1/findings")
    assert set(incidents) == set(query._PARAMETERS)
    assert set(findings) == set(recent._PARAMETERS)
    assert incidents["limit"]["schema"] == {"type": "integer", "minimum": 1,
                                            "maximum": query.MAX_LIMIT, "default": query.DEFAULT_LIMIT}
    assert findings["limit"]["schema"] == {"type": "integer", "minimum": 1,
                                           "maximum": recent.MAX_LIMIT, "default": recent.DEFAULT_LIMIT}
    assert schema(spec, "IncidentList")["properties"]["limit"]["maximum"] == query.MAX_LIMIT
    assert schema(spec, "FindingList")["properties"]["limit"]["maximum"] == recent.MAX_LIMIT


def test_the_enums_are_the_codes():
    from sidecar.incidents.query import STATUSES
    from sidecar.model import Severity
    from sidecar.rules import CATALOG

    spec = openapi_document()
    assert schema(spec, "RuleId")["enum"] == sorted(CATALOG)
    assert schema(spec, "Severity")["enum"] == [s.value for s in Severity]
    assert schema(spec, "Status")["enum"] == list(STATUSES)
    # a section is any key of the whole picture but its time
    picture = schema(spec, "Consolidation")
    sections = [key for key in picture["properties"] if key != "generated_at"]
    assert schema(spec, "ConsolidationSection")["enum"] == sections
    assert set(picture["required"]) == set(picture["properties"])
    answer = schema(spec, "ConsolidationSectionAnswer")["properties"]
    assert answer == picture["properties"]
