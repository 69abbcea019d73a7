"""The real sidecar process (``python -m sidecar --config FILE``) on free loopback ports.

The config is written once; ``start`` can be called again after ``terminate`` to restart the process
on the same ports and the same incident store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


class Sidecar:
    def __init__(self, workdir: Path, *, rules: dict[str, Any] | None = None,
                 incidents_path: str = ":memory:", alerting: dict[str, Any] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.http_port, self.api_port = free_port(), free_port(), free_port()
        config: dict[str, Any] = {
            "receiver": {"grpc_endpoint": self.grpc_endpoint,
                         "http_endpoint": f"127.0.0.1:{self.http_port}"},
            "api": {"endpoint": f"127.0.0.1:{self.api_port}"},
            "incidents": {"path": incidents_path},
            "rules": rules or {},
        }
        if alerting:
            config["alerting"] = alerting
        self.config_path = workdir / "sidecar.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "sidecar.log"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Sidecar:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "--config", str(self.config_path)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, timeout=30, message=f"sidecar ready (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.process.returncode}: {self.log()}")
        return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> Sidecar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # --- the API -----------------------------------------------------------------------------------
    def incidents(self, **params: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.api_url}/api/v1/incidents", params={"limit": "1000", **params},
                             timeout=5)
        response.raise_for_status()
        return response.json()["incidents"]

    def incident(self, incident_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.api_url}/api/v1/incidents/{incident_id}", timeout=5)
        response.raise_for_status()
        return response.json()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        text = httpx.get(f"{self.api_url}/metrics", timeout=5).text
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == name
                   and all(sample.labels.get(k) == v for k, v in labels.items()))
