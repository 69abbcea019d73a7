import threading

import pytest

from sidecar.model import SpanRecord
from sidecar.pipeline import Admission
from sidecar.receiver import ReplayGuard
from sidecar.receiver.decode import DecodedBatch


def batch(*span_ids: str) -> DecodedBatch:
    return DecodedBatch([SpanRecord("t" * 32, span_id, None, "s", 0, 1) for span_id in span_ids], [])


def accept() -> Admission:
    return Admission.ACCEPTED


def refuse() -> Admission:
    return Admission.OVER_BUDGET


def test_a_request_is_submitted_once_and_a_replay_after():
    guard = ReplayGuard()
    assert guard.submit_once(guard.key(batch("a", "b"), 100), accept) is Admission.ACCEPTED
    assert guard.submit_once(guard.key(batch("a", "b"), 100), accept) is None


def test_requests_that_differ_in_size_count_or_ends_are_distinct():
    guard = ReplayGuard()
    keys = {guard.key(batch("a", "b"), 100), guard.key(batch("a", "b"), 101),
            guard.key(batch("a", "c", "b"), 100), guard.key(batch("a", "c"), 100),
            guard.key(batch("c", "b"), 100)}
    assert len(keys) == 5
    assert all(guard.submit_once(key, accept) is Admission.ACCEPTED for key in keys)


def test_a_refused_request_is_new_when_it_comes_back():
    guard = ReplayGuard()
    key = guard.key(batch("a"), 10)
    assert guard.submit_once(key, refuse) is Admission.OVER_BUDGET
    assert guard.submit_once(key, accept) is Admission.ACCEPTED


def test_a_retry_racing_its_first_copy_waits_for_that_copys_outcome():
    """The first copy is being submitted (and will be refused) when its retry arrives: the retry
    must not be answered OK as a replay of a copy that was never accepted."""
    guard = ReplayGuard()
    key = guard.key(batch("a"), 10)
    entered, release = threading.Event(), threading.Event()
    outcomes = {}

    def slow_refusal() -> Admission:
        entered.set()
        release.wait(10)
        return Admission.OVER_BUDGET

    first = threading.Thread(target=lambda: outcomes.setdefault("first", guard.submit_once(key, slow_refusal)))
    first.start()
    assert entered.wait(10)
    retry = threading.Thread(target=lambda: outcomes.setdefault("retry", guard.submit_once(key, accept)))
    retry.start()
    release.set()
    first.join(10)
    retry.join(10)
    assert outcomes == {"first": Admission.OVER_BUDGET, "retry": Admission.ACCEPTED}


def test_memory_is_bounded_the_oldest_forgotten_first():
    guard = ReplayGuard(capacity=3)
    keys = [guard.key(batch(str(n)), 10) for n in range(4)]
    assert all(guard.submit_once(key, accept) for key in keys)
    assert len(guard) == 3
    assert guard.submit_once(keys[0], accept) is Admission.ACCEPTED  # forgotten: new again
    assert guard.submit_once(keys[3], accept) is None


def test_a_request_without_valid_spans_has_no_identity():
    assert ReplayGuard.key(batch(), 10) is None
    with pytest.raises(ValueError, match="capacity"):
        ReplayGuard(0)
