"""Zero-code: ``opentelemetry-instrument uvicorn ...`` loads pathwatch through its entry point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


def backend_env(collector: Collector, **overrides: str | None) -> dict[str, str]:
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
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def start_backend(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as log:
        return subprocess.Popen(
            [str(BIN / "opentelemetry-instrument"), sys.executable, "-m", "uvicorn",
             "tests.instrumentation.sample.zero_code_app:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@contextmanager
def running_backend(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path / "server.log"
    process = start_backend(env, port, log_path)
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
        print(log_path.read_text())


@pytest.fixture
def server(collector, tmp_path):
    with running_backend(backend_env(collector), tmp_path) as base:
        yield base


def test_spans_appear_with_no_code_change(server, collector):
    response = httpx.post(f"http://{server}/api/runs/r1", headers={"x-user-id": "alice"})
    assert response.json() == {"result": "done:r1"}
    with connect(f"ws://{server}/ws?user_id=bob") as ws:
        ws.send('{"type": "run", "run_id": "r2"}')
        for _ in range(3):
            ws.recv(timeout=10)

    wanted = ("request", "execute", "emit", "dispatch", "deliver", "heartbeat")
    # the socket's request span ends when it closes and may leave in a later batch than the others;
    # the readiness probe's GET /nothing is a request span too, so wait for the routes themselves
    routes = lambda: {s["attributes"].get("http.route") for s in collector.of_kind("request")}  # noqa: E731
    wait_until(lambda: all(collector.of_kind(kind) for kind in wanted)
               and {"/api/runs/{run_id}", "/ws"} <= routes(),
               timeout=20, message=f"spans of kinds {wanted} and both routes' request spans at the collector")
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


@pytest.mark.parametrize("exporter", ["pathwatch's", "the SDK's"])
def test_a_server_stopped_by_sigterm_sends_what_pathwatch_still_holds(collector, tmp_path, exporter):
    """uvicorn ends its process by the SIGTERM it stopped on (re-raised once it shut down): no atexit
    handler runs, so the SDK provider never shuts its span processors down. What pathwatch's processor
    held, or the SDK's own (``OTEL_TRACES_EXPORTER=otlp``: everything was lost there), here all (a
    schedule far beyond the test), left at the app's ASGI lifespan shutdown, with a heartbeat."""
    own = {"OTEL_TRACES_EXPORTER": "none", "PATHWATCH_OTLP_ENDPOINT": collector.endpoint}
    env = backend_env(collector, **(own if exporter == "pathwatch's" else {}),
                      OTEL_BSP_SCHEDULE_DELAY="600000", PATHWATCH_HEARTBEAT_INTERVAL_S="0")
    port = free_port()
    process = start_backend(env, port, tmp_path / "server.log")
    try:
        wait_until(lambda: process.poll() is None
                   and httpx.get(f"http://127.0.0.1:{port}/nothing").status_code == 404,
                   timeout=30, message="uvicorn under opentelemetry-instrument")
        assert httpx.post(f"http://127.0.0.1:{port}/api/runs/r1",
                          headers={"x-user-id": "alice"}).status_code == 200
        assert collector.of_kind("execute") == []  # nothing exported before the stop
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM  # ended by the signal: no atexit
    finally:
        if process.poll() is None:
            process.kill()
        print((tmp_path / "server.log").read_text())
    assert [s["attributes"]["pathwatch.run.id"] for s in collector.of_kind("execute")] == ["r1"]
    assert collector.of_kind("heartbeat")


def test_a_pathwatch_configuration_error_leaves_the_app_and_the_other_instrumentations_running(
        collector, tmp_path):
    """No HMAC key: one clear error, no pathwatch spans, and the FastAPI instrumentation (loaded
    after pathwatch by the launcher) still traces requests."""
    with running_backend(backend_env(collector, PATHWATCH_HMAC_KEY=None), tmp_path) as base:
        assert httpx.post(f"http://{base}/api/runs/r1", headers={"x-user-id": "alice"}).status_code == 200
        wait_until(lambda: "POST /api/runs/{run_id}" in collector.names(), timeout=20,
                   message="the FastAPI instrumentation's server span")
    log = (tmp_path / "server.log").read_text()
    assert "pathwatch is NOT instrumenting this process" in log and "PATHWATCH_HMAC_KEY" in log
    assert "Instrumenting of pathwatch failed" not in log and "Traceback" not in log
    assert collector.of_kind("execute") == [] and collector.of_kind("request") == []
    assert "alice" not in repr(collector.spans)


def test_with_check_imports_a_configuration_error_stops_the_process_before_the_app_starts(
        collector, tmp_path):
    env = backend_env(collector, PATHWATCH_HMAC_KEY=None, PATHWATCH_CHECK_IMPORTS="1")
    process = start_backend(env, free_port(), tmp_path / "server.log")
    assert process.wait(timeout=60) == 2
    log = (tmp_path / "server.log").read_text()
    assert "PATHWATCH_HMAC_KEY" in log and "exiting with code 2" in log
    assert "Uvicorn running" not in log and "Fatal Python error" not in log


# opentelemetry-instrument in a backend image with only the pathwatch package: no distro, no
# configurator (the test venv has opentelemetry-distro; these make the launcher skip it)
WITHOUT_DISTRO = {"OTEL_PYTHON_DISTRO": "none", "OTEL_PYTHON_CONFIGURATOR": "none"}


def run_under_the_launcher(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PATHWATCH_"))}
    base.update({"PYTHONPATH": str(ROOT), "PATHWATCH_PATHMAP": str(SAMPLE_PATHMAP),
                 "PATHWATCH_HMAC_KEY": HMAC_KEY, "PATHWATCH_HEARTBEAT_INTERVAL_S": "0", **WITHOUT_DISTRO, **env})
    return subprocess.run([str(BIN / "opentelemetry-instrument"), sys.executable, "-c", "pass"], cwd=ROOT,
                          env=base, capture_output=True, text=True, timeout=60)


def test_without_the_distro_the_sdks_otlp_env_exports_nothing_and_pathwatch_says_so():
    """The Helm chart's former backend env: 0 spans at the sidecar and, before, not a word."""
    done = run_under_the_launcher({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                   "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("no span exporter is configured") == 1, done.stderr
    assert "PATHWATCH_OTLP_ENDPOINT=127.0.0.1:4317" in done.stderr and "OTEL_TRACES_EXPORTER=none" in done.stderr


def test_without_the_distro_pathwatchs_own_exporter_sends_the_spans(collector):
    """README step 2 and the chart's backend env: PATHWATCH_OTLP_ENDPOINT, OTEL_TRACES_EXPORTER=none."""
    done = run_under_the_launcher({"PATHWATCH_OTLP_ENDPOINT": collector.endpoint, "OTEL_TRACES_EXPORTER": "none"})
    assert done.returncode == 0, done.stderr
    assert "no span exporter" not in done.stderr, done.stderr
    wait_until(lambda: collector.of_kind("heartbeat"), timeout=10, message="the final heartbeat at the collector")


@pytest.mark.parametrize("strict", [False, True])
def test_an_internal_error_at_start_is_logged_and_stops_the_process_only_when_strict(
        monkeypatch, caplog, strict):
    from instrumentation import instrumentor

    def broken(self, **kwargs):
        raise RuntimeError("a bug of ours")

    exits: list[int] = []
    monkeypatch.setattr(instrumentor.PathwatchInstrumentor, "instrument", broken)
    monkeypatch.setattr(instrumentor, "_exit_at_start", exits.append)
    monkeypatch.setenv("PATHWATCH_CHECK_IMPORTS", "1" if strict else "0")
    instrumentor.ZeroCodeStart().instrument()  # never raises into the launcher
    assert "pathwatch is NOT instrumenting this process: an internal error" in caplog.text
    assert exits == ([2] if strict else [])
