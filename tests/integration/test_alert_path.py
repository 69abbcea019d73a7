"""The whole alert path on real processes: demo backend -> sidecar -> Prometheus -> Alertmanager -> webhook.

One stack per module (starting it and driving S0-S11 is the expensive part); each test then checks
one claim against it, waiting on conditions with deadlines:
- every dashboard panel's query returns data from Prometheus scraping the real sidecar;
- every alert rule evaluates without error, the bleed rule fires, and so does each seeded bug's
  finding-based alert (S4, S5/S6, S8, S11);
- the bleed alert reaches the webhook through Alertmanager twice — as the Prometheus rule's alert and
  as the sidecar's direct push — and the push arrives first;
- the bleed panel's exemplars carry trace ids of real findings.
The drive starts only once Prometheus scrapes the sidecar (see ``stack.start_prometheus``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dashboards.queries import iter_panels, panel_exprs, render_for_prometheus
from examples.agent_backend.scenarios import ALL_SCENARIOS
from examples.observations import Observation
from examples.traffic import drive
from sidecar.alerting.payload import alertname as sidecar_alertname
from tests.dashboards.tooling import DASHBOARD_FILES, load_dashboard
from tests.integration import stack
from tests.support import wait_until

USERS = 20
RUNS_PER_USER = 3
RULE_BLEED_ALERT = "PathwatchCrossUserBleed"
PUSH_BLEED_ALERT = sidecar_alertname("bleed.target_vs_socket_owner")  # "PathwatchBleed"
DEADLINE_S = 60.0


@dataclass
class Stack:
    prometheus: str
    alertmanager: str
    sidecar_api: str
    webhook: stack.WebhookReceiver
    processes: list[stack.Process]
    observations: dict[str, Observation]
    started_wall: float  # time.time() before the first scenario


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack.ensure_debian_tools()
    work: Path = tmp_path_factory.mktemp("alert-path")
    processes: list[stack.Process] = []
    webhook = stack.start_webhook()
    try:
        alertmanager, am_url = stack.start_alertmanager(work, webhook.url)
        processes.append(alertmanager)
        sidecar, ports = stack.start_sidecar(work, am_url)
        processes.append(sidecar)
        prometheus, prom_url = stack.start_prometheus(work, f"127.0.0.1:{ports.api}", am_url)
        processes.append(prometheus)
        backend, backend_url = stack.start_instrumented_backend(work, ports.grpc)
        processes.append(backend)
        started = time.time()
        observations = asyncio.run(drive(backend_url, [s.value for s in ALL_SCENARIOS], users=USERS,
                                         runs_per_user=RUNS_PER_USER))
        yield Stack(prom_url, am_url, ports.api_url, webhook, processes, observations, started)
    except BaseException:
        _print_logs(processes)  # a failed start; failed tests get the logs from conftest.py
        raise
    finally:
        for process in reversed(processes):  # backend first: its last spans reach a live sidecar
            process.stop()
        webhook.stop()


def _print_logs(processes: list[stack.Process]) -> None:
    for process in processes:
        print(f"\n===== {process.name} (exit {process.process.returncode}) {process.log} =====\n"
              f"{process.output()}")


def test_the_drive_saw_the_seeded_bugs(running: Stack) -> None:
    # the ground truth the alerts are about: S1 and S10 really leaked events to other users
    assert running.observations["S1"].leaks and running.observations["S10"].leaks
    assert not running.observations["S0"].leaks


# --- dashboards ----------------------------------------------------------------------------

def panel_queries() -> list[tuple[str, str]]:
    return [(f"{name.removesuffix('.json')}: {panel['title']}", expr)
            for name in DASHBOARD_FILES for panel in iter_panels(load_dashboard(name))
            for expr in panel_exprs(panel)]


def empty_panels(running: Stack, queries: list[tuple[str, str]]) -> list[str]:
    """The queries that return no series with a number, each with what Prometheus answered."""
    # the rate window spans the whole demo, as a dashboard over the demo's time range would
    window = f"{math.ceil(time.time() - running.started_wall) + 10}s"
    empty = []
    for panel, expr in queries:
        rendered = render_for_prometheus(expr, rate_interval=window, interval="1s", range_=window)
        result = stack.query(running.prometheus, rendered)
        if not [s for s in result if s["value"][1] not in ("NaN", "")]:
            empty.append(f"{panel}: {rendered} -> {result}")
    return empty


def wait_for_data(running: Stack, queries: list[tuple[str, str]], timeout_s: float) -> None:
    last = empty_panels(running, queries)  # outside the wait: a query Prometheus rejects fails at once

    def none_empty() -> bool:
        last[:] = empty_panels(running, queries)
        return not last

    try:
        wait_until(none_empty, timeout=timeout_s, interval=1.0, message="data in every panel")
    except AssertionError:
        pytest.fail("panels without data:\n" + "\n".join(last))


def test_every_dashboard_panel_has_data(running: Stack) -> None:
    queries = panel_queries()
    assert len(queries) >= 25, queries  # all three dashboards were read
    wait_for_data(running, queries, DEADLINE_S)


# --- alert rules ---------------------------------------------------------------------------

def rule_names() -> set[str]:
    document = yaml.safe_load(stack.RULES.read_text())
    return {rule["alert"] for group in document["groups"] for rule in group["rules"] if "alert" in rule}


def test_every_alert_rule_evaluates_without_error(running: Stack) -> None:
    expected = rule_names()
    assert RULE_BLEED_ALERT in expected and len(expected) >= 10

    def evaluated() -> list[dict]:
        rules = stack.alert_rules(running.prometheus)
        done = [r for r in rules if not r["lastEvaluation"].startswith("0001-")]
        return rules if {r["name"] for r in done} == expected else []

    rules = wait_until(evaluated, timeout=DEADLINE_S, interval=0.5, message="every rule evaluated")
    broken = [(r["name"], r["health"], r.get("lastError")) for r in rules
              if r["health"] != "ok" or r.get("lastError")]
    assert not broken
    # the scrape job contract holds ("pathwatch" in the job name): the sidecar is not reported absent
    absent = next(r for r in rules if r["name"] == "PathwatchSidecarAbsent")
    assert absent["state"] == "inactive", absent


def test_the_bleed_rule_fires_in_prometheus(running: Stack) -> None:
    def bleed_alerts() -> list[dict]:
        rule = next(r for r in stack.alert_rules(running.prometheus) if r["name"] == RULE_BLEED_ALERT)
        return [a for a in rule["alerts"] if a["state"] == "firing"]

    firing = wait_until(bleed_alerts, timeout=DEADLINE_S, interval=0.5, message=f"{RULE_BLEED_ALERT} firing")
    assert all(a["labels"]["rule"].startswith("bleed.") for a in firing), firing
    assert {a["labels"]["severity"] for a in firing} == {"critical"}


def test_the_seeded_bugs_fire_their_alerts(running: Stack) -> None:
    # the finding-based rules fire on the first finding: each seeded scenario's alert is firing
    expected = {"PathwatchDuplicateExecution": "S4", "PathwatchDuplicateEmission": "S5/S6",
                "PathwatchRetiredImplementationCalled": "S11",
                "PathwatchRunsMissingRequiredEvents": "S8"}

    def not_firing() -> set[str]:
        firing = {r["name"] for r in stack.alert_rules(running.prometheus) if r["state"] == "firing"}
        return set(expected) - firing

    try:
        wait_until(lambda: not not_firing(), timeout=DEADLINE_S, interval=0.5, message="seeded alerts")
    except AssertionError:
        pytest.fail(f"not firing: {[(name, expected[name]) for name in sorted(not_firing())]}")


# --- Alertmanager -> webhook -----------------------------------------------------------------

def test_bleed_reaches_the_webhook_by_the_rule_and_by_the_push_and_the_push_first(running: Stack) -> None:
    webhook = running.webhook
    wait_until(lambda: webhook.first_arrival(RULE_BLEED_ALERT) and webhook.first_arrival(PUSH_BLEED_ALERT),
               timeout=DEADLINE_S, interval=0.2,
               message=f"{RULE_BLEED_ALERT} and {PUSH_BLEED_ALERT} at the webhook")
    by_rule = webhook.first_arrival(RULE_BLEED_ALERT)
    by_push = webhook.first_arrival(PUSH_BLEED_ALERT)
    assert by_rule is not None and by_push is not None

    pushed = [a for a in by_push.body["alerts"] if a["labels"]["alertname"] == PUSH_BLEED_ALERT]
    assert pushed and all(a["labels"]["rule"].startswith("bleed.") for a in pushed), pushed
    assert all(a["labels"]["severity"] == "critical" and a["labels"]["category"] == "isolation"
               and a["labels"]["incident_id"] for a in pushed), pushed
    assert all(a["generatorURL"].startswith(f"{running.sidecar_api}/api/v1/incidents/") for a in pushed)
    # the backend service the bleed happened in (the backend's OTEL_SERVICE_NAME, stack.py)
    assert all(a["annotations"].get("service_name") == "demo-backend" for a in pushed), pushed

    ruled = [a for a in by_rule.body["alerts"] if a["labels"]["alertname"] == RULE_BLEED_ALERT]
    assert ruled and all(a["labels"]["rule"].startswith("bleed.") for a in ruled), ruled
    assert all(a["labels"]["component"] == "pathwatch" for a in ruled), ruled

    # both paths page about the same findings: same rule, role, implementation and entry point
    def where(alertname: str) -> set[tuple[str, ...]]:
        return {tuple(a["labels"].get(k, "") for k in ("rule", "role", "implementation", "entry_point"))
                for n in webhook.received() for a in n.body["alerts"]
                if a["labels"]["alertname"] == alertname}

    assert where(PUSH_BLEED_ALERT) & where(RULE_BLEED_ALERT), (where(PUSH_BLEED_ALERT),
                                                                where(RULE_BLEED_ALERT))
    # the point of the direct push: it does not wait for a scrape and a rule evaluation
    assert by_push.arrived < by_rule.arrived, (by_push, by_rule)
    print(f"bleed at the webhook: direct push {by_rule.arrived - by_push.arrived:.2f} s before the rule")


def test_bleed_panel_links_to_trace_ids_of_real_findings(running: Stack) -> None:
    # the exemplar path Grafana uses: OpenMetrics scrape of the sidecar -> Prometheus exemplar storage
    dashboard = load_dashboard("pathwatch-isolation.json")
    expr = next(e for p in iter_panels(dashboard) if p["title"] == "Bleed findings by rule"
                for e in panel_exprs(p))
    rendered = render_for_prometheus(expr, rate_interval="1m")

    def exemplars() -> list[dict]:
        now = time.time()
        return [e for series in stack.query_exemplars(running.prometheus, rendered,
                                                      running.started_wall - 5, now)
                for e in series["exemplars"]]

    found = wait_until(exemplars, timeout=DEADLINE_S, interval=0.5, message="exemplars on the bleed panel")
    trace_ids = {e["labels"].get("trace_id", "") for e in found}
    assert all(len(t) == 32 and int(t, 16) for t in trace_ids), trace_ids
