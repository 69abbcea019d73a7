"""Two supervisors for one job: the HTTP path and the WebSocket path used different ones.

Both are process-wide and stateless: they build a per-request engine and run the agent with it.
"""

from __future__ import annotations

from examples.agent_backend.agents import AgentResult
from examples.agent_backend.context import AgentExecutionContext, UserExecutionContext
from examples.agent_backend.engines import Engine
from examples.agent_backend.wiring import build_engine


class SupervisorAgent:
    """Supervises runs started over HTTP (``POST /api/runs``)."""

    async def run(self, context: AgentExecutionContext, user_context: UserExecutionContext,
                  engine: Engine | None = None) -> AgentResult:
        engine = engine or build_engine(user_context)
        if len(context.tools) > 1:
            return await engine.execute_pipeline(context.tools, context, user_context=user_context)
        return await engine.execute_agent(context, user_context=user_context)


class ChatOrchestrator:
    """Supervises runs asked for over the WebSocket (``{"type": "start_run"}`` on ``/ws``)."""

    async def run(self, context: AgentExecutionContext, user_context: UserExecutionContext,
                  engine: Engine | None = None) -> AgentResult:
        engine = engine or build_engine(user_context)
        if len(context.tools) > 1:
            return await engine.execute_pipeline(context.tools, context, user_context=user_context)
        return await engine.execute_agent(context, user_context=user_context)


supervisor_agent = SupervisorAgent()
chat_orchestrator = ChatOrchestrator()
