"""The incident table and its version (``PRAGMA user_version``); migrations go here, in order."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 3

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
# the backend services (service.name) an incident's findings came from, most recent last (bounded:
# grouping.MAX_SERVICES); an incident stored before knows none until its next finding
_V3 = """
ALTER TABLE incidents ADD COLUMN services TEXT NOT NULL DEFAULT '[]';   -- JSON list
"""
_MIGRATIONS = {1: _V1, 2: _V2, 3: _V3}  # version -> the script that brings the one before to it

COLUMNS = ("id", "rule", "severity", "role", "implementation", "entry_point", "summary", "count",
           "first_seen_ns", "last_seen_ns", "sample_trace_ids", "alerted", "status", "alerted_sinks",
           "services")


class SchemaError(RuntimeError):
    """The incident database cannot be used by this version of pathwatch."""


def migrate(conn: sqlite3.Connection, path: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"incidents.path {path!r}: incident database has schema version {version}, newer than "
            f"this pathwatch ({SCHEMA_VERSION}); upgrade pathwatch or point incidents.path at "
            f"another file")
    if version == SCHEMA_VERSION:
        return
    scripts = " ".join(_MIGRATIONS[step] for step in range(version + 1, SCHEMA_VERSION + 1))
    try:
        conn.executescript(f"BEGIN; {scripts} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    except sqlite3.Error as exc:
        conn.rollback()
        doing = "create" if version == 0 else f"upgrade (from schema version {version})"
        raise SchemaError(f"incidents.path {path!r}: cannot {doing} the incident tables: {exc}; if "
                          f"the file is not pathwatch's, point incidents.path at another file"
                          ) from None
