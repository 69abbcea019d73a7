"""bleed.leaked_context / bleed.span_vs_root_user for work that names its request
(``pathwatch.request.span_id``): judged against that request, whenever it arrives, not placed by its
times among the other requests of its trace.

Reproducer /tmp/s32_fp/test_repro_session_trace_socket.py (real stack: /tmp/s32_fp/sc_pagetrace2.py,
4 of 4 sessions; sc_switch.py): a traced native client keeps one trace for a whole app session and
sends ``traceparent`` (a client span of its own) on every HTTP call and socket upgrade. Its socket
drops and it reconnects in the same trace; the second socket's request span arrives only when it
closes, so its work was placed after the last request known by then and reported as critical
leaked context (span_vs_root_user too after a logout and a login as another user)."""

from __future__ import annotations

import itertools

import pytest

from sidecar.detectors.bleed import MAX_SIBLINGS_PER_TRACE, PARENTED_ROOT_HOLD_S, BleedDetector
from sidecar.model import SpanRecord, keyed_user
from sidecar.rules import BLEED_LEAKED_CONTEXT, BLEED_SPAN_VS_ROOT_USER
from tests.sidecar.detectors.factory import (MS, NOW, S, T0, Trace, but, new_id, rule_ids, rules, state,
                                             tick_through)

HOLD_NS = int((PARENTED_ROOT_HOLD_S + 1) * S)


def _request(trace: Trace, start_ms: int, end_ms: int, user: str | None = "user-a") -> SpanRecord:
    return trace.request(start_ns=T0 + start_ms * MS, end_ns=T0 + end_ms * MS, span_id=new_id(),
                         parent_span_id=new_id(), user=user)  # each call: a client span of its own


def _write(trace: Trace, request: SpanRecord | None, start_ms: float, user: str | None = "user-a", *,
           parent: str | None = None) -> SpanRecord:
    """A socket write made under ``request`` (named by ``pathwatch.request.span_id``; None: names
    none, an older instrumentation), its child unless ``parent`` says otherwise."""
    named = None if request is None else request.span_id
    return trace.deliver(trace.emit("agent_started"), start_ns=T0 + int(start_ms * MS),
                         end_ns=T0 + int((start_ms + 1) * MS), user=user, request_span_id=named,
                         parent_span_id=parent or named or new_id())


def _session(second_user: str, *, named: bool = True) -> tuple[list[list[SpanRecord]], SpanRecord]:
    trace = Trace(user="user-a")
    http_1 = _request(trace, 70, 79)
    socket_1 = _request(trace, 0, 81)                      # dropped at 81 ms
    socket_2 = _request(trace, 83, 20_000, second_user)    # reconnected; closes 20 s later
    connected = _write(trace, socket_2 if named else None, 84, second_user,
                       parent=socket_2.span_id)            # its `connected` reply
    http_2 = _request(trace, 94, 101, second_user)
    run_write = _write(trace, socket_2 if named else None, 400, second_user,
                       parent=new_id())                    # a socket-2 run's event, after think time
    return [[http_1], [socket_1], [connected], [http_2], [run_write]], socket_2


def _found(batches: list[list[SpanRecord]], late_request: SpanRecord, detector=None) -> list:
    bleed = detector or BleedDetector(rules(), state())
    found = [f for batch in batches for f in bleed.consume(batch, NOW)]
    found += bleed.tick(NOW + HOLD_NS)                      # the hold ends: the socket still open
    found += bleed.consume([late_request], NOW + 20 * S)    # the socket closes
    found += bleed.tick(NOW + 20 * S + HOLD_NS) + bleed.drain(NOW + 60 * S)
    return found


def test_work_of_a_socket_reconnected_in_a_session_trace_waits_for_its_socket():
    assert _found(*_session("user-a")) == []


def test_a_logout_and_login_on_a_new_socket_in_a_session_trace_is_not_bleed():
    assert _found(*_session("user-b")) == []


def test_work_naming_no_request_is_still_placed_by_its_times():
    # an older instrumentation: the known limit stays (docs/rules.md)
    assert BLEED_LEAKED_CONTEXT in rule_ids(_found(*_session("user-a", named=False)))


def test_another_users_work_under_a_live_socket_is_found_when_the_socket_arrives():
    trace = Trace(user="user-a")
    http_1, socket = _request(trace, 0, 10), _request(trace, 20, 20_000)
    wrong = _write(trace, socket, 400, "user-b")  # another user's event on the socket's run
    for batches in ([[http_1], [wrong]], [[wrong], [http_1]], [[http_1, wrong]]):
        found = _found(batches, socket)
        assert [(f.rule, f.span_id) for f in found] == [(BLEED_SPAN_VS_ROOT_USER, wrong.span_id)], batches


def test_work_started_after_the_request_it_names_ended_is_leaked_even_while_another_runs():
    trace = Trace(user="user-a")
    first, second = _request(trace, 0, 20), _request(trace, 50, 70)
    orphan = _write(trace, first, 60, parent=new_id())  # a task the first request left running
    for batches in ([[first], [orphan], [second]], [[orphan], [first], [second]],
                    [[first], [second], [orphan]], [[second], [orphan], [first]]):
        bleed = BleedDetector(rules(), state())
        found = [f for batch in batches for f in bleed.consume(batch, NOW)]
        found += bleed.tick(NOW + HOLD_NS)
        assert rule_ids(found) == [BLEED_LEAKED_CONTEXT], batches
        assert found[0].details["late_ms"] == 40.0, batches  # after its own request's end


def test_work_of_a_live_socket_started_after_it_ended_is_leaked_when_it_arrives():
    trace = Trace(user="user-a")
    http_1, socket = _request(trace, 0, 10), _request(trace, 20, 300)
    late = _write(trace, socket, 400)  # the socket's task, after the socket closed
    found = _found([[http_1], [late]], socket)
    assert rule_ids(found) == [BLEED_LEAKED_CONTEXT]
    assert found[0].details["late_ms"] == 100.0


def test_work_awaiting_a_request_that_takes_the_roots_place_is_judged_against_it():
    # the named request encloses the first one (its inner request): it becomes the root
    trace = Trace(user="user-a")
    inner, outer = _request(trace, 10, 20), _request(trace, 0, 5_000)
    mine, theirs = _write(trace, outer, 400), _write(trace, outer, 500, "user-b")
    assert _found([[inner], [mine]], outer) == []
    found = _found([[inner], [theirs]], outer)
    assert [(f.rule, f.span_id) for f in found] == [(BLEED_SPAN_VS_ROOT_USER, theirs.span_id)]


def test_work_awaiting_the_unparented_root_is_judged_against_it():
    trace = Trace(user="user-a")
    inner = _request(trace, 10, 20)
    root = trace.request(start_ns=T0, end_ns=T0 + 5_000 * MS, span_id=new_id(), parent_span_id=None,
                         user="user-a")
    mine, late = _write(trace, root, 400), _write(trace, root, 6_000, parent=new_id())
    assert _found([[inner], [mine]], root) == []
    assert rule_ids(_found([[inner], [late]], root)) == [BLEED_LEAKED_CONTEXT]


def test_work_awaiting_a_request_that_never_comes_is_let_go_counted_with_its_trace():
    trace = Trace(user="user-a")
    http_1, never = _request(trace, 0, 10), _request(trace, 20, 30)
    bleed = BleedDetector(rules(), state(ttl_s=30))
    found = bleed.consume([http_1, _write(trace, never, 400, "user-b")], NOW)
    found += bleed.tick(NOW + HOLD_NS) + bleed.tick(NOW + 120 * S) + bleed.drain(NOW + 121 * S)
    assert found == []
    assert bleed.unplaced_dropped == 1


def test_the_users_of_a_live_socket_that_changed_user_are_judged_when_it_arrives():
    # a logout and a login as another user on the second socket itself: each user's work stands
    # for its own (the first span of each user waits), judged against every user the socket had
    trace = Trace(user="user-a")
    http_1 = _request(trace, 0, 10)
    socket = trace.request(start_ns=T0 + 20 * MS, end_ns=T0 + 20_000 * MS, span_id=new_id(),
                           parent_span_id=new_id(), user="user-b", connection_users=("user-a", "user-b"))
    before, after = _write(trace, socket, 400, "user-a"), _write(trace, socket, 900, "user-b")
    assert _found([[http_1], [before], [after]], socket) == []
    stranger = _write(trace, socket, 600, "user-c")
    found = _found([[http_1], [before], [stranger], [after]], socket)
    assert [(f.rule, f.span_id) for f in found] == [(BLEED_SPAN_VS_ROOT_USER, stranger.span_id)]


@pytest.mark.parametrize("evicted_by", ["capacity", "ttl"])
def test_a_request_arriving_to_a_trace_evicted_while_findings_were_held_is_placed_like_any_other(
        evicted_by):
    # the trace is evicted (other traffic, a short ttl) while what the first call's task did after it
    # ended is held, and the socket's request span is the next span of it. It used to become the
    # trace's root at once (a trace seen for the first time): the first call's work was judged at the
    # hold's end against the socket's other user (a false span_vs_root_user, its true leaked_context
    # lost), and the work waiting for the socket was never judged (a third user's work on it missed)
    trace = Trace(user="user-a")
    http_1, socket = _request(trace, 0, 10), _request(trace, 20, 3_000, "user-b")
    leaked = _write(trace, http_1, 50, parent=new_id())  # the first call's task, after it ended
    wrong = _write(trace, socket, 400, "user-c")         # another user's event on the socket
    bleed = BleedDetector(rules(), state(max_traces=2) if evicted_by == "capacity" else state(ttl_s=2.0))
    found = bleed.tick(NOW - S) + bleed.consume([http_1, leaked, wrong], NOW)
    if evicted_by == "capacity":
        for _ in range(3):
            found += bleed.consume([Trace().execute()], NOW)
    else:
        found += tick_through(bleed, NOW, NOW + 4 * S)
    assert trace.trace_id not in bleed._traces  # evicted; its findings held
    found += bleed.consume([socket], NOW + 4 * S)
    found += tick_through(bleed, NOW + 4 * S, NOW + HOLD_NS + 6 * S) + bleed.drain(NOW + 60 * S)
    assert sorted((f.rule, f.span_id) for f in found) == [
        (BLEED_LEAKED_CONTEXT, leaked.span_id), (BLEED_SPAN_VS_ROOT_USER, wrong.span_id)]


@pytest.mark.parametrize("evicted_by", ["capacity", "ttl"])
def test_work_awaiting_a_request_is_counted_when_the_hold_lets_its_evicted_trace_go(evicted_by):
    # a trace evicted while findings were held is kept by the hold (its next span takes it back):
    # when the hold ends with no such span, the work waiting for its socket goes with it, counted
    trace = Trace(user="user-a")
    http_1, socket = _request(trace, 0, 10), _request(trace, 20, 60_000)
    leaked = _write(trace, http_1, 50, parent=new_id())  # held: the first call's task, after it ended
    waiting = _write(trace, socket, 400, "user-b")
    bleed = BleedDetector(rules(), state(max_traces=2) if evicted_by == "capacity" else state(ttl_s=2.0))
    found = bleed.tick(NOW - S) + bleed.consume([http_1, leaked, waiting], NOW)
    if evicted_by == "capacity":
        for _ in range(3):
            found += bleed.consume([Trace().execute()], NOW)
    else:
        found += tick_through(bleed, NOW, NOW + 4 * S)
    assert trace.trace_id not in bleed._traces and bleed.unplaced_dropped == 0  # kept by the hold
    found += tick_through(bleed, NOW + 4 * S, NOW + HOLD_NS + 6 * S)
    assert [(f.rule, f.span_id) for f in found] == [(BLEED_LEAKED_CONTEXT, leaked.span_id)]
    assert bleed.unplaced_dropped == 1


def test_work_naming_a_request_that_turns_out_a_sibling_of_a_new_root_is_judged_against_it():
    # an uninstrumented caller (one parent for its calls) makes a short call and a long one; the long
    # one calls the backend itself (an inner request, its own parent), which ends and arrives first,
    # the root so far. The short call's task goes on after it ended: leaked_context, which work naming
    # no request (placed by its parent) was found as in every order, and work naming its request was
    # not when the long call took the root's place after it (judged again against it and let go)
    trace = Trace(user="user-a")
    caller = new_id()
    inner = _request(trace, 10, 20)
    short = trace.request(start_ns=T0 + 100 * MS, end_ns=T0 + 110 * MS, span_id=new_id(),
                          parent_span_id=caller, user="user-a")
    long = trace.request(start_ns=T0, end_ns=T0 + 1_000 * MS, span_id=new_id(), parent_span_id=caller,
                         user="user-a")
    for named in (short, None):
        task = _write(trace, named, 300, parent=short.span_id)  # the short call's task, after it ended
        for first in itertools.permutations([inner, short, task]):
            if first[0] is task:
                continue  # (judged through the spans that stand for a trace's work: first limit)
            bleed = BleedDetector(rules(), state())
            found = [f for span in first for f in bleed.consume([span], NOW)]
            found += bleed.consume([long], NOW + S)
            found += bleed.tick(NOW + S + HOLD_NS) + bleed.drain(NOW + 60 * S)
            assert [(f.rule, f.span_id) for f in found] == [(BLEED_LEAKED_CONTEXT, task.span_id)], (
                named is not None, [span.span_id for span in first])


def test_work_naming_a_kept_request_of_a_trace_that_dropped_siblings_is_still_judged():
    # a fan-out past MAX_SIBLINGS_PER_TRACE calls: work that cannot be placed under a kept call is
    # let go (unplaced), but work naming a kept call was let go too unless it was its direct child
    trace = Trace(user="user-a")
    caller = new_id()
    calls = [trace.request(start_ns=T0 + i * 100 * MS, end_ns=T0 + (i * 100 + 10) * MS, span_id=new_id(),
                           parent_span_id=caller, user="user-a") for i in range(MAX_SIBLINGS_PER_TRACE + 1)]
    kept = calls[1]  # 100..110 ms
    for user, start_ms, rule in (("user-b", 105, BLEED_SPAN_VS_ROOT_USER),
                                 ("user-a", 150, BLEED_LEAKED_CONTEXT), ("user-a", 105, None)):
        deep = _write(trace, kept, start_ms, user, parent=new_id())  # not its direct child
        for order in ([*calls, deep], [deep, *calls]):
            bleed = BleedDetector(rules(), state())
            found = [f for span in order for f in bleed.consume([span], NOW)]
            found += bleed.tick(NOW + HOLD_NS) + bleed.drain(NOW + 60 * S)
            assert bleed.siblings_dropped == 1
            assert [(f.rule, f.span_id) for f in found] == ([] if rule is None else [(rule, deep.span_id)])
            assert bleed.unplaced_dropped == 0


def _gateway_with_inner_task(trace: Trace, root_parent: str | None, task_start_ns: int):
    """A gateway request (0..1000 ms; no parent, or an uninstrumented load balancer's) calls a
    service (an inner request, 100..200 ms) that leaves a task running: the task's write names the
    inner request and starts ``task_start_ns`` after it ended, well within the gateway's request."""
    gateway = trace.request(start_ns=T0, end_ns=T0 + 1_000 * MS, span_id=new_id(),
                            parent_span_id=root_parent, user="user-a")
    inner = _request(trace, 100, 200)
    inner_work = _write(trace, inner, 110)
    task = _write(trace, None, 0, parent=new_id())
    task.request_span_id = inner.span_id
    task.start_ns, task.end_ns = inner.end_ns + task_start_ns, inner.end_ns + task_start_ns + MS
    gateway_work = _write(trace, gateway, 800)
    return gateway, inner, inner_work, task, gateway_work


@pytest.mark.parametrize("root_parent", [None, "lb"])
@pytest.mark.parametrize(("late_ns", "leaked"), [(5 * MS, False), (5 * MS + 1, True), (300 * MS, True)])
def test_a_task_an_inner_request_leaves_running_within_its_root_is_leaked_context(
        root_parent, late_ns, leaked):
    # the open limit until s34: judged against the root alone, whose end it started before
    trace = Trace(user="user-a")
    gateway, inner, inner_work, task, gateway_work = _gateway_with_inner_task(
        trace, root_parent and new_id(), late_ns)
    expected = [(BLEED_LEAKED_CONTEXT, task.span_id)] if leaked else []
    for order in itertools.permutations([inner, task, gateway_work, gateway]):
        bleed = BleedDetector(rules(), state())
        found = bleed.consume([inner_work], NOW)
        found += [f for span in order for f in bleed.consume([span], NOW)]
        found += bleed.tick(NOW + HOLD_NS) + bleed.drain(NOW + 60 * S)
        got = [(f.rule, f.span_id) for f in found]
        if order.index(task) < order.index(inner):
            # before the request it names (its process exports it after: it ends later), it is
            # judged against the root alone, unless kept for that request (docs/rules.md)
            assert got in ([], expected), [s.span_id for s in order]
            continue
        assert got == expected, [s.span_id for s in order]
        if leaked:
            assert found[0].details["late_ms"] == round(late_ns / MS, 3)  # after the inner request's end


@pytest.mark.parametrize("user", ["user-b", "user-a"])
def test_work_naming_an_inner_request_of_a_sibling_is_judged_against_that_request(user):
    # a BFF's concurrent calls for user-b (S1) and user-a (S2) in one trace; S2 calls a service (its
    # inner request, user-a), whose work names it. user-b's context in it was placed by its times,
    # under S1 (running then, its user the work's), and passed: never found, in any arrival order
    trace = Trace(user="user-a")
    caller = new_id()
    s1 = trace.request(start_ns=T0, end_ns=T0 + 200 * MS, span_id=new_id(), parent_span_id=caller,
                       user="user-b")
    s2 = trace.request(start_ns=T0 + 50 * MS, end_ns=T0 + 150 * MS, span_id=new_id(),
                       parent_span_id=caller, user="user-a")
    inner = _request(trace, 60, 90, "user-a")
    work = _write(trace, inner, 70, user)
    expected = [(BLEED_SPAN_VS_ROOT_USER, work.span_id)] if user == "user-b" else []
    for order in itertools.permutations([s1, s2, inner, work]):
        bleed = BleedDetector(rules(), state())
        found = [f for span in order for f in bleed.consume([span], NOW)]
        found += bleed.tick(NOW + HOLD_NS) + bleed.drain(NOW + 60 * S)
        assert [(f.rule, f.span_id) for f in found] == expected, [s.span_id for s in order]


@pytest.mark.parametrize(("work_user", "users", "truncated", "dropped"), [
    ("user-a", ("user-a", "user-b"), False, None),           # a user the socket had: its own work
    ("user-c", ("user-a", "user-b"), True, "unlisted"),      # maybe one it had, not listed
    (keyed_user("user-b", "k1"), None, False, "keys"),       # the same user under the old key
])
def test_work_naming_an_inner_request_of_a_user_it_had_or_cannot_compare_is_no_bleed(
        work_user, users, truncated, dropped):
    # a gateway's socket and its inner request (another service's socket) on which user-a logged
    # out and user-b in (their request spans list them, maybe not all), or whose key rotated before
    # it closed; judged against that request at once, work of a user it had is its own, of one it
    # may have had is let go (counted), and ids of two keys are not compared (counted)
    trace = Trace(user="user-b")
    gateway = trace.request(start_ns=T0, end_ns=T0 + 1_000 * MS, span_id=new_id(), user="user-b",
                            connection_users=users, connection_users_truncated=truncated)
    inner_user = keyed_user("user-b", "k2") if users is None else "user-b"
    inner = but(_request(trace, 100, 500, inner_user), connection_users=users,
                connection_users_truncated=truncated)
    work = _write(trace, inner, 200, work_user)
    bleed = BleedDetector(rules(), state())
    found = [f for span in (inner, work, gateway) for f in bleed.consume([span], NOW)]
    found += bleed.tick(NOW + HOLD_NS) + bleed.drain(NOW + 60 * S)
    assert found == []
    assert (bleed.unlisted_dropped > 0, bleed.keys_dropped > 0) == (dropped == "unlisted", dropped == "keys")
