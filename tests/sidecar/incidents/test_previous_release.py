"""A rollback: the previous release's own store code opens, reads and writes a store this one wrote
(its code taken from git and run alone: ``tests.previous_release``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sidecar.incidents import SCHEMA_VERSION, IncidentStore
from tests.previous_release import CODE_RAN, release_tree, run_release
from tests.sidecar.incidents.findings import bleed

# the release before the services column: it knows schema 2 and refuses any newer version
PREVIOUS_RELEASE = "e9fc860"

# run by the previous release: list the incidents, record a finding of an incident this release
# wrote (an update) and of a new one (an insert), mark the new one paged
_AS_PREVIOUS_RELEASE = r"""
import json, sys
import sidecar
from sidecar.incidents import SCHEMA_VERSION, IncidentStore
from sidecar.model import Finding, Severity
def finding(implementation, trace):
    return Finding(rule="bleed.owner_vs_ambient", severity=Severity.CRITICAL, summary="previous",
                   role="execution_engine", implementation=implementation, entry_point="/ws",
                   trace_id=trace, detected_ns=1_764_160_100 * 10**9)
store = IncidentStore(sys.argv[1])
listed = [(i.implementation, i.count) for i in store.list_incidents()]
touched = store.record([finding("demo.engines.UserExecutionEngine", "p1"),
                        finding("demo.engines.Previous", "p2")])
store.mark_alerted(touched[1][0].id, "webhook")
store.close()
""" + CODE_RAN + r"""
print(json.dumps({"code": ours, "schema": SCHEMA_VERSION, "listed": listed}))
"""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    return release_tree(PREVIOUS_RELEASE, tmp_path_factory.mktemp("previous-release"))


def _run_previous_release(tree: Path, db_path: str) -> dict:
    return run_release(tree, _AS_PREVIOUS_RELEASE, db_path)


def test_the_previous_release_opens_reads_and_writes_a_store_this_release_wrote(
        previous_release, tmp_path):
    db_path = str(tmp_path / "incidents.sqlite")
    store = IncidentStore(db_path)
    store.record([bleed("t1", service="checkout"), bleed("t2", service="billing")])
    store.close()

    ran = _run_previous_release(previous_release, db_path)  # a rollback
    assert ran["schema"] == 2 == SCHEMA_VERSION
    assert ran["listed"] == [["demo.engines.UserExecutionEngine", 2]]

    store = IncidentStore(db_path)  # upgraded again: nothing lost
    by_implementation = {i.implementation: i for i in store.list_incidents()}  # read from the file
    ours, theirs = (by_implementation["demo.engines.UserExecutionEngine"],
                    by_implementation["demo.engines.Previous"])
    assert ours.count == 3 and ours.sample_trace_ids == ["t1", "t2", "p1"]
    assert ours.services == ["checkout", "billing"]  # kept through the previous release's update
    assert theirs.count == 1 and theirs.services == [] and store.is_alerted(theirs.id, "webhook")
    (after, is_new), = store.record([bleed("t3", implementation="demo.engines.Previous",
                                           service="checkout")])
    assert not is_new and after.count == 2 and after.services == ["checkout"]
    store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT services FROM incidents ORDER BY implementation").fetchall() == [
            ('["checkout"]',), ('["checkout", "billing"]',)]
    conn.close()
