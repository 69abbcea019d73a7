"""Whether the ledger behind the verdicts is being saved, told to whoever reads them: its state
(``ActivityLedger.persistence``, the API's ``verdicts.ledger``), its errors by operation and cause,
and the metrics the deploys detector publishes of both (``pathwatch_ledger_state``,
``pathwatch_ledger_errors_total``) — where a failing write, a file moved aside or a ledger kept in
memory only used to show in a log line alone."""

from __future__ import annotations

import sqlite3

import jsonschema
from prometheus_client import CollectorRegistry

from sidecar.api import openapi_document
from sidecar.consolidation import ActivityLedger
from sidecar.consolidation.verdicts import LEDGER_ERRORS, LEDGER_STATES
from sidecar.detectors.deploys import DeployDetector
from sidecar.telemetry import Telemetry
from tests.sidecar.consolidation.test_ledger_version import (_KEY_CHANGED, Clock,
                                                             a_ledger_with_evidence, call,
                                                             set_user_version)

T0 = 1_800_000_000.0
ZERO = {key: 0 for key in LEDGER_ERRORS}


def refuse_writes(ledger: ActivityLedger) -> None:
    """Every write of the activity fails, as under a lock another process holds or a full disk."""
    ledger._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.implementation_activity "
                       "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")


def test_a_ledger_written_as_usual_says_persisted_since_it_opened(tmp_path):
    clock = Clock(T0)
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock)
    assert ledger.persistence() == {"state": "persisted", "since": T0, "reason": None,
                                    "write_errors": 0, "moved_aside_at": None, "last_written": T0}
    clock.now_s = T0 + 5
    call(ledger, "demo.engines.Legacy", T0 + 5)
    ledger.flush()
    assert ledger.persistence()["last_written"] == T0 + 5
    assert ledger.errors == ZERO
    ledger.close()


def test_a_ledger_without_a_file_says_so(tmp_path):
    # incidents.path ":memory:" (a test, a demo): the ledger is not saved by configuration, which
    # is no failure to page on, but the verdicts still rest on a ledger lost at the stop
    ledger = ActivityLedger(clock_s=Clock(T0))
    assert ledger.persistence() == {"state": "no_file", "since": T0, "reason": None,
                                    "write_errors": 0, "moved_aside_at": None,
                                    "last_written": None}
    ledger.close()


def test_failing_writes_say_so_since_the_first_and_persisted_again_once_one_goes_through(tmp_path):
    clock = Clock(T0)
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock)
    refuse_writes(ledger)
    for n in (1, 2, 3):
        clock.now_s = T0 + 5 * n
        call(ledger, "demo.engines.Legacy", clock.now_s)
        ledger.flush()
    assert ledger.persistence() == {"state": "write_failing", "since": T0 + 5,
                                    "reason": "database or disk is full", "write_errors": 3,
                                    "moved_aside_at": None, "last_written": T0}
    assert ledger.errors == {**ZERO, ("write", "sqlite_error"): 3}
    ledger._db.execute("DROP TRIGGER refuse")
    clock.now_s = T0 + 20
    ledger.flush()
    assert ledger.persistence() == {"state": "persisted", "since": T0 + 20, "reason": None,
                                    "write_errors": 3, "moved_aside_at": None,
                                    "last_written": T0 + 20}
    ledger.close()


def test_an_unreadable_ledger_moved_aside_says_when(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a SQLite file at all" * 100)
    ledger = ActivityLedger(str(path), clock_s=Clock(T0))
    assert ledger.moved_aside is not None
    assert ledger.persistence() == {"state": "moved_aside", "since": T0, "reason": "unreadable",
                                    "write_errors": 0, "moved_aside_at": T0, "last_written": T0}
    assert ledger.errors == {**ZERO, ("open", "unreadable"): 1}
    ledger.close()


def test_a_later_releases_ledger_says_in_memory_only_and_why(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock(T0)
    a_ledger_with_evidence(path, clock)
    set_user_version(path, 2)
    clock.now_s = T0 + 100
    ledger = ActivityLedger(path, clock_s=clock)
    assert ledger.persistence() == {"state": "in_memory", "since": T0 + 100,
                                    "reason": "newer_version", "write_errors": 0,
                                    "moved_aside_at": None, "last_written": None}
    assert ledger.errors == {**ZERO, ("open", "newer_version"): 1}
    clock.now_s = T0 + 105
    call(ledger, "demo.engines.Legacy", clock.now_s)
    ledger.flush()  # into the in-memory database: no write of the file
    assert ledger.persistence()["state"] == "in_memory"
    assert ledger.persistence()["last_written"] is None
    ledger.close()


def test_a_file_changed_under_the_ledger_says_in_memory_only_and_which_change(tmp_path):
    for script, version, reason in ((_KEY_CHANGED, 2, "newer_version"),
                                    (_KEY_CHANGED, 1, "other_shape")):
        path = str(tmp_path / f"ledger-{reason}.sqlite")
        clock = Clock(T0)
        ledger = ActivityLedger(path, clock_s=clock)
        set_user_version(path, version, script)
        clock.now_s = T0 + 5
        call(ledger, "demo.engines.Legacy", clock.now_s)
        ledger.flush()
        clock.now_s = T0 + 10
        ledger.flush()
        assert ledger.persistence() == {"state": "in_memory", "since": T0 + 5, "reason": reason,
                                        "write_errors": 1, "moved_aside_at": None,
                                        "last_written": T0}, reason
        assert ledger.errors == {**ZERO, ("write", reason): 1}, reason
        ledger.close()


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, ...], float]:
    return {tuple(sample.labels.values()): sample.value for family in registry.collect()
            for sample in family.samples if sample.name == name}


def test_the_ledgers_state_and_errors_are_series_from_the_start_and_follow_it(tmp_path):
    telemetry = Telemetry(CollectorRegistry())
    clock = Clock(T0)
    ledger = ActivityLedger(str(tmp_path / "ledger.sqlite"), clock_s=clock)
    deploys = DeployDetector(telemetry=telemetry, ledger=ledger, clock_s=clock)
    # at 0 from the start, every operation and cause: increase() sees the first error
    assert samples(telemetry.registry, "pathwatch_ledger_errors_total") == {
        key: 0.0 for key in LEDGER_ERRORS}
    assert samples(telemetry.registry, "pathwatch_ledger_state") == {
        (state,): float(state == "persisted") for state in LEDGER_STATES}
    refuse_writes(ledger)
    call(ledger, "demo.engines.Legacy", T0)
    deploys.flush()
    deploys.flush()
    assert samples(telemetry.registry, "pathwatch_ledger_errors_total")[
        ("write", "sqlite_error")] == 2.0
    assert samples(telemetry.registry, "pathwatch_ledger_state") == {
        (state,): float(state == "write_failing") for state in LEDGER_STATES}
    ledger._db.execute("DROP TRIGGER refuse")
    deploys.flush()
    assert samples(telemetry.registry, "pathwatch_ledger_errors_total")[
        ("write", "sqlite_error")] == 2.0
    assert samples(telemetry.registry, "pathwatch_ledger_state")[("persisted",)] == 1.0
    deploys.close()


def test_an_error_at_open_is_on_the_metrics_before_the_first_flush(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"not a database" * 100)
    telemetry = Telemetry(CollectorRegistry())
    DeployDetector(telemetry=telemetry, ledger=ActivityLedger(str(path), clock_s=Clock(T0)),
                   clock_s=Clock(T0))
    assert samples(telemetry.registry, "pathwatch_ledger_errors_total")[
        ("open", "unreadable")] == 1.0
    assert samples(telemetry.registry, "pathwatch_ledger_state")[("moved_aside",)] == 1.0


def test_the_verdicts_say_the_ledgers_state_as_the_api_description_says(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    clock = Clock(T0)
    a_ledger_with_evidence(path, clock)
    set_user_version(path, 2)
    deploys = DeployDetector(ledger=ActivityLedger(path, clock_s=clock), clock_s=clock)
    verdicts = deploys.snapshot(T0 + 1)["verdicts"]
    assert verdicts["ledger"]["state"] == "in_memory"
    assert verdicts["ledger"]["reason"] == "newer_version"
    spec = openapi_document()
    schema = {"$ref": "#/components/schemas/Verdicts", "components": spec["components"]}
    jsonschema.validate(verdicts, schema)
    for persistence in (ActivityLedger(clock_s=clock).persistence(),
                        {**verdicts["ledger"], "state": "write_failing", "reason": "disk I/O error"},
                        {**verdicts["ledger"], "state": "moved_aside", "reason": "unreadable",
                         "moved_aside_at": T0}):
        jsonschema.validate({**verdicts, "ledger": persistence}, schema)
    try:
        jsonschema.validate({**verdicts, "ledger": {**verdicts["ledger"], "state": "lost"}}, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("a state the description does not list was accepted")
    deploys.close()
