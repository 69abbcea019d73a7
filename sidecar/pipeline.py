"""The pipeline: decoded batches -> every detector -> findings -> incidents, metrics, alerts.

Receiver threads only decode and ``submit``; one pipeline thread does everything else, so detectors
and sinks need no locks. The queue between them is bounded in spans (the memory limiter): a batch
that would take it over ``max_pending_spans`` is refused, and the receiver says so to the client
(RESOURCE_EXHAUSTED / HTTP 429) — refused and counted, never a silent growth. Spans once accepted are
always processed: ``stop`` refuses new batches, then drains the queue before the thread ends.

Span loss the sidecar knows of — a heartbeat whose dropped-spans total rose since that backend
process's previous one (a process: its ``service.instance.id`` and the start of its counts, as
several may share an id), or the first heartbeat seen of a process whose life this sidecar watched
(numbered 1, or started after this sidecar) with a total above zero (``sidecar.heartbeats.HeartbeatTracker``), or a
process whose heartbeats stopped without a final one (killed outright: ``process_watch``, judged
on the tick) — is handed to the observers that have ``spans_lost``
(``SpanLossObserver``: the consolidation ledger, whose verdicts must not count that time as evidence
of no calls), as (from, to) wall-clock seconds and a reason. Batches the memory limiter refuses are
no loss: exporters retry them. Observers with ``heartbeats_seen`` (``HeartbeatObserver``) get the
heartbeat spans too: the ledger persists each process's dropped total, which this pipeline's
baselines (the first heartbeat of a process after a start) do not survive. Detectors and
observers with ``requests_refused`` (``RefusalObserver``) are told when the receivers refused
requests for overload (``overload_refused``; on the pipeline's clock, before the next batch or
tick): the delivery, duplicates and bleed detectors' timed judgements wait for those requests'
retries (see their docstrings), and so does the heartbeat tracker's judgement of processes gone.

Detectors are fed independently: one that raises is counted in ``pathwatch_detector_errors`` and
logged once; the others still see the batch. Batches queued meanwhile are merged into one call per
detector; one that says which span it raised on (``ConsumeInterrupted``) keeps the findings it had
raised and is fed again each batch after that span's, alone: the error costs one request's spans,
not those merged with it. ``now_ns`` given to detectors is the pipeline's
clock (``PipelineClock``): wall-clock ns, comparable with span timestamps and shown / persisted as
such, but advancing with the monotonic clock, so a step of the host's wall clock (NTP, a VM resumed)
does not age every deadline, idle time and TTL at once (or stall them): it is caught up at most 5 %
of the elapsed time. The clock is read once per batch and per tick, never per span.
``SpanRecord.received_ns`` and ``Finding.received_ns`` are monotonic, for the receipt-to-finding
latency. ``now_ns`` is no later than the moment the oldest batch still queued was accepted: every
span accepted before it has reached the detectors, so a deadline or idle time judged by then was
judged on every span that could meet it, also after a stall of the pipeline thread (a backlog
accepted meanwhile is consumed before it counts as time passed). Once the receivers take no more
spans (``close_intake``, or ``stop``), ``now_ns`` stays at that moment while the queue drains: a
deadline or idle time that would end during the drain cannot be met by spans that the receivers now
refuse (the exporters send them to the next sidecar), so it is not judged.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter

from sidecar.heartbeats import HeartbeatTracker
from sidecar.inhibition import Inhibitor
from sidecar.inventory import (MAX_CACHED_KEYS, MAX_CELLS, MAX_ENTRY_POINTS, MAX_IMPLEMENTATIONS,
                               MAX_ROLES)
from sidecar.logsetup import log_error_scrubbed
from sidecar.model import Finding, Incident, Severity, SpanRecord
from sidecar.process_watch import PROCESS_VANISHED
from sidecar.state import BoundedLabels, CellCap
from sidecar.telemetry import Telemetry
from sidecar.threads import WatchedThread, name_os_thread
from sidecar.types import AlertSink, ConsumeInterrupted, Detector, FindingObserver, IncidentSink

if TYPE_CHECKING:  # the receiver imports this module, not the other way round
    from sidecar.receiver.decode import DecodedBatch

log = logging.getLogger(__name__)

_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}
#: batches merged into one detector call when the queue is backed up (fewer calls, same spans)
_MAX_MERGED_SPANS = 8192
#: the limit label of pathwatch_findings_overflow: each label's limit, and the series cap
FINDINGS_OVERFLOW_LIMITS = ("roles", "implementations", "entry_points", "cells")
#: the pipeline's own steps, counted in pathwatch_detector_errors as ``pipeline.<stage>``
_CONSUME, _TICK = "consume", "tick"
_STAGES = (_CONSUME, _TICK)
#: a step of the pipeline thread (a batch, a tick) that has run this long means the thread is stuck
STALLED_AFTER_S = 10.0


def _component_name(component: object) -> str:
    """The ``detector`` label of a detector or observer."""
    return getattr(component, "name", type(component).__name__)


class PipelineClock:
    """Wall-clock ns that measure elapsed time like the monotonic clock.

    Detectors compare ``now_ns`` with times they took from it earlier (deadlines, idle times, holds,
    TTLs) and, where a span's time must not lie ahead of now, with the backend's wall clock; findings,
    incidents and the ledger show and persist it as a wall time. The host's wall clock may step (an
    NTP step, a VM migrated or resumed): taken as is, a step forward would age every deadline at once
    (every pending emit undelivered, every run in progress missing its events) and expire state
    early, a step back would stall them for its length. This clock starts at the wall clock and
    advances by the monotonic time elapsed (never stepped; slewed by NTP as the wall clock is), plus
    a correction towards the wall clock of at most ``SLEW`` of that elapsed time: a step is caught up
    gradually (60 s in 20 min), a deadline judged meanwhile within 5 % of its length, and it never
    goes back. Thread-safe (``close_intake`` reads it from another thread)."""

    SLEW = 0.05  # the largest correction towards the wall clock, per ns of monotonic time elapsed

    def __init__(self, wall_clock_ns: Callable[[], int] = time.time_ns,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._wall_clock_ns = wall_clock_ns
        self._monotonic_ns = monotonic_ns
        self._lock = threading.Lock()
        self._last_monotonic_ns = monotonic_ns()
        self._now_ns = wall_clock_ns()

    def __call__(self) -> int:
        with self._lock:
            monotonic_ns = self._monotonic_ns()
            elapsed = max(0, monotonic_ns - self._last_monotonic_ns)
            self._last_monotonic_ns = max(monotonic_ns, self._last_monotonic_ns)
            now_ns = self._now_ns + elapsed
            bound = int(elapsed * self.SLEW)
            now_ns += max(-bound, min(bound, self._wall_clock_ns() - now_ns))
            self._now_ns = now_ns
            return now_ns


SPANS_DROPPED = "spans_dropped"  # reasons of a span loss (SpanLossObserver)


class Admission(enum.Enum):
    """What ``Pipeline.submit`` did with a batch."""

    ACCEPTED = "accepted"
    OVER_BUDGET = "over_budget"  # the memory limiter refused it: retry later
    STOPPED = "stopped"  # shutting down: retry elsewhere / later


class Pipeline:
    def __init__(self, *, detectors: Sequence[Detector], incidents: IncidentSink,
                 alerts: AlertSink, telemetry: Telemetry, max_pending_spans: int,
                 disabled_rules: Iterable[str] = (), min_alert_severity: Severity = Severity.CRITICAL,
                 tick_interval_s: float = 0.1,
                 wall_clock_ns: Callable[[], int] = time.time_ns,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns,
                 observers: Sequence[FindingObserver] = (),
                 inhibitor: Inhibitor | None = None, max_finding_series: int = MAX_CELLS) -> None:
        self._detectors = list(detectors)
        self._inhibitor = inhibitor
        self._observers = list(observers)
        self._loss_observers = [o for o in self._observers if hasattr(o, "spans_lost")]
        # observers that keep each backend instance's heartbeat totals themselves (across restarts)
        self._heartbeat_observers = [o for o in self._observers if hasattr(o, "heartbeats_seen")]
        # detectors and observers told of overload refusals (RefusalObserver), and those made since
        # they were last told: (first, last) on the pipeline's clock, or None
        self._refusal_observers = [c for c in [*self._detectors, *self._observers]
                                   if hasattr(c, "requests_refused")]
        self._refusals_lock = threading.Lock()
        self._refused: tuple[int, int] | None = None
        self._incidents = incidents
        # the store's pending writes, retried on ticks (``IncidentStore.flush``; a sink may have none)
        self._flush_incidents: Callable[[], None] | None = getattr(incidents, "flush", None)
        self._alerts = alerts
        self._telemetry = telemetry
        self._max_pending = max_pending_spans
        self._disabled = frozenset(disabled_rules)
        self._min_alert_rank = _SEVERITY_RANK[Severity(min_alert_severity)]
        self._tick_interval_ns = int(tick_interval_s * 1e9)
        # the detectors' time: the wall clock, stepped only gradually (see PipelineClock)
        self._clock = PipelineClock(wall_clock_ns, monotonic_ns)
        held = [o.held_dropped_total for o in self._heartbeat_observers
                if hasattr(o, "held_dropped_total")]  # the ledger's totals (HeartbeatObserver)
        self._heartbeats = HeartbeatTracker(telemetry, started_ns=self._clock(),
                                            held_dropped=held[0] if held else None)
        # label values of pathwatch_findings come from spans: bounded like every other metric's,
        # and so are their combinations (the series), as the inventory bounds its cells
        roles = BoundedLabels("findings_roles", MAX_ROLES)
        implementations = BoundedLabels("findings_implementations", MAX_IMPLEMENTATIONS)
        entry_points = BoundedLabels("findings_entry_points", MAX_ENTRY_POINTS)
        self._labels = (roles, implementations, entry_points)
        # labels (rule, severity, role, implementation, entry point)
        self._series_cap = CellCap("findings_series", max_finding_series,
                                   implementations=implementations, implementation_at=3,
                                   entry_points=entry_points, entry_point_at=4)
        self._series: dict[tuple, Counter] = {}  # bounded labels -> counter child: the real series
        self._series_of: dict[tuple, Counter] = {}  # raw labels -> the same (MAX_CACHED_KEYS)
        # what each bound folded, published to pathwatch_findings_overflow (its series exist at 0)
        sources: tuple[BoundedLabels | CellCap, ...] = (roles, implementations, entry_points,
                                                         self._series_cap)
        self._overflow_sources = tuple(zip(FINDINGS_OVERFLOW_LIMITS, sources))
        self._overflow_published = {name: 0 for name, _ in self._overflow_sources}
        for name, _ in self._overflow_sources:
            telemetry.findings_overflow.labels(limit=name)
        # each batch with the pipeline's clock when it was queued: the queue is in that order
        self._queue: deque[tuple[DecodedBatch, int]] = deque()
        self._pending = 0  # spans queued or being processed
        self._condition = threading.Condition()
        self._stopping = False
        # the pipeline's clock when the receivers stopped taking spans: the detectors' time stops there
        self._intake_closed_ns: int | None = None
        self._detectors_ns = 0  # the last now_ns the detectors were given (it never goes back)
        self._thread: WatchedThread | None = None
        self._drained = False  # the thread ended as ``stop`` asks: with the queue drained
        self.stalled_after_s = STALLED_AFTER_S
        self._round_ns = time.monotonic_ns()  # when the thread last went round its loop
        self._logged_failures: set[str] = set()
        self.processed_spans = 0  # read by tests and the benchmark
        self._processed = telemetry.pipeline_processed_spans
        telemetry.receiver_pending_spans.set_function(lambda: self._pending)
        # every name an error can be counted under has its series from the start, at 0: a series
        # born at its first error would be invisible to increase() (and to the alert on it)
        for name in [*map(_component_name, [*self._detectors, *self._observers]),
                     *(f"pipeline.{stage}" for stage in _STAGES)]:
            telemetry.detector_errors.labels(detector=name)

    # --- the receivers' side -----------------------------------------------------------------
    def submit(self, batch: DecodedBatch) -> Admission:
        count = len(batch.spans)
        with self._condition:
            if self._stopping:
                return Admission.STOPPED
            if self._pending and self._pending + count > self._max_pending:
                # a batch larger than the whole budget is let in alone (bounded by the receivers'
                # max message size): refused with a retryable status it could never pass. Not a
                # span loss: the exporter retries (RetryInfo), and one that gives up counts the
                # spans as dropped in its next heartbeat
                return Admission.OVER_BUDGET
            self._pending += count
            self._queue.append((batch, self._clock()))
            self._condition.notify()
        return Admission.ACCEPTED

    def admits(self, spans: int) -> Admission:
        """What ``submit`` would answer a batch of ``spans`` spans now, asked by the receivers
        before they decode a request (a request the budget cannot take is refused undecoded).
        Read without the lock: ``submit`` stays the authority, this only refuses early (a racy
        read at worst refuses a request a moment after room was made; the exporter retries)."""
        if self._stopping:
            return Admission.STOPPED
        pending = self._pending
        if pending and pending + spans > self._max_pending:  # as submit decides
            return Admission.OVER_BUDGET
        return Admission.ACCEPTED

    def overload_refused(self) -> None:
        """The receivers refused a request for overload (the exporter retries it): its time, on the
        pipeline's clock, is told to the ``RefusalObserver``s before the next batch or tick. Once the
        intake closed nothing is: a retry goes to the next sidecar. Called from receiver threads."""
        if self._intake_closed_ns is not None:  # the heartbeat tracker always hears of it
            return
        with self._refusals_lock:  # the clock read inside: a refusal told later is later than now
            now_ns = self._clock()
            refused = self._refused
            self._refused = (now_ns, now_ns) if refused is None else (refused[0], now_ns)

    @property
    def pending_spans(self) -> int:
        return self._pending

    def stalled_s(self, after_s: float | None = None) -> float | None:
        """How long the pipeline thread has been inside one step, when that is ``after_s`` or more
        (default ``stalled_after_s``, readiness's; liveness asks with its grace): a detector or
        sink that does not return, every span behind it waiting and the receivers refusing the
        rest once the budget is full. ``inf`` when the thread ended before ``stop``; None while it
        goes round (at least once a tick when idle) or before ``start``. Read from other threads
        (readiness, liveness)."""
        thread = self._thread
        if thread is None:
            return None
        if not thread.is_alive():
            return None if self._stopping else float("inf")
        stalled_s = (time.monotonic_ns() - self._round_ns) / 1e9
        return stalled_s if stalled_s >= (self.stalled_after_s if after_s is None else after_s) else None

    @property
    def thread(self) -> WatchedThread | None:
        """The pipeline thread (None before ``start``): the liveness check watches it."""
        return self._thread

    @property
    def ended(self) -> bool:
        """The pipeline thread ended otherwise than ``stop`` asks (an exception no step catches)."""
        thread = self._thread
        return thread is not None and not thread.is_alive() and not self._drained

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the pipeline thread; returns once it runs."""
        running = threading.Event()
        self._round_ns = time.monotonic_ns()
        self._thread = WatchedThread(target=self._run, args=(running,), name="pathwatch-pipeline",
                                     daemon=True)
        self._thread.start()
        running.wait(10)

    def close_intake(self) -> None:
        """The receivers take no new spans from now on (calls in flight may still submit theirs):
        from here the detectors' clock stands still while what was accepted drains, so that nothing
        is judged for lack of spans the receivers refuse — an emit's write sent a moment later, the
        rest of a run (exporters retry them at the next sidecar). What was due by now is judged."""
        if self._intake_closed_ns is None:
            self._intake_closed_ns = self._clock()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Refuse new batches, process every accepted one, end the thread. True when drained: no
        span queued nor taken and left unprocessed (by a thread that ended before ``stop``, the
        spans it had taken off the queue), and the last tick run (what the detectors held back
        judged): never after a thread that ended before ``stop``, spans in hand or not."""
        self.close_intake()
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is None:
            return not self._pending
        self._thread.join(timeout_s)
        with self._condition:
            return not self._thread.is_alive() and not self._pending and self._drained

    # --- the pipeline thread -----------------------------------------------------------------
    def _run(self, running: threading.Event | None = None) -> None:
        name_os_thread()
        if running is not None:
            running.set()
        next_tick = time.monotonic_ns() + self._tick_interval_ns
        while True:
            self._round_ns = time.monotonic_ns()
            batches, spans, count, heartbeats, last = self._take(next_tick)
            if count:
                self._guarded(_CONSUME, self._consume, spans, heartbeats, batches)
                with self._condition:  # pending and processed move together
                    self._pending -= count
                    self._processed.inc(count)
                self.processed_spans += count
            if time.monotonic_ns() >= next_tick or last:
                self._guarded(_TICK, self._tick, last)
                next_tick = time.monotonic_ns() + self._tick_interval_ns
            if last:
                self._drained = True
                return

    def _guarded(self, stage: str, step: Callable[..., None], *args: object) -> None:
        """Detectors and sinks are already isolated; this keeps the thread alive through a bug in
        the pipeline's own bookkeeping (counted like a detector error), so accepted spans still drain."""
        try:
            step(*args)
        except Exception:
            self._telemetry.detector_errors.labels(detector=f"pipeline.{stage}").inc()
            self._log_once(f"pipeline:{stage}", "the pipeline's %s step raised; counted in "
                           "pathwatch_detector_errors, the pipeline goes on", stage)

    def _take(self, next_tick_ns: int) -> tuple[list[DecodedBatch], list[SpanRecord], int,
                                                list[SpanRecord], bool]:
        """Wait for batches until the next tick is due; merge what is queued into one list (the
        batches merged come first). The last element says the pipeline is stopping and the queue
        is empty."""
        with self._condition:
            while not self._queue and not self._stopping:
                wait_s = (next_tick_ns - time.monotonic_ns()) / 1e9
                if wait_s <= 0:
                    break
                self._condition.wait(wait_s)
            if not self._queue:
                return [], [], 0, [], self._stopping
            first = self._queue.popleft()[0]
            batches = [first]
            spans, heartbeats = first.spans, first.heartbeats
            if self._queue and len(spans) + len(self._queue[0][0].spans) <= _MAX_MERGED_SPANS:
                spans, heartbeats = list(spans), list(heartbeats)
                while self._queue and len(spans) + len(self._queue[0][0].spans) <= _MAX_MERGED_SPANS:
                    more = self._queue.popleft()[0]
                    batches.append(more)
                    spans.extend(more.spans)
                    heartbeats.extend(more.heartbeats)
            return batches, spans, len(spans), heartbeats, False

    def _now_ns(self) -> int:
        """The detectors' time: the pipeline's clock (``PipelineClock``), but no later than the
        moment the oldest batch still queued was accepted, nor, once the intake closed, than the
        moment it closed (see ``close_intake``); never earlier than the last time given.

        Every span accepted before that moment has been handed to the detectors, so a deadline or
        idle time that ended by then is judged on all the spans that could meet it. Read on the
        pipeline's clock alone, a tick after a stall of the pipeline thread (an incident write
        waiting on the database's lock, a slow detector) judged an emit undelivered and its run
        idle while the write and the run's end, accepted on time during the stall, waited in the
        queue. Without a backlog (the queue empty) it is the pipeline's clock."""
        with self._condition:  # a batch's time is taken and queued under it: read in one piece
            now_ns = self._clock()
            if self._queue:
                now_ns = min(now_ns, self._queue[0][1])
        closed_ns = self._intake_closed_ns
        if closed_ns is not None and closed_ns < now_ns:
            now_ns = closed_ns
        if now_ns < self._detectors_ns:
            now_ns = self._detectors_ns
        self._detectors_ns = now_ns
        return now_ns

    def _consume(self, spans: list[SpanRecord], heartbeats: list[SpanRecord],
                 batches: Sequence[DecodedBatch] = ()) -> None:
        """``spans``: the spans of ``batches``, merged."""
        now_ns = self._now_ns()
        self._tell_refusals()
        if heartbeats:
            try:
                dropped = self._heartbeats.observe(heartbeats, now_ns)
            except Exception:  # the pipeline's own bookkeeping: the spans still go to every
                # detector (raised out of here, none got the batch: the ledger lost its calls)
                self._telemetry.detector_errors.labels(detector=f"pipeline.{_CONSUME}").inc()
                self._log_once("pipeline:heartbeats", "the pipeline's heartbeat tracker raised; "
                               "counted in pathwatch_detector_errors, the spans still analysed")
                dropped = None
            if dropped is not None:
                self._spans_lost(dropped, SPANS_DROPPED)
            for observer in self._heartbeat_observers:
                try:
                    observer.heartbeats_seen(heartbeats, now_ns)
                except Exception:
                    self._detector_failed(observer)
        findings: list[Finding] = []
        for detector in self._detectors:
            try:
                found = detector.consume(spans, now_ns)
            except Exception as error:
                self._detector_failed(detector)
                found = self._resume(detector, error, batches, now_ns)
            if found:
                findings.extend(found)
        if findings:
            self._handle(findings, now_ns, timed=True)

    def _resume(self, detector: Detector, error: Exception, batches: Sequence[DecodedBatch],
                now_ns: int) -> list[Finding]:
        """After ``detector`` raised on merged ``batches``: when it said on which span
        (``ConsumeInterrupted``), the findings it had raised, and each batch after that span's fed to
        it alone (a batch that raises again is counted again: another request met the error). Else
        nothing: how far it got is unknown, and a span fed twice would be judged twice."""
        if not isinstance(error, ConsumeInterrupted):
            return []
        findings = list(error.findings)
        failed = error.span
        at = next((index for index, batch in enumerate(batches)
                   if any(span is failed for span in batch.spans)), len(batches))
        for batch in batches[at + 1:]:
            try:
                found = detector.consume(batch.spans, now_ns)
            except ConsumeInterrupted as again:
                self._detector_failed(detector)
                found = again.findings
            except Exception:
                self._detector_failed(detector)
                continue
            if found:
                findings.extend(found)
        return findings

    def _tick(self, final: bool = False) -> None:
        """``final``: the last tick before the thread ends; findings held back — by the detectors
        (``drain``) and by the inhibitor — are let out. Backend processes whose heartbeats stopped
        without a final one are judged gone first (a span loss)."""
        now_ns = self._now_ns()
        self._tell_refusals()
        vanished = self._heartbeats.tick(now_ns)
        if vanished is not None:
            self._spans_lost(vanished, PROCESS_VANISHED)
        findings: list[Finding] = []
        for detector in self._detectors:
            steps = [detector.tick]
            drain = getattr(detector, "drain", None) if final else None
            if drain is not None:
                steps.append(drain)  # on its own: a tick that raised must not lose what is held
            for step in steps:
                try:
                    found = step(now_ns)
                except Exception:
                    self._detector_failed(detector)
                    continue
                if found:
                    findings.extend(found)
        inhibitor = self._inhibitor
        if inhibitor is None:
            release = None
        elif final:
            release = inhibitor.release_all
        else:
            release = lambda: inhibitor.release(now_ns)  # noqa: E731
        self._handle(findings, now_ns, release)
        if self._flush_incidents is not None:
            try:
                self._flush_incidents()
            except Exception:
                self._log_once("sink:incidents:flush", "the incident sink's flush raised")

    def _tell_refusals(self) -> None:
        """The overload refusals made since the last call, to the ``RefusalObserver``s; after
        ``_now_ns``: every refusal made by that time is told before what is judged at it."""
        with self._refusals_lock:  # uncontended but for refusals: one acquire a batch and a tick
            refused, self._refused = self._refused, None
        if refused is None:
            return
        # a refused request may have been a heartbeat: no backend process is judged gone for it
        self._heartbeats.requests_refused(*refused)
        for observer in self._refusal_observers:
            try:
                observer.requests_refused(*refused)
            except Exception:
                self._detector_failed(observer)

    def _spans_lost(self, interval_ns: tuple[int, int], reason: str) -> None:
        for observer in self._loss_observers:
            try:
                observer.spans_lost(interval_ns[0] / 1e9, interval_ns[1] / 1e9, reason)
            except Exception:
                self._detector_failed(observer)

    def _detector_failed(self, detector: Detector | FindingObserver) -> None:
        name = _component_name(detector)
        self._telemetry.detector_errors.labels(detector=name).inc()
        self._log_once(f"detector:{name}", "detector %s raised; counted in "
                       "pathwatch_detector_errors, the other detectors still run", name)

    # --- findings -> incidents -> metrics -> alerts ------------------------------------------
    def _handle(self, findings: list[Finding], now_ns: int,
                release: Callable[[], list[Finding]] | None = None, timed: bool = False) -> None:
        """``release``: what the inhibitor held back and now lets through, asked after this call's
        findings were admitted, so that a verdict raised in the very tick an info finding comes due
        still inhibits it. ``timed``: the findings were raised as their spans were processed (not
        judged when a wait ended), and go into the receipt-to-finding latency."""
        findings = [f for f in findings if f.rule not in self._disabled]
        if self._inhibitor is not None and findings:
            findings = self._inhibitor.admit(findings, now_ns)
        if release is not None:
            findings.extend(release())
        if not findings:
            return
        touched = self._record(findings)
        self._count(findings, timed)
        for observer in self._observers:
            try:
                observer.observe(findings)
            except Exception:
                self._detector_failed(observer)
        # every incident at or above the alert severity that got findings: the dispatcher pages the
        # sinks that have not got it yet (a page waiting to be tried again is tried at once) and
        # keeps the paged ones firing in Alertmanager
        alertable = {incident.id: incident for incident, _ in touched
                     if _SEVERITY_RANK[Severity(incident.severity)] >= self._min_alert_rank}
        if alertable:
            self._notify(list(alertable.values()))

    def _record(self, findings: list[Finding]) -> list[tuple[Incident, bool]]:
        try:
            return self._incidents.record(findings)
        except Exception:
            self._log_once("sink:incidents", "the incident sink raised; findings still counted")
            return []

    def _count(self, findings: list[Finding], timed: bool) -> None:
        """Findings into pathwatch_findings; ``timed`` ones into pathwatch_pipeline_latency_seconds.
        A finding judged on tick (a delivery deadline, an idle run, a hold that ended, what the
        inhibitor let through) waited for its rule's configured time, not for the pipeline: timing
        it from its span's receipt would put every such finding above the buckets (1 s, where
        rules.run_idle_s is 1 s and rules.delivery_deadline_s 2 s by default) and pin the p99."""
        now = time.monotonic_ns()
        latency = self._telemetry.pipeline_latency
        series_of = self._series_of
        for finding in findings:
            key = (finding.rule, finding.severity, finding.role, finding.implementation,
                   finding.entry_point)
            counter = series_of.get(key)
            if counter is None:
                counter = self._series_for(key)
            if finding.trace_id:
                counter.inc(exemplar={"trace_id": finding.trace_id})
            else:
                counter.inc()
            if timed and finding.received_ns:
                latency.observe(max(0, now - finding.received_ns) / 1e9)
        self._publish_overflow()

    def _series_for(self, key: tuple) -> Counter:
        """The pathwatch_findings child of a combination of finding labels not cached yet: each
        label bounded, then the combination (``CellCap``: a new one past the cap folds its entry
        point, then its implementation, into ``other``). The cap is asked only for a combination
        that has no series yet."""
        rule, severity, role, implementation, entry_point = key
        roles, implementations, entry_points = self._labels
        labels = (rule, Severity(severity).value, roles(role), implementations(implementation),
                  entry_points(entry_point))
        counter = self._series.get(labels)
        if counter is None:
            labels = self._series_cap(self._series, labels)
            counter = self._series.get(labels)
            if counter is None:
                counter = self._series[labels] = self._telemetry.findings.labels(*labels)
        if len(self._series_of) < MAX_CACHED_KEYS:
            self._series_of[key] = counter
        return counter

    def _publish_overflow(self) -> None:
        published = self._overflow_published
        for name, source in self._overflow_sources:
            delta = source.overflowed - published[name]
            if delta:
                published[name] = source.overflowed
                self._telemetry.findings_overflow.labels(limit=name).inc(delta)

    def _notify(self, incidents: list[Incident]) -> None:
        try:
            self._alerts.notify(incidents)
        except Exception:
            self._log_once("sink:alerts", "the alert sink raised; incidents are stored anyway")

    def _log_once(self, key: str, message: str, *args: object) -> None:
        """Once per ``key``: ``message`` and the error being handled, its messages left out
        (``log_error_scrubbed``)."""
        if key not in self._logged_failures:
            self._logged_failures.add(key)
            log_error_scrubbed(log, message, *args)
