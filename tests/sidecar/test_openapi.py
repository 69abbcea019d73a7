"""The API description (sidecar/openapi.yaml, served as /api/v1/openapi.json) against the API itself.

In-process: the served document is the packaged file, and its routes, filters, limits and enums are
the code's. Against a real sidecar process holding incidents: schemathesis (its engine, as
``schemathesis run`` drives it, from a normal test) fuzzes every operation of the served document
and checks each answer against it.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
import yaml
from prometheus_client import CollectorRegistry
from schemathesis.engine import Status, StopReason, events, from_schema

from sidecar.api import create_api, openapi_document
from sidecar.incidents import IncidentStore
from sidecar.telemetry import Telemetry
from sidecar.testing import SidecarProcess
from tests.e2e.fixture_runs import RETIRED_ENGINE, send_runs
from tests.sidecar.test_api import TOKEN, client
from tests.support import wait_until

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


def test_the_description_ships_in_the_package():
    # a wheel (the image's `pip install .`) holds only the package data pyproject.toml names
    pyproject = tomllib.loads((SPEC_PATH.parents[1] / "pyproject.toml").read_text("utf-8"))
    assert "openapi.yaml" in pyproject["tool"]["setuptools"]["package-data"]["sidecar"]
    assert SPEC_PATH.parent.name == "sidecar" and (SPEC_PATH.parent / "__init__.py").exists()


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
    assert findings["after"]["schema"] == {"type": "integer", "minimum": 0, "maximum": recent.MAX_SEQ}
    assert schema(spec, "IncidentList")["properties"]["limit"]["maximum"] == query.MAX_LIMIT
    assert schema(spec, "FindingList")["properties"]["limit"]["maximum"] == recent.MAX_LIMIT


def test_no_other_path_takes_a_query_parameter_but_metrics():
    # every path refuses one it does not take: the description lists exactly the ones taken
    from sidecar.api import METRICS_PARAMETERS

    spec = openapi_document()
    taken = {path: {p["name"] for p in spec["paths"][path]["get"].get("parameters", ())
                    if p.get("in") == "query"}
             for path in spec["paths"] if path not in ("/api/v1/incidents", "/api/v1/findings")}
    assert taken.pop("/metrics") == set(METRICS_PARAMETERS)
    assert taken == {path: set() for path in taken}
    for path, item in spec["paths"].items():  # and the 400 is described wherever it is answered
        for method, operation in item.items():
            if method in ("get", "patch"):
                assert "400" in operation["responses"], (method, path)


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
    from sidecar.consolidation.verdicts import LEDGER_STATES
    ledger = schema(spec, "Verdicts")["properties"]["ledger"]
    assert ledger["properties"]["state"]["enum"] == list(LEDGER_STATES)
    assert set(ledger["required"]) == set(ledger["properties"])


# --- schemathesis against a real sidecar -----------------------------------------------------------
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEEDED_RULES = {"bleed.owner_vs_ambient", "delivery.missing_required_events", "deploy.regression"}
CHECKS = [
    "not_a_server_error",            # no 5xx
    "status_code_conformance",       # every status code is described for its operation
    "content_type_conformance",      # with the content type described
    "response_schema_conformance",   # and a body its schema accepts
    "response_headers_conformance",  # Link, WWW-Authenticate as described
    "negative_data_rejection",       # what the description forbids is a 4xx
    "unsupported_method",            # a method not described is a 405 ...
    "allow_header_conformance",      # ... whose Allow lists the described ones
    "ignored_auth",                  # an operation behind the token refuses a request without it
]
# Not run: positive_data_acceptance — a well-formed RFC 3339 `since` before 1970 or after 2262 is
# rightly a 400 (times are 64-bit ns), which JSON Schema's date-time cannot say; use_after_free,
# ensure_resource_availability, object_level_authorization — nothing is created or deleted, one token.


@pytest.fixture(scope="module")
def seeded_sidecar(tmp_path_factory):
    """A sidecar with a token, holding critical and warning incidents of several rules: the
    official OTLP exporter sends a version 1.0, a version 2.0 that builds engines for the wrong
    user (bleed, then a deploy regression), and two runs of a retired engine."""
    state_dir = tmp_path_factory.mktemp("openapi-sidecar")
    config = {"rules": {"delivery_deadline_s": 0.2, "run_idle_s": 0.3}}
    with SidecarProcess(config, state_dir=state_dir, env={"PATHWATCH_API_TOKEN": TOKEN}) as sidecar:
        send_runs(sidecar.grpc_endpoint, version="1.0", runs=20)
        send_runs(sidecar.grpc_endpoint, version="2.0", runs=20, owner="bob")
        send_runs(sidecar.grpc_endpoint, version="2.0", runs=2, engine=RETIRED_ENGINE, dropped_spans=3)

        def seeded() -> bool:
            answer = httpx.get(f"{sidecar.api_url}/api/v1/incidents", headers=AUTH, timeout=5).json()
            return SEEDED_RULES <= {incident["rule"] for incident in answer["incidents"]}

        wait_until(seeded, timeout=30, message=f"incidents of {sorted(SEEDED_RULES)}")
        yield sidecar
        assert sidecar.stop() == 0


def fuzz(api_url: str, *, seed: int = 7, max_examples: int = 25) -> tuple[list[str], Counter, StopReason]:
    """Run schemathesis' phases (coverage, fuzzing, stateful via the description's links) against
    the served description; the failures (with a curl command each), the statuses answered per
    (phase, operation) and why the engine stopped."""
    config = schemathesis.Config.from_dict({
        "seed": seed,
        "base-url": api_url,
        "headers": AUTH,
        "generation": {"max-examples": max_examples, "deterministic": True, "database": "none"},
        # ?rule=a&rule=b is a 400 too
        "phases": {"coverage": {"generate-duplicate-query-parameters": True}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    })
    schema = schemathesis.openapi.from_url(f"{api_url}/api/v1/openapi.json", headers=AUTH, config=config)
    failures: list[str] = []
    statuses: Counter = Counter()
    stop_reason = None
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                if interaction.response is not None:
                    operation = recorder.cases[case_id].value.operation.label
                    statuses[event.phase.value, operation, interaction.response.status_code] += 1
            for case_checks in event.recorder.checks.values():
                for check in case_checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(f"[{event.phase.value}] {check.name}: {failure.title}\n"
                                        f"{failure.message}\n{check.failure_info.code_sample}")
        elif isinstance(event, events.NonFatalError):
            failures.append(f"schemathesis error at {event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            failures.append(f"schemathesis error: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            stop_reason = event.stop_reason
    return sorted(set(failures)), statuses, stop_reason


@pytest.mark.timeout(120)
def test_the_api_answers_as_its_description_says(seeded_sidecar):
    failures, statuses, stop_reason = fuzz(seeded_sidecar.api_url)
    assert not failures, "\n\n".join(failures)
    assert stop_reason == StopReason.COMPLETED
    answered = {operation for _, operation, _ in statuses}
    described = {f"{method} {path}" for path, methods in operations(openapi_document()).items()
                 for method in methods}
    # every operation was exercised, but the one the description was loaded from (schemathesis
    # leaves it out; the in-process tests above cover it)
    assert answered >= described - {"GET /api/v1/openapi.json"}

    def answers(operation: str, status: int, phase: str | None = None) -> int:
        return sum(n for (p, o, s), n in statuses.items() if (o, s) == (operation, status)
                   and phase in (None, p))

    # and not only refused: real incidents were read and changed (ids taken from earlier answers,
    # and in the stateful phase from the list's links)
    for operation in ("GET /api/v1/incidents/{incident_id}", "PATCH /api/v1/incidents/{incident_id}"):
        assert answers(operation, 200) > 0 and answers(operation, 200, "stateful") > 0
        assert answers(operation, 404) > 0
    assert answers("GET /api/v1/incidents", 200) > 0 and answers("GET /api/v1/incidents", 400) > 0
    assert answers("GET /api/v1/incidents", 405, "coverage") > 0  # undescribed methods were tried
