"""A page is not given up while the incident may still fire: pages kept per sink, tried again later
after failed retries, offered again at start; critical pages first; a hand-resolved incident ends
its Alertmanager alert."""

import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client import CollectorRegistry

from sidecar.alerting import AlertDispatcher
from sidecar.alerting.dispatcher import MAX_REPAGE_AFTER_S, REPAGE_AFTER_S
from sidecar.alerting.payload import RESOLVE_CLOCK_ALLOWANCE_S
from sidecar.alerting.sinks import AlertmanagerSink, RetryableSinkError
from sidecar.config import AlertingConfig
from sidecar.incidents import IncidentStore
from sidecar.model import Incident, Severity
from sidecar.telemetry import Telemetry
from tests.sidecar.alerting.servers import Collector
from tests.sidecar.alerting.test_dispatcher import FakeClock, incidents, outcome
from tests.sidecar.incidents.findings import bleed, duplicate
from tests.support import wait_until


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


class FlakySink:
    """A sink that is down until ``up`` is set (the clock must be controlled: no real server)."""

    def __init__(self, name: str = "webhook", refreshes: bool = False) -> None:
        self.name, self.refreshes = name, refreshes
        self.up = False
        self.tries = 0
        self.sent: list[str] = []
        self.resolved: list[str] = []
        self.tried: list[str] = []

    def send(self, incident: Incident) -> None:
        self.tries += 1
        self.tried.append(incident.id)
        if not self.up:
            raise RetryableSinkError("connection refused")
        self.sent.append(incident.id)

    def resolve(self, incident: Incident) -> None:
        self.resolved.append(incident.id)


def test_a_page_whose_retries_failed_is_tried_again_later_with_a_growing_delay(telemetry):
    clock, sink = FakeClock(), FlakySink()
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=1, retry_backoff_s=0), ledger=store,
                             telemetry=telemetry, sinks=[sink], clock=clock)
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: outcome(telemetry, "failed") == 1, message="first page failed")
    assert sink.tries == 2 and alerts.pending() == 1  # kept, not given up
    clock.advance(REPAGE_AFTER_S)
    wait_until(lambda: outcome(telemetry, "failed") == 2, message="tried again after the delay")
    clock.advance(REPAGE_AFTER_S)  # the delay doubled: not yet
    sink.up = True
    clock.advance(REPAGE_AFTER_S)
    wait_until(lambda: store.is_alerted(incident.id, "webhook"), message="paged once it is up")
    assert sink.sent == [incident.id] and sink.tries == 5
    assert alerts.pending() == 0 and outcome(telemetry, "sent") == 1
    alerts.close()


def test_a_new_finding_tries_a_waiting_page_again_at_once(telemetry):
    clock, sink = FakeClock(), FlakySink()
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=0), ledger=store, telemetry=telemetry,
                             sinks=[sink], clock=clock)
    alerts.notify(incidents(store, bleed("t1")))
    wait_until(lambda: outcome(telemetry, "failed") == 1, message="first page failed")
    sink.up = True
    (again,) = incidents(store, bleed("t2"))  # the clock does not move
    alerts.notify([again])
    wait_until(lambda: store.is_alerted(again.id), message="paged with the new finding")
    assert sink.sent == [again.id] and outcome(telemetry, "deduplicated") == 0
    alerts.close()


def test_a_page_the_sink_refused_waits_its_delay_whatever_findings_come(telemetry):
    """A webhook that answers 4xx (its path wrong, its token rotated) was posted the same page again
    with every new finding, as fast as the token bucket let it (63 POSTs in 3 s for one incident,
    then 60 a minute), spending the tokens other pages wait for. It now waits as a page whose
    retries failed, and is paged once the sink takes it."""
    clock = FakeClock()
    with Collector(statuses=[400, 400]) as picky:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(AlertingConfig(webhook_url=picky.url, retry_attempts=5),
                                 ledger=store, telemetry=telemetry, clock=clock)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: outcome(telemetry, "failed") == 1, message="refused")
        assert alerts.pending() == 1  # kept, waiting for its delay
        for n in range(2, 12):  # the bleed goes on: nothing is posted before the delay passed
            alerts.notify(incidents(store, bleed(f"t{n}")))
        assert len(picky.received()) == 1
        clock.advance(REPAGE_AFTER_S)
        wait_until(lambda: outcome(telemetry, "failed") == 2, message="tried again after the delay")
        clock.advance(REPAGE_AFTER_S)  # the delay doubled: not yet; the sink is fixed meanwhile
        alerts.notify(incidents(store, bleed("t12")))
        clock.advance(REPAGE_AFTER_S)
        wait_until(lambda: store.is_alerted(incident.id, "webhook"), message="paged once taken")
        alerts.close()
    assert len(picky.received()) == 3
    assert picky.received()[-1]["incident"]["count"] == 12  # the newest copy of the incident
    assert outcome(telemetry, "retried") == 0 and outcome(telemetry, "sent") == 1


def test_the_delay_between_tries_stops_growing_at_its_maximum(telemetry):
    clock, sink = FakeClock(), FlakySink()
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=0), ledger=store, telemetry=telemetry,
                             sinks=[sink], clock=clock)
    alerts.notify(incidents(store, bleed("t1")))
    delay, tries = REPAGE_AFTER_S, 1
    while delay < MAX_REPAGE_AFTER_S * 4:
        wait_until(lambda: sink.tries == tries, message=f"try {tries}")
        clock.advance(min(delay, MAX_REPAGE_AFTER_S))
        delay, tries = delay * 2, tries + 1
    wait_until(lambda: sink.tries == tries, message="a try every MAX_REPAGE_AFTER_S")
    alerts.close(timeout=0.1)


def test_a_sink_that_failed_is_paged_again_while_the_other_one_has_it(telemetry):
    clock, webhook = FakeClock(), FlakySink("webhook")
    with Collector() as am, httpx.Client() as client:
        store = IncidentStore(":memory:")
        alertmanager = AlertmanagerSink(am.url.removesuffix("/hook"), client)
        alerts = AlertDispatcher(AlertingConfig(retry_attempts=0), ledger=store, telemetry=telemetry,
                                 sinks=[alertmanager, webhook], clock=clock)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id, "alertmanager"), message="Alertmanager has it")
        wait_until(lambda: outcome(telemetry, "failed") == 1, message="the webhook failed")
        assert store.is_alerted(incident.id, "webhook") is False
        webhook.up = True
        clock.advance(REPAGE_AFTER_S)
        wait_until(lambda: store.is_alerted(incident.id, "webhook"), message="webhook paged later")
        alerts.close()
        assert len(am.received()) == 1  # Alertmanager was not paged a second time
        assert webhook.sent == [incident.id]


def test_a_restart_pages_what_the_last_run_could_not_and_only_that(tmp_path, telemetry):
    path = str(tmp_path / "incidents.db")
    store = IncidentStore(path)
    clock, down = FakeClock(), FlakySink()
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=0), ledger=store, telemetry=telemetry,
                             sinks=[down], clock=clock)
    (failed,) = incidents(store, bleed("t1", entry_point="/a"))
    alerts.notify([failed])
    wait_until(lambda: outcome(telemetry, "failed") == 1, message="page failed")
    alerts.close()  # a shutdown while the page waits to be tried again
    store.mark_alerted(incidents(store, bleed("t2", entry_point="/b"))[0].id, "webhook")
    store.close()

    reopened = IncidentStore(path)
    with Collector() as webhook:
        alerts = AlertDispatcher(AlertingConfig(webhook_url=webhook.url), ledger=reopened,
                                 telemetry=Telemetry(CollectorRegistry()))
        alerts.resume(reopened.alertable(Severity.CRITICAL, seen_since_ns=0))
        wait_until(lambda: reopened.is_alerted(failed.id), message="paged at the next start")
        alerts.close()
        assert [body["incident"]["id"] for body in webhook.received()] == [failed.id]


def test_alertable_incidents_are_open_severe_enough_and_recent(tmp_path):
    store = IncidentStore(":memory:")
    old, recent = bleed("t1", entry_point="/old", at_s=0), bleed("t2", entry_point="/new", at_s=100)
    resolved = bleed("t3", entry_point="/resolved", at_s=100)
    store.record([old, recent, resolved, duplicate("d1", at_s=100)])
    store.set_status(resolved.fingerprint, "resolved")
    since = recent.detected_ns - 1
    assert [i.id for i in store.alertable(Severity.CRITICAL, since)] == [recent.fingerprint]
    assert len(store.alertable(Severity.WARNING, since)) == 2
    assert len(store.alertable(Severity.CRITICAL, 0)) == 2


def test_critical_pages_go_before_warnings_that_came_first(telemetry):
    clock = FakeClock()  # the clock never moves until told: one token a minute
    with Collector() as webhook:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(AlertingConfig(webhook_url=webhook.url, max_per_minute=1,
                                                min_severity="warning"),
                                 ledger=store, telemetry=telemetry, clock=clock)
        alerts.notify(incidents(store, bleed("t0", entry_point="/first")))
        wait_until(lambda: len(webhook.received()) == 1, message="the first page takes the token")
        alerts.notify(incidents(store, bleed("t1", entry_point="/held")))
        wait_until(lambda: outcome(telemetry, "rate_limited") == 1, message="the next one waits")
        alerts.notify(incidents(store, duplicate("d1")))  # queued behind it, then a critical
        alerts.notify(incidents(store, bleed("t2", entry_point="/later")))
        for pages in (2, 3, 4):
            clock.advance(60)
            wait_until(lambda: len(webhook.received()) == pages, message=f"page {pages}")
        alerts.close()
    order = [body["incident"]["entry_point"] for body in webhook.received()]
    assert order == ["/first", "/held", "/later", duplicate().entry_point]


def test_a_resolved_incident_ends_its_alertmanager_alert_now(telemetry):
    with Collector() as am:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(AlertingConfig(alertmanager_url=am.url.removesuffix("/hook")),
                                 ledger=store, telemetry=telemetry)
        (incident,) = incidents(store, bleed("t1"))
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message="paged")
        store.set_status(incident.id, "resolved")
        before = datetime.now(timezone.utc)
        alerts.resolved(store.get(incident.id))
        wait_until(lambda: len(am.received()) == 2, message="the resolve sent")
        alerts.close()
    (page,), (ended,) = am.received()  # each body is a list of alerts
    assert page["labels"] == ended["labels"]
    ends_at = datetime.fromisoformat(ended["endsAt"].replace("Z", "+00:00"))
    # in the past by the clock allowance: resolved by an Alertmanager whose clock is behind ours
    assert abs((before - ends_at).total_seconds() - RESOLVE_CLOCK_ALLOWANCE_S) < 5
    assert datetime.fromisoformat(page["endsAt"].replace("Z", "+00:00")) > ends_at
    assert outcome(telemetry, "resolved", sink="alertmanager") == 1


def test_the_webhook_alert_ends_resolve_after_s_after_the_last_finding(telemetry):
    with Collector() as webhook:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(AlertingConfig(webhook_url=webhook.url, resolve_after_s=60),
                                 ledger=store, telemetry=telemetry)
        alerts.notify(incidents(store, bleed("t1")))
        (body,) = wait_until(lambda: webhook.received(), message="page")
        alerts.close()
    alert = body["alert"]
    starts = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00"))
    ends = datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00"))
    now = datetime.now(timezone.utc)
    assert 55 < (ends - max(starts, now)).total_seconds() <= 60


class BusySink(FlakySink):
    """Answers 429 with ``Retry-After: 1`` once, then accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def send(self, incident: Incident) -> None:
        self.at.append(time.monotonic())
        if len(self.at) == 1:
            raise RetryableSinkError("HTTP 429", retry_after_s=1.0)
        self.sent.append(incident.id)


def test_a_retry_waits_as_long_as_the_servers_retry_after_asks(telemetry):
    sink = BusySink()
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(retry_backoff_s=0.01), ledger=store, telemetry=telemetry,
                             sinks=[sink])
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: store.is_alerted(incident.id), message="paged on the retry")
    alerts.close()
    assert sink.at[1] - sink.at[0] >= 1.0  # not the 10 ms backoff


@pytest.mark.parametrize(("header", "seconds"), [
    (None, None), ("", None), ("120", 120.0), (" 7 ", 7.0), ("soon", None), ("-5", None),
    ("\u00b2", None), ("1\u00b9", None),  # digits to str.isdigit, not to float
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: at once
])
def test_retry_after_is_read_as_seconds_or_an_http_date(header, seconds):
    from sidecar.alerting.sinks import _retry_after_s

    assert _retry_after_s(header) == seconds


def test_retry_after_as_a_future_http_date():
    from email.utils import format_datetime

    from sidecar.alerting.sinks import _retry_after_s

    later = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=90)
    assert 80 <= _retry_after_s(format_datetime(later, usegmt=True)) <= 90


def test_a_page_waiting_to_be_tried_again_is_cancelled_when_the_incident_is_resolved(telemetry):
    clock, sink = FakeClock(), FlakySink()
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=0), ledger=store, telemetry=telemetry,
                             sinks=[sink], clock=clock)
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: outcome(telemetry, "failed") == 1, message="first page failed")
    store.set_status(incident.id, "resolved")  # PATCH while the page waits
    sink.up = True
    clock.advance(REPAGE_AFTER_S)
    wait_until(lambda: outcome(telemetry, "cancelled") == 1, message="the page cancelled")
    assert sink.sent == [] and alerts.pending() == 0
    alerts.close()


def test_a_finding_recorded_before_a_resolve_does_not_fire_the_alert_again(telemetry):
    sink = FlakySink("alertmanager", refreshes=True)
    sink.up = True
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(), ledger=store, telemetry=telemetry, sinks=[sink],
                             refresh_every_s=0)
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: store.is_alerted(incident.id, "alertmanager"), message="paged")
    (stale,) = incidents(store, bleed("t2"))  # the pipeline recorded a finding ...
    store.set_status(incident.id, "resolved")  # ... the API resolved it ...
    alerts.resolved(store.get(incident.id))
    alerts.notify([stale])  # ... then the pipeline hands on its copy
    wait_until(lambda: sink.resolved == [incident.id], message="the resolve sent")
    alerts.close()
    assert sink.sent == [incident.id]  # the page only: no refresh after the resolve


def test_a_resolve_handed_on_after_the_incident_reopened_is_not_sent(telemetry):
    """PATCH resolved the incident, and the bleed recurred — the incident reopened, its finding
    handed on — before the API handed on its resolved copy: the resolve ended the alert in
    Alertmanager while the store said open (the recurrence's finding came within the refresh
    interval, so nothing fired it again)."""
    sink = FlakySink("alertmanager", refreshes=True)
    sink.up = True
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(), ledger=store, telemetry=telemetry, sinks=[sink],
                             clock=FakeClock())
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: store.is_alerted(incident.id, "alertmanager"), message="paged")
    store.set_status(incident.id, "resolved")  # PATCH ...
    seen_by_the_api = store.get(incident.id)  # ... and the copy it hands on
    alerts.notify(incidents(store, bleed("t2")))  # the bleed recurs: reopened, handed on
    alerts.resolved(seen_by_the_api)
    wait_until(lambda: alerts.pending() == 0, message="everything offered was sent")
    alerts.close()
    assert store.get(incident.id).status == "open"
    assert sink.resolved == []  # the alert's last state is the incident's: firing
    assert outcome(telemetry, "resolved", sink="alertmanager") == 0


class ResolvedWhileSending(FlakySink):
    """The incident is resolved (PATCH) while its page is on the wire."""

    def __init__(self, store: IncidentStore) -> None:
        super().__init__("alertmanager", refreshes=True)
        self.up, self._store = True, store

    def send(self, incident: Incident) -> None:
        self._store.set_status(incident.id, "resolved")
        super().send(incident)


def test_a_page_that_raced_a_resolve_is_followed_by_the_resolve(telemetry):
    store = IncidentStore(":memory:")
    sink = ResolvedWhileSending(store)
    alerts = AlertDispatcher(AlertingConfig(), ledger=store, telemetry=telemetry, sinks=[sink])
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: sink.resolved == [incident.id], message="the resolve after the page")
    alerts.close()
    assert sink.sent == [incident.id]


def waiting(telemetry, sink="webhook"):
    return telemetry.registry.get_sample_value("pathwatch_alerts_resume_waiting", {"sink": sink})


def test_resume_pages_the_most_severe_first_as_the_queue_has_room_and_refreshes_nothing(telemetry):
    clock, sink = FakeClock(), FlakySink("alertmanager", refreshes=True)  # down at first
    store = IncidentStore(":memory:")
    store.record([bleed(f"t{n}", entry_point=f"/b{n}", at_s=n) for n in range(3)]
                 + [duplicate(f"d{n}", at_s=10 + n) for n in range(1)])
    store.mark_alerted(bleed(entry_point="/b0").fingerprint, "alertmanager")  # it has its page
    alerts = AlertDispatcher(AlertingConfig(min_severity="warning", retry_attempts=0), ledger=store,
                             telemetry=telemetry, sinks=[sink], queue_size=2, clock=clock)
    alerts.resume(store.alertable(Severity.WARNING, seen_since_ns=0))
    wait_until(lambda: sink.tries == 2, message="two pages tried")
    # the two criticals not paged yet, the newest first; the warning waits for room (the two failed
    # pages, waiting to be tried again, fill this sink's queue), visibly
    assert sink.tried == [bleed(entry_point="/b2").fingerprint, bleed(entry_point="/b1").fingerprint]
    assert waiting(telemetry, "alertmanager") == 1 and alerts.pending() == 3
    sink.up = True
    clock.advance(REPAGE_AFTER_S)
    warning = duplicate().fingerprint
    wait_until(lambda: store.is_alerted(warning, "alertmanager"), message="the warning paged")
    assert sink.sent[-1] == warning and len(sink.sent) == 3
    assert waiting(telemetry, "alertmanager") == 0 and alerts.pending() == 0
    alerts.close()
    assert outcome(telemetry, "dropped", sink="alertmanager") == 0
    assert outcome(telemetry, "refreshed", sink="alertmanager") == 0


def test_resume_pages_every_incident_beyond_the_queue_one_at_a_time(telemetry):
    """The incidents not paged at start beyond what a queue holds are paged as the queue drains
    (they used to wait for a next finding that may never come), the most recent first, and counted
    in a gauge while they wait."""
    hold = threading.Event()
    store = IncidentStore(":memory:")
    store.record([bleed(f"t{n}", entry_point=f"/b{n}", at_s=n) for n in range(5)])
    with Collector(hold=hold) as webhook:
        alerts = AlertDispatcher(AlertingConfig(webhook_url=webhook.url), ledger=store,
                                 telemetry=telemetry, queue_size=3)
        alerts.resume(store.alertable(Severity.CRITICAL, seen_since_ns=0))
        assert webhook.posted.wait(10), "the first page under way"
        assert waiting(telemetry) == 4  # one at a time: the others wait, visibly
        hold.set()
        wait_until(lambda: len(webhook.received()) == 5, message="every unpaged incident paged")
        wait_until(lambda: alerts.pending() == 0, message="the worker idle")
        alerts.close()
    assert [body["incident"]["entry_point"] for body in webhook.received()] == [
        "/b4", "/b3", "/b2", "/b1", "/b0"]
    assert all(store.is_alerted(bleed(entry_point=f"/b{n}").fingerprint) for n in range(5))
    assert waiting(telemetry) == 0 and outcome(telemetry, "sent") == 5
    assert outcome(telemetry, "dropped") == 0


def test_pages_waiting_since_the_start_leave_room_for_new_findings_and_are_paged_once(telemetry):
    hold = threading.Event()
    store = IncidentStore(":memory:")
    store.record([bleed(f"t{n}", entry_point=f"/b{n}", at_s=n) for n in range(5)])
    with Collector(hold=hold) as webhook:
        alerts = AlertDispatcher(AlertingConfig(webhook_url=webhook.url), ledger=store,
                                 telemetry=telemetry, queue_size=2)
        alerts.resume(store.alertable(Severity.CRITICAL, seen_since_ns=0))
        assert webhook.posted.wait(10), "the first page under way"
        # while it is pushed: a new incident, and a new finding of one that waits since the start
        alerts.notify(incidents(store, bleed("n1", entry_point="/new", at_s=20),
                                bleed("n2", entry_point="/b0", at_s=21)))
        assert outcome(telemetry, "dropped") == 0  # the queue had room for them
        hold.set()
        wait_until(lambda: alerts.pending() == 0, message="everything paged")
        alerts.close()
    assert [body["incident"]["entry_point"] for body in webhook.received()] == [
        "/b4", "/new", "/b0", "/b3", "/b2", "/b1"]  # /b0 once: its finding paged it
    assert outcome(telemetry, "deduplicated") == 1 and outcome(telemetry, "dropped") == 0


def test_pages_still_waiting_at_shutdown_are_paged_at_the_next_start(tmp_path, telemetry):
    path = str(tmp_path / "incidents.db")
    store = IncidentStore(path)
    store.record([bleed(f"t{n}", entry_point=f"/b{n}", at_s=n) for n in range(3)])
    down = FlakySink()
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=0), ledger=store, telemetry=telemetry,
                             sinks=[down], queue_size=1, clock=FakeClock())
    alerts.resume(store.alertable(Severity.CRITICAL, seen_since_ns=0))
    wait_until(lambda: down.tries == 1, message="the first page failed")
    assert waiting(telemetry) == 2
    alerts.close()
    assert not any(store.is_alerted(i.id) for i in store.alertable(Severity.CRITICAL, 0))
    store.close()

    reopened = IncidentStore(path)
    with Collector() as webhook:
        alerts = AlertDispatcher(AlertingConfig(webhook_url=webhook.url), ledger=reopened,
                                 telemetry=Telemetry(CollectorRegistry()), queue_size=1)
        alerts.resume(reopened.alertable(Severity.CRITICAL, seen_since_ns=0))
        wait_until(lambda: len(webhook.received()) == 3, message="all three paged at the next start")
        alerts.close()
    assert [body["incident"]["entry_point"] for body in webhook.received()] == ["/b2", "/b1", "/b0"]
    reopened.close()


class SlowFlakySink(FlakySink):
    """Fails its first push, which blocks until released; later pushes pass."""

    def __init__(self) -> None:
        super().__init__()
        self.in_first_push = threading.Event()
        self.release = threading.Event()

    def send(self, incident: Incident) -> None:
        if self.tries == 0:
            self.tries += 1
            self.in_first_push.set()
            self.release.wait(10)
            raise RetryableSinkError("connection reset")
        self.up = True
        super().send(incident)


def test_a_finding_that_arrives_while_a_page_is_being_pushed_is_not_lost_when_the_push_fails(telemetry):
    clock, sink = FakeClock(), SlowFlakySink()  # the clock never moves: no re-page delay passes
    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=0), ledger=store, telemetry=telemetry,
                             sinks=[sink], clock=clock)
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    assert sink.in_first_push.wait(10)
    alerts.notify(incidents(store, bleed("t2")))  # a new finding while the first push hangs
    sink.release.set()
    wait_until(lambda: store.is_alerted(incident.id, "webhook"), message="tried again at once")
    alerts.close()
    assert sink.sent == [incident.id]


def test_an_alertmanager_listed_twice_gets_each_alert_once():
    sink = AlertmanagerSink("http://am-0:9093/", httpx.Client(),
                            peers=("http://am-0:9093", "http://am-1:9093", "http://am-1:9093/"))
    assert sink.urls == ["http://am-0:9093/api/v2/alerts", "http://am-1:9093/api/v2/alerts"]


def test_with_every_alertmanager_instance_busy_the_longest_retry_after_is_kept():
    # two real HTTP servers answering 429 with their own Retry-After
    with Collector(statuses=[429] * 10, headers={"Retry-After": "1"}) as first, \
            Collector(statuses=[429] * 10, headers={"Retry-After": "30"}) as second, \
            httpx.Client(timeout=10) as client:
        sink = AlertmanagerSink(first.url.removesuffix("/hook"), client,
                                peers=(second.url.removesuffix("/hook"),))
        (incident,) = incidents(IncidentStore(":memory:"), bleed("t1"))
        try:
            with pytest.raises(RetryableSinkError) as raised:
                sink.send(incident)
        finally:
            sink.close()
        assert (len(first.received()), len(second.received())) == (1, 1)  # both were asked
    assert raised.value.retry_after_s == 30.0


class ResolvedWhileRetried(FlakySink):
    """Down at its first post, during which the incident is resolved by hand (the API's PATCH);
    up from then on."""

    def __init__(self, store: IncidentStore, name: str = "webhook", refreshes: bool = False) -> None:
        super().__init__(name, refreshes)
        self.store = store
        self.alerts: AlertDispatcher | None = None

    def send(self, incident: Incident) -> None:
        if self.tries == 0:
            self.store.set_status(incident.id, "resolved")
            self.alerts.resolved(self.store.get(incident.id))
        self.up = self.tries > 0
        super().send(incident)


@pytest.mark.parametrize("name, refreshes", [("webhook", False), ("alertmanager", True)])
def test_a_page_whose_incident_is_resolved_between_its_retries_is_cancelled(telemetry, name,
                                                                            refreshes):
    """/tmp/s33_alertreview: the retries of a page went on after the incident was resolved by hand:
    the page of a resolved incident went out (the docs: nothing more is sent for it). Its retries
    stop; an Alertmanager, which may have taken the post that failed (a timeout), gets the resolve."""
    store = IncidentStore(":memory:")
    sink = ResolvedWhileRetried(store, name, refreshes)
    alerts = AlertDispatcher(AlertingConfig(retry_attempts=3, retry_backoff_s=0), ledger=store,
                             telemetry=telemetry, sinks=[sink])
    sink.alerts = alerts
    (incident,) = incidents(store, bleed("t1"))
    alerts.notify([incident])
    wait_until(lambda: outcome(telemetry, "cancelled", name) == 1, message="the page cancelled",
               timeout=5)
    wait_until(lambda: alerts.pending() == 0, message="nothing left")
    alerts.close()
    assert (sink.tries, sink.sent, store.is_alerted(incident.id)) == (1, [], False)
    assert sink.resolved == ([incident.id] if refreshes else [])


def test_an_incident_owes_its_page_to_the_sinks_configured_when_its_findings_came(tmp_path):
    """A page that was never sent stays owed across restarts however long ago its incident was
    seen (``alertable``), to the sinks that were configured then; a sink added later is not paged
    every old incident, and a sink that has its page owes nothing."""
    path = str(tmp_path / "incidents.db")
    store = IncidentStore(path)
    store.owe_pages(["webhook"], Severity.CRITICAL)
    owed, paged = bleed("t1", entry_point="/owed"), bleed("t2", entry_point="/paged")
    warning = duplicate("d1")  # below the sinks' severity: owes nothing
    store.record([owed, paged, warning])
    store.mark_alerted(paged.fingerprint, "webhook")
    store.owe_pages([], Severity.CRITICAL)  # no sink configured when this one came
    unowed = bleed("t3", entry_point="/before-the-sink")
    store.record([unowed])
    store.close()

    reopened = IncidentStore(path)  # a year later: every finding is older than resolve_after_s
    since = time.time_ns() - 900 * 10**9
    assert [i.id for i in reopened.alertable(Severity.WARNING, since)] == [owed.fingerprint]
    reopened.owe_pages(["webhook", "alertmanager"], Severity.CRITICAL)  # a sink added: owes old ones nothing
    assert [i.id for i in reopened.alertable(Severity.CRITICAL, since)] == [owed.fingerprint]
    reopened.mark_alerted(owed.fingerprint, "webhook")
    assert reopened.alertable(Severity.CRITICAL, since) == []
    reopened.record([bleed("t4", entry_point="/before-the-sink")])  # a finding now: owed to both
    reopened.mark_alerted(unowed.fingerprint, "webhook")
    assert [i.id for i in reopened.alertable(Severity.CRITICAL, time.time_ns())] == [unowed.fingerprint]
    reopened.close()


def test_a_sidecar_down_longer_than_resolve_after_s_pages_what_it_owed_at_its_next_start(tmp_path):
    """The page of a bleed whose sink was down, or that the last shutdown cut, goes out at the next
    start even when the sidecar stayed down longer than ``alerting.resolve_after_s``; incidents that
    were paged, or came before the sink was configured, are not paged."""
    from sidecar.testing import SidecarProcess

    path = str(tmp_path / "incidents.sqlite")
    store = IncidentStore(path)
    store.owe_pages(["webhook"], Severity.CRITICAL)  # as a sidecar with a webhook configured does
    owed, paged = bleed("t1", entry_point="/owed"), bleed("t2", entry_point="/paged")
    store.record([owed, paged])  # a year ago (BASE_NS)
    store.mark_alerted(paged.fingerprint, "webhook")
    store.owe_pages([], Severity.CRITICAL)
    store.record([bleed("t3", entry_point="/before-the-sink")])
    store.close()

    with Collector() as webhook:
        sidecar = SidecarProcess({"receiver": {"grpc_endpoint": "", "http_endpoint": "127.0.0.1:0"},
                                  "incidents": {"path": path},
                                  "alerting": {"webhook_url": webhook.url, "resolve_after_s": 60}},
                                 state_dir=tmp_path, name="restarted")
        sidecar.start(ready_timeout=30)
        try:
            wait_until(lambda: webhook.received(), message="the owed page is sent at start")
        finally:
            assert sidecar.stop(timeout=60) == 0  # what was queued is sent before it exits
        assert [body["incident"]["id"] for body in webhook.received()] == [owed.fingerprint]
    reopened = IncidentStore(path)
    assert reopened.is_alerted(owed.fingerprint, "webhook")
    reopened.close()
