"""``pathwatch.execution.span_id``: the execution an emit is part of (docs/conventions.md)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from pathlib import Path

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace

from instrumentation import attributes as A
from tests.instrumentation.helpers import attrs, spans_named
from tests.instrumentation.sample.engines import UserContext

PATHMAP = Path(__file__).parent / "sample" / "executions_pathmap.yaml"


@pytest.fixture
def sample(instrument):
    instrument(PATHMAP)
    from tests.instrumentation.sample import executions

    return executions


def span_hex(span) -> str:
    return format(span.context.span_id, "016x")


def emits(exporter, event_type: str = "agent_started") -> list:
    return sorted(spans_named(exporter, f"event_emitter.notify_{event_type}"),
                  key=lambda span: span.start_time)


def test_an_emit_names_the_innermost_execute_call_of_its_run(sample, exporter):
    announcer = sample.Announcer()
    supervisor = sample.Supervisor(sample.Engine(announcer), announcer)
    supervisor.run(UserContext("alice", run_id="r1"))
    [engine] = spans_named(exporter, "execution_engine.execute")
    [run] = spans_named(exporter, "supervisor.run")
    [emit] = emits(exporter)
    assert attrs(emit)[A.EXECUTION_SPAN_ID] == span_hex(engine) != span_hex(run)
    assert emit.parent.span_id == engine.context.span_id
    assert A.EXECUTION_SPAN_ID not in attrs(engine) and A.EXECUTION_SPAN_ID not in attrs(run)


def test_an_emit_before_the_engine_is_called_names_the_supervisors_call(sample, exporter):
    announcer = sample.Announcer()
    sample.Supervisor(sample.Engine(announcer), announcer).run(
        UserContext("alice", run_id="r2"), announce_first=True)
    [run] = spans_named(exporter, "supervisor.run")
    [engine] = spans_named(exporter, "execution_engine.execute")
    first, second = emits(exporter)
    assert attrs(first)[A.EXECUTION_SPAN_ID] == span_hex(run)
    assert attrs(second)[A.EXECUTION_SPAN_ID] == span_hex(engine)


def test_an_emit_outside_any_execute_call_names_none(sample, exporter):
    sample.Announcer().notify_agent_started("r3")
    [emit] = emits(exporter)
    assert A.EXECUTION_SPAN_ID not in attrs(emit)
    assert A.RUN_ID in attrs(emit)


def test_an_emit_under_a_nested_execute_call_names_the_call_it_is_nested_in(sample, exporter):
    # an alias delegating to the engine: the duplicates detector keeps only the outer call (the
    # nested one is a pass-through), so that is the execution
    announcer = sample.Announcer()
    sample.AliasEngine(announcer).execute(UserContext("alice", run_id="r4"))
    outer, inner = sorted(spans_named(exporter, "execution_engine.execute"),
                          key=lambda span: span.start_time)
    assert (attrs(outer)[A.NESTED], attrs(inner)[A.NESTED]) == (False, True)
    [emit] = emits(exporter)
    assert emit.parent.span_id == inner.context.span_id
    assert attrs(emit)[A.EXECUTION_SPAN_ID] == span_hex(outer)


def test_an_emit_of_another_run_names_only_an_execution_of_that_run(sample, exporter):
    announcer = sample.Announcer()
    sample.Engine(announcer).execute(UserContext("alice", run_id="r5"), other_run="r-other")
    [engine] = spans_named(exporter, "execution_engine.execute")
    own, other = emits(exporter)
    assert attrs(own)[A.EXECUTION_SPAN_ID] == span_hex(engine)
    assert attrs(other)[A.RUN_ID] == "r-other" and A.EXECUTION_SPAN_ID not in attrs(other)


def test_an_emit_with_no_run_id_names_no_execution_even_in_a_call_with_none(sample, exporter):
    """Neither names a run: nothing says the emit is that call's run's (a run id is what ties them)."""
    sample.Engine(sample.Announcer()).execute(UserContext("alice", run_id=None))
    [engine] = spans_named(exporter, "execution_engine.execute")
    [emit] = emits(exporter)
    assert A.RUN_ID not in attrs(engine) and A.RUN_ID not in attrs(emit)
    assert emit.parent.span_id == engine.context.span_id
    assert A.EXECUTION_SPAN_ID not in attrs(emit)


def test_a_task_started_inside_an_execute_call_is_its_work_while_the_call_runs(sample, exporter):
    """asyncio tasks copy the context they are started in: a task the call awaits (a step it runs
    concurrently) emits as part of that execution; one that emits after the call returned (a
    task left running) names no execution, since the call that started it is over."""
    announcer = sample.Announcer()
    engine = sample.Engine(announcer)

    async def scenario() -> None:
        await engine.execute_in_task(UserContext("alice", run_id="r6"))
        started = asyncio.Event()
        task = await engine.start_task(UserContext("alice", run_id="r7"), started)
        started.set()
        await task

    asyncio.run(scenario())
    by_name = {attrs(span)[A.RUN_ID]: span for span in spans_named(exporter, "execution_engine.execute_in_task")
               + spans_named(exporter, "execution_engine.start_task")}
    [in_task] = emits(exporter)
    [after] = emits(exporter, "agent_completed")
    assert attrs(in_task)[A.EXECUTION_SPAN_ID] == span_hex(by_name["r6"])
    assert after.parent.span_id == by_name["r7"].context.span_id  # the context still says so
    assert A.EXECUTION_SPAN_ID not in attrs(after)


def test_a_task_outliving_the_call_it_was_started_in_is_the_work_of_a_call_still_running(sample,
                                                                                        exporter):
    """The engine's call starts a task and returns; the supervisor's call around it runs on and the
    task emits: part of the supervisor's execution (it still runs around the task), not the engine's."""
    announcer = sample.Announcer()
    supervisor = sample.Supervisor(sample.Engine(announcer), announcer)
    asyncio.run(supervisor.run_leaving_a_task(UserContext("alice", run_id="r10"), asyncio.Event()))
    [run] = spans_named(exporter, "supervisor.run_leaving_a_task")
    [engine] = spans_named(exporter, "execution_engine.start_task")
    [emit] = emits(exporter, "agent_completed")
    assert emit.parent.span_id == engine.context.span_id and emit.start_time > engine.end_time
    assert attrs(emit)[A.EXECUTION_SPAN_ID] == span_hex(run)


@pytest.mark.parametrize("overlap", [False, True], ids=["after", "overlapping"])
def test_a_task_left_running_keeps_only_the_call_it_was_started_in(sample, exporter, overlap):
    """A periodic job whose every tick (an execute call) starts the next one in a task and returns
    (after it, or once the next one has started), the last starting a long-lived task: that task's
    context holds the call it was started in, which named the one it ran inside
    (``Call.enclosing``), and so on -- every tick since the process started stayed alive as long as
    the task (a pump serving the backend's life). An ended call names only the calls still running
    around it: the ticks before are freed."""
    from instrumentation import sites

    engine = sample.Engine(sample.Announcer())
    ticks: list[int] = []

    def calls_of_the_job() -> list:
        gc.collect()
        return [found for found in gc.get_objects()
                if type(found) is sites.Call and found.attrs.get(A.RUN_ID) == "r9"]

    async def scenario() -> None:
        served: asyncio.Future = asyncio.get_running_loop().create_future()
        await engine.tick(UserContext("alice", run_id="r9"), 50, lambda: ticks.append(1), served,
                          overlap)
        pump = await served  # the last tick (and the one before) returned before this resumes
        try:
            alive = calls_of_the_job()
            assert len(ticks) == 50 and len(spans_named(exporter, "execution_engine.tick")) == 50
            # the pump's own: its context still names the call it was started in (ended), which
            # names the tick still running around it when it ended (overlapping: the one before)
            assert len(alive) == (2 if overlap else 1) and not any(call.live for call in alive)
            assert sum(call.enclosing is None for call in alive) == 1
        finally:
            pump.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize("overlap", [False, True], ids=["after", "overlapping"])
def test_a_task_left_running_keeps_only_the_span_of_the_call_it_was_started_in(sample, exporter,
                                                                                 overlap):
    """The same job: the OpenTelemetry context a traced call makes current keeps the context it was
    made over (to put the app's context back at the call's exit, docs/pathmap.md), which kept the
    previous tick's, and so on -- every tick's span (with its attributes) stayed alive as long as the
    task. Only what the calls still running around it need is kept."""
    engine = sample.Engine(sample.Announcer())
    ticks: list[weakref.ref] = []

    async def scenario() -> None:
        served: asyncio.Future = asyncio.get_running_loop().create_future()
        await engine.tick(UserContext("alice", run_id="r11"), 50,
                          lambda: ticks.append(weakref.ref(trace.get_current_span())), served,
                          overlap)
        pump = await served
        try:
            gc.collect()
            alive = [index for index, tick in enumerate(ticks) if tick() is not None]
            assert len(ticks) == 50 and len(spans_named(exporter, "execution_engine.tick")) == 50
            # the pump's: its context has it current (overlapping: and the tick still running
            # around it when it ended)
            assert alive == ([48, 49] if overlap else [49])
        finally:
            pump.cancel()

    asyncio.run(scenario())


def test_an_emit_in_a_thread_handed_the_calls_context_names_the_call(sample, exporter):
    """The call is kept in the OpenTelemetry context it makes current (docs/conventions.md): a
    thread the app hands that context is its work, as it is its span's child."""
    sample.Engine(sample.Announcer()).execute_in_thread(UserContext("alice", run_id="r14"))
    [call] = spans_named(exporter, "execution_engine.execute_in_thread")
    [emit] = emits(exporter)
    assert emit.parent.span_id == call.context.span_id
    assert attrs(emit)[A.EXECUTION_SPAN_ID] == span_hex(call)


def test_an_execute_call_leaving_its_context_attached_leaves_itself_out_of_it(sample, exporter):
    """The app's context stays current after the call (docs/pathmap.md), without the call's span
    -- nor the call as the execution its caller's later emits would name: an emit after it in its
    caller names the caller's, and the ended call's span is not kept alive by that context."""
    announcer = sample.Announcer()
    engine = sample.Engine(announcer)
    seen: list[weakref.ref] = []

    def scenario() -> tuple[object, bool]:
        engine.execute_leaving_its_context(UserContext("alice", run_id="r13"), seen)
        announcer.notify_agent_started("r13")
        gc.collect()
        return otel_context.get_value("app-value"), seen[0]() is None

    app_value, span_gone = contextvars.copy_context().run(scenario)
    assert app_value == "r13"  # the app's context stayed current
    assert span_gone
    assert len(spans_named(exporter, "execution_engine.execute_leaving_its_context")) == 1
    [emit] = emits(exporter)
    assert A.EXECUTION_SPAN_ID not in attrs(emit) and emit.parent is None


def test_dispatch_and_write_spans_carry_no_execution(instrumented, exporter):
    """Made inside an execution of their run, under an emit that names it: only the emit does."""
    from tests.instrumentation.sample.emitters import AgentWebSocketBridge, ConnectionManager
    from tests.instrumentation.sample.engines import UserExecutionEngine

    class Socket:
        async def send_json(self, message):
            pass

    manager = ConnectionManager()
    manager.register("alice", Socket())

    class AnnouncingEngine(UserExecutionEngine):  # defined after instrument(): wrapped as the role's
        async def execute_async(self, context, *, delay=0.0):
            await AgentWebSocketBridge(manager, context).notify_agent_started(context.run_id, "a")
            return "announced"

    context = UserContext("alice", run_id="r8")
    asyncio.run(AnnouncingEngine(context).execute_async(context))
    [engine] = spans_named(exporter, "execution_engine.execute_async")
    [emit] = spans_named(exporter, "event_emitter.notify_agent_started")
    [dispatch] = spans_named(exporter, "socket_manager.send_to_user")
    assert attrs(emit)[A.EXECUTION_SPAN_ID] == span_hex(engine)
    assert attrs(dispatch)[A.RUN_ID] == "r8" and dispatch.parent.span_id == emit.context.span_id
    carrying = [span.name for span in exporter.get_finished_spans() if A.EXECUTION_SPAN_ID in attrs(span)]
    assert carrying == [emit.name]


def test_a_task_left_running_keeps_only_the_dispatch_it_was_started_in(sample, exporter):
    """The same for dispatch calls: each send starting the next in a task, a send's counter names
    the dispatch call it runs inside (``DispatchCounter.outer``: a write there is that call's too),
    which named the one before, and so on -- every send stayed alive as long as the last one's
    task. An ended send names only the dispatch calls still running around it."""
    from instrumentation.linking import DispatchCounter

    sender = sample.Sender()

    async def scenario() -> None:
        served: asyncio.Future = asyncio.get_running_loop().create_future()
        await sender.send_to_user("alice", 50, served)
        pump = await served
        try:
            gc.collect()
            alive = [found for found in gc.get_objects() if type(found) is DispatchCounter]
            assert len(spans_named(exporter, "sender.send_to_user")) == 50
            # the pump's: its context names the last send, which names the one still running
            # around it when it ended
            assert len(alive) == 2 and not any(counter.live for counter in alive)
            assert sum(counter.outer is None for counter in alive) == 1
        finally:
            pump.cancel()

    asyncio.run(scenario())
