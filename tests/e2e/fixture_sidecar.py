"""The real sidecar process (``python -m sidecar --config FILE``) on free loopback ports, with the
API reads the end-to-end tests make.

The config is written once; ``start`` can be called again after ``stop`` to restart the process
on the same ports and the same incident store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sidecar.testing import SidecarProcess

ROOT = Path(__file__).resolve().parents[2]


class Sidecar(SidecarProcess):
    def __init__(self, workdir: Path, *, rules: dict[str, Any] | None = None,
                 incidents_path: str = ":memory:", alerting: dict[str, Any] | None = None,
                 receiver: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> None:
        config: dict[str, Any] = {"incidents": {"path": incidents_path}, "rules": rules or {}}
        if alerting:
            config["alerting"] = alerting
        if receiver:
            config["receiver"] = receiver
        super().__init__(config, state_dir=workdir, env=env)

    @property
    def http_port(self) -> int:
        return int(self.http_endpoint.rpartition(":")[2])

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
        return sum(sample.value for family in text_string_to_metric_families(self.metrics())
                   for sample in family.samples
                   if sample.name == name
                   and all(sample.labels.get(k) == v for k, v in labels.items()))
