"""User ids made with two HMAC keys are not compared (``pathwatch.pseudonym.key_id``): a key rotated
in a running backend, or rolled out process by process, gives one user two pseudonyms for a while,
and the bleed rules that compare users across spans paged them as two users."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from instrumentation.attributes import SpanKinds
from sidecar.detectors.bleed import BleedDetector
from sidecar.model import KEY_MARK, keyed_user
from sidecar.rules import (BLEED_OWNER_VS_AMBIENT, BLEED_SHARED_INSTANCE, BLEED_SPAN_VS_ROOT_USER,
                           BLEED_TARGET_VS_SOCKET_OWNER)
from tests.sidecar.detectors.factory import NOW, S, Trace, rules, state
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend, rotate_key

PATHMAP = """\
version: 1
identity:
  websocket: [{query_param: user_id}]
roles:
  execution_engine:
    kind: execute
    implementations: [{module}.Session]
    methods: [run]
    user_scoped: true
    owner: [self.user_id]
"""
BACKEND = """\
class Session:
    def __init__(self, user_id):
        self.user_id = user_id

    async def run(self, step):
        return f"{self.user_id}:{step}"
"""
ROTATED_KEY = "rotated-detector-key-not-secret"
_modules = itertools.count()


@pytest.fixture
def backend(tmp_path, monkeypatch):
    module = f"pw_keys_{next(_modules)}"  # a module is hooked once per name: a new one each test
    with instrumented_backend(tmp_path, monkeypatch, module, BACKEND, PATHMAP) as backend:
        yield backend


def session_app(backend_module) -> FastAPI:
    """Each user's socket runs steps on that user's session, kept for the app's life; a message
    naming ``use`` runs on another user's session (the bleed the rules are for)."""
    sessions: dict[str, object] = {}

    async def handler(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive_json()
                owner = message.get("use", user)
                session = sessions.setdefault(owner, backend_module.Session(owner))
                await websocket.send_json({"result": await session.run(message["step"])})
        except WebSocketDisconnect:
            pass

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    return app


@contextmanager
def alice_across_a_rotation(client: TestClient, exporter) -> Iterator[None]:
    """alice's socket runs step 1 under the backend's key and step 2 after the key is rotated; it
    stays open while the block runs."""
    with client.websocket_connect("/ws?user_id=alice") as alice:
        alice.send_json({"step": 1})
        assert alice.receive_json() == {"result": "alice:1"}
        rotate_key(exporter, ROTATED_KEY)
        alice.send_json({"step": 2})
        assert alice.receive_json() == {"result": "alice:2"}
        yield


def test_a_key_rotated_while_a_socket_is_open_is_not_paged(backend):
    """alice's socket stays open while the backend rotates its key: her first step ran under the
    old key, the socket's request span is stamped again under the new one when it ends, and her
    session (user-scoped, kept) serves her under both. Paged before as span_vs_root_user (the first
    step's user is not the socket's) and user_scoped_multi_user (the session served "two users")."""
    module, exporter = backend
    with TestClient(session_app(module)) as client, alice_across_a_rotation(client, exporter):
        pass
    spans = decoded(exporter)
    steps = [span for span in spans if span.kind == SpanKinds.EXECUTE]
    [socket] = [span for span in spans if span.kind == SpanKinds.REQUEST]
    # what the detector sees: one user, two keys — the second step's ids are the socket's
    first, second = steps
    assert first.user != second.user == socket.user and first.instance_id == second.instance_id
    assert first.user.split(KEY_MARK)[1] != second.user.split(KEY_MARK)[1] == socket.user_key
    bleed = BleedDetector(rules(), state())
    assert bleed.consume(spans, NOW) == []
    assert bleed.tick(NOW + 60 * S) == []
    assert bleed.keys_dropped == 2  # the first step against the socket; the session's two users


def test_after_a_rotation_a_session_serving_another_user_is_still_found(backend):
    """No true positive lost: under the new key, bob's socket runs a step on alice's session."""
    module, exporter = backend
    with TestClient(session_app(module)) as client, alice_across_a_rotation(client, exporter):
        with client.websocket_connect("/ws?user_id=bob") as bob:
            bob.send_json({"step": 3, "use": "alice"})
            assert bob.receive_json() == {"result": "alice:3"}
    spans = decoded(exporter)
    bobs_step = [span for span in spans if span.kind == SpanKinds.EXECUTE][-1]
    bleed = BleedDetector(rules(), state())
    findings = bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S)
    assert sorted((f.rule, f.span_id) for f in findings) == sorted([
        (BLEED_OWNER_VS_AMBIENT, bobs_step.span_id), (BLEED_SHARED_INSTANCE, bobs_step.span_id)])


KEY_A, KEY_B = "aaaaaaaa", "bbbbbbbb"


@pytest.mark.parametrize("emit_key, write_key, rule", [
    (KEY_A, KEY_B, None),  # two processes, two keys: not compared
    (KEY_A, KEY_A, BLEED_TARGET_VS_SOCKET_OWNER),  # one key, two users: the bleed
    (KEY_A, None, BLEED_TARGET_VS_SOCKET_OWNER),  # an older instrumentation's write: its id alone
])
@pytest.mark.parametrize("order", ["emit_first", "write_first"])
def test_an_event_written_by_a_process_with_another_key(emit_key, write_key, rule, order):
    """The emit in one process, its write in another (a fan-out through a broker) during a rolling
    key rotation: alice's event reaches alice's socket, but her two ids differ."""
    trace = Trace(user=keyed_user("alice-old", emit_key))
    emit = trace.emit("agent_started")
    socket_user = "alice-new" if write_key is None else keyed_user("alice-new", write_key)
    write = trace.deliver(emit, connection_user=socket_user, user=socket_user, parent_span_id=None)
    bleed = BleedDetector(rules(), state())
    spans = [emit, write] if order == "emit_first" else [write, emit]
    findings = bleed.consume(spans, NOW)
    assert [f.rule for f in findings] == ([] if rule is None else [rule])
    assert bleed.keys_dropped == (1 if rule is None else 0)


@pytest.mark.parametrize("dispatch_first", [True, False])
def test_a_dispatch_whose_write_names_another_key_is_not_compared(dispatch_first):
    trace = Trace(user=keyed_user("alice-old", KEY_A))
    dispatch = trace.dispatch(event_id=None)
    other_key = trace.deliver(dispatch, connection_user=keyed_user("alice-new", KEY_B), event_id=None,
                              start_ns=dispatch.start_ns)
    bleed = BleedDetector(rules(), state())
    spans = [dispatch, other_key] if dispatch_first else [other_key, dispatch]
    assert bleed.consume(spans, NOW) == []
    assert bleed.keys_dropped == 1
    trace = Trace(user=keyed_user("alice", KEY_A))  # the same key: the bleed
    dispatch = trace.dispatch(event_id=None)
    same_key = trace.deliver(dispatch, connection_user=keyed_user("bob", KEY_A), event_id=None,
                             start_ns=dispatch.start_ns)
    spans = [dispatch, same_key] if dispatch_first else [same_key, dispatch]
    assert [f.rule for f in bleed.consume(spans, NOW)] == [BLEED_TARGET_VS_SOCKET_OWNER]


def test_a_span_of_a_process_with_another_key_under_a_request_is_not_compared():
    """A request served by a process with the new key calls one still on the old key: the callee's
    spans carry the caller's user under another key (and one under the same key is the bleed)."""
    trace = Trace(user=keyed_user("alice-new", KEY_B))
    old = keyed_user("alice-old", KEY_A)
    other_key = trace.execute(user=old, owner=old, subject=old)
    mallory = keyed_user("mallory", KEY_B)
    same_key = trace.execute(user=mallory, owner=mallory, subject=mallory)
    bleed = BleedDetector(rules(), state())
    findings = bleed.consume([other_key, same_key, trace.request()], NOW)
    assert [(f.rule, f.span_id) for f in findings] == [(BLEED_SPAN_VS_ROOT_USER, same_key.span_id)]
    assert bleed.keys_dropped == 1
