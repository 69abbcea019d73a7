"""Against a real Alertmanager (Debian's prometheus-alertmanager) relaying to a webhook receiver."""

import email.utils
import threading
import time
from datetime import datetime

import httpx
import pytest
from prometheus_client import CollectorRegistry

from sidecar.alerting import AlertDispatcher, AlertmanagerSink
from sidecar.alerting.dispatcher import REFRESH_EVERY_S
from sidecar.alerting.sinks import RetryableSinkError
from sidecar.config import AlertingConfig
from sidecar.incidents import IncidentStore
from sidecar.telemetry import Telemetry
from tests.sidecar.alerting.servers import BlackHole, Collector, alertmanager
from tests.sidecar.alerting.test_dispatcher import FakeClock
from tests.sidecar.incidents.findings import bleed
from tests.support import free_port, wait_until


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


def notified_alerts(receiver: Collector) -> list[dict]:
    """Every alert Alertmanager relayed to the webhook receiver."""
    return [alert for body in receiver.received() for alert in body["alerts"]]


def ended(body: list[dict]) -> bool:
    """The posted alert is resolved: its endsAt has passed."""
    (alert,) = body
    return datetime.fromisoformat(alert["endsAt"].replace("Z", "+00:00")).timestamp() <= time.time()


def sent(telemetry, outcome):
    return telemetry.registry.get_sample_value(
        "pathwatch_alerts_sent_total", {"sink": "alertmanager", "outcome": outcome}) or 0


def test_a_bleed_alert_reaches_the_receiver_with_its_labels(tmp_path, telemetry):
    store = IncidentStore(":memory:")
    with Collector() as receiver, alertmanager(tmp_path / "am", receiver.url) as am_url:
        alerts = AlertDispatcher(
            AlertingConfig(alertmanager_url=am_url, external_url="http://127.0.0.1:9464"),
            ledger=store, telemetry=telemetry, runbook_url="https://docs.example/runbooks")
        (incident, is_new), = store.record([bleed("4bf92f3577b34da6a3ce929d0e0e4736")])
        assert is_new
        alerts.notify([incident])
        (alert,) = wait_until(lambda: notified_alerts(receiver), timeout=20,
                              message="alert relayed by Alertmanager")
        alerts.close()
    assert alert["status"] == "firing"
    assert alert["labels"] == {
        "alertname": "PathwatchBleed", "severity": "critical", "rule": "bleed.owner_vs_ambient",
        "role": "execution_engine", "implementation": "demo.engines.UserExecutionEngine",
        "entry_point": "/ws", "incident_id": incident.id, "service": "pathwatch",
        "component": "pathwatch", "category": "isolation"}
    assert alert["annotations"]["runbook_url"] == "https://docs.example/runbooks/PathwatchCrossUserBleed.md"
    assert "4bf92f3577b34da6a3ce929d0e0e4736" in alert["annotations"]["description"]
    assert alert["generatorURL"] == f"http://127.0.0.1:9464/api/v1/incidents/{incident.id}"
    assert store.is_alerted(incident.id)
    assert sent(telemetry, "sent") == 1


def test_alertmanager_down_at_first_still_gets_the_alert(tmp_path, telemetry):
    store = IncidentStore(":memory:")
    port = free_port()
    with Collector() as receiver:
        alerts = AlertDispatcher(
            AlertingConfig(alertmanager_url=f"http://127.0.0.1:{port}", retry_attempts=8,
                           retry_backoff_s=0.1),
            ledger=store, telemetry=telemetry)
        (incident, _), = store.record([bleed("t1")])
        alerts.notify([incident])
        wait_until(lambda: sent(telemetry, "retried") >= 1, message="a failed first push")
        assert notified_alerts(receiver) == []
        with alertmanager(tmp_path / "am", receiver.url, port=port):
            (alert,) = wait_until(lambda: notified_alerts(receiver), timeout=30,
                                  message="alert relayed after Alertmanager came up")
            alerts.close()
    assert alert["labels"]["incident_id"] == incident.id
    assert sent(telemetry, "sent") == 1 and sent(telemetry, "failed") == 0


def test_both_sinks_get_it_and_a_second_occurrence_is_not_re_pushed(tmp_path, telemetry):
    store = IncidentStore(":memory:")
    with Collector() as receiver, Collector() as webhook, \
            alertmanager(tmp_path / "am", receiver.url) as am_url:
        alerts = AlertDispatcher(AlertingConfig(alertmanager_url=am_url, webhook_url=webhook.url),
                                 ledger=store, telemetry=telemetry)
        (first, _), = store.record([bleed("t1")])
        alerts.notify([first])
        wait_until(lambda: store.is_alerted(first.id), message="alerted")
        (second, is_new), = store.record([bleed("t2")])
        alerts.notify([second])
        other = [i for i, _ in store.record([bleed("t3", entry_point="/api/runs")])]
        alerts.notify(other)
        wait_until(lambda: len(notified_alerts(receiver)) == 2, timeout=20, message="two alerts")
        alerts.close()
    assert is_new is False
    assert sorted(a["labels"]["entry_point"] for a in notified_alerts(receiver)) == ["/api/runs", "/ws"]
    assert [b["incident"]["entry_point"] for b in webhook.received()] == ["/ws", "/api/runs"]
    assert sent(telemetry, "sent") == 2  # the second occurrence came within the refresh interval
    assert sent(telemetry, "refreshed") == 0


def test_an_incident_that_keeps_firing_stays_active_in_alertmanager_until_after_its_last_finding(
        tmp_path, telemetry):
    # Alertmanager resolves an alert resolve_timeout (5 min) after it was last sent unless told
    # otherwise: pathwatch sends endsAt = last finding + resolve_after_s, and sends it again while
    # findings come (every time here: refresh_every_s=0); the webhook is paged once
    store = IncidentStore(":memory:")
    with Collector() as receiver, Collector() as webhook, \
            alertmanager(tmp_path / "am", receiver.url) as am_url:
        alerts = AlertDispatcher(AlertingConfig(alertmanager_url=am_url, webhook_url=webhook.url,
                                                resolve_after_s=600),
                                 ledger=store, telemetry=telemetry, refresh_every_s=0)
        (first, _), = store.record([bleed("t1")])
        alerts.notify([first])
        wait_until(lambda: sent(telemetry, "sent") == 1 and webhook.received(), message="paged")
        (again, _), = store.record([bleed("t2", at_s=3600)])  # an hour later: a new last finding
        assert again.alerted
        alerts.notify([again])
        wait_until(lambda: sent(telemetry, "refreshed") == 1, message="refreshed")
        (active,) = httpx.get(f"{am_url}/api/v2/alerts").json()
        alerts.close()
    ends = datetime.fromisoformat(active["endsAt"].replace("Z", "+00:00")).timestamp()
    assert ends >= again.last_seen_ns / 1e9 + 600 - 1  # from the last finding, not the first
    assert active["status"]["state"] == "active"
    assert len(webhook.received()) == 1  # one page
    assert len(notified_alerts(receiver)) == 1  # Alertmanager deduplicates: no second page


def test_the_alert_names_the_backend_service_and_stays_one_alert_when_another_service_bleeds(
        tmp_path, telemetry):
    """The incident's fingerprint has no service: its next finding may come from another one. The
    service is an annotation, so the refresh naming it updates the alert Alertmanager has (same
    labels, same alert) instead of making a second one, as a changed label would."""
    store = IncidentStore(":memory:")
    with Collector() as receiver, Collector() as webhook, \
            alertmanager(tmp_path / "am", receiver.url) as am_url:
        alerts = AlertDispatcher(AlertingConfig(alertmanager_url=am_url, webhook_url=webhook.url),
                                 ledger=store, telemetry=telemetry, refresh_every_s=0)
        (first, _), = store.record([bleed("t1", service="checkout")])
        alerts.notify([first])
        (notified,) = wait_until(lambda: notified_alerts(receiver), timeout=20,
                                 message="the page relayed by Alertmanager")
        (again, _), = store.record([bleed("t2", at_s=60, service="billing")])
        alerts.notify([again])
        wait_until(lambda: sent(telemetry, "refreshed") == 1, message="refreshed")
        active = httpx.get(f"{am_url}/api/v2/alerts").json()
        alerts.close()
    assert notified["annotations"]["service_name"] == "checkout"
    assert [body["service_name"] for body in webhook.received()] == ["checkout"]
    (alert,) = active  # one alert: the refresh from another service is no second one
    assert alert["labels"]["incident_id"] == first.id and alert["labels"]["service"] == "pathwatch"
    assert alert["annotations"]["service_name"] == "billing"
    assert "service(s) checkout, billing" in alert["annotations"]["description"]


def test_an_incident_that_recurs_right_after_its_resolve_fires_again_behind_a_refresh_under_way(
        tmp_path, telemetry):
    """PATCH resolves the incident while its refresh is being posted (Alertmanager answers slowly)
    and the bleed recurs at once: the recurrence's refresh is no duplicate of the one under way —
    Alertmanager ends with the incident's last state, firing, as the store says: open."""
    clock, hold = FakeClock(), threading.Event()
    hold.set()
    store = IncidentStore(":memory:")
    with Collector() as receiver, alertmanager(tmp_path / "am", receiver.url) as am_url, \
            Collector(hold=hold, forward=am_url) as proxy:
        alerts = AlertDispatcher(
            AlertingConfig(alertmanager_url=proxy.url.removesuffix("/hook"), resolve_after_s=600),
            ledger=store, telemetry=telemetry, clock=clock, http_timeout_s=30)
        (incident, _), = store.record([bleed("t1")])
        alerts.notify([incident])
        wait_until(lambda: store.is_alerted(incident.id), message="paged")
        hold.clear()  # Alertmanager answers slowly from here on
        clock.advance(REFRESH_EVERY_S)
        alerts.notify([i for i, _ in store.record([bleed("t2")])])
        wait_until(lambda: len(proxy.received()) == 2, message="the refresh under way")
        store.set_status(incident.id, "resolved")  # what PATCH does
        alerts.resolved(store.get(incident.id))
        alerts.notify([i for i, _ in store.record([bleed("t3")])])  # the bleed recurs: reopened
        assert store.get(incident.id).status == "open"
        hold.set()
        wait_until(lambda: alerts.pending() == 0, message="every alert posted")
        in_alertmanager = httpx.get(f"{am_url}/api/v2/alerts").json()
        alerts.close()
    assert [(a["labels"]["incident_id"], a["status"]["state"]) for a in in_alertmanager] == [
        (incident.id, "active")]
    # the resolve still waiting was replaced by the newer state; the last post fires with t3
    assert [ended(body) for body in proxy.received()] == [False, False, False]
    assert "t3" in proxy.received()[-1][0]["annotations"]["description"]
    assert sent(telemetry, "refreshed") == 2 and sent(telemetry, "resolved") == 0


class _ClockAhead:
    """The sinks module's ``time``, with a wall clock ``seconds`` ahead of Alertmanager's."""

    def __init__(self, seconds: float) -> None:
        self._ahead_ns = int(seconds * 1e9)

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time_ns(self) -> int:
        return time.time_ns() + self._ahead_ns


@pytest.mark.parametrize("age_s", [3600, 0])  # an old incident; one younger than the allowance
def test_a_resolve_ends_the_alert_in_an_alertmanager_whose_clock_is_behind(tmp_path, telemetry,
                                                                          monkeypatch, age_s):
    """Alertmanager merges a resolve with the firing alert and keeps the firing alert's later endsAt
    unless the resolve's endsAt has passed by its own clock: with endsAt = now, an Alertmanager
    2 s (or a few ms) behind the sidecar ignored the resolve and the alert fired on for
    resolve_after_s."""
    from sidecar.alerting import sinks

    store = IncidentStore(":memory:")
    finding = bleed("t1")
    finding.detected_ns = time.time_ns() - int(age_s * 1e9)
    (incident, _), = store.record([finding])
    with Collector() as receiver, alertmanager(tmp_path / "am", receiver.url) as am_url, \
            httpx.Client(timeout=5) as client:
        sink = AlertmanagerSink(am_url, client, resolve_after_s=900)
        sink.send(incident)
        assert [a["status"]["state"] for a in httpx.get(f"{am_url}/api/v2/alerts").json()] == [
            "active"]
        monkeypatch.setattr(sinks, "time", _ClockAhead(2.0))
        sink.resolve(incident)  # Alertmanager has merged it when it answers
        monkeypatch.undo()
        in_alertmanager = httpx.get(f"{am_url}/api/v2/alerts").json()
    assert [(a["status"]["state"], a["endsAt"]) for a in in_alertmanager] == []


def test_a_sink_that_is_down_does_not_delay_the_other(tmp_path, telemetry):
    store = IncidentStore(":memory:")
    with Collector() as webhook:
        alerts = AlertDispatcher(
            AlertingConfig(alertmanager_url=f"http://127.0.0.1:{free_port()}", webhook_url=webhook.url,
                           retry_attempts=8, retry_backoff_s=0.5),  # about two minutes of retries
            ledger=store, telemetry=telemetry)
        alerts.notify([i for i, _ in store.record([bleed("t1"), bleed("t2", entry_point="/b")])])
        wait_until(lambda: len(webhook.received()) == 2, message="both pages at the webhook")
        # the down sink's own thread counts its first failed try: it may come after the webhook's
        # pages on a loaded machine (read at once, 0 >= 1 failed); it is still retrying then
        wait_until(lambda: sent(telemetry, "retried") >= 1, message="the down sink's first retry")
        assert sent(telemetry, "failed") == 0
        assert store.is_alerted(bleed().fingerprint)
        alerts.close(timeout=0.1)


def test_an_alertmanager_cluster_gets_every_alert_while_one_instance_is_down(tmp_path, telemetry,
                                                                             caplog):
    """``alertmanager_peers``: as Prometheus, each alert goes to every instance; one that is down
    costs nothing while another takes it (logged once)."""
    store = IncidentStore(":memory:")
    down = f"http://127.0.0.1:{free_port()}"
    with Collector() as receiver, alertmanager(tmp_path / "am", receiver.url) as am_url:
        alerts = AlertDispatcher(
            AlertingConfig(alertmanager_url=down, alertmanager_peers=(am_url,), retry_attempts=0),
            ledger=store, telemetry=telemetry)
        (first, _), = store.record([bleed("t1")])
        (second, _), = store.record([bleed("t2", entry_point="/other")])
        alerts.notify([first, second])
        relayed = wait_until(lambda: len(notified_alerts(receiver)) == 2 and notified_alerts(receiver),
                             timeout=20, message="both alerts relayed by the instance that is up")
        alerts.close()
    assert {a["labels"]["incident_id"] for a in relayed} == {first.id, second.id}
    assert store.is_alerted(first.id, "alertmanager") and store.is_alerted(second.id, "alertmanager")
    assert sent(telemetry, "sent") == 2 and sent(telemetry, "failed") == 0
    assert caplog.text.count("Alertmanager instance http://127.0.0.1:") == 1


def _alerts_by_incident(url: str, expected: int) -> dict[str, dict] | None:
    """The alerts an Alertmanager holds (GET /api/v2/alerts), by incident id: None unless
    ``expected`` of them."""
    held = {a["labels"]["incident_id"]: a for a in httpx.get(f"{url}/api/v2/alerts").json()}
    return held if len(held) == expected else None


def test_an_alertmanager_instance_back_from_a_restart_gets_the_alerts_it_missed(tmp_path, telemetry):
    """An instance down when an alert went out (restarted: an Alertmanager keeps no alerts across a
    restart) got it only with the incident's next finding, if one came: had the instance that took
    it failed meanwhile, the cluster had lost the firing alert. Once it takes an alert, it is sent
    those it missed, each in its last state."""
    store = IncidentStore(":memory:")
    later_port = free_port()
    with Collector() as receiver, alertmanager(tmp_path / "up", receiver.url) as up_url:
        alerts = AlertDispatcher(
            AlertingConfig(alertmanager_url=up_url, alertmanager_peers=(f"http://127.0.0.1:{later_port}",),
                           retry_attempts=0),
            ledger=store, telemetry=telemetry)
        (first, _), = store.record([bleed("t1")])
        alerts.notify([first])
        wait_until(lambda: store.is_alerted(first.id, "alertmanager"), message="paged by the one up")
        sink = alerts.sinks[0]
        wait_until(lambda: not any(sink.pending().values()), message="the down instance's post ended")
        with alertmanager(tmp_path / "restarted", receiver.url, port=later_port) as later_url:
            (second, _), = store.record([bleed("t2", entry_point="/other")])
            alerts.notify([second])
            held = wait_until(lambda: _alerts_by_incident(later_url, 2), timeout=10,
                              message="both alerts in the restarted instance")
            alerts.close()
        taken = _alerts_by_incident(up_url, 2)
    assert held[first.id]["status"]["state"] == "active"
    assert (held[first.id]["startsAt"], held[first.id]["endsAt"]) == (
        taken[first.id]["startsAt"], taken[first.id]["endsAt"])  # the state the other one took
    assert sent(telemetry, "sent") == 2 and sent(telemetry, "failed") == 0


def test_an_alertmanager_instance_that_never_answers_does_not_hold_the_alerts_back_from_the_others(
        telemetry, caplog):
    """The instances are posted to at once, each on its own thread: one that takes connections and
    never answers (packets dropped, a hung process) costs the others nothing — not the client's
    timeout per alert, for this alert nor the next ones."""
    store = IncidentStore(":memory:")
    threads_before = set(threading.enumerate())
    with BlackHole() as hung, Collector() as healthy:
        alerts = AlertDispatcher(  # the hung instance first: a send in turn would wait out its timeout
            AlertingConfig(alertmanager_url=hung.url,
                           alertmanager_peers=(healthy.url.removesuffix("/hook"),), retry_attempts=0),
            ledger=store, telemetry=telemetry, http_timeout_s=30)
        (sink,) = alerts.sinks
        incidents = [incident for incident, _ in store.record(
            [bleed(f"t{n}", entry_point=f"/e{n}") for n in range(5)])]
        alerts.notify(incidents)
        assert hung.requested.wait(10), "the request to the hung instance"
        # every alert is delivered while the hung instance's first request is still open
        wait_until(lambda: sent(telemetry, "sent") == 5, message="the five alerts delivered")
        assert {body[0]["labels"]["incident_id"] for body in healthy.received()} == {
            incident.id for incident in incidents}
        assert sink.pending()[f"{hung.url}/api/v2/alerts"] == 5  # none answered: the first is open
        assert "failed" not in caplog.text
        posting = [thread for thread in set(threading.enumerate()) - threads_before
                   if thread.name.startswith("pathwatch-alertmanager")]
        assert len(posting) == 2  # a thread per instance
    # the hung instance's connection is closed: its posts fail (logged once), the alerts delivered
    wait_until(lambda: not sink.pending()[f"{hung.url}/api/v2/alerts"],
               message="the hung instance's posts ended")
    alerts.close()
    assert all(store.is_alerted(incident.id, "alertmanager") for incident in incidents)
    assert sent(telemetry, "failed") == 0 and sent(telemetry, "instance_skipped") == 0
    assert caplog.text.count(f"Alertmanager instance {hung.url}/… failed") == 1
    for thread in posting:  # they end with the dispatcher
        thread.join(10)
        assert not thread.is_alive()


def test_an_alertmanager_instance_that_never_answers_has_a_bounded_backlog(telemetry, caplog):
    """Alerts in a row reach the healthy instance at once; the hung one keeps at most ``backlog``
    posts (the one under way included) and is skipped beyond, counted and logged once; ``close``
    does not wait for the post under way."""
    threads_before = set(threading.enumerate())
    with BlackHole() as hung, Collector() as healthy, httpx.Client(timeout=30) as client:
        sink = AlertmanagerSink(hung.url, client, peers=(healthy.url.removesuffix("/hook"),),
                                backlog=3, telemetry=telemetry)
        store = IncidentStore(":memory:")
        incidents = [incident for incident, _ in store.record(
            [bleed(f"t{n}", entry_point=f"/e{n}") for n in range(6)])]
        sink.send(incidents[0])
        assert hung.requested.wait(10), "the first request to the hung instance"
        for incident in incidents[1:]:
            sink.send(incident)  # returns once the healthy instance took it
        assert [body[0]["labels"]["incident_id"] for body in healthy.received()] == [
            incident.id for incident in incidents]
        # the first post still open, two waiting behind it, the last three skipped
        assert sink.pending() == {f"{hung.url}/api/v2/alerts": 3, sink.urls[1]: 0}
        assert sent(telemetry, "instance_skipped") == 3
        assert caplog.text.count(f"Alertmanager instance {hung.url}/… has 3 posts waiting") == 1
        assert "failed" not in caplog.text
        sink.close()  # at once, though a post is under way: the two waiting are dropped
        assert sink.pending()[sink.url] == 1
        posting = [thread for thread in set(threading.enumerate()) - threads_before
                   if thread.name.startswith("pathwatch-alertmanager")]
        assert len(posting) == 2
    # the hung instance's connection is closed: its post fails (not logged, the sink is closed)
    wait_until(lambda: not sink.pending()[sink.url], message="the open post ended")
    for thread in posting:
        thread.join(10)
        assert not thread.is_alive()
    assert "failed" not in caplog.text


def test_a_resolve_follows_the_firing_alert_on_each_instance(telemetry):
    """Each instance's posts go out in order: a resolve waits behind the firing alert still being
    posted to a slow instance, while the fast one already has both."""
    hold = threading.Event()
    with Collector(hold=hold) as slow, Collector() as fast, httpx.Client(timeout=30) as client:
        sink = AlertmanagerSink(slow.url.removesuffix("/hook"), client,
                                peers=(fast.url.removesuffix("/hook"),), telemetry=telemetry)
        (incident, _), = IncidentStore(":memory:").record([bleed("t1")])
        try:
            sink.send(incident)  # returns once the fast instance took it
            assert slow.posted.wait(10), "the firing alert reached the slow instance"
            sink.resolve(incident)
            assert [ended(body) for body in fast.received()] == [False, True]
            assert [ended(body) for body in slow.received()] == [False]  # the resolve waits
        finally:
            hold.set()
        wait_until(lambda: len(slow.received()) == 2, message="the resolve at the slow instance")
        assert [ended(body) for body in slow.received()] == [False, True]
        sink.close()
    assert sent(telemetry, "instance_skipped") == 0


def test_a_resolve_is_never_skipped_on_a_slow_instance_with_a_full_backlog(telemetry):
    """The slow instance's backlog is full with the firing alert under way: the resolve waits behind
    it all the same (not skipped) — else that instance would get the firing alert and nothing after,
    and keep the alert the others ended firing until its endsAt."""
    hold = threading.Event()
    with Collector(hold=hold) as slow, Collector() as fast, httpx.Client(timeout=30) as client:
        sink = AlertmanagerSink(slow.url.removesuffix("/hook"), client,
                                peers=(fast.url.removesuffix("/hook"),), backlog=1,
                                telemetry=telemetry)
        (incident, _), = IncidentStore(":memory:").record([bleed("t1")])
        try:
            sink.send(incident)  # the fast instance took it; the slow one's post under way (held)
            assert slow.posted.wait(10), "the firing alert reached the slow instance"
            sink.resolve(incident)  # the fast instance took it; beyond the slow one's backlog
            assert sink.pending()[sink.url] == 2
            assert [ended(body) for body in fast.received()] == [False, True]
        finally:
            hold.set()
        wait_until(lambda: not sink.pending()[sink.url], message="the slow instance drained")
        assert [ended(body) for body in slow.received()] == [False, True]
        sink.close()
    assert sent(telemetry, "instance_skipped") == 0


def test_a_slow_instance_holds_one_waiting_post_per_alert_the_newest(telemetry):
    """A newer post of an alert replaces its post waiting for an instance, where it stands:
    refreshes keep the backlog bounded and a resolve replaces the firing alert; firing alerts with
    nothing waiting are skipped on a full backlog, resolves never; per alert, the instance never
    gets an older state after a newer one."""
    hold = threading.Event()
    with Collector(hold=hold) as slow, Collector() as fast, httpx.Client(timeout=30) as client:
        sink = AlertmanagerSink(slow.url.removesuffix("/hook"), client,
                                peers=(fast.url.removesuffix("/hook"),), backlog=2,
                                telemetry=telemetry)
        store = IncidentStore(":memory:")
        a, b, c = (incident for incident, _ in store.record(
            [bleed(f"t{n}", entry_point=f"/e{n}") for n in range(3)]))
        try:
            sink.send(a)  # under way to the slow instance (held)
            assert slow.posted.wait(10), "the first alert reached the slow instance"
            for _ in range(5):
                sink.send(b)  # the firing alert, then refreshes: one post waits
            assert sink.pending()[sink.url] == 2
            sink.send(c)  # full, and nothing of c waits: skipped
            assert sent(telemetry, "instance_skipped") == 1
            sink.resolve(b)  # replaces b's waiting refresh
            assert sink.pending()[sink.url] == 2
            sink.resolve(c)  # nothing of c waits: beyond the bound, not skipped
            sink.resolve(a)  # a's firing alert is under way: the resolve waits behind it
            assert sink.pending()[sink.url] == 4
            sink.send(b)  # b fires again: replaces its waiting resolve (the newest state wins)
            sink.resolve(b)  # and is resolved again
            assert sink.pending()[sink.url] == 4
            assert sent(telemetry, "instance_skipped") == 1
            assert len(fast.received()) == 12  # the fast instance got every post
        finally:
            hold.set()
        wait_until(lambda: not sink.pending()[sink.url], message="the slow instance drained")
        got = [(body[0]["labels"]["incident_id"], ended(body)) for body in slow.received()]
        assert got == [(a.id, False), (b.id, True), (c.id, True), (a.id, True)]
        sink.close()
    assert sent(telemetry, "instance_skipped") == 1


def test_an_alertmanager_cluster_with_every_instance_down_fails_and_is_retried(telemetry):
    with Collector(statuses=[503, 503]) as first, Collector(statuses=[500, 500]) as second:
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(
            AlertingConfig(alertmanager_url=first.url.removesuffix("/hook"),
                           alertmanager_peers=(second.url.removesuffix("/hook"),),
                           retry_attempts=1, retry_backoff_s=0.01),
            ledger=store, telemetry=telemetry)
        (incident, _), = store.record([bleed("t1")])
        alerts.notify([incident])
        wait_until(lambda: sent(telemetry, "failed") == 1, message="both instances failed twice")
        alerts.close(timeout=0.1)
        assert len(first.received()) == len(second.received()) == 2  # the try and its retry, each
    assert not store.is_alerted(incident.id, "alertmanager")


def send_within(sink: AlertmanagerSink, incident, seconds: float = 10) -> BaseException | None:
    """``sink.send`` on a thread of its own: what it raised (None if nothing), failing the test if it
    has not returned within ``seconds`` (it would block the dispatcher's sink worker)."""
    result: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            sink.send(incident)
        except BaseException as exc:  # noqa: BLE001 (the test looks at it)
            result["raised"] = exc
        else:
            result["raised"] = None

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"send() still blocked after {seconds} s"
    return result["raised"]


def fail_start_of(monkeypatch, name: str, times: int, start=None) -> None:
    """The next ``times`` starts of the thread called ``name`` raise as under thread exhaustion (or
    call ``start`` in place of the real one); a real exhaustion cannot be produced safely."""
    real_start = threading.Thread.start
    left = [times]

    def flaky_start(thread: threading.Thread) -> None:
        if thread.name == name and left[0]:
            left[0] -= 1
            if start is not None:
                return start(thread)
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", flaky_start)


def test_an_alertmanager_instance_whose_thread_could_not_start_starts_it_at_its_next_post(
        telemetry, monkeypatch, caplog):
    """The instance's thread fails to start (can't start new thread): that post fails for it (the
    others still get it), and the next post starts the thread again — the thread that never ran is
    not kept, which left the instance without a poster for good, its posts piling up, and a send whose
    other instances failed blocked for ever."""
    with Collector() as healthy, Collector(statuses=[503] * 100) as down, \
            httpx.Client(timeout=5) as client:
        sink = AlertmanagerSink(healthy.url.removesuffix("/hook"), client,
                                peers=(down.url.removesuffix("/hook"),), telemetry=telemetry)
        store = IncidentStore(":memory:")
        x, y, z = (incident for incident, _ in store.record(
            [bleed(f"t{n}", entry_point=f"/e{n}") for n in range(3)]))
        fail_start_of(monkeypatch, "pathwatch-alertmanager-0", times=1)
        raised = send_within(sink, x)  # its own thread failed, the other instance answers 503
        assert isinstance(raised, RetryableSinkError)
        assert sink.pending()[sink.url] == 0  # the post was taken back
        assert not healthy.received()
        assert send_within(sink, y) is None  # the thread starts this time: the healthy one took it
        assert send_within(sink, z) is None
        assert [body[0]["labels"]["incident_id"] for body in healthy.received()] == [y.id, z.id]
        wait_until(lambda: not any(sink.pending().values()), message="both instances answered")
        sink.close()
    assert caplog.text.count("could not start") == 1


def test_an_error_on_an_instance_thread_fails_that_post_only(telemetry, monkeypatch, caplog):
    """An error of pathwatch's own on an instance's thread (here: handing an answer on) fails the
    post under way for that instance, logged once, and the thread goes on with the next posts — it
    ended, and every later send whose other instances failed blocked for ever."""
    with Collector() as healthy, Collector(statuses=[503] * 100) as down, \
            httpx.Client(timeout=5) as client:
        sink = AlertmanagerSink(healthy.url.removesuffix("/hook"), client,
                                peers=(down.url.removesuffix("/hook"),), telemetry=telemetry)
        instance = sink._instances[0]
        real_answered = instance._answered
        calls = []

        def answered_fails_once(*args) -> None:
            calls.append(args)
            if len(calls) == 1:
                raise KeyError("pathwatch's own bug")
            real_answered(*args)

        monkeypatch.setattr(instance, "_answered", answered_fails_once)
        store = IncidentStore(":memory:")
        x, y = (incident for incident, _ in store.record(
            [bleed(f"t{n}", entry_point=f"/e{n}") for n in range(2)]))
        raised = send_within(sink, x)
        assert isinstance(raised, RetryableSinkError)
        assert "pathwatch's own error: KeyError" in str(raised)  # the first instance's error
        assert send_within(sink, y) is None  # the same thread took the next post
        assert [body[0]["labels"]["incident_id"] for body in healthy.received()] == [x.id, y.id]
        wait_until(lambda: not any(sink.pending().values()), message="both instances answered")
        # the instance's one thread (started once, never replaced) is still there; counting threads
        # by name also counted another test's sink still closing
        assert instance._thread is not None and instance._thread.is_alive()
        sink.close()
    assert caplog.text.count("error on the thread of Alertmanager instance") == 1


def test_a_send_waits_a_bounded_time_for_an_instance_whose_thread_never_runs(
        telemetry, monkeypatch):
    """Whatever keeps an instance from answering (here a thread that never runs), ``send`` fails as a
    timeout once the instance's backlog at the client's timeout has passed, and is retried: the
    dispatcher's sink worker is never blocked for ever."""
    with Collector() as stuck, Collector(statuses=[503] * 100) as down, \
            httpx.Client(timeout=0.1) as client:
        sink = AlertmanagerSink(stuck.url.removesuffix("/hook"), client,
                                peers=(down.url.removesuffix("/hook"),), backlog=1,
                                telemetry=telemetry)
        assert sink.answer_wait_s == 2.0  # (backlog + 1) posts, each at least 1 s
        fail_start_of(monkeypatch, "pathwatch-alertmanager-0", times=1, start=lambda thread: None)
        (incident, _), = IncidentStore(":memory:").record([bleed("t1")])
        started = time.monotonic()
        raised = send_within(sink, incident)
        assert isinstance(raised, RetryableSinkError)
        assert "no Alertmanager instance answered within 2 s" in str(raised)
        assert time.monotonic() - started >= 2.0
        sink.close()


def test_the_wait_for_a_cluster_is_each_instance_backlog_at_the_client_timeout():
    from sidecar.alerting.sinks import UNBOUNDED_POST_S, answer_wait_s
    assert answer_wait_s(httpx.Timeout(5.0), 16) == 17 * 20.0  # connect, write, read, pool
    assert answer_wait_s(httpx.Timeout(5.0, read=30.0), 3) == 4 * 45.0
    assert answer_wait_s(httpx.Timeout(None), 16) == 17 * UNBOUNDED_POST_S
    assert answer_wait_s(httpx.Timeout(5.0, pool=None), 1) == 2 * UNBOUNDED_POST_S


def clock_skew(telemetry):
    return telemetry.registry.get_sample_value("pathwatch_alerts_clock_skew_seconds",
                                               {"sink": "alertmanager"})


def skew_warnings(caplog):
    return [r for r in caplog.records if r.levelname == "WARNING" and "clock of" in r.getMessage()]


def test_a_real_alertmanager_on_the_same_clock_shows_no_skew(tmp_path, telemetry, caplog):
    store = IncidentStore(":memory:")
    (incident, _), = store.record([bleed("t1")])
    with Collector() as receiver, alertmanager(tmp_path / "am", receiver.url) as am_url, \
            httpx.Client(timeout=5) as client:
        sink = AlertmanagerSink(am_url, client, resolve_after_s=900, telemetry=telemetry)
        sink.send(incident)
    skew = clock_skew(telemetry)
    assert skew is not None and abs(skew) < 1.5  # Date's 1 s resolution + the round trip
    assert skew_warnings(caplog) == []


def test_an_alertmanager_20_minutes_behind_is_exported_and_warned_once(tmp_path, telemetry, caplog):
    """A stand-in (http.server) answers with a Date 20 minutes behind: a real Alertmanager's clock
    cannot be moved without moving this machine's. Its pages (endsAt = now + 900 s) would arrive
    there already resolved."""
    store = IncidentStore(":memory:")
    (first, _), = store.record([bleed("t1")])
    (second, _), = store.record([bleed("t2", entry_point="/other")])
    with Collector(clock_offset_s=-1200) as behind, httpx.Client(timeout=5) as client:
        sink = AlertmanagerSink(behind.url.removesuffix("/hook") + "/am?token=s3cret", client,
                                resolve_after_s=900, telemetry=telemetry)
        sink.send(first)
        sink.send(second)
    assert -1202 < clock_skew(telemetry) < -1198
    (warning,) = skew_warnings(caplog)  # once, not at each answer
    message = warning.getMessage()
    assert "alertmanager" in message and "-1200 s" in message and "s3cret" not in message
    assert behind.url.removesuffix("/hook") in message


def test_a_skew_warning_comes_again_only_after_the_clock_was_back_within(tmp_path, telemetry,
                                                                        caplog):
    store = IncidentStore(":memory:")
    (incident, _), = store.record([bleed("t1")])
    with Collector(clock_offset_s=600) as ahead, httpx.Client(timeout=5) as client:
        sink = AlertmanagerSink(ahead.url.removesuffix("/hook"), client, telemetry=telemetry)
        sink.send(incident)
        sink.send(incident)
        assert len(skew_warnings(caplog)) == 1 and 598 < clock_skew(telemetry) < 602
        ahead_offset = 0.0
        ahead._server.RequestHandlerClass.date_time_string = (  # its clock set right
            lambda self, timestamp=None: email.utils.formatdate(time.time() + ahead_offset,
                                                                usegmt=True))
        sink.send(incident)
        assert abs(clock_skew(telemetry)) < 1.5 and len(skew_warnings(caplog)) == 1
        ahead_offset = 600.0
        sink.send(incident)
    assert len(skew_warnings(caplog)) == 2


# --- credentials (alerting.alertmanager_username / _password_env / _bearer_token_env) ----------
def _basic_auth_config(am_url: str, password: str, **more) -> AlertingConfig:
    return AlertingConfig(alertmanager_url=am_url, alertmanager_username="pathwatch",
                          alertmanager_password_env="PW_AM_PASSWORD", **more,
                          ).from_environment({"PW_AM_PASSWORD": password + "\n"})


def test_an_alertmanager_that_requires_basic_auth_gets_the_alert_with_the_password_of_the_variable(
        tmp_path, telemetry, caplog):
    store = IncidentStore(":memory:")
    with Collector() as receiver, alertmanager(tmp_path / "am", receiver.url,
                                               basic_auth_users={"pathwatch": "am-s3cret-pw"}) as am_url:
        assert httpx.post(f"{am_url}/api/v2/alerts", json=[]).status_code == 401  # it does require it
        alerts = AlertDispatcher(_basic_auth_config(am_url, "am-s3cret-pw"), ledger=store,
                                 telemetry=telemetry)
        (incident, _), = store.record([bleed("4bf92f3577b34da6a3ce929d0e0e4736")])
        alerts.notify([incident])
        (alert,) = wait_until(lambda: notified_alerts(receiver), timeout=20,
                              message="alert relayed by an Alertmanager that requires basic auth")
        alerts.close()
    assert alert["labels"]["incident_id"] == incident.id
    assert sent(telemetry, "sent") == 1
    assert "am-s3cret-pw" not in caplog.text


def test_a_wrong_password_is_a_failed_push_not_a_relayed_alert_and_the_password_is_not_logged(
        tmp_path, telemetry, caplog):
    store = IncidentStore(":memory:")
    with Collector() as receiver, alertmanager(tmp_path / "am", receiver.url,
                                               basic_auth_users={"pathwatch": "am-s3cret-pw"}) as am_url:
        alerts = AlertDispatcher(_basic_auth_config(am_url, "not-the-password"), ledger=store,
                                 telemetry=telemetry)
        (incident, _), = store.record([bleed("t-wrong-password")])
        alerts.notify([incident])
        wait_until(lambda: sent(telemetry, "failed") >= 1, timeout=20,
                   message="the 401 counted as a failed push")
        alerts.close()
        assert receiver.received() == []
    assert not store.is_alerted(incident.id)
    assert "HTTP 401" in caplog.text
    assert "not-the-password" not in caplog.text


def test_the_credentials_go_to_every_instance_of_the_cluster_and_never_to_the_webhook(telemetry):
    store = IncidentStore(":memory:")
    # stand-ins that record the header: a real Alertmanager checks basic auth (above) but cannot
    # show what it received, nor check a bearer token (that is an authenticating proxy's job)
    with Collector() as first, Collector() as peer, Collector() as hook:
        base = first.url.removesuffix("/hook")
        config = AlertingConfig(alertmanager_url=base, alertmanager_peers=(peer.url.removesuffix("/hook"),),
                                webhook_url=hook.url, alertmanager_bearer_token_env="PW_AM_TOKEN",
                                ).from_environment({"PW_AM_TOKEN": " tok-123 "})
        alerts = AlertDispatcher(config, ledger=store, telemetry=telemetry)
        (incident, _), = store.record([bleed("t-cluster")])
        alerts.notify([incident])
        wait_until(lambda: first.received() and peer.received() and hook.received(), timeout=20,
                   message="the alert at both instances and the webhook")
        alerts.close()
    assert first.authorizations[0] == peer.authorizations[0] == "Bearer tok-123"
    assert hook.authorizations == [None]
