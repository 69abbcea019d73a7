"""The socket manager at the bottom of every event path.

``send_to_user`` writes a message to every socket of one user with ``websocket.send_json`` and
reports whether it reached at least one (``True``/``False``). Writes to one socket are serialized by
a per-connection lock, because several runs of one user may send at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from examples.agent_backend.scenarios import Scenario, is_active

logger = logging.getLogger(__name__)

Message = dict[str, Any]


@dataclass(slots=True)
class _Connection:
    connection_id: str
    user_id: str
    websocket: Any  # starlette.websockets.WebSocket (anything with async send_json)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class WebSocketManager:
    _ids = itertools.count(1)

    def __init__(self, max_queued: int = 1_000) -> None:
        self._by_user: dict[str, dict[str, _Connection]] = {}
        self._by_id: dict[str, _Connection] = {}
        # messages held for users without a socket here; flushed when their socket connects HERE
        self._queued: deque[tuple[str, Message]] = deque(maxlen=max_queued)

    # --- connections ----------------------------------------------------------------------
    async def connect(self, user_id: str, websocket: Any) -> str:
        connection = _Connection(f"conn-{next(self._ids)}", user_id, websocket)
        self._by_user.setdefault(user_id, {})[connection.connection_id] = connection
        self._by_id[connection.connection_id] = connection
        await self._flush_queued(connection)
        return connection.connection_id

    def disconnect(self, connection_id: str) -> None:
        connection = self._by_id.pop(connection_id, None)
        if connection is None:
            return
        sockets = self._by_user.get(connection.user_id, {})
        sockets.pop(connection_id, None)
        if not sockets:
            self._by_user.pop(connection.user_id, None)

    def connection_count(self) -> int:
        return len(self._by_id)

    # --- sends ----------------------------------------------------------------------------
    async def send_to_user(self, user_id: str, message: Message) -> bool | None:
        connections = list(self._by_user.get(user_id, {}).values())
        written = 0
        for connection in connections:
            written += await self._write(connection, message)
        if is_active(Scenario.S6):
            # S6, reference bug: this send path fell off the end without `return`, so its callers got
            # None instead of a success value and the bridge re-sent the event.
            return None
        return written > 0

    async def send_to_thread(self, thread_id: str, message: Message) -> bool | None:
        # Reference bug (used by S2): the thread id is passed on as if it were a user id, so the
        # lookup finds no socket and the message goes nowhere.
        return await self.send_to_user(thread_id, message)

    async def reply(self, connection_id: str, message: Message) -> bool:
        """Answer on one connection (protocol replies: connected, run_finished, pong, error)."""
        connection = self._by_id.get(connection_id)
        return bool(connection and await self._write(connection, message))

    def queue_message(self, user_id: str, message: Message) -> None:
        """Hold a message until the user's socket connects to this manager (batching path)."""
        self._queued.append((user_id, message))

    def queued_count(self) -> int:
        return len(self._queued)

    # --- internals ------------------------------------------------------------------------
    async def _write(self, connection: _Connection, message: Message) -> bool:
        try:
            async with connection.lock:
                await connection.websocket.send_json(message)
            return True
        except Exception as exc:  # a closed or broken socket: drop it, keep serving the others
            logger.info("socket %s write failed (%s); dropping it", connection.connection_id,
                        type(exc).__name__)
            self.disconnect(connection.connection_id)
            return False

    async def _flush_queued(self, connection: _Connection) -> None:
        mine = [item for item in self._queued if item[0] == connection.user_id]
        for item in mine:
            self._queued.remove(item)
            await self._write(connection, item[1])


# The manager every socket registers on.
websocket_manager = WebSocketManager()
# A second module-level instance, as the reference had two `get_websocket_manager()` singletons in
# two modules. Nothing registers sockets here, so what is queued here is never flushed (S9).
legacy_websocket_manager = WebSocketManager()
