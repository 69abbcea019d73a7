"""The real sidecar runs on what the chart renders: its config, its token wiring, its probe paths."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class RunningSidecar:
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator:
    started: list[RunningSidecar] = []

    def start(config: dict, env: dict[str, str]) -> RunningSidecar:
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        log = tmp_path / f"sidecar-{len(started)}.log"
        # output to a file: a pipe nobody reads could fill and stall the sidecar
        with log.open("w") as sink:
            process = subprocess.Popen([str(PATHWATCH), "sidecar", "--config", str(path)],
                                       env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT)
        started.append(RunningSidecar(process, log))
        return started[-1]

    yield start
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.process.send_signal(signal.SIGTERM)
            try:
                sidecar.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                sidecar.process.kill()
                sidecar.process.wait()


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_the_sidecar_serves_probes_metrics_and_a_guarded_api(helm: Helm, chart: Path, tmp_path: Path,
                                                             start_sidecar, mode: str) -> None:
    config, ports, docs = render(helm, chart, mode, tmp_path / "data")
    (tmp_path / "data").mkdir()
    env = token_env_of_the_sidecar(docs)
    assert env == {"PATHWATCH_API_TOKEN": "t0ken-from-values"}
    sidecar = start_sidecar(config, env)
    process = sidecar.process
    api = f"http://127.0.0.1:{ports['api']}"

    def ready_or_exited() -> bool:
        return process.poll() is not None or httpx.get(f"{api}/readyz", timeout=2).status_code == 200

    wait_until(ready_or_exited, timeout=30, message="the sidecar's /readyz")
    assert process.poll() is None, sidecar.output()
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
    sidecar = start_sidecar(config, env)
    assert sidecar.process.wait(timeout=30) != 0
    assert "PATHWATCH_API_TOKEN" in sidecar.output()
