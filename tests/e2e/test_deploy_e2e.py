"""The deploy rules end to end: the real sidecar process, spans of two backend versions (resource
``service.version``) through the official OTLP exporter; the new version's incident via the API and
its metric — and a clean new version that raises nothing."""

from __future__ import annotations

import pytest

from sidecar.rules import DEPLOY_NEW_PATH, DEPLOY_REGRESSION, DEPLOY_RETIRED_REVIVED
from tests.e2e.fixture_runs import RETIRED_ENGINE, send_runs
from tests.e2e.fixture_sidecar import Sidecar
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)
RUNS = 20  # per version: the default consolidation.min_runs_per_version
CONFIG_RULES = {"delivery_deadline_s": 0.2, "run_idle_s": 0.3}


@pytest.fixture
def sidecar(tmp_path):
    with Sidecar(tmp_path, rules=CONFIG_RULES) as process:
        yield process


def deploy(sidecar: Sidecar, **new_version) -> None:
    """Version 1.0 clean, then version 2.0 doing ``new_version``; returns once the sidecar has judged
    every run of both (pathwatch_version_runs_total counts them)."""
    send_runs(sidecar.grpc_endpoint, version="1.0", runs=RUNS)
    wait_until(lambda: sidecar.metric("pathwatch_version_runs_total", version="1.0") >= RUNS,
               timeout=20, message="version 1.0's runs judged")
    send_runs(sidecar.grpc_endpoint, version="2.0", runs=RUNS, **new_version)
    wait_until(lambda: sidecar.metric("pathwatch_version_runs_total", version="2.0") >= RUNS,
               timeout=20, message="version 2.0's runs judged")


def deploy_incidents(sidecar: Sidecar) -> dict[str, dict]:
    return {i["rule"]: i for i in sidecar.incidents() if i["rule"].startswith("deploy.")}


@pytest.mark.parametrize("new_version, rule", [
    ({"owner": "bob"}, DEPLOY_REGRESSION),               # 2.0 builds engines for the wrong user: bleed
    ({"engine": RETIRED_ENGINE}, DEPLOY_RETIRED_REVIVED),  # 2.0 routes to the retired engine again
    ({"engine": "app.engines.RequestScopedExecutionEngine"}, DEPLOY_NEW_PATH),  # 2.0 takes a new path
], ids=["regression", "retired_revived", "new_path"])
def test_a_worse_new_version_raises_its_deploy_finding(sidecar, new_version, rule):
    deploy(sidecar, **new_version)
    incident = wait_until(lambda: deploy_incidents(sidecar).get(rule), timeout=20,
                          message=f"a {rule} incident")
    assert incident["entry_point"] == "/ws" and incident["count"] >= 1
    assert sidecar.incident(incident["id"])["rule"] == rule
    assert sidecar.metric("pathwatch_findings_total", rule=rule) >= 1


def test_a_clean_new_version_raises_no_deploy_finding(sidecar):
    deploy(sidecar)
    # both versions' runs are judged and compared; a marker bleed sent after them (from a version with
    # too few runs to be compared) proves the findings of that moment are recorded
    send_runs(sidecar.grpc_endpoint, version="marker", runs=1, owner="bob")
    wait_until(lambda: sidecar.metric("pathwatch_findings_total", rule="bleed.owner_vs_ambient") >= 1,
               timeout=20, message="the marker finding")
    assert deploy_incidents(sidecar) == {}
    for rule in (DEPLOY_REGRESSION, DEPLOY_RETIRED_REVIVED, DEPLOY_NEW_PATH):
        assert sidecar.metric("pathwatch_findings_total", rule=rule) == 0
