"""The delivery detector on the spans the instrumentation really makes: a backend module under
``instrumentation.instrument`` writing to a real Starlette WebSocket, its finished spans encoded as an
OTLP request (the SDK's own encoder) and decoded by the sidecar's ``SpanDecoder``."""

from __future__ import annotations

import asyncio
import re

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from instrumentation.attributes import SpanKinds
from sidecar.detectors.delivery import DeliveryDetector
from sidecar.rules import (DELIVERY_MISSING_REQUIRED_EVENTS, DELIVERY_NO_CONNECTION,
                           DELIVERY_UNDELIVERED, DELIVERY_WRITE_FAILED)
from tests.sidecar.detectors.factory import NOW, S, rules, sample, state, tick_through
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend
from tests.support import wait_until

PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  emitter:
    kind: emit
    implementations: [{module}.Emitter]
    methods: ["notify_*"]
    event_type: [method.strip_prefix(notify_)]
    run_id: [arg.run_id]
    target: [arg.user_id]
  socket_manager:
    kind: dispatch
    implementations: [{module}.Manager]
    methods: [send_to_user, send_to_thread]
    target: [arg.user_id]
    event_type: [arg.message.type]
    run_id: [arg.message.run_id]
messages:
  event_type: type
  run_id: run_id
"""
BACKEND = """\
class Manager:
    def __init__(self):
        self.sockets = {}

    async def send_to_user(self, user_id, message):
        for websocket in self.sockets.get(user_id, []):
            await websocket.send_json(message)

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)      # the reference backend's delegation


class Emitter:
    def __init__(self, manager):
        self.manager = manager

    async def notify_agent_thinking(self, run_id, user_id):
        await self.manager.send_to_thread("thread-1", {"type": "agent_thinking", "run_id": run_id},
                                          user_id=user_id)
"""


QUEUEING_BACKEND = """\
class Manager:
    def __init__(self):
        self.sockets, self.queued = {}, {}

    async def send_to_user(self, user_id, message):
        sockets = self.sockets.get(user_id)
        if not sockets:
            self.queued.setdefault(user_id, []).append(message)   # written when they connect
        for websocket in sockets or ():
            await websocket.send_json(message)

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)

    async def connect(self, user_id, websocket):
        self.sockets.setdefault(user_id, []).append(websocket)
        for message in self.queued.pop(user_id, []):
            await websocket.send_json(message)


class Emitter:
    def __init__(self, manager):
        self.manager = manager

    async def notify_agent_thinking(self, run_id, user_ids):
        for user_id in user_ids:   # one event, each recipient's send
            await self.manager.send_to_user(user_id, {"type": "agent_thinking", "run_id": run_id})
"""


FAILING_BACKEND = """\
class Manager:
    async def send_to_user(self, user_id, message):
        raise RuntimeError("socket registry unavailable")   # before any write

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)


class Emitter:
    def __init__(self, swallow):
        self.manager, self.swallow = Manager(), swallow

    async def notify_agent_thinking(self, run_id, user_id):
        try:
            await self.manager.send_to_thread("thread-1", {"type": "agent_thinking", "run_id": run_id},
                                              user_id=user_id)
        except RuntimeError:
            if not self.swallow:
                raise
"""


def _backend(tmp_path, monkeypatch, request, source):
    # hooked once per name: each test (and parameter) its own
    module = "pw_delivery_" + re.sub(r"\W", "_", request.node.name.removeprefix("test_"))
    return instrumented_backend(tmp_path, monkeypatch, module, source, PATHMAP)


@pytest.fixture
def backend(tmp_path, monkeypatch, request):
    """(the backend module, the exporter of its spans) under pathwatch, for this test only."""
    with _backend(tmp_path, monkeypatch, request, BACKEND) as backend:
        yield backend


@pytest.fixture
def failing_backend(tmp_path, monkeypatch, request):
    """A backend whose manager raises before writing anything."""
    with _backend(tmp_path, monkeypatch, request, FAILING_BACKEND) as backend:
        yield backend


@pytest.fixture
def queueing_backend(tmp_path, monkeypatch, request):
    """A backend whose manager queues a message for a user with no socket and writes it when they
    connect."""
    with _backend(tmp_path, monkeypatch, request, QUEUEING_BACKEND) as backend:
        yield backend


def notify_over_alices_socket(backend_module, *recipients: tuple[str, str]) -> None:
    """Alice holds a socket; an event of run ``run_id`` is emitted to ``user`` for each recipient."""
    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        manager = backend_module.Manager()
        manager.sockets["alice"] = [websocket]
        emitter = backend_module.Emitter(manager)
        for run_id, user in recipients:
            await emitter.notify_agent_thinking(run_id, user)
        await websocket.send_json({"type": "done"})

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as ws:
            while ws.receive_json()["type"] != "done":
                pass



def test_a_dispatch_written_by_the_dispatch_nested_in_it_is_no_missing_connection(backend):
    module, exporter = backend
    notify_over_alices_socket(module, ("run-alice", "alice"), ("run-nobody", "nobody"))
    spans = decoded(exporter)
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    assert delivery.consume(spans, NOW) == []  # held for the deadline: a write may still come
    findings = delivery.tick(NOW + 2 * S)
    # nobody has a socket: reported once, on the outer call (send_to_thread -> send_to_user)
    [outer] = [span for span in spans if span.name == "socket_manager.send_to_thread"
               and span.run_id == "run-nobody"]
    assert [(f.rule, f.span_id) for f in findings] == [(DELIVERY_NO_CONNECTION, outer.span_id)]
    assert findings[0].details["dispatch_writes"] == 0
    # alice's event was written through the nested send_to_user: nothing, now or at the deadline
    assert delivery.tick(NOW + 60 * S) == []


def notify_then_connect(backend_module, recipients: list[str], connecting: str) -> None:
    """An event of run-1 is emitted to ``recipients`` over HTTP while none of them is connected
    (each send is queued); then ``connecting`` opens a socket and gets it."""
    manager = backend_module.Manager()
    app = FastAPI()

    @app.post("/runs/{run_id}")
    async def start(run_id: str, users: str) -> None:
        await backend_module.Emitter(manager).notify_agent_thinking(run_id, users.split(","))

    @app.websocket("/ws")
    async def connect(websocket: WebSocket) -> None:
        await websocket.accept()
        await manager.connect(websocket.query_params["user_id"], websocket)
        await websocket.receive_text()

    with TestClient(app) as client:
        client.post(f"/runs/run-1?users={','.join(recipients)}")
        with client.websocket_connect(f"/ws?user_id={connecting}") as socket:
            assert socket.receive_json()["type"] == "agent_thinking"
            socket.send_text("bye")


def test_a_queued_dispatch_written_when_its_recipient_connects_is_no_missing_connection(
        queueing_backend):
    # /tmp/s24_dupdel/test_queued_dispatch_repro.py: no_connection reported at once, though bob
    # got the event as he connected
    module, exporter = queueing_backend
    notify_then_connect(module, ["bob"], connecting="bob")
    spans = decoded(exporter)
    [dispatch] = [span for span in spans if span.name == "socket_manager.send_to_user"]
    assert (dispatch.outcome, dispatch.dispatch_writes) == ("no_connection", 0)
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    assert delivery.consume(spans, NOW) == []
    assert tick_through(delivery, NOW, NOW + 60 * S) == []


def test_a_queued_event_written_to_one_recipient_leaves_the_other_without_a_connection(
        queueing_backend):
    module, exporter = queueing_backend
    notify_then_connect(module, ["bob", "carol"], connecting="bob")
    spans = decoded(exporter)
    dispatches = {span.target: span for span in spans if span.name == "socket_manager.send_to_user"}
    [write] = [span for span in spans if span.name == "websocket.send_json"]
    assert write.event_id == next(iter(dispatches.values())).event_id  # one event, two recipients
    carol = next(d for target, d in dispatches.items() if target != write.connection_user)
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    assert delivery.consume(spans, NOW) == []
    assert delivery.tick(NOW + 2 * S - 1) == []
    [finding] = delivery.tick(NOW + 2 * S)
    assert (finding.rule, finding.span_id) == (DELIVERY_NO_CONNECTION, carol.span_id)
    assert tick_through(delivery, NOW + 2 * S, NOW + 60 * S) == []


def test_an_event_queued_while_its_user_reconnected_is_linked_to_its_write(queueing_backend):
    """bob's first event is written to his socket; he reconnects, and the event emitted while he was
    away is queued and written to the new socket by message key. Linking per connection (5a6dd99,
    reverted) gave that write the first event's id: a false no_connection and an undelivered event
    (found by review: /tmp/s24_review_delivery/test_reconnect_repro.py)."""
    module, exporter = queueing_backend
    manager = module.Manager()
    app = FastAPI()

    @app.post("/runs/{run_id}")
    async def notify(run_id: str) -> None:
        await module.Emitter(manager).notify_agent_thinking(run_id, ["bob"])

    @app.websocket("/ws")
    async def connect(websocket: WebSocket) -> None:
        await websocket.accept()
        await manager.connect("bob", websocket)
        await websocket.send_json({"type": "ready"})
        await websocket.receive_text()
        manager.sockets["bob"].remove(websocket)

    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=bob") as first:
            assert first.receive_json()["type"] == "ready"
            client.post("/runs/run-1")  # written to the first socket within the emit
            assert first.receive_json()["type"] == "agent_thinking"
            first.send_text("bye")
        wait_until(lambda: not manager.sockets["bob"], message="the first socket let go")
        client.post("/runs/run-1")  # bob is away: queued
        with client.websocket_connect("/ws?user_id=bob") as second:
            assert second.receive_json()["type"] == "agent_thinking"  # the queue, flushed
            assert second.receive_json()["type"] == "ready"
            second.send_text("bye")
    spans = decoded(exporter)
    [queued] = [span for span in spans if span.kind == SpanKinds.DISPATCH and span.dispatch_writes == 0]
    writes = [span for span in spans if span.kind == SpanKinds.DELIVER and span.event_type == "agent_thinking"]
    assert [write.event_id for write in writes][-1] == queued.event_id
    assert len({write.event_id for write in writes}) == 2
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    assert delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S) == []


@pytest.mark.parametrize("swallow", [False, True], ids=["raised_through_the_emit", "swallowed_by_the_emit"])
def test_a_dispatch_that_failed_before_writing_is_one_write_failure_not_a_missing_connection(
        failing_backend, swallow):
    # /tmp/s24_dupdel/test_failed_dispatch_repro.py: reported delivery.no_connection
    module, exporter = failing_backend

    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            await module.Emitter(swallow).notify_agent_thinking("run-1", "alice")
        except RuntimeError:
            pass
        await websocket.send_json({"type": "done"})

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as socket:
            socket.receive_json()
    spans = decoded(exporter)
    [outer] = [span for span in spans if span.name == "socket_manager.send_to_thread"]
    assert (outer.outcome, outer.dispatch_writes, outer.error) == ("failed", 0, True)
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    findings = delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S)
    assert [(f.rule, f.span_id) for f in findings] == [(DELIVERY_WRITE_FAILED, outer.span_id)]
    assert findings[0].details["outcome"] == "failed"


SLOW_BACKEND = """\
import asyncio


class Manager:
    def __init__(self):
        self.sockets = {}

    async def send_to_user(self, user_id, message):
        for websocket in self.sockets.get(user_id, []):
            await websocket.send_json(message)

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)


class Emitter:
    def __init__(self, manager, delay_s):
        self.manager, self.delay_s = manager, delay_s

    async def notify_agent_thinking(self, run_id, user_id):
        await asyncio.sleep(self.delay_s)   # a slow emit: rate limited, waiting on a lock
        await self.manager.send_to_user(user_id, {"type": "agent_thinking", "run_id": run_id})
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.3], ids=["at_once", "past_the_deadline"])
def test_a_write_made_in_its_emit_past_the_deadline_is_undelivered(tmp_path, monkeypatch, request,
                                                                   delay_s):
    """/tmp/s27_deliv/repro_early_late_write.py: the write ends inside the emit call, so it
    arrives first, and it delivered the emit whenever it started."""
    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        manager = module.Manager()
        manager.sockets["alice"] = [websocket]
        await module.Emitter(manager, delay_s).notify_agent_thinking("run-1", "alice")
        await websocket.send_json({"type": "done"})

    with _backend(tmp_path, monkeypatch, request, SLOW_BACKEND) as (module, exporter):
        app = FastAPI()
        app.add_api_websocket_route("/ws", handler)
        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as socket:
                while socket.receive_json()["type"] != "done":
                    pass
        spans = decoded(exporter)
    [emit] = [span for span in spans if span.kind == SpanKinds.EMIT]
    [write] = [span for span in spans if span.kind == SpanKinds.DELIVER and span.event_id == emit.event_id]
    assert spans.index(write) < spans.index(emit)  # the usual order: the write ends first
    delivery = DeliveryDetector(rules(delivery_deadline_s=0.2, run_idle_s=1.0), state())
    findings = delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S)
    assert [(f.rule, f.span_id) for f in findings] == (
        [(DELIVERY_UNDELIVERED, emit.span_id)] if delay_s else [])


STRICT_BACKEND = """\
class Manager:
    def __init__(self):
        self.sockets = {}

    async def send_to_user(self, user_id, message):
        for websocket in self.sockets[user_id]:   # KeyError: the user has no socket here
            await websocket.send_json(message)

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)


class Emitter:
    def __init__(self, manager):
        self.manager = manager

    async def notify_agent_thinking(self, run_id, user_id):
        try:
            await self.manager.send_to_thread("thread-1", {"type": "agent_thinking", "run_id": run_id},
                                              user_id=user_id)
        except KeyError:
            pass   # the user went away
"""


def test_a_dispatcher_whose_lookup_of_its_recipient_raised_keyerror_had_no_connection(
        tmp_path, monkeypatch, request):
    """A socket registry read with [] raises KeyError(user_id) for a user with no socket: the
    recipient had no connection (the rule's finding and runbook), not a failed write."""
    with _backend(tmp_path, monkeypatch, request, STRICT_BACKEND) as (module, exporter):
        notify_over_alices_socket(module, ("run-alice", "alice"), ("run-nobody", "nobody"))
        spans = decoded(exporter)
    [outer] = [span for span in spans if span.name == "socket_manager.send_to_thread"
               and span.run_id == "run-nobody"]
    assert (outer.outcome, outer.dispatch_writes, outer.error) == ("no_connection", 0, True)
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    findings = delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S)
    assert [(f.rule, f.span_id) for f in findings] == [(DELIVERY_NO_CONNECTION, outer.span_id)]


TABS_BACKEND = """\
class Manager:
    def __init__(self):
        self.sockets, self.queued = {}, []

    async def send_to_user(self, user_id, message):
        self.queued.append((user_id, message))   # written by flush_one(), in another task

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)

    async def flush_one(self):
        user_id, message = self.queued.pop(0)
        for websocket in self.sockets.get(user_id, []):   # each of the user's tabs
            await websocket.send_json(message)


class Emitter:
    def __init__(self, manager):
        self.manager = manager

    async def notify_agent_thinking(self, run_id, user_id, step):
        await self.manager.send_to_user(user_id, {"type": "agent_thinking", "run_id": run_id,
                                                  "step": step})
"""


def test_an_event_never_written_after_one_written_to_two_tabs_is_reported(tmp_path, monkeypatch,
                                                                          request):
    # two events of one run and type queued for alice's two tabs; the first is written to both,
    # then the backend stops: the second tab's copy of step 1 took step 2's id (the oldest emit
    # nothing had found), so step 2 counted as written and nothing was reported (reproducer
    # /tmp/s27_link/test_link_repro.py)
    import asyncio

    with _backend(tmp_path, monkeypatch, request, TABS_BACKEND) as (module, exporter):
        manager = module.Manager()
        app = FastAPI()

        @app.websocket("/ws")
        async def tab(websocket: WebSocket) -> None:
            await websocket.accept()
            manager.sockets.setdefault("alice", []).append(websocket)
            await websocket.send_json({"type": "ready"})
            await websocket.receive_text()

        @app.post("/run")
        async def run() -> None:
            emitter = module.Emitter(manager)
            for step in (1, 2):
                await emitter.notify_agent_thinking("run-1", "alice", step)
            await asyncio.create_task(manager.flush_one())  # step 1; step 2 is never written

        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as tab1, \
                    client.websocket_connect("/ws?user_id=alice") as tab2:
                assert [tab.receive_json()["type"] for tab in (tab1, tab2)] == ["ready", "ready"]
                client.post("/run")
                assert [tab.receive_json()["step"] for tab in (tab1, tab2)] == [1, 1]
                for tab in (tab1, tab2):
                    tab.send_text("bye")
        spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == SpanKinds.EMIT]
    writes = [span.event_id for span in spans
              if span.kind == SpanKinds.DELIVER and span.event_type == "agent_thinking"]
    assert writes == [emits[0], emits[0]]
    [step_2] = [span for span in spans
                if span.kind == SpanKinds.DISPATCH and span.event_id == emits[1]]
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    findings = delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S)
    # queued by its dispatch, which wrote nothing, and no write came: no connection, once
    assert [(f.rule, f.span_id) for f in findings] == [(DELIVERY_NO_CONNECTION, step_2.span_id)]


SLOW_QUEUEING_BACKEND = QUEUEING_BACKEND.replace(
    """    def __init__(self, manager):
        self.manager = manager

    async def notify_agent_thinking(self, run_id, user_ids):
""", """    def __init__(self, manager, wait):
        self.manager, self.wait = manager, wait

    async def notify_agent_thinking(self, run_id, user_ids):
        self.wait(1.5)   # a slow emit: it waited on a lock or a rate limit before sending
""")


@pytest.mark.parametrize("connects_after_s", [3.0, 1.8], ids=["written_late", "written_in_time"])
def test_an_event_queued_by_a_slow_emit_and_written_past_its_deadline_is_undelivered(
        tmp_path, monkeypatch, request, connects_after_s):
    """/tmp/s27_rev2/test_held_late_write_repro.py: the emit dispatched 1.5 s after it started, to
    bob who had no socket (queued); bob connected, and was written the event, 3 s after the emit
    started (deadline 2 s). The write answered the held no_connection dispatch, and the event,
    marked reported when the dispatch was held, was reported by nothing. The backend's span clock
    is moved on by the story (no sleep), and by nothing else: a microsecond a reading, so that spans
    still end after they start. On the real clock plus the story, the time the test client took
    counted too, and written_in_time had 0.2 s of it (up to 0.12 s seen on a loaded machine)."""
    import itertools

    import opentelemetry.sdk.trace as sdk_trace

    moved = [0]
    readings, started_ns = itertools.count(), sdk_trace.time_ns()
    monkeypatch.setattr(sdk_trace, "time_ns", lambda: started_ns + moved[0] + next(readings) * 1_000)

    def wait(seconds: float) -> None:
        moved[0] += int(seconds * S)

    assert SLOW_QUEUEING_BACKEND != QUEUEING_BACKEND
    with _backend(tmp_path, monkeypatch, request, SLOW_QUEUEING_BACKEND) as (module, exporter):
        manager = module.Manager()
        app = FastAPI()

        @app.post("/runs/{run_id}")
        async def start(run_id: str) -> None:
            await module.Emitter(manager, wait).notify_agent_thinking(run_id, ["bob"])

        @app.websocket("/ws")
        async def connect(websocket: WebSocket) -> None:
            await websocket.accept()
            await manager.connect("bob", websocket)
            await websocket.receive_text()

        with TestClient(app) as client:
            client.post("/runs/run-1")
            wait(connects_after_s - 1.5)
            with client.websocket_connect("/ws?user_id=bob") as socket:
                assert socket.receive_json()["type"] == "agent_thinking"
                socket.send_text("bye")
        spans = decoded(exporter)
    [emit] = [span for span in spans if span.kind == SpanKinds.EMIT]
    [dispatch] = [span for span in spans if span.kind == SpanKinds.DISPATCH]
    [write] = [span for span in spans if span.kind == SpanKinds.DELIVER]
    assert (dispatch.outcome, write.event_id) == ("no_connection", emit.event_id)
    assert write.start_ns - dispatch.start_ns < 2 * S  # in time for the dispatch: it answers it
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    findings = delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S)
    assert [(f.rule, f.span_id) for f in findings] == (
        [(DELIVERY_UNDELIVERED, emit.span_id)] if connects_after_s == 3.0 else [])


RE_ENTERING_PATHMAP = """\
version: 1
roles:
  engine:
    kind: execute
    implementations: [{module}.Engine]
    methods: [execute]
    run_id: [arg.run_id]
  emitter:
    kind: emit
    implementations: [{module}.Emitter]
    methods: ["notify_*"]
    event_type: [method.strip_prefix(notify_)]
    run_id: [arg.run_id]
"""
RE_ENTERING_BACKEND = """\
class Emitter:
    async def notify(self, run_id, event_type):
        pass

    async def notify_agent_started(self, run_id):
        pass

    async def notify_agent_thinking(self, run_id):
        pass

    async def notify_tool_executing(self, run_id):
        pass

    async def notify_tool_completed(self, run_id):
        pass

    async def notify_agent_completed(self, run_id):
        pass


class Engine:
    def __init__(self, llm):
        self.emitter, self.llm = Emitter(), llm

    async def execute(self, run_id, step=None):
        if step is not None:   # a tool calling the engine again for the same run
            return
        await self.emitter.notify_agent_started(run_id)
        await self.emitter.notify_tool_executing(run_id)
        await self.execute(run_id, step="reflect")
        await self.emitter.notify_tool_completed(run_id)
        await self.llm()       # an LLM call, longer than run_idle_s
        await self.emitter.notify_agent_thinking(run_id)
        await self.emitter.notify_agent_completed(run_id)
"""


def test_a_run_whose_tool_re_entered_its_engine_goes_on_through_a_pause_longer_than_run_idle(
        tmp_path, monkeypatch, request):
    """/tmp/s29_soakB/repro_nested_idle.py: the nested execution's span ends, and is exported, as the
    tool returns; the run then waits on its LLM longer than run_idle_s. It was reported missing
    agent_thinking and agent_completed meanwhile (3 of 3 runs on the real stack); now it goes on
    until its engine call (the one the nested call names) arrives."""
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    with instrumented_backend(tmp_path, monkeypatch, "pw_delivery_re_entering", RE_ENTERING_BACKEND,
                              RE_ENTERING_PATHMAP) as (module, exporter):
        async def run() -> list:
            waiting, answered = asyncio.Event(), asyncio.Event()

            async def llm() -> None:
                waiting.set()
                await answered.wait()

            task = asyncio.create_task(module.Engine(llm).execute("run-1"))
            await waiting.wait()  # the spans ended so far arrive, then nothing for 5 s
            before = decoded(exporter)
            exporter.clear()
            found = delivery.consume(before, NOW) + tick_through(delivery, NOW, NOW + 5 * S, S // 10)
            answered.set()
            await task
            return before, found

        before, found = asyncio.run(run())
        after = decoded(exporter)
    [nested] = [span for span in before if span.kind == SpanKinds.EXECUTE]
    [outer] = [span for span in after if span.kind == SpanKinds.EXECUTE]
    assert nested.nested and nested.outer_span_id == outer.span_id
    found += delivery.consume(after, NOW + 5 * S) + tick_through(delivery, NOW + 5 * S, NOW + 60 * S, S // 10)
    assert [f.rule for f in found if f.rule.startswith("delivery.missing")] == []


STREAMING_PATHMAP = """\
version: 1
roles:
  engine:
    kind: execute
    implementations: [{module}.Engine]
    methods: [stream]
    run_id: [arg.run_id]
"""
STREAMING_BACKEND = """\
class Engine:
    async def stream(self, run_id, closed):
        try:
            for step in ("thinking", "tool", "answer"):
                yield step
        finally:
            closed.set()
"""


@pytest.mark.parametrize("stopped", ["cancelled", "break"])
def test_a_streaming_run_its_bare_async_for_was_cancelled_in_is_counted_cancelled(
        tmp_path, monkeypatch, request, telemetry, stopped):
    """A streaming engine consumed by a bare ``async for`` (no ``aclosing``) whose task is cancelled
    while the consumer writes a step to the socket: the event loop closes the generator later, in a
    task of its own. Its span said nothing, so the run was a delivery.missing_required_events for
    the events it never got to (the known limit of s32); it is counted ``cancelled`` now. A
    consumer that broke out of the loop (its task cancelled only after) is judged as before."""
    module_name = "pw_delivery_" + re.sub(r"\W", "_", request.node.name.removeprefix("test_"))
    with instrumented_backend(tmp_path, monkeypatch, module_name, STREAMING_BACKEND,
                              STREAMING_PATHMAP) as (module, exporter):
        async def consume(closed: asyncio.Event, writing: asyncio.Event) -> None:
            async for _ in module.Engine().stream("run-s", closed):
                if stopped == "break":
                    break
                writing.set()
                await asyncio.Event().wait()  # a socket write that never ends
            writing.set()
            await asyncio.Event().wait()

        async def run() -> None:
            closed, writing = asyncio.Event(), asyncio.Event()
            task = asyncio.create_task(consume(closed, writing))
            await writing.wait()
            task.cancel()  # the socket closed: its handler cancels the run
            del task
            await closed.wait()

        asyncio.run(run())
        spans = decoded(exporter)
    delivery = DeliveryDetector(rules(run_idle_s=1.0), state(), telemetry)
    findings = delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 10 * S)
    cancelled = sample(telemetry, "pathwatch_runs_completed_total", outcome="cancelled")
    if stopped == "cancelled":
        assert findings == [] and cancelled == 1
    else:
        assert [finding.rule for finding in findings] == [DELIVERY_MISSING_REQUIRED_EVENTS]
        assert cancelled == 0
