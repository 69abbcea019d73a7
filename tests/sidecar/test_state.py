import pytest
from prometheus_client import CollectorRegistry

from sidecar.state import OVERFLOW_LABEL, BoundedLabels, BoundedTable, TableGroup
from sidecar.telemetry import Telemetry

S = 1_000_000_000


def table(capacity: int = 3, ttl_s: float = 10.0, evicted: list | None = None,
          resolution_s: float = 1.0) -> BoundedTable:
    on_evict = (lambda key, value, reason: evicted.append((key, value, reason))) if evicted is not None else None
    return BoundedTable("t", capacity, ttl_s, on_evict=on_evict, resolution_s=resolution_s)


def test_put_get_pop():
    t = table()
    t.put("a", 1)
    assert (t.get("a"), "a" in t, len(t)) == (1, True, 1)
    assert t.pop("a", None) == 1
    assert (t.get("a"), t.pop("a", None), len(t)) == (None, None, 0)
    assert t.evictions == {"ttl": 0, "capacity": 0}  # removal by the owner is not an eviction


def test_capacity_evicts_the_least_recently_touched_entry_and_counts_it():
    evicted: list = []
    t = table(capacity=2, evicted=evicted)
    t.put("a", 1)
    t.put("b", 2)
    t.touch("a")  # "b" is now the oldest
    t.put("c", 3)
    assert evicted == [] and len(t) == 3  # within one batch: enforced after it
    assert t.enforce() == 1
    assert evicted == [("b", 2, "capacity")]
    assert (t.get("a"), t.get("b"), t.get("c")) == (1, None, 3)
    assert t.evictions["capacity"] == 1


def test_replacing_a_key_does_not_evict():
    evicted: list = []
    t = table(capacity=1, evicted=evicted)
    t.put("a", 1)
    t.put("a", 2)
    assert (t.get("a"), t.enforce(), evicted) == (2, 0, [])


def test_ttl_expires_entries_idle_for_the_ttl_within_the_resolution_and_counts_them():
    evicted: list = []
    t = table(ttl_s=10, evicted=evicted, resolution_s=1)
    t.put("a", 1)  # touched at ~0
    t.advance(0)
    t.put("b", 2)  # touched at ~0.5 s
    t.advance(1 * S)
    assert t.advance(10 * S - 1) == 0  # not yet idle for the TTL
    assert t.advance(10 * S) == 1  # "a" sat before the mark of t=0
    assert evicted == [("a", 1, "ttl")]
    t.touch("b")  # touching keeps an entry alive
    t.advance(12 * S)
    assert t.advance(21 * S) == 0 and t.get("b") == 2
    assert t.advance(22 * S) == 1
    assert t.evictions == {"ttl": 2, "capacity": 0}
    assert len(t) == 0


def test_get_does_not_refresh_but_touch_does():
    t = table(ttl_s=10)
    t.put("a", 1)
    t.put("b", 1)
    t.advance(0)
    t.get("a")
    assert t.touch("b") == 1 and t.touch("missing") is None
    t.advance(1 * S)
    assert t.advance(10 * S) == 1
    assert (t.get("a"), t.get("b")) == (None, 1)


def test_time_marks_do_not_count_as_entries_or_against_capacity():
    evicted: list = []
    t = table(capacity=2, evicted=evicted, resolution_s=1)
    for second in range(5):
        t.advance(second * S)
    t.put("a", 1)
    t.put("b", 2)
    assert len(t) == 2 and evicted == [] and list(t.values()) == [1, 2]
    t.put("c", 3)
    t.advance(5 * S)  # advancing the time enforces the capacity too
    assert evicted == [("a", 1, "capacity")]


def test_oldest_is_the_least_recently_touched_entry():
    t = table()
    assert t.oldest() is None
    t.advance(0)
    t.put("a", 1)
    t.put("b", 2)
    t.touch("a")
    assert t.oldest() == ("b", 2)


@pytest.mark.parametrize("args, message", [
    (("", 1, 1.0), "needs a name"),
    (("x", 0, 1.0), "capacity must be > 0"),
    (("x", 1, 0.0), "ttl_s must be > 0"),
    (("x", 1, 1.0, None, 0.0), "resolution_s must be > 0"),
])
def test_bad_table_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        BoundedTable(*args)


def test_table_group_publishes_sizes_capacity_and_eviction_deltas():
    telemetry = Telemetry(CollectorRegistry())
    a, b = BoundedTable("a", 2, 10.0), BoundedTable("b", 5, 10.0)
    group = TableGroup(telemetry, [a, b], publish_every_s=1.0)
    for i in range(4):
        a.put(i, i)
    group.enforce()
    group.maybe_publish(0)
    get = telemetry.registry.get_sample_value
    assert get("pathwatch_state_entries", {"table": "a"}) == 2
    assert get("pathwatch_state_capacity", {"table": "b"}) == 5
    assert get("pathwatch_state_evictions_total", {"table": "a", "reason": "capacity"}) == 2
    a.put(9, 9)
    group.maybe_publish(S - 1)  # throttled
    assert get("pathwatch_state_evictions_total", {"table": "a", "reason": "capacity"}) == 2
    group.advance(0)
    group.advance(20 * S)
    group.maybe_publish(S)
    assert get("pathwatch_state_evictions_total", {"table": "a", "reason": "capacity"}) == 3
    assert get("pathwatch_state_evictions_total", {"table": "a", "reason": "ttl"}) == 2
    assert get("pathwatch_state_entries", {"table": "a"}) == 0
    assert group.stats()["a"] == {"entries": 0, "capacity": 2, "evicted_ttl": 2, "evicted_capacity": 3}


def test_table_group_refuses_duplicate_names():
    with pytest.raises(ValueError, match="unique"):
        TableGroup(None, [BoundedTable("a", 1, 1.0), BoundedTable("a", 1, 1.0)])


def test_bounded_labels_fold_values_past_the_limit_into_other_and_count_them():
    labels = BoundedLabels("roles", 2)
    assert [labels("a"), labels("b"), labels("a"), labels("c"), labels("d")] == ["a", "b", "a", OVERFLOW_LABEL, OVERFLOW_LABEL]
    assert (labels.overflowed, len(labels)) == (2, 2)
    assert labels(None, "unknown") == "unknown"
    assert (labels.known("a"), labels.known("c")) == ("a", None)


def test_memory_stays_bounded_under_endless_distinct_keys():
    t = table(capacity=100)
    for i in range(10_000):
        t.put(f"run-{i}", i)
        if i % 10 == 0:
            t.enforce()  # the owner's batch ends
        if i % 100 == 0:
            t.advance(i * S // 100)
    t.enforce()
    assert len(t) == 100 and t.evictions["capacity"] + t.evictions["ttl"] == 9_900


def test_enforce_evicts_the_oldest_entries_beyond_the_capacity_in_one_walk():
    evicted: list = []
    t = table(capacity=256, evicted=evicted)
    t.advance(0)
    for i in range(300):  # one batch inserts 44 beyond the capacity
        t.put(i, i)
    t.touch(0)  # 0 is now the most recently touched
    assert t.enforce() == 44
    assert [key for key, _, _ in evicted] == list(range(1, 45))
    assert len(t) == 256 and t.evictions["capacity"] == 44 and t.get(0) == 0
    assert t.enforce() == 0


def test_pop_front_while_takes_due_entries_oldest_first_up_to_the_first_not_due():
    evicted: list = []
    t = table(capacity=10, evicted=evicted)
    t.advance(0)
    for key, due in (("a", 1), ("b", 2), ("c", 9), ("d", 3)):
        t.put(key, due)
        t.advance(due * S // 10)
    assert t.pop_front_while(lambda due: due <= 5) == [("a", 1), ("b", 2)]
    assert t.pop_front_while(lambda due: due <= 5) == []  # "c" is not due: "d" waits behind it
    assert (len(t), t.oldest(), evicted) == (2, ("c", 9), [])  # taken entries are not evictions


def test_entries_refreshed_many_times_expire_once_and_others_stay():
    t = table(capacity=1000, ttl_s=10, resolution_s=1)
    for second in range(30):
        t.advance(second * S)
        if t.touch("busy") is None:  # touched every second: never idle
            t.put("busy", second)
        t.put(f"idle-{second}", second)
    assert t.get("busy") == 0  # put replaces in place; touch is what refreshes
    assert [s for s in range(30) if t.get(f"idle-{s}") is not None] == list(range(19, 30))
    assert len(t) == 12
    assert t.evictions["ttl"] == 19
