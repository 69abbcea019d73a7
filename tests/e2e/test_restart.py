"""The sidecar process restarted on the same incident store: incidents survive with their counts,
and a bleed seen again after the restart is counted without a second alert.

Alerts go both to a webhook receiver (the sidecar's own pushes, counted exactly) and through a real
Alertmanager (Debian's prometheus-alertmanager, on 127.0.0.1) to a second receiver: the path
sidecar process -> Alertmanager -> webhook. The webhook's URL may come from an environment variable
(alerting.webhook_url_env): the bleed page reaches it, and the URL's secret path stays out of the
config file and the log.
"""

from __future__ import annotations

import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from instrumentation import attributes as A
from sidecar.rules import BLEED_OWNER_VS_AMBIENT, DELIVERY_MISSING_REQUIRED_EVENTS
from sidecar.testing import SidecarProcess
from tests.e2e.fixture_app import instrumented_backend
from tests.e2e.fixture_sidecar import Sidecar
from tests.e2e.rules_scenarios import RULE_CASES, CaseEnv
from tests.sidecar.alerting.servers import Collector, alertmanager
from tests.sidecar.receiver.otlp_payloads import export_order, make_request, run_spans
from tests.support import wait_until

pytestmark = pytest.mark.timeout(180)

CASE = RULE_CASES[BLEED_OWNER_VS_AMBIENT]


def pushes_for(webhook: Collector, incident_id: str) -> list[dict]:
    return [body for body in webhook.received() if body["incident"]["id"] == incident_id]


def relayed_for(receiver: Collector, incident_id: str) -> list[dict]:
    return [alert for body in receiver.received() for alert in body["alerts"]
            if alert["labels"].get("incident_id") == incident_id]


def test_incidents_survive_a_restart_and_are_not_alerted_twice(tmp_path):
    with Collector() as webhook, Collector() as relayed, \
            alertmanager(tmp_path / "am", relayed.url) as alertmanager_url:
        sidecar = Sidecar(tmp_path / "sidecar", rules={"run_idle_s": 0.5},
                          incidents_path=str(tmp_path / "incidents.sqlite"),
                          alerting={"webhook_url": webhook.url, "alertmanager_url": alertmanager_url,
                                    "retry_backoff_s": 0.2})
        with sidecar, instrumented_backend(sidecar.grpc_endpoint, {CASE.case: CASE.handler}) as backend:
            bleed = CaseEnv(backend, CASE.case, positive=True)
            first = CASE.scenario(bleed)
            backend.flush()
            (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT),
                                     timeout=20, message="the bleed incident")
            assert first.trace_id in incident["sample_trace_ids"]
            (push,) = wait_until(lambda: pushes_for(webhook, incident["id"]), timeout=20,
                                 message="the webhook push")
            assert push["incident"]["rule"] == BLEED_OWNER_VS_AMBIENT
            (alert,) = wait_until(lambda: relayed_for(relayed, incident["id"]), timeout=30,
                                  message="the alert relayed by Alertmanager")
            assert alert["labels"]["rule"] == BLEED_OWNER_VS_AMBIENT
            assert alert["labels"]["severity"] == "critical"
            wait_until(lambda: sidecar.incident(incident["id"])["alerted"], message="marked alerted")
            count = sidecar.incident(incident["id"])["count"]

            assert sidecar.stop() == 0, sidecar.log()
            sidecar.start(ready_timeout=30)  # same config: same ports, same store

            survived = sidecar.incident(incident["id"])
            assert (survived["rule"], survived["count"], survived["alerted"]) == (
                BLEED_OWNER_VS_AMBIENT, count, True)
            assert first.trace_id in survived["sample_trace_ids"]

            again = CASE.scenario(bleed)  # the same bug, after the restart
            backend.flush()
            grown = wait_until(lambda: (i := sidecar.incident(incident["id"]))["count"] > count and i,
                               timeout=30, message="the incident counted again after the restart")
            assert again.trace_id in grown["sample_trace_ids"]
            assert sidecar.metric("pathwatch_findings_total", rule=BLEED_OWNER_VS_AMBIENT) >= 1
            # stopping flushes the alert dispatcher: whatever it would have pushed is pushed by now
            assert sidecar.stop() == 0, sidecar.log()
        assert len(pushes_for(webhook, incident["id"])) == 1, "a second alert for the same incident"
        assert [b["incident"]["id"] for b in webhook.received()] == [incident["id"]]
        assert len(relayed_for(relayed, incident["id"])) == 1


def test_the_webhook_url_from_the_environment_gets_the_bleed_page_and_stays_out_of_the_log(tmp_path):
    secret_path = "/services/T0/B0/XXXXWEBHOOKSECRETXXXX"  # a Slack URL's path is its secret
    with Collector() as webhook:
        url = webhook.url.removesuffix("/hook") + secret_path
        sidecar = Sidecar(tmp_path / "sidecar", rules={"run_idle_s": 0.5},
                          alerting={"webhook_url_env": "PW_E2E_WEBHOOK_URL", "retry_backoff_s": 0.2},
                          env={"PW_E2E_WEBHOOK_URL": url + "\n"})  # as a Secret's file often ends
        with sidecar, instrumented_backend(sidecar.grpc_endpoint, {CASE.case: CASE.handler}) as backend:
            CASE.scenario(CaseEnv(backend, CASE.case, positive=True))
            backend.flush()
            (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT),
                                     timeout=20, message="the bleed incident")
            (push,) = wait_until(lambda: pushes_for(webhook, incident["id"]), timeout=20,
                                 message="the webhook push to the URL of PW_E2E_WEBHOOK_URL")
            assert push["incident"]["rule"] == BLEED_OWNER_VS_AMBIENT
            assert sidecar.stop() == 0, sidecar.log()
        assert webhook.paths == [secret_path]
        host = url.removesuffix(secret_path)
        assert f"critical incidents are pushed to webhook {host}/…" in sidecar.log()
        assert "XXXXWEBHOOKSECRETXXXX" not in sidecar.log()
        assert "XXXXWEBHOOKSECRETXXXX" not in sidecar.config_path.read_text()


def test_a_page_that_failed_goes_out_at_the_next_start(tmp_path):
    """The webhook is down for the only try (no retries): the incident is kept unpaged, and the
    restarted sidecar pages it at once — without any new finding."""
    with Collector(statuses=[503]) as webhook:
        sidecar = Sidecar(tmp_path / "sidecar", rules={"run_idle_s": 0.5},
                          incidents_path=str(tmp_path / "incidents.sqlite"),
                          alerting={"webhook_url": webhook.url, "retry_attempts": 0})
        with sidecar, instrumented_backend(sidecar.grpc_endpoint, {CASE.case: CASE.handler}) as backend:
            CASE.scenario(CaseEnv(backend, CASE.case, positive=True))
            backend.flush()
            (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT),
                                     timeout=20, message="the bleed incident")
            wait_until(lambda: sidecar.metric("pathwatch_alerts_sent_total", sink="webhook",
                                              outcome="failed") == 1, message="the failed page")
            assert sidecar.stop() == 0, sidecar.log()
            sidecar.start(ready_timeout=30)
            wait_until(lambda: sidecar.incident(incident["id"])["alerted"], timeout=20,
                       message="paged at the next start")
            assert sidecar.stop() == 0, sidecar.log()
        pushed = [body["incident"]["id"] for body in webhook.received()]
        assert pushed == [incident["id"], incident["id"]]  # the failed try, then the page


def test_an_incident_resolved_through_the_api_is_resolved_in_alertmanager(tmp_path):
    with Collector() as relayed, alertmanager(tmp_path / "am", relayed.url) as alertmanager_url:
        sidecar = Sidecar(tmp_path / "sidecar", rules={"run_idle_s": 0.5},
                          alerting={"alertmanager_url": alertmanager_url})
        with sidecar, instrumented_backend(sidecar.grpc_endpoint, {CASE.case: CASE.handler}) as backend:
            CASE.scenario(CaseEnv(backend, CASE.case, positive=True))
            backend.flush()
            (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT),
                                     timeout=20, message="the bleed incident")

            def firing() -> list[dict]:
                alerts = httpx.get(f"{alertmanager_url}/api/v2/alerts", params={"active": "true"},
                                   timeout=5).json()
                return [alert for alert in alerts
                        if alert["labels"].get("incident_id") == incident["id"]
                        and alert["status"]["state"] == "active"]

            wait_until(firing, timeout=20, message="the alert firing in Alertmanager")
            response = httpx.patch(f"{sidecar.api_url}/api/v1/incidents/{incident['id']}",
                                   json={"status": "resolved"}, timeout=5)
            assert response.status_code == 200 and response.json()["status"] == "resolved"
            wait_until(lambda: not firing(), timeout=20, message="the alert resolved in Alertmanager")
            # Alertmanager shows it resolved once it took the post; the sidecar's sink worker counts
            # it once the answer is back
            wait_until(lambda: sidecar.metric("pathwatch_alerts_sent_total", sink="alertmanager",
                                              outcome="resolved") >= 1, message="the resolve counted")
            assert sidecar.metric("pathwatch_alerts_sent_total", sink="alertmanager",
                                  outcome="resolved") == 1
            assert sidecar.stop() == 0, sidecar.log()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_run_in_flight_across_a_restart_is_not_reported_missing_its_first_events(tmp_path, stop):
    """Found by a soak of the demo stack (the sidecar SIGTERMed, or killed, and started again during
    traffic: 12-19 of 600 runs reported missing agent_started, which every client had received). A
    run's first event went to the sidecar before its restart; the rest of the run, made while no
    sidecar was up, comes from the backend's export queue after the new process started: it
    arrives long after it ended, yet the run began before — on the backend's clock, before the
    first span the new process got from that backend process ended, a process the earlier sidecar
    process got spans of. A run that began afterwards is judged, and so is the first run of a
    backend process started meanwhile (a demo run again on its --state-dir)."""
    config = {"receiver": {"http_endpoint": "127.0.0.1:0", "grpc_endpoint": ""},
              "rules": {"run_idle_s": 0.5, "delivery_deadline_s": 0.5, "delivery_export_allowance_s": 0}}
    rng = random.Random(27)
    in_flight = _of_process(export_order(run_spans(0, rng)), "0a0b0c0d")  # writes, emits, engine, request
    began_later = export_order(run_spans(1_000, rng, users=10**6))  # 1 s later on the backend's clock
    later = _of_process([span for span in began_later if not _of_event(span, began_later, "agent_thinking")],
                        "0a0b0c0d")
    first_of_new = export_order(run_spans(2_000, rng, users=10**6))
    first_of_new = _of_process([span for span in first_of_new
                                if not _of_event(span, first_of_new, "agent_thinking")], "1e1e1e1e")

    def post(sidecar: SidecarProcess, spans: list) -> None:
        response = httpx.post(f"http://{sidecar.http_endpoint}/v1/traces", timeout=10,
                              content=make_request(spans).SerializeToString(),
                              headers={"content-type": "application/x-protobuf"})
        assert response.status_code == 200, response.text

    def runs(sidecar: SidecarProcess, outcome: str) -> float:
        return _sample(sidecar, "pathwatch_runs_completed_total", outcome=outcome)

    with SidecarProcess(config, state_dir=tmp_path) as sidecar:
        post(sidecar, in_flight[:2])  # agent_started: written, then its emit ended
        wait_until(lambda: _sample(sidecar, "pathwatch_events_emitted_total", event_type="agent_started") == 1,
                   message="the first event processed")
        if stop == "SIGKILL":  # before any periodic flush of its ledger (every 5 s)
            sidecar.process.kill()
            sidecar.process.wait()
        else:
            assert sidecar.stop() == 0, sidecar.log()
        sidecar.start(ready_timeout=30)  # the same state: its ledger names the backend process
        # a backend process started meanwhile sends first (the other one's exporter waits out its
        # retry backoff): its first run began before its first span ended, as any first run does
        post(sidecar, first_of_new)
        wait_until(lambda: runs(sidecar, "started_before_sidecar") + runs(sidecar, "missing_events") >= 1,
                   timeout=20, message="the new process's first run judged")
        post(sidecar, in_flight[2:])  # the rest of the run in flight, from the backend's queue
        post(sidecar, later)
        def judged() -> list[dict] | None:
            # the delivery detector counts a run on its tick; the run's finding is recorded after
            # the detectors behind it have ticked (the consolidation ledger's write among them):
            # the findings are read once as many are recorded as runs were counted missing events
            missing = runs(sidecar, "missing_events")
            if runs(sidecar, "started_before_sidecar") + missing < 3:
                return None
            findings = httpx.get(f"{sidecar.api_url}/api/v1/findings", timeout=5).json()["findings"]
            return findings if len(findings) >= missing else None

        findings = wait_until(judged, timeout=20, message="the three runs judged, their findings recorded")
        assert sorted((f["rule"], f["run_id"]) for f in findings) == [
            (DELIVERY_MISSING_REQUIRED_EVENTS, "run-1000"), (DELIVERY_MISSING_REQUIRED_EVENTS, "run-2000")]
        assert (runs(sidecar, "started_before_sidecar"), runs(sidecar, "missing_events")) == (1, 2)
        assert sidecar.stop() == 0, sidecar.log()


def _of_process(spans: list, process: str) -> list:
    """The spans with the instance ids of one backend process's instrumentation, ``i-<process>-<n>``
    (``n``: the builder's own id, unique per instance)."""
    for span in spans:
        for attribute in span.attributes:
            if attribute.key == A.INSTANCE_ID:
                attribute.value.string_value = f"i-{process}-{attribute.value.string_value}"
    return spans


def _of_event(span, spans: list, event_type: str) -> bool:
    """The emit of ``event_type`` or the write inside it."""
    emits = {s.span_id for s in spans if s.name == f"event_emitter.notify_{event_type}"}
    return span.span_id in emits or span.parent_span_id in emits


def _sample(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(sidecar.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_sidecar_killed_after_a_page_keeps_the_incident_and_does_not_page_it_again(tmp_path):
    """SIGKILL (OOM kill, node loss): no shutdown writes anything, so what survives is what each
    write had committed -- the incident, its count and its page -- and the next start neither
    loses the incident nor pages it again, when it recurs or at once (alertable)."""
    with Collector() as webhook:
        sidecar = Sidecar(tmp_path / "sidecar", rules={"run_idle_s": 0.5},
                          incidents_path=str(tmp_path / "incidents.sqlite"),
                          alerting={"webhook_url": webhook.url, "retry_backoff_s": 0.2})
        with sidecar, instrumented_backend(sidecar.grpc_endpoint, {CASE.case: CASE.handler}) as backend:
            bleed = CaseEnv(backend, CASE.case, positive=True)
            first = CASE.scenario(bleed)
            backend.flush()
            (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT),
                                     timeout=20, message="the bleed incident")
            wait_until(lambda: pushes_for(webhook, incident["id"]), timeout=20, message="the push")
            wait_until(lambda: sidecar.incident(incident["id"])["alerted"], message="marked alerted")
            count = sidecar.incident(incident["id"])["count"]

            sidecar.process.kill()
            sidecar.process.wait(10)
            sidecar.start(ready_timeout=30)  # the lock went with the process: no stale lock

            survived = sidecar.incident(incident["id"])
            assert (survived["count"], survived["alerted"]) == (count, True)
            assert first.trace_id in survived["sample_trace_ids"]
            CASE.scenario(bleed)
            backend.flush()
            wait_until(lambda: sidecar.incident(incident["id"])["count"] > count, timeout=30,
                       message="the incident counted again after the restart")
            assert sidecar.stop() == 0, sidecar.log()  # the dispatcher flushed: nothing more owed
        assert len(pushes_for(webhook, incident["id"])) == 1, "paged again after the kill"
