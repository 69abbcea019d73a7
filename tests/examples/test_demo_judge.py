"""The demo's judge on made-up observations and findings: what counts as agreement."""

from __future__ import annotations

from collections import Counter
from typing import Any

from examples.demo_judge import ADAPTER, BRIDGE, ENGINE, RETIRED_ENGINE, UNIFIED, judge
from examples.observations import REQUIRED_EVENTS, Leak, Observation, RunRecord

USERS = ("user-01", "user-02", "user-03")


def _finding(rule: str, run_id: str, trace_id: str, implementation: str = BRIDGE,
             entry_point: str = "/api/runs") -> dict[str, Any]:
    return {"rule": rule, "run_id": run_id, "trace_id": trace_id, "implementation": implementation,
            "entry_point": entry_point, "incident_id": "i1"}


def _clean_run(user: str, order: int, run_id: str, via: str = "http") -> RunRecord:
    """A run as the backend answered it: in the trace ``trace-<user>`` (its socket's, or its request's)."""
    return RunRecord(user=user, thread_id=f"t{order}", via=via, order=order, run_id=run_id, status="completed",
                     engine="UserExecutionEngine", received=Counter({kind: 1 for kind in REQUIRED_EVENTS}),
                     trace_id=f"trace-{user}")


def _leaked(observation: Observation, owner: RunRecord, recipient: str, event_type: str) -> None:
    """``owner``'s event ``event_type`` reached ``recipient``'s socket instead of its own."""
    owner.received[event_type] -= 1
    observation.leaks.append(Leak(recipient=recipient, owner=owner.user, run_id=owner.run_id,
                                  thread_id=owner.thread_id, event_type=event_type))


def test_s0_agrees_only_when_the_clients_ran_and_saw_nothing_wrong() -> None:
    clean = Observation("S0", [_clean_run(user, i, f"run-{i}") for i, user in enumerate(USERS)], [])
    assert judge(clean, []).agrees

    # a path pathwatch cannot see: user-01's tool_completed written to user-02's socket
    leaky = Observation("S0", [_clean_run(user, i, f"run-{i}") for i, user in enumerate(USERS)], [])
    _leaked(leaky, leaky.runs[0], "user-02", "tool_completed")
    verdict = judge(leaky, [])
    assert not verdict.agrees
    assert verdict.problems == ["the clients saw 1 leaked events (tool_completed x1), not a symptom of S0",
                                "the clients saw 1 missing events (tool_completed x1), not a symptom of S0"]

    unanswered = Observation("S0", [_clean_run("user-01", 0, "run-0")], [])
    unanswered.runs[0].status = None
    assert judge(unanswered, []).problems == ["the clients saw 1 runs not completed (no answer x1), "
                                              "not a symptom of S0"]

    nothing_ran = judge(Observation("S0", [], []), [])
    assert nothing_ran.problems == ["the clients started no run: nothing to judge"]


def test_a_symptom_the_scenario_does_not_cause_is_named_even_when_its_own_rule_fired() -> None:
    """S5: pathwatch finds the copies of agent_started; the clients also lost an event to another user."""
    runs = [_clean_run(user, i, f"run-{i}") for i, user in enumerate(USERS)]
    for run in runs:
        run.received["agent_started"] = 3
    s5 = Observation("S5", runs, [])
    copies = [_finding("duplicate.emission", f"run-{i}", f"trace-{run.user}") for i, run in enumerate(runs)]
    assert judge(s5, copies).agrees

    _leaked(s5, runs[0], "user-02", "tool_completed")
    runs[1].received["tool_executing"] = 2
    problems = judge(s5, copies).problems
    assert problems == ["the clients saw 1 leaked events (tool_completed x1), not a symptom of S5",
                        "the clients saw 1 missing events (tool_completed x1), not a symptom of S5",
                        "the clients saw 1 extra copies (tool_executing x1), not a symptom of S5"]


TARGET = "bleed.target_vs_socket_owner"


def _s10(users: tuple[str, ...] = USERS, via: str = "http") -> Observation:
    """S10: every user's first run is run_req-1; each one's tool_completed reached the next user."""
    s10 = Observation("S10", [_clean_run(user, i, "run_req-1", via) for i, user in enumerate(users)], [])
    for i, run in enumerate(s10.runs):
        _leaked(s10, run, users[(i + 1) % len(users)], "tool_completed")
    return s10


def test_s10_counts_each_users_leaked_run_even_when_they_share_a_run_id() -> None:
    every_run = [_finding(TARGET, "run_req-1", f"trace-{user}") for user in USERS]
    assert judge(_s10(), every_run).agrees
    assert judge(_s10(), every_run).recall[TARGET] == (3, 3)

    one_run = judge(_s10(), every_run[:1] * 3)  # three findings, all of one user's run
    assert one_run.recall[TARGET] == (1, 3)
    assert not one_run.agrees
    assert f"{TARGET}: 2 affected run(s) without a finding" in one_run.problems


def test_a_finding_is_on_the_run_whose_trace_it_is_in_not_on_any_run_of_its_run_id() -> None:
    """The reviewer's case: three users' runs share run_req-1; only user-01's HTTP run leaked. The one
    finding is in user-02's socket trace, named /ws: it is about user-02's run, which nothing leaked."""
    s10 = _s10()
    s10.runs[1:] = [_clean_run(user, i, "run_req-1", "websocket") for i, user in enumerate(USERS[1:], 1)]
    del s10.leaks[1:]
    s10.leaks[0] = Leak(recipient="user-03", owner="user-01", run_id="run_req-1", thread_id="t0",
                        event_type="tool_completed")
    wrong_run = judge(s10, [_finding(TARGET, "run_req-1", "trace-user-02", entry_point="/ws")])
    assert wrong_run.recall[TARGET] == (0, 1)
    assert wrong_run.problems == [f"{TARGET}: 1 affected run(s) without a finding",
                                  f"{TARGET} on 1 run(s) that the clients saw unaffected (user-02's run_req-1)"]

    # in user-01's trace, but naming the entry point of the other users' runs
    wrong_entry = judge(s10, [_finding(TARGET, "run_req-1", "trace-user-01", entry_point="/ws")])
    assert wrong_entry.problems == [f"{TARGET} names entry point /ws for user-01's run run_req-1 "
                                    "(over http: /api/runs)"]
    assert judge(s10, [_finding(TARGET, "run_req-1", "trace-user-01")]).agrees


def test_findings_on_more_runs_of_a_shared_run_id_than_leaked_are_named() -> None:
    s10 = _s10(USERS + ("user-04",))
    s10.runs[3].received["tool_completed"] += 1  # user-04's run kept its event: the leak to user-01 is undone
    del s10.leaks[3]
    findings = [_finding(TARGET, "run_req-1", f"trace-user-0{n}") for n in range(1, 5)]
    verdict = judge(s10, findings)
    assert verdict.recall[TARGET] == (3, 3)
    assert verdict.problems == [f"{TARGET} on 1 run(s) that the clients saw unaffected (user-04's run_req-1)"]

    elsewhere = judge(_s10(), [_finding(TARGET, "run_req-1", f"trace-{user}") for user in USERS]
                      + [_finding(TARGET, "run_req-1", "trace-of-no-run"), _finding(TARGET, "run_req-9", "t")])
    assert elsewhere.problems == [f"{TARGET}: 2 finding(s) on no run of the clients (run run_req-1 in trace "
                                  "trace-of-no-run, in which no client ran it ...)"]


def test_a_backend_that_reports_no_trace_ids_leaves_findings_on_no_run() -> None:
    s10 = _s10()
    for run in s10.runs:
        run.trace_id = None
    verdict = judge(s10, [_finding(TARGET, "run_req-1", f"trace-{user}") for user in USERS])
    assert verdict.recall[TARGET] == (0, 3)
    assert f"{TARGET}: 3 finding(s) on no run of the clients (run run_req-1, whose trace the backend did not " \
           "report ...)" in verdict.problems


def test_s1_allows_an_entry_point_reaching_the_factorys_emitter_where_no_run_leaked() -> None:
    """--users 2: user-02's HTTP run leaked to user-01; user-01's run on /ws used the factory's emitter
    too, without a leak, so no bleed on /ws inhibits the entry point's second event_emitter path."""
    s1 = Observation("S1", [_clean_run("user-01", 0, "run-0", "websocket"), _clean_run("user-02", 1, "run-1")], [])
    _leaked(s1, s1.runs[1], "user-01", "tool_completed")
    bleed = [_finding(rule, "run-1", "trace-user-02", UNIFIED)
             for rule in ("bleed.target_vs_socket_owner", "bleed.owner_vs_ambient")]
    new_path = _finding("duplicate.entry_point_paths", "run-0", "trace-user-01", UNIFIED, "/ws")
    assert judge(s1, bleed).agrees
    assert judge(s1, [*bleed, new_path]).agrees
    assert judge(s1, [*bleed, new_path]).recall == {"bleed.target_vs_socket_owner": (1, 1),
                                                    "bleed.owner_vs_ambient": (1, 1)}
    elsewhere = {**new_path, "implementation": BRIDGE}
    assert judge(s1, [*bleed, elsewhere]).problems == [f"duplicate.entry_point_paths names {BRIDGE}"]


def _s11(*waves: str) -> Observation:
    """One wave per argument, one run per letter: I on the retired engine, U on the canonical one."""
    engines = "".join(waves or ("III", "UUU"))
    runs = [RunRecord(user=USERS[i % 3], thread_id=f"t{i}", via="websocket", order=i, run_id=f"run-{i}",
                      status="completed",
                      engine="IsolatedExecutionEngine" if engine == "I" else "UserExecutionEngine",
                      received=Counter({kind: 1 for kind in REQUIRED_EVENTS})) for i, engine in enumerate(engines)]
    return Observation("S11", runs, leaks=[])


RISE = [0.0, 1.0]  # pathwatch's inventory per wave of _s11()


def test_s11_allows_an_entry_point_reaching_the_canonical_engine_during_the_rollout() -> None:
    retired = _finding("duplicate.retired_invoked", "run-0", "t0", RETIRED_ENGINE, "/ws")
    new_path = _finding("duplicate.entry_point_paths", "run-3", "t3", ENGINE, "/ws")
    assert judge(_s11(), [retired], RISE).agrees
    assert judge(_s11(), [retired, new_path], RISE).agrees  # --users 5: the warning no longer inhibits it
    assert judge(_s11(), [retired, new_path], RISE).recall == {"duplicate.retired_invoked": (1, 1)}
    assert not judge(_s11(), [new_path], RISE).agrees  # the retired engine's warning is still required
    elsewhere = _finding("duplicate.entry_point_paths", "run-3", "t3", ADAPTER, "/ws")
    assert judge(_s11(), [retired, elsewhere], RISE).problems == [f"duplicate.entry_point_paths names {ADAPTER}"]


def test_s11_needs_the_inventorys_canonical_share_to_rise_to_100_percent_with_the_clients() -> None:
    retired = [_finding("duplicate.retired_invoked", "run-0", "t0", RETIRED_ENGINE, "/ws")]
    # the reviewer's reproducer: the inventory never saw a canonical call
    assert judge(_s11(), retired, [0.0, 0.0]).problems == [
        "pathwatch's canonical share 0% -> 0% does not rise to 100%",
        "wave 2: pathwatch's canonical share 0%, the clients' 100%"]
    assert judge(_s11(), retired).problems == [
        "no canonical share per wave from pathwatch's inventory to judge the migration by"]
    assert judge(_s11(), retired, [None, 1.0]).problems == [
        "pathwatch's canonical share - -> 100% does not rise to 100%",
        "wave 1: pathwatch's canonical share -, the clients' 0%"]

    # waves of 20 runs: 50% then 100%; one lost engine span moves a share by at most 5 points
    waves = _s11("I" * 10 + "U" * 10, "U" * 20)
    assert judge(waves, retired, [10 / 19, 1.0]).agrees
    assert judge(waves, retired, [0.6, 1.0]).problems == ["wave 1: pathwatch's canonical share 60%, the clients' 50%"]
    # a last wave the clients saw at 100% must be 100% in the inventory too
    assert judge(waves, retired, [0.5, 0.96]).problems == [
        "pathwatch's canonical share 50% -> 96% does not rise to 100%"]


def test_s11_whose_clients_saw_no_retired_engine_did_not_show_the_migration() -> None:
    retired = [_finding("duplicate.retired_invoked", "run-0", "t0", RETIRED_ENGINE, "/ws")]
    assert judge(_s11("UUU", "UUU"), retired, [0.0, 1.0]).problems == [
        "the clients' first wave ran no retired engine: the migration did not show",
        "wave 1: pathwatch's canonical share 0%, the clients' 100%"]
