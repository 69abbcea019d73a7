"""The fake agent workload: no AI, a few short pauses, and the five required events per run.

Also home to three pieces of the reference case that the agent path goes through: the process-wide
``AgentInstanceFactory`` (S1), the execution core and tracker that announce a start again (S5), and
typed tool results that an emitter cannot serialize (S8).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from examples.agent_backend.context import AgentExecutionContext, UserExecutionContext
from examples.agent_backend.emitters import UnifiedEventEmitter
from examples.agent_backend.scenarios import Scenario, is_active
from examples.agent_backend.settings import settings
from examples.agent_backend.sockets import WebSocketManager, websocket_manager


class Emitter(Protocol):
    async def notify_agent_started(self, run_id: str, agent_name: str, details: Any = None, *,
                                   user_context: UserExecutionContext | None = None) -> bool: ...
    # ... and the other notify_* methods with the same signature


@dataclass(frozen=True, slots=True)
class AgentResult:
    run_id: str
    status: str  # "completed" | "error"
    engine: str  # the engine class that ran the agent


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A typed tool result (S8): the emitter still expects plain dicts and cannot serialize it."""

    tool: str
    answer: str


class AgentInstanceFactory:
    """Process-wide factory, configured per request and then used (reference bug behind S1).

    Between ``configure`` and ``create_tool_emitter`` the agent awaits (loading its config), so a
    second request can reconfigure the factory and the first one gets the second user's emitter.

    In the reference case that took two requests close enough together; the demo makes the
    interleaving certain, so S1 shows its bug with as few as two concurrent users: a request's config
    load ends when another request reconfigures the factory (the first request then builds the
    other user's emitter), or after ``DEMO_CONFIG_LOAD_DELAY_S`` when no other request comes (a lone
    request, or the last of a burst, keeps its own user's).
    """

    def __init__(self, manager: WebSocketManager) -> None:
        self._manager = manager
        self._user_context: UserExecutionContext | None = None
        self._reconfigured: asyncio.Event | None = None

    def configure(self, user_context: UserExecutionContext) -> asyncio.Event:
        """Configure for ``user_context``; the event returned is set when the factory is next
        reconfigured (the configuration just made is gone then)."""
        if self._reconfigured is not None:
            self._reconfigured.set()
        self._user_context = user_context
        self._reconfigured = asyncio.Event()
        return self._reconfigured

    def create_tool_emitter(self) -> UnifiedEventEmitter:
        context = self._user_context
        if context is None:
            raise RuntimeError("AgentInstanceFactory used before configure()")
        return UnifiedEventEmitter(self._manager, context.user_id, context.thread_id)


agent_factory = AgentInstanceFactory(websocket_manager)


async def _tool_emitter(user_context: UserExecutionContext, emitter: Emitter) -> Emitter:
    if not is_active(Scenario.S1):
        return emitter
    reconfigured = agent_factory.configure(user_context)
    # "loading the agent's configuration": done when another request has reconfigured the factory
    # (the race the reference case lost under concurrent users, made certain), or at the latest after
    # the configured delay. Not asyncio.wait_for: on Python 3.11 it returns the wait's result when the
    # run is cancelled (its socket closed) in the step the factory is reconfigured, and the run goes on
    loading = asyncio.ensure_future(reconfigured.wait())
    try:
        await asyncio.wait((loading,), timeout=settings.config_load_delay_s)
    finally:
        loading.cancel()
    return agent_factory.create_tool_emitter()


async def _announce_start_again(context: AgentExecutionContext, user_context: UserExecutionContext,
                                emitter: Emitter, engine: str) -> None:
    # S5, reference bug: besides the engine, the execution core and the execution tracker each
    # sent agent_started for the same run.
    for source in ("execution_core", "execution_tracker"):
        await emitter.notify_agent_started(context.run_id, context.agent_name,
                                           {"engine": engine, "source": source}, user_context=user_context)


async def _run_tool(tool: str) -> dict[str, str] | ToolResult:
    await asyncio.sleep(settings.step_delay_s)
    if tool == "fail":
        raise RuntimeError("tool 'fail' failed, as asked")
    if is_active(Scenario.S8):
        return ToolResult(tool=tool, answer="42")
    return {"tool": tool, "answer": "42"}


async def run_agent(engine: str, context: AgentExecutionContext, user_context: UserExecutionContext,
                    emitter: Emitter) -> AgentResult:
    """Run one agent: started, thinking, (tool executing, tool completed) per tool, completed."""
    run_id, name, common = context.run_id, context.agent_name, {"engine": engine}
    await emitter.notify_agent_started(run_id, name, dict(common), user_context=user_context)
    if is_active(Scenario.S5):
        await _announce_start_again(context, user_context, emitter, engine)
    tool_emitter = await _tool_emitter(user_context, emitter)
    await asyncio.sleep(settings.step_delay_s)
    await emitter.notify_agent_thinking(run_id, name, {**common, "thought": "planning"},
                                        user_context=user_context)
    try:
        for tool in context.tools:
            await tool_emitter.notify_tool_executing(run_id, name, {**common, "tool": tool},
                                                     user_context=user_context)
            result = await _run_tool(tool)
            await tool_emitter.notify_tool_completed(run_id, name, {**common, "tool": tool,
                                                                    "result": result},
                                                     user_context=user_context)
    except RuntimeError as exc:
        await emitter.notify_agent_error(run_id, name, {**common, "error": str(exc)},
                                         user_context=user_context)
        return AgentResult(run_id, "error", engine)
    await emitter.notify_agent_completed(run_id, name, {**common, "result": "done"}, user_context=user_context)
    return AgentResult(run_id, "completed", engine)
