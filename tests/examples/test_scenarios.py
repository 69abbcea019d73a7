"""Each scenario shows its bug in what the CLIENTS received, under 20 concurrent users; S0 shows none.

These are the ground truth the sidecar's findings are judged against, so they assert from the
clients' side only (plus the backend's own engine report for S11).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from examples.agent_backend.server import BackendProcess
from examples.observations import CANONICAL_ENGINE, REQUIRED_EVENTS, RETIRED_ENGINE, Observation
from examples.traffic import drive
from tests.examples.conftest import RUNS_PER_USER, USERS, Drive


def _all_runs_answered(observation: Observation) -> None:
    assert observation.runs_started == USERS * RUNS_PER_USER
    assert not observation.errors
    assert all(run.status == "completed" for run in observation.runs), Counter(r.status for r in observation.runs)
    assert {run.via for run in observation.runs} == {"http", "websocket"}


def test_s0_is_perfectly_clean(driven: Drive) -> None:
    s0 = driven.observations["S0"]
    _all_runs_answered(s0)
    assert s0.events_received == s0.events_expected == USERS * RUNS_PER_USER * len(REQUIRED_EVENTS)
    assert not s0.leaks and s0.missing_events == 0 and s0.duplicate_events == 0
    assert all(run.event_engines == {CANONICAL_ENGINE} for run in s0.runs)
    assert s0.is_clean


def test_s1_tool_events_of_one_user_reach_another_users_socket(driven: Drive) -> None:
    s1 = driven.observations["S1"]
    _all_runs_answered(s1)
    assert s1.leaks, "no cross-user event under 20 concurrent users"
    assert all(leak.owner is not None and leak.owner != leak.recipient for leak in s1.leaks)
    assert {leak.event_type for leak in s1.leaks} == {"tool_executing", "tool_completed"}
    # the victims are missing exactly what leaked; nothing else is lost or doubled
    missing = Counter(kind for run in s1.runs for kind in run.missing())
    assert set(missing) == {"tool_executing", "tool_completed"}
    assert sum(missing.values()) == len(s1.leaks)
    assert s1.duplicate_events == 0


#: drives of S1 at the least traffic the demo accepts; before the factory's load waited for the other
#: request, about one in four showed no leak (the two requests did not overlap in a 5 ms window)
S1_SMALL_DRIVES = 20


def test_s1_shows_its_bug_at_two_users_one_run_every_time(backend: BackendProcess) -> None:
    for drive_number in range(S1_SMALL_DRIVES):
        s1 = asyncio.run(drive(backend.url, ["S1"], users=2, runs_per_user=1))["S1"]
        assert s1.runs_started == 2 and not s1.errors
        assert all(run.status == "completed" for run in s1.runs)
        # the first request's tool events went to the other user, who received its own too
        assert s1.leaks, f"drive {drive_number + 1}: no cross-user event with 2 users x 1 run"
        assert {leak.event_type for leak in s1.leaks} == {"tool_executing", "tool_completed"}
        assert len({leak.owner for leak in s1.leaks}) == 1
        assert all(leak.owner is not None and leak.owner != leak.recipient for leak in s1.leaks)
        missing = Counter(kind for run in s1.runs for kind in run.missing())
        assert sum(missing.values()) == len(s1.leaks) and s1.duplicate_events == 0


def test_s2_progress_events_addressed_to_the_thread_id_are_lost(driven: Drive) -> None:
    s2 = driven.observations["S2"]
    _all_runs_answered(s2)
    assert all(run.missing() == ["agent_thinking"] for run in s2.runs)
    assert not s2.leaks and s2.duplicate_events == 0


def test_s3_emitter_built_with_swapped_arguments_delivers_nothing(driven: Drive) -> None:
    s3 = driven.observations["S3"]
    _all_runs_answered(s3)
    assert s3.events_received == 0
    assert s3.missing_events == s3.events_expected
    assert not s3.leaks


def test_s4_each_run_executes_twice_by_two_engines(driven: Drive) -> None:
    s4 = driven.observations["S4"]
    _all_runs_answered(s4)
    assert s4.runs_with_two_executions == s4.runs_started
    assert all(run.event_engines == {CANONICAL_ENGINE, "RequestScopedExecutionEngine"} for run in s4.runs)
    assert all(run.duplicates() == {kind: 1 for kind in REQUIRED_EVENTS} for run in s4.runs)
    assert not s4.leaks and s4.missing_events == 0


def test_s5_agent_started_arrives_three_times(driven: Drive) -> None:
    s5 = driven.observations["S5"]
    _all_runs_answered(s5)
    assert all(run.duplicates() == {"agent_started": 2} for run in s5.runs)
    assert s5.runs_with_two_executions == 0 and not s5.leaks and s5.missing_events == 0


def test_s6_every_event_arrives_three_times(driven: Drive) -> None:
    s6 = driven.observations["S6"]
    _all_runs_answered(s6)
    assert all(run.duplicates() == {kind: 2 for kind in REQUIRED_EVENTS} for run in s6.runs)
    assert s6.runs_with_two_executions == 0 and not s6.leaks and s6.missing_events == 0


def test_s7_events_into_a_fresh_manager_never_arrive(driven: Drive) -> None:
    s7 = driven.observations["S7"]
    _all_runs_answered(s7)
    assert s7.events_received == 0 and s7.missing_events == s7.events_expected
    assert not s7.leaks


def test_s8_swallowed_notify_failure_loses_an_event_of_a_successful_run(driven: Drive) -> None:
    s8 = driven.observations["S8"]
    _all_runs_answered(s8)  # the agent "succeeds"
    assert all(run.missing() == ["tool_completed"] for run in s8.runs)
    assert not s8.leaks and s8.duplicate_events == 0


def test_s9_events_queued_on_the_other_manager_never_arrive(driven: Drive) -> None:
    s9 = driven.observations["S9"]
    _all_runs_answered(s9)
    assert s9.events_received == 0 and s9.missing_events == s9.events_expected
    assert not s9.leaks
    assert driven.debug_after["legacy_queued"] > 0  # they sit in the other instance's queue


def test_s10_shared_run_id_sends_one_users_events_to_another(driven: Drive) -> None:
    s10 = driven.observations["S10"]
    _all_runs_answered(s10)
    users_per_run_id = Counter()
    for run_id in {(run.run_id, run.user) for run in s10.runs}:
        users_per_run_id[run_id[0]] += 1
    assert max(users_per_run_id.values()) > 1, "no two users' runs shared a run id"
    assert s10.leaks
    assert all(leak.owner is not None and leak.owner != leak.recipient for leak in s10.leaks)
    assert s10.missing_events == len(s10.leaks)  # what one user lost, another received
    assert s10.duplicate_events == 0


def test_s11_traffic_shifts_from_the_retired_to_the_canonical_engine(driven: Drive) -> None:
    s11 = driven.observations["S11"]
    _all_runs_answered(s11)
    assert s11.is_clean  # a consolidation problem, invisible to users
    engines = Counter(s11.engine_timeline())
    assert set(engines) == {CANONICAL_ENGINE, RETIRED_ENGINE}
    assert s11.canonical_share(0) < s11.canonical_share(2)
    # runs decided at full rollout all ran on the canonical engine; the first ones on the retired one
    by_percent = sorted(s11.runs, key=lambda run: run.rollout_percent)
    assert by_percent[0].rollout_percent == 0 and by_percent[0].engine == RETIRED_ENGINE
    full = [run for run in s11.runs if run.rollout_percent == 100]
    assert full and all(run.engine == CANONICAL_ENGINE for run in full)
    assert all(run.event_engines == {run.engine} for run in s11.runs)  # the events agree with the response
    assert driven.debug_after["rollout_percent"] == 100
    assert driven.debug_after["runs"]["S11"] == dict(engines)
