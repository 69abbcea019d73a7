"""Start the demo backend in a subprocess (for the demo runner and the tests).

    with start_backend(env={"DEMO_SCENARIO": "S1"}) as backend:
        print(backend.url)          # http://127.0.0.1:PORT

The command is ``[*launcher, python, -m, uvicorn, examples.agent_backend.app:app, --fd N, ...]``;
pass e.g. ``launcher=["opentelemetry-instrument"]`` or any wrapper that instruments the process (and
keeps its file descriptors, as exec does). The listening socket is bound here (port 0 by default:
the kernel picks a free one) and handed to uvicorn as file descriptor N, so its port is known and
held before uvicorn starts: a port chosen by binding port 0, closing the socket and passing
``--port`` was free again until uvicorn bound it, and any outgoing connection could take it as its
source port meanwhile (docs/sidecar.md, "Running a real sidecar from code").
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


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (0: a port the kernel picks), for uvicorn's ``--fd``;
    TCP_NODELAY set here, as uvicorn sets it on the sockets it binds itself (accepted connections
    inherit it: uvicorn takes a ``--fd`` socket for a Unix one and leaves it alone)."""
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise BackendError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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
    """``start_backend`` without the wait: the process is launched (on its socket, bound here), not
    yet answering."""
    listener = listening_socket(host, port or 0)
    try:
        return _launch(listener, host, env, launcher, log_path)
    finally:
        listener.close()  # the process has its own copy: the port lives and dies with it


def _launch(listener: socket.socket, host: str, env: Mapping[str, str] | None, launcher: Sequence[str],
             log_path: Path | None) -> BackendProcess:
    port, fd = listener.getsockname()[1], listener.fileno()
    command = [*launcher, sys.executable, "-m", "uvicorn", APP, "--fd", str(fd),
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
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                       pass_fds=(fd,))
    except BaseException:
        if own_log:
            log_path.unlink(missing_ok=True)
        raise
    return BackendProcess(process, host, port, log_path, own_log=own_log)
