"""Delivery spans: one per socket write, outcome, event from the message, link to the emit."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import textwrap

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from instrumentation.linking import (MAX_CONNECTIONS_PER_EMIT, MAX_EMITS, MAX_RECIPIENTS_PER_FAN_OUT,
                                     DispatchCounter, PendingEmits, connection_opened, count_write,
                                     fan_out_sent, in_fan_out, socket_closed, socket_open)
from tests.instrumentation.helpers import (attrs, nested_too_deep_for_json, only_span, pseudonym,
                                          spans_named, spans_of_kind)
from tests.instrumentation.sample.app import build_app


def run_socket(user: str, *messages: dict, replies: int) -> list[dict]:
    """Open a real socket to the sample app, send ``messages``, wait for ``replies`` frames."""
    app, _ = build_app()
    received = []
    with TestClient(app) as client:
        with client.websocket_connect(f"/ws?user_id={user}") as ws:
            for message in messages:
                ws.send_json(message)
            for _ in range(replies):
                received.append(ws.receive())
    return received


def delivers(exporter, event_type: str | None = None) -> list[dict]:
    found = [attrs(s) for s in spans_of_kind(exporter, "deliver")]
    return [a for a in found if event_type is None or a.get("pathwatch.event.type") == event_type]


def test_write_inside_emit_is_linked_by_context(instrumented, exporter):
    run_socket("alice", {"type": "run", "run_id": "r1"}, replies=3)
    emit = attrs(only_span(exporter, "event_emitter.notify_agent_started"))
    (write,) = delivers(exporter, "agent_started")
    assert write["pathwatch.delivery.link"] == "context"
    assert write["messaging.message.id"] == emit["messaging.message.id"]
    assert write["pathwatch.run.id"] == "r1"
    assert write["messaging.operation.type"] == "send"
    assert write["pathwatch.delivery.outcome"] == "written"
    assert write["pathwatch.role"] == "transport"
    assert write["code.function.name"] == "starlette.websockets.WebSocket.send_json"
    assert write["pathwatch.connection.user"] == pseudonym("alice")


def test_write_from_a_queue_consumer_task_is_linked_by_message_key(instrumented, exporter):
    run_socket("alice", {"type": "queued", "run_id": "rq"}, replies=3)
    emits = [attrs(s) for s in spans_named(exporter, "event_emitter.notify_tool_executing")]
    writes = delivers(exporter, "tool_executing")
    assert len(emits) == len(writes) == 2
    assert [w["pathwatch.delivery.link"] for w in writes] == ["message_key", "message_key"]
    # queues deliver in order: the oldest unmatched emit with the key is the one written
    assert [w["messaging.message.id"] for w in writes] == [e["messaging.message.id"] for e in emits]


@pytest.mark.parametrize("encode", [
    lambda text: memoryview(text.encode()),  # the bytes of a buffer the app reuses
    lambda text: memoryview(text.encode()).cast("B", (1, len(text))),  # a 2-d view of them
    lambda text: text.encode("utf-16"),  # a client's UTF-16, with its byte order mark
    lambda text: text.encode("utf-16-be"),
    lambda text: text.encode("utf-8-sig"),
], ids=["memoryview", "memoryview_2d", "utf_16", "utf_16_be", "utf_8_bom"])
def test_a_queued_write_of_json_bytes_in_any_form_json_reads_is_linked_by_its_key(
        instrumented, exporter, encode):
    # a memoryview was read as an object (no event), bytes in UTF-16 or after a BOM as no JSON,
    # though json.loads reads them: the write was unlinked, its emit reported undelivered
    from tests.instrumentation.sample.emitters import QueuedEmitter

    app = FastAPI()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        emitter = QueuedEmitter("alice")
        emitter.notify_tool_executing("r-bytes", "search")

        async def flush() -> None:
            await websocket.send_bytes(encode(json.dumps(await emitter.queue.get())))

        await asyncio.get_running_loop().create_task(flush())
        await websocket.receive_text()

    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as ws:
            assert ws.receive_bytes()
            ws.send_text("bye")
    emit = attrs(only_span(exporter, "event_emitter.notify_tool_executing"))
    (write,) = delivers(exporter)
    assert (write["pathwatch.event.type"], write["pathwatch.run.id"]) == ("tool_executing", "r-bytes")
    assert write["pathwatch.delivery.link"] == "message_key"
    assert write["messaging.message.id"] == emit["messaging.message.id"]


def test_message_carrying_its_own_event_id_wins(instrumented, exporter):
    run_socket("alice", {"type": "run", "run_id": "r1", "event_id": "evt-own"}, replies=3)
    (write,) = delivers(exporter, "agent_completed")
    assert write["messaging.message.id"] == "evt-own"
    assert write["pathwatch.delivery.link"] == "message_key"


def test_unrelated_write_is_not_linked(instrumented, exporter):
    run_socket("alice", {"type": "ping", "run_id": "r0"}, replies=1)
    (ack,) = delivers(exporter, "ack")
    assert ack["pathwatch.delivery.link"] == "none" and "messaging.message.id" not in ack


def test_every_send_method_is_one_write(instrumented, exporter):
    run_socket("alice", {"type": "raw", "run_id": "r5"}, replies=4)
    names = sorted(s.name for s in spans_of_kind(exporter, "deliver"))
    assert names == ["websocket.send", "websocket.send_bytes", "websocket.send_json", "websocket.send_text"]
    text = attrs(only_span(exporter, "websocket.send_text"))
    assert (text["pathwatch.event.type"], text["pathwatch.run.id"]) == ("raw_text", "r5")
    assert "pathwatch.event.type" not in attrs(only_span(exporter, "websocket.send_bytes"))
    # accept and close go through WebSocket.send too, but are not writes
    assert all(s.name.startswith("websocket.") for s in spans_of_kind(exporter, "deliver"))


def test_dispatch_counts_writes_and_reports_no_connection(instrumented, exporter):
    run_socket("alice", {"type": "run", "run_id": "r1"}, {"type": "dispatch_nobody", "run_id": "r1"},
               replies=4)
    dispatches = [attrs(s) for s in spans_named(exporter, "socket_manager.send_to_user")]
    by_type = {d["pathwatch.event.type"]: d for d in dispatches}
    assert by_type["agent_started"]["pathwatch.dispatch.writes"] == 1
    assert by_type["agent_started"]["pathwatch.delivery.outcome"] == "written"
    assert by_type["agent_started"]["pathwatch.user.target"] == pseudonym("alice")
    assert by_type["agent_thinking"]["pathwatch.dispatch.writes"] == 0
    assert by_type["agent_thinking"]["pathwatch.delivery.outcome"] == "no_connection"
    assert by_type["agent_thinking"]["pathwatch.user.target"] == pseudonym("nobody")


def test_send_on_a_closed_socket_is_outcome_closed(instrumented, exporter):
    app, _ = build_app()
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as ws:
            ws.send_json({"type": "close_then_send", "run_id": "rc"})
            ws.receive()  # the close frame
    (late,) = delivers(exporter, "late")
    assert late["pathwatch.delivery.outcome"] == "closed"
    assert not only_span(exporter, "websocket.send_json").status.is_ok


def test_a_raising_send_is_outcome_failed_and_the_error_reaches_the_app(instrumented, exporter):
    from starlette.websockets import WebSocket

    async def broken_send(message):
        raise ValueError("transport exploded")

    async def receive():
        return {"type": "websocket.connect"}

    async def scenario():
        websocket = WebSocket({"type": "websocket", "path": "/x", "headers": []}, receive, broken_send)
        websocket.application_state = websocket.application_state.__class__.CONNECTED
        try:
            await websocket.send_json({"type": "agent_error", "run_id": "rf"})
        except ValueError as exc:
            return exc

    error = asyncio.run(scenario())
    assert isinstance(error, ValueError) and str(error) == "transport exploded"
    (write,) = delivers(exporter, "agent_error")
    assert write["pathwatch.delivery.outcome"] == "failed"
    assert write["pathwatch.connection.id"]  # made up: no middleware saw this socket


def blocked_socket(release: asyncio.Event, entered: asyncio.Event | None = None):
    """A Starlette WebSocket, connected, whose sends wait for ``release`` (a slow client); each send
    sets ``entered`` first, so that a test waits for the write to be under way, not a fixed time."""
    from starlette.websockets import WebSocket

    async def send(message):
        if entered is not None:
            entered.set()
        await release.wait()

    async def receive():
        return {"type": "websocket.connect"}

    websocket = WebSocket({"type": "websocket", "path": "/x", "headers": []}, receive, send)
    websocket.application_state = websocket.application_state.__class__.CONNECTED
    return websocket


def test_a_send_cancelled_with_its_task_is_outcome_cancelled_not_failed(instrumented, exporter):
    """A run cancelled by its user (task.cancel()) while a write of it awaits the socket: nothing
    failed, the app stopped it (/tmp/s29_soakB/repro_cancel_dispatch.py). It was ``failed``: a
    delivery.write_failed on every such cancellation. The CancelledError still reaches the app."""
    async def scenario():
        entered = asyncio.Event()
        websocket = blocked_socket(asyncio.Event(), entered)
        task = asyncio.create_task(websocket.send_json({"type": "token", "run_id": "rk"}))
        await asyncio.wait_for(entered.wait(), 10)  # the write awaits the socket
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task

    assert asyncio.run(scenario()).cancelled()
    (write,) = delivers(exporter, "token")
    assert write["pathwatch.delivery.outcome"] == "cancelled"
    assert not only_span(exporter, "websocket.send_json").status.is_ok


def test_a_write_the_app_forgets_to_await_or_calls_wrongly_reads_as_starlettes_own(instrumented,
                                                                                  exporter):
    import gc
    import warnings

    from starlette.websockets import WebSocket

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        pass

    websocket = WebSocket({"type": "websocket", "path": "/x", "headers": []}, receive, send)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        websocket.send_json({"type": "agent_error", "run_id": "rf"})  # a missing await
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        "coroutine 'WebSocket.send_json' was never awaited"]  # '_traced_send' before
    with pytest.raises(TypeError, match="data"):
        websocket.send_text()  # raised only when awaited before
    assert not delivers(exporter)


def test_pending_emit_table_counts_the_unmatched_emits_it_forgets():
    table = PendingEmits(max_emits=3, per_key=3)
    table.record("run-w", "agent_started", "w")
    assert table.match("run-w", "agent_started") == "w"  # written: nothing to forget
    for index in range(3):  # the fourth emit forgets run-w's, matched
        table.record("run-a", "tool_executing", f"a{index}")
    assert table.evicted == 0 and len(table) == 3
    for index in range(3, 5):  # two more with one key of three: a0 and a1 are dropped unmatched
        table.record("run-a", "tool_executing", f"a{index}")
    assert table.evicted == 2
    table.record("run-b", "agent_started", "b0")  # forgets run-a's oldest, a2, unmatched
    assert table.evicted == 3 and len(table) == 3
    assert table.match("run-a", "tool_executing") == "a3"


def test_pending_emit_table_is_bounded_and_resends_link_to_the_newest():
    table = PendingEmits(max_emits=3, per_key=2)
    for index in range(5):
        table.record(f"run-{index}", "agent_started", f"e{index}")
    assert len(table) == 3 and table.evicted == 2
    assert table.match("run-0", "agent_started") is None
    table.record("run-4", "agent_started", "e4b")
    table.record("run-4", "agent_started", "e4c")  # per-key bound drops e4
    assert table.match("run-4", "agent_started") == "e4b"
    assert table.match("run-4", "agent_started") == "e4c"
    assert table.match("run-4", "agent_started") == "e4c"  # all matched: a re-send of the newest


def test_a_stream_queued_for_a_slow_socket_links_every_write_to_its_own_emit():
    """A run streams 100 token events (one key: run id + type), each queued for the user's only
    socket by a dispatch that writes nothing itself; the socket's writer task trails (a slow
    client, a burst). Beyond the 32 emits a key held, the oldest were forgotten: their writes took
    later emits, and the dispatches found no write of theirs (real stack: 115 false
    delivery.no_connection and 2 duplicate.emission over two such runs,
    /tmp/s29_soakB/repro_token_burst.py). A key queued for keeps the backlog of a slow socket."""
    table = PendingEmits()
    opened = connection_opened()
    for index in range(100):
        table.record("run-s", "token", f"t{index}", "alice")
        table.sent("run-s", "token", f"t{index}", content=index)  # queued, nothing written yet
    assert table.evicted == 0
    found = [table.match("run-s", "token", "c-slow", opened, content=index, user="alice")
             for index in range(100)]
    assert found == [f"t{index}" for index in range(100)]


def test_a_stream_written_inline_to_one_tab_and_queued_for_another_gives_the_slow_tab_its_copies():
    """Parallel branches of one run stream tokens (one key) to a user with two tabs: one written
    inline in the emit (linked by context), one by a writer task trailing it by 60 events. Its
    writes are copies of emits the first tab had: beyond 32 a key, the oldest were forgotten, so
    its writes took other emits, then the newest again and again (real stack: 20 false
    duplicate.emission in 30 runs, /tmp/s29_soakB/repro_parallel_tokens.py)."""
    table = PendingEmits()
    opened = connection_opened()
    copies = []
    for index in range(200):
        table.record("run-p", "token", f"t{index}", "alice")
        table.mark("run-p", "token", f"t{index}", "c-inline", content=index, user="alice")
        if index >= 60:  # the writer task, 60 events behind
            copies.append(table.match("run-p", "token", "c-slow", opened, content=index - 60, user="alice"))
    copies += [table.match("run-p", "token", "c-slow", opened, content=index, user="alice")
               for index in range(140, 200)]
    assert copies == [f"t{index}" for index in range(200)]


@pytest.mark.parametrize("seed", range(20))
def test_a_keys_index_by_content_links_every_write_as_walking_its_emits_does(seed, monkeypatch):
    """The lookups by key read a key's index by content once it holds more than a few emits, and
    start at its oldest unfound emit: a random mix of emits (two users, repeated messages), inline writes, queueing dispatches and
    writes by key on five sockets (one opened late) links every write as walking the emits does."""
    import random

    import instrumentation.linking as linking

    walk_from_the_front = linking._Emits.first_unfound

    def play(indexed_from: int) -> list:
        monkeypatch.setattr(linking, "_INDEXED_FROM", indexed_from)
        if indexed_from:  # the walk: every emit looked at, from the oldest
            monkeypatch.setattr(linking._Emits, "first_unfound", lambda emits: 0)
        else:
            monkeypatch.setattr(linking._Emits, "first_unfound", walk_from_the_front)
        rng = random.Random(seed)
        table, found, made = PendingEmits(per_key=40), [], 0
        sockets = [(f"c{n}", connection_opened()) for n in range(4)]
        for step in range(400):
            if step == 200:
                sockets.append(("c-late", connection_opened()))
            action = rng.random()
            if action < 0.35 or not made:
                table.record("r", "token", f"e{made}", rng.choice(["alice", "alice", "bob"]))
                made += 1
            elif action < 0.55:
                conn, _ = rng.choice(sockets)
                found.append(table.mark("r", "token", f"e{rng.randrange(made)}", conn,
                                        content=rng.randrange(12), user=rng.choice(["alice", None])))
            elif action < 0.6:
                table.sent("r", "token", f"e{rng.randrange(made)}", rng.randrange(12))
            else:
                conn, opened = rng.choice(sockets)
                found.append(table.linked("r", "token", conn, opened, rng.randrange(12),
                                          rng.choice(["alice", "bob", None])))
        return found

    assert play(0) == play(10**9)


def test_writes_by_key_give_each_open_socket_of_a_user_every_emit_once():
    # two tabs fed by one queue: the oldest emit nothing had found went to the second tab, which
    # then got the newest again (a false duplicate.emission)
    table = PendingEmits()
    tabs = {"tab-1": connection_opened(), "tab-2": connection_opened()}
    for event_id in ("e1", "e2"):
        table.record("run-1", "agent_thinking", event_id)
    order = ("tab-1", "tab-1", "tab-2", "tab-2")  # the queue writes to one tab, then the other
    assert [table.match("run-1", "agent_thinking", tab, tabs[tab]) for tab in order] == [
        "e1", "e2", "e1", "e2"]
    assert table.match("run-1", "agent_thinking", "tab-1", tabs["tab-1"]) == "e2"  # a re-send
    table.record("run-1", "agent_thinking", "e3")
    assert table.match("run-1", "agent_thinking") == "e3"  # no socket (a dispatch): nothing found it
    assert table.match("run-1", "agent_thinking", "tab-2", tabs["tab-2"]) == "e3"
    # each event to both tabs in turn: the second tab's copies take the ids in another order,
    # but each tab has each event once (no duplicate write, none missing)
    table = PendingEmits()
    for event_id in ("e1", "e2"):
        table.record("run-2", "agent_thinking", event_id)
    order = ("tab-1", "tab-2", "tab-1", "tab-2")
    got = [(tab, table.match("run-2", "agent_thinking", tab, tabs[tab])) for tab in order]
    assert sorted(got) == [("tab-1", "e1"), ("tab-1", "e2"), ("tab-2", "e1"), ("tab-2", "e2")]


def test_a_run_moved_to_the_users_other_open_socket_takes_its_own_events():
    # the app sends the first events to the laptop, the later ones to the phone, both open all
    # along: the phone took the laptop's e1 and e2 (found by review: two false no_connection)
    table = PendingEmits()
    laptop, phone = connection_opened(), connection_opened()
    for event_id in ("e1", "e2"):
        table.record("run-1", "agent_thinking", event_id)
    assert [table.match("run-1", "agent_thinking", "laptop", laptop) for _ in range(2)] == [
        "e1", "e2"]
    for event_id in ("e3", "e4"):
        table.record("run-1", "agent_thinking", event_id)
    assert [table.match("run-1", "agent_thinking", "phone", phone) for _ in range(2)] == [
        "e3", "e4"]


def test_a_copy_of_a_written_message_takes_the_emit_it_was_written_for():
    # each event to both tabs in turn: tab 2's copy of e1 took e2 (the oldest nothing had found),
    # so a backend stopping before e2 was written anywhere left e2 found (never reported), and the
    # copies' delivery latency was read against the other event
    table = PendingEmits()
    tabs = {"tab-1": connection_opened(), "tab-2": connection_opened()}
    for event_id in ("e1", "e2", "e3"):
        table.record("run-1", "agent_thinking", event_id)
    message = {"e1": 101, "e2": 102, "e3": 103}  # content_key of each event's message
    for event_id, tab in (("e1", "tab-1"), ("e1", "tab-2"), ("e2", "tab-1"), ("e2", "tab-2")):
        assert table.match("run-1", "agent_thinking", tab, tabs[tab], message[event_id]) == event_id
    assert table.match("run-1", "agent_thinking") == "e3"  # nothing found e3: still waiting
    # the lagging tab first, the other after: the same
    assert table.match("run-1", "agent_thinking", "tab-2", tabs["tab-2"], message["e3"]) == "e3"
    assert table.match("run-1", "agent_thinking", "tab-1", tabs["tab-1"], message["e3"]) == "e3"
    # one tab sent a message again: no other emit's copy (it had e1), the newest as before
    assert table.match("run-1", "agent_thinking", "tab-1", tabs["tab-1"], message["e1"]) == "e3"


def test_a_written_message_replayed_to_a_new_tab_takes_its_emit_while_the_first_tab_is_open():
    # the app sends a new tab the events the user's open tab had: the replay of e1 took e2, which
    # was waiting, and e2's write to the new tab was then e2 a second time (a false
    # duplicate.emission, reproducer /tmp/s27_link/test_link_repro.py)
    table = PendingEmits()
    first = connection_opened()
    socket_open("tab-1")
    try:
        table.record("run-1", "agent_thinking", "e1")
        assert table.match("run-1", "agent_thinking", "tab-1", first, 101) == "e1"
        table.record("run-1", "agent_thinking", "e2")  # not written yet
        new = connection_opened()
        assert table.match("run-1", "agent_thinking", "tab-2", new, 101) == "e1"  # the replay
        assert table.match("run-1", "agent_thinking", "tab-1", first, 102) == "e2"
        assert table.match("run-1", "agent_thinking", "tab-2", new, 102) == "e2"
    finally:
        socket_closed("tab-1")
    # the same writes with the first socket closed are a reconnect: the new socket gets what was
    # queued while away (e2), whatever its message, never the old socket's e1 again
    table = PendingEmits()
    old = connection_opened()
    table.record("run-1", "agent_thinking", "e1")
    assert table.match("run-1", "agent_thinking", "old", old, 101) == "e1"
    table.record("run-1", "agent_thinking", "e2")
    new = connection_opened()
    assert table.match("run-1", "agent_thinking", "new", new, 101) == "e2"


def test_a_history_replayed_while_an_event_queued_with_another_message_waits_is_the_copy():
    # e1 went to the old socket; e2, queued while away, waits; the new socket is sent the history
    # (e1's message): it took e2, the oldest nothing had found, and e2's own write was then e2 a
    # second time (a false duplicate.emission, reproducer /tmp/s28_linking/test_repro_case34.py).
    # The dispatch that queued e2 named its message: another message copying e1 is the replay
    table = PendingEmits()
    old = connection_opened()
    table.record("run-1", "agent_thinking", "e1")
    assert table.match("run-1", "agent_thinking", "old", old, 101) == "e1"
    table.record("run-1", "agent_thinking", "e2")
    table.sent("run-1", "agent_thinking", "e2", 102)
    table.sent("run-1", "agent_thinking", "e2", 109)  # the first message named stays
    table.sent("run-1", "agent_thinking", "nope", 103)  # an emit not remembered: nothing
    new = connection_opened()
    assert table.match("run-1", "agent_thinking", "new", new, 101) == "e1"  # the replay
    assert table.match("run-1", "agent_thinking", "new", new, 102) == "e2"
    # e3 queued with the very message e1 had (a repeated progress message): e3, as before
    table.record("run-1", "agent_thinking", "e3")
    table.sent("run-1", "agent_thinking", "e3", 101)
    assert table.match("run-1", "agent_thinking", "newer", connection_opened(), 101) == "e3"
    # queued with another message, and the write copies no emit: e4 still (a message the writer
    # changed, a per-socket sequence number)
    table.record("run-1", "agent_thinking", "e4")
    table.sent("run-1", "agent_thinking", "e4", 104)
    assert table.match("run-1", "agent_thinking", "newest", connection_opened(), 105) == "e4"


def test_a_history_replayed_to_a_reconnected_socket_takes_the_emits_it_copies():
    # the user's only socket had e1 and e2, closed, and the app sent the new socket the run's
    # history: every emit found, the new socket opened after them, the old one closed, so each
    # replay took the newest, e2 -- 'written 2 times to the same socket', a false
    # duplicate.emission (reproducer /tmp/s27_rev2/test_reconnect_replay_repro.py)
    table = PendingEmits()
    old = connection_opened()
    socket_open("old")
    for event_id, content in (("e1", 101), ("e2", 102)):
        table.record("run-1", "agent_thinking", event_id)
        assert table.match("run-1", "agent_thinking", "old", old, content) == event_id
    socket_closed("old")
    new = connection_opened()
    assert [table.match("run-1", "agent_thinking", "new", new, content)
            for content in (101, 102)] == ["e1", "e2"]
    # sent again to the new socket, or a message no emit was written with: the newest, as before
    assert table.match("run-1", "agent_thinking", "new", new, 101) == "e2"
    assert table.match("run-1", "agent_thinking", "new", new, 103) == "e2"
    # an event queued while away still goes first to the emit nothing found, whatever its message
    table.record("run-1", "agent_thinking", "e3")
    newer = connection_opened()
    assert table.match("run-1", "agent_thinking", "newer", newer, 101) == "e3"


def test_a_tab_opened_mid_run_takes_the_live_copy_of_a_repeated_message():
    # a message repeated within a run (" the" streamed twice): a tab that opened between them and
    # gets the second copy takes the emit it was open for, not the first one it never had
    table = PendingEmits()
    first = connection_opened()
    table.record("run-1", "token", "t1")
    assert table.match("run-1", "token", "tab-1", first, 7) == "t1"
    second = connection_opened()
    table.record("run-1", "token", "t2")
    assert table.match("run-1", "token", "tab-1", first, 7) == "t2"
    assert table.match("run-1", "token", "tab-2", second, 7) == "t2"


def test_a_socket_opened_after_an_emit_written_elsewhere_does_not_get_it_again():
    # a reconnect: e1 went to the old socket; the new one gets what was queued while away
    table = PendingEmits()
    old = connection_opened()
    table.record("run-1", "agent_thinking", "e1")
    assert table.match("run-1", "agent_thinking", "old", old) == "e1"
    table.record("run-1", "agent_thinking", "e2")  # the user is away
    new = connection_opened()
    assert table.match("run-1", "agent_thinking", "new", new) == "e2"
    # every emit found: a re-send on the new socket is not the old socket's e1 (it opened after it)
    assert table.match("run-1", "agent_thinking", "new", new) == "e2"
    # nothing found e3 yet: a socket that opened after it still gets it (a queue kept for a user)
    table.record("run-1", "agent_thinking", "e3")
    newer = connection_opened()
    assert table.match("run-1", "agent_thinking", "newer", newer) == "e3"
    # its opening not known (no middleware): as a dispatch, the oldest emit nothing found, else the newest
    assert table.match("run-1", "agent_thinking", "made-up") == "e3"


def test_two_users_runs_sharing_a_run_id_each_take_the_emit_addressed_to_their_socket():
    # clients numbering their runs from 1: alice's and bob's emits have one key; bob's queued write,
    # made first, took alice's emit (the oldest nothing had found) and alice's then took it again as
    # a copy, so bleed paged target_vs_socket_owner (critical) on clean traffic (reproducer
    # /tmp/s27_bleed/test_repro_shared_runid_queue.py)
    table = PendingEmits()
    alice, bob = connection_opened(), connection_opened()
    table.record("1", "agent_started", "ea", "u-alice")
    table.record("1", "agent_started", "eb", "u-bob")
    same = 101  # both messages read {"type": "agent_started", "run_id": "1"}
    assert table.match("1", "agent_started", "bob-1", bob, same, "u-bob") == "eb"
    assert table.match("1", "agent_started", "alice-1", alice, same, "u-alice") == "ea"
    # a re-send to alice's socket, every emit found: alice's newest, not bob's
    assert table.match("1", "agent_started", "alice-1", alice, same, "u-alice") == "ea"
    # a dispatch (no socket yet) addressed to bob takes bob's emit
    table.record("1", "agent_thinking", "ta", "u-alice")
    table.record("1", "agent_thinking", "tb", "u-bob")
    assert table.match("1", "agent_thinking", user="u-bob") == "tb"
    # no emit of the key addressed to the socket's user: another user's (a misrouted event, which
    # bleed reports), as before
    table.record("2", "agent_started", "e2", "u-alice")
    assert table.match("2", "agent_started", "bob-1", bob, 102, "u-bob") == "e2"
    # emits naming no target, or a socket whose user is not known: as before
    table.record("3", "agent_started", "e3")
    assert table.match("3", "agent_started", "bob-1", bob, 103, "u-bob") == "e3"
    table.record("4", "agent_started", "e4a", "u-alice")
    table.record("4", "agent_started", "e4b", "u-bob")
    assert table.match("4", "agent_started", "anon-1", bob, 104) == "e4a"


def test_an_emit_a_fan_out_sent_is_fanned_out_for_the_writes_that_find_it_later():
    table = PendingEmits()
    socket = connection_opened()
    table.record("r-1", "agent_thinking", "e1", "u-alice")
    table.record("r-1", "agent_thinking", "e2", "u-alice")
    table.fanned_out("r-1", "agent_thinking", "e1")
    table.fanned_out("r-1", "agent_thinking", "nope")  # an emit not remembered: nothing
    table.fanned_out(None, "agent_thinking", "e2")
    assert table.linked("r-1", "agent_thinking", "bob-1", socket, 101, "u-bob") == ("e1", True)
    assert table.linked("r-1", "agent_thinking", "bob-1", socket, 102, "u-bob") == ("e2", False)
    assert table.mark("r-1", "agent_thinking", "e1", "carol-1") is True
    assert table.mark("r-1", "agent_thinking", "e2", "carol-1") is False
    assert table.mark("r-9", "agent_thinking", "e1") is False
    assert table.linked("r-9", "agent_thinking") is None


def test_a_fan_outs_emit_is_fanned_out_only_to_the_users_its_nested_per_user_sends_named():
    """send_to_room -> send_to_user(member) -> the member's queue, each socket's writer writing
    later: a write to a socket of a user no per-user send named (a stale map putting bob's copy on
    carol's queue) is no fan-out's write, and is judged against the emit's target. Marked fan-out
    before, it was never judged."""
    table = PendingEmits()
    table.record("r-1", "agent_thinking", "e1", "u-alice")
    table.fanned_out("r-1", "agent_thinking", "e1")
    for member in ("u-alice", "u-bob", "u-bob"):
        table.add_recipient("r-1", "agent_thinking", "e1", member)
    table.add_recipient("r-1", "agent_thinking", "nope", "u-dave")  # not remembered: nothing
    assert table.linked("r-1", "agent_thinking", "alice-1", connection_opened(), 1, "u-alice") == ("e1", True)
    assert table.linked("r-1", "agent_thinking", "carol-1", connection_opened(), 1, "u-carol") == ("e1", False)
    assert table.linked("r-1", "agent_thinking", "bob-1", connection_opened(), 1, "u-bob") == ("e1", True)
    assert table.mark("r-1", "agent_thinking", "e1", "carol-2", user="u-carol") is False
    assert table.mark("r-1", "agent_thinking", "e1", "bob-2", user="u-bob") is True
    assert table.mark("r-1", "agent_thinking", "e1", "x-1") is True  # the socket's user not known
    # a per-user send naming no one: any socket may have it
    table.add_recipient("r-1", "agent_thinking", "e1", None)
    assert table.mark("r-1", "agent_thinking", "e1", "carol-3", user="u-carol") is True
    # more recipients than remembered: any socket
    table.record("r-2", "agent_thinking", "e2", "u-alice")
    table.fanned_out("r-2", "agent_thinking", "e2")
    for n in range(MAX_RECIPIENTS_PER_FAN_OUT):
        table.add_recipient("r-2", "agent_thinking", "e2", f"u-{n}")
    assert table.mark("r-2", "agent_thinking", "e2", "carol-4", user="u-carol") is False
    table.add_recipient("r-2", "agent_thinking", "e2", "u-one-more")
    assert table.mark("r-2", "agent_thinking", "e2", "carol-4", user="u-carol") is True
    # a recipient named for an emit no fan-out sent changes nothing
    table.record("r-3", "agent_thinking", "e3", "u-alice")
    table.add_recipient("r-3", "agent_thinking", "e3", "u-bob")
    assert table.mark("r-3", "agent_thinking", "e3", "bob-3", user="u-bob") is False


def test_a_fan_out_by_key_takes_no_emit_when_the_keys_unwritten_ones_are_for_several_users():
    """A fan-out made outside its emit (a pub/sub consumer's send_to_room) names no user: it took
    the oldest unwritten emit of the key whoever it was for — a stale one of dave (offline) — and
    bob's write of alice's event was a false bleed (reproducer
    /tmp/s27_rev3/repro_fan_out_by_key_takes_another_users_emit.py). Now it takes none; the write of
    its message on a socket of a user with an unwritten emit of the key takes that one as fanned
    out, a write of it on another user's socket before that is linked to none."""
    for first in ("u-alice", "u-bob"):
        table = PendingEmits()
        socket = connection_opened()
        table.record("1", "agent_thinking", "e-dave", "u-dave")
        table.record("1", "agent_thinking", "e-alice", "u-alice")
        assert table.fan_out_by_key("1", "agent_thinking", 11) is None
        got = {user: table.linked("1", "agent_thinking", f"{user}-1", socket, 11, user)
               for user in (first, *({"u-alice", "u-bob"} - {first}))}
        assert got["u-alice"] == ("e-alice", True)
        assert got["u-bob"] == (("e-alice", True) if first == "u-alice" else None)
        # dave's emit is still waiting, not fanned out: his write of another message is his own
        assert table.linked("1", "agent_thinking", "dave-1", socket, 12, "u-dave") == ("e-dave", False)
    # a message of other content, or on a socket of no known user, is not the fan-out's
    table = PendingEmits()
    table.record("1", "agent_thinking", "e-dave", "u-dave")
    table.record("1", "agent_thinking", "e-alice", "u-alice")
    table.fan_out_by_key("1", "agent_thinking", 11)
    assert table.linked("1", "agent_thinking", "x-1", connection_opened(), 11, None) is None
    assert table.linked("1", "agent_thinking", "alice-1", connection_opened(), 12, "u-alice") == ("e-alice", False)
    # one user's unwritten emits (or none): the oldest unwritten one, as before, marked fanned out
    table = PendingEmits()
    table.record("1", "agent_thinking", "e1", "u-alice")
    table.record("1", "agent_thinking", "e2", "u-alice")
    assert table.fan_out_by_key("1", "agent_thinking", 11) == ("e1", True)
    assert table.mark("1", "agent_thinking", "e1", "bob-1", user="u-bob") is True
    table.record("2", "agent_thinking", "e3")  # names no user
    assert table.fan_out_by_key("2", "agent_thinking", None) == ("e3", True)
    assert table.fan_out_by_key("9", "agent_thinking", 11) is None


def test_the_writes_of_a_fan_out_by_key_are_copies_of_its_emit_not_the_users_next_one():
    """The fan-out took e1 by key; alice's e2 was emitted before the members' writers wrote e1: with
    no message known for e1, their writes took e2 (the oldest nothing had found, not fanned out):
    a false bleed on bob's socket (reproducer /tmp/s28_linking/test_repro_case2.py). Now e1 has
    the fan-out's message, on the sockets open when it was sent (bob's opened after the emit)."""
    table = PendingEmits()
    alice = connection_opened()
    table.record("1", "agent_thinking", "e1", "u-alice")
    bob = connection_opened()
    assert table.fan_out_by_key("1", "agent_thinking", 11) == ("e1", True)
    table.record("1", "agent_thinking", "e2", "u-alice")
    assert table.linked("1", "agent_thinking", "bob-1", bob, 11, "u-bob") == ("e1", True)
    assert table.linked("1", "agent_thinking", "alice-1", alice, 11, "u-alice") == ("e1", True)
    assert table.fan_out_by_key("1", "agent_thinking", 12) == ("e2", True)
    assert table.linked("1", "agent_thinking", "alice-1", alice, 12, "u-alice") == ("e2", True)
    assert table.linked("1", "agent_thinking", "bob-1", bob, 12, "u-bob") == ("e2", True)


def test_a_write_found_by_context_or_id_counts_for_its_socket_or_every_one_when_unknown():
    table = PendingEmits()
    tabs = {"tab-1": connection_opened(), "tab-2": connection_opened()}
    for event_id in ("e1", "e2", "e3"):
        table.record("run-1", "tool_executing", event_id)
    table.mark("run-1", "tool_executing", "e1", "tab-1")  # written inside the emit, on tab 1
    assert table.match("run-1", "tool_executing", "tab-1", tabs["tab-1"]) == "e2"
    assert table.match("run-1", "tool_executing", "tab-1", tabs["tab-1"]) == "e3"
    assert table.match("run-1", "tool_executing", "tab-2", tabs["tab-2"]) == "e1"
    table.mark("run-1", "tool_executing", "e2")  # a deliver role's call: its socket not known
    assert table.match("run-1", "tool_executing", "tab-2", tabs["tab-2"]) == "e3"
    assert table.match("run-1", "tool_executing", "tab-2", tabs["tab-2"]) == "e3"  # the newest


def test_an_emit_remembers_a_bounded_number_of_sockets():
    table = PendingEmits()
    sockets = {f"tab-{n}": connection_opened() for n in range(MAX_CONNECTIONS_PER_EMIT + 2)}
    table.record("run-1", "agent_thinking", "e1")
    first = list(sockets)[:MAX_CONNECTIONS_PER_EMIT + 1]
    assert {table.match("run-1", "agent_thinking", tab, sockets[tab]) for tab in first} == {"e1"}
    table.record("run-1", "agent_thinking", "e2")
    assert table.match("run-1", "agent_thinking", "tab-0", sockets["tab-0"]) == "e2"
    # one socket too many: e1 counts as written to every socket, so the last one gets e2 first
    last = list(sockets)[-1]
    assert table.match("run-1", "agent_thinking", last, sockets[last]) == "e2"


def test_pending_emit_table_bounds_the_emits_in_all_not_the_keys():
    """Reproducer /tmp/s22/review_instr/probe7_pending_emits_memory.py: a bound of 65,536 keys of 32
    emits held 2 M emits, some 300 MiB, in every backend process of a streaming agent backend."""
    table = PendingEmits(max_emits=100, per_key=32)
    for run in range(50):
        for event_type in ("token", "agent_thinking"):
            for index in range(32):
                table.record(f"run-{run}", event_type, f"e{run}-{event_type}-{index}")
    assert len(table) == 100 and table.evicted == 50 * 2 * 32 - 100
    assert table.match("run-49", "token") == "e49-token-0"  # the most recent keys are whole
    assert table.match("run-47", "token") is None  # the oldest forgotten whole
    default = PendingEmits()  # the process's table: MAX_EMITS in all, whatever the keys
    for run in range(MAX_EMITS // 8 + 100):
        for index in range(8):
            default.record(f"run-{run}", "token", f"e{run}-{index}")
    assert len(default) == MAX_EMITS


def test_a_write_counts_for_every_dispatch_call_it_runs_inside_that_has_not_ended():
    outer = DispatchCounter(None)
    inner = DispatchCounter(outer)
    count_write(inner)
    inner.live = False
    count_write(inner)  # from a task the inner call started, written after it ended: the outer's only
    later = DispatchCounter(inner)  # a dispatch in that task: chained to the call still running
    assert later.outer is outer
    count_write(later)
    outer.live = False
    count_write(later)
    assert (inner.writes, outer.writes, later.writes) == (1, 3, 2)


def test_a_write_is_of_a_fan_out_while_a_fan_out_call_it_runs_inside_has_not_ended():
    room = DispatchCounter(None, fan_out=True)
    member = DispatchCounter(room)  # send_to_user per member, inside send_to_room
    assert in_fan_out(member) and in_fan_out(room) and not in_fan_out(None)
    assert not in_fan_out(DispatchCounter(None))
    room.live = False  # a task the room send started, writing after it returned: not its write
    assert not in_fan_out(member)


def test_a_dispatch_finds_the_emit_the_fan_out_it_runs_inside_sent():
    room = DispatchCounter(None, fan_out=True)
    room.fanned = ("r-1", "agent_thinking", "e1")
    member = DispatchCounter(room)
    assert fan_out_sent(member) == fan_out_sent(room) == ("r-1", "agent_thinking", "e1")
    assert fan_out_sent(DispatchCounter(None)) is None and fan_out_sent(None) is None
    room.live = False
    assert fan_out_sent(member) is None


def test_a_span_processor_failing_at_the_writes_end_does_not_fail_the_write(instrumented, provider):
    from opentelemetry.sdk.trace import SpanProcessor
    from starlette.websockets import WebSocket, WebSocketState

    from instrumentation.errors import errors

    class Broken(SpanProcessor):
        def on_end(self, span):
            raise RuntimeError("processor bug")

    provider.add_span_processor(Broken())
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "websocket.connect"}

    async def scenario():
        websocket = WebSocket({"type": "websocket", "path": "/x", "headers": []}, receive, send)
        websocket.application_state = websocket.client_state = WebSocketState.CONNECTED
        await websocket.send_json({"type": "hello"})

    before = errors.count
    asyncio.run(scenario())  # the app's write went out: it must not raise
    assert len(sent) == 1 and errors.count == before + 1


def test_a_task_started_inside_a_call_does_not_inherit_its_event_or_nesting(instrument, exporter,
                                                                           tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(textwrap.dedent("""
        version: 1
        roles:
          emitter:
            kind: emit
            implementations: [tests.instrumentation.sample.workers.FlushingEmitter]
            methods: ["notify_*"]
            event_type: [method.strip_prefix(notify_)]
            run_id: [arg.run_id]
            target: [arg.user_id]
          manager:
            kind: dispatch
            implementations: [tests.instrumentation.sample.workers.Manager]
            methods: [send_to_user]
            target: [arg.user_id]
            event_type: [arg.message.type]
            run_id: [arg.message.run_id]
          engine:
            kind: execute
            implementations: [tests.instrumentation.sample.workers.WorkerEngine,
                              tests.instrumentation.sample.workers.Step]
            methods: ["execute*"]
            run_id: [arg.run_id]
    """))
    instrument(pathmap)
    from tests.instrumentation.sample import workers

    async def scenario():
        emitter, engine = workers.FlushingEmitter(workers.Manager()), workers.WorkerEngine()
        for run_id in ("run-a", "run-b", "run-c"):
            await emitter.notify_step(run_id, "alice")
            await engine.execute(run_id)
        await emitter.queue.join()
        await engine.queue.join()
        emitter.task.cancel()
        engine.worker.cancel()

    asyncio.run(scenario())
    emits = {attrs(s)["pathwatch.run.id"]: attrs(s)["messaging.message.id"]
             for s in spans_named(exporter, "emitter.notify_step")}
    dispatches = {attrs(s)["pathwatch.run.id"]: attrs(s).get("messaging.message.id")
                  for s in spans_named(exporter, "manager.send_to_user")}
    assert dispatches == emits  # each dispatch carries its own run's event, not the first one's
    steps = [attrs(s) for s in spans_named(exporter, "engine.execute_step")]
    assert len(steps) == 3 and not any(step["pathwatch.nested"] for step in steps)


DELIVER_ROLES = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  writer:
    kind: deliver
    implementations: [{module}.SocketWriter]
    methods: [write]
  manager:
    kind: deliver
    implementations: [{module}.SocketManager]
    methods: [send_message]
    event_type: [arg.message.kind]
"""

SOCKET_WRITERS = """\
class SocketWriter:
    def __init__(self, websocket):
        self.websocket = websocket

    async def write(self, message):
        await self.websocket.send_json(message)


class SocketManager:
    async def send_message(self, websocket, message):
        await websocket.send_json(message)
"""


def instrumented_module(prefix: str, source: str, pathmap: str, instrument, tmp_path, monkeypatch,
                        request):
    """Write ``source`` as a module of its own, instrument ``pathmap`` naming it, import it."""
    # a module name per test: a module imported again under the same name is not hooked again
    module = f"{prefix}_{request.node.name.removeprefix('test_')[:40]}"
    (tmp_path / f"{module}.py").write_text(source)
    (tmp_path / "pathmap.yaml").write_text(pathmap.replace("{module}", module))
    monkeypatch.syspath_prepend(str(tmp_path))
    instrument(tmp_path / "pathmap.yaml")
    yield importlib.import_module(module)
    sys.modules.pop(module, None)


@pytest.fixture
def socket_writers(instrument, tmp_path, monkeypatch, request):
    yield from instrumented_module("pw_socket_writers", SOCKET_WRITERS, DELIVER_ROLES, instrument,
                                   tmp_path, monkeypatch, request)


def serve_socket(handler) -> None:
    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as ws:
            ws.receive_json()


def test_a_deliver_role_call_is_the_one_deliver_span_of_its_write(socket_writers, exporter):
    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        writer = socket_writers.SocketWriter(websocket)
        await writer.write({"type": "agent_started", "run_id": "r1"})
        await websocket.close()
        with pytest.raises(RuntimeError, match="close message"):  # the socket's own error, passed on
            await writer.write({"type": "late", "run_id": "r1"})

    serve_socket(handler)
    written, late = delivers(exporter)
    assert [s.name for s in spans_of_kind(exporter, "deliver")] == ["writer.write"] * 2
    connection = attrs(only_span(exporter, "HTTP /ws"))["pathwatch.connection.id"]
    assert written["pathwatch.event.type"] == "agent_started"
    assert written["pathwatch.delivery.outcome"] == "written"
    assert written["pathwatch.connection.id"] == connection
    assert written["pathwatch.connection.user"] == pseudonym("alice")
    assert late["pathwatch.delivery.outcome"] == "closed"
    assert late["pathwatch.connection.id"] == connection


def test_a_deliver_role_reads_its_message_not_the_socket_argument(socket_writers, exporter):
    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        manager = socket_writers.SocketManager()
        await manager.send_message(websocket, {"type": "agent_started", "kind": "tool_result",
                                               "run_id": "r1"})

    serve_socket(handler)
    (write,) = delivers(exporter)
    assert write["pathwatch.event.type"] == "tool_result"  # the role's event_type path wins
    assert write["pathwatch.run.id"] == "r1"  # read from the message, not from the WebSocket
    assert write["pathwatch.connection.user"] == pseudonym("alice")


ROLE_PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  writer:
    kind: deliver
    implementations: [{module}.SafeWriter]
    methods: [write, broadcast]
"""
ROLE_MODULE = """\
class SafeWriter:
    async def write(self, websocket, message):
        try:
            await websocket.send_json(message)
        except Exception:
            pass          # the socket went away: nothing to do

    async def broadcast(self, sockets, message):
        for ws in sockets:
            await ws.send_json(message)
"""


@pytest.fixture
def writer_module(instrument, tmp_path, monkeypatch, request):
    yield from instrumented_module("pw_safe_writer", ROLE_MODULE, ROLE_PATHMAP, instrument, tmp_path,
                                   monkeypatch, request)


def test_a_deliver_role_that_swallows_a_closed_sockets_error_still_reports_closed(writer_module, exporter):
    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"hello": 1})
        await websocket.close()
        await writer_module.SafeWriter().write(websocket, {"type": "agent_completed", "run_id": "r1"})

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as ws:
            ws.receive_json()
    late = [attrs(s) for s in spans_of_kind(exporter, "deliver") if attrs(s).get("pathwatch.event.type") == "agent_completed"]
    assert [a["pathwatch.delivery.outcome"] for a in late] == ["closed"]


def test_a_deliver_role_writing_to_several_sockets_reports_every_write(writer_module, exporter):
    sockets = {}

    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        user = websocket.query_params["user_id"]
        sockets[user] = websocket
        if user == "bob":
            await writer_module.SafeWriter().broadcast([sockets["alice"], sockets["bob"]],
                                             {"type": "agent_started", "run_id": "r1"})
        while True:
            try:
                await websocket.receive_text()
            except WebSocketDisconnect:
                return

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as a:
            with client.websocket_connect("/ws?user_id=bob") as b:
                a.receive_json(); b.receive_json()
    spans = [attrs(s) for s in spans_of_kind(exporter, "deliver")]
    users = [s.get("pathwatch.connection.user") for s in spans]
    assert sorted(users) == sorted([pseudonym("alice"), pseudonym("bob")])


DISPATCH_PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  manager:
    kind: dispatch
    implementations: [{module}.Manager]
    methods: [send_to_user, send_to_thread, send_to_members, send_with_fallback]
    target: [arg.user_id]
    event_type: [arg.message.type]
    run_id: [arg.message.run_id]
  notifier:
    kind: dispatch
    implementations: [{module}.Notifier]
    methods: [notify]
    target: [arg.user_id]
    event_type: [arg.message.type]
    run_id: [arg.message.run_id]
"""
DISPATCH_MODULE = """\
class Manager:
    def __init__(self):
        self.sockets = {}

    async def send_to_user(self, user_id, message):
        for websocket in self.sockets.get(user_id, []):
            await websocket.send_json(message)

    async def send_to_thread(self, thread_id, message, user_id):
        await self.send_to_user(user_id, message)      # the thread resolved to its user: a delegate

    async def send_to_members(self, thread_id, message, user_ids):
        for user_id in user_ids:
            await self.send_to_thread(thread_id, message, user_id)

    async def send_with_fallback(self, user_id, message, fallback):
        await self.send_to_user(user_id, message)
        for websocket in self.sockets.get(fallback, []):   # written here, not by the delegate
            await websocket.send_json(message)


class Notifier:
    def __init__(self, manager):
        self.manager = manager

    async def notify(self, user_id, message):
        await self.manager.send_to_user(user_id, message)
"""


@pytest.fixture
def dispatchers(instrument, tmp_path, monkeypatch, request):
    yield from instrumented_module("pw_dispatchers", DISPATCH_MODULE, DISPATCH_PATHMAP, instrument,
                                   tmp_path, monkeypatch, request)


def serve_alice(scenario) -> None:
    """A real socket of alice's: ``await scenario(websocket)``, then a last frame the client waits for
    (every span of the scenario has ended by then)."""
    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        await scenario(websocket)
        await websocket.send_json({"type": "done"})

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as ws:
            while ws.receive_json()["type"] != "done":
                pass


def dispatch_spans(exporter, name: str) -> dict[str, list[tuple]]:
    """run id -> (nested, writes, outcome) of each ``name`` span of that run, in the order they ended."""
    found: dict[str, list[tuple]] = {}
    for span in spans_named(exporter, name):
        a = attrs(span)
        found.setdefault(a["pathwatch.run.id"], []).append(
            (a["pathwatch.nested"], a["pathwatch.dispatch.writes"], a["pathwatch.delivery.outcome"]))
    return found


def test_a_dispatch_counts_the_writes_of_the_dispatches_nested_in_it(dispatchers, exporter):
    async def scenario(websocket):
        manager = dispatchers.Manager()
        manager.sockets["alice"] = [websocket]
        await manager.send_to_thread("t1", {"type": "agent_thinking", "run_id": "r1"}, user_id="alice")
        await manager.send_to_thread("t2", {"type": "agent_thinking", "run_id": "r2"}, user_id="nobody")
        await manager.send_to_members("t3", {"type": "agent_thinking", "run_id": "r3"},
                                      user_ids=["nobody", "alice"])  # two levels down
        await manager.send_with_fallback("nobody", {"type": "agent_thinking", "run_id": "r4"},
                                         fallback="alice")

    serve_alice(scenario)
    to_user = dispatch_spans(exporter, "manager.send_to_user")
    to_thread = dispatch_spans(exporter, "manager.send_to_thread")
    # the delegate wrote: so did the call that delegated to it
    assert to_user["r1"] == [(True, 1, "written")]
    assert to_thread["r1"] == [(False, 1, "written")]
    # nobody wrote: both found no connection (the outer one alone is judged, docs/rules.md)
    assert to_user["r2"] == [(True, 0, "no_connection")]
    assert to_thread["r2"] == [(False, 0, "no_connection")]
    # each nested call says what it wrote; the outermost counts every write under it
    assert to_user["r3"] == [(True, 0, "no_connection"), (True, 1, "written")]
    assert to_thread["r3"] == [(True, 0, "no_connection"), (True, 1, "written")]
    assert dispatch_spans(exporter, "manager.send_to_members")["r3"] == [(False, 1, "written")]
    # the delegate found no socket; the caller wrote itself: the event was written
    assert to_user["r4"] == [(True, 0, "no_connection")]
    assert dispatch_spans(exporter, "manager.send_with_fallback")["r4"] == [(False, 1, "written")]


def test_a_dispatch_cancelled_with_its_task_is_outcome_cancelled(dispatchers, exporter):
    """A dispatch cancelled (its run's task cancelled) while its write awaits the socket, or its
    second write after one written: ``cancelled``, as that write, not ``failed`` (a
    delivery.write_failed on every cancelled run: /tmp/s29_soakB/repro_cancel_dispatch.py); a
    dispatch that raised anything else stays ``failed``."""
    async def scenario(websocket):
        release, entered = asyncio.Event(), asyncio.Event()
        manager = dispatchers.Manager()
        manager.sockets["alice"] = [blocked_socket(release, entered)]
        manager.sockets["bob"] = [websocket, blocked_socket(release, entered)]
        for run_id, user in (("r1", "alice"), ("r2", "bob")):
            entered.clear()
            task = asyncio.create_task(manager.send_to_user(user, {"type": "token", "run_id": run_id}))
            await asyncio.wait_for(entered.wait(), 10)  # the dispatch's write awaits the slow socket
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        manager.sockets["carol"] = None  # not iterable: the dispatch raises TypeError
        with pytest.raises(TypeError):
            await manager.send_to_user("carol", {"type": "token", "run_id": "r3"})

    serve_alice(scenario)
    to_user = dispatch_spans(exporter, "manager.send_to_user")
    assert to_user["r1"] == [(False, 1, "cancelled")]
    assert to_user["r2"] == [(False, 2, "cancelled")]
    assert [w["pathwatch.delivery.outcome"] for w in delivers(exporter, "token")] == [
        "cancelled", "written", "cancelled"]
    assert to_user["r3"] == [(False, 0, "failed")]


def test_a_dispatch_counts_the_writes_of_another_roles_dispatch_inside_it(dispatchers, exporter):
    async def scenario(websocket):
        manager = dispatchers.Manager()
        manager.sockets["alice"] = [websocket]
        notifier = dispatchers.Notifier(manager)
        await notifier.notify("alice", {"type": "agent_started", "run_id": "r1"})
        await notifier.notify("nobody", {"type": "agent_started", "run_id": "r2"})

    serve_alice(scenario)
    notified = dispatch_spans(exporter, "notifier.notify")
    sent = dispatch_spans(exporter, "manager.send_to_user")
    # another role's call is not nested in it: each is judged on its own, and each wrote the event
    assert notified["r1"] == sent["r1"] == [(False, 1, "written")]
    assert notified["r2"] == sent["r2"] == [(False, 0, "no_connection")]


ENUM_EMITTERS = """\
version: 1
roles:
  emitter:
    kind: emit
    implementations: [{module}.Emitter]
    methods: [emit]
    event_type: [arg.event_type]
    run_id: [arg.run_id]
    thread_id: [arg.thread_id]
    event_id: [arg.event_id]
messages:
  event_type: type
  run_id: run_id
  event_id: event_id
"""

ENUM_EMITTER_SOURCE = """\
import enum
import json


class EventType(str, enum.Enum):
    AGENT_STARTED = "agent_started"


class Tool(enum.Enum):
    EXECUTING = "tool_executing"


def text(value):
    if isinstance(value, enum.Enum):
        value = value.value
    return value.decode() if isinstance(value, bytes) else value


class Emitter:
    def __init__(self):
        self.queue = []

    def emit(self, event_type, run_id, thread_id=None, event_id=None):
        message = {"type": text(event_type), "run_id": text(run_id)}
        if event_id is not None:
            message["event_id"] = text(event_id)
        self.queue.append(message)

    async def flush(self, websocket):
        while self.queue:
            await websocket.send_text(json.dumps(self.queue.pop(0)))
"""

OPENING_WRITER_PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  writer:
    kind: deliver
    implementations: [{module}.OpeningWriter]
    methods: [open_and_write]
"""
OPENING_WRITER_MODULE = """\
class OpeningWriter:
    async def open_and_write(self, websocket, message):
        await websocket.accept()
        await websocket.send_json(message)
"""


@pytest.fixture
def enum_emitters(instrument, tmp_path, monkeypatch, request):
    yield from instrumented_module("pw_enum_emitters", ENUM_EMITTER_SOURCE, ENUM_EMITTERS,
                                   instrument, tmp_path, monkeypatch, request)


def test_enum_and_bytes_values_are_exported_as_the_text_the_message_carries(enum_emitters,
                                                                             exporter):
    """An event type that is an Enum member (a string Enum, or a plain one the app writes by its
    value) and ids read as bytes (a Redis value) are the text the JSON message carries, as user ids
    are read: else the emit says ``EventType.AGENT_STARTED`` / ``b'run-7'``, the write
    ``agent_started`` / ``run-7``, the write finds no emit by its key (``delivery.link = none``: an
    undelivered event in the sidecar) and the run lacks its required ``agent_started``."""
    module = enum_emitters

    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        emitter = module.Emitter()
        emitter.emit(module.EventType.AGENT_STARTED, b"run-7", thread_id=b"t-1")
        emitter.emit(module.Tool.EXECUTING, "run-7", event_id=b"evt-9")
        await asyncio.create_task(emitter.flush(websocket))  # another task: by message key

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    with TestClient(app) as client:
        with client.websocket_connect("/ws") as ws:
            ws.receive_json(), ws.receive_json()
    emits = [attrs(s) for s in spans_named(exporter, "emitter.emit")]
    assert [(e["pathwatch.event.type"], e["pathwatch.run.id"]) for e in emits] == [
        ("agent_started", "run-7"), ("tool_executing", "run-7")]
    assert emits[0]["pathwatch.thread.id"] == "t-1"
    assert emits[1]["messaging.message.id"] == "evt-9"
    writes = delivers(exporter)
    assert [(w["pathwatch.event.type"], w["pathwatch.delivery.link"], w["messaging.message.id"])
            for w in writes] == [(e["pathwatch.event.type"], "message_key", e["messaging.message.id"])
                                 for e in emits]


@pytest.fixture
def opening_writer(instrument, tmp_path, monkeypatch, request):
    yield from instrumented_module("pw_opening_writer", OPENING_WRITER_MODULE, OPENING_WRITER_PATHMAP,
                                   instrument, tmp_path, monkeypatch, request)


def test_a_deliver_role_that_accepts_the_socket_first_is_still_the_one_span_of_its_write(
        opening_writer, exporter):
    """Reproducer /tmp/s23_transport/p1_role_accept.py: the accept (a WebSocket.send that writes no
    data) took the role's write, so its write made a second deliver span and the role's span had no
    connection."""
    async def handler(websocket: WebSocket) -> None:
        await opening_writer.OpeningWriter().open_and_write(
            websocket, {"type": "agent_started", "run_id": "r1"})

    serve_socket(handler)
    assert [s.name for s in spans_of_kind(exporter, "deliver")] == ["writer.open_and_write"]
    (write,) = delivers(exporter)
    assert write["pathwatch.connection.id"] == attrs(only_span(exporter, "HTTP /ws"))["pathwatch.connection.id"]
    assert write["pathwatch.connection.user"] == pseudonym("alice")
    assert write["pathwatch.delivery.outcome"] == "written"


def test_a_write_to_a_socket_whose_client_left_is_closed_also_when_the_server_does_not_raise(
        instrumented, exporter):
    """Reproducer /tmp/s23_transport/p3_closed_before_no_error.py: a server that drops a frame for a
    gone client without raising (uvicorn's wsproto server once the transport is closing) made the
    write `written`, an event delivered to no one; the same write through a deliver role was
    `closed`."""
    from starlette.websockets import WebSocket, WebSocketState

    async def dropping_send(message):
        pass  # the connection is gone: the frame goes nowhere, no error

    async def receive():
        return {"type": "websocket.connect"}

    async def scenario():
        websocket = WebSocket({"type": "websocket", "path": "/x", "headers": []}, receive, dropping_send)
        websocket.application_state = WebSocketState.CONNECTED
        websocket.client_state = WebSocketState.DISCONNECTED  # the app received websocket.disconnect
        await websocket.send_json({"type": "agent_completed", "run_id": "r1"})

    asyncio.run(scenario())
    (write,) = delivers(exporter, "agent_completed")
    assert write["pathwatch.delivery.outcome"] == "closed"


RAISING_MESSAGE_PATHMAP = """\
version: 1
roles:
  writer:
    kind: deliver
    implementations: [{module}.EventWriter]
    methods: [write]
"""
RAISING_MESSAGE_MODULE = """\
class Event:
    type = "agent_completed"

    @property
    def run_id(self):
        raise LookupError("no run bound")


class EventWriter:
    async def write(self, websocket, event):
        await websocket.send_json({"type": event.type})
"""


@pytest.fixture
def event_writer(instrument, tmp_path, monkeypatch, request):
    yield from instrumented_module("pw_event_writer", RAISING_MESSAGE_MODULE, RAISING_MESSAGE_PATHMAP,
                                   instrument, tmp_path, monkeypatch, request)


def test_a_message_whose_key_raises_loses_that_key_not_the_deliver_roles_span(event_writer, exporter):
    """Reproducer /tmp/s23_transport/p4_raising_message_attr.py: a property of the message object
    that raised left the deliver role's call without a span (its write was recorded as a plain
    transport write instead)."""
    from instrumentation.errors import errors

    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        await event_writer.EventWriter().write(websocket, event_writer.Event())

    before = errors.count
    serve_socket(handler)
    assert [s.name for s in spans_of_kind(exporter, "deliver")] == ["writer.write"]
    (write,) = delivers(exporter)
    assert write["pathwatch.event.type"] == "agent_completed" and "pathwatch.run.id" not in write
    assert errors.count == before + 1


def test_a_write_of_a_message_nested_deeper_than_the_stack_keeps_its_span(instrumented, exporter):
    # the RecursionError of reading it was caught by the write wrapper, which then made no span: an
    # event written inside its emit was reported undelivered
    tree = '"tree": ' + nested_too_deep_for_json()
    keys_first = '{"type": "token", "run_id": "r1", ' + tree + "}"
    keys_last = "{" + tree + ', "type": "token", "run_id": "r1"}'
    app = FastAPI()

    @app.websocket("/ws")
    async def handler(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(keys_first)
        await websocket.send_bytes(keys_last.encode())

    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice") as ws:
            assert ws.receive_text() == keys_first
            assert ws.receive_bytes() == keys_last.encode()
    first, second = delivers(exporter)
    assert (first["pathwatch.event.type"], first["pathwatch.run.id"]) == ("token", "r1")
    assert "pathwatch.event.type" not in second  # its keys after the deep value: not read
    assert first["pathwatch.delivery.link"] == second["pathwatch.delivery.link"] == "none"
