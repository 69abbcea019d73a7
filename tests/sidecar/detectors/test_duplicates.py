import pytest

from sidecar.detectors.duplicates import (MAX_CONNECTIONS_PER_EVENT, MAX_EMISSION_HOLD_S, MAX_ROLES,
                                         MAX_SPANS_PER_RUN_KEY, DuplicatesDetector)
from sidecar.model import Severity
from sidecar.config import RulesConfig
from sidecar.types import RefusalObserver
from sidecar.rules import (
    DUPLICATE_EMISSION,
    DUPLICATE_ENTRY_POINT_PATHS,
    DUPLICATE_EXECUTION,
    DUPLICATE_RETIRED_INVOKED,
)
from tests.sidecar.detectors.factory import (
    EMITTER,
    ENGINE,
    MS,
    NOW,
    OTHER_EMITTER,
    OTHER_ENGINE,
    RETIRED_ENGINE,
    S,
    T0,
    TRANSPORT,
    Trace,
    but,
    new_id,
    clean_run,
    rule_ids,
    rules,
    sample,
    state,
    tick_through,
)


ALIAS = "demo.engines.ExecutionEngine"  # an alias redirecting to the canonical engine (nested)


def detector(**rule_overrides: object) -> DuplicatesDetector:
    """Entry-point paths (info) are off unless a test asks: mixing implementations is the point here."""
    rule_overrides.setdefault("disabled", (DUPLICATE_ENTRY_POINT_PATHS,))
    return DuplicatesDetector(rules(**rule_overrides), state())


def test_clean_runs_raise_nothing():
    dup = detector(disabled=())
    findings = dup.consume(clean_run("user-a") + clean_run("user-b"), NOW)
    assert findings == []
    assert dup.tick(NOW + 600 * S) == []


# --- duplicate execution -----------------------------------------------------------------------------
def test_one_run_executed_by_two_implementations_names_the_non_canonical_one():
    http, ws = Trace(user="user-a", entry_point="/api/runs", run_id="run-1"), Trace(user="user-a", run_id="run-1")
    canonical = http.execute(ENGINE, start_ns=http.clock + 10 * MS)
    duplicate = ws.execute(OTHER_ENGINE, start_ns=ws.clock)  # started earlier, but not canonical
    [finding] = detector().consume([canonical, duplicate], NOW)
    assert finding.rule == DUPLICATE_EXECUTION and finding.severity is Severity.WARNING
    assert (finding.implementation, finding.span_id, finding.run_id) == (OTHER_ENGINE, duplicate.span_id, "run-1")
    assert finding.details["implementations"] == sorted([ENGINE, OTHER_ENGINE])
    assert finding.details["executions"] == 2


def test_one_run_executed_twice_by_the_same_implementation_names_the_later_call():
    trace = Trace(run_id="run-2")
    first, second = trace.execute(), trace.execute()
    [finding] = detector().consume([second, first], NOW)
    assert (finding.rule, finding.span_id) == (DUPLICATE_EXECUTION, second.span_id)


def test_duplicate_execution_is_raised_once_per_run_however_many_extra_spans():
    trace = Trace(run_id="run-3")
    findings = detector().consume([trace.execute(OTHER_ENGINE) for _ in range(4)], NOW)
    assert rule_ids(findings) == [DUPLICATE_EXECUTION]


@pytest.mark.parametrize("arrival", ["in_order", "retry_first"])
def test_a_run_retried_after_a_failed_execution_is_not_a_duplicate(arrival):
    # an execution that raised (an LLM timeout), retried once it had ended, was reported as the
    # run executed twice; its agent_started, sent again by the retry, is the retry's consequence
    # (found by review: /tmp/s27_dup/repro_retry_after_failure.py)
    trace = Trace(run_id="run-retry")
    failed = trace.execute(ENGINE, error=True, duration_ms=30)
    first_start = trace.emit("agent_started", parent=failed.span_id, start_ns=failed.start_ns + MS)
    trace.clock = failed.end_ns + 100 * MS  # the backoff
    retry = trace.execute(ENGINE)
    second_start = trace.emit("agent_started", parent=retry.span_id, start_ns=retry.start_ns + MS)
    spans = [first_start, failed, second_start, retry]
    dup = detector(delivery_deadline_s=1.0)
    found = dup.consume(spans if arrival == "in_order" else spans[2:] + spans[:2], NOW)
    found += tick_through(dup, NOW, NOW + int((MAX_EMISSION_HOLD_S + 10) * S))
    assert found == []


def test_a_failed_execution_is_a_duplicate_when_it_overlapped_another_or_came_after_one():
    # S4 with one of its two engines raising: they ran at once, neither retried the other
    trace = Trace(run_id="run-both")
    ok = trace.execute(ENGINE, duration_ms=300)
    assert rule_ids(detector().consume([trace.execute(OTHER_ENGINE, error=True), ok], NOW)) == [
        DUPLICATE_EXECUTION]
    # a run executed again after it succeeded, the second time failing
    trace = Trace(run_id="run-again")
    ok = trace.execute(ENGINE, duration_ms=30)
    trace.clock = ok.end_ns + MS
    assert rule_ids(detector().consume([ok, trace.execute(OTHER_ENGINE, error=True)], NOW)) == [
        DUPLICATE_EXECUTION]
    # a failure retried by two executions: those two are the duplicate, and named
    trace = Trace(run_id="run-retried-twice")
    failed = trace.execute(ENGINE, error=True, duration_ms=30)
    trace.clock = failed.end_ns + MS
    retries = [trace.execute(ENGINE), trace.execute(OTHER_ENGINE)]
    dup = detector()
    assert dup.consume([failed, retries[0]], NOW) == []
    [finding] = dup.consume([retries[1]], NOW)
    assert finding.rule == DUPLICATE_EXECUTION and finding.details["executions"] == 2
    assert finding.span_id == retries[1].span_id


@pytest.mark.parametrize("arrival", ["in_order", "retry_first"])
def test_a_run_retried_after_its_streaming_execution_was_cancelled_is_not_a_duplicate(arrival):
    """A generator engine (its span covers the iteration) closed between two steps as its consumer's
    task was cancelled (a timeout around the stream) ends with its status as it was, not ERROR, and
    says pathwatch.cancelled (docs/conventions.md): stopped as a coroutine engine cancelled mid-call
    is (that one ends in error), so the run started again once it had ended is a retry, not a
    duplicate (was: duplicate.execution, the same timeout and retry of a coroutine engine nothing)."""
    trace = Trace(run_id="run-stream-retry")
    cancelled = trace.execute(ENGINE, cancelled=True, duration_ms=30)
    trace.clock = cancelled.end_ns + 100 * MS  # the backoff
    retry = trace.execute(ENGINE)
    spans = [cancelled, retry] if arrival == "in_order" else [retry, cancelled]
    assert detector().consume(spans, NOW) == []
    # cancelled while another execution of the run ran (S4, one socket closing): still a duplicate
    trace = Trace(run_id="run-stream-both")
    ok = trace.execute(OTHER_ENGINE, duration_ms=300)
    [finding] = detector().consume([trace.execute(ENGINE, cancelled=True), ok], NOW)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EXECUTION, OTHER_ENGINE)


def test_nested_calls_other_roles_and_other_runs_are_not_duplicates():
    trace = Trace(run_id="run-4")
    outer = trace.execute("demo.engines.ExecutionEngine", canonical=False)
    spans = [
        trace.execute(ENGINE, nested=True, parent=outer.span_id),  # the alias delegating
        outer,
        trace.execute("demo.supervisors.SupervisorAgent", role="supervisor"),
        Trace(run_id="run-5").execute(ENGINE),
    ]
    assert detector().consume(spans, NOW) == []


def test_a_role_called_several_times_a_run_is_a_duplicate_execution_only_with_a_run_id():
    """README, Adding a role: a role of none of the four kinds (a cache, a repository) is an execute
    role; called several times in a run, it must have no ``run_id`` paths, or each run is judged
    executed twice."""
    trace = Trace(run_id="run-c")
    lookups = [trace.execute("app.cache.RunCache", role="run_cache", run_id=None, canonical=False,
                             user_scoped=False, owner=None, subject=None) for _ in range(3)]
    assert detector().consume(lookups, NOW) == []
    with_run_id = [but(span, run_id="run-c") for span in lookups]
    assert rule_ids(detector().consume(with_run_id, NOW)) == [DUPLICATE_EXECUTION]


# --- duplicate emission ------------------------------------------------------------------------------
def test_exactly_once_event_emitted_three_times_in_one_run_is_raised_once():
    trace = Trace(run_id="run-6")
    spans = [trace.emit("agent_started", EMITTER), trace.emit("agent_started", OTHER_EMITTER),
             trace.emit("agent_started", "demo.tracking.Tracker")]
    [finding] = detector().consume(spans, NOW)
    assert (finding.rule, finding.event_type, finding.run_id) == (DUPLICATE_EMISSION, "agent_started", "run-6")
    # raised when the evidence completed (the second emit), naming the non-canonical emitter
    assert (finding.implementation, finding.span_id) == (OTHER_EMITTER, spans[1].span_id)
    assert finding.details["emits"] == 2


def test_repeated_events_that_are_not_exactly_once_nested_or_failed_are_not_duplicates():
    trace = Trace(run_id="run-7")
    outer = trace.emit("agent_completed", "demo.emitters.Notifier")
    spans = [
        trace.emit("agent_thinking"), trace.emit("agent_thinking"),
        trace.emit("agent_completed", nested=True, parent=outer.span_id, event_id=outer.event_id), outer,
        trace.emit("agent_started", error=True), trace.emit("agent_started"),
        Trace(run_id="run-8").emit("agent_started"),
    ]
    assert detector().consume(spans, NOW) == []


def test_event_written_three_times_to_one_socket_emit_first_names_the_emitter():
    trace = Trace()
    emit = trace.emit("tool_completed", OTHER_EMITTER)
    writes = [trace.deliver(emit, link="message_key") for _ in range(3)]
    [finding] = detector().consume([emit, *writes], NOW)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EMISSION, OTHER_EMITTER)
    assert finding.details["join"] == "event_id"


def test_writes_arriving_before_their_emit_wait_for_it_and_name_the_emitter():
    trace = Trace()
    emit = trace.emit("tool_completed", OTHER_EMITTER)
    dup = detector()
    assert dup.consume([trace.deliver(emit), trace.deliver(emit), trace.deliver(emit)], NOW) == []
    [finding] = dup.consume([emit], NOW)
    assert (finding.rule, finding.implementation, finding.span_id) == (DUPLICATE_EMISSION, OTHER_EMITTER, emit.span_id)
    assert finding.details["writes"] == 3
    assert dup.tick(NOW + 60 * S) == []


NOTIFIER = "demo.emitters.WebSocketNotifier"  # delegates to the bridge (a nested emit of its role)


def _notified(trace, event_type="tool_completed", *, bridge_calls=1, writes_per_call=3, depth=1):
    """An event emitted through the notifier (a pass-through), the bridge below it writing
    ``writes_per_call`` times to one socket per call (S6: it re-sends) for each of the notifier's
    ``bridge_calls`` calls of it, with ``depth - 1`` more pass-throughs between them; in arrival
    order (each write, then the calls it ran in, innermost first: spans end child first)."""
    notifier = trace.emit(event_type, NOTIFIER, canonical=False)
    spans = []
    for _ in range(bridge_calls):
        outer = notifier
        links = []
        for level in range(depth - 1):
            outer = trace.emit(event_type, f"demo.emitters.Adapter{level}", canonical=False, nested=True,
                               parent=outer.span_id, outer_span_id=outer.span_id,
                               event_id=notifier.event_id)
            links.append(outer)
        bridge = trace.emit(event_type, OTHER_EMITTER, nested=True, parent=outer.span_id,
                            outer_span_id=outer.span_id, event_id=notifier.event_id)
        spans += [trace.deliver(bridge, connection_id="conn-1") for _ in range(writes_per_call)]
        spans += [bridge, *reversed(links)]
    return notifier, bridge, spans + [notifier]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("batches", ["one", "each"])
def test_an_event_re_sent_below_a_pass_through_names_the_call_that_re_sent_it(depth, batches):
    """S6 through the notifier: the bridge (nested in WebSocketNotifier's call, which only delegates)
    writes each event three times. The incident must name the bridge, the code to fix (the notifier
    is a pass-through: docs/rules.md), not the notifier (was: the outermost emit named the event)."""
    notifier, bridge, spans = _notified(Trace(), depth=depth)
    dup = detector()
    found = []
    for part in ([spans] if batches == "one" else [[span] for span in spans]):
        found += dup.consume(part, NOW)
    found += tick_through(dup, NOW, NOW + 30 * S)
    [finding] = found
    assert (finding.rule, finding.implementation, finding.span_id, finding.entry_point) == (
        DUPLICATE_EMISSION, OTHER_EMITTER, bridge.span_id, "/ws")
    assert finding.details["writes"] == 3


def test_an_event_a_pass_through_delegated_several_times_names_that_call():
    """The notifier calling the bridge three times for one event (each call writing it once): the
    notifier re-sent it, and is named."""
    notifier, _bridge, spans = _notified(Trace(), bridge_calls=3, writes_per_call=1)
    dup = detector()
    [finding] = dup.consume(spans, NOW) + tick_through(dup, NOW, NOW + 30 * S)
    assert (finding.rule, finding.implementation, finding.span_id) == (
        DUPLICATE_EMISSION, NOTIFIER, notifier.span_id)
    # an event written once through the notifier, and once to each of two tabs, is no duplicate
    trace = Trace()
    _n, bridge, spans = _notified(trace, writes_per_call=1)
    spans.insert(1, trace.deliver(bridge, connection_id="conn-2"))
    assert dup.consume(spans, NOW) + tick_through(dup, NOW, NOW + 30 * S) == []


def test_a_duplicate_write_below_a_pass_through_whose_outer_call_never_comes_names_the_inner():
    notifier, bridge, spans = _notified(Trace())
    dup = detector(delivery_deadline_s=2.0)
    assert dup.consume(spans[:-1], NOW) == []  # the notifier's span is lost
    assert dup.tick(NOW + 2 * S - 1) == []
    [finding] = dup.tick(NOW + 2 * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EMISSION, OTHER_EMITTER)


def test_duplicate_writes_whose_emit_never_arrives_are_raised_on_tick_after_the_grace():
    trace = Trace()
    emit = trace.emit("tool_completed")
    dup = detector(delivery_deadline_s=2.0)
    assert dup.consume([trace.deliver(emit), trace.deliver(emit)], NOW) == []
    assert dup.tick(NOW + 2 * S - 1) == []
    [finding] = dup.tick(NOW + 2 * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EMISSION, TRANSPORT)
    assert finding.details["emitter_known"] is False


def test_writes_whose_emit_comes_an_export_schedule_later_still_name_the_emitter():
    """Found by a soak (the SDK's own BatchSpanProcessor, 5 s schedule; scenario S6, each event
    written three times): the writes ended inside their emit, on the other side of a batch
    boundary, and the emit came 5 s after them -- past the 2 s wait for it, so the finding named
    the transport (starlette's WebSocket), an incident of its own pointing at the wrong class (1 of
    2257 findings). The wait for the emitter is the delivery detector's: deadline + export
    allowance."""
    trace = Trace()
    emit = trace.emit("tool_completed", OTHER_EMITTER)
    dup = detector(delivery_deadline_s=2.0, delivery_export_allowance_s=6.0)
    assert dup.consume([trace.deliver(emit), trace.deliver(emit), trace.deliver(emit)], NOW) == []
    assert dup.tick(NOW + 5 * S) == []
    [finding] = dup.consume([emit], NOW + 5 * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EMISSION, OTHER_EMITTER)
    assert finding.details["emitter_known"] is True
    lone = Trace()  # an emit that never comes: the transport, once the whole wait has passed
    gone = lone.emit("tool_completed")
    assert dup.consume([lone.deliver(gone), lone.deliver(gone)], NOW + 10 * S) == []
    assert dup.tick(NOW + 18 * S - 1) == []
    [finding] = dup.tick(NOW + 18 * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EMISSION, TRANSPORT)


def test_writes_whose_emit_comes_on_a_refusals_retry_still_name_the_emitter():
    # the emit, in a request refused for overload at 1 s, comes on the exporter's retry at 3 s, past
    # the 1.5 s wait for it: the finding waits for the retry and names the emitter, not the
    # transport; an emit that never comes, the transport once the refusal's retries are over
    trace = Trace()
    emit = trace.emit("tool_completed", OTHER_EMITTER)
    lone = Trace()
    gone = lone.emit("tool_completed")
    dup = detector(delivery_deadline_s=1.0, delivery_export_allowance_s=0.5)
    writes = [trace.deliver(emit), trace.deliver(emit), lone.deliver(gone), lone.deliver(gone)]
    assert dup.consume(writes, NOW) == []
    dup.requests_refused(NOW + S, NOW + S)
    assert dup.tick(NOW + 3 * S - 1) == []
    [finding] = dup.consume([emit], NOW + 3 * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EMISSION, OTHER_EMITTER)
    assert dup.tick(NOW + 11 * S - 1) == []
    [finding] = dup.tick(NOW + 11 * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_EMISSION, TRANSPORT)


def test_one_write_per_socket_or_failed_retries_are_not_duplicates():
    trace = Trace()
    emit = trace.emit("tool_completed")
    spans = [trace.deliver(emit, connection_id="tab-1"), trace.deliver(emit, connection_id="tab-2"),
             trace.deliver(emit, connection_id="tab-3", outcome="failed"),
             trace.deliver(emit, connection_id="tab-3"), emit]
    dup = detector()
    assert dup.consume(spans, NOW) == []
    assert dup.tick(NOW + 60 * S) == []


def test_an_event_written_once_to_each_of_a_users_tabs_keeps_no_span():
    # each event written to two or more connections (a user with several tabs) kept its last write's
    # whole SpanRecord for state.ttl_s, though only a second write to one connection reads it:
    # 1626 -> 944 bytes an event (/tmp/s33_dupreview/mem_multitab.py)
    trace = Trace()
    emit = trace.emit("agent_thinking")
    dup = detector()
    assert dup.consume([trace.deliver(emit, connection_id=tab) for tab in ("tab-1", "tab-2")] + [emit],
                       NOW) == []
    assert dup._writes.get(emit.event_id).last_write is None
    again = trace.deliver(emit, connection_id="tab-2", received_ns=NOW + 7)
    [finding] = dup.consume([again, trace.deliver(emit, connection_id="tab-2")], NOW)
    assert (finding.rule, finding.details["writes"], finding.received_ns) == (DUPLICATE_EMISSION, 2, NOW + 7)


def test_writes_of_one_event_to_connections_past_the_bound_are_counted_not_kept(telemetry):
    dup = DuplicatesDetector(rules(disabled=(DUPLICATE_ENTRY_POINT_PATHS,)), state(), telemetry)
    trace = Trace(user=None)
    emit = trace.emit("room_message", target=None)  # a broadcast
    connections = [f"conn-{n}" for n in range(MAX_CONNECTIONS_PER_EVENT + 3)]

    def write(connection: str):
        return trace.deliver(emit, connection_id=connection, connection_user="user-" + connection)

    assert dup.consume([emit, *map(write, connections)], NOW) == []
    assert dup.connections_dropped == 3  # the entry holds the first 16 connections, no more
    assert dup.consume([write(connections[-1])], NOW) == []  # past the bound: not counted either
    [finding] = dup.consume([write(connections[0])], NOW)  # a kept connection written twice
    assert (finding.rule, finding.details["writes"]) == (DUPLICATE_EMISSION, 2)
    dropped = {"detector": "duplicates", "reason": "event_connections"}
    assert sample(telemetry, "pathwatch_detector_evidence_dropped_total", **dropped) == 0  # on tick
    dup.tick(NOW + MS)
    dup.tick(NOW + 2 * MS)  # deltas: nothing new, nothing added
    assert sample(telemetry, "pathwatch_detector_evidence_dropped_total", **dropped) == 4


# --- entry point paths ---------------------------------------------------------------------------------
def test_entry_point_reaching_a_second_implementation_is_info_once_per_change():
    a, b, c = (Trace(entry_point="/ws", run_id=f"run-p{i}") for i in range(3))
    dup = detector(disabled=(DUPLICATE_EXECUTION,))
    assert dup.consume([a.execute(ENGINE), a.execute(ENGINE)], NOW) == []
    [finding] = dup.consume([b.execute(OTHER_ENGINE), b.execute(OTHER_ENGINE)], NOW)
    assert (finding.rule, finding.severity) == (DUPLICATE_ENTRY_POINT_PATHS, Severity.INFO)
    assert (finding.implementation, finding.entry_point) == (OTHER_ENGINE, "/ws")
    assert finding.details["implementations"] == sorted([ENGINE, OTHER_ENGINE])
    [again] = dup.consume([c.execute("demo.engines.MCPEnhancedExecutionEngine")], NOW)
    assert len(again.details["implementations"]) == 3


def test_different_entry_points_each_on_one_implementation_raise_nothing():
    spans = [Trace(entry_point="/ws").execute(ENGINE), Trace(entry_point="/api/runs").execute(OTHER_ENGINE)]
    assert detector(disabled=()).consume(spans, NOW) == []


# --- retired implementation --------------------------------------------------------------------------
def test_two_services_each_reaching_their_own_engine_from_a_like_named_entry_point_raise_nothing():
    # a gateway's services each have their own path map; two naming their engines' role and a
    # route alike were one entry point reaching two implementations (found by review:
    # /tmp/s27_dup/repro_gateway_paths.py)
    chat, voice = Trace(entry_point="/ws"), Trace(entry_point="/ws")
    dup = detector(disabled=())
    assert dup.consume([chat.execute("chat.engines.UserExecutionEngine", service_name="chat"),
                        voice.execute("voice.engines.UserExecutionEngine", service_name="voice")],
                       NOW) == []
    # one service reaching a second implementation from it still is
    [finding] = dup.consume([Trace(entry_point="/ws").execute("chat.engines.LegacyEngine",
                                                              service_name="chat")], NOW)
    assert finding.rule == DUPLICATE_ENTRY_POINT_PATHS
    assert finding.details["implementations"] == ["chat.engines.LegacyEngine",
                                                  "chat.engines.UserExecutionEngine"]


def test_retired_implementation_is_raised_once_per_window():
    dup = detector()
    [finding] = dup.consume([Trace().execute(RETIRED_ENGINE, retired=True) for _ in range(3)], NOW)
    assert (finding.rule, finding.implementation) == (DUPLICATE_RETIRED_INVOKED, RETIRED_ENGINE)
    dup.tick(NOW + 30 * S)
    assert dup.consume([Trace().execute(RETIRED_ENGINE, retired=True)], NOW + 30 * S) == []
    dup.tick(NOW + 61 * S)
    again = dup.consume([Trace().execute(RETIRED_ENGINE, retired=True)], NOW + 61 * S)
    assert rule_ids(again) == [DUPLICATE_RETIRED_INVOKED]


def test_a_retired_implementation_called_all_the_time_is_raised_once_per_window_not_more():
    dup = detector()
    raised = []
    for tenth in range(1251):  # a call every 100 ms for 125 s, a tick after each
        now = NOW + tenth * S // 10
        if dup.consume([Trace().execute(RETIRED_ENGINE, retired=True)], now):
            raised.append(tenth / 10)
        dup.tick(now)
    assert raised == [0.0, 60.0, 120.0]  # the window restarts when raised, not on the first call


def test_retired_implementation_is_raised_once_per_entry_point_that_reaches_it():
    dup = detector()
    found = dup.consume([Trace(entry_point="/ws").execute(RETIRED_ENGINE, retired=True),
                         Trace(entry_point="/api/runs").execute(RETIRED_ENGINE, retired=True),
                         Trace(entry_point="/ws").execute(RETIRED_ENGINE, retired=True)], NOW)
    assert sorted(f.entry_point for f in found) == ["/api/runs", "/ws"]


def test_a_retired_socket_write_class_is_raised_as_the_other_kinds_are():
    # a path map's deliver role (a legacy socket manager's write) may mark an implementation
    # retired: its calls were never reported, though the loader accepts the mark
    trace = Trace(entry_point="/ws")
    emit = trace.emit("agent_started")
    legacy = "demo.sockets.LegacySocketWriter"
    write = trace.deliver(emit, role="socket_writer", implementation=legacy, canonical=False,
                          retired=True)
    dup = detector()
    [finding] = dup.consume([write, but(write, span_id=new_id())], NOW)
    assert (finding.rule, finding.role, finding.implementation, finding.entry_point) == (
        DUPLICATE_RETIRED_INVOKED, "socket_writer", legacy, "/ws")
    assert dup.consume([trace.deliver(emit)], NOW) == []  # the transport's own writes: never retired


def test_implementations_that_are_not_retired_raise_nothing():
    assert detector().consume([Trace().execute(OTHER_ENGINE, retired=False)], NOW) == []


def test_disabled_rules_are_not_raised():
    trace = Trace(run_id="run-9")
    dup = detector(disabled=(DUPLICATE_EXECUTION, DUPLICATE_RETIRED_INVOKED, DUPLICATE_ENTRY_POINT_PATHS))
    assert dup.consume([trace.execute(RETIRED_ENGINE, retired=True), trace.execute()], NOW) == []


def test_duplicate_write_evicted_while_awaiting_its_emitter_is_raised_not_lost():
    dup = DuplicatesDetector(rules(), state(max_events=1))
    trace = Trace()
    first, second = trace.emit("tool_completed"), trace.emit("tool_completed")
    findings = dup.consume([trace.deliver(first), trace.deliver(first)], NOW)
    findings += dup.consume([trace.deliver(second), trace.deliver(second)], NOW)
    findings += dup.tick(NOW)  # before the grace: only the evicted one is raised
    assert rule_ids(findings) == [DUPLICATE_EMISSION]
    assert findings[0].details["event_id"] == first.event_id
    assert dup.tables.stats()["duplicates_awaiting_emitter"]["evicted_capacity"] == 1


# --- runs keyed by (run id, user); consequences of a duplicate execution; pass-through paths -----------
def test_runs_of_two_users_sharing_a_run_id_are_two_runs_not_a_duplicate():
    a, b = Trace(user="user-a", run_id="run_req-1"), Trace(user="user-b", run_id="run_req-1")
    spans = [a.emit("agent_started"), a.execute(ENGINE), b.emit("agent_started"), b.execute(ENGINE)]
    dup = detector()
    assert dup.consume(spans, NOW) == []
    assert dup.tick(NOW + 60 * S) == []


@pytest.mark.parametrize("worker_first", [False, True], ids=["request_first", "worker_first"])
def test_a_run_executed_again_by_a_worker_with_no_user_is_a_duplicate(worker_first):
    # a worker outside any request (a job runner, a thread that copied no context) carries no
    # ambient user: its spans were keyed (run, None), another run than (run, user-a), and the
    # duplicate execution was never found (found by review: /tmp/s25_dd/repro_none_user_run.py)
    request, worker = Trace(user="user-a", run_id="run-w"), Trace(user=None, run_id="run-w")
    spans = [request.execute(ENGINE), worker.execute(OTHER_ENGINE, parent=None)]
    dup = detector(disabled=(DUPLICATE_ENTRY_POINT_PATHS,))
    found = dup.consume(spans[::-1] if worker_first else spans, NOW) + dup.tick(NOW + 200 * S)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]
    assert set(found[0].details["implementations"]) == {ENGINE, OTHER_ENGINE}


def test_a_second_known_user_of_a_run_id_adopted_from_no_user_is_still_another_run():
    no_user, a, b = (Trace(user=user, run_id="run-x") for user in (None, "user-a", "user-b"))
    dup = detector(disabled=(DUPLICATE_ENTRY_POINT_PATHS,))
    # the run's first span has no user, the next user-a's: one run, then user-b's is another
    assert dup.consume([no_user.emit("agent_started"), a.execute(ENGINE), b.execute(ENGINE),
                        b.emit("agent_started")], NOW) == []
    assert dup.tick(NOW + 200 * S) == []
    # user-b's run is its own: a second execution of it is found, and names user-b's run
    found = dup.consume([b.execute(OTHER_ENGINE)], NOW + 201 * S)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]


def _no_ambient_user(span):
    """``span`` as a worker or ``loop.run_in_executor`` makes it: no request context, so no ambient
    user and no parent; the user its call is for and its instance's owner are still named."""
    return but(span, user=None, parent_span_id=None, trace_id=new_id(32))


def test_a_worker_executing_one_users_run_of_a_shared_run_id_is_that_users_run():
    # a span with no ambient user of a run id two users share (each client numbers its requests
    # from 1) counted for the first known user's run: user-b's run, executed once by a worker, was
    # a second execution of user-a's (found by review: /tmp/s27_dup/repro_shared_run_no_user.py)
    a, b = Trace(user="user-a", run_id="1"), Trace(user="user-b", run_id="1")
    dup = detector()
    worker = _no_ambient_user(b.execute(ENGINE))
    found = dup.consume([a.execute(ENGINE), b.emit("agent_thinking"), worker], NOW)
    assert found + dup.tick(NOW + 200 * S) == []
    # and user-b's run executed again in its request is user-b's duplicate, not user-a's
    found = dup.consume([b.execute(OTHER_ENGINE)], NOW + 201 * S)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]
    assert found[0].details["trace_ids"] == sorted([worker.trace_id, b.trace_id])


def test_exactly_once_emits_made_in_executors_of_two_users_runs_sharing_a_run_id_are_not_duplicates():
    a, b = Trace(user="user-a", run_id="2"), Trace(user="user-b", run_id="2")
    dup = detector(delivery_deadline_s=1.0)
    found = dup.consume([_no_ambient_user(a.emit("agent_started")),
                         _no_ambient_user(b.emit("agent_started"))], NOW)
    found += dup.consume([a.execute(ENGINE), b.execute(ENGINE)], NOW + 2 * S)
    found += tick_through(dup, NOW + 2 * S, NOW + int((MAX_EMISSION_HOLD_S + 10) * S))
    assert found == []


@pytest.mark.parametrize("named_by", ["subject", "owner", "target"])
def test_a_span_with_no_ambient_user_is_of_the_run_of_the_user_its_call_names(named_by):
    """Subject (the user the call is for), else owner (its instance's), else target (its event's)."""
    a, b = Trace(user="user-a", run_id="3"), Trace(user="user-b", run_id="3")
    names = dict(subject=None, owner=None, target=None)
    names[named_by] = "user-b"
    worker = but(_no_ambient_user(b.emit("agent_started")), **names)
    dup = detector(delivery_deadline_s=1.0)
    found = dup.consume([a.emit("agent_started"), a.execute(ENGINE), b.execute(ENGINE), worker], NOW)
    found += tick_through(dup, NOW, NOW + int((MAX_EMISSION_HOLD_S + 10) * S))
    assert found == []
    # the user a call names comes after its ambient user: a request's span is its request user's
    bled = but(a.emit("agent_started"), subject="user-b", owner="user-b", target="user-b")
    found = dup.consume([bled], NOW + 200 * S)
    found += tick_through(dup, NOW + 200 * S, NOW + int((200 + MAX_EMISSION_HOLD_S + 10) * S))
    assert rule_ids(found) == [DUPLICATE_EMISSION] and found[0].span_id == bled.span_id


def test_a_role_re_executed_many_times_does_not_hide_another_roles_duplicate():
    trace = Trace(user="user-a")
    dup = detector()
    retries = [trace.execute(role="supervisor") for _ in range(MAX_SPANS_PER_RUN_KEY + 4)]
    assert rule_ids(dup.consume(retries, NOW)) == [DUPLICATE_EXECUTION]  # once per run and role
    found = dup.consume([trace.execute(ENGINE), trace.execute(OTHER_ENGINE)], NOW)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]
    assert found[0].role == "execution_engine"


def test_executions_past_a_runs_bound_that_could_still_be_a_duplicate_are_counted(telemetry):
    # a role retried after a failure 16 times raises nothing, and its 17th and 18th executions (two
    # engines at once) were let go unseen: "a role re-executed beyond that was already reported" did
    # not hold, and nothing counted what was let go (found by review: /tmp/s33_dupreview)
    dup = DuplicatesDetector(rules(disabled=(DUPLICATE_ENTRY_POINT_PATHS,)), state(), telemetry)
    trace = Trace(user="user-a")
    failures = []
    for _ in range(MAX_SPANS_PER_RUN_KEY):
        failures.append(trace.execute(ENGINE, error=True, duration_ms=5))
        trace.clock += 10 * MS  # the backoff: each retried once it had ended
    assert dup.consume(failures, NOW) == []
    both = [trace.execute(ENGINE), trace.execute(OTHER_ENGINE)]
    assert dup.consume(both, NOW) == []  # past the bound: not found (docs/rules.md, known limits)
    assert dup.consume(sent_again(failures[:1]), NOW) == []  # a kept one sent again: not counted
    # executions of a role already reported, past the bound, are not evidence let go
    reported = Trace(user="user-a")
    found = dup.consume([reported.execute(ENGINE) for _ in range(MAX_SPANS_PER_RUN_KEY + 3)], NOW)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]
    dup.tick(NOW + MS)
    dropped = {"detector": "duplicates", "reason": "run_executions"}
    assert sample(telemetry, "pathwatch_detector_evidence_dropped_total", **dropped) == 2


@pytest.mark.parametrize("case", ["retried", "executed_twice"])
def test_held_copies_of_a_run_forgotten_for_capacity_are_counted_not_reported(case, telemetry):
    """A run's copies of agent_started, held for its executions, whose run other runs pushed out of
    duplicates_runs (state.max_runs) before they came: their executions are no longer known, so the
    copies cannot be told from a retry's (or a duplicate execution's) consequence -- a
    duplicate.emission reported then was false for a run retried after a failure (generated runs
    under small state.max_*: /tmp/s34_dupreview/fuzz2.py). Let go, counted."""
    dup = DuplicatesDetector(rules(delivery_deadline_s=1.0, disabled=(DUPLICATE_ENTRY_POINT_PATHS,)),
                             state(max_runs=2), telemetry)
    trace = Trace(run_id="run-pushed-out")
    first = trace.execute(ENGINE, error=case == "retried", duration_ms=30)
    trace.clock = first.end_ns + 100 * MS
    second = trace.execute(ENGINE if case == "retried" else OTHER_ENGINE)
    copies = [trace.emit("agent_started", parent=execute.span_id, execution_span_id=execute.span_id)
              for execute in (first, second)]
    assert dup.consume([*copies, first], NOW) == []
    for index in range(3):  # other users' runs, each executed once
        assert dup.consume([Trace(user=f"user-{index}").execute(ENGINE)], NOW) == []
    found = dup.consume([second], NOW + S // 2)  # the run starts afresh with it: one execution
    found += tick_through(dup, NOW, NOW + int((MAX_EMISSION_HOLD_S + 30) * S)) + dup.drain(NOW)
    assert found == []
    dropped = {"detector": "duplicates", "reason": "held_emissions"}
    assert sample(telemetry, "pathwatch_detector_evidence_dropped_total", **dropped) == 1
    # a run kept (within the capacity) still has its copies judged: S5, executed once
    kept = Trace(run_id="run-kept")
    execute = kept.execute(ENGINE)
    copies = [kept.emit("agent_started", parent=parent, execution_span_id=execute.span_id)
              for parent in (execute.span_id, new_span_id())]
    assert dup.consume([*copies, execute], NOW) == []
    [finding] = tick_through(dup, NOW, NOW + 2 * S)
    assert (finding.rule, finding.run_id) == (DUPLICATE_EMISSION, "run-kept")


def test_copies_of_a_run_made_again_after_it_was_forgotten_for_capacity_are_counted_not_reported(
        telemetry):
    """The failed attempt's execute span came first (a Collector delivering its request before the
    copies'), then other runs pushed the run out of state.max_runs; its copies and the retry came
    into an entry made again, which lacks the failed attempt: the two copies were held 120 s for it
    and reported as a duplicate.emission -- the retry's consequence (generated runs: the s33 review's
    fuzz.py under PRESSURE=1, seed 912). Such an entry's held copies are let go, counted."""
    dup = DuplicatesDetector(rules(delivery_deadline_s=1.0, disabled=(DUPLICATE_ENTRY_POINT_PATHS,)),
                             state(max_runs=2), telemetry)
    trace = Trace(run_id="run-made-again")
    failed = trace.execute(ENGINE, error=True, duration_ms=30)
    trace.clock = failed.end_ns + 100 * MS
    retry = trace.execute(ENGINE)
    copies = [trace.emit("agent_started", parent=execute.span_id, execution_span_id=execute.span_id)
              for execute in (failed, retry)]
    assert dup.consume([failed], NOW) == []
    for index in range(3):  # other users' runs, each executed once
        assert dup.consume([Trace(user=f"user-{index}").execute(ENGINE)], NOW) == []
    found = dup.consume([*copies, retry], NOW + S // 2)
    found += tick_through(dup, NOW, NOW + int((MAX_EMISSION_HOLD_S + 30) * S)) + dup.drain(NOW)
    assert found == []
    dropped = {"detector": "duplicates", "reason": "held_emissions"}
    assert sample(telemetry, "pathwatch_detector_evidence_dropped_total", **dropped) == 1
    # another user's run taking the key meanwhile is its own, judged: executed once, S5
    other = Trace(user="user-b", run_id="run-taken")
    assert dup.consume([other.execute(ENGINE)], NOW) == []
    for index in range(3):
        assert dup.consume([Trace(user=f"user-{index}").execute(ENGINE)], NOW) == []
    taker = Trace(user="user-c", run_id="run-taken")
    execute = taker.execute(ENGINE)
    copies = [taker.emit("agent_started", parent=parent, execution_span_id=execute.span_id)
              for parent in (execute.span_id, new_span_id())]
    assert dup.consume([*copies, execute], NOW) == []
    [finding] = tick_through(dup, NOW, NOW + 2 * S)
    assert (finding.rule, finding.run_id) == (DUPLICATE_EMISSION, "run-taken")


def test_held_copies_of_each_exactly_once_type_of_a_run_fit_the_held_table():
    """A retried run sends agent_started and agent_completed again: two held findings for one run,
    in a table as large as the runs' (state.max_runs): the first was pushed out, reported as a
    duplicate.emission before the retry's execution came (generated runs: fuzz2.py). The held table
    holds a finding per run and exactly-once type."""
    dup = DuplicatesDetector(dup_rules := rules(delivery_deadline_s=1.0,
                                                disabled=(DUPLICATE_ENTRY_POINT_PATHS,)),
                             state(max_runs=1))
    assert len(dup_rules.exactly_once_events) == 2
    trace = Trace(run_id="run-retried")
    failed = trace.execute(ENGINE, error=True, duration_ms=30)
    trace.clock = failed.end_ns + 100 * MS
    retry = trace.execute(ENGINE)
    copies = [trace.emit(event_type, parent=execute.span_id, execution_span_id=execute.span_id)
              for execute in (failed, retry) for event_type in ("agent_started", "agent_completed")]
    found = dup.consume([*copies[:2], failed], NOW) + dup.consume(copies[2:], NOW + S // 2)
    found += dup.consume([retry], NOW + 3 * S)  # the retry's span comes when it ends
    found += tick_through(dup, NOW, NOW + int((MAX_EMISSION_HOLD_S + 30) * S))
    assert found == []


def test_roles_past_the_role_limit_are_not_mixed_into_one_path():
    dup = detector(disabled=())
    warm_up = Trace(entry_point="/api/x")
    assert dup.consume([warm_up.execute(f"pkg.Impl{i}", role=f"role_{i}", run_id=f"r{i}")
                        for i in range(MAX_ROLES)], NOW) == []
    trace = Trace(entry_point="/api/y")
    spans = [trace.execute("pkg.OnlyA", role="role_a", run_id="ra"),
             trace.execute("pkg.OnlyB", role="role_b", run_id="rb")]
    assert dup.consume(spans, NOW) == []


def test_a_run_whose_entry_expired_between_batches_starts_afresh():
    # consume reuses the previous call's run entry within one batch; never across a tick that
    # expired it (the second execution then has nothing to be compared with)
    trace = Trace(run_id="run-x")
    dup = DuplicatesDetector(rules(disabled=(DUPLICATE_ENTRY_POINT_PATHS,)), state(ttl_s=10.0))
    assert dup.consume([trace.execute(ENGINE)], NOW) == []
    dup.tick(NOW + 5 * S)
    dup.tick(NOW + 30 * S)  # idle past the TTL: the run's entry is gone
    assert dup.consume([trace.execute(OTHER_ENGINE)], NOW + 30 * S) == []
    # while within one batch (and one TTL) the second execution is a duplicate
    other = Trace(run_id="run-y")
    found = dup.consume([other.execute(ENGINE), other.execute(OTHER_ENGINE)], NOW + 31 * S)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]


def test_a_run_active_longer_than_the_ttl_keeps_its_entry_and_its_duplicate_execution():
    # only execute spans and exactly-once emits made the entry: a run that goes on emitting other
    # events (and writing them) longer than state.ttl_s after its first execution ended lost it
    http = Trace(user="user-a", entry_point="/api/runs", run_id="run-long")
    ws = Trace(user="user-a", entry_point="/ws", run_id="run-long")
    dup = DuplicatesDetector(rules(disabled=(DUPLICATE_ENTRY_POINT_PATHS,)), state(ttl_s=10.0))
    found = dup.consume([http.execute(ENGINE)], NOW)
    for second in range(1, 40):
        if second % 3 == 0:
            thinking = ws.emit("agent_thinking")
            found += dup.consume([ws.deliver(thinking), thinking], NOW + second * S)
        found += dup.tick(NOW + second * S)
    found += dup.consume([ws.execute(OTHER_ENGINE)], NOW + 40 * S)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]
    assert dup.tables.stats()["duplicates_runs"]["evicted_ttl"] == 0


def test_spans_of_a_run_refresh_its_entry_once_per_change_of_run_and_never_make_one():
    class CountingTouches:
        def __init__(self, table: object) -> None:
            self.table, self.touches = table, 0

        def touch(self, key: object) -> object:
            self.touches += 1
            return self.table.touch(key)

        def __getattr__(self, name: str) -> object:
            return getattr(self.table, name)

    dup = detector()
    dup._runs = runs = CountingTouches(dup._runs)
    a, b = Trace(run_id="run-a"), Trace(run_id="run-b")
    emits = [a.emit("agent_thinking") for _ in range(50)]
    dup.consume([span for emit in emits for span in (a.deliver(emit), emit)], NOW)
    assert runs.touches == 1 and len(runs.table) == 0  # looked up once; not made by these spans
    dup.consume([a.execute(ENGINE), a.emit("tool_executing"), b.emit("tool_executing"),
                 b.emit("tool_completed"), a.emit("tool_completed")], NOW)
    assert runs.touches == 1 + 3 and len(runs.table) == 1  # per change of run; the execute made one


def test_duplicate_emits_of_a_run_executed_twice_are_its_consequence_not_a_second_finding():
    trace = Trace(run_id="run-d")
    first_id, second_id = "e" * 16, "f" * 16  # the two executions' span ids: the emits' parents
    spans = [trace.emit("agent_started", parent=first_id), trace.execute(ENGINE, span_id=first_id),
             trace.emit("agent_started", parent=second_id), trace.execute(OTHER_ENGINE, span_id=second_id)]
    dup = detector(delivery_deadline_s=1.0)
    assert rule_ids(dup.consume(spans, NOW)) == [DUPLICATE_EXECUTION]
    assert dup.tick(NOW + 60 * S) == []


def test_duplicate_emits_of_a_run_longer_than_the_hold_wait_for_its_executions():
    """An agent run lasts longer than the delivery deadline: its execute spans end, and arrive, with
    the run. Executed twice, its duplicate emits are that duplicate execution's consequence."""
    trace = Trace(run_id="run-long")
    first_id, second_id = new_span_id(), new_span_id()
    emits = [trace.emit("agent_started", parent=first_id),
             trace.emit("agent_started", OTHER_EMITTER, parent=second_id)]
    executes = [trace.execute(ENGINE, span_id=first_id), trace.execute(OTHER_ENGINE, span_id=second_id)]
    dup = detector(delivery_deadline_s=1.0)
    assert dup.consume(emits, NOW) == []
    assert [dup.tick(NOW + n * S // 2) for n in range(1, 10)] == [[]] * 9  # 4.5 s: still running
    assert rule_ids(dup.consume(executes, NOW + 5 * S)) == [DUPLICATE_EXECUTION]
    assert dup.tick(NOW + 60 * S) == []


def test_duplicate_emits_of_a_run_whose_execution_never_arrives_are_raised_after_the_longest_hold():
    trace = Trace(run_id="run-x")
    emits = [trace.emit("agent_started", parent=new_span_id()),
             trace.emit("agent_started", OTHER_EMITTER, parent=new_span_id())]
    dup = detector(delivery_deadline_s=1.0)
    assert dup.consume(emits, NOW) == []
    assert dup.tick(NOW + 60 * S) == []
    assert rule_ids(dup.tick(NOW + int((MAX_EMISSION_HOLD_S + 2) * S))) == [DUPLICATE_EMISSION]


def test_duplicate_emits_from_different_calls_of_one_execution_are_raised_after_the_hold():
    trace = Trace(run_id="run-h")
    execute = trace.execute(ENGINE)
    started = trace.emit("agent_started", parent=execute.span_id)
    again = trace.emit("agent_started", "demo.tracking.Tracker", parent=new_span_id())
    dup = detector(delivery_deadline_s=1.0)
    assert dup.consume([started, again, execute], NOW) == []
    assert dup.tick(NOW + S - 1) == []
    [finding] = dup.tick(NOW + S)
    assert (finding.rule, finding.implementation, finding.run_id) == (
        DUPLICATE_EMISSION, "demo.tracking.Tracker", "run-h")


@pytest.mark.parametrize("batches", ["one", "each"])
def test_a_held_duplicate_emission_names_the_later_of_all_its_copies_and_counts_them(batches):
    """S5: the engine, then the execution core, then the tracker announce the start. The finding,
    held for the run's executions, was made at the second copy and never again: it named the core
    ("emitted 2 times") where docs/rules.md says the later non-canonical emitter, the tracker."""
    trace = Trace(run_id="run-s5")
    execute = trace.execute(ENGINE)
    started = trace.emit("agent_started", parent=execute.span_id, execution_span_id=execute.span_id)
    core = trace.emit("agent_started", "demo.core.ExecutionCore", parent=new_span_id(),
                      execution_span_id=execute.span_id)
    tracker = trace.emit("agent_started", "demo.tracking.Tracker", parent=new_span_id(),
                         execution_span_id=execute.span_id)
    dup = detector(delivery_deadline_s=1.0)
    spans = [started, core, tracker, execute]
    found = []
    for part in ([spans] if batches == "one" else [[span] for span in spans]):
        found += dup.consume(part, NOW)
    assert found == []
    assert dup.tick(NOW + S - 1) == []
    [finding] = dup.tick(NOW + S)
    assert (finding.rule, finding.implementation, finding.span_id) == (
        DUPLICATE_EMISSION, "demo.tracking.Tracker", tracker.span_id)
    assert finding.details["emits"] == 3 and "emitted 3 times" in finding.summary
    assert finding.details["implementations"] == sorted([EMITTER, "demo.core.ExecutionCore",
                                                         "demo.tracking.Tracker"])
    assert finding.received_ns == core.received_ns and finding.detected_ns == NOW + S


@pytest.mark.parametrize("reported_by", ["tick", "drain", "eviction"])
def test_a_held_duplicate_emission_is_stamped_when_it_is_reported(reported_by):
    # it carried the time its hold began, up to 130 s before it was reported: a /api/v1/findings
    # poll with since= its previous poll never listed it, and its incident began in the past
    # (a duplicate write awaiting its emitter, and every other detector's held verdict, is stamped
    # when judged; found by review: /tmp/s33_dupreview)
    trace = Trace(run_id="run-stamp")
    execute = trace.execute(ENGINE)
    started = trace.emit("agent_started", parent=execute.span_id)
    again = trace.emit("agent_started", "demo.tracking.Tracker", parent=new_span_id())
    deadline_s = 5.0 if reported_by == "eviction" else 1.0
    # one exactly-once type: the held table holds max_runs (one) findings a type
    dup = DuplicatesDetector(rules(disabled=(DUPLICATE_ENTRY_POINT_PATHS,), delivery_deadline_s=deadline_s,
                                   exactly_once_events=("agent_started",)),
                             state(max_runs=1, ttl_s=1.0))
    assert dup.consume([started, again, execute], NOW) == []
    if reported_by == "tick":
        assert dup.tick(NOW + S - 1) == []
        [finding] = dup.tick(NOW + S)
        assert finding.detected_ns == NOW + S
    elif reported_by == "drain":
        [finding] = dup.drain(NOW + S // 2)
        assert finding.detected_ns == NOW + S // 2
    else:  # the held table is as large as the runs' (one): another run's hold evicts it, once
        # the run is forgotten after state.ttl_s of silence (a run forgotten for capacity first
        # lets its held copies go unjudged: the test of held_emissions)
        assert dup.tick(NOW + S // 10) == [] and dup.tick(NOW + 12 * S // 10) == []
        other = Trace(run_id="run-other")
        x = other.execute(ENGINE)
        copies = [other.emit("agent_started", parent=x.span_id),
                  other.emit("agent_started", "demo.tracking.Tracker", parent=new_span_id())]
        assert dup.consume([*copies, x], NOW + 13 * S // 10) == []
        [finding] = dup.tick(NOW + 14 * S // 10)  # raised on the eviction, returned by the next call
        assert (finding.run_id, finding.detected_ns) == ("run-stamp", NOW + 13 * S // 10)
    assert finding.rule == DUPLICATE_EMISSION


def _timeline(dup: DuplicatesDetector, script: dict[float, list], until_s: float,
              refused: tuple[float, ...] = ()) -> list:
    """Feed ``script`` (seconds -> spans) with a tick every 100 ms, telling of an overload refusal
    at each of ``refused`` (seconds) first, as the pipeline does; returns (seconds, rule) found."""
    found = []
    for tenth in range(int(until_s * 10) + 1):
        now = NOW + tenth * S // 10
        if tenth / 10 in refused:
            dup.requests_refused(now, now)
        found += [(tenth / 10, f.rule) for f in dup.consume(script.get(tenth / 10, []), now)]
        found += [(tenth / 10, f.rule) for f in dup.tick(now)]
    return found + [("drain", f.rule) for f in dup.drain(NOW + int((until_s + 1) * S))]


def test_a_run_executed_twice_whose_executions_end_apart_is_one_duplicate_execution():
    """Scenario S4: the HTTP path and the WebSocket path each execute the run (two traces); the
    HTTP execution ends 20 s before the other: its execute span's arrival accounts for its own
    agent_started, not for the other copy, which waits for its execution."""
    http = Trace(user="user-a", entry_point="/api/runs", run_id="run-s4")
    ws = Trace(user="user-a", entry_point="/ws", run_id="run-s4")
    x_http, x_ws = new_span_id(), new_span_id()
    script = {
        0.1: [http.emit("agent_started", parent=x_http)],
        0.2: [ws.emit("agent_started", parent=x_ws)],
        10.0: [http.emit("agent_completed", parent=x_http), http.execute(ENGINE, span_id=x_http)],
        30.0: [ws.emit("agent_completed", parent=x_ws), ws.execute(OTHER_ENGINE, span_id=x_ws)],
    }
    assert _timeline(detector(), script, 60.0) == [(30.0, DUPLICATE_EXECUTION)]


def test_two_executions_one_after_the_other_in_one_trace_are_one_duplicate_execution():
    # the demo's S4: one request runs the primary supervisor, then the other one: the second copy
    # of agent_started starts after the first execution ended, so it is not that execution's
    trace = Trace(user="user-a", run_id="run-seq")
    first_id, second_id = new_span_id(), new_span_id()
    first = trace.execute(ENGINE, span_id=first_id, start_ns=T0, end_ns=T0 + 5 * S)
    second = trace.execute(OTHER_ENGINE, span_id=second_id, start_ns=T0 + 6 * S, end_ns=T0 + 20 * S)
    script = {
        0.1: [trace.emit("agent_started", parent=first_id, start_ns=T0 + MS, end_ns=T0 + 2 * MS)],
        5.0: [first],
        6.1: [trace.emit("agent_started", parent=second_id, start_ns=T0 + 6 * S + MS,
                         end_ns=T0 + 6 * S + 2 * MS)],
        20.0: [second],
    }
    assert _timeline(detector(), script, 60.0) == [(20.0, DUPLICATE_EXECUTION)]


def test_copies_made_deeper_inside_the_one_execution_are_raised_once_it_has_arrived():
    # a real duplicate emission: the engine's execution core and its tracker each announce the start
    # (their calls are not the execute span itself, but they ran within it)
    trace = Trace(run_id="run-deep")
    execute_id = new_span_id()
    execute = trace.execute(ENGINE, span_id=execute_id, start_ns=T0, end_ns=T0 + 3 * S)
    script = {
        0.1: [trace.emit("agent_started", parent=new_span_id(), start_ns=T0 + MS, end_ns=T0 + 2 * MS)],
        0.2: [trace.emit("agent_started", "demo.tracking.Tracker", parent=new_span_id(),
                         start_ns=T0 + 3 * MS, end_ns=T0 + 4 * MS)],
        3.0: [execute],
    }
    found = _timeline(detector(delivery_deadline_s=1.0), script, 60.0)
    assert [rule for _, rule in found] == [DUPLICATE_EMISSION]
    assert 3.0 <= found[0][0] <= 4.2  # at the first due time after its execution arrived


def test_a_copy_made_outside_the_runs_arrived_execution_waits_at_most_the_longest_hold():
    # a supervisor announcing the start before it calls the engine looks like a second execution's
    # copy: it waits, at most MAX_EMISSION_HOLD_S, then is reported
    trace = Trace(run_id="run-out")
    execute_id = new_span_id()
    execute = trace.execute(ENGINE, span_id=execute_id, start_ns=T0 + S, end_ns=T0 + 3 * S)
    script = {
        0.1: [trace.emit("agent_started", "demo.supervisors.SupervisorAgent", parent=new_span_id(),
                         start_ns=T0, end_ns=T0 + MS)],
        1.2: [trace.emit("agent_started", parent=execute_id, start_ns=T0 + S + MS, end_ns=T0 + S + 2 * MS)],
        3.0: [execute],
    }
    found = _timeline(detector(delivery_deadline_s=1.0), script, MAX_EMISSION_HOLD_S + 10)
    assert [rule for _, rule in found] == [DUPLICATE_EMISSION]
    assert MAX_EMISSION_HOLD_S <= found[0][0] <= MAX_EMISSION_HOLD_S + 3


def _concurrent_executions() -> tuple[dict[float, list], object]:
    """Two engines execute the run at once in one trace (scenario S4's shape, concurrently): the
    second copy of agent_started is the second execution's, and started within the first one. The
    copies name no execution (an older instrumentation's): only the second execute span's arrival
    tells (with the key, each copy waits for its own: _concurrent_keyed)."""
    trace = Trace(user="user-a", run_id="run-refused")
    first_id, second_id = new_span_id(), new_span_id()
    first = trace.execute(ENGINE, span_id=first_id, start_ns=T0, end_ns=T0 + 3 * S)
    second = trace.execute(OTHER_ENGINE, span_id=second_id, start_ns=T0 + S // 2,
                           end_ns=T0 + 3 * S + S // 5)
    arrived = [trace.emit("agent_started", parent=first_id, start_ns=T0 + S, end_ns=T0 + S + MS),
               trace.emit("agent_started", parent=second_id, start_ns=T0 + 2 * S,
                          end_ns=T0 + 2 * S + MS),
               first]
    return {3.0: arrived}, second


def _concurrent_keyed(late_s: float, *, keyed: bool = True, deeper: bool = False) -> dict[float, list]:
    """Two engines execute the run at once in one trace, each announcing the start (in its own call,
    or ``deeper``: from a call nested deeper, a foreign span between); the first execution ends at
    3 s, the second one's span comes ``late_s`` after it. ``keyed``: each copy names its execution
    (``pathwatch.execution.span_id``), as the instrumentation does since it has the key."""
    trace = Trace(user="user-a", run_id=f"run-concurrent-{new_span_id()}")
    first_id, second_id = new_span_id(), new_span_id()

    def copy(execution_id: str, start_ns: int):
        return trace.emit("agent_started", parent=new_span_id() if deeper else execution_id,
                          start_ns=start_ns, end_ns=start_ns + MS,
                          execution_span_id=execution_id if keyed else None)

    return {
        3.0: [copy(first_id, T0 + S), copy(second_id, T0 + 2 * S),
              trace.execute(ENGINE, span_id=first_id, start_ns=T0, end_ns=T0 + 3 * S)],
        3.0 + late_s: [trace.execute(OTHER_ENGINE, span_id=second_id, start_ns=T0 + S // 2,
                                     end_ns=T0 + int((3 + late_s) * S))],
    }


@pytest.mark.parametrize("deeper", [False, True], ids=["own_call", "deeper"])
@pytest.mark.parametrize("late_s", [2.5, 60.0])
def test_concurrent_executions_in_one_trace_each_emitting_are_one_duplicate_execution(late_s, deeper):
    """The second execution's copy started within the first execution, which had arrived, and was
    judged that execution's second emission once the hold (1 s) was over: a false duplicate.emission
    at 4.0 s besides the duplicate.execution at 5.5 s (/tmp/s31_dupcover). Each copy names its
    execution: the second one waits for its own."""
    found = _timeline(detector(delivery_deadline_s=1.0), _concurrent_keyed(late_s, deeper=deeper),
                      late_s + 30.0)
    assert found == [(3.0 + late_s, DUPLICATE_EXECUTION)]


def test_concurrent_executions_whose_copies_name_no_execution_are_judged_as_before():
    # an older instrumentation (or a client) names no execution: start times tell, and the second
    # copy is taken for the first execution's (docs/rules.md, known limits)
    found = _timeline(detector(delivery_deadline_s=1.0), _concurrent_keyed(2.5, keyed=False), 30.0)
    assert found == [(4.0, DUPLICATE_EMISSION), (5.5, DUPLICATE_EXECUTION)]


def test_copies_an_execution_made_in_its_own_call_and_deeper_are_raised_once_it_has_arrived():
    # a real duplicate emission: the engine announces the start itself and its tracker again (a
    # foreign span between). Both name the engine's execution: once it has come, the hold is all
    # they wait (before the key, the s31 fix made such copies wait the longest hold, 120 s)
    trace = Trace(run_id="run-own-deeper")
    execute_id = new_span_id()
    script = {
        0.1: [trace.emit("agent_started", parent=execute_id, start_ns=T0 + MS, end_ns=T0 + 2 * MS,
                         execution_span_id=execute_id)],
        0.2: [trace.emit("agent_started", "demo.tracking.Tracker", parent=new_span_id(),
                         start_ns=T0 + 3 * MS, end_ns=T0 + 4 * MS, execution_span_id=execute_id)],
        3.0: [trace.execute(ENGINE, span_id=execute_id, start_ns=T0, end_ns=T0 + 3 * S)],
    }
    found = _timeline(detector(delivery_deadline_s=1.0), script, 60.0)
    assert [rule for _, rule in found] == [DUPLICATE_EMISSION]
    assert 3.0 <= found[0][0] <= 4.2  # at the first due time after its execution arrived


def test_a_copy_naming_an_execution_that_never_comes_waits_the_longest_hold():
    # it started within the arrived execution, but names another one: not covered by time
    trace = Trace(run_id="run-never")
    execute_id, missing_id = new_span_id(), new_span_id()
    script = {
        3.0: [trace.emit("agent_started", parent=execute_id, start_ns=T0 + MS, end_ns=T0 + 2 * MS,
                         execution_span_id=execute_id),
              trace.emit("agent_started", OTHER_EMITTER, parent=new_span_id(), start_ns=T0 + S,
                         end_ns=T0 + S + MS, execution_span_id=missing_id),
              trace.execute(ENGINE, span_id=execute_id, start_ns=T0, end_ns=T0 + 3 * S)],
    }
    found = _timeline(detector(delivery_deadline_s=1.0), script, MAX_EMISSION_HOLD_S + 10)
    assert [rule for _, rule in found] == [DUPLICATE_EMISSION]
    assert MAX_EMISSION_HOLD_S <= found[0][0] <= MAX_EMISSION_HOLD_S + 4


def test_a_copy_naming_no_execution_beside_one_that_names_it_is_judged_by_time():
    # a client's copy (no key) made within the execution, and the engine's own (keyed), in any
    # order: each judged its way, both covered once the execution came
    for keyed_first in (True, False):
        trace = Trace(run_id=f"run-mixed-{keyed_first}")
        execute_id = new_span_id()
        keyed = trace.emit("agent_started", parent=execute_id, start_ns=T0 + MS,
                           end_ns=T0 + 2 * MS, execution_span_id=execute_id)
        plain = trace.emit("agent_started", OTHER_EMITTER, parent=new_span_id(),
                           start_ns=T0 + S, end_ns=T0 + S + MS)
        script = {0.1: [keyed if keyed_first else plain], 0.2: [plain if keyed_first else keyed],
                  3.0: [trace.execute(ENGINE, span_id=execute_id, start_ns=T0, end_ns=T0 + 3 * S)]}
        found = _timeline(detector(delivery_deadline_s=1.0), script, 60.0)
        assert [rule for _, rule in found] == [DUPLICATE_EMISSION]
        assert 3.0 <= found[0][0] <= 4.2


def test_a_duplicate_execution_whose_span_comes_on_a_refusals_retry_still_explains_its_emits():
    # the second execution's span, in a request refused for overload at 3.3 s, comes on the
    # exporter's retry 2.2 s later, past the emits' hold (1 s): its copy of agent_started is that
    # duplicate execution's consequence, not a duplicate.emission (it was before the retry was
    # waited for: both)
    assert isinstance(detector(), RefusalObserver)  # the pipeline tells it
    script, second = _concurrent_executions()
    in_time = {**script, 3.3: [second]}
    assert _timeline(detector(delivery_deadline_s=1.0), in_time, 30.0) == [(3.3, DUPLICATE_EXECUTION)]
    retried = {**script, 5.5: [second]}
    assert _timeline(detector(delivery_deadline_s=1.0), retried, 30.0, refused=(3.3,)) == [
        (5.5, DUPLICATE_EXECUTION)]


def test_duplicate_emits_held_for_a_refusals_retry_are_raised_when_the_retry_window_ends():
    # the retry never brings a second execution: the copies are raised once the refusal's retries
    # are over (rules.export_retry_window_s after it, 10 s by default), not held longer
    script, _second = _concurrent_executions()
    found = _timeline(detector(delivery_deadline_s=1.0), script, 30.0, refused=(3.3,))
    assert found == [(3.3 + RulesConfig().export_retry_window_s, DUPLICATE_EMISSION)]


@pytest.mark.parametrize("window_s", [None, 30.0], ids=["default_window", "window_30s"])
def test_the_export_retry_window_sets_how_long_held_emits_wait_for_a_retried_execution(window_s):
    # rules.export_retry_window_s: behind a Collector the second execution's span, refused at 3.3 s,
    # comes on a retry 25 s later (its backoff: up to 45 s a retry). With the default 10 s its copy
    # of agent_started is raised at 13.3 s as a false duplicate.emission; with 30 s it is explained
    overrides = {} if window_s is None else {"export_retry_window_s": window_s}
    script, second = _concurrent_executions()
    found = _timeline(detector(delivery_deadline_s=1.0, **overrides), {**script, 28.3: [second]},
                      60.0, refused=(3.3,))
    if window_s is None:
        assert found == [(13.3, DUPLICATE_EMISSION), (28.3, DUPLICATE_EXECUTION)]
    else:
        assert found == [(28.3, DUPLICATE_EXECUTION)]


@pytest.mark.parametrize("window_s", [None, 30.0], ids=["default_window", "window_30s"])
def test_the_export_retry_window_sets_how_long_duplicate_writes_wait_for_a_retried_emit(window_s):
    # the emit of an event written twice, refused at 1 s, comes on a retry 25 s later: with the
    # default 10 s the finding named the transport at 11 s; with 30 s it names the emitter
    overrides = {} if window_s is None else {"export_retry_window_s": window_s}
    trace = Trace()
    emit = trace.emit("tool_completed", OTHER_EMITTER)
    dup = detector(delivery_deadline_s=1.0, delivery_export_allowance_s=0.5, **overrides)
    assert dup.consume([trace.deliver(emit), trace.deliver(emit)], NOW) == []
    dup.requests_refused(NOW + S, NOW + S)
    findings = tick_through(dup, NOW, NOW + 26 * S, step_ns=100 * MS)
    findings += dup.consume([emit], NOW + 26 * S)
    findings += tick_through(dup, NOW + 26 * S, NOW + 90 * S, step_ns=100 * MS)
    if window_s is None:
        assert [(f.rule, f.implementation, f.detected_ns) for f in findings] == [
            (DUPLICATE_EMISSION, TRANSPORT, NOW + 11 * S)]
    else:
        assert [(f.rule, f.implementation, f.detected_ns) for f in findings] == [
            (DUPLICATE_EMISSION, OTHER_EMITTER, NOW + 26 * S)]


def test_at_shutdown_held_duplicates_are_reported_not_lost():
    trace = Trace(run_id="run-s")
    execute = trace.execute(ENGINE)
    started = trace.emit("agent_started", parent=execute.span_id)
    again = trace.emit("agent_started", "demo.tracking.Tracker", parent=new_span_id())
    written = trace.emit("tool_completed")  # written twice, its emitter not seen (yet)
    dup = detector(delivery_deadline_s=60.0)
    assert dup.consume([started, again, execute, trace.deliver(written), trace.deliver(written)],
                       NOW) == []
    assert sorted((f.rule, f.event_type) for f in dup.drain(NOW + S)) == [
        (DUPLICATE_EMISSION, "agent_started"), (DUPLICATE_EMISSION, "tool_completed")]
    assert dup.drain(NOW + 2 * S) == [] and dup.tick(NOW + 120 * S) == []


def test_an_adapter_reaching_the_canonical_engine_through_other_spans_is_not_a_second_path():
    """adapter -> a supervisor's call or an LLM client's span -> the canonical engine (nested): the
    nested span names the adapter's span as the call of its role it runs inside."""
    canonical_run, adapter_run = Trace(entry_point="/ws"), Trace(entry_point="/ws")
    adapter = adapter_run.execute("demo.engines.SupervisorExecutionEngineAdapter", canonical=False)
    between = adapter_run.execute("demo.supervisors.ChatOrchestrator", parent=adapter.span_id,
                                  role="supervisor", canonical=True)
    inner = adapter_run.execute(ENGINE, nested=True, parent=between.span_id,
                                outer_span_id=adapter.span_id)
    dup = detector(disabled=(DUPLICATE_EXECUTION, DUPLICATE_EMISSION))
    assert dup.consume([canonical_run.execute(ENGINE)], NOW) == []
    assert dup.consume([inner, between, adapter], NOW) == []


def test_an_alias_or_wrapper_delegating_to_a_nested_implementation_is_not_a_second_path():
    canonical_run, alias_run, wrapped_run = (Trace(entry_point="/ws") for _ in range(3))
    alias = alias_run.execute("demo.engines.ExecutionEngine", canonical=False)
    notifier = wrapped_run.emit("tool_completed", "demo.emitters.Notifier")
    spans = [
        canonical_run.execute(ENGINE), canonical_run.emit("tool_completed", EMITTER),
        alias_run.execute(ENGINE, nested=True, parent=alias.span_id), alias,  # the redirect
        wrapped_run.emit("tool_completed", EMITTER, nested=True, parent=notifier.span_id,
                         event_id=notifier.event_id), notifier,
    ]
    dup = detector(disabled=(DUPLICATE_EXECUTION, DUPLICATE_EMISSION))
    assert dup.consume(spans, NOW) == []
    # a call that does the work itself is still a second path
    [finding] = dup.consume([Trace(entry_point="/ws").execute(OTHER_ENGINE)], NOW)
    assert (finding.rule, finding.implementation) == (DUPLICATE_ENTRY_POINT_PATHS, OTHER_ENGINE)


@pytest.mark.parametrize(("gap_s", "state_overrides"), [
    (40, {}),  # an adapter that delegates, then works on for 40 s (state.ttl_s 300 s)
    (250, {}),
    (90, {"ttl_s": 100.0}),
])
def test_an_adapter_ending_long_after_its_nested_call_is_still_a_pass_through(gap_s, state_overrides):
    """The nested call ends first, and arrives first by as long as the adapter ran on after it (plus
    the export delays): the adapter's mark waits for it as long as the state remembers anything
    (once, 30 s: the adapter was then taken for a second path of its entry point)."""
    canonical_run, adapter_run = Trace(entry_point="/ws"), Trace(entry_point="/ws")
    adapter = adapter_run.execute("demo.engines.SupervisorExecutionEngineAdapter", canonical=False,
                                  duration_ms=gap_s * 1000 + 210)
    inner = adapter_run.execute(ENGINE, nested=True, parent=adapter.span_id)
    dup = DuplicatesDetector(rules(disabled=(DUPLICATE_EXECUTION, DUPLICATE_EMISSION)),
                             state(**state_overrides))
    assert dup.consume([canonical_run.execute(ENGINE), inner], NOW) == []
    assert tick_through(dup, NOW, NOW + gap_s * S) == []
    assert dup.consume([adapter], NOW + gap_s * S) == []
    # a call that does the work itself is still a second path
    [finding] = dup.consume([Trace(entry_point="/ws").execute(OTHER_ENGINE)], NOW + gap_s * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_ENTRY_POINT_PATHS, OTHER_ENGINE)


def test_a_pass_through_mark_whose_call_never_comes_is_let_go_after_the_state_ttl(telemetry):
    adapter_run = Trace(entry_point="/ws")
    adapter = adapter_run.execute("demo.engines.SupervisorExecutionEngineAdapter", canonical=False)
    dup = DuplicatesDetector(rules(disabled=(DUPLICATE_EXECUTION, DUPLICATE_EMISSION)), state(),
                             telemetry)  # state.ttl_s 300 s
    dup.consume([Trace(entry_point="/ws").execute(ENGINE),
                 adapter_run.execute(ENGINE, nested=True, parent=adapter.span_id)], NOW)
    assert tick_through(dup, NOW, NOW + 200 * S) == []
    dup.tables.publish()
    assert sample(telemetry, "pathwatch_state_entries", table="duplicates_wrappers") == 1
    assert tick_through(dup, NOW + 200 * S, NOW + 302 * S) == []
    dup.tables.publish()  # bounded: gone with the TTL
    assert sample(telemetry, "pathwatch_state_entries", table="duplicates_wrappers") == 0
    assert sample(telemetry, "pathwatch_state_evictions_total", table="duplicates_wrappers",
                  reason="ttl") == 1
    # its call arriving after that is taken for a path of its own (docs/rules.md, known limits)
    assert rule_ids(dup.consume([adapter], NOW + 302 * S)) == [DUPLICATE_ENTRY_POINT_PATHS]


def new_span_id() -> str:
    from tests.sidecar.detectors.factory import new_id

    return new_id()


def test_entry_points_past_the_limit_are_not_reported_as_paths():
    from sidecar.detectors.duplicates import MAX_ENTRY_POINTS

    dup = detector(disabled=())
    spans = [Trace(entry_point=f"/e/{index}").execute(engine)
             for index in range(MAX_ENTRY_POINTS) for engine in (ENGINE, OTHER_ENGINE)]
    found = dup.consume(spans, NOW)
    assert len([f for f in found if f.rule == DUPLICATE_ENTRY_POINT_PATHS]) == MAX_ENTRY_POINTS
    beyond = [Trace(entry_point="/beyond").execute(engine) for engine in (ENGINE, OTHER_ENGINE)]
    assert [f for f in dup.consume(beyond, NOW) if f.rule == DUPLICATE_ENTRY_POINT_PATHS] == []



def test_implementations_past_the_bound_of_a_path_are_counted_not_silently_let_go(telemetry):
    from sidecar.detectors.duplicates import MAX_IMPLEMENTATIONS_PER_PATH

    dup = DuplicatesDetector(rules(disabled=()), state(), telemetry)
    trace = Trace(entry_point="/many")
    kept = [trace.execute(f"app.engines.Engine{n}") for n in range(MAX_IMPLEMENTATIONS_PER_PATH)]
    found = dup.consume(kept, NOW)
    assert len([f for f in found if f.rule == DUPLICATE_ENTRY_POINT_PATHS]) == MAX_IMPLEMENTATIONS_PER_PATH - 1
    beyond = [trace.execute("app.engines.Beyond"), trace.execute("app.engines.Beyond"),
              trace.execute("app.engines.Engine0")]  # a kept one again: nothing new, nothing dropped
    assert [f for f in dup.consume(beyond, NOW) if f.rule == DUPLICATE_ENTRY_POINT_PATHS] == []
    assert dup.paths_dropped == 2
    dup.tick(NOW + MS)
    dropped = {"detector": "duplicates", "reason": "path_implementations"}
    assert sample(telemetry, "pathwatch_detector_evidence_dropped_total", **dropped) == 2

# --- the same span sent twice: an export retried in another request (ReplayGuard does not know it) ---
def sent_again(spans):
    """The spans as the decoder makes them from a second request: new records, same ids."""
    return [but(span, culprit=None) for span in spans]


def test_a_run_whose_executions_and_emits_arrive_twice_is_not_executed_or_emitted_twice():
    run = [span for span in clean_run("user-a") if span.kind != "deliver"]  # writes: see the docstring
    dup = detector(disabled=())
    assert dup.consume(run, NOW) == []
    assert dup.consume(sent_again(run), NOW) == []  # a later request
    assert dup.consume(sent_again(run) + sent_again(run), NOW) == []  # twice in one batch
    assert dup.tick(NOW + 600 * S) == []
    # a real second execution of the run is still one
    trace = Trace(user="user-a")
    first, second = trace.execute(), trace.execute(implementation=OTHER_ENGINE)
    dup = detector()
    found = dup.consume([first, *sent_again([first]), second], NOW) + dup.tick(NOW + 600 * S)
    assert rule_ids(found) == [DUPLICATE_EXECUTION]


def test_a_pass_through_sent_again_is_one_with_its_nested_call_and_a_path_without_it():
    # docs/rules.md, known limits (spans sent again): the mark its nested call left is taken when
    # the pass-through first comes (/tmp/s33_dupreview/fuzz.py with REPLAY_PATHS=1)
    canonical_run, alias_run = Trace(entry_point="/ws"), Trace(entry_point="/ws")
    alias = alias_run.execute("demo.engines.ExecutionEngine", canonical=False)
    inner = alias_run.execute(ENGINE, nested=True, parent=alias.span_id, outer_span_id=alias.span_id)
    dup = detector(disabled=(DUPLICATE_EXECUTION, DUPLICATE_EMISSION))
    assert dup.consume([canonical_run.execute(ENGINE), inner, alias], NOW) == []
    assert dup.consume(sent_again([inner, alias]), NOW + S) == []
    [finding] = dup.consume(sent_again([alias]), NOW + 2 * S)
    assert (finding.rule, finding.implementation) == (DUPLICATE_ENTRY_POINT_PATHS, alias.implementation)


def test_copies_emitted_outside_any_span_by_two_executions_are_the_duplicate_execution_only():
    """An emit made where no span context reaches (``loop.run_in_executor``, a thread the app
    starts: docs/conventions.md) has no parent and is a root of its own trace. A job run twice by a
    worker outside any request (no user), each execution emitting agent_started so, is not 'one
    call emitting it again': the copies are the duplicate execution's consequence, reported once as
    duplicate.execution."""
    a, b = Trace(user=None, run_id="run-np"), Trace(user=None, run_id="run-np")
    emits = [but(a.emit("agent_started"), parent_span_id=None, trace_id=new_span_id() * 2),
             but(b.emit("agent_started", OTHER_EMITTER), parent_span_id=None,
                 trace_id=new_span_id() * 2)]
    dup = detector(delivery_deadline_s=1.0)
    found = dup.consume(emits, NOW)
    found += dup.consume([a.execute(ENGINE), b.execute(OTHER_ENGINE)], NOW + 5 * S)
    found += tick_through(dup, NOW + 5 * S, NOW + int((MAX_EMISSION_HOLD_S + 10) * S))
    assert rule_ids(found) == [DUPLICATE_EXECUTION]


def test_copies_emitted_outside_any_span_in_a_run_executed_once_are_raised_after_the_hold():
    trace = Trace(run_id="run-np1")
    emits = [but(trace.emit("agent_started"), parent_span_id=None, trace_id=new_span_id() * 2)
             for _ in range(2)]
    dup = detector(delivery_deadline_s=1.0)
    found = dup.consume(emits, NOW) + dup.consume([trace.execute(ENGINE)], NOW + S)
    found += tick_through(dup, NOW + S, NOW + int((MAX_EMISSION_HOLD_S + 10) * S))
    assert rule_ids(found) == [DUPLICATE_EMISSION]


# --- found holding by a random-arrival review (/tmp/s33_dupreview/fuzz.py): shapes the cases above
# do not combine ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("keyed_copy", ["first", "second"])
def test_s4_whose_copies_one_keyed_one_not_arrive_before_both_executions_is_one_finding(keyed_copy):
    """S4 in two traces (HTTP and WebSocket paths), each execution announcing the start; one copy
    names its execution, the other (a client's) names none; both copies come long before either
    execute span, the WebSocket execution's first: only the duplicate execution is reported."""
    http = Trace(user="user-a", entry_point="/api/runs", run_id="run-mixed")
    ws = Trace(user="user-a", entry_point="/ws", run_id="run-mixed")
    x_http, x_ws = new_span_id(), new_span_id()
    first = http.emit("agent_started", parent=x_http, start_ns=T0 + S, end_ns=T0 + S + MS,
                      execution_span_id=x_http if keyed_copy == "first" else None)
    second = ws.emit("agent_started", parent=new_span_id(), start_ns=T0 + 2 * S,
                     end_ns=T0 + 2 * S + MS, execution_span_id=x_ws if keyed_copy == "second" else None)
    script = {
        1.1: [first], 2.1: [second],
        12.0: [ws.execute(OTHER_ENGINE, span_id=x_ws, start_ns=T0 + 2 * S - MS, end_ns=T0 + 12 * S)],
        40.0: [http.execute(ENGINE, span_id=x_http, start_ns=T0 + S - MS, end_ns=T0 + 40 * S)],
    }
    assert _timeline(detector(delivery_deadline_s=1.0), script, 200.0) == [(40.0, DUPLICATE_EXECUTION)]


def test_a_run_retried_through_an_alias_with_copies_naming_each_execution_raises_nothing():
    """The alias (ExecutionEngine) delegating to the canonical engine raised, and the run was
    retried through it: each attempt's copies of agent_started name the alias's call, the writes
    come before their emits, and the failed attempt's execute spans arrive after the retry's."""
    trace = Trace(user="user-a", run_id="run-alias-retry")
    attempts = []
    for index, (start_s, end_s) in enumerate([(0, 2), (3, 9)]):
        failed = index == 0
        alias = trace.execute(ALIAS, canonical=False, start_ns=T0 + start_s * S,
                              end_ns=T0 + end_s * S, error=failed)
        inner = trace.execute(ENGINE, nested=True, parent=alias.span_id, outer_span_id=alias.span_id,
                              start_ns=alias.start_ns + MS, end_ns=alias.end_ns - MS, error=failed)
        started = trace.emit("agent_started", parent=inner.span_id, start_ns=inner.start_ns + MS,
                             end_ns=inner.start_ns + 2 * MS, execution_span_id=alias.span_id)
        tabs = [trace.deliver(started, connection_id=tab) for tab in ("tab-1", "tab-2")]
        attempts.append((tabs + [started], [inner, alias]))
    script = {0.1: attempts[0][0], 3.1: attempts[1][0], 9.0: attempts[1][1], 14.0: attempts[0][1]}
    found = _timeline(detector(delivery_deadline_s=1.0, disabled=()), script, 200.0)
    assert found == []

