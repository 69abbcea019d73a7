"""The demo's judge on made-up observations and findings: what counts as agreement."""

from __future__ import annotations

from collections import Counter
from typing import Any

from examples.demo_judge import ADAPTER, BRIDGE, ENGINE, RETIRED_ENGINE, judge
from examples.observations import REQUIRED_EVENTS, Leak, Observation, RunRecord

USERS = ("user-01", "user-02", "user-03")


def _finding(rule: str, run_id: str, trace_id: str, implementation: str = BRIDGE,
             entry_point: str = "/api/runs") -> dict[str, Any]:
    return {"rule": rule, "run_id": run_id, "trace_id": trace_id, "implementation": implementation,
            "entry_point": entry_point, "incident_id": "i1"}


def _s10() -> Observation:
    """S10: every user's first run is run_req-1; each one's tool_completed reached the next user."""
    runs = [RunRecord(user=user, thread_id=f"t{i}", via="http", order=i, run_id="run_req-1",
                      status="completed",
                      received=Counter({kind: 1 for kind in REQUIRED_EVENTS if kind != "tool_completed"}))
            for i, user in enumerate(USERS)]
    leaks = [Leak(recipient=USERS[(i + 1) % 3], owner=user, run_id="run_req-1", thread_id=f"t{i}",
                  event_type="tool_completed") for i, user in enumerate(USERS)]
    return Observation("S10", runs, leaks)


def test_s10_counts_each_users_leaked_run_even_when_they_share_a_run_id() -> None:
    rule = "bleed.target_vs_socket_owner"
    every_run = [_finding(rule, "run_req-1", f"trace-{user}") for user in USERS]
    assert judge(_s10(), every_run).agrees
    assert judge(_s10(), every_run).recall[rule] == (3, 3)

    one_run = judge(_s10(), every_run[:1] * 3)  # three findings, all of one user's run
    assert one_run.recall[rule] == (1, 3)
    assert not one_run.agrees
    assert f"{rule}: 2 affected run(s) without a finding" in one_run.problems


def test_findings_on_more_runs_of_a_shared_run_id_than_leaked_are_named() -> None:
    rule = "bleed.target_vs_socket_owner"
    findings = [_finding(rule, "run_req-1", f"trace-{n}") for n in range(4)]
    verdict = judge(_s10(), findings)
    assert verdict.recall[rule] == (3, 3)
    assert verdict.problems == [f"{rule} on 1 run(s) of the shared run id run_req-1 that the clients saw "
                                "unaffected"]


def _s11() -> Observation:
    runs = [RunRecord(user=USERS[i % 3], thread_id=f"t{i}", via="websocket", order=i, run_id=f"run-{i}",
                      status="completed", engine="IsolatedExecutionEngine" if i < 3 else "UserExecutionEngine",
                      received=Counter({kind: 1 for kind in REQUIRED_EVENTS})) for i in range(6)]
    return Observation("S11", runs, leaks=[])


def test_s11_allows_an_entry_point_reaching_the_canonical_engine_during_the_rollout() -> None:
    retired = _finding("duplicate.retired_invoked", "run-0", "t0", RETIRED_ENGINE, "/ws")
    new_path = _finding("duplicate.entry_point_paths", "run-3", "t3", ENGINE, "/ws")
    assert judge(_s11(), [retired]).agrees
    assert judge(_s11(), [retired, new_path]).agrees  # --users 5: the warning no longer inhibits it
    assert judge(_s11(), [retired, new_path]).recall == {"duplicate.retired_invoked": (1, 1)}
    assert not judge(_s11(), [new_path]).agrees  # the retired engine's warning is still required
    elsewhere = _finding("duplicate.entry_point_paths", "run-3", "t3", ADAPTER, "/ws")
    assert judge(_s11(), [retired, elsewhere]).problems == [f"duplicate.entry_point_paths names {ADAPTER}"]
