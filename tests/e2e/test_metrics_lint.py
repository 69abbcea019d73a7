"""The sidecar's /metrics output passes `promtool check metrics` (Prometheus' own linter), with every
kind of series present: findings with exemplars, calls, delivery, receiver, state, heartbeat counts."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from instrumentation import attributes as A
from tests.e2e.fixture_sidecar import Sidecar
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)


def send_spans(endpoint: str) -> None:
    """A run whose user-scoped engine was built for another user (a bleed), its emits and writes, and a
    heartbeat with dropped spans — through the official OTLP exporter."""
    provider = TracerProvider(resource=Resource.create({"service.name": "lint", "service.version": "1"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("lint")
    common = {A.ENTRY_POINT: "/ws", A.ENDUSER_PSEUDO_ID: "alice", A.RUN_ID: "run-1"}
    with tracer.start_as_current_span("websocket /ws", attributes={**common, A.SPAN_KIND: "request"}):
        with tracer.start_as_current_span("execution_engine.execute_agent", attributes={
                **common, A.SPAN_KIND: "execute", A.ROLE: "execution_engine",
                A.IMPLEMENTATION: "app.UserExecutionEngine", A.CANONICAL: True, A.USER_SCOPED: True,
                A.INSTANCE_ID: "i-1", A.USER_OWNER: "bob"}):
            for index, event in enumerate(("agent_started", "agent_completed")):
                event_id = f"e-{index}"
                with tracer.start_as_current_span(f"event_emitter.notify_{event}", attributes={
                        **common, A.SPAN_KIND: "emit", A.ROLE: "event_emitter",
                        A.IMPLEMENTATION: "app.Bridge", A.CANONICAL: True, A.EVENT_TYPE: event,
                        A.USER_TARGET: "alice", A.MESSAGING_MESSAGE_ID: event_id}):
                    with tracer.start_as_current_span("websocket.send_json", attributes={
                            **common, A.SPAN_KIND: "deliver", A.ROLE: "transport", A.EVENT_TYPE: event,
                            A.IMPLEMENTATION: "starlette.websockets.WebSocket", A.CONNECTION_ID: "c-1",
                            A.CONNECTION_USER: "alice", A.DELIVERY_OUTCOME: "written",
                            A.MESSAGING_MESSAGE_ID: event_id}):
                        pass
    with tracer.start_as_current_span(A.HEARTBEAT_SPAN_NAME, attributes={
            A.SPAN_KIND: "heartbeat", A.DROPPED_SPANS: 3, A.INSTRUMENTATION_ERRORS: 1}):
        pass
    provider.shutdown()


def test_metrics_pass_promtool_check_metrics(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run scripts/setup.sh debian (Debian's prometheus package)")
    with Sidecar(tmp_path, rules={"delivery_deadline_s": 0.2, "run_idle_s": 0.3}) as sidecar:
        send_spans(sidecar.grpc_endpoint)
        wait_until(lambda: sidecar.metric("pathwatch_findings_total", rule="bleed.owner_vs_ambient") >= 1
                   and sidecar.metric("pathwatch_runs_completed_total") >= 1
                   and sidecar.metric("pathwatch_backend_dropped_spans_total") == 3,
                   timeout=20, message="the bleed finding, the judged run and the heartbeat on /metrics")
        exposition = sidecar.metrics()
    for family in ("pathwatch_calls_total", "pathwatch_events_written_total",
                   "pathwatch_delivery_latency_seconds_bucket", "pathwatch_receiver_spans_total",
                   "pathwatch_state_entries"):
        assert family in exposition, family
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
