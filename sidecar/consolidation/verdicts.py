"""Safe-to-delete verdicts: implementations with zero calls for a whole window, with the evidence.

The ``ActivityLedger`` remembers, per (role, implementation) ever seen: canonical / retired flags,
first and last seen (the sidecar's wall clock when the call arrived), total calls and the last few
callers. It lives in memory (pipeline thread writes, ``verdicts`` copies) and is persisted in its own
SQLite file beside the incident database, written on ``flush`` (every few seconds on tick, and at
shutdown) — so a restart keeps the window running. The ledger also persists when it started
observing: an implementation is only declared deletable once the sidecar has watched for the whole
window (a fresh sidecar knows nothing of the last 14 days).

Verdicts per implementation:
- ``canonical``: the role's canonical implementation; never deletable;
- ``in_use``: called within the window;
- ``observing``: idle so far, but the sidecar has not yet watched for a whole window;
- ``safe_to_delete``: retired or non-canonical, zero calls for the whole window.

One ledger sees one pod (sidecar mode). Across pods, ``pathwatch_implementation_safe_to_delete`` is
1 on every sidecar only when no pod called it: ``min by (role, implementation)`` over pods.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path


log = logging.getLogger(__name__)

MAX_IMPLEMENTATIONS = 512
LAST_CALLERS = 5

CANONICAL, IN_USE, OBSERVING, SAFE_TO_DELETE = "canonical", "in_use", "observing", "safe_to_delete"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS implementation_activity (
    role TEXT NOT NULL, implementation TEXT NOT NULL, canonical INTEGER NOT NULL,
    retired INTEGER NOT NULL, first_seen_s REAL NOT NULL, last_seen_s REAL NOT NULL,
    total_calls INTEGER NOT NULL, last_callers TEXT NOT NULL,
    PRIMARY KEY (role, implementation));
CREATE TABLE IF NOT EXISTS consolidation_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_UPSERT = (
    "INSERT INTO implementation_activity VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(role, implementation) DO UPDATE SET canonical = excluded.canonical, "
    "retired = excluded.retired, first_seen_s = excluded.first_seen_s, "
    "last_seen_s = excluded.last_seen_s, total_calls = excluded.total_calls, "
    "last_callers = excluded.last_callers")


class LedgerError(RuntimeError):
    """The consolidation database cannot be opened; the message names the path."""


class Activity:
    __slots__ = ("canonical", "retired", "first_seen_s", "last_seen_s", "total_calls", "last_callers")

    def __init__(self, canonical: bool, retired: bool, first_seen_s: float, last_seen_s: float,
                 total_calls: int = 0, last_callers: list[str] | None = None) -> None:
        self.canonical = canonical
        self.retired = retired
        self.first_seen_s = first_seen_s
        self.last_seen_s = last_seen_s
        self.total_calls = total_calls
        self.last_callers = last_callers or []


def ledger_path_beside(incidents_path: str) -> str:
    """``/data/pathwatch-incidents.sqlite`` -> ``/data/pathwatch-consolidation.sqlite``."""
    if incidents_path in ("", ":memory:"):
        return ":memory:"
    return str(Path(incidents_path).with_name("pathwatch-consolidation.sqlite"))


class ActivityLedger:
    def __init__(self, path: str = ":memory:", *, clock_s: Callable[[], float],
                 max_implementations: int = MAX_IMPLEMENTATIONS) -> None:
        self.path = path
        self._clock_s = clock_s
        self._max = max_implementations
        self._lock = threading.Lock()  # the connection: pipeline thread flushes, shutdown closes
        self.activity: dict[tuple[str, str], Activity] = {}
        self._dirty: set[tuple[str, str]] = set()
        self.refused = 0  # calls of implementations beyond the limit (not tracked)
        self.write_errors = 0
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.executescript(_SCHEMA)
            self.observing_since_s = self._load()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the consolidation database {path!r}: {exc}") from None

    def _load(self) -> float:
        for row in self._db.execute("SELECT * FROM implementation_activity"):
            role, impl, canonical, retired, first, last, total, callers = row
            self.activity[(role, impl)] = Activity(bool(canonical), bool(retired), first, last,
                                                   total, json.loads(callers))
        found = self._db.execute(
            "SELECT value FROM consolidation_meta WHERE key = 'observing_since_s'").fetchone()
        if found is not None:
            return float(found[0])
        since = self._clock_s()
        self._db.execute("INSERT INTO consolidation_meta VALUES ('observing_since_s', ?)",
                         (repr(since),))
        return since

    # --- the data path (pipeline thread) ----------------------------------------------------------
    def observe_calls(self, role: str | None, implementation: str | None, canonical: bool,
                      retired: bool, caller: str | None, count: int, now_s: float) -> None:
        """``count`` calls of one implementation (from one caller) seen at ``now_s``."""
        key = (role or "?", implementation or "?")
        activity = self.activity.get(key)
        if activity is None:
            if len(self.activity) >= self._max:
                self.refused += count
                return
            activity = self.activity[key] = Activity(canonical, retired, now_s, now_s)
        activity.total_calls += count
        if now_s > activity.last_seen_s:
            activity.last_seen_s = now_s
        activity.canonical = canonical
        activity.retired = retired
        if caller is not None and (not activity.last_callers or activity.last_callers[-1] != caller):
            callers = activity.last_callers
            if caller in callers:
                callers.remove(caller)
            callers.append(caller)
            del callers[:-LAST_CALLERS]
        self._dirty.add(key)

    def flush(self) -> None:
        """Write the implementations touched since the last flush (one transaction)."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        rows = []
        for key in dirty:
            a = self.activity[key]
            rows.append((*key, int(a.canonical), int(a.retired), a.first_seen_s, a.last_seen_s,
                         a.total_calls, json.dumps(a.last_callers)))
        try:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany(_UPSERT, rows)
                self._db.execute("COMMIT")
        except sqlite3.Error:
            self.write_errors += 1
            self._dirty |= dirty  # retried with the next flush
            if self.write_errors == 1:
                log.exception("writing the consolidation database %s failed; kept in memory, "
                              "retried on the next flush", self.path)
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()

    # --- verdicts --------------------------------------------------------------------------------
    def verdicts(self, window_s: float, now_s: float | None = None) -> list[dict]:
        """Every implementation seen, with its verdict and evidence; deletable ones first."""
        now_s = self._clock_s() if now_s is None else now_s
        watched_s = now_s - self.observing_since_s
        rows = []
        for (role, impl), a in sorted(list(self.activity.items())):
            idle_s = max(now_s - a.last_seen_s, 0.0)
            if a.canonical:
                verdict = CANONICAL
            elif idle_s < window_s:
                verdict = IN_USE
            elif watched_s < window_s:
                verdict = OBSERVING
            else:
                verdict = SAFE_TO_DELETE
            rows.append({"role": role, "implementation": impl, "verdict": verdict,
                         "canonical": a.canonical, "retired": a.retired,
                         "first_seen": a.first_seen_s, "last_seen": a.last_seen_s,
                         "idle_s": round(idle_s, 3), "total_calls": a.total_calls,
                         "last_callers": list(a.last_callers)})
        rows.sort(key=lambda r: (r["verdict"] != SAFE_TO_DELETE, r["role"], r["implementation"]))
        return rows
