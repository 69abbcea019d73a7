"""Run a real sidecar process for tests, demos and benchmarks.

    with SidecarProcess({"rules": {"run_idle_s": 0.5}}, state_dir=tmp_path) as sidecar:
        exporter = OTLPSpanExporter(endpoint=sidecar.grpc_endpoint, insecure=True)
        httpx.get(f"{sidecar.api_url}/api/v1/incidents")
        assert sidecar.stop() == 0          # SIGTERM: drains every accepted span, then exits 0

The config (a mapping in the shape of ``sidecar.yaml``, or a ``SidecarConfig``) is written to
``state_dir/<name>.yaml``; the process's output goes to ``state_dir/<name>.log`` (a file, never a
pipe nobody reads), appended across restarts. A server endpoint given as ``127.0.0.1:0`` (or left
out) is bound by the sidecar itself to a port the kernel picks; the process writes where it listens
to ``state_dir/<name>.endpoints.json`` (``--endpoints-file``), and ``grpc_endpoint``,
``http_endpoint`` and ``api_url`` are known from then on (``wait_ready``; before, they raise
``SidecarError``), the config file rewritten with those ports. ``""`` keeps a server disabled, and
any other endpoint is used as given. ``incidents.path`` left out puts the store under ``state_dir``.

Ports for servers that must be given a number (Prometheus, Alertmanager, a uvicorn subprocess, a
URL nobody may answer) come from ``free_port``: outside the kernel's ephemeral port range, never the
same twice in one process. A port chosen by binding port 0 and closing the socket was in that
range, which the kernel also hands out to every outgoing connection as its source port and to
every other bind to port 0: one of the suite's connections could take it before the server bound it.

``module`` runs another module than ``sidecar`` with ``python -m`` (the same arguments): a test's
launcher that injects a fault, then runs the sidecar (``tests/sidecar/faulty_sidecar.py``).

``start()`` only launches; ``wait_ready()`` waits for ``/readyz`` and fails at once, with the log, if
the process exits first; ``start(ready_timeout=...)`` and the context manager do both (and the context
manager stops on exit). ``start()`` again after ``stop()`` restarts on the same ports (those the
first start got) and the same incident store. A test of a start *failure* calls ``start()`` and
waits on ``process`` itself.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from sidecar.config import SidecarConfig

__all__ = ["SidecarError", "SidecarProcess", "ephemeral_port_range", "free_port", "stop_process"]

#: the directory that holds the ``sidecar`` package: ``python -m sidecar`` imports it from there
SOURCE_ROOT = Path(__file__).resolve().parents[1]
ANY_FREE_PORT = "127.0.0.1:0"
_SERVERS = (("receiver", "grpc_endpoint"), ("receiver", "http_endpoint"), ("api", "endpoint"))
_POLL_S = 0.05  # interval of the readiness poll loop (a deadline loop, not synchronization)

#: Linux's ephemeral port range: bind() to port 0 and the source ports of outgoing connections
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: ``free_port`` hands out ports from here up, outside the ephemeral range: below lie the ports of
#: services a developer may run beside the tests (4317, 5432, 8080, 9090, 9093, 9464 ...)
PORTS_FROM = 20_000
_PICK_TRIES = 200
_handed_out: set[int] = set()  # by free_port, in this process
_picking = threading.Lock()
_random = random.Random()  # its own: a test's random.seed() must not make processes pick alike


class SidecarError(RuntimeError):
    """The sidecar process could not be started, or did not become ready; the message has its log."""


def ephemeral_port_range() -> tuple[int, int]:
    """(first, last) port the kernel picks for a bind to port 0 and for an outgoing connection's
    source port (Linux: ``ip_local_port_range``; elsewhere the IANA range most systems use)."""
    try:
        first, last = (int(n) for n in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return (32768, 60999) if sys.platform.startswith("linux") else (49152, 65535)
    return first, last


def _outside(first: int, last: int) -> list[range]:
    """The ports ``free_port`` picks from: from ``PORTS_FROM`` (from 1024 when the ephemeral range
    leaves less than a thousand above it) up, without the ephemeral range."""
    for floor in (PORTS_FROM, 1024):
        spans = [span for span in (range(floor, min(first, 65536)), range(max(last + 1, floor), 65536))
                 if span]
        if sum(map(len, spans)) >= 1000:
            return spans
    return spans


def _candidate(spans: list[range]) -> int:
    """A port drawn at random from ``spans``, each port as likely."""
    return _random.choice(_random.choices(spans, weights=[len(span) for span in spans])[0])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # no SO_REUSEADDR: stricter
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback TCP port for a server that must be given its number before it starts (Prometheus,
    Alertmanager, a uvicorn subprocess), or for a URL nobody answers: outside the kernel's ephemeral
    range, so that no outgoing connection and no bind to port 0 takes it before the server binds it;
    never one this process was given before; and free (it could be bound) just now. A server we
    start ourselves binds port 0 instead and says which port it got (``SidecarProcess``,
    ``socket.create_server(("127.0.0.1", 0))`` handed to uvicorn)."""
    spans = _outside(*ephemeral_port_range())
    if not spans:
        raise OSError(f"no port outside the ephemeral range {ephemeral_port_range()} to pick from")
    with _picking:
        for _ in range(_PICK_TRIES):
            port = _candidate(spans)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    raise OSError(f"no free loopback port outside the ephemeral range in {_PICK_TRIES} tries")


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit code (of any process, not only a sidecar)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


def _with_defaults(config: Mapping[str, Any] | SidecarConfig) -> dict[str, Any]:
    """The config as a mapping, every server endpoint left out set to ``ANY_FREE_PORT``."""
    if isinstance(config, SidecarConfig):
        config = config.model_dump(mode="json", exclude_unset=True)
    resolved = {key: dict(value) if isinstance(value, Mapping) else value for key, value in config.items()}
    for section, key in _SERVERS:
        resolved.setdefault(section, {}).setdefault(key, ANY_FREE_PORT)
    return resolved


def _port_zero(endpoint: str) -> bool:
    return bool(endpoint) and endpoint.rpartition(":")[2] == "0"


def _reachable(endpoint: str) -> str:
    """host:port to connect to a server bound to ``endpoint`` (a wildcard address means loopback)."""
    host, _, port = endpoint.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    return f"{host}:{port}"


class SidecarProcess:
    """``python -m sidecar --config FILE`` (or the ``pathwatch sidecar`` console script) on free ports."""

    def __init__(self, config: Mapping[str, Any] | SidecarConfig | None = None, *, state_dir: Path,
                 env: Mapping[str, str] | None = None, python: str = sys.executable,
                 console_script: bool = False, name: str = "sidecar", module: str = "sidecar") -> None:
        # absolute: the process runs in state_dir, and reads the config path (and incidents.path)
        # given here relative to its own directory
        self.state_dir = Path(state_dir).absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = _with_defaults(config or {})
        self.config.setdefault("incidents", {}).setdefault("path", str(self.state_dir / "incidents.sqlite"))
        self.config_path = self.state_dir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        #: where the process writes the endpoints it listens on (``--endpoints-file``), each start
        self.endpoints_path = self.state_dir / f"{name}.endpoints.json"
        self.log_path = self.state_dir / f"{name}.log"
        self.name = name
        self._env = dict(env or {})
        self._command = self._launcher(python, console_script, module) + [
            "--config", str(self.config_path), "--endpoints-file", str(self.endpoints_path)]
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _launcher(python: str, console_script: bool, module: str) -> list[str]:
        if not console_script:
            return [python, "-m", module]
        beside = Path(python).parent / "pathwatch"
        found = str(beside) if beside.exists() else shutil.which("pathwatch")
        if not found:
            raise SidecarError(f"the 'pathwatch' console script is neither next to {python} nor on PATH")
        return [found, "sidecar"]

    # --- where it listens ------------------------------------------------------------------------
    @property
    def grpc_endpoint(self) -> str:
        """OTLP/gRPC host:port to export to ("" when disabled)."""
        return self._endpoint("receiver", "grpc_endpoint")

    @property
    def http_endpoint(self) -> str:
        """OTLP/HTTP host:port ("" when disabled); spans go to ``http://<it>/v1/traces``."""
        return self._endpoint("receiver", "http_endpoint")

    @property
    def api_url(self) -> str:
        """Base URL of the HTTP API: /healthz, /readyz, /metrics, /api/v1/..."""
        return f"http://{self._endpoint('api', 'endpoint')}"

    def _endpoint(self, section: str, key: str) -> str:
        endpoint = self.config[section][key]
        if _port_zero(endpoint):
            endpoint = self._bound().get(f"{section}.{key}", endpoint)
        if _port_zero(endpoint):
            raise SidecarError(f"{self.name}'s {section}.{key} is {endpoint}: its port is known once "
                               f"the process listens (start, then wait_ready)")
        return _reachable(endpoint) if endpoint else ""

    def _bound(self) -> dict[str, str]:
        """Where this start's process listens, from its ``--endpoints-file`` (empty until it is
        written). The ports port 0 got are kept in the config, and its file: a restart binds them
        again, so that what was given the endpoints (an exporter, a URL) reaches the new process."""
        if self.process is None:
            return {}
        try:
            bound = json.loads(self.endpoints_path.read_text())
        except FileNotFoundError:
            return {}
        resolved = [(section, key) for section, key in _SERVERS
                    if _port_zero(self.config[section][key]) and bound.get(f"{section}.{key}")]
        for section, key in resolved:
            self.config[section][key] = bound[f"{section}.{key}"]
        if resolved:
            self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return bound

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, *, ready_timeout: float | None = None) -> SidecarProcess:
        """Launch the process; with ``ready_timeout``, also ``wait_ready`` (stopping it again when it
        does not get there). Without, it returns at once: a test of a failing start waits on
        ``process`` itself."""
        if self.process is not None and self.process.poll() is None:
            raise SidecarError(f"{self.name} is already running (pid {self.process.pid})")
        source = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": source, **self._env}
        self.endpoints_path.unlink(missing_ok=True)  # the last start's: this one writes its own
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self._command, cwd=self.state_dir, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        if ready_timeout is not None:
            try:
                self.wait_ready(ready_timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> SidecarProcess:
        """Until ``/readyz`` answers 200; raises ``SidecarError`` with the log if the process exits
        first or the deadline passes."""
        if self.process is None:
            raise SidecarError(f"{self.name} was never started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready():
                return self
            if self.process.poll() is not None:
                raise SidecarError(f"{self.name} exited with {self.process.returncode} before it was "
                                   f"ready ({self.log_path}):\n{self.log()}")
            time.sleep(_POLL_S)
        try:
            where = f"{self.api_url}/readyz"
        except SidecarError:
            where = "its /readyz (it never wrote where it listens)"
        raise SidecarError(f"{self.name} not ready at {where} after {timeout:g}s "
                           f"({self.log_path}):\n{self.log()}")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
        except (httpx.HTTPError, SidecarError):
            return False  # not listening yet (its API's port 0 not resolved yet)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the sidecar drains every accepted span, then exits 0), wait, kill after ``timeout``;
        the exit code (None if never started). Stopping a stopped process just returns its code."""
        return None if self.process is None else stop_process(self.process, timeout)

    def __enter__(self) -> SidecarProcess:
        return self.start(ready_timeout=30.0)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what it says ----------------------------------------------------------------------------
    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far (every start)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> str:
        """The Prometheus text exposition at ``/metrics``."""
        return httpx.get(f"{self.api_url}/metrics", timeout=30).text
