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
connection; a complete head above it is refused too (``_HeadBoundConnection``: h11 checks only an
incomplete one). It costs OTLP/HTTP ~0.1-0.2 ms of CPU a request: 200 exports of 480 spans posted to a
sidecar process took 4-6 % more of its OTLP/HTTP thread's CPU, decoding included (medians 0.69 vs
0.72 s, 0.57 vs 0.60 s in two sessions), their wall time unchanged within the noise.

Connections are bounded in number and in idle time, which uvicorn does not do itself (its
``limit_concurrency`` answers 503 per request, once a head is complete; its keep-alive timeout
starts only after a response): a connection beyond ``max_connections`` open ones is closed as soon
as it is accepted, and one whose request head has not completed ``head_timeout_s`` after it opened,
or after its previous response, is closed (``_GuardedH11Protocol``). Both count in
``pathwatch_http_connections_closed_total{server,reason}``. Without them a slow-loris client (heads
sent a byte at a time, or not at all) held a file descriptor and up to 16 KiB per connection for
ever, as many connections as it liked, until the sidecar ran out of descriptors. The limits are
configuration keys (docs/sidecar.md): for OTLP/HTTP ``receiver.http_max_connections`` (1024) and
``receiver.read_timeout_s`` (30 s), for the API ``api.max_connections`` (256: Prometheus, probes,
the report and a few people's scripts need far fewer) and ``api.head_timeout_s`` (10 s; uvicorn
closes an idle kept-alive connection after 5 s anyway). ``sidecar.app`` raises the process's open
files limit to what the caps need.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidecar.logsetup import uvicorn_log_config
from sidecar.threads import WatchedThread, name_os_thread

#: the most a request line and its headers may take (h11's own default, stated here): a client
#: that sends more gets a 400 and its connection closed (docs/sidecar.md)
MAX_HEAD_BYTES = 16 * 1024


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    head_timeout_s: float
    #: called with "limit" or "head_timeout" for each connection closed for it (on uvicorn's thread)
    on_closed: Callable[[str], None] = lambda reason: None


def head_bytes(request: h11.Request) -> int:
    """The bytes of a request's line and headers as sent in their usual form (``Name: value``
    lines; optional whitespace, which h11 drops, is not counted)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/") + len(request.http_version) + 2
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


class _HeadBoundConnection(h11.Connection):
    """h11's server connection, refusing a request whose head passes ``MAX_HEAD_BYTES`` however it
    arrived: h11 bounds only a head still incomplete in its buffer, so a longer one that came in
    one socket read (up to 64 KiB and more on loopback), or whose last part completed it, was served,
    and whether a 20 KiB URL worked depended on how TCP cut it. Raised as h11 raises its own: uvicorn
    answers a plain-text 400 and closes the connection."""

    def next_event(self):  # type: ignore[override]
        event = super().next_event()
        if isinstance(event, h11.Request) and head_bytes(event) > MAX_HEAD_BYTES:
            raise h11.RemoteProtocolError("request head above MAX_HEAD_BYTES", error_status_hint=431)
        return event


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection beyond ``max_connections`` open ones at once and
    one whose request head has not completed ``head_timeout_s`` after it opened or after its
    previous response (a request answered before its body was read counts as answered: the rest
    of that body must come within the time too). The count is uvicorn's own set of this server's
    open connections."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadBoundConnection(h11.SERVER, MAX_HEAD_BYTES)  # none received on uvicorn's yet
        self._limits = limits
        self._refused = False
        self._head_deadline: asyncio.TimerHandle | None = None  # the timer for the awaited head, while one is awaited

    def connection_made(self, transport) -> None:  # type: ignore[override]
        if len(self.server_state.connections) >= self._limits.max_connections:
            self._refused = True
            transport.close()  # never added to the connections; nothing read, nothing answered
            self._limits.on_closed("limit")
            return
        super().connection_made(transport)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._stop_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        self._stop_head_deadline()  # the next head's time starts now
        super().on_response_complete()
        self._watch_head()

    def _awaiting_request(self) -> bool:
        """Whether the connection waits for the client's next request: h11 awaits (the rest of) a
        head (IDLE), or the request was answered before its body was read (a 415, a GET with a
        body) and only the rest of that unread body is still to come before the next head. Any
        other state: a request is under way, or the connection is done."""
        their = self.conn.their_state
        return their is h11.IDLE or (their is h11.SEND_BODY and self.conn.our_state is h11.DONE)

    def _watch_head(self) -> None:
        if not self._awaiting_request() or self.transport.is_closing():
            self._stop_head_deadline()
        elif self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self._limits.head_timeout_s, self._head_late)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if self._awaiting_request() and not self.transport.is_closing():
            self._limits.on_closed("head_timeout")
            self.transport.close()


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
                 limits: ConnectionLimits = ConnectionLimits(256, 10.0)  # the API's defaults
                 ) -> None:
        self._socket = bind(endpoint, setting)
        host, port = self._socket.getsockname()[:2]
        self.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = port
        # ws="none": an upgraded connection would leave the count (no WebSocket is served anyway)
        # http: uvicorn calls it as it calls a protocol class, with config, server_state, app_state
        protocol = functools.partial(_GuardedH11Protocol, limits=limits)
        config = uvicorn.Config(app, http=protocol,  # type: ignore[arg-type]
                                ws="none", h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, log_config=uvicorn_log_config())
        self._server = uvicorn.Server(config)
        self._thread = WatchedThread(target=self._serve, name=name, daemon=True)
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
    def thread(self) -> WatchedThread:
        """The server's thread: the liveness check watches it."""
        return self._thread

    @property
    def listening(self) -> bool:
        """Started, not asked to stop, and its thread alive: uvicorn's loop ended by an exception
        leaves ``started`` set and ``should_exit`` clear, with the socket still bound (connections
        queue there unanswered)."""
        return self._server.started and not self._server.should_exit and self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.ident is not None:  # started (a failed start is stopped too)
            self._thread.join(timeout_s)
        self._socket.close()

    def _serve(self) -> None:
        name_os_thread()
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start(), and once running by the liveness
            self._error = exc            # check (sidecar/liveness.py): a thread must not die silently
            self._thread.error = type(exc).__name__
