"""pathwatch's own failures never reach the backend: the call proceeds, the error is counted, logged once."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import pytest

from instrumentation.errors import errors
from instrumentation.runtime import state
from tests.instrumentation.helpers import attrs, only_span, pseudonym, spans_named
from tests.instrumentation.sample.engines import (BrokenContext, SlotEngine, UserContext,
                                                  UserExecutionEngine)


def test_a_raising_property_in_an_extractor_is_counted_and_logged_once(instrumented, exporter, caplog):
    engine = UserExecutionEngine()
    with caplog.at_level(logging.WARNING, logger="instrumentation"):
        assert engine.execute_agent(BrokenContext()) == "done:run-broken"
        assert engine.execute_agent(BrokenContext()) == "done:run-broken"
    assert errors.count == 2
    logged = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert len(logged) == 1 and "RuntimeError" in logged[0]
    assert "property exploded" not in logged[0]  # the type only: a message may quote a user id
    spans = spans_named(exporter, "execution_engine.execute_agent")
    assert len(spans) == 2
    assert attrs(spans[0])["pathwatch.run.id"] == "run-broken"  # other extractors still work
    assert "pathwatch.user.subject" not in attrs(spans[0])


def test_odd_arguments_resolve_to_nothing(instrumented, exporter):
    engine = UserExecutionEngine()
    assert engine.execute_pipeline("ab", 42, user_context="not-a-context") == 2
    span = attrs(only_span(exporter, "execution_engine.execute_pipeline"))
    assert "pathwatch.user.subject" not in span and "pathwatch.run.id" not in span
    assert errors.count == 0


def test_missing_arguments_still_raise_the_apps_type_error(instrumented):
    with pytest.raises(TypeError):
        UserExecutionEngine().execute_agent()


def test_a_failing_tracer_does_not_break_the_call(instrumented, exporter, monkeypatch):
    class ExplodingTracer:
        def start_span(self, *args, **kwargs):
            raise RuntimeError("tracer exploded")

    monkeypatch.setattr(state, "setting", (state.pseudonymizer, ExplodingTracer()))
    assert UserExecutionEngine().execute_agent(UserContext("alice", run_id="r1")) == "done:r1"
    assert asyncio.run(UserExecutionEngine().execute_async(UserContext("alice", run_id="r2"))) == "async:r2"
    assert list(UserExecutionEngine().stream_steps(UserContext("alice"))) == [0, 1, 2]
    assert errors.count == 3


def test_a_raising_owner_property_does_not_break_construction(instrument, exporter, tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(
        "version: 1\nroles:\n  engine:\n    kind: execute\n"
        "    implementations: [tests.instrumentation.sample.engines.UserExecutionEngine]\n"
        "    methods: [execute_agent]\n    user_scoped: true\n    owner: [self.user_context.user_id]\n")
    instrument(pathmap)
    engine = UserExecutionEngine(BrokenContext())  # owner path raises inside __init__'s wrapper
    assert engine.execute_agent(UserContext("alice")) == "done:run-1"
    assert errors.count == 1
    assert "pathwatch.user.owner" not in attrs(only_span(exporter, "engine.execute_agent"))


def test_objects_without_weakref_get_no_token_but_a_span_with_their_owner(instrumented, exporter, caplog):
    with caplog.at_level(logging.WARNING, logger="instrumentation"):
        for _ in range(3):
            assert SlotEngine(UserContext("alice")).execute_agent(UserContext("bob")) == "slots"
    spans = spans_named(exporter, "slot_engine.execute_agent")
    assert len(spans) == 3  # a span for each call, token or not
    for span in spans:
        span = attrs(span)
        assert "pathwatch.instance.id" not in span
        assert span["pathwatch.user.owner"] == pseudonym("alice")  # read at the call
    assert errors.count == 0
    warned = [r.getMessage() for r in caplog.records if "cannot be weakly referenced" in r.getMessage()]
    assert len(warned) == 1 and "tests.instrumentation.sample.engines.SlotEngine" in warned[0]
    assert "alice" not in warned[0]


def test_a_named_tuple_owner_is_read_at_each_call(instrument, exporter, tmp_path):
    module = tmp_path / "tuple_engines.py"
    module.write_text(
        "import typing\n"
        "class TupleEngine(typing.NamedTuple):\n"
        "    user_id: str\n"
        "    def execute_agent(self, context):\n"
        "        return 'tuple:' + self.user_id\n")
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(
        "version: 1\nroles:\n  engine:\n    kind: execute\n"
        "    implementations: [tuple_engines.TupleEngine]\n"
        "    methods: [execute_agent]\n    user_scoped: true\n    owner: [self.user_id]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        instrument(pathmap)
        from tuple_engines import TupleEngine

        assert TupleEngine("alice").execute_agent(None) == "tuple:alice"
        assert TupleEngine("bob").execute_agent(None) == "tuple:bob"
        owners = [attrs(span).get("pathwatch.user.owner")
                  for span in spans_named(exporter, "engine.execute_agent")]
        assert owners == [pseudonym("alice"), pseudonym("bob")]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tuple_engines", None)


class _NoComparison:
    """Like a numpy array: ``!=`` is no bool (here it raises outright)."""

    def __ne__(self, other):
        raise TypeError("no comparisons")

    __eq__ = __ne__
    __hash__ = object.__hash__

    def __str__(self) -> str:
        return "run-7"


class _Ambiguous:
    """``!=`` answers with something that has no truth value (a numpy array of booleans)."""

    class _Elementwise:
        def __bool__(self):
            raise ValueError("the truth value of an array with more than one element is ambiguous")

    def __ne__(self, other):
        return self._Elementwise()

    __hash__ = object.__hash__


class _NoText:
    def __str__(self) -> str:
        raise RuntimeError("no text")


class _Context:
    def __init__(self, user_id, run_id="run-1", thread_id="thread-1"):
        self.user_id = user_id
        self.run_id = run_id
        self.thread_id = thread_id


@pytest.mark.parametrize("odd", [_NoComparison(), _Ambiguous(), _NoText()],
                         ids=["ne-raises", "ambiguous", "str-raises"])
def test_a_value_that_cannot_be_compared_or_made_text_loses_its_attribute_not_the_span(
        instrumented, exporter, odd):
    engine = UserExecutionEngine(_Context(odd))  # an odd owner
    assert engine.execute_agent(_Context(odd, thread_id="thread-9")) == "done:run-1"  # and subject
    assert UserExecutionEngine.validate(_Context("bob", run_id=odd, thread_id="thread-9"))  # run id
    call, static = (attrs(span) for span in spans_named(exporter, "execution_engine.execute_agent")
                    + spans_named(exporter, "execution_engine.validate"))
    assert "pathwatch.user.owner" not in call and "pathwatch.user.subject" not in call
    assert call["pathwatch.run.id"] == "run-1" and call["pathwatch.thread.id"] == "thread-9"
    assert "pathwatch.instance.id" in call
    assert "pathwatch.run.id" not in static and static["pathwatch.thread.id"] == "thread-9"
    assert static["pathwatch.user.subject"] == pseudonym("bob")
    assert errors.count >= 2  # each skipped attribute counted


def test_an_event_id_that_cannot_be_made_text_gets_one_of_pathwatchs(instrumented, exporter):
    from tests.instrumentation.sample.emitters import AgentWebSocketBridge, ConnectionManager

    bridge = AgentWebSocketBridge(ConnectionManager(), UserContext("alice"))
    asyncio.run(bridge.notify_agent_completed("run-1", event_id=_NoText()))
    emit = attrs(only_span(exporter, "event_emitter.notify_agent_completed"))
    assert emit["messaging.message.id"].startswith("e-")
    assert errors.count == 1


def test_an_identity_source_that_raises_falls_through_to_the_next(instrument, exporter, tmp_path):
    from fastapi import FastAPI
    from starlette.middleware import Middleware
    from starlette.testclient import TestClient

    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  http: [{scope: user.id}, {header: x-user-id}]\n")
    instrument(pathmap)

    class Broken:
        @property
        def id(self):
            raise RuntimeError("session store down")

    class Auth:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            scope["user"] = Broken()
            await self.app(scope, receive, send)

    app = FastAPI(middleware=[Middleware(Auth)])

    @app.get("/me")
    async def me() -> dict:
        return {}

    with TestClient(app) as client:
        assert client.get("/me", headers={"x-user-id": "alice"}).status_code == 200
    request = attrs(only_span(exporter, "GET /me"))
    assert request["enduser.pseudo.id"] == pseudonym("alice")
    assert request["pathwatch.entry_point"] == "/me"
    # a scope source listed first is read again at the request's spans and at its end (it may name
    # a user later): counted at each read, never raised
    assert errors.count >= 1


def _with_headroom(frames: int, call: Any) -> Any:
    """Run ``call()`` with only ``frames`` Python frames left before the interpreter's recursion limit."""
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back

    def dive(levels: int) -> Any:
        return call() if levels == 0 else dive(levels - 1)
    return dive(sys.getrecursionlimit() - depth - frames)


def _outcomes(call: Any) -> dict[int, Any]:
    outcomes = {}
    for frames in range(2, 60):
        try:
            outcomes[frames] = _with_headroom(frames, call)
        except RecursionError:
            outcomes[frames] = RecursionError
    return outcomes


@pytest.mark.parametrize("call", [
    lambda engine, context: engine.execute_agent(context),
    lambda engine, context: list(engine.stream_steps(context)),
], ids=["method", "generator"])
def test_a_call_near_the_recursion_limit_is_not_failed_by_pathwatch(instrument, exporter, call):
    # an app that recurses deeply (a tree walk, a retry loop) calls an engine with few frames left: what
    # pathwatch cannot start there is skipped (counted), the app's call goes on; only the wrapper's own
    # frame is taken from the app (as by any decorator)
    context = UserContext("alice", run_id="r1")
    bare = _outcomes(lambda: call(UserExecutionEngine(), context))
    instrument()
    traced = _outcomes(lambda: call(UserExecutionEngine(), context))
    fits = min(frames for frames, outcome in bare.items() if outcome is not RecursionError)
    assert bare[59] != RecursionError and fits < 30  # the range covers the call's own depth
    assert {frames: outcome for frames, outcome in traced.items() if frames > fits + 1} == \
        {frames: bare[59] for frames in bare if frames > fits + 1}
    assert errors.count > 0  # the skipped starts were counted
    assert exporter.get_finished_spans()  # with frames enough, traced as ever
