"""Duplicates: work done by more than one implementation, or more than once (consolidation).

- duplicate execution: one run id executed by two or more non-nested execute spans of one role (an
  execution that failed -- raised, or was cancelled: a generator engine closed between two steps as
  its consumer was cancelled ends with its status as it was -- and ended before another of its role
  started was retried, not duplicated);
- duplicate emission: an exactly-once event type emitted by two or more non-nested, successful emit
  spans of one run, or one event id written (outcome ``written``) twice to the same connection (named
  after the emit call that re-sent it: below a pass-through -- a notifier wrapping the bridge -- the
  nested call doing the work, unless the pass-through delegated that event several times). Copies
  made by different calls (different parent spans, or none: an emit outside any span) are held for ``delivery_deadline_s``, longer while
  one of them was made outside every execute span of the run that has arrived (its execution may
  still run): when the run turns out to be executed twice (duplicated, or retried), they are that
  execution's consequence, not a second finding. An emit that names its execution
  (``pathwatch.execution.span_id``) is that execution's, whatever its start time: two executions
  overlapping in one trace are told apart. The run keeps the ids in ``_Emits``: no byte more per
  run in the common case (one execution), the id being a string the run holds already;
- entry point paths (info): an entry point of a service reaching a new implementation of a role it
  already reached with another one (raised once per change of that implementation set). Only the
  implementation doing the work counts: a call that delegates to a nested call of the same role (an
  alias, an adapter, a wrapping notifier) is a pass-through, not a second path;
- retired invoked: a retired implementation was called (once per implementation per window).

Each duplicate is raised once per (rule, run / event), not per extra span. A run is the pair (run id,
user): runs of two users that share a run id are two runs, not one run executed twice. A span's user
is its ambient user; one with none (a worker, ``loop.run_in_executor``) is of the user its call names
(``_run_user``). The culprit is the non-canonical implementation involved, else the later one.

An execution or exactly-once emit that reaches the detector twice (re-sent in a scope the receiver's
``ReplayGuard`` does not know: cut differently the second time) is one span, not a second one: one whose
span id is among the culprits its run keeps of that role / event type is ignored (a lookup, made
only when the run already has one). A write sent again is not known: an event keeps no span id of
its single write (that would cost ~73 bytes an event, some 17 MiB with 50,000 runs held), so it
counts as a second write to its connection.

Overload: an execute or emit span in a request the receivers refused for overload
(``requests_refused``) comes on the exporter's retry, up to ``rules.export_retry_window_s`` after
the refusal, past the holds above: a second execution whose span came so (concurrent with the first,
its copy of the event, naming no execution, started within the first one, which had arrived) was, before, reported as a
``duplicate.emission`` besides its ``duplicate.execution``; a duplicate write's emit as the
transport. So a held duplicate emission and a write awaiting its emitter whose hold ended at T are
not judged while a refusal made at or before T may still be retried (``_refusals``, shared with the
delivery detector): at most ``rules.export_retry_window_s`` longer, and only while refusals happen.
"""

from __future__ import annotations

from collections.abc import Sequence

from instrumentation.attributes import DeliveryOutcomes, SpanKinds
from sidecar.config import RulesConfig, StateConfig
from sidecar.detectors._findings import (
    EVENT_TYPE, PARENT_SPAN_ID, ROLE, SPAN_ID, START_NS, TRACE_ID, Culprit, culprit_of, enabled_rules,
    make_finding, named, short)
from sidecar.detectors._refusals import RefusalStretches
from sidecar.model import Finding, SpanRecord
from sidecar.rules import (
    DUPLICATE_EMISSION,
    DUPLICATE_ENTRY_POINT_PATHS,
    DUPLICATE_EXECUTION,
    DUPLICATE_RETIRED_INVOKED,
)
from sidecar.state import EVICTED_CAPACITY, OVERFLOW_LABEL, BoundedLabels, BoundedTable, TableGroup
from sidecar.telemetry import Telemetry
from sidecar.types import ConsumeInterrupted

_EXECUTE, _EMIT, _DISPATCH, _DELIVER = (
    SpanKinds.EXECUTE, SpanKinds.EMIT, SpanKinds.DISPATCH, SpanKinds.DELIVER)
_CALL_KINDS = frozenset({_EXECUTE, _EMIT, _DISPATCH})
_WRITTEN = DeliveryOutcomes.WRITTEN

RETIRED_WINDOW_S = 60.0
MAX_SPANS_PER_RUN_KEY = 16  # executions of one role / emissions of one type remembered per run
MAX_EXECUTES_PER_RUN = 64
MAX_IMPLEMENTATIONS_PER_PATH = 32  # implementations remembered per (entry point, role)
MAX_ENTRY_POINTS = 512  # (service, entry point) pairs
MAX_ROLES = 64
#: connections whose writes of one event id are counted (a duplicate is a second write to one of
#: them); a broadcast to more connections counts the writes to these only
MAX_CONNECTIONS_PER_EVENT = 16
#: ``reason`` of pathwatch_detector_evidence_dropped_total{detector="duplicates"}: what a per-event
#: or per-run bound made the detector let go (the attribute counting it)
DROPPED_EVENT_CONNECTIONS = "event_connections"  # connections_dropped: past MAX_CONNECTIONS_PER_EVENT
#: executions_dropped: an execution past MAX_SPANS_PER_RUN_KEY of its role or MAX_EXECUTES_PER_RUN
#: of its run, its role's duplicate not reported in that run (its span sent again counts again)
DROPPED_RUN_EXECUTIONS = "run_executions"
#: emissions_dropped: a duplicate emission held for its run's executions whose run was forgotten for
#: capacity (state.max_runs) first: not judged (its copies may be an execution's consequence)
DROPPED_HELD_EMISSIONS = "held_emissions"
#: paths_dropped: a call of an implementation past MAX_IMPLEMENTATIONS_PER_PATH of its (entry point,
#: role): not compared, its duplicate.entry_point_paths not reported
DROPPED_PATH_IMPLEMENTATIONS = "path_implementations"
DROPPED_REASONS = (DROPPED_EVENT_CONNECTIONS, DROPPED_RUN_EXECUTIONS, DROPPED_HELD_EMISSIONS,
                   DROPPED_PATH_IMPLEMENTATIONS)
#: duplicate emits made outside every execute span of their run that has arrived (their execution
#: may not have ended) wait at most this long for it: an agent run's execute span arrives when the
#: run ends, seconds or minutes later
MAX_EMISSION_HOLD_S = 120.0

_NONE, _AWAITING_EMITTER, _RAISED = 0, 1, 2
#: in ``_RunSpans.raised`` (no slot more a run): the run's earlier entry was forgotten for capacity
#: with evidence, so this one lacks it -- its held duplicate emissions are not judged (counted)
_FORGOTTEN = ("forgotten", "")


class _Emits(list):
    """A run's exactly-once emits (culprit tuples, as a plain list holds them) when one of them
    named its execution (``pathwatch.execution.span_id``): ``executions`` is that execution's span
    id when every one was made in it — the common case, the id being the string the execute span's
    culprit and the emits' parent ids hold already (the decoder interns it), and a list subclass with
    one slot taking no more memory than a list — else a list of them in step with the emits (None
    for one that named none: an older instrumentation's, a client's)."""

    __slots__ = ("executions",)

    executions: str | list[str | None]


class _RunSpans:
    """What one run's executions and exactly-once emissions left: culprit tuples, not spans."""

    __slots__ = ("user", "executes", "ends", "failed", "emits", "raised")

    def __init__(self, user: str | None) -> None:
        # the run's known user (None until a span of it carries one): spans with no user are
        # this run's, a second known user's are another run sharing the id (_find_run)
        self.user = user
        self.executes: list[tuple] = []  # culprit tuples (_findings.Culprit's layout)
        # their end times, in the same order: an int for the common single execution, else a list
        self.ends: int | list[int] | None = None
        # which of them failed (error status, or cancelled: pathwatch.cancelled): bit i for
        # executes[i] (at most MAX_EXECUTES_PER_RUN)
        self.failed = 0
        # exactly-once emits of every type, in arrival order (a run has one or two: a short list
        # costs less than a dict of lists); an _Emits when one of them named its execution
        self.emits: list[tuple] | None = None
        self.raised: set[tuple[str, str]] | None = None

    def first_time(self, key: tuple[str, str]) -> bool:
        if self.raised is None:
            self.raised = set()
        if key in self.raised:
            return False
        self.raised.add(key)
        return True


class _EventWrites:
    """An event id written twice or more: writes per connection (``MAX_CONNECTIONS_PER_EVENT`` of
    them), and its emit (when seen)."""

    __slots__ = ("emit", "writes", "state", "last_write", "max_count", "due_ns")

    def __init__(self, emit: tuple | None, first_connection: str) -> None:
        self.emit = emit
        self.writes: dict[str, int] = {first_connection: 1}
        self.state = _NONE
        # the write that made it a duplicate (a second write to one connection), kept only then: an
        # event written once to each of a user's tabs keeps no span
        self.last_write: SpanRecord | None = None
        self.max_count = 1
        self.due_ns = 0

    def add(self, connection: str) -> int:
        """Count one write; returns the writes to that connection so far, 0 for a write to a new
        connection past ``MAX_CONNECTIONS_PER_EVENT`` (not kept)."""
        writes = self.writes
        count = writes.get(connection, 0) + 1
        if count == 1 and len(writes) >= MAX_CONNECTIONS_PER_EVENT:
            return 0
        writes[connection] = count
        if count > self.max_count:
            self.max_count = count
        return count


class _Delegated:
    """The emitter of an event id while only emit calls nested in another emit call of it have
    arrived (a notifier delegating to the bridge: a nested emit keeps the outer one's event id, and
    arrives before it). Its writes are the innermost call's work -- the outer ones are pass-throughs
    -- unless that event was emitted by several nested calls that are not one chain: the call they
    run inside delegated it several times (it re-sent the event), and is named when it comes.
    Replaced by the emitter's plain culprit tuple when the outermost (non-nested) emit arrives."""

    __slots__ = ("culprit", "outer", "several")

    def __init__(self, culprit: tuple, outer: str | None) -> None:
        self.culprit = culprit  # the innermost call, or the call that delegated several times
        self.outer = outer  # span id of the emit call of its role the culprit runs inside
        self.several = False  # the call ``outer`` delegated the event several times

    def add(self, span: SpanRecord) -> None:
        """Another nested emit of the event id: the next link of the chain (the call the culprit
        runs inside), or another call inside one of them (the event delegated several times)."""
        span_id = span.span_id
        if span_id == self.outer:
            if self.several:  # the call that delegated it several times: the re-sender
                self.culprit, self.several = span.culprit or culprit_of(span), False
            self.outer = span.outer_span_id or span.parent_span_id
        elif span_id != self.culprit[SPAN_ID]:  # not the same span sent again
            self.several = True

    def emitter(self, span: SpanRecord) -> tuple:
        """The emitter, ``span`` being the event's outermost (non-nested) emit."""
        if self.several and span.span_id == self.outer:
            return span.culprit or culprit_of(span)
        return self.culprit


class DuplicatesDetector:
    name = "duplicates"

    def __init__(self, rules: RulesConfig, state: StateConfig, telemetry: Telemetry | None = None) -> None:
        on = enabled_rules(rules, "duplicate")
        self._execution_on = DUPLICATE_EXECUTION in on
        self._emission_on = DUPLICATE_EMISSION in on
        self._paths_on = DUPLICATE_ENTRY_POINT_PATHS in on
        self._retired_on = DUPLICATE_RETIRED_INVOKED in on
        self._exactly_once = frozenset(rules.exactly_once_events)
        # a duplicate write seen before its emit waits this long for the emitter (the culprit): as
        # long as the delivery detector waits for an emit's writes, the deadline and the export
        # allowance (the write ends inside its emit, which may be exported a schedule later)
        emitter_wait_s = rules.delivery_deadline_s + rules.delivery_export_allowance_s
        self._emitter_grace_ns = int(emitter_wait_s * 1e9)
        ttl = state.ttl_s
        retry_window_s = rules.export_retry_window_s
        self._runs: BoundedTable[str | tuple, _RunSpans] = BoundedTable(
            "duplicates_runs", state.max_runs, ttl, on_evict=self._run_evicted)
        # exactly-once duplicates made by different calls, held until the run's executions are known
        self._hold_ns = int(rules.delivery_deadline_s * 1e9)
        # (run, event type): a run holds one finding per exactly-once type (a retried or twice
        # executed run's copies of each), so as many as the runs' table holds runs, times them
        self._held: BoundedTable[tuple, tuple[Finding, int]] = BoundedTable(
            "duplicates_held_emissions", state.max_runs * max(1, len(self._exactly_once)),
            max(ttl, rules.delivery_deadline_s + MAX_EMISSION_HOLD_S + retry_window_s + 1),
            on_evict=self._held_evicted)
        self._max_hold_ns = int(MAX_EMISSION_HOLD_S * 1e9)
        # (span id, role) of calls a nested call of the same role ran inside: pass-throughs. A
        # nested call ends before the call it runs inside, and arrives before it by as long as that
        # call ran on after it (plus the export delays): the mark waits for it as long as the state
        # remembers anything (docs/rules.md, known limits). Marks asked for are taken out at once
        self._wrappers: BoundedTable[tuple, bool] = BoundedTable(
            "duplicates_wrappers", state.max_events, ttl)
        # run key -> its user ("" for none) of runs forgotten for capacity with evidence: a run
        # made again under that key lacks it (see _FORGOTTEN). Filled only by capacity evictions
        self._forgotten: BoundedTable[str | tuple, str] = BoundedTable(
            "duplicates_forgotten_runs", state.max_runs, ttl)
        # event id -> what is known of its writes. Most events are written once, so the value stays
        # allocation-free as long as it can: the connection id (str) of the single write, or the emit's
        # culprit tuple (no write yet), or (connection id, culprit); an _EventWrites from the second
        # write on. The tuples hold strings and numbers only: the GC stops tracking them.
        self._writes: BoundedTable[str, object] = BoundedTable(
            "duplicates_event_writes", state.max_events, ttl)
        self._awaiting: BoundedTable[str, _EventWrites] = BoundedTable(
            "duplicates_awaiting_emitter", state.max_events,
            max(ttl, emitter_wait_s + retry_window_s + 1), on_evict=self._awaiting_evicted)
        # overload refusals (requests_refused) whose retries may still come: a wait for an
        # emitter, or for an explaining execution, that ended after one waits for its retry
        self._refusals = RefusalStretches(retry_window_s)
        # (role, implementation) -> when its retired finding was last raised (once per window)
        self._retired_window_ns = int(RETIRED_WINDOW_S * 1e9)
        self._retired_seen: BoundedTable[tuple, int] = BoundedTable(
            "duplicates_retired_window", 4096, RETIRED_WINDOW_S)
        self.tables = TableGroup(telemetry, (self._runs, self._writes, self._awaiting, self._retired_seen,
                                             self._held, self._wrappers, self._forgotten))
        # service -> entry point -> role -> implementations reached (cardinality-limited: the
        # (service, entry point) pairs together). Per service: a gateway's services each have
        # their own path map, and two may name their engines' role and a route alike
        self._paths: dict[str | None, dict[str, dict[str, set[str]]]] = {}
        self._path_labels = BoundedLabels("duplicates_entry_points", MAX_ENTRY_POINTS)
        self._role_labels = BoundedLabels("duplicates_roles", MAX_ROLES)
        self._late: list[Finding] = []  # raised outside consume/tick (evictions), returned next call
        # writes not counted: their event id was already written to MAX_CONNECTIONS_PER_EVENT others
        self.connections_dropped = 0
        # executions not kept that could still have been a duplicate (past a run's bounds)
        self.executions_dropped = 0
        # held duplicate emissions let go unjudged: their run was forgotten for capacity
        self.emissions_dropped = 0
        self.paths_dropped = 0
        self._dropped_metric = telemetry.detector_evidence_dropped if telemetry else None
        self._dropped_published = dict.fromkeys(DROPPED_REASONS, 0)
        # the run entry of the previous call within one batch (see _run)
        self._last_run_id: str | None = None
        self._last_user: str | None = None
        self._last_key: str | tuple | None = None
        self._last_run: _RunSpans | None = None
        self._now_ns = 0

    # --- the data path -----------------------------------------------------------------------
    def consume(self, spans: Sequence[SpanRecord], now_ns: int) -> list[Finding]:
        self._now_ns = now_ns
        self._last_run_id = self._last_user = self._last_key = self._last_run = None  # tick
        # may have removed it
        findings: list[Finding] = self._take_late()
        paths_on, paths = self._paths_on, self._paths
        wrappers_put, find_run = self._wrappers.put, self._find_run
        try:  # costs nothing per span; says where a span made it fail (ConsumeInterrupted)
            for span in spans:
                kind = span.kind
                run_id = span.run_id
                if run_id is not None:
                    user = span.user or span.subject or span.owner or span.target  # _run_user
                    if run_id is not self._last_run_id or user is not self._last_user:
                        # any span of a run keeps its entry (if it has one) alive while it runs,
                        # however long: once per change of run, not per span (see _run)
                        find_run(run_id, user)
                if kind in _CALL_KINDS:
                    if span.retired and self._retired_on:
                        self._on_retired(span, now_ns, findings)
                    role = span.role
                    if paths_on and span.entry_point is not None and role is not None:
                        if span.nested:
                            # the call of its role this one runs inside (other spans may sit between,
                            # older instrumentation says only the parent) is a pass-through
                            # (see _is_pass_through)
                            outer = span.outer_span_id or span.parent_span_id
                            if outer is not None:
                                wrappers_put((outer, role), True)
                        entry_points = paths.get(span.service_name)
                        roles = (entry_points.get(span.entry_point) if entry_points is not None
                                 else None)
                        reached = roles.get(role) if roles is not None else None
                        if (reached is None or span.implementation not in reached) \
                                and not self._is_pass_through(span):
                            self._on_path(span, now_ns, findings)
                    if span.nested:
                        if kind == _EMIT and span.event_id is not None:
                            self._on_nested_emit_event(span)
                        continue
                    if kind == _EMIT:
                        if span.event_id is not None:
                            self._on_emit_event(span, now_ns, findings)
                        if (span.run_id is not None and span.event_type in self._exactly_once
                                and not span.error):
                            self._on_exactly_once_emit(span, now_ns, findings)
                    elif kind == _EXECUTE and span.run_id is not None:
                        self._on_execute(span, now_ns, findings)
                elif kind == _DELIVER:
                    if span.retired and self._retired_on:  # a socket-write class of the path map
                        self._on_retired(span, now_ns, findings)
                    if (span.outcome == _WRITTEN and span.event_id is not None
                            and span.connection_id is not None):
                        self._on_write(span, now_ns, findings)
        except Exception as error:
            raise ConsumeInterrupted(span, findings) from error
        self.tables.enforce()  # capacity, once per batch
        return findings

    def requests_refused(self, first_ns: int, last_ns: int) -> None:
        """The receivers refused requests for overload from ``first_ns`` to ``last_ns`` (the
        pipeline's clock; ``RefusalObserver``): their exporters retry them, for up to
        ``rules.export_retry_window_s`` as it counts, an emit or an execute span among them."""
        self._refusals.add(first_ns, last_ns)

    def tick(self, now_ns: int) -> list[Finding]:
        self._now_ns = now_ns
        findings = self._take_late()
        refusals = self._refusals
        refusals.expire(now_ns)
        if refusals:
            retry_pending = refusals.retry_pending
            due = lambda w: w.due_ns <= now_ns and not retry_pending(w.due_ns, now_ns)  # noqa: E731
        else:
            due = lambda w: w.due_ns <= now_ns  # noqa: E731
        for _event_id, writes in self._awaiting.pop_front_while(due):
            if writes.state == _AWAITING_EMITTER:
                findings.append(self._write_duplicate(writes, now_ns))
        self._release_held(now_ns, findings)
        self.tables.advance(now_ns)
        findings.extend(self._take_late())
        self.tables.maybe_publish(now_ns)
        self._publish_dropped()
        return findings

    def _publish_dropped(self) -> None:
        """Publish the drop counters as deltas (on tick and drain: nothing per span)."""
        if self._dropped_metric is None:
            return
        published = self._dropped_published
        for reason, dropped in ((DROPPED_EVENT_CONNECTIONS, self.connections_dropped),
                                (DROPPED_RUN_EXECUTIONS, self.executions_dropped),
                                (DROPPED_HELD_EMISSIONS, self.emissions_dropped),
                                (DROPPED_PATH_IMPLEMENTATIONS, self.paths_dropped)):
            if dropped != published[reason]:
                self._dropped_metric.labels(self.name, reason).inc(dropped - published[reason])
                published[reason] = dropped

    # --- duplicate execution / emission per run -----------------------------------------------------
    def _find_run(self, run_id: str, user: str | None) -> None:
        """Look up (and refresh) the entry of the run a span with ``run_id`` and ``user`` (its
        ``_run_user``) belongs to, for ``_run``. A run is keyed by its run id: spans with no user
        (no ambient user, and none named by the call) are the run's, and the first known user of it
        becomes its user. A span of another known user is another user's run sharing the id (two
        users' runs are two runs), keyed by (run id, user)."""
        key: str | tuple = run_id
        run = self._runs.touch(run_id)
        if run is not None and user is not None and run.user != user:
            if run.user is None:
                run.user = user
            else:
                key = (run_id, user)
                run = self._runs.touch(key)
        self._last_run_id, self._last_user, self._last_key, self._last_run = run_id, user, key, run

    def _run(self, run_id: str, user: str | None) -> _RunSpans:
        """The run's entry (see ``_find_run``), made on first sight. ``consume`` looks the entry up
        when a span's run differs from the previous span's: the entry it found, or that there was
        none, is reused as it is."""
        if run_id is not self._last_run_id or user is not self._last_user:
            self._find_run(run_id, user)
        run = self._last_run
        if run is None:
            run = self._last_run = _RunSpans(user)
            self._runs.put(self._last_key, run)
            if len(self._forgotten):
                forgotten_user = self._forgotten.pop(self._last_key, None)
                # its earlier entry's (not another user's run that took the key since)
                if forgotten_user is not None and (not forgotten_user or user is None
                                                   or forgotten_user == user):
                    run.raised = {_FORGOTTEN}
        return run

    def _on_execute(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        run = self._run(span.run_id, _run_user(span))
        executes, role = run.executes, span.role
        # bounded per role (a retry loop of one role must not hide another role's duplicate) and
        # per run
        same_role = [culprit for culprit in executes if culprit[ROLE] == role]
        if same_role and _holds(same_role, span.span_id):
            return  # this execution's span sent again
        if len(same_role) >= MAX_SPANS_PER_RUN_KEY or len(executes) >= MAX_EXECUTES_PER_RUN:
            # not kept: evidence let go unless the role's duplicate was reported already (its kept
            # executions may all be retries after a failure)
            raised = run.raised
            if raised is None or (DUPLICATE_EXECUTION, role or "") not in raised:
                self.executions_dropped += 1
            return
        culprit = span.culprit or culprit_of(span)
        if span.error or span.cancelled:  # a generator engine closed as it was cancelled: not ERROR
            run.failed |= 1 << len(executes)
        executes.append(culprit)
        ends = run.ends
        if ends is None:
            run.ends = span.end_ns
        elif ends.__class__ is int:
            run.ends = [ends, span.end_ns]
        else:
            ends.append(span.end_ns)
        if not same_role or not self._execution_on:
            return
        same_role = _not_retried(run, role)
        if len(same_role) < 2 or not run.first_time((DUPLICATE_EXECUTION, span.role or "")):
            return
        culprit = _culprit(same_role)
        implementations = sorted({s.implementation or "?" for s in same_role})
        how = "twice by" if len(implementations) == 1 else "by"
        findings.append(make_finding(
            DUPLICATE_EXECUTION, culprit, now_ns,
            f"one run of {span.role} executed {how} {', '.join(short(i) for i in implementations)}",
            completing=span,
            details={"executions": len(same_role), "implementations": implementations,
                     "trace_ids": sorted({s.trace_id for s in same_role})[:4]}))

    def _on_exactly_once_emit(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        run = self._run(span.run_id, _run_user(span))
        event_type = span.event_type
        culprit = span.culprit or culprit_of(span)
        if run.emits is None:
            _add_emit(run, culprit, span.execution_span_id)  # the run's first exactly-once emit
            return
        emits = [emit for emit in run.emits if emit[EVENT_TYPE] == event_type]
        if emits and (len(emits) >= MAX_SPANS_PER_RUN_KEY or _holds(emits, span.span_id)):
            return  # enough kept, or this emit's span sent again
        _add_emit(run, culprit, span.execution_span_id)
        emits.append(culprit)
        if len(emits) < 2 or not self._emission_on:
            return
        key = self._last_key  # the run's (_run just found it)
        if not run.first_time((DUPLICATE_EMISSION, event_type)):
            held = self._held.get((key, event_type))
            if held is not None:
                # a further copy while the finding is held: it names the culprit of them all (the
                # later non-canonical one) and counts it; the hold, its start and receipt stay
                finding, due_ns = held
                again = _emission_finding(span, emits, finding.detected_ns)
                again.received_ns = finding.received_ns
                self._held.put((key, event_type), (again, due_ns))
            return
        finding = _emission_finding(span, emits, now_ns)
        parents = {emit[PARENT_SPAN_ID] for emit in emits}
        if len(parents) == 1 and None not in parents:
            findings.append(finding)  # one call emitted it again: a duplicate whatever the executions
        else:
            # different calls emitted it, or calls not known (an emit with no parent ran outside
            # any span: in a thread that copied no context, each execution's a root of its own):
            # maybe two executions of the run (their spans end later)
            self._held.renew((key, span.event_type), (finding, now_ns + self._hold_ns))

    def drain(self, now_ns: int) -> list[Finding]:
        """At shutdown: duplicate writes still waiting for their emitter, and duplicate emissions
        still waiting for a duplicate execution that would explain them, are reported with what is
        known, as when their wait ends."""
        self._now_ns = now_ns
        findings = self._take_late()
        for _event_id, writes in self._awaiting.pop_front_while(lambda writes: True):
            if writes.state == _AWAITING_EMITTER:
                findings.append(self._write_duplicate(writes, now_ns))
        self._release_held(now_ns, findings, everything=True)
        self._publish_dropped()
        return findings

    def _release_held(self, now_ns: int, findings: list[Finding], everything: bool = False) -> None:
        retry_pending = self._refusals.retry_pending if self._refusals and not everything else None
        for key, (finding, _due) in self._held.pop_front_while(
                lambda held: everything or (held[1] <= now_ns and not (
                    retry_pending and retry_pending(held[1], now_ns)))):
            run_key = key[0]
            if self._explained(run_key):
                continue
            if self._partial(run_key):
                self.emissions_dropped += 1
                continue
            if (not everything and self._executing(run_key, key[1])
                    and now_ns - finding.detected_ns < self._max_hold_ns):
                # one copy's execution has not ended yet: it may be a second one, which explains it
                self._held.renew(key, (finding, now_ns + self._hold_ns))
                continue
            finding.detected_ns = now_ns  # judged now (it held the hold's start)
            findings.append(finding)

    def _executing(self, run_key: str | tuple, event_type: str) -> bool:
        """Whether one of the run's emits of ``event_type`` was made outside every execute span of
        the run that has arrived (an execute span arrives when its execution ends). One that named
        its execution (``pathwatch.execution.span_id``) was made in that one, whose span has come or
        not; of one that did not (an older instrumentation, a client), its call is not one of them,
        and it did not start within one of them in its trace (a call nested deeper) — two
        executions of one run overlapping in one trace look like one so. Such an emit may come from
        a second execution still running. Asked on the held finding's due time only: at most 16
        emits against 64 executes."""
        run = self._runs.get(run_key)
        if run is None or run.emits is None:
            return False
        executes = run.executes
        if not executes:
            return True
        ends = run.ends
        ends = (ends,) if ends.__class__ is int else ends
        emits = run.emits
        executions = emits.executions if emits.__class__ is _Emits else None  # type: ignore[attr-defined]
        for index, emit in enumerate(emits):
            if emit[EVENT_TYPE] != event_type:
                continue
            execution = (executions if executions is None or executions.__class__ is str
                         else executions[index])
            if execution is not None:
                if not _holds(executes, execution):  # type: ignore[arg-type]
                    return True
                continue
            parent, trace_id, start_ns = emit[PARENT_SPAN_ID], emit[TRACE_ID], emit[START_NS]
            for execute, end_ns in zip(executes, ends):  # type: ignore[arg-type]
                if execute[SPAN_ID] == parent or (
                        execute[TRACE_ID] == trace_id and execute[START_NS] <= start_ns <= end_ns):
                    break
            else:
                return True
        return False

    def _explained(self, run_key: str | tuple) -> bool:
        """Duplicate emits of a run that was executed twice (one role's two executions: a duplicate
        execution, or a retry after a failure) are that execution's consequence. Asked on a held
        finding's due time only."""
        run = self._runs.get(run_key)
        if run is None or len(run.executes) < 2:
            return False
        roles = [execute[ROLE] for execute in run.executes]
        return len(set(roles)) < len(roles)

    def _run_evicted(self, key: object, run: object, reason: str) -> None:
        """A run forgotten for capacity (``state.max_runs``) while a duplicate emission of it was
        held for its executions: those are no longer known (its next spans start the run afresh),
        so the copies cannot be told from a retried or duplicate execution's consequence -- let go,
        counted (``held_emissions``), not reported. A run forgotten after ``state.ttl_s`` of
        silence is not: a later execution is not compared with it (docs/rules.md)."""
        if reason != EVICTED_CAPACITY or not isinstance(run, _RunSpans):
            return
        if run.executes or run.emits:  # a run made again under its key lacks this
            self._forgotten.put(key, run.user or "")  # type: ignore[arg-type]
        for rule, event_type in run.raised or ():
            if rule == DUPLICATE_EMISSION and self._held.pop((key, event_type), None) is not None:
                self.emissions_dropped += 1

    def _partial(self, run_key: str | tuple) -> bool:
        """Whether the run's entry was made again after one forgotten for capacity with evidence
        (executions, copies): its duplicate emissions cannot be judged from what this one holds."""
        run = self._runs.get(run_key)
        return run is not None and run.raised is not None and _FORGOTTEN in run.raised

    def _held_evicted(self, key: object, held: object, _reason: str) -> None:
        if isinstance(held, tuple) and self._partial(key[0]):  # type: ignore[index]
            self.emissions_dropped += 1
        elif isinstance(held, tuple) and not self._explained(key[0]):  # type: ignore[index]
            held[0].detected_ns = self._now_ns
            self._late.append(held[0])

    def _is_pass_through(self, span: SpanRecord) -> bool:
        """Whether ``span`` is a pass-through: a nested call of its role ran inside it.

        A nested call ends (and arrives) before the call it runs inside, so the outer call's mark
        (put by ``consume``) is there when the outer span arrives, however long after the nested
        call it ended (up to ``state.ttl_s``). Asked only when the span would add a path: a mark
        left unasked expires with the table's TTL.
        """
        return self._wrappers.pop((span.span_id, span.role), None) is not None

    # --- duplicate writes of one event id to one connection -----------------------------------------
    def _on_emit_event(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        event_id = span.event_id
        known = self._writes.get(event_id)
        cls = known.__class__
        if known is None:
            self._writes.put(event_id, span.culprit or culprit_of(span))
        elif cls is str:
            self._writes.put(event_id, (known, span.culprit or culprit_of(span)))
        elif cls is _Delegated:  # its nested calls came first: the emitter is one of them, or it
            self._writes.put(event_id, known.emitter(span))
        elif cls is _EventWrites:
            if known.emit is None or known.emit.__class__ is _Delegated:
                known.emit = (span.culprit or culprit_of(span) if known.emit is None
                              else known.emit.emitter(span))
                if known.state == _AWAITING_EMITTER:
                    self._awaiting.pop(event_id, None)
                    findings.append(self._write_duplicate(known, now_ns))
        elif len(known) == 2 and known[1].__class__ is _Delegated:  # (connection, _Delegated)
            self._writes.put(event_id, (known[0], known[1].emitter(span)))
        # else: the emitter is already known (the first emit of an id names it)

    def _on_nested_emit_event(self, span: SpanRecord) -> None:
        """An emit nested in another emit call of its role (which it takes its event id from: a
        notifier delegating to the bridge): the writes made in it are its work, the outer call a
        pass-through (see ``_Delegated``). Arrives before the outer call."""
        event_id = span.event_id
        known = self._writes.get(event_id)
        cls = known.__class__
        if known is None:
            self._writes.put(event_id, _Delegated(span.culprit or culprit_of(span),
                                                  span.outer_span_id or span.parent_span_id))
        elif cls is str:
            self._writes.put(event_id, (known, _Delegated(span.culprit or culprit_of(span),
                                                          span.outer_span_id or span.parent_span_id)))
        elif cls is _Delegated:
            known.add(span)
        elif cls is _EventWrites:
            if known.emit is None:
                known.emit = _Delegated(span.culprit or culprit_of(span),
                                        span.outer_span_id or span.parent_span_id)
            elif known.emit.__class__ is _Delegated:
                known.emit.add(span)
        elif len(known) == 2 and known[1].__class__ is _Delegated:
            known[1].add(span)
        # else: the outermost emit came first (out of order): it names the emitter

    def _on_write(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        event_id, connection = span.event_id, span.connection_id
        known = self._writes.get(event_id)
        cls = known.__class__
        if known is None:
            self._writes.put(event_id, connection)
            return
        if cls is _EventWrites:
            writes = known
            count = writes.add(connection)
            if not count:
                self.connections_dropped += 1
                return
        elif cls is str:
            writes = _EventWrites(None, known)
            count = writes.add(connection)
            self._writes.put(event_id, writes)
        elif cls is _Delegated:  # calls nested in its emit came first: this is the first write
            self._writes.put(event_id, (connection, known))
            return
        elif len(known) == 2:  # (connection id, the emit's culprit): a second write
            writes = _EventWrites(known[1], known[0])
            count = writes.add(connection)
            self._writes.put(event_id, writes)
        else:  # the emit's culprit alone (a longer tuple): this is the first write
            self._writes.put(event_id, (connection, known))
            return
        if count < 2 or writes.state != _NONE or not self._emission_on:
            return  # a write to another connection (a user's second tab): nothing to report
        writes.last_write = span
        if writes.emit.__class__ is tuple:
            findings.append(self._write_duplicate(writes, now_ns))
        else:
            # writes made inside the emit call arrive before it: wait a little for the emitter (for
            # the outermost one when calls nested in it came: which of them re-sent it)
            writes.state = _AWAITING_EMITTER
            writes.due_ns = now_ns + self._emitter_grace_ns
            self._awaiting.put(event_id, writes)

    def _write_duplicate(self, writes: _EventWrites, now_ns: int) -> Finding:
        writes.state = _RAISED
        if writes.emit.__class__ is _Delegated:  # the outermost emit never came: the one known
            writes.emit = writes.emit.culprit  # type: ignore[union-attr]
        culprit = named(writes.emit or writes.last_write)
        return make_finding(
            DUPLICATE_EMISSION, culprit, now_ns,
            f"event {culprit.event_type or '?'} written {writes.max_count} times to the same socket "
            f"(emitter {short(named(writes.emit).implementation) if writes.emit else 'unknown'})",
            completing=writes.last_write,
            details={"join": "event_id", "event_id": writes.last_write.event_id,
                     "writes": writes.max_count, "emitter_known": writes.emit is not None})

    def _awaiting_evicted(self, _event_id: object, writes: object, _reason: str) -> None:
        if isinstance(writes, _EventWrites) and writes.state == _AWAITING_EMITTER:
            self._late.append(self._write_duplicate(writes, self._now_ns))

    def _take_late(self) -> list[Finding]:
        late, self._late = self._late, []
        return late

    # --- entry point paths and retired implementations ------------------------------------------------
    def _on_path(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        entry_points = self._paths.get(span.service_name)
        roles = entry_points.get(span.entry_point) if entry_points is not None else None
        if roles is None:
            # past the limit of (service, entry point) pairs: not reported (docs/rules.md)
            if self._path_labels((span.service_name, span.entry_point)) == OVERFLOW_LABEL:
                return
            roles = self._paths.setdefault(span.service_name, {}).setdefault(span.entry_point, {})
        implementations = roles.get(span.role)
        if implementations is None:
            label = self._role_labels(span.role)
            if label == OVERFLOW_LABEL:  # past the role limit: not reported (one bucket would mix roles)
                return
            implementations = roles.get(label)
            if implementations is None:
                implementations = set()
                roles[label] = implementations
        implementation = span.implementation or "?"
        if implementation in implementations:
            return
        if len(implementations) >= MAX_IMPLEMENTATIONS_PER_PATH:
            self.paths_dropped += 1  # a new one past the bound: not compared (counted per call)
            return
        implementations.add(implementation)
        if len(implementations) < 2:
            return
        findings.append(make_finding(
            DUPLICATE_ENTRY_POINT_PATHS, span, now_ns,
            f"{span.entry_point} reaches {len(implementations)} implementations of {span.role}",
            details={"implementations": sorted(implementations), "canonical": span.canonical,
                     "added": implementation}))

    def _on_retired(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        # per entry point: each one that still reaches the retired class is a caller to migrate
        key = (span.role, span.implementation, span.entry_point)
        raised_ns = self._retired_seen.get(key)
        if raised_ns is not None and now_ns - raised_ns < self._retired_window_ns:
            return
        self._retired_seen.renew(key, now_ns)  # the window starts again
        findings.append(make_finding(
            DUPLICATE_RETIRED_INVOKED, span, now_ns,
            f"retired {short(span.implementation)} ({span.role}) was called",
            details={"window_s": RETIRED_WINDOW_S, "caller": span.caller}))


def _run_user(span: SpanRecord) -> str | None:
    """The user whose run a span is of: its ambient user; a span with none (a worker outside any
    request, ``loop.run_in_executor``, a thread that copied no context) is of the user its call is
    for (subject), else the one its instance was built for (owner), else the one its event is
    addressed to (target). Without it, such a span of a run id two users share (clients numbering
    their requests from 1) counted for whichever user's run came first: another user's execution
    or exactly-once emit there was a false duplicate, and missing from its own run. ``consume``
    computes it inline."""
    return span.user or span.subject or span.owner or span.target


def _not_retried(run: _RunSpans, role: str | None) -> list[Culprit]:
    """The run's executions of ``role`` but those a later one retried: an execution that failed and
    ended before another execution of the role started (a retry after a failure is not a duplicate;
    an execution overlapping another, or one after a success, still is). Asked when a role's
    second execution arrives: a few executions."""
    executes, ends, failed = run.executes, run.ends, run.failed
    if ends.__class__ is int:
        ends = [ends]
    kept = [i for i, execute in enumerate(executes) if execute[ROLE] == role]
    return [named(executes[i]) for i in kept
            if not (failed >> i & 1
                    and any(executes[j][START_NS] >= ends[i] for j in kept if j != i))]


def _add_emit(run: _RunSpans, culprit: tuple, execution: str | None) -> None:
    """Keep an exactly-once emit of ``run``, with the execution it named (see ``_Emits``)."""
    emits = run.emits
    if emits is None:
        if execution is None:
            run.emits = [culprit]
        else:
            run.emits = emits = _Emits((culprit,))
            emits.executions = execution
        return
    if emits.__class__ is _Emits:
        known = emits.executions  # type: ignore[attr-defined]
        if known.__class__ is not str:
            known.append(execution)
        elif known != execution:  # another execution, or none: one each from now on
            emits.executions = [known] * len(emits) + [execution]  # type: ignore[attr-defined]
    elif execution is not None:
        run.emits = emits = _Emits(emits)
        emits.executions = [None] * (len(emits)) + [execution]
    emits.append(culprit)


def _holds(culprits: list[tuple], span_id: str) -> bool:
    """Whether one of ``culprits`` is the span ``span_id`` (the same span, sent again)."""
    for culprit in culprits:
        if culprit[SPAN_ID] == span_id:
            return True
    return False


def _emission_finding(span: SpanRecord, emits: list[tuple], now_ns: int) -> Finding:
    """The duplicate.emission of a run's copies ``emits`` of an exactly-once event, ``span`` the
    last of them to arrive."""
    copies = [named(emit) for emit in emits]
    implementations = sorted({s.implementation or "?" for s in copies})
    return make_finding(
        DUPLICATE_EMISSION, _culprit(copies), now_ns,
        f"exactly-once event {span.event_type} emitted {len(copies)} times in one run "
        f"(by {', '.join(short(i) for i in implementations)})",
        completing=span,
        details={"emits": len(copies), "implementations": implementations, "join": "run_id"})


def _culprit(spans: list[Culprit]) -> Culprit:
    """The later-started non-canonical span if any, else the later-started span."""
    non_canonical = [s for s in spans if not s.canonical]
    return max(non_canonical or spans, key=lambda s: s.start_ns)
