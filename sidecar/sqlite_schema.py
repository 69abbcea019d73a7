"""A SQLite file's schema version (``PRAGMA user_version``) and its migrations, for pathwatch's two
stores: the incident database (``sidecar.incidents.schema``, which says why it works this way) and
the consolidation ledger beside it (``sidecar.consolidation.verdicts``).

``user_version`` is the oldest version a release must know to open the file — SQLite's own "read
version" byte, a ``min_reader_version`` —: a release opens a file at its version or older,
upgrading an older one, and never one newer (``NewerSchemaError``: it cannot know what changed).
Only a *breaking* change (``migrations``) raises it; an *additive* column with a default, which the
previous release ignores as it names its columns in every statement, keeps it (``additions``:
added, if missing, at every open).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping, Sequence


class SchemaError(RuntimeError):
    """The database cannot be used by this version of pathwatch; the message names the file.
    ``cause``: the SQLite error behind it, if any."""

    def __init__(self, message: str, cause: sqlite3.Error | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class NewerSchemaError(SchemaError):
    """The database has a schema version newer than this release knows: a later release's."""

    def __init__(self, message: str, recorded: int, known: int) -> None:
        super().__init__(message)
        self.recorded = recorded
        self.known = known


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schema:
    """One store's tables: ``migrations`` maps each version to the script that brings the one
    before to it (from 0: a new file); ``additions`` maps a table to its additive columns, in order,
    (name, definition with a DEFAULT); ``retired``: versions builds recorded for what is now an
    addition -> the version such a file really has (recorded as that at its next open, so that the
    previous release opens it again). The rest words the messages: ``where`` the setting that names
    the file, ``database`` and ``tables`` what it holds, ``elsewhere`` what else to do."""

    version: int
    migrations: Mapping[int, str]
    additions: Mapping[str, Sequence[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    retired: Mapping[int, int] = dataclasses.field(default_factory=dict)
    where: str
    database: str
    tables: str
    elsewhere: str

    def migrate(self, conn: sqlite3.Connection, path: str) -> None:
        """Brings the file to ``version`` and adds the missing additive columns. What is to do
        is read again, and done, in one write transaction (``BEGIN IMMEDIATE``): two processes
        opening the file at once (the state lock keeps them apart only where ``flock`` works:
        ``sidecar.incidents.lock``) would otherwise both find a table or a column missing and both
        create or add it, and the second fail to start ("table ... already exists", "duplicate
        column name"). The second waits for the first's transaction (``busy_timeout``) and then
        finds nothing to do. A file that is up to date (every open but a release's first) takes no
        write lock. ``NewerSchemaError`` for a file of a later release, ``SchemaError`` when the
        change fails (the file unchanged)."""
        recorded = self.recorded_version(conn, path)
        if recorded == self.version and not self._missing_columns(conn):
            return
        # what it found to do, for a message before the transaction has read it again
        doing = ("create" if recorded == 0 else f"upgrade (from schema version {recorded})"
                 if recorded != self.version else "add columns to")
        try:
            conn.execute("BEGIN IMMEDIATE")
            recorded = self.recorded_version(conn, path)  # again, under the write lock
            if recorded != self.version:
                version = self.retired.get(recorded, recorded)
                scripts = " ".join(script for step, script in sorted(self.migrations.items())
                                   if version < step <= self.version)
                doing = "create" if recorded == 0 else f"upgrade (from schema version {recorded})"
                for statement in _statements(f"{scripts} PRAGMA user_version = {self.version};"):
                    conn.execute(statement)
            missing = self._missing_columns(conn)
            if missing:
                doing = f"add the column(s) {', '.join(name for _, name, _ in missing)} to"
                for table, name, definition in missing:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.rollback()
            where = f"{self.where} {path!r}: cannot {doing} the {self.tables}"
            if exc.sqlite_errorname.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                # another connection kept the write lock past busy_timeout: the file is a database,
                # likely this very store, and unchanged; pointing elsewhere would drop its content
                busy_ms = conn.execute("PRAGMA busy_timeout").fetchone()[0]
                raise SchemaError(f"{where}: another process held the database's write lock "
                                  f"for more than {busy_ms / 1000:g} s ({exc}); the store is "
                                  "unchanged: start again once it lets go (another pathwatch on "
                                  "this path, a sqlite3 shell in a transaction)", exc) from None
            raise SchemaError(f"{where}: {exc}; if the file is not pathwatch's, {self.elsewhere}",
                              exc) from None
        except BaseException:
            conn.rollback()
            raise

    def recorded_version(self, conn: sqlite3.Connection, path: str) -> int:
        """``PRAGMA user_version``; ``NewerSchemaError`` for a version newer than this code's."""
        recorded = conn.execute("PRAGMA user_version").fetchone()[0]
        if self.retired.get(recorded, recorded) > self.version:
            raise NewerSchemaError(
                f"{self.where} {path!r}: {self.database} has schema version {recorded}, newer than "
                f"this pathwatch ({self.version}); upgrade pathwatch or {self.elsewhere}",
                recorded, self.version)
        return recorded

    def _missing_columns(self, conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
        missing = []
        for table, columns in self.additions.items():
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if present:  # no such table at a known version: another application's, refused later
                missing += [(table, name, definition) for name, definition in columns
                            if name not in present]
        return missing


def _statements(script: str) -> list[str]:
    """The statements of ``script``, to run one by one in the transaction: ``executescript`` commits
    a pending transaction first (always before Python 3.12)."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):  # not a ";" inside a string or a comment
            if pending.strip(" \t\n;"):
                statements.append(pending)
            pending = ""
    return statements
