"""The ledger's schema version (``PRAGMA user_version``), as the incident store's: stamped when
created, an unversioned ledger of the release before read as version 1, a later release's left as
it is (its evidence kept for that release), never written over."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3

import pytest

from sidecar.consolidation import ActivityLedger
from sidecar.consolidation.deploys import KnownVersion
from tests.previous_release import CODE_RAN, release_tree, run_release

T0 = 1_800_000_000.0
DAY = 86400.0
WINDOW = 14 * DAY
ROLE = "execution_engine"
LEGACY, CANONICAL = "demo.engines.Legacy", "demo.engines.UserExecutionEngine"
# a later release's breaking change: the activity keyed by service too (this release's upserts
# name the key (role, implementation): they fail on it)
_KEY_CHANGED = """
DROP TABLE implementation_activity;
CREATE TABLE implementation_activity (
    service TEXT NOT NULL DEFAULT '', role TEXT NOT NULL, implementation TEXT NOT NULL,
    canonical INTEGER NOT NULL, retired INTEGER NOT NULL, first_seen_s REAL NOT NULL,
    last_seen_s REAL NOT NULL, total_calls INTEGER NOT NULL, last_callers TEXT NOT NULL,
    PRIMARY KEY (service, role, implementation));
INSERT INTO implementation_activity VALUES ('svc', 'execution_engine', 'demo.engines.Legacy', 0, 1,
                                            1800000000.0, 1800000000.0, 7, '[]');
"""

# the last release before the ledger had a version: it reads no user_version, so a ledger this
# release stamped must be one it reads and writes as its own
PREVIOUS_RELEASE = "73aeb56"
# run by it: list the ledger's calls, call an implementation of its own, close (a clean stop)
_AS_PREVIOUS_RELEASE = r"""
import json, sys
from sidecar.consolidation import ActivityLedger
ledger = ActivityLedger(sys.argv[1], clock_s=lambda: 1_800_000_100.0)
listed = sorted([impl, a.total_calls] for (_, impl), a in ledger.activity.items())
ledger.observe_calls("execution_engine", "demo.engines.Previous", False, True, "app.routes.run",
                     2, 1_800_000_100.0, service="svc")
ledger.close()
""" + CODE_RAN + r"""
print(json.dumps({"code": ours, "listed": listed, "moved_aside": ledger.moved_aside,
                  "write_errors": ledger.write_errors}))
"""


class Clock:
    def __init__(self, now_s: float = T0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def call(ledger: ActivityLedger, implementation: str, at_s: float, canonical: bool = False) -> None:
    ledger.observe_calls(ROLE, implementation, canonical=canonical, retired=not canonical,
                         caller="app.routes.run", count=1, now_s=at_s, service="svc")


def user_version(path: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def set_user_version(path: str, version: int, script: str = "") -> None:
    conn = sqlite3.connect(path)
    conn.executescript(f"{script} PRAGMA user_version = {version};")
    conn.close()


def digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def a_ledger_with_evidence(path: str, clock: Clock) -> None:
    ledger = ActivityLedger(path, clock_s=clock)
    call(ledger, LEGACY, T0)
    call(ledger, CANONICAL, T0 + 1, canonical=True)
    ledger.remember_versions([KnownVersion("svc", "1.0", T0, None, T0 + 1)])
    ledger.close()


def test_a_fresh_ledger_is_stamped_with_its_schema_version(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    ActivityLedger(path, clock_s=Clock()).close()
    assert user_version(path) == 1


def test_an_unversioned_ledger_of_the_release_before_is_version_1_and_keeps_its_evidence(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    a_ledger_with_evidence(path, clock)
    set_user_version(path, 0)  # as the release before wrote it: no version
    clock.now_s = T0 + 10
    ledger = ActivityLedger(path, clock_s=clock)
    assert ledger.moved_aside is None and ledger.left_alone is None
    assert ledger.observing_since_s == T0
    assert ledger.activity[(ROLE, LEGACY)].total_calls == 1
    assert [r["implementation"] for r in ledger.verdicts(WINDOW) if r["canonical"]] == [CANONICAL]
    assert [v.version for v in ledger.versions] == ["1.0"]
    ledger.close()
    assert user_version(path) == 1
    assert not [p for p in os.listdir(tmp_path) if ".corrupt-" in p]


@pytest.mark.parametrize("script", ["", _KEY_CHANGED])
def test_a_ledger_of_a_later_release_is_left_as_it_is(tmp_path, caplog, script):
    """A rollback across a raise of the ledger's version: this release cannot know what changed,
    so it neither writes the file (its writes would fail, or be wrong) nor moves it aside (the
    later release, upgraded again, goes on with its evidence): its ledger is kept in memory, the
    sidecar runs on, and the log says so once, naming the file and both versions."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    a_ledger_with_evidence(path, clock)
    set_user_version(path, 2, script)
    before = digest(path)
    clock.now_s = T0 + DAY
    with caplog.at_level(logging.WARNING):
        ledger = ActivityLedger(path, clock_s=clock)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert path in message and "schema version 2" in message and "this pathwatch (1)" in message
    assert ledger.left_alone == path and ledger.moved_aside is None
    assert ledger.activity == {} and ledger.observing_since_s == T0 + DAY  # a fresh ledger's
    call(ledger, LEGACY, clock.now_s)
    ledger.flush()
    ledger.close()
    assert ledger.write_errors == 0
    assert digest(path) == before and user_version(path) == 2
    assert sorted(os.listdir(tmp_path)) == ["ledger.sqlite"]
    if not script:  # the later release (as far as this one can play it) goes on with its evidence
        set_user_version(path, 1)
        again = ActivityLedger(path, clock_s=clock)
        assert again.activity[(ROLE, LEGACY)].total_calls == 1 and again.observing_since_s == T0


def test_a_ledger_a_later_release_changed_while_this_one_ran_is_written_no_more(tmp_path, caplog):
    """Two sidecars on one ledger where the state lock does not hold (a file system without
    locks): the later release raised the version and changed a key under this one, whose writes
    then failed at every flush, retried for ever and logged once as any failed write. They stop at
    the first: counted, logged once as an error naming the file and the version; the later
    release's file is not touched again."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    call(ledger, LEGACY, T0)
    ledger.flush()
    set_user_version(path, 2, _KEY_CHANGED)
    before = digest(path)
    with caplog.at_level(logging.WARNING):
        for n in range(1, 4):
            clock.now_s = T0 + 5 * n
            call(ledger, LEGACY, clock.now_s)
            ledger.flush()
        ledger.close()
    assert ledger.write_errors == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and path in errors[0] and "schema version 2" in errors[0]
    assert ledger.left_alone == path
    assert ledger.activity[(ROLE, LEGACY)].total_calls == 4  # kept in memory
    assert digest(path) == before


def test_a_write_failure_that_is_no_schema_mismatch_is_still_retried(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    ledger._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.implementation_activity "
                       "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    call(ledger, LEGACY, T0)
    ledger.flush()
    ledger.flush()
    assert ledger.write_errors == 2 and ledger.left_alone is None
    ledger._db.execute("DROP TRIGGER refuse")
    ledger.close()
    assert ActivityLedger(path, clock_s=Clock()).activity[(ROLE, LEGACY)].total_calls == 1


def test_the_release_before_versioning_reads_and_writes_a_ledger_this_release_stamped(
        tmp_path_factory, tmp_path):
    """A rollback to the release before: its own ledger code (from git) opens the stamped ledger
    as it opened its own, keeps its evidence and writes it; upgraded again, nothing is lost."""
    tree = release_tree(PREVIOUS_RELEASE, tmp_path_factory.mktemp("previous-release"))
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    a_ledger_with_evidence(path, clock)
    ran = run_release(tree, _AS_PREVIOUS_RELEASE, path)
    assert ran["listed"] == [[LEGACY, 1], [CANONICAL, 1]]  # its evidence, read as its own
    assert ran["moved_aside"] is None and ran["write_errors"] == 0
    assert user_version(path) == 1  # it does not know the version, and leaves it
    clock.now_s = T0 + 200
    again = ActivityLedger(path, clock_s=clock)
    assert again.left_alone is None and again.moved_aside is None
    assert again.observing_since_s == T0
    assert {impl: a.total_calls for (_, impl), a in again.activity.items()} == {
        LEGACY: 1, CANONICAL: 1, "demo.engines.Previous": 2}
    assert [r["implementation"] for r in again.verdicts(WINDOW) if r["canonical"]] == [CANONICAL]
    again.close()
