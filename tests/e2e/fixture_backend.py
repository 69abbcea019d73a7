"""A small backend shaped like the reference one, for the end-to-end tests.

Several implementations of the same jobs, as in the real code base: a canonical execution engine,
a second engine doing the same job (a duplicate path), a retired engine still reachable, an event
emitter whose user is fixed when it is built, and a socket manager whose ``send_to_user`` /
``send_to_thread`` write with Starlette's ``WebSocket.send_json``. Nothing here imports pathwatch:
``fixture_pathmap.yaml`` tells the instrumentation which class plays which role.

Sending is best effort, as in the reference: a dead socket is logged, never raised into the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

log = logging.getLogger(__name__)


@dataclass
class UserContext:
    """Who a piece of work is for: the user, the agent run and the conversation thread."""

    user_id: str
    run_id: str | None = None
    thread_id: str | None = None


# --- execution engines ------------------------------------------------------------------------------
class UserExecutionEngine:
    """The canonical engine: built per request for one user (``context`` is that user)."""

    def __init__(self, context: UserContext | None) -> None:
        self.context = context

    def execute_agent(self, context: UserContext) -> str:
        return f"{context.run_id}: done"


class RequestScopedExecutionEngine:
    """A second implementation of the same job, still doing the work itself (a duplicate path)."""

    def __init__(self, context: UserContext | None) -> None:
        self.context = context

    def execute_agent(self, context: UserContext) -> str:
        return f"{context.run_id}: done (request scoped)"


class IsolatedExecutionEngine:
    """Retired: still importable, still reachable behind a flag."""

    def __init__(self, context: UserContext | None) -> None:
        self.context = context

    def execute_agent(self, context: UserContext) -> str:
        return f"{context.run_id}: done (isolated)"


ENGINES: dict[str, type] = {
    "canonical": UserExecutionEngine,
    "request_scoped": RequestScopedExecutionEngine,
    "isolated": IsolatedExecutionEngine,
}


# --- sockets ----------------------------------------------------------------------------------------
class ConnectionManager:
    """Open sockets by user and by conversation thread."""

    def __init__(self) -> None:
        self._by_user: dict[str, list[WebSocket]] = {}
        self._by_thread: dict[str, list[WebSocket]] = {}

    def register(self, user_id: str, thread_id: str | None, websocket: WebSocket) -> None:
        self._by_user.setdefault(user_id, []).append(websocket)
        if thread_id:
            self._by_thread.setdefault(thread_id, []).append(websocket)

    def unregister(self, user_id: str, thread_id: str | None, websocket: WebSocket) -> None:
        for table, key in ((self._by_user, user_id), (self._by_thread, thread_id)):
            sockets = table.get(key or "", [])
            if websocket in sockets:
                sockets.remove(websocket)

    async def send_to_user(self, user_id: str, message: dict[str, Any]) -> int:
        return await self._send_all(self._by_user.get(user_id, []), message)

    async def send_to_thread(self, thread_id: str, message: dict[str, Any]) -> int:
        # everyone who joined the thread gets it: thread ids are not per user
        return await self._send_all(self._by_thread.get(thread_id, []), message)

    @staticmethod
    async def _send_all(sockets: list[WebSocket], message: dict[str, Any]) -> int:
        sent = 0
        for websocket in list(sockets):
            try:
                await websocket.send_json(message)
                sent += 1
            except (RuntimeError, WebSocketDisconnect) as exc:  # best effort: the run goes on
                log.info("socket write failed: %s", exc)
        return sent


# --- events -----------------------------------------------------------------------------------------
class AgentEventEmitter:
    """Events of one user's runs; the user is fixed when the emitter is built.

    With ``thread_id`` it sends to the conversation thread; with ``buffered`` it keeps messages
    until ``flush`` (a batching emitter).
    """

    def __init__(self, user_id: str, manager: ConnectionManager, *, thread_id: str | None = None,
                 buffered: bool = False) -> None:
        self.user_id = user_id
        self.thread_id = thread_id
        self._manager = manager
        self._outbox: list[dict[str, Any]] | None = [] if buffered else None

    async def notify_agent_started(self, run_id: str) -> None:
        await self._send({"type": "agent_started", "run_id": run_id})

    async def notify_agent_thinking(self, run_id: str, thought: str = "...") -> None:
        await self._send({"type": "agent_thinking", "run_id": run_id, "thought": thought})

    async def notify_agent_completed(self, run_id: str) -> None:
        await self._send({"type": "agent_completed", "run_id": run_id})

    async def flush(self) -> None:
        outbox, self._outbox = self._outbox or [], []
        for message in outbox:
            await self._manager.send_to_user(self.user_id, message)

    async def _send(self, message: dict[str, Any]) -> None:
        if self._outbox is not None:
            self._outbox.append(message)
        elif self.thread_id is not None:
            await self._manager.send_to_thread(self.thread_id, message)
        else:
            await self._manager.send_to_user(self.user_id, message)


async def agent_run(engine: Any, emitter: AgentEventEmitter, context: UserContext, *,
                    attempts: int = 1, completions: int = 1) -> None:
    """The golden path of one agent run: execute, then started ... completed to the user."""
    for _ in range(attempts):  # attempts > 1: the retry that runs the agent again
        engine.execute_agent(context)
    await emitter.notify_agent_started(context.run_id)
    for _ in range(completions):  # completions 0: the early return; 2: completion sent twice
        await emitter.notify_agent_completed(context.run_id)
