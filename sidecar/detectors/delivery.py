"""Delivery: was every emitted event written to a socket, and did every run emit its required events?

- undelivered: a non-nested, successful emit whose event id got no ``written`` write starting
  within ``delivery_deadline_s`` of the emit's start (the backend's span times: a write exported
  late is still in time). The sidecar waits for its writes ``delivery_deadline_s`` plus
  ``delivery_export_allowance_s`` (the backend's export schedule) from when it received the emit,
  on its own clock, and judges on tick. A write with no start time (0) on either span is in time
  when it arrived within ``delivery_deadline_s`` of the emit (so is one that arrived before it).
  A write that arrives before its emit is judged by the same rule when the emit comes. An event
  judged not delivered is kept one more wait: a write in time arriving then (exported later than
  the allowance) is counted, ``DROPPED_LATE_EXPORT``; its finding, made, stands. So is a write
  answering a no-connection dispatch of it reported while it was remembered (to its recipient);
- write failed: a write whose outcome is ``failed`` or ``closed``; or a non-nested dispatch that raised
  (outcome ``failed``, or error status with another outcome than ``no_connection``) before making
  any write: its recipient was never written to, and whether they had a socket is not known (not a
  no connection). One that raised after writing is judged by its writes;
- no connection: a non-nested dispatch that found no socket (outcome ``no_connection`` or zero writes;
  a dispatch inside another one, e.g. ``send_to_thread`` -> ``send_to_user``, is the same event).
  The instrumentation gives ``no_connection`` to a dispatch that raised ``KeyError`` of its
  recipient before any write too (``sockets[user_id]``: none for them; with the registry named in
  the path map, ``connections``, only when it has no entry for them), its span in error.
  A dispatch may queue the event for a recipient not connected yet and write it when they connect,
  so a ``written`` write of its event id to that recipient starting within ``delivery_deadline_s``
  of the dispatch's start (span times, as for undelivered; on arrival without start times) cancels
  it. Held for ``delivery_deadline_s`` plus ``delivery_export_allowance_s`` (judged on tick,
  counted from when the sidecar received it). A dispatch with no event id cannot be followed:
  reported at once, unless it is a fan-out (``fan_out``: it names no recipient either, and one
  made outside its emit may name no event though it sent one), which is not judged;
- missing required events: a run (run id) that had an execute span and then saw no execute, emit
  or dispatch span for ``run_idle_s``, whose successful emits lack a required event type (the last
  required one may be replaced by any terminal event). A run whose execute spans are all nested in
  a call not arrived yet (a tool re-entering the engine) goes on until that call arrives (at most
  ``state.ttl_s``): its idle clock starts then. A run whose outermost execute spans all ended with
  its task cancelled (``pathwatch.cancelled``: the app stopped it; a nested call that returned
  before does not count) is not judged (counted cancelled). A run
  forgotten by the bounded state before its execute span came, after it had emitted events, is not
  judged from what came after (counted evicted instead).

Overload: a write, an emit or a run's later span in a request the receivers refused for overload
(``requests_refused``, from the pipeline: RESOURCE_EXHAUSTED / HTTP 429 or 503 with a retry delay)
comes on the exporter's retry, up to ``rules.export_retry_window_s`` (10 s by default, the Python
SDK exporter's timeout; a Collector in front retries longer) after the refusal, past the wait
above. So an emit's deadline, a no-connection dispatch's hold and a run's idle time that ended at T
are not judged while a refusal made at or before T may still be retried: until the latest such
refusal plus ``rules.export_retry_window_s`` (refusals less than
``_refusals.REFUSALS_MERGED_WITHIN_S`` apart count as one stretch). Receipt times and every wait
are as above; without refusals in the last ``rules.export_retry_window_s`` nothing waits longer.
Refusals for good (too many spans, too large) and while shutting down are not told, and hold
nothing.

An event already reported as write failed / no connection is not reported again as undelivered; it
is still counted in ``pathwatch_events_undelivered`` with that reason. Nor is a no-connection
dispatch that arrives after its event was reported undelivered (and not written since): the cause of
that finding, known too late. An event whose emission failed
inside a wrapper that swallowed the error (a nested emit of the same event id in error, the outer emit
ok) was not emitted: it does not count for its run's required events, and unless written it is
undelivered (reason ``emit_error``). Writes made inside the emit
call arrive before the emit (child spans end first), so early writes (and failed nested emits) wait
for their emit as long as the state remembers anything, ``state.ttl_s`` (at least
``delivery_deadline_s``): the emit may end, and be exported, long after its writes (an emit that
writes and then works on, an export retried after a sidecar restart), and was written all the same.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from functools import partial
from itertools import repeat
from operator import truediv
from collections.abc import Callable, Collection, Sequence

from instrumentation.attributes import DeliveryOutcomes, SpanKinds
from sidecar.config import RulesConfig, StateConfig
from sidecar.detectors._findings import culprit_of, enabled_rules, make_finding, named, short
from sidecar.detectors._metrics import BatchedCounter
from sidecar.detectors._refusals import RefusalStretches
from sidecar.model import Finding, SpanRecord, other_user, process_of
from sidecar.rules import (
    DELIVERY_MISSING_REQUIRED_EVENTS,
    DELIVERY_NO_CONNECTION,
    DELIVERY_UNDELIVERED,
    DELIVERY_WRITE_FAILED,
)
from sidecar.state import EVICTED_CAPACITY, OVERFLOW_LABEL, BoundedLabels, BoundedTable, TableGroup
from sidecar.telemetry import Telemetry
from sidecar.types import ConsumeInterrupted

_EXECUTE, _EMIT, _DISPATCH, _DELIVER = (
    SpanKinds.EXECUTE, SpanKinds.EMIT, SpanKinds.DISPATCH, SpanKinds.DELIVER)
_KINDS = frozenset({_EXECUTE, _EMIT, _DISPATCH, _DELIVER})
_WRITTEN, _FAILED, _CLOSED, _NO_CONNECTION, _CANCELLED = (
    DeliveryOutcomes.WRITTEN, DeliveryOutcomes.FAILED, DeliveryOutcomes.CLOSED,
    DeliveryOutcomes.NO_CONNECTION, DeliveryOutcomes.CANCELLED)

# reasons of pathwatch_events_undelivered
REASON_DEADLINE = "deadline"
REASON_WRITE_FAILED = "write_failed"
REASON_SOCKET_CLOSED = "socket_closed"
REASON_NO_CONNECTION = "no_connection"
REASON_EMIT_ERROR = "emit_error"
REASON_EVICTED = "evicted"  # dropped from bounded state before its deadline: not known delivered
_WRITE_REASONS = {_FAILED: REASON_WRITE_FAILED, _CLOSED: REASON_SOCKET_CLOSED}

# outcomes of pathwatch_events_written_total: the contract's (DeliveryOutcomes), and
OUTCOME_UNKNOWN = "unknown"  # a write without pathwatch.delivery.outcome
OUTCOME_OTHER = OVERFLOW_LABEL  # any other value the backend sent (the label stays bounded)
_OUTCOME_LABELS: dict[str | None, str] = {
    **{outcome: outcome for outcome in DeliveryOutcomes.ALL}, None: OUTCOME_UNKNOWN}

#: ``reason`` of pathwatch_detector_evidence_dropped_total{detector="delivery"}: a written write in
#: time for its event (span times) that arrived after the sidecar's wait for it had ended and the
#: event was judged not delivered (its finding stands: exported later than the allowance)
DROPPED_LATE_EXPORT = "late_export"
#: an event emitted before the first span this sidecar got from a backend process an earlier
#: sidecar process on the same state got spans of ended: its write, made there, may have gone to the
#: earlier process (a restart), so it is not judged (as a run begun before: RUN_STARTED_BEFORE)
DROPPED_STARTED_BEFORE = "started_before_sidecar"
DROPPED_REASONS = (DROPPED_LATE_EXPORT, DROPPED_STARTED_BEFORE)

# verdicts given on an event (_Pending.verdict)
_JUDGED = 2  # its own wait ended: judged not delivered, kept one more wait to tell a late export
#: judged so, and reported ``delivery.undelivered``: the event's finding. A no-connection dispatch
#: of it arriving later (exported past the wait) adds none (its cause, known too late)
_UNDELIVERED = 3
#: _Pending.reported once a late export of the event was counted: covered by a finding still, and
#: counted no more (DROPPED_LATE_EXPORT is once per event)
_LATE_COUNTED = "late export counted"

# outcomes of pathwatch_runs_completed
RUN_COMPLETE = "complete"
RUN_MISSING_EVENTS = "missing_events"
RUN_EVICTED = "evicted"  # dropped from bounded state before it could be judged
#: it began before this sidecar started: its earlier events may have gone to a previous sidecar
#: process (a restart) or nowhere (none was up), so it is not judged
RUN_STARTED_BEFORE = "started_before_sidecar"
#: every execute span of it ended with its task cancelled (``pathwatch.cancelled``: its user
#: stopped it, the socket that started it closed): the events it did not get to are not owed
RUN_CANCELLED = "cancelled"
_COMPLETE_KEY, _MISSING_EVENTS_KEY = (RUN_COMPLETE,), (RUN_MISSING_EVENTS,)
_STARTED_BEFORE_KEY, _CANCELLED_KEY = (RUN_STARTED_BEFORE,), (RUN_CANCELLED,)
_EVICTED_KEY = (RUN_EVICTED,)

UNKNOWN_EVENT_TYPE = "unknown"
MAX_EVENT_TYPES = 128  # distinct event-type label values; more fold into "other"
MAX_TYPES_PER_RUN = 64
#: users told apart per run (``_Run.users``) and per judged run id (``DeliveryDetector._judged``);
#: beyond them, a span of any user is of the run
MAX_USERS_PER_RUN = 4
MAX_USERS_JUDGED = 8
#: runs held for one call their nested calls ran inside (a supervisor's sub-agents); more are judged
#: on their idle clock at once
MAX_RUNS_PER_OUTER_CALL = 64
MAX_MEMOIZED_TYPE_SETS = 1024
MAX_BUFFERED_LATENCIES = 10_000  # per event type between two ticks; a full buffer flushes at once
#: no-connection dispatches of one event held at once (a broadcast to users none of whom is
#: connected); more are reported at once
MAX_HELD_PER_EVENT = 32
#: backend processes whose first span's end is kept (DeliveryDetector._horizons); more: the table
#: starts over
MAX_HORIZONS = 4096
#: users whose written writes of one waiting event are kept (_Pending.written_to); more are not
MAX_WRITTEN_USERS = 16
_NOBODY = ()  # _Pending.written_to before any written write (None is a connection with no user)
_LINK_CONTEXT = "context"  # pathwatch.delivery.link of a write made inside its emit call


class _Pending:
    """An emitted event awaiting its first write, until its deadline. Once written, only its event
    type is still read (to label later writes): the emit span is let go at once. Judged not
    delivered, it moves to the judged events for one more wait (``verdict`` _JUDGED): a write in
    time arriving then was exported too late for the judgement, and is counted
    (``DROPPED_LATE_EXPORT``)."""

    __slots__ = ("emit", "event_type", "start_ns", "received_ns", "due_ns", "delivered", "cause",
                 "reported", "failed_inside", "verdict", "written_to")

    def __init__(self, emit: SpanRecord, received_ns: int, due_ns: int) -> None:
        self.emit: SpanRecord | None = emit
        self.event_type = emit.event_type
        self.start_ns = emit.start_ns  # the emit's start: what a write is judged by once it is gone
        self.received_ns = received_ns  # for a write with no start time: judged on arrival
        self.due_ns = due_ns
        self.delivered = False
        self.cause: str | None = None  # best-known reason it was not written
        # a more specific finding already covers it (made: a no-connection dispatch held is not one
        # until its hold ends unanswered; while held, it covers the event at its verdict). Truthy:
        # True, or the no-connection dispatches of it reported, (recipient, start, receipt) each,
        # that a written write answering one shows false (a late export; _hold_reported), or
        # _LATE_COUNTED
        self.reported: bool | tuple | str = False
        # a nested emit of it failed: it counts for its run only once written (the cause may be
        # replaced by a more specific one meanwhile, so it cannot tell)
        self.failed_inside = False
        self.verdict: int | None = None  # _JUDGED, _UNDELIVERED: judged before its write
        # the users whose sockets got a written write of it in time while it waited (one, or a
        # tuple of up to MAX_WRITTEN_USERS): a no-connection dispatch of it arriving later, to one
        # of them, was answered already (another process wrote to the socket it had not: a relay)
        self.written_to: str | tuple[str | None, ...] | None = _NOBODY


class _Early:
    """What was learnt about an event id before its emit arrived, beyond a plain written write."""

    __slots__ = ("written", "cause", "reported", "start_ns")

    def __init__(self, written: tuple[int, int, str | None, str | None] | None) -> None:
        # the earliest-started written write (``_early_write``), judged when the emit comes
        self.written = written
        self.cause: str | None = None
        self.reported = False
        # the latest start of the failed write or dispatch that gave ``cause`` (span times): its
        # emit started before it (``_early_evicted``)
        self.start_ns = 0


class _Held:
    """The no-connection dispatches of one event, each awaiting a written write of the event to its
    recipient until ``due_ns`` (a deadline and the export allowance after the latest of them)."""

    __slots__ = ("dispatches", "received", "due_ns", "late")

    def __init__(self, dispatch: SpanRecord, received_ns: int, due_ns: int) -> None:
        self.dispatches = [dispatch]
        # when each dispatch arrived (for a write with no start time: judged on arrival)
        self.received = [received_ns]
        self.due_ns = due_ns
        # the event's judged _Pending, once its own deadline passed unwritten (a dispatch that
        # arrived after the emit is held past it): the write that then cancels every dispatch is
        # judged against its emit on span times (not by whether the verdict is still remembered)
        self.late: _Pending | None = None


class _Run:
    __slots__ = ("execute", "execute_nested", "types", "repeated", "users", "last_ns", "started_ns",
                 "span_began_ns", "source", "awaiting", "cancelled")

    def __init__(self, now_ns: int) -> None:
        # what a finding names of the run's execute span (not the whole record: runs are many)
        self.execute: tuple | None = None  # a plain culprit tuple (_findings.Culprit)
        self.execute_nested = False
        # distinct event types emitted: a list (a run has a handful; a set of five takes 728 bytes)
        self.types: list[str] = []
        # bit i: ``types[i]`` was emitted more than once (an int: no object for the collector to
        # walk); such a type is not taken back when a failed nested emit arrives after the emit
        # wrapping it (_nested_failed)
        self.repeated = 0
        # the users its spans are of (as ``duplicates._run_user``), first seen first; None past MAX_USERS_PER_RUN
        self.users: tuple[str, ...] | None = ()
        self.last_ns = now_ns
        # when it began, on the detector's clock: its first span's arrival, or earlier by the length
        # of an execute span (the backend's clock gives lengths only: it may be set apart)
        self.started_ns = now_ns
        # when its earliest execute span started, on its backend's clock, and that backend process
        # (the key of DeliveryDetector._horizons), to be compared with what this sidecar first got
        # from it
        self.span_began_ns: int | None = None
        self.source: str | None = None
        # its execute spans so far are nested calls (a tool re-entering the engine, a sub-agent run
        # inside another's engine): the span id of the call they ran inside, not arrived yet. The
        # run goes on until it arrives (DeliveryDetector._awaited): its idle clock waits
        self.awaiting: str | None = None
        # every outermost execute span of it so far (not nested in a call of its role, or the
        # nested ones while none of those has come) ended with its task cancelled (the app stopped
        # the run); one that did not (a timeout cancelled the engine inside a supervisor that went
        # on) makes it False for good
        self.cancelled = False


class DeliveryDetector:
    name = "delivery"
    # Slots, not an instance dict: CPython 3.11 keeps an instance's attributes in the compact
    # form its attribute loads are specialized for only up to 30 of them, and this detector has
    # more; past that every self.<attribute> on the per-span path took the generic lookup
    # (callgrind: ~600-1,500 more instructions a span, varying with the heap layout).
    __slots__ = (
        '_deadline_ns', '_deadline_s', '_dropped_metric', '_earlier_processes', '_early',
        '_emitted', '_executed', '_failed_inside', '_held', '_held_count', '_held_out',
        '_horizons', '_idle_ns', '_judged', '_last_run', '_last_run_id', '_late_exports_published',
        '_latencies', '_latency', '_missing_memo', '_missing_on', '_no_connection_on',
        '_note_process', '_pending', '_reported_kept', '_reported_room', '_required', '_runs',
        '_runs_completed', '_started_ns', '_terminal', '_types', '_types_overflow',
        '_types_overflow_published', '_undelivered', '_undelivered_on', '_verdicts', '_wait_ns',
        '_write_failed_on', '_written', '_written_ok', 'late_exports', 'tables',
        '_awaited', '_earlier_horizon', '_restart_window_ns', '_started_before_published',
        'started_before', '_refusals', '_retry_pending', '_unhorizoned', '_early_lost',
        '_backend_now_ns', '_forgotten_lost', '_answers_lost',
    )

    def __init__(self, rules: RulesConfig, state: StateConfig, telemetry: Telemetry | None = None,
                 started_ns: int | None = None, earlier_processes: Collection[str] = (),
                 note_process: Callable[[str], None] | None = None) -> None:
        """``started_ns``: when the sidecar started (the pipeline's clock); runs that began earlier
        are not judged for missing events (``RUN_STARTED_BEFORE``). None: every run is judged.
        ``earlier_processes``: the backend processes (``process_of``) an earlier sidecar process on
        the same state got spans of (a restart): a run of theirs in flight when their first span
        reached this one may have sent its first events there. ``note_process`` is told the
        backend process of each run this one gets spans of (to be remembered for the next start)."""
        on = enabled_rules(rules, "delivery")
        self._undelivered_on = DELIVERY_UNDELIVERED in on
        self._write_failed_on = DELIVERY_WRITE_FAILED in on
        self._no_connection_on = DELIVERY_NO_CONNECTION in on
        self._missing_on = DELIVERY_MISSING_REQUIRED_EVENTS in on
        self._deadline_s = rules.delivery_deadline_s
        self._deadline_ns = int(rules.delivery_deadline_s * 1e9)
        # an emit's writes are awaited this long after its receipt; judged in time on span times
        wait_s = rules.delivery_deadline_s + rules.delivery_export_allowance_s
        self._wait_ns = int(wait_s * 1e9)
        # overload refusals (requests_refused) whose retries may still come: a judgement that
        # ended after one waits for its retry
        retry_window_s = rules.export_retry_window_s
        self._refusals = RefusalStretches(retry_window_s)
        self._retry_pending = self._refusals.retry_pending
        # entries held for a refusal's retry live that much longer than their wait
        wait_s += retry_window_s
        self._idle_ns = int(rules.run_idle_s * 1e9)
        self._required = tuple(rules.required_events)
        self._terminal = frozenset(rules.terminal_events)
        self._missing_memo: dict[tuple[str, ...], tuple[str, ...]] = {}
        ttl = state.ttl_s
        # writes made inside an emit call end before it, and arrive before it by as long as the emit
        # ran on after them plus the export delays: an early write waits for its emit as long as the
        # state remembers anything, and at least one deadline (docs/rules.md, known limits). Writes
        # whose emit comes are taken out at once; only writes whose emit never comes stay that long
        early_ttl = max(ttl, rules.delivery_deadline_s)
        # event id -> _Pending, in receipt order (= deadline order): tick walks the front
        self._pending: BoundedTable[str, _Pending] = BoundedTable(
            "delivery_pending_events", state.max_events, max(ttl, wait_s + 1),
            on_evict=self._pending_evicted)
        # event id -> _Pending judged not delivered, for one more wait (deadline order): a write in
        # time arriving then was exported late (DROPPED_LATE_EXPORT). A table of their own: among
        # the pending emits (behind them) they pushed emits still waiting out of a full table
        self._verdicts: BoundedTable[str, _Pending] = BoundedTable(
            "delivery_judged_events", state.max_events, max(ttl, wait_s + 1),
            on_evict=self._judged_evicted)
        # event id -> (start, end) of the written write seen before its emit (the earliest started:
        # judged in time or not when the emit comes), or an _Early. Its times, not its record: the
        # entries of emits that never come stay state.ttl_s, and a record keeps its ids, names and
        # attributes (about 730 bytes an entry where the times take 210)
        self._early: BoundedTable[str, object] = BoundedTable(
            "delivery_early_writes", state.max_events, early_ttl, on_evict=self._early_evicted)
        # the latest start (span times) of an early write pushed out of the full table: its emit,
        # started no later, finds no write when it comes (_early_evicted)
        self._early_lost = _LostMark(early_ttl)
        # the latest deadline (span times) of a written event pushed out of the full pending table
        # with the users its writes reached: a no-connection dispatch of it they answered
        # (_Pending.written_to) is no longer told (_pending_evicted)
        self._answers_lost = _LostMark(ttl)
        # runs by run id alone: a run whose spans carry another user (bleed) is still one run (so
        # are two users' runs of one id in flight at once); once it is judged, a span of a user it
        # never had starts another user's run of the id (_judged)
        self._runs: BoundedTable[str, _Run] = BoundedTable("delivery_runs", state.max_runs, ttl,
                                                           on_evict=self._run_forgotten)
        # runs that had an execute span, in last-activity order: the idle judgement walks its front
        self._executed: BoundedTable[str, _Run] = BoundedTable(
            "delivery_executed_runs", state.max_runs,
            max(ttl, rules.run_idle_s + retry_window_s + 1),
            on_evict=self._run_evicted)
        # run id -> the users of the runs of that id judged (or counted evicted): their later spans
        # are not judged, a span of another user starts that user's run (clients numbering their
        # runs per user: 1, 2, 3 ...); True: judged, of users not told (none known, or too many):
        # no later span is judged; False: forgotten before its execute span came with some of its
        # events (see _run_forgotten): no later span is judged
        self._judged: BoundedTable[str, tuple[str, ...] | bool] = BoundedTable(
            "delivery_judged_runs", state.max_runs, ttl, on_evict=self._mark_evicted)
        # the backend's time as far as seen (span times: the latest end of a batch's last span), and
        # what it was when the full judged-run table last let go of the mark of a run forgotten
        # with events (_mark_evicted)
        self._backend_now_ns = 0
        self._forgotten_lost = _LostMark(ttl)
        # span id of a call not arrived yet -> the runs whose only execute spans so far are nested
        # in it (_Run.awaiting): their idle clock starts when it arrives (it ends after them), or
        # when it has not within state.ttl_s (it was dropped, or ended before them: judged then)
        self._awaited: BoundedTable[str, list[str]] = BoundedTable(
            "delivery_awaited_outer_calls", state.max_runs, ttl, on_evict=self._outer_not_seen)
        # event ids whose nested emit failed (it ends, and arrives, before the emit wrapping it)
        self._failed_inside: BoundedTable[str, bool] = BoundedTable(
            "delivery_failed_nested_emits", state.max_events, early_ttl)
        # event id -> _Held, in deadline order: no-connection findings that a write may still cancel
        self._held: BoundedTable[str, _Held] = BoundedTable(
            "delivery_held_no_connections", state.max_events, max(ttl, wait_s + 1),
            on_evict=self._held_evicted)
        self._held_out: list[SpanRecord] = []  # held dispatches evicted: reported on the next tick
        # dispatches held in all: an entry holds up to MAX_HELD_PER_EVENT, and they count against the
        # table's capacity (the span records are what the table's memory is)
        self._held_count = 0
        # no-connection dispatches reported whose recipient and times are kept with their event
        # (_Pending.reported), to tell a late export of theirs: at most state.max_events
        self._reported_kept = 0
        self._reported_room = state.max_events
        self.tables = TableGroup(
            telemetry, (self._pending, self._verdicts, self._early, self._runs, self._executed,
                        self._judged, self._awaited, self._failed_inside, self._held))
        self._types = BoundedLabels("delivery_event_types", MAX_EVENT_TYPES)
        # the folds _types counts, published on flush (pathwatch_events_overflow)
        self._types_overflow = telemetry.events_overflow if telemetry else None
        self._types_overflow_published = 0
        self._emitted = BatchedCounter(telemetry.events_emitted if telemetry else None)
        self._written = BatchedCounter(telemetry.events_written if telemetry else None)
        self._written_ok = BatchedCounter(telemetry.events_written if telemetry else None,
                                          fixed=(_WRITTEN,))
        self._undelivered = BatchedCounter(telemetry.events_undelivered if telemetry else None)
        self._runs_completed = BatchedCounter(telemetry.runs_completed if telemetry else None)
        self._latency = telemetry.delivery_latency if telemetry else None
        self._dropped_metric = telemetry.detector_evidence_dropped if telemetry else None
        self.late_exports = 0  # DROPPED_LATE_EXPORT, published on flush
        self._late_exports_published = 0
        self._latencies: dict[str, list[int]] = {}  # event type label -> latencies (ns) since flush
        self._started_ns = started_ns
        # backend process -> the earliest end, on its clock, of a run's span this sidecar got from
        # it (of an earlier process, of its first span of any kind: _first_of_process). A backend
        # exports its spans in the order they end, so of a process an earlier sidecar
        # process got spans of, one that ended earlier went there: a run that began before may
        # have lost its first events, whenever its later spans arrive (from the backend's export
        # queue, long after they ended, once the restarted sidecar is up again). A process new to
        # the state sent nothing elsewhere: its first run is judged
        self._horizons: dict[tuple, int] = {}
        self._earlier_processes = frozenset(earlier_processes) if started_ns is not None else frozenset()
        # a process of those whose first span reaches this one later than this after the
        # start had nothing queued from before it (spans retried across a restart arrive sooner, as
        # early writes wait for their emit: state.ttl_s): idle, its first span's end says nothing
        # about the restart, and is no horizon (else each such process, however late it came,
        # excused every event then waiting, of any process, and its own first run)
        self._restart_window_ns = int(ttl * 1e9) if started_ns is not None else 0
        # those processes with no horizon yet: any span of theirs is looked at (a write, a dispatch
        # of a run another process's span started here), not only a run's first, until each has
        # one or the restart window ends (then empty: nothing more is looked at per span)
        self._unhorizoned = set(self._earlier_processes)
        # the latest of the horizons of those processes: an event emitted before it may have been
        # written by one of them to the earlier sidecar process (not judged: DROPPED_STARTED_BEFORE)
        self._earlier_horizon = 0
        self.started_before = 0  # DROPPED_STARTED_BEFORE, published on flush
        self._started_before_published = 0
        self._note_process = note_process
        # the run of the previous span within one batch (runs' spans come one after another)
        self._last_run_id: str | None = None
        self._last_run: _Run | None = None

    # --- the data path -----------------------------------------------------------------------
    def consume(self, spans: Sequence[SpanRecord], now_ns: int) -> list[Finding]:
        findings: list[Finding] = []
        self._last_run_id = self._last_run = None  # tick may have judged it since
        try:  # costs nothing per span; says where a span made it fail (ConsumeInterrupted)
            for span in spans:
                kind = span.kind
                if kind not in _KINDS:
                    continue
                if self._unhorizoned and span.instance_id is not None:
                    self._first_of_process(span, now_ns)
                if kind == _DELIVER:
                    self._on_deliver(span, now_ns, findings)
                    continue  # a write changes nothing about the run's emitted events
                emitted = True  # for the run's required events
                if kind == _EMIT:
                    if span.nested:
                        if span.error and span.event_id is not None:
                            self._nested_failed(span.event_id)
                        emitted = False
                    elif span.error:
                        self._on_emit(span, now_ns, failed=False)
                        emitted = False
                    else:
                        failed_inside = (span.event_id is not None
                                         and self._failed_inside.pop(span.event_id, None) is not None)
                        emitted = self._on_emit(span, now_ns, failed=failed_inside)
                elif kind == _DISPATCH:
                    # cancelled (its task was: the run cancelled, a timeout around it): no failure
                    # nor a missing socket; its event is judged at its deadline
                    if not span.nested and span.outcome != _CANCELLED and (
                            span.outcome == _NO_CONNECTION or span.dispatch_writes == 0):
                        # error status with no_connection: its lookup of the recipient raised
                        if span.outcome == _FAILED or (span.error and span.outcome != _NO_CONNECTION):
                            self._on_failed_dispatch(span, now_ns, findings)
                        else:
                            self._on_no_connection(span, now_ns, findings)
                if kind == _EXECUTE and self._awaited:
                    awaiting = self._awaited.pop(span.span_id, None)
                    if awaiting is not None:  # the call some runs' nested calls ran inside
                        self._outer_arrived(span.span_id, awaiting, now_ns)
                if span.run_id is not None:
                    self._on_run_span(span, now_ns, emitted)
        except Exception as error:
            raise ConsumeInterrupted(span, findings) from error
        if spans and spans[-1].end_ns > self._backend_now_ns:  # once a batch: its last span
            self._backend_now_ns = spans[-1].end_ns
        self.tables.enforce()  # capacity, once per batch
        return findings

    def requests_refused(self, first_ns: int, last_ns: int) -> None:
        """The receivers refused requests for overload from ``first_ns`` to ``last_ns`` (the
        pipeline's clock; ``RefusalObserver``): their exporters retry them, for up to
        ``rules.export_retry_window_s`` as it counts."""
        self._refusals.add(first_ns, last_ns)

    def tick(self, now_ns: int) -> list[Finding]:
        findings: list[Finding] = []
        self._refusals.expire(now_ns)  # the stretches whose retries are over
        for mark in (self._early_lost, self._answers_lost, self._forgotten_lost):
            mark.advance(now_ns)
        self._judge_held(now_ns, findings)
        self._judge_deadlines(now_ns, findings)
        self._judge_idle_runs(now_ns, findings)
        self.tables.advance(now_ns)
        self.flush()
        self.tables.maybe_publish(now_ns)
        return findings

    def drain(self, now_ns: int) -> list[Finding]:
        """At shutdown: the no-connection dispatches still held are reported with what is known,
        as when their hold ends (no write of theirs can come to this sidecar any more)."""
        findings: list[Finding] = []
        self._judge_held(now_ns, findings, everything=True)
        return findings

    def flush(self) -> None:
        for counter in (self._emitted, self._written, self._written_ok, self._undelivered,
                        self._runs_completed):
            counter.flush()
        self._flush_latencies()
        late = self.late_exports - self._late_exports_published
        if late:
            self._late_exports_published = self.late_exports
            if self._dropped_metric is not None:
                self._dropped_metric.labels(self.name, DROPPED_LATE_EXPORT).inc(late)
        before = self.started_before - self._started_before_published
        if before:
            self._started_before_published = self.started_before
            if self._dropped_metric is not None:
                self._dropped_metric.labels(self.name, DROPPED_STARTED_BEFORE).inc(before)
        folded = self._types.overflowed - self._types_overflow_published
        if folded:
            self._types_overflow_published += folded
            if self._types_overflow is not None:
                self._types_overflow.inc(folded)

    # --- events ------------------------------------------------------------------------------------
    def _label(self, event_type: str | None) -> str:
        if event_type is None:
            return UNKNOWN_EVENT_TYPE
        return self._types.known(event_type) or self._types(event_type)

    def _on_emit(self, span: SpanRecord, now_ns: int, *, failed: bool) -> bool:
        """Judge a non-nested emit; ``failed``: an emit nested in it failed. True when it counts as emitted
        for its run (not in error, and, when it failed inside, written anyway)."""
        event_id = span.event_id
        label = self._types.known(span.event_type) or self._label(span.event_type)
        counts = self._emitted.counts  # every emit call, failed ones too: undelivered / emitted <= 1
        counts[label] = counts.get(label, 0) + 1
        if span.error:
            # labelled again, not reused: a type folded into "other" counts one more fold for this
            # second count under it (pathwatch_events_overflow: one per emit and undelivered event)
            self._undelivered.add((self._label(span.event_type), REASON_EMIT_ERROR))
            if event_id is not None:
                self._early.pop(event_id, None)
            return False
        if event_id is None or self._pending.get(event_id) is not None:
            return not failed  # unlinked events cannot be followed; the first emit of an id is judged
        # (an id emitted twice after an early write is judged twice: duplicates reports the repeat)
        early = self._early.pop(event_id, None)
        if early is None and self._verdicts.get(event_id) is not None:
            return not failed  # judged a wait ago: sent again, not judged again
        # its write may be one pushed out of the full early-write table (it started no earlier):
        # none kept (what a dispatch or a failed write left says nothing of a written one)
        lost = 0 < span.start_ns <= self._early_lost.latest and (
            early is None or (early.__class__ is _Early and early.written is None))
        if early is not None and early.__class__ is not _Early:
            # written before its emit arrived (writes inside the emit call end first): if in time,
            # delivered, nothing left to wait for. Later writes of the event just pass through the
            # early table. A late one leaves the emit waiting for another write, as any late write
            # (_early_in_time, inline: every emit of the usual order comes here)
            started = early[0]
            if not (started and span.start_ns) or started - span.start_ns <= self._deadline_ns:
                self._observe_latency(label, early[1] - span.start_ns)
                if early[3] != _LINK_CONTEXT:
                    # written outside the emit call (another task; another process: a relay): a
                    # dispatch of it that found no socket elsewhere may still come, answered already
                    pending = _Pending(span, now_ns, now_ns + self._wait_ns)
                    pending.delivered, pending.emit, pending.written_to = True, None, early[2]
                    self._pending.put(event_id, pending)
                return True
            early = None
        pending = _Pending(span, now_ns, now_ns + self._wait_ns)
        if failed:
            pending.cause = REASON_EMIT_ERROR  # the error was swallowed above it: judged at the deadline
            pending.failed_inside = True
        if early is not None:
            pending.cause, pending.reported = early.cause or pending.cause, early.reported
            written = early.written
            if written is not None and _early_in_time(written[0], span, self._deadline_ns):
                pending.delivered, pending.emit, pending.written_to = True, None, written[2]
                self._observe_latency(label, written[1] - span.start_ns)
        if lost and (pending.cause is None or pending.cause is REASON_NO_CONNECTION):
            # not written by its deadline: counted, not reported; nor are its no-connection
            # dispatches, which that lost write may have answered (a relay's other process)
            pending.cause = REASON_EVICTED
        self._pending.put(event_id, pending)
        return pending.delivered or not failed

    def _nested_failed(self, event_id: str) -> None:
        """A nested emit of ``event_id`` failed, its error swallowed by the emit wrapping it. It ends,
        and mostly arrives, first: it waits for that emit (``_failed_inside``). One arriving after
        it (an exporter's retry, a Collector's parallel requests), while the event waits unwritten,
        marks it as the wrapper would have been: undelivered for ``emit_error`` unless written in
        time, and its type taken back from its run (unless another emit of the run gave that type
        too). One arriving after the event's verdict changes nothing: judged and counted then."""
        pending = self._pending.get(event_id)
        if pending is None:
            self._failed_inside.put(event_id, True)
            return
        if pending.delivered or pending.failed_inside:
            return  # written in time: emitted all the same
        pending.failed_inside = True
        if pending.cause is None:
            pending.cause = REASON_EMIT_ERROR
        emit = pending.emit
        key, event_type = emit.run_id, emit.event_type  # type: ignore[union-attr]
        run = (self._runs.get(key) or self._executed.get(key)) if key is not None else None
        if run is not None and event_type in run.types:
            index = run.types.index(event_type)
            if not run.repeated >> index & 1:  # no other emit of the run gave it
                del run.types[index]
                low = run.repeated & ((1 << index) - 1)
                run.repeated = low | (run.repeated >> (index + 1) << index)

    def _on_deliver(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        event_id = span.event_id
        pending = self._pending.get(event_id) if event_id is not None else None
        event_type = span.event_type
        if event_type is None and pending is not None:
            event_type = pending.event_type
        label = self._types.known(event_type) or self._label(event_type)
        outcome = span.outcome
        if outcome == _WRITTEN:
            if event_id is not None:
                held = self._held.get(event_id)
                if held is not None and self._written_to_held(event_id, held, span, now_ns):
                    late = held.late
                    if late is None:
                        # queued, not without a connection: judged at its verdict as any event
                        self._hold_answered(event_id, pending)
                    elif (self._undelivered_on and not late.delivered
                            and not self._in_time(span, late, now_ns)):
                        # its deadline passed while only held dispatches covered it: written too
                        # late (one in time on span times was exported late: counted below while
                        # the verdict is remembered)
                        findings.append(self._undelivered_finding(late.emit, event_id,
                                                                  REASON_DEADLINE, now_ns))
                        late.verdict = _UNDELIVERED
            counts = self._written_ok.counts  # by event type alone: no tuple per write
            counts[label] = counts.get(label, 0) + 1
            if pending is not None:
                if self._in_time(span, pending, now_ns):  # a late one answers no dispatch of it
                    _written_to(pending, span.connection_user)
                if not pending.delivered and self._in_time(span, pending, now_ns):
                    emit, pending.emit = pending.emit, None  # delivered: nothing left to judge
                    pending.delivered = True
                    self._observe_latency(label, span.end_ns - emit.start_ns)
                    if pending.failed_inside:
                        self._count_for_run(emit)  # failed inside, yet written: it was emitted
                if pending.reported.__class__ is tuple:
                    # a dispatch's wait ended first: its finding stands, and this write answers it
                    self._count_late_export(pending, span, now_ns)
            elif event_id is not None:
                early = self._early.get(event_id)
                if early is None:
                    judged = self._verdicts.get(event_id)
                    if judged is None:
                        self._early.put(event_id, _early_write(span))  # the common case
                    elif (judged.reported is not _LATE_COUNTED and not judged.delivered
                            and self._in_time(span, judged, now_ns)):
                        # in time, but its wait ended first: counted undelivered then (its finding
                        # stands), not a delivery now; once
                        judged.delivered, judged.emit = True, None
                        self._late_counted(judged)
                    elif judged.reported.__class__ is tuple:
                        self._count_late_export(judged, span, now_ns)  # a no-connection finding
                elif early.__class__ is _Early:
                    if early.written is None or span.start_ns < early.written[0]:
                        early.written = _early_write(span)
                elif span.start_ns < early[0]:  # another socket's: the one in time, if any
                    self._early.put(event_id, _early_write(span))
            return
        # not written: a contract outcome, or none, or a value from the wire folded into "other"
        # (a label value; not "written", so it delivers nothing)
        outcome = _OUTCOME_LABELS.get(outcome, OUTCOME_OTHER)
        self._written.add((label, outcome))
        reason = _WRITE_REASONS.get(outcome)
        if reason is None:
            return
        if self._write_failed_on:
            what = "failed" if outcome == _FAILED else "hit a closed socket"
            findings.append(make_finding(
                DELIVERY_WRITE_FAILED, span, now_ns,
                f"socket write of event {event_type or '?'} {what}", event_type=event_type,
                details={"outcome": outcome, "event_id": event_id, "connection_id": span.connection_id}))
        self._note_cause(event_id, pending, reason, self._write_failed_on, span.start_ns)

    def _count_late_export(self, event: _Pending, write: SpanRecord, now_ns: int) -> None:
        """Count a written write that answers a no-connection dispatch of ``event`` already reported
        (``event.reported``: the dispatches' recipients and times) as a late export: that finding
        was false, its write exported past the wait. A write to another recipient shows nothing."""
        user = write.connection_user
        for target, start_ns, received_ns in event.reported:  # type: ignore[union-attr]
            if _to_recipient(user, target) and self._answers(write, start_ns, received_ns, now_ns):
                self._late_counted(event)
                return

    def _late_counted(self, event: _Pending) -> None:
        """A late export of ``event`` is counted: once (DROPPED_LATE_EXPORT is per event)."""
        self._let_go_reported(event)
        event.reported = _LATE_COUNTED
        self.late_exports += 1

    def _let_go_reported(self, event: object) -> None:
        """``event`` (a _Pending) leaves the detector, or needs its reported dispatches no more."""
        reported = getattr(event, "reported", None)
        if reported.__class__ is tuple:
            self._reported_kept -= len(reported)  # type: ignore[arg-type]
            event.reported = True  # type: ignore[attr-defined]

    def _in_time(self, write: SpanRecord, pending: _Pending, now_ns: int) -> bool:
        """A write of a pending event started within the deadline of its emit's start (span times
        of the backend: an export schedule may bring it to the sidecar seconds later); without a
        start time on either span, it arrived within the deadline of the emit."""
        if write.start_ns and pending.start_ns:
            return write.start_ns - pending.start_ns <= self._deadline_ns
        return now_ns - pending.received_ns <= self._deadline_ns

    def _on_failed_dispatch(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        """A dispatch that raised before any write: the send failed (write failed, at once: nothing
        was queued that a later write could deliver)."""
        event_id = span.event_id
        if self._write_failed_on:
            findings.append(make_finding(
                DELIVERY_WRITE_FAILED, span, now_ns,
                f"{short(span.implementation)} failed before writing event "
                f"{span.event_type or '?'} to any socket",
                details={"outcome": _FAILED, "event_id": event_id,
                         "dispatch_writes": span.dispatch_writes}))
        pending = self._pending.get(event_id) if event_id is not None else None
        self._note_cause(event_id, pending, REASON_WRITE_FAILED, self._write_failed_on,
                         span.start_ns)

    def _on_no_connection(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        event_id = span.event_id
        reported = False  # held: it covers the event once its hold ends unanswered
        if self._no_connection_on:
            if event_id is None:
                if span.fan_out:  # no recipient, no event (made outside its emit, not known):
                    return  # no write can be told its own; the emit it sent is judged by them
                findings.append(self._no_connection(span, now_ns))  # no write can be told its own
            elif self._reported_undelivered(event_id):
                return  # its event's finding is made: it gives the cause, which came too late
            elif self._answered_already(event_id, span):
                return  # its recipient's socket got it, the write exported before this dispatch
            else:
                reported = self._hold(event_id, span, now_ns, findings)
        # the event's cause from now on: a write that cancels the finding delivers the event too
        pending = self._pending.get(event_id) if event_id is not None else None
        self._note_cause(event_id, pending, REASON_NO_CONNECTION, reported, span.start_ns)
        # reported at once for want of room (``_hold``): a write answering it shows the finding
        # false for that, counted as the table's eviction, not as an export past the wait: its
        # recipient is not kept (``_hold_reported``)

    def _answered_already(self, event_id: str, dispatch: SpanRecord) -> bool:
        """A written write of ``event_id`` to the dispatch's recipient (or a user it cannot be told
        from) arrived before the dispatch, while the event waited (one in time for the emit), or
        before its emit (the earliest such write, started within the deadline of the dispatch's
        start): another process held the socket and wrote it (a relay whose consumers each
        dispatch to the sockets they hold), its span exported first. Held, the dispatch would wait
        for a write that came already. A write started past the deadline answers nothing, in
        either order (``_answers``)."""
        pending = self._pending.get(event_id)
        if pending is None:
            early = self._early.get(event_id)  # written before its emit came (or before this)
            if early is not None and early.__class__ is _Early:
                early = early.written
            if early is None or not _to_recipient(early[2], dispatch.target):  # type: ignore[index]
                return False
            started = early[0]  # type: ignore[index]
            # without a start time on either, it arrived before the dispatch: in time
            return not (started and dispatch.start_ns) or started - dispatch.start_ns <= self._deadline_ns
        users = pending.written_to
        if users is _NOBODY:
            return False
        target = dispatch.target
        if users.__class__ is not tuple:
            return _to_recipient(users, target)  # type: ignore[arg-type]
        return any(_to_recipient(user, target) for user in users)  # type: ignore[union-attr]

    def _reported_undelivered(self, event_id: str) -> bool:
        """``event_id`` was reported ``delivery.undelivered`` (its verdict is remembered, one wait)
        and no write has delivered it since: a no-connection dispatch of it arriving now (exported
        past the wait) is the cause of that finding, not a second one. One finding per event, as
        when the dispatch comes first and the event is not reported undelivered."""
        judged = self._verdicts.get(event_id)
        return judged is not None and judged.verdict == _UNDELIVERED and not judged.delivered

    def _hold(self, event_id: str, span: SpanRecord, now_ns: int, findings: list[Finding]) -> bool:
        """Hold a no-connection dispatch for a deadline and the export allowance: it may have queued
        the event for a recipient who connects within the deadline (a write after the dispatch
        ended, in another task), exported up to a schedule later. True when reported at once."""
        held = self._held.get(event_id)
        if self._held_count >= self._held.capacity or (
                held is not None and len(held.dispatches) >= MAX_HELD_PER_EVENT):
            # no room to wait: judged at once, and counted as a hold the full table lost
            # (pathwatch_state_evictions_total{reason="capacity"}: this finding may be false)
            self._held.evictions[EVICTED_CAPACITY] += 1
            findings.append(self._no_connection(span, now_ns))
            return True
        if held is None:
            self._held.put(event_id, _Held(span, now_ns, now_ns + self._wait_ns))
        else:
            held.dispatches.append(span)
            held.received.append(now_ns)
            held.due_ns = now_ns + self._wait_ns
            self._held.renew(event_id, held)  # deadline order: at the back
        self._held_count += 1
        return False

    def _written_to_held(self, event_id: str, held: _Held, write: SpanRecord, now_ns: int) -> bool:
        """A written write of a held event: the dispatches addressed to its connection's user were
        queued, not without a connection. So are those it cannot be told apart from: a dispatch that
        named no recipient, a connection with no user (it authenticated by a message), users made
        with two keys. Each only when the write was in time for it (``_answers``). True when none
        is left held."""
        user = write.connection_user
        kept, received = [], []
        for dispatch, received_ns in zip(held.dispatches, held.received):
            if (_to_recipient(user, dispatch.target)
                    and self._answers(write, dispatch.start_ns, received_ns, now_ns)):
                continue
            kept.append(dispatch)
            received.append(received_ns)
        self._held_count -= len(held.dispatches) - len(kept)
        if not kept:
            self._held.pop(event_id, None)
            return True
        held.dispatches, held.received = kept, received
        return False

    def _answers(self, write: SpanRecord, start_ns: int, received_ns: int, now_ns: int) -> bool:
        """A write started within the deadline of a held dispatch's start (``start_ns``; span times
        of the backend: an export schedule may bring it seconds later); without a start time on
        either span, it arrived within the deadline of the dispatch (``received_ns``)."""
        if write.start_ns and start_ns:
            return write.start_ns - start_ns <= self._deadline_ns
        return now_ns - received_ns <= self._deadline_ns

    def _judge_held(self, now_ns: int, findings: list[Finding], everything: bool = False) -> None:
        late, self._held_out = self._held_out, []
        findings.extend(self._no_connection(dispatch, now_ns) for dispatch in late)
        retry_pending = self._retry_pending if self._refusals and not everything else None
        for event_id, held in self._held.pop_front_while(
                lambda held: everything or (held.due_ns <= now_ns and not (
                    retry_pending and retry_pending(held.due_ns, now_ns)))):
            self._held_count -= len(held.dispatches)
            event = self._pending.get(event_id)
            if event is not None and event.cause is REASON_EVICTED:
                continue  # its answer may have been pushed out of full state (_on_emit): not judged
            dispatches, received = held.dispatches, held.received
            lost = self._answers_lost.latest
            if lost and event is None and self._verdicts.get(event_id) is None and any(
                    0 < dispatch.start_ns <= lost for dispatch in dispatches):
                # its event unknown now, maybe a written one pushed out of full state with the
                # users its writes reached (_pending_evicted): those started by then not judged
                kept = [(dispatch, at) for dispatch, at in zip(dispatches, received)
                        if not 0 < dispatch.start_ns <= lost]
                if not kept:
                    continue
                dispatches, received = [k[0] for k in kept], [k[1] for k in kept]
            horizon = self._earlier_horizon
            if horizon and any(0 < dispatch.start_ns < horizon for dispatch in dispatches):
                # made before a process the earlier sidecar got spans of first reached this one:
                # its recipient's socket may have been written in another process, that write
                # exported there (a relay across a restart), as an event's (_judge_deadlines)
                kept = [(dispatch, at) for dispatch, at in zip(dispatches, received)
                        if not 0 < dispatch.start_ns < horizon]
                self.started_before += len(dispatches) - len(kept)
                if not kept:
                    continue
                dispatches, received = [k[0] for k in kept], [k[1] for k in kept]
            findings.extend(self._no_connection(dispatch, now_ns) for dispatch in dispatches)
            self._hold_reported(event_id, dispatches, received)

    def _held_evicted(self, event_id: object, held: object, _reason: str) -> None:
        """Held dispatches pushed out of full state (or past the TTL) are reported, not forgotten."""
        if isinstance(held, _Held):
            self._held_count -= len(held.dispatches)
            self._held_out.extend(held.dispatches)
            self._hold_reported(event_id, held.dispatches, held.received)  # type: ignore[arg-type]

    def _hold_reported(self, event_id: str, dispatches: Sequence[SpanRecord],
                       received: Sequence[int]) -> None:
        """The no-connection dispatches of ``event_id`` (arrived at ``received``) are reported: the
        finding covers its event (judged, it was covered while they were held: ``_Held.late``).
        While its emit is remembered (pending, or judged a wait ago) their recipients and times
        are kept with it: a written write arriving after that answers one was exported late, and
        that finding was false (DROPPED_LATE_EXPORT). At most MAX_HELD_PER_EVENT an event, and
        state.max_events in all (``_reported_kept``); beyond, a late export of theirs is not told."""
        event = self._pending.get(event_id) or self._verdicts.get(event_id)
        if event is None:
            early = self._early.get(event_id)
            if early.__class__ is _Early:  # its emit not come yet: covered, not followed
                early.reported = True  # type: ignore[union-attr]
            return
        reported = event.reported
        if reported is _LATE_COUNTED:
            return
        kept = reported if reported.__class__ is tuple else ()
        room = min(MAX_HELD_PER_EVENT - len(kept), self._reported_room - self._reported_kept)
        added = tuple((dispatch.target, dispatch.start_ns, received_ns)
                      for dispatch, received_ns in zip(dispatches[:max(room, 0)], received))
        self._reported_kept += len(added)
        event.reported = kept + added if kept or added else True

    def _hold_answered(self, event_id: str, pending: _Pending | None) -> None:
        """A write answered every held dispatch of ``event_id`` before its verdict: they queued it,
        it had a connection. Unless a finding was made on it, it is judged at its verdict as any
        event, by its writes (a late one: undelivered, ``deadline``)."""
        if pending is not None:
            if pending.cause == REASON_NO_CONNECTION and not pending.reported:
                pending.cause = REASON_EMIT_ERROR if pending.failed_inside else None
            return
        early = self._early.get(event_id)  # its emit not come yet
        if isinstance(early, _Early) and early.cause == REASON_NO_CONNECTION and not early.reported:
            early.cause = None

    def _no_connection(self, span: SpanRecord, now_ns: int) -> Finding:
        return make_finding(
            DELIVERY_NO_CONNECTION, span, now_ns,
            f"{short(span.implementation)} had no socket for the recipient of event "
            f"{span.event_type or '?'}",
            details={"event_id": span.event_id, "dispatch_writes": span.dispatch_writes})

    def _note_cause(self, event_id: str | None, pending: _Pending | None, reason: str,
                    reported: bool, start_ns: int = 0) -> None:
        if pending is None and event_id is not None:
            pending = self._verdicts.get(event_id)  # judged a wait ago: nothing early about it
        if pending is not None:
            target: _Pending | _Early = pending
        elif event_id is not None:
            early = self._early.get(event_id)
            if early.__class__ is not _Early:
                early = _Early(early)  # keeps a written write already seen (or None)
                self._early.put(event_id, early)
            target = early
        else:
            return
        if target.cause is None or (target.cause is REASON_EVICTED  # a failure says more
                                    and reason is not REASON_NO_CONNECTION):
            target.cause = reason
        target.reported = target.reported or reported
        if target.__class__ is _Early and start_ns > target.start_ns:  # type: ignore[union-attr]
            target.start_ns = start_ns  # type: ignore[union-attr]

    def _observe_latency(self, label: str, latency_ns: int) -> None:
        # buffered: the histogram takes a lock per observation, so the hot path only appends
        buffered = self._latencies.get(label)
        if buffered is None:
            buffered = self._latencies[label] = []
        buffered.append(latency_ns)
        if len(buffered) >= MAX_BUFFERED_LATENCIES:
            self._flush_latencies()

    def _flush_latencies(self) -> None:
        latencies, self._latencies = self._latencies, {}
        if self._latency is None:
            return
        for label, values in latencies.items():
            _observe_all(self._latency.labels(label), values)

    def _judge_deadlines(self, now_ns: int, findings: list[Finding]) -> None:
        if self._refusals:
            retry_pending = self._retry_pending
            due = lambda p: p.due_ns <= now_ns and not retry_pending(p.due_ns, now_ns)  # noqa: E731
        else:
            due = lambda p: p.due_ns <= now_ns  # noqa: E731
        for _, judged in self._verdicts.pop_front_while(due):  # no write in time came since
            self._let_go_reported(judged)
        for event_id, pending in self._pending.pop_front_while(due):
            if pending.delivered:
                self._let_go_reported(pending)
                continue
            if pending.start_ns and pending.start_ns < self._earlier_horizon and not pending.reported:
                # emitted before a process the earlier sidecar got spans of first reached this one:
                # its write may have gone there (the emit and its write in two processes, exported
                # on either side of a restart): not judged, as a run begun before is not
                self.started_before += 1
                self._let_go_reported(pending)
                continue
            emit = pending.emit
            reason = pending.cause or REASON_DEADLINE
            self._undelivered.add((self._label(emit.event_type), reason))
            if reason is REASON_EVICTED:
                # its write may have been pushed out of full state before it came: not known
                # undelivered, as an emit pushed out itself (_pending_evicted); its no-connection
                # dispatches still held are not judged (that write may have answered them)
                self._let_go_reported(pending)
                held = self._held.pop(event_id, None)
                if held is not None:
                    self._held_count -= len(held.dispatches)
                continue
            # kept one more wait, among the judged events (in deadline order: each due one wait on)
            pending.verdict, pending.due_ns = _JUDGED, now_ns + self._wait_ns
            # (an id emitted again after an early write of it, judged again: the latest kept)
            self._let_go_reported(self._verdicts.pop(event_id, None))
            self._verdicts.put(event_id, pending)
            held = self._held.get(event_id)
            if held is not None:
                # covered by dispatches still held (one that arrived after the emit is held past
                # this deadline): reported when their hold ends; a write that cancels them all is
                # late, undelivered then
                held.late = pending
            if held is None:
                # only its times are read from now on (a late write's): the record is let go,
                # as a written one's is (about 900 bytes an entry where the rest takes 200)
                pending.emit = None
            if pending.reported or held is not None or not self._undelivered_on:
                continue
            findings.append(self._undelivered_finding(emit, event_id, reason, now_ns))
            pending.verdict = _UNDELIVERED

    def _undelivered_finding(self, emit: SpanRecord, event_id: str, reason: str,
                             now_ns: int) -> Finding:
        return make_finding(
            DELIVERY_UNDELIVERED, emit, now_ns,
            f"event {emit.event_type or '?'} emitted by {short(emit.implementation)} was not "
            f"written to any socket within {self._deadline_s:g} s",
            details={"reason": reason, "event_id": event_id, "deadline_s": self._deadline_s})

    def _pending_evicted(self, _event_id: object, pending: object, reason: str) -> None:
        self._let_go_reported(pending)
        if not isinstance(pending, _Pending):
            return
        if not pending.delivered:
            self._undelivered.add((self._label(pending.event_type), REASON_EVICTED))
        elif (reason == EVICTED_CAPACITY and pending.written_to is not _NOBODY
                and pending.start_ns):
            # the users its writes reached are lost: a no-connection dispatch of it (a relay's
            # other process) started by its deadline, still held or to come, whose event is then
            # unknown, is not reported when its hold ends (_judge_held)
            self._answers_lost.note(pending.start_ns + self._deadline_ns)

    def _early_evicted(self, _event_id: object, early: object, reason: str) -> None:
        """An early write pushed out of the full table: its emit, when it comes, finds no write
        and would be reported undelivered, though written (or reported a second time: the
        failed write or no-connection dispatch that came first had its finding). Of the writes
        (and those failures) so lost, the latest start is kept: an emit started by then that
        finds no early write and gets none by its deadline is counted undelivered (``evicted``),
        not reported, nor are its no-connection dispatches (that write may have answered them).
        (Writes with no start time are not told; a TTL eviction is the documented wait: the emit
        came too late.)"""
        if reason != EVICTED_CAPACITY:
            return
        if early.__class__ is _Early:
            # a finding made on it already (a failed write, a no-connection dispatch reported:
            # the event is not reported twice) or a write kept: both lost with it
            written, started = early.written, early.start_ns if early.reported else 0  # type: ignore[union-attr]
        else:
            written, started = early, 0
        if written is not None and written[0] > started:  # type: ignore[index]
            started = written[0]  # type: ignore[index]
        if started:
            self._early_lost.note(started)

    def _judged_evicted(self, _event_id: object, judged: object, _reason: str) -> None:
        self._let_go_reported(judged)

    # --- runs --------------------------------------------------------------------------------------
    def _on_run_span(self, span: SpanRecord, now_ns: int, emitted: bool = True) -> None:
        run_id = span.run_id
        user = span.user or span.subject or span.owner or span.target  # as duplicates._run_user
        if run_id is self._last_run_id or run_id == self._last_run_id:
            # the run of the previous span: found and refreshed then, nothing touched since
            run = self._last_run
        else:
            run = self._runs.get(run_id)
            if run is None:
                judged = self._judged.touch(run_id)
                if judged is not None and not _another_users_run(judged, user):
                    # a straggler of a run already judged, or of one forgotten before its execute
                    # span came: judged from the events left, it would lack those forgotten. It
                    # keeps the mark (refreshed): a run that goes on longer than state.ttl_s after
                    # its judgement must not start again from its later spans alone
                    if judged is False and span.kind == _EXECUTE:
                        self._judged.put(run_id, True)
                        self._runs_completed.add((RUN_EVICTED,))
                    return
                # an executed run can leave the runs table alone (it holds every run, so it fills
                # first): it goes on with what it had
                run = self._executed.get(run_id) if judged is None else None
                if run is None:
                    run = _Run(now_ns)
                    if self._started_ns is not None:
                        self._see_source(span, run, now_ns)
                else:
                    run.last_ns = now_ns
                    self._executed.touch(run_id)
                self._runs.put(run_id, run)
            else:
                self._runs.refresh(run_id)
                run.last_ns = now_ns
                if run.execute is not None:
                    self._executed.touch(run_id)
            self._last_run_id, self._last_run = run_id, run
        users = run.users
        if user is not None and users is not None and user not in users:
            run.users = users + (user,) if len(users) < MAX_USERS_PER_RUN else None
        kind = span.kind
        if kind == _EMIT:
            event_type = span.event_type
            if emitted and event_type is not None:
                types = run.types
                if event_type not in types:
                    if len(types) < MAX_TYPES_PER_RUN:
                        types.append(event_type)
                else:
                    run.repeated |= 1 << types.index(event_type)
        elif kind == _EXECUTE:
            if span.start_ns:  # 0: no start time was sent, so no length (not one of 56 years)
                began = now_ns - (span.end_ns - span.start_ns)
                if began < run.started_ns:
                    run.started_ns = began
                if run.span_began_ns is None or span.start_ns < run.span_began_ns:
                    run.span_began_ns = span.start_ns
            if self._started_ns is not None and run.source != process_of(span.instance_id):
                # its events come from the process executing it, not from the first to send a span
                # of it (a relay's consumer in the process holding the user's socket)
                self._see_source(span, run, now_ns)
            first = run.execute is None
            if first or (run.execute_nested and not span.nested):
                # the first execute span, or the first outermost one: a nested call (a tool
                # re-entering the engine) that returned before the run was cancelled says nothing
                run.cancelled = span.cancelled
            elif not (span.nested and not run.execute_nested):
                run.cancelled = span.cancelled and run.cancelled
            if first:
                run.execute, run.execute_nested = span.culprit or culprit_of(span), span.nested
            elif run.execute_nested and not span.nested:
                # the outermost execution names the run best
                run.execute, run.execute_nested = span.culprit or culprit_of(span), False
            outer = span.outer_span_id if span.nested else None
            if first and outer is not None:
                # the call it ran inside still runs (it ends, and arrives, after it): so does the
                # run, whatever it pauses for meanwhile (an LLM call after a tool re-entered the
                # engine); its idle clock starts when that call arrives
                run.awaiting = outer
                waiting = self._awaited.get(outer)
                if waiting is None:
                    self._awaited.put(outer, [run_id])
                elif len(waiting) < MAX_RUNS_PER_OUTER_CALL:
                    waiting.append(run_id)
                else:  # a call that started more runs than kept: this one is not held
                    self._release(run_id, run)
            elif first:
                self._executed.renew(run_id, run)  # deadline order: at the back

    def _see_source(self, span: SpanRecord, run: _Run, now_ns: int) -> None:
        """A run's first span to arrive, or its execute span from another process: its backend
        process, and the earliest end of a run's span seen from that process (once per run and
        process: a process's spans arrive in the order they end). A process an earlier sidecar
        process got spans of gets no horizon when its first span here comes later than
        ``_restart_window_ns`` after the start."""
        process = run.source = process_of(span.instance_id)
        if process is None:  # not pathwatch's instrumentation: the arrival rule alone
            return
        horizon = self._horizons.get(process)
        if horizon is None:
            earlier = process in self._earlier_processes
            if earlier and now_ns - self._started_ns > self._restart_window_ns:  # type: ignore[operator]
                pass  # it reached this one long after the start: nothing of it went elsewhere
            else:
                if len(self._horizons) >= MAX_HORIZONS:
                    self._horizons.clear()  # backends come and go (restarts, a gateway's pods)
                self._horizons[process] = span.end_ns
                if earlier and span.end_ns > self._earlier_horizon:
                    self._earlier_horizon = span.end_ns
        elif span.end_ns < horizon:
            self._horizons[process] = span.end_ns
        if self._note_process is not None:  # at each run: the processes kept are those seen last
            self._note_process(process)

    def _first_of_process(self, span: SpanRecord, now_ns: int) -> None:
        """A span of a backend process an earlier sidecar process got spans of, which has no horizon
        yet: whatever its kind (a write, a dispatch of a run another process's span started here),
        its end is that process's horizon -- its spans that ended later came here. Taken from the
        first span of a run alone, a process whose first spans here were writes got its horizon
        from a later span, and every event emitted meanwhile, of any process, was excused."""
        if now_ns - self._started_ns > self._restart_window_ns:  # type: ignore[operator]
            self._unhorizoned.clear()  # the window is over: no horizon is taken any more
            return
        process = process_of(span.instance_id)
        if process not in self._unhorizoned:
            return
        self._unhorizoned.discard(process)
        if process not in self._horizons:
            if len(self._horizons) >= MAX_HORIZONS:
                self._horizons.clear()
            self._horizons[process] = span.end_ns
            if span.end_ns > self._earlier_horizon:
                self._earlier_horizon = span.end_ns

    def _began_before_start(self, run: _Run, started_ns: int) -> bool:
        """The run began before this sidecar started (its first span's arrival, less an execute
        span's length), or, of a backend process an earlier sidecar process got spans of, before
        the first span this one got from that process ended (on the backend's clock: a run whose
        later spans were held in the backend's export queue while no sidecar was up arrives long
        after it began)."""
        if run.started_ns < started_ns:
            return True
        if run.span_began_ns is None or run.source not in self._earlier_processes:
            return False
        horizon = self._horizons.get(run.source)  # type: ignore[arg-type]
        return horizon is not None and run.span_began_ns < horizon

    def _count_for_run(self, emit: SpanRecord) -> None:
        key = emit.run_id
        run = (self._runs.get(key) or self._executed.get(key)) if key is not None else None
        event_type = emit.event_type
        if run is None or event_type is None:
            return
        if event_type not in run.types:
            if len(run.types) < MAX_TYPES_PER_RUN:
                run.types.append(event_type)
        else:
            run.repeated |= 1 << run.types.index(event_type)

    def _judge_idle_runs(self, now_ns: int, findings: list[Finding]) -> None:
        cutoff, idle_ns = now_ns - self._idle_ns, self._idle_ns
        forget, judged, completed = self._runs.pop, self._judged.put, self._runs_completed.counts
        started = self._started_ns if self._started_ns is not None else -1
        if self._refusals:
            retry_pending = self._retry_pending
            idle = lambda r: (r.last_ns <= cutoff  # noqa: E731
                              and not retry_pending(r.last_ns + idle_ns, now_ns))
        else:
            idle = lambda r: r.last_ns <= cutoff  # noqa: E731
        for key, run in self._executed.pop_front_while(idle):
            forget(key, None)
            judged(key, self._judged_mark(key, run))
            if started >= 0 and self._began_before_start(run, started):
                completed[_STARTED_BEFORE_KEY] = completed.get(_STARTED_BEFORE_KEY, 0) + 1
                continue
            if run.cancelled:
                completed[_CANCELLED_KEY] = completed.get(_CANCELLED_KEY, 0) + 1
                continue
            began, lost = run.span_began_ns, self._forgotten_lost.latest
            if lost and began is not None and began <= lost:
                # its execution began before the mark of a run forgotten with events was let go
                # (span times): it may be that run, started again by its later spans without the
                # events forgotten (_mark_evicted)
                completed[_EVICTED_KEY] = completed.get(_EVICTED_KEY, 0) + 1
                continue
            missing = self._missing(run.types)
            outcome = _MISSING_EVENTS_KEY if missing else _COMPLETE_KEY
            completed[outcome] = completed.get(outcome, 0) + 1
            if missing and self._missing_on:
                execute = named(run.execute)
                findings.append(make_finding(
                    DELIVERY_MISSING_REQUIRED_EVENTS, execute, now_ns,
                    f"a run executed by {short(execute.implementation)} ended without "
                    f"{', '.join(missing)}",
                    event_type=missing[0],
                    details={"missing": missing, "emitted": sorted(run.types)}))

    def _missing(self, emitted: list[str]) -> list[str]:
        """The required event types a run that emitted ``emitted`` lacks (memoized: runs of one
        code path emit the same types)."""
        key = tuple(emitted)
        missing = self._missing_memo.get(key)
        if missing is None:
            required = self._required
            missing = tuple(event for event in required[:-1] if event not in emitted)
            if required and required[-1] not in emitted and not any(
                    event in self._terminal for event in emitted):
                missing += (required[-1],)
            if len(self._missing_memo) >= MAX_MEMOIZED_TYPE_SETS:
                self._missing_memo.clear()
            self._missing_memo[key] = missing
        return list(missing)

    def _outer_arrived(self, span_id: str, run_ids: list[str], now_ns: int) -> None:
        """The call ``span_id`` arrived: the runs whose nested calls ran inside it go idle from now."""
        for run_id in run_ids:
            run = self._runs.get(run_id)
            if run is not None and run.awaiting == span_id:
                run.last_ns = now_ns
                self._release(run_id, run)

    def _outer_not_seen(self, span_id: object, run_ids: object, _reason: str) -> None:
        """The call the runs' nested calls ran inside has not arrived within ``state.ttl_s`` (or the
        table is full): they are judged on their idle clock as they are."""
        for run_id in run_ids:  # type: ignore[attr-defined]
            run = self._runs.get(run_id)
            if run is not None and run.awaiting == span_id:
                self._release(run_id, run)

    def _release(self, run_id: str, run: _Run) -> None:
        """A run held for the call its nested ones ran inside goes on its idle clock as it is."""
        run.awaiting = None
        self._executed.renew(run_id, run)

    def _judged_mark(self, run_id: str, run: _Run) -> tuple[str, ...] | bool:
        """What ``_judged`` keeps of ``run`` once judged: its users, with those of the runs of its
        id judged before (their stragglers stay ignored), or True when they are not told."""
        users, before = run.users, self._judged.get(run_id)
        if not users or before is True or before is False:
            return True
        if before:
            users = before + tuple(user for user in users if user not in before)
        return users if len(users) <= MAX_USERS_JUDGED else True

    def _mark_evicted(self, _run_id: object, mark: object, reason: str) -> None:
        """The full judged-run table let go of a mark. That of a run forgotten with events before
        its execute came (False: ``_run_forgotten``) kept its later spans from starting it again,
        to be judged without those events. When it was lost is kept on the backend's clock (the
        latest end of the last span of a batch by then: the run's forgotten spans had ended), and
        a run whose execution began by then (``_Run.span_began_ns``: its execute spans start
        before its events) is counted evicted, not judged. (A mark let go after ``state.ttl_s``
        is the documented forgetting: the run was silent that long.)"""
        if mark is False and reason == EVICTED_CAPACITY:
            self._forgotten_lost.note(self._backend_now_ns)

    def _run_evicted(self, run_id: object, run: object, _reason: str) -> None:
        self._runs_completed.add((RUN_EVICTED,))
        if run_id not in self._runs:  # a later span must not start it again, without its past
            self._judged.put(run_id, self._judged_mark(run_id, run))  # type: ignore[arg-type]

    def _run_forgotten(self, run_id: object, run: object, _reason: str) -> None:
        """A run left the runs table (``state.ttl_s`` without a span of it — a tool running longer
        than that — or the table full). One still awaiting judgement goes on from the executed
        runs; otherwise its events are lost, and a run started again from its later spans would be
        judged as if it had never emitted them: it is marked instead, so that its later spans are
        ignored and its execute span, when it comes, counts it evicted."""
        if run_id in self._executed:
            return
        if run.awaiting is not None:  # type: ignore[attr-defined]
            # the call its nested ones ran inside has not come: judged as it is, from the executed runs
            self._release(run_id, run)  # type: ignore[arg-type]
            return
        if run.execute is not None:  # type: ignore[attr-defined]
            # counted evicted when it left the executed runs
            self._judged.put(run_id, self._judged_mark(run_id, run))  # type: ignore[arg-type]
        elif run.types:  # type: ignore[attr-defined]
            self._judged.put(run_id, False)


class _LostMark:
    """The latest of some span times lost from full state (an early write's start, ...), noted
    within the last one to two ``window_s`` on the detector's clock (two buckets, turned on tick):
    what it excuses is judged within that window of the loss, and a span of a clock far ahead
    noted once does not excuse everything for good. ``latest`` is 0 when nothing was lost."""

    __slots__ = ("latest", "_current", "_previous", "_since_ns", "_window_ns")

    def __init__(self, window_s: float) -> None:
        self.latest = self._current = self._previous = self._since_ns = 0
        self._window_ns = int(window_s * 1e9)

    def note(self, value_ns: int) -> None:
        if value_ns > self._current:
            self._current = value_ns
            if value_ns > self.latest:
                self.latest = value_ns

    def advance(self, now_ns: int) -> None:
        """On tick: a bucket older than the window is turned (what it noted counts one more)."""
        if not self._since_ns:
            self._since_ns = now_ns  # the first tick
        elif now_ns - self._since_ns > self._window_ns:
            # no tick for two windows (a stalled loop): what the bucket noted is that old
            turned = self._current if now_ns - self._since_ns <= 2 * self._window_ns else 0
            self._previous, self._current, self._since_ns = turned, 0, now_ns
            self.latest = turned


def _early_write(write: SpanRecord) -> tuple[int, int, str | None, str | None]:
    """What is kept of a written write that came before its emit: its start and end (judged when
    the emit comes), its socket's user and how it found its emit (``pathwatch.delivery.link``):
    made outside the emit call (not ``context``: another task, another process — a relay), it
    answers a no-connection dispatch of the event arriving after the emit (``_Pending.written_to``)."""
    return (write.start_ns, write.end_ns, write.connection_user, write.link)


def _written_to(pending: _Pending, user: str | None) -> None:
    """``user``'s socket got a written write of ``pending`` (``_Pending.written_to``)."""
    users = pending.written_to
    if users is _NOBODY:
        pending.written_to = user  # one user: no tuple (None: a connection with no user)
    elif users.__class__ is not tuple:
        if users != user:
            pending.written_to = (users, user)
    elif user not in users and len(users) < MAX_WRITTEN_USERS:  # type: ignore[arg-type]
        pending.written_to = (*users, user)  # type: ignore[misc]


def _another_users_run(judged: tuple[str, ...] | bool, user: str | None) -> bool:
    """Whether a span of ``user`` (``duplicates._run_user``) of a judged run id (``judged``: the judged runs'
    users) is another user's run of that id: one of a known user none of those runs had, and
    told apart from each of them (pseudonyms of one key, docs/conventions.md). Else a straggler."""
    if user is None or judged is True or judged is False or user in judged:
        return False
    return all(other_user(user, seen) for seen in judged)


def _to_recipient(user: str | None, target: str | None) -> bool:
    """A write on a connection of ``user`` may be to a dispatch's recipient ``target``: the same
    user, or one it cannot be told apart from (a connection with no user, a dispatch naming none,
    two pseudonyms made with two keys)."""
    return user is None or target is None or target == user or not other_user(target, user)


def _early_in_time(write_start_ns: int, emit: SpanRecord, deadline_ns: int) -> bool:
    """A write that arrived before its emit started (``write_start_ns``) within the deadline of the
    emit's start (span times, as ``_in_time``); without a start time on either span it is judged on
    its arrival, which came before the emit's: in time."""
    return not (write_start_ns and emit.start_ns) or write_start_ns - emit.start_ns <= deadline_ns


def _observe_all(child, latencies_ns: list[int]) -> None:
    """``child.observe`` for each latency, in one pass: a histogram child takes a lock per bucket
    and sum update, so the counts per bucket and the sum are added once, counted at C speed.
    Falls back to one ``observe`` per value if the client library's histogram is not laid out as
    expected."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if not latencies_ns:
        return
    if min(latencies_ns) < 0:  # clocks of two processes: clamp as observe(max(x, 0)) would
        latencies_ns = [latency if latency > 0 else 0 for latency in latencies_ns]
    seconds = list(map(truediv, latencies_ns, repeat(1e9)))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in seconds:
            child.observe(value)
        return
    last = len(bounds) - 1
    # observe() counts a value in the first bucket whose bound is >= it
    for index, count in Counter(map(partial(bisect_left, bounds), seconds)).items():
        buckets[min(index, last)].inc(count)
    total.inc(sum(seconds))
