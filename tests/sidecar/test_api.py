import asyncio
import logging

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from sidecar.api import ApiTokenRequired, create_api, require_token_for
from sidecar.config import ConfigError
from sidecar.incidents import IncidentStore
from sidecar.telemetry import Telemetry
from tests.sidecar.incidents.findings import BASE_NS, bleed, duplicate

TOKEN = "s3cret-token"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class FakeInventory:
    """A fixed snapshot, not the real ``Inventory``: these tests are of how the API serves a
    snapshot (its shape, sets as lists, errors), which the real one makes only from spans fed to it;
    its own snapshot is tested in test_inventory.py, and a real sidecar serves it in
    consolidation/test_sidecar_process.py."""

    def __init__(self, snapshot=None) -> None:
        self._snapshot = snapshot if snapshot is not None else {"roles": {"execution_engine": {
            "implementations": {"demo.engines.UserExecutionEngine": {"calls": 7, "canonical": True}}}}}

    def snapshot(self):
        return self._snapshot


class BrokenInventory:
    def snapshot(self):
        raise RuntimeError("boom")


@pytest.fixture
def store():
    store = IncidentStore(":memory:")
    store.record([bleed("t1", at_s=10), bleed("t2", at_s=11), duplicate("d1", at_s=20)])
    yield store
    store.close()


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


class ApiClient:
    """Calls the ASGI app in-process through httpx (one event loop per request)."""

    def __init__(self, app) -> None:
        self._transport = httpx.ASGITransport(app=app)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        async def call() -> httpx.Response:
            async with httpx.AsyncClient(transport=self._transport, base_url="http://api") as http:
                return await http.request(method, path, **kwargs)

        return anyio.run(call)


def client(store, telemetry, *, token=None, ready=lambda: True, inventory=None, **options):
    app = create_api(store, inventory or FakeInventory(), telemetry.registry, ready, token, **options)
    return ApiClient(app)


def test_healthz_and_readyz(store, telemetry):
    state = {"ready": False}
    api = client(store, telemetry, ready=lambda: state["ready"])
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 503
    state["ready"] = True
    assert api.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_check_raises(store, telemetry):
    api = client(store, telemetry, ready=lambda: 1 / 0)
    assert api.get("/readyz").status_code == 503


def test_metrics_text_format(store, telemetry):
    telemetry.incidents_open.labels(rule="bleed.owner_vs_ambient", severity="critical").set(1)
    response = client(store, telemetry).get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'pathwatch_incidents_open{rule="bleed.owner_vs_ambient",severity="critical"} 1.0' in response.text


def test_metrics_openmetrics_carries_exemplars(store, telemetry):
    labels = dict(rule="bleed.owner_vs_ambient", severity="critical", role="execution_engine",
                  implementation="demo.engines.UserExecutionEngine", entry_point="/ws")
    telemetry.findings.labels(**labels).inc(exemplar={"trace_id": TRACE})
    api = client(store, telemetry)
    response = api.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert f'# {{trace_id="{TRACE}"}} 1.0' in response.text
    assert response.text.rstrip().endswith("# EOF")
    assert TRACE not in api.get("/metrics").text  # the classic format has no exemplars


@pytest.mark.parametrize("accept", ["application/openmetrics-text; version=1.a",
                                    "text/plain; version=x.y", "application/openmetrics-text; version=1.0.0\x00"])
def test_metrics_asked_for_a_version_that_is_no_version_answers_the_text_format(store, telemetry, accept):
    # prometheus-client compares the version's parts with numbers: it raised TypeError, a 500
    response = client(store, telemetry).get("/metrics", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert "pathwatch_" in response.text


def test_incidents_list_and_filters(store, telemetry):
    api = client(store, telemetry)
    body = api.get("/api/v1/incidents").json()
    assert body["count"] == 2 and body["limit"] == 100
    assert [i["rule"] for i in body["incidents"]] == ["duplicate.execution", "bleed.owner_vs_ambient"]
    bleed_row = body["incidents"][1]
    assert bleed_row["count"] == 2 and bleed_row["sample_trace_ids"] == ["t1", "t2"]
    assert bleed_row["severity"] == "critical" and bleed_row["status"] == "open"

    def rules(**params):
        return [i["rule"] for i in api.get("/api/v1/incidents", params=params).json()["incidents"]]

    assert rules(severity="critical") == ["bleed.owner_vs_ambient"]
    assert rules(rule="duplicate.execution") == ["duplicate.execution"]
    assert rules(since=str(BASE_NS // 10**9 + 15)) == ["duplicate.execution"]
    assert rules(since="2025-11-26T12:26:55Z") == ["duplicate.execution"]
    assert rules(limit="1") == ["duplicate.execution"]
    assert rules(status="resolved") == []
    store.set_status(duplicate().fingerprint, "resolved")
    assert rules(status="resolved") == ["duplicate.execution"]


@pytest.mark.parametrize("field", ["last_seen_unix", "last_seen"])
def test_since_with_an_incidents_own_last_seen_lists_it(tmp_path, telemetry, field):
    store = IncidentStore(str(tmp_path / "incidents.sqlite"))  # the database's query, not memory's
    finding = bleed("t1")
    finding.detected_ns = 1_795_784_463_123_999_700  # rounded up to .124 and ...1240002 as floats
    store.record([finding])
    api = client(store, telemetry)
    (shown,) = api.get("/api/v1/incidents").json()["incidents"]
    listed = api.get("/api/v1/incidents", params={"since": str(shown[field])}).json()["incidents"]
    store.close()
    assert [i["id"] for i in listed] == [shown["id"]]


def test_incidents_page_with_a_cursor(telemetry):
    store = IncidentStore(":memory:")
    store.record([bleed(implementation=f"demo.engines.E{n}", at_s=n // 2) for n in range(5)]
                 + [duplicate()])
    api = client(store, telemetry)
    everything = api.get("/api/v1/incidents").json()
    assert everything["count"] == 6 and everything["next_before"] is None
    assert "link" not in api.get("/api/v1/incidents").headers

    ids, params = [], {"severity": "critical", "limit": "2"}
    while True:
        response = api.get("/api/v1/incidents", params=params)
        body = response.json()
        ids += [i["id"] for i in body["incidents"]]
        if body["next_before"] is None:
            break
        assert body["count"] == body["limit"] == 2
        # the Link header is the same next page, filters kept
        link = response.headers["link"]
        assert link.startswith("</api/v1/incidents?") and link.endswith('>; rel="next"')
        assert api.get(link[1:link.index(">")]).json() == api.get(
            "/api/v1/incidents", params={**params, "before": body["next_before"]}).json()
        params["before"] = body["next_before"]
    assert ids == [i["id"] for i in everything["incidents"] if i["severity"] == "critical"]
    assert len(ids) == 5 and body["count"] == 1
    store.close()


@pytest.mark.parametrize(("params", "parameter"), [
    ({"limit": "lots"}, "limit"), ({"limit": "100000"}, "limit"), ({"severity": "bad"}, "severity"),
    ({"since": "last tuesday"}, "since"), ({"status": "gone"}, "status"), ({"colour": "red"}, "colour"),
    ({"since": "9999999999"}, "since"), ({"since": "2300-01-01T00:00:00Z"}, "since"),
    ({"before": "yesterday"}, "before"), ({"before": "1764160000"}, "before"),
    ({"before": "99999999999999999999:0123abcd"}, "before"), ({"before": "1:XYZ"}, "before"),
    ({"limit": "9" * 5000}, "limit"),  # int() refuses more than 4300 digits: it was a 500
    ({"since": "2026-11-26T12:00:00.\u0665Z"}, "since"),  # an Arabic-Indic five: it was read as .5
])
def test_bad_query_params_are_400_naming_the_parameter(store, telemetry, params, parameter):
    response = client(store, telemetry).get("/api/v1/incidents", params=params)
    assert response.status_code == 400
    body = response.json()
    assert body["parameter"] == parameter and parameter in body["error"]


class FakeConsolidation:
    """A fixed, empty snapshot: the test is of the query parameters every path refuses."""

    def snapshot(self):
        return {"generated_at": 1.0, "paths": {"entry_points": {}}}


@pytest.mark.parametrize("path", [
    "/healthz", "/readyz", "/metrics", "/api/v1/inventory", "/api/v1/consolidation",
    "/api/v1/consolidation/paths", f"/api/v1/incidents/{bleed().fingerprint}", "/api/v1/openapi.json"])
@pytest.mark.parametrize(("query", "parameter"), [
    ("x=1", "x"), ("role=a&role=b", "role"), ("status=resolved", "status"), ("format=yaml", "format")])
def test_every_path_refuses_a_query_parameter_it_does_not_take(store, telemetry, path, query, parameter):
    # they were silently ignored outside /incidents and /findings (?role=no_such_role listed everything)
    api = client(store, telemetry, consolidation=FakeConsolidation())
    assert api.get(path).status_code == 200
    response = api.get(f"{path}?{query}")
    assert response.status_code == 400
    assert response.json()["parameter"] == parameter and parameter in response.json()["error"]


def test_a_query_parameter_of_a_patch_is_refused(store, telemetry):
    response = client(store, telemetry).request(
        "PATCH", f"/api/v1/incidents/{bleed().fingerprint}?status=resolved", json={"status": "resolved"})
    assert response.status_code == 400 and response.json()["parameter"] == "status"
    assert store.get(bleed().fingerprint).status == "open"


def test_metrics_answers_the_samples_named_in_name_brackets(store, telemetry):
    # prometheus_client's own handlers read name[] (a scrape config's params); a list: repeatable
    telemetry.incidents_open.labels(rule="bleed.owner_vs_ambient", severity="critical").set(1)
    api = client(store, telemetry)
    everything = api.get("/metrics").text
    assert "pathwatch_incidents_open{" in everything and "pathwatch_build_info" in everything
    named = api.get("/metrics?name[]=pathwatch_incidents_open&name[]=pathwatch_build_info")
    assert named.status_code == 200
    assert {line.split("{")[0].split()[0] for line in named.text.splitlines()
            if not line.startswith("#")} == {"pathwatch_incidents_open", "pathwatch_build_info"}
    assert api.get("/metrics?name[]=").text == everything  # empty: as if not given
    refused = api.get("/metrics?name=pathwatch_build_info")
    assert refused.status_code == 400 and refused.json()["parameter"] == "name"


def test_one_incident_by_id(store, telemetry):
    api = client(store, telemetry)
    incident_id = bleed().fingerprint
    body = api.get(f"/api/v1/incidents/{incident_id}").json()
    assert body["id"] == incident_id and body["count"] == 2
    missing = api.get("/api/v1/incidents/0000000000000000")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no incident with id '0000000000000000'", "id": "0000000000000000"}


def test_an_incident_is_resolved_and_reopened_through_the_api(store, telemetry):
    api = client(store, telemetry)
    incident_id = bleed().fingerprint
    resolved = api.request("PATCH", f"/api/v1/incidents/{incident_id}", json={"status": "resolved"})
    assert resolved.status_code == 200 and resolved.json()["status"] == "resolved"
    listed = api.get("/api/v1/incidents", params={"status": "resolved"}).json()["incidents"]
    assert [i["id"] for i in listed] == [incident_id]
    assert incident_id not in [i["id"] for i in api.get("/api/v1/incidents", params={
        "status": "open"}).json()["incidents"]]
    store.record([bleed("t9")])  # a new finding reopens it
    assert api.get(f"/api/v1/incidents/{incident_id}").json()["status"] == "open"
    again = api.request("PATCH", f"/api/v1/incidents/{incident_id}", json={"status": "Open"})
    assert again.status_code == 200 and again.json()["status"] == "open"
    wrong = api.request("DELETE", f"/api/v1/incidents/{incident_id}")
    assert wrong.status_code == 405 and {"GET", "PATCH"} <= {
        m.strip() for m in wrong.headers["allow"].split(",")}


class LoopWatchingStore:
    """The store, counting the reads made on the event loop's thread (where a read waits for the
    store's lock, held while the pipeline commits, with every other request of the API)."""

    def __init__(self, store) -> None:
        self._store = store
        self.reads_on_the_loop = 0

    def get(self, incident_id):
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a worker thread
            pass
        else:
            self.reads_on_the_loop += 1
        return self._store.get(incident_id)

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_an_incident_change_reads_the_store_off_the_event_loop(store, telemetry):
    watched = LoopWatchingStore(store)
    api = client(watched, telemetry)
    incident_id = bleed().fingerprint
    assert api.get(f"/api/v1/incidents/{incident_id}").status_code == 200
    changed = api.request("PATCH", f"/api/v1/incidents/{incident_id}", json={"status": "resolved"})
    assert changed.status_code == 200 and changed.json()["status"] == "resolved"
    assert watched.reads_on_the_loop == 0


@pytest.mark.parametrize(("body", "status", "parameter"), [
    (b"not json", 400, "body"),
    (b'["resolved"]', 400, "body"),
    (b'{"status": "resolved", "count": 0}', 400, "body"),
    (b'{"status": "closed"}', 400, "status"),
    (b'{"status": "' + b"x" * 5000 + b'"}', 413, None),
    (b"[" * 4000, 400, "body"),  # nested past the JSON parser's recursion limit
    # a key given twice: json.loads kept the last, so this resolved the incident
    (b'{"status": "no such status", "status": "resolved"}', 400, "body"),
    (b'{"status": "resolved", "status": "resolved"}', 400, "body"),
    (b'{"status": {"a": 1, "a": 2}}', 400, "body"),
])
def test_a_bad_incident_change_is_refused_naming_what_is_wrong(store, telemetry, body, status, parameter):
    response = client(store, telemetry).request(
        "PATCH", f"/api/v1/incidents/{bleed().fingerprint}", content=body)
    assert response.status_code == status
    assert response.json().get("parameter") == parameter
    assert store.get(bleed().fingerprint).status == "open"


def test_a_key_given_twice_in_a_change_is_named(store, telemetry):
    response = client(store, telemetry).request(
        "PATCH", f"/api/v1/incidents/{bleed().fingerprint}",
        content=b'{"status": "no such status", "status": "resolved"}')
    assert response.json() == {"error": "key 'status' given twice; expected exactly one field, \"status\"",
                               "parameter": "body"}


def test_changing_an_unknown_incident_is_404_and_needs_the_token(store, telemetry):
    response = client(store, telemetry).request("PATCH", "/api/v1/incidents/0000000000000000",
                                                json={"status": "resolved"})
    assert response.status_code == 404
    protected = client(store, telemetry, token=TOKEN).request(
        "PATCH", f"/api/v1/incidents/{bleed().fingerprint}", json={"status": "resolved"})
    assert protected.status_code == 401 and store.get(bleed().fingerprint).status == "open"


def test_a_client_hanging_up_in_the_middle_of_a_change_is_no_error(store, telemetry):
    # the body read raised starlette's ClientDisconnect out of the app: uvicorn logged it as
    # "ERROR: Exception in ASGI application" with a traceback, for a client's hang-up
    app = create_api(store, FakeInventory(), telemetry.registry, lambda: True, None)
    messages = [{"type": "http.request", "body": b'{"sta', "more_body": True},
                {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PATCH",
             "scheme": "http", "path": f"/api/v1/incidents/{bleed().fingerprint}", "raw_path": b"",
             "query_string": b"", "root_path": "", "headers": [(b"content-length", b"400")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 9464)}
    asyncio.run(app(scope, receive, send))  # raised ClientDisconnect
    assert not messages  # the hang-up was read
    assert store.get(bleed().fingerprint).status == "open"


def test_changing_an_incident_while_the_sidecar_shuts_down_is_503(store, telemetry):
    store.close()  # the API stops last: it still answers while the store is closed
    response = client(store, telemetry).request(
        "PATCH", f"/api/v1/incidents/{bleed().fingerprint}", json={"status": "resolved"})
    assert response.status_code == 503 and "shutting down" in response.json()["error"]
    assert store.get(bleed().fingerprint).status == "open"


@pytest.mark.parametrize("path", [":memory:", "incidents.sqlite"])
def test_incidents_are_still_listed_while_the_sidecar_shuts_down(tmp_path, telemetry, path):
    store = IncidentStore(path if path == ":memory:" else str(tmp_path / path))
    store.record([bleed("t1", at_s=10), duplicate("d1", at_s=20)])
    store.close()  # the API stops last: a read between the two answers from memory, not a 500
    response = client(store, telemetry).get("/api/v1/incidents", params={"severity": "critical"})
    assert response.status_code == 200
    assert [i["id"] for i in response.json()["incidents"]] == [bleed().fingerprint]


def test_a_wrong_method_is_405_with_allow(store, telemetry):
    response = client(store, telemetry).request("POST", "/api/v1/incidents", json={})
    assert response.status_code == 405 and "GET" in response.headers["allow"]
    assert response.json()["path"] == "/api/v1/incidents"


def test_unknown_path_is_json_404(store, telemetry):
    response = client(store, telemetry).get("/api/v2/whatever")
    assert response.status_code == 404 and response.json()["path"] == "/api/v2/whatever"


@pytest.mark.parametrize("path", ["/api/v1/incidents/", "/healthz/", "/api/v1/inventory/"])
def test_a_path_with_a_trailing_slash_is_a_json_404_not_a_redirect(store, telemetry, path):
    # Starlette redirected it (307, no body) to a URL built from the Host header: behind a proxy
    # with a path prefix, one that does not exist
    response = client(store, telemetry).get(path, headers={"Host": "elsewhere.example"})
    assert response.status_code == 404 and response.json() == {"error": "Not Found", "path": path}
    assert "location" not in response.headers


def test_inventory(store, telemetry):
    snapshot = {"roles": {"emitter": {"implementations": {"a.B": {"calls": 3,
                                                                  "entry_points": {"/ws"}}}}}}
    body = client(store, telemetry, inventory=FakeInventory(snapshot)).get("/api/v1/inventory").json()
    assert body == {"roles": {"emitter": {"implementations": {"a.B": {"calls": 3,
                                                                      "entry_points": ["/ws"]}}}}}


def test_inventory_failure_is_a_json_500(store, telemetry):
    response = client(store, telemetry, inventory=BrokenInventory()).get("/api/v1/inventory")
    assert response.status_code == 500 and "inventory" in response.json()["error"]


@pytest.mark.parametrize("path", ["/api/v1/incidents", "/api/v1/inventory",
                                  f"/api/v1/incidents/{bleed().fingerprint}", "/nowhere"])
def test_token_guards_the_api(store, telemetry, path):
    api = client(store, telemetry, token=TOKEN)
    assert api.get(path).status_code == 401
    assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    unauthorized = api.get(path)
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")
    assert unauthorized.json() == {"error": "missing or invalid bearer token"}
    authorized = api.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorized.status_code != 401


def test_health_readiness_and_metrics_stay_open_with_a_token(store, telemetry):
    api = client(store, telemetry, token=TOKEN)
    assert [api.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]


def test_metrics_can_require_the_token(store, telemetry):
    api = client(store, telemetry, token=TOKEN, metrics_requires_token=True)
    assert api.get("/metrics").status_code == 401
    assert api.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert api.get("/healthz").status_code == 200


def test_a_token_is_required_beyond_loopback():
    require_token_for("127.0.0.1:9464", None)
    require_token_for("localhost:9464", None)
    require_token_for("[::1]:9464", None)
    require_token_for("0.0.0.0:9464", TOKEN)
    require_token_for("", None)  # the API is off
    with pytest.raises(ApiTokenRequired, match=r"0\.0\.0\.0:9464.*MY_TOKEN") as err:
        require_token_for("0.0.0.0:9464", None, token_env="MY_TOKEN")
    assert isinstance(err.value, ConfigError)
    with pytest.raises(ApiTokenRequired):
        require_token_for("10.1.2.3:9464", "")


def test_a_short_token_is_warned_of_without_its_value(caplog):
    with caplog.at_level(logging.WARNING, logger="sidecar.api"):
        require_token_for("0.0.0.0:9464", "guess-me", token_env="MY_TOKEN")
    [record] = [r for r in caplog.records if r.name == "sidecar.api"]
    assert "MY_TOKEN" in record.getMessage() and "8 characters" in record.getMessage()
    assert "guess-me" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidecar.api"):
        require_token_for("0.0.0.0:9464", "0123456789abcdef")
    assert [r for r in caplog.records if r.name == "sidecar.api"] == []
