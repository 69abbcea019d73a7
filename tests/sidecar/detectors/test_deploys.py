"""The deploy detector on real demo-backend spans: the path inventory and its callers, a simulated
deploy (a second service.version) with a bug switched on vs a clean one, and safe-to-delete verdicts
with an injectable clock and a restart."""

from __future__ import annotations

import pytest

from sidecar.config import ConsolidationConfig
from sidecar.consolidation import ActivityLedger
from sidecar.detectors import build_detectors
from sidecar.consolidation.paths import SETTLE_S
from sidecar.detectors import deploys as deploys_module
from sidecar.detectors.deploys import DeployDetector
from sidecar.model import Finding, SpanRecord
from sidecar.rules import DEPLOY_NEW_PATH, DEPLOY_REGRESSION, DEPLOY_RETIRED_REVIVED
from tests.sidecar.consolidation.demo import demo_backend
from tests.sidecar.detectors.factory import NOW, Trace, rules, sample, state

DAY = 86400.0
T0 = 1_800_000_000.0
ENGINES = "examples.agent_backend.engines."
CONFIG = ConsolidationConfig(min_runs_per_version=8, safe_to_delete_window_s=14 * DAY)


class Clock:
    def __init__(self, now_s: float = T0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def feed(detectors, deploys, spans, clock: Clock, seconds: float = 10.0) -> list:
    """Every detector consumes, then the deploy detector observes the findings (as the pipeline
    does), then ``seconds`` of ticks pass (deadlines, idle paths, judging)."""
    findings = []

    def handle(found):
        if found:
            deploys.observe(found)
            findings.extend(found)

    now_ns = int(clock.now_s * 1e9)
    handle([f for detector in detectors for f in detector.consume(spans, now_ns)])
    for _ in range(int(seconds * 10)):
        clock.now_s += 0.1
        now_ns = int(clock.now_s * 1e9)
        handle([f for detector in detectors for f in detector.tick(now_ns)])
    return findings


def make(telemetry, clock: Clock, ledger: ActivityLedger | None = None):
    deploys = DeployDetector(rules(), state(), telemetry, config=CONFIG, clock_s=clock, ledger=ledger)
    return build_detectors(rules(), state(), telemetry, deploys=deploys), deploys


@pytest.fixture
def demo(monkeypatch):
    with demo_backend(monkeypatch) as backend:
        yield backend


def test_inventory_lists_the_seeded_duplicate_paths_and_their_callers(demo, telemetry):
    clock = Clock()
    detectors, deploys = make(telemetry, clock)
    for scenario in ("S0", "S0", "S3", "S4", "S11"):
        demo.run(scenario, 1)
    feed(detectors, deploys, demo.take("1.0.0"), clock)
    picture = deploys.snapshot()
    ws = picture["paths"]["entry_points"]["/ws"]
    assert ws["runs"] == 5
    by_path = {row["path"]: row for row in ws["paths"]}
    clean = ("supervisor=ChatOrchestrator > execution_engine=UserExecutionEngine > "
             "event_emitter=AgentWebSocketBridge > socket_manager=WebSocketManager")
    assert by_path[clean]["runs"] == 2 and by_path[clean]["share"] == 0.4
    # S3: the ExecutionEngine redirect delegates to the canonical engine (nested: part of the chain)
    assert any("execution_engine=ExecutionEngine > execution_engine=UserExecutionEngine (nested)"
               in path for path in by_path)
    # S4: a second supervisor and engine in the same run; S11: the retired engine
    assert any("supervisor=SupervisorAgent" in p and "RequestScopedExecutionEngine" in p for p in by_path)
    assert any("execution_engine=IsolatedExecutionEngine" in p for p in by_path)
    assert len(ws["paths"]) == 4
    assert sample(telemetry, "pathwatch_entry_point_paths", entry_point="/ws") == 4
    migrate = {row["implementation"]: row["callers"] for row in picture["callers_to_migrate"]}
    assert set(migrate) == {ENGINES + "ExecutionEngine", ENGINES + "IsolatedExecutionEngine",
                            ENGINES + "SupervisorExecutionEngineAdapter"}
    assert [c["caller"] for c in migrate[ENGINES + "IsolatedExecutionEngine"]] == [
        "examples.agent_backend.supervisors.ChatOrchestrator.run"]
    assert migrate[ENGINES + "SupervisorExecutionEngineAdapter"][0]["caller"] == (
        "examples.agent_backend.supervisors.SupervisorAgent.run")


def _deploy(demo, telemetry, second_scenario: str) -> list:
    clock = Clock()
    detectors, deploys = make(telemetry, clock)
    # long enough for runs judged idle to settle (the demo's spans may come without request spans)
    demo.run("S0", 10)
    before = feed(detectors, deploys, demo.take("1.0.0"), clock, SETTLE_S + 10)
    assert before == []  # the clean first version raises nothing
    demo.run(second_scenario, 10)
    return feed(detectors, deploys, demo.take("2.0.0"), clock, SETTLE_S + 10)


def test_a_deploy_with_a_bug_switched_on_raises_the_regression(demo, telemetry):
    findings = _deploy(demo, telemetry, "S5")  # S5: agent_started announced three times
    regressions = [f for f in findings if f.rule == DEPLOY_REGRESSION]
    assert len(regressions) == 1
    regression = regressions[0]
    assert regression.service_version == "2.0.0" and regression.entry_point == "/ws"
    assert regression.details["family"] == "duplicate"
    assert regression.details["previous_version"] == "1.0.0"
    assert regression.details["previous_rate"] == 0.0 and regression.details["rate"] >= 1.0
    # S5's culprit: the bridge announcing agent_started three times (examples/README.md)
    assert (regression.role, regression.implementation) == (
        "event_emitter", "examples.agent_backend.emitters.AgentWebSocketBridge")
    series = dict(service_name="demo-backend", service_version="2.0.0")
    assert sample(telemetry, "pathwatch_version_runs_total", **series) == 10
    assert sample(telemetry, "pathwatch_version_findings_total", **series, family="duplicate") >= 10


def test_a_deploy_that_brings_back_the_retired_engine_is_reported(demo, telemetry):
    findings = _deploy(demo, telemetry, "S11")  # S11: the factory falls back to the retired engine
    revived = [f for f in findings if f.rule == DEPLOY_RETIRED_REVIVED]
    assert [f.implementation for f in revived] == [ENGINES + "IsolatedExecutionEngine"]
    new_paths = [f for f in findings if f.rule == DEPLOY_NEW_PATH]
    assert new_paths and all(f.service_version == "2.0.0" for f in new_paths)
    assert new_paths[0].implementation == ENGINES + "IsolatedExecutionEngine"


def test_a_clean_deploy_raises_nothing(demo, telemetry):
    assert _deploy(demo, telemetry, "S0") == []


def test_safe_to_delete_appears_after_the_window_and_survives_a_restart(demo, telemetry, tmp_path):
    db = str(tmp_path / "pathwatch-consolidation.sqlite")
    clock = Clock()
    ledger = ActivityLedger(db, clock_s=clock)
    detectors, deploys = make(telemetry, clock, ledger)
    demo.run("S11", 1)  # the retired engine runs once
    demo.run("S0", 1)
    feed(detectors, deploys, demo.take("1.0.0"), clock)
    deploys.close()
    clock.now_s += 10  # a new sidecar process on the same file, at once (no gap: all watched)
    running = ActivityLedger(db, clock_s=clock, max_gap_s=7200)

    def verdicts(at: float) -> dict[str, dict]:
        while clock.now_s + 3600 < at:  # running, flushing on its tick: all watched
            clock.now_s += 3600
            running.flush()
        clock.now_s = at
        running.observe_calls("execution_engine", ENGINES + "UserExecutionEngine", canonical=True,
                              retired=False, caller=None, count=1, now_s=at)  # the role still runs
        rows = running.verdicts(CONFIG.safe_to_delete_window_s)
        return {row["implementation"].rsplit(".", 1)[-1]: row for row in rows}

    retired_call = verdicts(T0 + DAY)["IsolatedExecutionEngine"]
    assert retired_call["verdict"] == "in_use" and retired_call["total_calls"] == 1
    later = verdicts(T0 + 15 * DAY)
    isolated = later["IsolatedExecutionEngine"]
    assert isolated["verdict"] == "safe_to_delete" and isolated["retired"] is True
    assert isolated["last_callers"] == ["examples.agent_backend.supervisors.ChatOrchestrator.run"]
    assert T0 <= isolated["last_seen"] < T0 + 60
    assert later["UserExecutionEngine"]["verdict"] == "canonical"
    running.close()
    clock.now_s += 10
    restarted = ActivityLedger(db, clock_s=clock)
    assert [row["verdict"] for row in restarted.verdicts(CONFIG.safe_to_delete_window_s)
            if row["implementation"].endswith("IsolatedExecutionEngine")] == ["safe_to_delete"]
    restarted.close()


def test_a_fresh_sidecar_does_not_call_anything_deletable_before_watching_a_whole_window(tmp_path):
    clock = Clock()
    ledger = ActivityLedger(str(tmp_path / "c.sqlite"), clock_s=clock, max_gap_s=2 * 3600)
    ledger.observe_calls("execution_engine", ENGINES + "ExecutionEngine", canonical=False,
                         retired=False, caller=None, count=1,
                         now_s=T0 - 20 * DAY)  # last seen long before this ledger started watching
    clock.now_s = T0 + DAY
    ledger.flush()
    assert ledger.verdicts(14 * DAY, T0 + DAY)[0]["verdict"] == "observing"
    while clock.now_s < T0 + 15 * DAY:  # watching (flushing on its tick)
        clock.now_s += 3600
        ledger.flush()
    ledger.observe_calls("execution_engine", ENGINES + "UserExecutionEngine", canonical=True,
                         retired=False, caller=None, count=1, now_s=T0 + 15 * DAY)
    assert ledger.verdicts(14 * DAY, T0 + 15 * DAY)[0]["verdict"] == "safe_to_delete"


def test_a_unit_evicted_for_capacity_during_a_batch_is_dated_by_that_batch():
    deploys = DeployDetector(rules(), state(max_runs=1), config=CONFIG, clock_s=Clock())
    first, second = Trace(entry_point="/api/runs"), Trace(entry_point="/api/runs")
    deploys.consume([first.execute(), second.execute()], NOW)  # one unit too many: judged at once
    [path] = deploys.snapshot(now_s=NOW / 1e9)["paths"]["entry_points"]["/api/runs"]["paths"]
    assert path["runs"] == 1
    assert path["first_seen"] == path["last_seen"] == NOW / 1e9


def _runs_through(emitters: list[str], entry_point: str = "/ws") -> list:
    spans = []
    for emitter in emitters:
        trace = Trace(entry_point=entry_point)
        spans += [trace.emit("agent_started", implementation=emitter), trace.request()]
    return spans


def test_runs_of_paths_beyond_the_limit_fold_into_one_other_series(telemetry):
    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(max_paths_per_entry_point=2))
    feed([deploys], deploys, _runs_through([f"demo.emitters.Emitter{i}" for i in range(50)]), clock, 1)
    deploys.flush()
    series = {s.labels["path"]: s.value for m in telemetry.registry.collect()
              if m.name == "pathwatch_path_runs" for s in m.samples if s.name.endswith("_total")}
    assert len(series) == 3 and series["other"] == 48
    assert deploys.snapshot()["paths"]["overflow"]["paths"] == 48


def test_path_run_series_are_bounded_whatever_the_product_of_the_limits(telemetry, monkeypatch):
    """512 entry points x 32 paths each were 16,896 series of pathwatch_path_runs_total (the other
    metrics with entry point and implementation labels hold 4096); past the cap a new path's runs
    count under its entry point's "other", and every run is still counted."""
    monkeypatch.setattr(deploys_module, "MAX_PATH_SERIES", 6, raising=False)
    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(max_paths_per_entry_point=4))
    for entry_point in ("/a", "/b", "/c"):  # 4 paths each, twice: 12 distinct (entry point, path)
        emitters = [f"demo.emitters.Emitter{i}" for i in range(4)]
        feed([deploys], deploys, _runs_through(emitters * 2, entry_point), clock, 1)
    deploys.flush()
    series = {(s.labels["entry_point"], s.labels["path"]): s.value for m in telemetry.registry.collect()
              if m.name == "pathwatch_path_runs" for s in m.samples if s.name.endswith("_total")}
    assert sum(series.values()) == 24
    assert len([key for key in series if key[1] != "other"]) == 6
    # /a's 4 paths and 2 of /b's have series; /b's other 2 and all of /c's count as "other"
    assert {key: value for key, value in series.items() if key[1] == "other"} == {
        ("/b", "other"): 4, ("/c", "other"): 8}
    assert deploys.path_series_overflow == 12


def test_path_shares_count_the_runs_of_paths_beyond_the_limit():
    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock,
                             config=ConsolidationConfig(max_paths_per_entry_point=2))
    canonical = []
    for _ in range(10):
        trace = Trace(entry_point="/ws")
        canonical += [trace.execute(), trace.request()]
    legacy = _runs_through([f"demo.emitters.Emitter{i}" for i in range(90)])
    feed([deploys], deploys, canonical + legacy, clock, 1)
    ws = deploys.snapshot()["paths"]["entry_points"]["/ws"]
    assert ws["runs"] == 100 and ws["overflow_runs"] == 89
    assert [path["share"] for path in ws["paths"]] == [0.1, 0.01]


def test_rules_raised_once_per_window_do_not_make_a_quiet_version_regress(telemetry):
    from sidecar.detectors.duplicates import DuplicatesDetector

    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=20))
    detectors = [DuplicatesDetector(rules(), state(), telemetry), deploys]

    def run(version: str) -> list:
        trace = Trace(entry_point="/ws")
        return [trace.execute(ENGINES + "IsolatedExecutionEngine", canonical=False, retired=True,
                              service_version=version), trace.request(service_version=version)]

    findings = []
    for _ in range(200):  # busy 1.0: one retired_invoked finding for all its runs
        findings += feed(detectors, deploys, run("1.0"), clock, seconds=0.05)
    for _ in range(20):  # quiet 2.0, the same code: one retired_invoked finding per run
        findings += feed(detectors, deploys, run("2.0"), clock, seconds=61)
    assert sum(f.rule == "duplicate.retired_invoked" and f.service_version == "2.0"
               for f in findings) == 19  # the first within 1.0's window
    assert [f for f in findings if f.rule == DEPLOY_REGRESSION] == []


def test_a_class_that_ran_in_the_previous_version_is_not_revived_by_being_marked_retired():
    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=5))

    def runs(version: str, retired: bool) -> list:
        spans = []
        for _ in range(10):
            trace = Trace(entry_point="/ws")
            spans += [trace.execute(ENGINES + "IsolatedExecutionEngine", canonical=False,
                                    retired=retired, service_version=version),
                      trace.request(service_version=version)]
        return spans

    feed([deploys], deploys, runs("1.0", retired=False), clock, 1)
    findings = feed([deploys], deploys, runs("2.0", retired=True), clock, 2)  # the new path map
    assert [f for f in findings if f.rule == DEPLOY_RETIRED_REVIVED] == []


def test_a_class_the_previous_versions_runs_went_through_is_not_revived_while_they_settle():
    from tests.sidecar.detectors.factory import S

    deploys = DeployDetector(rules(), state(), clock_s=Clock(),
                             config=ConsolidationConfig(min_runs_per_version=20))
    isolated = ENGINES + "IsolatedExecutionEngine"
    # 1.0: WebSocket runs through the class (the socket's request span comes much later): counted
    # at their first span, final only once settled (path_idle_s + 60 s)
    deploys.consume([Trace(entry_point="/ws").execute(isolated, canonical=False, retired=False,
                                                      service_version="1.0") for _ in range(20)], NOW)
    now = NOW + 10 * S
    deploys.tick(now)
    # 2.0's path map marks the class retired; it runs within the minute
    deploys.consume([Trace(entry_point="/ws").execute(isolated, canonical=False, retired=True,
                                                      service_version="2.0")], now)
    found = []
    for _ in range(5):
        now += S
        found += deploys.tick(now)
    assert [f for f in found if f.rule == DEPLOY_RETIRED_REVIVED] == []
    picture = deploys.snapshot()
    assert picture["paths"]["entry_points"]["/ws"]["runs"] >= 20  # 1.0's runs judged ...
    assert picture["versions"][0]["paths"] == 0  # ... and still settling: not final


def test_a_new_path_waits_for_min_runs_of_the_new_version_too():
    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=20))

    def runs(version: str, count: int, implementation: str) -> list:
        spans = []
        for _ in range(count):
            trace = Trace(entry_point="/ws")
            spans += [trace.execute(implementation, service_version=version),
                      trace.request(service_version=version)]
        return spans

    feed([deploys], deploys, runs("1.0", 20, ENGINES + "UserExecutionEngine"), clock, 1)
    assert feed([deploys], deploys, runs("2.0", 1, ENGINES + "Other"), clock, 2) == []
    found = feed([deploys], deploys, runs("2.0", 19, ENGINES + "UserExecutionEngine"), clock, 4)
    assert [f.rule for f in found] == [DEPLOY_NEW_PATH]


def _runs(service: str, version: str, entry_point: str = "/ws", count: int = 10,
          implementation: str = ENGINES + "UserExecutionEngine", retired: bool = False) -> list:
    spans = []
    for _ in range(count):
        trace = Trace(entry_point=entry_point)
        spans += [trace.execute(implementation, canonical=not retired, retired=retired,
                                service_name=service, service_version=version),
                  trace.request(service_name=service, service_version=version)]
    return spans


def test_a_version_is_compared_with_the_previous_version_of_the_same_service():
    from sidecar.model import Finding

    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=5))
    feed([deploys], deploys, _runs("svc-a", "1.0"), clock, 1)
    feed([deploys], deploys, _runs("svc-b", "7.3", entry_point="/jobs"), clock, 1)
    feed([deploys], deploys, _runs("svc-a", "1.1"), clock, 1)
    deploys.observe([Finding(rule="bleed.owner_vs_ambient", severity="critical", summary="x",
                             entry_point="/ws", service_name="svc-a", service_version="1.1")
                     for _ in range(10)])
    found = feed([deploys], deploys, [], clock, 4)  # runs count once judged (settle_s, 2.5 s here)
    assert [(f.rule, f.details["previous_version"]) for f in found] == [(DEPLOY_REGRESSION, "1.0")]
    rows = {(v["service"], v["version"]): v for v in deploys.snapshot()["versions"]}
    assert rows[("svc-a", "1.1")]["previous_version"] == "1.0"
    assert rows[("svc-b", "7.3")]["previous_version"] is None


@pytest.mark.parametrize("new_bleeds", [True, False], ids=["regression", "fix"])
def test_a_restart_in_a_rolling_deploy_keeps_the_order_of_the_versions(tmp_path, new_bleeds):
    """1.0 ran before the restart; after it 2.0 sends the first span, then 1.0 (a rolling deploy
    runs both). The ledger remembers 1.0 was first seen before: 2.0 is compared with 1.0 — its
    bleed is a regression, and 2.0 fixing 1.0's bleed is none (not a regression of 1.0)."""
    path = str(tmp_path / "ledger.sqlite")
    config = ConsolidationConfig(min_runs_per_version=5)

    def bleeds(version: str) -> list:
        return [Finding(rule="bleed.owner_vs_ambient", severity="critical", summary="x",
                        entry_point="/ws", service_name="svc", service_version=version)
                for _ in range(10)]

    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock, config=config,
                             ledger=ActivityLedger(path, clock_s=clock))
    feed([deploys], deploys, _runs("svc", "1.0"), clock, 3)  # judged (settle_s) before the restart
    if not new_bleeds:
        deploys.observe(bleeds("1.0"))
    deploys.close()
    clock.now_s += 10  # a restart
    deploys = DeployDetector(rules(), state(), clock_s=clock, config=config,
                             ledger=ActivityLedger(path, clock_s=clock))
    found = feed([deploys], deploys, _runs("svc", "2.0"), clock, 1)
    deploys.observe(bleeds("2.0" if new_bleeds else "1.0"))
    found += feed([deploys], deploys, _runs("svc", "1.0"), clock, 1)
    found += feed([deploys], deploys, [], clock, 4)
    assert [(f.rule, f.details["previous_version"], f.service_version) for f in found] == (
        [(DEPLOY_REGRESSION, "1.0", "2.0")] if new_bleeds else [])
    rows = {v["version"]: v["previous_version"] for v in deploys.snapshot()["versions"]}
    assert rows == {"1.0": None, "2.0": "1.0"}
    deploys.close()


def test_a_restarted_sidecar_judges_a_deploy_with_the_runs_it_saw_before(tmp_path):
    """min_runs_per_version 5: 1.0 ran 10 runs clean, 2.0 (rolling out) 3, each with a bleed, when
    the sidecar restarted; then 2.0 runs twice more with bleeds and 1.0 once. The counts went to the
    ledger with its flush, so the regression is judged now (2.0: 5 runs, 1.0: 10 — its run after
    the restart is judged later than 2.0's), not after min_runs_per_version more runs of each."""
    path = str(tmp_path / "ledger.sqlite")
    config = ConsolidationConfig(min_runs_per_version=5)

    def bleeds(version: str, count: int) -> list:
        return [Finding(rule="bleed.owner_vs_ambient", severity="critical", summary="x",
                        entry_point="/ws", service_name="svc", service_version=version)
                for _ in range(count)]

    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock, config=config,
                             ledger=ActivityLedger(path, clock_s=clock))
    found = feed([deploys], deploys, _runs("svc", "1.0"), clock, 1)
    found += feed([deploys], deploys, _runs("svc", "2.0", count=3), clock, 1)
    deploys.observe(bleeds("2.0", 3))
    found += feed([deploys], deploys, [], clock, 3)  # judged (settle_s) before the restart
    assert found == []
    deploys.close()
    clock.now_s += 10  # a restart
    deploys = DeployDetector(rules(), state(), clock_s=clock, config=config,
                             ledger=ActivityLedger(path, clock_s=clock))
    found = feed([deploys], deploys, _runs("svc", "2.0", count=2), clock, 1)
    deploys.observe(bleeds("2.0", 2))
    found += feed([deploys], deploys, _runs("svc", "1.0", count=1), clock, 1)
    found += feed([deploys], deploys, [], clock, 4)
    assert [(f.rule, f.details["previous_version"], f.service_version, f.details["runs"],
             f.details["previous_runs"]) for f in found] == [(DEPLOY_REGRESSION, "1.0", "2.0", 5, 10)]
    deploys.close()

def test_a_straggler_of_a_dropped_version_is_ignored_not_judged_as_the_newest():
    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=3, max_versions=3))
    old = dict(implementation=ENGINES + "IsolatedExecutionEngine", retired=True)
    feed([deploys], deploys, _runs("svc", "1.0", count=5, **old), clock, 1)
    for version in ("2.0", "3.0", "4.0"):  # 1.0 is dropped when 4.0 comes
        feed([deploys], deploys, _runs("svc", version, count=5), clock, 1)
    found = feed([deploys], deploys, _runs("svc", "1.0", count=5, **old), clock, 2)
    assert found == []
    picture = deploys.snapshot()
    assert [v["version"] for v in picture["versions"]] == ["2.0", "3.0", "4.0"]
    assert picture["versions_overflow"] == {"max_versions": 3, "dropped": 1, "refused": 0,
                                            "waiting": [], "ignored": deploys.versions.ignored}
    assert deploys.versions.ignored >= 5  # the straggler's runs (and its retired engine's spans)


def test_a_late_finding_of_a_dropped_version_is_ignored_and_evicts_no_live_one():
    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=3, max_versions=3))
    for version in ("1.0", "2.0", "3.0", "4.0"):  # 1.0 is dropped when 4.0 comes
        feed([deploys], deploys, _runs("svc", version, count=5), clock, 1)
    deploys.observe([Finding(rule="bleed.owner_vs_ambient", severity="critical", summary="x",
                             entry_point="/ws", service_name="svc", service_version="1.0")])
    assert [(v["service"], v["version"]) for v in deploys.snapshot()["versions"]] == [
        ("svc", "2.0"), ("svc", "3.0"), ("svc", "4.0")]
    assert deploys.versions.ignored == 1


def test_version_metrics_name_the_service_and_leave_out_versions_that_are_not_tracked(telemetry):
    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=3, max_versions=2))

    def bleeds(version: str) -> None:
        deploys.observe([Finding(rule="bleed.owner_vs_ambient", severity="critical", summary="x",
                                 entry_point="/ws", service_name="svc", service_version=version)
                         for _ in range(2)])

    for version in ("1.0", "2.0", "3.0"):  # 1.0 is dropped when 3.0 comes
        feed([deploys], deploys, _runs("svc", version, count=5), clock, 1)
        bleeds(version)
    feed([deploys], deploys, _runs("svc", "1.0", count=5), clock, 1)  # a straggler pod of 1.0
    bleeds("1.0")
    feed([deploys], deploys, [], clock, 3)  # 3.0's runs count once judged (settle_s)
    deploys.flush()

    def total(name: str, **labels: str) -> float:
        return sum(s.value for m in telemetry.registry.collect() for s in m.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    # dropped: its series are gone (the straggler's runs were never counted), as it is from the API
    assert total("pathwatch_version_runs_total", service_name="svc", service_version="1.0") == 0
    assert total("pathwatch_version_findings_total", service_name="svc", service_version="1.0") == 0
    api = {(v["service"], v["version"]): v["runs"] for v in deploys.snapshot()["versions"]}
    assert api == {("svc", "2.0"): 5, ("svc", "3.0"): 5}
    for version in ("2.0", "3.0"):  # the metrics say what the API says
        assert total("pathwatch_version_runs_total", service_name="svc", service_version=version) == 5
        assert total("pathwatch_version_findings_total", service_name="svc", service_version=version,
                     family="bleed") == 2


def test_a_run_whose_spans_come_further_apart_than_path_idle_s_stays_one_run(telemetry):
    from tests.sidecar.detectors.factory import MS, new_id
    from tests.sidecar.detectors.factory import T0 as SPANS_T0

    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock, config=ConsolidationConfig())
    trace = Trace(entry_point="/ws")  # a WebSocket session: its request span ends at disconnect
    execute_id = new_id()
    feed([deploys], deploys, [trace.emit("agent_started", parent=execute_id)], clock, 6)
    late = [trace.emit("agent_completed", parent=execute_id),  # the model thought for 6 s
            trace.execute(span_id=execute_id, start_ns=SPANS_T0 - 10 * MS)]
    feed([deploys], deploys, late, clock, 6)
    ws = deploys.snapshot()["paths"]["entry_points"]["/ws"]
    assert ws["runs"] == 1 and len(ws["paths"]) == 1
    assert ws["paths"][0]["path"].startswith("execution_engine=")
    assert deploys.snapshot()["versions"][0]["runs"] == 1
    feed([deploys], deploys, [], clock, SETTLE_S + 5)  # settled: handed on once, on its whole path
    deploys.flush()
    assert sample(telemetry, "pathwatch_path_runs_total", entry_point="/ws",
                  path=ws["paths"][0]["id"]) == 1
    assert sum(s.value for m in telemetry.registry.collect() if m.name == "pathwatch_path_runs"
               for s in m.samples if s.name.endswith("_total")) == 1


def test_version_series_follow_the_tracked_versions_over_many_deploys(telemetry):
    """The series bound holds the versions tracked now, not the first ones ever seen: after a
    hundred deploys the newest still has its own series."""
    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=3, max_versions=4))
    for n in range(100):
        feed([deploys], deploys, _runs("svc", f"{n}.0", count=2), clock, 1)
        deploys.flush()
    versions = {s.labels["service_version"] for m in telemetry.registry.collect() for s in m.samples
                if s.name == "pathwatch_version_runs_total"}
    assert versions == {v["version"] for v in deploys.snapshot()["versions"]}
    assert "99.0" in versions and len(versions) <= 4 and deploys.version_series_overflow == 0


def test_removing_a_series_never_created_does_not_break_the_tick(telemetry, monkeypatch):
    """prometheus-client < 0.22 (which pyproject allows) raises KeyError from remove() for a label
    set never used: a version without findings of every family."""
    real_remove = telemetry.version_findings.remove

    def strict_remove(*labels):
        if tuple(labels) not in telemetry.version_findings._metrics:
            raise KeyError(labels)
        real_remove(*labels)

    monkeypatch.setattr(telemetry.version_findings, "remove", strict_remove)
    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=3, max_versions=2))
    for n in range(5):
        feed([deploys], deploys, _runs("svc", f"{n}.0", count=4), clock, 1)
        deploys.flush()  # drops the oldest version's series: none of its findings series exist
    assert {v["version"] for v in deploys.snapshot()["versions"]} == {"3.0", "4.0"}


def test_a_gateways_services_keep_their_own_canonical_class_in_the_verdicts():
    """Service b calling its own canonical class does not make service a's a class to migrate from."""
    clock = Clock()
    deploys = DeployDetector(rules(), state(), clock_s=clock, config=CONFIG)
    a_engine, b_engine = ENGINES + "UserExecutionEngine", "b.engines.UnifiedExecutionEngine"
    feed([deploys], deploys, _runs("svc-a", "1.0", implementation=a_engine), clock, 1)
    feed([deploys], deploys, _runs("svc-b", "7.3", implementation=b_engine), clock, 1)
    picture = deploys.snapshot()
    assert {row["implementation"] for row in picture["verdicts"]["implementations"]
            if row["canonical"]} == {a_engine, b_engine}
    assert picture["callers_to_migrate"] == []


def test_two_services_on_the_same_version_string_each_count_their_own_findings(telemetry):
    """Gateway mode, a monorepo commit as version: services alpha and beta both go 1.0 -> 2.0 and
    only beta 2.0 executes each run twice. Findings carry the service of their span, so beta 2.0
    regresses and alpha 2.0 stays clean — the findings made on a tick from a kept culprit alone
    (delivery.missing_required_events) too. Before, the service was guessed from the version
    string: beta's duplicates were counted for whichever service ran "2.0" last."""
    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=5))
    detectors = build_detectors(rules(), state(), telemetry, deploys=deploys)

    def runs(service: str, version: str, twice: bool) -> list:
        spans = []
        for _ in range(5):
            trace = Trace(entry_point="/ws")
            resource = dict(service_name=service, service_version=version)
            spans.append(trace.execute(ENGINES + "UserExecutionEngine", **resource))
            if twice:
                spans.append(trace.execute(ENGINES + "RequestScopedExecutionEngine", **resource))
            spans.append(trace.request(**resource))
        return spans

    feed(detectors, deploys, runs("alpha", "1.0", False) + runs("beta", "1.0", False), clock)
    found = feed(detectors, deploys, runs("beta", "2.0", True) + runs("alpha", "2.0", False), clock)
    regressions = [f for f in found if f.rule == DEPLOY_REGRESSION]
    assert [(f.service_name, f.service_version, f.details["family"]) for f in regressions] == [
        ("beta", "2.0", "duplicate")]
    rows = {(v["service"], v["version"]): v["findings"] for v in deploys.snapshot()["versions"]}
    assert set(rows) == {("alpha", "1.0"), ("beta", "1.0"), ("alpha", "2.0"), ("beta", "2.0")}
    assert rows[("alpha", "2.0")]["duplicate"] == 0 and rows[("beta", "2.0")]["duplicate"] == 5
    # no required event was emitted: one missing_required_events per run, each for its own service
    assert {key: row["delivery"] for key, row in rows.items()} == dict.fromkeys(rows, 5)
    missing = [f for f in found if f.rule == "delivery.missing_required_events"]
    assert {(f.service_name, f.service_version) for f in missing} == {("alpha", "2.0"),
                                                                      ("beta", "2.0")}


def test_a_finding_before_its_versions_first_call_span_makes_no_unknown_service_version(telemetry):
    """A new deploy's first span to arrive is a failed socket write (it ends before the emit that
    made it): its finding is counted for backend 2.0, the version it names, not for a phantom
    "(unknown)" service that then stays in the book next to the real backend 2.0."""
    clock = Clock()
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=5))
    detectors = build_detectors(rules(), state(), telemetry, deploys=deploys)
    feed(detectors, deploys, _runs("backend", "1.0", count=1), clock, 1)
    trace = Trace(entry_point="/ws")
    emit = trace.emit("agent_started", service_name="backend", service_version="2.0")
    write = trace.deliver(emit, outcome="failed", service_name="backend", service_version="2.0")
    found = feed(detectors, deploys, [write], clock, 3)  # counted once judged (settle_s)
    assert [(f.service_name, f.service_version) for f in found
            if f.rule == "delivery.write_failed"] == [("backend", "2.0")]
    feed(detectors, deploys, [emit, trace.execute(service_name="backend", service_version="2.0")],
         clock, 1)
    rows = {(v["service"], v["version"]): v for v in deploys.snapshot()["versions"]}
    assert set(rows) == {("backend", "1.0"), ("backend", "2.0")}
    assert rows[("backend", "2.0")]["findings"]["delivery"] == 1
    assert rows[("backend", "2.0")]["previous_version"] == "1.0"


def test_spans_the_backend_dropped_keep_idle_classes_from_safe_to_delete_for_a_window(tmp_path):
    """The backend's heartbeat says it dropped spans while a retired engine looked idle: a call of
    it may be among them. Idle across that loss, it is observing until a whole window is watched
    after it (the loss is persisted with the ledger)."""
    window = CONFIG.safe_to_delete_window_s
    clock = Clock()
    path = str(tmp_path / "ledger.sqlite")
    deploys = DeployDetector(rules(), state(), config=CONFIG, clock_s=clock,
                             ledger=ActivityLedger(path, clock_s=clock, max_gap_s=2 * DAY))
    retired, canonical = ENGINES + "IsolatedExecutionEngine", ENGINES + "UserExecutionEngine"

    def at(now_s: float) -> str:
        while clock.now_s + DAY < now_s:  # running, flushing: all watched
            clock.now_s += DAY
            deploys.ledger.flush()
        clock.now_s = now_s
        deploys.consume([Trace().execute(canonical, canonical=True)], int(now_s * 1e9))
        return next(row["verdict"] for row in deploys.snapshot(now_s)["verdicts"]["implementations"]
                    if row["implementation"] == retired)

    deploys.consume([Trace().execute(retired, canonical=False, retired=True)], int(T0 * 1e9))
    assert at(T0 + 15 * DAY) == "safe_to_delete"
    deploys.spans_lost(T0 + 15 * DAY - 30, T0 + 15 * DAY, "spans_dropped")
    assert at(T0 + 15 * DAY + 60) == "observing"
    assert deploys.snapshot(clock.now_s)["verdicts"]["span_loss"] == {
        "from": T0 + 15 * DAY - 30, "to": T0 + 15 * DAY, "reason": "spans_dropped"}
    assert at(T0 + 15 * DAY + window) == "safe_to_delete"
    deploys.close()
    assert ActivityLedger(path, clock_s=clock).span_loss == (
        T0 + 15 * DAY - 30, T0 + 15 * DAY, "spans_dropped")


# --- runs count in their version's rates once judged (settle_s) ----------------------------------

def _stop(detectors, deploys, clock: Clock) -> None:
    """Sidecar.shutdown as the pipeline runs it: the clock stands at the intake's close, the final
    tick lets out what the detectors hold (drain), then the ledger is written."""
    now_ns = int(clock.now_s * 1e9)
    found = []
    for detector in detectors:
        found += detector.tick(now_ns)
        if hasattr(detector, "drain"):
            found += detector.drain(now_ns)
    if found:
        deploys.observe(found)
    deploys.close()


def _delivery_rates(deploys) -> dict:
    return {v["version"]: (v["previous_version"], v["runs"], v["entry_points"]["/ws"]["rates"]["delivery"])
            for v in deploys.snapshot()["versions"] if v["runs"]}


def test_runs_a_stopping_sidecar_had_not_judged_are_not_persisted_for_their_version(tmp_path):
    """The runs lack the required events: each is a delivery.missing_required_events once idle for
    rules.run_idle_s. The sidecar stops 0.1 s after 1.0's 20 runs, before any is judged (its clock
    stands still from the intake's close, so none will be here); after the restart both versions run
    20 runs, every one judged. 1.0's 20 unjudged runs were persisted with no finding, so its rate read
    20/40 and 2.0's equal 20/20 a deploy.regression; they are neither counted nor persisted now."""
    path = str(tmp_path / "ledger.sqlite")
    fast = rules(run_idle_s=0.3, delivery_deadline_s=0.2)
    config = ConsolidationConfig(min_runs_per_version=20)
    clock = Clock()

    def start():
        deploys = DeployDetector(fast, state(), clock_s=clock, config=config,
                                 ledger=ActivityLedger(path, clock_s=clock))
        return build_detectors(fast, state(), deploys=deploys), deploys

    detectors, deploys = start()
    before = feed(detectors, deploys, _runs("svc", "1.0", count=20), clock, 0.1)
    assert before == []  # none judged yet
    _stop(detectors, deploys, clock)
    clock.now_s += 5
    detectors, deploys = start()
    found = []
    for version in ("2.0", "1.0", "2.0", "1.0"):  # a rolling deploy
        found += feed(detectors, deploys, _runs("svc", version, count=10), clock, 1)
    found += feed(detectors, deploys, [], clock, 3)
    assert [f.service_version for f in found if f.rule == "delivery.missing_required_events"] == (
        ["2.0"] * 10 + ["1.0"] * 10 + ["2.0"] * 10 + ["1.0"] * 10)
    assert _delivery_rates(deploys) == {"1.0": (None, 20, 1.0), "2.0": ("1.0", 20, 1.0)}
    assert [f for f in found if f.rule == DEPLOY_REGRESSION] == []
    deploys.close()


def test_a_base_whose_latest_runs_are_not_judged_yet_is_not_compared_with_their_rate_understated():
    """No restart: in a rolling deploy 1.0 runs 10 runs, 2.0 its 20, then 1.0 10 more. For
    rules.run_idle_s after those, 1.0 had 20 runs of which 10 were judged (rate 0.5) and 2.0 20 of 20
    (1.0), the same code: a deploy.regression. A version's rates count runs once judged."""
    slow = rules(run_idle_s=3.0)
    clock = Clock()
    deploys = DeployDetector(slow, state(), clock_s=clock,
                             config=ConsolidationConfig(min_runs_per_version=20))
    detectors = build_detectors(slow, state(), deploys=deploys)
    found = feed(detectors, deploys, _runs("svc", "1.0", count=10), clock, 4)
    found += feed(detectors, deploys, _runs("svc", "2.0", count=20), clock, 4)
    found += feed(detectors, deploys, _runs("svc", "1.0", count=10), clock, 2)
    assert _delivery_rates(deploys) == {"1.0": (None, 10, 1.0), "2.0": ("1.0", 20, 1.0)}
    found += feed(detectors, deploys, [], clock, 4)
    assert _delivery_rates(deploys) == {"1.0": (None, 20, 1.0), "2.0": ("1.0", 20, 1.0)}
    assert len([f for f in found if f.rule == "delivery.missing_required_events"]) == 40
    assert [f for f in found if f.rule == DEPLOY_REGRESSION] == []


def test_runs_settle_after_the_delivery_wait_export_allowance_included():
    """An undelivered event is found deadline + export allowance after its emit arrived: a run
    counts in its version's rates only once that finding could have come (once, after the deadline
    alone, so a version's rates could miss the findings a 5 s export schedule delays)."""
    assert deploys_module.settle_s(rules(delivery_deadline_s=2.0, delivery_export_allowance_s=6.0,
                                         run_idle_s=1.0)) == 8.0 + deploys_module.SETTLE_MARGIN_S
    assert deploys_module.settle_s(rules(delivery_deadline_s=2.0, delivery_export_allowance_s=0.0,
                                         run_idle_s=3.0)) == 3.0 + deploys_module.SETTLE_MARGIN_S


def test_the_heartbeats_it_saw_give_the_pipeline_each_processs_dropped_total():
    """The pipeline's heartbeat tracker asks it (held_dropped_total) for the dropped-spans total its
    ledger holds of a process it first hears late: the one of the process's last heartbeat seen."""
    deploys = DeployDetector(rules(), state(), config=CONFIG, clock_s=Clock())
    since_s = NOW / 1e9 - 600
    deploys.heartbeats_seen([SpanRecord("ab" * 16, "cd" * 8, None, "pathwatch.heartbeat", 0, 1,
                                        kind="heartbeat", service_name="api",
                                        service_instance="pod-0", dropped_spans=12,
                                        heartbeat_sequence=5, counts_since_s=since_s)], NOW)
    assert deploys.held_dropped_total("api", "pod-0", since_s) == 12
    assert deploys.held_dropped_total("api", "pod-0", since_s + 1) is None
