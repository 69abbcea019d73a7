import dataclasses
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry

from sidecar.alerting import AlertDispatcher
from sidecar.alerting.dispatcher import REFRESH_EVERY_S
from sidecar.config import AlertingConfig
from sidecar.incidents import IncidentStore
from sidecar.model import Incident
from sidecar.telemetry import Telemetry
from tests.sidecar.alerting.servers import Collector
from tests.sidecar.incidents.findings import bleed, duplicate
from tests.support import wait_until


class FakeClock:
    """The dispatcher's clock, advanced by the test: its delays (re-paging, rate limits) are minutes
    the test would otherwise wait for real."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


@pytest.fixture
def collector():
    with Collector() as server:
        yield server


def outcome(telemetry, outcome, sink="webhook"):
    return telemetry.registry.get_sample_value(
        "pathwatch_alerts_sent_total", {"sink": sink, "outcome": outcome}) or 0


def incidents(store: IncidentStore, *findings) -> list[Incident]:
    return [incident for incident, _ in store.record(list(findings))]


def dispatcher(url: str, telemetry, store=None, clock=time.monotonic, **overrides) -> AlertDispatcher:
    settings = {"webhook_url": url, "retry_backoff_s": 0.05, **overrides}
    return AlertDispatcher(AlertingConfig(**settings), ledger=store, telemetry=telemetry, clock=clock)


def test_webhook_receives_the_incident(collector, telemetry):
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store)
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    (body,) = wait_until(collector.received, message="webhook POST")
    assert body["source"] == "pathwatch"
    assert body["incident"]["id"] == incident.id
    assert body["alert"]["labels"]["alertname"] == "PathwatchBleed"
    wait_until(lambda: store.is_alerted(incident.id), message="incident marked alerted")
    assert outcome(telemetry, "sent") == 1
    alerts.close()


def test_an_incident_is_pushed_once(collector, telemetry):
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store)
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident, incident])  # the second is queued already
    wait_until(lambda: store.is_alerted(incident.id), message="alerted")
    alerts.notify([incident])  # stale copy (alerted=False), but the ledger knows
    # the store's copy now says alerted: a new finding of a paged incident, not a page attempt
    # (a webhook is never refreshed; Alertmanager is, see test_alertmanager.py)
    alerts.notify(incidents(store, bleed("t2")))
    alerts.close()
    assert len(collector.received()) == 1
    assert outcome(telemetry, "deduplicated") == 2


def test_a_restart_does_not_re_alert(collector, telemetry, tmp_path):
    path = str(tmp_path / "incidents.sqlite")
    store = IncidentStore(path)
    alerts = dispatcher(collector.url, telemetry, store)
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: store.is_alerted(incident.id), message="alerted")
    alerts.close()
    store.close()

    store = IncidentStore(path)
    alerts = dispatcher(collector.url, telemetry, store)
    (again,) = incidents(store, bleed("t2"))
    alerts.notify([again])
    alerts.notify(incidents(store, duplicate("d1")))  # warning: below min severity, ignored
    alerts.notify(incidents(store, bleed("t3", entry_point="/other")))  # a new critical one
    wait_until(lambda: len(collector.received()) == 2, message="second alert")
    alerts.close()
    assert [b["incident"]["entry_point"] for b in collector.received()] == ["/ws", "/other"]
    store.close()


def test_min_severity_lets_warnings_through_when_asked(collector, telemetry):
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store, min_severity="warning")
    alerts.notify(incidents(store, duplicate("d1")))
    wait_until(collector.received, message="warning alert")
    alerts.close()
    assert collector.received()[0]["alert"]["labels"]["alertname"] == "PathwatchDuplicate"


def test_rate_limited_alerts_wait_for_a_token(collector, telemetry):
    clock = FakeClock()
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store, max_per_minute=2, clock=clock)
    alerts.notify(incidents(store, *(bleed(f"t{n}", entry_point=f"/e{n}") for n in range(4))))
    wait_until(lambda: len(collector.received()) == 2, message="the first two alerts")
    wait_until(lambda: outcome(telemetry, "rate_limited") == 1, message="third alert held back")
    assert len(collector.received()) == 2 and alerts.pending() == 2
    clock.advance(30)  # 2/min: one token per 30 s
    wait_until(lambda: len(collector.received()) == 3, message="third alert after a token")
    # the fourth must be seen waiting before the next token exists, or it would just take it
    wait_until(lambda: outcome(telemetry, "rate_limited") == 2, message="fourth alert held back")
    clock.advance(30)
    wait_until(lambda: len(collector.received()) == 4, message="fourth alert")
    alerts.close()
    assert outcome(telemetry, "rate_limited") == 2 and outcome(telemetry, "sent") == 4


def test_pages_held_by_the_rate_limit_are_logged(collector, telemetry, caplog):
    # /tmp/s19/alerting/repro_rate_limit_silent.py: counted rate_limited, but nothing in the log
    clock = FakeClock()  # never advances: one token only
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store, max_per_minute=1, clock=clock)
    with caplog.at_level(logging.WARNING, logger="sidecar.alerting"):
        alerts.notify(incidents(store, *(bleed(f"t{n}", entry_point=f"/e{n}") for n in range(3))))
        wait_until(lambda: outcome(telemetry, "rate_limited") == 1, message="second page held back")
        held = [r.getMessage() for r in caplog.records if "max_per_minute" in r.getMessage()]
        assert len(held) == 1
        assert "webhook" in held[0] and "(1)" in held[0] and "2 wait" in held[0]
        clock.advance(60)  # a token: the second page goes, the third is held, not logged again
        wait_until(lambda: outcome(telemetry, "rate_limited") == 2, message="third page held back")
        assert len([r for r in caplog.records if "max_per_minute" in r.getMessage()]) == 1
    alerts.close(timeout=0.1)


def test_close_drops_what_it_cannot_send_in_time(collector, telemetry):
    clock = FakeClock()  # never advances: only one token ever
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store, max_per_minute=1, clock=clock)
    alerts.notify(incidents(store, *(bleed(f"t{n}", entry_point=f"/e{n}") for n in range(3))))
    wait_until(lambda: outcome(telemetry, "rate_limited") == 1, message="second alert held back")
    alerts.close(timeout=0.2)
    assert len(collector.received()) == 1
    assert outcome(telemetry, "dropped") == 2
    alerts.notify(incidents(store, bleed("late", entry_point="/late")))  # after close: dropped
    assert outcome(telemetry, "dropped") == 3


def test_a_full_queue_drops_and_counts(telemetry):
    with Collector(statuses=[503] * 100) as failing:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(
            AlertingConfig(webhook_url=failing.url, retry_attempts=30, retry_backoff_s=0.05),
            ledger=store, telemetry=telemetry, queue_size=2)
        first = incidents(store, bleed("t0", entry_point="/e0"))
        alerts.notify(first)
        wait_until(lambda: outcome(telemetry, "retried") >= 1, message="worker busy retrying")
        alerts.notify(incidents(store, *(bleed(f"t{n}", entry_point=f"/e{n}") for n in range(1, 6))))
        assert outcome(telemetry, "dropped") == 3  # two queued behind the first, three dropped
        alerts.close(timeout=0.1)


def warning_page(n: int):
    """A warning finding of its own incident (a duplicate execution at entry point /w<n>)."""
    finding = duplicate(f"w{n}", at_s=n)
    return dataclasses.replace(finding, entry_point=f"/w{n}")


def test_a_full_queue_of_warnings_makes_room_for_a_bleed(telemetry):
    # /tmp/s19/alerting/repro_full_queue_drops_bleed.py: with min_severity warning, a sink that is
    # slow (or down) and a queue full of warning pages dropped the next bleed page and kept them
    hold = threading.Event()
    with Collector(hold=hold) as slow:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(AlertingConfig(webhook_url=slow.url, min_severity="warning"),
                                 ledger=store, telemetry=telemetry, queue_size=3)
        alerts.notify(incidents(store, warning_page(0)))
        assert slow.posted.wait(10), "the first page never reached the sink"  # held there
        alerts.notify(incidents(store, *(warning_page(n) for n in range(1, 4))))  # the queue: full
        assert outcome(telemetry, "dropped") == 0
        (leak,) = incidents(store, bleed("b1"))
        alerts.notify([leak])
        assert outcome(telemetry, "dropped") == 1  # the newest warning made room, counted
        hold.set()
        wait_until(lambda: len(slow.received()) == 4, message="four pages")
        sent = [body["incident"]["id"] for body in slow.received()]
        assert sent[1] == leak.id  # right after the one under way: the most severe first
        # the sink records a page before it answers, the dispatcher marks it paged after: wait for
        # the four marks (waiting for the bleed's alone, the last warning's could still be to come)
        wait_until(lambda: all(store.is_alerted(incident_id) for incident_id in sent),
                   message="the four pages marked paged")
        dropped = [i.id for i in store.list_incidents() if not i.alerted]
        assert len(dropped) == 1 and dropped[0] not in sent  # the displaced warning: still unpaged
        alerts.close()


def test_a_full_retry_table_of_warnings_makes_room_for_a_failed_bleed(telemetry):
    # the pages whose retries failed wait to be tried again, at most as many as the queue's size:
    # a bleed page failing while warnings filled them was dropped, and the sink, back, got the
    # warnings and not the bleed
    clock = FakeClock()
    with Collector(statuses=[503] * 3) as down:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(
            AlertingConfig(webhook_url=down.url, min_severity="warning", retry_attempts=0),
            ledger=store, telemetry=telemetry, queue_size=2, clock=clock)
        alerts.notify(incidents(store, warning_page(1), warning_page(2)))
        wait_until(lambda: outcome(telemetry, "failed") == 2, message="two warnings failed")
        (leak,) = incidents(store, bleed("b1", at_s=10))
        alerts.notify([leak])
        wait_until(lambda: outcome(telemetry, "failed") == 3, message="the bleed failed")
        assert outcome(telemetry, "dropped") == 1  # the least recently seen warning made room
        clock.advance(31)  # due again; the sink answers 200 from now on
        wait_until(lambda: store.is_alerted(leak.id), message="the bleed paged once the sink is back")
        wait_until(lambda: len(down.received()) == 5, message="the warning kept, paged too")
        assert [body["incident"]["entry_point"] for body in down.received()[3:]][0] == "/ws"
        assert not store.is_alerted(store.list_incidents()[-1].id)  # /w1, the displaced one
        alerts.close()


def test_5xx_is_retried_until_it_passes(telemetry):
    with Collector(statuses=[503, 500]) as flaky:
        store = IncidentStore(":memory:")
        alerts = dispatcher(flaky.url, telemetry, store, retry_attempts=3)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message="alert accepted on third try")
        alerts.close()
        assert len(flaky.received()) == 3
        assert (outcome(telemetry, "retried"), outcome(telemetry, "sent")) == (2, 1)


def test_a_5xx_whose_retry_after_is_not_ascii_digits_is_retried_as_without_one(telemetry):
    # '\u00b2' (superscript two, a latin-1 header byte) is a digit to str.isdigit but no number to
    # float: the page died as "unexpected error", neither retried nor tried again later
    with Collector(statuses=[503], headers={"Retry-After": "\u00b2"}) as flaky:
        store = IncidentStore(":memory:")
        alerts = dispatcher(flaky.url, telemetry, store, retry_attempts=3)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message="alert accepted on the retry")
        alerts.close()
        assert len(flaky.received()) == 2
        assert (outcome(telemetry, "retried"), outcome(telemetry, "sent"),
                outcome(telemetry, "failed")) == (1, 1, 0)


def test_retries_give_up_after_retry_attempts(telemetry):
    with Collector(statuses=[503] * 10) as down:
        store = IncidentStore(":memory:")
        alerts = dispatcher(down.url, telemetry, store, retry_attempts=2)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: outcome(telemetry, "failed") == 1, message="push failed")
        alerts.close()
        assert len(down.received()) == 3 and outcome(telemetry, "retried") == 2
        assert store.is_alerted(incident.id) is False  # a later occurrence may try again


def test_alert_urls_are_logged_without_their_secrets(telemetry, caplog):
    with Collector(statuses=[503] * 10) as down:
        secret_url = down.url.replace("http://", "http://admin:hunter2@") + "/services/T0/B0/SECRETTOKEN"
        store = IncidentStore(":memory:")
        alerts = dispatcher(secret_url, telemetry, store, retry_attempts=1)
        with caplog.at_level(logging.DEBUG, logger="sidecar"):
            alerts.notify(incidents(store, bleed("t1")))
            wait_until(lambda: outcome(telemetry, "failed") == 1, message="push failed")
            alerts.close()
        assert down.paths[0] == "/hook/services/T0/B0/SECRETTOKEN"  # the real URL was used
    logged = caplog.text
    host_port = down.url.removeprefix("http://").partition("/")[0]
    assert f"POST http://{host_port}/…: HTTP 503" in logged
    assert "hunter2" not in logged and "SECRETTOKEN" not in logged


class GarbledOnce:
    """A webhook whose first answer, ``status``, says ``Content-Encoding: gzip`` over a body that is
    not (a misconfigured proxy), then plain 200s; records how many POSTs came."""

    def __init__(self, status: int) -> None:
        self.posts = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.posts += 1
                body = b"not gzip" if owner.posts == 1 else b""
                self.send_response(status if owner.posts == 1 else 200)
                if body:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.parametrize("status, posts, retried", [(503, 2, 1), (200, 1, 0)])
def test_an_answer_that_does_not_decode_counts_by_its_status(telemetry, status, posts, retried):
    # /tmp/s19/alerting/repro_bad_encoding_page_lost.py: httpx's DecodingError is no TransportError;
    # it escaped as "unexpected error", the page counted failed and forgotten, never tried again.
    # Then every such answer was retried, a 200 too: a second page (/tmp/s33_alertreview). The
    # status decides: a 503 is retried, a 200 took the page
    garbled = GarbledOnce(status)
    try:
        store = IncidentStore(":memory:")
        alerts = dispatcher(garbled.url, telemetry, store, retry_attempts=2)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message="paged")
        alerts.close()
        assert garbled.posts == posts
        assert (outcome(telemetry, "retried"), outcome(telemetry, "failed"),
                outcome(telemetry, "sent")) == (retried, 0, 1)
    finally:
        garbled.close()


class EndlessBody:
    """A webhook URL that answers each POST with a body that never ends (a streaming endpoint, a
    download behind a misconfigured route): ``statuses`` in order, then 200, each followed by 64 KiB
    chunks until the client hangs up. ``hung_up`` counts the answers the client stopped reading."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.posts = 0
        self.hung_up = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        self._closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                received += chunk
            self.posts += 1
            status = self.statuses.pop(0) if self.statuses else 200
            chunk = b"x" * 65536
            try:
                connection.sendall(b"HTTP/1.1 %d Whatever\r\nTransfer-Encoding: chunked\r\n"
                                   b"Content-Type: text/plain\r\n\r\n" % status)
                while not self._closed.is_set():
                    connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                self.hung_up += 1

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


def test_an_answer_whose_body_never_ends_is_read_no_further_than_its_excerpt(telemetry):
    # /tmp/s25_inc/probe_endless_body.py: the worker read the whole answer (Client.post), for ever:
    # ~55 MB/s of memory and no page to that sink again
    endless = EndlessBody(statuses=[503])
    try:
        store = IncidentStore(":memory:")
        alerts = dispatcher(endless.url, telemetry, store, retry_attempts=2)
        first, second = incidents(store, bleed("t1"), bleed("t2", implementation="other.Engine"))
        alerts.notify([first, second])
        wait_until(lambda: store.is_alerted(first.id) and store.is_alerted(second.id),
                   message="both pages taken, the 503 retried")
        alerts.close()
        assert (endless.posts, outcome(telemetry, "retried"), outcome(telemetry, "sent")) == (3, 1, 2)
        wait_until(lambda: endless.hung_up == 3, message="each answer left unread")
    finally:
        endless.close()


def test_4xx_is_not_retried(telemetry):
    with Collector(statuses=[400]) as picky:
        store = IncidentStore(":memory:")
        alerts = dispatcher(picky.url, telemetry, store, retry_attempts=5)
        alerts.notify(incidents(store, bleed("t1")))
        wait_until(lambda: outcome(telemetry, "failed") == 1, message="push failed")
        alerts.close()
        assert len(picky.received()) == 1 and outcome(telemetry, "retried") == 0


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirect_is_not_followed_and_fails_as_a_refusal(telemetry, status):
    """docs/sidecar.md: a 3xx fails as a 4xx does (the page tried again later). Followed, a 302 would
    be a GET, whose 200 would pass for a page taken; a 307 would post the page where the redirect
    says, the URL configured never fixed."""
    with Collector(statuses=[status], headers={"Location": "/elsewhere"}) as moved:
        store = IncidentStore(":memory:")
        alerts = dispatcher(moved.url, telemetry, store, retry_attempts=5)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: outcome(telemetry, "failed") == 1, message="push failed")
        alerts.close()
        assert moved.paths == ["/hook"] and outcome(telemetry, "retried") == 0
        assert not store.is_alerted(incident.id)


def test_notify_without_a_store_dedupes_in_memory(collector, telemetry):
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry)  # no ledger
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(collector.received, message="alert")
    wait_until(lambda: alerts.pending() == 0, message="worker idle")
    alerts.notify([incident])
    alerts.close()
    assert len(collector.received()) == 1 and outcome(telemetry, "deduplicated") == 1


def test_no_sink_configured_means_nothing_to_do(telemetry):
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(), ledger=store, telemetry=telemetry)
    alerts.notify(incidents(store, bleed("t1")))
    assert alerts.sinks == [] and alerts.pending() == 0
    alerts.close()


def test_an_incident_evicted_from_the_store_and_back_is_paged_again(collector, telemetry):
    store = IncidentStore(":memory:", max_incidents=1)
    alerts = dispatcher(collector.url, telemetry, store)
    (first,) = incidents(store, bleed("t1", entry_point="/a"))
    alerts.notify([first])
    wait_until(lambda: store.is_alerted(first.id), message="first page")
    store.set_status(first.id, "resolved")
    alerts.notify(incidents(store, bleed("t2", entry_point="/b")))  # evicts /a
    wait_until(lambda: len(collector.received()) == 2, message="page of /b")
    store.set_status(bleed(entry_point="/b").fingerprint, "resolved")
    (back,) = incidents(store, bleed("t3", entry_point="/a"))  # a new incident, as documented
    assert back.id == first.id and not back.alerted and back.count == 1
    alerts.notify([back])
    wait_until(lambda: len(collector.received()) == 3, message="/a paged again")
    alerts.close()
    assert [b["incident"]["entry_point"] for b in collector.received()] == ["/a", "/b", "/a"]


class RecordingRefreshingSink:
    """A sink that is refreshed like Alertmanager; records what it is sent (the real Alertmanager
    is in test_alertmanager.py; here the clock must be controlled)."""

    name, refreshes = "alertmanager", True

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, incident: Incident) -> None:
        self.sent.append(incident.count)


def test_refreshes_come_at_least_three_times_per_resolve_after(telemetry):
    clock, sink = FakeClock(), RecordingRefreshingSink()
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(resolve_after_s=30), ledger=store, telemetry=telemetry,
                             sinks=[sink], clock=clock)
    alerts.notify(incidents(store, bleed("t1")))
    wait_until(lambda: sink.sent == [1], message="page")
    wait_until(lambda: store.is_alerted(bleed().fingerprint), message="alerted")
    alerts.notify(incidents(store, bleed("t2")))  # within 10 s of the page: the page covers it
    clock.advance(11)  # resolve_after_s / 3 = 10 s (not the 60 s default)
    alerts.notify(incidents(store, bleed("t3")))
    wait_until(lambda: sink.sent == [1, 3], message="refresh after 10 s")
    alerts.close()
    assert outcome(telemetry, "refreshed", sink="alertmanager") == 1


class HeldRefreshingSink:
    """Refreshed like Alertmanager; records (kind, incident id, count) as each push starts, and
    while ``hold`` is clear each push waits for it (a slow Alertmanager)."""

    name, refreshes = "alertmanager", True

    def __init__(self) -> None:
        self.pushed: list[tuple[str, str, int]] = []
        self.hold = threading.Event()
        self.hold.set()

    def send(self, incident: Incident) -> None:
        self.pushed.append(("send", incident.id, incident.count))
        self.hold.wait()

    def resolve(self, incident: Incident) -> None:
        self.pushed.append(("resolve", incident.id, incident.count))
        self.hold.wait()


def _paged_one_by_one(alerts: AlertDispatcher, store: IncidentStore, *entry_points: str) -> list[str]:
    ids = []
    for n, entry_point in enumerate(entry_points):
        (incident,) = incidents(store, bleed(f"p{n}", entry_point=entry_point))
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message=f"{entry_point} paged")
        ids.append(incident.id)
    return ids


def _a_refresh_held(telemetry, **options) -> tuple:
    """A dispatcher whose sink paged /a, /b and /c, now pushing a's refresh and held there:
    (alerts, store, sink, the three incident ids)."""
    clock, sink = FakeClock(), HeldRefreshingSink()
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(), ledger=store, telemetry=telemetry, sinks=[sink],
                             clock=clock, **options)
    ids = _paged_one_by_one(alerts, store, "/a", "/b", "/c")
    sink.hold.clear()
    clock.advance(REFRESH_EVERY_S)
    alerts.notify(incidents(store, bleed("a1", entry_point="/a")))  # under way, held
    wait_until(lambda: len(sink.pushed) == 4, message="a's refresh under way")
    return alerts, store, sink, ids


def test_a_refresh_or_resolve_replaces_the_one_waiting_for_its_incident(telemetry):
    """The newest state of an incident wins: a resolve replaces its refresh not sent yet, a refresh
    after a reopen replaces its resolve not sent yet; one behind a push under way goes after it."""
    alerts, store, sink, (a, b, c) = _a_refresh_held(telemetry)
    alerts.notify(incidents(store, bleed("b1", entry_point="/b"), bleed("c1", entry_point="/c")))
    for incident_id in (a, b, c):  # PATCH: each resolved
        store.set_status(incident_id, "resolved")
        alerts.resolved(store.get(incident_id))
    alerts.notify(incidents(store, bleed("c2", entry_point="/c")))  # c recurs: reopened
    assert alerts.pending() == 4  # a's refresh under way; b's resolve, c's refresh, a's resolve
    sink.hold.set()
    wait_until(lambda: alerts.pending() == 0, message="every update pushed")
    alerts.close()
    # first come, first served; each incident's newest state in its first one's place
    assert sink.pushed[3:] == [("send", a, 2), ("resolve", b, 2), ("send", c, 3),
                               ("resolve", a, 2)]


def test_a_refresh_dropped_by_a_full_queue_is_offered_again_with_the_next_finding(telemetry):
    alerts, store, sink, (a, b, c) = _a_refresh_held(telemetry, queue_size=1)
    alerts.notify(incidents(store, bleed("b1", entry_point="/b")))  # waits: the queue is full
    alerts.notify(incidents(store, bleed("c1", entry_point="/c")))  # dropped
    assert outcome(telemetry, "dropped", sink="alertmanager") == 1
    sink.hold.set()
    wait_until(lambda: alerts.pending() == 0, message="the queue drained")
    alerts.notify(incidents(store, bleed("c2", entry_point="/c")))  # the clock has not moved
    wait_until(lambda: alerts.pending() == 0 and len(sink.pushed) == 6, message="c refreshed")
    alerts.notify(incidents(store, bleed("c3", entry_point="/c")))  # that one was: not again
    alerts.close()
    assert sink.pushed[3:] == [("send", a, 2), ("send", b, 2), ("send", c, 3)]


@pytest.mark.parametrize(("url", "logged"), [
    ("http://admin:pw@127.0.0.1:9093/api/v2/alerts", "http://127.0.0.1:9093/…"),
    ("https://hooks.example/services/T0/B0/SECRET?x=1", "https://hooks.example/…"),
    ("http://[::1]:9093", "http://[::1]:9093"),
    ("http://h:99999/x", "http://h:?/…"),  # an invalid port must not break the message
])
def test_redacted_urls_keep_scheme_host_and_port_only(url, logged):
    from sidecar.alerting.sinks import redacted

    assert redacted(url) == logged


def test_a_refresh_does_not_wait_behind_pages_held_by_the_rate_limit(telemetry):
    clock, sink = FakeClock(), RecordingRefreshingSink()  # the clock never moves: one token only
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(max_per_minute=1), ledger=store, telemetry=telemetry,
                             sinks=[sink], clock=clock, refresh_every_s=0)
    alerts.notify(incidents(store, bleed("t1", entry_point="/a")))
    wait_until(lambda: store.is_alerted(bleed(entry_point="/a").fingerprint), message="first page")
    alerts.notify(incidents(store, bleed("t2", entry_point="/b"), bleed("t3", entry_point="/c")))
    wait_until(lambda: outcome(telemetry, "rate_limited", sink="alertmanager") == 1,
               message="the page of /b waits for a token")
    alerts.notify(incidents(store, bleed("t4", entry_point="/a")))  # /a keeps firing
    wait_until(lambda: outcome(telemetry, "refreshed", sink="alertmanager") == 1,
               message="refresh sent while the pages wait")
    assert sink.sent == [1, 2] and alerts.pending() == 2  # /b and /c still wait
    alerts.close(timeout=0.1)
    assert outcome(telemetry, "dropped", sink="alertmanager") == 2


def test_a_page_held_by_the_rate_limit_is_cancelled_when_its_incident_is_resolved_meanwhile(
        collector, telemetry):
    # a page waiting for its token (up to a minute) of an incident resolved by PATCH meanwhile was
    # posted all the same once the token came: the webhook paged for an incident already closed
    clock = FakeClock()
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store, max_per_minute=1, clock=clock)
    first, second = incidents(store, bleed("t1", entry_point="/a"), bleed("t2", entry_point="/b"))
    alerts.notify([first, second])
    wait_until(lambda: outcome(telemetry, "rate_limited") == 1, message="second page held back")
    store.set_status(second.id, "resolved")  # PATCH while its page waits for a token
    clock.advance(60)
    wait_until(lambda: outcome(telemetry, "cancelled") == 1, message="the held page cancelled")
    alerts.close()
    assert [body["incident"]["id"] for body in collector.received()] == [first.id]
    assert outcome(telemetry, "sent") == 1 and not store.is_alerted(second.id)


def test_a_bleed_does_not_wait_behind_a_warning_held_by_the_rate_limit(collector, telemetry):
    # the warning page taken off the queue to wait for the next token kept it while a bleed page
    # came: the bleed waited a whole token more (a minute at max_per_minute 1), "critical first" not
    clock = FakeClock()
    store = IncidentStore(":memory:")
    alerts = dispatcher(collector.url, telemetry, store, max_per_minute=1, clock=clock,
                        min_severity="warning")
    alerts.notify(incidents(store, warning_page(0), warning_page(1)))
    wait_until(lambda: outcome(telemetry, "rate_limited") == 1, message="second warning held back")
    (critical,) = incidents(store, bleed("t1", entry_point="/bleed"))
    alerts.notify([critical])
    wait_until(lambda: outcome(telemetry, "rate_limited") == 2, message="the bleed held back")
    clock.advance(60)  # one token: the bleed's
    wait_until(lambda: len(collector.received()) == 2, message="a second page")
    assert collector.received()[1]["incident"]["id"] == critical.id
    clock.advance(60)
    wait_until(lambda: len(collector.received()) == 3, message="the second warning")
    alerts.close()
    assert [body["incident"]["entry_point"] for body in collector.received()] == ["/w0", "/bleed", "/w1"]
    # each page held counted once: the warning put back behind the bleed is not counted again
    assert outcome(telemetry, "rate_limited") == 2 and outcome(telemetry, "sent") == 3
