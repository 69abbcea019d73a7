"""Bleed's event join on writes the instrumentation links to their emit by message key, on the spans
it really makes: two users whose clients number their runs alike, each socket fed by a writer task
of its own (outside any emit: no context to link by), the later user's write going out first."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from instrumentation.attributes import SpanKinds
from sidecar.detectors.bleed import BleedDetector
from tests.sidecar.detectors.factory import NOW, S, rules, state
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend

PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  event_emitter:
    kind: emit
    implementations: [{module}.Bridge]
    methods: ["notify_*"]
    event_type: [method.strip_prefix(notify_)]
    target: [arg.user_id]
    run_id: [arg.run_id]
"""
BACKEND = """\
class Bridge:
    def __init__(self):
        self.queues = {}

    async def notify_agent_started(self, run_id, user_id):
        await self.queues[user_id].put({"type": "agent_started", "run_id": run_id})
"""

_modules = itertools.count()


@pytest.fixture
def backend(tmp_path, monkeypatch):
    module = f"pw_bleed_runs_{next(_modules)}"
    with instrumented_backend(tmp_path, monkeypatch, module, BACKEND, PATHMAP) as backend:
        yield backend


def queued_app(backend_module) -> FastAPI:
    """Each socket's messages are written by a task of its own; alice's waits until bob's wrote."""
    bridge = backend_module.Bridge()
    bob_written: dict[str, asyncio.Event] = {}

    async def writer(user: str, websocket: WebSocket, queue: asyncio.Queue) -> None:
        while True:
            message = await queue.get()
            if user == "alice":
                await bob_written.setdefault("event", asyncio.Event()).wait()
            await websocket.send_json(message)
            if user == "bob":
                bob_written.setdefault("event", asyncio.Event()).set()

    async def handler(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        await websocket.accept()
        queue = bridge.queues[user] = asyncio.Queue()
        task = asyncio.create_task(writer(user, websocket, queue))
        try:
            while True:
                message = await websocket.receive_json()
                await bridge.notify_agent_started(message["run_id"], user)
                await websocket.send_json({"type": "accepted"})  # no run: linked to nothing
        except WebSocketDisconnect:
            task.cancel()

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    return app


def test_queued_writes_of_two_users_runs_sharing_a_run_id_are_no_bleed(backend):
    """alice's run "1" is emitted first, bob's run "1" next; bob's writer writes first. Each write
    was linked to alice's emit (the oldest nothing had found, then a copy of it): a false
    bleed.target_vs_socket_owner (reproducer /tmp/s27_bleed/test_repro_shared_runid_queue.py)."""
    module, exporter = backend
    with TestClient(queued_app(module)) as client:
        with client.websocket_connect("/ws?user_id=alice") as alice, \
                client.websocket_connect("/ws?user_id=bob") as bob:
            alice.send_json({"run_id": "1"})
            assert alice.receive_json() == {"type": "accepted"}  # alice's emit made
            bob.send_json({"run_id": "1"})
            assert sorted(bob.receive_json()["type"] for _ in range(2)) == [
                "accepted", "agent_started"]
            assert alice.receive_json() == {"type": "agent_started", "run_id": "1"}
    spans = decoded(exporter)
    emits = {span.target: span.event_id for span in spans if span.kind == SpanKinds.EMIT}
    writes = [span for span in spans
              if span.kind == SpanKinds.DELIVER and span.event_type == "agent_started"]
    assert len(emits) == len(writes) == 2
    assert {write.event_id: write.connection_user for write in writes} == {
        event_id: target for target, event_id in emits.items()}
    bleed = BleedDetector(rules(), state())
    assert bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S) == []
