"""The env ``pathwatch.backendEnv`` gives the backend container gets its spans to the sidecar.

The demo backend runs with exactly the container the chart renders (its command, its env, the path map
ConfigMap where the chart mounts it, the HMAC key from the rendered Secret) beside a real sidecar on
the rendered ``sidecar.yaml``. Two backend images:

* ``pathwatch-only``: an image with only the ``pathwatch`` package (README step 2). There
  ``opentelemetry-instrument`` finds no distro and no configurator, so no SDK exporter exists and only
  pathwatch's own (``PATHWATCH_OTLP_ENDPOINT``) can send spans. The test venv has opentelemetry-distro
  (the ``test`` extra); ``OTEL_PYTHON_DISTRO=none`` and ``OTEL_PYTHON_CONFIGURATOR=none`` make
  ``opentelemetry-instrument`` skip both, as when they are not installed (a venv without them would
  need a pip install per run).
* ``with-distro``: opentelemetry-distro installed too: the SDK exporter stays off
  (``OTEL_TRACES_EXPORTER=none``), every span arrives once, through pathwatch's exporter.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from examples.traffic import drive
from sidecar.testing import SidecarProcess, stop_process
from tests.helm.charting import CHART, EXAMPLES, HELM_BINARIES, ROOT, Helm, by_kind, pod_spec
from tests.support import free_port, wait_until

TOKEN = "t0ken-from-values"
BIN = Path(sys.executable).parent  # opentelemetry-instrument and python of the backend
IMAGES = {
    "pathwatch-only": {"OTEL_PYTHON_DISTRO": "none", "OTEL_PYTHON_CONFIGURATOR": "none"},
    "with-distro": {},
}


def rendered_backend(tmp_path: Path) -> tuple[list[str], dict[str, str], dict, Path]:
    """(command, resolved env, sidecar.yaml, path map dir) of the sidecar example's demo backend."""
    helm = Helm(HELM_BINARIES["helm3"], tmp_path / "helm-home")  # one helm: both render the same env
    ports = {"otlpGrpc": free_port(), "otlpHttp": free_port(), "api": free_port()}
    pathmap_dir, data_dir = tmp_path / "pathmap", tmp_path / "data"
    docs = helm.template(CHART, EXAMPLES / "sidecar-values.yaml", sets=(
        f"secrets.apiToken={TOKEN}", f"pathmap.mountPath={pathmap_dir}", f"persistence.mountPath={data_dir}",
        *(f"ports.{name}={port}" for name, port in ports.items())))
    [secret] = by_kind(docs, "Secret")
    config_maps = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
    [deployment] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-demo-backend")]
    spec = pod_spec(deployment)
    [backend] = [c for c in spec["containers"] if c["name"] == "backend"]
    env = {}
    for item in backend["env"]:   # as the kubelet resolves it
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            env[item["name"]] = item["value"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "pathwatch-pathmap"]
    pathmap_dir.mkdir()
    data_dir.mkdir()
    for key, text in config_maps[volume["configMap"]["name"]]["data"].items():
        (pathmap_dir / key).write_text(text)
    config = yaml.safe_load(next(c for name, c in config_maps.items() if name.endswith("-config"))
                            ["data"]["sidecar.yaml"])
    port = str(free_port())   # the container's port 8000, here on loopback
    command = [{"8000": port, "0.0.0.0": "127.0.0.1"}.get(arg, arg) for arg in backend["command"]]
    return command, env, config, pathmap_dir


@pytest.fixture
def stack(tmp_path: Path) -> Iterator:
    started: list = []

    def start(image: str) -> tuple[SidecarProcess, str, Path, dict[str, str]]:
        command, env, config, _ = rendered_backend(tmp_path)
        sidecar = SidecarProcess(config, state_dir=tmp_path / "sidecar", env={"PATHWATCH_API_TOKEN": TOKEN})
        started.append(sidecar)
        sidecar.start(ready_timeout=30)
        # nothing from the test run's own environment: only what the pod would have
        backend_env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path),
                       "PYTHONPATH": str(ROOT), **env, **IMAGES[image]}
        log_path = tmp_path / "backend.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=backend_env, stdout=log, stderr=subprocess.STDOUT)
        started.append(process)
        url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
        wait_until(lambda: process.poll() is None and httpx.get(f"{url}/healthz", timeout=1).status_code == 200,
                   timeout=30, message=f"the demo backend under {command[0]} ({log_path})")
        return sidecar, url, log_path, env

    yield start
    for item in reversed(started):
        if isinstance(item, SidecarProcess):
            item.stop(timeout=20)
        else:
            stop_process(item, 15)


def accepted_spans(sidecar: SidecarProcess) -> int:
    metrics = httpx.get(f"{sidecar.api_url}/metrics", timeout=5).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("pathwatch_receiver_spans_total{") and 'outcome="accepted"' in line))


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_rendered_backend_env_gets_spans_to_the_sidecar(stack, image: str) -> None:
    sidecar, url, log_path, env = stack(image)
    observed = asyncio.run(drive(url, ["S0"], users=2, runs_per_user=2, timeout_s=20))["S0"]
    assert len(observed.runs) == 4 and not observed.errors
    # the path map reached the backend: the sidecar's inventory names the demo's engine classes
    headers = {"Authorization": f"Bearer {TOKEN}"}
    wait_until(lambda: "UserExecutionEngine" in httpx.get(f"{sidecar.api_url}/api/v1/inventory",
                                                          headers=headers, timeout=5).text,
               timeout=20, message=f"the demo's execute spans at the sidecar (backend log: {log_path})")
    received = accepted_spans(sidecar)
    print(f"{image}: {received} spans accepted by the sidecar")
    assert received >= 4 * 5   # every run: request, engine, supervisor, emits, socket writes
    log = log_path.read_text(errors="replace")
    # one exporter: pathwatch's, never also the SDK's (which would send every span twice)
    assert "no second exporter" not in log, log
    assert env["OTEL_TRACES_EXPORTER"] == "none" and env["PATHWATCH_OTLP_ENDPOINT"].startswith("127.0.0.1:")


def test_the_backend_env_names_what_pathwatch_reads(tmp_path: Path) -> None:
    """The keys of pathwatch.backendEnv: pathwatch's own exporter, the SDK's off. OTEL_EXPORTER_OTLP_*
    would configure nothing in an image without opentelemetry-distro (0 spans, nothing logged)."""
    _, env, config, pathmap_dir = rendered_backend(tmp_path)
    assert set(env) == {"PATHWATCH_HMAC_KEY", "PATHWATCH_PATHMAP", "PATHWATCH_OTLP_ENDPOINT",
                        "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER",
                        "OTEL_SERVICE_NAME"}  # the last one: the demo backend's own
    assert env["PATHWATCH_OTLP_ENDPOINT"] == config["receiver"]["grpc_endpoint"]   # the sidecar's receiver
    assert Path(env["PATHWATCH_PATHMAP"]).parent == pathmap_dir
    assert (env["OTEL_TRACES_EXPORTER"], env["OTEL_METRICS_EXPORTER"], env["OTEL_LOGS_EXPORTER"]) == \
        ("none", "none", "none")
