"""The incident table and its version (``PRAGMA user_version``); migrations go here, in order.

``PRAGMA user_version`` says which pathwatch may open the store — the role of SQLite's own "read
version" byte, a ``min_reader_version`` —, not every feature the store has. A store may have to be
opened by the previous release: ``helm rollback`` with persistence enabled, and that release refuses
a version newer than its ``SCHEMA_VERSION`` (it cannot know what changed). So there are two kinds of
change:

* **Breaking** (``_MIGRATIONS``): a change the previous release would read or write wrongly — e.g.
  schema 2 moved pages to ``alerted_sinks``: schema 1's code, setting only ``alerted``, would leave
  an incident that the newer code pages again to every sink. It takes the next version, and the
  previous release refuses the store with a clear error, as it must.
* **Additive** (``_ADDITIONS``): a new column with a DEFAULT that the previous release can ignore. It
  names its columns in every SELECT and INSERT, so it never reads the column, its inserts get the
  default and its updates leave the column as it was — a row the newer code still reads correctly
  (a new incident of the old release simply has no services). The version stays; the column is
  added if missing at every open (idempotent, one ``PRAGMA table_info``), so a store that the old
  release wrote in between keeps working, and a store with a column of a later release (which this
  code does not name) is used as it is.

Whatever an open has to change (create, upgrade, add columns) it reads again and changes in one
write transaction (``migrate``), so that two processes opening one file at once both start.

Why not a second number (a "features" version beside the reader version)? The previous release reads
only ``user_version``, so that has to be the reader version anyway; the features a store has are its
columns (``PRAGMA table_info``), which no release can get out of step with — a second number could
not be kept by the previous release that writes the store in between. And the sidecar always writes
its store, so unlike SQLite there is no read-only level between the two: a release opens a store at
its ``SCHEMA_VERSION`` or older, and no other. The step-by-step migrations stay as they were, for
breaking changes only.
"""

from __future__ import annotations

import sqlite3

from sidecar.sqlite_schema import Schema, SchemaError

__all__ = ["COLUMNS", "SCHEMA_VERSION", "SchemaError", "migrate"]

SCHEMA_VERSION = 2  # bump only with a breaking migration (above); 3 is retired (_RETIRED)

_V1 = """
CREATE TABLE incidents (
    id               TEXT PRIMARY KEY,
    rule             TEXT NOT NULL,
    severity         TEXT NOT NULL,
    role             TEXT,
    implementation   TEXT,
    entry_point      TEXT,
    summary          TEXT NOT NULL,
    count            INTEGER NOT NULL,
    first_seen_ns    INTEGER NOT NULL,
    last_seen_ns     INTEGER NOT NULL,
    sample_trace_ids TEXT NOT NULL,   -- JSON list
    alerted          INTEGER NOT NULL DEFAULT 0,
    status           TEXT NOT NULL DEFAULT 'open'
);
CREATE INDEX incidents_last_seen ON incidents (last_seen_ns);
CREATE INDEX incidents_rule ON incidents (rule, last_seen_ns);
"""
# pages are remembered per sink: a sink that failed is paged again while another one accepted.
# An incident alerted before (by at least one sink, which one is not known) counts as paged to all.
_V2 = """
ALTER TABLE incidents ADD COLUMN alerted_sinks TEXT NOT NULL DEFAULT '';   -- comma-separated
UPDATE incidents SET alerted_sinks = '*' WHERE alerted != 0;
"""
_MIGRATIONS = {1: _V1, 2: _V2}  # version -> the script that brings the one before to it
# additive columns, in order: (name, definition). Each needs a DEFAULT (or to allow NULL): what the
# previous release's inserts leave there.
_ADDITIONS = (
    # the backend services (service.name) an incident's findings came from, most recent last
    # (bounded: grouping.MAX_SERVICES); an incident stored before, or by the previous release, knows
    # none until its next finding
    ("services", "TEXT NOT NULL DEFAULT '[]'"),   # JSON list
    # the sinks that owe the incident its page: configured (for its severity) when one of its
    # findings came (comma-separated). The previous release leaves it as it is: a page it sends is
    # in alerted_sinks, which this code reads first; an incident it alone saw owes nothing here,
    # and is paged at a start only if seen within alerting.resolve_after_s, as it did
    ("owed_sinks", "TEXT NOT NULL DEFAULT ''"),
)
# versions that builds recorded for what is now an addition -> the version such a store really has;
# it is recorded as that at its next open, so that the previous release opens it again. Never to be
# taken by a breaking migration (the next one is 4): 3 was the services column's (dd42dc7).
_RETIRED = {3: 2}

COLUMNS = ("id", "rule", "severity", "role", "implementation", "entry_point", "summary", "count",
           "first_seen_ns", "last_seen_ns", "sample_trace_ids", "alerted", "status", "alerted_sinks",
           "services", "owed_sinks")


INCIDENTS = Schema(version=SCHEMA_VERSION, migrations=_MIGRATIONS,
                   additions={"incidents": _ADDITIONS}, retired=_RETIRED,
                   where="incidents.path", database="incident database", tables="incident tables",
                   elsewhere="point incidents.path at another file")


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Brings the store to ``SCHEMA_VERSION`` and adds the missing additive columns, in one write
    transaction (``Schema.migrate``, ``sidecar.sqlite_schema``); ``SchemaError`` naming
    ``incidents.path`` when it cannot."""
    INCIDENTS.migrate(conn, path)
