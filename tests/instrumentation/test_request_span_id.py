"""``pathwatch.request.span_id``: every span under a request names its request span
(docs/conventions.md), which a socket's sidecar sees only when the socket closes."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from starlette.testclient import TestClient

import instrumentation.fastapi as fastapi_module
from instrumentation import attributes as A
from instrumentation.errors import errors
from tests.instrumentation.helpers import attrs, only_span, pseudonym, spans_named
from tests.instrumentation.sample.app import build_app
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine


def span_hex(span) -> str:
    return format(span.context.span_id, "016x")


def under(exporter, request) -> list:
    """Every pathwatch span of the request's trace but the request span itself."""
    return [span for span in exporter.get_finished_spans()
            if span.context.trace_id == request.context.trace_id and span is not request
            and attrs(span).get(A.SPAN_KIND) not in (None, "request")]


def test_every_span_under_an_http_request_names_it(instrumented, exporter):
    app, _ = build_app()
    with TestClient(app) as client:
        client.post("/api/runs/r1", headers={"x-user-id": "alice"})
    request = only_span(exporter, "POST /api/runs/{run_id}")
    spans = under(exporter, request)
    assert {attrs(span)[A.SPAN_KIND] for span in spans} == {"execute", "emit", "dispatch"}
    assert all(attrs(span)[A.REQUEST_SPAN_ID] == span_hex(request) for span in spans)
    # its children and deeper spans alike: the dispatch runs inside the emit
    assert any(span.parent.span_id != request.context.span_id for span in spans)
    assert A.REQUEST_SPAN_ID not in attrs(request)


def test_every_span_and_write_of_a_socket_names_its_own_request(instrumented, exporter):
    app, _ = build_app()
    with TestClient(app) as client:
        for user in ("alice", "bob"):  # two sockets, one after the other
            with client.websocket_connect(f"/ws?user_id={user}") as ws:
                ws.send_json({"type": "run", "run_id": f"r-{user}"})
                for _ in range(3):
                    ws.receive_json()
    sockets = spans_named(exporter, "HTTP /ws")
    assert len(sockets) == 2
    for socket in sockets:
        spans = under(exporter, socket)
        assert {attrs(span)[A.SPAN_KIND] for span in spans} >= {"execute", "emit", "deliver"}
        assert all(attrs(span)[A.REQUEST_SPAN_ID] == span_hex(socket) for span in spans)
        nested = [span for span in spans if span.parent.span_id != socket.context.span_id]
        assert nested  # writes under the emit's dispatch: not children of the request span


def test_a_task_a_request_started_names_that_request_after_it_ended(instrumented, exporter):
    """A task started in a request copies its context: it names the request it was started in for
    its whole life, after the request ended too, whatever request is running then (the sidecar
    finds it leaked from that request)."""
    app = FastAPI()
    release = tasks = None

    @app.post("/start")
    async def start() -> dict:
        nonlocal release, tasks
        release = asyncio.Event()

        async def later() -> None:
            await release.wait()
            context = UserContext("alice", run_id="r-late")
            UserExecutionEngine(context).execute_agent(context, user_context=context)
        tasks = asyncio.get_running_loop().create_task(later())
        return {}

    @app.post("/release")
    async def release_it() -> dict:
        release.set()
        await tasks
        return {}

    with TestClient(app) as client:
        client.post("/start", headers={"x-user-id": "alice"})
        client.post("/release", headers={"x-user-id": "alice"})
    first, second = only_span(exporter, "POST /start"), only_span(exporter, "POST /release")
    engine = only_span(exporter, "execution_engine.execute_agent")
    assert engine.start_time > first.end_time  # it ran after its request had ended
    assert second.start_time < engine.start_time < second.end_time  # while another one ran
    assert attrs(engine)[A.REQUEST_SPAN_ID] == span_hex(first)
    assert attrs(engine)[A.ENDUSER_PSEUDO_ID] == pseudonym("alice")


def test_work_outside_any_request_names_none(instrumented, exporter):
    context = UserContext("bob")
    UserExecutionEngine(context).execute_agent(context, user_context=context)
    engine = only_span(exporter, "execution_engine.execute_agent")
    assert A.REQUEST_SPAN_ID not in attrs(engine)


def test_a_request_span_id_that_cannot_be_read_leaves_the_request_served_and_counted(
        instrumented, exporter, monkeypatch):
    def broken(*_args):
        raise ValueError("no span id")

    monkeypatch.setattr(fastapi_module, "format", broken, raising=False)  # the module's format()
    errors.reset_for_tests()
    app, _ = build_app()
    with TestClient(app) as client:
        assert client.post("/api/runs/r1", headers={"x-user-id": "alice"}).json() == {"result": "done:r1"}
    engine = only_span(exporter, "execution_engine.execute_agent")
    assert A.REQUEST_SPAN_ID not in attrs(engine)
    assert attrs(engine)[A.ENDUSER_PSEUDO_ID] == pseudonym("alice")  # described all the same
    assert errors.count == 1
