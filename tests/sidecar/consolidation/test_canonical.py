"""The one rule of which classes are canonical (the verdicts' and the inventory's)."""

from __future__ import annotations

from sidecar.consolidation.canonical import CONCURRENT_S, CanonicalBook

ROLE = "execution_engine"
OLD, NEW = "app.engines.Old", "app.engines.New"
WINDOW = 1000.0
T0 = 1_800_000_000.0


def canonical(book: CanonicalBook, now_s: float) -> set[str]:
    return {impl for _, impl in book.canonical(WINDOW, now_s)}


def test_a_rolling_deploy_keeps_both_classes_canonical_while_both_are_called_as_such():
    book = CanonicalBook()
    for at_s in range(0, 100, 10):  # the old version's pods and the new one's, side by side
        book.called("a", ROLE, OLD, True, T0 + at_s)
        book.called("a", ROLE, NEW, True, T0 + at_s + 5)
        assert canonical(book, T0 + at_s + 5) == {OLD, NEW}
    book.called("a", ROLE, NEW, True, T0 + 99 + CONCURRENT_S)  # the rollout is over
    assert canonical(book, T0 + 99 + CONCURRENT_S) == {NEW}
    assert book.latest() == [("a", ROLE, NEW)]


def test_a_class_is_canonical_no_longer_than_the_window_after_its_last_call_as_such():
    book = CanonicalBook()
    book.called("a", ROLE, OLD, True, T0)
    for at_s in range(100, 3000, 100):  # b calls it, its path map naming another class
        book.called("b", ROLE, OLD, False, T0 + at_s)
        book.called("b", ROLE, NEW, True, T0 + at_s)
    assert canonical(book, T0 + WINDOW - 1) == {OLD, NEW}
    assert canonical(book, T0 + WINDOW + 1) == {NEW}
    assert book.by_service(WINDOW, T0 + WINDOW + 1) == {("b", ROLE): {(ROLE, NEW)}}


def test_a_service_that_names_none_demotes_its_class_a_minute_on():
    """Its own calls without the flag: within a minute of its last call as canonical it may be a
    rolling deploy (both versions serve), after it the path map has moved on — and the class it
    had superseded does not come back as that service's canonical."""
    book = CanonicalBook()
    book.called("a", ROLE, OLD, True, T0)
    book.called("a", ROLE, NEW, True, T0 + 2 * CONCURRENT_S)  # OLD superseded
    book.called("a", ROLE, NEW, False, T0 + 2 * CONCURRENT_S + 1)
    assert canonical(book, T0 + 2 * CONCURRENT_S + 1) == {NEW}
    book.called("a", ROLE, NEW, False, T0 + 4 * CONCURRENT_S)
    assert canonical(book, T0 + 4 * CONCURRENT_S) == set()
    assert book.entries() == []


def test_the_pairs_and_the_classes_of_each_are_bounded():
    book = CanonicalBook(max_pairs=2, max_earlier=1)
    for n, service in enumerate("abc"):
        book.called(service, ROLE, f"{service}.Engine", True, T0 + n)
    assert {pair[0] for pair in book.by_service(WINDOW, T0 + 3)} == {"b", "c"}
    for n in range(3):
        book.called("c", ROLE, f"c.Engine{n}", True, T0 + 10 + n)
    assert sorted(entry[2] for entry in book.entries_of(("c", ROLE))) == ["c.Engine1", "c.Engine2"]


def test_what_is_persisted_gives_the_same_answer():
    book = CanonicalBook()
    book.called("a", ROLE, OLD, True, T0)
    book.called("b", ROLE, NEW, True, T0 + 5)
    book.called("b", ROLE, OLD, True, T0 + 6)
    book.called("b", ROLE, OLD, False, T0 + 7)
    whole, changed = book.take_changed()
    assert not whole and set(changed) == {("a", ROLE), ("b", ROLE)}
    assert book.take_changed() == (False, {})
    restored = CanonicalBook()
    restored.restore(reversed(book.entries()))
    for now_s in (T0 + 10, T0 + 70, T0 + WINDOW + 1, T0 + WINDOW + 6):
        assert restored.by_service(WINDOW, now_s) == book.by_service(WINDOW, now_s)
    assert restored.latest() == book.latest() and restored.take_changed() == (False, {})


def test_what_is_owed_to_the_table_stays_bounded_while_writes_fail():
    """Pairs forgotten (evicted) while every write fails: remembering each, to delete its rows,
    grew without bound with services that come and go; past twice the bound the table is
    rewritten whole instead, and what the write gets is still every row there is to keep."""
    book = CanonicalBook(max_pairs=4)
    for i in range(1000):  # services that come and go; take_changed never called (writes fail)
        book.called(f"svc-{i}", ROLE, OLD, True, T0 + i)
    assert len(book._changed) <= 2 * 4
    whole, changed = book.take_changed()
    assert whole and set(changed) == {(f"svc-{i}", ROLE) for i in range(996, 1000)}
    assert book.take_changed() == (False, {})
    book.mark_changed(changed, whole=True)  # that write failed too: rewritten whole next time
    assert book.take_changed()[0]
