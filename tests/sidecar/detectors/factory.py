"""Build SpanRecords the way the decoder would, with realistic defaults, for detector tests.

``Trace`` hands out spans of one request (ids, parents, users, times filled in); ``clean_run``
returns a whole healthy run in arrival order (children end first, the request span last).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from instrumentation.attributes import DeliveryOutcomes, SpanKinds
from sidecar.config import RulesConfig, StateConfig
from sidecar.model import SpanRecord

MS = 1_000_000
S = 1_000_000_000
T0 = 1_700_000_000 * S  # span clock (backend wall time)
NOW = 5_000 * S  # sidecar clock passed as now_ns

ENGINE = "demo.engines.UserExecutionEngine"
OTHER_ENGINE = "demo.engines.RequestScopedExecutionEngine"
RETIRED_ENGINE = "demo.engines.IsolatedExecutionEngine"
EMITTER = "demo.emitters.UnifiedEmitter"
OTHER_EMITTER = "demo.emitters.AgentBridge"
MANAGER = "demo.sockets.ConnectionManager"
TRANSPORT = "starlette.websockets.WebSocket"
REQUIRED = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")

_ids = itertools.count(1)


def new_id(width: int = 16) -> str:
    return f"{next(_ids):0{width}x}"


def rules(**overrides: object) -> RulesConfig:
    """The rules, with no export allowance unless given: the detectors' timings in these tests are
    the deadline's and the idle time's (a test of the allowance sets it)."""
    overrides.setdefault("delivery_export_allowance_s", 0.0)
    return RulesConfig(**overrides)


def state(**overrides: object) -> StateConfig:
    return StateConfig(**overrides)


class Trace:
    """Spans of one request of ``user`` at ``entry_point``; times advance 1 ms per span."""

    def __init__(self, user: str | None = "user-a", entry_point: str = "/ws", run_id: str | None = None,
                 start_ns: int = T0, service_instance: str = "pod-1") -> None:
        self.trace_id = new_id(32)
        self.root_span_id = new_id()
        self.user = user
        self.entry_point = entry_point
        self.run_id = run_id if run_id is not None else f"run-{new_id(8)}"
        self.clock = start_ns
        self.service_instance = service_instance

    def _times(self, duration_ms: float) -> tuple[int, int]:
        start = self.clock
        self.clock += MS
        return start, start + int(duration_ms * MS)

    def _span(self, kind: str, name: str, parent: str | None, duration_ms: float, **fields: object) -> SpanRecord:
        start, end = self._times(duration_ms)
        values: dict[str, object] = dict(
            trace_id=self.trace_id, span_id=new_id(), parent_span_id=parent, name=name,
            start_ns=start, end_ns=end, kind=kind, entry_point=self.entry_point, user=self.user,
            service_name="backend", service_version="1.2.3", service_instance=self.service_instance,
            received_ns=NOW)
        values.update(fields)
        return SpanRecord(**values)

    def request(self, duration_ms: float = 500, **fields: object) -> SpanRecord:
        start = fields.pop("start_ns", T0 - MS)
        values: dict[str, object] = dict(
            trace_id=self.trace_id, span_id=self.root_span_id, parent_span_id=None, name="GET /ws",
            start_ns=start, end_ns=start + int(duration_ms * MS), kind=SpanKinds.REQUEST,
            entry_point=self.entry_point, user=self.user, service_name="backend",
            service_version="1.2.3", service_instance=self.service_instance, received_ns=NOW)
        values.update(fields)
        return SpanRecord(**values)

    def execute(self, implementation: str = ENGINE, *, canonical: bool | None = None,
                parent: str | None = None, duration_ms: float = 200, **fields: object) -> SpanRecord:
        defaults: dict[str, object] = dict(
            role="execution_engine", implementation=implementation,
            canonical=(implementation == ENGINE) if canonical is None else canonical,
            function=f"{implementation}.execute_agent", instance_id=new_id(8),
            run_id=self.run_id, owner=self.user, subject=self.user, user_scoped=True, thread_id="th-1",
            caller="demo.routes.run_agent")
        defaults.update(fields)
        return self._span(SpanKinds.EXECUTE, "execution_engine.execute_agent",
                          parent or self.root_span_id, duration_ms, **defaults)

    def emit(self, event_type: str, implementation: str = EMITTER, *, parent: str | None = None,
             event_id: str | None = "auto", duration_ms: float = 2, **fields: object) -> SpanRecord:
        defaults: dict[str, object] = dict(
            role="event_emitter", implementation=implementation, canonical=implementation == EMITTER,
            function=f"{implementation}.notify_{event_type}", instance_id="emitter-" + (self.user or "x"),
            run_id=self.run_id, event_type=event_type, event_id=f"ev-{new_id(12)}" if event_id == "auto" else event_id,
            target=self.user, owner=self.user, user_scoped=True)
        defaults.update(fields)
        return self._span(SpanKinds.EMIT, f"event_emitter.notify_{event_type}",
                          parent or self.root_span_id, duration_ms, **defaults)

    def dispatch(self, emit: SpanRecord | None = None, *, outcome: str | None = DeliveryOutcomes.WRITTEN,
                 writes: int | None = 1, **fields: object) -> SpanRecord:
        defaults: dict[str, object] = dict(
            role="socket_manager", implementation=MANAGER, canonical=True,
            function=f"{MANAGER}.send_to_user", instance_id="manager-1",
            run_id=emit.run_id if emit else self.run_id,
            event_type=emit.event_type if emit else None, event_id=emit.event_id if emit else None,
            target=emit.target if emit else self.user, outcome=outcome, dispatch_writes=writes)
        defaults.update(fields)
        return self._span(SpanKinds.DISPATCH, "socket_manager.send_to_user",
                          emit.span_id if emit else self.root_span_id, 1, **defaults)

    def deliver(self, of: SpanRecord, *, connection_user: str | None = None,
                outcome: str = DeliveryOutcomes.WRITTEN, connection_id: str = "conn-1",
                **fields: object) -> SpanRecord:
        """A socket write of the event ``of`` (an emit or a dispatch), made inside that call."""
        defaults: dict[str, object] = dict(
            role="transport", implementation=TRANSPORT, canonical=True,
            function=f"{TRANSPORT}.send_json", run_id=of.run_id, event_type=of.event_type,
            event_id=of.event_id, connection_id=connection_id,
            connection_user=connection_user if connection_user is not None else of.target,
            outcome=outcome, link="context")
        defaults.update(fields)
        return self._span(SpanKinds.DELIVER, "websocket.send_json", of.span_id, 0.5, **defaults)


def clean_run(user: str = "user-a", *, entry_point: str = "/ws", start_ns: int = T0,
              events: tuple[str, ...] = REQUIRED) -> list[SpanRecord]:
    """A healthy run in arrival order: each write, then its emit, then the execute, then the request."""
    trace = Trace(user=user, entry_point=entry_point, start_ns=start_ns)
    execute_id = new_id()
    spans: list[SpanRecord] = []
    for event_type in events:
        emit = trace.emit(event_type, parent=execute_id)
        spans.append(trace.deliver(emit, connection_id=f"conn-{user}"))
        spans.append(emit)
    execute = trace.execute(span_id=execute_id, start_ns=start_ns, end_ns=trace.clock + MS)
    spans.append(execute)
    spans.append(trace.request(start_ns=start_ns - MS, end_ns=trace.clock + 2 * MS))
    return spans


def but(span: SpanRecord, **changes: object) -> SpanRecord:
    """A copy of ``span`` with some fields changed."""
    return replace(span, **changes)


def sample(telemetry: object, name: str, **labels: str) -> float:
    """A metric sample's value, 0.0 when the series does not exist yet."""
    value = telemetry.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return 0.0 if value is None else value


def rule_ids(findings: list) -> list[str]:
    return [finding.rule for finding in findings]


def tick_through(detector: object, start_ns: int, until_ns: int, step_ns: int = S) -> list:
    """The findings of ``detector.tick`` called every ``step_ns`` after ``start_ns`` until
    ``until_ns``, as the pipeline's ticks would (a wait measured against the detector's clock)."""
    findings, now = [], start_ns
    while now < until_ns:
        now += step_ns
        findings += detector.tick(now)
    return findings
