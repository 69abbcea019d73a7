"""The caller index: who still calls each implementation, bounded whatever the backend sends."""

from __future__ import annotations

from sidecar.consolidation import CallerIndex


def test_roles_are_bounded_too():
    index = CallerIndex(max_implementations=4)
    for n in range(100):
        index.observe_calls(f"role-{n}", "demo.X", f"app.caller{n}", False, "/ws", 1, 0.0)
    assert len(index.callers) == 4 and index.overflow == 96


def test_a_known_implementation_keeps_counting_after_the_limit():
    index = CallerIndex(max_implementations=1)
    index.observe_calls("execution_engine", "demo.X", "app.a", False, "/ws", 2, 0.0)
    index.observe_calls("execution_engine", "demo.Y", "app.a", False, "/ws", 1, 0.0)
    index.observe_calls("execution_engine", "demo.X", "app.a", False, "/ws", 3, 1.0)
    assert index.of("execution_engine", "demo.X")[0]["calls"] == 5 and index.overflow == 1


def test_the_caller_still_left_to_migrate_is_listed_however_many_came_before():
    """33 functions called a retired engine; 32 were migrated and only the 33rd still calls. The
    list used to keep the first 32 for good and count the 33rd's calls in a hidden overflow: the
    one caller left was never listed. A new caller of a full list takes the place of the least
    recently seen one (counted per implementation in callers_dropped)."""
    index = CallerIndex(max_callers=32)
    for n in range(32):
        index.observe_calls("execution_engine", "demo.Legacy", f"app.jobs.caller_{n}", False, "/ws",
                            1, 100.0 + n)
    index.observe_calls("execution_engine", "demo.Legacy", "app.jobs.caller_32", False, "/ws", 10,
                        200.0)
    [row] = index.to_migrate(set(), {("execution_engine", "demo.Legacy")}, now_s=200.0)
    names = [c["caller"] for c in row["callers"]]
    assert len(names) == 32 and "app.jobs.caller_32" in names and "app.jobs.caller_0" not in names
    assert row["callers_dropped"] == 1 and index.overflow == 0


def test_a_caller_idle_for_the_window_is_aged_out():
    index = CallerIndex(window_s=1000.0)
    index.observe_calls("execution_engine", "demo.Legacy", "app.old", False, "/ws", 1, 0.0)
    index.observe_calls("execution_engine", "demo.Legacy", "app.new", False, "/ws", 1, 900.0)
    retired = {("execution_engine", "demo.Legacy")}
    assert [c["caller"] for c in index.to_migrate(set(), retired, now_s=900.0)[0]["callers"]] == [
        "app.new", "app.old"]
    assert [c["caller"] for c in index.to_migrate(set(), retired, now_s=1500.0)[0]["callers"]] == [
        "app.new"]  # read at once, before the pipeline expires it
    index.expire(1500.0)
    assert list(index.callers[("execution_engine", "demo.Legacy")]) == ["app.new"]
    index.expire(2500.0)  # the last one too: the pair goes, its slot is free
    assert index.callers == {} and index.to_migrate(set(), retired, now_s=2500.0) == []


def test_an_entry_point_migrated_away_is_no_longer_listed_for_its_caller():
    """One handler serves /search and /summarize; /search was moved to the canonical engine, the
    handler still reaches the old one from /summarize. /search was listed for good (and past 8
    entry points a new one was not listed at all)."""
    index = CallerIndex(window_s=1000.0)
    old = ("execution_engine", "demo.Beta")
    index.observe_calls(*old, "app.run", False, "/search", 1, 0.0)
    index.observe_calls(*old, "app.run", False, "/summarize", 1, 1500.0)
    [row] = index.to_migrate(set(), {old}, now_s=1500.0)
    assert row["callers"][0]["entry_points"] == ["/summarize"]
    for n in range(9):  # a new entry point of a full list takes the least recently seen one's place
        index.observe_calls(*old, "app.run", False, f"/e{n}", 1, 1600.0 + n)
    [row] = index.to_migrate(set(), {old}, now_s=1700.0)
    assert row["callers"][0]["entry_points"] == sorted(f"/e{n}" for n in range(1, 9))


def test_a_class_another_service_names_canonical_is_still_to_migrate_where_it_is_not():
    """A gateway: service b's path map names Core canonical; service a's new one names Beta and
    a's handler still calls Core. Core was kept off callers_to_migrate for every service (it is
    b's canonical): a's caller is listed, b's is not."""
    index = CallerIndex(window_s=1000.0)
    core, beta = ("execution_engine", "app.Core"), ("execution_engine", "app.Beta")
    index.observe_calls(*core, "a.routes.chat", False, "/chat", 3, 100.0, "a")
    index.observe_calls(*core, "b.routes.plan", False, "/plan", 2, 100.0, "b")
    index.observe_calls(*beta, "a.routes.summarize", False, "/summarize", 1, 100.0, "a")
    canonical_of = {("a", "execution_engine"): {beta}, ("b", "execution_engine"): {core}}
    rows = index.to_migrate({core, beta}, set(), now_s=100.0, canonical_of=canonical_of)
    assert [(row["implementation"], [c["caller"] for c in row["callers"]]) for row in rows] == [
        ("app.Core", ["a.routes.chat"])]
    # without the services' canonical classes (as before): nothing to migrate
    assert index.to_migrate({core, beta}, set(), now_s=100.0) == []
    # a's calls of Core older than the window: nothing left to migrate there
    assert index.to_migrate({core, beta}, set(), now_s=1200.0, canonical_of=canonical_of) == []


def test_a_class_canonical_in_one_service_and_retired_in_another_lists_only_the_others_callers():
    """A gateway: a's path map names Core canonical, b's retires it (and names Beta, or no class,
    canonical). The class's retired flag is its latest call's: when b called last, every caller of
    Core was listed to migrate, a's own callers of its canonical class too, and the list flipped
    back with a's next call. The callers listed are those seen in a service that names another
    class canonical or retires Core at their latest call from it, whichever service called last."""
    index = CallerIndex(window_s=1000.0)
    core, beta = ("execution_engine", "app.Core"), ("execution_engine", "app.Beta")
    index.observe_calls(*core, "a.routes.chat", False, "/chat", 3, 100.0, "a")
    index.observe_calls(*core, "b.routes.plan", False, "/plan", 2, 101.0, "b", retired=True)
    index.observe_calls(*core, "c.routes.plan", False, "/plan", 2, 102.0, "c", retired=True)
    canonical_of = {("a", "execution_engine"): {core}, ("b", "execution_engine"): {beta}}
    for retired in (set(), {core}):  # the latest call's flag: a's, or b's / c's
        rows = index.to_migrate({core, beta}, retired, now_s=200.0, canonical_of=canonical_of)
        assert [(row["implementation"], sorted(c["caller"] for c in row["callers"]))
                for row in rows] == [("app.Core", ["b.routes.plan", "c.routes.plan"])]
    # c's path map no longer retires it (a rollback), and it names no canonical class: off the list
    index.observe_calls(*core, "c.routes.plan", False, "/plan", 1, 300.0, "c")
    rows = index.to_migrate({core, beta}, {core}, now_s=300.0, canonical_of=canonical_of)
    assert [sorted(c["caller"] for c in row["callers"]) for row in rows] == [["b.routes.plan"]]
    # b's calls older than the window: nothing left to migrate
    assert index.to_migrate({core, beta}, {core}, now_s=1200.0, canonical_of=canonical_of) == []


def test_the_detector_lists_a_class_canonical_in_one_service_only_for_the_service_retiring_it():
    """The same through the deploys detector's snapshot: the list did not flip with whichever
    service called last."""
    from sidecar.detectors.deploys import DeployDetector
    from tests.sidecar.detectors.factory import S, Trace

    now_s = [1_800_000_000.0]
    deploys = DeployDetector(clock_s=lambda: now_s[0])
    core, beta = "app.Core", "app.Beta"

    def call(service: str, implementation: str, caller: str, canonical: bool, retired: bool) -> None:
        now_s[0] += 1
        span = Trace(start_ns=int(now_s[0]) * S).execute(
            implementation, canonical=canonical, retired=retired, service_name=service,
            caller=caller)
        deploys.consume([span], int(now_s[0]) * S)

    def to_migrate() -> list:
        return [(row["implementation"], [c["caller"] for c in row["callers"]])
                for row in deploys.snapshot()["callers_to_migrate"]]

    call("a", core, "a.routes.chat", True, False)
    call("b", beta, "b.routes.summarize", True, False)
    call("b", core, "b.routes.plan", False, True)
    assert to_migrate() == [("app.Core", ["b.routes.plan"])]  # b called last
    call("a", core, "a.routes.chat", True, False)
    assert to_migrate() == [("app.Core", ["b.routes.plan"])]  # a called last


def test_a_class_called_once_exactly_a_window_ago_is_not_listed_beside_its_safe_to_delete():
    """At its window's edge (now = its one call + the window) a class's verdict is
    safe_to_delete (in use until then, tests/sidecar/consolidation/test_verdicts.py), but
    callers_to_migrate still listed the caller of that call, with its entry point (a caller is
    aged out once not seen for the window: seen exactly a window ago, it still counted): the API
    said 'delete it' and 'migrate its caller first' at once. Both now read the window alike."""
    from sidecar.config import ConsolidationConfig
    from sidecar.consolidation import ActivityLedger
    from sidecar.detectors.deploys import DeployDetector
    from tests.sidecar.detectors.factory import ENGINE, RETIRED_ENGINE, Trace

    window, t0 = 1000.0, 1_800_000_000.0
    now = [t0]
    deploys = DeployDetector(config=ConsolidationConfig(safe_to_delete_window_s=window),
                             clock_s=lambda: now[0],
                             ledger=ActivityLedger(":memory:", clock_s=lambda: now[0], max_gap_s=window))

    def call(implementation: str, caller: str) -> None:
        span = Trace(start_ns=int(now[0] * 1e9)).execute(
            implementation, canonical=implementation == ENGINE,
            retired=implementation == RETIRED_ENGINE, caller=caller)
        deploys.consume([span], int(now[0] * 1e9))

    call(RETIRED_ENGINE, "app.jobs.nightly")  # its one call
    for step in range(1, 11):  # the role stays busy, watched (flushed) all along
        now[0] = t0 + step * window / 10 - (0.001 if step == 10 else 0.0)
        call(ENGINE, "app.routes.run")
        deploys.flush()
    # a moment before the edge: in use, its caller listed
    before = deploys.snapshot(now[0])
    assert [row["verdict"] for row in before["verdicts"]["implementations"]
            if row["implementation"] == RETIRED_ENGINE] == ["in_use"]
    assert [(row["implementation"], [c["caller"] for c in row["callers"]],
             row["callers"][0]["entry_points"]) for row in before["callers_to_migrate"]] == [
        (RETIRED_ENGINE, ["app.jobs.nightly"], ["/ws"])]
    edge = deploys.snapshot(t0 + window)  # read before the pipeline's next flush expires it
    [legacy] = [row for row in edge["verdicts"]["implementations"]
                if row["implementation"] == RETIRED_ENGINE]
    assert legacy["verdict"] == "safe_to_delete"
    assert [row["implementation"] for row in edge["callers_to_migrate"]] == []
