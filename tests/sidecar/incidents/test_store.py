import logging
import sqlite3
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from sidecar import rules
from sidecar.config import IncidentsConfig
from sidecar.incidents import (SCHEMA_VERSION, IncidentQuery, IncidentStore, IncidentStoreError,
                               SchemaError, StoreClosed)
from sidecar.incidents import incident_to_dict, schema
from sidecar.incidents import store as store_module
from sidecar.incidents.schema import COLUMNS
from sidecar.incidents.store import MAX_WRITE_RETRY_S, WRITE_RETRY_S
from sidecar.model import Severity
from sidecar.telemetry import Telemetry
from tests.sidecar.incidents.findings import BASE_NS, bleed, duplicate
from tests.sidecar.test_api import client as api_client
from tests.support import wait_until


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "incidents.sqlite")


@pytest.fixture
def telemetry():
    return Telemetry(CollectorRegistry())


def _sample(telemetry, name, **labels):
    return telemetry.registry.get_sample_value(name, labels)


def test_findings_with_one_fingerprint_make_one_incident():
    store = IncidentStore(":memory:")
    touched = store.record([bleed("t1", at_s=1), bleed("t2", at_s=2), duplicate("d1")])
    assert [(i.rule, new) for i, new in touched] == [
        (rules.BLEED_OWNER_VS_AMBIENT, True), (rules.DUPLICATE_EXECUTION, True)]
    incident = store.get(bleed().fingerprint)
    assert incident.count == 2 and incident.sample_trace_ids == ["t1", "t2"]
    assert len(store) == 2


def test_is_new_only_the_first_time():
    store = IncidentStore(":memory:")
    assert store.record([bleed("t1")])[0][1] is True
    second = store.record([bleed("t2")])
    assert second[0][1] is False and second[0][0].count == 2


def test_other_entry_point_or_implementation_is_another_incident():
    store = IncidentStore(":memory:")
    store.record([bleed(entry_point="/ws"), bleed(entry_point="/api/runs"),
                  bleed(implementation="demo.engines.ExecutionEngine")])
    assert len(store) == 3


def test_samples_stay_bounded():
    store = IncidentStore(":memory:", sample_trace_ids=4)
    store.record([bleed(f"t{n}") for n in range(50)])
    incident = store.get(bleed().fingerprint)
    assert incident.count == 50
    assert incident.sample_trace_ids == ["t0", "t1", "t48", "t49"]


def test_returned_incidents_are_snapshots():
    store = IncidentStore(":memory:")
    (snapshot, _), = store.record([bleed("t1")])
    store.record([bleed("t2")])
    assert snapshot.count == 1 and snapshot.sample_trace_ids == ["t1"]
    assert store.get(snapshot.id).count == 2


def test_incidents_survive_a_restart(db_path):
    store = IncidentStore(db_path, sample_trace_ids=3)
    store.record([bleed("t1", at_s=1), bleed("t2", at_s=4), duplicate("d1", at_s=2)])
    store.close()

    reopened = IncidentStore(db_path, sample_trace_ids=3)
    incident = reopened.get(bleed().fingerprint)
    assert (incident.count, incident.sample_trace_ids) == (2, ["t1", "t2"])
    assert incident.first_seen_ns == BASE_NS + 1_000_000_000
    assert incident.last_seen_ns == BASE_NS + 4_000_000_000
    assert incident.severity is Severity.CRITICAL
    (again, is_new), = reopened.record([bleed("t3", at_s=5)])
    assert is_new is False and again.count == 3
    reopened.close()


def test_alerted_flag_survives_a_restart(db_path):
    store = IncidentStore(db_path)
    (incident, _), = store.record([bleed("t1")])
    assert store.is_alerted(incident.id) is False
    assert store.mark_alerted(incident.id) is True
    store.close()

    reopened = IncidentStore(db_path)
    assert reopened.is_alerted(incident.id) is True
    (after, is_new), = reopened.record([bleed("t2")])
    assert after.alerted is True and is_new is False
    reopened.close()


def test_pages_are_remembered_per_sink_across_a_restart(db_path):
    store = IncidentStore(db_path)
    (incident, _), = store.record([bleed("t1")])
    assert store.mark_alerted(incident.id, "alertmanager") is True
    store.close()

    reopened = IncidentStore(db_path)
    assert reopened.is_alerted(incident.id, "alertmanager") is True
    assert reopened.is_alerted(incident.id, "webhook") is False  # it still gets its page
    assert reopened.is_alerted(incident.id) is True  # paged to some sink (the API's "alerted")
    assert reopened.get(incident.id).alerted_sinks == ("alertmanager",)
    reopened.close()


def test_a_schema_1_database_is_upgraded_and_its_alerted_incidents_stay_paged(db_path):
    """Before pages were kept per sink, ``alerted`` meant "some sink has it": such an incident
    counts as paged to every sink, so the upgrade pages nothing twice."""
    conn = sqlite3.connect(db_path)
    conn.executescript(schema._V1 + "PRAGMA user_version = 1;")
    for incident_id, alerted in (("a" * 16, 1), ("b" * 16, 0)):
        conn.execute("INSERT INTO incidents (id, rule, severity, summary, count, first_seen_ns, "
                     "last_seen_ns, sample_trace_ids, alerted) VALUES (?, ?, 'critical', 's', 1, 1, 1, "
                     "'[]', ?)", (incident_id, rules.BLEED_OWNER_VS_AMBIENT, alerted))
    conn.commit()
    conn.close()
    store = IncidentStore(db_path)
    assert store.is_alerted("a" * 16, "webhook") and store.is_alerted("a" * 16, "alertmanager")
    assert not store.is_alerted("b" * 16, "webhook") and not store.is_alerted("b" * 16)
    assert store.get("a" * 16).services == []  # the column added too
    store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    conn.close()


def test_the_services_of_an_incident_are_persisted_and_listed(db_path):
    store = IncidentStore(db_path)
    store.record([bleed("t1", service="checkout"), bleed("t2", service="billing")])
    (copy, _), = store.record([bleed("t3", service="checkout")])
    assert copy.services == ["billing", "checkout"]
    copy.services.append("not-the-store's")  # a snapshot: the cached incident does not change
    store.close()
    reopened = IncidentStore(db_path)
    assert reopened.get(bleed().fingerprint).services == ["billing", "checkout"]
    (listed,) = reopened.list_incidents()  # read from the database
    assert incident_to_dict(listed)["services"] == ["billing", "checkout"]
    reopened.close()


def test_a_schema_2_database_gets_the_services_column_and_keeps_its_version(db_path):
    """The column is an addition the previous release (schema 2) can ignore: the store stays at 2, so
    that release still opens it after a rollback (test_previous_release.py runs it)."""
    conn = sqlite3.connect(db_path)
    conn.executescript(schema._V1 + schema._V2 + "PRAGMA user_version = 2;")
    conn.execute("INSERT INTO incidents (id, rule, severity, role, implementation, entry_point, "
                 "summary, count, first_seen_ns, last_seen_ns, sample_trace_ids, alerted, "
                 "alerted_sinks) VALUES (?, ?, 'critical', 'execution_engine', "
                 "'demo.engines.UserExecutionEngine', '/ws', 's', 1, 1, 1, '[\"t0\"]', 1, "
                 "'alertmanager')", (bleed().fingerprint, rules.BLEED_OWNER_VS_AMBIENT))
    conn.commit()
    conn.close()
    store = IncidentStore(db_path)
    old = store.get(bleed().fingerprint)
    assert old.services == [] and old.alerted_sinks == ("alertmanager",)
    (after, is_new), = store.record([bleed("t1", service="checkout")])
    assert not is_new and after.services == ["checkout"] and after.count == 2
    store.close()
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 2
    assert conn.execute("SELECT services FROM incidents").fetchall() == [('["checkout"]',)]
    conn.close()


def test_a_closed_store_changes_nothing_and_counts_no_write_error(db_path, telemetry):
    """At shutdown an alert push can outlive the store (a sink slower than the grace period), and the
    API answers until last: neither may count a write error or claim a change it did not keep."""
    store = IncidentStore(db_path, telemetry=telemetry)
    (incident, _), = store.record([bleed("t1")])
    store.close()
    assert store.mark_alerted(incident.id) is False  # not remembered: the next start pages again
    with pytest.raises(StoreClosed):
        store.set_status(incident.id, "resolved")
    assert store.write_errors == 0
    assert _sample(telemetry, "pathwatch_incident_store_errors_total") == 0
    reopened = IncidentStore(db_path)
    assert reopened.is_alerted(incident.id) is False and reopened.get(incident.id).status == "open"
    reopened.close()


def test_mark_alerted_of_an_unknown_incident_is_false():
    assert IncidentStore(":memory:").mark_alerted("0123456789abcdef") is False


def test_each_record_is_one_transaction(db_path):
    store = IncidentStore(db_path)
    statements: list[str] = []
    store._writer.set_trace_callback(statements.append)
    store.record([bleed(f"t{n}") for n in range(100)] + [duplicate(f"d{n}") for n in range(100)])
    assert [s for s in statements if s in ("BEGIN", "COMMIT")] == ["BEGIN", "COMMIT"]
    assert not [s for s in statements if s.startswith("SELECT")]
    store.close()


def test_list_filters(db_path):
    store = IncidentStore(db_path)
    store.record([bleed("t1", at_s=10), duplicate("d1", at_s=20),
                  bleed("t2", at_s=30, rule=rules.BLEED_SUBJECT_VS_AMBIENT)])
    store.set_status(duplicate().fingerprint, "resolved")

    def rules_of(**filters):
        return [i.rule for i in store.list_incidents(IncidentQuery(**filters))]

    assert rules_of() == [rules.BLEED_SUBJECT_VS_AMBIENT, rules.DUPLICATE_EXECUTION,
                          rules.BLEED_OWNER_VS_AMBIENT]  # most recent first
    assert rules_of(rule=rules.BLEED_OWNER_VS_AMBIENT) == [rules.BLEED_OWNER_VS_AMBIENT]
    assert rules_of(severity=Severity.WARNING) == [rules.DUPLICATE_EXECUTION]
    assert rules_of(status="open") == [rules.BLEED_SUBJECT_VS_AMBIENT, rules.BLEED_OWNER_VS_AMBIENT]
    assert rules_of(status="resolved") == [rules.DUPLICATE_EXECUTION]
    assert rules_of(since_ns=BASE_NS + 20_000_000_000) == [rules.BLEED_SUBJECT_VS_AMBIENT,
                                                          rules.DUPLICATE_EXECUTION]
    assert rules_of(limit=1) == [rules.BLEED_SUBJECT_VS_AMBIENT]
    assert rules_of(rule="bleed.nothing") == []
    store.close()


def _pages(store, **filters):
    pages, before = [], None
    while True:
        page = store.list_incidents(IncidentQuery(limit=2, before=before, **filters))
        if not page:
            return pages
        pages.append([i.implementation for i in page])
        before = (page[-1].last_seen_ns, page[-1].id)


def test_list_pages_follow_a_cursor_in_the_database_and_in_memory(db_path):
    store = IncidentStore(db_path)
    # ties in last_seen are ordered by id: a page boundary may fall between them
    store.record([bleed(implementation=f"e{n}", at_s=n // 2) for n in range(7)])
    everything = [i.implementation for i in store.list_incidents(IncidentQuery())]
    pages = _pages(store)
    assert [len(page) for page in pages] == [2, 2, 2, 1]
    assert sum(pages, []) == everything and len(set(everything)) == 7
    assert sum(_pages(store, since_ns=BASE_NS + 1_000_000_000), []) == everything[:5]
    store.close()  # from now on listed from memory: the same pages
    assert _pages(store) == pages


def test_a_new_finding_reopens_a_resolved_incident():
    store = IncidentStore(":memory:")
    store.record([bleed("t1")])
    store.set_status(bleed().fingerprint, "resolved")
    store.record([bleed("t2")])
    assert store.get(bleed().fingerprint).status == "open"


def test_capacity_refuses_new_fingerprints_visibly(telemetry, caplog):
    store = IncidentStore(":memory:", max_incidents=2, telemetry=telemetry)
    with caplog.at_level(logging.ERROR, logger="sidecar.incidents.store"):
        touched = store.record([bleed(entry_point=f"/e{n}") for n in range(5)])
        store.record([bleed(entry_point="/e9")])
    assert len(touched) == 2 and len(store) == 2
    assert store.refused == 4
    assert _sample(telemetry, "pathwatch_incidents_refused_total") == 4
    assert len([r for r in caplog.records if "incident store full" in r.message]) == 1
    # known fingerprints are still counted
    (known, is_new), = store.record([bleed(entry_point="/e0")])
    assert known.count == 2 and is_new is False
    assert _sample(telemetry, "pathwatch_state_entries", table="incidents") == 2
    assert _sample(telemetry, "pathwatch_state_capacity", table="incidents") == 2


def _warning(entry_point: str, at_s: float):
    finding = duplicate(at_s=at_s)
    finding.entry_point = entry_point
    return finding


def test_a_full_store_evicts_the_least_recently_seen_lower_severity_incident_for_a_leak(
        db_path, telemetry, caplog):
    store = IncidentStore(db_path, max_incidents=3, telemetry=telemetry)
    store.record([_warning("/w1", at_s=1), _warning("/w2", at_s=2), _warning("/w3", at_s=3)])
    store.record([_warning("/w1", at_s=4)])  # seen again: now the most recent warning
    with caplog.at_level(logging.WARNING, logger="sidecar.incidents.store"):
        (leak, is_new), = store.record([bleed("t9", at_s=5)])
        store.record([bleed("t10", at_s=6, entry_point="/other")])
    assert is_new and leak.rule == rules.BLEED_OWNER_VS_AMBIENT
    kept = {i.entry_point for i in store.list_incidents()}
    assert kept == {"/w1", "/ws", "/other"}  # /w2 then /w3 went: the least recently seen first
    assert store.refused == 0 and store.evicted == {"lower_severity": 2}
    assert _sample(telemetry, "pathwatch_incidents_evicted_total", reason="lower_severity") == 2
    assert _sample(telemetry, "pathwatch_incidents_open",
                   rule=rules.DUPLICATE_EXECUTION, severity="warning") == 1
    assert len([r for r in caplog.records if "incident store full" in r.message]) == 1
    store.close()
    reopened = IncidentStore(db_path, max_incidents=3)  # the evicted rows are gone from disk too
    assert {i.entry_point for i in reopened.list_incidents()} == kept
    reopened.close()


def test_a_full_store_evicts_resolved_incidents_first_and_refuses_when_none_may_go(telemetry):
    store = IncidentStore(":memory:", max_incidents=2, telemetry=telemetry)
    store.record([bleed("t1", at_s=1), _warning("/w1", at_s=2)])
    store.record([bleed("t2", at_s=3, entry_point="/b2")])  # evicts the open warning
    store.set_status(bleed().fingerprint, "resolved")  # after the eviction order was first made
    (newer, _), = store.record([bleed("t3", at_s=4, entry_point="/b3")])
    assert {i.entry_point for i in store.list_incidents()} == {"/b2", "/b3"}
    assert store.evicted == {"lower_severity": 1, "resolved": 1}
    # every incident left is open and critical: a warning, or another leak, is refused
    assert store.record([_warning("/w2", at_s=5)]) == []
    assert store.record([bleed("t4", at_s=6, entry_point="/b4")]) == []
    assert store.refused == 2 and len(store) == 2
    # a fingerprint evicted and seen again is a new incident
    store.set_status(newer.id, "resolved")
    (again, is_new), = store.record([bleed("t5", at_s=7)])
    assert is_new and again.count == 1 and again.id == bleed().fingerprint


def test_open_incidents_gauge(telemetry):
    store = IncidentStore(":memory:", telemetry=telemetry)
    store.record([bleed("t1"), bleed("t2", entry_point="/other"), duplicate("d1")])
    gauge = {"rule": rules.BLEED_OWNER_VS_AMBIENT, "severity": "critical"}
    assert _sample(telemetry, "pathwatch_incidents_open", **gauge) == 2
    store.set_status(bleed().fingerprint, "resolved")
    assert _sample(telemetry, "pathwatch_incidents_open", **gauge) == 1


def test_schema_is_versioned(db_path):
    IncidentStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused_with_the_path(db_path):
    newer = max(SCHEMA_VERSION, *schema._RETIRED) + 1  # a breaking change of a later release
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(SchemaError, match=f"incidents.sqlite.*schema version {newer}, newer than "
                                          f"this pathwatch \\({SCHEMA_VERSION}\\)"):
        IncidentStore(db_path)
    with sqlite3.connect(db_path) as conn:  # refused untouched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
    conn.close()


def test_a_store_recorded_as_schema_3_by_an_earlier_build_is_schema_2_again(db_path):
    """dd42dc7 recorded its services column as schema 3, which the previous release refuses: such a
    store is used as it is and recorded as 2 again, so that a rollback after this release works."""
    conn = sqlite3.connect(db_path)
    conn.executescript(schema._V1 + schema._V2 + "ALTER TABLE incidents ADD COLUMN services TEXT "
                       "NOT NULL DEFAULT '[]'; PRAGMA user_version = 3;")
    conn.close()
    store = IncidentStore(db_path)
    store.record([bleed("t1", service="checkout")])
    store.close()
    reopened = IncidentStore(db_path)
    assert reopened.get(bleed().fingerprint).services == ["checkout"]
    reopened.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


def test_a_column_added_by_a_later_release_is_left_as_it_is(db_path):
    """The other side of additive changes: this release opens, reads and writes a store to which a
    later one added a column (it names its columns), and the column keeps its values."""
    IncidentStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("ALTER TABLE incidents ADD COLUMN later TEXT NOT NULL DEFAULT 'default'")
        conn.execute("INSERT INTO incidents (id, rule, severity, summary, count, first_seen_ns, "
                     "last_seen_ns, sample_trace_ids, later) VALUES (?, ?, 'critical', 's', 1, 1, 1, "
                     "'[]', 'kept')", (bleed().fingerprint, rules.BLEED_OWNER_VS_AMBIENT))
    conn.close()
    store = IncidentStore(db_path)
    (incident, is_new), = store.record([bleed("t1", service="checkout")])
    assert not is_new and incident.count == 2
    store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT later, count, services FROM incidents").fetchall() == [
            ("kept", 2, '["checkout"]')]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def _previous_release_store(db_path, version):
    """A store as an older release left it (schema 1, or 2 without the services column), one
    incident in it."""
    conn = sqlite3.connect(db_path)
    scripts = schema._V1 + (schema._V2 if version == 2 else "")
    conn.executescript(f"{scripts} PRAGMA user_version = {version};")
    conn.execute("INSERT INTO incidents (id, rule, severity, summary, count, first_seen_ns, "
                 "last_seen_ns, sample_trace_ids) VALUES (?, ?, 'critical', 's', 1, 1, 1, '[]')",
                 (bleed().fingerprint, rules.BLEED_OWNER_VS_AMBIENT))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("store, held_at", [(None, "CREATE TABLE incidents"), (1, "ALTER TABLE"),
                                            (2, "ALTER TABLE")])
def test_two_openers_migrating_one_store_at_once_both_open_it(db_path, monkeypatch, store,
                                                              held_at):
    """Reproducer /tmp/s21/recv/repro_schema_race.py: two processes opening one store at once (the
    state lock, taken by the app and not by the store, keeps them apart only where flock works)
    both found the table or the services column missing and both created or added it: the second
    failed ("table incidents already exists", "duplicate column name: services"), and its sidecar
    did not start. Opener A is held just before its CREATE TABLE / ALTER TABLE (a trace callback on
    its connection: the only way to stop SQLite between its check and its change), opener B opens
    meanwhile (two connections in two threads take SQLite's locks as two processes do), then A
    goes on: both open the store, at the current version with every column, its incident kept."""
    if store is not None:
        _previous_release_store(db_path, store)
    real_connect = store_module._connect
    a_held, release = threading.Event(), threading.Event()
    b_at_write_lock, b_done = threading.Event(), threading.Event()
    opened = {}

    def connect(path, wal):
        conn = real_connect(path, wal)
        opener = threading.current_thread().name

        def trace(statement: str) -> None:
            if opener == "A" and statement.lstrip().startswith(held_at):
                a_held.set()
                release.wait(10)
            elif opener == "B" and statement.lstrip().startswith("BEGIN IMMEDIATE"):
                b_at_write_lock.set()
        conn.set_trace_callback(trace)
        return conn

    def open_store() -> None:
        opener = threading.current_thread().name
        try:
            IncidentStore(db_path).close()
            opened[opener] = "opened"
        except Exception as exc:
            opened[opener] = str(exc)
        finally:
            (a_held if opener == "A" else b_done).set()

    monkeypatch.setattr(store_module, "_connect", connect)
    first = threading.Thread(target=open_store, name="A")
    first.start()
    assert a_held.wait(10)
    second = threading.Thread(target=open_store, name="B")
    second.start()
    # B has opened the store past A (nothing held it) or waits for A's write transaction
    wait_until(lambda: b_done.is_set() or b_at_write_lock.is_set(), message="opener B")
    release.set()
    first.join(10)
    second.join(10)
    assert opened == {"A": "opened", "B": "opened"}
    with sqlite3.connect(db_path) as conn:
        assert tuple(row[1] for row in conn.execute("PRAGMA table_info(incidents)")) == COLUMNS
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM incidents").fetchone()[0] == (store is not None)
    conn.close()


def test_opening_an_up_to_date_store_takes_no_write_lock(db_path):
    """The migration's write transaction is taken only when there is something to do: another
    connection's write transaction does not hold the open up."""
    IncidentStore(db_path).close()
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        IncidentStore(db_path).close()
    finally:
        other.rollback()
        other.close()


def test_a_migration_kept_from_the_write_lock_past_the_busy_timeout_says_so_not_to_move_the_file(
        db_path, monkeypatch):
    """Reproducer /tmp/s21/review/repro_migrate_locked.py: a store to upgrade while another process
    holds its write lock past busy_timeout was refused with "if the file is not pathwatch's, point
    incidents.path at another file": followed, that drops the store's incidents and the pages it
    remembers. The message names the lock; the store is unchanged and opens once it is free."""
    _previous_release_store(db_path, 1)
    real_connect = store_module._connect

    def connect(path, wal):  # the real connection, with a short busy timeout (not 5 s per test)
        conn = real_connect(path, wal)
        conn.execute("PRAGMA busy_timeout = 200")
        return conn

    monkeypatch.setattr(store_module, "_connect", connect)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("PRAGMA journal_mode = WAL")  # as the release that wrote it left it
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(SchemaError, match=r"cannot upgrade \(from schema version 1\) the incident "
                                              r"tables: another process held the database's write lock "
                                              r"for more than 0\.2 s") as raised:
            IncidentStore(db_path)
    finally:
        other.rollback()
        other.close()
    assert "another file" not in str(raised.value)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1  # unchanged
    conn.close()
    store = IncidentStore(db_path)
    assert [i.id for i in store.list_incidents()] == [bleed().fingerprint]
    store.close()


def test_an_unopenable_path_names_it(tmp_path):
    with pytest.raises(IncidentStoreError, match=r"^incidents.path '.*no-such-dir/x.sqlite': its "
                                                 r"directory '.*no-such-dir' does not exist"):
        IncidentStore(str(tmp_path / "no-such-dir" / "x.sqlite"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(IncidentStoreError, match=r"^incidents.path '.*a-file/x.sqlite': its "
                                                 r"directory '.*a-file' is not a directory"):
        IncidentStore(str(tmp_path / "a-file" / "x.sqlite"))


def test_a_directory_as_the_path_is_refused_naming_a_file_to_give_instead(tmp_path):
    with pytest.raises(IncidentStoreError, match=r"^incidents.path '.*': is a directory; name a "
                                                 r"file in it, e.g. '.*/incidents.sqlite'$"):
        IncidentStore(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _damaged(db_path):
    store = IncidentStore(db_path)
    store.record([bleed(implementation=f"demo.engines.E{n}") for n in range(200)])
    store.close()
    with open(db_path, "r+b") as db:  # the table's pages overwritten, the header intact
        db.seek(4096 * 3)
        db.write(b"\xff" * 4096 * 3)


def _damaged_index(db_path):
    """A torn write in an index page: the table itself reads fine, a query using the index fails."""
    store = IncidentStore(db_path)
    store.record([bleed(implementation=f"demo.engines.E{n}") for n in range(2000)])
    store.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'incidents_last_seen'").fetchone()
        assert conn.execute("SELECT count(*) FROM incidents NOT INDEXED").fetchone() == (2000,)
    conn.close()
    with open(db_path, "r+b") as db:
        db.seek((root - 1) * page_size)
        db.write(b"\x07" * page_size)


def _foreign(db_path):
    with sqlite3.connect(db_path) as conn:  # another application's, at pathwatch's schema version
        conn.execute("CREATE TABLE t (x)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _garbage(db_path):
    with open(db_path, "wb") as db:
        db.write(b"hello" * 1000)


@pytest.mark.parametrize("spoil", [_damaged, _damaged_index, _foreign, _garbage])
def test_a_damaged_or_foreign_database_names_the_path_and_what_to_do(db_path, spoil):
    spoil(db_path)
    with pytest.raises(IncidentStoreError) as raised:
        IncidentStore(db_path)
    message = str(raised.value)
    assert message.startswith(f"incidents.path {db_path!r}: ")
    assert "move it (with its -wal and -shm files) aside" in message


def test_a_database_damaged_after_open_is_listed_from_memory_counted_and_logged_once(
        db_path, telemetry, monkeypatch, caplog):
    """The check at open passed (the disk went bad since): a read that fails answers from memory,
    which holds every incident — never a 500 with a traceback per request."""
    _damaged_index(db_path)
    monkeypatch.setattr(store_module, "_check_integrity", lambda conn: None)  # damaged after it
    store = IncidentStore(db_path, telemetry=telemetry)
    api = api_client(store, telemetry)
    with caplog.at_level(logging.ERROR, logger="sidecar.incidents.store"):
        answers = [api.get("/api/v1/incidents", params={"limit": 5}) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert {len(answer.json()["incidents"]) for answer in answers} == {5}
    assert answers[0].json()["incidents"] == [incident_to_dict(i) for i in
                                              store._list_from_memory(IncidentQuery(limit=5))]
    assert store.read_errors == 3
    assert _sample(telemetry, "pathwatch_incident_store_errors_total") == 3
    (error,) = caplog.records
    assert error.exc_info is None and f"incidents.path {db_path!r}" in error.getMessage()
    assert "malformed" in error.getMessage() and "move it" in error.getMessage()
    store.close()


def test_a_failed_write_is_kept_and_retried(db_path, telemetry):
    store = IncidentStore(db_path, telemetry=telemetry)
    blocker = sqlite3.connect(db_path, timeout=0)
    store._writer.execute("PRAGMA busy_timeout = 0")
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: our write fails
    store.record([bleed("t1")])
    assert store.write_errors == 1
    assert _sample(telemetry, "pathwatch_incident_store_errors_total") == 1
    blocker.rollback()
    blocker.close()
    # meanwhile the list agrees with get: from memory while writes fail
    assert [i.rule for i in store.list_incidents()] == [rules.BLEED_OWNER_VS_AMBIENT]
    assert store.list_incidents(IncidentQuery(status="resolved")) == []
    store.record([duplicate("d1")])  # the next write carries the pending one
    store.close()
    reopened = IncidentStore(db_path)
    assert {i.rule for i in reopened.list_incidents()} == {rules.BLEED_OWNER_VS_AMBIENT,
                                                           rules.DUPLICATE_EXECUTION}
    reopened.close()


def test_after_a_failed_write_the_next_ones_wait_instead_of_failing_every_batch(db_path):
    """A full disk: every batch rewriting every pending incident would stall the pipeline thread."""
    now = [100.0]
    store = IncidentStore(db_path, clock=lambda: now[0])
    blocker = sqlite3.connect(db_path, timeout=0)
    store._writer.execute("PRAGMA busy_timeout = 0")
    blocker.execute("BEGIN IMMEDIATE")
    store.record([bleed("t1")])
    assert store.write_errors == 1
    statements: list[str] = []
    store._writer.set_trace_callback(statements.append)
    for n in range(50):  # within WRITE_RETRY_S: no write is tried
        store.record([duplicate(f"d{n}")])
    assert "BEGIN" not in statements and store.write_errors == 1
    now[0] += WRITE_RETRY_S
    store.record([duplicate("d50")])  # tried, fails again: the wait doubles
    assert store.write_errors == 2
    now[0] += WRITE_RETRY_S
    store.record([duplicate("d51")])
    assert store.write_errors == 2
    blocker.rollback()
    blocker.close()
    now[0] += WRITE_RETRY_S
    store.record([duplicate("d52")])  # goes through with everything pending
    assert store.write_errors == 2 and not store._dirty
    reopened = IncidentStore(db_path)
    assert {i.rule for i in reopened.list_incidents()} == {rules.BLEED_OWNER_VS_AMBIENT,
                                                           rules.DUPLICATE_EXECUTION}
    assert reopened.get(duplicate().fingerprint).count == 53
    reopened.close()
    store.close()


def test_flush_writes_what_is_pending_once_due_and_looks_no_further_otherwise(db_path):
    now = [100.0]
    store = IncidentStore(db_path, clock=lambda: now[0])
    statements: list[str] = []
    store._writer.set_trace_callback(statements.append)
    store.flush()  # nothing pending: no statement
    store.record([bleed("t1")])
    statements.clear()
    store.flush()
    assert statements == []
    blocker = sqlite3.connect(db_path, timeout=0)
    store._writer.execute("PRAGMA busy_timeout = 0")
    blocker.execute("BEGIN IMMEDIATE")
    store.record([bleed("t2")])
    assert store.write_errors == 1
    blocker.rollback()
    blocker.close()
    statements.clear()
    store.flush()  # not due yet
    assert statements == []
    now[0] += WRITE_RETRY_S
    store.flush()
    assert "BEGIN" in statements and not store._dirty and store.write_errors == 1
    store.close()
    store.flush()  # closed: nothing, no error
    reopened = IncidentStore(db_path)
    assert reopened.get(bleed().fingerprint).count == 2
    reopened.close()


def test_a_write_waits_for_another_process_lock_only_briefly_and_is_retried_later(db_path):
    """/tmp/s26_inc/probe_store_stall.py: while another process held the database's write lock,
    each record() and each due flush() -- both on the pipeline thread -- waited SQLite's busy
    timeout, 5 s, before failing: the data path stalled 5 s every retry (every 30 s at most). A
    write of the running store now waits WRITE_BUSY_TIMEOUT_MS; what failed stays pending and is
    retried, as before."""
    now = [100.0]
    store = IncidentStore(db_path, clock=lambda: now[0])
    blocker = sqlite3.connect(db_path, isolation_level=None)  # locks as another process's would
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for write in (lambda: store.record([bleed("t1")]), store.flush, store.flush):
            started = time.monotonic()
            write()
            assert time.monotonic() - started < 1.0  # before: 5 s each
            now[0] += MAX_WRITE_RETRY_S  # the next one is a due retry
        assert store.write_errors == 3 and store._dirty
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.flush()
    assert store.write_errors == 3 and not store._dirty
    store.close()
    reopened = IncidentStore(db_path)
    assert reopened.get(bleed().fingerprint).count == 1
    reopened.close()


def test_the_last_write_at_close_waits_for_another_process_lock_longer(db_path):
    """At close (SIGTERM) there is no later retry: waiting for the lock is worth it, and the
    pipeline has stopped. Another process holds the lock 0.2 s (four times a running write's wait)
    into the close's write: the write goes through once it lets go."""
    now = [100.0]
    store = IncidentStore(db_path, clock=lambda: now[0])
    blocker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    store.record([bleed("t1")])  # fails: pending
    assert store.write_errors == 1
    writing = threading.Event()
    store._writer.set_trace_callback(lambda sql: writing.set() if sql.startswith("INSERT") else None)

    def hold_then_let_go():
        writing.wait(10)
        time.sleep(4 * store_module.WRITE_BUSY_TIMEOUT_MS / 1000)  # how long the lock is held
        blocker.execute("ROLLBACK")

    holder = threading.Thread(target=hold_then_let_go)
    holder.start()
    try:
        assert store.close() is True
    finally:
        holder.join(10)
        blocker.close()
    assert writing.is_set() and store.write_errors == 1
    reopened = IncidentStore(db_path)
    assert reopened.get(bleed().fingerprint).count == 1
    reopened.close()


def test_a_store_that_wrote_everything_closes_clean(db_path):
    store = IncidentStore(db_path)
    store.record([bleed("t1")])
    assert store.close() is True
    assert store.close() is True  # idempotent


def test_a_last_write_that_fails_at_close_is_an_error_naming_the_path_and_what_is_lost(
        db_path, caplog, monkeypatch):
    """The database still locked (or the disk still full) at shutdown: the first failure was logged
    long ago, later ones only counted — the loss itself must be said, and close() must say so."""
    monkeypatch.setattr(store_module, "CLOSE_BUSY_TIMEOUT_MS", 0)  # the lock is held past it anyway
    now = [100.0]
    store = IncidentStore(db_path, clock=lambda: now[0])
    blocker = sqlite3.connect(db_path, timeout=0)
    store._writer.execute("PRAGMA busy_timeout = 0")
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock until after close
    store.record([bleed("t1")])
    now[0] += WRITE_RETRY_S
    (incident, _), = store.record([duplicate("d1")])
    assert store.write_errors == 2
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="sidecar.incidents.store"):
        assert store.close() is False
        assert store.close() is False  # idempotent: the first result
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = error.getMessage()
    assert f"incidents.path {db_path!r}" in message
    assert "2 incident(s) and 0 deletion(s) not written" in message and "locked" in message
    assert store.mark_alerted(incident.id) is False  # closed all the same
    blocker.rollback()
    blocker.close()
    reopened = IncidentStore(db_path)
    assert reopened.list_incidents() == []  # lost, as the error said
    reopened.close()


def test_an_incident_touched_then_evicted_in_one_batch_is_gone_even_when_the_write_fails(db_path):
    store = IncidentStore(db_path, max_incidents=2)
    store.record([bleed("t1", at_s=0, entry_point="/b1"), _warning("/w", at_s=1)])
    blocker = sqlite3.connect(db_path, timeout=0)
    store._writer.execute("PRAGMA busy_timeout = 0")
    blocker.execute("BEGIN IMMEDIATE")  # this batch's write fails
    # /w is seen again, then a new leak evicts it, in one batch
    touched = store.record([_warning("/w", at_s=2), bleed("t2", at_s=3, entry_point="/b2")])
    assert [i.entry_point for i, _ in touched] == ["/b2"]  # the evicted one is not handed on
    assert store.write_errors == 1
    blocker.rollback()
    blocker.close()
    store.set_status(bleed(entry_point="/b1").fingerprint, "resolved")  # the retry goes through
    store.close()
    reopened = IncidentStore(db_path, max_incidents=2)
    assert sorted(i.entry_point for i in reopened.list_incidents()) == ["/b1", "/b2"]
    reopened.close()


def test_evictions_stop_while_as_many_deletes_as_the_capacity_wait_for_a_failing_database(db_path):
    now = [0.0]
    store = IncidentStore(db_path, max_incidents=2, clock=lambda: now[0])
    blocker = sqlite3.connect(db_path, timeout=0)
    store._writer.execute("PRAGMA busy_timeout = 0")
    blocker.execute("BEGIN IMMEDIATE")  # every write fails from here on
    store.record([_warning("/w1", at_s=1), _warning("/w2", at_s=2)])
    store.record([bleed("t1", at_s=3, entry_point="/b1")])  # evicts /w1: one delete waits
    store.record([bleed("t2", at_s=4, entry_point="/b2")])  # evicts /w2: two wait, the capacity
    assert store.evicted == {"lower_severity": 2}
    store.set_status(bleed(entry_point="/b1").fingerprint, "resolved")
    assert store.record([bleed("t3", at_s=5, entry_point="/b3")]) == []  # refused, not evicted
    assert store.refused == 1 and len(store._deleted) == 2
    blocker.rollback()
    blocker.close()
    now[0] += MAX_WRITE_RETRY_S  # the wait after the failed writes is over
    store.record([bleed("t4", at_s=6, entry_point="/b2")])  # the next write carries the deletes
    assert not store._deleted
    (b3, is_new), = store.record([bleed("t5", at_s=7, entry_point="/b3")])
    assert is_new and store.evicted == {"lower_severity": 2, "resolved": 1}
    store.close()


def test_resolving_many_incidents_keeps_the_eviction_order_bounded():
    store = IncidentStore(":memory:", max_incidents=2)
    store.record([bleed("t1", at_s=1, entry_point="/b1"), bleed("t2", at_s=2, entry_point="/b2")])
    store.set_status(bleed(entry_point="/b1").fingerprint, "resolved")
    store.record([bleed("t3", at_s=3, entry_point="/b3")])  # full: the eviction order is made
    for _ in range(1000):
        for status in ("resolved", "open"):
            store.set_status(bleed(entry_point="/b2").fingerprint, status)
    assert len(store._eviction_heap or ()) <= 2 * store.max_incidents
    store.set_status(bleed(entry_point="/b2").fingerprint, "resolved")
    store.record([bleed("t4", at_s=4, entry_point="/b4")])  # the resolved /b2 goes
    assert sorted(i.entry_point for i in store.list_incidents()) == ["/b3", "/b4"]


def test_reads_from_another_thread_while_writing(db_path):
    store = IncidentStore(db_path)
    errors: list[BaseException] = []
    listed: list[int] = []

    def read() -> None:
        try:
            for _ in range(200):
                listed.append(len(store.list_incidents(IncidentQuery(limit=1000))))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for n in range(200):
        store.record([bleed(f"t{n}", entry_point=f"/e{n % 50}")])
    reader.join()
    assert not errors
    assert listed[-1] <= 50 and max(listed) <= 50
    assert len(store.list_incidents(IncidentQuery(limit=1000))) == 50
    store.close()


def test_from_config(db_path):
    store = IncidentStore.from_config(IncidentsConfig(path=db_path, sample_trace_ids=2))
    assert (store.path, store.sample_limit) == (db_path, 2)
    store.close()


def test_samples_stay_bounded_after_the_limit_is_lowered(db_path):
    store = IncidentStore(db_path, sample_trace_ids=10)
    store.record([bleed(f"t{n}") for n in range(20)])
    store.close()
    store = IncidentStore(db_path, sample_trace_ids=3)
    store.record([bleed("t20")])
    assert store.get(bleed().fingerprint).sample_trace_ids == ["t0", "t19", "t20"]
    store.close()


def test_a_foreign_database_at_an_older_schema_version_names_the_path(db_path):
    with sqlite3.connect(db_path) as conn:  # another application's, at schema 1: "upgraded"
        conn.execute("CREATE TABLE t (x)")
        conn.execute("PRAGMA user_version = 1")
    with pytest.raises(SchemaError) as raised:
        IncidentStore(db_path)
    message = str(raised.value)
    assert message.startswith(f"incidents.path {db_path!r}: cannot upgrade")
    assert "point incidents.path at another file" in message


def test_findings_after_close_are_not_kept_counted_once_and_no_write_error_is_claimed(
        db_path, telemetry, caplog):
    """A pipeline thread that outlived the shutdown's drain still records: those findings cannot be
    stored, which is said once -- not a failed write 'retried' (there is no later write)."""
    store = IncidentStore(db_path, telemetry=telemetry)
    store.close()
    with caplog.at_level(logging.INFO, logger="sidecar.incidents.store"):
        assert store.record([bleed("t1"), duplicate("d1")]) == []
        assert store.record([bleed("t2")]) == []
    assert store.dropped_after_close == 3
    assert store.write_errors == 0 and len(store) == 0
    assert _sample(telemetry, "pathwatch_incident_store_errors_total") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "2 finding(s) came after it closed" in errors[0], errors
    assert "retried" not in errors[0]
