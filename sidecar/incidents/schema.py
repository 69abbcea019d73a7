"""The incident table and its version (``PRAGMA user_version``); migrations go here, in order."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1

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

COLUMNS = ("id", "rule", "severity", "role", "implementation", "entry_point", "summary", "count",
           "first_seen_ns", "last_seen_ns", "sample_trace_ids", "alerted", "status")


class SchemaError(RuntimeError):
    """The incident database cannot be used by this version of pathwatch."""


def migrate(conn: sqlite3.Connection, path: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: incident database has schema version {version}, newer than this pathwatch "
            f"({SCHEMA_VERSION}); upgrade pathwatch or point incidents.path at another file")
    if version == 0:
        try:
            conn.executescript(f"BEGIN; {_V1} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except sqlite3.Error as exc:
            conn.rollback()
            raise SchemaError(f"{path}: cannot create the incident tables: {exc}") from None
