"""The deploy rules end to end: the real sidecar process, spans of two backend versions (resource
``service.version``) through the official OTLP exporter; the new version's incident via the API and
its metric — and a clean new version that raises nothing."""

from __future__ import annotations

import signal
import sqlite3
from contextlib import closing

import httpx
import pytest

from sidecar.consolidation.verdicts import ledger_path_beside
from sidecar.rules import DEPLOY_NEW_PATH, DEPLOY_REGRESSION, DEPLOY_RETIRED_REVIVED
from tests.e2e.fixture_runs import RETIRED_ENGINE, send_runs
from tests.e2e.fixture_sidecar import Sidecar
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)
RUNS = 20  # per version: the default consolidation.min_runs_per_version
NEW_PATH_ENGINE = "app.engines.RequestScopedExecutionEngine"
# required_events: the two events send_runs emits; with the defaults every run raised
# delivery.missing_required_events, a warning that inhibits an info finding (deploy.new_path) about
# the same role and entry point raised within 0.2 s of it
CONFIG_RULES = {"delivery_deadline_s": 0.2, "delivery_export_allowance_s": 0.0, "run_idle_s": 0.3,
                "required_events": ["agent_started", "agent_completed"]}


@pytest.fixture
def sidecar(tmp_path):
    with Sidecar(tmp_path, rules=CONFIG_RULES) as process:
        yield process


def deploy(sidecar: Sidecar, **new_version) -> None:
    """Version 1.0 clean, then version 2.0 doing ``new_version``; returns once the sidecar has judged
    every run of both (pathwatch_version_runs_total counts them)."""
    send_runs(sidecar.grpc_endpoint, version="1.0", runs=RUNS)
    wait_until(lambda: sidecar.metric("pathwatch_version_runs_total", service_version="1.0") >= RUNS,
               timeout=20, message="version 1.0's runs judged")
    send_runs(sidecar.grpc_endpoint, version="2.0", runs=RUNS, **new_version)
    wait_until(lambda: sidecar.metric("pathwatch_version_runs_total", service_version="2.0") >= RUNS,
               timeout=20, message="version 2.0's runs judged")


def deploy_incidents(sidecar: Sidecar) -> dict[str, dict]:
    return {i["rule"]: i for i in sidecar.incidents() if i["rule"].startswith("deploy.")}


@pytest.mark.parametrize("new_version, rule", [
    ({"owner": "bob"}, DEPLOY_REGRESSION),               # 2.0 builds engines for the wrong user: bleed
    ({"engine": RETIRED_ENGINE}, DEPLOY_RETIRED_REVIVED),  # 2.0 routes to the retired engine again
    ({"engine": NEW_PATH_ENGINE}, DEPLOY_NEW_PATH),  # 2.0 takes a new path
], ids=["regression", "retired_revived", "new_path"])
def test_a_worse_new_version_raises_its_deploy_finding(sidecar, new_version, rule):
    deploy(sidecar, **new_version)
    incident = wait_until(lambda: deploy_incidents(sidecar).get(rule), timeout=20,
                          message=f"a {rule} incident")
    assert incident["entry_point"] == "/ws" and incident["count"] >= 1
    assert sidecar.incident(incident["id"])["rule"] == rule
    assert sidecar.metric("pathwatch_findings_total", rule=rule) >= 1


def findings_of(sidecar: Sidecar, rule: str) -> list[dict]:
    findings = httpx.get(f"{sidecar.api_url}/api/v1/findings", timeout=5).json()["findings"]
    return [f for f in findings if f["rule"] == rule]


def compare_everything_sent(sidecar: Sidecar) -> None:
    """Return once the sidecar has compared each version with its base over every run sent so far,
    and reported what that raised. pathwatch_version_runs_total counts a run as it opens; versions
    are compared on a later tick, once their runs have settled (settle_s after), and a
    deploy.new_path (info) is held by the inhibitor before it is reported. A marker version, its
    runs on a path no version took, is reported as deploy.new_path only by a comparison counting
    each of its runs, so every run opened before them, and after every new path an earlier
    comparison found (held as long, released in order)."""
    send_runs(sidecar.grpc_endpoint, version="marker", runs=RUNS, engine=NEW_PATH_ENGINE)
    wait_until(lambda: [f for f in findings_of(sidecar, DEPLOY_NEW_PATH)
                        if f["details"]["version"] == "marker"], timeout=20,
               message=f"the marker version's {DEPLOY_NEW_PATH}")


def test_a_clean_new_version_raises_no_deploy_finding(sidecar):
    deploy(sidecar)
    compare_everything_sent(sidecar)
    assert compared_with(sidecar) == {"1.0": None, "2.0": "1.0", "marker": "2.0"}
    incidents = deploy_incidents(sidecar)
    assert set(incidents) == {DEPLOY_NEW_PATH}, incidents  # the marker's alone
    assert [f["details"]["version"] for f in findings_of(sidecar, DEPLOY_NEW_PATH)] == ["marker"]
    for rule in (DEPLOY_REGRESSION, DEPLOY_RETIRED_REVIVED):
        assert sidecar.metric("pathwatch_findings_total", rule=rule) == 0
    assert sidecar.metric("pathwatch_findings_total", rule=DEPLOY_NEW_PATH) == 1
    assert sidecar.metric("pathwatch_findings_inhibited_total") == 0  # nothing hidden either


# --- a sidecar restarted in the middle of a rolling deploy ----------------------------------------

def runs_of(sidecar: Sidecar, version: str) -> float:
    return sidecar.metric("pathwatch_version_runs_total", service_version=version)


def persisted_versions(sidecar: Sidecar) -> list[str]:
    """The versions the sidecar's ledger file remembers (what a kill cannot take)."""
    with closing(sqlite3.connect(ledger_path_beside(sidecar.config["incidents"]["path"]),
                                 timeout=5)) as db:
        return [version for version, in db.execute("SELECT version FROM version_order "
                                                   "ORDER BY written")]


def compared_with(sidecar: Sidecar) -> dict[str, str | None]:
    versions = httpx.get(f"{sidecar.api_url}/api/v1/consolidation/versions", timeout=5).json()
    return {row["version"]: row["previous_version"] for row in versions["versions"]}


def regressions(sidecar: Sidecar) -> list[tuple[str, str]]:
    findings = httpx.get(f"{sidecar.api_url}/api/v1/findings", timeout=5).json()["findings"]
    return [(f["details"]["previous_version"], f["details"]["version"]) for f in findings
            if f["rule"] == DEPLOY_REGRESSION]


@pytest.mark.parametrize("new_bleeds, stop", [(True, signal.SIGTERM), (False, signal.SIGKILL)],
                         ids=["2.0 regresses, clean restart", "2.0 fixes 1.0, killed"])
def test_a_restart_in_a_rolling_deploy_keeps_the_versions_in_their_order(tmp_path, new_bleeds, stop):
    """1.0 runs; the sidecar restarts (a rollout of the sidecar, or a kill) while the backend rolls
    out 2.0: after the restart 2.0's runs come first, then 1.0's and 2.0's interleaved. 1.0 was
    first seen before the restart (the ledger says so): 2.0 is compared with 1.0, never the other
    way — 2.0 bringing a bleed is 2.0's regression, 2.0 fixing 1.0's bleed is none."""
    sidecar = Sidecar(tmp_path, rules=CONFIG_RULES, incidents_path=str(tmp_path / "incidents.sqlite"))
    old_owner, new_owner = (None, "bob") if new_bleeds else ("bob", None)
    with sidecar:
        send_runs(sidecar.grpc_endpoint, version="1.0", runs=RUNS, owner=old_owner)
        wait_until(lambda: runs_of(sidecar, "1.0") >= RUNS, timeout=20, message="1.0's runs")
        if stop == signal.SIGKILL:  # no stop to write it: the periodic flush has
            wait_until(lambda: persisted_versions(sidecar) == ["1.0"], timeout=20,
                       message="1.0 in the ledger")
        sidecar.process.send_signal(stop)
        assert sidecar.process.wait(30) in (0, -signal.SIGKILL)
        sidecar.start(ready_timeout=30)
        half = RUNS // 2
        send_runs(sidecar.grpc_endpoint, version="2.0", runs=half, owner=new_owner)
        wait_until(lambda: runs_of(sidecar, "2.0") >= half, timeout=20, message="2.0 first")
        for version, owner in (("1.0", old_owner), ("2.0", new_owner), ("1.0", old_owner)):
            send_runs(sidecar.grpc_endpoint, version=version, runs=half, owner=owner)
        wait_until(lambda: runs_of(sidecar, "1.0") >= RUNS and runs_of(sidecar, "2.0") >= RUNS,
                   timeout=20, message="both versions' runs")
        assert compared_with(sidecar) == {"1.0": None, "2.0": "1.0"}
        if new_bleeds:
            assert wait_until(lambda: regressions(sidecar), timeout=20,
                              message="2.0's regression") == [("1.0", "2.0")]
        else:  # compared the right way round, 2.0's rate is below 1.0's: nothing to raise
            compare_everything_sent(sidecar)
            assert regressions(sidecar) == []
