import pytest

from sidecar.model import SpanRecord
from sidecar.receiver import ReplayGuard
from sidecar.receiver.decode import DecodedBatch


def batch(*span_ids: str) -> DecodedBatch:
    return DecodedBatch([SpanRecord("t" * 32, span_id, None, "s", 0, 1) for span_id in span_ids], [])


def test_a_request_is_new_once_and_a_replay_after():
    guard = ReplayGuard()
    key = guard.key(batch("a", "b"), 100)
    assert guard.claim(key) is True
    assert guard.claim(guard.key(batch("a", "b"), 100)) is False


def test_requests_that_differ_in_size_count_or_ends_are_distinct():
    guard = ReplayGuard()
    keys = {guard.key(batch("a", "b"), 100), guard.key(batch("a", "b"), 101),
            guard.key(batch("a", "c", "b"), 100), guard.key(batch("a", "c"), 100),
            guard.key(batch("c", "b"), 100)}
    assert len(keys) == 5 and all(guard.claim(key) for key in keys)


def test_a_released_request_is_new_again():
    guard = ReplayGuard()
    key = guard.key(batch("a"), 10)
    assert guard.claim(key)
    guard.release(key)
    assert guard.claim(key)


def test_memory_is_bounded_the_oldest_forgotten_first():
    guard = ReplayGuard(capacity=3)
    keys = [guard.key(batch(str(n)), 10) for n in range(4)]
    assert all(guard.claim(key) for key in keys)
    assert len(guard) == 3
    assert guard.claim(keys[0]) is True  # forgotten: new again (and the next oldest goes)
    assert guard.claim(keys[3]) is False


def test_a_request_without_valid_spans_has_no_identity():
    assert ReplayGuard.key(batch(), 10) is None
    with pytest.raises(ValueError, match="capacity"):
        ReplayGuard(0)
