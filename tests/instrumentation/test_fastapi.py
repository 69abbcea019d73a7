"""The middleware: request spans stamped, ambient user and entry point on every span below them."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, WebSocket
from starlette.middleware import Middleware
from starlette.testclient import TestClient

import instrumentation
from instrumentation.fastapi import PathwatchMiddleware
from tests.instrumentation.helpers import HMAC_KEY, attrs, only_span, pseudonym, spans_named, spans_of_kind
from tests.instrumentation.sample.app import build_app


def test_http_request_span_is_stamped_and_is_the_parent(instrumented, exporter):
    app, _ = build_app()  # built after instrument(): the FastAPI.__init__ hook adds everything
    with TestClient(app) as client:
        assert client.post("/api/runs/r1", headers={"x-user-id": "alice"}).json() == {"result": "done:r1"}
    request = only_span(exporter, "POST /api/runs/{run_id}")
    assert attrs(request)["pathwatch.kind"] == "request"
    assert attrs(request)["http.route"] == attrs(request)["pathwatch.entry_point"] == "/api/runs/{run_id}"
    assert attrs(request)["enduser.pseudo.id"] == pseudonym("alice")
    engine = only_span(exporter, "execution_engine.execute_agent")
    assert engine.parent.span_id == request.context.span_id
    # the key that made the user ids: on the request span, and on the scope of pathwatch's own
    key_id = hmac.new(HMAC_KEY.encode(), b"pathwatch.pseudonym.key_id", hashlib.sha256).hexdigest()[:8]
    assert attrs(request)["pathwatch.pseudonym.key_id"] == key_id
    assert engine.instrumentation_scope.attributes == {"pathwatch.pseudonym.key_id": key_id}
    assert "pathwatch.pseudonym.key_id" not in attrs(engine)  # no bytes per span
    for span in exporter.get_finished_spans():
        if attrs(span)["pathwatch.kind"] == "heartbeat":  # the app's shutdown's: no request's
            continue
        assert attrs(span)["pathwatch.entry_point"] == "/api/runs/{run_id}", span.name
        assert attrs(span)["enduser.pseudo.id"] == pseudonym("alice"), span.name


def test_no_per_message_send_or_receive_spans(instrumented, exporter):
    app, _ = build_app()
    with TestClient(app) as client:
        client.post("/api/runs/r1", headers={"x-user-id": "alice"})
        with client.websocket_connect("/ws?user_id=alice") as ws:
            ws.send_json({"type": "ping"})
            ws.receive_json()
    names = [s.name for s in exporter.get_finished_spans()]
    assert not [n for n in names if n.endswith(" send") or n.endswith(" receive")], names


def test_websocket_request_span_has_user_connection_and_route(instrumented, exporter):
    app, _ = build_app()
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=bob") as ws:
            ws.send_json({"type": "run", "run_id": "r2"})
            for _ in range(3):
                ws.receive_json()
    request = only_span(exporter, "HTTP /ws")
    assert attrs(request)["pathwatch.kind"] == "request"
    assert attrs(request)["http.route"] == "/ws" == attrs(request)["pathwatch.entry_point"]
    assert attrs(request)["enduser.pseudo.id"] == pseudonym("bob")
    connection = attrs(request)["pathwatch.connection.id"]
    delivered = spans_of_kind(exporter, "deliver")
    assert len(delivered) >= 3  # one per message the client received
    for span in delivered:
        assert attrs(span)["pathwatch.connection.id"] == connection
        assert attrs(span)["pathwatch.connection.user"] == pseudonym("bob")
    engine = only_span(exporter, "execution_engine.execute_agent")
    assert engine.context.trace_id == request.context.trace_id
    assert attrs(engine)["enduser.pseudo.id"] == pseudonym("bob")


def test_each_socket_gets_its_own_connection_id(instrumented, exporter):
    app, _ = build_app()
    with TestClient(app) as client:
        for user in ("alice", "bob"):
            with client.websocket_connect(f"/ws?user_id={user}") as ws:
                ws.send_json({"type": "ping"})
                ws.receive_json()
    requests = spans_named(exporter, "HTTP /ws")
    assert len({attrs(s)["pathwatch.connection.id"] for s in requests}) == 2


def test_middleware_runs_after_user_middlewares_that_set_scope_user(instrument, exporter, tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  http: [{scope: user.id}]\n")
    instrument(pathmap)

    class FakeAuth:  # an authentication middleware sets scope["user"] before the app runs
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            scope["user"] = {"id": "heidi"}
            await self.app(scope, receive, send)

    app = FastAPI(middleware=[Middleware(FakeAuth)])

    @app.get("/me")
    async def me() -> dict:
        return {}

    with TestClient(app) as client:
        client.get("/me")
    assert attrs(only_span(exporter, "GET /me"))["enduser.pseudo.id"] == pseudonym("heidi")


def test_explicit_instrument_app_for_an_app_built_before_instrument(provider, hmac_key, exporter):
    app, _ = build_app()  # pathwatch is not active yet: no hook saw this app
    assert not any(m.cls is PathwatchMiddleware for m in app.user_middleware)
    try:
        from tests.instrumentation.helpers import SAMPLE_PATHMAP
        instrumentation.instrument_app(app, SAMPLE_PATHMAP, tracer_provider=provider)
        with TestClient(app) as client:
            client.post("/api/runs/r1", headers={"x-user-id": "ivan"})
        request = only_span(exporter, "POST /api/runs/{run_id}")
        assert attrs(request)["enduser.pseudo.id"] == pseudonym("ivan")
        assert attrs(only_span(exporter, "execution_engine.execute_agent"))["pathwatch.entry_point"] == \
            "/api/runs/{run_id}"
    finally:
        instrumentation.uninstrument()
    assert sum(m.cls is PathwatchMiddleware for m in app.user_middleware) == 1  # passing through


def test_uninstrument_leaves_the_middleware_passing_through_and_removes_the_hook(instrument,
                                                                                 exporter):
    instrument()
    app, _ = build_app()
    assert any(m.cls is PathwatchMiddleware for m in app.user_middleware)
    instrumentation.uninstrument()
    exporter.clear()  # the final heartbeat
    assert sum(m.cls is PathwatchMiddleware for m in app.user_middleware) == 1
    with TestClient(app) as client:
        assert client.post("/api/runs/r1", headers={"x-user-id": "alice"}).json() == \
            {"result": "done:r1"}
    assert not [s for s in exporter.get_finished_spans() if "pathwatch.kind" in attrs(s)]
    later = FastAPI()
    assert not any(m.cls is PathwatchMiddleware for m in later.user_middleware)

@contextmanager
def served(app) -> Iterator[str]:
    """``app`` served by a real uvicorn on a loopback port it was handed bound, in a thread; its
    base URL."""
    import socket
    import threading

    import uvicorn

    from tests.support import wait_until

    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, message="uvicorn started")
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()



def test_a_key_rotation_keeps_the_apps_middlewares_and_their_state(instrument, exporter, caplog):
    """uninstrument() took pathwatch's middleware out and the next instrument() put it back, each
    setting app.middleware_stack = None: Starlette built every middleware of the app anew, so a rate
    limiter answering 429 after 3 requests let a 4th through, and its __init__ ran again (review,
    /tmp/s22/review_instr/probe3_middleware_rebuild.py). Real uvicorn and HTTP."""
    import logging

    import httpx
    from starlette.responses import PlainTextResponse

    from instrumentation.identity import Pseudonymizer
    from tests.support import wait_until

    built: list = []

    class RateLimit:  # state in the instance: a rate limiter, an in-process cache
        def __init__(self, app):
            self.app, self.seen = app, 0
            built.append(self)

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                self.seen += 1
                if self.seen > 3:
                    return await PlainTextResponse("slow down", status_code=429)(scope, receive, send)
            await self.app(scope, receive, send)

    instrument(pseudonymizer=Pseudonymizer(b"first-key-0123456789"))
    app, _ = build_app()
    app.add_middleware(RateLimit)
    with served(app) as base:
        url = f"{base}/api/runs/r1"
        alice = {"x-user-id": "alice"}
        assert httpx.post(url, headers=alice).status_code == 200
        wait_until(lambda: spans_named(exporter, "POST /api/runs/{run_id}"), message="the server span")
        assert attrs(only_span(exporter, "POST /api/runs/{run_id}"))["pathwatch.kind"] == "request"

        instrumentation.uninstrument()
        exporter.clear()
        assert httpx.post(url, headers=alice).status_code == 200  # uninstrumented: passed through
        wait_until(lambda: spans_named(exporter, "POST /api/runs/{run_id}"), message="the server span")
        assert not [s for s in exporter.get_finished_spans() if "pathwatch.kind" in attrs(s)]

        with caplog.at_level(logging.WARNING, logger="instrumentation"):
            instrument(pseudonymizer=Pseudonymizer(b"rotated-key-0123456789"))
        assert "served requests already" not in caplog.text  # its stack was not built again
        exporter.clear()
        assert httpx.post(url, headers=alice).status_code == 200
        wait_until(lambda: spans_named(exporter, "POST /api/runs/{run_id}"), message="the server span")
        request = attrs(only_span(exporter, "POST /api/runs/{run_id}"))
        assert request["pathwatch.kind"] == "request"
        assert request["enduser.pseudo.id"] == pseudonym("alice", "rotated-key-0123456789")
        assert httpx.post(url, headers=alice).status_code == 429  # the 4th: the limiter kept count
        assert len(built) == 1 and built[0].seen == 4
        assert sum(m.cls is PathwatchMiddleware for m in app.user_middleware) == 1


def test_instrument_app_on_an_app_that_served_already_rebuilds_its_stack_and_says_so(
        provider, hmac_key, exporter, caplog):
    import logging

    from tests.instrumentation.helpers import SAMPLE_PATHMAP

    app, _ = build_app()  # pathwatch is not active: no hook saw this app
    with TestClient(app) as client:
        client.post("/api/runs/r1", headers={"x-user-id": "ivan"})  # its stack is built
        try:
            with caplog.at_level(logging.WARNING, logger="instrumentation"):
                instrumentation.instrument_app(app, SAMPLE_PATHMAP, tracer_provider=provider)
            assert "has served requests already" in caplog.text
            client.post("/api/runs/r1", headers={"x-user-id": "ivan"})
        finally:
            instrumentation.uninstrument()
    request = only_span(exporter, "POST /api/runs/{run_id}")
    assert attrs(request)["enduser.pseudo.id"] == pseudonym("ivan")


def test_an_app_keeps_the_middleware_across_a_key_rotation(instrument, exporter):
    """uninstrument() took the middleware out of the apps pathwatch gave it; instrument() again
    (a key rotation) gave it only to apps built afterwards: every request the running app served
    after the rotation had no ambient user, no entry point and no request stamp (bleed of the
    ambient user unseen). Real uvicorn and HTTP: the app is built once and serves across both (the
    middleware now stays through uninstrument(), passing requests through)."""
    import httpx

    from instrumentation.identity import Pseudonymizer
    from tests.support import wait_until

    instrument(pseudonymizer=Pseudonymizer(b"first-key-0123456789"))
    app, _ = build_app()
    with served(app) as base:
        url = f"{base}/api/runs/r1"
        for key in ("first-key-0123456789", "rotated-key-0123456789"):
            if key != "first-key-0123456789":
                instrumentation.uninstrument()
                instrument(pseudonymizer=Pseudonymizer(key.encode()))
            exporter.clear()
            assert httpx.post(url, headers={"x-user-id": "alice"}).json() == {"result": "done:r1"}
            wait_until(lambda: spans_named(exporter, "POST /api/runs/{run_id}"), message="the server span")
            request = attrs(only_span(exporter, "POST /api/runs/{run_id}"))
            assert request.get("pathwatch.kind") == "request", key
            assert request["enduser.pseudo.id"] == pseudonym("alice", key)
            engine = attrs(only_span(exporter, "execution_engine.execute_agent"))
            assert engine["enduser.pseudo.id"] == pseudonym("alice", key)
            assert engine["pathwatch.entry_point"] == "/api/runs/{run_id}"
        assert sum(m.cls is PathwatchMiddleware for m in app.user_middleware) == 1


def test_non_http_scopes_pass_through(instrumented, exporter):
    app = FastAPI()
    with TestClient(app):  # lifespan scope goes through the middleware untouched
        pass
    assert spans_of_kind(exporter, "request") == []


def test_websocket_without_identity_has_no_user_but_a_connection(instrumented, exporter):
    app = FastAPI()

    @app.websocket("/anon")
    async def anon(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"type": "hello"})
        await websocket.close()

    with TestClient(app) as client:
        with client.websocket_connect("/anon") as ws:
            assert ws.receive_json() == {"type": "hello"}
    deliver = attrs(spans_of_kind(exporter, "deliver")[0])
    assert "pathwatch.connection.user" not in deliver and deliver["pathwatch.connection.id"]
    assert "enduser.pseudo.id" not in attrs(only_span(exporter, "HTTP /anon"))
    assert "pathwatch.pseudonym.key_id" not in attrs(only_span(exporter, "HTTP /anon"))  # no user


def test_a_module_of_the_path_map_the_started_app_never_imported_is_named(instrument, exporter, caplog,
                                                                          tmp_path):
    """A misspelled module (``engine.`` for ``engines.``) is never imported, so the hook that checks
    an entry never ran: the role made no spans and nothing said why (only PATHWATCH_CHECK_IMPORTS=1
    did). Its line is named once the app has started; the imported modules are not."""
    import logging

    sample = "tests.instrumentation.sample"
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(f"""version: 1
roles:
  execution_engine:
    kind: execute
    implementations:
      - {sample}.engines.UserExecutionEngine
      - {sample}.engine.IsolatedExecutionEngine
    methods: [execute_agent]
""")
    instrument(pathmap)
    app, _ = build_app()
    with caplog.at_level(logging.WARNING, logger="instrumentation"):
        with TestClient(app):
            assert "module(s) of the path map" in caplog.text  # at startup, not at shutdown
    assert (f"the app started without importing 1 module(s) of the path map: {pathmap}:7 "
            f"roles.execution_engine.implementations[1]: {sample}.engine.IsolatedExecutionEngine: "
            f"module {sample}.engine not imported") in caplog.text
    assert f"module {sample}.engines " not in caplog.text


def test_a_started_app_that_imported_every_module_of_the_path_map_is_not_warned(instrumented, caplog):
    import logging

    app, _ = build_app()
    with caplog.at_level(logging.WARNING, logger="instrumentation"):
        with TestClient(app):
            pass
    assert "path map" not in caplog.text


def test_an_arg_path_no_wrapped_method_takes_is_named_once_the_app_started(instrument, caplog, tmp_path):
    """``arg.contxt``: resolved on no call, the run id never read, and only PATHWATCH_CHECK_IMPORTS=1
    said so; no import hook checks it (a role's methods may come from several modules)."""
    import logging

    sample = "tests.instrumentation.sample"
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(f"""version: 1
roles:
  execution_engine:
    kind: execute
    implementations: [{sample}.engines.UserExecutionEngine]
    methods: [execute_agent]
    run_id: [arg.contxt.run_id, arg.context.run_id]
""")
    instrument(pathmap)
    app, _ = build_app()
    with caplog.at_level(logging.WARNING, logger="instrumentation"):
        with TestClient(app):
            pass
    assert (f"{pathmap}:7 roles.execution_engine.run_id[0]: 'arg.contxt.run_id': no method the role "
            "wraps has a parameter 'contxt'") in caplog.text
    assert "run_id[1]" not in caplog.text and "module(s) of the path map" not in caplog.text
