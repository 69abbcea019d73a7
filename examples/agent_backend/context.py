"""Per-request contexts, as the reference backend had them.

``UserExecutionContext`` says for whom the work runs (user, thread, run, request, socket);
``AgentExecutionContext`` says what to run. Both are immutable, so a context handed to one task cannot
be rewritten by another; a child context keeps user, thread and run and gets its own request id.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class UserExecutionContext:
    user_id: str
    thread_id: str
    run_id: str
    request_id: str
    websocket_connection_id: str | None = None
    parent_request_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("user_id", "thread_id", "run_id", "request_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"UserExecutionContext.{name} must be a non-empty string, got {value!r}")

    def child(self, operation: str) -> UserExecutionContext:
        """A context for a sub-operation: same user, thread and run; its own request id."""
        return replace(self, request_id=f"{self.request_id}/{operation}",
                       parent_request_id=self.request_id)


@dataclass(frozen=True, slots=True)
class AgentExecutionContext:
    agent_name: str
    run_id: str
    thread_id: str
    user_id: str
    tools: tuple[str, ...] = field(default=("search",))

    @classmethod
    def for_user(cls, user_context: UserExecutionContext, agent_name: str,
                 tools: tuple[str, ...] = ("search",)) -> AgentExecutionContext:
        return cls(agent_name=agent_name, run_id=user_context.run_id,
                   thread_id=user_context.thread_id, user_id=user_context.user_id, tools=tools)
