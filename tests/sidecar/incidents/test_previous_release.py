"""A rollback: the previous release's own store code opens, reads and writes a store this one wrote.

Its code (``sidecar`` and the ``instrumentation`` it imports) is taken from git (``git archive``)
and run in a subprocess with it alone on PYTHONPATH — the real previous release, not a copy of its
SQL. A checkout without that history (a shallow clone, a source archive) skips the test, saying
so; a full clone (CI's) runs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sidecar.incidents import SCHEMA_VERSION, IncidentStore
from tests.sidecar.incidents.findings import bleed

REPO = Path(__file__).resolve().parents[3]
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
ours = sorted({getattr(module, "__file__", None) or "?" for name, module in sys.modules.items()
               if name.split(".")[0] in ("sidecar", "instrumentation")})
print(json.dumps({"code": ours, "schema": SCHEMA_VERSION, "listed": listed}))
"""


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory) -> Path:
    """The previous release's ``sidecar`` and ``instrumentation`` packages (its ``sidecar.config``
    imports ``instrumentation.yaml_loader``), extracted from git history."""
    if shutil.which("git") is None:
        pytest.skip(f"git is not installed: the previous release ({PREVIOUS_RELEASE}) comes from git")
    if _git("cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}").returncode != 0:
        shallow = _git("rev-parse", "--is-shallow-repository").stdout.decode().strip() == "true"
        pytest.skip(f"the previous release's commit {PREVIOUS_RELEASE} is not in the git history of "
                    f"{REPO} ({'a shallow clone' if shallow else 'not a git clone of pathwatch'}): "
                    f"run in a full clone, or `git fetch --unshallow`")
    archive = _git("archive", PREVIOUS_RELEASE, "sidecar", "instrumentation")
    assert archive.returncode == 0, archive.stderr.decode()
    tree = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # our own repository's files; the data filter (Python 3.11.4+) where there is one
        tar.extractall(tree, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return tree


def _run_previous_release(tree: Path, db_path: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # its code alone: not this checkout's
    done = subprocess.run([sys.executable, "-c", _AS_PREVIOUS_RELEASE, db_path], env=env, cwd=tree,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the previous release could not use the store:\n{done.stderr}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # it really ran the previous release, every module of it (not this checkout's installed ones)
    assert result["code"] and all(Path(code).is_relative_to(tree) for code in result["code"]), (
        result)
    return result


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
