"""Runs of pathwatch-contract spans sent through the official OTLP/gRPC exporter, for end-to-end tests
that need exact control over what a backend version did (a deploy, a bleed, a retired engine)."""

from __future__ import annotations

import itertools

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from instrumentation import attributes as A

_ids = itertools.count()
CANONICAL_ENGINE = "app.engines.UserExecutionEngine"
RETIRED_ENGINE = "app.engines.IsolatedExecutionEngine"


def send_runs(endpoint: str, *, version: str, runs: int, owner: str | None = None,
              engine: str = CANONICAL_ENGINE, dropped_spans: int | None = None) -> None:
    """``runs`` runs of user alice at /ws: request -> engine -> two emits, each written to alice's socket.
    ``owner``: the user the engine instance was built for (another user = a bleed); ``engine``: which
    implementation executes (the retired one is marked retired); ``dropped_spans``: add a heartbeat."""
    provider = TracerProvider(resource=Resource.create(
        {"service.name": "backend", "service.version": version, "service.instance.id": f"pod-{version}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                                   schedule_delay_millis=50))
    tracer = provider.get_tracer("e2e")
    for _ in range(runs):
        run = f"run-{next(_ids)}"
        common = {A.ENTRY_POINT: "/ws", A.ENDUSER_PSEUDO_ID: "alice", A.RUN_ID: run}
        with tracer.start_as_current_span("websocket /ws", attributes={**common, A.SPAN_KIND: "request"}):
            with tracer.start_as_current_span("execution_engine.execute_agent", attributes={
                    **common, A.SPAN_KIND: "execute", A.ROLE: "execution_engine", A.IMPLEMENTATION: engine,
                    A.CANONICAL: engine == CANONICAL_ENGINE, A.RETIRED: engine == RETIRED_ENGINE,
                    A.USER_SCOPED: True, A.INSTANCE_ID: f"i-{run}", A.USER_OWNER: owner or "alice",
                    A.CALLER: "app.routes.websocket"}):
                for event in ("agent_started", "agent_completed"):
                    event_id = f"{run}-{event}"
                    with tracer.start_as_current_span(f"event_emitter.notify_{event}", attributes={
                            **common, A.SPAN_KIND: "emit", A.ROLE: "event_emitter",
                            A.IMPLEMENTATION: "app.emitters.Bridge", A.CANONICAL: True, A.EVENT_TYPE: event,
                            A.USER_TARGET: "alice", A.MESSAGING_MESSAGE_ID: event_id}):
                        with tracer.start_as_current_span("websocket.send_json", attributes={
                                **common, A.SPAN_KIND: "deliver", A.ROLE: "transport", A.EVENT_TYPE: event,
                                A.IMPLEMENTATION: "starlette.websockets.WebSocket", A.CONNECTION_ID: "c-1",
                                A.CONNECTION_USER: "alice", A.DELIVERY_OUTCOME: "written",
                                A.MESSAGING_MESSAGE_ID: event_id}):
                            pass
    if dropped_spans is not None:
        with tracer.start_as_current_span(A.HEARTBEAT_SPAN_NAME, attributes={
                A.SPAN_KIND: "heartbeat", A.DROPPED_SPANS: dropped_spans, A.INSTRUMENTATION_ERRORS: 1}):
            pass
    provider.shutdown()
