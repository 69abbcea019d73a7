"""Test backend: emitters, a socket manager (dispatch) and a queue-based batch flusher."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.instrumentation.sample.engines import UserContext


class ConnectionManager:
    def __init__(self) -> None:
        self.connections: dict[str, list[Any]] = {}

    def register(self, user_id: str, websocket: Any) -> None:
        self.connections.setdefault(user_id, []).append(websocket)

    def unregister(self, user_id: str, websocket: Any) -> None:
        sockets = self.connections.get(user_id, [])
        if websocket in sockets:
            sockets.remove(websocket)

    async def send_to_user(self, user_id: str, message: dict) -> int:
        sent = 0
        for websocket in list(self.connections.get(user_id, [])):
            await websocket.send_json(message)
            sent += 1
        return sent

    async def broadcast(self, message: dict) -> int:
        """Every socket of every user (a fan-out in the path map)."""
        sent = 0
        for sockets in list(self.connections.values()):
            for websocket in list(sockets):
                await websocket.send_json(message)
                sent += 1
        return sent


class AgentWebSocketBridge:
    """Emits events by sending them straight to the user's sockets (same task)."""

    def __init__(self, manager: ConnectionManager, user_context: UserContext | None = None) -> None:
        self.manager = manager
        self.user_context = user_context

    async def notify_agent_started(self, run_id: str, agent_name: str,
                                   user_context: UserContext | None = None) -> None:
        user = (user_context or self.user_context).user_id
        await self.manager.send_to_user(user, {"type": "agent_started", "run_id": run_id,
                                               "agent": agent_name})

    async def notify_agent_completed(self, run_id: str, user_context: UserContext | None = None,
                                     event_id: str | None = None) -> None:
        user = (user_context or self.user_context).user_id
        message = {"type": "agent_completed", "run_id": run_id}
        if event_id is not None:
            message["event_id"] = event_id
        await self.manager.send_to_user(user, message)


class QueuedEmitter:
    """Emits into a queue; a flusher task writes later (no context: linked by message key)."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.queue: asyncio.Queue = asyncio.Queue()

    def notify_tool_executing(self, run_id: str, tool: str) -> None:
        self.queue.put_nowait({"type": "tool_executing", "run_id": run_id, "tool": tool})

    async def flush_to(self, websocket: Any, count: int) -> None:
        for _ in range(count):
            await websocket.send_json(await self.queue.get())
