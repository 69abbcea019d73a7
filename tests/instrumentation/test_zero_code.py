"""Zero-code: ``opentelemetry-instrument uvicorn ...`` loads pathwatch through its entry point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.instrumentation.collector import Collector
from tests.instrumentation.helpers import HMAC_KEY, SAMPLE_PATHMAP, pseudonym
from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def collector():
    server = Collector().start()
    yield server
    server.stop()


@pytest.fixture
def server(collector, tmp_path):
    port = free_port()
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(ROOT),
        "PATHWATCH_PATHMAP": str(SAMPLE_PATHMAP),
        "PATHWATCH_HMAC_KEY": HMAC_KEY,
        "PATHWATCH_HEARTBEAT_INTERVAL_S": "0.2",
        "OTEL_SERVICE_NAME": "zero-code-backend",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.endpoint}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    env.pop("PATHWATCH_ALLOW_RAW_USER_IDS", None)
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "opentelemetry-instrument"), sys.executable, "-m", "uvicorn",
         "tests.instrumentation.sample.zero_code_app:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and httpx.get(f"http://{base}/nothing").status_code == 404,
                   timeout=30, message="uvicorn under opentelemetry-instrument")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        print((tmp_path / "server.log").read_text())


def test_spans_appear_with_no_code_change(server, collector):
    response = httpx.post(f"http://{server}/api/runs/r1", headers={"x-user-id": "alice"})
    assert response.json() == {"result": "done:r1"}
    with connect(f"ws://{server}/ws?user_id=bob") as ws:
        ws.send('{"type": "run", "run_id": "r2"}')
        for _ in range(3):
            ws.recv(timeout=10)

    wanted = ("request", "execute", "emit", "dispatch", "deliver", "heartbeat")
    wait_until(lambda: all(collector.of_kind(kind) for kind in wanted) and len(collector.of_kind("request")) >= 2,
               timeout=20, message=f"spans of kinds {wanted} at the collector")
    requests = {s["name"]: s["attributes"] for s in collector.of_kind("request")}
    http = requests["POST /api/runs/{run_id}"]
    assert http["enduser.pseudo.id"] == pseudonym("alice")
    assert http["pathwatch.entry_point"] == http["http.route"] == "/api/runs/{run_id}"
    socket = next(a for name, a in requests.items() if a.get("http.route") == "/ws")
    assert socket["enduser.pseudo.id"] == pseudonym("bob") and socket["pathwatch.connection.id"]
    executes = collector.of_kind("execute")
    assert {s["attributes"]["enduser.pseudo.id"] for s in executes} == {pseudonym("alice"), pseudonym("bob")}
    assert collector.of_kind("deliver")[0]["resource"]["service.name"] == "zero-code-backend"
    assert not [n for n in collector.names() if n.endswith(" send") or n.endswith(" receive")]
