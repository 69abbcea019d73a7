"""Bleed's event join on the spans the instrumentation really makes for an event fanned out to
several users (a room, a shared thread's participants, everyone) through a dispatch method the path
map declares a fan-out (``fan_out``)."""

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
from sidecar.detectors.delivery import DeliveryDetector
from sidecar.detectors.duplicates import DuplicatesDetector
from sidecar.model import Finding, SpanRecord
from sidecar.rules import BLEED_TARGET_VS_SOCKET_OWNER, DELIVERY_UNDELIVERED
from tests.sidecar.detectors.factory import NOW, S, rules, state, tick_through
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend

PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  event_emitter:
    kind: emit
    implementations: [{module}.Bridge, {module}.PubSubBridge]
    methods: ["notify_*"]
    event_type: [method.strip_prefix(notify_)]
    target: [arg.user_id]
    run_id: [arg.run_id]
  socket_manager:
    kind: dispatch
    implementations: [{module}.Manager, {module}.QueuedManager, {module}.MemberQueuedManager]
    methods: [send_to_user, send_to_room, broadcast]
    fan_out: [send_to_room, broadcast]
    target: [arg.user_id, arg.room]
    event_type: [arg.message.type]
    run_id: [arg.message.run_id]
"""
BACKEND = """\
class Manager:
    def __init__(self):
        self.sockets = {}
        self.rooms = {}
        self.misrouted = {}

    async def send_to_user(self, user_id, message):
        for websocket in self.sockets.get(self.misrouted.get(user_id, user_id), []):
            await websocket.send_json(message)

    async def send_to_room(self, room, message):
        for user_id in self.rooms.get(room, []):
            await self.send_to_user(user_id, message)

    async def broadcast(self, message):
        for sockets in self.sockets.values():
            for websocket in sockets:
                await websocket.send_json(message)


class QueuedManager(Manager):
    # each socket has a queue its own writer task drains (started when it connects): the writes
    # are made outside the send, and find their emit by the message's key

    def __init__(self):
        super().__init__()
        self.queues = {}

    async def send_to_user(self, user_id, message):
        for queue in self.queues.get(user_id, []):
            await queue.put(message)

    async def send_to_room(self, room, message):
        for user_id in self.rooms.get(room, []):
            for queue in self.queues.get(user_id, []):
                await queue.put(message)

    async def broadcast(self, message):
        for queues in self.queues.values():
            for queue in queues:
                await queue.put(message)


class MemberQueuedManager(Manager):
    # the room's send goes through a send per member, which queues the message for each of the
    # member's sockets (a stale map may put it on another user's queue); each socket's writer task
    # writes it later

    def __init__(self):
        super().__init__()
        self.queues = {}

    async def send_to_user(self, user_id, message):
        for queue in self.queues.get(self.misrouted.get(user_id, user_id), []):
            await queue.put(message)


class Bridge:
    def __init__(self, manager):
        self.manager = manager

    async def notify_agent_thinking(self, run_id, user_id, room):
        # a shared thread: every participant sees the agent working for the one who asked
        await self.manager.send_to_room(room, {"type": "agent_thinking", "run_id": run_id})

    async def notify_system_notice(self, run_id, user_id):
        await self.manager.broadcast({"type": "system_notice", "run_id": run_id})


class PubSubBridge:
    # the emit publishes; a consumer task (started with the app) sends each message to its room:
    # the fan-out is made outside the emit's context and finds its emit by message key
    def __init__(self, channel):
        self.channel = channel

    async def notify_agent_thinking(self, run_id, user_id, room):
        await self.channel.put((room, {"type": "agent_thinking", "run_id": run_id}))
"""


_modules = itertools.count()


@pytest.fixture
def backend(tmp_path, monkeypatch):
    module = f"pw_bleed_fan_out_{next(_modules)}"
    with instrumented_backend(tmp_path, monkeypatch, module, BACKEND, PATHMAP) as backend:
        yield backend


def room_app(backend_module, misrouted: dict[str, str] | None = None,
             queued: bool = False, members: tuple[str, ...] = ("alice", "bob", "carol"),
             manager=None) -> FastAPI:
    """``members`` share room-1; a message asks the agent (an event to the room) or sends
    a notice to everyone. ``queued``: each socket is written by a task of its own."""
    if manager is None:
        manager = backend_module.QueuedManager() if queued else backend_module.Manager()
    bridge = backend_module.Bridge(manager)
    manager.rooms["room-1"] = list(members)
    manager.misrouted = misrouted or {}

    async def writer(websocket: WebSocket, queue: asyncio.Queue) -> None:
        while True:
            await websocket.send_json(await queue.get())

    async def handler(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        await websocket.accept()
        manager.sockets.setdefault(user, []).append(websocket)
        if queued:
            queue: asyncio.Queue = asyncio.Queue()
            manager.queues.setdefault(user, []).append(queue)
            task = asyncio.create_task(writer(websocket, queue))
        try:
            while True:
                message = await websocket.receive_json()
                if message["op"] == "ask":
                    await bridge.notify_agent_thinking(message["run_id"], user, "room-1")
                else:
                    await bridge.notify_system_notice(message["run_id"], user)
        except WebSocketDisconnect:
            manager.sockets[user].remove(websocket)
            if queued:
                task.cancel()

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    return app


def delivery_findings(spans: list[SpanRecord]) -> list[Finding]:
    """What the delivery detector finds in ``spans`` once every wait has ended."""
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    return delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S)


def send(client: TestClient, op: str, readers: tuple[str, ...]) -> list[dict]:
    """alice sends ``op``; the messages each of ``readers`` got."""
    with client.websocket_connect("/ws?user_id=alice") as alice, \
            client.websocket_connect("/ws?user_id=bob") as bob, \
            client.websocket_connect("/ws?user_id=carol") as carol:
        sockets = {"alice": alice, "bob": bob, "carol": carol}
        alice.send_json({"op": op, "run_id": "r-1"})
        return [sockets[reader].receive_json() for reader in readers]


@pytest.mark.parametrize("queued", [False, True], ids=["inline", "queued"])
@pytest.mark.parametrize("op, event_type", [("ask", "agent_thinking"), ("notice", "system_notice")])
def test_an_event_fanned_out_to_a_room_or_everyone_is_no_bleed(backend, op, event_type, queued):
    """alice's event goes to every member of her room (through send_to_user per member) or to
    every socket (a broadcast), written inside the send or by each socket's writer task (linked by
    message key). Paged as bleed.target_vs_socket_owner (critical) before, with no way to declare
    it (reproducer /tmp/s27_bleed/test_repro_fanout.py)."""
    module, exporter = backend
    with TestClient(room_app(module, queued=queued)) as client:
        got = send(client, op, ("alice", "bob", "carol"))
    assert [message["type"] for message in got] == [event_type] * 3
    spans = decoded(exporter)
    [emit] = [span for span in spans if span.kind == SpanKinds.EMIT]
    writes = [span for span in spans if span.kind == SpanKinds.DELIVER]
    fan_out = [span for span in spans if span.kind == SpanKinds.DISPATCH and span.fan_out]
    # what the detector sees: the emit's id on every write, each write marked, the fan-out call
    # addressed to no one (its room is not a user)
    assert len(writes) == 3 and {write.event_id for write in writes} == {emit.event_id}
    assert all(write.fan_out for write in writes) and len({w.connection_user for w in writes}) == 3
    assert len(fan_out) == 1 and fan_out[0].target is None
    bleed = BleedDetector(rules(), state())
    assert bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S) == []


def test_a_members_send_inside_a_fan_out_reaching_another_users_socket_is_found(backend):
    """No true positive lost: the room's send to bob reaches carol's socket (a stale socket map)."""
    module, exporter = backend
    with TestClient(room_app(module, misrouted={"bob": "carol"})) as client:
        got = send(client, "ask", ("alice", "carol", "carol"))
    assert [message["type"] for message in got] == ["agent_thinking"] * 3
    spans = decoded(exporter)
    sends = {span.span_id: span for span in spans if span.kind == SpanKinds.DISPATCH and span.target}
    [to_bob] = {sends[write.parent_span_id].span_id: sends[write.parent_span_id]
                for write in spans if write.kind == SpanKinds.DELIVER
                and sends[write.parent_span_id].target != write.connection_user}.values()
    bleed = BleedDetector(rules(), state())
    findings = bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S)
    assert [(f.rule, f.span_id) for f in findings] == [(BLEED_TARGET_VS_SOCKET_OWNER, to_bob.span_id)]


@pytest.mark.parametrize("misrouted", [False, True], ids=["clean", "misrouted"])
def test_a_members_queued_send_inside_a_fan_out_reaching_another_users_socket_is_found(
        backend, misrouted):
    """The room's send to bob goes through bob's send, which queues it for his writer task; a stale
    map puts it on carol's queue (carol is not in the room). The write is linked by key to alice's
    emit, which the fan-out sent: marked a fan-out's write and joined to carol's writer task only, it
    was never judged (reproducer /tmp/s27_rev3/test_repro_queued_fan_out_misroute.py). Only the
    users the nested per-user sends named have the emit by design: carol's write is judged against
    the emit's target."""
    module, exporter = backend
    app = room_app(module, misrouted={"bob": "carol"} if misrouted else None, queued=True,
                   members=("alice", "bob"), manager=module.MemberQueuedManager())
    with TestClient(app) as client:
        got = send(client, "ask", ("alice", "carol" if misrouted else "bob"))
    assert [message["type"] for message in got] == ["agent_thinking"] * 2
    spans = decoded(exporter)
    [emit] = [span for span in spans if span.kind == SpanKinds.EMIT]
    writes = [span for span in spans if span.kind == SpanKinds.DELIVER]
    assert {write.event_id for write in writes} == {emit.event_id} and len(writes) == 2
    bleed = BleedDetector(rules(), state())
    findings = bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S)
    if not misrouted:
        assert all(write.fan_out for write in writes) and findings == []
        return
    [to_carol] = [write for write in writes if write.connection_user != emit.target
                  and not write.fan_out]
    assert [(f.rule, f.span_id) for f in findings] == [(BLEED_TARGET_VS_SOCKET_OWNER, emit.span_id)]


def pub_sub_app(backend_module, members: tuple[str, ...]) -> tuple[FastAPI, dict]:
    """``members`` share room-1, each socket written by a writer task of its own; an emit is
    published and a consumer task, started with the app, calls ``send_to_room`` (a message for no
    room, a user offline: dropped)."""
    manager = backend_module.QueuedManager()
    manager.rooms["room-1"] = list(members)
    channel: asyncio.Queue = asyncio.Queue()
    bridge = backend_module.PubSubBridge(channel)

    async def consume() -> None:
        while True:
            room, message = await channel.get()
            if room is not None:
                await manager.send_to_room(room, message)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(consume())
        yield
        task.cancel()

    async def writer(websocket: WebSocket, queue: asyncio.Queue) -> None:
        while True:
            await websocket.send_json(await queue.get())

    async def handler(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        await websocket.accept()
        queue: asyncio.Queue = asyncio.Queue()
        manager.queues.setdefault(user, []).append(queue)
        task = asyncio.create_task(writer(websocket, queue))
        try:
            while True:
                message = await websocket.receive_json()
                await bridge.notify_agent_thinking(message["run_id"], user, "room-1")
        except WebSocketDisconnect:
            task.cancel()

    app = FastAPI(lifespan=lifespan)
    app.add_api_websocket_route("/ws", handler)
    return app, {"bridge": bridge}


@pytest.mark.parametrize("members", [("alice", "bob"), ("bob", "alice")], ids=["alice-first",
                                                                                 "bob-first"])
def test_a_fan_out_outside_its_emit_takes_no_other_users_pending_emit(backend, members):
    """dave (offline) had an event of the same run id and type that was never written (clients
    number runs alike); alice asks in room-1 (alice, bob) and a pub/sub consumer fans her event out.
    The fan-out, linked by key with no user, took dave's emit, the oldest unwritten one, and marked
    it fanned out: bob's write of alice's event was a false bleed.target_vs_socket_owner
    (reproducer /tmp/s27_rev3/repro_fan_out_by_key_takes_another_users_emit.py). Now it takes none;
    the write of its message on alice's socket finds the one it sent."""
    module, exporter = backend
    app, parts = pub_sub_app(module, members)
    with TestClient(app) as client:
        client.portal.call(parts["bridge"].notify_agent_thinking, "r-1", "dave", None)
        with client.websocket_connect("/ws?user_id=alice") as alice, \
                client.websocket_connect("/ws?user_id=bob") as bob:
            alice.send_json({"run_id": "r-1"})
            got = [alice.receive_json(), bob.receive_json()]
    assert [message["type"] for message in got] == ["agent_thinking"] * 2
    spans = decoded(exporter)
    emits = {span.target: span for span in spans if span.kind == SpanKinds.EMIT}
    [fan_out] = [span for span in spans if span.kind == SpanKinds.DISPATCH and span.fan_out]
    writes = {write.connection_user: write for write in spans if write.kind == SpanKinds.DELIVER}
    assert len(emits) == 2 and len(writes) == 2
    [dave] = [emit for target, emit in emits.items() if target not in writes]
    alice_emit = emits[({*emits} - {dave.target}).pop()]
    bleed = BleedDetector(rules(), state())
    assert bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S) == []
    assert fan_out.event_id != dave.event_id
    # alice's write is her emit's, marked a fan-out's; bob's is one too, or (written first, before
    # the fan-out's emit was known) linked to none
    assert writes[alice_emit.target].event_id == alice_emit.event_id
    assert {write.event_id for write in writes.values()} <= {alice_emit.event_id, None}
    assert all(write.fan_out for write in writes.values() if write.event_id is not None)
    # the fan-out, queueing for the writer tasks, wrote nothing and names no event: it was
    # reported delivery.no_connection at once (reproducer /tmp/s28_linking/test_repro_case1.py);
    # only dave's event, never written, is a finding
    assert (fan_out.event_id, fan_out.dispatch_writes) == (None, 0)
    assert [(f.rule, f.span_id) for f in delivery_findings(spans)] == [
        (DELIVERY_UNDELIVERED, dave.span_id)]


def test_a_fan_out_outside_its_emit_none_of_whose_writes_reach_the_emitter_names_no_emit(backend):
    """The known limit that stays: alice asked from no socket (over HTTP) in room-1 (bob, carol),
    beside dave's stale emit of the same run id and type. Which of the two the consumer's fan-out
    sent cannot be told (neither user gets a copy): the members' writes name no emit, and both emits
    are reported undelivered, alice's falsely; no bleed, no no_connection."""
    module, exporter = backend
    app, parts = pub_sub_app(module, ("bob", "carol"))
    with TestClient(app) as client:
        client.portal.call(parts["bridge"].notify_agent_thinking, "r-1", "dave", None)
        with client.websocket_connect("/ws?user_id=bob") as bob, \
                client.websocket_connect("/ws?user_id=carol") as carol:
            client.portal.call(parts["bridge"].notify_agent_thinking, "r-1", "alice", "room-1")
            got = [bob.receive_json(), carol.receive_json()]
    assert [message["type"] for message in got] == ["agent_thinking"] * 2
    spans = decoded(exporter)
    emits = [span for span in spans if span.kind == SpanKinds.EMIT]
    writes = [span for span in spans if span.kind == SpanKinds.DELIVER]
    assert len(emits) == 2 and [write.event_id for write in writes] == [None, None]
    bleed = BleedDetector(rules(), state())
    assert bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S) == []
    assert sorted((f.rule, f.span_id) for f in delivery_findings(spans)) == sorted(
        (DELIVERY_UNDELIVERED, emit.span_id) for emit in emits)


def stepped_pub_sub_app(backend_module, members: tuple[str, ...]) -> tuple[FastAPI, dict]:
    """As ``pub_sub_app``, each step made when the test says, through the client's portal: the
    consumer's fan-out of the next published message (``consume``), the writes of what was queued
    for a user's sockets (``flush``: a writer that lags, a slow client)."""
    manager = backend_module.QueuedManager()
    manager.rooms["room-1"] = list(members)
    channel: asyncio.Queue = asyncio.Queue()
    bridge = backend_module.PubSubBridge(channel)
    sockets: dict[str, list[tuple[WebSocket, asyncio.Queue]]] = {}

    async def consume() -> None:
        room, message = channel.get_nowait()
        await manager.send_to_room(room, message)

    async def flush(user: str) -> None:
        for websocket, queue in sockets.get(user, []):
            while not queue.empty():
                await websocket.send_json(queue.get_nowait())

    async def handler(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        queue: asyncio.Queue = asyncio.Queue()
        manager.queues.setdefault(user, []).append(queue)
        sockets.setdefault(user, []).append((websocket, queue))
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    return app, {"bridge": bridge, "consume": consume, "flush": flush}


@pytest.mark.parametrize("bob_joins", ["before", "after_the_emit"])
@pytest.mark.parametrize("first", ["alice", "bob"])
def test_a_members_write_of_a_fan_out_outside_its_emit_is_of_that_emit_not_the_next(
        backend, first, bob_joins):
    """A pub/sub consumer fans alice's event e1 out to room-1 (alice, bob); alice's run emits e2
    (same run and type) before the members' writers write e1. The fan-out took e1 by key, but its
    writes found e1 neither as a copy (no message known for it) nor as unwritten: they took e2,
    the oldest emit nothing had found, not fanned out: bob's write of e2 was a false
    bleed.target_vs_socket_owner (critical), and e2's own writes then doubled or no_connection
    (reproducer /tmp/s28_linking/test_repro_case2.py). The fan-out now gives e1 its message, and
    the moment it sent it for the sockets open then (bob may join between the emit and the
    fan-out): each write of it is a copy of e1."""
    module, exporter = backend
    app, parts = stepped_pub_sub_app(module, ("alice", "bob"))
    second = "bob" if first == "alice" else "alice"
    with TestClient(app) as client, contextlib.ExitStack() as stack:
        sockets = {"alice": stack.enter_context(client.websocket_connect("/ws?user_id=alice"))}
        if bob_joins == "before":
            sockets["bob"] = stack.enter_context(client.websocket_connect("/ws?user_id=bob"))
        client.portal.call(parts["bridge"].notify_agent_thinking, "r-1", "alice", "room-1")
        if bob_joins != "before":
            sockets["bob"] = stack.enter_context(client.websocket_connect("/ws?user_id=bob"))
        client.portal.call(parts["consume"])  # e1 fanned out, queued for both
        client.portal.call(parts["bridge"].notify_agent_thinking, "r-1", "alice", "room-1")  # e2
        for user in (first, second, None, first, second):
            if user is None:
                client.portal.call(parts["consume"])  # e2 fanned out
            else:
                client.portal.call(parts["flush"], user)
        got = {user: [socket.receive_json()["type"] for _ in range(2)]
               for user, socket in sockets.items()}
    assert got == {"alice": ["agent_thinking"] * 2, "bob": ["agent_thinking"] * 2}
    spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == SpanKinds.EMIT]
    writes = [span for span in spans if span.kind == SpanKinds.DELIVER]
    assert len(emits) == 2 and all(write.fan_out for write in writes)
    for user in ({write.connection_user for write in writes}):
        assert [write.event_id for write in writes if write.connection_user == user] == emits
    settings = rules(delivery_deadline_s=2.0, run_idle_s=1.0)
    bleed, duplicates = BleedDetector(settings, state()), DuplicatesDetector(settings, state())
    assert bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S) == []
    assert duplicates.consume(spans, NOW) + duplicates.tick(NOW + 60 * S) == []
    assert delivery_findings(spans) == []
