"""Every rule, end to end: instrumented FastAPI code -> pathwatch's OTLP/gRPC exporter -> the real
sidecar process -> the finding, the incident via the API and the metric. And per rule the nearest
correct behaviour, which must raise nothing, judged after the sidecar provably processed it.

One sidecar and one instrumented backend per module; cases are isolated by their own routes (entry
points), sockets and backend state, and each test waits until the sidecar has judged its runs.
"""

from __future__ import annotations

import pytest

from sidecar.rules import CATALOG
from tests.e2e.fixture_app import BARRIER_ROUTE, instrumented_backend
from tests.e2e.fixture_sidecar import Sidecar
from tests.e2e.rules_scenarios import APP_CASES, CLEAN_CASE, RULE_CASES, CaseEnv, clean_run
from tests.support import wait_until

pytestmark = [pytest.mark.timeout(120)]

RULES = {
    "required_events": ["agent_started", "agent_completed"],
    "terminal_events": ["agent_completed", "agent_error"],
    "exactly_once_events": ["agent_started", "agent_completed"],
    # the deadline is shorter than the idle time, and no export allowance (the backend exports
    # through pathwatch's own processor, flushed by the test): once a run is judged, so are its
    # events -- with the default 6 s allowance a case's "nothing" would be looked at before any
    # delivery finding could come, and pass on an empty result
    "delivery_deadline_s": 0.3,
    "delivery_export_allowance_s": 0.0,
    "run_idle_s": 0.6,
}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sidecar")
    with Sidecar(workdir, rules=RULES, incidents_path=str(workdir / "incidents.sqlite")) as process:
        yield process


@pytest.fixture(scope="module")
def backend(sidecar):
    with instrumented_backend(sidecar.grpc_endpoint, APP_CASES) as instrumented:
        yield instrumented


def runs_judged(sidecar: Sidecar) -> float:
    return sidecar.metric("pathwatch_runs_completed_total")


def calls_at(sidecar: Sidecar, *entry_points: str) -> float:
    return sum(sidecar.metric("pathwatch_calls_total", entry_point=e) for e in entry_points)


def barrier(sidecar: Sidecar, backend) -> None:
    """Send a marker call and wait until the sidecar counted it. The pipeline is one thread and the
    inventory publishes on tick: everything accepted before the marker is processed, and every
    finding of an earlier tick recorded, once the marker shows."""
    before = calls_at(sidecar, BARRIER_ROUTE)
    response = backend.client.post(BARRIER_ROUTE, headers={"x-user-id": "barrier"})
    assert response.status_code == 200
    backend.flush()
    wait_until(lambda: calls_at(sidecar, BARRIER_ROUTE) > before, timeout=20,
               message="the barrier call counted by the sidecar")


def settle(sidecar: Sidecar, backend, runs_before: float, runs: int) -> None:
    """Wait until the sidecar judged the case's runs (idle time passed, and the delivery deadline
    of every event of those runs with it), then until that judgement's findings are recorded."""
    backend.flush()
    wait_until(lambda: runs_judged(sidecar) >= runs_before + runs, timeout=20,
               message=f"{runs} run(s) judged by the sidecar")
    barrier(sidecar, backend)


def incidents_at(sidecar: Sidecar, env: CaseEnv) -> list[dict]:
    return [i for i in sidecar.incidents() if i["entry_point"] in env.entry_points]


#: compare two backend versions: proved end to end in tests/e2e/test_deploy_e2e.py
VERSION_RULES = {rule for rule, spec in CATALOG.items() if spec.family == "deploy"}


def test_every_rule_has_an_end_to_end_case():
    assert set(RULE_CASES) == set(CATALOG) - VERSION_RULES


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_the_bug_raises_its_rule(rule, sidecar, backend):
    case = RULE_CASES[rule]
    env = CaseEnv(backend, case.case, positive=True)
    findings_before = sidecar.metric("pathwatch_findings_total", rule=rule)
    runs_before = runs_judged(sidecar)

    outcome = case.scenario(env)
    backend.flush()

    entry_point = env.ws_route if case.culprit_on_socket else env.route

    def incident_of_this_trace():
        found = [i for i in sidecar.incidents(rule=rule) if i["entry_point"] == entry_point]
        return found if found and outcome.trace_id in found[0]["sample_trace_ids"] else None

    (incident,) = wait_until(incident_of_this_trace, timeout=20,
                             message=f"a {rule} incident at {entry_point} sampling trace "
                                     f"{outcome.trace_id}")
    assert incident["rule"] == rule
    assert incident["severity"] == CATALOG[rule].severity.value
    assert (incident["role"], incident["implementation"]) == (case.role, case.implementation)
    assert incident["count"] >= 1 and incident["status"] == "open"
    detail = sidecar.incident(incident["id"])
    same = ("id", "rule", "severity", "role", "implementation", "entry_point")
    assert {k: detail[k] for k in same} == {k: incident[k] for k in same}
    assert outcome.trace_id in detail["sample_trace_ids"]
    assert sidecar.metric("pathwatch_findings_total", rule=rule) > findings_before
    assert sidecar.metric("pathwatch_findings_total", rule=rule, entry_point=entry_point,
                          implementation=case.implementation) >= 1

    settle(sidecar, backend, runs_before, outcome.runs)
    assert {i["rule"] for i in incidents_at(sidecar, env)} == {rule}, "exactly this rule"


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_the_nearest_correct_behaviour_raises_nothing(rule, sidecar, backend):
    case = RULE_CASES[rule]
    env = CaseEnv(backend, case.case, positive=False)
    calls_before = calls_at(sidecar, *env.entry_points)
    runs_before = runs_judged(sidecar)

    outcome = case.scenario(env)
    settle(sidecar, backend, runs_before, outcome.runs)

    assert calls_at(sidecar, *env.entry_points) > calls_before, "the sidecar saw the case's calls"
    assert incidents_at(sidecar, env) == []
    assert all(outcome.trace_id not in i["sample_trace_ids"] for i in sidecar.incidents())
    assert sum(sidecar.metric("pathwatch_findings_total", entry_point=e)
               for e in env.entry_points) == 0


def test_a_clean_run_raises_no_finding_at_all(sidecar, backend):
    env = CaseEnv(backend, CLEAN_CASE, positive=False)
    findings_before = sidecar.metric("pathwatch_findings_total")
    complete_before = sidecar.metric("pathwatch_runs_completed_total", outcome="complete")
    written_before = sidecar.metric("pathwatch_events_written_total", outcome="written")
    runs_before = runs_judged(sidecar)

    outcome = clean_run(env)
    settle(sidecar, backend, runs_before, outcome.runs)

    assert sidecar.metric("pathwatch_runs_completed_total", outcome="complete") == complete_before + 1
    assert sidecar.metric("pathwatch_events_written_total", outcome="written") >= written_before + 2
    assert sidecar.metric("pathwatch_findings_total") == findings_before
    assert incidents_at(sidecar, env) == []
