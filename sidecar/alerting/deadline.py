"""An overall deadline for one alert post: its connect, its request and the whole answer.

httpx bounds each step of a post (the connect, each write, each read: the client's timeout) but not
the post: a server that trickles its answer — a byte every few seconds, each read within the read
timeout — held the sink's worker (or an Alertmanager instance's thread) for as long as it went on,
and no page went to that sink meanwhile. ``post`` marks the post under way on this thread with its
deadline; ``bound`` gives a client's connection pools (its proxies' too) a network backend whose
connects, reads and writes wait no longer than what is left of it, and past it raise httpcore's
timeout, which httpx raises as an ``httpx.TimeoutException`` — the post fails as a timeout does
(retried), ``passed`` telling the caller that it was the deadline. A thread with no post under way
(any other use of the client) keeps the client's timeouts as they are.

httpx offers no way to give its own transports a network backend: ``bound`` sets the one of each
``httpx.HTTPTransport``'s httpcore pool (``_pool._network_backend``, the same since httpcore 0.13),
and warns once if a version keeps it elsewhere (the posts are then bounded by the client's timeouts
alone); tests/sidecar/alerting/test_deadline.py trickles real answers through it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

log = logging.getLogger(__name__)

# .at: the monotonic deadline of the post under way on this thread; .cut: its last network call was
# given what was left of it (less than the client's timeout), so a timeout there is the deadline's
_local = threading.local()
_warned = False


@contextmanager
def post(seconds: float | None) -> Iterator[None]:
    """The post made inside the block ends by ``seconds`` from now (None: the client's timeouts
    alone)."""
    outer = getattr(_local, "at", None), getattr(_local, "cut", False)
    _local.at = None if seconds is None else time.monotonic() + seconds
    _local.cut = False
    try:
        yield
    finally:
        _local.at, _local.cut = outer


def passed() -> bool:
    """The deadline of this thread's post has passed (or its last network call, which timed out,
    waited until then)."""
    at = getattr(_local, "at", None)
    return at is not None and (_local.cut or time.monotonic() >= at)


def bound(client: httpx.Client) -> None:
    """Cut the connects, reads and writes of ``client``'s posts at their deadline (idempotent)."""
    global _warned
    transports: Iterable[object] = (client._transport, *client._mounts.values())
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            if isinstance(transport, httpx.HTTPTransport) and not _warned:
                _warned = True
                log.warning("this httpx/httpcore version keeps its connections' network backend "
                            "elsewhere: an alert post is bounded by the client's timeout per read "
                            "only, not by its overall deadline (a server trickling its answer holds "
                            "the sink)")
            continue  # no network of its own (a test's MockTransport; a mount that is None)
        if not isinstance(backend, _Backend):
            pool._network_backend = _Backend(backend)


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout``, or what is left of this thread's deadline if that is less; ``expired`` past it."""
    at = getattr(_local, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        _local.cut = True
        raise expired("the post's deadline passed")
    _local.cut = timeout is None or left < timeout
    return left if _local.cut else timeout


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname,
                                             _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None
                    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                               local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(
            path, _left(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)
