"""pathwatch's own failures never reach the backend: the call proceeds, the error is counted, logged once."""

from __future__ import annotations

import asyncio
import logging
import sys

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

    monkeypatch.setattr(state, "tracer", ExplodingTracer())
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
    for span in spans_named(exporter, "slot_engine.execute_agent"):
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
