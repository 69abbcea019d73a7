"""Safe-to-delete verdicts: implementations with zero calls for a whole window, with the evidence.

The ``ActivityLedger`` remembers, per (role, implementation) ever seen: its retired flag,
first and last seen (the sidecar's wall clock when the call arrived), total calls and the last few
callers. It lives in memory (pipeline thread writes, ``verdicts`` copies) and is persisted in its own
SQLite file beside the incident database, written on ``flush`` (every few seconds on tick, and at
shutdown) — so a restart keeps the window running. A call of a class new to the ledger, or idle for
longer than ``write_at_once_idle_s`` (``WRITE_AT_ONCE_IDLE_S``; the detector lowers it to a quarter
of a shorter window), is written with the batch that brought it (``urgent``: the
detector flushes at the end of that batch, once): the call that revives a retired class is the
evidence that matters most, and a crash before the next periodic flush must not lose it. Calls of
classes called within that time only move their last seen a little and wait for the flush.

Only *watched* time is evidence. The ledger persists when it started observing and, on every flush,
until when it watched; a start or a flush more than ``max_gap_s`` after the last flush records the
time between as a gap (the sidecar was down, frozen or suspended: calls then were not seen), and
verdicts computed before that flush (the API's thread, while the pipeline's is stuck) count the time
since the last flush, when longer, as not watched. An implementation is declared deletable
only once the sidecar has watched for a whole window since its last call, gaps excluded (a fresh
sidecar knows nothing of the last 14 days, nor does one restarted after 20 days off), and only while
its role is seen called within the window (a backend whose export broke looks like one that stopped
calling everything). Gaps are bounded (``MAX_GAPS``; beyond it the two closest merge, which counts
the watched time between them as a gap: deletable later, never sooner).

*Span loss* is stronger than a gap: an interval in which the sidecar knows calls may have happened
that it did not record — an unclean stop (the ledger holds a ``running`` marker, cleared by
``close``: found set at the next start, the time from its last flush to that start is a loss:
accepted spans still queued, rows not yet flushed; the file is one process's — the sidecar locks
its ``incidents.path`` before opening it, ``sidecar.incidents.lock`` — so a marker found set is
never a live sidecar's), a backend's heartbeat whose dropped-spans
total rose since its previous one (``spans_dropped``; batches the memory limiter refused are
retried, and what an exporter gives up shows there) — ``record_loss``. The totals are a backend
*process*'s: keyed by (service, instance, start of its counts), as several processes may share a
``service.instance.id`` (workers under an id set in ``OTEL_RESOURCE_ATTRIBUTES``, a backend
restarted under it); an instrumentation that does not send the start of its counts is keyed by
instance. Each process's last total is persisted (``heartbeat_dropped``, with its heartbeat number
and start of counts, at most ``MAX_HEARTBEAT_KEYS``; meta ``heartbeat_keys`` says it is per
process): after a restart, its first heartbeat is compared with its own saved one
(``observe_dropped_total``), so spans dropped while no sidecar listened — a restart quicker than a
gap — are a loss too. So are those of a process the ledger never held whose first heartbeat seen is
numbered past 1 (the earlier ones were lost — a backend restarted under the same id meanwhile, or a
new one): dropped since its counts started (``_unseen_drops``), whatever its total against another
process's; keyed by instance, those of one restarted meanwhile (``_restarted``). A call lost there
may have been any class's, so no class idle across a loss is ``safe_to_delete`` until the sidecar has watched
a whole window after its end (re-confirmed): each row's watch starts at ``max(last seen, end of the
latest loss)``. The latest loss is persisted (``span_loss``) and shown with the verdicts.

The ledger has a schema version (``PRAGMA user_version``, ``LEDGER_VERSION``), kept as the
incident store keeps its own (``sidecar.sqlite_schema``): stamped when the ledger is created, raised
only by a change the release before would read or write wrongly (a key, a table's meaning), with a
migration. An unversioned ledger is one of the releases before versioning: version 1, opened as
they left it. Every statement names its columns: a ledger to which a later release added a column
with a default (an upgrade, then a rollback to this release) is read and written as it is, a row
written again keeping that column's value (upserts; ``canonical_calls``' rows of a changed pair are
written anew, with its default). A ledger of a newer version — a rollback across a raise — is
*left alone* (``left_alone``): this release cannot know what changed, so it neither writes it (its
writes would fail, retried for ever, or be wrong) nor moves it aside (it is the later release's
evidence, which that release, upgraded again, goes on with: the time in between is a gap in it);
the sidecar runs on with a ledger in memory only (a fresh one's verdicts, lost at its stop), logged
once as an error naming the file and both versions. Refusing to start, as the incident store does,
would stop bleed detection too (and a native sidecar's backend) for the sake of a ledger that
only delays a verdict. The same when a write fails and the file is then found newer, or its tables
of another shape (another release wrote it meanwhile: two sidecars on one file where the state lock
does not hold): from then on the file is left alone — counted in ``write_errors`` and logged
once, not retried every flush for ever; a write failing otherwise (a lock, a full disk) is retried.
A ledger file that cannot be read (not a database, rows or columns of another shape: one missing, an
extra one without a default, which its inserts cannot fill, or a key its upserts do not name) is
moved aside to ``<file>.corrupt-<unix time>`` (kept for a look, logged as an error naming both
files) and a fresh ledger is started: the sidecar keeps detecting, and a fresh ledger only says
``observing`` until it has watched a whole window, never ``safe_to_delete`` sooner. A file that
cannot be opened or written at all (permissions, disk) is a ``LedgerError`` naming it: moving it
would not help. Whether the ledger is being saved — persisted, moved aside, its writes failing, in
memory only (and why), no file — is ``persistence`` (the API's ``verdicts.ledger``), its errors by
operation and cause ``errors``: the deploys detector publishes both (``pathwatch_ledger_state``,
``pathwatch_ledger_errors_total``), so that neither shows in a log line alone.

Verdicts per implementation:
- ``canonical``: a canonical implementation of the role now, as ``canonical_book`` says
  (``sidecar.consolidation.canonical``, the one rule the inventory reads too): per service
  (``service.name``), a class that service calls as canonical within the window — a gateway's
  services each keep theirs, whichever called last, but a class no service called as canonical
  for the window (its service renamed or gone, or every path map moved on) is canonical no more,
  however often another service still calls it without the flag; a class a service's path map no
  longer names canonical is demoted a minute after its successor's calls as canonical go on
  without it (or the service's calls of it without the flag do), unless still another service's.
  Never deletable: it is called within the window;
- ``in_use``: called within the window;
- ``observing``: idle so far, but the sidecar has not yet watched a whole window since its last call,
  or nothing of its role was called within the window;
- ``safe_to_delete``: retired or non-canonical, zero calls for the whole window.

The canonical book is persisted with the ledger: table ``canonical_calls``, one row per class a
(service, role) called as canonical, with its last call as such and its last call without the flag
(a changed pair's rows written whole on ``flush``, the whole table after more pairs changed than
twice the bound — writes failing while services came and went; at most ``MAX_CANONICAL_KEYS`` pairs,
the least recently called as canonical forgotten first), so a restart gives the same answer. Each
pair's latest class also goes to the meta value ``canonical_by_service``, where the release before
reads it (and writes it: a ledger holding that value alone, or one that disagrees with the table —
written by that release after this one — is read from it, each class canonical a window after its
last call, as that release judged it). A ledger of an older release has neither: the one canonical
class per role its rows say stays canonical (a window after its last call at most) until a service
names a canonical class in that role. The rows' ``canonical`` column is written for such a release:
whether some service's latest canonical class is that one.

The version book's versions (each (service, version)'s first sighting, base and last activity;
``remember_versions``, ``versions``) are persisted too, so the order of a service's versions
survives a restart (``sidecar.consolidation.deploys``). They are one row per version (table
``version_order``, at most ``MAX_KNOWN_VERSIONS`` of deploys.py), numbered in the order written,
which is the book's (least recently active first): a version's row is written when it was first
seen or active, the others not (written whole, as one value, with every change, the up to 1024
versions cost 40 kB on every flush under traffic). A row that cannot be read is deleted with a
warning (that version is first seen again); the single meta value ``version_order`` of the release
before is moved into rows once, at the start (an unreadable one is ignored with a warning). So
are the run and finding counts of the versions it tracked (``remember_version_counts``; with the
classes each ran): a restarted sidecar compares versions with the runs it already saw, not after
``min_runs`` runs again. They are one row per version (table ``version_counts``, at most
``MAX_KNOWN_VERSIONS``), written when that version's counts changed: the counts an earlier process
left (up to 1024 versions) do not change; written again, as one value, with every change of a
tracked version, they cost 9 MB and 100+ ms on every flush under traffic. A row that cannot be read
is deleted with a warning (that version counts from zero again); the single meta value
``version_counts`` of the release before is moved into rows once, at the start.

The ledger tracks at most ``max_implementations`` (``MAX_IMPLEMENTATIONS``) classes, a hard bound:
the calls of a class new to a full ledger are refused — counted (``refused``, shown as
``verdicts.overflow`` and in ``pathwatch_ledger_refused_calls_total``) and logged once — and that
class gets no verdict (so it is never declared ``safe_to_delete``).

One ledger sees one pod (sidecar mode). Across pods, ``pathwatch_implementation_safe_to_delete`` is
1 on every sidecar only when no pod called it: ``min by (role, implementation)`` over pods, of
``min_over_time`` over 15 minutes (a sidecar restarting has no series meanwhile: it still vetoes),
times the least ``pathwatch_ledger_window_watched`` (``watched_whole_window``: a sidecar without a
row for a class vouches for it only after a whole window since its start, latest loss and latest
refusal).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from sidecar.consolidation.canonical import CanonicalBook, Entry
from sidecar.consolidation.deploys import (MAX_KNOWN_VERSIONS, KnownVersion, VersionCounts,
                                           persisted_int)
from sidecar.consolidation.paths import UNKNOWN_SERVICE
from sidecar.heartbeats import counts_started, is_unix_time, numbering
from sidecar.incidents.store import CLOSE_BUSY_TIMEOUT_MS, WRITE_BUSY_TIMEOUT_MS
from sidecar.sqlite_schema import NewerSchemaError, Schema, SchemaError


log = logging.getLogger(__name__)

MAX_IMPLEMENTATIONS = 512
LAST_CALLERS = 5
MAX_GAP_S = 60.0  # a restart quicker than this is no gap (the detector flushes every 5 s)
WRITE_AT_ONCE_IDLE_S = 60.0  # a call of a class idle longer than this is written with its batch
UNCLEAN_STOP = "unclean_stop"  # reasons of a span loss
#: the deploys detector failed on a batch before the ledger had its every call
CONSUME_ERROR = "consume_error"
MAX_GAPS = 64
#: backend processes remembered (``note_backend_process``); the least recently seen go first
MAX_BACKEND_PROCESSES = 1024
MAX_HEARTBEAT_KEYS = 1024  # backend processes whose last dropped-spans total is persisted
HEARTBEAT_KEYS = "process"  # meta heartbeat_keys: heartbeat_dropped holds one entry per process
SPANS_DROPPED = "spans_dropped"  # as the pipeline's: a backend's dropped total rose
LEGACY_SERVICE = None  # the canonical of a role as a ledger without services knew it
#: a version_counts or version_order row's write number is below this (one per row written: never
#: reached), so the next one still fits SQLite's INTEGER
MAX_WRITTEN = 1 << 62
LEGACY_FILE_NAME = "pathwatch-consolidation.sqlite"  # older releases: one name for every ledger

CANONICAL, IN_USE, OBSERVING, SAFE_TO_DELETE = "canonical", "in_use", "observing", "safe_to_delete"

# whether the ledger is being saved (``persistence``, the API's ``verdicts.ledger``, the metric
# ``pathwatch_ledger_state{state}``): written to its file; written to a fresh file after the last
# one was unreadable and moved aside at this start; its writes failing (a lock, a full disk:
# retried every flush); kept in memory only, its file left alone (a later release's); no file at
# all (``incidents.path`` ":memory:": not saved by configuration, no failure)
PERSISTED, MOVED_ASIDE, WRITE_FAILING, IN_MEMORY, NO_FILE = (
    "persisted", "moved_aside", "write_failing", "in_memory", "no_file")
LEDGER_STATES = (PERSISTED, MOVED_ASIDE, WRITE_FAILING, IN_MEMORY, NO_FILE)
# the ledger's errors, by operation and cause (``errors``, ``pathwatch_ledger_errors_total``): a file
# that could not be read at the start (moved aside), one of a later release (left alone, at the
# start or found so after a write failed), tables of another shape found after a write failed
# (left alone), and any other failed write (SQLite's error: retried with the next flush)
OPEN, WRITE = "open", "write"
UNREADABLE, NEWER_VERSION, OTHER_SHAPE, SQLITE_ERROR = (
    "unreadable", "newer_version", "other_shape", "sqlite_error")
LEDGER_ERRORS = ((OPEN, UNREADABLE), (OPEN, NEWER_VERSION), (WRITE, SQLITE_ERROR),
                 (WRITE, NEWER_VERSION), (WRITE, OTHER_SHAPE))

#: ``PRAGMA user_version`` of the ledger, as the incident store's (``sidecar.incidents.schema``
#: says why): raised only by a change the release before would read or write wrongly (a key, a
#: table's meaning), never by a column with a default or a table it can ignore
LEDGER_VERSION = 1
# version 1: the tables as the releases before versioning left them (an unversioned ledger is one
# of theirs: its missing tables are created, its meta values moved into rows by the load)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS implementation_activity (
    role TEXT NOT NULL, implementation TEXT NOT NULL, canonical INTEGER NOT NULL,
    retired INTEGER NOT NULL, first_seen_s REAL NOT NULL, last_seen_s REAL NOT NULL,
    total_calls INTEGER NOT NULL, last_callers TEXT NOT NULL,
    PRIMARY KEY (role, implementation));
CREATE TABLE IF NOT EXISTS consolidation_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS version_counts (
    service TEXT NOT NULL, version TEXT NOT NULL, written INTEGER NOT NULL, counts TEXT NOT NULL,
    PRIMARY KEY (service, version));
CREATE TABLE IF NOT EXISTS canonical_calls (
    service TEXT, role TEXT NOT NULL, implementation TEXT NOT NULL, canonical_s REAL NOT NULL,
    plain_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS version_order (
    service TEXT NOT NULL, version TEXT NOT NULL, written INTEGER NOT NULL,
    first_seen_s REAL, base TEXT, last_active_s REAL,
    PRIMARY KEY (service, version));
"""
LEDGER = Schema(version=LEDGER_VERSION, migrations={1: _SCHEMA}, where="consolidation ledger",
                database="consolidation database", tables="consolidation tables",
                elsewhere="move it aside")
_COLUMNS = {
    "implementation_activity": ("role", "implementation", "canonical", "retired", "first_seen_s",
                                "last_seen_s", "total_calls", "last_callers"),
    "consolidation_meta": ("key", "value"),
    "version_counts": ("service", "version", "written", "counts"),
    "version_order": ("service", "version", "written", "first_seen_s", "base", "last_active_s"),
    "canonical_calls": ("service", "role", "implementation", "canonical_s", "plain_s")}
# every statement names its columns: a ledger to which a later release added a column (with a
# default, as ALTER TABLE ... ADD COLUMN must) is read and written as it is, the column left alone
_KEYS = {"implementation_activity": ("role", "implementation"), "consolidation_meta": ("key",),
         "version_counts": ("service", "version"), "version_order": ("service", "version")}


def _select(table: str, *, rowid: bool = False) -> str:
    return f"SELECT {'rowid, ' if rowid else ''}{', '.join(_COLUMNS[table])} FROM {table}"


def _insert(table: str) -> str:
    """An insert of a whole row; where the table has a key, an upsert: a row written again keeps
    the columns this release does not know (``INSERT OR REPLACE`` would reset them)."""
    columns = _COLUMNS[table]
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    keys = _KEYS.get(table)
    if keys is None:
        return sql
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in keys)
    return f"{sql} ON CONFLICT({', '.join(keys)}) DO UPDATE SET {updates}"


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
    """``/data/pathwatch-incidents.sqlite`` -> ``/data/pathwatch-incidents-consolidation.sqlite``.

    Named after the incident database, so two of them in one directory do not share one ledger (nor
    does an incident database named like a ledger share its file). The ledger of an older release,
    one fixed name in that directory, is copied to the new name when that does not exist yet: an
    upgrade keeps its data (the old file is left alone, for a downgrade). An old file that is not a
    database is moved aside, as an unreadable ledger is, and a fresh ledger starts.
    """
    if incidents_path in ("", ":memory:"):
        return ":memory:"
    incidents = Path(incidents_path)
    path = incidents.with_name(f"{incidents.stem}-consolidation{incidents.suffix or '.sqlite'}")
    legacy = incidents.with_name(LEGACY_FILE_NAME)
    if not path.exists() and legacy.is_file() and legacy != incidents:
        _copy_ledger(legacy, path)
    return str(path)


def _copy_ledger(source: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        src, dst = sqlite3.connect(source), sqlite3.connect(partial)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        os.replace(partial, target)
    except (sqlite3.Error, OSError) as exc:
        with contextlib.suppress(OSError):
            os.remove(partial)
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            # the old file is not a database: like any unreadable ledger, kept aside for a look and
            # a fresh ledger is started under the new name
            _move_aside(str(source), time.time(), exc)
            return
        raise LedgerError(f"cannot copy the consolidation database {str(source)!r} of an older "
                          f"release to {str(target)!r}: {exc}") from None
    log.info("copied the consolidation database %s of an older release to %s (the old file is no "
             "longer used)", source, target)


def _move_aside(path: str, now_s: float, exc: Exception) -> str:
    aside = f"{path}.corrupt-{int(now_s)}"
    try:
        os.replace(path, aside)
        for suffix in ("-journal", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, aside + suffix)
    except OSError as move_error:
        raise LedgerError(f"the consolidation database {path!r} cannot be read ({exc}) nor moved "
                          f"aside: {move_error}") from None
    log.error("the consolidation database %s cannot be read (%s): moved aside to %s, starting a "
              "fresh ledger (verdicts say observing until it has watched a whole window)",
              path, exc, aside)
    return aside


def _canonical_entries(stored: str) -> list[tuple[str | None, str, str]] | None:
    """The persisted (service, role, implementation) triples; None when unreadable."""
    try:
        entries = json.loads(stored)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        return None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 3 and (e[0] is None or isinstance(e[0], str))
            and isinstance(e[1], str) and isinstance(e[2], str) for e in entries):
        return None
    return [tuple(e) for e in entries]


def _counts_json(counts: VersionCounts) -> str:
    """A row's ``counts``: the version's runs, findings and classes ran (its key is the row's)."""
    return json.dumps(counts.to_json()[2:])


HeartbeatKey = tuple[str | None, str | None, float | None]  # service, instance, counts since


def _restarted(sequence: int | None, since_s: float | None, last_sequence: int | None,
               last_since_s: float | None) -> bool:
    """A heartbeat comes from another backend process than the last one seen of its instance (a
    restart under the same ``service.instance.id``). One process's counts start once
    (``counts_since_s``) and its heartbeats are numbered 1, 2, 3, ... — a gap in the numbers is a
    heartbeat lost on the way, no restart: the totals are cumulative, so the next one's says what
    was dropped meanwhile. With the start of the counts known on both sides, a different one is
    another process (also when its first heartbeats were lost and it is numbered past the saved
    one) and the same one is the same process (a heartbeat delivered twice: an exporter retried an
    export the sidecar had taken). Else a number not above the saved one, or 1, is a restart: a
    process never numbers two heartbeats alike. Nothing is known without a number (an older
    instrumentation). Asked of a saved heartbeat kept per instance (no start of counts: an older
    instrumentation, or a ledger of an older release); one kept per process is the same process."""
    if sequence is None:
        return False
    if since_s is not None and last_since_s is not None:
        return since_s != last_since_s
    return sequence == 1 or (last_sequence is not None and sequence <= last_sequence)


class ActivityLedger:
    def __init__(self, path: str = ":memory:", *, clock_s: Callable[[], float],
                 max_implementations: int = MAX_IMPLEMENTATIONS, max_gap_s: float = MAX_GAP_S,
                 write_at_once_idle_s: float = WRITE_AT_ONCE_IDLE_S) -> None:
        self.path = path
        self.write_at_once_idle_s = write_at_once_idle_s
        self._clock_s = clock_s
        self._max = max_implementations
        self._max_gap_s = max_gap_s
        self.gaps: list[tuple[float, float]] = []  # (from, to): the sidecar was not watching
        # the latest (from, to, reason) in which calls may have been lost: re-confirm after it
        self.span_loss: tuple[float, float, str] | None = None
        self._loss_dirty = False
        self.urgent = False  # a call of a new or long idle class waits to be written: flush now
        self._closing = False
        self._lock = threading.Lock()  # the connection: pipeline thread flushes, shutdown closes
        self.activity: dict[tuple[str, str], Activity] = {}
        self._dirty: set[tuple[str, str]] = set()
        # implementation -> its (role, implementation) rows (``observe_code_run``), as of when the
        # ledger held ``_roles_size`` rows
        self._roles_of: dict[str, list[tuple[str, str]]] = {}
        self._roles_size = 0
        # which classes each (service, role) calls canonical, and when (the one rule of
        # ``sidecar.consolidation.canonical``: the verdicts and the inventory read it); persisted
        # in the table canonical_calls, and each pair's latest in the meta canonical_by_service
        # (what the release before reads) as last written (None: to write)
        self.canonical_book = CanonicalBook()
        self._latest_written: str | None = None
        # each backend process, (service, instance, counts since) — (service, instance, None) for
        # an instrumentation that does not send the start of its counts, or a ledger of an older
        # release — -> (dropped-spans total, wall-clock s, sequence number, counts since) of its
        # last heartbeat, least recently seen first; persisted, so that a restart compares each
        # process with its own last heartbeat (several processes may share an instance id)
        self._dropped_totals: OrderedDict[HeartbeatKey,
                                          tuple[int, float, int | None, float | None]] = OrderedDict()
        self._carried: set[HeartbeatKey] = set()  # loaded, not yet seen again
        # processes last seen at or before this (wall-clock s) may have been forgotten (beyond
        # MAX_HEARTBEAT_KEYS, or an unreadable value); None: every process seen is still held
        self._forgotten_until_s: float | None = None
        # (service, instance) of a ledger that kept one total per instance (an older release) ->
        # the time of that heartbeat: a process of it whose counts started before may be one whose
        # total that ledger saw (it did not tell processes sharing an id apart)
        self._held_per_instance: dict[tuple[str | None, str | None], float] = {}
        self._dropped_dirty = False
        # each (service, version) first seen, with its base and last activity, as the version book
        # last handed them (``remember_versions``): the order of a service's versions survives a
        # restart (``sidecar.consolidation.deploys``)
        self.versions: list[KnownVersion] = []
        # what the table version_order holds once the pending rows are written, in write order (the
        # book's: least recently active first); the rows to write (None: to delete), the last row's
        # write number
        self._versions_held: OrderedDict[tuple[str, str], KnownVersion] = OrderedDict()
        self._versions_pending: dict[tuple[str, str], KnownVersion | None] = {}
        self._versions_written = 0
        # the run and finding counts of the versions the book tracked, as it last handed them
        # (``remember_version_counts``): a restart goes on from them, not from zero
        self.version_counts: list[VersionCounts] = []
        # what the table version_counts holds once the pending rows are written, least recently
        # written first; the rows to write (None: to delete) and the last row's write number
        self._counts_held: OrderedDict[tuple[str, str], VersionCounts] = OrderedDict()
        self._counts_pending: dict[tuple[str, str], VersionCounts | None] = {}
        self._counts_written = 0
        self.refused = 0  # calls of implementations beyond the limit (not tracked), since the start
        self._refused_last_s: float | None = None  # the latest of them (a class got no row)
        self.write_errors = 0
        # every error since the start, by (operation, cause): ``LEDGER_ERRORS``
        self.errors: dict[tuple[str, str], int] = dict.fromkeys(LEDGER_ERRORS, 0)
        # the state's start, why (a left-alone file's cause, a failing write's SQLite error), when
        # the file was moved aside and when the file was last written (``persistence``)
        self._state_since_s = self._clock_s()
        self._failing: str | None = None  # the last write's SQLite error while writes fail
        self._left_alone_cause: str | None = None
        self._moved_aside_s: float | None = None
        self._last_written_s: float | None = None
        self.moved_aside: str | None = None  # where an unreadable ledger file went
        # the ledger file, when a later release's (a newer schema version) and so not written: this
        # process's ledger is kept in memory only (``_leave_alone``)
        self.left_alone: str | None = None
        # the backend processes (the <process> of their ``i-<process>-<n>`` instance ids) whose
        # spans this sidecar got, least recently seen first, persisted (written with the
        # batch that brought a new one); ``earlier_processes``: those of the earlier processes on
        # this ledger, as loaded (a restart: a run of theirs in flight may have sent its first
        # events there)
        self._backend_processes: OrderedDict[str, None] = OrderedDict()
        self._processes_dirty = False
        self.earlier_processes: frozenset[str] = frozenset()
        try:
            self.observing_since_s = self._open(path)
        except NewerSchemaError as exc:  # neither read nor written: what changed is not known
            self._leave_alone(OPEN, NEWER_VERSION,
                              f"it has schema version {exc.recorded}, newer than this pathwatch "
                              f"({exc.known}): a later release's")
            self.observing_since_s = self._load()  # a fresh ledger's
        except (sqlite3.Error, SchemaError, ValueError, TypeError, RecursionError) as exc:
            # not a database, malformed, rows or columns of another shape, JSON nested deeper than
            # the json module reads: unreadable; an OperationalError (locked, read-only, disk) is
            # not the file's content
            cause = exc.cause if isinstance(exc, SchemaError) else exc
            if path == ":memory:" or isinstance(cause, sqlite3.OperationalError):
                raise LedgerError(f"cannot open the consolidation database {path!r}: {cause}"
                                  ) from None
            self._db.close()
            self._moved_aside_s = self._state_since_s = self._clock_s()
            self.moved_aside = _move_aside(path, self._moved_aside_s, cause)
            self.errors[(OPEN, UNREADABLE)] += 1
            self.activity.clear()
            self._dirty.clear()  # demotions while loading: of rows that went with the file
            self.canonical_book.clear()
            self._latest_written = None
            self._dropped_totals.clear()
            self._carried.clear()
            self._forgotten_until_s = None
            self._held_per_instance.clear()
            self._dropped_dirty = False
            self.versions = []
            self._versions_held.clear()
            self._versions_pending.clear()
            self._versions_written = 0
            self.version_counts = []
            self._counts_held.clear()
            self._counts_pending.clear()
            self._counts_written = 0
            self.gaps = []
            self.span_loss = None
            self._loss_dirty = self.urgent = False
            try:
                self.observing_since_s = self._open(path)
            except (sqlite3.Error, SchemaError) as exc:
                raise LedgerError(f"cannot open the consolidation database {path!r}: {exc}") from None
            self._backend_processes.clear()
            self._processes_dirty = False
            self.earlier_processes = frozenset()
        if path != ":memory:" and self.left_alone is None:
            self._last_written_s = self._state_since_s  # the start's write (watched until now)

    def _open(self, path: str) -> float:
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the consolidation database {path!r}: {exc}") from None
        LEDGER.migrate(self._db, path)  # stamped when new; one of a later release refused
        observing_since_s = self._load()
        # opening waited sqlite3's usual 5 s for a lock; a flush of the running ledger runs on the
        # pipeline thread (the deploys detector's tick, a new class's call), which processes no
        # span while it waits: it fails after a moment instead, retried by the next flush, and only
        # the last, at close, waits longer (as the incident store's writes, beside it)
        self._db.execute(f"PRAGMA busy_timeout = {WRITE_BUSY_TIMEOUT_MS}")
        return observing_since_s

    def _check_tables(self) -> None:
        """``ValueError`` unless every table has this release's columns (a later release's extra
        ones left alone, as long as an insert that does not name them is accepted) and key (the
        upserts name it)."""
        for table, expected in _COLUMNS.items():
            # (name, NOT NULL, default, place in the primary key) of each column
            info = [(r[1], r[3], r[4], r[5])
                    for r in self._db.execute(f"PRAGMA table_info({table})")]
            columns = tuple(name for name, _, _, _ in info)
            unfilled = [name for name, not_null, default, _ in info
                        if name not in expected and not_null and default is None]
            if not set(expected) <= set(columns) or unfilled:
                raise ValueError(f"table {table} has the columns {columns}: not {expected} and "
                                 "others with a default")
            key = tuple(name for name, _, _, place in sorted(info, key=lambda c: c[3]) if place)
            if table in _KEYS and key != _KEYS[table]:
                raise ValueError(f"table {table} has the primary key {key}: not {_KEYS[table]}")

    def _load(self) -> float:
        self._check_tables()
        for row in self._db.execute(_select("implementation_activity")):
            role, impl, canonical, retired, first, last, total, callers = row
            last_callers = json.loads(callers)
            if not isinstance(role, str) or not isinstance(impl, str) or not isinstance(
                    last_callers, list):
                raise ValueError(f"a row of another shape: {row!r}")
            self.activity[(role, impl)] = Activity(bool(canonical), bool(retired), float(first),
                                                   float(last), int(total),
                                                   [str(c) for c in last_callers])
        meta = dict(self._db.execute("SELECT key, value FROM consolidation_meta").fetchall())
        self._load_canonical(meta.get("canonical_by_service"))
        self._load_dropped_totals(meta.get("heartbeat_dropped"),
                                  meta.get("heartbeat_keys") == HEARTBEAT_KEYS)
        self._load_versions(meta.get("version_order"))  # the release before's value, if any
        self._load_version_counts(meta.get("version_counts"))
        self._load_backend_processes(meta.get("backend_processes"))
        now_s = self._watched_until_s = self._clock_s()
        if "observing_since_s" not in meta:
            self._db.executemany(_insert("consolidation_meta"),
                                 [("observing_since_s", repr(now_s)), ("running", "1")])
            return now_s
        self.gaps = [(float(a), float(b)) for a, b in json.loads(meta.get("gaps", "[]"))]
        if "span_loss" in meta:
            start, end, reason = json.loads(meta["span_loss"])
            self.span_loss = (float(start), float(end), str(reason))
        watched_until_s = float(meta.get("watched_until_s", meta["observing_since_s"]))
        if now_s - watched_until_s > self._max_gap_s:
            self._add_gap(watched_until_s, now_s)
        if meta.get("running") == "1":  # the last process did not close it: killed, crashed
            log.warning("the consolidation ledger %s was not closed by the last sidecar (killed or "
                        "crashed): calls after its last write (%.0f s before this start) may be "
                        "lost; no class idle since is safe_to_delete before a whole window is "
                        "watched again", self.path, now_s - watched_until_s)
            self.record_loss(watched_until_s, now_s, UNCLEAN_STOP)
        self._write_watched(now_s)
        return float(meta["observing_since_s"])

    def _load_canonical(self, stored: str | None) -> None:
        """Which classes each service called canonical, and when (table ``canonical_calls``). A
        ledger of the release before has each (service, role)'s latest only (meta
        ``canonical_by_service``): its last call as canonical is taken as the class's last call (it
        was canonical while called within the window then; it stays so no longer). So is that
        value when it disagrees with the table (written by that release after this one: a
        downgrade and back, the newer). A ledger of an older release has neither: per role the one
        its rows last saw as canonical, under ``LEGACY_SERVICE`` until a service names one in that
        role. A row of the table that cannot be read is deleted with a warning."""
        entries: list[Entry] = []
        damaged = []
        for row in self._db.execute(_select("canonical_calls", rowid=True)):
            rowid, service, role, implementation, canonical_s, plain_s = row
            if not ((service is None or isinstance(service, str)) and isinstance(role, str)
                    and isinstance(implementation, str) and isinstance(canonical_s, float)
                    and math.isfinite(canonical_s) and isinstance(plain_s, float)
                    and math.isfinite(plain_s)):
                damaged.append(rowid)
                continue
            entries.append((service, role, implementation, canonical_s, plain_s))
        if damaged:
            log.warning("the consolidation ledger %s: canonical_calls has %d unreadable rows: "
                        "deleted, a service's canonical class there is canonical again at its next "
                        "call as such", self.path, len(damaged))
            self._db.executemany("DELETE FROM canonical_calls WHERE rowid = ?",
                                 [(rowid,) for rowid in damaged])
        book = self.canonical_book
        book.restore(entries)
        latest = _canonical_entries(stored) if stored is not None else None
        if stored is not None and latest is None:  # damaged: written again, repaired
            log.warning("the consolidation ledger %s: canonical_by_service is unreadable; the "
                        "canonical classes are read from canonical_calls%s", self.path,
                        "" if entries else " (none: each role keeps the canonical class its rows "
                        "say until a service names one)")
        elif latest is not None and set(latest) != set(book.latest()):
            book.clear()  # the release before's, or newer than the table: from it
            last_seen = {key: a.last_seen_s for key, a in self.activity.items()}
            pairs: set[tuple[str | None, str]] = set()
            entries = []
            for service, role, implementation in latest:
                if (role, implementation) in last_seen and (service, role) not in pairs:
                    pairs.add((service, role))
                    entries.append((service, role, implementation,
                                    last_seen[(role, implementation)], 0.0))
            book.restore(entries)
            book.mark_changed((e[0], e[1]) for e in entries)
            self._db.execute("DELETE FROM canonical_calls")  # rewritten whole by the next flush
        else:
            self._latest_written = stored
        if latest is None and not entries:
            # an older release: per role the class its rows last saw as canonical
            last: dict[str, tuple[str, float]] = {}
            for (role, implementation), a in self.activity.items():
                if a.canonical and a.last_seen_s >= last.get(role, ("", -math.inf))[1]:
                    last[role] = (implementation, a.last_seen_s)
            legacy = [(LEGACY_SERVICE, role, impl, seen_s, 0.0) for role, (impl, seen_s) in last.items()]
            book.restore(legacy)
            book.mark_changed((e[0], e[1]) for e in legacy)

    def _load_dropped_totals(self, stored: str | None, per_process: bool) -> None:
        """Each backend process's last dropped-spans total, sequence number and start of its counts,
        as the last sidecar saw them (a ledger of an older release has the totals only: the other
        two are None, and it is keyed by instance; one that kept a start of counts but not
        ``per_process`` — ``heartbeat_keys`` — held one process per instance, the last seen); an
        unreadable value is ignored (its instances' next heartbeats are baselines, as before)."""
        if stored is None:
            return
        try:
            totals = []
            for service, instance, total, seen_s, *rest in json.loads(stored):
                sequence, since_s = rest if rest else (None, None)
                if not ((service is None or isinstance(service, str))
                        and (instance is None or isinstance(instance, str))):
                    continue
                entry = (int(total), float(seen_s),
                         None if sequence is None else persisted_int(sequence, 1),
                         None if since_s is None else float(since_s))
                if not math.isfinite(entry[1]) or (entry[3] is not None
                                                   and not math.isfinite(entry[3])):
                    raise ValueError("a time that is not a finite number")
                totals.append(((service, instance, entry[3]), entry))
        except (ValueError, TypeError, OverflowError, RecursionError):  # int(Infinity): Overflow-
            # Error; RecursionError: nested deeper than the json module reads
            log.warning("the consolidation ledger %s: heartbeat_dropped is unreadable; each backend "
                        "instance's next heartbeat is a baseline", self.path)
            self._forgotten_until_s = self._clock_s()  # any instance seen so far may be one it held
            return
        self._dropped_totals.update(totals)
        self._carried = set(self._dropped_totals)
        if not per_process:
            self._held_per_instance = {key[:2]: entry[1] for key, entry in totals}
        if len(self._dropped_totals) >= MAX_HEARTBEAT_KEYS:
            # full: an earlier process may have forgotten instances, each last seen before those
            # it kept (the least recently seen goes first)
            self._forgotten_until_s = min(seen_s for _, seen_s, _, _ in self._dropped_totals.values())

    def _load_versions(self, legacy: str | None) -> None:
        """The versions an earlier process first saw, in the order it last wrote them (a ledger of
        the release before has them in one meta value: moved into rows first). A row that cannot
        be read is deleted with a warning (that version is first seen by this process again), as
        are rows beyond ``MAX_KNOWN_VERSIONS`` (the least recently written)."""
        if legacy is not None:
            self._migrate_versions(legacy)
        rows: list[tuple[int, KnownVersion]] = []  # (rowid, version)
        damaged: list[tuple] = []
        for row in self._db.execute("SELECT rowid, service, version, written, first_seen_s, base, "
                                    "last_active_s FROM version_order ORDER BY written, rowid"):
            rowid, service, version, written, first_s, base, active_s = row
            # REAL columns: a time is read back as a float (NaN was written as NULL)
            if not (isinstance(service, str) and isinstance(version, str)
                    and isinstance(written, int) and 0 < written < MAX_WRITTEN
                    and (base is None or isinstance(base, str))
                    and isinstance(first_s, float) and math.isfinite(first_s)
                    and isinstance(active_s, float) and math.isfinite(active_s)):
                damaged.append(row)
                continue
            rows.append((rowid, KnownVersion(service, version, first_s,
                                             base if base != version else None, active_s)))
            self._versions_written = max(self._versions_written, written)
        if damaged:
            log.warning("the consolidation ledger %s: version_order has %d unreadable rows "
                        "(service %r version %r first): deleted, those versions are ordered as "
                        "this sidecar first sees them", self.path, len(damaged), damaged[0][1],
                        damaged[0][2])
        gone = [row[0] for row in damaged] + [rowid for rowid, _ in rows[:-MAX_KNOWN_VERSIONS]]
        self._db.executemany("DELETE FROM version_order WHERE rowid = ?",
                             [(rowid,) for rowid in gone])
        self.versions = [version for _, version in rows[-MAX_KNOWN_VERSIONS:]]
        self._versions_held = OrderedDict(((v.service, v.version), v) for v in self.versions)

    def _migrate_versions(self, stored: str) -> None:
        """The meta value ``version_order`` of the release before (every version in one JSON list,
        least recently active first, written whole whenever one changed) becomes one row per
        version, numbered in that order, once: the value is deleted with the same transaction. It
        replaces any rows: a ledger holding both was written by that release after this one (a
        downgrade and back), so the value is the newer. An unreadable value is ignored with a
        warning (every version is then first seen by this process, as on a fresh ledger)."""
        try:
            versions = [KnownVersion(service, version, float(first_s),
                                     base if base != version else None, float(active_s))
                        for service, version, first_s, base, active_s in json.loads(stored)
                        if isinstance(service, str) and isinstance(version, str)
                        and (base is None or isinstance(base, str))]
            if not all(math.isfinite(v.first_seen_s) and math.isfinite(v.last_active_s)
                       for v in versions):
                raise ValueError("a time that is not a finite number")
        except (ValueError, TypeError, OverflowError, RecursionError):  # RecursionError: nested
            # deeper than the json module reads (a damaged value must not stop the sidecar)
            log.warning("the consolidation ledger %s: version_order is unreadable; the versions "
                        "are ordered as this sidecar first sees them", self.path)
            versions = []
        self._move_into_rows("version_order", [
            (v.service, v.version, written, v.first_seen_s, v.base, v.last_active_s)
            for written, v in enumerate(versions[-MAX_KNOWN_VERSIONS:], 1)])

    def _load_version_counts(self, legacy: str | None) -> None:
        """The run and finding counts of the versions an earlier process tracked, least recently
        written first (a ledger of the release before has them in one meta value: moved into rows
        first). A row that cannot be read is deleted (that version counts from zero again, as
        before they were persisted), as are rows beyond ``MAX_KNOWN_VERSIONS``."""
        if legacy is not None:
            self._migrate_version_counts(legacy)
        rows: list[tuple[int, VersionCounts]] = []  # (rowid, counts)
        damaged: list[tuple] = []
        for row in self._db.execute("SELECT rowid, service, version, written, counts "
                                    "FROM version_counts ORDER BY written, rowid"):
            rowid, service, version, written, stored = row
            try:
                if not (isinstance(service, str) and isinstance(version, str)
                        and isinstance(written, int) and 0 < written < MAX_WRITTEN
                        and isinstance(stored, str)):
                    raise ValueError("a column of another type or range")
                rows.append((rowid, VersionCounts.from_json([service, version,
                                                             *json.loads(stored)])))
            except (ValueError, TypeError, RecursionError):  # RecursionError: nested deeper than
                # the json module reads (a damaged row must not stop the sidecar)
                damaged.append(row)
                continue
            self._counts_written = max(self._counts_written, written)
        if damaged:
            log.warning("the consolidation ledger %s: version_counts has %d unreadable rows "
                        "(service %r version %r first): deleted, those versions count their runs "
                        "and findings from zero again", self.path, len(damaged), damaged[0][1],
                        damaged[0][2])
        gone = [row[0] for row in damaged] + [rowid for rowid, _ in rows[:-MAX_KNOWN_VERSIONS]]
        self._db.executemany("DELETE FROM version_counts WHERE rowid = ?",
                             [(rowid,) for rowid in gone])
        self.version_counts = [counts for _, counts in rows[-MAX_KNOWN_VERSIONS:]]
        self._counts_held = OrderedDict(((c.service, c.version), c) for c in self.version_counts)

    def _migrate_version_counts(self, stored: str) -> None:
        """The meta value ``version_counts`` of the release before (every version's counts in one
        JSON list, written whole whenever one changed) becomes one row per version, once: the value
        is deleted with the same transaction. It replaces any rows: a ledger holding both was
        written by that release after this one (a downgrade and back), so the value is the newer.
        An unreadable value is ignored (each version counts from zero again)."""
        try:
            counts = [VersionCounts.from_json(entry) for entry in json.loads(stored)]
        except (ValueError, TypeError, RecursionError):  # RecursionError: nested deeper than the
            # json module reads (a damaged value must not stop the sidecar)
            log.warning("the consolidation ledger %s: version_counts is unreadable; each version "
                        "counts its runs and findings from zero again", self.path)
            counts = []
        self._move_into_rows("version_counts", [
            (c.service, c.version, written, _counts_json(c))
            for written, c in enumerate(counts[-MAX_KNOWN_VERSIONS:], 1)])

    def _move_into_rows(self, table: str, rows: list[tuple]) -> None:
        """A migration: ``table``'s rows become ``rows`` and the meta value of the same name (the
        release before kept the table's content there) is deleted, in one transaction."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute(f"DELETE FROM {table}")
            if rows:
                db.executemany(_insert(table), rows)
            db.execute("DELETE FROM consolidation_meta WHERE key = ?", (table,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def remember_version_counts(self, counts: list[VersionCounts]) -> None:
        """The version book's counts (``take_counts``; at most ``MAX_KNOWN_VERSIONS``, the last
        kept): the next flush writes the row of each version whose counts differ from the ones
        held, and deletes those of the versions no longer given. The others are not written again:
        the counts restored from an earlier process (the same objects, handed back unchanged) cost
        a lookup each, not a serialisation."""
        counts = counts[-MAX_KNOWN_VERSIONS:]
        self.version_counts = counts
        held, pending = self._counts_held, self._counts_pending
        given = {(c.service, c.version): c for c in counts}
        for key in [key for key in held if key not in given]:
            del held[key]
            pending[key] = None
        for key, version_counts in given.items():
            before = held.get(key)
            if before is version_counts or before == version_counts:
                continue
            held.pop(key, None)
            held[key] = version_counts  # the most recently written last
            pending[key] = version_counts

    def remember_versions(self, versions: list[KnownVersion]) -> None:
        """The version book's versions (``take_known``: least recently active first; at most
        ``MAX_KNOWN_VERSIONS``, the last kept). The next flush writes the rows of the versions from
        the first one that differs from the row held, or is out of the held rows' order, on (the
        book moves a version to the end exactly when its record changes: these are the changed
        ones), numbered in this order, and deletes the rows of those no longer given: the rows'
        order is the list's. The others are not written again: the versions restored from an
        earlier process (the same objects, handed back unchanged) cost a lookup each, not a
        serialisation."""
        versions = versions[-MAX_KNOWN_VERSIONS:]
        self.versions = versions
        held, pending = self._versions_held, self._versions_pending
        # the versions kept must come in the order their rows were written: from the first one that
        # changed or comes out of that order, each gets a new write number
        kept, at, end = list(held), 0, len(held)
        passed: list[tuple[str, str]] = []  # rows passed over: changed, or no longer given
        changed = len(versions)
        for i, known in enumerate(versions):
            key = (known.service, known.version)
            before = held.get(key)
            if before is not known and before != known:
                changed = i
                break
            while at < end and kept[at] != key:
                passed.append(kept[at])
                at += 1
            if at == end:
                changed = i
                break
            at += 1
        rewritten = versions[changed:]
        given = {(v.service, v.version) for v in rewritten}
        for key in [*passed, *kept[at:]]:
            if key not in given:
                del held[key]
                pending[key] = None
        for known in rewritten:
            key = (known.service, known.version)
            held.pop(key, None)
            held[key] = known  # the most recently written last
            pending.pop(key, None)
            pending[key] = known  # written in this order

    def _load_backend_processes(self, stored: str | None) -> None:
        try:
            tokens = json.loads(stored) if stored else []
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ValueError("not a list of strings")
        except (ValueError, RecursionError):
            log.warning("the consolidation ledger %s: backend_processes is unreadable; runs in "
                        "flight across this restart are judged as if the backend were new", self.path)
            tokens = []
        self._backend_processes = OrderedDict.fromkeys(tokens[-MAX_BACKEND_PROCESSES:])
        self.earlier_processes = frozenset(self._backend_processes)

    def note_backend_process(self, token: str) -> None:
        """A backend process whose spans this sidecar got (its instance ids' ``<process>``), told
        at each of its runs: one new to the ledger is written with the batch that brought it
        (``urgent``), so that a sidecar killed right after still leaves it for the next start; one
        known becomes the most recently seen (written with the next flush), so that the processes
        forgotten first are those not seen for longest — not a long-lived one (a web server) first
        seen before a thousand short-lived ones (a forked worker per task, recycled workers)."""
        processes = self._backend_processes
        if token in processes:
            if next(reversed(processes)) != token:  # already the most recent: nothing changes
                processes.move_to_end(token)
                self._processes_dirty = True
            return
        processes[token] = None
        while len(self._backend_processes) > MAX_BACKEND_PROCESSES:
            self._backend_processes.popitem(last=False)
        self._processes_dirty = self.urgent = True

    def _add_gap(self, start_s: float, end_s: float) -> None:
        gaps = self.gaps
        gaps.append((start_s, end_s))
        if len(gaps) > MAX_GAPS:  # merge the two closest: their watched time between counts as a gap
            i = min(range(len(gaps) - 1), key=lambda k: gaps[k + 1][0] - gaps[k][1])
            gaps[i:i + 2] = [(gaps[i][0], gaps[i + 1][1])]
        log.warning("the consolidation ledger %s was not watching for %.0f s (sidecar down or "
                    "frozen): that time is no evidence for safe_to_delete", self.path, end_s - start_s)

    def _write_watched(self, now_s: float, latest: str | None = None) -> None:
        meta = [("watched_until_s", repr(now_s)), ("gaps", json.dumps(self.gaps)),
                ("running", "0" if self._closing else "1")]
        if latest is not None:
            meta.append(("canonical_by_service", latest))
        if self._dropped_dirty:  # the key's start of counts is the entry's
            meta.append(("heartbeat_dropped", json.dumps(
                [[*key[:2], *entry] for key, entry in self._dropped_totals.items()])))
            meta.append(("heartbeat_keys", HEARTBEAT_KEYS))
            self._dropped_dirty = False
        if self._loss_dirty and self.span_loss is not None:
            meta.append(("span_loss", json.dumps(list(self.span_loss))))
        if self._processes_dirty:
            meta.append(("backend_processes", json.dumps(list(self._backend_processes))))
            self._processes_dirty = False
        self._db.executemany(_insert("consolidation_meta"), meta)
        self._loss_dirty = False

    def _write_canonical(self, changed: dict[tuple[str | None, str], list[Entry]],
                         whole: bool = False) -> None:
        """Each changed (service, role)'s rows, written whole (deleted when none are left);
        ``whole``: the table's every row replaced by these."""
        if whole:
            self._db.execute("DELETE FROM canonical_calls")
        else:
            self._db.executemany("DELETE FROM canonical_calls WHERE service IS ? AND role = ?",
                                 list(changed))
        self._db.executemany(_insert("canonical_calls"),
                             [entry for entries in changed.values() for entry in entries])

    def _write_versions(self, versions: dict[tuple[str, str], KnownVersion | None]) -> None:
        """One row per version that changed (None: deleted), numbered in write order: the order
        the next process reads them in."""
        rows = []
        for key, known in versions.items():
            if known is not None:
                self._versions_written += 1
                rows.append((*key, self._versions_written, known.first_seen_s, known.base,
                             known.last_active_s))
        self._db.executemany(_insert("version_order"), rows)
        self._db.executemany("DELETE FROM version_order WHERE service = ? AND version = ?",
                             [key for key, known in versions.items() if known is None])

    def _write_version_counts(self, counts: dict[tuple[str, str], VersionCounts | None]) -> None:
        """One row per version whose counts changed (None: deleted), numbered in write order."""
        rows = []
        for key, version_counts in counts.items():
            if version_counts is not None:
                self._counts_written += 1
                rows.append((*key, self._counts_written, _counts_json(version_counts)))
        self._db.executemany(_insert("version_counts"), rows)
        self._db.executemany("DELETE FROM version_counts WHERE service = ? AND version = ?",
                             [key for key, version_counts in counts.items()
                              if version_counts is None])

    def record_loss(self, start_s: float, end_s: float, reason: str) -> None:
        """Calls between ``start_s`` and ``end_s`` may have been lost: every class idle across it
        needs a whole window watched after ``end_s`` (written with the next flush). Only the latest
        loss decides; one that overlaps it extends it."""
        loss = self.span_loss
        if loss is not None and start_s <= loss[1]:
            if end_s <= loss[1]:
                return
            start_s = min(start_s, loss[0])
        self.span_loss = (start_s, end_s, reason)
        self._loss_dirty = True

    def observe_dropped_total(self, service: str | None, instance: str | None, total: int,
                              now_s: float, sequence: int | None = None,
                              counts_since_s: float | None = None) -> tuple[float, float] | None:
        """A heartbeat of a backend process: its cumulative dropped-spans total at ``now_s``, its
        sequence number and when its counts started (``pathwatch.sdk.heartbeat_sequence``,
        ``pathwatch.sdk.counts_since_s``; None when not sent). The counts are the process's: it is
        keyed by (service, instance, start of its counts), so processes sharing a
        ``service.instance.id`` (workers, or a backend restarted under it) are each compared with
        their own heartbeats only; without a start of counts, by instance as before. The interval in
        which spans were lost that only the last sidecar's record tells (else None): the process's
        first heartbeat since this start whose total rose above the one the last sidecar saw —
        dropped while no sidecar listened (a restart quicker than a gap); keyed by instance, one
        from a process restarted since (``_restarted``: any total above zero is a loss); or the
        first heartbeat of a process never held, numbered past 1, with a total above zero
        (``_unseen_drops``). A heartbeat numbered as one its process sent already (delivered twice:
        an export retried) changes nothing. Rises within this run are the pipeline's
        (``spans_lost``)."""
        sequence, counts_since_s = numbering(sequence, counts_since_s)
        key = (service, instance, counts_since_s)
        previous = self._dropped_totals.get(key)  # left in its place when nothing new
        if previous is None and counts_since_s is not None \
                and (service, instance, None) in self._carried:
            # a ledger of an older release held the instance alone: compared with it, as before
            key_held: HeartbeatKey = (service, instance, None)
            previous = self._dropped_totals.pop(key_held)
        else:
            key_held = key
        if previous is not None and counts_since_s is not None and key_held == key \
                and sequence is not None and previous[2] is not None and sequence <= previous[2]:
            return None  # a heartbeat it sent already: nothing new, not seen more recently
        self._dropped_totals.pop(key, None)  # to the back: the most recently seen
        self._dropped_totals[key] = (total, now_s, sequence, counts_since_s)
        self._dropped_dirty = True
        if len(self._dropped_totals) > MAX_HEARTBEAT_KEYS:
            gone, (_, gone_seen_s, _, _) = self._dropped_totals.popitem(last=False)
            self._carried.discard(gone)
            self._forgotten_until_s = max(self._forgotten_until_s or gone_seen_s, gone_seen_s)
        if previous is None:
            return self._unseen_drops(service, instance, total, now_s, sequence, counts_since_s)
        if key_held not in self._carried:
            return None
        self._carried.discard(key_held)
        last_total, seen_s, last_sequence, last_since_s = previous
        if total > last_total or (total > 0 and (
                total < last_total  # restarted since: counting from zero again
                or _restarted(sequence, counts_since_s, last_sequence, last_since_s))):
            return min(seen_s, now_s), now_s
        return None

    def dropped_total(self, service: str | None, instance: str | None,
                      counts_since_s: float | None) -> int | None:
        """The dropped-spans total of the backend process's last heartbeat this ledger holds (one
        the last sidecar saw, or seen since), None when it holds none or the process is not told
        apart (no start of counts). Pipeline thread, before this heartbeat's ``heartbeats_seen``."""
        _, counts_since_s = numbering(None, counts_since_s)
        if counts_since_s is None:
            return None
        held = self._dropped_totals.get((service, instance, counts_since_s))
        return None if held is None else held[0]

    def _unseen_drops(self, service: str | None, instance: str | None, total: int, now_s: float,
                      sequence: int | None, since_s: float | None) -> tuple[float, float] | None:
        """The first heartbeat seen of a process this ledger never held: numbered past 1, the
        process sent earlier ones that no sidecar recorded (lost on the way: its exporter gave them
        up, or no sidecar listened), so a total above zero is spans dropped unseen since its counts
        started — a loss from ``since_s`` (at most now; now when unknown) to now. Not when the
        process may be one this ledger forgot (seen before ``_forgotten_until_s``: its drops may
        have been counted then; the start of its counts, on the backend's clock, tells), nor one of
        an instance a ledger of an older release held (one process per instance) whose counts
        started before that ledger's heartbeat of it (it may be the one whose total that ledger
        kept, or another worker under that id); numbered 1, the pipeline counts it; unnumbered (an
        older instrumentation), a baseline."""
        if sequence is None or sequence == 1 or total <= 0:
            return None
        if not is_unix_time(since_s):  # unknown
            since_s = None
        for held_until_s in (self._forgotten_until_s,
                             self._held_per_instance.get((service, instance))):
            if held_until_s is not None and (since_s is None or since_s <= held_until_s):
                return None
        return counts_started(since_s, now_s), now_s

    def _watch_until_now(self) -> float:
        """A flush long after the one before is a gap too: the sidecar ran but did not watch
        (frozen, suspended, its pipeline stuck), so the calls then were not seen."""
        now_s = self._clock_s()
        if now_s - self._watched_until_s > self._max_gap_s:
            self._add_gap(self._watched_until_s, now_s)
        self._watched_until_s = now_s
        return now_s

    def unwatched_s(self, start_s: float, end_s: float) -> float:
        """Seconds of ``[start_s, end_s]`` the sidecar was not watching: the gaps, and the time
        since the last flush when that is longer than a gap (``verdicts`` on the API's thread while
        the pipeline is stuck or frozen: the flush that would record it as a gap has not come)."""
        # the last flush read before the gaps: a flush on the pipeline's thread meanwhile records
        # its gap before it moves the last flush on, so the gap is either in the copy or still
        # after the flush read (counted twice at worst); read the other way round, a long freeze
        # ending meanwhile was in neither and counted as watched
        watched_until_s = self._watched_until_s
        gaps = list(self.gaps)
        if end_s - watched_until_s > self._max_gap_s:
            gaps.append((watched_until_s, end_s))
        return sum(max(min(b, end_s) - max(a, start_s), 0.0) for a, b in gaps)

    # --- the data path (pipeline thread) ----------------------------------------------------------
    def observe_calls(self, role: str | None, implementation: str | None, canonical: bool,
                      retired: bool, caller: str | None, count: int, now_s: float,
                      service: str = UNKNOWN_SERVICE) -> None:
        """``count`` calls of one implementation (from one caller, of ``service``) seen at
        ``now_s``; ``canonical``: the service's path map names it its role's canonical one."""
        key = (role or "?", implementation or "?")
        # whether canonical is known of a class beyond the bound too (the inventory asks)
        self.canonical_book.called(service, key[0], key[1], canonical, now_s)
        activity = self.activity.get(key)
        if activity is None:
            if len(self.activity) >= self._max:
                self.refused += count
                if self._refused_last_s is None or now_s > self._refused_last_s:
                    self._refused_last_s = now_s
                if self.refused == count:  # the first refusal of this process
                    log.warning("the consolidation ledger %s holds its maximum of %d "
                                "implementations: calls of further ones (%s %s first) are not "
                                "tracked and get no verdict; counted in "
                                "pathwatch_ledger_refused_calls_total and verdicts.overflow",
                                self.path, self._max, key[0], key[1])
                return
            activity = self.activity[key] = Activity(False, retired, now_s, now_s)
            self.urgent = True
        elif now_s - activity.last_seen_s > self.write_at_once_idle_s:
            self.urgent = True  # revived: its call is written with this batch
        activity.total_calls += count
        if now_s > activity.last_seen_s:
            activity.last_seen_s = now_s
        activity.retired = retired
        if caller is not None and (not activity.last_callers or activity.last_callers[-1] != caller):
            callers = activity.last_callers
            if caller in callers:
                callers.remove(caller)
            callers.append(caller)
            del callers[:-LAST_CALLERS]
        self._dirty.add(key)

    def observe_code_run(self, implementation: str, count: int, now_s: float) -> None:
        """``count`` calls of other classes ran a method ``implementation`` defines (their span's
        ``code.function.name``: a subclass, which reports itself as the implementation, running
        an inherited method or its base's through ``super()``; a class listed under another role
        inheriting it): calls of that class too — deleting it would break them — in each role the
        ledger knows it in. A class the ledger does not know (never called as itself: an unlisted
        base) gets no row: it has no verdict to keep from ``safe_to_delete``."""
        if self._roles_size != len(self.activity):  # rows are only ever added (or all cleared)
            roles: dict[str, list[tuple[str, str]]] = {}
            for key in list(self.activity):
                roles.setdefault(key[1], []).append(key)
            self._roles_of, self._roles_size = roles, len(self.activity)
        for key in self._roles_of.get(implementation, ()):
            activity = self.activity[key]
            if now_s - activity.last_seen_s > self.write_at_once_idle_s:
                self.urgent = True  # revived: written with this batch, as a call of its own
            activity.total_calls += count
            if now_s > activity.last_seen_s:
                activity.last_seen_s = now_s
            self._dirty.add(key)

    def flush(self) -> None:
        """Write the implementations touched since the last flush and until when the sidecar
        watched (one transaction)."""
        dirty, self._dirty = self._dirty, set()
        dropped_dirty = self._dropped_dirty
        processes_dirty = self._processes_dirty
        versions, self._versions_pending = self._versions_pending, {}
        counts, self._counts_pending = self._counts_pending, {}
        self.urgent = False  # a write that fails is retried with the periodic flush, not per batch
        book = self.canonical_book
        # the (service, role) pairs whose canonical calls moved (whole: every row replaced)
        whole, changed = book.take_changed()
        latest = None  # each pair's latest, as the release before reads it: when it changed
        if whole or changed or self._latest_written is None:
            latest = json.dumps([list(entry) for entry in book.latest()])
            if latest == self._latest_written:
                latest = None
        named = book.named() if dirty else set()
        rows = []
        for key in dirty:
            a = self.activity[key]
            a.canonical = key in named  # the column of an older release's ledger
            rows.append((*key, int(a.canonical), int(a.retired), a.first_seen_s, a.last_seen_s,
                         a.total_calls, json.dumps(a.last_callers)))
        try:
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany(_insert("implementation_activity"), rows)
                self._write_canonical(changed, whole)
                self._write_watched(self._watch_until_now(), latest)
                self._write_versions(versions)
                self._write_version_counts(counts)
                self._db.execute("COMMIT")
            if latest is not None:
                self._latest_written = latest
            if self.left_alone is None and self.path != ":memory:":
                self._last_written_s = self._watched_until_s
                if self._failing is not None:  # written again: persisted from now
                    self._failing = None
                    self._state_since_s = self._watched_until_s
        except sqlite3.Error as exc:
            self.write_errors += 1
            self._dirty |= dirty  # retried with the next flush
            self._loss_dirty = self._loss_dirty or self.span_loss is not None
            book.mark_changed(changed, whole)
            self._dropped_dirty = self._dropped_dirty or dropped_dirty
            self._processes_dirty = self._processes_dirty or processes_dirty
            # a later remember's rows, if any, are newer: written after the ones that failed
            newer, self._versions_pending = self._versions_pending, versions
            for key, known in newer.items():
                versions.pop(key, None)
                versions[key] = known
            for key, version_counts in counts.items():  # a later remember's, if any, is newer
                self._counts_pending.setdefault(key, version_counts)
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            mismatch = self._mismatch()
            if mismatch is not None:  # retrying would fail alike, for ever
                cause, what = mismatch
                self._leave_alone(WRITE, cause,
                                  f"{what}: changed under this sidecar (another release "
                                  "on the same file: where the state lock does not hold, two "
                                  "sidecars on one incidents.path)")
                return
            self.errors[(WRITE, SQLITE_ERROR)] += 1
            if self._failing is None:
                self._state_since_s = self._clock_s()
            self._failing = str(exc) or type(exc).__name__
            if self.write_errors == 1:
                log.exception("writing the consolidation database %s failed; kept in memory, "
                              "retried on the next flush", self.path)

    def _mismatch(self) -> tuple[str, str] | None:
        """After a failed write: why the file is not this release's to write any more (a later
        release's version, tables of another shape: the cause, and what), None when it still is,
        or cannot be told."""
        try:
            LEDGER.recorded_version(self._db, self.path)
            self._check_tables()
        except NewerSchemaError as exc:
            return NEWER_VERSION, (f"it has schema version {exc.recorded}, newer than this "
                                   f"pathwatch ({exc.known})")
        except ValueError as exc:
            return OTHER_SHAPE, f"its tables are of another shape ({exc})"
        except sqlite3.Error:
            return None
        return None

    def persistence(self) -> dict:
        """Whether the ledger behind the verdicts is being saved (``verdicts.ledger``; any
        thread): ``state`` (``LEDGER_STATES``) since when, why (in memory: the cause its file was
        left alone; writes failing: the last one's SQLite error; moved aside: unreadable), the
        failed writes since the start, when an unreadable file was moved aside at this start, when
        the file was last written (None: not by this process)."""
        if self.left_alone is not None:
            state, reason = IN_MEMORY, self._left_alone_cause
        elif self.path == ":memory:":
            state, reason = NO_FILE, None
        elif self._failing is not None:
            state, reason = WRITE_FAILING, self._failing
        elif self._moved_aside_s is not None:
            state, reason = MOVED_ASIDE, UNREADABLE
        else:
            state, reason = PERSISTED, None
        return {"state": state, "since": self._state_since_s, "reason": reason,
                "write_errors": self.write_errors, "moved_aside_at": self._moved_aside_s,
                "last_written": self._last_written_s}

    def _leave_alone(self, operation: str, cause: str, why: str) -> None:
        """The file is not written from now on, nor moved (its content is another release's
        evidence, which that release, started again, goes on with); this process's ledger is kept in
        memory (an in-memory database takes its writes): verdicts as a fresh ledger's, lost at the
        stop. Logged once, as an error."""
        if self.left_alone is None:
            log.error("the consolidation database %s is left as it is, neither written nor moved "
                      "aside: %s. This sidecar keeps its consolidation ledger in memory only, not "
                      "persisted: its verdicts say observing until it has watched a whole window "
                      "without a restart. Upgrade pathwatch to the release that wrote the file to "
                      "go on with it (the time in between is a gap in it), or move the file aside "
                      "to start a ledger this release keeps", self.path, why)
            self.errors[(operation, cause)] += 1
            self._left_alone_cause = cause
            self._state_since_s = self._clock_s()
            self._failing = None
        self.left_alone = self.path
        with self._lock:
            self._db.close()
            self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            LEDGER.migrate(self._db, ":memory:")

    def close(self, clean: bool = True) -> None:
        """The last flush, which also clears the ``running`` marker: the next start knows this
        stop was clean. ``clean=False`` (accepted spans were left unprocessed: the pipeline did not
        drain) keeps the marker, so the next start counts the time since this last write as an
        unclean stop's loss, as after a crash."""
        self._closing = clean
        with self._lock, contextlib.suppress(sqlite3.Error):  # closed already: flush says so
            # the last write: worth waiting for another process's lock
            self._db.execute(f"PRAGMA busy_timeout = {CLOSE_BUSY_TIMEOUT_MS}")
        self.flush()
        with self._lock:
            self._db.close()

    # --- verdicts --------------------------------------------------------------------------------
    def overflow(self) -> dict:
        """What the bound on implementations cost since the start (``verdicts.overflow``): calls of
        classes beyond it are not tracked, so those classes have no verdict (never
        ``safe_to_delete``, and not listed either)."""
        return {"max_implementations": self._max, "untracked_calls": self.refused}

    def watched_whole_window(self, window_s: float, now_s: float) -> bool:
        """This ledger has watched a whole window since it started, since the latest span loss and
        since it last refused a class (one new to it beyond its bound): a class it holds no row for
        was not called through this sidecar within the window. Its
        ``pathwatch_ledger_window_watched``: across pods, a sidecar without a row for a class
        vetoes it only through this (``min by`` hears the rows alone)."""
        loss = self.span_loss
        since_s = max(self.observing_since_s, loss[1] if loss is not None else -math.inf,
                      -math.inf if self._refused_last_s is None else self._refused_last_s)
        return now_s - since_s - self.unwatched_s(since_s, now_s) >= window_s

    def canonical_by_service(self, window_s: float, now_s: float
                             ) -> dict[tuple[str | None, str], frozenset[tuple[str, str]]]:
        """(service, role) -> the (role, implementation) pairs canonical for that service now
        (``CanonicalBook.by_service``; any thread)."""
        return self.canonical_book.by_service(window_s, now_s)

    def canonical_classes(self, window_s: float, now_s: float) -> set[tuple[str, str]]:
        """The (role, implementation) pairs canonical now, for any service: what the verdicts
        say, and the inventory's ``canonical`` (any thread)."""
        return self.canonical_book.canonical(window_s, now_s)

    def retired_last_seen(self) -> dict[tuple[str, str], float]:
        """(role, implementation) -> last seen of each retired one (the inventory's
        ``retired_still_called`` across restarts; any thread: copies)."""
        return {key: a.last_seen_s for key, a in list(self.activity.items()) if a.retired}

    def verdicts(self, window_s: float, now_s: float | None = None) -> list[dict]:
        """Every implementation seen, with its verdict and evidence; deletable ones first."""
        now_s = self._clock_s() if now_s is None else now_s
        activity = sorted(list(self.activity.items()))
        loss = self.span_loss
        lost_until_s = loss[1] if loss is not None else 0.0  # re-confirmed after the latest loss
        role_last_seen: dict[str, float] = {}
        # a class is one class whatever role its calls came under (a path map that moved it to
        # another role, renamed or split one, leaves its row under the old role): it is idle only
        # once idle under every role
        class_last_seen: dict[str, float] = {}
        for (role, impl), a in activity:
            role_last_seen[role] = max(role_last_seen.get(role, a.last_seen_s), a.last_seen_s)
            class_last_seen[impl] = max(class_last_seen.get(impl, a.last_seen_s), a.last_seen_s)
        canonical_now = self.canonical_book.canonical(window_s, now_s)
        rows = []
        for (role, impl), a in activity:
            last_seen_s = class_last_seen[impl]
            idle_s = max(now_s - last_seen_s, 0.0)
            since_s = max(last_seen_s, self.observing_since_s, lost_until_s)
            watched_s = max(now_s - since_s - self.unwatched_s(since_s, now_s), 0.0)
            canonical = (role, impl) in canonical_now  # called as such within the window
            if canonical:
                verdict = CANONICAL
            elif idle_s < window_s:
                verdict = IN_USE
            elif watched_s < window_s or now_s - role_last_seen[role] >= window_s:
                verdict = OBSERVING
            else:
                verdict = SAFE_TO_DELETE
            rows.append({"role": role, "implementation": impl, "verdict": verdict,
                         "canonical": canonical, "retired": a.retired,
                         "first_seen": a.first_seen_s, "last_seen": a.last_seen_s,
                         "idle_s": round(idle_s, 3), "watched_s": round(watched_s, 3),
                         "total_calls": a.total_calls,
                         "last_callers": list(a.last_callers)})
        rows.sort(key=lambda r: (r["verdict"] != SAFE_TO_DELETE, r["role"], r["implementation"]))
        return rows
