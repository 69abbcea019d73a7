"""``make demo``'s own logic, without the processes: the S11 line, the command line, stopping."""

from __future__ import annotations

from collections import Counter

from examples.demo import format_shares, merge
from examples.observations import REQUIRED_EVENTS, Observation, RunRecord


def _wave(engines: list[str]) -> Observation:
    runs = [RunRecord(user=f"user-{i:02d}", thread_id=f"t{i}", via="websocket", order=i, run_id=f"r{i}",
                      status="completed", engine=engine + "ExecutionEngine",
                      received=Counter({kind: 1 for kind in REQUIRED_EVENTS}))
            for i, engine in enumerate(engines)]
    return Observation("S11", runs, leaks=[])


def test_s11_line_gives_clients_and_pathwatch_one_share_per_wave() -> None:
    waves = [_wave(["Isolated", "Isolated"]), _wave(["Isolated", "User"]), _wave(["User", "User"]),
             _wave(["User", "User"]), _wave(["User", "User"])]
    line = format_shares(merge(waves), [0.0, 0.5, 1.0, 1.0, 1.0], waves=5)
    assert "clients 0% -> 50% -> 100% -> 100% -> 100%;" in line  # not thirds of the runs
    assert "pathwatch inventory 0% -> 50% -> 100% -> 100% -> 100% (retired" in line
    assert "gone by the end" in line

    one = format_shares(merge([_wave(["Isolated", "User"])]), [0.5], waves=1)
    assert "clients 50%; pathwatch inventory 50% (retired IsolatedExecutionEngine still called" in one
