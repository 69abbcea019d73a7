"""Start the demo backend in a subprocess (for the demo runner and the tests).

    with start_backend(env={"DEMO_SCENARIO": "S1"}) as backend:
        print(backend.url)          # http://127.0.0.1:PORT

The command is ``[*launcher, python, -m, uvicorn, examples.agent_backend.app:app, ...]``; pass e.g.
``launcher=["opentelemetry-instrument"]`` or any wrapper that instruments the process.
Equivalent by hand: ``uvicorn examples.agent_backend.app:app --port 8000`` from the repository root.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
APP = "examples.agent_backend.app:app"


class BackendError(RuntimeError):
    """The backend process did not start or exited early; the message carries its output."""


class BackendProcess:
    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int, log_path: Path, *,
                 own_log: bool = False) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path
        self._own_log = own_log  # a temporary log made for it: removed when it stops

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Poll ``/healthz`` until it answers; raise ``BackendError`` if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"backend exited with code {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)  # poll interval of a deadline loop, not synchronization
        raise BackendError(f"backend not ready after {timeout_s}s:\n{self.output()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self._own_log and self.process.poll() is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> BackendProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_backend(env: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                  launcher: Sequence[str] = (), log_path: Path | None = None,
                  ready_timeout_s: float = 20.0) -> BackendProcess:
    """Start uvicorn with the demo app in a subprocess, wait until it answers, and return it.

    ``env`` is added to this process's environment (``DEMO_SCENARIO``, ``DEMO_STEP_DELAY_S``,
    ``DEMO_S11_RAMP_RUNS``, ``PATHWATCH_*`` ...). Output goes to ``log_path``; by default to a temporary
    file, removed when the backend stops (a ``BackendError`` carries the output).
    """
    backend = launch_backend(env, host=host, port=port, launcher=launcher, log_path=log_path)
    try:
        backend.wait_ready(ready_timeout_s)
    except BaseException:
        backend.stop()
        raise
    return backend


def launch_backend(env: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                   launcher: Sequence[str] = (), log_path: Path | None = None) -> BackendProcess:
    """``start_backend`` without the wait: the process is launched, not yet answering."""
    port = port or free_port(host)
    command = [*launcher, sys.executable, "-m", "uvicorn", APP, "--host", host, "--port", str(port),
               "--no-access-log", "--log-level", "warning"]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    own_log = log_path is None
    if log_path is None:
        import tempfile
        descriptor, name = tempfile.mkstemp(prefix="demo-backend-", suffix=".log")
        os.close(descriptor)
        log_path = Path(name)
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    except BaseException:
        if own_log:
            log_path.unlink(missing_ok=True)
        raise
    return BackendProcess(process, host, port, log_path, own_log=own_log)
