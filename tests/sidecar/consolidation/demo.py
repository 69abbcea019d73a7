"""Real spans of the demo backend, decoded by the sidecar's real decoder.

The demo app (``examples/agent_backend``) runs in-process under the real ``instrumentation`` API (its
own path map) with an in-memory exporter; clients are real WebSockets through Starlette's TestClient.
Finished spans are encoded as an OTLP ``ExportTraceServiceRequest`` (the SDK's own encoder) and
decoded by ``SpanDecoder``. A *deploy* re-labels the resource's ``service.version`` of one drive's
spans before decoding: the same code, a second version, with the bug that drive switched on.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

import instrumentation
from sidecar.model import SpanRecord
from sidecar.receiver import SpanDecoder

PATHMAP = Path(__file__).resolve().parents[3] / "examples" / "agent_backend" / "pathmap.yaml"


class DemoBackend:
    def __init__(self, client: TestClient, exporter: InMemorySpanExporter) -> None:
        self.client = client
        self.exporter = exporter
        self._decoder = SpanDecoder()

    def run(self, scenario: str, runs: int, users: int = 3) -> None:
        """``runs`` agent runs of ``scenario`` over WebSockets, spread over ``users`` users."""
        for index in range(runs):
            user = f"demo-user-{index % users}"
            with self.client.websocket_connect(f"/ws?user_id={user}") as socket:
                assert socket.receive_json()["type"] == "connected"
                socket.send_json({"type": "start_run", "scenario": scenario})
                while socket.receive_json().get("type") != "run_finished":
                    pass

    def take(self, version: str) -> list[SpanRecord]:
        """The spans finished so far, as the sidecar decodes them, under ``service.version``."""
        spans = self.exporter.get_finished_spans()
        self.exporter.clear()
        request = encode_spans(spans)
        for resource_spans in request.resource_spans:
            attributes = [kv for kv in resource_spans.resource.attributes if kv.key != "service.version"]
            attributes.append(KeyValue(key="service.version", value=AnyValue(string_value=version)))
            del resource_spans.resource.attributes[:]
            resource_spans.resource.attributes.extend(attributes)
        return self._decoder.decode(request.SerializeToString(), time.monotonic_ns()).spans


@contextmanager
def demo_backend(monkeypatch) -> Iterator[DemoBackend]:
    monkeypatch.setenv("PATHWATCH_HMAC_KEY", "consolidation-tests")
    monkeypatch.delenv("PATHWATCH_ALLOW_RAW_USER_IDS", raising=False)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "demo-backend",
                                                        "service.version": "1.0.0"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentation.instrument(PATHMAP, tracer_provider=provider, heartbeat_interval_s=0)
    try:
        fresh = "examples.agent_backend.app" not in sys.modules
        module = importlib.import_module("examples.agent_backend.app")
        if not fresh:  # built before pathwatch patched FastAPI: give it the middleware explicitly
            instrumentation.instrument_app(module.app, tracer_provider=provider)
        with TestClient(module.app) as client:
            yield DemoBackend(client, exporter)
    finally:
        instrumentation.uninstrument()
