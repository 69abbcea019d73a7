"""The incident store: findings grouped by fingerprint, cached in memory, persisted in SQLite.

``record`` runs on the pipeline thread: it reads nothing from disk (every incident lives in the
in-memory cache, loaded once at open) and writes one transaction per call, which waits for another
process's write lock (a sqlite3 shell in a transaction) ``WRITE_BUSY_TIMEOUT_MS`` at most, not SQLite's
usual seconds: a write that fails is kept in memory and retried later (``flush``, on the pipeline's
ticks), and only the last one, at close, waits longer. The API thread reads through
its own connection (WAL lets it read while the pipeline writes); an in-memory database has one
connection, shared under the lock. The cache is bounded at ``max_incidents``. A full store makes room
for a new fingerprint by evicting, least recently seen first, a resolved incident, else an open one of
a lower severity than the new finding (a leak is never refused to keep an old duplicate warning);
evictions are counted by reason and logged once. A finding that finds no such incident is refused,
counted and logged once — never a silent growth. An evicted incident is gone from the database too: if
its fingerprint comes back, that is a new incident (and a new alert).

A damaged database is refused at open (``PRAGMA quick_check``: pages of an index as well as of the
table), with what to do. One damaged later (a disk going bad) fails the API's reads: those are
counted in ``pathwatch_incident_store_errors_total``, logged once, and answered from memory, which
holds every incident.

Opening also brings the tables up to date (``schema.migrate``), so that the previous release can
still open them after a rollback: ``PRAGMA user_version`` is raised only by a change that release
would get wrong; a column it can ignore is added, if missing, at every open, and the version kept
(schema.py says why). Every statement here names its columns, which is what lets an older or newer
release share the table.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from sidecar.config import IncidentsConfig
from sidecar.incidents.grouping import merge_finding, new_incident, severity_rank
from sidecar.incidents.query import STATUSES, IncidentQuery, list_position
from sidecar.incidents.recent import RecentFindings, seq_from_clock
from sidecar.incidents.schema import COLUMNS, migrate
from sidecar.model import ALL_SINKS, Finding, Incident, Severity
from sidecar.telemetry import Telemetry

log = logging.getLogger(__name__)

DEFAULT_MAX_INCIDENTS = 100_000
WRITE_RETRY_S = 1.0  # after a failed write, the next waits this long ...
MAX_WRITE_RETRY_S = 30.0  # ... doubling up to this
# how long a write waits for another process's write lock (SQLite's busy_timeout) before it fails and
# is retried later: a write of the running sidecar runs on the pipeline thread (record, flush) or
# holds the lock the pipeline thread needs (mark_alerted, set_status), so it must not wait long;
# opening (the migration, schema.py), the API's reads and the last write, at close, may wait longer
WRITE_BUSY_TIMEOUT_MS = 50
OPEN_BUSY_TIMEOUT_MS = 5000
CLOSE_BUSY_TIMEOUT_MS = 5000
_TABLE = "incidents"  # the state-table label for gauges
EVICTED_RESOLVED = "resolved"  # pathwatch_incidents_evicted_total{reason}
EVICTED_LOWER_SEVERITY = "lower_severity"
_UNREADABLE_HINT = ("; if the file is damaged or not pathwatch's, move it (with its -wal and -shm "
                    "files) aside, and a new one is created in its place, or point incidents.path "
                    "at another file")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM incidents"
_UPSERT = (
    f"INSERT INTO incidents ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT(id) DO UPDATE SET severity = excluded.severity, count = excluded.count, "
    "first_seen_ns = excluded.first_seen_ns, last_seen_ns = excluded.last_seen_ns, "
    "sample_trace_ids = excluded.sample_trace_ids, alerted = excluded.alerted, "
    "status = excluded.status, alerted_sinks = excluded.alerted_sinks, services = excluded.services, "
    "owed_sinks = excluded.owed_sinks"
)


class IncidentStoreError(RuntimeError):
    """The incident database cannot be opened; the message names the path."""


class StoreClosed(RuntimeError):
    """The store was closed (the sidecar is shutting down): the change was not made."""


class IncidentStore:
    """Implements ``sidecar.types.IncidentSink``; also the alert ledger (``is_alerted``/``mark_alerted``)."""

    def __init__(self, path: str = ":memory:", *, sample_trace_ids: int = 10,
                 max_incidents: int = DEFAULT_MAX_INCIDENTS, telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.monotonic, findings_seq_from: int = 0) -> None:
        """``findings_seq_from``: the ``seq`` the ring of recent findings counts on from
        (``RecentFindings``; a sidecar's, ``from_config``, from the time it starts)."""
        if sample_trace_ids < 1:
            raise ValueError(f"sample_trace_ids must be >= 1, got {sample_trace_ids}")
        if max_incidents < 1:
            raise ValueError(f"max_incidents must be >= 1, got {max_incidents}")
        self.path = path
        self.sample_limit = sample_trace_ids
        self.max_incidents = max_incidents
        self.refused = 0  # findings refused because the store was full
        self.evicted: Counter[str] = Counter()  # reason -> incidents evicted to make room
        self.write_errors = 0
        self.dropped_after_close = 0  # findings recorded once the store was closed: not kept
        self.read_errors = 0  # the API's reads of the database that failed (answered from memory)
        self._last_write_error = ""  # the last failed write's error, for the message at close
        self._clock = clock
        self._write_retry_at: float | None = None  # after a failed write: none before then
        self._write_retry_s = 0.0
        self._telemetry = telemetry
        # the findings themselves, for GET /api/v1/findings
        self.recent = RecentFindings(seq_from=findings_seq_from)
        self._in_memory = path in ("", ":memory:")
        if not self._in_memory:
            check_path(path)
        self._writer = _connect(path, wal=not self._in_memory)
        try:
            _check_integrity(self._writer)  # before anything is written to it
            migrate(self._writer, path)
            loaded = self._load()
        except (sqlite3.Error, ValueError) as exc:  # damaged pages, another application's database
            self._writer.close()
            raise IncidentStoreError(
                f"incidents.path {path!r}: cannot read the incident database: {exc}{_UNREADABLE_HINT}"
            ) from None
        except BaseException:
            self._writer.close()
            raise
        self._writer.execute(f"PRAGMA busy_timeout = {WRITE_BUSY_TIMEOUT_MS}")
        self._reader = self._writer if self._in_memory else _connect(path, wal=True)
        self._lock = threading.Lock()  # the writer connection, the cache and the counters
        self._read_lock = self._lock if self._in_memory else threading.Lock()
        self._cache: dict[str, Incident] = {row.id: row for row in loaded}
        self._dirty: set[str] = set()  # ids whose last write failed; retried by flush() (ticks) or a later write
        self._deleted: set[str] = set()  # evicted ids still to delete from the database
        # eviction candidates, built the first time the store is full: (_eviction_key, id), kept
        # lazily (a popped entry whose incident changed since is pushed again with its current key)
        self._eviction_heap: list[tuple[tuple[int, int, int], str]] | None = None
        self._open = Counter((i.rule, i.severity.value) for i in self._cache.values() if i.status == "open")
        self._closed = False
        self._closed_clean = True  # close() wrote everything that was pending
        # the alert sinks that owe an incident its page when a finding comes (owe_pages)
        self._owing: tuple[str, ...] = ()
        self._owing_rank = 0
        self._publish_gauges(self._open)

    @classmethod
    def from_config(cls, config: IncidentsConfig, telemetry: Telemetry | None = None,
                    max_incidents: int = DEFAULT_MAX_INCIDENTS) -> IncidentStore:
        # a restarted sidecar's findings never reuse a seq its predecessor gave (a poller's after)
        return cls(config.path, sample_trace_ids=config.sample_trace_ids,
                   max_incidents=max_incidents, telemetry=telemetry, findings_seq_from=seq_from_clock())

    def owe_pages(self, sinks: Iterable[str], min_severity: Severity) -> None:
        """The alert sinks configured, and the least severity they page: an incident that gets a
        finding at or above it owes each of them its page (``Incident.owed_sinks``, written with the
        finding) until it has it. So a page that was never sent — its sink down, the sidecar stopped
        before it went out — is paged at the next start however long the sidecar stayed down
        (``alertable``), while a sink added later is not paged every old incident."""
        self._owing = tuple(sorted(set(sinks)))
        self._owing_rank = severity_rank(min_severity)

    # -- the data path (pipeline thread) ------------------------------------------------------------

    def record(self, findings: Sequence[Finding]) -> list[tuple[Incident, bool]]:
        """Fold findings into incidents and persist them in one transaction.

        Returns copies of the touched incidents, each with ``is_new`` (first time ever seen).
        Nothing once the store is closed (a pipeline thread that outlived the shutdown's drain):
        the findings are not kept, which is logged once — not a write error "retried" that never is.
        """
        if not findings:
            return []
        with self._lock:
            if self._closed:
                self._dropped_after_close(len(findings))
                return []
            self.recent.add(findings)
            touched: dict[str, Incident] = {}
            new_ids: set[str] = set()
            for finding in findings:
                incident = self._absorb(finding, new_ids)
                if incident is not None:
                    touched[incident.id] = incident
            if self._deleted:  # a later finding of the batch may have evicted one touched before
                touched = {i: incident for i, incident in touched.items()
                           if self._cache.get(i) is incident}
            self._persist(touched.values())
            return [(_copy(incident), incident.id in new_ids) for incident in touched.values()]

    def _dropped_after_close(self, count: int) -> None:
        self.dropped_after_close += count
        if self.dropped_after_close == count:
            log.error("incident store: %d finding(s) came after it closed (the pipeline outlived the "
                      "shutdown's drain) and are not stored in incidents.path %r; further ones are "
                      "only counted (IncidentStore.dropped_after_close)", count, self.path)

    def flush(self) -> None:
        """Write what an earlier write left pending (it failed: the database locked for a moment, the
        disk full), once its retry is due — called on the pipeline's ticks, so that a pending
        incident (or page mark) reaches the database without waiting for another finding, which on
        a quiet sidecar may never come before a crash loses it. Nothing pending, or not due yet: one
        look under the lock."""
        with self._lock:
            if self._closed or not (self._dirty or self._deleted):
                return
            self._persist(())

    def _absorb(self, finding: Finding, new_ids: set[str]) -> Incident | None:
        fingerprint = finding.fingerprint
        incident = self._cache.get(fingerprint)
        if incident is None:
            if len(self._cache) >= self.max_incidents and not self._make_room(finding.severity):
                self._refuse()
                return None
            incident = new_incident(finding, self.sample_limit)
            self._cache[fingerprint] = incident
            self._deleted.discard(fingerprint)  # evicted earlier, back now: an upsert, not a delete
            if self._eviction_heap is not None:
                heapq.heappush(self._eviction_heap, (_eviction_key(incident), fingerprint))
            new_ids.add(fingerprint)
            self._count_open(incident.rule, incident.severity.value, +1)
            self._owe(incident)
            return incident
        severity_before = incident.severity.value
        merge_finding(incident, finding, self.sample_limit)
        if incident.status != "open":  # a new occurrence reopens it (but never re-alerts)
            incident.status = "open"
            self._count_open(incident.rule, incident.severity.value, +1)
        elif incident.severity.value != severity_before:
            self._count_open(incident.rule, severity_before, -1)
            self._count_open(incident.rule, incident.severity.value, +1)
        self._owe(incident)
        return incident

    def _owe(self, incident: Incident) -> None:
        owing = self._owing
        if owing and incident.owed_sinks != owing and severity_rank(incident.severity) >= self._owing_rank:
            incident.owed_sinks = (owing if not incident.owed_sinks
                                   else tuple(sorted({*incident.owed_sinks, *owing})))

    def _make_room(self, severity: Severity) -> bool:
        """Evict incidents (see the module docstring) until there is room for one more; False if
        none may go for a finding of ``severity``, or if as many deletes as the capacity already
        wait for a failing database (memory stays bounded during a write outage)."""
        if len(self._deleted) >= self.max_incidents:
            return False
        heap = self._eviction_heap
        if heap is None or len(heap) > 2 * self.max_incidents:  # first time, or too many stale
            heap = self._eviction_heap = [(_eviction_key(i), i.id) for i in self._cache.values()]
            heapq.heapify(heap)
        rank = severity_rank(severity)
        while len(self._cache) >= self.max_incidents:
            if not heap:
                return False
            key, incident_id = heap[0]
            incident = self._cache.get(incident_id)
            if incident is None:  # evicted already (a duplicate entry)
                heapq.heappop(heap)
                continue
            current = _eviction_key(incident)
            if current != key:  # seen again or its status changed since: back in at its place
                heapq.heapreplace(heap, (current, incident_id))
                continue
            is_open, its_rank, _ = key
            if is_open and its_rank >= rank:
                return False  # what is left is open and at least as severe
            heapq.heappop(heap)
            self._evict(incident, EVICTED_LOWER_SEVERITY if is_open else EVICTED_RESOLVED)
        return True

    def _evict(self, incident: Incident, reason: str) -> None:
        del self._cache[incident.id]
        self._dirty.discard(incident.id)
        self._deleted.add(incident.id)
        if incident.status == "open":
            self._count_open(incident.rule, incident.severity.value, -1)
        self.evicted[reason] += 1
        if self._telemetry is not None:
            self._telemetry.incidents_evicted.labels(reason=reason).inc()
        if sum(self.evicted.values()) == 1:
            log.warning("incident store full (%d incidents): the least recently seen resolved or "
                        "less severe incidents make room for new ones, counted in "
                        "pathwatch_incidents_evicted_total", self.max_incidents)

    def _refuse(self) -> None:
        self.refused += 1
        if self._telemetry is not None:
            self._telemetry.incidents_refused.inc()
        if self.refused == 1:
            log.error("incident store full (%d incidents, none resolved or less severe): findings with "
                      "new fingerprints are refused and counted in pathwatch_incidents_refused_total",
                      self.max_incidents)

    # -- the alert ledger (alert thread) ------------------------------------------------------------

    def is_alerted(self, incident_id: str, sink: str = ALL_SINKS) -> bool:
        """Paged to ``sink`` (by default: to any sink)."""
        with self._lock:
            incident = self._cache.get(incident_id)
            if incident is None:
                return False
            return incident.alerted if sink == ALL_SINKS else incident.paged_to(sink)

    def is_open(self, incident_id: str) -> bool:
        """Known and not resolved: the alert dispatcher sends nothing more for a resolved incident."""
        with self._lock:
            incident = self._cache.get(incident_id)
            return incident is not None and incident.status == "open"

    def mark_alerted(self, incident_id: str, sink: str = ALL_SINKS) -> bool:
        """Persist that ``sink`` accepted the incident's page, so that neither this process nor the
        next pages it there again. False when it is unknown, or when the store is already closed (a
        push that outlived the shutdown's grace period): not remembered, so the next start pages
        again — at least once."""
        with self._lock:
            if self._closed:
                log.info("incident %s was paged after the store closed; the next start pages it again",
                         incident_id)
                return False
            incident = self._cache.get(incident_id)
            if incident is None:
                return False
            if not incident.paged_to(sink):
                incident.alerted = True
                incident.alerted_sinks = (*incident.alerted_sinks, sink)
                self._persist((incident,))
            return True

    def alertable(self, min_severity: Severity, seen_since_ns: int) -> list[Incident]:
        """Open incidents at or above ``min_severity`` seen since then, or that a sink still owes
        its page (``owe_pages``) however long ago they were seen: what a (re)started alert
        dispatcher offers again, so that a page that failed, or was cut by a shutdown, is not lost
        (the dispatcher skips the sinks that have it)."""
        rank = severity_rank(min_severity)
        with self._lock:
            return [_copy(incident) for incident in self._cache.values()
                    if incident.status == "open" and severity_rank(incident.severity) >= rank
                    and (incident.last_seen_ns >= seen_since_ns or incident.owes_page())]

    def set_status(self, incident_id: str, status: str) -> bool:
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
        with self._lock:
            if self._closed:
                raise StoreClosed("the incident store is closed: the sidecar is shutting down")
            incident = self._cache.get(incident_id)
            if incident is None:
                return False
            if incident.status != status:
                delta = +1 if status == "open" else -1
                incident.status = status
                self._count_open(incident.rule, incident.severity.value, delta)
                self._persist((incident,))
                heap = self._eviction_heap
                if heap is not None and status != "open":  # a candidate sooner
                    if len(heap) >= 2 * self.max_incidents:
                        self._eviction_heap = None  # rebuilt when next needed
                    else:
                        heapq.heappush(heap, (_eviction_key(incident), incident_id))
            return True

    # -- queries (API thread) -----------------------------------------------------------------------

    def get(self, incident_id: str) -> Incident | None:
        with self._lock:
            incident = self._cache.get(incident_id)
            return _copy(incident) if incident is not None else None

    def list_incidents(self, query: IncidentQuery = IncidentQuery()) -> list[Incident]:
        """Incidents matching the query, most recently seen first. Read from the database, without
        holding up the pipeline; while writes fail (incidents pending in memory, or deletes
        pending), from memory instead, so that the list agrees with ``get``; from memory too once
        the store is closed (the API answers until it stops, after the store)."""
        with self._lock:
            if self._dirty or self._deleted or self._closed:
                return self._list_from_memory(query)
        clauses: list[str] = []
        args: list[object] = []
        for column, value in (("rule", query.rule), ("status", query.status),
                              ("severity", query.severity.value if query.severity else None)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if query.since_ns is not None:
            clauses.append("last_seen_ns >= ?")
            args.append(query.since_ns)
        if query.before is not None:  # after the cursor in the list's order (list_position)
            before_ns, before_id = query.before
            clauses.append("(last_seen_ns < ? OR (last_seen_ns = ? AND id > ?))")
            args.extend((before_ns, before_ns, before_id))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"{_SELECT}{where} ORDER BY last_seen_ns DESC, id LIMIT ?"
        with self._read_lock:
            if not self._closed:  # close() sets it before it closes the reader under this lock
                try:
                    rows = self._reader.execute(sql, (*args, query.limit)).fetchall()
                except sqlite3.Error as exc:  # damaged since it was opened: memory has them all
                    self._read_failed(exc)
                else:
                    return [_from_row(row) for row in rows]
        with self._lock:  # closed while this read waited for the lock, or the read failed
            return self._list_from_memory(query)

    def _read_failed(self, exc: sqlite3.Error) -> None:
        self.read_errors += 1
        if self._telemetry is not None:
            self._telemetry.incident_store_errors.inc()
        if self.read_errors == 1:
            log.error("incident store: reading incidents.path %r failed (%s); incidents are listed "
                      "from memory, which holds every one, and further read errors are only counted "
                      "in pathwatch_incident_store_errors_total%s (stop the sidecar first)",
                      self.path, exc, _UNREADABLE_HINT)

    def _list_from_memory(self, query: IncidentQuery) -> list[Incident]:
        found = [i for i in self._cache.values() if query.matches(i)]
        found.sort(key=list_position)
        return [_copy(i) for i in found[:query.limit]]

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> bool:
        """Write what is still pending, then close the connections. True when everything was
        written; False when that last write failed (the database locked by another process, the
        disk full): the changes not written are lost, which is logged as an error naming
        ``incidents.path`` and how many incidents it concerns, whatever was logged before — the
        sidecar then exits 1. Idempotent: a second call returns the first one's result."""
        with self._lock:
            if self._closed:
                return self._closed_clean
            if self._dirty or self._deleted:  # the last chance: worth waiting for the lock
                self._writer.execute(f"PRAGMA busy_timeout = {CLOSE_BUSY_TIMEOUT_MS}")
            self._persist((), force=True)
            if self._dirty or self._deleted:
                self._closed_clean = False
                log.error("incident store: the last write, at shutdown, failed (%s): %d incident(s) "
                          "and %d deletion(s) not written to incidents.path %r are lost — an "
                          "incident not written is unknown to the next start: paged again if it "
                          "recurs; check that no other process holds the database and that its "
                          "volume has space", self._last_write_error, len(self._dirty),
                          len(self._deleted), self.path)
            self._closed = True
            if self._reader is not self._writer:
                with self._read_lock:
                    self._reader.close()
            self._writer.close()
            return self._closed_clean

    # -- internals ----------------------------------------------------------------------------------

    def _load(self) -> list[Incident]:
        return [_from_row(row) for row in self._writer.execute(_SELECT).fetchall()]

    def _persist(self, incidents: Iterable[Incident], force: bool = False) -> None:
        """One transaction for the given incidents, the evicted ones' deletes and any whose earlier
        write failed. After a failed write the next ones wait (``WRITE_RETRY_S``, doubling up to
        ``MAX_WRITE_RETRY_S``; ``force``: the last write, at close): while the disk is full, every
        batch would otherwise rewrite every pending incident on the pipeline thread, in vain."""
        if not force and self._write_retry_at is not None and self._clock() < self._write_retry_at:
            self._dirty.update(incident.id for incident in incidents
                               if incident.id not in self._deleted)
            return
        deleted = list(self._deleted)
        pending = {incident.id: incident for incident in incidents
                   if incident.id not in self._deleted}
        for incident_id in self._dirty:
            incident = self._cache.get(incident_id)
            if incident is not None:
                pending.setdefault(incident_id, incident)
        if not pending and not deleted:
            return
        try:
            self._writer.execute("BEGIN")
            if deleted:
                self._writer.executemany("DELETE FROM incidents WHERE id = ?", [(i,) for i in deleted])
            self._writer.executemany(_UPSERT, [_to_row(i) for i in pending.values()])
            self._writer.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback_quietly()
            self._dirty.update(pending)
            self.write_errors += 1
            self._last_write_error = str(exc)
            if self._telemetry is not None:
                self._telemetry.incident_store_errors.inc()
            if self.write_errors == 1:
                log.error("incident store %s: write failed (%s); incidents stay in memory and the write "
                          "is retried, at most every %.0f s", self.path, exc, MAX_WRITE_RETRY_S)
            self._write_retry_s = min(max(WRITE_RETRY_S, self._write_retry_s * 2), MAX_WRITE_RETRY_S)
            self._write_retry_at = self._clock() + self._write_retry_s
        else:
            self._dirty.clear()
            self._deleted.difference_update(deleted)
            self._write_retry_at, self._write_retry_s = None, 0.0

    def _rollback_quietly(self) -> None:
        try:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _count_open(self, rule: str, severity: str, delta: int) -> None:
        key = (rule, severity)
        self._open[key] += delta
        self._publish_gauges({key: self._open[key]})

    def _publish_gauges(self, open_counts: Counter | dict) -> None:
        if self._telemetry is None:
            return
        for (rule, severity), count in open_counts.items():
            self._telemetry.incidents_open.labels(rule=rule, severity=severity).set(count)
        self._telemetry.state_entries.labels(table=_TABLE).set(len(self._cache))
        self._telemetry.state_capacity.labels(table=_TABLE).set(self.max_incidents)


def check_path(path: str) -> None:
    """``IncidentStoreError`` naming ``incidents.path`` for a path that cannot be a database file: a
    directory (the volume's mount point given for the file), or one in a directory that does not
    exist — SQLite says only "unable to open database file" (and the lock file beside a directory
    would land in its parent)."""
    if os.path.isdir(path):
        raise IncidentStoreError(
            f"incidents.path {path!r}: is a directory; name a file in it, e.g. "
            f"{os.path.join(path, 'incidents.sqlite')!r}")
    directory = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(directory):
        problem = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise IncidentStoreError(f"incidents.path {path!r}: its directory {directory!r} {problem}; "
                                 "create it (a mounted volume) or name a file in one that is")


def _connect(path: str, wal: bool) -> sqlite3.Connection:
    try:
        # autocommit mode: transactions are explicit (one per record); shared across threads under locks
        conn = sqlite3.connect(path or ":memory:", check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {OPEN_BUSY_TIMEOUT_MS}")  # the writer's is lowered once open
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across process crashes
    except sqlite3.Error as exc:
        hint = _UNREADABLE_HINT if exc.sqlite_errorname in ("SQLITE_NOTADB", "SQLITE_CORRUPT") else ""
        raise IncidentStoreError(
            f"incidents.path {path!r}: cannot open the incident database: {exc}{hint}") from None
    return conn


def _check_integrity(conn: sqlite3.Connection) -> None:
    """``PRAGMA quick_check``: every page of the tables and indexes readable and well formed (a
    damaged index page is found here, not by the first API read that uses the index)."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)").fetchall()]
    if problems != ["ok"]:
        lines = (line.strip() for problem in problems for line in problem.splitlines())
        found = "; ".join(line for line in lines if line and not line.startswith("***"))
        raise ValueError(f"the integrity check failed: {found}")


def _eviction_key(incident: Incident) -> tuple[int, int, int]:
    """Eviction order: resolved before open, then the lower severity, then the least recently seen."""
    return (0 if incident.status != "open" else 1, severity_rank(incident.severity),
            incident.last_seen_ns)


def _to_row(incident: Incident) -> tuple[object, ...]:
    return (incident.id, incident.rule, incident.severity.value, incident.role, incident.implementation,
            incident.entry_point, incident.summary, incident.count, incident.first_seen_ns,
            incident.last_seen_ns, json.dumps(incident.sample_trace_ids), int(incident.alerted),
            incident.status, ",".join(incident.alerted_sinks), json.dumps(incident.services),
            ",".join(incident.owed_sinks))


def _from_row(row: Sequence[object]) -> Incident:
    (id_, rule, severity, role, implementation, entry_point, summary, count, first_seen_ns,
     last_seen_ns, samples, alerted, status, alerted_sinks, services, owed_sinks) = row
    return Incident(id=id_, rule=rule, severity=Severity(severity), role=role,
                    implementation=implementation, entry_point=entry_point, summary=summary,
                    count=count, first_seen_ns=first_seen_ns, last_seen_ns=last_seen_ns,
                    sample_trace_ids=json.loads(samples), alerted=bool(alerted), status=status,
                    alerted_sinks=tuple(alerted_sinks.split(",")) if alerted_sinks else (),
                    services=json.loads(services),
                    owed_sinks=tuple(owed_sinks.split(",")) if owed_sinks else ())


def _copy(incident: Incident) -> Incident:
    # callers (alert thread, API) get a snapshot: the cached object keeps changing on the pipeline thread
    return dataclasses.replace(incident, sample_trace_ids=list(incident.sample_trace_ids),
                               services=list(incident.services))
