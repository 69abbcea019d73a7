"""One run end to end, shared by the HTTP and the WebSocket entry points."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry import trace

from examples.agent_backend.agents import AgentResult
from examples.agent_backend.context import AgentExecutionContext, UserExecutionContext
from examples.agent_backend.registry import new_run_id, run_registry
from examples.agent_backend.scenarios import Scenario, activate, deactivate, is_active
from examples.agent_backend.supervisors import chat_orchestrator, supervisor_agent
from examples.agent_backend.wiring import build_duplicate_engine, engine_rollout, engine_usage

EntryPoint = Literal["http", "websocket"]


@dataclass(frozen=True, slots=True)
class RunRequest:
    user_id: str
    scenario: Scenario
    thread_id: str | None = None
    request_id: str | None = None
    agent: str = "triage"
    tools: tuple[str, ...] = ("search",)
    websocket_connection_id: str | None = None


async def execute_run(entry: EntryPoint, request: RunRequest) -> dict[str, Any]:
    """Run the agent under the request's scenario; return what the HTTP response / socket ack says."""
    token = activate(request.scenario)
    try:
        return await _execute(entry, request)
    finally:
        deactivate(token)


async def _execute(entry: EntryPoint, request: RunRequest) -> dict[str, Any]:
    request_id = request.request_id or f"req_{uuid.uuid4().hex}"
    user_context = UserExecutionContext(
        user_id=request.user_id,
        thread_id=request.thread_id or f"thread_{uuid.uuid4().hex}",
        run_id=new_run_id(request.request_id),
        request_id=request_id,
        websocket_connection_id=request.websocket_connection_id,
    )
    trace_id = _trace_id()
    run_registry.register(user_context.run_id, user_context.thread_id, user_context.user_id)
    context = AgentExecutionContext.for_user(user_context, request.agent, request.tools)
    rollout_percent = engine_rollout.percent
    primary, other = ((supervisor_agent, chat_orchestrator) if entry == "http"
                      else (chat_orchestrator, supervisor_agent))
    results = [await primary.run(context, user_context)]
    if is_active(Scenario.S4):
        # S4, reference bug: the start message was routed to both supervisors, so the HTTP path and
        # the WebSocket path each executed the same run, with different engines.
        duplicate_context = user_context.child("duplicate")
        duplicate_engine = build_duplicate_engine(duplicate_context)
        results.append(await other.run(context, duplicate_context, engine=duplicate_engine))
    return _outcome(request, user_context, results, rollout_percent, trace_id)


def _trace_id() -> str | None:
    """The trace this run's spans go into: its HTTP request's, or for a run over the socket the
    socket's (32 hex digits, as OTLP carries it); None when the process is not traced. Read from the
    ambient context the instrumentation set, as a backend hands a trace id to its clients for support
    requests; the demo's judge ties pathwatch's findings to the users' runs by it (S10's users share run
    ids). The backend starts no span and sets no attribute: the instrumentation is all zero-code."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def _outcome(request: RunRequest, user_context: UserExecutionContext, results: list[AgentResult],
             rollout_percent: float, trace_id: str | None) -> dict[str, Any]:
    for result in results:
        engine_usage.record(request.scenario, result.engine)
    outcome: dict[str, Any] = {
        "run_id": user_context.run_id,
        "thread_id": user_context.thread_id,
        "request_id": user_context.request_id,
        "scenario": request.scenario.value,
        "status": results[0].status,
        "engine": results[0].engine,
        "engines": [result.engine for result in results],
        "trace_id": trace_id,
    }
    if request.scenario is Scenario.S11:
        outcome["rollout_percent"] = rollout_percent
    return outcome
