"""Receivers for tests: in-process (real gRPC and HTTP servers on free ports, fake detectors) and
a real sidecar process started from a temporary config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.pipeline import Pipeline
from sidecar.receiver import ExportHandler, GrpcReceiver, HttpReceiver, SpanDecoder
from sidecar.telemetry import Telemetry
from tests.sidecar.receiver.fakes import FakeAlerts, FakeIncidents, RecordingDetector
from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[3]
GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@dataclass
class Receivers:
    telemetry: Telemetry
    pipeline: Pipeline
    grpc_endpoint: str
    http_url: str
    incidents: FakeIncidents

    def metric(self, name: str, **labels: str) -> float:
        return self.telemetry.registry.get_sample_value(name, labels) or 0.0


@contextmanager
def running_receivers(detectors: Sequence = (), *, max_pending_spans: int = 100_000,
                      max_message_bytes: int = 4 * 1024 * 1024) -> Iterator[Receivers]:
    telemetry = Telemetry(CollectorRegistry())
    incidents = FakeIncidents()
    pipeline = Pipeline(detectors=list(detectors) or [RecordingDetector()], incidents=incidents,
                        alerts=FakeAlerts(), telemetry=telemetry,
                        max_pending_spans=max_pending_spans)
    handler = ExportHandler(SpanDecoder(), pipeline, telemetry, max_pending_spans)
    pipeline.start()
    grpc_receiver = GrpcReceiver("127.0.0.1:0", handler, max_message_bytes=max_message_bytes)
    http_receiver = HttpReceiver("127.0.0.1:0", handler, max_message_bytes=max_message_bytes)
    try:
        grpc_endpoint = grpc_receiver.start()
        http_endpoint = http_receiver.start()
        yield Receivers(telemetry, pipeline, grpc_endpoint, f"http://{http_endpoint}/v1/traces",
                        incidents)
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


class SidecarProcess:
    """``python -m sidecar --config FILE`` on free ports; stop with SIGTERM."""

    def __init__(self, tmp_path: Path, *, extra_config: str = "",
                 incidents_path: str = ":memory:") -> None:
        self.grpc_port, self.http_port, self.api_port = free_port(), free_port(), free_port()
        self.config_path = tmp_path / "sidecar.yaml"
        self.config_path.write_text(
            f"receiver:\n  grpc_endpoint: 127.0.0.1:{self.grpc_port}\n"
            f"  http_endpoint: 127.0.0.1:{self.http_port}\n{extra_config}"
            f"api:\n  endpoint: 127.0.0.1:{self.api_port}\n"
            f"incidents:\n  path: '{incidents_path}'\n")
        self.log_path = tmp_path / "sidecar.log"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> SidecarProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "--config", str(self.config_path)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, timeout=30, message=f"sidecar ready (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.process.returncode}: {self.log()}")
        return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200

    def metrics(self) -> str:
        return httpx.get(f"{self.api_url}/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics(), name, **labels)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
