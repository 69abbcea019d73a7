import logging
import threading
import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest

from sidecar.detectors.bleed import BleedDetector
from sidecar.model import Finding, Severity, SpanRecord
from sidecar.heartbeats import HeartbeatTracker
from sidecar.pipeline import Admission, Pipeline
from sidecar.receiver.decode import DecodedBatch
from sidecar.rules import BLEED_OWNER_VS_AMBIENT
from sidecar.telemetry import Telemetry
from tests.sidecar.receiver.fakes import (BlockingDetector, FakeAlerts, FakeIncidents,
                                          RaisingDetector, RecordingDetector)
from tests.sidecar.detectors.factory import Trace, rules, state
from tests.support import wait_until


def span(index: int = 0, **fields) -> SpanRecord:
    return SpanRecord(f"{index:032x}", f"{index + 1:016x}", None, "s", 0, 1, **fields)


def batch(*spans: SpanRecord) -> DecodedBatch:
    return DecodedBatch(list(spans), [s for s in spans if s.kind == "heartbeat"])


def finding(rule="bleed.owner_vs_ambient", severity=Severity.CRITICAL, trace_id="ab" * 16,
            received_ns=1, role="engine") -> Finding:
    return Finding(rule=rule, severity=severity, summary="s", role=role, trace_id=trace_id,
                   received_ns=received_ns)


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


def make_pipeline(telemetry, detectors, *, incidents=None, alerts=None, max_pending=1000, **kw):
    pipeline = Pipeline(detectors=detectors,
                        incidents=FakeIncidents() if incidents is None else incidents,
                        alerts=FakeAlerts() if alerts is None else alerts, telemetry=telemetry,
                        max_pending_spans=max_pending, **kw)
    pipeline.start()
    return pipeline


def value(telemetry, name, **labels):
    return telemetry.registry.get_sample_value(name, labels) or 0.0


def test_every_detector_sees_every_span_even_when_one_raises(telemetry, caplog):
    before, after = RecordingDetector("before"), RecordingDetector("after")
    pipeline = make_pipeline(telemetry, [before, RaisingDetector(), after])
    with caplog.at_level(logging.ERROR, logger="sidecar.pipeline"):
        for index in range(3):
            assert pipeline.submit(batch(span(index))) is Admission.ACCEPTED
        assert pipeline.stop(10)
    assert [s.trace_id for s in before.seen] == [s.trace_id for s in after.seen]
    assert len(after.seen) == 3
    # batches may be merged into one call; the final tick at stop raises too
    assert value(telemetry, "pathwatch_detector_errors_total", detector="raising") >= 2
    assert sum("detector raising raised" in r.getMessage() for r in caplog.records) == 1


class UserKeyedDetector:
    """A detector whose bug is a KeyError on a user's id, as a state table keyed by users raises."""

    name = "user_keyed"

    def consume(self, spans, now_ns):
        users: dict[str, int] = {}
        for record in spans:
            users[record.user] += 1  # KeyError(record.user)
        return []

    def tick(self, now_ns):
        return []


def test_a_detector_error_is_logged_where_it_was_raised_but_never_with_the_data_it_quotes(
        telemetry, caplog):
    pipeline = make_pipeline(telemetry, [UserKeyedDetector()])
    with caplog.at_level(logging.ERROR, logger="sidecar.pipeline"):
        assert pipeline.submit(batch(span(0, user="pseudonym-of-alice"))) is Admission.ACCEPTED
        assert pipeline.stop(10)
    assert value(telemetry, "pathwatch_detector_errors_total", detector="user_keyed") == 1
    (logged,) = [f"{r.getMessage()}\n{r.exc_text}" for r in caplog.records
                 if "user_keyed raised" in r.getMessage()]
    assert "builtins.KeyError (message left out" in logged  # what, and where:
    assert 'test_pipeline.py", line' in logged and "in consume" in logged
    assert "pseudonym-of-alice" not in logged and all(r.exc_info is None for r in caplog.records)


def test_every_detector_error_series_exists_at_zero_before_any_error(telemetry):
    # a series born at its first error is invisible to increase(): the alert on it never fired
    Pipeline(detectors=[RecordingDetector("first"), RaisingDetector()], incidents=FakeIncidents(),
             alerts=FakeAlerts(), telemetry=telemetry, max_pending_spans=10,
             observers=[RecordingObserver("watcher")])
    errors = {sample.labels["detector"]: sample.value for metric in telemetry.registry.collect()
              if metric.name == "pathwatch_detector_errors" for sample in metric.samples
              if sample.name == "pathwatch_detector_errors_total"}
    assert errors == {"first": 0.0, "raising": 0.0, "watcher": 0.0,
                      "pipeline.consume": 0.0, "pipeline.tick": 0.0}


def test_tick_runs_periodically_without_traffic(telemetry):
    detector = RecordingDetector()
    pipeline = make_pipeline(telemetry, [detector], tick_interval_s=0.01)
    wait_until(lambda: detector.ticks >= 3, message="three ticks")
    pipeline.stop(10)


def test_an_incident_whose_write_failed_reaches_the_database_without_another_finding(telemetry,
                                                                                   tmp_path):
    # /tmp/s25_inc/probe_pending_write.py: a write that failed (the database locked a moment by
    # another process) was retried only by the next record(): a quiet sidecar held its bleed in
    # memory alone, for as long as no finding came, and a crash then lost it
    import sqlite3

    from sidecar.incidents import IncidentStore
    from sidecar.incidents.store import WRITE_RETRY_S

    path = str(tmp_path / "incidents.sqlite")
    now = [100.0]
    store = IncidentStore(path, clock=lambda: now[0])
    store._writer.execute("PRAGMA busy_timeout = 0")
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the write fails
    detector = RecordingDetector(findings_for=lambda spans: [finding(trace_id=s.trace_id) for s in spans])
    pipeline = make_pipeline(telemetry, [detector], incidents=store, tick_interval_s=0.01)
    try:
        pipeline.submit(batch(span(1)))
        wait_until(lambda: store.write_errors == 1, message="the first write failed")
        blocker.execute("ROLLBACK")  # let go: no finding comes any more
        now[0] += WRITE_RETRY_S  # the retry is due
        reader = sqlite3.connect(path)
        wait_until(lambda: reader.execute("SELECT count(*) FROM incidents").fetchone()[0] == 1,
                   message="the pending incident written on a tick")
        reader.close()
        assert store.write_errors == 1
    finally:
        pipeline.stop(10)
        blocker.close()
        store.close()


def test_another_process_holding_the_store_lock_stalls_the_pipeline_only_briefly(telemetry,
                                                                                 tmp_path):
    # /tmp/s26_inc/probe_store_stall.py: while another process held the incident database's write
    # lock, the finding's write, and then each retry on a tick, held the pipeline thread for
    # SQLite's busy timeout (5 s): no span was processed meanwhile
    import sqlite3

    from sidecar.incidents import IncidentStore
    from sidecar.incidents.store import MAX_WRITE_RETRY_S

    path = str(tmp_path / "incidents.sqlite")
    now = [100.0]
    store = IncidentStore(path, clock=lambda: now[0])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # held for the whole test
    detector = RecordingDetector(findings_for=lambda spans: [finding(trace_id=s.trace_id) for s in spans])
    pipeline = make_pipeline(telemetry, [detector], incidents=store, tick_interval_s=0.01)
    try:
        started = time.monotonic()
        pipeline.submit(batch(span(1)))  # its finding's write fails
        pipeline.submit(batch(span(2)))
        wait_until(lambda: len(detector.seen) == 2 and store.write_errors >= 1,
                   message="both spans processed")
        assert time.monotonic() - started < 2.0  # before: 5 s
        errors = store.write_errors
        now[0] += MAX_WRITE_RETRY_S  # the retry is due: a tick tries it
        started = time.monotonic()
        wait_until(lambda: store.write_errors == errors + 1, message="the retry on a tick failed")
        pipeline.submit(batch(span(3)))
        wait_until(lambda: len(detector.seen) == 3, message="the next span processed")
        assert time.monotonic() - started < 2.0  # before: 5 s
    finally:
        blocker.execute("ROLLBACK")
        pipeline.stop(10)
        blocker.close()
        assert store.close() is True  # nothing accepted is lost
    reopened = IncidentStore(path)
    assert reopened.get(finding().fingerprint).count == 3
    reopened.close()


def test_findings_go_to_incidents_metrics_and_alerts(telemetry):
    incidents, alerts = FakeIncidents(), FakeAlerts()
    detector = RecordingDetector(
        findings_for=lambda spans: [finding(trace_id=s.trace_id) for s in spans])
    pipeline = make_pipeline(telemetry, [detector], incidents=incidents, alerts=alerts)
    pipeline.submit(batch(span(1)))
    pipeline.submit(batch(span(2)))
    pipeline.stop(10)
    assert len(incidents.recorded) == 2
    assert [i.rule for i in alerts.notified] == ["bleed.owner_vs_ambient"]  # new once, not twice
    labels = dict(rule="bleed.owner_vs_ambient", severity="critical", role="engine",
                  implementation="", entry_point="")
    assert value(telemetry, "pathwatch_findings_total", **labels) == 2
    exposition = generate_latest(telemetry.registry).decode()
    assert f'# {{trace_id="{span(2).trace_id}"}}' in exposition
    assert value(telemetry, "pathwatch_pipeline_latency_seconds_count") == 2


def test_latency_times_findings_raised_as_spans_arrive_not_those_judged_when_a_wait_ends(telemetry):
    # a finding judged on tick (a delivery deadline, an idle run) waited for its rule's setting: from
    # its span's receipt it is seconds old, above every bucket, and pinned the p99 at the top bucket
    long_ago = time.monotonic_ns() - 5 * 10**9
    detector = RecordingDetector(
        findings_for=lambda spans: [finding(trace_id=s.trace_id, received_ns=time.monotonic_ns())
                                    for s in spans],
        tick_findings=[finding(rule="delivery.undelivered", severity=Severity.WARNING,
                               received_ns=long_ago)])
    pipeline = make_pipeline(telemetry, [detector])
    pipeline.submit(batch(span(1)))
    pipeline.stop(10)
    assert value(telemetry, "pathwatch_findings_total", rule="delivery.undelivered", severity="warning",
                 role="engine", implementation="", entry_point="") == 1  # still counted
    assert value(telemetry, "pathwatch_pipeline_latency_seconds_count") == 1
    assert value(telemetry, "pathwatch_pipeline_latency_seconds_bucket", le="1.0") == 1


# The demo (every scenario, 20 users; raw observations recorded in the sidecar) timed findings from
# 2.3 to 54 ms, p50 11 ms, p90 53 ms; the throughput benchmark's p99 is 10-25 ms, its goal 100 ms.
# With edges 2.5 ms apart at best and 2.5x apart at worst (10, 25, 50, 100 ms), histogram_quantile
# read the demo's p99 1.8x high and a narrower run's p50 1.6x high: one observation at 10.1 ms
# counted below 25 ms, one at 51 ms below 100 ms.
def test_a_latency_within_1_ms_to_100_ms_lands_in_a_bucket_at_most_1_3x_above_it(telemetry):
    too_coarse = []
    for latency_s in [0.001 * 1.05 ** step for step in range(95)] + [  # 1 to 100 ms, 5 % apart
            0.0023, 0.0059, 0.0086, 0.0113, 0.0423, 0.0534, 0.0543]:  # the demo's min..max
        before = dict(latency_buckets(telemetry))
        telemetry.pipeline_latency.observe(latency_s)
        landed = min(edge for edge, count in latency_buckets(telemetry) if count > before[edge])
        if landed > 1.3 * latency_s:
            too_coarse.append(f"{latency_s * 1000:.2f} ms in le={landed}")
    assert too_coarse == []


def test_the_pipeline_latency_histogram_keeps_a_reasonable_number_of_buckets_up_to_1_s(telemetry):
    edges = [edge for edge, _ in latency_buckets(telemetry)]
    assert len(edges) <= 30 and 1.0 in edges  # one series each (no labels); 1 s: the e2e bound


def latency_buckets(telemetry: Telemetry) -> list[tuple[float, float]]:
    """(le, cumulative count) of each bucket of pathwatch_pipeline_latency_seconds, +Inf included."""
    return [(float(sample.labels["le"]), sample.value) for metric in telemetry.registry.collect()
            if metric.name == "pathwatch_pipeline_latency_seconds"
            for sample in metric.samples if sample.name.endswith("_bucket")]


def test_disabled_rules_are_dropped(telemetry):
    incidents = FakeIncidents()
    detector = RecordingDetector(findings_for=lambda spans: [
        finding(rule="bleed.shared_instance"), finding(rule="duplicate.execution",
                                                       severity=Severity.WARNING)])
    pipeline = make_pipeline(telemetry, [detector], incidents=incidents,
                             disabled_rules=["bleed.shared_instance"])
    pipeline.submit(batch(span()))
    pipeline.stop(10)
    assert [f.rule for f in incidents.recorded] == ["duplicate.execution"]


def test_only_new_incidents_at_or_above_min_severity_are_alerted(telemetry):
    alerts = FakeAlerts()
    detector = RecordingDetector(findings_for=lambda spans: [
        finding(rule="duplicate.execution", severity=Severity.WARNING),
        finding(rule="duplicate.entry_point_paths", severity=Severity.INFO),
        finding(rule="bleed.owner_vs_ambient", severity=Severity.CRITICAL)])
    pipeline = make_pipeline(telemetry, [detector], alerts=alerts,
                             min_alert_severity=Severity.WARNING)
    pipeline.submit(batch(span()))
    pipeline.stop(10)
    assert sorted(i.rule for i in alerts.notified) == ["bleed.owner_vs_ambient", "duplicate.execution"]


def test_tick_findings_are_handled_too(telemetry):
    incidents = FakeIncidents()
    detector = RecordingDetector(tick_findings=[finding(rule="delivery.undelivered",
                                                        severity=Severity.WARNING)])
    pipeline = make_pipeline(telemetry, [detector], incidents=incidents, tick_interval_s=0.01)
    wait_until(lambda: incidents.recorded, message="a tick finding recorded")
    pipeline.stop(10)
    assert incidents.recorded[0].rule == "delivery.undelivered"


def test_a_failing_incident_sink_does_not_stop_counting(telemetry, caplog):
    detector = RecordingDetector(findings_for=lambda spans: [finding() for _ in spans])
    pipeline = make_pipeline(telemetry, [detector], incidents=FakeIncidents(fail=True))
    with caplog.at_level(logging.ERROR, logger="sidecar.pipeline"):
        pipeline.submit(batch(span(1)))
        pipeline.submit(batch(span(2)))
        pipeline.stop(10)
    assert value(telemetry, "pathwatch_findings_total", rule="bleed.owner_vs_ambient",
                 severity="critical", role="engine", implementation="", entry_point="") == 2
    assert sum("incident sink raised" in r.getMessage() for r in caplog.records) == 1


def test_memory_limiter_refuses_above_the_pending_budget(telemetry):
    blocker = BlockingDetector()
    pipeline = make_pipeline(telemetry, [blocker], max_pending=10)
    assert pipeline.submit(batch(*[span(i) for i in range(6)])) is Admission.ACCEPTED
    assert blocker.entered.wait(10)
    assert pipeline.submit(batch(*[span(i) for i in range(4)])) is Admission.ACCEPTED
    assert pipeline.submit(batch(span(99))) is Admission.OVER_BUDGET
    assert value(telemetry, "pathwatch_receiver_pending_spans") == 10
    blocker.release.set()
    wait_until(lambda: pipeline.pending_spans == 0, message="queue drained")
    assert pipeline.submit(batch(span(99))) is Admission.ACCEPTED
    pipeline.stop(10)
    assert len(blocker.seen) == 11


def test_a_batch_larger_than_the_whole_budget_is_let_in_alone(telemetry):
    blocker = BlockingDetector()
    pipeline = make_pipeline(telemetry, [blocker], max_pending=3)
    assert pipeline.submit(batch(*[span(i) for i in range(5)])) is Admission.ACCEPTED  # queue empty
    assert blocker.entered.wait(10)
    assert pipeline.submit(batch(span(99))) is Admission.OVER_BUDGET  # not beside anything else
    blocker.release.set()
    pipeline.stop(10)
    assert len(blocker.seen) == 5


def test_stop_drains_every_accepted_span_then_refuses(telemetry):
    blocker = BlockingDetector()
    pipeline = make_pipeline(telemetry, [blocker], max_pending=10_000)
    for index in range(50):
        assert pipeline.submit(batch(span(index), span(index + 1000))) is Admission.ACCEPTED
    assert blocker.entered.wait(10)
    stopped = []
    stopper = threading.Thread(target=lambda: stopped.append(pipeline.stop(30)))
    stopper.start()
    wait_until(lambda: pipeline.submit(batch(span())) is Admission.STOPPED, message="refusing")
    blocker.release.set()
    stopper.join(30)
    assert stopped == [True]
    assert len(blocker.seen) == 100 and pipeline.processed_spans == 100


def test_heartbeats_turn_cumulative_totals_into_increments(telemetry):
    tracker = HeartbeatTracker(telemetry)

    def beat(instance, dropped, errors, evicted=None):
        tracker.observe([span(kind="heartbeat", service_name="api", service_instance=instance,
                              dropped_spans=dropped, instrumentation_errors=errors,
                              pending_emits_evicted=evicted)])

    beat("pod-a", 5, 1, 10)
    beat("pod-a", 8, 1, 12)
    beat("pod-b", 2, 0)  # an instrumentation that does not report evicted emits
    beat("pod-a", 3, 4, 1)  # pod-a restarted: its totals start again
    beat("pod-a", -7, 4, 1)  # not a total: ignored, and not taken for a restart either
    beat("pod-a", 3, 4)  # a total missing from one heartbeat keeps its last value
    beat("pod-a", 3, 4, 6)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 8 + 2 + 3
    assert value(telemetry, "pathwatch_backend_instrumentation_errors_total", service_name="api") == 1 + 4
    assert value(telemetry, "pathwatch_backend_pending_emits_evicted_total", service_name="api") == 12 + 6
    assert value(telemetry, "pathwatch_backend_last_heartbeat_timestamp_seconds", service_name="api") > 0


def test_a_services_heartbeat_counters_exist_at_zero_from_its_first_heartbeat(telemetry):
    # a series born at its first increment is invisible to increase(): the alert on it never fired
    tracker = HeartbeatTracker(telemetry)
    names = ("pathwatch_backend_dropped_spans_total", "pathwatch_backend_instrumentation_errors_total",
             "pathwatch_backend_pending_emits_evicted_total")
    assert [telemetry.registry.get_sample_value(name, {"service_name": "api"}) for name in names] == [None] * 3
    tracker.observe([span(kind="heartbeat", service_name="api", service_instance="pod-a",
                          dropped_spans=0, instrumentation_errors=0, pending_emits_evicted=0)])
    assert [telemetry.registry.get_sample_value(name, {"service_name": "api"}) for name in names] == [0.0] * 3
    tracker.observe([span(kind="heartbeat", service_name="api", service_instance="pod-a",
                          dropped_spans=4, instrumentation_errors=0, pending_emits_evicted=0)])
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 4


def test_the_first_heartbeat_of_a_new_backend_process_dates_its_drops(telemetry):
    """A backend restarted alone (OOM-killed) comes back with a new service.instance.id; what its
    exporter dropped before its first heartbeat was a blind baseline, never a loss. A heartbeat
    numbered 1 is the process's first: its total is every drop of its life, a loss from when its
    counts started (at most now) to now. A later number (earlier heartbeats not seen: the sidecar
    started since) and an older instrumentation's heartbeat (no number) stay baselines."""
    now_ns = 1_800_000_100 * 10**9
    tracker = HeartbeatTracker(telemetry, started_ns=now_ns - 5 * 10**9)

    def beat(instance, dropped, sequence=None, since_s=None, at_ns=now_ns):
        return tracker.observe([span(kind="heartbeat", service_name="api", service_instance=instance,
                                     dropped_spans=dropped, instrumentation_errors=0,
                                     heartbeat_sequence=sequence, counts_since_s=since_s)], at_ns)

    assert beat("pod-new", 4, 1, 1_800_000_090.0) == (1_800_000_090 * 10**9, now_ns)
    assert beat("pod-new", 4, 2, 1_800_000_090.0, now_ns + 10**10) is None  # no rise since
    assert beat("pod-clean", 0, 1, 1_800_000_090.0) is None  # nothing dropped
    assert beat("pod-seen-late", 9, 7, 1_800_000_000.0) is None  # its first 6 beats not seen
    assert beat("pod-old-sdk", 9) is None  # no sequence number: a baseline, as before
    assert beat("pod-ahead", 2, 1, 1_800_000_500.0) == (now_ns, now_ns)  # a clock ahead: now
    assert beat("pod-no-since", 2, 1) == (now_ns, now_ns)
    assert beat("pod-nan", 2, 1, float("nan")) == (now_ns, now_ns)


def test_a_backend_restarted_under_the_same_instance_id_is_another_process(telemetry):
    """A backend restarted alone under the same service.instance.id (the OpenTelemetry Operator's
    namespace.pod.container survives a container restart): its counts start anew
    (counts_since_s), so it is another process, whose first heartbeat, numbered 1, counts from zero:
    the spans it dropped are a loss from its start and counted even when its total equals (or
    exceeds) the last process's."""
    now_ns = 1_800_000_000 * 10**9
    tracker = HeartbeatTracker(telemetry, started_ns=now_ns - 60 * 10**9)

    def beat(dropped, sequence, at_s, since_s):
        return tracker.observe([span(kind="heartbeat", service_name="api",
                                     service_instance="ns.pod-0.app", dropped_spans=dropped,
                                     instrumentation_errors=0, heartbeat_sequence=sequence,
                                     counts_since_s=now_ns / 1e9 + since_s)], now_ns + at_s * 10**9)

    assert beat(3, 1, 0, -5) == (now_ns - 5 * 10**9, now_ns)
    assert beat(3, 2, 10, -5) is None
    # restarted: the new process dropped 3 too before its first heartbeat
    assert beat(3, 1, 60, 55) == (now_ns + 55 * 10**9, now_ns + 60 * 10**9)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 6
    assert beat(5, 1, 120, 115) == (now_ns + 115 * 10**9, now_ns + 120 * 10**9)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 11
    assert beat(0, 1, 180, 175) is None  # restarted again, nothing dropped
    assert beat(0, 2, 190, 175) is None


def test_without_the_start_of_its_counts_a_heartbeat_numbered_1_of_an_instance_seen_before_is_a_restart(
        telemetry):
    """A sender that numbers its heartbeats but does not say when its counts started is keyed by
    its instance alone: a heartbeat numbered 1 of an instance seen before is a restart, its totals
    counted from zero, a loss from the previous heartbeat when above zero."""
    tracker = HeartbeatTracker(telemetry)
    now_ns = 1_800_000_000 * 10**9

    def beat(dropped, sequence, at_ns):
        return tracker.observe([span(kind="heartbeat", service_name="api",
                                     service_instance="ns.pod-0.app", dropped_spans=dropped,
                                     instrumentation_errors=0, heartbeat_sequence=sequence)], at_ns)

    beat(3, 1, now_ns)
    assert beat(3, 2, now_ns + 10 * 10**9) is None
    assert beat(3, 1, now_ns + 60 * 10**9) == (now_ns + 10 * 10**9, now_ns + 60 * 10**9)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 6
    assert beat(0, 1, now_ns + 180 * 10**9) is None


def heartbeat(instance, dropped, sequence, since_s, errors=0):
    return span(kind="heartbeat", service_name="api", service_instance=instance,
                dropped_spans=dropped, instrumentation_errors=errors, heartbeat_sequence=sequence,
                counts_since_s=since_s)


def test_processes_sharing_one_instance_id_are_tracked_apart(telemetry):
    """uvicorn --workers 2 (or a gunicorn that loads the app after the fork) with service.instance.id
    set in OTEL_RESOURCE_ATTRIBUTES: both workers report under one id, their heartbeats interleave
    (numbers 1, 1, 2, 2, ...). Each is a process of its own (counts_since_s): its totals are
    compared with its own only — worker B's 2 drops before its first heartbeat are one loss, and
    counted once, not at every heartbeat of B after one of A; a drop of A later is seen as such."""
    now_ns = 1_800_000_000 * 10**9
    tracker = HeartbeatTracker(telemetry, started_ns=now_ns - 60 * 10**9)
    since_a, since_b = now_ns / 1e9 - 30, now_ns / 1e9 - 29.5
    losses = []
    for sequence in (1, 2, 3):
        for instance_since, dropped, errors in ((since_a, 0, 1), (since_b, 2, 0)):
            now_ns += 10**9
            losses.append(tracker.observe(
                [heartbeat("shop.pod-0.app", dropped, sequence, instance_since, errors)], now_ns))
    assert [loss for loss in losses if loss] == [(int(since_b * 1e9), now_ns - 4 * 10**9)]
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 2
    assert value(telemetry, "pathwatch_backend_instrumentation_errors_total", service_name="api") == 1
    a_last_seen_ns = now_ns - 10**9
    now_ns += 10**9
    assert tracker.observe([heartbeat("shop.pod-0.app", 1, 4, since_a)], now_ns) == (
        a_last_seen_ns, now_ns)  # A dropped one since its heartbeat 3
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 3


def test_a_restart_under_the_same_id_whose_first_heartbeat_was_lost_is_a_loss(telemetry):
    """A backend restarted under the same service.instance.id while the sidecar runs, its first
    heartbeat lost (its exporter gave it up): the next, numbered 2, is of a process first seen whose
    counts started while this sidecar watched — everything it dropped is a loss since its start and
    counted, also when its total equals (or exceeds) the old process's."""
    now_ns = 1_800_000_000 * 10**9
    tracker = HeartbeatTracker(telemetry, started_ns=now_ns - 60 * 10**9)
    start_s = now_ns / 1e9
    tracker.observe([heartbeat("ns.pod-0.app", 3, 1, start_s - 50)], now_ns)
    assert tracker.observe([heartbeat("ns.pod-0.app", 3, 2, start_s - 50)], now_ns + 10**10) is None
    at_ns = now_ns + 60 * 10**9
    assert tracker.observe([heartbeat("ns.pod-0.app", 3, 2, start_s + 40)], at_ns) == (
        now_ns + 40 * 10**9, at_ns)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 6
    at_ns = now_ns + 120 * 10**9
    assert tracker.observe([heartbeat("ns.pod-0.app", 5, 3, start_s + 100)], at_ns) == (
        now_ns + 100 * 10**9, at_ns)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 11
    # a process whose counts started before this sidecar did: its earlier heartbeats may have been
    # seen by the last sidecar (the ledger judges it), a baseline here
    assert tracker.observe([heartbeat("ns.pod-1.app", 4, 9, start_s - 70)], at_ns) is None


def test_a_heartbeat_delivered_twice_or_late_is_nothing_new(telemetry):
    """An exporter that retries an export the sidecar had taken sends heartbeat 1 again, and a retried
    heartbeat may come after a later one: a number its process sent already is no restart, no loss
    and counts nothing."""
    now_ns = 1_800_000_000 * 10**9
    tracker = HeartbeatTracker(telemetry, started_ns=now_ns - 60 * 10**9)
    since_s = now_ns / 1e9 - 5
    assert tracker.observe([heartbeat("ns.pod-0.app", 3, 1, since_s)], now_ns) is not None
    assert tracker.observe([heartbeat("ns.pod-0.app", 3, 1, since_s)], now_ns + 10**9) is None
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 3
    assert tracker.observe([heartbeat("ns.pod-0.app", 5, 3, since_s)], now_ns + 2 * 10**9) == (
        now_ns, now_ns + 2 * 10**9)
    assert tracker.observe([heartbeat("ns.pod-0.app", 4, 2, since_s)], now_ns + 3 * 10**9) is None
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 5
    assert tracker.observe([heartbeat("ns.pod-0.app", 6, 4, since_s)], now_ns + 4 * 10**9) == (
        now_ns + 2 * 10**9, now_ns + 4 * 10**9)  # compared with heartbeat 3, not the late 2


def test_a_process_first_heard_after_its_services_first_half_minute_is_a_baseline(telemetry):
    """A restarted sidecar learns each live process's past totals from its first heartbeat; the
    alerts (PathwatchBackendDroppingSpans, ...InstrumentationFaults) skip the first minute of each
    life of a series for that. A process it first hears later (its heartbeats held up: a Collector
    retrying, overload refusals, a heartbeat interval of a minute) whose life it did not watch had
    its whole past totals counted then, as a rise the alert paged on (PathwatchBackendDroppingSpans
    with 500 past drops). Past its service's first 30 s (a 30 s scrape sees what it learned before
    the minute is over) such a process is a baseline: only its rises count. One whose life it
    watched (numbered 1, or its counts started after the sidecar did) counts whole, as before."""
    now_ns = 1_800_000_000 * 10**9
    tracker = HeartbeatTracker(telemetry, started_ns=now_ns)
    past_s = now_ns / 1e9 - 7200
    tracker.observe([heartbeat("pod-0", 300, 50, past_s, errors=2)], now_ns + 10**9)
    tracker.observe([heartbeat("pod-1", 100, 40, past_s + 5)], now_ns + 29 * 10**9)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 400
    at_ns = now_ns + 90 * 10**9
    assert tracker.observe([heartbeat("pod-2", 500, 700, past_s + 9, errors=4)], at_ns) is None
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 400
    assert value(telemetry, "pathwatch_backend_instrumentation_errors_total",
                 service_name="api") == 2
    assert tracker.observe([heartbeat("pod-2", 507, 701, past_s + 9, errors=5)],
                           at_ns + 10**10) == (at_ns, at_ns + 10**10)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 407
    assert value(telemetry, "pathwatch_backend_instrumentation_errors_total",
                 service_name="api") == 3
    # watched whole: a process numbered 1, one started after the sidecar whose first beats were lost
    tracker.observe([heartbeat("pod-3", 6, 1, now_ns / 1e9 + 95)], now_ns + 100 * 10**9)
    tracker.observe([heartbeat("pod-4", 8, 3, now_ns / 1e9 + 80)], now_ns + 100 * 10**9)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 421


def test_a_process_first_heard_late_counts_its_drops_since_the_total_the_ledger_holds(telemetry):
    """Heard past its service's first 30 s, a process whose life the sidecar did not watch is a
    baseline — but the consolidation ledger keeps each process's last dropped-spans total across
    restarts: what it dropped since (while no sidecar listened, or while its heartbeats were held
    up) is counted, so that PathwatchBackendDroppingSpans still pages on it. Its other totals, which
    the ledger does not keep, stay baselines; a lookup that raises is no total (logged once)."""
    now_ns = 1_800_000_000 * 10**9
    held = {("api", "pod-2", now_ns / 1e9 - 7000): 480}
    calls = []

    def held_dropped(service, instance, since_s):
        calls.append(instance)
        if instance == "pod-bad":
            raise RuntimeError("ledger")
        return held.get((service, instance, since_s))

    tracker = HeartbeatTracker(telemetry, started_ns=now_ns, held_dropped=held_dropped)
    tracker.observe([heartbeat("pod-0", 300, 50, now_ns / 1e9 - 7200)], now_ns + 10**9)
    assert calls == []  # heard in its service's first 30 s: whole totals, the ledger not asked
    at_ns = now_ns + 90 * 10**9
    tracker.observe([heartbeat("pod-2", 500, 700, now_ns / 1e9 - 7000, errors=4)], at_ns)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 320
    assert value(telemetry, "pathwatch_backend_instrumentation_errors_total",
                 service_name="api") == 0
    tracker.observe([heartbeat("pod-new-to-it", 40, 9, now_ns / 1e9 - 6000),
                     heartbeat("pod-bad", 60, 9, now_ns / 1e9 - 6000)], at_ns)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 320
    assert calls == ["pod-2", "pod-new-to-it", "pod-bad"]


def test_the_pipeline_hands_its_tracker_the_ledgers_dropped_totals(telemetry):
    """Wired: an observer that keeps the dropped totals (the consolidation detector's ledger) is
    asked for a process the pipeline's tracker first hears late."""
    clock_ns = [1_800_000_000 * 10**9]

    class Ledger(RecordingObserver):
        def heartbeats_seen(self, heartbeats, now_ns):
            pass

        def held_dropped_total(self, service, instance, since_s):
            return 90 if instance == "pod-late" else None

    pipeline = make_pipeline(telemetry, [RecordingDetector()], observers=[Ledger("ledger")],
                             wall_clock_ns=lambda: clock_ns[0],
                             monotonic_ns=lambda: clock_ns[0])
    since_s = clock_ns[0] / 1e9 - 3600
    pipeline.submit(batch(heartbeat("pod-0", 0, 40, since_s)))
    wait_until(lambda: telemetry.registry.get_sample_value(
        "pathwatch_backend_dropped_spans_total", {"service_name": "api"}) is not None)
    clock_ns[0] += 90 * 10**9
    pipeline.submit(batch(heartbeat("pod-late", 100, 40, since_s)))
    pipeline.stop(10)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 10


def test_heartbeat_table_is_bounded(telemetry, caplog):
    """At most max_instances processes: the least recently seen goes, counted — ttl for one idle
    for an hour (a stopped process), capacity (logged once) for a live one — and a forgotten
    process that comes back is a baseline, not a process whose first heartbeats were lost."""
    now_ns = 1_800_000_000 * 10**9
    tracker = HeartbeatTracker(telemetry, max_instances=3, started_ns=now_ns - 10**12)
    start_s = now_ns / 1e9
    tracker.observe([heartbeat("stopped", 0, 1, start_s - 10)], now_ns - 4000 * 10**9)
    with caplog.at_level(logging.WARNING, logger="sidecar.heartbeats"):
        for index in range(10):
            tracker.observe([heartbeat(f"pod-{index}", 1, 2, start_s - 100 + index)], now_ns + index)
    assert len(tracker._last) == 3
    assert value(telemetry, "pathwatch_state_evictions_total", table="heartbeats", reason="ttl") == 1
    assert value(telemetry, "pathwatch_state_evictions_total", table="heartbeats",
                 reason="capacity") == 7
    assert sum("heartbeats" in r.getMessage() for r in caplog.records) == 1
    # pod-0 was forgotten after its heartbeat at now_ns: its counts started before that
    before = value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api")
    assert tracker.observe([heartbeat("pod-0", 5, 3, start_s - 100)], now_ns + 10**10) is None
    # ... and its totals, counted before it was forgotten, are not counted again: a baseline
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == before



def test_heartbeat_table_publishes_its_size_and_capacity(telemetry):
    """Like every bounded state table: pathwatch_state_capacity from the start, and on the tick
    pathwatch_state_entries, so the state panels show it."""
    now_ns = 1_800_000_000 * 10**9
    tracker = HeartbeatTracker(telemetry, max_instances=3, started_ns=now_ns - 10**12)
    assert value(telemetry, "pathwatch_state_capacity", table="heartbeats") == 3
    tracker.observe([heartbeat(f"pod-{index}", 0, 1, now_ns / 1e9 - 10) for index in range(2)],
                    now_ns)
    assert tracker.tick(now_ns) is None
    assert value(telemetry, "pathwatch_state_entries", table="heartbeats") == 2
    for index in range(2, 5):  # two forgotten at capacity
        tracker.observe([heartbeat(f"pod-{index}", 0, 1, now_ns / 1e9 - 10)], now_ns + index)
    assert value(telemetry, "pathwatch_state_entries", table="heartbeats") == 2  # until the tick
    tracker.tick(now_ns + 10**9)
    assert value(telemetry, "pathwatch_state_entries", table="heartbeats") == 3
    assert value(telemetry, "pathwatch_state_evictions_total", table="heartbeats",
                 reason="capacity") == 2

def test_pipeline_feeds_heartbeats_to_the_tracker(telemetry):
    pipeline = make_pipeline(telemetry, [RecordingDetector()])
    pipeline.submit(batch(span(kind="heartbeat", service_name="api", service_instance="p",
                               dropped_spans=7, instrumentation_errors=2)))
    pipeline.stop(10)
    assert value(telemetry, "pathwatch_backend_dropped_spans_total", service_name="api") == 7
    assert value(telemetry, "pathwatch_state_entries", table="heartbeats") == 1  # its tick
    assert value(telemetry, "pathwatch_state_capacity", table="heartbeats") == 10_000


class RecordingObserver:
    def __init__(self, name="observer", fail=False):
        self.name = name
        self.seen: list[Finding] = []
        self._fail = fail

    def observe(self, findings):
        if self._fail:
            raise RuntimeError("observer bug")
        self.seen.extend(findings)


def test_observers_see_kept_findings_and_a_raising_one_is_counted(telemetry):
    detector = RecordingDetector(findings_for=lambda spans: [
        finding(rule="bleed.shared_instance"), finding(rule="duplicate.execution",
                                                       severity=Severity.WARNING)])
    observer, broken = RecordingObserver(), RecordingObserver("broken", fail=True)
    pipeline = make_pipeline(telemetry, [detector], observers=[broken, observer],
                             disabled_rules=["bleed.shared_instance"])
    pipeline.submit(batch(span()))
    pipeline.stop(10)
    assert [f.rule for f in observer.seen] == ["duplicate.execution"]
    assert value(telemetry, "pathwatch_detector_errors_total", detector="broken") == 1


def test_a_bug_in_the_pipelines_own_bookkeeping_is_counted_and_every_span_still_drains(telemetry):
    # a finding the metrics step cannot handle (an unknown severity) makes the pipeline's own step raise
    bad = Finding(rule="bleed.owner_vs_ambient", severity="unknown", summary="s")
    detector = RecordingDetector(findings_for=lambda spans: [bad])
    pipeline = make_pipeline(telemetry, [detector])
    for index in range(3):
        assert pipeline.submit(batch(span(index))) is Admission.ACCEPTED
    assert pipeline.stop(10)
    assert len(detector.seen) == 3 and pipeline.pending_spans == 0
    assert value(telemetry, "pathwatch_detector_errors_total", detector="pipeline.consume") >= 1


def test_finding_labels_are_bounded(telemetry):
    many = [Finding(rule="bleed.owner_vs_ambient", severity=Severity.CRITICAL, summary="s",
                    entry_point=f"/raw/path/{index}") for index in range(600)]
    pipeline = make_pipeline(telemetry, [RecordingDetector(findings_for=lambda spans: many)])
    assert pipeline.submit(batch(span())) is Admission.ACCEPTED
    assert pipeline.stop(10)
    entry_points = {sample.labels["entry_point"] for metric in telemetry.registry.collect()
                    if metric.name == "pathwatch_findings" for sample in metric.samples}
    assert "other" in entry_points and len(entry_points) <= 513


def _findings_series(telemetry) -> dict[tuple[str, str], float]:
    return {(sample.labels["implementation"], sample.labels["entry_point"]): sample.value
            for metric in telemetry.registry.collect() if metric.name == "pathwatch_findings"
            for sample in metric.samples if sample.name == "pathwatch_findings_total"}


def _impl_finding(implementation: str, entry_point: str) -> Finding:
    return Finding(rule="duplicate.retired_invoked", severity=Severity.WARNING, summary="s",
                   role="execution_engine", implementation=implementation, entry_point=entry_point,
                   trace_id="ab" * 16)


def test_finding_series_are_bounded_not_only_each_label(telemetry):
    """Each label within its limit, their product is not: 16 implementations x 16 entry points
    would be 256 series of pathwatch_findings_total. As the inventory's cells (CellCap): past three
    quarters of the cap a new combination's entry point folds into other, past the cap its
    implementation too; every finding is still counted, the folds in pathwatch_findings_overflow,
    and a combination that has its series keeps counting there."""
    every = [_impl_finding(f"m.E{i}", f"/e{j}") for i in range(16) for j in range(16)]
    plan = {f"{0:032x}": every * 2,
            f"{1:032x}": [_impl_finding("m.E0", "/e0"), _impl_finding("m.E1", "/e9")]}
    pipeline = make_pipeline(telemetry, [RecordingDetector(
        findings_for=lambda spans: [f for s in spans for f in plan[s.trace_id]])],
        max_finding_series=16)
    assert pipeline.submit(batch(span(0))) is Admission.ACCEPTED
    wait_until(lambda: pipeline.processed_spans == 1, timeout=10)
    assert pipeline.submit(batch(span(1))) is Admission.ACCEPTED  # after the cap was reached
    assert pipeline.stop(10)
    series = _findings_series(telemetry)
    assert len(series) <= 16 + 1  # + the role's (other, other) series
    assert sum(series.values()) == 2 * 256 + 2
    # the first 12 combinations as they came (E0 at 12 entry points), then E0's other entry points
    # and three more implementations at entry point other; the rest in (other, other)
    assert series[("m.E0", "/e0")] == 2 + 1  # known before the cap: still its own series
    assert series[("m.E0", "other")] == 2 * 4
    assert series[("m.E1", "other")] == 2 * 16 + 1  # E1 at /e9 folded as before
    assert sorted({implementation for implementation, _ in series}) == [
        "m.E0", "m.E1", "m.E2", "m.E3", "other"]
    assert series[("other", "other")] == 2 * 12 * 16
    overflow = {limit: value(telemetry, "pathwatch_findings_overflow_total", limit=limit)
                for limit in ("roles", "implementations", "entry_points", "cells")}
    # counted once per new combination: neither the repeats nor E1 at /e9 again
    assert overflow == {"roles": 0, "implementations": 12 * 16, "entry_points": 256 - 12,
                        "cells": 256 - 12}


def test_the_default_finding_series_cap_keeps_every_implementation():
    """512 implementations of a role, each found at 16 entry points (each label within its limit):
    8192 series before the cap (262,144 with 512 entry points). Now at most MAX_CELLS, and every
    implementation keeps its name (the entry points fold first)."""
    from sidecar.inventory import MAX_CELLS

    telemetry = Telemetry(CollectorRegistry())
    many = [_impl_finding(f"m.Impl{i}", f"/e{j}") for i in range(512) for j in range(16)]
    pipeline = make_pipeline(telemetry, [RecordingDetector(findings_for=lambda spans: many)])
    assert pipeline.submit(batch(span())) is Admission.ACCEPTED
    assert pipeline.stop(10)
    series = _findings_series(telemetry)
    assert len(series) <= MAX_CELLS
    assert sum(series.values()) == 512 * 16
    assert len({implementation for implementation, _ in series}) == 512
    assert value(telemetry, "pathwatch_findings_overflow_total", limit="implementations") == 0
    assert value(telemetry, "pathwatch_findings_overflow_total", limit="cells") > 0


def test_finding_overflow_series_exist_at_zero(telemetry):
    pipeline = make_pipeline(telemetry, [])
    assert pipeline.stop(10)
    for limit in ("roles", "implementations", "entry_points", "cells"):
        assert telemetry.registry.get_sample_value("pathwatch_findings_overflow_total",
                                                   {"limit": limit}) == 0


def test_an_incident_whose_alert_failed_is_offered_again_with_its_next_finding(telemetry):
    from sidecar.alerting import AlertDispatcher
    from sidecar.config import AlertingConfig
    from sidecar.incidents import IncidentStore
    from tests.sidecar.alerting.servers import Collector

    with Collector(statuses=[503, 503]) as flaky:  # down for the first push and its one retry
        store = IncidentStore(":memory:")
        alerts = AlertDispatcher(AlertingConfig(webhook_url=flaky.url, retry_attempts=1,
                                                retry_backoff_s=0.01), ledger=store, telemetry=telemetry)
        pipeline = make_pipeline(telemetry, [RecordingDetector(findings_for=lambda spans: [finding()])],
                                 incidents=store, alerts=alerts)
        pipeline.submit(batch(span(1)))
        wait_until(lambda: value(telemetry, "pathwatch_alerts_sent_total", sink="webhook",
                                 outcome="failed") == 1, message="the first push failed")
        incident = store.get(finding().fingerprint)
        assert incident is not None and not incident.alerted
        pipeline.submit(batch(span(2)))  # the same incident again: offered again, pushed
        wait_until(lambda: store.is_alerted(incident.id), message="alerted on its next finding")
        pipeline.submit(batch(span(3)))  # alerted now: not pushed a second time
        pipeline.stop(10)
        alerts.close()
        assert len(flaky.received()) == 3  # two failed tries, one accepted
        assert store.get(incident.id).count == 3


def test_findings_the_inhibitor_holds_are_let_out_when_the_pipeline_stops(telemetry):
    from sidecar.inhibition import Inhibitor

    incidents = FakeIncidents()
    info = finding(rule="duplicate.entry_point_paths", severity=Severity.INFO)
    pipeline = make_pipeline(telemetry, [RecordingDetector(findings_for=lambda spans: [info])],
                             incidents=incidents, inhibitor=Inhibitor(window_s=3600.0))
    pipeline.submit(batch(span()))
    assert pipeline.stop(10)
    assert [f.rule for f in incidents.recorded] == ["duplicate.entry_point_paths"]


class _VerdictAt:
    """A detector whose tick raises a warning about the info finding's (role, entry point) once the
    wall clock reaches ``at_ns`` (a run judged in the tick where the info finding comes due)."""

    name = "verdict"

    def __init__(self, at_ns: int) -> None:
        self.at_ns = at_ns
        self.raised = False

    def consume(self, spans, now_ns):
        return []

    def tick(self, now_ns):
        if now_ns < self.at_ns or self.raised:
            return []
        self.raised = True
        return [finding(rule="delivery.missing_required_events", severity=Severity.WARNING)]


def test_a_verdict_raised_in_the_tick_an_info_finding_comes_due_inhibits_it(telemetry):
    from sidecar.inhibition import Inhibitor

    window_ns = 1_000_000_000
    clock = [0]
    incidents = FakeIncidents()
    info = finding(rule="duplicate.entry_point_paths", severity=Severity.INFO)
    verdict = _VerdictAt(window_ns)
    pipeline = make_pipeline(telemetry, [RecordingDetector(findings_for=lambda spans: [info]), verdict],
                             incidents=incidents, inhibitor=Inhibitor(window_ns / 1e9, telemetry),
                             wall_clock_ns=lambda: clock[0],
                             monotonic_ns=lambda: clock[0], tick_interval_s=0.01)
    pipeline.submit(batch(span()))
    wait_until(lambda: pipeline.processed_spans == 1, message="the info finding held")
    clock[0] = window_ns  # both due in one tick
    wait_until(lambda: verdict.raised, message="the verdict raised")
    assert pipeline.stop(10)
    assert [f.rule for f in incidents.recorded] == ["delivery.missing_required_events"]
    assert value(telemetry, "pathwatch_findings_inhibited_total",
                 rule="duplicate.entry_point_paths") == 1


class _Holding(RecordingDetector):
    """Holds one finding back until drained (as bleed holds a parented root's verdict)."""

    def drain(self, now_ns):
        return [finding(rule="bleed.span_vs_root_user")]


def test_findings_the_detectors_hold_are_drained_when_the_pipeline_stops(telemetry):
    incidents = FakeIncidents()
    pipeline = make_pipeline(telemetry, [_Holding(), RecordingDetector()], incidents=incidents)
    pipeline.submit(batch(span()))
    assert pipeline.stop(10)
    assert [f.rule for f in incidents.recorded] == ["bleed.span_vs_root_user"]


class _HoldingButTickRaises(_Holding):
    def tick(self, now_ns):
        raise RuntimeError("boom")


def test_held_findings_are_drained_even_when_the_last_tick_raises(telemetry):
    incidents = FakeIncidents()
    pipeline = make_pipeline(telemetry, [_HoldingButTickRaises()], incidents=incidents)
    pipeline.submit(batch(span()))
    assert pipeline.stop(10)
    assert [f.rule for f in incidents.recorded] == ["bleed.span_vs_root_user"]


class LossObserver(RecordingObserver):
    def __init__(self):
        super().__init__("loss")
        self.losses: list[tuple[float, float, str]] = []

    def spans_lost(self, start_s, end_s, reason):
        self.losses.append((start_s, end_s, reason))


def test_dropped_spans_reach_the_loss_observers_refused_batches_do_not(telemetry):
    """A heartbeat whose dropped total rose since the instance's previous one is a loss from that
    previous heartbeat to this one (the first heartbeat of an instance is a baseline: its total
    may be old). Batches the memory limiter refused are no loss: exporters retry them."""
    clock = iter(range(1_000_000_000_000, 10**18, 1_000_000_000))  # one second per reading
    observer, blocker = LossObserver(), BlockingDetector()
    pipeline = make_pipeline(telemetry, [blocker], max_pending=3, observers=[observer],
                             wall_clock_ns=lambda: next(clock), tick_interval_s=3600)

    def beat(dropped: int):
        return batch(span(kind="heartbeat", service_name="api", service_instance="pod-a",
                          dropped_spans=dropped, instrumentation_errors=0))

    assert pipeline.submit(beat(40)) is Admission.ACCEPTED
    assert blocker.entered.wait(10)
    assert pipeline.submit(beat(40)) is Admission.ACCEPTED
    assert pipeline.submit(beat(45)) is Admission.ACCEPTED
    assert pipeline.submit(batch(span(1))) is Admission.OVER_BUDGET
    assert pipeline.submit(batch(span(2))) is Admission.OVER_BUDGET
    blocker.release.set()
    assert pipeline.stop(10)
    dropped = [loss for loss in observer.losses if loss[2] == "spans_dropped"]
    refused = [loss for loss in observer.losses if loss[2] == "spans_refused"]
    assert len(dropped) == 1 and dropped[0][0] <= dropped[0][1]  # 40 -> 40 -> 45: one rise
    assert refused == []


# --- the detectors' clock while the pipeline drains at shutdown ---------------------------------------
def _delivery_behind_a_backlog(telemetry, clock, incidents):
    """A pipeline whose delivery detector has consumed an emit of a run in flight (at ``clock``),
    then is held inside the next batch by a blocking detector: a backlog to drain."""
    from sidecar.config import RulesConfig, StateConfig
    from sidecar.detectors.delivery import DeliveryDetector
    from tests.sidecar.detectors.factory import Trace

    blocker = BlockingDetector()
    blocker.release.set()
    # no export allowance: the emit is due at the deadline (2 s) after its receipt
    rules = RulesConfig(delivery_export_allowance_s=0.0)
    pipeline = make_pipeline(telemetry, [DeliveryDetector(rules, StateConfig()), blocker],
                             incidents=incidents, max_pending=10_000,
                             wall_clock_ns=lambda: clock[0],
                             monotonic_ns=lambda: clock[0], tick_interval_s=0.01)
    trace = Trace(run_id="run-in-flight")
    emit = trace.emit("agent_started")
    assert pipeline.submit(batch(trace.execute(), emit)) is Admission.ACCEPTED
    wait_until(lambda: pipeline.processed_spans == 2, message="the emit consumed")
    blocker.release.clear()
    assert pipeline.submit(batch(span(1))) is Admission.ACCEPTED
    assert blocker.entered.wait(10)
    assert pipeline.submit(batch(*[span(index) for index in range(2, 50)])) is Admission.ACCEPTED
    return pipeline, blocker, trace.deliver(emit)


def test_nothing_comes_due_while_the_pipeline_drains_at_shutdown(telemetry):
    """The emit's write is sent once the receivers refuse spans; the drain lasts longer than the
    rest of the emit's deadline and of the run's idle time: neither is judged for lack of the spans
    the receivers now refuse (before: delivery.undelivered and delivery.missing_required_events)."""
    clock, incidents = [10**18], FakeIncidents()
    pipeline, blocker, write = _delivery_behind_a_backlog(telemetry, clock, incidents)
    clock[0] += 500_000_000  # half a second after the emit, the sidecar stops
    stopper = threading.Thread(target=pipeline.stop, args=(30,))
    stopper.start()
    wait_until(lambda: pipeline.submit(batch(write)) is Admission.STOPPED, message="refusing")
    clock[0] += 3_000_000_000  # the drain takes three seconds
    blocker.release.set()
    stopper.join(30)
    assert not stopper.is_alive() and pipeline.processed_spans == 51
    assert incidents.recorded == []


def test_what_was_due_when_the_intake_closed_is_still_judged_in_the_drain(telemetry):
    clock, incidents = [10**18], FakeIncidents()
    pipeline, blocker, _write = _delivery_behind_a_backlog(telemetry, clock, incidents)
    clock[0] += 2_500_000_000  # past the deadline (2 s) and the run's idle time (1 s), then it stops
    stopper = threading.Thread(target=pipeline.stop, args=(30,))
    stopper.start()
    wait_until(lambda: pipeline.submit(batch(span(99))) is Admission.STOPPED, message="refusing")
    blocker.release.set()
    stopper.join(30)
    assert sorted(f.rule for f in incidents.recorded) == [
        "delivery.missing_required_events", "delivery.undelivered"]
    assert {f.detected_ns for f in incidents.recorded} == {clock[0]}


class _Stalling(BlockingDetector):
    """``BlockingDetector`` whose call, once released, has lasted two tick intervals of real time at
    least: a stall of the pipeline thread (an incident write waiting on the database's lock, a slow
    detector), after which a tick is due before the next batch is taken."""

    def __init__(self, tick_interval_s: float) -> None:
        super().__init__()
        self._hold_s = 2 * tick_interval_s

    def consume(self, spans, now_ns):
        entered = time.monotonic()
        found = super().consume(spans, now_ns)
        time.sleep(max(0.0, entered + self._hold_s - time.monotonic()))  # the stall's length
        return found


def test_a_stall_of_the_pipeline_judges_nothing_that_spans_queued_meanwhile_answer(telemetry):
    """The pipeline thread is held 4 s inside a batch (in the sidecar: an incident write waiting on
    the database's lock, /tmp/s26_pipe/stall_then_tick.py) while the receivers accept the rest of
    a run sent 0.3 s after its start: the emit's write and the run's last event. The tick after the
    stall must not judge the emit undelivered, nor the run idle, before those queued spans are
    consumed (before: delivery.undelivered and delivery.missing_required_events, both false)."""
    from sidecar.config import RulesConfig, StateConfig
    from sidecar.detectors.delivery import DeliveryDetector
    from tests.sidecar.detectors.factory import Trace

    clock, incidents = [10**18], FakeIncidents()
    stall, ticker = _Stalling(tick_interval_s=0.01), RecordingDetector("ticker")
    stall.release.set()
    rules = RulesConfig(required_events=("agent_started", "agent_completed"),
                        delivery_export_allowance_s=0.0)
    pipeline = make_pipeline(telemetry, [DeliveryDetector(rules, StateConfig()), stall, ticker],
                             incidents=incidents, max_pending=10_000,
                             wall_clock_ns=lambda: clock[0], monotonic_ns=lambda: clock[0],
                             tick_interval_s=0.01)
    trace = Trace(run_id="run-in-flight")
    started = trace.emit("agent_started")
    assert pipeline.submit(batch(trace.execute(), started)) is Admission.ACCEPTED
    wait_until(lambda: pipeline.processed_spans == 2, message="the run's first spans consumed")
    stall.release.clear()
    stall.entered.clear()
    assert pipeline.submit(batch(span(1))) is Admission.ACCEPTED
    assert stall.entered.wait(10)
    clock[0] += 300_000_000
    completed = trace.emit("agent_completed")
    assert pipeline.submit(batch(trace.deliver(started), completed, trace.deliver(completed))) is (
        Admission.ACCEPTED)
    clock[0] += 4_000_000_000  # the stall lasts 4 s: past the deadline (2 s) and idle time (1 s)
    stall.release.set()
    wait_until(lambda: pipeline.processed_spans == 6, message="the queued spans consumed")
    _ticks_pass(ticker)
    assert incidents.recorded == []
    # the deadlines still hold: an emit never written is judged once its deadline has passed
    assert pipeline.submit(batch(trace.emit("agent_error"))) is Admission.ACCEPTED
    wait_until(lambda: pipeline.processed_spans == 7, message="the unwritten emit consumed")
    clock[0] += 2_500_000_000
    wait_until(lambda: [f.rule for f in incidents.recorded] == ["delivery.undelivered"],
               message="the unwritten emit judged")
    assert pipeline.stop(10)


# --- the detectors' clock when the host's wall clock steps --------------------------------------------
class _SteppingClock:
    """The host's two clocks, set by the test: the wall clock (stepped by NTP, a VM resumed) and
    the monotonic one (never stepped). A stand-in for time.time_ns / time.monotonic_ns: a real
    clock step cannot be made in a test."""

    def __init__(self, wall_ns: int) -> None:
        self.wall_ns, self.monotonic_ns = wall_ns, 10**12

    def advance(self, ns: int) -> None:
        self.wall_ns += ns
        self.monotonic_ns += ns

    def step(self, ns: int) -> None:
        self.wall_ns += ns


def _real_detectors_with_a_run_in_flight(telemetry, clock, incidents):
    from sidecar.config import RulesConfig, StateConfig
    from sidecar.detectors import build_detectors
    from tests.sidecar.detectors.factory import Trace

    ticker = RecordingDetector("ticker")
    rules = RulesConfig(delivery_export_allowance_s=0.0)  # due at the deadline after receipt
    detectors = [*build_detectors(rules, StateConfig(), telemetry), ticker]
    pipeline = make_pipeline(telemetry, detectors, incidents=incidents, max_pending=10_000,
                             wall_clock_ns=lambda: clock.wall_ns,
                             monotonic_ns=lambda: clock.monotonic_ns, tick_interval_s=0.01)
    trace = Trace(run_id="run-in-flight", start_ns=clock.wall_ns)
    execute, emit = trace.execute(), trace.emit("agent_started")
    assert pipeline.submit(batch(execute, emit)) is Admission.ACCEPTED
    wait_until(lambda: pipeline.processed_spans == 2, message="the run's first spans consumed")
    return pipeline, ticker, trace, emit


def _ticks_pass(ticker, count=5):
    seen = ticker.ticks
    wait_until(lambda: ticker.ticks >= seen + count, message=f"{count} ticks")


def test_a_wall_clock_stepped_forward_judges_nothing_early(telemetry):
    """The host's clock steps 60 s forward half a second into a run (NTP step, VM resumed): the
    deadlines measure elapsed time, so the emit's write and the run's end a moment later are on
    time (before: every pending emit delivery.undelivered, every run in progress
    delivery.missing_required_events, at once). Finding times stay wall times, near the real one."""
    clock, incidents = _SteppingClock(10**18), FakeIncidents()
    pipeline, ticker, trace, emit = _real_detectors_with_a_run_in_flight(telemetry, clock, incidents)
    clock.advance(500_000_000)
    clock.step(60_000_000_000)
    _ticks_pass(ticker)
    assert incidents.recorded == []
    clock.advance(200_000_000)
    assert pipeline.submit(batch(trace.deliver(emit), trace.emit("agent_finished"))) is (
        Admission.ACCEPTED)
    wait_until(lambda: pipeline.processed_spans == 4, message="the write consumed")
    _ticks_pass(ticker)
    assert incidents.recorded == []
    # a second emit is never written: judged once its deadline (2 s) has really passed
    clock.advance(2_500_000_000)
    wait_until(lambda: any(f.rule == "delivery.undelivered" for f in incidents.recorded),
               message="the unwritten emit judged")
    assert pipeline.stop(10)
    for found in incidents.recorded:  # wall time: between the start and the stepped clock
        assert 10**18 < found.detected_ns <= clock.wall_ns


def test_a_wall_clock_stepped_back_does_not_stall_the_deadlines(telemetry):
    """The host's clock steps 60 s back: an emit never written is still judged once its deadline
    has passed (before: not until the clock was back where it was, a minute later)."""
    clock, incidents = _SteppingClock(10**18), FakeIncidents()
    pipeline, ticker, _trace, _emit = _real_detectors_with_a_run_in_flight(telemetry, clock,
                                                                           incidents)
    clock.step(-60_000_000_000)
    clock.advance(3_000_000_000)  # past the deadline (2 s) and the run's idle time (1 s)
    wait_until(lambda: {f.rule for f in incidents.recorded} >= {
        "delivery.undelivered", "delivery.missing_required_events"}, message="both judged")
    assert pipeline.stop(10)


def test_the_pipeline_clock_follows_the_wall_clock_gradually_and_never_goes_back():
    from sidecar.pipeline import PipelineClock

    clock = _SteppingClock(10**18)
    pipeline_clock = PipelineClock(lambda: clock.wall_ns, lambda: clock.monotonic_ns)
    clock.advance(1_000_000_000)
    assert pipeline_clock() == clock.wall_ns  # no step: the wall clock exactly
    clock.step(60_000_000_000)
    clock.advance(1_000_000_000)
    assert pipeline_clock() == clock.wall_ns - 60_000_000_000 + 50_000_000  # 5 % of 1 s caught up
    for _ in range(1200):  # 20 min: the step caught up
        clock.advance(1_000_000_000)
        pipeline_clock()
    assert pipeline_clock() == clock.wall_ns
    clock.step(-60_000_000_000)
    readings = []
    for _ in range(10):
        clock.advance(100_000_000)
        readings.append(pipeline_clock())
    assert readings == sorted(readings) and readings[-1] - readings[0] == 9 * 95_000_000


def test_a_detector_raising_on_one_request_of_a_merged_call_costs_only_that_requests_spans(
        telemetry, caplog):
    """Queued batches are merged into one detector call: a detector that raises on a span of one
    request must not lose the other requests' findings (those before the span, raised already, and
    those after it, never reached), nor see any span twice."""
    bleed = BleedDetector(rules(), state())
    a, b, c = (Trace(user="user-a") for _ in range(3))
    on_request = bleed._on_request

    def on_request_raising_for_b(span, now_ns, findings):
        if span.trace_id == b.trace_id:
            raise RuntimeError("a bug met by one span")
        on_request(span, now_ns, findings)

    bleed._on_request = on_request_raising_for_b  # a real detector with a bug on one span
    blocker, incidents, calls = BlockingDetector(), FakeIncidents(), []
    sizes = RecordingDetector("sizes", findings_for=lambda spans: calls.append(len(spans)) or [])
    pipeline = make_pipeline(telemetry, [blocker, sizes, bleed], incidents=incidents)
    assert pipeline.submit(batch(span(0))) is Admission.ACCEPTED
    assert blocker.entered.wait(10)  # the pipeline thread is held: the next three queue up
    before, after = a.execute(owner="user-b"), c.execute(owner="user-b")
    b_before, b_after = b.execute(owner="user-b"), b.execute(owner="user-b")
    with caplog.at_level(logging.ERROR, logger="sidecar.pipeline"):
        for spans in ([before], [b_before, b.request(), b_after], [after]):
            assert pipeline.submit(batch(*spans)) is Admission.ACCEPTED
        blocker.release.set()
        assert pipeline.stop(10)
    assert calls == [1, 5]  # the three batches went in one call
    owner = [f.span_id for f in incidents.recorded if f.rule == BLEED_OWNER_VS_AMBIENT]
    # b's span after the one that raised is lost, as it would be in a call of its own; no span twice
    assert sorted(owner) == sorted([before.span_id, b_before.span_id, after.span_id])
    assert value(telemetry, "pathwatch_detector_errors_total", detector="bleed") == 1
    assert sum("detector bleed raised" in r.getMessage() for r in caplog.records) == 1


class _Killed(BaseException):
    """Not an ``Exception``: nothing in the pipeline catches it (SystemExit from a library)."""


class _DiesInTick:
    name = "dies_in_tick"

    def consume(self, spans, now_ns):
        return []

    def tick(self, now_ns):
        raise _Killed()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_pipeline_thread_that_ended_in_a_tick_with_nothing_pending_is_no_clean_drain(telemetry):
    """The thread ended before ``stop`` with no span in hand: the last tick, which judges what the
    detectors held back, never ran. It was reported drained (exit code 0, no error at shutdown)."""
    pipeline = make_pipeline(telemetry, [_DiesInTick()], tick_interval_s=0.01)
    pipeline.thread.join(10)
    assert pipeline.ended and pipeline.pending_spans == 0
    assert pipeline.stop(10) is False


def test_the_data_path_docs_draw_the_steps_findings_take_in_their_order():
    """docs/sidecar.md's diagram drew findings -> incident store -> metrics -> alerts, leaving out the
    inhibitor that holds info findings and the observers (the deploy detector) that get every kept
    finding: each step of ``Pipeline._handle``, in the order it runs, is in the diagram in that order."""
    import inspect
    from pathlib import Path

    steps = [("self._disabled", "rules.disabled"), ("self._inhibitor.admit(", "inhibitor"),
             ("self._record(", "incident store"), ("self._count(", "metrics"),
             ("observer.observe(", "finding observers"), ("self._notify(", "alerts")]
    code = inspect.getsource(Pipeline._handle)
    assert [code.index(call) for call, _ in steps] == sorted(code.index(call) for call, _ in steps)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "sidecar.md").read_text()
    section = docs[docs.index("## The data path"):]
    start = section.index("```")
    diagram = section[start:section.index("```", start + 3)]
    drawn = diagram[diagram.index("findings"):]
    positions = [drawn.find(label) for _, label in steps]
    assert -1 not in positions and positions == sorted(positions), dict(zip([s[1] for s in steps], positions))


# --- overload refusals reach the detectors that wait for spans ---------------------------------------
class _RefusalRecorder(RecordingDetector):
    """Records the refusals it is told of and the times of its ticks, in order."""

    def __init__(self):
        super().__init__("refusals")
        self.events: list[tuple] = []

    def requests_refused(self, first_ns, last_ns):
        self.events.append(("refused", first_ns, last_ns))

    def tick(self, now_ns):
        self.events.append(("tick", now_ns))
        return super().tick(now_ns)


def _ticked_at(recorder, now_ns):
    return any(event[0] == "tick" and event[1] >= now_ns for event in list(recorder.events))


@pytest.mark.parametrize("refused", [True, False], ids=["refused", "not_refused"])
def test_an_overload_refusal_reaches_the_delivery_detector_which_waits_for_the_retry(refused,
                                                                                    telemetry):
    """The overload soak: a write refused for overload and accepted on a retry, 5 s after its
    emit's deadline, found the event judged delivery.undelivered. The receivers tell the pipeline
    of each refusal (``overload_refused``), and it tells the delivery detector."""
    from sidecar.detectors.delivery import DeliveryDetector

    S = 1_000_000_000
    clock = [1_000 * S]
    start = clock[0]
    incidents, recorder = FakeIncidents(), _RefusalRecorder()
    delivery = DeliveryDetector(rules(delivery_deadline_s=2.0), state(), telemetry)
    pipeline = make_pipeline(telemetry, [delivery, recorder], incidents=incidents,
                             wall_clock_ns=lambda: clock[0], monotonic_ns=lambda: clock[0],
                             tick_interval_s=0.01)
    trace = Trace()
    emit = trace.emit("agent_thinking")
    write = trace.deliver(emit)
    pipeline.submit(batch(emit))
    wait_until(lambda: pipeline.processed_spans == 1, message="the emit consumed")
    clock[0] = start + 1 * S
    if refused:
        pipeline.overload_refused()  # the write's request, refused; its exporter retries it
    clock[0] = start + 6 * S  # past the deadline (2 s)
    wait_until(lambda: _ticked_at(recorder, start + 6 * S), message="a tick past the deadline")
    pipeline.submit(batch(write))  # the retry, accepted
    wait_until(lambda: pipeline.processed_spans == 2, message="the write consumed")
    clock[0] = start + 60 * S
    wait_until(lambda: _ticked_at(recorder, start + 60 * S), message="a tick a minute on")
    assert pipeline.stop(10)
    if refused:
        assert ("refused", start + 1 * S, start + 1 * S) in recorder.events
        assert [f.rule for f in incidents.recorded] == []
    else:
        assert [f.rule for f in incidents.recorded] == ["delivery.undelivered"]


def test_refusals_are_told_before_the_batch_that_follows_them_and_not_once_the_intake_closed(
        telemetry):
    clock = [5_000]
    recorder = _RefusalRecorder()
    consumed = []
    recorder.consume = lambda spans, now_ns: consumed.append(len(recorder.events)) or []
    pipeline = make_pipeline(telemetry, [recorder], wall_clock_ns=lambda: clock[0],
                             monotonic_ns=lambda: clock[0], tick_interval_s=3600)
    clock[0] = 6_000
    pipeline.overload_refused()
    clock[0] = 7_000
    pipeline.overload_refused()
    clock[0] = 8_000
    pipeline.submit(batch(span()))
    wait_until(lambda: pipeline.processed_spans == 1, message="the batch consumed")
    # once, as one stretch, before the batch that followed them
    assert recorder.events == [("refused", 6_000, 7_000)] and consumed == [1]
    pipeline.close_intake()
    clock[0] = 9_000
    pipeline.overload_refused()  # shutting down: retried at the next sidecar, not here
    assert pipeline.stop(10)
    assert [event for event in recorder.events if event[0] == "refused"] == [("refused", 6_000, 7_000)]
    assert recorder.events[-1][0] == "tick"  # the last tick ran, told nothing more


def test_a_heartbeat_tracker_error_does_not_keep_the_batch_from_the_detectors(telemetry, monkeypatch):
    """The tracker is the pipeline's own bookkeeping, run before the detectors: when it raised,
    the whole batch (merged batches too) reached no detector — the consolidation ledger lost the
    calls in it without a span loss, a class whose only call was there read safe_to_delete. It is
    counted as the consume step's error and the detectors get the spans."""
    recording = RecordingDetector()
    pipeline = make_pipeline(telemetry, [recording])
    monkeypatch.setattr(pipeline._heartbeats, "observe", lambda *args: 1 / 0)
    call = span(1, kind="execute", role="engine", implementation="app.Legacy")
    pipeline.submit(batch(span(kind="heartbeat", service_name="api", service_instance="p",
                               dropped_spans=0), call))
    assert pipeline.stop(10)
    assert [s.span_id for s in recording.seen if s.kind == "execute"] == [call.span_id]
    assert value(telemetry, "pathwatch_detector_errors_total", detector="pipeline.consume") == 1
