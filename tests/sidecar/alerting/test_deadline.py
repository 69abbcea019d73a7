"""Each alert post ends by its deadline, however slowly a server trickles its answer.

/tmp/s26_inc/probe_trickle.py: httpx's timeout bounds each read, not the post: a webhook trickling
its answer's head a byte every 0.5 s (each read within a 1 s timeout) held one send 52 s, its body
19.5 s — and one that never stops holds the sink's worker, and every page to that sink, for ever.
Real sockets: a trickling asyncio server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from sidecar.alerting import AlertDispatcher
from sidecar.alerting.sinks import AlertmanagerSink, RetryableSinkError
from sidecar.config import AlertingConfig
from sidecar.incidents import IncidentStore
from sidecar.telemetry import Telemetry
from tests.sidecar.incidents.findings import bleed
from tests.support import wait_until

TRICKLE_EVERY_S = 0.05  # far within the client's read timeout (1 s)
DEADLINE_S = 0.5

HEAD = "head"  # the status line and headers trickled, never ending
BODY_200 = "body 200"  # "200 OK" at once, then a body trickled, never ending
BODY_503 = "body 503"
OK = "ok"  # 200 at once
CUT_200 = "cut 200"  # "200 OK" at once, a few bytes of its body, then the connection closed
STALL_200 = "stall 200"  # "200 OK" at once, then nothing of its body until the client hangs up


class TricklingServer:
    """Answers each POST as ``plans`` says, in order (then ``OK``). A trickle goes on until the
    client hangs up: ``hung_up`` counts those."""

    def __init__(self, plans: list[str]) -> None:
        self.plans = list(plans)
        self.posts = 0
        self.hung_up = 0
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._answer, "127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self.url = self.base_url + "/hook"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # each request on the connection (keep-alive)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.posts += 1
                plan = self.plans.pop(0) if self.plans else OK
                if plan == OK:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if plan == CUT_200:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nok")
                    await writer.drain()
                    return  # closed (finally): the body ends 998 bytes short
                if plan == STALL_200:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                    await writer.drain()
                    await reader.read()  # until the client hangs up
                    self.hung_up += 1
                    return
                if plan == HEAD:
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                else:
                    status = b"200 OK" if plan == BODY_200 else b"503 Service Unavailable"
                    writer.write(b"HTTP/1.1 %s\r\nContent-Length: 1000000\r\n\r\n" % status)
                try:
                    while True:
                        writer.write(b"a")
                        await writer.drain()
                        await asyncio.sleep(TRICKLE_EVERY_S)
                except (ConnectionError, OSError):
                    self.hung_up += 1
                    return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return
        finally:
            writer.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _shut(self) -> None:
        self._server.close()
        answers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in answers:
            task.cancel()
        await asyncio.gather(*answers, return_exceptions=True)


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


def outcome(telemetry, name, sink="webhook"):
    return telemetry.registry.get_sample_value(
        "pathwatch_alerts_sent_total", {"sink": sink, "outcome": name}) or 0


def webhook(url: str, telemetry, store, **overrides) -> AlertDispatcher:
    settings = {"webhook_url": url, "retry_backoff_s": 0.05, **overrides}
    return AlertDispatcher(AlertingConfig(**settings), ledger=store, telemetry=telemetry,
                           http_timeout_s=1.0, post_deadline_s=DEADLINE_S)


def test_a_post_whose_answer_trickles_fails_at_its_deadline_and_is_retried(telemetry):
    server = TricklingServer([HEAD, BODY_503])
    try:
        store = IncidentStore(":memory:")
        alerts = webhook(server.url, telemetry, store, retry_attempts=2)
        ((incident, _),) = store.record([bleed("t1")])
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message="the page taken at the third post")
        alerts.close()
        assert (server.posts, outcome(telemetry, "retried"), outcome(telemetry, "sent")) == (3, 2, 1)
        wait_until(lambda: server.hung_up == 2, message="both trickled answers left")
    finally:
        server.close()


def test_a_post_that_never_gets_its_answer_in_time_fails_counted_and_logged(telemetry, caplog):
    server = TricklingServer([HEAD, HEAD])
    try:
        store = IncidentStore(":memory:")
        alerts = webhook(server.url, telemetry, store, retry_attempts=1)
        ((incident, _),) = store.record([bleed("t1")])
        with caplog.at_level(logging.WARNING, logger="sidecar.alerting.dispatcher"):
            alerts.notify([incident])
            wait_until(lambda: outcome(telemetry, "failed") == 1, message="the page failed")
        alerts.close()
        assert outcome(telemetry, "retried") == 1 and not store.is_alerted(incident.id)
        (warning,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
        assert f"not answered within the post's deadline of {DEADLINE_S:g} s" in warning
        assert server.url not in warning  # the URL is logged as scheme://host:port/… only
    finally:
        server.close()


def test_a_2xx_whose_body_trickles_took_the_page_and_is_not_posted_again(telemetry):
    """The status is in before the deadline: the page was delivered, the body is only the excerpt
    (posting it again would page the receiver twice)."""
    server = TricklingServer([BODY_200])
    try:
        store = IncidentStore(":memory:")
        alerts = webhook(server.url, telemetry, store, retry_attempts=2)
        ((incident, _),) = store.record([bleed("t1")])
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message="the page taken")
        wait_until(lambda: server.hung_up == 1, message="the trickled body left")
        alerts.close()
        assert (server.posts, outcome(telemetry, "retried"), outcome(telemetry, "sent")) == (1, 0, 1)
    finally:
        server.close()


@pytest.mark.parametrize("plan", [CUT_200, STALL_200])
def test_a_2xx_whose_body_breaks_off_took_the_page_and_is_not_posted_again(telemetry, plan):
    """/tmp/s33_alertreview: the status came, then its body broke off — the connection closed before
    its Content-Length (RemoteProtocolError), or a read of it timed out before the post's deadline
    (ReadTimeout): the page was posted again, a second page of one incident to the webhook. The
    status decides, as when the deadline cuts the body."""
    server = TricklingServer([plan])
    try:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(AlertingConfig(webhook_url=server.url, retry_backoff_s=0.05,
                                                retry_attempts=2),
                                 ledger=store, telemetry=telemetry, http_timeout_s=0.2,
                                 post_deadline_s=5.0)
        ((incident, _),) = store.record([bleed("t1")])
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id) or outcome(telemetry, "retried") > 0,
                   message="the page taken, or retried")
        alerts.close()
        assert (server.posts, outcome(telemetry, "retried"), outcome(telemetry, "sent")) == (1, 0, 1)
    finally:
        server.close()


def test_each_instance_of_an_alertmanager_cluster_posts_by_the_deadline():
    """A cluster's instances post on threads of their own: each has the deadline too (before, a
    send waited for the cluster up to its backlog and one more post at the client's timeouts)."""
    first, second = TricklingServer([HEAD]), TricklingServer([HEAD])
    client = httpx.Client(timeout=1.0)
    try:
        sink = AlertmanagerSink(first.base_url, client, peers=(second.base_url,),
                                deadline_s=DEADLINE_S)
        store = IncidentStore(":memory:")
        ((incident, _),) = store.record([bleed("t1")])
        started = time.monotonic()
        with pytest.raises(RetryableSinkError, match="not answered within the post's deadline"):
            sink.send(incident)
        assert time.monotonic() - started < 5.0
        sink.send(incident)  # each instance answers the next post at once
        sink.close()
    finally:
        client.close()
        first.close()
        second.close()


def test_a_client_used_outside_a_post_keeps_its_timeouts():
    """The sinks bind the client they are given; anything else using it meanwhile (no post under
    way on its thread) is not cut, however long it takes."""
    server = TricklingServer([BODY_200])
    client = httpx.Client(timeout=1.0)
    try:
        AlertmanagerSink(server.base_url, client, deadline_s=DEADLINE_S)  # binds the client
        with client.stream("POST", server.url, json={}) as response:
            read = 0
            for chunk in response.iter_bytes():
                read += len(chunk)
                if read * TRICKLE_EVERY_S > 2 * DEADLINE_S:  # well past a post's deadline
                    break
        assert response.status_code == 200
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("deadline_s", [0, -1, float("inf"), float("nan")])
def test_the_post_deadline_must_be_a_positive_number_of_seconds(deadline_s):
    with pytest.raises(ValueError, match="post_deadline_s"):
        AlertDispatcher(AlertingConfig(webhook_url="http://127.0.0.1:9/hook"),
                        post_deadline_s=deadline_s)
