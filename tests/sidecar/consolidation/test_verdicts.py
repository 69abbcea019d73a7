"""The activity ledger's verdicts: only watched time is evidence, persisted across restarts."""

from __future__ import annotations

import json
import os
import re
import sqlite3

import pytest

from sidecar.consolidation import ActivityLedger, LedgerError, ledger_path_beside
from sidecar.consolidation.deploys import KnownVersion, Thresholds, VersionBook, VersionCounts
from sidecar.consolidation.verdicts import MAX_BACKEND_PROCESSES, MAX_HEARTBEAT_KEYS

DAY = 86400.0
T0 = 1_800_000_000.0
WINDOW = 14 * DAY
ROLE = "execution_engine"
LEGACY, CANONICAL = "demo.engines.Legacy", "demo.engines.UserExecutionEngine"


class Clock:
    def __init__(self, now_s: float = T0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


# valid JSON nested deeper than the json module reads: RecursionError, not ValueError
DEEPLY_NESTED = "[" * 100_000 + "]" * 100_000

def call(ledger: ActivityLedger, implementation: str, at_s: float, canonical: bool = False) -> None:
    ledger.observe_calls(ROLE, implementation, canonical=canonical, retired=not canonical,
                         caller="app.routes.run", count=1, now_s=at_s)


def verdict_of(ledger: ActivityLedger, implementation: str, now_s: float) -> dict:
    return next(row for row in ledger.verdicts(WINDOW, now_s) if row["implementation"] == implementation)


def test_time_the_sidecar_was_down_is_not_watched_time(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    call(ledger, LEGACY, T0 + 1)
    ledger.close()
    clock.now_s = T0 + 20 * DAY  # started again after 20 days off
    restarted = ActivityLedger(path, clock_s=clock, max_gap_s=2 * 3600)
    call(restarted, CANONICAL, clock.now_s, canonical=True)
    row = verdict_of(restarted, LEGACY, clock.now_s)
    assert row["verdict"] == "observing" and row["watched_s"] == 0.0
    # a whole window watched after the restart, the role still called
    watch(restarted, clock, clock.now_s + WINDOW)
    call(restarted, CANONICAL, clock.now_s, canonical=True)
    assert verdict_of(restarted, LEGACY, clock.now_s)["verdict"] == "safe_to_delete"


def watch(ledger: ActivityLedger, clock: Clock, until_s: float, every_s: float = 3600.0) -> None:
    """The sidecar running (and flushing on its tick) until ``until_s``."""
    while clock.now_s + every_s < until_s:
        clock.now_s += every_s
        ledger.flush()
    clock.now_s = until_s


def test_a_quick_restart_keeps_the_window_running(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=2 * 3600)
    call(ledger, LEGACY, T0 + 1)
    watch(ledger, clock, T0 + 10 * DAY)
    ledger.close()  # flushes: watched until now
    clock.now_s += 20  # back within max_gap_s
    restarted = ActivityLedger(path, clock_s=clock, max_gap_s=2 * 3600)
    watch(restarted, clock, T0 + 15 * DAY)
    call(restarted, CANONICAL, clock.now_s, canonical=True)
    assert restarted.gaps == []
    assert verdict_of(restarted, LEGACY, clock.now_s)["verdict"] == "safe_to_delete"


def test_the_backend_processes_seen_are_there_at_the_next_start(tmp_path):
    """What the delivery detector reads at start (a restart: a backend process's spans that ended
    before its first one here went to the earlier sidecar process): a process new to the ledger is
    written with the batch that brought it (``urgent``), so also a sidecar killed right after (no
    close) leaves it; at most MAX_BACKEND_PROCESSES, the least recently seen dropped; an
    unreadable value is none."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    first = ActivityLedger(path, clock_s=clock)
    assert first.earlier_processes == frozenset()
    first.note_backend_process("0a0b0c0d")
    assert first.urgent
    first.flush()  # the pipeline flushes an urgent ledger after the batch
    first.note_backend_process("0a0b0c0d")
    assert not first.urgent  # known: nothing to write
    killed = ActivityLedger(path, clock_s=clock)  # the first one never closed
    assert killed.earlier_processes == {"0a0b0c0d"}
    for n in range(MAX_BACKEND_PROCESSES + 1):
        killed.note_backend_process(f"p{n}")
    killed.close()
    again = ActivityLedger(path, clock_s=clock)
    assert len(again.earlier_processes) == MAX_BACKEND_PROCESSES
    assert "0a0b0c0d" not in again.earlier_processes and "p0" not in again.earlier_processes
    again.close()
    with sqlite3.connect(path) as db:  # damaged: not a list of strings
        db.execute("UPDATE consolidation_meta SET value = ? WHERE key = 'backend_processes'", ('{"a": 1}',))
    assert ActivityLedger(path, clock_s=clock).earlier_processes == frozenset()
    assert ActivityLedger(":memory:", clock_s=clock).earlier_processes == frozenset()


def test_a_long_lived_backend_process_seen_again_outlives_a_thousand_newer_ones(tmp_path):
    """A web server beside a worker forked per task: the processes forgotten first are those not
    seen for longest. Kept by first sight, the web server went before the workers it outlived, and
    its runs in flight across the next restart were judged (a false missing_required_events:
    /tmp/s27_rev3/repro_ledger_process_evicted.py). A sight moving it is written with the next
    flush (not urgent: the process is on disk already)."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    ledger.note_backend_process("0a0b0c0d")
    ledger.flush()
    for n in range(MAX_BACKEND_PROCESSES - 1):
        ledger.note_backend_process(f"w{n}")
        ledger.note_backend_process("0a0b0c0d")  # the web server's next run
    ledger.flush()
    ledger.note_backend_process("0a0b0c0d")
    assert not ledger.urgent  # the most recent already: nothing to write
    ledger.note_backend_process("w-last")  # one more than the bound: the oldest sight goes
    ledger.flush()
    killed = ActivityLedger(path, clock_s=clock)  # the first one never closed
    assert "0a0b0c0d" in killed.earlier_processes and "w0" not in killed.earlier_processes
    assert len(killed.earlier_processes) == MAX_BACKEND_PROCESSES
    killed.close()


def test_nothing_is_deletable_while_its_role_is_not_seen_at_all(tmp_path):
    clock = Clock()
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock, max_gap_s=2 * 3600)
    call(ledger, CANONICAL, T0 + 1, canonical=True)
    call(ledger, LEGACY, T0 + 1)
    # the backend's export broke: no span of the role for 15 days
    watch(ledger, clock, T0 + 15 * DAY)
    assert verdict_of(ledger, LEGACY, T0 + 15 * DAY)["verdict"] == "observing"
    call(ledger, CANONICAL, T0 + 15 * DAY, canonical=True)
    assert verdict_of(ledger, LEGACY, T0 + 15 * DAY)["verdict"] == "safe_to_delete"


def test_gaps_stay_bounded_and_merging_only_delays_a_verdict(tmp_path):
    from sidecar.consolidation.verdicts import MAX_GAPS
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ActivityLedger(path, clock_s=clock).close()
    for _ in range(MAX_GAPS + 10):
        clock.now_s += 3600  # an hour down, then a short life
        ActivityLedger(path, clock_s=clock).close()
    ledger = ActivityLedger(path, clock_s=clock)
    assert len(ledger.gaps) == MAX_GAPS
    assert ledger.unwatched_s(T0, clock.now_s) >= (MAX_GAPS + 10) * 3600


def test_each_incident_database_has_its_own_ledger(tmp_path):
    a = ledger_path_beside(str(tmp_path / "pod-a-incidents.sqlite"))
    b = ledger_path_beside(str(tmp_path / "pod-b-incidents.sqlite"))
    named_like_a_ledger = str(tmp_path / "pathwatch-consolidation.sqlite")
    assert a == str(tmp_path / "pod-a-incidents-consolidation.sqlite")
    assert a != b and ledger_path_beside(named_like_a_ledger) != named_like_a_ledger
    clock = Clock()
    for path, calls in ((a, 100), (b, 5)):
        ledger = ActivityLedger(path, clock_s=clock)
        ledger.observe_calls(ROLE, LEGACY, False, True, "app.routes.run", calls, T0)
        ledger.close()
    assert ActivityLedger(a, clock_s=clock).activity[(ROLE, LEGACY)].total_calls == 100


def test_the_ledger_of_an_older_release_is_copied_to_the_new_name(tmp_path):
    clock = Clock()
    legacy = ActivityLedger(str(tmp_path / "pathwatch-consolidation.sqlite"), clock_s=clock)
    call(legacy, LEGACY, T0)
    legacy.close()
    path = ledger_path_beside(str(tmp_path / "pathwatch-incidents.sqlite"))
    upgraded = ActivityLedger(path, clock_s=clock)
    assert upgraded.activity[(ROLE, LEGACY)].total_calls == 1
    assert upgraded.observing_since_s == T0
    call(upgraded, LEGACY, T0 + 1)
    upgraded.close()
    # copied once: the new file is not overwritten by the old one at the next start
    assert ActivityLedger(ledger_path_beside(str(tmp_path / "pathwatch-incidents.sqlite")),
                          clock_s=clock).activity[(ROLE, LEGACY)].total_calls == 2


def _corrupt(path: str, statement: str) -> None:
    ActivityLedger(path, clock_s=Clock()).close()
    db = sqlite3.connect(path)
    db.executescript(statement)
    db.close()


@pytest.mark.parametrize("statement", [
    "INSERT INTO implementation_activity VALUES ('r', 'i', 0, 0, 1, 1, 1, 'not json')",
    "DROP TABLE implementation_activity; CREATE TABLE implementation_activity (role TEXT, extra TEXT)",
    # a key of another shape, the version kept: this release's upserts would fail at every write
    "DROP TABLE version_order; CREATE TABLE version_order (service TEXT NOT NULL, version TEXT "
    "NOT NULL, written INTEGER NOT NULL, first_seen_s REAL, base TEXT, last_active_s REAL, "
    "PRIMARY KEY (service, version, written))",
    # a column this release's inserts cannot fill (a table a later release created, not added to)
    "DROP TABLE canonical_calls; CREATE TABLE canonical_calls (service TEXT, role TEXT NOT NULL, "
    "implementation TEXT NOT NULL, canonical_s REAL NOT NULL, plain_s REAL NOT NULL, "
    "later TEXT NOT NULL)",
    f"INSERT OR REPLACE INTO consolidation_meta VALUES ('gaps', '{DEEPLY_NESTED}')",
    f"INSERT INTO implementation_activity VALUES ('r', 'i', 0, 0, 1, 1, 1, '{DEEPLY_NESTED}')",
])
def test_an_unreadable_ledger_is_moved_aside_and_a_fresh_one_started(tmp_path, statement, caplog):
    path = str(tmp_path / "ledger.sqlite")
    _corrupt(path, statement)
    clock = Clock(T0 + DAY)
    ledger = ActivityLedger(path, clock_s=clock)
    assert ledger.moved_aside == f"{path}.corrupt-{int(T0 + DAY)}"
    assert os.path.isfile(ledger.moved_aside)
    assert ledger.activity == {} and ledger.observing_since_s == T0 + DAY
    assert path in caplog.text and ledger.moved_aside in caplog.text
    call(ledger, LEGACY, T0 + DAY)
    ledger.close()
    assert ActivityLedger(path, clock_s=clock).activity[(ROLE, LEGACY)].total_calls == 1


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a SQLite file at all" * 100)
    ledger = ActivityLedger(str(path), clock_s=Clock())
    assert ledger.moved_aside is not None and ledger.activity == {}


def test_a_ledger_that_cannot_be_opened_is_an_error_naming_the_file(tmp_path):
    path = str(tmp_path / "no-such-dir" / "ledger.sqlite")
    with pytest.raises(LedgerError, match="no-such-dir"):
        ActivityLedger(path, clock_s=Clock())


def test_a_superseded_canonical_class_is_demoted_and_becomes_deletable(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    old, new = "demo.engines.RequestScopedExecutionEngine", CANONICAL
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=2 * 3600)
    call(ledger, old, T0, canonical=True)  # path map v1: old is canonical
    call(ledger, new, T0 + DAY, canonical=True)  # v2: new is; old is no longer called at all
    assert verdict_of(ledger, old, T0 + DAY)["canonical"] is False
    watch(ledger, clock, T0 + 30 * DAY)
    call(ledger, new, T0 + 30 * DAY, canonical=True)
    assert verdict_of(ledger, old, T0 + 30 * DAY)["verdict"] == "safe_to_delete"
    ledger.close()
    clock.now_s += 10
    restarted = ActivityLedger(path, clock_s=clock)
    assert [r["implementation"] for r in restarted.verdicts(WINDOW) if r["canonical"]] == [new]


def test_an_unreadable_ledger_of_an_older_release_is_moved_aside_and_a_fresh_one_started(tmp_path):
    legacy = tmp_path / "pathwatch-consolidation.sqlite"
    legacy.write_bytes(b"garbage, not sqlite" * 100)
    path = ledger_path_beside(str(tmp_path / "pathwatch-incidents.sqlite"))
    ledger = ActivityLedger(path, clock_s=Clock())
    assert ledger.activity == {} and ledger.moved_aside is None
    names = sorted(os.listdir(tmp_path))
    assert not legacy.exists() and not any(n.endswith(".partial") for n in names)
    assert any(n.startswith("pathwatch-consolidation.sqlite.corrupt-") for n in names)


def test_a_ledger_moved_aside_after_its_rows_loaded_flushes_fresh(tmp_path):
    # two canonicals of one role load (the older is demoted, so marked for writing), then the
    # meta is unreadable: the rows went aside with the file, nothing of them is written
    path = str(tmp_path / "ledger.sqlite")
    _corrupt(path, f"""
        INSERT INTO implementation_activity VALUES ('{ROLE}', 'A', 1, 0, 1, 10, 5, '[]');
        INSERT INTO implementation_activity VALUES ('{ROLE}', 'B', 1, 0, 1, 20, 5, '[]');
        INSERT OR REPLACE INTO consolidation_meta VALUES ('gaps', 'not json');""")
    ledger = ActivityLedger(path, clock_s=Clock(T0 + DAY))
    assert ledger.moved_aside is not None
    ledger.flush()
    assert ledger.write_errors == 0
    assert ActivityLedger(path, clock_s=Clock(T0 + DAY)).activity == {}


def test_time_a_running_sidecar_did_not_flush_is_not_watched_time(tmp_path):
    clock = Clock()
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock)
    call(ledger, CANONICAL, T0, canonical=True)
    call(ledger, LEGACY, T0)
    ledger.flush()
    clock.now_s += 20 * DAY  # frozen: no tick, no flush, no restart
    ledger.flush()
    call(ledger, CANONICAL, clock.now_s, canonical=True)
    row = verdict_of(ledger, LEGACY, clock.now_s)
    assert row["verdict"] == "observing" and row["watched_s"] == 0
    assert ledger.gaps == [(T0, T0 + 20 * DAY)]
    ledger.close()
    assert ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock).gaps == ledger.gaps


def test_a_gateways_services_each_keep_their_own_canonical_class(tmp_path):
    """Gateway mode: services a and b each have their own canonical class in one role. b's calls do
    not demote a's class (nor does a's call demote b's), another service calling a's class without
    the flag does not either, and b's class stays canonical (never deletable) while b is idle."""
    path = str(tmp_path / "ledger.sqlite")
    a_engine, b_engine = CANONICAL, "b.engines.UnifiedExecutionEngine"
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=7200)

    def calls(service: str, implementation: str, at_s: float, canonical: bool = True) -> None:
        ledger.observe_calls(ROLE, implementation, canonical=canonical, retired=False,
                             caller="app.routes.run", count=1, now_s=at_s, service=service)

    calls("a", a_engine, T0)
    calls("b", b_engine, T0 + 1)
    calls("c", a_engine, T0 + 2, canonical=False)  # c's path map names no canonical engine
    assert {r["implementation"] for r in ledger.verdicts(WINDOW, T0 + 2) if r["canonical"]} == {
        a_engine, b_engine}
    watch(ledger, clock, T0 + 10 * DAY)
    calls("a", a_engine, clock.now_s)  # b idle for 10 days, a still calling
    assert verdict_of(ledger, b_engine, clock.now_s)["verdict"] == "canonical"
    ledger.close()
    clock.now_s += 10
    restarted = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    assert {r["implementation"] for r in restarted.verdicts(WINDOW) if r["canonical"]} == {
        a_engine, b_engine}
    # b's path map moves on: only b's old class is demoted
    new_b = "b.engines.RequestScopedExecutionEngine"
    restarted.observe_calls(ROLE, new_b, canonical=True, retired=False, caller=None, count=1,
                            now_s=clock.now_s, service="b")
    assert {r["implementation"] for r in restarted.verdicts(WINDOW) if r["canonical"]} == {
        a_engine, new_b}


def test_a_ledger_of_an_older_release_keeps_its_canonical_until_a_service_names_one(tmp_path):
    """A ledger written without services: the role's canonical class it knew stays canonical until
    a service crowns one in that role (then, as before, the old class is demoted)."""
    path = str(tmp_path / "ledger.sqlite")
    _corrupt(path, f"""
        INSERT INTO implementation_activity VALUES ('{ROLE}', 'A', 1, 0, {T0}, {T0 + 10}, 5, '[]');
        INSERT INTO implementation_activity VALUES ('{ROLE}', 'B', 1, 0, {T0}, {T0 + 20}, 5, '[]');
        DELETE FROM consolidation_meta WHERE key = 'canonical_by_service';""")
    clock = Clock(T0 + DAY)
    ledger = ActivityLedger(path, clock_s=clock)
    assert ledger.moved_aside is None
    assert [r["implementation"] for r in ledger.verdicts(WINDOW) if r["canonical"]] == ["B"]
    ledger.observe_calls(ROLE, "C", canonical=True, retired=False, caller=None, count=1,
                         now_s=clock.now_s, service="svc")
    assert [r["implementation"] for r in ledger.verdicts(WINDOW) if r["canonical"]] == ["C"]


def test_the_canonical_class_of_each_service_is_remembered_within_a_bound(monkeypatch):
    import sidecar.consolidation.canonical as canonical_module

    monkeypatch.setattr(canonical_module, "MAX_CANONICAL_KEYS", 3)
    ledger = ActivityLedger(clock_s=Clock())
    for n in range(5):
        ledger.observe_calls(ROLE, f"s{n}.Engine", canonical=True, retired=False, caller=None,
                             count=1, now_s=T0, service=f"s{n}")
    assert [r["implementation"] for r in ledger.verdicts(WINDOW, T0) if r["canonical"]] == [
        "s2.Engine", "s3.Engine", "s4.Engine"]


def test_a_renamed_services_canonical_class_is_judged_on_its_calls_after_the_window(tmp_path):
    """Service a renamed a2, whose path map names another class: nothing crowns a's class again,
    and once it has had no call for the whole window it is judged like any other class (before, it
    stayed canonical for good, even across restarts)."""
    path = str(tmp_path / "ledger.sqlite")
    old, new = CANONICAL, "app.engines.RequestScopedExecutionEngine"
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    ledger.observe_calls(ROLE, old, canonical=True, retired=False, caller="app.routes.run", count=1,
                         now_s=T0, service="a")
    day = T0
    while day < T0 + 30 * DAY:  # a2 calls its canonical class every day; a is gone
        day += DAY
        watch(ledger, clock, day)
        ledger.observe_calls(ROLE, new, canonical=True, retired=False, caller="app.routes.run",
                             count=1, now_s=day, service="a2")
        if day < T0 + WINDOW:
            assert verdict_of(ledger, old, day)["verdict"] == "canonical"
    assert verdict_of(ledger, old, day)["verdict"] == "safe_to_delete"
    assert verdict_of(ledger, new, day)["verdict"] == "canonical"


@pytest.mark.parametrize("stored", ["not json", "null", '[["a", "execution_engine"]]', '{"a": 1}',
                                    DEEPLY_NESTED])
def test_a_damaged_canonical_map_keeps_the_ledgers_evidence(tmp_path, stored, caplog):
    """A hand-edited or damaged canonical_by_service: the rows (calls, last seen, the canonical
    flag) are kept and read as a ledger of an older release, not moved aside with everything."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    ledger.observe_calls(ROLE, CANONICAL, canonical=True, retired=False, caller="app.routes.run",
                         count=3, now_s=T0, service="a")
    ledger.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('canonical_by_service', ?)",
                     (stored,))
    clock.now_s += 10
    reopened = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    row = verdict_of(reopened, CANONICAL, clock.now_s)
    assert (row["total_calls"], row["verdict"]) == (3, "canonical")
    assert "canonical_by_service is unreadable" in caplog.text
    assert not [p for p in os.listdir(tmp_path) if ".corrupt-" in p]  # not moved aside
    reopened.flush()
    reopened.close()
    caplog.clear()
    again = ActivityLedger(path, clock_s=clock, max_gap_s=7200)  # repaired by that flush
    assert "canonical_by_service is unreadable" not in caplog.text
    assert verdict_of(again, CANONICAL, clock.now_s)["verdict"] == "canonical"
    again.close()


def test_a_call_of_a_new_or_long_idle_class_is_written_with_its_batch(tmp_path):
    """The ledger used to be written only on the detector's flush, every 5 s: a sidecar killed in
    between lost the call that revived a retired class, and its verdict went back to
    safe_to_delete. A new class, or one idle for longer than WRITE_AT_ONCE_IDLE_S, is written with
    the batch that brought it (no tick, no flush here); a class called a moment ago waits."""
    from sidecar.config import ConsolidationConfig
    from sidecar.consolidation.verdicts import WRITE_AT_ONCE_IDLE_S
    from sidecar.detectors.deploys import DeployDetector
    from tests.sidecar.detectors.factory import RETIRED_ENGINE, Trace

    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    deploys = DeployDetector(config=ConsolidationConfig(), clock_s=clock,
                             ledger=ActivityLedger(path, clock_s=clock))

    def stored_calls() -> int | None:  # what a sidecar started after a SIGKILL now would read
        with sqlite3.connect(path) as db:
            row = db.execute("SELECT total_calls FROM implementation_activity WHERE "
                             "implementation = ?", (RETIRED_ENGINE,)).fetchone()
        return row[0] if row else None

    def batch(at_s: float) -> None:
        deploys.consume([Trace().execute(RETIRED_ENGINE, retired=True)], int(at_s * 1e9))

    batch(T0)
    assert stored_calls() == 1  # new
    batch(T0 + 1)
    assert stored_calls() == 1  # called a second ago: the periodic flush writes it
    batch(T0 + 2 + WRITE_AT_ONCE_IDLE_S + 20 * DAY)  # revived after 20 days
    assert stored_calls() == 3


def test_after_an_unclean_stop_no_class_idle_across_it_is_deletable_until_reconfirmed(tmp_path):
    """A sidecar killed (no close) may have lost calls it had accepted: the time from its last
    write to the next start is a span loss. A class deletable before it is `observing` until a
    whole window is watched after the loss; a clean stop (close) records none."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=2 * DAY)
    call(ledger, LEGACY, T0)
    watch(ledger, clock, T0 + 20 * DAY, every_s=DAY)
    call(ledger, CANONICAL, clock.now_s, canonical=True)
    assert verdict_of(ledger, LEGACY, clock.now_s)["verdict"] == "safe_to_delete"
    ledger.flush()
    clock.now_s += 3  # killed 3 s after its last flush (nothing closed), started again at once
    killed_at_s = clock.now_s
    restarted = ActivityLedger(path, clock_s=clock, max_gap_s=2 * DAY)
    assert restarted.span_loss == (killed_at_s - 3, killed_at_s, "unclean_stop")
    call(restarted, CANONICAL, clock.now_s, canonical=True)
    row = verdict_of(restarted, LEGACY, clock.now_s)
    assert row["verdict"] == "observing" and row["watched_s"] == 0.0
    watch(restarted, clock, killed_at_s + WINDOW, every_s=DAY)
    call(restarted, CANONICAL, clock.now_s, canonical=True)
    assert verdict_of(restarted, LEGACY, clock.now_s)["verdict"] == "safe_to_delete"
    restarted.close()  # clean: the loss is remembered, no new one
    clock.now_s += 3
    again = ActivityLedger(path, clock_s=clock, max_gap_s=2 * DAY)
    assert again.span_loss == (killed_at_s - 3, killed_at_s, "unclean_stop")
    assert verdict_of(again, LEGACY, clock.now_s)["verdict"] == "safe_to_delete"
    again.close()


def test_spans_dropped_while_the_sidecar_restarted_are_a_span_loss(tmp_path):
    """A restart quicker than a gap: the backend's exporter dropped what it could not send
    meanwhile, and its next heartbeat says so. Its last total before the stop is persisted, so the
    restarted sidecar compares with it (the first heartbeat of this process is no blind baseline);
    a total that did not rise, or an instance never seen, is no loss."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    call(ledger, LEGACY, T0)
    for instance in ("pod-a", "pod-b", "pod-c"):
        assert ledger.observe_dropped_total("backend", instance, 7, T0 + 1) is None  # baselines
    assert ledger.observe_dropped_total("backend", "pod-a", 7, T0 + 11) is None
    ledger.close()
    clock.now_s = T0 + 30  # no gap: within max_gap_s
    restarted = ActivityLedger(path, clock_s=clock)
    assert restarted.gaps == [] and restarted.span_loss is None
    assert restarted.observe_dropped_total("backend", "pod-a", 9, T0 + 40) == (T0 + 11, T0 + 40)
    assert restarted.observe_dropped_total("backend", "pod-b", 7, T0 + 40) is None  # no drop
    assert restarted.observe_dropped_total("backend", "pod-c", 2, T0 + 40) == (T0 + 1, T0 + 40)
    assert restarted.observe_dropped_total("backend", "pod-new", 5, T0 + 40) is None
    # from then on the pipeline's own baselines take over: no second loss from the old totals
    assert restarted.observe_dropped_total("backend", "pod-a", 12, T0 + 50) is None



def test_a_backend_restarted_while_the_sidecar_was_down_is_a_span_loss(tmp_path):
    """A backend restarted under the same service.instance.id while the sidecar was down, its
    first heartbeats lost with it, its total of dropped spans equal to the saved one: the start of
    its counts (another) says it is another process, never held, whose drops all came after its
    start — a loss from it; without a start of counts (keyed by instance), a number not above the
    saved one says so, a loss from the saved heartbeat. A heartbeat the old process sent twice (an
    export retried) and a gap in the numbers (a heartbeat lost: totals are cumulative) are none."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    since = T0 - 100  # when the old processes' counts started
    ledger = ActivityLedger(path, clock_s=clock)
    for instance in ("by-start", "numbered-past", "twice", "lost-beat", "old-sdk"):
        ledger.observe_dropped_total("backend", instance, 3, T0 + 1, 4, since)
    ledger.observe_dropped_total("backend", "by-number", 3, T0 + 1, 4)  # no start of counts sent
    ledger.close()
    clock.now_s = T0 + 30  # no gap: within max_gap_s
    restarted = ActivityLedger(path, clock_s=clock)

    def beat(instance, sequence, since_s):
        return restarted.observe_dropped_total("backend", instance, 3, T0 + 40, sequence, since_s)

    assert beat("by-number", 2, None) == (T0 + 1, T0 + 40)  # numbered 2 after 4: restarted
    assert beat("by-start", 2, T0 + 20) == (T0 + 20, T0 + 40)  # its counts started after the stop
    assert beat("numbered-past", 9, T0 + 20) == (T0 + 20, T0 + 40)  # beats 1..8 lost, a new start
    assert beat("twice", 4, since) is None  # the saved heartbeat, delivered again
    assert beat("lost-beat", 6, since) is None  # 5 lost on the way: the same total, nothing dropped
    assert restarted.observe_dropped_total("backend", "old-sdk", 3, T0 + 40) is None  # no number


def test_processes_sharing_an_instance_id_are_each_compared_with_their_own_heartbeat(tmp_path):
    """uvicorn --workers 2 with service.instance.id set in OTEL_RESOURCE_ATTRIBUTES: two processes
    report under one id. The ledger keeps each (by the start of its counts): after a restart each
    one's first heartbeat is compared with its own saved one — B's 2 old drops against A's 0 were
    a restart and a loss at every sidecar restart (no retired class ever safe_to_delete) — and a
    real rise of one of them is still a loss."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    since_a, since_b = T0 - 100, T0 - 99.5
    ledger = ActivityLedger(path, clock_s=clock)
    for sequence in (1, 2):
        ledger.observe_dropped_total("backend", "shop.pod-0.app", 2, T0 + sequence, sequence, since_b)
        ledger.observe_dropped_total("backend", "shop.pod-0.app", 0, T0 + sequence, sequence, since_a)
    ledger.close()
    clock.now_s = T0 + 30
    restarted = ActivityLedger(path, clock_s=clock)
    assert restarted.observe_dropped_total("backend", "shop.pod-0.app", 2, T0 + 40, 3, since_b) is None
    assert restarted.observe_dropped_total("backend", "shop.pod-0.app", 0, T0 + 40, 3, since_a) is None
    restarted.close()
    clock.now_s = T0 + 60
    again = ActivityLedger(path, clock_s=clock)
    assert again.observe_dropped_total("backend", "shop.pod-0.app", 0, T0 + 70, 4, since_a) is None
    assert again.observe_dropped_total("backend", "shop.pod-0.app", 5, T0 + 70, 4, since_b) == (
        T0 + 40, T0 + 70)  # B dropped 3 while no sidecar listened
    again.close()


def test_processes_of_one_instance_are_bounded_the_least_recently_seen_forgotten(tmp_path):
    """A backend restarted many times under one id leaves a process behind each time: the ledger
    keeps MAX_HEARTBEAT_KEYS of them, forgetting the least recently seen, and a forgotten process
    that comes back (its counts started before it was forgotten) is a baseline."""
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=Clock())
    for n in range(MAX_HEARTBEAT_KEYS + 5):
        ledger.observe_dropped_total("backend", "ns.pod-0.app", 0, T0 + 10 * n + 5, 1, T0 + 10 * n)
    assert len(ledger._dropped_totals) == MAX_HEARTBEAT_KEYS
    assert ledger.observe_dropped_total("backend", "ns.pod-0.app", 4, T0 + 20_000, 7, T0) is None
    later = T0 + 10 * (MAX_HEARTBEAT_KEYS + 5)
    assert ledger.observe_dropped_total("backend", "ns.pod-0.app", 4, later + 9, 2, later) == (
        later, later + 9)
    ledger.close()


def test_a_heartbeat_sent_already_does_not_make_its_process_recently_seen(tmp_path):
    """At MAX_HEARTBEAT_KEYS the least recently seen process is forgotten. A heartbeat its process
    sent already (an export retried) changes nothing: it must not move that process behind those
    heard since, one of which would be forgotten in its place — its saved total lost for the next
    restart, and every process started before its last heartbeat then taken for one forgotten."""
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=Clock())
    ledger.observe_dropped_total("backend", "quiet", 0, T0 + 1, 1, T0)
    ledger.observe_dropped_total("backend", "quiet", 0, T0 + 2, 2, T0)
    for n in range(1, MAX_HEARTBEAT_KEYS):  # the table full, "quiet" the least recently seen
        ledger.observe_dropped_total("backend", f"pod-{n}", 0, T0 + 10 + n, 1, T0 + 5)
    assert ledger.observe_dropped_total("backend", "quiet", 0, T0 + 5000, 1, T0) is None  # retried
    ledger.observe_dropped_total("backend", "new", 0, T0 + 5001, 1, T0 + 5000)
    held = {instance for _, instance, _ in ledger._dropped_totals}
    assert "quiet" not in held and "pod-1" in held and "new" in held
    assert ledger._forgotten_until_s == T0 + 2  # the last heartbeat of the one forgotten
    ledger.close()


def test_a_ledger_that_kept_one_process_per_instance_does_not_take_the_others_for_lost(tmp_path):
    """A ledger of the release before kept one heartbeat per instance — the last of whichever
    worker sent it. The other workers of that id, never held, are no loss (their counts started
    before that heartbeat: it may have been theirs); the one it held is compared with its own; a
    process started after it is (a restart whose first heartbeat was lost)."""
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    call(ledger, LEGACY, T0)
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM consolidation_meta WHERE key = 'heartbeat_keys'")
        db.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('heartbeat_dropped', ?)",
                   ('[["backend", "shop.pod-0.app", 0, 1800000001.0, 5, 1799999900.0]]',))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))

    def beat(total, sequence, since_s):
        return restarted.observe_dropped_total("backend", "shop.pod-0.app", total, T0 + 40, sequence,
                                               since_s)

    assert beat(2, 6, T0 - 99.5) is None  # the other worker
    assert beat(1, 6, T0 - 100) == (T0 + 1, T0 + 40)  # the one held: it rose
    assert beat(3, 2, T0 + 20) == (T0 + 20, T0 + 40)  # started after: its first heartbeat lost
    restarted.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM consolidation_meta WHERE key = 'heartbeat_keys'"
                          ).fetchone() == ("process",)


def test_the_drops_of_a_new_process_whose_first_heartbeat_was_lost_are_a_span_loss(tmp_path):
    """The first heartbeat seen of an instance the ledger never held is numbered past 1: the
    earlier ones were lost (its exporter gave them up, or no sidecar listened), so its total is
    spans dropped unseen since its counts started — a loss from then (at most now). Not one
    that dropped nothing, one numbered 1 (the pipeline's), an older instrumentation's (no number),
    nor, the ledger full, one whose counts started before it forgot an instance (maybe that one)."""
    clock = Clock(T0)
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock)
    assert ledger.observe_dropped_total("backend", "pod-new", 4, T0 + 10, 2, T0 - 5) == (
        T0 - 5, T0 + 10)
    assert ledger.observe_dropped_total("backend", "pod-new", 4, T0 + 20, 3, T0 - 5) is None
    assert ledger.observe_dropped_total("backend", "pod-clean", 0, T0 + 10, 2, T0 - 5) is None
    assert ledger.observe_dropped_total("backend", "pod-first", 4, T0 + 10, 1, T0 - 5) is None
    assert ledger.observe_dropped_total("backend", "pod-old-sdk", 4, T0 + 10) is None
    assert ledger.observe_dropped_total("backend", "pod-ahead", 4, T0 + 10, 2, T0 + 99) == (
        T0 + 10, T0 + 10)  # a backend clock ahead of the sidecar's: now
    assert ledger.observe_dropped_total("backend", "pod-no-since", 4, T0 + 10, 2) == (
        T0 + 10, T0 + 10)
    for n in range(MAX_HEARTBEAT_KEYS):  # the first instances are forgotten, last seen at T0 + 20
        ledger.observe_dropped_total("backend", f"pod-{n}", 0, T0 + 20 + n, 3, T0)
    assert ledger.observe_dropped_total("backend", "pod-new", 4, T0 + 5000, 9, T0 - 5) is None
    assert ledger.observe_dropped_total("backend", "pod-later", 4, T0 + 5000, 2, T0 + 4000) == (
        T0 + 4000, T0 + 5000)  # its counts started after: never held
    ledger.close()
    clock.now_s = T0 + 5030
    # loaded full: what an earlier process forgot was last seen before what it kept (from T0 + 22)
    restarted = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock)
    assert restarted.observe_dropped_total("backend", "pod-gone", 4, T0 + 5040, 5, T0 + 10) is None
    assert restarted.observe_dropped_total("backend", "pod-late", 4, T0 + 5040, 2, T0 + 5020) == (
        T0 + 5020, T0 + 5040)

def test_heartbeat_totals_of_an_older_ledger_still_load(tmp_path):
    """A ledger of an older release saved each instance's total and time only: it opens, and its
    instances are compared as before (a total that rose is a loss) and, numbered 1 now, as
    restarted."""
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    call(ledger, LEGACY, T0)
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('heartbeat_dropped', ?)",
                   ('[["backend", "pod-a", 3, 1800000001.0], ["backend", "pod-b", 3, 1800000001.0], '
                    '["backend", "pod-c", 3, 1800000001.0]]',))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.moved_aside is None and verdict_of(restarted, LEGACY, T0 + 30)["total_calls"] == 1
    assert restarted.observe_dropped_total("backend", "pod-a", 4, T0 + 40, 7, T0) == (T0 + 1, T0 + 40)
    assert restarted.observe_dropped_total("backend", "pod-b", 3, T0 + 40, 1, T0 + 20) == (
        T0 + 1, T0 + 40)
    assert restarted.observe_dropped_total("backend", "pod-c", 3, T0 + 40, 7, T0) is None
    restarted.close()
    again = ActivityLedger(path, clock_s=Clock(T0 + 50))  # written back with the numbers
    assert again.observe_dropped_total("backend", "pod-c", 3, T0 + 60, 2, T0 + 55) == (
        T0 + 55, T0 + 60)  # another process (its counts started anew), never held

@pytest.mark.parametrize("stored", [
    "[1",
    '[["backend", "pod-a", Infinity, 1800000000.0]]',  # int() of it: OverflowError, not ValueError
    '[["backend", "pod-a", 1e999, 1800000000.0]]',
    '[["backend", "pod-a", 7, NaN]]',
    '[["backend", "pod-a", 7, Infinity]]',
    '[["backend", "pod-a", 7, 1800000000.0, 0, 1799999000.0]]',  # no sequence number starts at 0
    '[["backend", "pod-a", 7, 1800000000.0, 2.5, 1799999000.0]]',
    '[["backend", "pod-a", 7, 1800000000.0, true, 1799999000.0]]',
    '[["backend", "pod-a", 7, 1800000000.0, 2, NaN]]',
    '[["backend", "pod-a", 7, 1800000000.0, 2]]',  # neither the old shape nor the new
    DEEPLY_NESTED,
])
def test_an_unreadable_heartbeat_total_in_the_ledger_keeps_its_evidence(tmp_path, stored):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    call(ledger, LEGACY, T0)
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('heartbeat_dropped', ?)",
                   (stored,))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.moved_aside is None and verdict_of(restarted, LEGACY, T0 + 30)["total_calls"] == 1
    assert restarted.observe_dropped_total("backend", "pod-a", 3, T0 + 40) is None  # a baseline
    # nor is an instance unknown now, numbered past 1, a process never seen: it may have been held
    assert restarted.observe_dropped_total("backend", "pod-b", 3, T0 + 40, 5, T0 + 5) is None


def test_classes_beyond_the_ledgers_bound_are_refused_visibly(tmp_path, caplog):
    """A full ledger dropped the calls of classes new to it without a sign: not in the verdicts,
    not in the metrics. They are counted (verdicts.overflow, pathwatch_ledger_refused_calls_total
    on the detector's flush) and logged once; the tracked classes keep their rows."""
    from prometheus_client import CollectorRegistry

    from sidecar.config import ConsolidationConfig
    from sidecar.detectors.deploys import DeployDetector
    from sidecar.telemetry import Telemetry

    clock = Clock()
    telemetry = Telemetry(CollectorRegistry())
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock, max_implementations=2)
    deploys = DeployDetector(config=ConsolidationConfig(), clock_s=clock, ledger=ledger,
                             telemetry=telemetry)

    def refused_metric() -> float:
        return telemetry.registry.get_sample_value("pathwatch_ledger_refused_calls_total")

    deploys.flush()
    assert refused_metric() == 0.0  # the series exists before the first refusal
    call(ledger, CANONICAL, T0, canonical=True)
    call(ledger, LEGACY, T0)
    assert deploys.snapshot(T0)["verdicts"]["overflow"] == {"max_implementations": 2,
                                                            "untracked_calls": 0}
    with caplog.at_level("WARNING", logger="sidecar.consolidation.verdicts"):
        call(ledger, "demo.engines.Third", T0 + 1)
        ledger.observe_calls(ROLE, "demo.engines.Fourth", canonical=False, retired=True,
                             caller=None, count=3, now_s=T0 + 2)
    assert [r.message.count("maximum of 2 implementations") for r in caplog.records] == [1]
    overflow = deploys.snapshot(T0 + 2)["verdicts"]["overflow"]
    assert overflow == {"max_implementations": 2, "untracked_calls": 4}
    assert {row["implementation"] for row in ledger.verdicts(WINDOW, T0 + 2)} == {CANONICAL, LEGACY}
    deploys.flush()
    assert refused_metric() == 4.0
    deploys.flush()
    assert refused_metric() == 4.0  # published once


def test_the_versions_first_seen_are_persisted_for_the_next_process(tmp_path):
    """The version book's versions (first sighting, base, last activity) are written with the
    ledger and read by the next process: the order of a service's versions survives a restart."""
    from sidecar.consolidation.deploys import KnownVersion

    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    versions = [KnownVersion("backend", "1.0", T0, None, T0 + 5),
                KnownVersion("backend", "2.0", T0 + 5, "1.0", T0 + 9)]
    ledger.remember_versions(versions)
    ledger.close()
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.versions == versions
    restarted.close()
    assert ActivityLedger(path, clock_s=Clock(T0 + 40)).versions == versions  # not rewritten: kept


@pytest.mark.parametrize("stored", [
    "[1",
    '[["backend", "1.0", NaN, null, 1800000000.0]]',
    '[["backend", "1.0", 1800000000.0, null]]',
    '{"backend": 1}',
    DEEPLY_NESTED,
])
def test_an_unreadable_version_order_in_the_ledger_is_ignored(tmp_path, stored, caplog):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    call(ledger, LEGACY, T0)
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('version_order', ?)", (stored,))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.moved_aside is None and verdict_of(restarted, LEGACY, T0 + 30)["total_calls"] == 1
    assert restarted.versions == [] and "version_order is unreadable" in caplog.text


def _order_statements(ledger: ActivityLedger) -> list[str]:
    """The statements of the ledger's next flush that write the version order (SQLite's own
    trace, with the values bound)."""
    statements: list[str] = []
    ledger._db.set_trace_callback(statements.append)
    ledger.flush()
    ledger._db.set_trace_callback(None)
    return [s for s in statements if "version_order" in s]


def _order_rows(path: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT version, first_seen_s, base, last_active_s FROM version_order "
                          "ORDER BY written").fetchall()


def test_a_flush_writes_the_order_of_the_versions_that_changed_only(tmp_path):
    """Restored from an earlier process, 50 versions never change; after one tracked version was
    active, the flush writes that version's row, not the 50 again (they were written whole, as
    one value, on every flush under traffic: 40 kB at 1024 versions). The order survives."""
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    ledger.remember_versions([KnownVersion("backend", f"1.{n}", T0 + n, f"1.{n - 1}" if n else None,
                                           T0 + n) for n in range(50)])
    ledger.close()
    ledger = ActivityLedger(path, clock_s=Clock(T0 + 100))
    known = ledger.versions
    assert [v.version for v in known] == [f"1.{n}" for n in range(50)]
    book = VersionBook(Thresholds(min_runs=5), known=known)
    book.count_run("backend", "1.20", "/ws", T0 + 101)
    ledger.remember_versions(book.take_known())
    [written] = _order_statements(ledger)
    assert [n for n in range(50) if re.search(rf"'1\.{n}'", written)] == [19, 20]  # 1.20, base 1.19
    assert written.startswith("INSERT") and "'1.20'" in written and repr(T0 + 101) in written
    assert _order_statements(ledger) == []  # nothing changed since
    ledger.remember_versions(book.take_known() or ledger.versions)
    assert _order_statements(ledger) == []
    book.count_run("backend", "1.30", "/ws", T0 + 102)
    ledger.remember_versions(book.take_known())
    [written] = _order_statements(ledger)
    assert "'1.30'" in written and "'1.20'" not in written
    ledger.close()
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 130))
    order = [n for n in range(50) if n not in (20, 30)] + [20, 30]  # least recently active first
    assert [v.version for v in restarted.versions] == [f"1.{n}" for n in order]
    assert restarted.versions[-2] == KnownVersion("backend", "1.20", T0 + 20, "1.19", T0 + 101)


def test_the_version_order_keeps_the_order_given_and_deletes_the_versions_no_longer_given(
        tmp_path, monkeypatch):
    from sidecar.consolidation import verdicts

    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    one, two, three = (KnownVersion("backend", v, T0, None, T0) for v in ("1", "2", "3"))
    ledger.remember_versions([one, two, three])
    ledger.flush()
    ledger.remember_versions([two, three])  # 1 forgotten by the book
    assert [s.split()[0] for s in _order_statements(ledger)] == ["DELETE"]
    ledger.remember_versions([three, two])  # unchanged records in another order: rewritten
    ledger.flush()
    assert [row[0] for row in _order_rows(path)] == ["3", "2"]
    monkeypatch.setattr(verdicts, "MAX_KNOWN_VERSIONS", 2)
    four = KnownVersion("backend", "4", T0 + 1, "2", T0 + 1)
    ledger.remember_versions([three, two, four])  # the least recently active goes first
    ledger.close()
    assert _order_rows(path) == [("2", T0, None, T0), ("4", T0 + 1, "2", T0 + 1)]
    with sqlite3.connect(path) as db:
        # rows beyond the bound (an earlier process with another bound): the last written kept
        db.execute("INSERT INTO version_order VALUES ('backend', '5', 100, 1.0, NULL, 2.0)")
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert [v.version for v in restarted.versions] == ["4", "5"]
    restarted.close()
    assert [row[0] for row in _order_rows(path)] == ["4", "5"]


def test_the_version_order_of_the_release_before_loads_and_moves_into_rows(tmp_path):
    """A ledger written before the version order was rows holds it in one meta value: it loads, is
    moved into rows once (the value deleted), and a later change writes its version's row only."""
    path = str(tmp_path / "ledger.sqlite")
    ActivityLedger(path, clock_s=Clock()).close()
    versions = [KnownVersion("backend", "2.0", T0 + 5, "1.0", T0 + 6),
                KnownVersion("backend", "1.0", T0, None, T0 + 9)]  # a rollback: 1.0 active last
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE IF EXISTS version_order")  # as the release before made it
        db.execute("PRAGMA user_version = 0")  # (unversioned)
        db.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('version_order', ?)",
                   (json.dumps([[v.service, v.version, v.first_seen_s, v.base, v.last_active_s]
                                for v in versions]),))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.versions == versions
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM consolidation_meta WHERE key = 'version_order'"
                          ).fetchall() == []
    assert [row[0] for row in _order_rows(path)] == ["2.0", "1.0"]
    changed = KnownVersion("backend", "1.0", T0, None, T0 + 31)
    restarted.remember_versions([versions[0], changed])
    [written] = _order_statements(restarted)
    assert "'1.0'" in written and "'2.0'" not in written
    restarted.close()
    assert ActivityLedger(path, clock_s=Clock(T0 + 60)).versions == [versions[0], changed]


def test_a_version_order_value_beside_rows_is_the_newer_and_replaces_them(tmp_path):
    """A downgrade and back: the release before, finding no value, writes the versions it saw as
    one value beside the rows this one wrote; that value is the newer and replaces the rows."""
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    ledger.remember_versions([KnownVersion("backend", "1.0", T0, None, T0)])
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO consolidation_meta VALUES ('version_order', ?)",
                   (json.dumps([["backend", "3.0", T0 + 50, None, T0 + 51]]),))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 60))
    assert restarted.versions == [KnownVersion("backend", "3.0", T0 + 50, None, T0 + 51)]
    assert [row[0] for row in _order_rows(path)] == ["3.0"]


@pytest.mark.parametrize("row", [
    ("backend", "9", 5, "soon", None, 1.0),  # a time of another type
    ("backend", "9", 5, 1.0, None, None),  # NaN is stored as NULL
    ("backend", "9", 5, 1.0, None, float("inf")),
    ("backend", "9", 5, 1.0, b"1.0", 2.0),  # a blob
    (b"backend", "9", 5, 1.0, None, 2.0),
    ("backend", "9", "five", 1.0, None, 2.0),
    ("backend", "9", (1 << 63) - 1, 1.0, None, 2.0),  # a write number the next one would overflow
])
def test_an_unreadable_version_order_row_is_deleted_the_others_kept(tmp_path, row, caplog):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    kept = KnownVersion("backend", "1.0", T0, None, T0 + 1)
    ledger.remember_versions([kept])
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO version_order VALUES (?, ?, ?, ?, ?, ?)", row)
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.moved_aside is None and restarted.versions == [kept]
    assert "version_order has 1 unreadable rows" in caplog.text
    added = KnownVersion("backend", "2.0", T0 + 31, "1.0", T0 + 31)
    restarted.remember_versions([kept, added])
    restarted.close()
    assert ActivityLedger(path, clock_s=Clock(T0 + 60)).versions == [kept, added]


def test_a_version_order_a_flush_could_not_write_is_written_by_the_next(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    # a real SQLite failure: the insert is refused (as a full disk would refuse it)
    ledger._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.version_order "
                       "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    one, two = (KnownVersion("backend", v, T0, None, T0) for v in ("1", "2"))
    ledger.remember_versions([one, two])
    ledger.flush()
    assert ledger.write_errors == 1
    ledger._db.execute("DROP TRIGGER refuse")
    one_again = KnownVersion("backend", "1", T0, None, T0 + 5)  # active since: now the last
    ledger.remember_versions([two, one_again])
    ledger.close()
    assert ActivityLedger(path, clock_s=Clock(T0 + 30)).versions == [two, one_again]


def test_the_version_counts_survive_a_restart_of_the_ledger(tmp_path):
    from sidecar.consolidation.deploys import VersionCounts

    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    counts = [VersionCounts("backend", "1.0", (("/ws", 20),), (), (("engine", "X"),)),
              VersionCounts("backend", "2.0", (("/ws", 7), ("/chat", 3)),
                            (("/ws", "bleed", 4, "engine", "X", 3, "abc"),
                             ("/chat", "delivery", 1, None, None, 0, None)), ()),
              VersionCounts("backend", "3.0", (("/x", 1),), (), (("engine", "Old"),),
                            (("engine", "Old", "/x", "t1"), ("engine", "Older", "/y", None)))]
    ledger.remember_version_counts(counts)
    ledger.close()
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.version_counts == counts
    restarted.close()
    assert ActivityLedger(path, clock_s=Clock(T0 + 40)).version_counts == counts  # kept


@pytest.mark.parametrize("stored", [
    "[1",
    '[["backend", "1.0", [["/ws", -1]], [], []]]',  # a negative count
    '[["backend", "1.0", [["/ws", 1.5]], [], []]]',
    '[["backend", "1.0", [["/ws", true]], [], []]]',
    '[["backend", "1.0", [], [["/ws", "bleed", 1, "r", "i", 1]], []]]',  # a field short
    '[["backend", "1.0", [], [], [["r", 7]]]]',
    '[["backend", 1.0, [], [], []]]',
    '[["backend", "1.0", {"/ws": 1}, [], []]]',
    '[["backend", "1.0", [], [], [], [], []]]',  # a table too many
    '[["backend", "1.0", [], [], [], {"engine": "Old"}]]',  # retired classes, not a list
    DEEPLY_NESTED,
])
def test_unreadable_version_counts_in_the_ledger_are_ignored(tmp_path, stored, caplog):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    call(ledger, LEGACY, T0)
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('version_counts', ?)",
                   (stored,))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.moved_aside is None and verdict_of(restarted, LEGACY, T0 + 30)["total_calls"] == 1
    assert restarted.version_counts == [] and "version_counts is unreadable" in caplog.text


def _version_counts(version: str, runs: int) -> VersionCounts:
    return VersionCounts("backend", version, (("/ws", runs), ("/chat", 2)),
                         (("/ws", "bleed", 3, "engine", "X", 2, "ab" * 16),), (("engine", "X"),))


def _counts_statements(ledger: ActivityLedger) -> list[str]:
    """The statements of the ledger's next flush that write version counts (SQLite's own trace,
    with the values bound)."""
    statements: list[str] = []
    ledger._db.set_trace_callback(statements.append)
    ledger.flush()
    ledger._db.set_trace_callback(None)
    return [s for s in statements if "version_counts" in s]


def test_a_flush_writes_the_counts_of_the_versions_that_changed_only(tmp_path):
    """Restored from an earlier process, 50 versions' counts never change; after one tracked
    version counted a run, the flush writes that version's counts, not the 50 again (they were
    written whole, as one value, on every flush under traffic: 9 MB at 1024 versions)."""
    path = str(tmp_path / "ledger.sqlite")
    known = [KnownVersion("backend", f"1.{n}", float(n), None, float(n)) for n in range(50)]
    ledger = ActivityLedger(path, clock_s=Clock())
    ledger.remember_version_counts([_version_counts(k.version, 10) for k in known])
    ledger.close()
    ledger = ActivityLedger(path, clock_s=Clock(T0 + 30))
    book = VersionBook(Thresholds(min_runs=5), known=known, counts=ledger.version_counts)
    book.count_run("backend", "1.49", "/ws", T0 + 31)
    ledger.remember_version_counts(book.take_counts())
    [written] = _counts_statements(ledger)
    assert [k.version for k in known if re.search(rf"\b{re.escape(k.version)}\b", written)] == [
        "1.49"]
    assert '[["/ws", 11], ["/chat", 2]]' in written
    assert _counts_statements(ledger) == []  # nothing changed since
    ledger.remember_version_counts(book.take_counts() or ledger.version_counts)
    assert _counts_statements(ledger) == []
    ledger.close()
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 60))
    assert [c.version for c in restarted.version_counts] == [k.version for k in known]
    assert dict(restarted.version_counts[-1].runs)["/ws"] == 11


def test_the_counts_of_a_version_no_longer_given_are_deleted_and_the_rows_bounded(tmp_path,
                                                                                 monkeypatch):
    from sidecar.consolidation import verdicts

    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    one, two, three = (_version_counts(v, 5) for v in ("1", "2", "3"))
    ledger.remember_version_counts([one, two, three])
    ledger.flush()
    ledger.remember_version_counts([two, three])  # 1 dropped by the book
    assert [s.split()[0] for s in _counts_statements(ledger)] == ["DELETE"]
    monkeypatch.setattr(verdicts, "MAX_KNOWN_VERSIONS", 2)
    four = _version_counts("4", 1)
    ledger.remember_version_counts([two, three, four])  # the least recently active goes first
    ledger.close()
    with sqlite3.connect(path) as db:
        assert sorted(v for v, in db.execute("SELECT version FROM version_counts")) == ["3", "4"]
        # rows beyond the bound (an earlier process with another bound): the last written kept
        db.execute("INSERT INTO version_counts VALUES ('backend', '5', 100, '[[], [], []]')")
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert [c.version for c in restarted.version_counts] == ["4", "5"]
    restarted.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM version_counts").fetchone() == (2,)


def test_the_version_counts_of_the_release_before_load_and_move_into_rows(tmp_path):
    """A ledger written before the counts were rows holds them in one meta value: they load, are
    moved into rows once (the value deleted), and a later change writes its version's row only."""
    path = str(tmp_path / "ledger.sqlite")
    ActivityLedger(path, clock_s=Clock()).close()
    counts = [_version_counts("1.0", 20), _version_counts("2.0", 7)]
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE IF EXISTS version_counts")  # as the release before made it
        db.execute("PRAGMA user_version = 0")  # (unversioned)
        db.execute("INSERT OR REPLACE INTO consolidation_meta VALUES ('version_counts', ?)",
                   (json.dumps([c.to_json() for c in counts]),))
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.version_counts == counts
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM consolidation_meta WHERE key = 'version_counts'"
                          ).fetchall() == []
        assert [v for v, in db.execute("SELECT version FROM version_counts ORDER BY written")] == [
            "1.0", "2.0"]
    changed = _version_counts("2.0", 8)
    restarted.remember_version_counts([restarted.version_counts[0], changed])
    [written] = _counts_statements(restarted)
    assert "'2.0'" in written and "'1.0'" not in written
    restarted.close()
    assert ActivityLedger(path, clock_s=Clock(T0 + 60)).version_counts == [counts[0], changed]


@pytest.mark.parametrize("row", [
    ("backend", "9", 5, "[1"),
    ("backend", "9", 5, '[[["/ws", -1]], [], []]'),  # a negative count
    ("backend", "9", 5, '[[], [["/ws", "bleed", 1, "r", "i", 1]], []]'),  # a field short
    ("backend", "9", 5, "[[], []]"),
    # an object for a table: KeyError out of the ledger's opening on Python 3.12+ (slices hashable)
    ("backend", "9", 5, '[{"/ws": 1}, [], []]'),
    ("backend", "9", 5, '[[], {"/ws": 1}, []]'),
    ("backend", "9", 5, '[[], [], {"engine": "X"}]'),
    ("backend", "9", 5, "7"),
    (b"backend", "9", 5, "[[], [], []]"),  # a blob (a number would be stored as text)
    ("backend", "9", "five", "[[], [], []]"),
    ("backend", "9", (1 << 63) - 1, "[[], [], []]"),  # a write number the next one would overflow
    ("backend", "9", 5, DEEPLY_NESTED),
])
def test_an_unreadable_version_counts_row_is_deleted_the_others_kept(tmp_path, row, caplog):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    kept = _version_counts("1.0", 20)
    ledger.remember_version_counts([kept])
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO version_counts VALUES (?, ?, ?, ?)", row)
    restarted = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert restarted.moved_aside is None and restarted.version_counts == [kept]
    assert "version_counts has 1 unreadable rows" in caplog.text
    restarted.remember_version_counts([kept, _version_counts("2.0", 1)])
    restarted.close()
    assert [c.version for c in ActivityLedger(path, clock_s=Clock(T0 + 60)).version_counts] == [
        "1.0", "2.0"]


def test_version_counts_a_flush_could_not_write_are_written_by_the_next(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    # a real SQLite failure: the insert is refused (as a full disk would refuse it)
    ledger._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.version_counts "
                       "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    ledger.remember_version_counts([_version_counts("1.0", 3)])
    ledger.flush()
    assert ledger.write_errors == 1
    ledger._db.execute("DROP TRIGGER refuse")
    ledger.close()
    assert ActivityLedger(path, clock_s=Clock(T0 + 30)).version_counts == [_version_counts("1.0", 3)]


def test_a_forward_step_of_the_wall_clock_never_makes_a_class_called_since_deletable():
    """The pipeline's clock catches a step of the wall clock up at 5 %, the ledger's gaps and
    watched time are on the wall clock. After a 6 h step forward, a legacy class called 5 h later
    was stamped with the pipeline's clock (still ~6 h behind): it read idle 6 h already, and part of
    that fell into the gap the step recorded, so it was safe_to_delete 19.2 h after its last call
    with a 24 h window. Its call is stamped on the ledger's clock: deletable a whole window after it,
    not before; its idle time is the real one."""
    from sidecar.config import ConsolidationConfig
    from sidecar.detectors.deploys import DeployDetector
    from sidecar.pipeline import PipelineClock
    from tests.sidecar.detectors.factory import Trace

    hour, window = 3600.0, 24 * 3600.0
    wall, monotonic_s = Clock(), [0.0]
    pipeline_ns = PipelineClock(lambda: int(wall.now_s * 1e9), lambda: int(monotonic_s[0] * 1e9))
    deploys = DeployDetector(config=ConsolidationConfig(safe_to_delete_window_s=window),
                             clock_s=wall, ledger=ActivityLedger(":memory:", clock_s=wall))

    def advance(seconds: float) -> None:  # ticks a minute apart
        for _ in range(int(seconds / 60)):
            wall.now_s += 60
            monotonic_s[0] += 60
            deploys.tick(pipeline_ns())

    def batch(implementation: str, canonical: bool) -> None:
        trace = Trace(start_ns=int(wall.now_s * 1e9))
        deploys.consume([trace.execute(implementation, canonical=canonical)], pipeline_ns())

    def legacy() -> dict:
        return next(row for row in deploys.snapshot()["verdicts"]["implementations"]
                    if row["implementation"] == LEGACY)

    batch(CANONICAL, True)
    batch(LEGACY, False)
    advance(2 * hour)
    wall.now_s += 6 * hour  # NTP steps the wall clock forward
    advance(5 * hour)
    batch(LEGACY, False)
    called_s = wall.now_s
    assert legacy()["idle_s"] == 0.0
    while wall.now_s < called_s + window - 600:
        advance(600)
        batch(CANONICAL, True)  # the role stays busy
        assert legacy()["verdict"] != "safe_to_delete", (wall.now_s - called_s) / hour
        assert legacy()["idle_s"] == pytest.approx(wall.now_s - called_s)
    advance(1200)
    batch(CANONICAL, True)
    assert legacy()["verdict"] == "safe_to_delete"


def test_a_stuck_pipeline_is_no_watched_time_for_the_verdicts_the_api_computes_meanwhile():
    """The API's thread computes verdicts while the pipeline's (which records calls and flushes)
    may be stuck: the time since the last flush counted as watched however long, so three hours
    without a flush (calls queued, none seen) made a class idle for a window less two hours
    safe_to_delete in the API. Longer than a gap since the last flush, that time is not watched;
    the flush that ends it records it as a gap, and a whole window watched after it decides."""
    clock = Clock()
    ledger = ActivityLedger(":memory:", clock_s=clock, max_gap_s=2 * 3600)  # flushed hourly
    call(ledger, LEGACY, T0)
    for at_s in range(int(T0), int(T0 + WINDOW - 2 * 3600), 3600):
        call(ledger, CANONICAL, float(at_s), canonical=True)
        clock.now_s = at_s
        ledger.flush()
    stuck_at_s = clock.now_s
    clock.now_s = T0 + WINDOW + 3600  # no flush for three hours
    row = verdict_of(ledger, LEGACY, clock.now_s)
    assert row["verdict"] == "observing"
    assert row["watched_s"] == stuck_at_s - T0
    ledger.flush()  # the pipeline goes on: the gap is recorded
    assert ledger.gaps == [(stuck_at_s, clock.now_s)]
    assert verdict_of(ledger, LEGACY, clock.now_s)["watched_s"] == stuck_at_s - T0
    watch(ledger, clock, clock.now_s + (clock.now_s - stuck_at_s))
    call(ledger, CANONICAL, clock.now_s, canonical=True)
    assert verdict_of(ledger, LEGACY, clock.now_s)["verdict"] == "safe_to_delete"


def test_a_flush_waits_for_another_process_lock_only_briefly_and_close_waits_longer(tmp_path):
    """/tmp/s26_rev/repro_ledger_lock_stall.py: the ledger's flush runs on the pipeline thread (the
    deploys detector's tick every 5 s, and at once for a class new to it), and another process
    holding the ledger's write lock (a sqlite3 shell in a transaction) held each flush for sqlite3's
    busy timeout, 5 s -- the pipeline stalled, as 5b5f2cd found for the incident store beside it.
    A flush now fails after a moment and is retried by the next; the last, at close, waits longer."""
    import threading
    import time

    from sidecar.incidents.store import WRITE_BUSY_TIMEOUT_MS

    path = str(tmp_path / "ledger.sqlite")
    ledger = ActivityLedger(path, clock_s=Clock())
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    call(ledger, LEGACY, T0)
    started = time.monotonic()
    ledger.flush()
    assert time.monotonic() - started < 1.0  # before: 5 s
    assert ledger.write_errors == 1
    call(ledger, CANONICAL, T0 + 1, canonical=True)
    writing = threading.Event()
    ledger._db.set_trace_callback(lambda sql: writing.set() if sql.startswith("BEGIN") else None)

    def hold_then_let_go():  # the lock is let go a while into the close's write
        writing.wait(10)
        time.sleep(4 * WRITE_BUSY_TIMEOUT_MS / 1000)
        blocker.execute("ROLLBACK")

    holder = threading.Thread(target=hold_then_let_go)
    holder.start()
    try:
        ledger.close()
    finally:
        holder.join(10)
        blocker.close()
    assert writing.is_set() and ledger.write_errors == 1  # the close's write went through
    reopened = ActivityLedger(path, clock_s=Clock(T0 + 30))
    assert {impl for _, impl in reopened.activity} == {LEGACY, CANONICAL}
    reopened.close()


def _gateway_call(ledger: ActivityLedger, service: str, implementation: str, at_s: float,
                  canonical: bool) -> None:
    ledger.observe_calls(ROLE, implementation, canonical=canonical, retired=False,
                         caller=f"{service}.routes.run", count=1, now_s=at_s, service=service)


def test_a_class_only_a_gone_service_named_canonical_is_canonical_no_longer_than_the_window(
        tmp_path):
    """Gateway: a's path map names X canonical, b's names Y and b still calls X. a stops. The
    ledger kept X canonical for as long as b called it (the inventory dropped the label after the
    window): now X is canonical while some service calls it as such within the window, then
    in_use while b calls it (never safe_to_delete), then safe_to_delete a window after b's last
    call — before and after a restart alike."""
    path = str(tmp_path / "ledger.sqlite")
    x, y = CANONICAL, "b.engines.UnifiedExecutionEngine"
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    _gateway_call(ledger, "a", x, T0, canonical=True)
    day = T0
    while day < T0 + 20 * DAY:  # a is gone; b calls its own canonical class and X, every day
        day += DAY
        watch(ledger, clock, day)
        _gateway_call(ledger, "b", y, day, canonical=True)
        _gateway_call(ledger, "b", x, day, canonical=False)
        row = verdict_of(ledger, x, day)
        if day < T0 + WINDOW:
            assert (row["verdict"], row["canonical"]) == ("canonical", True)
        else:
            assert (row["verdict"], row["canonical"]) == ("in_use", False)
    assert verdict_of(ledger, y, day)["verdict"] == "canonical"
    ledger.close()
    clock.now_s += 10
    restarted = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    row = verdict_of(restarted, x, clock.now_s)
    assert (row["verdict"], row["canonical"]) == ("in_use", False)
    assert restarted.canonical_classes(WINDOW, clock.now_s) == {(ROLE, y)}
    # b stops calling X: a whole window later it is deletable
    watch(restarted, clock, day + WINDOW + DAY)
    _gateway_call(restarted, "b", y, clock.now_s, canonical=True)
    assert verdict_of(restarted, x, clock.now_s)["verdict"] == "safe_to_delete"


def test_a_restart_within_the_window_keeps_an_idle_services_canonical_class(tmp_path):
    """The times of the canonical calls are persisted: after a restart, a's class is canonical
    exactly as long as it would have been without it (a window after a's last call as such)."""
    path = str(tmp_path / "ledger.sqlite")
    x, y = CANONICAL, "b.engines.UnifiedExecutionEngine"
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    _gateway_call(ledger, "a", x, T0, canonical=True)
    _gateway_call(ledger, "b", y, T0, canonical=True)
    watch(ledger, clock, T0 + 5 * DAY)
    ledger.close()
    clock.now_s += 10
    restarted = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    _gateway_call(restarted, "b", x, clock.now_s, canonical=False)
    assert restarted.canonical_classes(WINDOW, clock.now_s) == {(ROLE, x), (ROLE, y)}
    assert restarted.canonical_by_service(WINDOW, clock.now_s) == {
        ("a", ROLE): {(ROLE, x)}, ("b", ROLE): {(ROLE, y)}}
    assert restarted.canonical_classes(WINDOW, T0 + WINDOW + 1) == set()


def test_a_service_that_calls_its_canonical_class_without_the_flag_demotes_it(tmp_path):
    """Its path map no longer names the class canonical: demoted once it has not been called as
    such for CONCURRENT_S (a rolling deploy whose pods still call it as canonical keeps it)."""
    from sidecar.consolidation.canonical import CONCURRENT_S

    ledger = ActivityLedger(clock_s=Clock())
    _gateway_call(ledger, "a", CANONICAL, T0, canonical=True)
    _gateway_call(ledger, "a", CANONICAL, T0 + 1, canonical=False)  # the new version's pod
    assert ledger.canonical_classes(WINDOW, T0 + 2) == {(ROLE, CANONICAL)}
    _gateway_call(ledger, "a", CANONICAL, T0 + CONCURRENT_S + 2, canonical=False)
    assert ledger.canonical_classes(WINDOW, T0 + CONCURRENT_S + 2) == set()
    assert verdict_of(ledger, CANONICAL, T0 + CONCURRENT_S + 2)["verdict"] == "in_use"


def _release_before(path: str, statement: str) -> None:
    """A ledger as the release before wrote it: canonical_by_service only, no canonical_calls, no
    schema version."""
    _corrupt(path, "DROP TABLE canonical_calls; PRAGMA user_version = 0; " + statement)


def test_a_ledger_of_the_release_before_keeps_each_services_canonical_for_a_window(tmp_path):
    """canonical_by_service of the release before, without the times: each class stays canonical
    a window after its last call (as that release judged it then), not for good; the map is
    moved into canonical_calls by the next flush."""
    path = str(tmp_path / "ledger.sqlite")
    _release_before(path, f"""
        INSERT INTO implementation_activity VALUES ('{ROLE}', 'X', 1, 0, {T0}, {T0 + 10}, 5, '[]');
        INSERT INTO implementation_activity VALUES ('{ROLE}', 'Y', 1, 0, {T0}, {T0 + 20}, 5, '[]');
        INSERT OR REPLACE INTO consolidation_meta VALUES ('canonical_by_service',
            '[["a", "{ROLE}", "X"], ["b", "{ROLE}", "Y"]]');""")
    clock = Clock(T0 + DAY)
    ledger = ActivityLedger(path, clock_s=clock)
    assert ledger.moved_aside is None
    assert ledger.canonical_classes(WINDOW, clock.now_s) == {(ROLE, "X"), (ROLE, "Y")}
    _gateway_call(ledger, "b", "X", T0 + 2 * DAY, canonical=False)  # b calls a's class
    assert ledger.canonical_classes(WINDOW, T0 + 10 + WINDOW + 1) == {(ROLE, "Y")}
    ledger.close()
    with sqlite3.connect(path) as db:
        assert sorted(db.execute("SELECT service, implementation, canonical_s FROM "
                                 "canonical_calls")) == [("a", "X", T0 + 10), ("b", "Y", T0 + 20)]
        assert json.loads(db.execute("SELECT value FROM consolidation_meta WHERE key = "
                                     "'canonical_by_service'").fetchone()[0]) == [
            ["a", ROLE, "X"], ["b", ROLE, "Y"]]


def test_a_canonical_map_the_release_before_wrote_after_this_one_wins(tmp_path):
    """A downgrade and back: the release before moved a's canonical class (canonical_by_service)
    after this release wrote canonical_calls; the map is the newer and is taken."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    _gateway_call(ledger, "a", "X", T0, canonical=True)
    ledger.observe_calls(ROLE, "Z", canonical=False, retired=False, caller=None, count=1,
                         now_s=T0 + 5, service="a")
    ledger.close()
    with sqlite3.connect(path) as db:  # what the release before writes when a names Z
        db.execute("UPDATE consolidation_meta SET value = ? WHERE key = 'canonical_by_service'",
                   (json.dumps([["a", ROLE, "Z"]]),))
        db.execute("UPDATE implementation_activity SET last_seen_s = ? WHERE implementation = 'Z'",
                   (T0 + 50,))
    clock.now_s = T0 + 60
    reopened = ActivityLedger(path, clock_s=clock)
    assert reopened.canonical_classes(WINDOW, clock.now_s) == {(ROLE, "Z")}
    reopened.close()
    again = ActivityLedger(path, clock_s=clock)
    assert again.canonical_by_service(WINDOW, clock.now_s) == {("a", ROLE): {(ROLE, "Z")}}


def test_an_unreadable_canonical_calls_row_is_deleted_with_a_warning(tmp_path, caplog):
    """Deleted, not the whole ledger moved aside; canonical_by_service still names b's class, so
    it is canonical as the release before's map would make it (a window after its last call)."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    _gateway_call(ledger, "a", "X", T0, canonical=True)
    _gateway_call(ledger, "b", "Y", T0, canonical=True)
    ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE canonical_calls SET canonical_s = 'soon' WHERE service = 'b'")
    reopened = ActivityLedger(path, clock_s=clock)
    assert "canonical_calls has 1 unreadable rows" in caplog.text
    assert reopened.moved_aside is None
    assert reopened.canonical_classes(WINDOW, clock.now_s) == {(ROLE, "X"), (ROLE, "Y")}
    reopened.close()
    with sqlite3.connect(path) as db:
        assert sorted(db.execute("SELECT service, implementation FROM canonical_calls")) == [
            ("a", "X"), ("b", "Y")]


def test_canonical_rows_owed_while_writes_fail_stay_bounded_and_the_table_is_right_after(
        tmp_path, monkeypatch):
    """Services coming and going while every write fails: the pairs forgotten (rows to delete)
    were remembered one by one, without bound; past twice the bound the table is rewritten whole,
    and once writes work it holds the book's rows, no forgotten pair's."""
    import sidecar.consolidation.canonical as canonical_module

    monkeypatch.setattr(canonical_module, "MAX_CANONICAL_KEYS", 3)
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    _gateway_call(ledger, "first", "X", T0, canonical=True)
    ledger.flush()
    ledger._db.execute("CREATE TRIGGER fail BEFORE INSERT ON canonical_calls "
                       "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    for i in range(100):
        _gateway_call(ledger, f"svc-{i}", "X", T0 + 1 + i, canonical=True)
        ledger.flush()
    assert ledger.write_errors > 0
    assert len(ledger.canonical_book._changed) <= 2 * 3
    ledger._db.execute("DROP TRIGGER fail")
    ledger.close()
    with sqlite3.connect(path) as db:
        assert sorted(db.execute("SELECT service FROM canonical_calls")) == [
            ("svc-97",), ("svc-98",), ("svc-99",)]


LEDGER_TABLES = ("implementation_activity", "consolidation_meta", "canonical_calls",
                 "version_order", "version_counts")


def test_a_ledger_a_later_release_added_columns_to_is_read_and_written_as_it_is(tmp_path, caplog):
    """An upgrade and a rollback to this release: the later release added a column (with a
    default) to every table of the ledger. This release loads the same verdicts, versions and
    counts from it (it read ``SELECT *`` into fixed tuples and took the file for unreadable: moved
    aside, a fresh ledger), its flushes succeed (positional inserts failed), and the column keeps
    its values in the rows it writes again (canonical_calls' rows of a changed pair are written
    anew: the default)."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    _gateway_call(ledger, "a", CANONICAL, T0, canonical=True)
    call(ledger, LEGACY, T0 + 1)
    versions = [KnownVersion("backend", "1.0", T0, None, T0 + 2)]
    counts = [VersionCounts("backend", "1.0", (("/ws", 20),), (), ((ROLE, CANONICAL),))]
    ledger.remember_versions(versions)
    ledger.remember_version_counts(counts)
    watch(ledger, clock, T0 + WINDOW + DAY)
    _gateway_call(ledger, "a", CANONICAL, clock.now_s, canonical=True)
    before = ledger.verdicts(WINDOW, clock.now_s)
    assert {r["implementation"]: r["verdict"] for r in before} == {
        CANONICAL: "canonical", LEGACY: "safe_to_delete"}
    ledger.close()
    with sqlite3.connect(path) as db:
        for table in LEDGER_TABLES:
            db.execute(f"ALTER TABLE {table} ADD COLUMN later TEXT NOT NULL DEFAULT 'default'")
            db.execute(f"UPDATE {table} SET later = 'kept'")
    db.close()

    clock.now_s += 10
    rolled_back = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    assert rolled_back.moved_aside is None and "moved aside" not in caplog.text
    assert rolled_back.verdicts(WINDOW, clock.now_s - 10) == before
    assert rolled_back.versions == versions and rolled_back.version_counts == counts
    # every table written: a class called again and a new one, a canonical class moved, a version
    call(rolled_back, LEGACY, clock.now_s)
    call(rolled_back, "demo.engines.New", clock.now_s)
    _gateway_call(rolled_back, "a", "demo.engines.Unified", clock.now_s, canonical=True)
    rolled_back.remember_versions([*versions, KnownVersion("backend", "2.0", clock.now_s, "1.0",
                                                           clock.now_s)])
    rolled_back.remember_version_counts([counts[0], VersionCounts("backend", "2.0", (("/ws", 1),),
                                                                  (), ())])
    rolled_back.flush()
    assert rolled_back.write_errors == 0
    rolled_back.close()
    assert rolled_back.write_errors == 0

    reopened = ActivityLedger(path, clock_s=clock, max_gap_s=7200)
    assert reopened.moved_aside is None
    assert reopened.activity[(ROLE, LEGACY)].total_calls == 2
    assert (ROLE, "demo.engines.New") in reopened.activity
    assert [v.version for v in reopened.versions] == ["1.0", "2.0"]
    assert [c.version for c in reopened.version_counts] == ["1.0", "2.0"]
    assert reopened.canonical_classes(WINDOW, clock.now_s) >= {(ROLE, "demo.engines.Unified")}
    reopened.close()
    with sqlite3.connect(path) as db:
        later = {table: dict(db.execute(f"SELECT later, count(*) FROM {table} GROUP BY later"))
                 for table in LEDGER_TABLES}
    db.close()
    assert later["implementation_activity"] == {"kept": 2, "default": 2}  # LEGACY kept its value
    assert later["version_order"] == later["version_counts"] == {"kept": 1, "default": 1}
    assert set(later["consolidation_meta"]) == {"kept"}  # every value written again kept it
    assert sum(later["canonical_calls"].values()) == 2  # a's two classes


@pytest.mark.parametrize("fails", ["paths", "versions", "batch"])
def test_a_batch_the_detector_failed_on_is_a_span_loss(monkeypatch, fails):
    """The deploys detector met an error on a span (path bookkeeping: ConsumeInterrupted, the rest
    of that span's request is not fed again), after the loop over the spans (what each version
    ran) or before it (nothing of the batch is fed again after either): the calls not yet counted
    never reached the ledger, and a legacy class whose only call in the window was among them read
    safe_to_delete two days after it. The calls are counted before what each version ran; a batch
    failed on before that is a span loss (consume_error): re-confirmed over a whole window after
    it."""
    from sidecar.config import ConsolidationConfig
    from sidecar.detectors.deploys import DeployDetector
    from tests.sidecar.detectors.factory import Trace

    clock = Clock()
    deploys = DeployDetector(config=ConsolidationConfig(safe_to_delete_window_s=WINDOW),
                             clock_s=clock,
                             ledger=ActivityLedger(":memory:", clock_s=clock, max_gap_s=7200))

    def batch(*implementations: str) -> list:
        trace = Trace(start_ns=int(clock.now_s * 1e9))
        return [trace.execute(impl, canonical=impl == CANONICAL) for impl in implementations]

    def legacy() -> dict:
        return next(row for row in deploys.snapshot()["verdicts"]["implementations"]
                    if row["implementation"] == LEGACY)

    deploys.consume(batch(CANONICAL, LEGACY), int(clock.now_s * 1e9))
    watch(deploys.ledger, clock, T0 + 13 * DAY)
    assert deploys.ledger.span_loss is None
    spans = batch(CANONICAL, LEGACY)
    if fails == "paths":
        observe = deploys.paths.observe
        monkeypatch.setattr(deploys.paths, "observe", lambda span: (
            1 / 0 if span is spans[0] else observe(span)))
    elif fails == "versions":
        monkeypatch.setattr(deploys.versions, "see_ran", lambda *args: 1 / 0)
    else:  # before the loop over the spans
        monkeypatch.setattr(deploys.versions, "batch_received", lambda *args: 1 / 0)
    with pytest.raises(Exception):
        deploys.consume(spans, int(clock.now_s * 1e9))
    monkeypatch.undo()
    failed_s = clock.now_s
    if fails == "versions":  # the calls were counted before it failed: no loss
        assert deploys.ledger.span_loss is None
        watch(deploys.ledger, clock, T0 + 15 * DAY)
        assert legacy()["verdict"] == "in_use" and legacy()["last_seen"] == failed_s
        return
    assert deploys.ledger.span_loss == (failed_s, failed_s, "consume_error")
    watch(deploys.ledger, clock, T0 + 15 * DAY)
    deploys.consume(batch(CANONICAL), int(clock.now_s * 1e9))  # the role stays busy
    assert legacy()["verdict"] == "observing"
    watch(deploys.ledger, clock, failed_s + WINDOW)
    deploys.consume(batch(CANONICAL), int(clock.now_s * 1e9))
    assert legacy()["verdict"] == "safe_to_delete"


def test_a_flush_ending_a_freeze_while_the_api_reads_the_gaps_is_no_watched_time():
    """The API's thread computes verdicts while the pipeline's flushes. It copied the gaps, then
    read the last flush: a flush in between — the first after 15 days frozen, which records that
    gap and moves the last flush on — left the 15 days in neither, watched, and a class last called
    before the freeze read safe_to_delete in that answer."""
    clock = Clock()
    ledger = ActivityLedger(":memory:", clock_s=clock, max_gap_s=7200)
    call(ledger, LEGACY, T0)
    call(ledger, CANONICAL, T0, canonical=True)
    watch(ledger, clock, T0 + DAY)
    ledger.flush()
    clock.now_s = T0 + 16 * DAY  # frozen for 15 days; the pipeline's first flush since is under way
    call(ledger, CANONICAL, clock.now_s, canonical=True)

    class FlushedWhileCopied(list):
        def __iter__(self):
            copied = [*super().__iter__()]
            ledger.gaps = list(copied)
            ledger.flush()  # the pipeline's thread runs between the API thread's two reads
            return iter(copied)

    ledger.gaps = FlushedWhileCopied(ledger.gaps)
    row = verdict_of(ledger, LEGACY, clock.now_s)
    assert ledger.gaps == [(T0 + DAY, T0 + 16 * DAY)]
    assert row["verdict"] == "observing" and row["watched_s"] == DAY


def test_a_class_reached_only_through_nested_calls_stays_in_use():
    """An alias delegating: the canonical engine's call runs the retired one inside it (a nested
    call of the same role, no caller). Its only calls are nested spans: they are calls, so it stays
    in_use (never safe_to_delete) while they go on, and is judged a window after the last one."""
    from sidecar.config import ConsolidationConfig
    from sidecar.detectors.deploys import DeployDetector
    from tests.sidecar.detectors.factory import Trace

    clock = Clock()
    deploys = DeployDetector(config=ConsolidationConfig(safe_to_delete_window_s=WINDOW),
                             clock_s=clock,
                             ledger=ActivityLedger(":memory:", clock_s=clock, max_gap_s=7200))

    def run(nested_legacy: bool) -> None:
        trace = Trace(start_ns=int(clock.now_s * 1e9))
        outer = trace.execute(CANONICAL, canonical=True)
        spans = [outer]
        if nested_legacy:
            spans.insert(0, trace.execute(LEGACY, canonical=False, retired=True, nested=True,
                                          caller=None, parent=outer.span_id))
        deploys.consume(spans, int(clock.now_s * 1e9))

    def legacy() -> dict:
        return next(row for row in deploys.snapshot()["verdicts"]["implementations"]
                    if row["implementation"] == LEGACY)

    for day in range(20):
        watch(deploys.ledger, clock, T0 + day * DAY)
        run(nested_legacy=True)
        assert legacy()["verdict"] == "in_use" and legacy()["idle_s"] == 0.0
    last_s = clock.now_s
    assert legacy()["total_calls"] == 20 and legacy()["last_callers"] == []
    watch(deploys.ledger, clock, last_s + WINDOW - 60)
    run(nested_legacy=False)
    assert legacy()["verdict"] == "in_use"
    watch(deploys.ledger, clock, last_s + WINDOW)
    run(nested_legacy=False)
    assert legacy()["verdict"] == "safe_to_delete"


def test_the_window_edges_of_a_verdict():
    """In use until a whole window after its last call; deletable from then on only while another
    class of its role was called within the window (not exactly a window ago) and the sidecar
    watched the whole window (a gap of a second in it delays it by a second)."""
    clock = Clock()
    ledger = ActivityLedger(":memory:", clock_s=clock, max_gap_s=7200)
    call(ledger, LEGACY, T0)
    call(ledger, CANONICAL, T0 + DAY, canonical=True)
    watch(ledger, clock, T0 + DAY + WINDOW)
    ledger.flush()
    assert verdict_of(ledger, LEGACY, T0 + WINDOW - 0.001)["verdict"] == "in_use"
    assert verdict_of(ledger, LEGACY, T0 + WINDOW)["verdict"] == "safe_to_delete"
    assert verdict_of(ledger, LEGACY, T0 + DAY + WINDOW - 0.001)["verdict"] == "safe_to_delete"
    # the role's last call exactly a window ago: nothing of the role within the window
    assert verdict_of(ledger, LEGACY, T0 + DAY + WINDOW)["verdict"] == "observing"
    ledger.gaps.append((T0 + DAY, T0 + DAY + 1))
    assert verdict_of(ledger, LEGACY, T0 + WINDOW)["verdict"] == "observing"
    assert verdict_of(ledger, LEGACY, T0 + WINDOW + 1)["verdict"] == "safe_to_delete"


@pytest.mark.parametrize("how", ["inherited", "super", "other_role"])
def test_a_class_whose_code_a_subclass_runs_is_never_deletable_while_it_does(how):
    """A subclass reports itself as the implementation (docs/conventions.md), so a legacy class
    kept only as the base of another — its method inherited, reached through ``super()`` from an
    override, or inherited by a class listed under another role — had no calls of its own and read
    safe_to_delete a window after its last direct call, while every call of the subclass ran its
    code (deleting it breaks the subclass). A call span whose ``code.function.name`` is a method of
    another class the ledger knows is a call of that class too: in use while that goes on, judged a
    window after the last."""
    from sidecar.config import ConsolidationConfig
    from sidecar.detectors.deploys import DeployDetector
    from tests.sidecar.detectors.factory import Trace

    subclass = "demo.engines.TenantEngine"  # class TenantEngine(Legacy)
    clock = Clock()
    deploys = DeployDetector(config=ConsolidationConfig(safe_to_delete_window_s=WINDOW),
                             clock_s=clock,
                             ledger=ActivityLedger(":memory:", clock_s=clock, max_gap_s=7200))

    def run(direct: bool) -> None:
        trace = Trace(start_ns=int(clock.now_s * 1e9))
        spans = [trace.execute(CANONICAL, canonical=True)]
        if direct:
            spans.append(trace.execute(LEGACY, canonical=False, retired=True))
        elif how == "inherited":  # TenantEngine().execute_agent(), not overridden
            spans.append(trace.execute(subclass, canonical=False,
                                       function=f"{LEGACY}.execute_agent"))
            # a method of an unlisted base (never called as itself): no row of its own
            spans.append(trace.execute(subclass, canonical=False,
                                       function="demo.engines.BaseEngine.execute_pipeline"))
        elif how == "super":  # its override calls super().execute_agent(): a nested call
            outer = trace.execute(subclass, canonical=False)
            spans += [outer, trace.execute(subclass, canonical=False, nested=True, caller=None,
                                           parent=outer.span_id,
                                           function=f"{LEGACY}.execute_agent")]
        else:  # ChatSupervisor(Legacy), listed as a supervisor, runs the engine's method
            spans.append(trace.execute("demo.agents.ChatSupervisor", canonical=False,
                                       role="supervisor", function=f"{LEGACY}.execute_agent"))
        deploys.consume(spans, int(clock.now_s * 1e9))

    def legacy() -> dict:
        return next(row for row in deploys.snapshot()["verdicts"]["implementations"]
                    if row["implementation"] == LEGACY)

    run(direct=True)
    for day in range(1, 20):
        watch(deploys.ledger, clock, T0 + day * DAY)
        run(direct=False)
        assert legacy()["verdict"] == "in_use" and legacy()["idle_s"] == 0.0, day
    last_s = clock.now_s
    assert legacy()["total_calls"] == 20 and legacy()["retired"]
    watch(deploys.ledger, clock, last_s + WINDOW - 60)
    deploys.consume([Trace(start_ns=int(clock.now_s * 1e9)).execute(CANONICAL, canonical=True)],
                    int(clock.now_s * 1e9))
    assert legacy()["verdict"] == "in_use"
    watch(deploys.ledger, clock, last_s + WINDOW)
    deploys.consume([Trace(start_ns=int(clock.now_s * 1e9)).execute(CANONICAL, canonical=True)],
                    int(clock.now_s * 1e9))
    assert legacy()["verdict"] == "safe_to_delete"
    assert "demo.engines.BaseEngine" not in {
        row["implementation"] for row in deploys.snapshot()["verdicts"]["implementations"]}


def test_a_class_a_path_map_moved_to_another_role_is_not_deletable_under_its_old_one():
    """The path map moved a class to another role (a role renamed or split: LEGACY from
    execution_engine to supervisor) while its old role still runs its canonical engine. Its row
    under the old role saw no call since and read safe_to_delete a window later — the API and
    pathwatch_implementation_safe_to_delete{role="execution_engine",implementation=LEGACY} said
    'delete it' while every day's calls of it went on under the new role. A class is one class
    whatever role its calls come under: in use while called under any."""
    clock = Clock()
    ledger = ActivityLedger(":memory:", clock_s=clock, max_gap_s=7200)
    call(ledger, LEGACY, T0)  # under execution_engine, before the path map changed
    seen = []
    for day in range(1, 20):
        watch(ledger, clock, T0 + day * DAY)
        call(ledger, CANONICAL, clock.now_s, canonical=True)
        ledger.observe_calls("supervisor", LEGACY, canonical=False, retired=False,
                             caller="app.routes.run", count=1, now_s=clock.now_s)
        ledger.observe_calls("supervisor", "demo.agents.Supervisor", canonical=True,
                             retired=False, caller="app.routes.run", count=1, now_s=clock.now_s)
        rows = {(r["role"], r["implementation"]): r for r in ledger.verdicts(WINDOW, clock.now_s)}
        seen.append((rows[(ROLE, LEGACY)]["verdict"], rows[("supervisor", LEGACY)]["verdict"]))
    assert seen == [("in_use", "in_use")] * 19  # was safe_to_delete under the old role from day 15
    assert rows[(ROLE, LEGACY)]["idle_s"] == 0.0  # idle under no role
    last_s = clock.now_s
    watch(ledger, clock, last_s + WINDOW)
    call(ledger, CANONICAL, clock.now_s, canonical=True)
    ledger.observe_calls("supervisor", "demo.agents.Supervisor", canonical=True, retired=False,
                         caller="app.routes.run", count=1, now_s=clock.now_s)
    rows = {(r["role"], r["implementation"]): r for r in ledger.verdicts(WINDOW, clock.now_s)}
    assert rows[(ROLE, LEGACY)]["verdict"] == "safe_to_delete"  # a window after its last call
    assert rows[("supervisor", LEGACY)]["verdict"] == "safe_to_delete"
    assert rows[(ROLE, LEGACY)]["last_seen"] == T0 and rows[(ROLE, LEGACY)]["total_calls"] == 1


def test_a_sidecar_vouches_for_the_classes_it_has_no_row_for_only_after_a_whole_window():
    """Gateway replicas, each its own ledger: across pods ``min by`` hears only the sidecars that
    have a series for a class. A replica that never saw LEGACY but lost spans (a backend's dropped
    spans, a process killed: LEGACY's call may be among them), started fresh, or refused a class
    beyond its bound had no say, and LEGACY read safe_to_delete across pods on the word of the
    replica that saw its last call long ago. pathwatch_ledger_window_watched says whether a
    sidecar's silence about a class is evidence: 1 only once it watched a whole window since it
    started, since its latest loss and since it last refused a class."""
    from sidecar.config import ConsolidationConfig
    from sidecar.detectors.deploys import DeployDetector
    from prometheus_client import CollectorRegistry

    from sidecar.telemetry import Telemetry

    clock = Clock()
    registry = CollectorRegistry()
    ledger = ActivityLedger(":memory:", clock_s=clock, max_gap_s=7200, max_implementations=2)
    deploys = DeployDetector(config=ConsolidationConfig(safe_to_delete_window_s=WINDOW),
                             clock_s=clock, ledger=ledger, telemetry=Telemetry(registry))

    def vouches() -> float | None:
        deploys.flush()
        return registry.get_sample_value("pathwatch_ledger_window_watched")

    call(ledger, CANONICAL, T0, canonical=True)
    assert vouches() == 0.0  # fresh: it knows nothing of the window before its start
    watch(ledger, clock, T0 + WINDOW - 1)
    assert vouches() == 0.0
    watch(ledger, clock, T0 + WINDOW)
    assert vouches() == 1.0
    deploys.tick(int(clock.now_s * 1e9))  # the pipeline's now, as it reports the loss
    deploys.spans_lost(clock.now_s - 30, clock.now_s, "spans_dropped")  # a backend dropped spans
    lost_s = clock.now_s
    assert vouches() == 0.0
    watch(ledger, clock, lost_s + WINDOW)
    assert vouches() == 1.0
    call(ledger, "demo.engines.Other", clock.now_s)
    call(ledger, "demo.engines.Third", clock.now_s)  # beyond its 2 classes: refused, no row
    assert ledger.refused == 1 and vouches() == 0.0
    watch(ledger, clock, clock.now_s + WINDOW)
    assert vouches() == 1.0


def test_the_defining_classes_of_method_names_are_remembered_within_a_bound(monkeypatch):
    """The class defining each call's method (``code.function.name``) is worked out once per name
    and remembered, at most ``MAX_FUNCTION_NAMES`` names: a backend generating method names (one a
    tenant) must not grow the detector; a name forgotten is worked out again, the same."""
    from sidecar.detectors import deploys as deploys_module
    from sidecar.detectors.deploys import DeployDetector
    from tests.sidecar.detectors.factory import Trace

    monkeypatch.setattr(deploys_module, "MAX_FUNCTION_NAMES", 8)
    clock = Clock()
    deploys = DeployDetector(clock_s=clock, ledger=ActivityLedger(":memory:", clock_s=clock))
    trace = Trace(start_ns=int(clock.now_s * 1e9))
    spans = [trace.execute("demo.engines.TenantEngine", function=f"demo.engines.Base{n}.execute_agent")
             for n in range(20)]
    deploys.consume(spans, int(clock.now_s * 1e9))
    assert 0 < len(deploys._defining_of) <= 8
    deploys.consume(spans[:1], int(clock.now_s * 1e9))  # worked out again after it was forgotten
    assert deploys._defining_of["demo.engines.Base0.execute_agent"] == "demo.engines.Base0"


def test_the_ledger_says_the_dropped_total_it_holds_of_a_process_across_a_restart(tmp_path):
    """The pipeline's heartbeat tracker counts a process it first hears late from the total the
    ledger holds of it (the last sidecar's, or one seen since): per process, None for one it never
    held or one not told apart (no start of counts)."""
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock()
    ledger = ActivityLedger(path, clock_s=clock)
    since_s = T0 - 3600
    ledger.observe_dropped_total("backend", "pod-a", 7, T0 + 1, 40, since_s)
    ledger.observe_dropped_total("backend", "pod-a", 3, T0 + 1, 2, since_s + 100)  # a sibling
    ledger.observe_dropped_total("backend", "pod-old", 5, T0 + 1)
    ledger.close()
    clock.now_s = T0 + 30
    restarted = ActivityLedger(path, clock_s=clock)
    assert restarted.dropped_total("backend", "pod-a", since_s) == 7
    assert restarted.dropped_total("backend", "pod-a", since_s + 100) == 3
    assert restarted.dropped_total("backend", "pod-a", since_s + 200) is None
    assert restarted.dropped_total("backend", "pod-old", None) is None
    restarted.observe_dropped_total("backend", "pod-a", 9, T0 + 40, 43, since_s)
    assert restarted.dropped_total("backend", "pod-a", since_s) == 9
    restarted.close()
