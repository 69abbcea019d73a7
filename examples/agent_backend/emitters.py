"""Event emitters: the bridge (canonical), a unified emitter bound to one user, and a notifier.

Every agent event is one outgoing dict ``{"type", "run_id", "thread_id", "payload"}``. Like the
reference, it carries no event id and nothing confirms that it reached the client.

The notify methods are spelled out on each class (no shared mixin) because the reference had them
duplicated too, and because each class must own its methods for the path map to name them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from examples.agent_backend.context import UserExecutionContext
from examples.agent_backend.registry import RunRegistry, run_registry
from examples.agent_backend.sockets import Message, WebSocketManager

logger = logging.getLogger(__name__)

REQUIRED_EVENTS = ("agent_started", "agent_thinking", "tool_executing", "tool_completed",
                   "agent_completed")
TERMINAL_EVENTS = ("agent_completed", "agent_error")
AGENT_EVENTS = frozenset(REQUIRED_EVENTS) | frozenset(TERMINAL_EVENTS)
PROGRESS_EVENTS = frozenset({"agent_thinking", "agent_error"})

Details = dict[str, Any] | None


def build_message(event_type: str, run_id: str, thread_id: str, payload: dict[str, Any]) -> Message:
    return {"type": event_type, "run_id": run_id, "thread_id": thread_id, "payload": payload}


class AgentWebSocketBridge:
    """The canonical emitter: one per request, sends each event to the run's user.

    ``progress_to_thread`` (S2), ``route_by_run`` (S10) and ``batched`` (S9) switch on the reference's
    buggy routing paths; the wiring module decides, per scenario, which bridge a run gets.
    """

    MAX_SEND_ATTEMPTS = 3

    def __init__(self, manager: WebSocketManager, user_context: UserExecutionContext, *,
                 registry: RunRegistry = run_registry, progress_to_thread: bool = False,
                 route_by_run: bool = False, batched: bool = False) -> None:
        self.manager = manager
        self.user_context = user_context
        self.registry = registry
        self.progress_to_thread = progress_to_thread
        self.route_by_run = route_by_run
        self.batched = batched

    async def notify_agent_started(self, run_id: str, agent_name: str, details: Details = None, *,
                                   user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_started", run_id, agent_name, details, user_context)

    async def notify_agent_thinking(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_thinking", run_id, agent_name, details, user_context)

    async def notify_tool_executing(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("tool_executing", run_id, agent_name, details, user_context)

    async def notify_tool_completed(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("tool_completed", run_id, agent_name, details, user_context)

    async def notify_agent_completed(self, run_id: str, agent_name: str, details: Details = None, *,
                                     user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_completed", run_id, agent_name, details, user_context)

    async def notify_agent_error(self, run_id: str, agent_name: str, details: Details = None, *,
                                 user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_error", run_id, agent_name, details, user_context)

    async def _emit(self, event_type: str, run_id: str, agent_name: str, details: Details,
                    user_context: UserExecutionContext | None) -> bool:
        context = user_context or self.user_context
        payload = {"agent": agent_name, **(details or {})}
        message = build_message(event_type, run_id, context.thread_id, payload)
        # The bridge checks the message is JSON before handing it on; a payload that is not (S8)
        # raises here, inside the emitter, before anything is written.
        json.dumps(message)
        if self.batched:
            # S9, reference bug: events were batched into a manager instance whose flusher only runs
            # for sockets registered on it; the user's socket registered on another instance.
            self.manager.queue_message(context.user_id, message)
            return True
        if self.progress_to_thread and event_type in PROGRESS_EVENTS:
            # S2, reference bug: progress/error events were resolved run -> thread and handed to
            # send_to_thread, which treats the thread id as a user id.
            thread_id = self.registry.thread_for_run(run_id) or context.thread_id
            return bool(await self.manager.send_to_thread(thread_id, message))
        return await self._send_with_retry(self._recipient(run_id, context), message)

    def _recipient(self, run_id: str, context: UserExecutionContext) -> str:
        if self.route_by_run:
            # S10, reference bug: the recipient was looked up run -> thread -> user. With two runs
            # sharing a run id, the map holds the last writer's thread, i.e. another user.
            thread_id = self.registry.thread_for_run(run_id)
            return self.registry.user_for_thread(thread_id) or context.user_id
        return context.user_id

    async def _send_with_retry(self, user_id: str, message: Message) -> bool:
        # An answer of None means "unknown", so the bridge tries again (that is what S6 trips over);
        # False means "no socket for this user" and is final.
        for _ in range(self.MAX_SEND_ATTEMPTS):
            delivered = await self.manager.send_to_user(user_id, message)
            if delivered is not None:
                return delivered
        return False


class UnifiedEventEmitter:
    """An emitter whose recipient is fixed at construction: ``UnifiedEventEmitter(manager, user_id, thread_id)``.

    ``user_context`` on a call only describes the run the event is about; the event always goes to
    ``self.user_id``. Built for the wrong user (S1) or with swapped arguments (S3), it sends elsewhere.
    """

    def __init__(self, manager: WebSocketManager, user_id: str, thread_id: str) -> None:
        self.manager = manager
        self.user_id = user_id
        self.thread_id = thread_id

    async def notify_agent_started(self, run_id: str, agent_name: str, details: Details = None, *,
                                   user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_started", run_id, agent_name, details, user_context)

    async def notify_agent_thinking(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_thinking", run_id, agent_name, details, user_context)

    async def notify_tool_executing(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("tool_executing", run_id, agent_name, details, user_context)

    async def notify_tool_completed(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("tool_completed", run_id, agent_name, details, user_context)

    async def notify_agent_completed(self, run_id: str, agent_name: str, details: Details = None, *,
                                     user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_completed", run_id, agent_name, details, user_context)

    async def notify_agent_error(self, run_id: str, agent_name: str, details: Details = None, *,
                                 user_context: UserExecutionContext | None = None) -> bool:
        return await self._emit("agent_error", run_id, agent_name, details, user_context)

    async def _emit(self, event_type: str, run_id: str, agent_name: str, details: Details,
                    user_context: UserExecutionContext | None) -> bool:
        thread_id = user_context.thread_id if user_context else self.thread_id
        message = build_message(event_type, run_id, thread_id, {"agent": agent_name, **(details or {})})
        return bool(await self.manager.send_to_user(self.user_id, message))


class WebSocketNotifier:
    """Delegates every notification to a bridge and swallows its errors.

    Reference: "notifications must never break the agent" -- so a failing notify was logged and the
    agent carried on and reported success (S8).
    """

    def __init__(self, bridge: AgentWebSocketBridge) -> None:
        self.bridge = bridge

    @property
    def user_context(self) -> UserExecutionContext:
        return self.bridge.user_context

    async def notify_agent_started(self, run_id: str, agent_name: str, details: Details = None, *,
                                   user_context: UserExecutionContext | None = None) -> bool:
        return await self._swallowing(self.bridge.notify_agent_started, run_id, agent_name, details,
                                      user_context)

    async def notify_agent_thinking(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._swallowing(self.bridge.notify_agent_thinking, run_id, agent_name, details,
                                      user_context)

    async def notify_tool_executing(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._swallowing(self.bridge.notify_tool_executing, run_id, agent_name, details,
                                      user_context)

    async def notify_tool_completed(self, run_id: str, agent_name: str, details: Details = None, *,
                                    user_context: UserExecutionContext | None = None) -> bool:
        return await self._swallowing(self.bridge.notify_tool_completed, run_id, agent_name, details,
                                      user_context)

    async def notify_agent_completed(self, run_id: str, agent_name: str, details: Details = None, *,
                                     user_context: UserExecutionContext | None = None) -> bool:
        return await self._swallowing(self.bridge.notify_agent_completed, run_id, agent_name, details,
                                      user_context)

    async def notify_agent_error(self, run_id: str, agent_name: str, details: Details = None, *,
                                 user_context: UserExecutionContext | None = None) -> bool:
        return await self._swallowing(self.bridge.notify_agent_error, run_id, agent_name, details,
                                      user_context)

    @staticmethod
    async def _swallowing(notify, run_id, agent_name, details, user_context) -> bool:
        try:
            return await notify(run_id, agent_name, details, user_context=user_context)
        except Exception as exc:
            logger.warning("notification for run %s failed and was ignored: %s", run_id,
                           type(exc).__name__)
            return False
