"""A backend process killed outright (SIGKILL: an OOM kill, a pod killed past its grace period)
takes with it the spans its exporter still held; the sidecar, which heard it heartbeat and never
got its final heartbeat, records a span loss (``process_vanished``) the verdicts wait out. One
stopped by SIGTERM (uvicorn: the app's lifespan shutdown sends a final heartbeat) is no loss.

Real processes throughout: a sidecar (``SidecarProcess``) and two uvicorn backends under
``opentelemetry-instrument``, exporting through pathwatch's own exporter to the sidecar's OTLP/gRPC
receiver. Found by the s30 consolidation soak (/tmp/s30_cons/soak.py, LOSTCALL=1: a class whose
only call was in the killed backend's last export was ``safe_to_delete`` 28 s after it, with a 40 s
window, no loss recorded).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.testing import SidecarProcess, free_port
from tests.instrumentation.helpers import HMAC_KEY, SAMPLE_PATHMAP
from tests.support import wait_until

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEARTBEAT_S = 0.5
KILLED, STOPPED = "e2e-killed-backend", "e2e-stopped-backend"


def sample(sidecar: SidecarProcess, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(sidecar.metrics()):
        for metric in family.samples:
            if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items()):
                return metric.value
    return None


def vanished(sidecar: SidecarProcess, service: str) -> float | None:
    return sample(sidecar, "pathwatch_backend_processes_vanished_total", service_name=service)


def span_loss(sidecar: SidecarProcess) -> dict | None:
    return httpx.get(f"{sidecar.api_url}/api/v1/consolidation/verdicts", timeout=10).json()[
        "verdicts"]["span_loss"]


@contextmanager
def backend(sidecar: SidecarProcess, service: str, log_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "PATHWATCH_PATHMAP": str(SAMPLE_PATHMAP),
                "PATHWATCH_HMAC_KEY": HMAC_KEY, "PATHWATCH_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
                "PATHWATCH_OTLP_ENDPOINT": sidecar.grpc_endpoint, "OTEL_SERVICE_NAME": service,
                "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
                "OTEL_LOGS_EXPORTER": "none"})
    env.pop("PATHWATCH_ALLOW_RAW_USER_IDS", None)
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(BIN / "opentelemetry-instrument"), sys.executable, "-m", "uvicorn",
             "tests.instrumentation.sample.zero_code_app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and httpx.get(f"{base}/nothing").status_code == 404,
                   timeout=60, message=f"uvicorn {service}")
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        print(log_path.read_text())


def test_a_killed_backend_is_a_span_loss_and_a_stopped_one_is_none(tmp_path):
    with ExitStack() as stack:
        sidecar = stack.enter_context(SidecarProcess({}, state_dir=tmp_path / "sidecar"))
        stopped, stopped_url = stack.enter_context(backend(sidecar, STOPPED, tmp_path / "stopped.log"))
        killed, killed_url = stack.enter_context(backend(sidecar, KILLED, tmp_path / "killed.log"))
        for url in (stopped_url, killed_url):
            assert httpx.post(f"{url}/api/runs/r1", headers={"x-user-id": "alice"}).status_code == 200
        wait_until(lambda: all(sample(sidecar, "pathwatch_backend_last_heartbeat_timestamp_seconds",
                                      service_name=service) for service in (STOPPED, KILLED)),
                   timeout=30, message="both backends' heartbeats at the sidecar")

        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(30) == -signal.SIGTERM  # uvicorn's own end: no exit handler ran
        # then the kill: the killed backend's last heartbeat comes after the stopped one's final
        # heartbeat, so once the sidecar judged it gone, the stopped one's silence was judged too
        killed_at = time.time()
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(10) == -signal.SIGKILL

        loss = wait_until(lambda: span_loss(sidecar), timeout=60, message="a span loss")
        assert loss["reason"] == "process_vanished", loss
        assert loss["from"] <= killed_at - HEARTBEAT_S + 0.5 and loss["to"] > killed_at
        assert vanished(sidecar, KILLED) == 1
        assert vanished(sidecar, STOPPED) == 0  # its final heartbeat came: no loss
        assert "stopped heartbeating without a final heartbeat" in sidecar.log()
        assert sidecar.stop() == 0, sidecar.log()
