"""The duplicates detector on the spans the instrumentation really makes: a backend module under
``instrumentation.instrument`` writing to real Starlette WebSockets, its finished spans encoded as an
OTLP request and decoded by the sidecar's ``SpanDecoder``."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from sidecar.detectors.duplicates import MAX_EMISSION_HOLD_S, DuplicatesDetector
from sidecar.detectors.delivery import DeliveryDetector
from sidecar.rules import DUPLICATE_EMISSION, DUPLICATE_ENTRY_POINT_PATHS, DUPLICATE_EXECUTION
from tests.sidecar.detectors.factory import NOW, S, rules, state, tick_through
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend
from tests.sidecar.detectors.test_delivery_instrumented import PATHMAP
from tests.support import wait_until

QUEUE_BACKEND = """\
import asyncio
import contextlib


class Manager:
    def __init__(self):
        self.sockets, self.queue = {}, asyncio.Queue()

    async def send_to_user(self, user_id, message):
        await self.queue.put((user_id, message))   # written by flush(), in another task

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)

    async def flush(self):
        while not self.queue.empty():
            user_id, message = await self.queue.get()
            for websocket in self.sockets.get(user_id, []):   # each of the user's tabs
                await websocket.send_json(message)


class Emitter:
    def __init__(self, manager):
        self.manager = manager

    async def notify_agent_thinking(self, run_id, user_id, step):
        await self.manager.send_to_user(user_id, {"type": "agent_thinking", "run_id": run_id,
                                                  "step": step})
"""


def test_a_queued_broadcast_to_two_tabs_of_one_user_is_no_duplicate_write(tmp_path, monkeypatch):
    # each write by message key took the oldest emit no write had matched, so the second tab's
    # copy of step 1 took step 2's event id, and step 2 went to it again: duplicate.emission,
    # "written 2 times to the same socket" (a reconnect, the same writes on a socket opened after
    # the emits, must not: test_delivery_instrumented's reconnect test)
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_two_tabs", QUEUE_BACKEND,
                              PATHMAP) as (module, exporter):
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
            for step in (1, 2):  # two events of one type and run: one message key
                await emitter.notify_agent_thinking("run-1", "alice", step)
            await asyncio.create_task(manager.flush())

        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as tab1, \
                    client.websocket_connect("/ws?user_id=alice") as tab2:
                assert [tab.receive_json()["type"] for tab in (tab1, tab2)] == ["ready", "ready"]
                client.post("/run")
                assert [[tab.receive_json()["step"] for _ in range(2)] for tab in (tab1, tab2)] == [
                    [1, 2], [1, 2]]
                for tab in (tab1, tab2):
                    tab.send_text("bye")
        spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == "emit"]
    writes = {(span.connection_id, span.event_id) for span in spans
              if span.kind == "deliver" and span.event_id is not None}
    connections = {connection for connection, _ in writes}
    assert len(emits) == 2 and len(connections) == 2
    assert writes == {(c, e) for c in connections for e in emits}  # each event once to each tab
    duplicates = DuplicatesDetector(rules(delivery_deadline_s=2.0, run_idle_s=1.0), state())
    assert duplicates.consume(spans, NOW) + duplicates.tick(NOW + 60 * S) == []


ACTIVE_DEVICE_BACKEND = QUEUE_BACKEND.replace(
    "self.sockets, self.queue = {}, asyncio.Queue()",
    "self.sockets, self.active, self.queue = {}, {}, asyncio.Queue()").replace(
    """            for websocket in self.sockets.get(user_id, []):   # each of the user's tabs
                await websocket.send_json(message)""",
    """            await self.sockets[user_id][self.active[user_id]].send_json(message)""")


def test_a_run_moved_to_the_users_other_open_device_is_linked_to_its_own_events(tmp_path,
                                                                                monkeypatch):
    # laptop and phone both open; the app sends a run's first events to the laptop and the later
    # ones to the phone only: linking the phone's writes to the oldest emits it had not had gave it
    # the laptop's events (two false no_connection / undelivered; found by review,
    # /tmp/s25_rv/test_active_device_repro.py)
    assert ACTIVE_DEVICE_BACKEND != QUEUE_BACKEND
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_active_device",
                              ACTIVE_DEVICE_BACKEND, PATHMAP) as (module, exporter):
        manager = module.Manager()
        app = FastAPI()

        @app.websocket("/ws")
        async def device(websocket: WebSocket) -> None:
            await websocket.accept()
            manager.sockets.setdefault("alice", {})[websocket.query_params["device"]] = websocket
            await websocket.send_json({"type": "ready"})
            await websocket.receive_text()

        @app.post("/run")
        async def run(active: str, first: int) -> None:
            manager.active["alice"] = active
            emitter = module.Emitter(manager)
            for step in (first, first + 1):
                await emitter.notify_agent_thinking("run-1", "alice", step)
            await asyncio.create_task(manager.flush())

        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice&device=laptop") as laptop, \
                    client.websocket_connect("/ws?user_id=alice&device=phone") as phone:
                assert [d.receive_json()["type"] for d in (laptop, phone)] == ["ready", "ready"]
                client.post("/run?active=laptop&first=1")
                assert [laptop.receive_json()["step"] for _ in range(2)] == [1, 2]
                client.post("/run?active=phone&first=3")
                assert [phone.receive_json()["step"] for _ in range(2)] == [3, 4]
                for d in (laptop, phone):
                    d.send_text("bye")
        spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == "emit"]
    writes = [span.event_id for span in spans
              if span.kind == "deliver" and span.event_type == "agent_thinking"]
    assert len(emits) == 4 and writes == emits  # each step's write carries its own event's id
    settings = rules(delivery_deadline_s=2.0, run_idle_s=1.0)
    delivery, duplicates = DeliveryDetector(settings, state()), DuplicatesDetector(settings, state())
    assert delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S) == []
    assert duplicates.consume(spans, NOW) + duplicates.tick(NOW + 60 * S) == []


def test_each_queued_event_written_to_two_tabs_in_turn_carries_its_own_id(tmp_path, monkeypatch):
    # the second tab's copy of step 1 took step 2's id (the oldest emit nothing had found), its
    # copy of step 2 step 1's: no finding, but each copy's latency read against the other event,
    # and step 2 hidden had the backend stopped before writing it (test_delivery_instrumented)
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_in_turn", QUEUE_BACKEND,
                              PATHMAP) as (module, exporter):
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
            await asyncio.create_task(manager.flush())

        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as tab1, \
                    client.websocket_connect("/ws?user_id=alice") as tab2:
                assert [tab.receive_json()["type"] for tab in (tab1, tab2)] == ["ready", "ready"]
                client.post("/run")
                assert [[tab.receive_json()["step"] for _ in range(2)] for tab in (tab1, tab2)] == [
                    [1, 2], [1, 2]]
                for tab in (tab1, tab2):
                    tab.send_text("bye")
        spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == "emit"]
    writes = [span.event_id for span in spans
              if span.kind == "deliver" and span.event_type == "agent_thinking"]
    assert writes == [emits[0], emits[0], emits[1], emits[1]]  # in the order the queue wrote them


REPLAY_BACKEND = QUEUE_BACKEND.replace(
    "self.sockets, self.queue = {}, asyncio.Queue()",
    "self.sockets, self.queue, self.sent = {}, asyncio.Queue(), []").replace(
    """            user_id, message = await self.queue.get()
""", """            user_id, message = await self.queue.get()
            self.sent.append(message)   # the history a tab opened later is sent first
""")


def assert_no_duplicate_or_delivery_finding(spans) -> None:
    settings = rules(delivery_deadline_s=2.0, run_idle_s=1.0)
    delivery, duplicates = DeliveryDetector(settings, state()), DuplicatesDetector(settings, state())
    assert duplicates.consume(spans, NOW) + duplicates.tick(NOW + 60 * S) == []
    assert delivery.consume(spans, NOW) + tick_through(delivery, NOW, NOW + 60 * S) == []


def test_a_history_replayed_to_a_new_tab_is_no_duplicate_write(tmp_path, monkeypatch):
    # step 1 was written to the open tab, step 2 emitted but not written yet when a second tab
    # opened and was sent the history (step 1): that copy took step 2's id (the oldest emit nothing
    # had found), and step 2's real write to the new tab was then step 2 again: duplicate.emission
    # 'written 2 times to the same socket' (reproducer /tmp/s27_link/test_link_repro.py)
    assert REPLAY_BACKEND != QUEUE_BACKEND
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_replay", REPLAY_BACKEND,
                              PATHMAP) as (module, exporter):
        manager = module.Manager()
        app = FastAPI()

        @app.websocket("/ws")
        async def tab(websocket: WebSocket) -> None:
            await websocket.accept()
            for message in list(manager.sent):
                await websocket.send_json(message)
            manager.sockets.setdefault("alice", []).append(websocket)
            await websocket.send_json({"type": "ready"})
            await websocket.receive_text()

        @app.post("/emit")
        async def emit(step: int) -> None:
            await module.Emitter(manager).notify_agent_thinking("run-1", "alice", step)

        @app.post("/flush")
        async def flush() -> None:
            await asyncio.create_task(manager.flush())

        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as tab1:
                assert tab1.receive_json()["type"] == "ready"
                client.post("/emit?step=1")
                client.post("/flush")
                assert tab1.receive_json()["step"] == 1
                client.post("/emit?step=2")  # queued, not written yet
                with client.websocket_connect("/ws?user_id=alice") as tab2:
                    assert [tab2.receive_json().get("step") for _ in range(2)] == [1, None]
                    client.post("/flush")
                    assert [tab.receive_json()["step"] for tab in (tab1, tab2)] == [2, 2]
                    tab2.send_text("bye")
                tab1.send_text("bye")
        spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == "emit"]
    writes = [span.event_id for span in spans
              if span.kind == "deliver" and span.event_type == "agent_thinking"]
    assert writes == [emits[0], emits[0], emits[1], emits[1]]  # tab 1's, the replay, then step 2
    assert_no_duplicate_or_delivery_finding(spans)


def replay_app(module, manager) -> FastAPI:
    """Alice's tab: sent the manager's history on connect, then ``ready``; emits and flushes by
    HTTP (the flush in a task of its own, as a writer would)."""
    app = FastAPI()

    @app.websocket("/ws")
    async def tab(websocket: WebSocket) -> None:
        await websocket.accept()
        for message in list(manager.sent):
            await websocket.send_json(message)
        manager.sockets.setdefault("alice", []).append(websocket)
        await websocket.send_json({"type": "ready"})
        await websocket.receive_text()
        manager.sockets["alice"].remove(websocket)

    @app.post("/emit")
    async def emit(step: int) -> None:
        await module.Emitter(manager).notify_agent_thinking("run-1", "alice", step)

    @app.post("/flush")
    async def flush() -> None:
        await asyncio.create_task(manager.flush())

    return app


def test_a_history_replayed_to_a_reconnected_socket_is_no_duplicate_write(tmp_path, monkeypatch):
    # the user's only tab had steps 1 and 2 and closed; the new socket was sent the run's history:
    # every emit found, the old socket closed and the new one opened after them, so both replays
    # took the newest emit's id: duplicate.emission 'written 2 times to the same socket'
    # (reproducer /tmp/s27_rev2/test_reconnect_replay_repro.py)
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_reconnect_replay",
                              REPLAY_BACKEND, PATHMAP) as (module, exporter):
        manager = module.Manager()
        app = replay_app(module, manager)
        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as first:
                assert first.receive_json()["type"] == "ready"
                for step in (1, 2):
                    client.post(f"/emit?step={step}")
                client.post("/flush")
                assert [first.receive_json()["step"] for _ in range(2)] == [1, 2]
                first.send_text("bye")
            wait_until(lambda: not manager.sockets["alice"], message="the first socket let go")
            with client.websocket_connect("/ws?user_id=alice") as second:
                assert [second.receive_json().get("step") for _ in range(3)] == [1, 2, None]
                second.send_text("bye")
        spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == "emit"]
    writes = [span.event_id for span in spans
              if span.kind == "deliver" and span.event_type == "agent_thinking"]
    assert writes == [emits[0], emits[1], emits[0], emits[1]]  # the first socket's, the replay
    assert_no_duplicate_or_delivery_finding(spans)


def test_a_history_replayed_to_a_reconnected_socket_while_an_event_queued_away_waits(tmp_path,
                                                                                     monkeypatch):
    # the user's socket had step 1 and closed; step 2 was queued while away (the dispatch wrote
    # nothing); the new socket was sent the history (step 1) before the queue was flushed: the
    # replay took step 2's id (the oldest emit nothing had found: its message was not known), and
    # step 2's own write was step 2 again: duplicate.emission 'written 2 times to the same socket'
    # (reproducer /tmp/s28_linking/test_repro_case34.py). The dispatch's message is now kept for
    # the emit: a write of another message that copies step 1 is the replay
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_replay_while_queued",
                              REPLAY_BACKEND, PATHMAP) as (module, exporter):
        manager = module.Manager()
        app = replay_app(module, manager)
        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as first:
                assert first.receive_json()["type"] == "ready"
                client.post("/emit?step=1")
                client.post("/flush")
                assert first.receive_json()["step"] == 1
                first.send_text("bye")
            wait_until(lambda: not manager.sockets["alice"], message="the first socket let go")
            client.post("/emit?step=2")  # queued while away
            with client.websocket_connect("/ws?user_id=alice") as second:
                assert [second.receive_json().get("step") for _ in range(2)] == [1, None]
                client.post("/flush")
                assert second.receive_json()["step"] == 2
                second.send_text("bye")
        spans = decoded(exporter)
    emits = [span.event_id for span in spans if span.kind == "emit"]
    writes = [span.event_id for span in spans
              if span.kind == "deliver" and span.event_type == "agent_thinking"]
    assert writes == [emits[0], emits[0], emits[1]]  # the first socket's, the replay, step 2
    assert_no_duplicate_or_delivery_finding(spans)


EXECUTOR_PATHMAP = """\
version: 1
identity:
  http: [{header: x-user-id}]
roles:
  execution_engine:
    kind: execute
    implementations: [{module}.Engine]
    methods: [execute_agent]
    user_scoped: true
    owner: [self.user_id]
    subject: [arg.context.user_id]
    run_id: [arg.context.run_id]
  emitter:
    kind: emit
    implementations: [{module}.Emitter]
    methods: ["notify_*"]
    user_scoped: true
    owner: [self.user_id]
    event_type: [method.strip_prefix(notify_)]
    run_id: [arg.run_id]
"""
EXECUTOR_BACKEND = """\
import asyncio
import contextlib


class Context:
    def __init__(self, user_id, run_id):
        self.user_id, self.run_id = user_id, run_id


class Emitter:
    def __init__(self, user_id):
        self.user_id = user_id

    def notify_agent_started(self, run_id):   # a blocking client: called in the executor
        return None


class Engine:
    def __init__(self, user_id):
        self.user_id = user_id
        self.emitter = Emitter(user_id)

    async def execute_agent(self, context):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.emitter.notify_agent_started, context.run_id)
"""


def test_two_users_runs_sharing_a_run_id_emitting_from_an_executor_are_not_duplicates(tmp_path,
                                                                                     monkeypatch):
    # each client numbers its requests from 1, and the run id is that number (S10's bug): an emit
    # made in loop.run_in_executor carries no ambient user and counted for the run of the first
    # user of the id, so bob's agent_started was alice's run's second one: duplicate.emission after
    # the 120 s hold (found by review: /tmp/s27_dup/repro_shared_run_no_user.py)
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_shared_run_executor",
                              EXECUTOR_BACKEND, EXECUTOR_PATHMAP) as (module, exporter):
        app = FastAPI()

        @app.post("/run")
        async def run(request_number: int, user: str) -> None:
            await module.Engine(user).execute_agent(module.Context(user, str(request_number)))

        with TestClient(app) as client:
            for user in ("alice", "bob"):
                client.post(f"/run?request_number=1&user={user}", headers={"x-user-id": user})
        spans = decoded(exporter)
    emits = [span for span in spans if span.kind == "emit"]
    assert len(emits) == 2 and {(span.user, span.parent_span_id) for span in emits} == {(None, None)}
    assert len({span.owner for span in emits}) == 2 and {span.run_id for span in spans
                                                          if span.run_id} == {"1"}
    duplicates = DuplicatesDetector(rules(delivery_deadline_s=1.0), state())
    found = duplicates.consume(spans, NOW)
    assert found + tick_through(duplicates, NOW, NOW + int((MAX_EMISSION_HOLD_S + 10) * S)) == []


RETRYING_BACKEND = EXECUTOR_BACKEND + '''

class FlakyEngine(Engine):
    attempts = 0

    async def execute_agent(self, context):
        FlakyEngine.attempts += 1
        self.emitter.notify_agent_started(context.run_id)
        if FlakyEngine.attempts == 1:
            raise TimeoutError("the model did not answer")
'''


def test_a_run_retried_after_its_execution_raised_is_not_a_duplicate(tmp_path, monkeypatch):
    # the route retries the run once its engine raised (found by review:
    # /tmp/s27_dup/repro_retry_after_failure.py: duplicate.execution, 'executed twice')
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_retry", RETRYING_BACKEND,
                              EXECUTOR_PATHMAP.replace("{module}.Engine]", "{module}.FlakyEngine]")
                              ) as (module, exporter):
        app = FastAPI()

        @app.post("/run")
        async def run(user: str) -> None:
            context = module.Context(user, "run-1")
            for attempt in (1, 2):
                try:
                    return await module.FlakyEngine(user).execute_agent(context)
                except TimeoutError:
                    await asyncio.sleep(0.01)  # backoff

        with TestClient(app) as client:
            client.post("/run?user=alice", headers={"x-user-id": "alice"})
        spans = decoded(exporter)
    executes = [span for span in spans if span.kind == "execute"]
    assert [span.error for span in executes] == [True, False]
    assert len([span for span in spans if span.kind == "emit"]) == 2
    duplicates = DuplicatesDetector(rules(delivery_deadline_s=1.0), state())
    found = duplicates.consume(spans, NOW)
    assert found + tick_through(duplicates, NOW, NOW + int((MAX_EMISSION_HOLD_S + 10) * S)) == []


CONCURRENT_BACKEND = EXECUTOR_BACKEND + '''

class QuickEngine(Engine):
    async def execute_agent(self, context):
        self.emitter.notify_agent_started(context.run_id)   # in its own call
        await asyncio.sleep(0.05)


class SlowEngine(Engine):
    tracer = None   # a foreign span between the execution and its emit (an LLM client's)

    async def execute_agent(self, context):
        await asyncio.sleep(0.01)   # starts its copy within the quick engine's execution
        with SlowEngine.tracer.start_as_current_span("llm.call"):
            self.emitter.notify_agent_started(context.run_id)
        await asyncio.sleep(0.1)
'''


def test_two_engines_executing_a_run_at_once_in_one_trace_are_one_duplicate_execution(tmp_path,
                                                                                      monkeypatch):
    # the second engine's copy of agent_started started within the first engine's execution, in
    # the same trace; its execute span came 2.5 s after the first one's, past the hold (1 s): the
    # copy was judged the first execution's second one, a false duplicate.emission besides the
    # duplicate.execution (/tmp/s31_dupcover). Each emit names its execution now
    pathmap = EXECUTOR_PATHMAP.replace("[{module}.Engine]", "[{module}.QuickEngine, {module}.SlowEngine]")
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_concurrent", CONCURRENT_BACKEND,
                              pathmap) as (module, exporter):
        from opentelemetry.sdk.trace import TracerProvider

        module.SlowEngine.tracer = TracerProvider().get_tracer("llm-client")
        app = FastAPI()

        @app.post("/run")
        async def run(user: str) -> None:
            context = module.Context(user, "run-1")
            await asyncio.gather(module.QuickEngine(user).execute_agent(context),
                                 module.SlowEngine(user).execute_agent(context))

        with TestClient(app) as client:
            client.post("/run?user=alice", headers={"x-user-id": "alice"})
        spans = decoded(exporter)
    executes = {span.implementation.rsplit(".", 1)[1]: span for span in spans if span.kind == "execute"}
    quick, slow = executes["QuickEngine"], executes["SlowEngine"]
    emits = [span for span in spans if span.kind == "emit"]
    assert sorted(span.execution_span_id for span in emits) == sorted([quick.span_id, slow.span_id])
    late = next(span for span in emits if span.execution_span_id == slow.span_id)
    assert late.parent_span_id != slow.span_id  # made deeper: the llm span between
    assert quick.start_ns <= late.start_ns <= quick.end_ns and quick.trace_id == late.trace_id
    # (the route reaching two engines is an entry_point_paths finding too: not this test's)
    duplicates = DuplicatesDetector(rules(delivery_deadline_s=1.0,
                                          disabled=(DUPLICATE_ENTRY_POINT_PATHS,)), state())
    found = duplicates.consume([span for span in spans if span is not slow], NOW)
    found += tick_through(duplicates, NOW, NOW + int(2.5 * S))
    found += duplicates.consume([slow], NOW + int(2.5 * S))
    found += tick_through(duplicates, NOW + int(2.5 * S), NOW + int((MAX_EMISSION_HOLD_S + 10) * S))
    assert [finding.rule for finding in found] == [DUPLICATE_EXECUTION]


NOTIFIER_BACKEND = """\
class Manager:
    def __init__(self):
        self.sockets = {}

    async def send_to_user(self, user_id, message):
        for websocket in self.sockets.get(user_id, []):
            await websocket.send_json(message)
        # no success value: S6's bridge takes None for "unknown" and sends again


class Bridge:
    def __init__(self, manager, tries):
        self.manager, self.tries = manager, tries

    async def notify_tool_completed(self, run_id, user_id):
        for _ in range(self.tries):
            await self.manager.send_to_user(user_id, {"type": "tool_completed", "run_id": run_id})


class Notifier:
    def __init__(self, bridge, calls):
        self.bridge, self.calls = bridge, calls

    async def notify_tool_completed(self, run_id, user_id):
        for _ in range(self.calls):
            await self.bridge.notify_tool_completed(run_id, user_id)
"""
NOTIFIER_PATHMAP = PATHMAP.replace("implementations: [{module}.Emitter]",
                                   "implementations: [{module}.Bridge, {module}.Notifier]\n"
                                   "    canonical: {module}.Bridge")


def test_an_event_re_sent_below_a_notifier_names_the_class_that_re_sent_it(tmp_path, monkeypatch):
    """S6 through a notifier that only delegates: the bridge, nested in its call, re-sends the event
    (three writes to one socket, each in its own dispatch) -- the bridge is named, not the notifier
    (was). A notifier calling the bridge three times for one event is named itself."""
    assert NOTIFIER_PATHMAP != PATHMAP
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_notifier", NOTIFIER_BACKEND,
                              NOTIFIER_PATHMAP) as (module, exporter):
        manager = module.Manager()
        app = FastAPI()

        @app.websocket("/ws")
        async def tab(websocket: WebSocket) -> None:
            await websocket.accept()
            manager.sockets.setdefault("alice", []).append(websocket)
            await websocket.send_json({"type": "ready"})
            await websocket.receive_text()

        @app.post("/run/{tries}/{calls}")
        async def run(tries: int, calls: int) -> None:
            notifier = module.Notifier(module.Bridge(manager, tries), calls)
            await notifier.notify_tool_completed(f"run-{tries}-{calls}", "alice")

        found = {}
        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as socket:
                assert socket.receive_json()["type"] == "ready"
                for tries, calls in ((3, 1), (1, 3)):
                    exporter.clear()
                    client.post(f"/run/{tries}/{calls}")
                    assert [socket.receive_json()["type"] for _ in range(3)] == ["tool_completed"] * 3
                    spans = decoded(exporter)
                    assert len({span.event_id for span in spans if span.kind == "deliver"}) == 1
                    duplicates = DuplicatesDetector(rules(delivery_deadline_s=2.0), state())
                    found[tries, calls] = (duplicates.consume(spans, NOW)
                                           + duplicates.tick(NOW + 60 * S))
                socket.send_text("bye")
    [bridge_re_sent] = found[3, 1]
    [notifier_re_sent] = found[1, 3]
    assert (bridge_re_sent.rule, bridge_re_sent.implementation, bridge_re_sent.entry_point) == (
        DUPLICATE_EMISSION, "pw_duplicates_notifier.Bridge", "/run/{tries}/{calls}")
    assert (notifier_re_sent.rule, notifier_re_sent.implementation) == (
        DUPLICATE_EMISSION, "pw_duplicates_notifier.Notifier")


STREAMING_BACKEND = EXECUTOR_BACKEND + '''

class StreamingEngine(Engine):
    async def execute_agent(self, context):   # an async generator: its span covers the iteration
        self.emitter.notify_agent_started(context.run_id)
        for chunk in range(5):
            yield chunk
'''


def test_a_run_retried_after_its_streaming_execution_was_cancelled_is_not_a_duplicate(tmp_path,
                                                                                     monkeypatch):
    """The route streams the engine's chunks to its client with a timeout; the first attempt's
    task is cancelled while it waits between two chunks (the generator, closed then, ends OK with
    pathwatch.cancelled), and the run is started again: a retry, as for an engine that raised."""
    with instrumented_backend(tmp_path, monkeypatch, "pw_duplicates_stream_retry", STREAMING_BACKEND,
                              EXECUTOR_PATHMAP.replace("{module}.Engine]", "{module}.StreamingEngine]")
                              ) as (module, exporter):
        app = FastAPI()

        async def stream(user, context, pause_s):
            async with contextlib.aclosing(module.StreamingEngine(user).execute_agent(context)) as chunks:
                async for _chunk in chunks:
                    await asyncio.sleep(pause_s)   # a slow client between two chunks

        @app.post("/run")
        async def run(user: str) -> None:
            context = module.Context(user, "run-1")
            # the first attempt's pause outlasts its timeout (the generator's steps never await:
            # the cancellation lands between two), the retry's has room to spare
            for pause_s, timeout_s in ((1.0, 0.05), (0.0, 30.0)):
                try:
                    return await asyncio.wait_for(stream(user, context, pause_s), timeout=timeout_s)
                except TimeoutError:
                    await asyncio.sleep(0.01)  # backoff

        with TestClient(app) as client:
            client.post("/run?user=alice", headers={"x-user-id": "alice"})
        spans = decoded(exporter)
    executes = [span for span in spans if span.kind == "execute"]
    assert [(span.cancelled, span.error) for span in executes] == [(True, False), (False, False)]
    duplicates = DuplicatesDetector(rules(delivery_deadline_s=1.0), state())
    found = duplicates.consume(spans, NOW)
    assert found + tick_through(duplicates, NOW, NOW + int((MAX_EMISSION_HOLD_S + 10) * S)) == []
