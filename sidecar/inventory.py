"""The consolidation inventory: which implementations of each role really run, and from where.

A span consumer shaped as a Detector (it raises no findings) that counts every execute / emit /
dispatch span per (role, implementation, entry point), feeds ``pathwatch_calls`` and
``pathwatch_implementation_last_seen_timestamp_seconds`` (batched, flushed on tick), and answers
``snapshot()`` for ``/api/v1/inventory``.

A role's ``retired_still_called`` lists its retired implementations called within the last
``retired_window_s`` (14 days, as ``consolidation.safe_to_delete_window_s`` by default; the snapshot
says which): a retired class called once at start and never since is not "still called", and the
consolidation verdicts may call it ``safe_to_delete``. The counts here live in memory, from the
sidecar's start; the last call of each retired class comes from the consolidation ledger too
(``ledger``: persisted), so a restart does not empty the list of a role seen since. Which classes
are ``canonical`` is the ledger's answer (``canonical_classes``, over ``retired_window_s``: the
window of the verdicts), one rule for both (``sidecar.consolidation.canonical``): per service the
class its path map names canonical, while that service calls it as such within the window — so
the inventory and the verdicts agree, and a restart changes neither. Without a ledger the
inventory keeps a ``CanonicalBook`` of its own, fed from its spans (the same rule, in memory). A
canonical class's calls flagged canonical count in ``canonical_share``; a class no longer
canonical (the path map moved on: its spans keep their old flag, so counting flags would show two
canonical classes for good) counts no more. A gateway sees several services, each with its own
path map: a role may then list one canonical class per service, and ``canonical_share`` counts the
calls into any of them (the canonical of the role would otherwise flip with whichever service's
span came last).

An implementation is ``retired`` the same way: while the latest call of it by some service was
flagged retired (that service's path map retires it), as the ledger's latest flag decides its
verdict. A path map that no longer retires it (a rollback) un-retires it with its next call: it
leaves ``retired_still_called`` at once, its earlier retired calls notwithstanding. A class retired
now is ``still called`` when a call flagged retired came within the window (older calls of it, from
before it was retired, do not count). At most ``MAX_RETIRED_KEYS`` (service, role, implementation)
triples are remembered; the least recently retired goes first (retired again at that service's
next call of it).

Bounded: roles, implementations and entry points each pass a cardinality limit; values past it are
folded into ``other`` and counted in the snapshot's ``overflow``. Their product is bounded too: at
most ``MAX_CELLS`` cells (role, implementation, entry point, flags: the series of
``pathwatch_calls``). Past three quarters of it a new cell's entry point is folded into ``other``
(the last quarter keeps room for implementations not seen yet, which the consolidation is about);
past ``MAX_CELLS`` its implementation too, into the role's (``other``, ``other``) cell: at most one
per role and flag combination beyond the cap. Each fold counts in ``overflow`` (``entry_points`` /
``implementations``, and ``cells``: the new combinations given no cell of their own). The check
runs where a cell is created, never per span. First and last seen are span times (the backend's
clock), read as the sidecar's now when ahead of it or missing: ``now_ns``, or the wall clock
(``wall_clock_ns``, once per batch) when that is later — after a forward step of the wall clock the
pipeline's ``now_ns`` lags it for 20 times the step, and a call clamped to it read idle for the
lag in the snapshot (the wall clock), a retired class called a moment ago left out of
``retired_still_called``. ``snapshot`` may run on another
thread (the API): it copies the cell list first (atomic under the GIL) and only reads counters; a
call is counted after its cell's times and flags are set, so a cell it lists is whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from instrumentation.attributes import SpanKinds
from sidecar.config import RulesConfig, StateConfig
from sidecar.consolidation.canonical import CanonicalBook
from sidecar.consolidation.paths import UNKNOWN_SERVICE
from sidecar.model import Finding, SpanRecord
from sidecar.state import BoundedLabels, CellCap
from sidecar.telemetry import Telemetry
from sidecar.types import ConsumeInterrupted

_CALL_KINDS = frozenset({SpanKinds.EXECUTE, SpanKinds.EMIT, SpanKinds.DISPATCH})
NO_ENTRY_POINT = ""  # work outside any request (background tasks); "(none)" in the snapshot

MAX_ROLES = 64
MAX_IMPLEMENTATIONS = 512
MAX_ENTRY_POINTS = 512
#: cells (role, implementation, entry point, canonical, retired, nested), each a series of
#: pathwatch_calls: the labels' limits alone would allow their product (64 x 512 x 512 x 8)
MAX_CELLS = 4096
MAX_CACHED_KEYS = 8192  # raw span-value keys remembered for the fast path
MAX_RETIRED_KEYS = 1024  # (service, role, implementation) triples whose latest call was retired
RETIRED_WINDOW_S = 14 * 86400.0


class ConsolidationLedger(Protocol):
    """What the inventory reads from ``sidecar.consolidation.ActivityLedger``."""

    def retired_last_seen(self) -> dict[tuple[str, str], float]:
        """(role, implementation) -> the last call (unix seconds) of each retired one, persisted."""
        ...

    def canonical_classes(self, window_s: float, now_s: float) -> set[tuple[str, str]]:
        """The (role, implementation) pairs canonical now (the verdicts' answer, persisted)."""
        ...


class _Cell:
    """Calls of one implementation of one role from one entry point (nested or not)."""

    __slots__ = ("role", "implementation", "entry_point", "canonical", "retired", "nested",
                 "calls", "flushed", "first_seen_ns", "last_seen_ns", "flushed_last_seen_ns",
                 "retired_by", "watch")

    def __init__(self, role: str, implementation: str, entry_point: str, canonical: bool,
                 retired: bool, nested: bool) -> None:
        self.role = role
        self.implementation = implementation
        self.entry_point = entry_point
        self.canonical = canonical
        self.retired = retired
        self.nested = nested
        # the services whose latest call of the implementation was flagged retired: one dict
        # shared by every cell of the (role, implementation)
        self.retired_by: dict[str | None, None] = {}
        # true when a call may change that (the per-span check, one attribute): a retired cell's
        # calls, or any call of a class some service retired (the shared dict is not empty)
        self.watch: bool | dict[str | None, None] = True if retired else self.retired_by
        self.calls = 0
        self.flushed = 0
        self.first_seen_ns = 0
        self.last_seen_ns = 0
        self.flushed_last_seen_ns = 0


class Inventory:
    name = "inventory"

    def __init__(self, rules: RulesConfig | None = None, state: StateConfig | None = None,
                 telemetry: Telemetry | None = None, *, max_roles: int = MAX_ROLES,
                 max_implementations: int = MAX_IMPLEMENTATIONS,
                 max_entry_points: int = MAX_ENTRY_POINTS, max_cells: int = MAX_CELLS,
                 retired_window_s: float = RETIRED_WINDOW_S,
                 ledger: ConsolidationLedger | None = None,
                 wall_clock_ns: Callable[[], int] | None = None) -> None:
        self._telemetry = telemetry
        self._wall_clock_ns = wall_clock_ns  # None: spans are clamped to now_ns alone
        self._ledger = ledger
        # which classes are canonical: the ledger's answer; without one, a book of its own
        self._book = CanonicalBook() if ledger is None else None
        self.retired_window_s = retired_window_s
        self._roles = BoundedLabels("inventory_roles", max_roles)
        self._implementations = BoundedLabels("inventory_implementations", max_implementations)
        self._entry_points = BoundedLabels("inventory_entry_points", max_entry_points)
        self.max_cells = max_cells
        # the cells' labels (role, implementation, entry point, canonical, retired, nested)
        self._cap = CellCap("inventory_cells", max_cells, implementations=self._implementations,
                            implementation_at=1, entry_points=self._entry_points, entry_point_at=2)
        self._cells: dict[tuple, _Cell] = {}  # raw (role, impl, entry, canonical, retired, nested)
        self._by_label: dict[tuple, _Cell] = {}  # the same keyed by bounded labels: the real cells
        # (service, role, implementation) whose latest call was flagged retired, oldest first; each
        # (role, implementation)'s services also in its cells' retired_by (the per-span check)
        self._retired: dict[tuple[str | None, str, str], None] = {}
        self._retired_by: dict[tuple[str, str], dict[str | None, None]] = {}
        self._last_seen_published: dict[tuple[str, str], int] = {}

    # --- the data path -----------------------------------------------------------------------
    def consume(self, spans: Sequence[SpanRecord], now_ns: int) -> list[Finding]:
        cells, book = self._cells, self._book
        if spans and self._wall_clock_ns is not None:
            now_ns = max(now_ns, self._wall_clock_ns())  # the pipeline's may lag (a step)
        try:  # costs nothing per span; says where a span made it fail (ConsumeInterrupted)
            for span in spans:
                if span.kind not in _CALL_KINDS or span.role is None:
                    continue
                key = (span.role, span.implementation, span.entry_point, span.canonical,
                       span.retired, span.nested)
                cell = cells.get(key)
                if cell is None:
                    cell = self._cell_for(key, span)
                if cell.watch:  # the latest retired flag wins (the path map may change)
                    self._retire(cell, span.service_name)
                # times are the backend's: one ahead of the sidecar's clock (or missing) is now, so a
                # clock years ahead cannot leave the class last seen in the future, idle 0 s for good
                end_ns = span.end_ns
                if end_ns > now_ns or not end_ns:
                    end_ns = now_ns
                start_ns = span.start_ns
                if start_ns > end_ns or not start_ns:
                    start_ns = end_ns
                if end_ns > cell.last_seen_ns:
                    cell.last_seen_ns = end_ns
                if start_ns < cell.first_seen_ns or not cell.first_seen_ns:
                    cell.first_seen_ns = start_ns
                if book is not None:  # no ledger: the inventory's own book
                    book.called(span.service_name or UNKNOWN_SERVICE, cell.role,
                                cell.implementation, cell.canonical, end_ns / 1e9)
                # counted last: a snapshot (the API's thread) lists a cell once it has calls, and
                # a new one counted before its times were set showed its class seen in 1970
                cell.calls += 1
        except Exception as error:
            raise ConsumeInterrupted(span, []) from error
        return []

    def tick(self, now_ns: int) -> list[Finding]:
        self.flush()
        return []

    def _retire(self, cell: _Cell, service: str | None) -> None:
        """``service`` called ``cell``'s implementation now, flagged retired or not: the flag of
        its latest call is the class's for that service (bounded: the oldest retired triple goes)."""
        retired_by = cell.retired_by
        if cell.retired:
            if service in retired_by:
                return
            retired_by[service] = None
            self._retired[(service, cell.role, cell.implementation)] = None
            if len(self._retired) > MAX_RETIRED_KEYS:
                oldest = next(iter(self._retired))
                del self._retired[oldest]
                self._retired_by[oldest[1:]].pop(oldest[0], None)
        elif service in retired_by:
            del retired_by[service]
            self._retired.pop((service, cell.role, cell.implementation), None)

    def _cell_for(self, key: tuple, span: SpanRecord) -> _Cell:
        role, implementation, entry_point, canonical, retired, nested = key
        labels = (self._roles(role), self._implementations(implementation, "?"),
                  self._entry_points(entry_point, NO_ENTRY_POINT), canonical, retired, nested)
        cell = self._by_label.get(labels)
        if cell is None:
            labels = self._within_cap(labels)
            cell = self._by_label.get(labels)
            if cell is None:
                cell = _Cell(*labels)
                cell.retired_by = self._retired_by.setdefault(labels[:2], cell.retired_by)
                if not cell.retired:
                    cell.watch = cell.retired_by
                self._by_label[labels] = cell
        if len(self._cells) < MAX_CACHED_KEYS:
            self._cells[key] = cell
        return cell

    def _within_cap(self, labels: tuple) -> tuple:
        """The labels of a new cell, or, past the cap, those of the cell its calls fold into
        (``CellCap``): its entry point ``other`` past three quarters of ``max_cells``, then its
        implementation too past ``max_cells``, unless its ``other`` entry point's cell exists
        already. Beyond the cap only a role's (``other``, ``other``) cells are created: one per flag
        combination at most."""
        return self._cap(self._by_label, labels)

    @property
    def cells_overflowed(self) -> int:
        """New label combinations folded into another cell by ``max_cells``."""
        return self._cap.overflowed

    def flush(self) -> None:
        """Hand call counts and last-seen times to Prometheus (pipeline thread)."""
        telemetry = self._telemetry
        if telemetry is None:
            return
        for cell in list(self._by_label.values()):
            delta = cell.calls - cell.flushed
            if delta:
                cell.flushed = cell.calls
                telemetry.calls.labels(
                    cell.role, cell.implementation, _flag(cell.canonical), _flag(cell.retired),
                    cell.entry_point, _flag(cell.nested)).inc(delta)
            if cell.last_seen_ns > cell.flushed_last_seen_ns:
                cell.flushed_last_seen_ns = cell.last_seen_ns
                # several cells (entry points, nesting) share one (role, implementation) series
                series = (cell.role, cell.implementation)
                if cell.last_seen_ns > self._last_seen_published.get(series, 0):
                    self._last_seen_published[series] = cell.last_seen_ns
                    telemetry.implementation_last_seen.labels(*series).set(cell.last_seen_ns / 1e9)

    # --- the API view ---------------------------------------------------------------------------
    def snapshot(self, now_s: float | None = None) -> dict:
        """A JSON-ready view: per role its implementations and share, per entry point its paths."""
        now_s = time.time() if now_s is None else now_s
        roles: dict[str, dict] = {}
        entry_points: dict[str, dict[str, dict[str, int]]] = {}
        # a class is retired while the latest call of it by any service was flagged retired
        retired_now = {(role, impl) for (_, role, impl) in list(self._retired)}
        cells = list(self._by_label.values())
        called_as_retired: dict[tuple[str, str], int] = {}
        for cell in cells:
            if cell.retired:
                key = (cell.role, cell.implementation)
                called_as_retired[key] = max(called_as_retired.get(key, 0), cell.last_seen_ns)
        # canonical: what the verdicts say (the ledger's), or the same rule over this book
        window_s = self.retired_window_s
        canonical_now = (self._ledger.canonical_classes(window_s, now_s) if self._book is None
                         else self._book.canonical(window_s, now_s))
        for cell in cells:
            calls = cell.calls
            if not calls:
                continue
            role = roles.setdefault(cell.role, _new_role())
            impl = role["implementations"].setdefault(cell.implementation, _new_implementation(cell))
            key = (cell.role, cell.implementation)
            canonical = key in canonical_now
            impl["calls"] += calls
            role["calls"] += calls
            if not cell.nested:
                impl["top_level_calls"] += calls
                role["top_level_calls"] += calls
                if canonical and cell.canonical:  # its calls as canonical, not another path map's
                    role["_canonical_top_level"] += calls
            impl["canonical"] = canonical
            if key in retired_now:
                impl["retired"] = True
                impl["_retired_last_seen"] = called_as_retired.get(key, 0) / 1e9
            impl["first_seen"] = _earliest(impl["first_seen"], cell.first_seen_ns / 1e9)
            impl["last_seen"] = max(impl["last_seen"] or 0.0, cell.last_seen_ns / 1e9)
            entry = cell.entry_point or None
            if entry is not None and entry not in impl["entry_points"]:
                impl["entry_points"].append(entry)
            paths = entry_points.setdefault(cell.entry_point or NO_ENTRY_POINT, {})
            reached = paths.setdefault(cell.role, {})
            reached[cell.implementation] = reached.get(cell.implementation, 0) + calls
        # retired classes called within the window before this process started (the ledger)
        earlier: dict[str, set[str]] = {}
        if self._ledger is not None:
            for (role, implementation), last_seen_s in self._ledger.retired_last_seen().items():
                if now_s - last_seen_s < self.retired_window_s:
                    earlier.setdefault(role, set()).add(implementation)
        for name, role in roles.items():
            _finish_role(role, now_s, self.retired_window_s, earlier.get(name, set()))
        return {
            "generated_at": now_s,
            "retired_window_s": self.retired_window_s,  # of each role's retired_still_called
            "roles": dict(sorted(roles.items())),
            "entry_points": {
                (entry or "(none)"): {
                    role: dict(sorted(impls.items())) for role, impls in sorted(paths.items())}
                for entry, paths in sorted(entry_points.items())
            },
            "overflow": {
                "roles": self._roles.overflowed,
                "implementations": self._implementations.overflowed,
                "entry_points": self._entry_points.overflowed,
                "cells": self.cells_overflowed,
            },
            "limits": {
                "roles": self._roles.limit,
                "implementations": self._implementations.limit,
                "entry_points": self._entry_points.limit,
                "cells": self.max_cells,
            },
        }


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _earliest(current: float | None, candidate: float) -> float:
    return candidate if current is None or candidate < current else current


def _new_role() -> dict:
    return {"calls": 0, "top_level_calls": 0, "_canonical_top_level": 0, "implementations": {}}


def _new_implementation(cell: _Cell) -> dict:
    return {"calls": 0, "top_level_calls": 0, "canonical": False, "retired": False,
            "first_seen": None, "last_seen": None, "idle_s": None, "entry_points": [],
            "_retired_last_seen": 0.0}


def _finish_role(role: dict, now_s: float, retired_window_s: float, earlier: set[str]) -> None:
    implementations = role["implementations"]
    retired_called = set()  # retired now, and a call flagged retired within the window
    for name, impl in implementations.items():
        impl["idle_s"] = round(max(now_s - impl["last_seen"], 0.0), 3)
        impl["entry_points"].sort()
        retired_last_seen = impl.pop("_retired_last_seen")
        if impl["retired"] and now_s - retired_last_seen < retired_window_s:
            retired_called.add(name)
    role["implementations"] = dict(sorted(implementations.items()))
    canonical_top = role.pop("_canonical_top_level")
    top = role["top_level_calls"]
    role["canonical"] = sorted(name for name, i in implementations.items() if i["canonical"])
    # share of the calls the rest of the code makes into the role (nested delegations excluded);
    # none for a role without a canonical implementation (0 % would read as "not migrated yet")
    role["canonical_share"] = round(canonical_top / top, 4) if top and role["canonical"] else None
    role["retired_still_called"] = sorted(earlier | retired_called)
    role["entry_points"] = sorted({e for i in implementations.values() for e in i["entry_points"]})
    role["first_seen"] = min(i["first_seen"] for i in implementations.values())
    role["last_seen"] = max(i["last_seen"] for i in implementations.values())
    role["idle_s"] = round(max(now_s - role["last_seen"], 0.0), 3)
