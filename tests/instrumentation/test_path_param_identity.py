"""A user id in a path parameter of the route (``/users/{user_id}/ws``): the identity source
``path_param`` reads it, so the socket has its user and the server span's URL carries its pseudonym.

Before, no identity source could name a path parameter: the raw id of a socket opened on
``/users/alice/ws`` was exported in clear in ``http.url``, ``http.target`` and ``url.path``, and the
socket had no ambient user (reproduced on the real stack: /tmp/s27_priv/edge/audit_edge.py, LIMITS=1).
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from fastapi import FastAPI, Header, WebSocket
from starlette.testclient import TestClient

from instrumentation import PathMapError
from tests.instrumentation.helpers import attrs, only_span, pseudonym, spans_of_kind

RAW = "zoë RAWID/ünï"  # a space, a slash and non-ASCII: percent-encoded in the path

_URL_KEYS = ("http.url", "url.full", "http.target", "url.path", "url.query")


def _pathmap(tmp_path, identity: str):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(f"version: 1\nidentity:\n{identity}")
    return pathmap


def _socket_app() -> FastAPI:
    app = FastAPI()

    @app.websocket("/users/{user_id:path}/ws")
    async def socket(websocket: WebSocket, user_id: str) -> None:
        await websocket.accept()
        await websocket.send_json({"type": "hello", "user": user_id})
        await websocket.close()

    return app


def _urls(span) -> dict:
    return {key: value for key, value in attrs(span).items() if key in _URL_KEYS}


def test_a_socket_identified_by_its_path_parameter(instrument, exporter, tmp_path):
    instrument(_pathmap(tmp_path, "  websocket: [{query_param: user_id}, {path_param: user_id}]\n"))
    with TestClient(_socket_app()) as client:
        with client.websocket_connect(f"/users/{quote(RAW, safe='')}/ws") as ws:
            assert ws.receive_json() == {"type": "hello", "user": RAW}  # the app reads it as ever
    request = only_span(exporter, "HTTP /users/{user_id:path}/ws")
    assert attrs(request)["enduser.pseudo.id"] == pseudonym(RAW)
    urls = _urls(request)
    assert urls["http.target"] == f"/users/{pseudonym(RAW)}/ws"
    assert all("RAWID" not in value for value in urls.values()), urls
    [write] = spans_of_kind(exporter, "deliver")
    assert attrs(write)["pathwatch.connection.user"] == pseudonym(RAW)


def test_another_users_id_in_the_path_is_scrubbed_too(instrument, exporter, tmp_path):
    """The header names the user (the first source); the path names another: both ids are the
    request's, so neither leaves in clear."""
    instrument(_pathmap(tmp_path, "  http: [{header: x-user-id}, {path_param: user_id}]\n"))
    app = FastAPI()

    @app.get("/users/{user_id}/items")
    async def items(user_id: str, x_user_id: str = Header()) -> dict:
        return {}

    with TestClient(app) as client:
        assert client.get("/users/bob-RAWID/items", params={"page": "2"},
                          headers={"x-user-id": "alice-RAWID"}).status_code == 200
    request = only_span(exporter, "GET /users/{user_id}/items")
    assert attrs(request)["enduser.pseudo.id"] == pseudonym("alice-RAWID")
    urls = _urls(request)
    assert urls["http.target"] == f"/users/{pseudonym('bob-RAWID')}/items"
    assert all("RAWID" not in value for value in urls.values()), urls


def test_a_path_parameter_through_a_mount(instrument, exporter, tmp_path):
    instrument(_pathmap(tmp_path, "  websocket: [{path_param: user_id}]\n"))
    outer = FastAPI()
    outer.mount("/v1", _socket_app())
    with TestClient(outer) as client:
        with client.websocket_connect("/v1/users/carol-RAWID/ws") as ws:
            ws.receive_json()
    request = [span for span in exporter.get_finished_spans()
               if attrs(span).get("pathwatch.kind") == "request"]
    assert [attrs(span)["enduser.pseudo.id"] for span in request] == [pseudonym("carol-RAWID")]
    assert _urls(request[0])["http.target"] == f"/v1/users/{pseudonym('carol-RAWID')}/ws"
    for span in exporter.get_finished_spans():
        assert all("RAWID" not in value for value in _urls(span).values()), (span.name, _urls(span))


def test_no_route_no_path_parameter(instrument, exporter, tmp_path):
    instrument(_pathmap(tmp_path, "  http: [{path_param: user_id}]\n"))
    app = FastAPI()

    @app.get("/users/{user_id}/items")
    async def items(user_id: str) -> dict:
        return {}

    with TestClient(app) as client:
        assert client.get("/other/dave-RAWID").status_code == 404
    request = only_span(exporter, "GET")
    assert "enduser.pseudo.id" not in attrs(request)
    assert attrs(request)["pathwatch.entry_point"] == "<unmatched>"


def _items_app(redirect_slashes: bool = True) -> FastAPI:
    app = FastAPI(redirect_slashes=redirect_slashes)

    @app.get("/users/{user_id}/items")
    async def items(user_id: str) -> dict:
        return {}

    return app


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/users/erin-RAWID/items", 405),  # a method the route does not take
    ("GET", "/users/erin-RAWID/items/", 307),  # the router's redirect to the route
])
def test_a_request_the_router_answers_from_a_route(instrument, exporter, tmp_path, monkeypatch,
                                                    method, path, status):
    """Answered by the router, not by an endpoint: no route matched in full, so the path parameter
    was not read, and the raw id was exported in http.url and http.target (and the redirect's
    Location) -- review s30, /tmp/s30_priv/probe_path_param_nomatch.py."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "location")
    instrument(_pathmap(tmp_path, "  http: [{path_param: user_id}]\n"))
    with TestClient(_items_app()) as client:
        response = client.request(method, path, follow_redirects=False)
    assert response.status_code == status
    [request] = spans_of_kind(exporter, "request")
    assert attrs(request)["enduser.pseudo.id"] == pseudonym("erin-RAWID")
    assert attrs(request)["http.target"] == path.replace("erin-RAWID", pseudonym("erin-RAWID"))
    leaks = [(span.name, key, value) for span in exporter.get_finished_spans()
             for key, value in attrs(span).items() if "RAWID" in str(value)]
    assert leaks == []


def test_no_redirect_no_path_parameter(instrument, exporter, tmp_path):
    """A router that does not redirect slashes answers 404: no route, no user."""
    instrument(_pathmap(tmp_path, "  http: [{path_param: user_id}]\n"))
    with TestClient(_items_app(redirect_slashes=False)) as client:
        assert client.get("/users/erin-RAWID/items/").status_code == 404
    assert "enduser.pseudo.id" not in attrs(only_span(exporter, "GET"))


def test_a_source_names_exactly_one_place(tmp_path, instrument):
    with pytest.raises(PathMapError, match="path_param"):
        instrument(_pathmap(tmp_path, "  http: [{path_param: user_id, header: x-user-id}]\n"))
