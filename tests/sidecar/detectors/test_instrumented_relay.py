"""Events relayed between backend processes (a pub/sub bus: the run in one process, the user's
sockets in another), on the spans the instrumentation really makes: each message carries its own
event id (the path map's ``messages.event_id``), and the process holding the sockets dispatches it
from a consumer task, to the user or to a room, each socket written by a writer task of its own.
The other process is played by forgetting the emits this one made (``pending_emits.clear()``): the
socket process never had them. The spans are encoded as an OTLP request and decoded by the
sidecar's ``SpanDecoder``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from instrumentation.attributes import SpanKinds
from instrumentation.linking import pending_emits
from sidecar.detectors.bleed import BleedDetector
from sidecar.detectors.delivery import DeliveryDetector
from sidecar.rules import BLEED_TARGET_VS_SOCKET_OWNER, DELIVERY_NO_CONNECTION
from tests.sidecar.detectors.factory import NOW, S, rules, state, tick_through
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
    event_id: [arg.event_id]
    target: [arg.user_id]
    run_id: [arg.run_id]
  socket_manager:
    kind: dispatch
    implementations: [{module}.Manager]
    methods: [send_to_user, send_to_room]
    fan_out: [send_to_room]
    connections: [self.queues]
    target: [arg.user_id]
    event_type: [arg.message.type]
    run_id: [arg.message.run_id]
messages:
  event_type: type
  run_id: run_id
  event_id: event_id
"""
BACKEND = """\
class Bridge:
    # the run's process: each event published on the bus, with an id of its own
    def __init__(self, bus):
        self.bus = bus

    async def notify_agent_thinking(self, run_id, user_id, event_id, room=None):
        self.bus.append((user_id, room, {"type": "agent_thinking", "run_id": run_id,
                                         "event_id": event_id}))


class Manager:
    # the sockets' process: a queue per socket, which its writer task drains
    def __init__(self):
        self.queues = {}
        self.rooms = {}
        self.misrouted = {}

    async def send_to_user(self, user_id, message):
        for queue in self.queues.get(self.misrouted.get(user_id, user_id), []):
            await queue.put(message)

    async def send_to_room(self, room, message):
        for user_id in self.rooms.get(room, []):
            await self.send_to_user(user_id, message)
"""
_modules = itertools.count()


@pytest.fixture
def backend(tmp_path, monkeypatch):
    with instrumented_backend(tmp_path, monkeypatch, f"pw_relay_{next(_modules)}", BACKEND,
                              PATHMAP) as backend:
        yield backend


def relay_app(module, misrouted: dict[str, str] | None = None, elsewhere=None) -> FastAPI:
    """``/ws?user_id=U``: U's socket (alice and bob share room-1), written by its own writer task.
    ``POST /emit?user=U[&room=R]`` runs U's emit (its event published on the bus);
    ``POST /relay`` hands what the bus holds to the consumer task, which dispatches each message to
    its user (or room) and answers once the writers have written it; with ``elsewhere`` (the
    other process's manager), that process's consumer dispatches every message too."""
    manager, bus, relayed = module.Manager(), [], asyncio.Queue()
    manager.misrouted.update(misrouted or {})
    events = itertools.count(1)

    async def consume() -> None:  # started with the app: outside any request, as a bus consumer
        while True:
            user, room, message, done = await relayed.get()
            if room is not None:
                await manager.send_to_room(room, message)
            else:
                await manager.send_to_user(user, message)
                if elsewhere is not None:
                    await elsewhere.send_to_user(user, message)
            for queues in manager.queues.values():
                for queue in queues:
                    await queue.join()
            done.set()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        consumer = asyncio.create_task(consume())
        yield
        consumer.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        await websocket.accept()
        queue = asyncio.Queue()
        manager.queues.setdefault(user, []).append(queue)
        manager.rooms.setdefault("room-1", []).append(user)

        async def write() -> None:
            while True:
                message = await queue.get()
                await websocket.send_json(message)
                queue.task_done()
        writer = asyncio.create_task(write())
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            writer.cancel()

    @app.post("/emit")
    async def emit(user: str, room: str | None = None) -> dict:
        await module.Bridge(bus).notify_agent_thinking("run-1", user, f"ev-{next(events)}", room)
        return {"published": len(bus)}

    @app.post("/relay")
    async def relay() -> dict:
        items, bus[:] = list(bus), []
        for user, room, message in items:
            done = asyncio.Event()
            await relayed.put((user, room, message, done))
            await done.wait()
        return {"relayed": len(items)}

    return app


def judged(spans) -> list[str]:
    delivery, bleed = DeliveryDetector(rules(), state()), BleedDetector(rules(), state())
    findings = delivery.consume(spans, NOW) + bleed.consume(spans, NOW)
    findings += tick_through(delivery, NOW, NOW + 60 * S) + bleed.tick(NOW + 60 * S)
    return sorted(f.rule for f in findings)


def relay(client, *emits: str, room: str | None = None) -> None:
    for user in emits:
        client.post("/emit", params={"user": user, **({"room": room} if room else {})})
    pending_emits.clear()  # the sockets' process never had the emits: the run was in another one
    client.post("/relay")


def relayed_to_alice(backend) -> tuple[list, list, list, list]:
    """One event relayed to alice's only socket, held by the process that did not emit it (the other
    process's consumer finds no socket): its spans as (emits, the dispatches that found no socket
    here after the emit started, writes, the rest)."""
    module, exporter = backend
    with TestClient(relay_app(module, elsewhere=module.Manager())) as client:
        with client.websocket_connect("/ws?user_id=alice") as alice:
            relay(client, "alice")
            assert alice.receive_json()["event_id"] == "ev-1"
    spans = decoded(exporter)
    emits = [span for span in spans if span.kind == SpanKinds.EMIT]
    none_here = [span for span in spans if span.kind == SpanKinds.DISPATCH and span.dispatch_writes == 0
                 and not span.connection_id and span.start_ns > emits[0].start_ns]
    writes = [span for span in spans if span.kind == SpanKinds.DELIVER]
    rest = [span for span in spans if span not in emits + none_here + writes]
    return emits, none_here, writes, rest


def test_an_event_relayed_to_the_user_s_queued_socket_is_delivered(backend):
    """Found by the s29 soak: the consumer's dispatch, outside any emit, took no event id (its emit
    is not in this process's table), so one that queued the message for the socket's writer task
    (no write inside it) was a delivery.no_connection at once, though the writer wrote it."""
    module, exporter = backend
    with TestClient(relay_app(module)) as client:
        with client.websocket_connect("/ws?user_id=alice") as alice:
            relay(client, "alice")
            assert alice.receive_json()["event_id"] == "ev-1"
    spans = decoded(exporter)
    [dispatch] = [span for span in spans if span.kind == SpanKinds.DISPATCH]
    assert dispatch.event_id == "ev-1"  # the message's own id
    assert judged(spans) == []


def test_an_event_relayed_to_a_room_is_no_bleed_on_the_other_members_sockets(backend):
    """Found by the s29 soak: the room's fan-out, outside any emit, knew no emit of its message, so
    the members' writer tasks' writes of alice's event were not the fan-out's: bob's copy was a
    critical bleed.target_vs_socket_owner."""
    module, exporter = backend
    with TestClient(relay_app(module)) as client:
        with client.websocket_connect("/ws?user_id=alice") as alice, \
                client.websocket_connect("/ws?user_id=bob") as bob:
            relay(client, "alice", room="room-1")
            assert alice.receive_json()["event_id"] == bob.receive_json()["event_id"] == "ev-1"
    assert judged(decoded(exporter)) == []


def test_a_relayed_event_with_no_socket_for_its_user_or_on_another_users_socket_is_found(backend):
    """No true positive lost: carol has no socket here (no write comes: delivery.no_connection);
    alice's event put on bob's queue by a stale map is bleed, and never reached alice (her
    dispatch's write is on another user's socket: delivery.no_connection too)."""
    module, exporter = backend
    with TestClient(relay_app(module, misrouted={"alice": "bob"})) as client:
        with client.websocket_connect("/ws?user_id=bob") as bob:
            relay(client, "carol", "alice")
            assert bob.receive_json()["event_id"] == "ev-2"
    assert judged(decoded(exporter)) == [BLEED_TARGET_VS_SOCKET_OWNER, DELIVERY_NO_CONNECTION,
                                         DELIVERY_NO_CONNECTION]


def test_an_event_every_process_dispatches_is_delivered_whichever_span_arrives_first(backend):
    """Found by the s29 soak: a bus consumer in every process dispatching each message to its user,
    each process writing to the user's sockets it holds, and none in the others: the other
    process's dispatch found no socket (delivery.no_connection, held for the user's write), and the
    user's write, made in the process holding the socket, arrived before that dispatch (exported
    by another process): it cancelled nothing, a false delivery.no_connection. In the usual order
    of such a relay the emit came first (its write is made after it, in the other process)."""
    emits, none_here, writes, rest = relayed_to_alice(backend)
    assert len(none_here) == 2 and len(writes) == 1  # the queueing dispatch, and the other process's
    assert judged(emits + writes + none_here + rest) == []


def test_an_event_written_outside_its_emit_before_the_emit_arrived_answers_a_later_dispatch(
        backend):
    """The order the s29 soak left after the fix above: the run's process emitted and dispatched
    (no socket there), the socket's process wrote, and its write arrived first, before the emit:
    the emit took it as written and kept nothing, and the dispatch arriving after it was a false
    delivery.no_connection. So was one after a run on a worker thread whose emit span ended after
    the consumer in its own process had written the event. A write made outside the emit call
    (``pathwatch.delivery.link`` other than ``context``) is now kept with the emit; one made inside
    it (the common case: it ends, and arrives, first) keeps nothing, as before."""
    emits, none_here, writes, rest = relayed_to_alice(backend)
    assert {write.link for write in writes} == {"message_key"}  # the writer task's, by its own id
    assert judged(writes + emits + none_here + rest) == []
    for write in writes:  # as if written inside the emit call: the dispatches after it not answered
        write.link = "context"
    assert judged(writes + emits + none_here + rest) == [DELIVERY_NO_CONNECTION, DELIVERY_NO_CONNECTION]


def test_a_dispatch_arriving_between_the_write_and_its_emit_is_answered(backend):
    """The order the s29 soak left after the fix above, on runs executed on worker threads: the
    emit's span ends when its thread resumes, after the bus consumer of its own process found no
    socket for the user (its dispatch exported first), and the socket process's write came before
    both: the dispatch arrived with the write known and the emit not yet, was held, and no write
    came after it (a false delivery.no_connection)."""
    emits, none_here, writes, rest = relayed_to_alice(backend)
    assert judged(writes + none_here + emits + rest) == []
