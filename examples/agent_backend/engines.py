"""Five execution engines for one job, as in the reference case.

| class | what it is |
|---|---|
| ``UserExecutionEngine`` | canonical (the claimed SSOT), full; one instance per request and user |
| ``RequestScopedExecutionEngine`` | a full duplicate of it |
| ``ExecutionEngine`` | a legacy name kept as a redirect that delegates to the canonical engine |
| ``SupervisorExecutionEngineAdapter`` | a thin adapter around any engine |
| ``IsolatedExecutionEngine`` | the retired fallback a factory took whenever its first attempt failed |

Every engine offers ``execute_agent(context, user_context=None)`` and
``execute_pipeline(steps, context, user_context=None)``; a pipeline's steps are the run's tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from examples.agent_backend.agents import AgentResult, Emitter, run_agent
from examples.agent_backend.context import AgentExecutionContext, UserExecutionContext


class Engine(Protocol):
    user_context: UserExecutionContext

    async def execute_agent(self, context: AgentExecutionContext,
                            user_context: UserExecutionContext | None = None) -> AgentResult: ...

    async def execute_pipeline(self, steps: Sequence[str], context: AgentExecutionContext,
                               user_context: UserExecutionContext | None = None) -> AgentResult: ...


class UserExecutionEngine:
    """The canonical engine: built per request for that request's user, with that user's emitter."""

    def __init__(self, user_context: UserExecutionContext, emitter: Emitter) -> None:
        self.user_context = user_context
        self.emitter = emitter

    async def execute_agent(self, context: AgentExecutionContext,
                            user_context: UserExecutionContext | None = None) -> AgentResult:
        return await run_agent(type(self).__name__, context, user_context or self.user_context, self.emitter)

    async def execute_pipeline(self, steps: Sequence[str], context: AgentExecutionContext,
                               user_context: UserExecutionContext | None = None) -> AgentResult:
        return await run_agent(type(self).__name__, replace(context, tools=tuple(steps)),
                               user_context or self.user_context, self.emitter)


class RequestScopedExecutionEngine:
    """A full duplicate of the canonical engine (same job, separate code)."""

    def __init__(self, user_context: UserExecutionContext, emitter: Emitter) -> None:
        self.user_context = user_context
        self.emitter = emitter

    async def execute_agent(self, context: AgentExecutionContext,
                            user_context: UserExecutionContext | None = None) -> AgentResult:
        return await run_agent(type(self).__name__, context, user_context or self.user_context, self.emitter)

    async def execute_pipeline(self, steps: Sequence[str], context: AgentExecutionContext,
                               user_context: UserExecutionContext | None = None) -> AgentResult:
        return await run_agent(type(self).__name__, replace(context, tools=tuple(steps)),
                               user_context or self.user_context, self.emitter)


class ExecutionEngine:
    """Legacy name kept so old imports work: a redirect that delegates to the canonical engine."""

    def __init__(self, user_context: UserExecutionContext, emitter: Emitter) -> None:
        self.user_context = user_context
        self._canonical = UserExecutionEngine(user_context, emitter)

    async def execute_agent(self, context: AgentExecutionContext,
                            user_context: UserExecutionContext | None = None) -> AgentResult:
        return await self._canonical.execute_agent(context, user_context)

    async def execute_pipeline(self, steps: Sequence[str], context: AgentExecutionContext,
                               user_context: UserExecutionContext | None = None) -> AgentResult:
        return await self._canonical.execute_pipeline(steps, context, user_context)


class SupervisorExecutionEngineAdapter:
    """A thin adapter the supervisor layer put around whatever engine it was given."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def user_context(self) -> UserExecutionContext:
        return self.engine.user_context

    async def execute_agent(self, context: AgentExecutionContext,
                            user_context: UserExecutionContext | None = None) -> AgentResult:
        return await self.engine.execute_agent(context, user_context)

    async def execute_pipeline(self, steps: Sequence[str], context: AgentExecutionContext,
                               user_context: UserExecutionContext | None = None) -> AgentResult:
        return await self.engine.execute_pipeline(steps, context, user_context)


class IsolatedExecutionEngine:
    """The retired fallback: works, but is meant to be gone once every caller uses the canonical one."""

    def __init__(self, user_context: UserExecutionContext, emitter: Emitter) -> None:
        self.user_context = user_context
        self.emitter = emitter

    async def execute_agent(self, context: AgentExecutionContext,
                            user_context: UserExecutionContext | None = None) -> AgentResult:
        return await run_agent(type(self).__name__, context, user_context or self.user_context, self.emitter)

    async def execute_pipeline(self, steps: Sequence[str], context: AgentExecutionContext,
                               user_context: UserExecutionContext | None = None) -> AgentResult:
        return await run_agent(type(self).__name__, replace(context, tools=tuple(steps)),
                               user_context or self.user_context, self.emitter)
