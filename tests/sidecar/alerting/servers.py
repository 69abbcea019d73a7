"""Real processes and servers for the alerting tests: a JSON collector and Alertmanager."""

from __future__ import annotations

import email.utils
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, wait_until


class Collector:
    """An HTTP server that records every JSON POST; answers with ``statuses`` in order, then 200.
    With ``hold``, each answer waits until that event is set (a slow instance: the POST is recorded
    at once, its client waits). With ``forward`` (a base URL), a proxy: each POST, once let go, is
    posted there (same path and body) and answered with its status. ``headers`` are sent with every
    answer (e.g. ``Retry-After``). ``clock_offset_s`` moves its ``Date`` header (a server whose clock
    is ahead, or behind when negative)."""

    def __init__(self, statuses: list[int] | None = None, hold: threading.Event | None = None,
                 forward: str | None = None, headers: dict[str, str] | None = None,
                 clock_offset_s: float = 0.0) -> None:
        self.bodies: list[object] = []
        self.paths: list[str] = []
        self.authorizations: list[str | None] = []  # each POST's Authorization header
        self.statuses = list(statuses or [])
        self.hold = hold
        self.forward = forward
        self.headers = dict(headers or {})
        self.posted = threading.Event()  # set at the first POST, once recorded
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                body = json.loads(raw or b"null")
                with collector._lock:
                    status = collector.statuses.pop(0) if collector.statuses else 200
                    collector.paths.append(self.path)
                    collector.authorizations.append(self.headers.get("Authorization"))
                    collector.bodies.append(body)
                collector.posted.set()
                if collector.hold is not None:
                    collector.hold.wait()
                if collector.forward is not None:
                    status = httpx.post(collector.forward + self.path, content=raw, timeout=30,
                                        headers={"Content-Type": "application/json"}).status_code
                self.send_response(status)
                for name, value in collector.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

            def date_time_string(self, timestamp: float | None = None) -> str:
                moment = time.time() if timestamp is None else timestamp
                return email.utils.formatdate(moment + clock_offset_s, usegmt=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self) -> list[object]:
        with self._lock:
            return list(self.bodies)


class BlackHole:
    """A TCP port that accepts connections, reads what is sent and never answers (a peer behind a
    firewall that drops packets, or hung): ``requested`` is set once a whole request head came in.
    Its connections are closed at exit."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> BlackHole:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()
        self._thread.join(10)
        for connection in self._connections:
            connection.close()

    def _serve(self) -> None:
        try:
            connection, _ = self._listener.accept()
        except OSError:
            return  # closed before a connection came
        self._connections.append(connection)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = connection.recv(65536)
            if not chunk:
                return
            head += chunk
        self.requested.set()


def alertmanager_binary() -> str:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.fail("prometheus-alertmanager is not installed: run scripts/setup.sh debian")
    return binary


def write_alertmanager_config(path: Path, webhook_url: str) -> Path:
    # group by incident so every alert is its own notification; short waits keep the test quick
    path.write_text(f"""
route:
  receiver: hook
  group_by: [incident_id]
  group_wait: 100ms
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {webhook_url}
        send_resolved: false
""")
    return path


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash, as Alertmanager's web config wants, from the C library's crypt(3) (libxcrypt
    has bcrypt), called through ctypes: the ``crypt`` module, deprecated in 3.11, is gone from
    3.13. The salt as ``crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4)`` made it."""
    import ctypes
    import ctypes.util
    import secrets
    library = ctypes.util.find_library("crypt")
    if library is None:
        pytest.fail("no C library with crypt(3) (libcrypt) found")
    crypt = ctypes.CDLL(library).crypt
    crypt.argtypes, crypt.restype = [ctypes.c_char_p, ctypes.c_char_p], ctypes.c_char_p
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    salt = "$2b$04$" + "".join(secrets.choice(alphabet) for _ in range(22))
    hashed = (crypt(password.encode(), salt.encode()) or b"").decode()
    if not hashed or not hashed.startswith("$2"):
        pytest.fail("this C library's crypt(3) makes no bcrypt hash")
    return hashed


@contextmanager
def alertmanager(workdir: Path, webhook_url: str, port: int | None = None,
                 basic_auth_users: dict[str, str] | None = None) -> Iterator[str]:
    """Run a real Alertmanager on 127.0.0.1; yields its base URL once it is ready. With
    ``basic_auth_users`` (username -> password), its web config requires basic auth on every
    endpoint (``--web.config.file``)."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_alertmanager_config(workdir / "alertmanager.yml", webhook_url)
    log_path = workdir / "alertmanager.log"
    arguments = [alertmanager_binary(), f"--config.file={config}", f"--storage.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]
    auth = None
    if basic_auth_users:
        web_config = workdir / "web.yml"
        web_config.write_text("basic_auth_users:\n" + "".join(
            f"  {user}: '{bcrypt_hash(password)}'\n" for user, password in basic_auth_users.items()))
        arguments.append(f"--web.config.file={web_config}")
        auth = httpx.BasicAuth(*next(iter(basic_auth_users.items())))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None
                   and httpx.get(f"{url}/-/ready", auth=auth).status_code == 200,
                   timeout=20, message=f"alertmanager ready (log: {log_path})")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
