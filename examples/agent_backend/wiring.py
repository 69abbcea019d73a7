"""Which engine and which emitter a run gets: the switchboard for most scenarios.

S0 and every scenario not named here get the canonical pair: ``UserExecutionEngine`` with an
``AgentWebSocketBridge`` on the shared ``websocket_manager``.
"""

from __future__ import annotations

import logging
from collections import Counter

from examples.agent_backend.agents import Emitter
from examples.agent_backend.context import UserExecutionContext
from examples.agent_backend.emitters import AgentWebSocketBridge, UnifiedEventEmitter, WebSocketNotifier
from examples.agent_backend.engines import (Engine, ExecutionEngine, IsolatedExecutionEngine,
                                            RequestScopedExecutionEngine, SupervisorExecutionEngineAdapter,
                                            UserExecutionEngine)
from examples.agent_backend.scenarios import Scenario, active
from examples.agent_backend.settings import settings
from examples.agent_backend.sockets import WebSocketManager, legacy_websocket_manager, websocket_manager

logger = logging.getLogger(__name__)


def build_emitter(user_context: UserExecutionContext) -> Emitter:
    scenario = active()
    if scenario is Scenario.S2:
        return AgentWebSocketBridge(websocket_manager, user_context, progress_to_thread=True)
    if scenario is Scenario.S7:
        # S7, reference bug: a code path instantiated WebSocketManager() instead of using the shared
        # one; the fresh manager holds no connections, so every event finds no socket.
        return AgentWebSocketBridge(WebSocketManager(), user_context)
    if scenario is Scenario.S8:
        return WebSocketNotifier(AgentWebSocketBridge(websocket_manager, user_context))
    if scenario is Scenario.S9:
        return AgentWebSocketBridge(legacy_websocket_manager, user_context, batched=True)
    if scenario is Scenario.S10:
        return AgentWebSocketBridge(websocket_manager, user_context, route_by_run=True)
    return AgentWebSocketBridge(websocket_manager, user_context)


def build_engine(user_context: UserExecutionContext) -> Engine:
    scenario = active()
    if scenario is Scenario.S3:
        return ExecutionEngine(user_context, _legacy_emitter(user_context))
    if scenario is Scenario.S11:
        return engine_rollout.create_engine(user_context, build_emitter(user_context))
    return UserExecutionEngine(user_context, build_emitter(user_context))


def build_duplicate_engine(user_context: UserExecutionContext) -> Engine:
    """The engine of S4's second execution: the other supervisor's legacy path."""
    engine = RequestScopedExecutionEngine(user_context, build_emitter(user_context))
    return SupervisorExecutionEngineAdapter(engine)


def _legacy_emitter(user_context: UserExecutionContext) -> Emitter:
    # S3, reference bug: the legacy path built the emitter with positional arguments in the wrong
    # order -- UnifiedEventEmitter(manager, user_id, thread_id) got (thread_id, user_id) -- so its
    # user is the thread id and nothing it sends finds a socket.
    return UnifiedEventEmitter(websocket_manager, user_context.thread_id, user_context.user_id)


class EngineRollout:
    """S11: the fix of the engine factory is rolled out to a share of runs that rises with each run.

    Before the fix the factory's first attempt passed an invalid keyword, raised ``TypeError``, and
    it fell back to the retired ``IsolatedExecutionEngine`` -- every time, as in the reference case.
    The share of fixed runs grows linearly to 100% over ``ramp_runs`` runs; the choice per run is
    deterministic (error diffusion), so a test sees the same shift every time.
    """

    def __init__(self, ramp_runs: int) -> None:
        if ramp_runs < 1:
            raise ValueError(f"ramp_runs must be >= 1, got {ramp_runs}")
        self.ramp_runs = ramp_runs
        self.reset()

    def reset(self) -> None:
        self._runs = 0
        self._credit = 0.0

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self._runs / self.ramp_runs)

    def create_engine(self, user_context: UserExecutionContext, emitter: Emitter) -> Engine:
        fixed = self._next_run_is_fixed()
        try:
            if fixed:
                return UserExecutionEngine(user_context, emitter)
            # the pre-fix call: 'websocket_emitter' is not a parameter, so this raises TypeError
            return UserExecutionEngine(user_context=user_context, websocket_emitter=emitter)  # type: ignore
        except TypeError:
            logger.debug("engine factory fell back to IsolatedExecutionEngine")
            return IsolatedExecutionEngine(user_context, emitter)

    def _next_run_is_fixed(self) -> bool:
        self._credit += self.percent / 100.0
        self._runs += 1
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False


engine_rollout = EngineRollout(settings.s11_ramp_runs)


class EngineUsage:
    """Runs per (scenario, engine) since start or reset: a debug view (bounded: both sets are fixed)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def record(self, scenario: Scenario, engine: str) -> None:
        self._counts[(scenario.value, engine)] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        view: dict[str, dict[str, int]] = {}
        for (scenario, engine), count in sorted(self._counts.items()):
            view.setdefault(scenario, {})[engine] = count
        return view

    def reset(self) -> None:
        self._counts.clear()


engine_usage = EngineUsage()
