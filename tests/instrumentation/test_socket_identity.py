"""A socket's user named after it connected: a first-message login the app stores in
``websocket.state`` (the path map's ``{scope: state.user_id}``), a logout and a login as another user
on the open socket. Read again at the socket's spans and writes (``identity.RequestInfo.reread``)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.testclient import TestClient

from instrumentation import attributes as A
from instrumentation.errors import errors
from tests.instrumentation.helpers import attrs, only_span, pseudonym, spans_named, spans_of_kind
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine

ALICE, BOB = pseudonym("alice"), pseudonym("bob")


def login_app(described: list | None = None, writer_task: bool = False) -> FastAPI:
    """A socket that logs in with a message (``{"type": "login"}``: its user stored in
    ``websocket.state``), logs out (``logout``), and runs an engine for its user (``run``), acked
    by a write: made in the socket's task, or by a writer task started at connect (before any
    login) with ``writer_task``."""
    app = FastAPI()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        if described is not None:
            described.append(websocket.scope["pathwatch.connection"])
        queue: asyncio.Queue = asyncio.Queue()
        writer = asyncio.create_task(_drain(websocket, queue)) if writer_task else None
        try:
            while True:
                message = await websocket.receive_json()
                if message["type"] == "login":
                    websocket.state.user_id = message["user_id"]
                    continue
                if message["type"] == "logout":
                    del websocket.state.user_id
                    continue
                user = getattr(websocket.state, "user_id", None) or websocket.query_params["user_id"]
                context = UserContext(user, run_id=message["run_id"])
                UserExecutionEngine(context).execute_agent(context, user_context=context)
                reply = {"type": "ack", "run_id": message["run_id"]}
                if writer is None:
                    await websocket.send_json(reply)
                else:
                    await queue.put(reply)
        except WebSocketDisconnect:
            if writer is not None:
                writer.cancel()

    return app


async def _drain(websocket: WebSocket, queue: asyncio.Queue) -> None:
    while True:
        await websocket.send_json(await queue.get())


def drive(app: FastAPI, url: str, *messages: dict) -> None:
    with TestClient(app) as client, client.websocket_connect(url) as ws:
        for message in messages:
            ws.send_json(message)
            if message["type"] == "run":
                assert ws.receive_json()["run_id"] == message["run_id"]


def runs(exporter) -> dict[str, dict]:
    """run id -> the attributes of its execute span."""
    return {attrs(span)[A.RUN_ID]: attrs(span) for span in spans_of_kind(exporter, "execute")}


def acks(exporter) -> dict[str, dict]:
    """run id -> the attributes of the write that acked it."""
    return {attrs(span)[A.RUN_ID]: attrs(span) for span in spans_named(exporter, "websocket.send_json")}


def test_a_socket_that_logs_in_with_its_first_message_has_that_user_from_then_on(instrumented,
                                                                                 exporter):
    drive(login_app(), "/ws?user_id=", {"type": "login", "user_id": "bob"},
          {"type": "run", "run_id": "r1"})
    run, ack = runs(exporter)["r1"], acks(exporter)["r1"]
    assert (run[A.ENDUSER_PSEUDO_ID], run[A.USER_OWNER]) == (BOB, BOB)  # no owner_vs_ambient
    assert (ack[A.CONNECTION_USER], ack[A.ENDUSER_PSEUDO_ID]) == (BOB, BOB)
    request = attrs(only_span(exporter, "HTTP /ws"))
    assert request[A.ENDUSER_PSEUDO_ID] == BOB
    assert request[A.CONNECTION_USERS] == (BOB,) and request[A.PSEUDONYM_KEY_ID]


def test_a_login_as_another_user_on_the_open_socket_is_its_user_from_then_on(instrumented, exporter):
    drive(login_app(), "/ws?user_id=alice", {"type": "run", "run_id": "r1"},
          {"type": "login", "user_id": "bob"}, {"type": "run", "run_id": "r2"})
    assert [runs(exporter)[run][A.ENDUSER_PSEUDO_ID] for run in ("r1", "r2")] == [ALICE, BOB]
    assert [acks(exporter)[run][A.CONNECTION_USER] for run in ("r1", "r2")] == [ALICE, BOB]
    request = attrs(only_span(exporter, "HTTP /ws"))
    assert request[A.ENDUSER_PSEUDO_ID] == BOB  # the socket's user when it closed
    assert request[A.CONNECTION_USERS] == (ALICE, BOB)


def test_a_logout_leaves_the_user_the_other_sources_name(instrumented, exporter):
    """``{scope: state.user_id}`` comes first: once the app deletes it, the query's user is the
    socket's again, as the sources read at connect (first that resolves wins)."""
    drive(login_app(), "/ws?user_id=alice", {"type": "login", "user_id": "bob"},
          {"type": "run", "run_id": "r1"}, {"type": "logout"}, {"type": "run", "run_id": "r2"})
    assert [acks(exporter)[run][A.CONNECTION_USER] for run in ("r1", "r2")] == [BOB, ALICE]
    request = attrs(only_span(exporter, "HTTP /ws"))
    assert (request[A.ENDUSER_PSEUDO_ID], request[A.CONNECTION_USERS]) == (ALICE, (ALICE, BOB))


def test_a_socket_logged_out_when_it_closes_still_lists_its_users_with_their_key(instrument, exporter,
                                                                               tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  websocket: [{scope: state.user_id}]\n")
    instrument(pathmap)
    drive(login_app(), "/ws?user_id=", {"type": "login", "user_id": "bob"},
          {"type": "run", "run_id": "r1"}, {"type": "logout"}, {"type": "run", "run_id": "r2"})
    assert A.CONNECTION_USER not in acks(exporter)["r2"]
    request = attrs(only_span(exporter, "HTTP /ws"))
    assert A.ENDUSER_PSEUDO_ID not in request
    assert request[A.CONNECTION_USERS] == (BOB,) and request[A.PSEUDONYM_KEY_ID]


@pytest.mark.parametrize("logins", [15, 17])
def test_a_socket_with_more_users_than_its_request_span_lists_says_so(instrumented, exporter, logins):
    """alice's socket, then one login (and run) after another: the request span lists its first 16 users
    (bounded) and, past them, says its list is not whole (before: nothing said so, and the sidecar
    judged the work of a user not listed as another user's: a critical span_vs_root_user)."""
    names = [f"user-{n}" for n in range(logins)]
    steps = [({"type": "login", "user_id": name}, {"type": "run", "run_id": name}) for name in names]
    drive(login_app(), "/ws?user_id=alice", *(message for step in steps for message in step))
    request = attrs(only_span(exporter, "HTTP /ws"))
    assert request[A.ENDUSER_PSEUDO_ID] == pseudonym(names[-1])
    assert request[A.CONNECTION_USERS] == tuple(map(pseudonym, ["alice", *names]))[:A.MAX_CONNECTION_USERS]
    assert request.get(A.CONNECTION_USERS_TRUNCATED) is (True if logins == 17 else None)


def test_a_writer_task_started_before_the_login_writes_as_the_sockets_user_of_each_write(instrumented,
                                                                                        exporter):
    drive(login_app(writer_task=True), "/ws?user_id=alice", {"type": "run", "run_id": "r1"},
          {"type": "login", "user_id": "bob"}, {"type": "run", "run_id": "r2"})
    assert [acks(exporter)[run][A.CONNECTION_USER] for run in ("r1", "r2")] == [ALICE, BOB]


def test_a_socket_that_never_changes_user_lists_none_and_a_fixed_source_first_is_never_read_again(
        instrument, exporter, tmp_path):
    """A source read from what the client sent at connect (query, header, JWT, path) before the
    ``scope`` source, naming a user: it wins for the socket's life, so nothing is read again (no
    cost at its spans and writes), and the app's login is not the socket's user."""
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  websocket: [{query_param: user_id}, {scope: state.user_id}]\n")
    instrument(pathmap)
    described: list = []
    drive(login_app(described), "/ws?user_id=alice", {"type": "login", "user_id": "bob"},
          {"type": "run", "run_id": "r1"})
    assert acks(exporter)["r1"][A.CONNECTION_USER] == ALICE
    assert A.CONNECTION_USERS not in attrs(only_span(exporter, "HTTP /ws"))
    assert [info._live for info in described] == [None]


def test_a_scope_source_that_raises_after_connect_is_counted_and_the_next_source_read(instrument,
                                                                                      exporter,
                                                                                      tmp_path):
    class Broken:
        @property
        def id(self) -> str:
            raise RuntimeError("no user")

    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  websocket: [{scope: state.user.id}, {query_param: user_id}]\n")
    instrument(pathmap)
    app = FastAPI()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_json()
        websocket.state.user = Broken()
        await websocket.send_json({"type": "ack"})
        await websocket.close()

    with TestClient(app) as client, client.websocket_connect("/ws?user_id=alice") as ws:
        ws.send_json({"type": "login"})
        assert ws.receive_json() == {"type": "ack"}
    assert attrs(only_span(exporter, "websocket.send_json"))[A.CONNECTION_USER] == ALICE
    assert errors.count >= 1


def test_a_socket_whose_user_at_connect_cannot_be_made_text_still_follows_a_later_login(instrumented,
                                                                                       exporter):
    """The scope holds, when the socket connects, a user whose text raises (an ORM object whose
    ``__str__`` reads an expired attribute): no user then, counted; the login message after it is
    the socket's user from then on (before, the socket's ``scope`` sources were dropped with that
    user: never read again, every later span and write of the socket carried no user)."""
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("detached")

    app = login_app()
    inner = app.build_middleware_stack

    def with_state_at_connect():
        stack = inner()

        async def call(scope, receive, send):
            if scope["type"] == "websocket":
                scope.setdefault("state", {})["user_id"] = Unprintable()
            await stack(scope, receive, send)
        return call
    app.build_middleware_stack = with_state_at_connect
    drive(app, "/ws?user_id=", {"type": "login", "user_id": "bob"}, {"type": "run", "run_id": "r1"})
    assert errors.count >= 1
    assert runs(exporter)["r1"][A.ENDUSER_PSEUDO_ID] == BOB
    assert acks(exporter)["r1"][A.CONNECTION_USER] == BOB
    assert attrs(only_span(exporter, "HTTP /ws"))[A.ENDUSER_PSEUDO_ID] == BOB


def test_a_user_stored_after_a_login_whose_text_cannot_be_made_is_no_user_not_the_one_before(
        instrumented, exporter):
    """alice logs in, then the app stores a user object whose ``__str__`` raises: counted, and the
    socket has no user, as when such a user is in the scope at connect. Before, alice, whom the app
    had replaced, stayed the socket's user: its next run was stamped as hers."""
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("detached")

    app = FastAPI()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        for run, user in (("r1", "alice"), ("r2", Unprintable())):
            websocket.state.user_id = user
            context = UserContext("alice", run_id=run)
            UserExecutionEngine(context).execute_agent(context)
            await websocket.send_json({"type": "ack", "run_id": run})
        await websocket.close()

    with TestClient(app) as client, client.websocket_connect("/ws?user_id=") as ws:
        ws.receive_json()
        ws.receive_json()
    assert [runs(exporter)[run].get(A.ENDUSER_PSEUDO_ID) for run in ("r1", "r2")] == [ALICE, None]
    assert [acks(exporter)[run].get(A.CONNECTION_USER) for run in ("r1", "r2")] == [ALICE, None]
    assert errors.count >= 1
