"""Backend processes killed outright: their heartbeats stop without a final one, and the spans their
exporter still held are a span loss (``process_vanished``), judged on the pipeline's tick.

Found by the s30 consolidation soak (/tmp/s30_cons/soak.py, LOSTCALL=1): a request to the only
caller of a class, SIGKILL of that backend 0.1 s later; the span never reached the sidecar and the
class was ``safe_to_delete`` 28 s after that call with a 40 s window, no loss recorded."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from sidecar.heartbeats import HeartbeatTracker
from sidecar.model import SpanRecord
from sidecar.process_watch import SILENCE_INTERVALS, SILENCE_SLACK_S
from sidecar.telemetry import Telemetry
from tests.sidecar.test_pipeline import LossObserver, batch, make_pipeline, span
from tests.sidecar.receiver.fakes import BlockingDetector
from tests.support import wait_until

S = 10**9
T0 = 1_800_000_000 * S
INTERVAL_S = 2.0
#: silent this long, a process is gone
BOUND_NS = int((SILENCE_INTERVALS * INTERVAL_S + SILENCE_SLACK_S) * S)
VANISHED = "pathwatch_backend_processes_vanished_total"


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


def beat(sequence: int, final: bool | None = False, instance: str = "ns.pod-0.app",
         since_s: float = T0 / S - 60, interval_s: float | None = INTERVAL_S,
         dropped: int = 0) -> SpanRecord:
    return span(kind="heartbeat", service_name="api", service_instance=instance, dropped_spans=dropped,
                instrumentation_errors=0, heartbeat_sequence=sequence, counts_since_s=since_s,
                heartbeat_interval_s=interval_s, heartbeat_final=final)


def vanished(telemetry) -> float:
    return telemetry.registry.get_sample_value(VANISHED, {"service_name": "api"})


def sample(telemetry, name: str, **labels: str) -> float | None:
    return telemetry.registry.get_sample_value(name, {"table": "heartbeats", **labels})


def dropped(telemetry) -> float:
    return telemetry.registry.get_sample_value("pathwatch_backend_dropped_spans_total",
                                               {"service_name": "api"})


class Judge:
    """Ticks the tracker as the pipeline does: often (here every half second of its clock),
    a pause longer than a second being time the sidecar did not watch."""

    def __init__(self, tracker: HeartbeatTracker, now_ns: int = T0) -> None:
        self.tracker = tracker
        self.now_ns = now_ns

    def until(self, end_ns: int) -> list[tuple[int, int]]:
        losses = []
        while self.now_ns < end_ns:
            self.now_ns = min(self.now_ns + S // 2, end_ns)
            lost = self.tracker.tick(self.now_ns)
            if lost is not None:
                losses.append(lost)
        return losses


def test_a_process_that_stops_heartbeating_without_a_final_one_is_a_loss_once(telemetry, caplog):
    """Killed outright: silent for 3 intervals plus the slack, it is gone; the loss runs from its
    last heartbeat less one interval (the spans its exporter held are from after the heartbeat
    before) to the moment it was judged gone. Counted and logged once, never judged again."""
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    judge = Judge(tracker)
    for n in range(1, 4):
        assert judge.until(T0 + n * S) == []
        tracker.observe([beat(n)], T0 + n * S)
    assert vanished(telemetry) == 0  # the series exists from the service's first heartbeat
    last_ns = T0 + 3 * S
    assert judge.until(last_ns + BOUND_NS - 1) == []  # still within the bound
    with caplog.at_level(logging.WARNING, logger="sidecar.heartbeats"):
        assert judge.until(last_ns + BOUND_NS) == [(last_ns - int(INTERVAL_S * S), last_ns + BOUND_NS)]
    assert vanished(telemetry) == 1
    assert sum("without a final heartbeat" in r.getMessage() for r in caplog.records) == 1
    assert judge.until(last_ns + 2 * BOUND_NS) == []  # not twice for one silence
    # a retry of its last export delivers heartbeat 3 again: sent already, nothing new
    tracker.observe([beat(3)], judge.now_ns)
    assert judge.until(last_ns + 4 * BOUND_NS) == []
    assert vanished(telemetry) == 1


def test_a_clean_stop_is_no_loss(telemetry):
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    judge = Judge(tracker)
    tracker.observe([beat(1)], T0)
    assert judge.until(T0 + 2 * S) == []
    tracker.observe([beat(2)], T0 + 2 * S)
    assert judge.until(T0 + 3 * S) == []
    tracker.observe([beat(3, final=True)], T0 + 3 * S)  # the ASGI lifespan shutdown's, the exit's
    assert judge.until(T0 + 10 * BOUND_NS) == []
    assert vanished(telemetry) == 0


def test_a_process_still_heartbeating_is_no_loss(telemetry):
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    judge = Judge(tracker)
    for n in range(1, 50):
        assert judge.until(T0 + n * int(INTERVAL_S * S)) == []
        tracker.observe([beat(n)], judge.now_ns)
    assert vanished(telemetry) == 0


def test_an_older_instrumentations_process_is_not_judged(telemetry):
    """Its heartbeats do not say whether they are final (no attribute): its last one may be a
    clean stop's, so its silence says nothing. Neither does one without a usable interval."""
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    tracker.observe([beat(1, final=None, instance="old")], T0)
    tracker.observe([beat(1, instance="no-interval", interval_s=None)], T0)
    tracker.observe([beat(1, instance="zero", interval_s=0.0)], T0)
    tracker.observe([beat(1, instance="nan", interval_s=float("nan"))], T0)
    assert Judge(tracker).until(T0 + 10 * BOUND_NS) == []


def test_a_restarted_sidecar_judges_no_process_it_has_not_heard(telemetry):
    """The processes the last sidecar heard are unknown to a new one (nothing of this is persisted):
    one killed while no sidecar listened is not judged, nor one whose only heartbeat heard since
    the start is its final one."""
    before = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    before.observe([beat(1)], T0)
    after = HeartbeatTracker(telemetry, started_ns=T0 + 5 * S)  # the restart
    judge = Judge(after, T0 + 5 * S)
    after.observe([beat(2, final=True, instance="ns.pod-1.app")], T0 + 6 * S)
    assert judge.until(T0 + 10 * BOUND_NS) == []
    assert vanished(telemetry) == 0


def test_a_process_heard_again_after_it_was_judged_gone_is_followed_again(telemetry):
    """Stalled (or its heartbeats held up) for longer than the bound: judged gone, the loss stands;
    its next heartbeat says it lives, and a later silence is judged again."""
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    judge = Judge(tracker)
    tracker.observe([beat(1)], T0)
    assert len(judge.until(T0 + BOUND_NS)) == 1
    tracker.observe([beat(2)], T0 + BOUND_NS)
    assert judge.until(T0 + 2 * BOUND_NS - 1) == []
    assert len(judge.until(T0 + 2 * BOUND_NS)) == 1
    assert vanished(telemetry) == 2


def test_time_the_sidecar_did_not_watch_is_no_silence(telemetry):
    """The sidecar frozen (SIGSTOP, a VM suspended) or its pipeline inside one step for long: the
    heartbeats sent meanwhile have not come yet. The pause between two judgements moves every
    deadline on."""
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    tracker.observe([beat(1)], T0)
    assert tracker.vanished(T0 + S) is None
    assert tracker.vanished(T0 + S + 10 * BOUND_NS) is None  # back from a freeze
    judge = Judge(tracker, T0 + S + 10 * BOUND_NS)
    assert judge.until(T0 + 6 * S + 10 * BOUND_NS) == []
    tracker.observe([beat(2)], judge.now_ns)  # its retried heartbeats arrive
    assert judge.until(T0 + 6 * S + 11 * BOUND_NS - 1) == []
    assert vanished(telemetry) == 0
    # silent after that, it is judged by what was watched: a bound after heartbeat 2
    assert len(judge.until(T0 + 6 * S + 11 * BOUND_NS)) == 1


def test_a_process_the_tracker_forgets_is_not_judged(telemetry):
    """The table is bounded: a process it forgets (least recently seen, its capacity reached) is
    followed no more, so the watch is bounded by it too."""
    tracker = HeartbeatTracker(telemetry, max_instances=2, started_ns=T0 - 60 * S)
    for index in range(5):
        tracker.observe([beat(1, instance=f"pod-{index}")], T0 + index)
    assert len(tracker._watch) == 2
    assert len(Judge(tracker).until(T0 + 2 * BOUND_NS)) == 1
    assert vanished(telemetry) == 2  # pod-3 and pod-4 only


#: a stopped process's entry is kept this long after it was (or would have been) judged gone
KEPT_NS = int(HeartbeatTracker.IDLE_PROCESS_S * S)


def test_a_process_that_stopped_cleanly_leaves_the_table_an_hour_after_its_bound(telemetry):
    """Its final heartbeat says it stopped: its entry is kept while heartbeats of it may still come
    (an earlier one an exporter or a Collector retried, overtaken by the final one: sent already,
    nothing new and not followed), then goes as an expiry (``ttl``), not an eviction at capacity:
    an hour after a silent live process would have been judged gone. The table's size says so."""
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    judge = Judge(tracker)
    tracker.observe([beat(1, final=None, instance="older")], T0)  # cannot say it stops: stays
    tracker.observe([beat(1), beat(2, dropped=1)], T0)
    tracker.observe([beat(3, final=True, dropped=1)], T0 + S)
    expires_ns = T0 + S + BOUND_NS + KEPT_NS
    assert judge.until(expires_ns - S) == []
    tracker.observe([beat(2, dropped=1)], judge.now_ns)  # late: sent already
    assert len(tracker._last) == 2 and dropped(telemetry) == 1
    assert sample(telemetry, "pathwatch_state_entries") == 2
    assert judge.until(expires_ns + S) == []  # not followed after the late one: no vanish
    assert vanished(telemetry) == 0
    assert len(tracker._last) == 1
    assert sample(telemetry, "pathwatch_state_entries") == 1
    assert sample(telemetry, "pathwatch_state_evictions_total", reason="ttl") == 1
    assert sample(telemetry, "pathwatch_state_evictions_total", reason="capacity") == 0
    # a heartbeat of it after that is a baseline, not a process whose earlier heartbeats were lost
    assert tracker.observe([beat(2, dropped=1)], judge.now_ns) is None


def test_a_vanished_process_leaves_the_table_an_hour_after_it_was_judged_gone(telemetry):
    """Judged gone, its entry is kept for an hour: heard again meanwhile (it was stalled, its
    heartbeats held up), its totals are still compared with its own (only the rise counts) and it
    is followed again; one that stays silent goes as an expiry."""
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    judge = Judge(tracker)
    tracker.observe([beat(1, dropped=2), beat(1, instance="silent")], T0)
    judged_ns = T0 + BOUND_NS
    assert len(judge.until(judged_ns)) == 1 and vanished(telemetry) == 2
    assert judge.until(judged_ns + KEPT_NS - S) == []
    assert len(tracker._last) == 2
    tracker.observe([beat(2, dropped=3)], judge.now_ns)  # the stalled one is back
    assert dropped(telemetry) == 3
    assert judge.until(judged_ns + KEPT_NS + S) == []
    assert len(tracker._last) == 1 and sample(telemetry, "pathwatch_state_entries") == 1
    assert sample(telemetry, "pathwatch_state_evictions_total", reason="ttl") == 1
    assert len(judge.until(judge.now_ns + BOUND_NS)) == 1  # followed again: its silence judged


def test_at_capacity_a_stopped_process_goes_before_a_live_one(telemetry):
    """The table full, a process known to have stopped (its final heartbeat seen) is forgotten
    before the least recently seen live one: forgetting a live process makes its next heartbeat a
    baseline that counts its totals again, forgetting a stopped one only its late heartbeats'
    protection. Counted as a capacity eviction all the same."""
    tracker = HeartbeatTracker(telemetry, max_instances=3, started_ns=T0 - 60 * S)
    tracker.observe([beat(1, instance="live-a", dropped=1)], T0)
    tracker.observe([beat(1, instance="stopped"), beat(2, instance="stopped", final=True)], T0 + S)
    tracker.observe([beat(1, instance="live-b")], T0 + 2 * S)
    tracker.observe([beat(1, instance="new")], T0 + 3 * S)
    assert {key[1] for key in tracker._last} == {"live-a", "live-b", "new"}
    assert sample(telemetry, "pathwatch_state_evictions_total", reason="capacity") == 1
    before = dropped(telemetry)
    tracker.observe([beat(2, instance="live-a", dropped=1)], T0 + 4 * S)
    assert dropped(telemetry) == before  # its totals compared with its own: nothing new


def test_processes_that_live_on_stay_in_the_table(telemetry):
    """Only stopped processes expire: not one whose interval is longer than the hour, nor one that
    cannot say it stops (an older instrumentation), nor one that serves on after its final
    heartbeat (its periodic beat pauses a minute at most) — each one's next heartbeat counts only
    its rise."""
    tracker = HeartbeatTracker(telemetry, started_ns=T0 - 60 * S)
    judge = Judge(tracker)
    tracker.observe([beat(1, instance="slow", interval_s=7200.0),
                     beat(1, instance="older", final=None),
                     beat(1, instance="serves-on", interval_s=1800.0, final=True)], T0)
    assert judge.until(T0 + 1860 * S) == []
    tracker.observe([beat(2, instance="serves-on", interval_s=1800.0, dropped=1)], judge.now_ns)
    assert judge.until(T0 + 7200 * S) == []
    tracker.observe([beat(2, instance="slow", interval_s=7200.0, dropped=1),
                     beat(2, instance="older", final=None, dropped=1)], judge.now_ns)
    assert dropped(telemetry) == 3  # one each: none was taken for a process first seen
    assert len(tracker._last) == 3 and vanished(telemetry) == 0
    assert sample(telemetry, "pathwatch_state_evictions_total", reason="ttl") == 0


def test_the_pipeline_judges_vanished_processes_on_its_tick(telemetry):
    """Through the path the other losses take: the loss observers (the consolidation ledger) get
    ``process_vanished``, its end the pipeline's clock when judged."""
    clock = [T0]
    observer, blocker = LossObserver(), BlockingDetector()
    blocker.release.set()
    pipeline = make_pipeline(telemetry, [blocker], observers=[observer],
                             wall_clock_ns=lambda: clock[0], monotonic_ns=lambda: clock[0],
                             tick_interval_s=0.01)
    try:
        pipeline.submit(batch(beat(1)))
        pipeline.submit(batch(beat(2)))
        wait_until(lambda: pipeline.processed_spans == 2, message="the heartbeats consumed")
        for _ in range(int(BOUND_NS / (S // 2)) + 2):  # the clock goes on, half a second a step
            clock[0] += S // 2
            wait_until(lambda: pipeline._detectors_ns >= clock[0], message="a tick at that time")
        wait_until(lambda: observer.losses, message="the loss")
    finally:
        assert pipeline.stop(10)
    (loss,) = observer.losses
    assert loss[2] == "process_vanished" and loss[0] <= T0 / S - INTERVAL_S + 0.001 and loss[1] > loss[0]
    assert vanished(telemetry) == 1


def test_a_process_whose_heartbeats_the_receivers_refused_is_not_judged_gone(telemetry):
    """The receivers refusing requests for overload (the memory limiter) longer than the bound:
    the heartbeats of a live process were among them, its exporter retried and gave them up, so
    it was not heard — yet not silent. Judged gone, it paged "killed outright" and dated a loss
    for a process that served on. A refused request may have been any process's heartbeat: a
    process is judged only after a whole bound unheard with no refusal in it, as if heard at the
    last refusal; its silence after that is judged as before."""
    clock = [T0]
    observer, blocker = LossObserver(), BlockingDetector()
    blocker.release.set()
    pipeline = make_pipeline(telemetry, [blocker], observers=[observer],
                             wall_clock_ns=lambda: clock[0], monotonic_ns=lambda: clock[0],
                             tick_interval_s=0.01)

    def step(refuse: bool) -> None:  # the clock goes on half a second, then a tick at that time
        clock[0] += S // 2
        if refuse:
            pipeline.overload_refused()
        wait_until(lambda: pipeline._detectors_ns >= clock[0], message="a tick at that time")

    try:
        pipeline.submit(batch(beat(1)))
        wait_until(lambda: pipeline.processed_spans == 1, message="the heartbeat consumed")
        while clock[0] < T0 + 2 * BOUND_NS:  # refused all along: twice the bound
            step(refuse=True)
        last_refused_ns = clock[0]
        assert observer.losses == [] and vanished(telemetry) == 0
        while clock[0] < last_refused_ns + BOUND_NS - S:  # no refusal, no heartbeat since
            step(refuse=False)
        assert observer.losses == [] and vanished(telemetry) == 0
        while clock[0] < last_refused_ns + BOUND_NS:
            step(refuse=False)
        wait_until(lambda: observer.losses, message="the silence after the refusals judged")
    finally:
        assert pipeline.stop(10)
    assert [loss[2] for loss in observer.losses] == ["process_vanished"]
    assert vanished(telemetry) == 1


def test_a_heartbeat_sent_already_does_not_make_its_process_recently_seen(telemetry):
    """The table forgets the least recently seen process at capacity (or, idle an hour, as an
    expiry). A heartbeat its process sent already (an export retried) is nothing new: it must not
    move that process to the back of the line, where a process heard since would be forgotten in
    its place — and that one's next heartbeat, a baseline, counts its totals again."""
    tracker = HeartbeatTracker(telemetry, max_instances=2, started_ns=T0 - 60 * S)
    tracker.observe([beat(1, instance="quiet"), beat(2, instance="quiet")], T0)
    tracker.observe([beat(1, instance="busy", dropped=1)], T0 + S)
    tracker.observe([beat(1, instance="quiet")], T0 + 2 * S)  # retried: sent already
    tracker.observe([beat(1, instance="new")], T0 + 3 * S)  # at capacity: one is forgotten
    assert {key[1] for key in tracker._last} == {"busy", "new"}
    tracker.observe([beat(2, instance="busy", dropped=1)], T0 + 4 * S)
    assert dropped(telemetry) == 1  # compared with its own last heartbeat: nothing new
