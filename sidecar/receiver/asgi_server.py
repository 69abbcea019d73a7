"""Serve an ASGI app with uvicorn on its own thread (OTLP/HTTP and the HTTP API use it).

The socket is bound here, before uvicorn starts, so a taken port fails at once with a clear error
and port 0 reports the port it got. uvicorn installs no signal handlers off the main thread: the
process's SIGTERM/SIGINT handling stays with ``sidecar.app``.

HTTP is parsed by h11, never httptools: uvicorn's ``http="auto"`` picks httptools when it is
installed (``uvicorn[standard]``; the ``sidecar`` extra does not pull it in), and uvicorn's httptools
protocol buffers a request line or header of any size, copying it again with every read — one
endless ``GET /healthz?x=aaaa…`` grew the process by ~100 MiB and stalled every other client of that
server for seconds, before any token is checked. h11 refuses a request line plus headers above
``MAX_HEAD_BYTES`` (400, connection closed), holding at most that and one socket read (256 KiB) per
connection. It costs OTLP/HTTP ~0.1-0.2 ms of CPU a request: 200 exports of 480 spans posted to a
sidecar process took 4-6 % more of its OTLP/HTTP thread's CPU, decoding included (medians 0.69 vs
0.72 s, 0.57 vs 0.60 s in two sessions), their wall time unchanged within the noise.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from sidecar.threads import name_os_thread

#: the most a request line and its headers may take (h11's own default, stated here): a client
#: that sends more gets a 400 and its connection closed (docs/sidecar.md)
MAX_HEAD_BYTES = 16 * 1024


def bind(endpoint: str, setting: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT``; errors name the config ``setting``."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {endpoint} ({setting}): {exc.strerror or exc}") from None
    return sock


class ThreadedAsgiServer:
    def __init__(self, app, endpoint: str, setting: str, *, name: str,
                 limit_concurrency: int | None = None) -> None:
        self._socket = bind(endpoint, setting)
        host, port = self._socket.getsockname()[:2]
        self.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = port
        config = uvicorn.Config(app, http="h11", h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                                log_level="warning", access_log=False, lifespan="off",
                                limit_concurrency=limit_concurrency, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._error: BaseException | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"HTTP server on {self.endpoint} failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server on {self.endpoint} did not start in {timeout_s}s")
            time.sleep(0.01)  # uvicorn offers no start event; this polls a flag with a deadline

    @property
    def listening(self) -> bool:
        return self._server.started and not self._server.should_exit

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.ident is not None:  # started (a failed start is stopped too)
            self._thread.join(timeout_s)
        self._socket.close()

    def _serve(self) -> None:
        name_os_thread()
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start(); a thread must not die silently
            self._error = exc
