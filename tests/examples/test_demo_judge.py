"""The demo's judge on made-up observations and findings: what counts as agreement."""

from __future__ import annotations

from collections import Counter
from typing import Any

from examples.demo_judge import BRIDGE, judge
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
