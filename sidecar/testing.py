"""Run a real sidecar process for tests, demos and benchmarks.

    with SidecarProcess({"rules": {"run_idle_s": 0.5}}, state_dir=tmp_path) as sidecar:
        exporter = OTLPSpanExporter(endpoint=sidecar.grpc_endpoint, insecure=True)
        httpx.get(f"{sidecar.api_url}/api/v1/incidents")
        assert sidecar.stop() == 0          # SIGTERM: drains every accepted span, then exits 0

The config (a mapping in the shape of ``sidecar.yaml``, or a ``SidecarConfig``) is written once to
``state_dir/<name>.yaml``; the process's output goes to ``state_dir/<name>.log`` (a file, never a
pipe nobody reads), appended across restarts. A server endpoint given as ``127.0.0.1:0`` (or left
out) gets a free loopback port chosen here, so the caller knows it before the process starts; ``""``
keeps a server disabled, and any other endpoint is used as given. ``incidents.path`` left out puts
the store under ``state_dir``.

``module`` runs another module than ``sidecar`` with ``python -m`` (the same arguments): a test's
launcher that injects a fault, then runs the sidecar (``tests/sidecar/faulty_sidecar.py``).

``start()`` only launches; ``wait_ready()`` waits for ``/readyz`` and fails at once, with the log, if
the process exits first; ``start(ready_timeout=...)`` and the context manager do both (and the context
manager stops on exit). ``start()`` again after ``stop()`` restarts on the same ports and the same
incident store. A test of a start *failure* calls ``start()`` and waits on ``process`` itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from sidecar.config import SidecarConfig

__all__ = ["SidecarError", "SidecarProcess", "free_port", "stop_process"]

#: the directory that holds the ``sidecar`` package: ``python -m sidecar`` imports it from there
SOURCE_ROOT = Path(__file__).resolve().parents[1]
ANY_FREE_PORT = "127.0.0.1:0"
_SERVERS = (("receiver", "grpc_endpoint"), ("receiver", "http_endpoint"), ("api", "endpoint"))
_POLL_S = 0.05  # interval of the readiness poll loop (a deadline loop, not synchronization)


class SidecarError(RuntimeError):
    """The sidecar process could not be started, or did not become ready; the message has its log."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def _with_free_ports(config: Mapping[str, Any] | SidecarConfig) -> dict[str, Any]:
    if isinstance(config, SidecarConfig):
        config = config.model_dump(mode="json", exclude_unset=True)
    resolved = {key: dict(value) if isinstance(value, Mapping) else value for key, value in config.items()}
    for section, key in _SERVERS:
        settings = resolved.setdefault(section, {})
        endpoint = settings.get(key, ANY_FREE_PORT)
        host, _, port = endpoint.rpartition(":")
        settings[key] = f"{host}:{free_port()}" if endpoint and port == "0" else endpoint
    return resolved


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
        self.config = _with_free_ports(config or {})
        self.config.setdefault("incidents", {}).setdefault("path", str(self.state_dir / "incidents.sqlite"))
        self.config_path = self.state_dir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = self.state_dir / f"{name}.log"
        self.name = name
        self._env = dict(env or {})
        self._command = self._launcher(python, console_script, module) + ["--config", str(self.config_path)]
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
        return _reachable(endpoint) if endpoint else ""

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self, *, ready_timeout: float | None = None) -> SidecarProcess:
        """Launch the process; with ``ready_timeout``, also ``wait_ready`` (stopping it again when it
        does not get there). Without, it returns at once: a test of a failing start waits on
        ``process`` itself."""
        if self.process is not None and self.process.poll() is None:
            raise SidecarError(f"{self.name} is already running (pid {self.process.pid})")
        source = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": source, **self._env}
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
        raise SidecarError(f"{self.name} not ready at {self.api_url}/readyz after {timeout:g}s "
                           f"({self.log_path}):\n{self.log()}")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False  # not listening yet

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
