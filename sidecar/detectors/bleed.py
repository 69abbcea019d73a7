"""Bleed: one user's context, object or event reaching another user (critical).

Per span (no state): owner vs ambient user, subject vs ambient user.
Per trace (spans arrive child-first, the request span last): a span's user vs the request's user
(a socket whose user changed after it connected: vs every user it had, ``connection_users``; one
of a user not listed by a request that had more users than it lists is let go, counted),
and a span that started after the request had ended (leaked context); until the request span arrives
the trace keeps the first span of each user and the latest-starting span (all that can be judged, in
constant memory however long the request lasts), later spans are judged at once. A trace can hold
several request spans (a service calling itself, or another instrumented service): the inner one
ends, and arrives, first. A request span with no parent is the trace's root for certain, whenever it
arrives; one with a parent may be an inner request, so what is found against it is held for
``PARENTED_ROOT_HOLD_S`` and judged again if the request span with no parent, or one that encloses
it and its sibling requests (up to the clock tolerance: see ``_takes_root``), arrives meanwhile (it
becomes the root); so is what passed it — the inner request's own user, carried by the inner request
span and the spans under it (one span stands for them all). A request span that arrives once the
root is known, and does not take a parented root's place, is judged like any other span of the trace
— unless it has the same parent as a parented root: a sibling request of the same caller (one not
instrumented with pathwatch: a BFF, a browser, a CLI making several calls in one trace), or, with a
parent of its own, ran within neither the root nor a sibling (``_apart``: a caller instrumented with
OpenTelemetry gives each call a span of its own; an inner request runs within its request). A sibling
is a root of its own, never judged against the first: a span under it (its child, else one that
started while it ran) is judged against it, and a span that started after every request of the trace
had ended is leaked context. Which request spans are siblings depends on which one is the root: when
the root changes, the request spans known are sorted again against the new one (``_resort``), so
that each request span is the root, an inner request or a sibling whatever the order they arrived
in. Up to ``MAX_SIBLINGS_PER_TRACE`` sibling requests are kept per trace (more are counted, and work
that cannot be placed under a kept one is let go, counted, not judged). Work that passed the first
request and names a parent that is not a known request may belong to a sibling still to come: per
parent span id the first span carrying a user and the latest-starting span are kept
(``MAX_STASHED_PER_TRACE`` parents) and judged again when a sibling request with that span id
arrives. Work that names its request (``pathwatch.request.span_id``) is judged against that request,
not placed by its times; while that request has not come (a socket's arrives when it closes) the
work waits for it (``_Parented.awaiting``, ``_awaits``: the latest-starting span and the first of
each user per request), and is judged as a span of the trace when it comes (``_awaited_request``);
work still waiting when its trace is let go is counted, not judged (``_trace_evicted``). Only a
trace whose root has a parent pays for any of this; a trace with an unparented root (the common
case) does no extra per-span work. Work naming a request span with a parent that came (an inner
request, most often) is judged against that request at once, whatever request encloses it or runs
beside it (``_under_named``): another user's work in it, and a task it left running.
Per event (either arrival order): an emit's target vs the user of every socket its event id was
written to; per dispatch: its target vs the sockets its child writes that carry no event id went to
(by parent span id), those that started before the dispatch ended (exactly: one process stamps
both, and a start stamped in whole milliseconds only moves earlier): a task the dispatch started
keeps it as its parent, and writes it makes later are not the dispatch's. A write of a fan-out (a
dispatch method the path map declares to send one message to several users) is joined only to its
dispatch, whatever event it carries: the event's emit names the one user who asked.
Per instance: a user-scoped instance that served two distinct ambient users.
Spans of an entry point that acts for other users by design (``rules.acting_for_entry_points``: a
support tool) are not judged by owner or subject, nor counted among an instance's users.

Overload: an enclosing request span in a request the receivers refused for overload
(``requests_refused``) comes on the exporter's retry, up to ``rules.export_retry_window_s`` after
the refusal, past ``PARENTED_ROOT_HOLD_S``: what was held against the inner request was, before,
reported once the hold ended (the outer request's later work as ``leaked_context``). A hold that
ended at T is not judged while a refusal made at or before T may still be retried
(``_refusals``, shared with the delivery and duplicates detectors): at most
``rules.export_retry_window_s`` longer, and only while refusals happen.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from instrumentation.attributes import DeliveryOutcomes, SpanKinds
from sidecar.config import RulesConfig, StateConfig
from sidecar.detectors._findings import TARGET, culprit_of, enabled_rules, make_finding, named, short
from sidecar.detectors._refusals import RefusalStretches
from sidecar.model import Finding, SpanRecord, other_user
from sidecar.rules import (
    BLEED_LEAKED_CONTEXT,
    BLEED_OWNER_VS_AMBIENT,
    BLEED_SHARED_INSTANCE,
    BLEED_SPAN_VS_ROOT_USER,
    BLEED_SUBJECT_VS_AMBIENT,
    BLEED_TARGET_VS_SOCKET_OWNER,
)
from sidecar.state import EVICTED_CAPACITY, BoundedTable, TableGroup
from sidecar.telemetry import Telemetry
from sidecar.types import ConsumeInterrupted

_REQUEST, _EMIT, _DISPATCH, _DELIVER = (
    SpanKinds.REQUEST, SpanKinds.EMIT, SpanKinds.DISPATCH, SpanKinds.DELIVER)
_JUDGED_KINDS = frozenset({SpanKinds.EXECUTE, _EMIT, _DISPATCH, _DELIVER})
_WRITTEN = DeliveryOutcomes.WRITTEN

#: findings against a parented root held per trace (see PARENTED_ROOT_HOLD_S); more are counted
MAX_PENDING_PER_TRACE = 256
#: distinct users remembered per trace while its request span has not arrived; more are counted
MAX_USERS_PER_TRACE = 16
#: sibling requests (same parent as a parented root, or apart from it) remembered per trace; more are counted
MAX_SIBLINGS_PER_TRACE = 16
#: request spans of a trace with a parented root that are neither the root nor its siblings, kept to
#: be sorted again when the root changes (see ``_Parented``): up to this many that arrived under a
#: root, and as many that a new root enclosed; more are counted (``trace_siblings``: each may be
#: one), and their parents kept (up to 4x as many, then any parent counts as theirs)
MAX_REQUESTS_PER_TRACE = 64
#: parent span ids under which spans that passed a parented root are kept, in case a sibling request
#: with that span id comes (see ``_Parented``); spans under more are counted
MAX_STASHED_PER_TRACE = 32
#: ``reason`` of pathwatch_detector_evidence_dropped_total{detector="bleed"}: what a per-trace bound
#: made the detector let go (the attribute counting it)
DROPPED_TRACE_USERS = "trace_users"  # users_dropped: a span naming a user beyond MAX_USERS_PER_TRACE
# held_dropped: a finding beyond MAX_PENDING_PER_TRACE held, or held when the hold was let go for
# capacity (not judged)
DROPPED_TRACE_HELD = "trace_held"
# siblings_dropped: a request beyond MAX_SIBLINGS_PER_TRACE, or beyond MAX_REQUESTS_PER_TRACE
DROPPED_TRACE_SIBLINGS = "trace_siblings"
DROPPED_TRACE_STASH = "trace_stash"  # stash_dropped: a parent beyond MAX_STASHED_PER_TRACE
DROPPED_UNPLACED = "unplaced"  # unplaced_dropped: work not judged, its request may be one not kept
# keys_dropped: two user ids that differ but were made with two keys (a key rotation, processes with
# different keys), or one raw and one pseudonymized: not compared (``model.other_user``)
DROPPED_KEYS = "pseudonym_keys"
# unlisted_dropped: a span of a user its request span does not list, under a request that had more
# users than it lists (``connection_users_truncated``): not judged against the request's user
DROPPED_CONNECTION_USERS = "connection_users"
DROPPED_REASONS = (DROPPED_TRACE_USERS, DROPPED_TRACE_HELD, DROPPED_TRACE_SIBLINGS,
                   DROPPED_TRACE_STASH, DROPPED_UNPLACED, DROPPED_KEYS, DROPPED_CONNECTION_USERS)
#: socket users remembered per event / per dispatch while the other side of the join is unknown
MAX_WRITES_PER_KEY = 16
#: how long findings against a request span that has a parent wait for an enclosing request span
PARENTED_ROOT_HOLD_S = 10.0
#: entry points whose answer ``_EntryPoints`` remembers (spans name a few dozen: route templates)
MAX_ENTRY_POINTS_REMEMBERED = 1024


class _EntryPoints(dict):
    """``rules.acting_for_entry_points``: ``self[entry_point]`` is whether a route template of it,
    or one of its globs, names the entry point; the answer is remembered (a dict lookup from then
    on: spans name a few dozen route templates; beyond a bound, computed each time)."""

    __slots__ = ("_exact", "_globs")

    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self._exact = frozenset(p for p in patterns if not _is_glob(p))
        self._globs = tuple(p for p in patterns if _is_glob(p))

    def __missing__(self, entry_point: str | None) -> bool:
        named = entry_point is not None and (entry_point in self._exact or any(
            fnmatch.fnmatchcase(entry_point, glob) for glob in self._globs))
        if len(self) < MAX_ENTRY_POINTS_REMEMBERED:
            self[entry_point] = named
        return named


def _is_glob(pattern: str) -> bool:
    """A glob of entry points (``/admin/*``): a route template has no ``*`` or ``?``."""
    return "*" in pattern or "?" in pattern


class _Parented:
    """A parented root request: its span (``request``), the fields of it read per span, and what
    only such a root needs.

    ``stash`` (parent span id -> [first span carrying a user, latest-starting span]; None until one)
    keeps spans that passed the root (or the request they were placed under) whose parent is neither
    the root nor a known sibling request: their parent may be a sibling request still to come, and
    they are judged against it when it does (a span passing the first request can fail its own); a
    span naming its request is kept under that request instead (an inner request so far). Two
    spans stand for all the others under that parent: every span that passed carries the user it
    passed (or none), and the latest-starting one is the only one that can have started after its
    request's end. An entry is dropped when a span with its parent's span id arrives that is not a
    request (they were deeper spans, placed by time). ``full``: sibling requests were dropped
    (``MAX_SIBLINGS_PER_TRACE``), so work under none of the kept ones cannot be placed.

    Whether a request span is a sibling, an inner request or the root depends on which request is
    the root, and that changes when an enclosing one arrives: the request spans known then are
    sorted again against the new root (``_resort``), so that each is placed as if it had arrived
    after it. ``requests`` (None until one) keeps the request spans that arrived under this root,
    neither a sibling nor enclosing it, judged as spans of the trace (inner requests, most of them;
    or say the caller's second request, arriving before its first, whose own inner request was the
    root); ``enclosed`` the roots before it and their siblings (the caller's requests can overlap:
    an inner request of one can enclose another). Each may turn out a sibling of a later root; one
    of ``requests`` may enclose it and take its place in turn. ``unsorted`` (None until one) holds
    the parent span ids of those not kept (``MAX_REQUESTS_PER_TRACE``): a later root with one of
    them is ``full`` (a sibling of it was let go, its work cannot be placed)."""

    __slots__ = ("span_id", "user", "users", "start_ns", "end_ns", "parent", "stash", "full",
                 "siblings", "passed", "request", "requests", "enclosed", "unsorted", "awaiting")

    def __init__(self, request: SpanRecord, stash: dict | None,
                 awaiting: dict | None = None) -> None:
        self.span_id = request.span_id
        self.user = request.user
        self.users = _users_of(request)  # a socket's users over its life (None: one)
        self.start_ns = request.start_ns
        self.end_ns = request.end_ns
        self.parent = request.parent_span_id  # the caller's span: siblings have it too
        self.stash: dict[str, list] | None = stash
        self.full = False
        # span id -> request span (the root's own entry its ``request``); None until a sibling comes
        self.siblings: dict[str, SpanRecord] | None = None
        self.passed: SpanRecord | None = None  # see ``_Trace``
        self.request = request  # sorted again when a request enclosing it arrives
        self.requests: list[SpanRecord] | None = None
        self.enclosed: list[SpanRecord] | None = None
        self.unsorted: set[str | None] | _Every | None = None
        # request span id -> [latest-starting span, first span of each user]: work naming a request
        # (``pathwatch.request.span_id``) not known yet (a live socket's), judged when it comes
        self.awaiting: dict[str, list[SpanRecord]] | None = awaiting


class _Every:
    """``_Parented.unsorted`` once too many parents were let go: every parent is among them."""

    __slots__ = ()

    def __contains__(self, _parent: object) -> bool:
        return True


_EVERY = _Every()


class _Trace:
    """A trace's root request (once its span arrived) and, until then, the few spans that stand for
    all the others: the first span of each user — the first whose user differs from the root's is
    the first that would be judged — and the latest-starting span, which starts after the root's end
    if any span does. Constant memory per trace however long its root lasts (a WebSocket
    connection's request span arrives when the socket closes).

    While the root request has a parent (it may be an inner request), ``root_request`` (a
    ``_Parented``; None for a root without a parent, so that an ordinary trace pays nothing for
    what follows) keeps it, and its ``passed`` one span that
    passed it carrying a user: every span that passes a root carries the root's user (or none), so
    one span — the first to arrive, else the request span itself — stands for all of them when a
    request span enclosing the root arrives and is judged against in its stead.

    Its ``siblings`` (span id -> request span, the root's own among them; None until one
    comes) keep the parented root and the request spans of the trace that have the same parent (the
    caller, not instrumented, made several requests in one trace) or ran apart from them (``_apart``:
    an instrumented caller's calls, each with a parent of its own). Each is a root of its own; a span is judged
    against the one it ran under (see ``_request_of``)."""

    __slots__ = ("root_known", "root_user", "root_users", "root_limit_ns", "root_request",
                 "first_user", "first_span", "other_users", "latest", "root_raised", "leak_raised",
                 "named_requests")

    def __init__(self, first: SpanRecord | None) -> None:
        self.root_known = False
        self.root_user: str | None = None
        # a socket whose user changed after it connected: every user it had (its request span's
        # ``connection_users``); a span of any of them ran for the root's user at its time
        self.root_users: tuple[str, ...] | None = None
        # the root's end + the clock tolerance: a later start is leaked context (the end itself is
        # this less the detector's tolerance: one int per trace, not two)
        self.root_limit_ns = 0
        self.root_request: _Parented | None = None  # only while the root has a parent
        # waiting for the request span (None once it has come)
        self.first_user: str | None = None
        self.first_span: SpanRecord | None = None  # the first span that named a user
        self.other_users: dict[str, SpanRecord] | None = None  # user -> first span, other users
        self.latest: SpanRecord | None = first  # the latest-starting span
        self.root_raised = False
        self.leak_raised = False
        # request span id -> request span, for the request spans with a parent that came (inner
        # requests, most of them; None until one, a (span id, request span) pair for one: the span
        # a parented root keeps anyway): work naming one of them is judged against it
        # (``_under_named``)
        self.named_requests: dict[str, SpanRecord] | tuple[str, SpanRecord] | None = None
        if first is not None:
            self.wait(first)

    def wait(self, span: SpanRecord) -> bool:
        """Keep what ``span`` adds; False when it names one user too many (not kept)."""
        if span.start_ns > self.latest.start_ns:  # type: ignore[union-attr]
            self.latest = span
        user = span.user
        if user is None or user == self.first_user:
            return True
        if self.first_user is None:
            self.first_user, self.first_span = user, span
            return True
        others = self.other_users
        if others is None:
            self.other_users = {user: span}
        elif user not in others:
            if len(others) >= MAX_USERS_PER_TRACE:
                return False
            others[user] = span
        return True

    def take_waiting(self) -> list[SpanRecord]:
        """The spans kept while the root was unknown, in arrival order; forgets them."""
        waiting = [] if self.first_span is None else [self.first_span]
        if self.other_users:
            waiting.extend(self.other_users.values())
        latest = self.latest
        if latest is not None and all(latest is not span for span in waiting):
            waiting.append(latest)
        self.first_user = self.first_span = self.other_users = self.latest = None
        return waiting


class _Judged:
    """Marks an emit / dispatch / instance already reported (one finding each)."""


_JUDGED = _Judged()


class BleedDetector:
    name = "bleed"

    def __init__(self, rules: RulesConfig, state: StateConfig, telemetry: Telemetry | None = None) -> None:
        on = enabled_rules(rules, "bleed")
        self._owner_on = BLEED_OWNER_VS_AMBIENT in on
        self._subject_on = BLEED_SUBJECT_VS_AMBIENT in on
        self._root_on = BLEED_SPAN_VS_ROOT_USER in on
        self._leak_on = BLEED_LEAKED_CONTEXT in on
        self._target_on = BLEED_TARGET_VS_SOCKET_OWNER in on
        self._shared_on = BLEED_SHARED_INSTANCE in on
        acting_for = rules.acting_for_entry_points
        self._acting_for = _EntryPoints(acting_for) if acting_for else None
        ttl = state.ttl_s
        # a trace let go with work awaiting its request (``_Parented.awaiting``) counts it
        self._traces: BoundedTable[str, _Trace] = BoundedTable(
            "bleed_traces", state.max_traces, ttl, on_evict=self._trace_evicted)
        # trace ids let go for capacity after their root request came: spans of them still coming
        # (another process's exporter, a retry) cannot be judged without it (``_trace_gone``)
        self._gone: BoundedTable[str, bool] = BoundedTable(
            "bleed_traces_gone", state.max_traces, ttl)
        # event id -> the emit's culprit tuple (or _JUDGED once reported, or when it names no target)
        self._emits: BoundedTable[str, object] = BoundedTable("bleed_emits", state.max_events, ttl)
        # event id -> socket user(s) written to before the emit arrived: a str, or a list of several
        self._early_writes: BoundedTable[str, object] = BoundedTable(
            "bleed_early_writes", state.max_events, ttl)
        # dispatch span id -> its culprit tuple with its end_ns appended (or _JUDGED); parent span
        # id -> (socket user, start_ns) of child writes (a list of them for several users). Writes
        # made inside a dispatch end before it, and arrive before it by as long as the dispatch ran
        # on after them plus the export delays (or after it, an export retried): like the event
        # join, each side waits for the other as long as the state remembers anything (docs/rules.md,
        # known limits). Child writes whose dispatch comes are taken out at once. Only writes that
        # started before their dispatch ended are joined: a task started in a dispatch (a queue's
        # writer started lazily by the first send) keeps it as its parent for its whole life
        self._dispatches: BoundedTable[str, object] = BoundedTable(
            "bleed_dispatches", state.max_events, ttl)
        self._child_writes: BoundedTable[str, object] = BoundedTable(
            "bleed_child_writes", state.max_events, ttl)
        # instance id -> (service instance, first ambient user seen), or _JUDGED once reported
        self._instances: BoundedTable[str, object] = BoundedTable(
            "bleed_instances", state.max_instances, ttl)
        # trace id -> [due_ns, trace, (span, completing, due_ns), ...]: findings against a parented
        # root, each held for the hold from when it was found (the first ``due_ns``: the earliest)
        self._held: BoundedTable[str, list] = BoundedTable(
            "bleed_held_verdicts", state.max_traces,
            max(ttl, PARENTED_ROOT_HOLD_S + rules.export_retry_window_s + 1),
            on_evict=self._held_evicted)
        self._hold_ns = int(PARENTED_ROOT_HOLD_S * 1e9)
        # overload refusals (requests_refused) whose retries may still come: a hold that ended
        # after one waits for its retry (the enclosing request span may be in it)
        self._refusals = RefusalStretches(rules.export_retry_window_s)
        # spans are stamped by different clocks (an SDK's whole-millisecond start vs a finer end,
        # skew between hosts): a start this little after a request's end is not leaked context
        self._tolerance_ns = round(rules.leaked_context_tolerance_ms * 1e6)
        self._late: list[Finding] = []  # judged outside consume/tick (evictions), returned next call
        self._now_ns = 0
        self.tables = TableGroup(telemetry, (
            self._traces, self._emits, self._early_writes, self._dispatches, self._child_writes,
            self._instances, self._held, self._gone))
        self.users_dropped = 0  # spans not kept: their trace already named too many users
        self.held_dropped = 0  # findings not held: their trace already held too many
        self.siblings_dropped = 0  # sibling requests not kept: their trace already had too many
        # spans failing their request let go, not judged: their trace dropped sibling requests, so
        # they may have run under one not kept
        self.unplaced_dropped = 0
        self.stash_dropped = 0  # spans that passed a parented root not kept for a sibling (too many)
        self.keys_dropped = 0  # pairs of user ids of two keys, not compared
        # spans not judged against their request's user: it had more users than it lists, this
        # span's among those not listed perhaps
        self.unlisted_dropped = 0
        self._dropped_metric = telemetry.detector_evidence_dropped if telemetry else None
        self._dropped_published = [0] * len(DROPPED_REASONS)

    # --- the data path -----------------------------------------------------------------------
    def consume(self, spans: Sequence[SpanRecord], now_ns: int) -> list[Finding]:
        self._now_ns = now_ns
        findings = self._take_late()
        traces = self._traces
        trace_of, refresh_trace, held_of = traces.get, traces.refresh, self._held.get
        # a run's spans come one after another: the trace of the previous span, already found and
        # moved to the back of the table's order (nothing else touches the table in between)
        last_trace_id: str | None = None
        last_trace: _Trace | None = None
        acting_for = self._acting_for
        try:  # costs nothing per span; says where a span made it fail (ConsumeInterrupted)
            for span in spans:
                kind = span.kind
                if kind == _REQUEST:
                    self._on_request(span, now_ns, findings)
                    last_trace_id = None
                    continue
                if kind not in _JUDGED_KINDS:
                    continue  # foreign spans and heartbeats carry no users
                user = span.user
                if user is not None:
                    if (span.owner is not None and span.owner != user and self._owner_on
                            and (acting_for is None or not acting_for[span.entry_point])):
                        findings.append(make_finding(
                            BLEED_OWNER_VS_AMBIENT, span, now_ns,
                            f"{short(span.implementation)} instance built for one user served another "
                            f"user's request", details={"kind": kind, "caller": span.caller}))
                    if (span.subject is not None and span.subject != user and self._subject_on
                            and (acting_for is None or not acting_for[span.entry_point])):
                        findings.append(make_finding(
                            BLEED_SUBJECT_VS_AMBIENT, span, now_ns,
                            f"{short(span.implementation)} was called with another user's data in its "
                            f"arguments", details={"kind": kind, "caller": span.caller}))
                    if (span.user_scoped and span.instance_id is not None and self._shared_on
                            and (acting_for is None or not acting_for[span.entry_point])):
                        self._on_scoped_instance(span, user, now_ns, findings)
                trace_id = span.trace_id
                if trace_id is last_trace_id or trace_id == last_trace_id:
                    trace = last_trace
                else:
                    trace = trace_of(trace_id)
                    if trace is not None:
                        refresh_trace(trace_id)
                    else:  # a new trace (once per trace), or one evicted while findings were held
                        held = held_of(trace_id)
                        if held is not None:
                            trace = held[1]
                            traces.put(trace_id, trace)
                if trace is None:
                    if self._gone.get(trace_id) is None:
                        last_trace_id, last_trace = trace_id, _Trace(span)
                        traces.put(trace_id, last_trace)  # waits for its request span
                    else:  # its root came and went (``_trace_gone``): not judged, counted
                        self.unplaced_dropped += 1
                        last_trace_id = None
                else:
                    last_trace_id, last_trace = trace_id, trace
                    if trace.root_known:
                        if trace.named_requests is not None and span.request_span_id is not None:
                            self._under_named(span, trace, span, now_ns, findings)
                        if trace.root_request is not None:
                            self._under_parented_root(span, trace, span, now_ns, findings)
                        elif ((user is not None and user != trace.root_user)
                                or span.start_ns > trace.root_limit_ns):  # else nothing to judge: no call
                            self._judge_against_root(span, trace, span, now_ns, findings)
                    elif not trace.wait(span):
                        self.users_dropped += 1
                if kind == _DELIVER:
                    self._on_deliver(span, now_ns, findings)
                elif kind == _EMIT:
                    self._on_emit(span, now_ns, findings)
                elif kind == _DISPATCH:
                    self._on_dispatch(span, now_ns, findings)
        except Exception as error:
            raise ConsumeInterrupted(span, findings) from error
        self.tables.enforce()  # capacity, once per batch
        return findings

    def requests_refused(self, first_ns: int, last_ns: int) -> None:
        """The receivers refused requests for overload from ``first_ns`` to ``last_ns`` (the
        pipeline's clock; ``RefusalObserver``): their exporters retry them, for up to
        ``rules.export_retry_window_s`` as it counts, an enclosing request span among them."""
        self._refusals.add(first_ns, last_ns)

    def tick(self, now_ns: int) -> list[Finding]:
        self._now_ns = now_ns
        findings = self._take_late()
        refusals = self._refusals
        refusals.expire(now_ns)
        if refusals:
            retry_pending = refusals.retry_pending
            ended = lambda due_ns: due_ns <= now_ns and not retry_pending(due_ns, now_ns)  # noqa: E731
        else:
            ended = lambda due_ns: due_ns <= now_ns  # noqa: E731
        for trace_id, held in self._held.pop_front_while(lambda held: ended(held[0])):
            self._judge_held(held, now_ns, findings, trace_id, ended)
        self.tables.advance(now_ns)
        findings.extend(self._take_late())
        self.tables.maybe_publish(now_ns)
        self._publish_dropped()
        return findings

    def _publish_dropped(self) -> None:
        """Publish the drop counters as deltas (on tick and drain: nothing per span)."""
        metric = self._dropped_metric
        if metric is None:
            return
        published = self._dropped_published
        counts = (self.users_dropped, self.held_dropped, self.siblings_dropped, self.stash_dropped,
                  self.unplaced_dropped, self.keys_dropped, self.unlisted_dropped)
        for index, count in enumerate(counts):
            if count != published[index]:
                metric.labels(self.name, DROPPED_REASONS[index]).inc(count - published[index])
                published[index] = count

    def drain(self, now_ns: int) -> list[Finding]:
        """At shutdown: what waits for a request span that would enclose a parented root is judged
        against the root it has, as when the hold ends."""
        self._now_ns = now_ns
        findings = self._take_late()
        for _trace_id, held in self._held.pop_front_while(lambda held: True):
            self._judge_held(held, now_ns, findings)
        self._publish_dropped()
        return findings

    def _other_user(self, a: str, b: str) -> bool:
        """Two user ids that differ name two users; ids of two keys cannot be compared (counted).
        On a finding's path only: every id of one key is marked with the same key id."""
        other = other_user(a, b)
        if other is None:
            self.keys_dropped += 1
            return False
        return other

    def _take_late(self) -> list[Finding]:
        late, self._late = self._late, []
        return late

    # --- per trace: root user and leaked context --------------------------------------------------
    def _on_request(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        trace = self._traces.touch(span.trace_id)
        if trace is None:
            # evicted while findings against its parented root are held: the hold keeps it, so that
            # an enclosing request still judges them again (a fresh trace would leave them to be
            # reported at the hold's end: what the outer request did after its call was leaked);
            # its root is known, so this request is placed like any other (a sibling, the new root)
            held = self._held.get(span.trace_id)
            if held is None and self._gone.get(span.trace_id) is not None:
                self.unplaced_dropped += 1  # its root came and went: not judged (``_trace_gone``)
                return
            trace = _Trace(None) if held is None else held[1]
            self._traces.put(span.trace_id, trace)
        if span.parent_span_id is not None:
            self._request_came(span, trace)
        if trace.root_known:
            root = trace.root_request
            awaiting = None if root is None else root.awaiting
            self._place_request(span, trace, now_ns, findings)
            if awaiting:  # work naming a request that had not come: this one, perhaps
                self._awaited_request(span, trace, awaiting, now_ns, findings)
            return
        trace.root_known = True
        _root_at(trace, span, self._tolerance_ns)
        pending = trace.take_waiting()
        root_user, root_users, root_limit_ns = span.user, trace.root_users, trace.root_limit_ns
        parented = trace.root_request
        for waiting in pending:
            if waiting.request_span_id is not None:
                if trace.named_requests is not None:
                    self._under_named(waiting, trace, span, now_ns, findings)
                if parented is not None and self._awaits(waiting, parented):
                    continue  # its request has not come: judged against it when it does
            user = waiting.user
            if ((user is None or user == root_user or (root_users is not None and user in root_users))
                    and waiting.start_ns <= root_limit_ns):
                if parented is not None:
                    if user is not None and parented.passed is None:
                        parented.passed = waiting  # judged again if an enclosing request arrives
                    self._stash(waiting, trace)  # its parent may be a sibling request still to come
                continue  # the common case, without a call
            self._judge_against_root(waiting, trace, span, now_ns, findings)
        if parented is not None and parented.passed is None and root_user is not None:
            parented.passed = span  # the inner request itself carries its user

    def _place_request(self, span: SpanRecord, trace: _Trace, now_ns: int,
                       findings: list[Finding]) -> None:
        """A request span of a trace whose root is known: a sibling, the new root, or a span of it."""
        root = trace.root_request
        if root is not None and span.parent_span_id == root.parent:
            self._sibling_request(span, trace, now_ns, findings)
        elif root is not None and (span.parent_span_id is None
                                   or _takes_root(span, root, self._tolerance_ns)):
            self._enclosing_request(span, trace, now_ns, findings)
        elif root is not None and _apart(span, root, self._tolerance_ns):
            # another call of an instrumented caller: a span of its own for each call
            self._sibling_request(span, trace, now_ns, findings)
        elif root is not None:
            # an inner request, so far: sorted again if the root changes
            requests = root.requests
            if requests is None:
                root.requests = [span]
            elif all(request.span_id != span.span_id for request in requests):  # not re-sent
                if len(requests) < MAX_REQUESTS_PER_TRACE:
                    requests.append(span)
                else:
                    self._not_sorted(root, (span,))
            self._under_parented_root(span, trace, span, now_ns, findings)
        elif ((span.user is not None and span.user != trace.root_user)
              or span.start_ns > trace.root_limit_ns):
            # an inner request is a span of the trace like the others: its user is judged in
            # either arrival order
            self._judge_against_root(span, trace, span, now_ns, findings)

    def _sibling_request(self, span: SpanRecord, trace: _Trace, now_ns: int,
                         findings: list[Finding]) -> None:
        """A request span with the parent of the trace's parented root: another request of the same
        caller, a root of its own (never judged against the first). What is held against the root
        and ran under this one is judged against this one instead: what passes it is let go."""
        root = trace.root_request
        siblings = root.siblings  # type: ignore[union-attr]
        if siblings is None:
            if span.span_id == root.span_id:  # type: ignore[union-attr]
                return  # the root again
            root.siblings = siblings = {root.span_id: root.request}  # type: ignore
        elif span.span_id in siblings:
            return
        stash = root.stash  # type: ignore[union-attr]
        stashed = None if stash is None else stash.pop(span.span_id, None)
        if len(siblings) >= MAX_SIBLINGS_PER_TRACE:
            # the spans under it cannot be placed: let go (see _judge_against_root), not judged
            # against the others
            self.siblings_dropped += 1
            root.full = True  # type: ignore[union-attr]
            if stashed is not None:
                self.unplaced_dropped += 1
            return
        siblings[span.span_id] = span
        self._inner_of_sibling(span, trace, now_ns, findings)
        held = self._held.get(span.trace_id)
        if held is not None:
            tol = self._tolerance_ns
            kept = []
            for entry in held[2:]:
                user, end_ns, users = _request_of(trace, entry[0], tol)
                if not _passes(entry[0], user, end_ns, tol, users):
                    kept.append(entry)
                else:  # placed by its time, it may have run under a request still to come
                    self._stash(entry[0], trace)
            if kept:
                held[2:] = kept
            else:
                self._held.pop(span.trace_id, None)
        if stashed is not None:  # passed the request they were placed under, ran under this one
            first, latest = stashed
            for under in (latest,) if first is None or first is latest else (first, latest):
                if not _passes(under, span.user, span.end_ns, self._tolerance_ns,
                               span.connection_users):
                    self._judge_against_root(under, trace, span, now_ns, findings)

    def _inner_of_sibling(self, span: SpanRecord, trace: _Trace, now_ns: int,
                          findings: list[Finding]) -> None:
        """Siblings taken for calls of their own (``_apart``) that the new sibling ``span`` holds
        within its window were its inner requests (they end, and arrive, first): judged against it
        as spans of the trace, and kept to be sorted again as the root's other inner requests are."""
        root: _Parented = trace.root_request  # type: ignore[assignment]
        siblings, tol = root.siblings, self._tolerance_ns
        inner = [sibling for sibling in siblings.values()  # type: ignore[union-attr]
                 if sibling is not span and sibling.span_id != root.span_id
                 and sibling.parent_span_id != root.parent and _encloses(span, sibling, tol)]
        for request in inner:
            del siblings[request.span_id]  # type: ignore[union-attr]
            if root.requests is None:
                root.requests = [request]
            elif len(root.requests) < MAX_REQUESTS_PER_TRACE:
                root.requests.append(request)
            else:
                self._not_sorted(root, (request,))
            self._under_parented_root(request, trace, request, now_ns, findings)

    def _under_parented_root(self, span: SpanRecord, trace: _Trace, completing: SpanRecord,
                             now_ns: int, findings: list[Finding]) -> None:
        """A span of a trace whose root has a parent (not the hot path): judged against the request
        it ran under; one that passes is kept if its parent may be a sibling request still to come."""
        root = trace.root_request
        stash = root.stash  # type: ignore[union-attr]
        if stash and span.span_id in stash and span.kind != _REQUEST:
            del stash[span.span_id]  # not a request: the spans kept under it were deeper ones
        if span.request_span_id is not None and self._awaits(span, root):  # type: ignore[arg-type]
            return  # its request has not come (a live socket's): judged against it when it does
        if root.siblings is None:  # type: ignore[union-attr]
            user, end_ns, users = trace.root_user, root.end_ns, root.users  # type: ignore[union-attr]
        else:
            user, end_ns, users = _request_of(trace, span, self._tolerance_ns)
        if _passes(span, user, end_ns, self._tolerance_ns, users):
            self._stash(span, trace)
        else:
            self._judge_against_root(span, trace, completing, now_ns, findings)

    def _stash(self, span: SpanRecord, trace: _Trace) -> None:
        """Keep ``span``, which passed, if its parent may be a sibling request still to come; one
        naming its request (``pathwatch.request.span_id``) under that request, when it is not the
        root or a sibling: a request taken for an inner one turns out a sibling when the root
        changes (``_resort``), and what passed the root is then judged against it."""
        named = span.request_span_id
        parent = span.parent_span_id if named is None else named
        root = trace.root_request
        if parent is None or parent == root.span_id:  # type: ignore[union-attr]
            return
        siblings = root.siblings  # type: ignore[union-attr]
        if siblings is not None and parent in siblings:
            return
        stash = root.stash  # type: ignore[union-attr]
        if stash is None:
            root.stash = {parent: [span if span.user is not None else None, span]}  # type: ignore
            return
        kept = stash.get(parent)
        if kept is None:
            if len(stash) >= MAX_STASHED_PER_TRACE:
                self.stash_dropped += 1
                return
            stash[parent] = [span if span.user is not None else None, span]
            return
        if kept[0] is None and span.user is not None:
            kept[0] = span
        if span.start_ns > kept[1].start_ns:
            kept[1] = span

    def _awaits(self, span: SpanRecord, root: _Parented) -> bool:
        """``span`` names a request (``pathwatch.request.span_id``) the trace has not seen: it is
        kept for that request (``_Parented.awaiting``) instead of being placed by its times among
        the others (a socket's request span arrives when it closes). False for a known request, or
        beyond ``MAX_STASHED_PER_TRACE`` requests awaited (counted, ``trace_stash``: placed by its
        times, as work naming no request)."""
        named = span.request_span_id
        if _known_request(root, named):  # type: ignore[arg-type]
            return False
        awaiting = root.awaiting
        if awaiting is None:
            root.awaiting = awaiting = {}
        kept = awaiting.get(named)  # type: ignore[arg-type]
        if kept is None:
            if len(awaiting) >= MAX_STASHED_PER_TRACE:
                self.stash_dropped += 1
                return False
            awaiting[named] = [span] if span.user is None else [span, span]  # type: ignore[index]
            return True
        if span.start_ns > kept[0].start_ns:
            kept[0] = span  # the only one that can have started after its request's end
        user = span.user
        if user is not None and all(other.user != user for other in kept[1:]):
            if len(kept) <= MAX_USERS_PER_TRACE:
                kept.append(span)  # the first of its user: judged against the request's users
            else:
                self.users_dropped += 1
        return True

    def _awaited_request(self, span: SpanRecord, trace: _Trace, awaiting: dict, now_ns: int,
                         findings: list[Finding]) -> None:
        """The request span ``span`` came (placed already) to a trace where work waited for a
        request: what named it is judged against it as a span of the trace (``_under_parented_root``,
        which finds it the root, a sibling or an inner request). A root with no parent (the root
        for certain) judges all that waited; a request let go (``MAX_SIBLINGS_PER_TRACE``,
        ``MAX_REQUESTS_PER_TRACE``) leaves its work unplaced (counted)."""
        root = trace.root_request
        if root is None:
            waited = [under for kept in awaiting.values() for under in _distinct(kept)]
            awaiting.clear()
            for under in waited:
                self._judge_again(under, trace, span, now_ns, findings)
            return
        kept = awaiting.pop(span.span_id, None)
        if kept is None:
            return
        if trace.named_requests is not None:
            for under in _distinct(kept):
                self._under_named(under, trace, span, now_ns, findings)
        if not _known_request(root, span.span_id):
            self.unplaced_dropped += 1
            return
        for under in _distinct(kept):
            self._under_parented_root(under, trace, span, now_ns, findings)

    def _trace_evicted(self, trace_id: object, trace: object, reason: str) -> None:
        """A trace let go (``state.ttl_s``, capacity) with work still awaiting its request (a socket
        idle longer than the TTL, a request span lost): not judged, counted (``unplaced``) — unless
        findings against it are held: the hold keeps it (its next span takes it back), and counts
        what still awaits when it ends (``_judge_held``)."""
        if self._held.get(trace_id) is None:  # type: ignore[arg-type]
            self._let_go_awaiting(trace)  # type: ignore[arg-type]
            if reason == EVICTED_CAPACITY and trace.root_known:  # type: ignore[attr-defined]
                self._trace_gone(trace_id)  # type: ignore[arg-type]

    def _trace_gone(self, trace_id: str) -> None:
        """The trace was let go for capacity after its root request came (the table full: other
        traffic). Its spans still on their way — an inner request and work of another process,
        whose exporter sends later, an export retried — would start a fresh trace, where the first
        request span to come takes the root's place: an inner request, against which the outer
        request's work after the call is leaked context and another user's outer request a
        span_vs_root_user. The root does not come again: they are counted (``unplaced``), not
        judged by the trace rules, while the id is remembered (``state.max_traces`` ids, about 100
        bytes each, for ``state.ttl_s``). A trace let go for its TTL (idle that long) is judged
        afresh: a session's later request is a root of its own."""
        self._gone.put(trace_id, True)

    def _let_go_awaiting(self, trace: _Trace) -> None:
        root = trace.root_request
        if root is not None and root.awaiting:
            self.unplaced_dropped += len(root.awaiting)
            root.awaiting = None

    def _enclosing_request(self, span: SpanRecord, trace: _Trace, now_ns: int,
                           findings: list[Finding]) -> None:
        """A request span with no parent (the root for certain, whatever its stamps say of the
        parented root's), or one that encloses the trace's parented root and its siblings
        (``_takes_root``): the root was an inner request. It becomes the root; what was held against
        the inner one, what was kept under this one's span id (its children that passed the inner
        one), and the span that stood for what passed it (the inner request's user), are judged
        against it; so are the root's sibling requests, each standing for what passed it. Then the
        request spans known so far are sorted against it (``_resort``)."""
        inner = trace.root_request
        passed, siblings, requests = inner.passed, inner.siblings, inner.requests  # type: ignore
        # the root so far and its siblings: inner requests of this one, unless a later root finds
        # them its siblings (this one then an inner request of one of them)
        own = inner.request  # type: ignore[union-attr]
        enclosed = [own] if inner.enclosed is None else [*inner.enclosed, own]  # type: ignore
        if siblings is not None:
            enclosed.extend(sibling for sibling in siblings.values() if sibling is not own)
        stash = inner.stash  # type: ignore[union-attr]
        children = None if not stash else stash.pop(span.span_id, None)
        _root_at(trace, span, self._tolerance_ns)
        held = self._held.pop(span.trace_id, None)
        if held is not None:
            for entry in held[2:]:
                self._judge_again(entry[0], trace, span, now_ns, findings)
        if children is not None:
            first, latest = children
            for child in (latest,) if first is None or first is latest else (first, latest):
                self._judge_again(child, trace, span, now_ns, findings)
        if passed is not None:
            self._judge_again(passed, trace, span, now_ns, findings)
        if siblings is not None:
            for sibling in siblings.values():
                # the root's own entry: its user is stood for by ``passed``, it started before its end
                if sibling is not passed and sibling is not own:
                    self._judge_again(sibling, trace, span, now_ns, findings)
        root = trace.root_request
        if root is not None and root.passed is None and span.user is not None:
            root.passed = span  # this one may be an inner request too
        if root is not None:
            self._resort(requests, enclosed, trace, now_ns, findings)

    def _resort(self, requests: list[SpanRecord] | None, enclosed: list[SpanRecord], trace: _Trace,
                now_ns: int, findings: list[Finding]) -> None:
        """The parented root changed: the request spans known so far are sorted against the new one,
        as if they had arrived after it. One with its parent is its sibling (what is held against
        the new root and ran under that one is let go, what was kept for it is judged against it:
        ``_sibling_request``); then one that arrived under the root before and encloses the new one
        and its siblings takes its place in turn (and sorts the rest); the others stay spans of the
        trace (already judged, and judged again with what was held), kept for the next change."""
        root: _Parented = trace.root_request  # type: ignore[assignment]
        root_id, parent = root.span_id, root.parent
        kept_enclosed = []
        for request in enclosed:
            if request.parent_span_id == parent:
                self._sibling_request(request, trace, now_ns, findings)
            elif request.span_id != root_id:  # (the root's span, arrived twice)
                kept_enclosed.append(request)
        kept, taking = [], None
        if requests is not None:
            for request in requests:
                if request.parent_span_id == parent:
                    self._sibling_request(request, trace, now_ns, findings)
                elif request.span_id != root_id:
                    kept.append(request)
            for index, request in enumerate(kept):
                if _takes_root(request, root, self._tolerance_ns):
                    taking = kept.pop(index)
                    break
        if taking is None:  # (else sorted again against the one taking the root's place)
            # the caller's calls with spans of their own: apart from the root and its siblings;
            # the longest first, so that a call comes before the inner requests it holds
            tol = self._tolerance_ns
            for request in sorted((*kept_enclosed, *kept), key=lambda r: r.start_ns - r.end_ns):
                if _apart(request, root, tol):
                    self._sibling_request(request, trace, now_ns, findings)
            siblings = root.siblings
            if siblings is not None:
                kept_enclosed = [r for r in kept_enclosed if r.span_id not in siblings]
                kept = [r for r in kept if r.span_id not in siblings]
        if root.requests is not None:  # siblings' inner requests, found meanwhile (_inner_of_sibling)
            kept.extend(root.requests)
        if len(kept_enclosed) > MAX_REQUESTS_PER_TRACE:
            self._not_sorted(root, kept_enclosed[MAX_REQUESTS_PER_TRACE:])
            del kept_enclosed[MAX_REQUESTS_PER_TRACE:]
        root.requests, root.enclosed = kept or None, kept_enclosed or None
        unsorted = root.unsorted
        if unsorted is not None and parent in unsorted and not root.full:
            # a sibling of the new root may be one let go: work it cannot place is let go too
            root.full = True
            if root.siblings is None:
                root.siblings = {root_id: root.request}
        if taking is not None:
            self._enclosing_request(taking, trace, now_ns, findings)

    def _not_sorted(self, root: _Parented, requests: Sequence[SpanRecord]) -> None:
        """``requests`` are not kept to be sorted again (``MAX_REQUESTS_PER_TRACE``): counted, and
        their parents kept, so that a later root with one of them knows a sibling was let go."""
        self.siblings_dropped += len(requests)
        parents = root.unsorted
        if parents is _EVERY:
            return
        if parents is None:
            root.unsorted = parents = set()
        parents.update(request.parent_span_id for request in requests)  # type: ignore[union-attr]
        if len(parents) > 4 * MAX_REQUESTS_PER_TRACE:  # type: ignore[arg-type]
            root.unsorted = _EVERY

    def _judge_again(self, span: SpanRecord, trace: _Trace, completing: SpanRecord, now_ns: int,
                     findings: list[Finding]) -> None:
        """Judge ``span`` against the trace's new root; one that passes a root that may still be an
        inner request is kept to stand for its user (see ``_Trace``)."""
        user, users = span.user, trace.root_users
        if ((user is None or user == trace.root_user or (users is not None and user in users))
                and span.start_ns <= trace.root_limit_ns):
            root = trace.root_request
            if root is not None:
                if user is not None and root.passed is None:
                    root.passed = span
                self._stash(span, trace)  # its parent may be a sibling request still to come
            return
        self._judge_against_root(span, trace, completing, now_ns, findings)

    def _judge_held(self, held: list, now_ns: int, findings: list[Finding], trace_id: object = None,
                    ended: Callable[[int], bool] | None = None) -> None:
        """No enclosing request came within the hold: the parented root is the root. Only what was
        held for the whole hold (``ended``; all of it when None: at shutdown, or evicted) is judged;
        what was found later is held again for the rest of its own. A trace the table let go
        meanwhile (kept by the hold alone) goes when nothing is held: its awaiting work is counted."""
        trace = held[1]
        later = None
        for entry in held[2:]:
            if ended is None or ended(entry[2]):
                self._judge_against_root(entry[0], trace, entry[1], now_ns, findings, final=True)
            elif later is None:
                later = [entry[2], trace, entry]
            else:
                later.append(entry)
        if later is not None:
            self._held.put(trace_id, later)  # type: ignore[arg-type]
        elif trace_id is not None and self._traces.get(trace_id) is not trace:  # type: ignore
            self._let_go_awaiting(trace)

    def _held_evicted(self, trace_id: object, held: object, reason: str) -> None:
        """A hold let go by its table: past its TTL (longer than any hold) it is judged as when it
        ends. For capacity (``bleed_held_verdicts`` full: other traffic) its hold had not ended: an
        enclosing request still to come would clear what it holds (the outer request's work after
        its call), so judged now it may be a false critical finding: counted (``trace_held``), not
        reported, and the trace, if the trace table let it go too, is gone (``_trace_gone``)."""
        if reason != EVICTED_CAPACITY:
            self._judge_held(held, self._now_ns, self._late, trace_id)  # type: ignore[arg-type]
            return
        self.held_dropped += len(held) - 2  # type: ignore[arg-type]
        trace = held[1]  # type: ignore[index]
        if self._traces.get(trace_id) is not trace:  # type: ignore[arg-type]
            self._let_go_awaiting(trace)
            self._trace_gone(trace_id)  # type: ignore[arg-type]

    def _judge_against_root(self, span: SpanRecord, trace: _Trace, completing: SpanRecord,
                            now_ns: int, findings: list[Finding], final: bool = False) -> None:
        root = trace.root_request
        siblings = None if root is None else root.siblings
        if siblings is None:
            root_user, root_end_ns = trace.root_user, trace.root_limit_ns - self._tolerance_ns
            root_users = trace.root_users
        else:  # the root's caller made several requests: the one ``span`` ran under
            root_user, root_end_ns, root_users = _request_of(trace, span, self._tolerance_ns)
            if _passes(span, root_user, root_end_ns, self._tolerance_ns, root_users):
                return
            if (root.full and span.parent_span_id not in siblings  # type: ignore[union-attr]
                    and span.request_span_id not in siblings):  # type: ignore[union-attr]
                # its request may be one of those not kept: it cannot be placed, so it is not judged
                # (one that names a kept request, or is its child, is placed for certain)
                self.unplaced_dropped += 1
                return
        if root is not None and not final:
            # the root may be an inner request: held until an enclosing request span or the hold ends
            held = self._held.get(span.trace_id)
            due_ns = now_ns + self._hold_ns
            if held is None:
                self._held.put(span.trace_id, [due_ns, trace, (span, completing, due_ns)])
            elif len(held) < MAX_PENDING_PER_TRACE:
                held.append((span, completing, due_ns))
            else:
                self.held_dropped += 1
            return
        if root_users is not None:  # a socket whose user changed: a span of any of its users
            if span.user in root_users:  # ran for the socket's user at its time
                root_user = None
            elif root_users.__class__ is _PartialUsers:
                # the request had more users than it lists: this one may be one not listed
                if span.user is not None and span.user != root_user:
                    self.unlisted_dropped += 1
                root_user = None
            elif root_user is None:
                root_user = root_users[-1]
        if (root_user is not None and span.user is not None and span.user != root_user
                and not trace.root_raised and self._root_on and self._other_user(span.user, root_user)):
            self._other_users_work(span, trace, completing, now_ns, findings)
        if (span.start_ns > root_end_ns + self._tolerance_ns and not trace.leak_raised
                and self._leak_on):
            self._leaked(span, root_end_ns, trace, completing, now_ns, findings)

    @staticmethod
    def _other_users_work(span: SpanRecord, trace: _Trace, completing: SpanRecord, now_ns: int,
                          findings: list[Finding]) -> None:
        trace.root_raised = True  # the rest of the trace carries the same wrong user: once
        findings.append(make_finding(
            BLEED_SPAN_VS_ROOT_USER, span, now_ns,
            f"{short(span.implementation)} ran for a user other than its request's user",
            completing=completing, details={"kind": span.kind}))

    def _leaked(self, span: SpanRecord, end_ns: int, trace: _Trace, completing: SpanRecord,
                now_ns: int, findings: list[Finding]) -> None:
        trace.leak_raised = True
        late_ms = (span.start_ns - end_ns) / 1e6
        findings.append(make_finding(
            BLEED_LEAKED_CONTEXT, span, now_ns,
            f"{short(span.implementation)} started {late_ms:.0f} ms after its request had ended",
            completing=completing, details={"kind": span.kind, "late_ms": round(late_ms, 3)}))

    def _request_came(self, request: SpanRecord, trace: _Trace) -> None:
        """Remember the request span ``request`` (with a parent: an inner request, most often) for
        work naming it (``_under_named``): its end and its user(s), as many as a parented root keeps
        to sort again (``requests`` and ``enclosed``), more counted (``trace_siblings``)."""
        known = trace.named_requests
        if known is None or (known.__class__ is tuple and known[0] == request.span_id):
            trace.named_requests = (request.span_id, request)  # the common case: one
        elif known.__class__ is tuple:
            trace.named_requests = {known[0]: known[1], request.span_id: request}  # type: ignore
        elif request.span_id in known or len(known) < 2 * MAX_REQUESTS_PER_TRACE:
            known[request.span_id] = request  # type: ignore[index]
        else:
            self.siblings_dropped += 1

    def _under_named(self, span: SpanRecord, trace: _Trace, completing: SpanRecord, now_ns: int,
                     findings: list[Finding]) -> None:
        """``span`` names a request with a parent that came (``_request_came``): judged against it at
        once, whatever request encloses it or runs beside it (an inner request in a gateway's, a
        service a BFF's call for one user called, beside its call for another). Another user's (not
        one the request had) ran in it; one that started after it ended (beyond the clock tolerance:
        one process stamps both) was left running by it. No request still to come changes either."""
        known = trace.named_requests
        if known.__class__ is tuple:
            if known[0] != span.request_span_id:  # type: ignore[index]
                return
            request = known[1]  # type: ignore[index]
        else:
            request = known.get(span.request_span_id)  # type: ignore[union-attr,arg-type]
            if request is None:
                return
        span_user, user, users = span.user, request.user, request.connection_users
        if (span_user is not None and user is not None and span_user != user
                and (users is None or span_user not in users)
                and not trace.root_raised and self._root_on):
            if request.connection_users_truncated:
                self.unlisted_dropped += 1  # it may be one of the users not listed
            elif self._other_user(span_user, user):
                self._other_users_work(span, trace, completing, now_ns, findings)
        if (span.start_ns > request.end_ns + self._tolerance_ns and not trace.leak_raised
                and self._leak_on):
            self._leaked(span, request.end_ns, trace, completing, now_ns, findings)

    # --- per event: target vs socket owner ---------------------------------------------------------
    def _on_emit(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        event_id = span.event_id
        target = span.target
        if event_id is None or target is None or self._emits.get(event_id) is not None:
            # the first emit of an event id that names its target is the one judged; one that names
            # none (a nested emit, say) leaves the writes seen so far for it
            return
        early = self._early_writes.pop(event_id, None)
        if early is not None and self._target_on:
            if early.__class__ is str:
                if early != target and self._other_user(early, target):
                    self._emits.put(event_id, _JUDGED)
                    findings.append(self._event_bleed(span, span, now_ns, 1))
                    return
            elif any(user != target and self._other_user(user, target) for user in early):
                self._emits.put(event_id, _JUDGED)
                findings.append(self._event_bleed(span, span, now_ns, len(early)))
                return
        self._emits.put(event_id, span.culprit or culprit_of(span))  # its target, rarely a finding

    def _on_deliver(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        socket_user = span.connection_user
        if socket_user is None or (span.outcome is not None and span.outcome != _WRITTEN):
            return  # nothing reached another user's socket
        event_id = span.event_id
        fan_out = span.fan_out  # one message to several users by design: not the emit's user alone
        if event_id is not None and not fan_out:
            emit = self._emits.get(event_id)
            if emit is None:
                if self._early_writes.get(event_id) is None:
                    self._early_writes.put(event_id, socket_user)  # the common case: one write
                else:
                    _remember(self._early_writes, event_id, socket_user)
            elif (emit is not _JUDGED and emit[TARGET] is not None and emit[TARGET] != socket_user
                  and self._target_on and self._other_user(emit[TARGET], socket_user)):
                self._emits.put(event_id, _JUDGED)
                findings.append(self._event_bleed(emit, span, now_ns, 1))
        parent = span.parent_span_id
        if parent is not None and (event_id is None or fan_out):
            # a write that names its event is judged against the emit's target above; one that does
            # not, or one of a fan-out (a per-user send inside it has a target of its own), can
            # still be judged against the dispatch call that made it (its parent span)
            dispatch = self._dispatches.get(parent)
            if dispatch is None:
                _remember_write(self._child_writes, parent, socket_user, span.start_ns)
            elif (dispatch is not _JUDGED and dispatch[TARGET] is not None
                  and dispatch[TARGET] != socket_user and self._target_on
                  # a write that started after the dispatch ended is not one of its writes
                  and span.start_ns <= dispatch[-1] and self._other_user(dispatch[TARGET], socket_user)):
                self._dispatches.put(parent, _JUDGED)
                findings.append(self._dispatch_bleed(dispatch, span, now_ns))

    def _on_dispatch(self, span: SpanRecord, now_ns: int, findings: list[Finding]) -> None:
        target = span.target
        if target is None:
            # addressed to no one user (a fan-out, or its target did not resolve): its writes are
            # not judged against it, nor kept for it
            self._child_writes.pop(span.span_id, None)
            return
        if self._dispatches.get(span.span_id) is not None:
            # the same dispatch sent again (an export retried): what is known of it stays (judged
            # already: one finding per dispatch)
            return
        children = self._child_writes.pop(span.span_id, None)
        if children is not None and self._target_on:
            writes = (children,) if children.__class__ is tuple else children
            limit_ns = span.end_ns  # a later start is not a write of this call (one clock: exact)
            if any(user != target and start_ns <= limit_ns and self._other_user(user, target)
                   for user, start_ns in writes):
                self._dispatches.put(span.span_id, _JUDGED)
                findings.append(self._dispatch_bleed(span, span, now_ns))
                return
        # not the whole span: its culprit and its end (one slot more than the culprit alone)
        self._dispatches.put(span.span_id, (span.culprit or culprit_of(span)) + (span.end_ns,))

    @staticmethod
    def _event_bleed(emit: SpanRecord | tuple, completing: SpanRecord, now_ns: int,
                     writes: int) -> Finding:
        emit = named(emit)
        return make_finding(
            BLEED_TARGET_VS_SOCKET_OWNER, emit, now_ns,
            f"event {emit.event_type or '?'} emitted by {short(emit.implementation)} for one user "
            f"was written to another user's socket",
            completing=completing,
            details={"join": "event_id", "event_id": emit.event_id, "writes_seen": writes})

    @staticmethod
    def _dispatch_bleed(dispatch: SpanRecord | tuple, completing: SpanRecord, now_ns: int) -> Finding:
        dispatch = named(dispatch[:-1] if dispatch.__class__ is tuple else dispatch)  # less its end
        return make_finding(
            BLEED_TARGET_VS_SOCKET_OWNER, dispatch, now_ns,
            f"{short(dispatch.implementation)} sent a message addressed to one user to another "
            f"user's socket",
            completing=completing, details={"join": "parent_span", "event_id": dispatch.event_id})

    # --- per instance: one user-scoped instance, several users ------------------------------------
    def _on_scoped_instance(self, span: SpanRecord, user: str, now_ns: int,
                            findings: list[Finding]) -> None:
        # instance tokens are unique within one process: the service instance tells processes apart
        key = span.instance_id
        seen = self._instances.touch(key)
        if seen is None:
            self._instances.put(key, (span.service_instance, user))  # once per instance
        elif seen is not _JUDGED and seen[1] != user and seen[0] == span.service_instance:
            other = other_user(seen[1], user)
            if other is None:  # made with another key (a rotation): judged under the new one on
                self.keys_dropped += 1
                self._instances.put(key, (span.service_instance, user))
                return
            if not other:
                return
            self._instances.put(key, _JUDGED)
            findings.append(make_finding(
                BLEED_SHARED_INSTANCE, span, now_ns,
                f"one user-scoped {short(span.implementation)} instance served two users",
                details={"instance_id": span.instance_id, "users": 2}))


def _root_at(trace: _Trace, request: SpanRecord, tolerance_ns: int) -> None:
    """``request`` is the trace's root (so far: see ``PARENTED_ROOT_HOLD_S``)."""
    trace.root_user = request.user
    trace.root_users = _users_of(request)
    trace.root_limit_ns = request.end_ns + tolerance_ns
    old = trace.root_request
    # only a parented root keeps what it needs of its request (and the stash, for siblings to come);
    # a new root's own siblings, if any, are still to come
    new = trace.root_request = (
        _Parented(request, None, None) if old is None else _Parented(request, old.stash, old.awaiting)
    ) if request.parent_span_id is not None else None
    if new is not None and old is not None:
        new.unsorted = old.unsorted  # parents of request spans let go before it


def _encloses(request: SpanRecord, root: _Parented | SpanRecord, tolerance_ns: int) -> bool:
    """``request`` (a request span with a parent) encloses the parented ``root`` up to the skew
    between their hosts' clocks: moved by one offset of at most the tolerance (one clock stamps both
    ends of the root), the root's start and end fall within ``request``'s. So it started at most
    the tolerance after the root, ended at most the tolerance before it, and lasted at least as long
    (an inner request nested just inside the root does not)."""
    return (request.start_ns <= root.start_ns + tolerance_ns
            and request.end_ns + tolerance_ns >= root.end_ns
            and request.end_ns - request.start_ns >= root.end_ns - root.start_ns)


def _takes_root(request: SpanRecord, root: _Parented, tolerance_ns: int) -> bool:
    """``request`` (with a parent) encloses the parented ``root`` and each of its sibling requests
    with the root's parent (``_encloses``): the root's ancestors are its caller's, which made them
    all. One that encloses the root and not such a sibling is an inner request of another (one of
    the caller's requests can run within the window of an inner request of another). A sibling
    taken for a call of its own (``_apart``) need not be enclosed: it may be an inner request of
    this one that arrived before it."""
    if not _encloses(request, root, tolerance_ns):
        return False
    siblings, parent = root.siblings, root.parent
    return siblings is None or all(_encloses(request, sibling, tolerance_ns)  # type: ignore[arg-type]
                                   for sibling in siblings.values() if sibling.parent_span_id == parent)


def _apart(request: SpanRecord, root: _Parented, tolerance_ns: int) -> bool:
    """``request`` (with another parent than the parented ``root``'s, not taking its place) is
    another call of the root's caller: it ran within neither the root nor one of its siblings
    (``_encloses``, up to the clock tolerance). An instrumented caller — OpenTelemetry's HTTP client
    instrumentation, an Envoy proxy, a browser's web SDK — gives each call a span of its own, so its
    calls have parents of their own; an inner request runs within the request that made it."""
    if _encloses(root, request, tolerance_ns):  # type: ignore[arg-type]
        return False
    siblings = root.siblings
    return siblings is None or not any(_encloses(sibling, request, tolerance_ns)
                                       for sibling in siblings.values())


def _request_of(trace: _Trace, span: SpanRecord,
                tolerance_ns: int) -> tuple[str | None, int, tuple[str, ...] | None]:
    """(user, end, users) of the request ``span`` ran under (``users``: a socket's users over its
    life, ``connection_users``; None for one), among the trace's sibling requests: its
    parent; else one that was running when it started, up to the clock tolerance at either end
    (another host may stamp work under a request a little before the request's start) — one whose
    user it passes, if any: a span within the tolerance of two requests is placed under the one
    whose user it carries, each request authenticated its own; else the last to end before it
    started (it leaked from one of those: every request running by then had ended); else — it
    started before every one of them — the root. Among running ones, one with no user comes after
    one of the span's user and before one of another user (the span passes neither: see
    ``_passes``)."""
    siblings = trace.root_request.siblings  # type: ignore[union-attr]
    named = span.request_span_id  # the request it names, else its parent
    request = siblings.get(span.parent_span_id if named is None else named)  # type: ignore
    if request is None:
        start_ns, user = span.start_ns, span.user
        ended = anonymous = None
        for sibling in siblings.values():  # type: ignore[union-attr]
            if sibling.start_ns - tolerance_ns <= start_ns <= sibling.end_ns + tolerance_ns:
                if (user is None or sibling.user == user
                        or (sibling.connection_users is not None and user in sibling.connection_users)):
                    return sibling.user, sibling.end_ns, _users_of(sibling)
                if sibling.user is None:
                    if anonymous is None:
                        anonymous = sibling
                elif request is None:
                    request = sibling
            elif (sibling.end_ns + tolerance_ns < start_ns
                  and (ended is None or sibling.end_ns > ended.end_ns)):
                ended = sibling
        if anonymous is not None:
            request = anonymous
        if request is None:
            request = ended
            if request is None:
                return trace.root_user, trace.root_limit_ns - tolerance_ns, trace.root_users
    return request.user, request.end_ns, _users_of(request)


def _known_request(root: _Parented, span_id: str) -> bool:
    """A request span with ``span_id`` came to the trace and is kept: the root, a sibling, one
    judged as a span of the trace or one the root enclosed."""
    if span_id == root.span_id:
        return True
    siblings = root.siblings
    if siblings is not None and span_id in siblings:
        return True
    return any(known is not None and any(request.span_id == span_id for request in known)
               for known in (root.requests, root.enclosed))


def _distinct(kept: list[SpanRecord]) -> list[SpanRecord]:
    """The spans standing for the work awaiting a request (``_Parented.awaiting``), each once: the
    latest-starting one first (it may also be the first of its user)."""
    latest = kept[0]
    return [latest, *(span for span in kept[1:] if span is not latest)]


class _PartialUsers(tuple):
    """The users a request span lists (``connection_users``) when the request had more
    (``connection_users_truncated``: the instrumentation lists 16): a span of a user not listed
    may have run for one of the others, so it is not judged against the request's user
    (``DROPPED_CONNECTION_USERS``, counted). Membership is exact: such a span still fails the quick
    checks and reaches ``_judge_against_root``, where it is let go."""

    __slots__ = ()


def _users_of(request: SpanRecord) -> tuple[str, ...] | None:
    """The users ``request`` had over its life (``connection_users``; None for one), a
    ``_PartialUsers`` when it had more than it lists."""
    users = request.connection_users
    if users is not None and request.connection_users_truncated:
        return _PartialUsers(users)
    return users


def _passes(span: SpanRecord, user: str | None, end_ns: int, tolerance_ns: int,
            users: tuple[str, ...] | None = None) -> bool:
    """``span`` ran for the request's user (or names none; or one of ``users``, the users a socket
    had over its life) and started before its end (within the clock tolerance). A span naming a user does not pass a request with none: an anonymous request
    stands for no user, so what passed it would never be judged again against a request enclosing
    it (held instead; judged against the anonymous request alone, it raises nothing)."""
    return ((span.user is None or span.user == user or (users is not None and span.user in users))
            and span.start_ns <= end_ns + tolerance_ns)


def _remember(table: BoundedTable, key: str, socket_user: str) -> None:
    """Remember a socket user under ``key``: a plain str for one (no allocation), a list for more."""
    users = table.get(key)
    if users is None:
        table.put(key, socket_user)
    elif users.__class__ is str:
        if users != socket_user:
            table.put(key, [users, socket_user])
    elif len(users) < MAX_WRITES_PER_KEY and socket_user not in users:
        users.append(socket_user)


def _remember_write(table: BoundedTable, parent: str, socket_user: str, start_ns: int) -> None:
    """Remember a child write of the dispatch ``parent`` (not arrived yet): (socket user, start) for
    one, a list of them for more, each user once with its earliest start (the dispatch's writes are
    those that started before it ended). A full list keeps the earliest-starting users."""
    writes = table.get(parent)
    if writes is None:
        table.put(parent, (socket_user, start_ns))  # the common case: one write
        return
    if writes.__class__ is tuple:
        if writes[0] != socket_user:
            table.put(parent, [writes, (socket_user, start_ns)])
        elif start_ns < writes[1]:
            table.put(parent, (socket_user, start_ns))
        return
    latest = 0
    for i, (user, user_start_ns) in enumerate(writes):
        if user == socket_user:
            if start_ns < user_start_ns:
                writes[i] = (socket_user, start_ns)
            return
        if user_start_ns > writes[latest][1]:
            latest = i
    if len(writes) < MAX_WRITES_PER_KEY:
        writes.append((socket_user, start_ns))
    elif start_ns < writes[latest][1]:
        writes[latest] = (socket_user, start_ns)
