"""End to end: the real sidecar process, the real backend under ``opentelemetry-instrument`` + uvicorn, 20
concurrent users per scenario on real WebSockets, and pathwatch's findings judged against what the
clients saw (the same stack and judge as ``make demo``).

For every scenario: the clients saw no symptom but those of the scenario's bug (S0, S11: none), every
expected rule fires for every run the clients saw affected (recall 100%), no other rule fires (S0:
nothing at all), and every finding names the culprit implementation below and the entry point its run
came in through.
"""

from __future__ import annotations

import pytest

from examples.demo import Progress, run_scenario
from examples.demo_judge import ENTRY_POINTS, judge
from examples.demo_stack import DemoStack

pytestmark = pytest.mark.timeout(600)

USERS = 20
RUNS_PER_USER = 3

# scenario -> rule -> the implementations (class names) a finding may name, read off the demo backend
# (examples/README.md). No other rule may fire: where a scenario makes an entry point reach a second
# implementation of a role (S1 the factory's emitter, S4 both supervisors, S11 the retired engine), the
# info-level duplicate.entry_point_paths is inhibited by that scenario's own finding on the same role and
# entry point (sidecar/inhibition.py); an alias or wrapper delegating to a nested one (S3, S8) is no
# second path at all.
CULPRITS: dict[str, dict[str, set[str]]] = {
    "S0": {},
    "S1": {"bleed.target_vs_socket_owner": {"UnifiedEventEmitter"},       # the factory's shared emitter
           "bleed.owner_vs_ambient": {"UnifiedEventEmitter"}},
    "S2": {"delivery.no_connection": {"WebSocketManager"}},                # send_to_thread(thread id)
    "S3": {"bleed.owner_vs_ambient": {"UnifiedEventEmitter"},             # built with swapped arguments
           "delivery.no_connection": {"WebSocketManager"}},
    "S4": {"duplicate.execution": {"SupervisorExecutionEngineAdapter",    # the second execution's engine
                                   "SupervisorAgent", "ChatOrchestrator"}},  # ... and its supervisor
    "S5": {"duplicate.emission": {"AgentWebSocketBridge"}},
    "S6": {"duplicate.emission": {"AgentWebSocketBridge"}},                # re-sends each event 3x
    "S7": {"delivery.no_connection": {"WebSocketManager"}},                # the fresh manager
    "S8": {"delivery.undelivered": {"WebSocketNotifier"},                 # swallowed the bridge's error
           "delivery.missing_required_events": {"UserExecutionEngine"}},
    "S9": {"delivery.undelivered": {"AgentWebSocketBridge"}},             # queued on the legacy manager
    "S10": {"bleed.target_vs_socket_owner": {"AgentWebSocketBridge"}},     # route_by_run, last writer
    "S11": {"duplicate.retired_invoked": {"IsolatedExecutionEngine"}},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with DemoStack.start(tmp_path_factory.mktemp("demo")) as running:
        yield running


def short(name: str | None) -> str:
    return (name or "?").rsplit(".", 1)[-1]


# in order: one backend and one sidecar serve them all, as in the demo (S11's rollout starts at 0)
@pytest.mark.parametrize("scenario", list(CULPRITS))
def test_pathwatch_agrees_with_the_clients(stack, scenario):
    observation, findings, shares = run_scenario(stack, scenario, USERS, RUNS_PER_USER, Progress())
    assert len({run.user for run in observation.runs}) == USERS
    assert observation.runs_started == USERS * RUNS_PER_USER and not observation.errors
    assert all(run.status for run in observation.runs), "every run answered"

    verdict = judge(observation, findings, shares)  # S11: the inventory's share rises to 100% as the clients'
    assert verdict.problems == [], stack.sidecar.log()[-2000:]

    expected = CULPRITS[scenario]
    named = {(f["rule"], short(f["implementation"])) for f in findings}
    assert {rule for rule, _ in named} == set(expected)
    for rule, implementation in named:
        assert implementation in expected[rule], f"{scenario}: {rule} names {implementation}"
    for finding in findings:
        assert finding["entry_point"] in ENTRY_POINTS.values()
    if scenario == "S0":
        assert findings == []
    if scenario in ("S1", "S10"):
        # one finding per event written to a socket of the wrong user: as many as the clients received
        leaks = [f for f in findings if f["rule"] == "bleed.target_vs_socket_owner"]
        assert observation.leaks and len(leaks) == len(observation.leaks)


# the least traffic the demo accepts for S1 (examples/demo_judge.py): its bug must show every time, or the
# demo would blame pathwatch for a bug the traffic did not show. Before S1's factory waited for the other
# request to reconfigure it, about one drive in four at 2 users x 1 run had no leak.
S1_SMALL_DRIVES = 4


def test_s1_at_two_users_one_run_is_found_every_time(stack):
    for number in range(S1_SMALL_DRIVES):
        observation, findings, shares = run_scenario(stack, "S1", 2, 1, Progress())
        assert observation.runs_started == 2 and not observation.errors
        assert observation.leaks, f"drive {number + 1}: the clients saw no leak"
        verdict = judge(observation, findings, shares)
        assert verdict.problems == [], stack.sidecar.log()[-2000:]
        found = {f["rule"] for f in findings}
        assert {"bleed.target_vs_socket_owner", "bleed.owner_vs_ambient"} <= found, found
        leaks = [f for f in findings if f["rule"] == "bleed.target_vs_socket_owner"]
        assert len(leaks) == len(observation.leaks)
