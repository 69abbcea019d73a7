"""The bleed detector's dispatch join on the spans the instrumentation really makes: a backend module
under ``instrumentation.instrument`` writing to real Starlette WebSockets, its finished spans encoded
as an OTLP request (the SDK's own encoder) and decoded by the sidecar's ``SpanDecoder``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from instrumentation.attributes import SpanKinds
from sidecar.detectors.bleed import BleedDetector
from sidecar.rules import BLEED_TARGET_VS_SOCKET_OWNER
from tests.sidecar.detectors.factory import NOW, S, rules, state
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend

PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  socket_manager:
    kind: dispatch
    implementations: [{module}.Manager]
    methods: [send_to_user, send_now]
    target: [arg.user_id]
    event_type: [arg.message.type]
messages:
  event_type: type
"""
BACKEND = """\
import asyncio


class Manager:
    def __init__(self):
        self.sockets = {}
        self.queue = None
        self.writer = None

    async def send_to_user(self, user_id, message):
        # one writer task for every user's messages, started by the first call: it copies that
        # call's context, so every later write has the first caller's dispatch span as its parent
        if self.writer is None:
            self.queue = asyncio.Queue()
            self.writer = asyncio.create_task(self._drain())
        await self.queue.put((user_id, message))

    async def _drain(self):
        while True:
            user_id, message = await self.queue.get()
            for websocket in self.sockets.get(user_id, []):
                await websocket.send_json(message)
            self.queue.task_done()

    async def send_now(self, user_id, message):
        # the bleed the rule is for: the socket looked up by another key than the target
        for websocket in self.sockets.get(message["to"], []):
            await websocket.send_json(message)
"""


_modules = itertools.count()


@pytest.fixture
def backend(tmp_path, monkeypatch):
    """(the backend module, the exporter of its spans) under pathwatch, for this test only."""
    module = f"pw_bleed_{next(_modules)}"  # a module is hooked once per name: a new one each test
    with instrumented_backend(tmp_path, monkeypatch, module, BACKEND, PATHMAP) as backend:
        yield backend


def chat_app(backend_module) -> FastAPI:
    """Each user's socket sends messages; each is sent back to its sender through the manager's
    queue, or, when it names another user (``to``), written at once to that user's socket."""
    manager = backend_module.Manager()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if manager.writer is not None:
            manager.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await manager.writer

    async def handler(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        await websocket.accept()
        manager.sockets.setdefault(user, []).append(websocket)
        try:
            while True:
                message = await websocket.receive_json()
                if "to" in message:
                    await manager.send_now(user, {"type": "status", "to": message["to"]})
                else:
                    await manager.send_to_user(user, {"type": "status", "text": message["text"]})
                    await manager.queue.join()  # written: the client reads its answer next
        except WebSocketDisconnect:
            manager.sockets[user].remove(websocket)

    app = FastAPI(lifespan=lifespan)
    app.add_api_websocket_route("/ws", handler)
    return app



def in_order(spans, order: str):
    """The decoded spans with the dispatches last (``writes_first``) or first."""
    dispatches = [span for span in spans if span.kind == SpanKinds.DISPATCH]
    others = [span for span in spans if span.kind != SpanKinds.DISPATCH]
    return others + dispatches if order == "writes_first" else dispatches + others


@pytest.mark.parametrize("order", ["writes_first", "dispatch_first"])
def test_a_lazily_started_writer_writing_each_user_their_own_message_is_no_bleed(backend, order):
    """alice's send_to_user starts the writer; bob's own message, written later by it to bob's own
    socket, has alice's dispatch span as its parent and no event id (found by review: paged as
    bleed.target_vs_socket_owner). The join compares exactly (both spans are stamped by this
    process's clock): here bob's write comes about a millisecond after alice's dispatch ended."""
    module, exporter = backend
    with TestClient(chat_app(module)) as client:
        with client.websocket_connect("/ws?user_id=alice") as alice, \
                client.websocket_connect("/ws?user_id=bob") as bob:
            alice.send_json({"text": "hi from alice"})
            assert alice.receive_json()["text"] == "hi from alice"
            bob.send_json({"text": "hi from bob"})
            assert bob.receive_json()["text"] == "hi from bob"
    spans = decoded(exporter)
    alices_dispatch, bobs_dispatch = [span for span in spans if span.kind == SpanKinds.DISPATCH]
    writes = [span for span in spans if span.kind == SpanKinds.DELIVER]
    # what the join sees: both writes under alice's dispatch, one of them to bob's socket, after it
    assert {write.parent_span_id for write in writes} == {alices_dispatch.span_id}
    assert {write.event_id for write in writes} == {None}
    assert {write.connection_user for write in writes} == {alices_dispatch.target, bobs_dispatch.target}
    assert all(write.start_ns > alices_dispatch.end_ns for write in writes)
    bleed = BleedDetector(rules(), state())  # the default clock tolerance (5 ms) of the other rules
    assert bleed.consume(in_order(spans, order), NOW) == []
    assert bleed.tick(NOW + 60 * S) == []


@pytest.mark.parametrize("order", ["writes_first", "dispatch_first"])
def test_a_dispatch_writing_to_another_users_socket_is_found(backend, order):
    """No true positive lost: alice's dispatch writes to bob's socket while it runs."""
    module, exporter = backend
    with TestClient(chat_app(module)) as client:
        with client.websocket_connect("/ws?user_id=bob") as bob, \
                client.websocket_connect("/ws?user_id=alice") as alice:
            alice.send_json({"to": "bob"})
            assert bob.receive_json()["to"] == "bob"
    spans = decoded(exporter)
    [dispatch] = [span for span in spans if span.kind == SpanKinds.DISPATCH]
    findings = BleedDetector(rules(), state()).consume(in_order(spans, order), NOW)
    assert [(f.rule, f.span_id) for f in findings] == [(BLEED_TARGET_VS_SOCKET_OWNER, dispatch.span_id)]
    assert findings[0].implementation.endswith(".Manager")
