"""The real sidecar serves the consolidation picture, and `pathwatch report --consolidation` prints it:
spans of the real demo backend go through the real pipeline (FindingObserver hook included)."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry

from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.receiver.decode import DecodedBatch
from sidecar.report import main as report_main
from tests.sidecar.consolidation.demo import demo_backend
from tests.support import wait_until


def test_sidecar_api_and_report_show_paths_callers_versions_and_verdicts(monkeypatch, tmp_path, capsys):
    config = parse_config({
        "receiver": {"grpc_endpoint": "", "http_endpoint": ""},
        "api": {"endpoint": "127.0.0.1:0"},  # the port it got: endpoints.api
        "incidents": {"path": str(tmp_path / "pathwatch-incidents.sqlite")},
        "consolidation": {"min_runs_per_version": 4, "path_idle_s": 0.5}})
    sidecar = Sidecar(config, registry=CollectorRegistry())
    endpoints = sidecar.start()
    try:
        with demo_backend(monkeypatch) as demo:
            demo.run("S0", 4)
            sidecar.pipeline.submit(DecodedBatch(demo.take("1.0.0"), []))
            demo.run("S5", 4)  # the second version announces agent_started three times
            sidecar.pipeline.submit(DecodedBatch(demo.take("2.0.0"), []))
        api = f"http://{endpoints.api}"

        def regression_incident():
            found = httpx.get(f"{api}/api/v1/incidents", params={"rule": "deploy.regression"}).json()
            return found["incidents"]

        incidents = wait_until(regression_incident, timeout=20, message="deploy.regression incident")
        assert incidents[0]["entry_point"] == "/ws"
        picture = httpx.get(f"{api}/api/v1/consolidation").json()
        assert [v["version"] for v in picture["versions"]] == ["1.0.0", "2.0.0"]
        assert picture["versions"][1]["findings"]["duplicate"] >= 4
        assert picture["versions"][0]["findings"]["duplicate"] == 0
        assert picture["paths"]["entry_points"]["/ws"]["runs"] == 8
        versions = httpx.get(f"{api}/api/v1/consolidation/versions").json()
        assert versions["versions"] == picture["versions"]
        assert httpx.get(f"{api}/api/v1/consolidation/nope").status_code == 404
        assert report_main(api=api, consolidation=True) == 0
        printed = capsys.readouterr().out
        for heading in ("Roles", "Paths per entry point", "Callers to migrate", "Versions",
                        "Non-canonical classes: safe_to_delete after zero calls for 14 days"):
            assert heading in printed
        assert "supervisor=ChatOrchestrator > execution_engine=UserExecutionEngine" in printed
        assert "2.0.0" in printed and "duplicate=" in printed
    finally:
        assert sidecar.shutdown()
    assert (tmp_path / "pathwatch-incidents-consolidation.sqlite").is_file()


def test_the_path_runs_metric_help_names_an_endpoint_that_exists():
    import re

    from starlette.testclient import TestClient

    from sidecar.api import create_api
    from sidecar.detectors.deploys import DeployDetector
    from sidecar.incidents import IncidentStore
    from sidecar.telemetry import Telemetry

    telemetry = Telemetry(CollectorRegistry())
    app = create_api(IncidentStore(":memory:"), None, telemetry.registry, lambda: True, None,
                     consolidation=DeployDetector(telemetry=telemetry, clock_s=lambda: 0.0))
    client = TestClient(app)
    help_line = next(line for line in client.get("/metrics").text.splitlines()
                     if line.startswith("# HELP pathwatch_path_runs_total"))
    endpoint = re.search(r"/api/v1/\S+?(?=[;)])", help_line).group(0)
    assert endpoint == "/api/v1/consolidation/paths" and client.get(endpoint).status_code == 200
