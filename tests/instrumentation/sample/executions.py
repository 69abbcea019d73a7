"""Test backend: a supervisor and engines (two execute roles) that emit events, for the execution an
emit names (``pathwatch.execution.span_id``)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace

from tests.instrumentation.sample.engines import UserContext


class Announcer:
    """The emitter (its own role): records nothing, only its calls are traced."""

    def notify_agent_started(self, run_id: str) -> None:
        pass

    def notify_agent_completed(self, run_id: str) -> None:
        pass


class Engine:
    def __init__(self, announcer: Announcer) -> None:
        self.announcer = announcer

    def execute(self, context: UserContext, *, other_run: str | None = None) -> str:
        self.announcer.notify_agent_started(context.run_id)
        if other_run is not None:  # an event of another run, sent from this one's execution
            self.announcer.notify_agent_started(other_run)
        return "done"

    async def execute_in_task(self, context: UserContext) -> None:
        """Awaits a task it starts: the task's emit is made while this call runs."""
        await asyncio.get_running_loop().create_task(self._announce(context))

    async def start_task(self, context: UserContext, started: asyncio.Event) -> asyncio.Task:
        """Starts a task that emits only after this call has returned."""
        return asyncio.get_running_loop().create_task(self._announce_later(context, started))

    async def tick(self, context: UserContext, ticks: int, each: Callable[[], None],
                   served: asyncio.Future, overlap: bool = False,
                   entered: asyncio.Event | None = None) -> None:
        """A periodic job's tick: starts the next tick in a task (which copies this call's context)
        and returns -- with ``overlap``, once the next one has started; the last one starts a
        long-lived task (a pump) instead and hands it over."""
        each()
        if entered is not None:
            entered.set()
        loop = asyncio.get_running_loop()
        if ticks > 1:
            following = asyncio.Event()
            loop.create_task(self.tick(context, ticks - 1, each, served, overlap, following))
            if overlap:  # still running when the next tick starts
                await following.wait()
        else:
            served.set_result(loop.create_task(asyncio.Event().wait()))

    def execute_in_thread(self, context: UserContext) -> None:
        """Emits in a thread it hands its OpenTelemetry context (attached there); waits for it."""
        captured = otel_context.get_current()

        def work() -> None:
            token = otel_context.attach(captured)
            try:
                self.announcer.notify_agent_started(context.run_id)
            finally:
                otel_context.detach(token)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()

    def execute_leaving_its_context(self, context: UserContext, seen: list) -> None:
        """Attaches a context of its own (a value for the rest of its caller's work) and leaves it
        attached, as an app may; ``seen`` gets a weak reference to the span current in it."""
        seen.append(weakref.ref(trace.get_current_span()))
        otel_context.attach(otel_context.set_value("app-value", context.run_id))

    async def _announce(self, context: UserContext) -> None:
        self.announcer.notify_agent_started(context.run_id)

    async def _announce_later(self, context: UserContext, started: asyncio.Event) -> None:
        await started.wait()
        self.announcer.notify_agent_completed(context.run_id)


class AliasEngine(Engine):
    """Delegates to the engine it wraps: the wrapped call is nested in this one."""

    def __init__(self, announcer: Announcer) -> None:
        super().__init__(announcer)
        self.target = Engine(announcer)

    def execute(self, context: UserContext, *, other_run: str | None = None) -> str:
        return self.target.execute(context, other_run=other_run)


class Supervisor:
    def __init__(self, engine: Engine, announcer: Announcer) -> None:
        self.engine = engine
        self.announcer = announcer

    def run(self, context: UserContext, *, announce_first: bool = False) -> str:
        if announce_first:  # before it calls the engine: the supervisor's own execution
            self.announcer.notify_agent_started(context.run_id)
        return self.engine.execute(context)

    async def run_leaving_a_task(self, context: UserContext, started: asyncio.Event) -> None:
        """Calls the engine, which starts a task and returns; the task emits while this call runs."""
        task = await self.engine.start_task(context, started)
        started.set()
        await task


class Sender:
    """A dispatch role whose every send starts the next one in a task (a relay, a retry loop) and
    returns once that one has started; the last one starts a long-lived task (a pump) instead and
    hands it over."""

    async def send_to_user(self, user_id: str, sends: int, served: asyncio.Future,
                           entered: asyncio.Event | None = None) -> None:
        if entered is not None:
            entered.set()
        loop = asyncio.get_running_loop()
        if sends > 1:
            following = asyncio.Event()
            loop.create_task(self.send_to_user(user_id, sends - 1, served, following))
            await following.wait()  # still running when the next send starts
        else:
            served.set_result(loop.create_task(asyncio.Event().wait()))
