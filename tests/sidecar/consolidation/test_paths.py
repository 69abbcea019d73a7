"""The path tracker: a run judged idle settles, and its late spans move it to the path it took."""

from __future__ import annotations

from sidecar.consolidation import PathTracker
from tests.sidecar.detectors.factory import MS, S, Trace

NOW_NS = 1_800_000_000 * S


def test_a_late_span_moves_an_overflowed_run_onto_the_path_it_took():
    tracker = PathTracker(max_units=100, idle_s=5, max_paths=1, settle_s=60)
    tracker.batch_started(NOW_NS / 1e9)
    whole = Trace(entry_point="/ws")
    tracker.observe(whole.execute(start_ns=whole.clock - 10 * MS))
    tracker.observe(whole.emit("agent_started"))
    tracker.request_ended(whole.trace_id, NOW_NS / 1e9)
    split = Trace(entry_point="/ws")
    assert tracker.observe(split.emit("agent_started")) is True
    tracker.advance(NOW_NS)
    tracker.advance(NOW_NS + 7 * S)  # idle: judged on a path beyond the limit
    assert tracker.overflow_runs == {"/ws": 1}
    tracker.batch_started(NOW_NS / 1e9 + 7)
    assert tracker.observe(split.execute(start_ns=split.clock - 10 * MS)) is False  # reopened
    tracker.advance(NOW_NS + 8 * S)
    tracker.advance(NOW_NS + 14 * S)
    ws = tracker.snapshot(set())["entry_points"]["/ws"]
    assert ws["runs"] == 2 and ws["overflow_runs"] == 0 and [p["runs"] for p in ws["paths"]] == [2]
    assert len(tracker.take_completed()) == 1  # the whole run; the other is still settling
    tracker.advance(NOW_NS + 80 * S)
    [settled] = tracker.take_completed()
    assert settled.id == ws["paths"][0]["id"] and not settled.overflowed


def test_two_services_running_the_same_version_string_are_kept_apart_on_a_path():
    """A gateway: service a's version v2 moved /chat to the canonical engine, service b (same
    monorepo commit, v2 too) still takes the old path. The old path's runs were listed under
    "v2" alone, as if a's v2 still took it; ``services`` says whose they are."""
    tracker = PathTracker(max_units=100, idle_s=5, max_paths=8, settle_s=60)
    tracker.batch_started(NOW_NS / 1e9)
    for service, engine, runs in (("a", "app.Core", 3), ("b", "app.Old", 2), ("a", "app.Old", 1)):
        for _ in range(runs):
            trace = Trace(entry_point="/chat")
            tracker.observe(trace.execute(engine, service_name=service, service_version="v2"))
            tracker.request_ended(trace.trace_id, NOW_NS / 1e9)
    paths = {p["steps"][0]["implementation"]: p
             for p in tracker.snapshot(set())["entry_points"]["/chat"]["paths"]}
    assert paths["app.Old"]["versions"] == {"v2": 3}  # added up, as before
    assert paths["app.Old"]["services"] == {"a": {"v2": 1}, "b": {"v2": 2}}
    assert paths["app.Core"]["services"] == {"a": {"v2": 3}}
