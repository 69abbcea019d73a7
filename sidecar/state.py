"""Bounded state: the only place the detectors keep anything between batches.

Every table is an insertion/touch-ordered map with a capacity and an idle TTL. The oldest entry sits
at the front, so capacity eviction and TTL expiry are amortized O(1) per entry; time marks interleaved with the
entries give the TTL without a timestamp (or any allocation) per entry. Evictions are counted per table
and reason (``ttl`` | ``capacity``) and published to ``Telemetry`` on tick; a table whose entries
carry obligations (an emit still awaiting its write, a run not yet judged) gets an ``on_evict``
callback so the owner can account for them instead of treating them as done.

Label values that come from the backend (roles, implementations, entry points, event types) pass
through ``BoundedLabels`` before they become metric labels or inventory keys: past the limit they
collapse into one ``other`` bucket, and the overflow is counted. A label whose values the span
contract fixes (a write's outcome) takes those values only: anything else the backend sends is
``other`` too. Their product is bounded as well: ``CellCap`` keeps a metric's label combinations
within a limit, folding a new one's entry point, then implementation, into ``other``.

Everything here runs on the pipeline thread only: no locks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Generic, TypeVar

from sidecar.telemetry import Telemetry

K = TypeVar("K")
V = TypeVar("V")

EVICTED_TTL = "ttl"
EVICTED_CAPACITY = "capacity"
EVICTION_REASONS = (EVICTED_TTL, EVICTED_CAPACITY)
OVERFLOW_LABEL = "other"

EvictionCallback = Callable[[object, object, str], None]


class _Mark:
    """A time mark inside a table's order: every entry before it was last touched before ``ns``."""

    __slots__ = ("ns",)

    def __init__(self, ns: int) -> None:
        self.ns = ns


def _any(_value: object) -> bool:
    return True


class BoundedTable(Generic[K, V]):
    """A map bounded by ``capacity`` whose entries expire about ``ttl_s`` after their last touch.

    ``get``, ``put`` and ``pop`` are the dict's own methods (the hot path pays no Python call):
    ``get`` reads without refreshing; ``put`` inserts at the back, or replaces a value in place
    (its TTL still runs from its last touch); ``renew`` inserts or replaces at the back;
    ``pop(key, None)`` removes an entry the owner is done with (not an eviction). ``touch`` reads
    and refreshes (moves the entry to the back); ``refresh`` moves an entry known to be present.
    Values must not be None (None means absent).

    Capacity is enforced by ``enforce()``, which the owner calls after each batch of spans (and
    ``advance`` on tick): between two calls a table can hold what one batch inserts beyond its
    capacity (batches are bounded by the pipeline), then its oldest entries are evicted, counted.

    Time enters only through ``advance(now_ns)`` (on tick): it drops a time mark into the order at
    most every ``resolution_s`` and expires every entry that sits before a mark older than the TTL.
    Entries carry no timestamp of their own, so an entry lives between ``ttl_s`` and
    ``ttl_s + resolution_s`` (plus one tick) after its last touch. Owners that need exact times
    (deadlines) keep them in their values and take them with ``pop_front_while``.

    The order lives in a plain dict (insertion-ordered; a refresh re-inserts at the back): about
    30 bytes an entry where an ``OrderedDict`` takes 80, and the detectors keep hundreds of
    thousands of entries. Removing from the front leaves holes that a front walk skips until the
    dict's next resize, so front walks are batched: one per expired mark, one per ``enforce``.
    """

    __slots__ = ("name", "capacity", "ttl_ns", "resolution_ns", "get", "put", "pop", "_data",
                 "_marks", "_on_evict", "evictions", "_published")

    def __init__(self, name: str, capacity: int, ttl_s: float,
                 on_evict: EvictionCallback | None = None, resolution_s: float | None = None) -> None:
        if not name:
            raise ValueError("BoundedTable needs a name (it labels the state metrics)")
        if capacity <= 0:
            raise ValueError(f"BoundedTable {name!r}: capacity must be > 0, got {capacity}")
        if ttl_s <= 0:
            raise ValueError(f"BoundedTable {name!r}: ttl_s must be > 0, got {ttl_s}")
        resolution_s = min(ttl_s / 16, 1.0) if resolution_s is None else resolution_s
        if resolution_s <= 0:
            raise ValueError(f"BoundedTable {name!r}: resolution_s must be > 0, got {resolution_s}")
        self.name = name
        self.capacity = capacity
        self.ttl_ns = int(ttl_s * 1e9)
        self.resolution_ns = int(resolution_s * 1e9)
        self._data: dict = {}  # keys in touch order, with _Mark keys (value None) among them
        self._marks: deque[_Mark] = deque()  # the same marks, oldest first
        self.get: Callable[[K], V | None] = self._data.get
        self.put: Callable[[K, V], None] = self._data.__setitem__
        self.pop: Callable[[K, V | None], V | None] = self._data.pop
        self._on_evict = on_evict
        self.evictions = {EVICTED_TTL: 0, EVICTED_CAPACITY: 0}
        self._published = {EVICTED_TTL: 0, EVICTED_CAPACITY: 0}

    def __len__(self) -> int:
        return len(self._data) - len(self._marks)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def touch(self, key: K) -> V | None:
        data = self._data
        value = data.pop(key, None)
        if value is not None:
            data[key] = value
        return value

    def renew(self, key: K, value: V) -> None:
        """Insert or replace ``key`` at the back: its TTL starts again (``put`` replaces in place)."""
        data = self._data
        data.pop(key, None)
        data[key] = value

    def refresh(self, key: K) -> None:
        """``touch`` for a key known to be present (hot loops: ``get`` then ``refresh``)."""
        data = self._data
        data[key] = data.pop(key)

    def enforce(self) -> int:
        """Evict the oldest entries beyond the capacity; returns how many."""
        over = len(self._data) - len(self._marks) - self.capacity
        if over <= 0:
            return 0
        self._evicted(self._take_front(_any, over), EVICTED_CAPACITY)
        return over

    def oldest(self) -> tuple[K, V] | None:
        """The least recently touched entry as ``(key, value)``, or None when empty."""
        for key, value in self._data.items():
            if value is not None:  # not a mark
                return key, value
        return None

    def pop_front_while(self, due: Callable[[V], bool]) -> list[tuple[K, V]]:
        """Remove and return, oldest first, the entries ``due`` accepts, up to the first it does
        not (for owners whose values carry deadlines in touch order). Not evictions."""
        return self._take_front(due)

    def advance(self, now_ns: int) -> int:
        """Mark the time and evict entries idle for the TTL; returns how many were evicted."""
        self.enforce()  # first: it may drop marks at the front, never the one added below
        marks, data = self._marks, self._data
        if not marks or now_ns - marks[-1].ns >= self.resolution_ns:
            mark = _Mark(now_ns)
            marks.append(mark)
            data[mark] = None
        cutoff = now_ns - self.ttl_ns
        if marks[0].ns > cutoff:
            return 0
        expired_marks = 0
        for mark in marks:
            if mark.ns > cutoff:
                break
            expired_marks += 1
        last = marks[expired_marks - 1]
        victims = []
        for key, value in data.items():
            if key is last:
                break
            if value is not None:
                victims.append((key, value))
        self._drop_front(expired_marks, victims)
        self._evicted(victims, EVICTED_TTL)
        return len(victims)

    def values(self) -> Iterator[V]:
        for value in self._data.values():
            if value is not None:
                yield value

    def clear(self) -> None:
        self._data.clear()
        self._marks.clear()

    def eviction_deltas(self) -> list[tuple[str, int]]:
        """Evictions since the last call, per reason (for a Prometheus counter)."""
        deltas = []
        for reason, total in self.evictions.items():
            delta = total - self._published[reason]
            if delta:
                deltas.append((reason, delta))
                self._published[reason] = total
        return deltas

    def _take_front(self, due: Callable[[V], bool], limit: int | None = None) -> list[tuple[K, V]]:
        """Remove and return, oldest first, up to ``limit`` entries that ``due`` accepts, stopping
        at the first it does not; the time marks walked past go too (a mark at the front bounds
        nothing: entries expire by the marks after them)."""
        data, taken, marks = self._data, [], 0
        for key, value in data.items():
            if value is None:
                marks += 1
                continue
            if len(taken) == limit or not due(value):
                break
            taken.append((key, value))
        self._drop_front(marks, taken)
        return taken

    def _drop_front(self, marks: int, entries: list[tuple[K, V]]) -> None:
        """Delete the first ``marks`` time marks and ``entries`` (all at the front of the order)."""
        data, queue = self._data, self._marks
        for _ in range(marks):
            del data[queue.popleft()]
        for key, _ in entries:
            del data[key]

    def _evicted(self, victims: list[tuple[K, V]], reason: str) -> None:
        if not victims:
            return
        self.evictions[reason] += len(victims)
        if self._on_evict is not None:
            for key, value in victims:
                self._on_evict(key, value, reason)


class BoundedLabels:
    """Maps backend-supplied label values onto at most ``limit`` distinct values plus ``other``."""

    __slots__ = ("name", "limit", "overflowed", "_known", "known")

    def __init__(self, name: str, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"BoundedLabels {name!r}: limit must be > 0, got {limit}")
        self.name = name
        self.limit = limit
        self.overflowed = 0  # values folded into "other"
        self._known: dict[str, str] = {}
        #: fast path for hot loops: ``labels.known(value)`` is the label, or None when not yet admitted
        self.known: Callable[[str | None], str | None] = self._known.get

    def __call__(self, value: str | None, missing: str = "") -> str:
        if value is None:
            return missing
        label = self._known.get(value)
        if label is not None:
            return label
        if len(self._known) < self.limit:
            self._known[value] = value
            return value
        self.overflowed += 1
        return OVERFLOW_LABEL

    def __len__(self) -> int:
        return len(self._known)


class CellCap:
    """At most ``limit`` combinations of bounded labels (the series of one metric), whatever the
    product of the labels' own limits: one role's 512 implementations x 512 entry points are each
    within their ``BoundedLabels`` and still 262,144 combinations.

    The owner asks only for a combination it does not hold yet (``held``: its combinations so
    far, a dict or set of label tuples), never per span or finding. Below three quarters of
    ``limit`` the combination keeps its labels; past them its entry point folds into ``other`` (the
    last quarter keeps room for implementations not seen yet); past ``limit`` its implementation
    too, unless the combination with an ``other`` entry point is held already. So beyond the limit
    only combinations whose implementation and entry point are both ``other`` are added: one per
    value of the other labels (role, flags, rule ...), themselves bounded. Each fold counts in the
    folded label's ``overflowed`` and in ``overflowed`` here (the combinations given no series of
    their own).
    """

    __slots__ = ("name", "limit", "overflowed", "_fold_entry_points_at", "_implementations",
                 "_implementation_at", "_entry_points", "_entry_point_at")

    def __init__(self, name: str, limit: int, *, implementations: BoundedLabels,
                 implementation_at: int, entry_points: BoundedLabels, entry_point_at: int) -> None:
        if limit <= 0:
            raise ValueError(f"CellCap {name!r}: limit must be > 0, got {limit}")
        self.name = name
        self.limit = limit
        self.overflowed = 0  # new combinations folded into another one
        self._fold_entry_points_at = limit - limit // 4
        self._implementations, self._implementation_at = implementations, implementation_at
        self._entry_points, self._entry_point_at = entry_points, entry_point_at

    def __call__(self, held: Collection[tuple], labels: tuple) -> tuple:
        """The labels of a new combination, or those of the one it folds into."""
        count = len(held)
        if count < self._fold_entry_points_at:
            return labels
        at_implementation, at_entry_point = self._implementation_at, self._entry_point_at
        folded = list(labels)
        if folded[at_entry_point] != OVERFLOW_LABEL:
            self._entry_points.overflowed += 1
            folded[at_entry_point] = OVERFLOW_LABEL
        if count >= self.limit and tuple(folded) not in held:
            if folded[at_implementation] != OVERFLOW_LABEL:
                self._implementations.overflowed += 1
                folded[at_implementation] = OVERFLOW_LABEL
        result = tuple(folded)
        if result != labels:
            self.overflowed += 1
        return result


class TableGroup:
    """The tables of one component: expired together, published to Telemetry together."""

    __slots__ = ("tables", "_telemetry", "_publish_every_ns", "_next_publish_ns")

    def __init__(self, telemetry: Telemetry | None, tables: Iterable[BoundedTable],
                 publish_every_s: float = 1.0) -> None:
        self.tables = list(tables)
        names = [table.name for table in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"state table names must be unique, got {names}")
        self._telemetry = telemetry
        self._publish_every_ns = int(publish_every_s * 1e9)
        self._next_publish_ns: int | None = None

    def enforce(self) -> None:
        """Every table back within its capacity (owners call this after each batch)."""
        for table in self.tables:
            if len(table) > table.capacity:
                table.enforce()

    def advance(self, now_ns: int) -> None:
        for table in self.tables:
            table.advance(now_ns)

    def maybe_publish(self, now_ns: int) -> None:
        """Publish sizes and eviction counts at most once per ``publish_every_s`` (cheap on tick)."""
        if self._next_publish_ns is not None and now_ns < self._next_publish_ns:
            return
        self._next_publish_ns = now_ns + self._publish_every_ns
        self.publish()

    def publish(self) -> None:
        telemetry = self._telemetry
        if telemetry is None:
            return
        for table in self.tables:
            telemetry.state_entries.labels(table.name).set(len(table))
            telemetry.state_capacity.labels(table.name).set(table.capacity)
            for reason, delta in table.eviction_deltas():
                telemetry.state_evictions.labels(table.name, reason).inc(delta)

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            table.name: {"entries": len(table), "capacity": table.capacity,
                         "evicted_ttl": table.evictions[EVICTED_TTL],
                         "evicted_capacity": table.evictions[EVICTED_CAPACITY]}
            for table in self.tables
        }
