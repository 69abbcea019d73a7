"""Apps and routers mounted in an app: one request, one description (connection id, user, entry
point) on its request span, the calls it makes and every write on its socket."""

from __future__ import annotations

from fastapi import FastAPI, Request, WebSocket
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Host, Mount, Route, Router, WebSocketRoute
from starlette.testclient import TestClient

from tests.instrumentation.helpers import attrs, only_span, pseudonym, spans_of_kind
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine


async def _socket(websocket: WebSocket) -> None:
    await websocket.accept()
    context = UserContext("alice", run_id="r1")
    UserExecutionEngine(context).execute_agent(context)
    await websocket.send_json({"type": "first"})
    await websocket.send_json({"type": "second"})
    await websocket.close()


async def _item(request: Request) -> JSONResponse:
    context = UserContext("bob", run_id="r2")
    UserExecutionEngine(context).execute_agent(context)
    return JSONResponse({})


def _api(middleware: list | None = None) -> FastAPI:
    api = FastAPI(middleware=middleware)  # built after instrument(): it has the middleware too
    api.add_api_websocket_route("/ws", _socket)
    api.add_api_route("/items/{item_id}", _item)
    return api


def _receive_two(client: TestClient, path: str) -> None:
    with client.websocket_connect(path) as socket:
        assert [socket.receive_json()["type"] for _ in range(2)] == ["first", "second"]


def _one_description(exporter, request_name: str, entry_point: str, user: str,
                     socket: bool) -> None:
    """The request span, the engine's span and every write carry one entry point, one user and
    (a socket) one connection id."""
    request = attrs(only_span(exporter, request_name))
    assert request["pathwatch.kind"] == "request"
    assert request["pathwatch.entry_point"] == entry_point
    assert request["enduser.pseudo.id"] == pseudonym(user)
    engine = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert (engine["pathwatch.entry_point"], engine["enduser.pseudo.id"]) == (entry_point, pseudonym(user))
    writes = [attrs(span) for span in spans_of_kind(exporter, "deliver")]
    assert len(writes) == (2 if socket else 0)
    for write in writes:
        assert write["pathwatch.connection.id"] == request["pathwatch.connection.id"]
        assert write["pathwatch.connection.user"] == write["enduser.pseudo.id"] == pseudonym(user)
        assert write["pathwatch.entry_point"] == entry_point


def test_a_socket_of_a_mounted_app_has_one_connection_id(instrumented, exporter):
    """The mounted app's middleware described the socket again in the same scope: the request span
    carried c-...-1 and the writes c-...-2, so no delivery was linked to its socket (review,
    /tmp/s26_mount/check_mounted_ws.py). Its entry point was /v1 on the request span (the mount, as
    http.route says) and /ws on the calls and writes."""
    outer = FastAPI()
    outer.mount("/v1", _api())
    with TestClient(outer) as client:
        _receive_two(client, "/v1/ws?user_id=alice")
    _one_description(exporter, "HTTP /v1", "/v1/ws", "alice", socket=True)
    assert "pathwatch.kind" not in attrs(only_span(exporter, "HTTP /ws"))  # the mounted app's span


def test_an_http_request_to_a_mounted_app_has_one_entry_point(instrumented, exporter):
    outer = FastAPI()
    outer.mount("/v1", _api())
    with TestClient(outer) as client:
        assert client.get("/v1/items/7", headers={"x-user-id": "bob"}).status_code == 200
        _one_description(exporter, "GET /v1", "/v1/items/{item_id}", "bob", socket=False)
        exporter.clear()
        assert client.get("/v1/nothing", headers={"x-user-id": "bob"}).status_code == 404
    # nothing in the mount matched: the mount, as http.route says
    assert attrs(only_span(exporter, "GET /v1"))["pathwatch.entry_point"] == "/v1"


def test_routes_mounted_without_a_middleware_of_their_own(instrumented, exporter):
    """A Starlette Mount of routes (no app, no middleware of its own), in a mount with a path
    parameter: the entry point was the outer mount's path for every route under it."""
    outer = FastAPI()
    outer.router.routes.append(Mount("/tenants/{tenant}", routes=[
        Mount("/v1", routes=[WebSocketRoute("/ws", _socket), Route("/items/{item_id}", _item)])]))
    with TestClient(outer) as client:
        _receive_two(client, "/tenants/acme/v1/ws?user_id=alice")
    _one_description(exporter, "HTTP /tenants/{tenant}", "/tenants/{tenant}/v1/ws", "alice",
                     socket=True)
    exporter.clear()
    with TestClient(outer) as client:
        assert client.get("/tenants/acme/v1/items/7", headers={"x-user-id": "bob"}).status_code == 200
    _one_description(exporter, "GET /tenants/{tenant}", "/tenants/{tenant}/v1/items/{item_id}",
                     "bob", socket=False)


def test_routes_of_a_host(instrumented, exporter):
    """Routes reached through a host (``Host("api.example", ...)``): the FastAPI instrumentation
    gives them no http.route, and the entry point was <unmatched> for every request."""
    outer = FastAPI()
    outer.router.routes.append(Host("api.example", app=Router(routes=[
        Mount("/v1", routes=[Route("/items/{item_id}", _item)])])))
    with TestClient(outer, base_url="http://api.example") as client:
        assert client.get("/v1/items/7", headers={"x-user-id": "bob"}).status_code == 200
    _one_description(exporter, "GET", "/v1/items/{item_id}", "bob", socket=False)
    exporter.clear()
    with TestClient(outer, base_url="http://other.example") as client:
        assert client.get("/v1/items/7", headers={"x-user-id": "bob"}).status_code == 404
    assert attrs(only_span(exporter, "GET"))["pathwatch.entry_point"] == "<unmatched>"


def test_a_mounted_app_that_identifies_the_socket_itself(instrument, exporter, tmp_path):
    """The user is found only by the mounted app's own authentication middleware: the writes
    carried it, the request span (stamped by the outer app's middleware, which found none) not."""
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  websocket: [{query_param: user_id}, {scope: user.id}]\n"
                       "roles:\n  execution_engine:\n    kind: execute\n    implementations:"
                       " [tests.instrumentation.sample.engines.UserExecutionEngine]\n"
                       "    methods: [execute_agent]\n")
    instrument(pathmap)

    class Auth:  # the mounted app authenticates the socket
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            scope["user"] = {"id": "carol"}
            await self.app(scope, receive, send)

    outer = FastAPI()
    outer.mount("/v1", _api([Middleware(Auth)]))
    with TestClient(outer) as client:
        _receive_two(client, "/v1/ws")
    _one_description(exporter, "HTTP /v1", "/v1/ws", "carol", socket=True)
