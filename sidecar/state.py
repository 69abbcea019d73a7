"""Bounded state: the only place the detectors keep anything between batches.

Every table is an insertion/touch-ordered map with a capacity and an idle TTL. The oldest entry sits
at the front, so capacity eviction and TTL expiry are O(1) per entry. Evictions are counted per table
and reason (``ttl`` | ``capacity``) and published to ``Telemetry`` on tick; a table whose entries
carry obligations (an emit still awaiting its write, a run not yet judged) gets an ``on_evict``
callback so the owner can account for them instead of treating them as done.

Label values that come from the backend (roles, implementations, entry points, event types) pass
through ``BoundedLabels`` before they become metric labels or inventory keys: past the limit they
collapse into one ``other`` bucket, and the overflow is counted.

Everything here runs on the pipeline thread only: no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from sidecar.telemetry import Telemetry

K = TypeVar("K")
V = TypeVar("V")

EVICTED_TTL = "ttl"
EVICTED_CAPACITY = "capacity"
EVICTION_REASONS = (EVICTED_TTL, EVICTED_CAPACITY)
OVERFLOW_LABEL = "other"

EvictionCallback = Callable[[object, object, str], None]


class BoundedTable(Generic[K, V]):
    """A map bounded by ``capacity`` whose entries expire ``ttl_s`` after their last touch.

    ``get`` reads without refreshing; ``touch`` reads and refreshes (moves the entry to the back);
    ``put`` inserts or replaces (and refreshes). ``pop`` removes an entry the owner is done with:
    that is not an eviction. Time is whatever clock the caller passes as ``now_ns``, consistently.
    """

    __slots__ = ("name", "capacity", "ttl_ns", "_data", "_on_evict", "evictions", "_published")

    def __init__(self, name: str, capacity: int, ttl_s: float,
                 on_evict: EvictionCallback | None = None) -> None:
        if not name:
            raise ValueError("BoundedTable needs a name (it labels the state metrics)")
        if capacity <= 0:
            raise ValueError(f"BoundedTable {name!r}: capacity must be > 0, got {capacity}")
        if ttl_s <= 0:
            raise ValueError(f"BoundedTable {name!r}: ttl_s must be > 0, got {ttl_s}")
        self.name = name
        self.capacity = capacity
        self.ttl_ns = int(ttl_s * 1e9)
        # key -> [touched_ns, value]: one small list per entry, mutated in place on touch
        self._data: OrderedDict[K, list] = OrderedDict()
        self._on_evict = on_evict
        self.evictions = {EVICTED_TTL: 0, EVICTED_CAPACITY: 0}
        self._published = {EVICTED_TTL: 0, EVICTED_CAPACITY: 0}

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        return None if entry is None else entry[1]

    def touch(self, key: K, now_ns: int) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        entry[0] = now_ns
        self._data.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V, now_ns: int) -> None:
        data = self._data
        entry = data.get(key)
        if entry is not None:
            entry[0] = now_ns
            entry[1] = value
            data.move_to_end(key)
            return
        if len(data) >= self.capacity:
            self._evict_oldest(EVICTED_CAPACITY)
        data[key] = [now_ns, value]

    def pop(self, key: K) -> V | None:
        entry = self._data.pop(key, None)
        return None if entry is None else entry[1]

    def oldest(self) -> tuple[K, V, int] | None:
        """The front entry as ``(key, value, touched_ns)``, or None when empty."""
        if not self._data:
            return None
        key, entry = next(iter(self._data.items()))
        return key, entry[1], entry[0]

    def expire(self, now_ns: int) -> int:
        """Evict entries untouched for ``ttl_s``; returns how many."""
        cutoff = now_ns - self.ttl_ns
        data = self._data
        count = 0
        while data:
            entry = data[next(iter(data))]
            if entry[0] > cutoff:
                break
            self._evict_oldest(EVICTED_TTL)
            count += 1
        return count

    def values(self) -> Iterator[V]:
        for entry in self._data.values():
            yield entry[1]

    def clear(self) -> None:
        self._data.clear()

    def eviction_deltas(self) -> list[tuple[str, int]]:
        """Evictions since the last call, per reason (for a Prometheus counter)."""
        deltas = []
        for reason, total in self.evictions.items():
            delta = total - self._published[reason]
            if delta:
                deltas.append((reason, delta))
                self._published[reason] = total
        return deltas

    def _evict_oldest(self, reason: str) -> None:
        key, entry = self._data.popitem(last=False)
        self.evictions[reason] += 1
        if self._on_evict is not None:
            self._on_evict(key, entry[1], reason)


class BoundedLabels:
    """Maps backend-supplied label values onto at most ``limit`` distinct values plus ``other``."""

    __slots__ = ("name", "limit", "overflowed", "_known")

    def __init__(self, name: str, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"BoundedLabels {name!r}: limit must be > 0, got {limit}")
        self.name = name
        self.limit = limit
        self.overflowed = 0  # values folded into "other"
        self._known: set[str] = set()

    def __call__(self, value: str | None, missing: str = "") -> str:
        if value is None:
            return missing
        if value in self._known:
            return value
        if len(self._known) < self.limit:
            self._known.add(value)
            return value
        self.overflowed += 1
        return OVERFLOW_LABEL

    def __len__(self) -> int:
        return len(self._known)


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

    def expire(self, now_ns: int) -> None:
        for table in self.tables:
            table.expire(now_ns)

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
