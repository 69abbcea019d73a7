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
