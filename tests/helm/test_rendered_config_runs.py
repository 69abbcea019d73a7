"""The real sidecar runs on what the chart renders: its config, its token wiring, its probe paths."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helm.charting import ROOT, Helm, by_kind, one, pod_spec
from tests.support import free_port, wait_until

PATHWATCH = ROOT / ".venv" / "bin" / "pathwatch"


def render(helm: Helm, chart: Path, mode: str, data_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(sidecar.yaml, ports, rendered objects) for a mode, on free ports and a temporary data dir."""
    ports = {"otlpGrpc": free_port(), "otlpHttp": free_port(), "api": free_port()}
    sets = [f"mode={mode}", "secrets.apiToken=t0ken-from-values", "demoBackend.enabled=true",
            f"persistence.mountPath={data_dir}", *(f"ports.{name}={port}" for name, port in ports.items())]
    docs = helm.template(chart, sets=tuple(sets))
    config_map = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-config"))
    return yaml.safe_load(config_map["data"]["sidecar.yaml"]), ports, docs


def token_env_of_the_sidecar(docs: list[dict]) -> dict[str, str]:
    """Resolve the sidecar container's env the way the kubelet would, from the rendered Secret."""
    secret = one(docs, "Secret")
    env = {}
    for workload in by_kind(docs, "Deployment"):
        for container in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", []):
            if container["name"] != "pathwatch":
                continue
            for item in container["env"]:
                ref = item["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"]
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert env
    return env


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator:
    started: list[subprocess.Popen] = []

    def start(config: dict, env: dict[str, str]) -> subprocess.Popen:
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        # output to a file: a pipe nobody reads could fill and stall the sidecar
        log = (tmp_path / f"sidecar-{len(started)}.log").open("w")
        process = subprocess.Popen([str(PATHWATCH), "sidecar", "--config", str(path)],
                                   env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        process.log_path = Path(log.name)  # type: ignore[attr-defined]
        log.close()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_the_sidecar_serves_probes_metrics_and_a_guarded_api(helm: Helm, chart: Path, tmp_path: Path,
                                                             start_sidecar, mode: str) -> None:
    config, ports, docs = render(helm, chart, mode, tmp_path / "data")
    (tmp_path / "data").mkdir()
    env = token_env_of_the_sidecar(docs)
    assert env == {"PATHWATCH_API_TOKEN": "t0ken-from-values"}
    process = start_sidecar(config, env)
    api = f"http://127.0.0.1:{ports['api']}"

    def ready_or_exited() -> bool:
        return process.poll() is not None or httpx.get(f"{api}/readyz", timeout=2).status_code == 200

    wait_until(ready_or_exited, timeout=30, message="the sidecar's /readyz")
    assert process.poll() is None, process.log_path.read_text()
    assert httpx.get(f"{api}/healthz", timeout=2).status_code == 200
    metrics = httpx.get(f"{api}/metrics", timeout=2)          # what the PodMonitor/ServiceMonitor scrape
    assert metrics.status_code == 200 and "pathwatch_" in metrics.text
    assert httpx.get(f"{api}/api/v1/incidents", timeout=2).status_code == 401
    authorized = httpx.get(f"{api}/api/v1/incidents", timeout=2,
                           headers={"Authorization": f"Bearer {env['PATHWATCH_API_TOKEN']}"})
    assert authorized.status_code == 200
    assert Path(config["incidents"]["path"]).parent == tmp_path / "data"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_without_the_token_the_sidecar_refuses_to_start(helm: Helm, chart: Path, tmp_path: Path,
                                                        start_sidecar) -> None:
    # why the chart always wires a token: its API endpoint is never loopback-only
    config, _, _ = render(helm, chart, "sidecar", tmp_path / "data")
    (tmp_path / "data").mkdir()
    env = {"PATHWATCH_API_TOKEN": ""}
    process = start_sidecar(config, env)
    assert process.wait(timeout=30) != 0
    assert "PATHWATCH_API_TOKEN" in process.log_path.read_text()
