"""The real processes of the alert path, each on 127.0.0.1 and free ports, each logging to a file.

    webhook <- Alertmanager <- Prometheus (rules) <- /metrics of the sidecar <- OTLP <- demo backend
                     ^------------------------------- direct push of the sidecar

Everything here starts a process (or a thread) and returns a handle with ``stop()``; the fixtures in
``test_alert_path.py`` own the order and the teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from sidecar.testing import SidecarProcess, stop_process
from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "rules" / "pathwatch-rules.yaml"
PATHMAP = ROOT / "examples" / "agent_backend" / "pathmap.yaml"
BIN = Path(sys.executable).parent
DEBIAN_TOOLS = ("prometheus", "prometheus-alertmanager")
SCRAPE_JOB = "pathwatch-sidecar"  # PathwatchSidecarAbsent needs "pathwatch" in the job name
HMAC_KEY = "integration-test-key-0123456789abcdef"


def ensure_debian_tools() -> None:
    """Install Prometheus and Alertmanager through the setup script when they are missing."""
    if all(shutil.which(tool) for tool in DEBIAN_TOOLS):
        return
    subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "debian"], check=False)
    missing = [tool for tool in DEBIAN_TOOLS if not shutil.which(tool)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not on PATH and `scripts/setup.sh debian` did not "
                           "install them (needs apt-get as root or sudo)")


@dataclass
class Process:
    """A started subprocess and the file its output goes to (never a pipe nobody reads)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        return stop_process(self.process, timeout_s)


def spawn(name: str, command: Sequence[str], work: Path, env: dict[str, str] | None = None) -> Process:
    log = work / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(list(command), cwd=ROOT, env={**os.environ, **(env or {})},
                                   stdout=sink, stderr=subprocess.STDOUT)
    return Process(name, process, log)


def wait_http_ok(process: Process, url: str, timeout_s: float = 30.0) -> None:
    """Until ``url`` answers 200; fail at once, with the process's output, if it exits first."""
    def ok_or_dead() -> bool:
        if not process.alive():
            return True
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False  # not listening yet

    try:
        wait_until(ok_or_dead, timeout=timeout_s, interval=0.05, message=f"{process.name} at {url}")
    except AssertionError:
        process.stop()
        raise AssertionError(f"{process.name} not ready at {url} after {timeout_s}s:\n{process.output()}")
    if not process.alive():
        raise AssertionError(f"{process.name} exited with {process.process.returncode}:\n{process.output()}")


# --- the webhook receiver ------------------------------------------------------------------

@dataclass(frozen=True)
class Notification:
    """One POST from Alertmanager, with when it arrived (monotonic clock of this process)."""

    arrived: float
    body: dict[str, Any]

    def alertnames(self) -> set[str]:
        return {alert["labels"].get("alertname", "") for alert in self.body.get("alerts", [])}


@dataclass
class WebhookReceiver:
    server: ThreadingHTTPServer
    thread: threading.Thread
    notifications: list[Notification] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/alerts"

    def received(self) -> list[Notification]:
        with self.lock:
            return list(self.notifications)

    def first_arrival(self, alertname: str) -> Notification | None:
        return next((n for n in self.received() if alertname in n.alertnames()), None)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_webhook() -> WebhookReceiver:
    receiver: WebhookReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            arrived = time.monotonic()  # before reading the body: the arrival, not the parse
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with receiver.lock:
                receiver.notifications.append(Notification(arrived, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="webhook", daemon=True)
    receiver = WebhookReceiver(server, thread)
    thread.start()
    return receiver


# --- Alertmanager, Prometheus, the sidecar, the backend --------------------------------------

def start_alertmanager(work: Path, webhook_url: str) -> tuple[Process, str]:
    # one group per alertname: the rule's alert and the sidecar's push are notified separately, so
    # their arrival times can be compared; short waits keep the test fast
    config = {
        "route": {"receiver": "webhook", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "webhook",
                       "webhook_configs": [{"url": webhook_url, "send_resolved": False}]}],
    }
    (work / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = spawn("alertmanager", [
        "prometheus-alertmanager", f"--config.file={work / 'alertmanager.yml'}",
        f"--storage.path={work / 'alertmanager-data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address="], work)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(process, f"{url}/-/ready")
    return process, url


def start_prometheus(work: Path, metrics_target: str, alertmanager_url: str) -> tuple[Process, str]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "alerting": {"alertmanagers": [{"static_configs": [
            {"targets": [alertmanager_url.removeprefix("http://")]}]}]},
        "scrape_configs": [{"job_name": SCRAPE_JOB, "static_configs": [{"targets": [metrics_target]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = spawn("prometheus", [
        "prometheus", f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'prometheus-data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--enable-feature=exemplar-storage"], work)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(process, f"{url}/-/ready")
    # ready is not scraping: target discovery hands targets over in batches (up to 5 s); traffic sent
    # before the first scrape would show as one step with rate() 0 in every panel
    try:
        wait_until(lambda: query(url, f'up{{job="{SCRAPE_JOB}"}} == 1'), timeout=30, interval=0.2,
                   message=f"prometheus scraping {metrics_target}")
    except AssertionError:
        process.stop()
        raise AssertionError(f"prometheus never scraped {metrics_target}:\n{process.output()}")
    return process, url


@dataclass(frozen=True)
class SidecarPorts:
    grpc: int
    api: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api}"


def start_sidecar(work: Path, alertmanager_url: str) -> tuple[Process, SidecarPorts]:
    api = f"127.0.0.1:{free_port()}"  # chosen here: the alerts' external_url links to it
    config = {
        "receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""},
        "api": {"endpoint": api},
        "incidents": {"path": str(work / "incidents.sqlite")},
        "alerting": {"alertmanager_url": alertmanager_url, "min_severity": "critical",
                     "external_url": f"http://{api}"},
    }
    sidecar = SidecarProcess(config, state_dir=work, console_script=True).start(ready_timeout=30)
    ports = SidecarPorts(grpc=_port(sidecar.grpc_endpoint), api=_port(sidecar.api_url))
    return Process("sidecar", sidecar.process, sidecar.log_path), ports


def _port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def start_instrumented_backend(work: Path, otlp_grpc_port: int) -> tuple[Process, str]:
    """The demo backend under ``opentelemetry-instrument``: zero code change, spans to the sidecar."""
    port = free_port()
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATHWATCH_PATHMAP": str(PATHMAP),
        "PATHWATCH_HMAC_KEY": HMAC_KEY,
        "PATHWATCH_HEARTBEAT_INTERVAL_S": "1",  # the backend-dropped-spans panel reads the heartbeat
        "OTEL_SERVICE_NAME": "demo-backend",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_grpc_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",  # the SDK default (2048) drops spans in bursts of 20 users
        "DEMO_SCENARIO": "S0",
        "DEMO_S11_RAMP_RUNS": "40",  # fewer than 20 users x 3 runs: S11 reaches the canonical engine
    }
    env.pop("PATHWATCH_ALLOW_RAW_USER_IDS", None)
    process = spawn("backend", [
        str(BIN / "opentelemetry-instrument"), sys.executable, "-m", "uvicorn",
        "examples.agent_backend.app:app", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning"], work, env)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(process, f"{url}/healthz")
    return process, url


# --- Prometheus HTTP API ---------------------------------------------------------------------

def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    if body.get("status") != "success":
        raise AssertionError(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def query_range(prometheus_url: str, expr: str, start: float, end: float,
                step: str = "1s") -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus_url}/api/v1/query_range",
                         params={"query": expr, "start": start, "end": end, "step": step}, timeout=20)
    body = response.json()
    if body.get("status") != "success":
        raise AssertionError(f"range query failed: {expr}: {body}")
    return body["data"]["result"]


def alert_rules(prometheus_url: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prometheus_url}/api/v1/rules", params={"type": "alert"}, timeout=10).json()
    return [rule for group in body["data"]["groups"] for rule in group["rules"]]


def query_exemplars(prometheus_url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus_url}/api/v1/query_exemplars",
                         params={"query": expr, "start": start, "end": end}, timeout=10)
    body = response.json()
    if body.get("status") != "success":
        raise AssertionError(f"exemplar query failed: {expr}: {body}")
    return body["data"]
