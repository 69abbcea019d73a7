"""Judging pathwatch against the clients: per scenario, what the clients saw, what pathwatch found, and
whether they agree.

The ground truth is ``examples.traffic``'s ``Observation``: which runs lost events, received copies, leaked
to another user's socket, or ran on two engines. ``EXPECTATIONS`` says, per scenario, which rule must fire
for which of those runs and which implementation it must name (the culprit, read off the demo backend's
code: ``examples/README.md``) and which symptoms the clients may see (``allows``: those the scenario's
bug causes). Agreement means: the clients started runs and saw no symptom but those the scenario's bug
causes (S0 and S11: none at all), every expected rule fired for every affected run (recall 100%), every
finding names the expected implementation and the entry point the run came in through, no other rule
fired (S0: nothing at all) but one the scenario may legitimately cause (S11's migration: an entry point
reaching a new engine; S1 with few users: an entry point reaching the factory's emitter where no run
leaked), and for S11 pathwatch's canonical share per wave follows the clients' up to 100%. A symptom no
scenario expects is a disagreement even when pathwatch found nothing: the bug may be one pathwatch
cannot see, and the demo must not call that agreement. A run is one user's run: S10's users share run
ids, so runs of a shared run id are counted per user, and told apart in the findings by their traces
(the backend answers each run with its trace id).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from examples.observations import Observation, RunRecord

_B = "examples.agent_backend."
ENGINE = _B + "engines.UserExecutionEngine"
ADAPTER = _B + "engines.SupervisorExecutionEngineAdapter"
RETIRED_ENGINE = _B + "engines.IsolatedExecutionEngine"
BRIDGE = _B + "emitters.AgentWebSocketBridge"
UNIFIED = _B + "emitters.UnifiedEventEmitter"
NOTIFIER = _B + "emitters.WebSocketNotifier"
MANAGER = _B + "sockets.WebSocketManager"
HTTP_SUPERVISOR = _B + "supervisors.SupervisorAgent"
WS_SUPERVISOR = _B + "supervisors.ChatOrchestrator"
ENTRY_POINTS = {"http": "/api/runs", "websocket": "/ws"}

#: a run as the clients know it: (user who started it, run id). Run ids alone do not tell runs apart:
#: S10's runs share them across users (every client numbers its requests from 1).
RunKey = tuple[str | None, str]
RunFilter = Callable[[Observation], set[RunKey]]
Culprits = Callable[[RunRecord], frozenset[str]]


# What the clients can see go wrong (``client_symptoms``); each scenario allows those its bug causes.
LEAKED = "leaked events"  # events of a user's run on another user's socket
MISSING = "missing events"  # required events a run's own client never received
COPIES = "extra copies"  # events a run's own client received more than once
TWO_ENGINES = "runs on two engines"
UNFINISHED = "runs not completed"  # a run answered with another status than "completed", or not at all
#: an allowed symptom concerning any event type (engine pair, status)
ANY: frozenset[str] | None = None


def client_symptoms(observation: Observation) -> dict[str, Counter[str]]:
    """What went wrong for the clients: symptom -> what it concerned (the event type; the engines of a
    run on two; a run's status) -> times. Empty for an observation that is clean but for protocol
    errors (``Observation.is_clean``), which are judged on their own."""
    runs = observation.runs
    copies: Counter[str] = Counter()
    for run in runs:
        copies.update(run.duplicates())
    seen = {
        LEAKED: Counter(leak.event_type for leak in observation.leaks),
        MISSING: Counter(kind for run in runs for kind in run.missing()),
        COPIES: copies,
        TWO_ENGINES: Counter(" + ".join(sorted(run.event_engines)) for run in runs if run.executions > 1),
        UNFINISHED: Counter(run.status or "no answer" for run in runs if run.status != "completed"),
    }
    return {symptom: what for symptom, what in seen.items() if what}


def _runs(observation: Observation, affected: Callable[[RunRecord], bool]) -> set[RunKey]:
    return {(run.user, run.run_id) for run in observation.runs if run.run_id and affected(run)}


def leaked_runs(observation: Observation) -> set[RunKey]:
    """Runs whose events reached another user's socket."""
    return {(leak.owner, leak.run_id) for leak in observation.leaks if leak.run_id}


def runs_missing(event_type: str | None = None) -> RunFilter:
    return lambda obs: _runs(obs, lambda run: bool(run.missing()) if event_type is None
                             else event_type in run.missing())


def runs_with_copies(observation: Observation) -> set[RunKey]:
    return _runs(observation, lambda run: bool(run.duplicates()))


def runs_on_two_engines(observation: Observation) -> set[RunKey]:
    return _runs(observation, lambda run: run.executions > 1)


def culprit(*implementations: str) -> Culprits:
    fixed = frozenset(implementations)
    return lambda run: fixed


def s4_culprits(run: RunRecord) -> frozenset[str]:
    # the second execution: the adapter (around RequestScopedExecutionEngine) and the other supervisor
    return frozenset({ADAPTER, WS_SUPERVISOR if run.via == "http" else HTTP_SUPERVISOR})


@dataclass(frozen=True, slots=True)
class PerRun:
    """``rule`` must fire for every run ``affected`` selects, naming one of ``culprits(run)``."""

    rule: str
    affected: RunFilter
    culprits: Culprits


@dataclass(frozen=True, slots=True)
class LeastTraffic:
    """The least traffic that can show a scenario's bug: ``users`` at once, ``runs`` each."""

    users: int = 1
    runs: int = 1
    why: str = ""


@dataclass(frozen=True, slots=True)
class Expectation:
    scenario: str
    symptom: str  # what the clients should see
    per_run: tuple[PerRun, ...] = ()
    at_least_once: Mapping[str, frozenset[str]] = field(default_factory=dict)  # rule -> culprits
    may_fire: Mapping[str, frozenset[str]] = field(default_factory=dict)  # rule -> culprits; not required
    #: the symptoms the scenario's bug causes -> what they may concern (``ANY``: anything); the clients
    #: seeing any other is a disagreement, whatever pathwatch found
    allows: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    #: S11: pathwatch's canonical share per wave of the traffic must follow the clients' and end at 100%
    share_rises: bool = False
    least: LeastTraffic = LeastTraffic()

    @property
    def rules(self) -> set[str]:
        return {check.rule for check in self.per_run} | set(self.at_least_once) | set(self.may_fire)


TOOL_EVENTS = frozenset({"tool_executing", "tool_completed"})

EXPECTATIONS: dict[str, Expectation] = {e.scenario: e for e in (
    Expectation("S0", "every event once, on its own socket"),
    Expectation("S1", "tool events on another user's socket", (
        PerRun("bleed.target_vs_socket_owner", leaked_runs, culprit(UNIFIED)),
        PerRun("bleed.owner_vs_ambient", leaked_runs, culprit(UNIFIED)),
    ), allows={LEAKED: TOOL_EVENTS, MISSING: TOOL_EVENTS},  # what a run lost, another user received
       # the factory's emitter is a second event_emitter path of every entry point that uses it; the bleed
       # on that entry point inhibits the info, but with a few users an entry point can reach it without a
       # run leaking there (--users 2: the other run was not interleaved)
       may_fire={"duplicate.entry_point_paths": frozenset({UNIFIED})},
       least=LeastTraffic(users=2, why="its bug sends a run's events to another user's socket")),
    Expectation("S2", "agent_thinking missing", (
        PerRun("delivery.no_connection", runs_missing("agent_thinking"), culprit(MANAGER)),
    ), allows={MISSING: frozenset({"agent_thinking"})}),
    Expectation("S3", "no events at all", (
        PerRun("bleed.owner_vs_ambient", runs_missing(), culprit(UNIFIED)),
        PerRun("delivery.no_connection", runs_missing(), culprit(MANAGER)),
    ), allows={MISSING: ANY}),
    Expectation("S4", "every event twice, from two engines", (
        PerRun("duplicate.execution", runs_on_two_engines, s4_culprits),
    ), allows={COPIES: ANY, TWO_ENGINES: ANY}),
    Expectation("S5", "agent_started three times", (
        PerRun("duplicate.emission", runs_with_copies, culprit(BRIDGE)),
    ), allows={COPIES: frozenset({"agent_started"})}),
    Expectation("S6", "every event three times", (
        PerRun("duplicate.emission", runs_with_copies, culprit(BRIDGE)),
    ), allows={COPIES: ANY}),
    Expectation("S7", "no events at all", (
        PerRun("delivery.no_connection", runs_missing(), culprit(MANAGER)),
    ), allows={MISSING: ANY}),
    Expectation("S8", "tool_completed missing, run 'completed'", (
        PerRun("delivery.undelivered", runs_missing("tool_completed"), culprit(NOTIFIER)),
        PerRun("delivery.missing_required_events", runs_missing("tool_completed"), culprit(ENGINE)),
    ), allows={MISSING: frozenset({"tool_completed"})}),
    Expectation("S9", "no events at all", (
        PerRun("delivery.undelivered", runs_missing(), culprit(BRIDGE)),
    ), allows={MISSING: ANY}),
    Expectation("S10", "another user's events on the socket", (
        PerRun("bleed.target_vs_socket_owner", leaked_runs, culprit(BRIDGE)),
    ), allows={LEAKED: ANY, MISSING: ANY},  # what a run lost, another user received
       least=LeastTraffic(users=2, why="its bug needs two users' runs sharing a run id")),
    # An entry point that reaches an engine for the first time in the rollout is reported (info) unless
    # a retired_invoked warning on it inhibits that (sidecar/inhibition.py): the warning comes at most
    # once a minute, so whether it covers the first canonical run on /ws depends on the traffic's timing
    # (and on whether an earlier scenario had run the canonical engine there already).
    Expectation("S11", "clean; engine moves from Isolated to User", (),
                at_least_once={"duplicate.retired_invoked": frozenset({RETIRED_ENGINE})},
                may_fire={"duplicate.entry_point_paths": frozenset({ENGINE, RETIRED_ENGINE})},
                share_rises=True,
                least=LeastTraffic(runs=2, why="its canonical share must rise from one wave of runs to the next")),
)}

#: how far pathwatch's canonical share of a wave may be from the clients'. The demo reads the inventory
#: after every run of the wave has been judged, so the two are equal unless engine spans were lost; five
#: points let one lost span in a wave of 20 users pass, not a migration that did not happen.
SHARE_TOLERANCE = 0.05


def too_little_traffic(scenarios: Iterable[str], users: int, runs: int) -> list[str]:
    """Why ``users`` concurrent users with ``runs`` runs each cannot show the bug of some of ``scenarios``,
    one line per scenario (empty: they can show every one)."""
    lines = []
    for scenario in scenarios:
        least = EXPECTATIONS[scenario].least
        if users < least.users:
            lines.append(f"{scenario} needs --users {least.users} or more ({least.why})")
        if runs < least.runs:
            lines.append(f"{scenario} needs --runs {least.runs} or more ({least.why})")
    return lines


@dataclass
class Verdict:
    scenario: str
    clients: str  # what the clients saw, one line
    found: Counter[str]  # rule -> findings
    incidents: dict[str, set[str]]  # rule -> incident ids
    problems: list[str]
    recall: dict[str, tuple[int, int]]  # rule -> (affected runs with a finding, affected runs)

    @property
    def agrees(self) -> bool:
        return not self.problems


class _Runs:
    """The clients' runs, and which one a finding is about: the run of its run id whose trace it is in.
    A run's spans are in its HTTP request's trace, or its socket's for a run over the socket; the backend
    answers each run with that trace id. One user's socket never carries two runs of one run id (each
    client's request ids are its own), so (trace id, run id) is one run even where users share run ids
    (S10)."""

    def __init__(self, observation: Observation) -> None:
        self.by_id: dict[str, list[RunRecord]] = {}
        for run in observation.runs:
            if run.run_id:
                self.by_id.setdefault(run.run_id, []).append(run)

    def of(self, finding: Mapping[str, Any]) -> RunRecord | str:
        """The run ``finding`` is about, or why it is about none of the clients' runs."""
        run_id, trace_id = finding.get("run_id"), finding.get("trace_id")
        runs = self.by_id.get(run_id or "", [])
        for run in runs:
            if run.trace_id is not None and run.trace_id == trace_id:
                return run
        if not runs:
            return f"run {run_id}, which no client started"
        if all(run.trace_id is None for run in runs):
            return f"run {run_id}, whose trace the backend did not report"
        return f"run {run_id} in trace {trace_id}, in which no client ran it"


def judge(observation: Observation, findings: Iterable[Mapping[str, Any]],
          shares: Sequence[float | None] | None = None) -> Verdict:
    """``shares``: S11's canonical share of the engine calls per wave of the traffic, from pathwatch's
    inventory (None: a wave without an engine call); the waves are equal slices of the runs in request
    order."""
    expectation = EXPECTATIONS[observation.scenario]
    findings = list(findings)
    runs = _Runs(observation)
    problems: list[str] = []
    found = Counter(f["rule"] for f in findings)
    incidents: dict[str, set[str]] = {}
    for f in findings:
        incidents.setdefault(f["rule"], set()).add(f["incident_id"])
    if not observation.runs_started:
        problems.append("the clients started no run: nothing to judge")
    problems += _unexplained_symptoms(expectation, observation)
    unexpected = sorted(set(found) - expectation.rules)
    problems += [f"unexpected {rule} x{found[rule]}" for rule in unexpected]
    recall: dict[str, tuple[int, int]] = {}
    for check in expectation.per_run:
        recall[check.rule] = _check_per_run(check, observation, findings, runs, problems)
    for rule, culprits in expectation.at_least_once.items():
        of_rule = [f for f in findings if f["rule"] == rule]
        if not of_rule:
            problems.append(f"{rule} did not fire")
        problems += [f"{rule} names {f['implementation']}" for f in of_rule if f["implementation"] not in culprits]
        recall[rule] = (1 if of_rule else 0, 1)
    for rule, culprits in expectation.may_fire.items():
        problems += [f"{rule} names {f['implementation']}" for f in findings
                     if f["rule"] == rule and f["implementation"] not in culprits]
    if expectation.share_rises:
        problems += _share_problems(observation, shares)
    if observation.errors:
        problems.append(f"{len(observation.errors)} protocol error(s): {observation.errors[0]}")
    return Verdict(observation.scenario, describe(observation), found, incidents, problems, recall)


def _unexplained_symptoms(expectation: Expectation, observation: Observation) -> list[str]:
    """The clients' symptoms the scenario's bug does not cause, one problem per symptom."""
    problems = []
    for symptom, what in client_symptoms(observation).items():
        allowed = expectation.allows.get(symptom, frozenset())
        if allowed is None:  # ANY
            continue
        unexplained = Counter({item: n for item, n in what.items() if item not in allowed})
        if unexplained:
            items = ", ".join(f"{item} x{n}" for item, n in sorted(unexplained.items()))
            problems.append(f"the clients saw {unexplained.total()} {symptom} ({items}), "
                            f"not a symptom of {observation.scenario}")
    return problems


def client_shares(observation: Observation, waves: int) -> list[float | None]:
    """The clients' canonical share of the runs per wave: the i-th of ``waves`` equal slices of the runs
    in request order (the demo's waves run one run per user each, one wave after the other)."""
    return [observation.canonical_share(i, parts=waves) for i in range(waves)]


def _share_problems(observation: Observation, shares: Sequence[float | None] | None) -> list[str]:
    """The canonical share rises to 100% in pathwatch's inventory, wave by wave as the clients saw it."""
    if not shares:
        return ["no canonical share per wave from pathwatch's inventory to judge the migration by"]
    clients = client_shares(observation, len(shares))
    problems = []
    if clients[0] is None or clients[0] >= 1.0:
        problems.append("the clients' first wave ran no retired engine: the migration did not show")
    if shares[0] is None or shares[0] >= 1.0 or shares[-1] != 1.0:
        problems.append(f"pathwatch's canonical share {share_series(shares)} does not rise to 100%")
    for wave, (found, seen) in enumerate(zip(shares, clients), 1):
        if seen is None:
            continue
        if found is None or abs(found - seen) > SHARE_TOLERANCE:
            problems.append(f"wave {wave}: pathwatch's canonical share {share_series([found])}, "
                            f"the clients' {share_series([seen])}")
    return problems


def share_series(shares: Sequence[float | None]) -> str:
    """``0% -> 50% -> 100%``; ``-`` for a wave without an engine call."""
    return " -> ".join("-" if share is None else f"{share:.0%}" for share in shares) or "-"


def _check_per_run(check: PerRun, observation: Observation, findings: list[Mapping[str, Any]],
                   runs: _Runs, problems: list[str]) -> tuple[int, int]:
    affected = check.affected(observation)
    if not affected:
        problems.append(f"the clients saw no run affected for {check.rule}: the bug did not show")
    found: set[RunKey] = set()
    unaffected: list[RunKey] = []
    elsewhere: list[str] = []  # findings on none of the clients' runs: why
    for f in findings:
        if f["rule"] != check.rule:
            continue
        run = runs.of(f)
        if isinstance(run, str):
            elsewhere.append(run)
            continue
        key = (run.user, run.run_id or "")
        if key not in affected:
            unaffected.append(key)
            continue
        found.add(key)
        if f["implementation"] not in check.culprits(run):
            problems.append(f"{check.rule} names {f['implementation']} for {run.user}'s run {run.run_id}")
        if f["entry_point"] != ENTRY_POINTS[run.via]:
            problems.append(f"{check.rule} names entry point {f['entry_point']} for {run.user}'s run "
                            f"{run.run_id} (over {run.via}: {ENTRY_POINTS[run.via]})")
    if len(found) != len(affected):
        problems.append(f"{check.rule}: {len(affected) - len(found)} affected run(s) without a finding")
    if unaffected:
        user, run_id = unaffected[0]
        problems.append(f"{check.rule} on {len(set(unaffected))} run(s) that the clients saw unaffected "
                        f"({user}'s {run_id}{' ...' if len(set(unaffected)) > 1 else ''})")
    if elsewhere:
        problems.append(f"{check.rule}: {len(elsewhere)} finding(s) on no run of the clients "
                        f"({elsewhere[0]}{' ...' if len(elsewhere) > 1 else ''})")
    return len(found), len(affected)


def describe(observation: Observation) -> str:
    """What the clients saw, in a few words."""
    runs = observation.runs_started
    parts = []
    if observation.leaks:
        # (owner, run id): S10's runs share run ids across users
        victims = {(leak.owner, leak.run_id) for leak in observation.leaks}
        parts.append(f"{len(observation.leaks)} events leaked ({len(victims)} runs)")
    if observation.missing_events:
        parts.append(f"{observation.missing_events} events missing ({observation.runs_with_missing} runs)")
    if observation.duplicate_events:
        parts.append(f"{observation.duplicate_events} copies ({observation.runs_with_duplicates} runs)")
    if observation.runs_with_two_executions:
        parts.append(f"{observation.runs_with_two_executions} runs on 2 engines")
    unfinished = sum(run.status != "completed" for run in observation.runs)
    if unfinished:
        parts.append(f"{unfinished} runs not completed")
    if observation.scenario == "S11":
        shares = [share for share in (observation.canonical_share(i) for i in range(3)) if share is not None]
        parts.append("canonical engine " + " -> ".join(f"{share:.0%}" for share in shares))
    if not parts:
        parts.append("clean")
    return f"{runs} runs: " + ", ".join(parts)


def describe_found(verdict: Verdict) -> list[str]:
    """One line per rule: how many findings, in which incidents."""
    if not verdict.found:
        return ["nothing"]
    return [f"{rule} x{count} ({_ids(verdict.incidents[rule])})" for rule, count in sorted(verdict.found.items())]


def describe_agreement(verdict: Verdict) -> str:
    if verdict.agrees:
        recalls = [f"{hit}/{total}" for hit, total in verdict.recall.values()]
        return "yes" + (f" (recall {', '.join(recalls)})" if recalls else "")
    return "NO: " + "; ".join(verdict.problems[:3]) + (" ..." if len(verdict.problems) > 3 else "")


def _ids(ids: set[str]) -> str:
    ordered = sorted(ids)
    more = f" +{len(ordered) - 2}" if len(ordered) > 2 else ""
    return ("incident " if len(ordered) == 1 else "incidents ") + " ".join(ordered[:2]) + more
