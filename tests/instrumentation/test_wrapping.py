"""Wrapping at import time: every method kind, subclasses, globs, late imports, uninstrument."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import inspect
import sys
import textwrap
import traceback
import warnings
import weakref

import pytest
from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY

import instrumentation
from tests.instrumentation.helpers import attrs, only_span, pseudonym, spans_named, spans_of_kind
from tests.instrumentation.sample import engines
from tests.instrumentation.sample.engines import (ExecutionEngine, IsolatedExecutionEngine,
                                                  RequestScopedExecutionEngine, UserContext,
                                                  UserExecutionEngine)

MOD = "tests.instrumentation.sample.engines"


def test_sync_method_span(instrumented, exporter):
    engine = UserExecutionEngine(UserContext("alice"))
    assert engine.execute_agent(UserContext("alice", run_id="r1")) == "done:r1"
    span = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert span["pathwatch.kind"] == "execute"
    assert span["code.function.name"] == f"{MOD}.UserExecutionEngine.execute_agent"
    assert span["pathwatch.implementation"] == f"{MOD}.UserExecutionEngine"
    assert span["pathwatch.canonical"] is True and span["pathwatch.retired"] is False
    assert span["pathwatch.nested"] is False
    assert span["pathwatch.run.id"] == "r1" and span["pathwatch.thread.id"] == "thread-1"
    assert isinstance(span["thread.id"], int)


def test_async_method_span(instrumented, exporter):
    engine = UserExecutionEngine(UserContext("alice"))
    assert asyncio.run(engine.execute_async(UserContext("alice", run_id="r2"))) == "async:r2"
    assert attrs(only_span(exporter, "execution_engine.execute_async"))["pathwatch.run.id"] == "r2"


def test_generator_span_covers_the_whole_iteration(instrumented, exporter):
    engine = UserExecutionEngine(UserContext("alice"))
    steps = engine.stream_steps(UserContext("alice", run_id="r3"), count=3)
    assert inspect.isgenerator(steps)
    assert next(steps) == 0
    assert spans_named(exporter, "execution_engine.stream_steps") == []  # still iterating
    assert list(steps) == [1, 2]
    span = only_span(exporter, "execution_engine.stream_steps")
    assert attrs(span)["pathwatch.run.id"] == "r3"


def test_generator_closed_early_ends_its_span(instrumented, exporter):
    steps = UserExecutionEngine().stream_steps(UserContext("alice"), count=5)
    assert next(steps) == 0
    steps.close()
    assert only_span(exporter, "execution_engine.stream_steps").status.is_ok


def test_async_generator_span_covers_the_whole_iteration(instrumented, exporter):
    engine = UserExecutionEngine(UserContext("alice"))
    seen_during: list[int] = []

    async def consume() -> list[int]:
        items = []
        async for item in engine.astream_steps(UserContext("alice", run_id="r4"), count=3):
            items.append(item)
            seen_during.append(len(spans_named(exporter, "execution_engine.astream_steps")))
        return items

    assert asyncio.run(consume()) == [0, 1, 2]
    assert seen_during == [0, 0, 0]
    assert attrs(only_span(exporter, "execution_engine.astream_steps"))["pathwatch.run.id"] == "r4"


def test_classmethod_and_staticmethod(instrumented, exporter):
    built = UserExecutionEngine.build(UserContext("alice", run_id="r5"))
    assert type(built) is UserExecutionEngine
    assert RequestScopedExecutionEngine.build(UserContext("bob")).__class__ is RequestScopedExecutionEngine
    assert UserExecutionEngine.validate(UserContext("alice")) is True
    builds = spans_named(exporter, "execution_engine.build")
    assert [attrs(s)["pathwatch.implementation"] for s in builds] == [
        f"{MOD}.UserExecutionEngine", f"{MOD}.RequestScopedExecutionEngine"]
    assert all("pathwatch.instance.id" not in attrs(s) for s in builds)
    static = attrs(only_span(exporter, "execution_engine.validate"))
    assert static["pathwatch.implementation"] == f"{MOD}.UserExecutionEngine"


def test_inherited_method_from_an_unlisted_base_is_wrapped_on_the_listed_class(instrumented, exporter):
    assert UserExecutionEngine().execute_pipeline([1, 2], UserContext("alice")) == 2
    span = attrs(only_span(exporter, "execution_engine.execute_pipeline"))
    assert span["code.function.name"] == f"{MOD}.BaseEngine.execute_pipeline"
    assert span["pathwatch.implementation"] == f"{MOD}.UserExecutionEngine"
    assert "execute_pipeline" not in engines.BaseEngine.__dict__ or \
        not hasattr(engines.BaseEngine.__dict__["execute_pipeline"], "__wrapped__")


def test_signatures_and_introspection_are_preserved(instrumented):
    for name in ("execute_agent", "execute_async", "stream_steps", "astream_steps"):
        original = getattr(UserExecutionEngine, name).__wrapped__
        assert inspect.signature(getattr(UserExecutionEngine, name)) == inspect.signature(original)
    assert UserExecutionEngine.execute_agent.__name__ == "execute_agent"
    assert UserExecutionEngine.execute_agent.__doc__ == "Run one agent."
    assert inspect.iscoroutinefunction(UserExecutionEngine.execute_async)
    assert inspect.isgeneratorfunction(UserExecutionEngine.stream_steps)
    assert inspect.isasyncgenfunction(UserExecutionEngine.astream_steps)
    assert str(inspect.signature(UserExecutionEngine().execute_agent)) == \
        "(context: 'UserContext', user_context: 'UserContext | None' = None) -> 'str'"


def test_glob_covers_every_matching_class_and_retired_is_marked(instrumented, exporter):
    IsolatedExecutionEngine().execute_agent(UserContext("alice"))
    span = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert span["pathwatch.implementation"] == f"{MOD}.IsolatedExecutionEngine"
    assert span["pathwatch.retired"] is True and span["pathwatch.canonical"] is False


def test_listed_subclass_override_delegating_to_parent_is_nested(instrumented, exporter):
    RequestScopedExecutionEngine(UserContext("alice")).execute_agent(UserContext("alice"))
    outer, inner = sorted(spans_named(exporter, "execution_engine.execute_agent"),
                          key=lambda s: s.start_time)
    assert attrs(outer)["pathwatch.nested"] is False
    assert attrs(inner)["pathwatch.nested"] is True
    assert inner.parent.span_id == outer.context.span_id
    assert attrs(outer)["code.function.name"] == f"{MOD}.RequestScopedExecutionEngine.execute_agent"
    assert attrs(inner)["code.function.name"] == f"{MOD}.UserExecutionEngine.execute_agent"
    # both report the instance's own class
    assert {attrs(s)["pathwatch.implementation"] for s in (outer, inner)} == {
        f"{MOD}.RequestScopedExecutionEngine"}
    assert "pathwatch.caller" in attrs(outer) and "pathwatch.caller" not in attrs(inner)


def test_a_nested_call_names_the_call_of_its_role_it_runs_inside_whatever_spans_sit_between(
        instrumented, exporter, provider):
    """An adapter that reaches the canonical engine through an LLM client's span: the engine's span
    is nested, its parent is that span, and it names the adapter's span as the call it runs in."""
    llm = provider.get_tracer("llm-client")

    class Adapter(UserExecutionEngine):  # a subclass defined later: wrapped as one of the role
        def execute_agent(self, context, user_context=None):
            with llm.start_as_current_span("llm.call"):
                return UserExecutionEngine(UserContext("alice")).execute_agent(context)

    Adapter(UserContext("alice")).execute_agent(UserContext("alice"))
    outer, inner = sorted(spans_named(exporter, "execution_engine.execute_agent"),
                          key=lambda s: s.start_time)
    [between] = spans_named(exporter, "llm.call")
    assert inner.parent.span_id == between.context.span_id
    assert attrs(inner)["pathwatch.nested"] is True
    assert attrs(inner)["pathwatch.nested.outer_span_id"] == format(outer.context.span_id, "016x")
    assert "pathwatch.nested.outer_span_id" not in attrs(outer)


def test_alias_redirect_is_nested(instrumented, exporter):
    ExecutionEngine(UserContext("alice")).execute_agent(UserContext("alice"))
    spans = sorted(spans_named(exporter, "execution_engine.execute_agent"), key=lambda s: s.start_time)
    assert [attrs(s)["pathwatch.implementation"] for s in spans] == [
        f"{MOD}.ExecutionEngine", f"{MOD}.UserExecutionEngine"]
    assert [attrs(s)["pathwatch.nested"] for s in spans] == [False, True]


def test_unlisted_subclass_defined_later_is_covered_with_its_own_overrides(instrumented, exporter):
    class LocalEngine(UserExecutionEngine):
        def execute_agent(self, context, user_context=None):
            return "local"

        def execute_async(self, context, *, delay=0.0):  # a sync override of an async method
            return "sync"

    engine = LocalEngine(UserContext("alice"))
    assert engine.execute_agent(UserContext("alice")) == "local"
    assert engine.execute_async(UserContext("alice")) == "sync"
    engine.execute_pipeline([], UserContext("alice"))  # inherited from the listed class's wrapper
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["execution_engine.execute_agent", "execution_engine.execute_async",
                     "execution_engine.execute_pipeline"]
    implementation = f"{__name__}.test_unlisted_subclass_defined_later_is_covered_with_its_own_overrides.<locals>.LocalEngine"
    assert {attrs(s)["pathwatch.implementation"] for s in exporter.get_finished_spans()} == {implementation}
    assert all(attrs(s)["pathwatch.canonical"] is False for s in exporter.get_finished_spans())


def test_subclass_defined_before_instrument_is_covered(instrument, exporter):
    class EarlyEngine(UserExecutionEngine):
        def execute_agent(self, context, user_context=None):
            return "early"

    instrument()
    EarlyEngine().execute_agent(UserContext("alice"))
    span = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert span["pathwatch.implementation"].endswith("EarlyEngine")


def test_instance_tokens_are_stable_and_distinct(instrumented, exporter):
    first, second = UserExecutionEngine(), UserExecutionEngine()
    first.execute_agent(UserContext("alice"))
    first.execute_agent(UserContext("alice"))
    second.execute_agent(UserContext("alice"))
    tokens = [attrs(s)["pathwatch.instance.id"] for s in spans_named(exporter, "execution_engine.execute_agent")]
    assert tokens[0] == tokens[1] != tokens[2]


def test_instance_tokens_are_not_reused_when_ids_are(instrumented, exporter):
    tokens = set()
    for _ in range(50):  # CPython reuses the freed object's address (and id) at once
        UserExecutionEngine().execute_agent(UserContext("alice"))
    for span in spans_named(exporter, "execution_engine.execute_agent"):
        tokens.add(attrs(span)["pathwatch.instance.id"])
    assert len(tokens) == 50


def test_caller_is_the_nearest_frame_outside_pathwatch_and_the_role(instrumented, exporter):
    def endpoint_handler():
        return ExecutionEngine(UserContext("alice")).execute_agent(UserContext("alice"))

    endpoint_handler()
    outer = [s for s in spans_named(exporter, "execution_engine.execute_agent")
             if not attrs(s)["pathwatch.nested"]][0]
    assert attrs(outer)["pathwatch.caller"] == \
        f"{__name__}.test_caller_is_the_nearest_frame_outside_pathwatch_and_the_role.<locals>.endpoint_handler"


def test_caller_of_a_coroutine_or_generator_method_is_the_frame_that_calls_it(instrumented, exporter):
    engine = UserExecutionEngine()

    def make_calls():  # the caller: who calls the method, not who awaits or steps what it returns
        return (engine.execute_async(UserContext("alice")), engine.stream_steps(UserContext("alice")),
                engine.astream_steps(UserContext("alice")))

    async def consume(coroutine, generator, async_generator):
        await coroutine
        list(generator)
        return [step async for step in async_generator]

    assert asyncio.run(consume(*make_calls())) == [0, 1, 2]
    expected = f"{__name__}.{make_calls.__qualname__}"
    for name in ("execute_async", "stream_steps", "astream_steps"):
        assert attrs(only_span(exporter, f"execution_engine.{name}"))["pathwatch.caller"] == expected


def test_the_apps_exception_passes_through_unchanged(instrumented, exporter):
    engine = UserExecutionEngine()
    with pytest.raises(ValueError) as caught:
        engine.fail(UserContext("alice"))
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-1] == "fail"  # the original raising frame is still there
    span = only_span(exporter, "execution_engine.fail")
    assert not span.status.is_ok
    assert span.events[0].name == "exception"
    assert span.events[0].attributes["exception.type"] == "ValueError"
    # the message may quote a user id: only the type leaves the process
    assert "exception.message" not in span.events[0].attributes
    assert str(caught.value) not in (span.status.description or "")


def test_the_same_exception_object_is_reraised(instrumented):
    original = ValueError("mine")

    class Raising(UserExecutionEngine):
        def execute_agent(self, context, user_context=None):
            raise original

    with pytest.raises(ValueError) as caught:
        Raising().execute_agent(UserContext("alice"))
    assert caught.value is original


def test_async_exception_passes_through(instrumented, exporter):
    class AsyncRaising(UserExecutionEngine):
        async def execute_async(self, context, *, delay=0.0):
            raise KeyError("k")

    with pytest.raises(KeyError):
        asyncio.run(AsyncRaising().execute_async(UserContext("alice")))
    assert not only_span(exporter, "execution_engine.execute_async").status.is_ok


def test_an_execute_call_cancelled_with_its_task_says_so(instrumented, exporter):
    """A run the app cancels (its user stopped it; its socket closed and the handler cancelled its
    runs) ends its engine call with CancelledError: the span says ``pathwatch.cancelled`` besides its
    error status, so the sidecar does not count the events the run never got to as missing (each
    such run was a delivery.missing_required_events: /tmp/s32_fp/sc_slow.py, phase E). A call that
    raised anything else does not say it, nor does one that returned."""
    class Waiting(UserExecutionEngine):
        async def execute_async(self, context, *, delay=0.0):
            self.started.set()
            if context.run_id != "ok":
                await asyncio.Event().wait()  # an LLM that never answers
            return "done"

    async def scenario():
        engine = Waiting(UserContext("alice"))
        engine.started = asyncio.Event()
        task = asyncio.create_task(engine.execute_async(UserContext("alice", run_id="rc")))
        await engine.started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()  # the CancelledError still reaches the app
        with pytest.raises(asyncio.TimeoutError):  # a timeout around the call: it is cancelled too
            await asyncio.wait_for(engine.execute_async(UserContext("alice", run_id="rt")), 0.01)
        await engine.execute_async(UserContext("alice", run_id="ok"))

    asyncio.run(scenario())
    spans = {attrs(span)["pathwatch.run.id"]: span
             for span in spans_named(exporter, "execution_engine.execute_async")}
    assert attrs(spans["rc"]).get("pathwatch.cancelled") is True and not spans["rc"].status.is_ok
    assert attrs(spans["rt"]).get("pathwatch.cancelled") is True
    assert "pathwatch.cancelled" not in attrs(spans["ok"])
    with pytest.raises(ValueError):
        UserExecutionEngine().fail(UserContext("alice"))
    assert "pathwatch.cancelled" not in attrs(only_span(exporter, "execution_engine.fail"))


def test_a_streaming_execute_call_closed_as_its_consumers_task_is_cancelled_says_so(
        instrumented, exporter):
    """A streaming engine (a generator or async generator method: the span covers the iteration)
    whose consumer's task is cancelled between two steps -- while it writes the last item to the
    socket, runs a tool -- gets no CancelledError: it is closed (``aclosing``, or dropped by the
    unwinding frame), GeneratorExit. Its span said nothing, so the cancelled run was a
    delivery.missing_required_events (/tmp/s32_review2/exp/test_exp_cancel.py). Closed while its
    consumer's task is being cancelled, it says ``pathwatch.cancelled``; closed early otherwise (a
    ``break``, no task at all) it does not. The app's CancelledError reaches it unchanged."""
    class Streaming(UserExecutionEngine):
        def stream_steps(self, context, count=3):
            yield from range(count)

        async def astream_steps(self, context, count=3):
            for index in range(count):
                yield index

    engine = Streaming(UserContext("alice"))

    async def consume(run_id: str, first: asyncio.Event) -> None:
        if run_id == "async-gen":
            async with contextlib.aclosing(engine.astream_steps(UserContext("alice", run_id=run_id))) as steps:
                async for _ in steps:
                    first.set()
                    await asyncio.Event().wait()  # a socket write that never ends
        else:  # nothing else holds it: closed as the CancelledError unwinds the loop
            for _ in engine.stream_steps(UserContext("alice", run_id=run_id)):
                first.set()
                await asyncio.Event().wait()

    async def scenario() -> None:
        for run_id in ("sync-gen", "async-gen"):
            first = asyncio.Event()
            task = asyncio.create_task(consume(run_id, first))
            await first.wait()
            task.cancel("stopped")
            with pytest.raises(asyncio.CancelledError) as cancelled:
                await task
            assert cancelled.value.args == ("stopped",) and task.cancelled()
        steps = engine.astream_steps(UserContext("alice", run_id="break"))
        async for _ in steps:
            break
        await steps.aclose()

    asyncio.run(scenario())
    steps = engine.stream_steps(UserContext("alice", run_id="no-task"))
    assert next(steps) == 0
    steps.close()
    spans = {attrs(span)["pathwatch.run.id"]: span for name in ("stream_steps", "astream_steps")
             for span in spans_named(exporter, f"execution_engine.{name}")}
    assert attrs(spans["sync-gen"]).get("pathwatch.cancelled") is True
    assert attrs(spans["async-gen"]).get("pathwatch.cancelled") is True
    assert "pathwatch.cancelled" not in attrs(spans["no-task"]) and spans["no-task"].status.is_ok
    assert "pathwatch.cancelled" not in attrs(spans["break"]) and spans["break"].status.is_ok


class _Streaming(UserExecutionEngine):
    """A streaming engine that tells when it is closed (``closed[run_id]``, set in its finally) and,
    for thread ``waits``, waits inside its first step (an LLM that never answers)."""

    def __init__(self, user_context=None):
        super().__init__(user_context)
        self.closed = collections.defaultdict(asyncio.Event)
        self.stepping = asyncio.Event()

    def stream_steps(self, context, count=3):
        try:
            yield from range(count)
        finally:
            self.closed[context.run_id].set()

    async def astream_steps(self, context, count=3):
        try:
            for index in range(count):
                if context.thread_id == "waits":
                    self.stepping.set()
                    await asyncio.Event().wait()
                yield index
        finally:
            self.closed[context.run_id].set()

    def made_stream_steps(self, context):  # a sync method returning the async generator it made
        return self.astream_steps.__wrapped__(context)


def _streamed(exporter) -> dict:
    return {attrs(span)["pathwatch.run.id"]: span
            for name in ("stream_steps", "astream_steps", "made_stream_steps")
            for span in spans_named(exporter, f"execution_engine.{name}")}


def test_a_streaming_execute_call_let_go_by_a_bare_async_for_whose_task_is_cancelled_says_so(
        instrumented, exporter):
    """A bare ``async for`` over a streaming engine, its task cancelled while the engine waits at a
    ``yield`` (the consumer writes the item to the socket): no CancelledError goes through the
    engine and nothing closes it in that task -- the unwinding loop lets the generator go, and the
    event loop's finalizer closes it later (``aclose()``) in a task of its own, not being cancelled.
    Its span said nothing, so the cancelled run was a delivery.missing_required_events (the limit
    docs/rules.md documented). It says ``pathwatch.cancelled``: whether nobody held the consumer's
    task (gone before the close) or its awaiter did, the generator kept in a variable of the
    consumer (let go only as the task is freed; a sync generator too, closed at once then, in no
    task); inside ``asyncio.timeout``, as with ``aclosing``; from a sync method returning the
    generator it made; and, as before, cancelled while the engine awaits inside a step (the
    CancelledError goes through it: status ERROR too)."""
    engine = _Streaming(UserContext("alice"))

    async def consume(run_id: str, item: asyncio.Event) -> None:
        thread_id = "waits" if run_id == "in-step" else "thread-1"
        context = UserContext("alice", run_id=run_id, thread_id=thread_id)
        if run_id == "kept":
            steps = engine.astream_steps(context)
            async for _ in steps:
                item.set()
                await asyncio.Event().wait()  # a socket write that never ends
        elif run_id == "sync-kept":
            sync_steps = engine.stream_steps(context)
            for _ in sync_steps:
                item.set()
                await asyncio.Event().wait()
        elif run_id == "timeout":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0):  # expires at the consumer's first wait
                    async for _ in engine.astream_steps(context):
                        item.set()
                        await asyncio.Event().wait()
        else:
            stream = engine.made_stream_steps if run_id == "made" else engine.astream_steps
            async for _ in stream(context):
                item.set()
                await asyncio.Event().wait()

    async def run(run_id: str) -> None:
        item = asyncio.Event()
        task = asyncio.create_task(consume(run_id, item))
        await (engine.stepping if run_id == "in-step" else item).wait()
        if run_id == "timeout":
            await task  # cancelled by its own timeout: it goes on and returns
        elif run_id in ("kept", "sync-kept"):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the task keeps its CancelledError
            assert task.cancelled() and not engine.closed[run_id].is_set()
            del task  # freed: its error's traceback lets the consumer's frame and generator go
        else:
            task.cancel()
            del task  # nobody holds it: gone once it ends, before the generator is closed
        await engine.closed[run_id].wait()

    async def scenario() -> None:
        for run_id in ("bare", "kept", "sync-kept", "timeout", "made", "in-step"):
            await run(run_id)  # its span ends in the step that sets closed[run_id]

    asyncio.run(scenario())
    spans = _streamed(exporter)
    assert sorted(spans) == ["bare", "in-step", "kept", "made", "sync-kept", "timeout"]
    for run_id in ("bare", "kept", "sync-kept", "timeout", "made"):
        assert attrs(spans[run_id]).get("pathwatch.cancelled") is True, run_id
        assert spans[run_id].status.is_ok, run_id  # nothing raised through it
    assert attrs(spans["in-step"]).get("pathwatch.cancelled") is True
    assert not spans["in-step"].status.is_ok


def test_a_streaming_execute_call_let_go_otherwise_does_not_say_cancelled(instrumented, exporter):
    """Let go unfinished by a consumer whose task was not being cancelled, a streaming engine closed
    later is not cancelled, whatever that task or the one closing it is by then: a ``break`` out of
    a bare ``async for`` (the consumer's task cancelled right after, before the event loop's
    finalizer closed the generator), a loop body that raised something else, consumers that
    returned keeping their generators, collected later in another task being cancelled (a sync
    generator is closed at once there: it was taken for cancelled), a task that caught a
    cancellation earlier (``Task.cancelling`` stays 1) breaking out of a bare loop or out of
    ``aclosing`` (that one was taken for cancelled). Nor does the generator keep its consumer's
    task alive."""
    engine = _Streaming(UserContext("alice"))
    kept: list = []

    async def consume(run_id: str, item: asyncio.Event) -> None:
        context = UserContext("alice", run_id=run_id)
        if run_id == "returned":
            steps = engine.astream_steps(context)
            assert await anext(steps) == 0
            sync_steps = engine.stream_steps(UserContext("alice", run_id="sync-returned"))
            assert next(sync_steps) == 0
            kept.extend((steps, sync_steps))
            return
        if run_id.startswith("swallowed"):
            try:
                item.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:  # caught, not uncancel()ed: the task goes on
                item.clear()
            if run_id == "swallowed-aclosing":
                async with contextlib.aclosing(engine.astream_steps(context)) as steps:
                    async for _ in steps:
                        break
                return
        async for _ in engine.astream_steps(context):
            if run_id == "raised":
                raise ValueError("the socket write failed")
            break
        item.set()
        await asyncio.Event().wait()

    async def let_go_kept(waiting: asyncio.Event) -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            kept.clear()  # a cleanup as its task is cancelled
            raise

    async def scenario() -> None:
        item = asyncio.Event()
        task = asyncio.create_task(consume("break", item))
        await item.wait()
        task.cancel()  # the generator it let go is not closed yet: the finalizer's task runs next
        assert not engine.closed["break"].is_set()
        await engine.closed["break"].wait()
        await asyncio.gather(task, return_exceptions=True)

        for run_id in ("swallowed-aclosing", "swallowed"):
            item = asyncio.Event()
            task = asyncio.create_task(consume(run_id, item))
            await item.wait()
            task.cancel()  # caught
            if run_id == "swallowed":
                await engine.closed[run_id].wait()  # closed by the loop once the break let it go
                assert task.cancelling() == 1 and not task.done()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            else:
                await task
                assert engine.closed[run_id].is_set() and task.cancelling() == 1

        [raised] = await asyncio.gather(consume("raised", item), return_exceptions=True)
        assert isinstance(raised, ValueError)
        await engine.closed["raised"].wait()

        task = asyncio.create_task(consume("returned", item))
        await task
        consumer = weakref.ref(task)
        del task
        await asyncio.sleep(0)  # no timed wait: asyncio lets go of an awaited task at the next step
        gc.collect()
        assert consumer() is None and len(kept) == 2  # the suspended generators keep no task
        waiting = asyncio.Event()
        cleanup = asyncio.create_task(let_go_kept(waiting))
        await waiting.wait()
        cleanup.cancel()
        await asyncio.gather(cleanup, return_exceptions=True)
        assert engine.closed["sync-returned"].is_set()  # closed in the cleanup's cancelled task
        await engine.closed["returned"].wait()

    asyncio.run(scenario())
    spans = _streamed(exporter)
    assert sorted(spans) == ["break", "raised", "returned", "swallowed", "swallowed-aclosing",
                             "sync-returned"]
    for run_id, span in spans.items():
        assert "pathwatch.cancelled" not in attrs(span), run_id
    assert spans["break"].status.is_ok and spans["returned"].status.is_ok


def test_a_consumers_task_keeps_nothing_of_the_streams_it_finished_or_closed(instrumented, exporter):
    """A long-lived task (a socket's handler) consuming stream after stream: each stream's watch on
    it (a done callback) goes as the stream ends -- run to its end, broken out of and closed -- and
    one still open has its own."""
    engine = _Streaming(UserContext("alice"))

    async def scenario() -> tuple[int, int, int]:
        handler = asyncio.current_task()
        before = len(handler._callbacks or ())
        for index in range(50):
            async for _ in engine.astream_steps(UserContext("alice", run_id=f"a{index}")):
                pass
            for _ in engine.stream_steps(UserContext("alice", run_id=f"s{index}")):
                pass
            async with contextlib.aclosing(engine.astream_steps(UserContext("alice"))) as steps:
                async for _ in steps:
                    break
        after = len(handler._callbacks or ())
        steps = engine.astream_steps(UserContext("alice", run_id="open"))
        await anext(steps)
        open_one = len(handler._callbacks or ())
        await steps.aclose()
        return before, after, open_one

    before, after, open_one = asyncio.run(scenario())
    assert after == before and open_one == before + 1
    assert len(spans_named(exporter, "execution_engine.astream_steps")) == 101


def test_disabled_instrumentation_makes_no_spans(instrumented, exporter):
    instrumentation.set_enabled(False)
    assert UserExecutionEngine().execute_agent(UserContext("alice", run_id="x")) == "done:x"
    assert list(UserExecutionEngine().stream_steps(UserContext("alice"))) == [0, 1, 2]
    assert exporter.get_finished_spans() == ()
    instrumentation.set_enabled(True)
    UserExecutionEngine().execute_agent(UserContext("alice"))
    assert len(exporter.get_finished_spans()) == 1


def test_otel_suppression_makes_no_spans(instrumented, exporter):
    token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
    try:
        UserExecutionEngine().execute_agent(UserContext("alice"))
    finally:
        otel_context.detach(token)
    assert exporter.get_finished_spans() == ()


def test_uninstrument_restores_every_original_by_identity(instrument, exporter):
    classes = [engines.UserExecutionEngine, engines.RequestScopedExecutionEngine,
               engines.IsolatedExecutionEngine, engines.ExecutionEngine, engines.SlotEngine,
               engines.BaseEngine]
    before = {cls: dict(vars(cls)) for cls in classes}
    instrument()
    assert vars(engines.UserExecutionEngine)["execute_agent"] is not before[engines.UserExecutionEngine]["execute_agent"]
    assert "__init_subclass__" in vars(engines.UserExecutionEngine)
    assert "execute_pipeline" in vars(engines.UserExecutionEngine)  # installed over the inherited one
    instrumentation.uninstrument()
    for cls in classes:
        after = dict(vars(cls))
        assert after.keys() == before[cls].keys(), cls
        for name, value in before[cls].items():
            if name != "__dict__" and name != "__weakref__":
                assert after[name] is value, f"{cls.__name__}.{name} not restored"
    exporter.clear()
    UserExecutionEngine().execute_agent(UserContext("alice"))
    assert exporter.get_finished_spans() == ()


def test_module_imported_after_instrument_is_wrapped(instrument, exporter, tmp_path):
    (tmp_path / "late_engines.py").write_text(textwrap.dedent("""
        class LateEngine:
            def run(self, context):
                return "late"
    """))
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(textwrap.dedent("""
        version: 1
        roles:
          late:
            kind: execute
            implementations: [late_engines.LateEngine]
            methods: [run]
            run_id: [arg.context.run_id]
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        instrument(pathmap)
        assert "late_engines" not in sys.modules
        import late_engines
        assert late_engines.LateEngine().run(UserContext("alice", run_id="r9")) == "late"
        assert attrs(only_span(exporter, "late.run"))["pathwatch.run.id"] == "r9"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("late_engines", None)


def _deepest(call) -> int:
    """The deepest recursion ``call(depth)`` reaches before RecursionError (another error fails)."""
    low, high = 1, sys.getrecursionlimit()
    while low < high:
        middle = (low + high + 1) // 2
        try:
            call(middle)
            low = middle
        except RecursionError:
            high = middle - 1
    return low


def test_a_recursive_traced_method_goes_a_third_to_half_as_deep_under_an_unchanged_limit(
        instrument, exporter, tmp_path, monkeypatch):
    # docs/pathmap.md: three levels of the recursion limit per traced sync call (two on Python 3.13), the app's limit left alone, its RecursionError passed
    # through
    (tmp_path / "pw_recursive.py").write_text(textwrap.dedent("""
        class Walker:
            def walk(self, n):
                return 0 if n == 0 else 1 + self.walk(n - 1)
    """))
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nroles:\n  walker:\n    kind: execute\n"
                       "    implementations: [pw_recursive.Walker]\n    methods: [walk]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pw_recursive", raising=False)
    import pw_recursive
    walker, limit = pw_recursive.Walker(), sys.getrecursionlimit()
    untraced = _deepest(walker.walk)
    instrument(pathmap)
    try:
        traced = _deepest(walker.walk)
    finally:
        sys.modules.pop("pw_recursive", None)
    assert sys.getrecursionlimit() == limit
    assert untraced // 4 < traced <= untraced // 2, (untraced, traced)


def test_instrument_uninstrument_cycles_do_not_stack_wrappers(instrument, exporter):
    for _ in range(3):
        instrument()
        instrumentation.uninstrument()
    instrument()
    UserExecutionEngine().execute_agent(UserContext("alice"))
    assert len(spans_of_kind(exporter, "execute")) == 1


def test_a_method_glob_leaves_classes_defined_in_the_class_alone(instrument, exporter, tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(
        "version: 1\nroles:\n  planner:\n    kind: execute\n"
        "    implementations: [tests.instrumentation.sample.nested.Planner]\n"
        "    methods: ['*']\n")
    instrument(pathmap)
    from tests.instrumentation.sample.nested import Planner

    assert Planner.factory is dict and isinstance(Planner.Error, type)
    with pytest.raises(Planner.Error):  # ``except Planner.Error`` still works
        Planner().plan(-1)
    assert Planner().plan(2) == [0, 1]
    assert [span.name for span in exporter.get_finished_spans()] == ["planner.plan", "planner.plan"]


def test_bound_wrapped_methods_pickle_and_copy_like_bound_methods(instrumented, exporter):
    import copy
    import pickle

    engine = engines.UserExecutionEngine(engines.UserContext("alice"))
    holder = {"on_run": engine.execute_agent}  # apps keep bound methods in handler tables
    assert pickle.loads(pickle.dumps(engine.execute_agent))(engines.UserContext("bob")) == "done:run-1"
    assert copy.copy(engine.execute_agent)(engines.UserContext("bob")) == "done:run-1"
    copied = copy.deepcopy(holder)
    assert copied["on_run"].__self__ is not engine  # bound to the copy, as a plain method would be
    assert copied["on_run"](engines.UserContext("bob")) == "done:run-1"
    assert len(spans_named(exporter, "execution_engine.execute_agent")) == 3



def test_wrapped_methods_read_as_the_apps_own_in_their_repr(instrumented):
    # handlers are logged by their repr: wrapt's read "<_BoundMethod at 0x... for method at 0x...>"
    engine = engines.UserExecutionEngine(engines.UserContext("alice"))
    cls = engines.UserExecutionEngine
    assert repr(engine.execute_agent) == f"<bound method UserExecutionEngine.execute_agent of {engine!r}>"
    assert str(engine.execute_agent) == repr(engine.execute_agent)
    assert repr(cls.execute_agent).startswith("<function UserExecutionEngine.execute_agent at 0x")
    assert repr(cls.build) == f"<bound method UserExecutionEngine.build of {cls!r}>"
    assert repr(cls.validate).startswith("<function UserExecutionEngine.validate at 0x")

def test_wrong_arguments_raise_at_the_call_for_generators_and_coroutines(instrumented):
    engine = engines.UserExecutionEngine()
    for method in (engine.stream_steps, engine.astream_steps, engine.execute_async):
        with pytest.raises(TypeError, match="context"):
            method()  # as unwrapped: at the call, not at the first step or await


def test_subclasses_made_on_the_fly_are_wrapped_up_to_a_cap_then_reported(instrumented, exporter,
                                                                         monkeypatch):
    from instrumentation import wrapping
    from instrumentation.errors import errors

    monkeypatch.setattr(wrapping, "MAX_UNLISTED_SUBCLASSES", wrapping.active()._unlisted + 3)
    before = errors.count
    def execute_agent(self, context, user_context=None):  # an override: only the wrapper traces it
        return "own"

    made = [type(f"OnTheFly{i}", (engines.UserExecutionEngine,), {"execute_agent": execute_agent})
            for i in range(5)]
    for cls in made:
        cls().execute_agent(engines.UserContext("alice"))
    assert len(spans_named(exporter, "execution_engine.execute_agent")) == 3  # the last two unwrapped
    assert errors.count == before + 2  # counted each time, logged once


def test_a_subclass_listed_under_another_role_takes_its_own_role(instrument, exporter, tmp_path,
                                                                monkeypatch):
    (tmp_path / "pw_agents_base.py").write_text(textwrap.dedent("""
        class BaseAgent:
            def execute(self, n):
                return n
    """))
    (tmp_path / "pw_agents_supervisor.py").write_text(textwrap.dedent("""
        from pw_agents_base import BaseAgent

        class Supervisor(BaseAgent):
            def execute(self, n):
                return super().execute(n) + 1

            def supervise(self, n):
                return n
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(
        "version: 1\nroles:\n"
        "  agent:\n    kind: execute\n    implementations: [pw_agents_base.BaseAgent]\n"
        "    methods: [execute]\n"
        "  supervisor:\n    kind: execute\n    implementations: [pw_agents_supervisor.Supervisor]\n"
        "    methods: [execute, supervise]\n")
    instrument(pathmap)
    import pw_agents_base  # noqa: F401  (imported after instrument: the subclass hook sees Supervisor first)
    from pw_agents_supervisor import Supervisor

    supervisor = Supervisor()
    assert (supervisor.execute(1), supervisor.supervise(2)) == (2, 2)
    names = sorted(span.name for span in exporter.get_finished_spans())
    assert names == ["agent.execute", "supervisor.execute", "supervisor.supervise"]
    for module in ("pw_agents_base", "pw_agents_supervisor"):
        sys.modules.pop(module, None)


def test_a_slotted_dataclass_subclass_defined_later_makes_one_span_per_call(instrumented, exporter):
    @dataclasses.dataclass(slots=True)  # rebuilds the class from the first one's namespace
    class SlotsEngine(UserExecutionEngine):
        retries: int = 0

        def execute_agent(self, context, user_context=None):
            return "slots"

    assert SlotsEngine().execute_agent(UserContext("alice")) == "slots"
    span = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert span["pathwatch.implementation"].endswith("SlotsEngine")
    assert span["pathwatch.nested"] is False
    instrumentation.uninstrument()
    assert not hasattr(SlotsEngine.__dict__["execute_agent"], "__wrapped__")


def test_the_owner_of_a_dataclass_subclass_defined_later_is_captured(instrumented, exporter):
    @dataclasses.dataclass  # its __init__ is added after the subclass hook ran
    class DataEngine(UserExecutionEngine):
        user_context: UserContext | None = None

    DataEngine(UserContext("alice")).execute_agent(UserContext("bob"))
    span = attrs(only_span(exporter, "execution_engine.execute_agent"))
    assert span["pathwatch.user.owner"] == pseudonym("alice")


def test_singledispatchmethod_and_partialmethod_methods_are_wrapped(instrument, exporter, tmp_path,
                                                                    monkeypatch):
    (tmp_path / "pw_dispatching.py").write_text(textwrap.dedent("""
        import functools

        class Emitter:
            @functools.singledispatchmethod
            def notify(self, event):
                return ("generic", event)

            @notify.register
            def _(self, event: int):
                return ("int", event)

            def _send(self, kind, event):
                return (kind, event)

            notify_started = functools.partialmethod(_send, "started")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(
        "version: 1\nroles:\n"
        "  emitter:\n    kind: emit\n    implementations: [pw_dispatching.Emitter]\n"
        "    methods: [notify, notify_started]\n    run_id: [arg.event]\n")
    instrument(pathmap)
    try:
        from pw_dispatching import Emitter

        emitter = Emitter()
        assert (emitter.notify("x"), emitter.notify(3)) == (("generic", "x"), ("int", 3))
        assert emitter.notify_started("r1") == ("started", "r1")
        names = [span.name for span in exporter.get_finished_spans()]
        assert names == ["emitter.notify", "emitter.notify", "emitter.notify_started"]
        started = attrs(only_span(exporter, "emitter.notify_started"))
        assert started["pathwatch.run.id"] == "r1"  # bound through the partial's own signature
        assert started["code.function.name"] == "pw_dispatching.Emitter.notify_started"
    finally:
        sys.modules.pop("pw_dispatching", None)


def test_a_wrapped_coroutine_closed_or_cancelled_before_it_starts_does_not_warn(instrumented):
    async def scenario() -> None:
        task = asyncio.create_task(UserExecutionEngine().execute_async(UserContext("alice")))
        task.cancel()  # before its first step
        with pytest.raises(asyncio.CancelledError):
            await task
        UserExecutionEngine().execute_async(UserContext("bob")).close()  # closed, never awaited

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(scenario())
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_a_listed_subclass_imported_after_its_listed_base_keeps_its_mixins_methods(
        instrument, exporter, tmp_path, monkeypatch):
    (tmp_path / "pw_mixin_base.py").write_text(textwrap.dedent("""
        class Engine:
            def execute(self, n):
                return n
    """))
    (tmp_path / "pw_mixin_impl.py").write_text(textwrap.dedent("""
        from pw_mixin_base import Engine

        class PipelineMixin:
            def execute_pipeline(self, steps):
                return len(steps)

        class FastEngine(Engine, PipelineMixin):
            def execute(self, n):
                return n + 1
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(
        "version: 1\nroles:\n"
        "  engine:\n    kind: execute\n"
        "    implementations: [pw_mixin_base.Engine, pw_mixin_impl.FastEngine]\n"
        "    methods: ['execute*']\n")
    instrument(pathmap)
    try:
        import pw_mixin_base  # noqa: F401  (first: FastEngine is wrapped as its subclass when defined)
        from pw_mixin_impl import FastEngine

        engine = FastEngine()
        assert (engine.execute(1), engine.execute_pipeline([1, 2])) == (2, 2)
        names = sorted(span.name for span in exporter.get_finished_spans())
        assert names == ["engine.execute", "engine.execute_pipeline"]
    finally:
        for module in ("pw_mixin_base", "pw_mixin_impl"):
            sys.modules.pop(module, None)


def test_classes_made_on_the_fly_beyond_the_cap_are_not_kept_alive(instrumented, exporter, monkeypatch):
    from instrumentation import wrapping

    monkeypatch.setattr(wrapping, "MAX_UNLISTED_SUBCLASSES", wrapping.active()._unlisted)
    made = []
    for index in range(50):  # beyond the cap: unwrapped, but they reach the listed class's wrappers
        cls = type(f"PerRequest{index}", (engines.UserExecutionEngine,), {})
        cls().execute_agent(engines.UserContext("alice"))
        made.append(weakref.ref(cls))
        del cls
    spans = spans_named(exporter, "execution_engine.execute_agent")
    assert len(spans) == 50 and attrs(spans[-1])["pathwatch.implementation"].endswith("PerRequest49")
    exporter.clear()
    gc.collect()
    assert [ref for ref in made if ref() is not None] == []


def test_listed_classes_do_not_count_toward_the_subclass_cap(instrumented):
    from instrumentation import wrapping

    # the sample's listed subclasses are first wrapped as subclasses of UserExecutionEngine, then
    # for their own entries: they leave the count as they found it
    active = wrapping.active()
    assert active._unlisted == len([cls for cls in active._class_roles if cls not in active._listed])


def test_wrapped_functions_and_staticmethods_pickle_and_copy_like_functions(instrumented, exporter):
    import copy
    import pickle

    engine = engines.UserExecutionEngine()
    for function in (engines.UserExecutionEngine.execute_agent, engines.UserExecutionEngine.validate,
                     engine.validate):
        for clone in (pickle.loads(pickle.dumps(function)), copy.copy(function),
                      copy.deepcopy(function)):
            assert clone == function
    assert pickle.loads(pickle.dumps(engine.validate))(engines.UserContext("bob")) is True
    execute = pickle.loads(pickle.dumps(engines.UserExecutionEngine.execute_agent))
    assert execute(engine, engines.UserContext("bob")) == "done:run-1"
    assert [span.name for span in exporter.get_finished_spans()] == [
        "execution_engine.validate", "execution_engine.execute_agent"]


ALIASED_ENGINES = """
class UserEngine:
    def execute_agent(self, context):
        return "user"

class _Impl:
    def execute_agent(self, context):
        return "impl"

class OldEngine:
    def execute_agent(self, context):
        return "old"

GlobEngine = _Impl   # defined here under another name: a glob matches the name
"""


@pytest.mark.parametrize(("canonical", "retired"), [
    ("pw_alias_names_a.E", "pw_alias_names_b.GlobEngine"),       # an import alias; a glob's name
    ("pw_alias_names_b.GlobEngine", "pw_alias_names_a.E"),
])
def test_canonical_and_retired_given_through_an_alias_name_apply_to_the_class(
        instrument, exporter, tmp_path, monkeypatch, canonical, retired):
    (tmp_path / "pw_alias_names_b.py").write_text(textwrap.dedent(ALIASED_ENGINES))
    (tmp_path / "pw_alias_names_a.py").write_text("from pw_alias_names_b import UserEngine as E\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(textwrap.dedent(f"""
        version: 1
        roles:
          engine:
            kind: execute
            implementations: [pw_alias_names_a.E, "pw_alias_names_b.*Engine"]
            canonical: {canonical}
            retired: [{retired}, pw_alias_names_b.OldEngine]
            methods: [execute_agent]
    """))
    try:
        instrument(pathmap, check_imports=True)
        import pw_alias_names_a
        import pw_alias_names_b
        for engine in (pw_alias_names_a.E(), pw_alias_names_b.UserEngine(), pw_alias_names_b.GlobEngine(),
                       pw_alias_names_b.OldEngine()):
            engine.execute_agent(None)
    finally:
        for name in ("pw_alias_names_a", "pw_alias_names_b"):
            sys.modules.pop(name, None)
    flags = [(attrs(s)["pathwatch.implementation"].rsplit(".", 1)[-1], attrs(s)["pathwatch.canonical"],
              attrs(s)["pathwatch.retired"]) for s in exporter.get_finished_spans()]
    user = canonical.endswith(".E")   # the same class object under any of its names
    assert flags == [("UserEngine", user, not user), ("UserEngine", user, not user),
                     ("_Impl", not user, user), ("OldEngine", False, True)]


CLASH_ENGINES = """
class UserEngine:
    def execute_agent(self, context):
        return "user"

class Listed(UserEngine):      # listed in the engine role: inherits execute_agent
    pass

class Plain(UserEngine):       # not listed
    pass

class OtherEngine:
    def execute_agent(self, context):
        return "other"
"""


_clash_names = iter(range(10_000))


@pytest.fixture
def clash_modules(tmp_path, monkeypatch):
    """clash_modules(alias_first, engines_source=CLASH_ENGINES) -> (engines, aliases) module names: a
    module defining UserEngine and one re-exporting it as E. Imported before instrument() when
    ``alias_first`` (modules are wrapped in name order: the alias's first), else imported after it
    (the defining module's hook fires first). Every ``pw_clash_`` module is forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(alias_first: bool, engines_source: str = CLASH_ENGINES) -> tuple[str, str]:
        n = next(_clash_names)
        engines, aliases = f"pw_clash_z{n}_engines", f"pw_clash_a{n}_aliases"
        (tmp_path / f"{engines}.py").write_text(textwrap.dedent(engines_source))
        (tmp_path / f"{aliases}.py").write_text(f"from {engines} import UserEngine as E\n")
        if alias_first:
            __import__(aliases)
        return engines, aliases

    yield make
    for name in [name for name in sys.modules if name.startswith("pw_clash_")]:
        del sys.modules[name]


def _call_each_engine(instrument, pathmap, engines: str, aliases: str):
    """Instrument, import the alias module, and call execute_agent on every class of CLASH_ENGINES;
    the engines module."""
    instrument(pathmap)
    __import__(aliases)
    mod = sys.modules[engines]
    for cls in (mod.UserEngine, mod.Plain, mod.Listed, mod.OtherEngine):
        cls().execute_agent(None)
    return mod


@pytest.mark.parametrize("alias_first", [False, True])
def test_one_class_named_by_two_roles_through_two_names_is_left_untraced_whatever_the_import_order(
        instrument, exporter, tmp_path, caplog, clash_modules, alias_first):
    from instrumentation.errors import errors

    engines, aliases = clash_modules(alias_first)
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(textwrap.dedent(f"""
        version: 1
        roles:
          engine:
            kind: execute
            implementations: [{engines}.UserEngine, {engines}.Listed, {engines}.OtherEngine]
            methods: [execute_agent]
          supervisor:
            kind: execute
            implementations: [{aliases}.E]
            methods: [execute_agent]
    """))
    mod = _call_each_engine(instrument, pathmap, engines, aliases)
    class Late(mod.UserEngine):   # defined afterwards: not wrapped either
        pass
    Late().execute_agent(None)
    calls = [(s.name, attrs(s)["pathwatch.implementation"].rsplit(".", 1)[-1])
             for s in exporter.get_finished_spans()]
    # the class and its plain subclasses are untraced; the module's other classes, and a listed
    # subclass (its inherited method wrapped anew), still are
    assert calls == [("engine.execute_agent", "Listed"), ("engine.execute_agent", "OtherEngine")]
    assert errors.count == 1
    assert caplog.text.count("a class plays one role") == 1
    assert f"{engines}.UserEngine is named" in caplog.text and f"{aliases}.E in role" in caplog.text


def test_check_imports_refuses_one_class_named_by_two_roles_through_two_names(tmp_path, clash_modules):
    from instrumentation import PathMap, PathMapError

    engines, aliases = clash_modules(alias_first=False)
    (tmp_path / f"{engines}_same.py").write_text("class UserEngine:\n    def execute_agent(self):\n"
                                                  "        pass\n\nE = UserEngine\n")
    for supervisor, engine in ((f"{aliases}.E", f"{engines}.UserEngine"),
                               (f"{engines}_same.E", f"{engines}_same.UserEngine")):
        pathmap = tmp_path / "pathmap.yaml"
        pathmap.write_text(textwrap.dedent(f"""
            version: 1
            roles:
              engine: {{kind: execute, implementations: [{engine}], methods: [execute_agent]}}
              supervisor: {{kind: execute, implementations: [{supervisor}], methods: [execute_agent]}}
        """))
        with pytest.raises(PathMapError) as caught:
            PathMap.load(pathmap).check_imports()
        assert (caught.value.key_path, caught.value.line) == ("roles.supervisor.implementations[0]", 5)
        assert f"is named {supervisor} in role 'supervisor' and {engine} in role 'engine'" in \
            caught.value.reason


@pytest.mark.parametrize("alias_first", [False, True])
def test_a_class_named_exactly_through_an_alias_wins_over_another_roles_glob_in_its_module(
        instrument, exporter, tmp_path, clash_modules, alias_first):
    engines, aliases = clash_modules(alias_first)
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(textwrap.dedent(f"""
        version: 1
        roles:
          engine:
            kind: execute
            implementations: ["{engines}.*Engine", "{engines}.Listed"]
            methods: [execute_agent]
          supervisor:
            kind: execute
            implementations: [{aliases}.E]
            canonical: {aliases}.E
            methods: [execute_agent]
    """))
    from instrumentation.errors import errors

    # the defining module's glob came first unless alias_first
    _call_each_engine(instrument, pathmap, engines, aliases)
    assert [(r.cls.__name__, r.role.name) for r in instrumentation.PathMap.load(pathmap).check_imports()
            if r.cls.__name__ == "UserEngine"] == [("UserEngine", "supervisor")]
    calls = [(s.name, attrs(s)["pathwatch.implementation"].rsplit(".", 1)[-1],
              attrs(s)["pathwatch.canonical"]) for s in exporter.get_finished_spans()]
    assert calls == [("supervisor.execute_agent", "UserEngine", True),
                     ("supervisor.execute_agent", "Plain", False),
                     ("engine.execute_agent", "Listed", False),
                     ("engine.execute_agent", "OtherEngine", False)]
    assert errors.count == 0


@pytest.mark.parametrize("alias_first", [False, True])
def test_a_class_left_untraced_for_two_roles_is_still_a_subclass_of_its_wrapped_base(
        instrument, exporter, tmp_path, clash_modules, alias_first):
    """As a class no entry names: its own override is wrapped for its listed base's role."""
    engines, aliases = clash_modules(
        alias_first, "class Base:\n    def execute_agent(self, context):\n        return 'base'\n\n"
        "class UserEngine(Base):\n    def execute_agent(self, context):\n        return 'user'\n")
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text(textwrap.dedent(f"""
        version: 1
        roles:
          engine: {{kind: execute, implementations: [{engines}.Base, {engines}.UserEngine],
                   methods: [execute_agent]}}
          supervisor: {{kind: execute, implementations: [{aliases}.E], methods: [execute_agent]}}
    """))
    instrument(pathmap)
    __import__(aliases)
    assert sys.modules[engines].UserEngine().execute_agent(None) == "user"
    span = attrs(only_span(exporter, "engine.execute_agent"))
    assert span["code.function.name"] == f"{engines}.UserEngine.execute_agent"
