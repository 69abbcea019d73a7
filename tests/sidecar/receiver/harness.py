"""Receivers for tests: in-process (real gRPC and HTTP servers on free ports, fake detectors) and
a real sidecar process started from a temporary config."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar import testing
from sidecar.pipeline import Pipeline
from sidecar.receiver import ExportHandler, GrpcReceiver, HttpReceiver, SpanDecoder
from sidecar.receiver.export import RETRY_AFTER_S
from sidecar.telemetry import Telemetry
from tests.sidecar.receiver.fakes import FakeAlerts, FakeIncidents, RecordingDetector

ROOT = Path(__file__).resolve().parents[3]
GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: the ``Retry-After`` values a refusal may carry (one is drawn per answer: jitter)
RETRY_AFTER = {str(seconds) for seconds in RETRY_AFTER_S}


def retry_after_in(raw_answer: bytes) -> bool:
    """Whether a raw HTTP/1.1 answer carries one of the ``Retry-After`` values a refusal may."""
    head = raw_answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    return any(line == b"retry-after: " + value.encode() for value in RETRY_AFTER for line in head)


def stalled_requests(never: threading.Event) -> Iterator[bytes]:
    """The request iterator of a stalled gRPC upload: the call's headers go out, its message never
    comes (until ``never`` is set, 60 s at most)."""
    never.wait(60)
    yield from ()


@dataclass
class Receivers:
    telemetry: Telemetry
    pipeline: Pipeline
    grpc_endpoint: str
    http_url: str
    incidents: FakeIncidents
    http_receiver: HttpReceiver

    def metric(self, name: str, **labels: str) -> float:
        return self.telemetry.registry.get_sample_value(name, labels) or 0.0


@contextmanager
def running_receivers(detectors: Sequence = (), *, max_pending_spans: int = 100_000,
                      max_message_bytes: int = 4 * 1024 * 1024,
                      http_max_in_flight: int = 64,
                      decoder: SpanDecoder | None = None) -> Iterator[Receivers]:
    telemetry = Telemetry(CollectorRegistry())
    incidents = FakeIncidents()
    pipeline = Pipeline(detectors=list(detectors) or [RecordingDetector()], incidents=incidents,
                        alerts=FakeAlerts(), telemetry=telemetry,
                        max_pending_spans=max_pending_spans)
    handler = ExportHandler(decoder or SpanDecoder(), pipeline, telemetry, max_pending_spans)
    pipeline.start()
    grpc_receiver = GrpcReceiver("127.0.0.1:0", handler, max_message_bytes=max_message_bytes)
    http_receiver = HttpReceiver("127.0.0.1:0", handler, max_message_bytes=max_message_bytes,
                                 max_in_flight=http_max_in_flight)
    try:
        grpc_endpoint = grpc_receiver.start()
        http_endpoint = http_receiver.start()
        yield Receivers(telemetry, pipeline, grpc_endpoint, f"http://{http_endpoint}/v1/traces",
                        incidents, http_receiver)
    finally:
        grpc_receiver.stop(1)
        http_receiver.stop(5)
        pipeline.stop(30)


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """A sample's value in a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class SidecarProcess(testing.SidecarProcess):
    """``python -m sidecar --config FILE`` on free ports; ``receiver`` and ``api`` add settings of
    those sections."""

    def __init__(self, tmp_path: Path, *, receiver: dict | None = None, api: dict | None = None,
                 incidents_path: str = ":memory:") -> None:
        super().__init__({"receiver": dict(receiver or {}), "api": dict(api or {}),
                          "incidents": {"path": incidents_path}}, state_dir=tmp_path)

    @property
    def grpc_port(self) -> int:
        return int(self.grpc_endpoint.rpartition(":")[2])

    @property
    def http_port(self) -> int:
        return int(self.http_endpoint.rpartition(":")[2])

    @property
    def api_port(self) -> int:
        return int(self.api_url.rpartition(":")[2])

    @property
    def http_url(self) -> str:
        return f"http://{self.http_endpoint}/v1/traces"

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, **labels)
