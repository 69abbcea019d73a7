"""Users: owner, subject, target, run/thread ids, event types; pseudonyms; ambient users from requests."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import json
import threading
import tracemalloc
from urllib.parse import quote

import pytest
from fastapi import FastAPI, Header, Request, WebSocket, WebSocketDisconnect
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

import instrumentation
from instrumentation import ConfigurationError, PathMapError, identity
from instrumentation import attributes as A
from instrumentation.identity import InstanceRegistry, Pseudonymizer, build_scope_resolver
from instrumentation.pathmap import IdentitySource
from tests.instrumentation.helpers import HMAC_KEY, attrs, only_span, pseudonym, spans_named, spans_of_kind
from tests.instrumentation.sample.app import build_app
from tests.instrumentation.sample.emitters import AgentWebSocketBridge, ConnectionManager, QueuedEmitter
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine


def test_owner_is_captured_after_init_and_subject_from_arguments(instrumented, exporter):
    engine = UserExecutionEngine(UserContext("alice"))
    engine.execute_agent(UserContext("bob", run_id="r1", thread_id="t1"))
    span = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert span["pathwatch.user.owner"] == pseudonym("alice")
    assert span["pathwatch.user.subject"] == pseudonym("bob")
    assert span["pathwatch.user_scoped"] is True
    assert (span["pathwatch.run.id"], span["pathwatch.thread.id"]) == ("r1", "t1")


def test_subject_alternatives_first_that_resolves_wins(instrumented, exporter):
    engine = UserExecutionEngine(UserContext("alice"))
    engine.execute_agent(UserContext("carol"), user_context=UserContext("dave"))
    assert attrs(only_span(exporter, "execution_engine.execute_agent"))["pathwatch.user.subject"] == \
        pseudonym("dave")


def test_arguments_bind_positionally_and_by_keyword(instrumented, exporter):
    engine = UserExecutionEngine()
    engine.execute_pipeline([1], UserContext("erin", run_id="pos"))
    engine.execute_pipeline(steps=[1], context=UserContext("erin", run_id="kw"))
    runs = [attrs(s)["pathwatch.run.id"] for s in spans_named(exporter, "execution_engine.execute_pipeline")]
    assert runs == ["pos", "kw"]


def test_emit_target_event_type_and_event_id(instrumented, exporter):
    bridge = AgentWebSocketBridge(ConnectionManager(), UserContext("alice"))
    asyncio.run(bridge.notify_agent_started("run-7", "triage"))  # target from self.user_context
    span = attrs(only_span(exporter, "event_emitter.notify_agent_started"))
    assert span["pathwatch.kind"] == "emit"
    assert span["pathwatch.event.type"] == "agent_started"  # method.strip_prefix(notify_)
    assert span["pathwatch.user.target"] == pseudonym("alice")
    assert span["pathwatch.run.id"] == "run-7"
    assert span["messaging.operation.type"] == "create"
    assert span["messaging.message.id"]


def test_emit_takes_the_event_id_it_is_given(instrumented, exporter):
    bridge = AgentWebSocketBridge(ConnectionManager(), UserContext("alice"))
    asyncio.run(bridge.notify_agent_completed("run-7", event_id="evt-42"))
    assert attrs(only_span(exporter, "event_emitter.notify_agent_completed"))["messaging.message.id"] == "evt-42"


def test_target_from_self_attribute(instrumented, exporter):
    QueuedEmitter("frank").notify_tool_executing("run-8", "search")
    span = attrs(only_span(exporter, "event_emitter.notify_tool_executing"))
    assert span["pathwatch.user.target"] == pseudonym("frank")
    assert span["pathwatch.event.type"] == "tool_executing"


def test_pseudonyms_equal_for_equal_users_and_differ_otherwise():
    pseudonymize = Pseudonymizer(HMAC_KEY.encode())
    assert pseudonymize("alice") == pseudonymize("alice")
    assert pseudonymize("alice") != pseudonymize("bob")
    assert pseudonymize(42) == pseudonymize("42")
    assert len(pseudonymize("alice")) == 32 and "alice" not in pseudonymize("alice")
    assert Pseudonymizer(b"another-key-0123456789")("alice") != pseudonymize("alice")
    assert pseudonymize(None) is None


def test_bytes_ids_are_the_same_user_as_their_text_and_other_scalars_are_normalised():
    import enum
    import uuid

    pseudonymize = Pseudonymizer(HMAC_KEY.encode())
    for same in (b"alice", bytearray(b"alice"), memoryview(b"alice")):
        assert pseudonymize(same) == pseudonymize("alice") == pseudonym("alice")
    assert pseudonymize("zoé".encode()) == pseudonymize("zoé")
    not_utf8 = b"\xff\xfeal"
    expected = hmac.new(HMAC_KEY.encode(), not_utf8, hashlib.sha256).hexdigest()[:32]
    assert pseudonymize(not_utf8) == expected  # the bytes themselves
    assert pseudonymize(not_utf8) != pseudonymize(str(not_utf8))
    user = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert pseudonymize(user) == pseudonymize("12345678-1234-5678-1234-567812345678")

    class UserId(str, enum.Enum):
        ALICE = "alice"
    assert pseudonymize(UserId.ALICE) == pseudonymize("alice")
    assert pseudonymize(b"") is None and pseudonymize("") is None
    raw = Pseudonymizer(None, allow_raw=True)
    assert raw(b"alice") == "alice" and raw(not_utf8) == "\\xff\\xfeal" and raw(7) == "7"


def test_empty_bytes_users_are_no_user_and_leave_no_attribute(instrumented, exporter):
    """docs/conventions.md: ``b""`` is no user. The span must not carry the key with no value: the
    SDK's encoder exports it as an empty AnyValue, which the sidecar counts as a wrong-typed value
    (pathwatch_receiver_invalid_attributes_total) on every such span."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from sidecar.receiver import SpanDecoder

    engine = UserExecutionEngine(UserContext(b""))
    engine.execute_agent(UserContext(b"", run_id="r1"))
    QueuedEmitter(b"").notify_tool_executing("r1", "t")  # target: self.user_id
    spans = exporter.get_finished_spans()
    for span in spans:
        assert not any(key.startswith(("pathwatch.user.", "enduser.")) for key in attrs(span)), \
            (span.name, attrs(span))
    batch = SpanDecoder().decode(encode_spans(spans).SerializeToString(), 0)
    assert not batch.invalid_attributes


class _NoText:
    """An object with no text of its own (Starlette's ``UnauthenticatedUser`` read whole): no user."""


@pytest.mark.parametrize("nobody", [b"", _NoText()], ids=["bytes", "object"])
def test_a_path_that_finds_no_user_lets_the_next_one_name_it(instrumented, exporter, nobody):
    """docs/pathmap.md: of a field's alternatives, the first that resolves to a non-empty value
    wins; ``b""`` and an object with no text of its own are no user (docs/conventions.md). The
    subject's first path (``arg.user_context.user_id``) finds one, the second
    (``arg.context.user_id``) bob; the target's first path nobody, the next (``self``'s) bob. Before,
    the first path's value was taken, no user made of it, and the span had no subject or target."""
    UserExecutionEngine(UserContext("bob")).execute_agent(UserContext("bob", run_id="r1"),
                                                          user_context=UserContext(nobody))
    bridge = AgentWebSocketBridge(ConnectionManager(), UserContext("bob"))
    asyncio.run(bridge.notify_agent_started("r1", "triage", user_context=UserContext(nobody)))
    (execute,) = spans_of_kind(exporter, "execute")
    (emit,) = spans_of_kind(exporter, "emit")
    assert attrs(execute)[A.USER_SUBJECT] == pseudonym("bob")
    assert attrs(emit)[A.USER_TARGET] == pseudonym("bob")


def test_an_owner_path_that_finds_no_user_lets_the_next_one_name_it():
    from instrumentation.sites import read_owner

    class Engine:
        def __init__(self, first: object) -> None:
            self.first, self.second = first, "bob"

    chains = (("first",), ("second",))
    assert [read_owner(Engine(nobody), chains) for nobody in (b"", _NoText(), "alice")] == ["bob", "bob", "alice"]


def test_an_identity_source_that_finds_no_user_lets_the_next_one_name_it(instrumented, exporter):
    """A socket logged out by storing ``b""`` in ``websocket.state.user_id`` (a Redis value read
    without ``decode_responses``): no user, so the next source, the query's alice, is its user again,
    as when the app deletes it. Before, b"" won and the socket had no user from then on."""
    app = FastAPI()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        websocket.state.user_id = b"bob"
        await websocket.send_json({"type": "ack", "run_id": "r1"})
        websocket.state.user_id = b""
        await websocket.send_json({"type": "ack", "run_id": "r2"})
        await websocket.close()

    with TestClient(app) as client, client.websocket_connect("/ws?user_id=alice") as ws:
        ws.receive_json()
        ws.receive_json()
    writes = {attrs(span)[A.RUN_ID]: attrs(span) for span in spans_named(exporter, "websocket.send_json")}
    assert [writes[run].get(A.CONNECTION_USER) for run in ("r1", "r2")] == [pseudonym("bob"), pseudonym("alice")]
    resolve = build_scope_resolver([IdentitySource(scope="user"), IdentitySource(header="x-user-id")])
    assert resolve({"user": _NoText(), "headers": [(b"x-user-id", b"carol")]}) == "carol"


def test_a_bytes_owner_is_the_same_user_as_the_header(instrumented, exporter):
    app = FastAPI()

    @app.post("/api/run")
    async def run() -> dict:
        user = b"alice"  # e.g. read from Redis without decode_responses
        UserExecutionEngine(UserContext(user)).execute_agent(UserContext(user))
        return {}

    with TestClient(app) as client:
        client.post("/api/run", headers={"x-user-id": "alice"})
    span = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert span["pathwatch.user.owner"] == span["pathwatch.user.subject"] == \
        span["enduser.pseudo.id"] == pseudonym("alice")


def test_an_owner_captured_before_a_reinstrument_is_exported_under_the_new_setting(instrument, exporter):
    instrument(pseudonymizer=Pseudonymizer(None, allow_raw=True))
    engine = UserExecutionEngine(UserContext("alice"))
    engine.execute_agent(UserContext("alice"))
    assert attrs(only_span(exporter, "execution_engine.execute_agent"))["pathwatch.user.owner"] == "alice"

    for key in ("rotated-key-0123456789", "rotated-again-0123456789"):
        instrumentation.uninstrument()
        exporter.clear()
        instrument(pseudonymizer=Pseudonymizer(key.encode()))
        engine.execute_agent(UserContext("alice"))
        span = attrs(only_span(exporter, "execution_engine.execute_agent"))
        assert span["pathwatch.user.owner"] == span["pathwatch.user.subject"] == pseudonym("alice", key)


def test_a_key_rotated_while_a_span_starts_gives_its_ids_and_its_scope_one_key(instrument, exporter):
    """Another thread rotates the key (``uninstrument()``, ``instrument()``) while a call's span
    starts -- here the app's own code run by pathwatch as it starts the span (a property on the
    subject's path) does it, at the point where a thread switch may: the span's owner, subject and
    ambient user are then of the key its scope names, the old one (before, they were pseudonymized
    with the old key and the span made by the new key's tracer: its scope named the new key, and
    the sidecar compared them with the new key's ids -- with 2 threads making spans and 200
    rotations, 16 of 75,625 spans; /tmp/s34_identityreview/race.py)."""
    keys = ("before-the-rotation-0123", "after-the-rotation-01234")
    key_ids = {Pseudonymizer(key.encode()).key_id: key for key in keys}
    instrument(pseudonymizer=Pseudonymizer(keys[0].encode()))

    class RotatingContext:
        rotated = False
        run_id, thread_id = "r1", "t1"

        @property
        def user_id(self) -> str:
            if not RotatingContext.rotated:
                RotatingContext.rotated = True
                instrumentation.uninstrument()
                instrument(pseudonymizer=Pseudonymizer(keys[1].encode()))
            return "alice"

    engine = UserExecutionEngine(UserContext("alice"))
    engine.execute_agent(RotatingContext())
    engine.execute_agent(RotatingContext())
    spans = spans_named(exporter, "execution_engine.execute_agent")
    assert len(spans) == 2 and RotatingContext.rotated
    for span, key in zip(spans, keys):
        assert key_ids[span.instrumentation_scope.attributes["pathwatch.pseudonym.key_id"]] == key
        assert attrs(span)[A.USER_OWNER] == attrs(span)[A.USER_SUBJECT] == pseudonym("alice", key)


def test_a_socket_opened_before_a_reinstrument_is_exported_under_the_new_setting(instrument, exporter,
                                                                               monkeypatch):
    """The ambient user and the connection user of a socket that stays open across
    ``uninstrument()`` / ``instrument()`` follow the setting, as owners and targets do: neither the
    raw id (raw ids no longer allowed) nor the old key's pseudonym beside the new one's."""
    raw = "alice-raw-id"
    user_keys = ("enduser.id", "enduser.pseudo.id", "pathwatch.connection.user",
                 "pathwatch.user.owner", "pathwatch.user.subject", "pathwatch.user.target")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-user-id")
    instrument(pseudonymizer=Pseudonymizer(None, allow_raw=True))
    app, _ = build_app()
    settings = [("r-raw", None), ("r-a", "rotated-key-a-0123456789"), ("r-b", "rotated-key-b-0123456789")]
    with TestClient(app) as client:
        with client.websocket_connect(f"/ws?user_id={raw}", headers={"x-user-id": raw}) as ws:
            for run_id, key in settings:
                if key is not None:
                    instrumentation.uninstrument()
                    instrument(pseudonymizer=Pseudonymizer(key.encode()))
                ws.send_json({"type": "run", "run_id": run_id})
                for _ in range(3):
                    ws.receive_json()
    key_ids = {key: (Pseudonymizer(key.encode()) if key else Pseudonymizer(None, allow_raw=True)).key_id
               for _, key in settings}
    assert len(set(key_ids.values())) == 3 and key_ids[None] == "raw"
    for run_id, key in settings:
        spans = [attrs(s) for s in exporter.get_finished_spans() if attrs(s).get("pathwatch.run.id") == run_id]
        assert {s["pathwatch.kind"] for s in spans} == {"execute", "emit", "dispatch", "deliver"}
        # the key that made them, on their scope: the sidecar compares users within one key only
        scopes = {s.instrumentation_scope.attributes.get("pathwatch.pseudonym.key_id")
                  for s in exporter.get_finished_spans() if attrs(s).get("pathwatch.run.id") == run_id}
        assert scopes == {key_ids[key]}, (run_id, scopes)
        expected = raw if key is None else pseudonym(raw, key)
        users = {(k, s[k]) for s in spans for k in user_keys if k in s}
        assert {value for _, value in users} == {expected}, (run_id, users)
        assert {k for k, _ in users} >= {"enduser.id" if key is None else "enduser.pseudo.id",
                                         "pathwatch.connection.user", "pathwatch.user.owner"}
    socket = attrs(only_span(exporter, "HTTP /ws"))  # ended under the last setting
    assert socket["enduser.pseudo.id"] == pseudonym(raw, settings[-1][1]) and "enduser.id" not in socket
    assert socket["pathwatch.pseudonym.key_id"] == key_ids[settings[-1][1]]  # stamped again with it
    assert socket["http.url"].endswith(f"/ws?user_id={pseudonym(raw, settings[-1][1])}")
    assert socket["http.request.header.x_user_id"] == (pseudonym(raw, settings[-1][1]),)
    assert not [(k, v) for k, v in socket.items() if raw in str(v) or pseudonym(raw, settings[1][1]) in str(v)]


def test_a_request_reading_its_user_while_instrument_switches_the_setting_caches_a_whole_one(
        instrument, monkeypatch):
    """instrument() published the pseudonymizer and the enduser key in two assignments, and a
    request's cache was checked against the pseudonymizer only: a request thread that read its user
    in between cached the new pseudonym under the old key (``enduser.id``, the raw ids' key) for the
    rest of the run. Here the request reads its user after every assignment instrument() makes."""
    from instrumentation import instrumentor
    from instrumentation.identity import RequestInfo
    from instrumentation.runtime import state

    instrument(pseudonymizer=Pseudonymizer(None, allow_raw=True))
    info = RequestInfo("/ws", "alice")  # a socket open across uninstrument() / instrument()
    assert info.span_attrs()["enduser.id"] == "alice"
    instrumentation.uninstrument()

    class Watched:
        """The runtime state, with the request reading its user after each assignment."""

        def __getattr__(self, name):
            return getattr(state, name)

        def __setattr__(self, name, value):
            setattr(state, name, value)
            seen.append(dict(info.span_attrs()))

    seen: list[dict] = []
    monkeypatch.setattr(instrumentor, "state", Watched())
    key = "rotated-key-0123456789"
    instrument(pseudonymizer=Pseudonymizer(key.encode()))
    assert seen  # the request did read its user while instrument() ran
    assert info.span_attrs() == {"pathwatch.entry_point": "/ws", "enduser.pseudo.id": pseudonym("alice", key)}
    assert info.pseudonym() == pseudonym("alice", key)
    for attributes in seen:  # a whole setting each time: the old one's or the new one's
        assert attributes in ({"pathwatch.entry_point": "/ws", "enduser.id": "alice"},
                              {"pathwatch.entry_point": "/ws", "enduser.pseudo.id": pseudonym("alice", key)})


def test_missing_key_refuses_to_start(monkeypatch, provider):
    monkeypatch.delenv("PATHWATCH_HMAC_KEY", raising=False)
    monkeypatch.delenv("PATHWATCH_ALLOW_RAW_USER_IDS", raising=False)
    with pytest.raises(ConfigurationError, match="PATHWATCH_HMAC_KEY"):
        instrumentation.instrument(None, tracer_provider=provider, heartbeat_interval_s=0)
    assert not instrumentation.PathwatchInstrumentor().is_instrumented_by_opentelemetry
    assert not instrumentation.is_enabled()


@pytest.mark.parametrize("key", ["k", "0123456789abcde", " " * 32, "\t\n" * 8, "\u00a0" * 8])
def test_a_weak_key_refuses_to_start_and_installs_nothing(monkeypatch, provider, key):
    """A short key (under 16 bytes: 128 bits) or a whitespace-only one: pseudonyms of guessable ids
    could be reversed offline by anyone who sees the spans."""
    monkeypatch.setenv("PATHWATCH_HMAC_KEY", key)
    monkeypatch.delenv("PATHWATCH_ALLOW_RAW_USER_IDS", raising=False)
    with pytest.raises(ConfigurationError, match="PATHWATCH_HMAC_KEY is (too short|only whitespace)") as raised:
        instrumentation.instrument(None, tracer_provider=provider, heartbeat_interval_s=0)
    assert "at least 16 bytes" in str(raised.value)
    assert not instrumentation.PathwatchInstrumentor().is_instrumented_by_opentelemetry
    assert not instrumentation.is_enabled()


def test_a_key_of_bytes_that_are_not_utf8_is_used_as_the_variables_bytes(monkeypatch, provider,
                                                                          exporter):
    import os

    raw_key = bytes(range(0x80, 0xA0))  # `openssl rand 32` in a secret: no UTF-8
    monkeypatch.setenv("PATHWATCH_HMAC_KEY", os.fsdecode(raw_key))  # as os.environ reads it
    monkeypatch.delenv("PATHWATCH_ALLOW_RAW_USER_IDS", raising=False)
    instrumentation.instrument(None, tracer_provider=provider, heartbeat_interval_s=0)  # raised
    try:
        assert Pseudonymizer.from_env()("alice") == hmac.new(raw_key, b"alice",
                                                             hashlib.sha256).hexdigest()[:32]
    finally:
        instrumentation.uninstrument()


@pytest.mark.parametrize("key", [b"", b"k", b"0123456789abcde", b" " * 16, bytearray(b"short")])
def test_the_api_refuses_a_weak_key_too(key):
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        Pseudonymizer(key)
    with pytest.raises(ConfigurationError):
        Pseudonymizer(key, allow_raw=True)  # a key given is used, so it is checked
    assert Pseudonymizer(b"0123456789abcdef")("alice") == pseudonym("alice", "0123456789abcdef")


def test_a_weak_key_leaves_the_app_running_uninstrumented_and_says_why(monkeypatch, caplog):
    from instrumentation import instrumentor

    exits: list[int] = []
    monkeypatch.setattr(instrumentor, "_exit_at_start", exits.append)
    monkeypatch.setenv("PATHWATCH_HMAC_KEY", "secret")
    monkeypatch.delenv("PATHWATCH_CHECK_IMPORTS", raising=False)
    instrumentor.ZeroCodeStart().instrument(heartbeat_interval_s=0)  # never raises into the launcher
    assert "pathwatch is NOT instrumenting this process: PATHWATCH_HMAC_KEY is too short (6 bytes)" \
        in caplog.text
    assert "secret" not in caplog.text.replace("PATHWATCH_", "")
    assert exits == [] and not instrumentation.is_enabled()


def test_a_bad_heartbeat_setting_refuses_to_start_and_installs_nothing(monkeypatch, provider, hmac_key):
    monkeypatch.setenv("PATHWATCH_HEARTBEAT_INTERVAL_S", "ten")
    with pytest.raises(ConfigurationError, match="PATHWATCH_HEARTBEAT_INTERVAL_S='ten'"):
        instrumentation.instrument(None, tracer_provider=provider)
    assert not instrumentation.PathwatchInstrumentor().is_instrumented_by_opentelemetry
    assert not instrumentation.is_enabled()


@pytest.mark.parametrize("value", ["inf", "1e300", "1e10", "nan", "-1"])
def test_a_heartbeat_interval_no_thread_can_wait_is_refused_naming_the_variable(monkeypatch, provider,
                                                                                hmac_key, value):
    # inf (or anything above threading.TIMEOUT_MAX) was accepted: the heartbeat thread's wait raised
    # OverflowError, a traceback in the app's log and no periodic heartbeat
    monkeypatch.setenv("PATHWATCH_HEARTBEAT_INTERVAL_S", value)
    with pytest.raises(ConfigurationError, match=rf"PATHWATCH_HEARTBEAT_INTERVAL_S='{value}': expected "
                                                 "a number of seconds from 0 to 31536000"):
        instrumentation.instrument(None, tracer_provider=provider)
    assert not instrumentation.is_enabled()


def test_a_heartbeat_interval_argument_no_thread_can_wait_is_refused(provider, hmac_key):
    with pytest.raises(ConfigurationError, match="heartbeat_interval_s=inf: expected a number"):
        instrumentation.instrument(None, tracer_provider=provider, heartbeat_interval_s=float("inf"))
    assert not instrumentation.is_enabled()


def test_a_long_heartbeat_interval_is_kept(monkeypatch, provider, hmac_key):
    monkeypatch.setenv("PATHWATCH_HEARTBEAT_INTERVAL_S", "31536000")
    instrumentor = instrumentation.instrument(None, tracer_provider=provider)
    try:
        assert instrumentor.heartbeat.interval_s == 31536000.0
    finally:
        instrumentation.uninstrument()


def test_a_header_name_that_cannot_be_sent_refuses_to_start_and_installs_nothing(provider, hmac_key,
                                                                                tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text('version: 1\nidentity:\n  http: [{header: "x-user-\u0101d"}]\n')
    with pytest.raises(PathMapError, match="identity.http.0..header: bad header name"):
        instrumentation.instrument(pathmap, tracer_provider=provider)
    assert not instrumentation.PathwatchInstrumentor().is_instrumented_by_opentelemetry
    assert not instrumentation.is_enabled()


def test_raw_ids_only_when_allowed(monkeypatch, instrument, exporter):
    monkeypatch.delenv("PATHWATCH_HMAC_KEY", raising=False)
    monkeypatch.setenv("PATHWATCH_ALLOW_RAW_USER_IDS", "1")
    instrument()
    app, _ = build_app()
    with TestClient(app) as client:
        client.post("/api/runs/r1", headers={"x-user-id": "alice"})
    request = attrs(only_span(exporter, "POST /api/runs/{run_id}"))
    assert request["enduser.id"] == "alice" and "enduser.pseudo.id" not in request


def test_pseudonym_cache_is_bounded():
    pseudonymize = Pseudonymizer(HMAC_KEY.encode(), cache_size=8)
    for index in range(100):
        pseudonymize(f"user-{index}")
    assert pseudonymize._pseudonym.cache_info().currsize == 8


def test_the_pseudonym_cache_does_not_keep_long_ids():
    """A client sending a new long value at each request (a 16 KB header an identity source reads):
    its pseudonym is the same as if cached, and the cache does not keep the ids alive (before, all
    of them up to its 65536 entries: 1 GiB of 16 KB ids)."""
    pseudonymize = Pseudonymizer(HMAC_KEY.encode())
    long_ids = [f"{index:05d}" + "x" * 16_000 for index in range(200)]
    assert pseudonymize(long_ids[0]) == pseudonymize(long_ids[0]) == pseudonym(long_ids[0])
    assert pseudonymize(long_ids[1].encode()) == pseudonym(long_ids[1])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for raw in long_ids:
            pseudonymize(raw)
        del raw
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 200 * 16_000 / 10, kept
    short = "u" * identity.PSEUDONYM_CACHE_MAX_ID
    assert pseudonymize(short) == pseudonym(short)
    assert pseudonymize._pseudonym.cache_info().currsize == 1  # the short one only


def test_instance_registry_forgets_dead_objects():
    registry = InstanceRegistry()

    class Thing:
        pass

    things = [Thing() for _ in range(10)]
    tokens = {registry.token(t) for t in things}
    assert len(tokens) == 10 and len(registry) == 10
    del things
    assert len(registry) == 0


def test_an_object_registered_by_two_threads_at_once_keeps_one_token():
    registry = InstanceRegistry()

    class Thing:
        pass

    thing, tokens = Thing(), iter(["i-first", "i-second"])
    make_token = registry._new_token

    def racing_token() -> str:
        # another thread registers the same object while this one makes its token
        registry._new_token = lambda: next(tokens)
        winner = registry.token(thing)
        registry._new_token = make_token
        assert winner == "i-first"
        return next(tokens)

    registry._new_token = racing_token
    assert registry.token(thing) == "i-first"
    assert registry.token(thing) == "i-first" and len(registry) == 1


def test_a_collection_inside_forget_freeing_another_instance_does_not_deadlock():
    # _forget is a weakref callback that holds the registry's lock; the cyclic GC runs at any
    # allocation once generation 0 is full, also at one _forget makes under the lock, and may free
    # another registered instance there (one in a reference cycle), whose _forget then runs in the
    # same thread. The collection is made to happen at that moment here
    registry = InstanceRegistry()

    class Engine:
        def __init__(self) -> None:
            self.handlers = {"run": self.run}  # a bound method kept on the instance: a cycle

        def run(self) -> None:
            pass

    class CollectingOnce:
        """The registry's own lock; once armed, its next acquisition runs a collection."""

        def __init__(self, real) -> None:
            self.real = real
            self.armed = False

        def __enter__(self):
            self.real.acquire()
            if self.armed:
                self.armed = False
                gc.collect()
            return self

        def __exit__(self, *exc) -> None:
            self.real.release()

    lock = registry._lock = CollectingOnce(registry._lock)
    finished = threading.Event()

    def scenario() -> None:
        cyclic, plain = Engine(), Engine()
        registry.token(cyclic)
        registry.token(plain)
        plain.handlers.clear()  # no cycle: freed when dropped
        del cyclic  # garbage now, left for the cyclic GC
        lock.armed = True
        del plain  # _forget(plain): the collection under its lock frees cyclic, _forget(cyclic) runs
        finished.set()

    gc.disable()  # no collection but the one made under the lock
    try:
        # a daemon thread: a deadlocked one is left behind holding this registry's lock only
        threading.Thread(target=scenario, daemon=True).start()
        assert finished.wait(10), "deadlocked: _forget re-entered under the registry's lock"
    finally:
        gc.enable()
    assert len(registry) == 0


def _jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


@pytest.mark.parametrize("source,scope,expected", [
    ({"header": "X-User-Id"}, {"headers": [(b"x-user-id", b"alice")]}, "alice"),
    ({"query_param": "user_id"}, {"query_string": b"a=1&user_id=bob"}, "bob"),
    ({"jwt_claim": "sub"}, {"headers": [(b"authorization", f"Bearer {_jwt({'sub': 'carol'})}".encode())]}, "carol"),
    ({"jwt_claim": "user.id"}, {"headers": [(b"authorization", f"Bearer {_jwt({'user': {'id': 7}})}".encode())]}, 7),
    # a namespaced custom claim (Auth0 requires them): its name has dots, found whole (None before)
    ({"jwt_claim": "https://acme.example/user_id"}, {"headers": [(b"authorization", f"Bearer {_jwt({'sub': 'auth0|1', 'https://acme.example/user_id': 'erin'})}".encode())]}, "erin"),
    ({"jwt_claim": "user.id"}, {"headers": [(b"authorization", f"Bearer {_jwt({'user.id': 'ida', 'user': {'id': 8}})}".encode())]}, "ida"),
    ({"jwt_claim": "sub"}, {"headers": [(b"authorization", b"Bearer not-a-jwt")]}, None),
    ({"jwt_claim": "sub"}, {"headers": [(b"authorization", b"Basic abc")]}, None),
    ({"scope": "user.id"}, {"user": {"id": "dave"}}, "dave"),
    ({"header": "x-user-id"}, {"headers": []}, None),
    # a non-ASCII id: latin-1, exactly as Starlette hands it to the app (its Header() reads "josÃ©"):
    # the ambient pseudonym must equal the owner's or subject's the app builds from the same header
    ({"header": "x-user-id"}, {"headers": [(b"x-user-id", "josé".encode())]}, "josé".encode().decode("latin-1")),
    ({"header": "x-user-id"}, {"headers": [(b"x-user-id", "josé".encode("latin-1"))]}, "josé"),
])
def test_identity_sources(source, scope, expected):
    assert build_scope_resolver([IdentitySource(**source)])(scope) == expected


@pytest.mark.parametrize("query", [b"user_id=alice&user_id=bob", b"user_id=alice&user_id=",
                                   b"user_id=&user_id=bob", b"user_id=al%69ce&x=1&user_id=b%C3%B6b",
                                   b"user_id=alice"])
def test_a_query_param_is_the_value_the_app_reads(query):
    from starlette.requests import Request

    scope = {"type": "http", "query_string": query, "headers": []}
    app_reads = Request(scope).query_params.get("user_id") or None  # FastAPI's Query() alike
    assert build_scope_resolver([IdentitySource(query_param="user_id")])(scope) == app_reads


def test_the_ambient_user_of_a_query_param_sent_twice_is_the_user_the_app_serves(instrument, exporter,
                                                                                tmp_path):

    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  http: [{query_param: user_id}]\n"
                       "  websocket: [{query_param: user_id}]\n")
    instrument(pathmap)
    app = FastAPI()
    served = []

    @app.get("/runs")
    def runs(user_id: str) -> dict:
        served.append(user_id)
        return {}

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        served.append(websocket.query_params["user_id"])
        await websocket.send_json({"type": "hello"})
        await websocket.close()

    with TestClient(app) as client:
        client.get("/runs?user_id=alice&user_id=bob")
        with client.websocket_connect("/ws?user_id=alice&user_id=bob") as socket_client:
            socket_client.receive_json()
    assert served == ["bob", "bob"]
    bob = pseudonym("bob")
    assert attrs(only_span(exporter, "GET /runs"))["enduser.pseudo.id"] == bob
    assert attrs(only_span(exporter, "HTTP /ws"))["enduser.pseudo.id"] == bob
    assert attrs(only_span(exporter, "websocket.send_json"))["pathwatch.connection.user"] == bob


def test_first_identity_source_that_resolves_wins():
    resolve = build_scope_resolver([IdentitySource(header="x-user-id"), IdentitySource(query_param="u")])
    assert resolve({"headers": [], "query_string": b"u=erin"}) == "erin"
    assert resolve({"headers": [(b"x-user-id", b"frank")], "query_string": b"u=erin"}) == "frank"


def test_ambient_user_for_http_from_jwt(instrumented, exporter):
    app, _ = build_app()
    with TestClient(app) as client:
        response = client.post("/api/runs/r1", headers={"authorization": f"Bearer {_jwt({'sub': 'grace'})}"})
    assert response.status_code == 200
    request = attrs(only_span(exporter, "POST /api/runs/{run_id}"))
    assert request["enduser.pseudo.id"] == pseudonym("grace")
    engine = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert engine["enduser.pseudo.id"] == pseudonym("grace")


def test_raw_user_ids_never_appear_in_exported_spans(instrumented, exporter):
    raw_users = ["alice-raw-id", "bob-raw-id"]
    app, _ = build_app()
    with TestClient(app) as client:
        with client.websocket_connect(f"/ws?user_id={raw_users[0]}") as ws:
            client.post("/api/runs/r1", headers={"x-user-id": raw_users[0]})
            ws.receive_json()
            ws.send_json({"type": "run", "run_id": "r2"})
            for _ in range(3):
                ws.receive_json()
        client.post("/api/runs/r3", headers={"x-user-id": raw_users[1]})
    spans = exporter.get_finished_spans()
    assert len(spans_of_kind(exporter, "deliver")) >= 4
    for span in spans:
        for key, value in (span.attributes or {}).items():
            assert not any(raw in str(value) for raw in raw_users), (span.name, key, value)
    users = {attrs(s).get("enduser.pseudo.id") for s in spans} - {None}
    assert users == {pseudonym(raw_users[0]), pseudonym(raw_users[1])}
    socket = attrs(only_span(exporter, "HTTP /ws"))
    assert socket["http.url"].endswith(f"/ws?user_id={pseudonym(raw_users[0])}")


def test_raw_user_ids_stay_out_of_exceptions_and_of_encoded_query_strings(instrumented, exporter):
    app = FastAPI()

    @app.post("/api/fail")
    async def fail(request: Request) -> None:
        raise KeyError(request.headers["x-user-id"])  # the app's own bug, naming its user

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"type": "hello"})
        await websocket.close()

    raw = "alice+tag@example.com"
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/api/fail", headers={"x-user-id": raw}).status_code == 500
        with client.websocket_connect("/ws?user_id=alice%2Btag%40example.com") as ws:
            ws.receive_json()
    spans = exporter.get_finished_spans()
    request = only_span(exporter, "POST /api/fail")
    assert [dict(event.attributes) for event in request.events] == [
        {"exception.type": "KeyError", "exception.escaped": False}]
    assert "alice" not in (request.status.description or "")
    for span in spans:
        texts = [str(v) for v in (span.attributes or {}).values()]
        texts += [str(v) for event in span.events for v in (event.attributes or {}).values()]
        assert not any("alice" in text for text in texts), (span.name, texts)
    socket = attrs(only_span(exporter, "HTTP /ws"))
    assert socket["http.url"].endswith(f"/ws?user_id={pseudonym(raw)}")


class _Gate:
    """An app's own middleware, added with ``add_middleware``: outside pathwatch's, it rejects a
    request (401, or a socket closed before accept) or fails it with an exception naming the user."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and b"token=good" not in scope["query_string"]:
            user = dict(scope["headers"]).get(b"x-user-id", b"?").decode()
            if b"raise" in scope["query_string"]:
                raise PermissionError(f"user {user} is suspended")
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await PlainTextResponse(f"no access for {user}", 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _leaks(exporter, raw: str) -> list:
    found = []
    for span in exporter.get_finished_spans():
        texts = [str(v) for v in (span.attributes or {}).values()]
        texts += [str(v) for event in span.events for v in (event.attributes or {}).values()]
        texts.append(span.status.description or "")
        found += [(span.name, text) for text in texts if raw in text]
    return found


def _gated_app() -> FastAPI:
    app = FastAPI()

    @app.get("/api/users/{user_id}/runs")
    async def runs(user_id: str) -> dict:
        return {}

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    app.add_middleware(_Gate)
    return app


def _call_gated(app: FastAPI, raw: str) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get(f"/api/users/{raw}/runs?token=good", headers={"x-user-id": raw}).status_code == 200
        assert client.get(f"/api/users/{raw}/runs?user_id={raw}",
                          headers={"x-user-id": raw}).status_code == 401
        assert client.get(f"/api/users/{raw}/runs?user_id={raw}&raise=1",
                          headers={"x-user-id": raw}).status_code == 500
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect(f"/ws?user_id={raw}") as ws:
                ws.receive_text()


def test_a_request_an_outer_middleware_rejects_or_fails_keeps_no_raw_user_id(instrumented, exporter):
    _call_gated(_gated_app(), "alice")
    assert _leaks(exporter, "alice") == []
    rejected, failed = spans_named(exporter, "GET /api/users/{user_id}/runs")[1:]
    assert attrs(rejected)["http.url"].endswith(
        f"/api/users/{pseudonym('alice')}/runs?user_id={pseudonym('alice')}")
    assert [dict(event.attributes) for event in failed.events] == [
        {"exception.type": "PermissionError", "exception.escaped": False}]
    socket = attrs(only_span(exporter, "HTTP /ws"))
    assert socket["http.url"].endswith(f"/ws?user_id={pseudonym('alice')}")


def test_a_user_an_outer_middleware_set_in_the_scope_is_scrubbed_when_another_rejects(
        instrument, exporter, tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  http: [{scope: user.id}]\n")
    instrument(pathmap)

    class Auth:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            scope["user"] = {"id": "heidi"}
            await self.app(scope, receive, send)

    app = _gated_app()
    app.add_middleware(Auth)  # outermost: sets the user, then the gate rejects
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/api/users/heidi/runs").status_code == 401
    assert _leaks(exporter, "heidi") == []
    assert f"/api/users/{pseudonym('heidi')}/runs" in attrs(
        only_span(exporter, "GET /api/users/{user_id}/runs"))["http.url"]


def test_the_apps_own_fastapi_instrumentor_keeps_its_hook_and_gets_the_scrubbing(instrumented, exporter,
                                                                                 provider):
    import fastapi
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    seen = []
    instrumentor = FastAPIInstrumentor()
    instrumentor.instrument(tracer_provider=provider,
                            server_request_hook=lambda span, scope: seen.append(scope["path"]))
    try:
        app = fastapi.FastAPI()  # the instrumentor's subclass: it instruments the app itself

        @app.get("/api/users/{user_id}/runs")
        async def runs(user_id: str) -> dict:
            return {}

        app.add_middleware(_Gate)
        with TestClient(app, raise_server_exceptions=False) as client:
            client.get("/api/users/alice/runs?raise=1", headers={"x-user-id": "alice"})
    finally:
        instrumentor.uninstrument()
    assert seen == ["/api/users/alice/runs"]
    assert _leaks(exporter, "alice") == []


def test_raw_user_ids_in_url_path_segments_are_pseudonymized(instrumented, exporter):
    app = FastAPI()

    @app.get("/api/users/{user_id}/runs")
    async def runs(user_id: str) -> dict:
        return {}

    raw = "alice+tag@example.com"
    with TestClient(app) as client:
        for sent in ("alice+tag@example.com", "alice%2Btag%40example.com"):
            assert client.get(f"/api/users/{sent}/runs?user={sent}&page=2",
                              headers={"x-user-id": raw}).status_code == 200
    requests = spans_named(exporter, "GET /api/users/{user_id}/runs")
    assert len(requests) == 2
    for request in requests:
        values = {key: str(value) for key, value in (request.attributes or {}).items()}
        assert not any("alice" in value for value in values.values()), values
        url = values.get("http.url") or values["url.full"]
        assert url.endswith(f"/api/users/{pseudonym(raw)}/runs?user={pseudonym(raw)}&page=2"), url


class _Attributes:
    """Just what _scrub_urls touches of a span: its attributes."""

    def __init__(self, attributes: dict) -> None:
        self.attributes = dict(attributes)

    def set_attribute(self, key: str, value: object) -> None:
        self.attributes[key] = value


@pytest.mark.parametrize(("raw", "before", "after"), [
    # the scheme and host are not path segments
    ("h", {"url.full": "http://h/x/h"}, {"url.full": "http://h/x/P"}),
    # a + in a path is a plus, not a space
    ("a b", {"url.path": "/files/a+b", "url.full": "http://h/files/a+b?u=a+b"},
     {"url.path": "/files/a+b", "url.full": "http://h/files/a+b?u=P"}),
    ("a+b", {"url.path": "/files/a+b"}, {"url.path": "/files/P"}),
    ("al ice", {"http.target": "/u/al%20ice?x=1#top"}, {"http.target": "/u/P?x=1#top"}),
    # an id with a slash: one encoded segment, or decoded over whole segments, bounded by / or the ends
    ("acme/alice", {"url.path": "/files/acme/alice/x", "http.target": "/files/acme%2Falice?u=acme%2Falice"},
     {"url.path": "/files/P/x", "http.target": "/files/P?u=P"}),
    ("acme/alice", {"url.path": "acme/alice", "url.full": "http://h/acme/alice"},
     {"url.path": "P", "url.full": "http://h/P"}),
    ("acme/alice", {"url.path": "/xacme/alice/acme/alicex/acme/al"},
     {"url.path": "/xacme/alice/acme/alicex/acme/al"}),
    ("q8/x+Y/w==", {"url.path": "/f/q8%2Fx%2BY/w%3D%3D/q8/x+Y/w==/r"}, {"url.path": "/f/P/P/r"}),
])
def test_url_scrubbing_replaces_whole_path_segments_and_query_values_only(raw, before, after):
    from instrumentation.fastapi import _scrub_urls

    span = _Attributes(before)
    _scrub_urls(span, raw, "P")
    assert span.attributes == after


@pytest.mark.parametrize("raw", ["acme/alice", "q8Zr/x+Yw1=="])
def test_a_user_id_with_a_slash_is_pseudonymized_in_the_url(instrumented, exporter, raw):
    """Sent as one percent-encoded segment, the id reaches the span's URL decoded over two."""
    app = FastAPI()

    @app.get("/files/{path:path}")
    async def files(path: str) -> dict:
        return {"path": path}

    with TestClient(app) as client:
        encoded = quote(raw, safe="")
        response = client.get(f"/files/{encoded}/report?owner={encoded}", headers={"x-user-id": raw})
        assert response.json() == {"path": f"{raw}/report"}
    request = attrs(only_span(exporter, "GET /files/{path:path}"))
    assert not {key: value for key, value in request.items() if raw in str(value) or encoded in str(value)}
    url = request.get("http.url") or request["url.full"]
    assert url.endswith(f"/files/{pseudonym(raw)}/report?owner={pseudonym(raw)}"), url


def test_captured_identity_headers_carry_pseudonyms(instrument, exporter, monkeypatch):
    """OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST naming the header the user is read
    from, or Authorization (a JWT source): the server span carries the pseudonym, not the id or
    the token; other captured headers stay as they are."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST",
                       "x-user-id,authorization,x-request-id")
    instrument()
    app, _ = build_app()
    token = _jwt({"sub": "grace"})
    with TestClient(app) as client:
        client.post("/api/runs/r1", headers={"x-user-id": "alice", "x-request-id": "req-1"})
        client.post("/api/runs/r2", headers={"authorization": f"Bearer {token}"})
        client.post("/api/runs/r3", headers={"x-user-id": "heidi", "authorization": "Basic aGVpZGk6cHc="})
        with client.websocket_connect("/ws?user_id=bob", headers={"x-user-id": "bob"}) as ws:
            ws.send_json({"type": "raw"})
            ws.receive_text()
    first, second, third = (attrs(s) for s in spans_named(exporter, "POST /api/runs/{run_id}"))
    assert first["http.request.header.x_user_id"] == (pseudonym("alice"),)
    assert first["http.request.header.x_request_id"] == ("req-1",)
    assert second["http.request.header.authorization"] == (pseudonym("grace"),)
    assert third["http.request.header.x_user_id"] == (pseudonym("heidi"),)
    assert third["http.request.header.authorization"] == ("[REDACTED]",)  # a credential, no claim
    socket = attrs(only_span(exporter, "HTTP /ws"))
    assert socket["http.request.header.x_user_id"] == (pseudonym("bob"),)
    for raw in ("alice", "grace", "heidi", "bob", token, "aGVpZGk6cHc="):
        assert _leaks(exporter, raw) == []


def test_captured_identity_headers_carry_pseudonyms_when_an_outer_middleware_rejects(
        instrumented, exporter, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-user-id")
    _call_gated(_gated_app(), "alice")
    assert _leaks(exporter, "alice") == []
    requests = spans_named(exporter, "GET /api/users/{user_id}/runs")
    assert requests  # the rejected request has its span, with the header captured
    for span in requests:
        assert attrs(span)["http.request.header.x_user_id"] == (pseudonym("alice"),)


def test_a_non_ascii_user_id_from_a_header_is_pseudonymized_in_the_url(instrumented, exporter):
    app = FastAPI()

    seen = []

    @app.get("/api/users/{user_id}/runs")
    async def runs(user_id: str, x_user_id: str = Header()) -> dict:
        seen.append(x_user_id)  # as the app builds its user-scoped objects
        return {}

    with TestClient(app) as client:
        assert client.get("/api/users/jos%C3%A9/runs?user=jos%C3%A9",
                          headers={"x-user-id": "josé".encode()}).status_code == 200
    request = attrs(only_span(exporter, "GET /api/users/{user_id}/runs"))
    assert request["enduser.pseudo.id"] == pseudonym(seen[0])  # the app's own reading
    leaked = {key: value for key, value in request.items() if "jos" in str(value)}
    assert not leaked
    url = request.get("http.url") or request["url.full"]
    user = pseudonym(seen[0])
    assert url.endswith(f"/api/users/{user}/runs?user={user}"), url


# --- every user id the request carries, not only the ambient user's, is scrubbed from the URL ---------
_TWO_SOURCES = ("version: 1\nidentity:\n  http: [{header: x-user-id}, {query_param: user_id}]\n"
                "  websocket: [{query_param: user_id}]\n")


@pytest.fixture(params=["default", "http/dup"])
def semconv(request, monkeypatch):
    """The HTTP attributes the FastAPI instrumentation sets: the old ones (http.url with the query
    percent-decoded, http.target), or both old and new (url.query as sent, url.path). It reads the
    mode (OTEL_SEMCONV_STABILITY_OPT_IN, read once per process) when it instruments an app."""
    from opentelemetry.instrumentation._semconv import (
        _OpenTelemetrySemanticConventionStability as stability, _OpenTelemetryStabilitySignalType,
        _StabilityMode)

    stability._initialize()
    if request.param == "http/dup":
        monkeypatch.setitem(stability._OTEL_SEMCONV_STABILITY_SIGNAL_MAPPING,
                            _OpenTelemetryStabilitySignalType.HTTP, _StabilityMode.HTTP_DUP)
    return request.param


def _query_values(span, name: str = "user_id") -> dict[str, list[str]]:
    """URL attribute -> the values of ``name`` in its query."""
    from urllib.parse import parse_qsl

    found = {}
    for key, value in attrs(span).items():
        if key in ("http.url", "url.full", "url.query") or (key == "http.target" and "?" in value):
            query = value if key == "url.query" else value.partition("?")[2]
            found[key] = [v for n, v in parse_qsl(query, keep_blank_values=True) if n == name]
    return found


def _raw_forms(raw: str) -> list[str]:
    from urllib.parse import quote_plus

    return sorted({raw, quote(raw, safe=""), quote_plus(raw, safe="")})


def test_every_value_of_an_identity_query_param_is_pseudonymized_in_the_url(instrument, exporter,
                                                                           tmp_path, semconv):
    """?user_id=alice&user_id=bob: the app serves bob, so does the ambient user, and only bob's raw
    id was replaced in the URL: alice's stayed in clear (also in the path), and with an empty last
    value (no user) both. Each value is replaced by the pseudonym of the value the app reads, in
    every form the instrumentation gives the query: as sent, percent-decoded (where %26 and %23 read
    as & and #), re-encoded by its redaction of a signed URL (sig=)."""
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(_TWO_SOURCES)
    instrument(pathmap)
    app = FastAPI()
    served = []

    @app.get("/users/{user}/runs")
    def runs(user: str, request: Request) -> dict:
        served.append(request.query_params.getlist("user_id"))
        return {}

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        served.append(websocket.query_params.getlist("user_id"))
        await websocket.send_json({"type": "hello"})
        await websocket.close()

    queries = [("alice", "user_id=alice&user_id=bob"), ("al ice", "user_id=al%20ice&page=2&user_id=b%2Bob"),
               ("al ice", "user_id=al+ice&user_id=bob&sig=s3cr3t"), ("a&lice", "user_id=a%26lice&user_id=a%23bob"),
               ("josé", "user%5Fid=jos%C3%A9&user_id=")]
    with TestClient(app) as client:
        for first, query in queries:  # the first id in the path too
            assert client.get(f"/users/{quote(first, safe='')}/runs?{query}").status_code == 200
        with client.websocket_connect("/ws?user_id=alice&user_id=bob") as ws:
            ws.receive_json()
    assert served == [["alice", "bob"], ["al ice", "b+ob"], ["al ice", "bob"], ["a&lice", "a#bob"],
                      ["josé", ""], ["alice", "bob"]]
    requests = [*spans_named(exporter, "GET /users/{user}/runs"), only_span(exporter, "HTTP /ws")]
    for request, values in zip(requests, served):
        expected = [pseudonym(value) if value else "" for value in values]
        found = _query_values(request)
        assert found and set(map(tuple, found.values())) == {tuple(expected)}, (values, found)
        if request.name != "HTTP /ws":
            path = attrs(request).get("url.path") or attrs(request)["http.target"]
            assert path == f"/users/{expected[0]}/runs", (values, path)
    assert attrs(requests[2])["http.url"].endswith("&sig=REDACTED")  # still the instrumentation's
    for raw in ("alice", "bob", "al ice", "b+ob", "a&lice", "a#bob", "josé"):
        for form in _raw_forms(raw):
            assert _leaks(exporter, form) == [], form


def test_every_id_the_identity_sources_read_is_pseudonymized_in_the_url(instrument, exporter, tmp_path,
                                                                       monkeypatch):
    """A header sent twice: the app and the ambient user read the first (dave), and the second
    (carol) stayed in clear in the URL; so did the id of an identity query parameter when the user
    came from the header (erin). The captured header has each value's pseudonym."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "x-user-id")
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(_TWO_SOURCES)
    instrument(pathmap)
    app = FastAPI()
    served = []

    @app.get("/users/{user}/runs")
    def runs(user: str, x_user_id: str = Header()) -> dict:
        served.append(x_user_id)
        return {}

    with TestClient(app) as client:
        client.get("/users/carol/runs?user_id=erin&owner=carol",
                   headers=[("x-user-id", "dave"), ("x-user-id", "carol")])
    assert served == ["dave"]
    request = attrs(only_span(exporter, "GET /users/{user}/runs"))
    assert request["enduser.pseudo.id"] == pseudonym("dave")
    assert request["http.request.header.x_user_id"] == (pseudonym("dave"), pseudonym("carol"))
    carol, erin = pseudonym("carol"), pseudonym("erin")
    assert request["http.url"].endswith(f"/users/{carol}/runs?user_id={erin}&owner={carol}")
    for raw in ("carol", "dave", "erin"):
        assert _leaks(exporter, raw) == []


def test_an_identity_query_param_sent_twice_is_scrubbed_when_an_outer_middleware_rejects(
        instrumented, exporter):
    """The span of a request pathwatch's middleware never sees is scrubbed at its end: of every
    value of the parameter too (the sample path map reads it for sockets: it is a user id in any
    URL), though no HTTP source gives this request a user."""
    with TestClient(_gated_app(), raise_server_exceptions=False) as client:
        assert client.get("/api/users/alice/runs?user_id=alice&user_id=bob").status_code == 401
    assert _leaks(exporter, "alice") == _leaks(exporter, "bob") == []
    url = attrs(only_span(exporter, "GET /api/users/{user_id}/runs"))["http.url"]
    alice, bob = pseudonym("alice"), pseudonym("bob")
    assert url.endswith(f"/api/users/{alice}/runs?user_id={alice}&user_id={bob}")


def test_sockets_with_an_identity_query_param_sent_twice_are_scrubbed_anew_after_a_reinstrument(
        instrument, exporter, tmp_path):
    """A socket open across uninstrument() / instrument(): its span is scrubbed again under the new
    setting, from the URL as sent: no raw id the old setting allowed, no old key's pseudonym, for
    each value of the parameter, not only the ambient user's."""
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(_TWO_SOURCES)
    old_key, new_key = "rotated-key-a-0123456789", "rotated-key-b-0123456789"
    instrument(pathmap, pseudonymizer=Pseudonymizer(None, allow_raw=True))
    app = FastAPI()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"type": "hello"})
        await websocket.receive_text()
        await websocket.close()

    with TestClient(app) as client:
        with client.websocket_connect("/ws?user_id=alice&user_id=bob") as raw_socket:
            raw_socket.receive_json()
            instrumentation.uninstrument()
            instrument(pathmap, pseudonymizer=Pseudonymizer(old_key.encode()))
            with client.websocket_connect("/ws?user_id=carol&user_id=dave") as keyed_socket:
                keyed_socket.receive_json()
                instrumentation.uninstrument()
                instrument(pathmap, pseudonymizer=Pseudonymizer(new_key.encode()))
                keyed_socket.send_text("bye")
            raw_socket.send_text("bye")
    sockets = {attrs(s)["http.url"].rpartition("/")[2]: s for s in spans_named(exporter, "HTTP /ws")}
    assert sorted(sockets) == sorted(
        f"ws?user_id={pseudonym(a, new_key)}&user_id={pseudonym(b, new_key)}"
        for a, b in (("alice", "bob"), ("carol", "dave"))), sorted(sockets)
    assert _leaks(exporter, "carol") == _leaks(exporter, "dave") == []
    old = [pseudonym(raw, old_key) for raw in ("alice", "bob", "carol", "dave")]
    for span in sockets.values():  # the other spans keep the setting they were made under
        assert not [(key, value) for key, value in attrs(span).items()
                    if any(text in str(value) for text in ("alice", "bob", *old))]


def test_a_url_that_cannot_be_scrubbed_is_exported_redacted_and_the_request_described(
        instrumented, exporter, monkeypatch):
    """Scrubbing that raised left the middleware's description half made: the URL in clear, the
    request without its ambient user and stamp."""
    from instrumentation import fastapi as pathwatch_fastapi

    def broken(*args):
        raise RuntimeError("scrubbing failed")

    monkeypatch.setattr(pathwatch_fastapi, "_scrub_user", broken)
    app = FastAPI()

    @app.get("/users/{user}/runs")
    async def runs(user: str) -> dict:
        return {}

    with TestClient(app) as client:
        assert client.get("/users/alice/runs", headers={"x-user-id": "alice"}).status_code == 200
    request = attrs(only_span(exporter, "GET /users/{user}/runs"))
    assert request["http.url"] == request["http.target"] == "[REDACTED]"
    assert request["enduser.pseudo.id"] == pseudonym("alice")
    assert _leaks(exporter, "alice") == []


def test_the_span_of_a_mounted_app_keeps_no_raw_user_id(instrumented, exporter):
    """An app mounted in another gets the FastAPI instrumentation too: its request span is
    INTERNAL (the outer app's server span is current), and pathwatch's hook left every span that
    is not SERVER as it was: the raw id in its URL and an exception's message naming the user."""
    outer, api = FastAPI(), FastAPI()

    @api.get("/users/{user_id}/runs")
    async def runs(user_id: str, fail: int = 0) -> dict:
        if fail:
            raise KeyError(user_id)  # the app's own bug, naming its user
        return {}

    outer.mount("/v1", api)
    with TestClient(outer, raise_server_exceptions=False) as client:
        assert client.get("/v1/users/alice/runs?user_id=alice&user_id=bob").status_code == 200
        assert client.get("/v1/users/alice/runs?user_id=alice&fail=1").status_code == 500
    assert _leaks(exporter, "alice") == _leaks(exporter, "bob") == []
    served, failed = spans_named(exporter, "GET /users/{user_id}/runs")
    alice, bob = pseudonym("alice"), pseudonym("bob")
    assert attrs(served)["http.url"].endswith(f"/v1/users/{alice}/runs?user_id={alice}&user_id={bob}")
    assert [dict(event.attributes) for event in failed.events] == [
        {"exception.type": "KeyError", "exception.escaped": False}]
    assert "pathwatch.kind" not in attrs(served)  # the outer app's span is the request's
    assert [attrs(span)["pathwatch.kind"] for span in spans_named(exporter, "GET /v1")] == ["request"] * 2
