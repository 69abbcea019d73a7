"""The metric catalog the sidecar exports, read from a fresh registry (names and label names).

Only a child (a label set) produces samples, so each labelled metric gets one placeholder child in
a throw-away registry; the sample names then come from prometheus-client itself (``_total``,
``_bucket``, ``_info`` ...), not from a list we keep by hand.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from sidecar.telemetry import Telemetry

# Series Prometheus adds to every scrape target; the absent-sidecar alert reads `up`.
SYNTHETIC = {"up": frozenset({"job", "instance"})}


def sidecar_metrics() -> dict[str, frozenset[str]]:
    """Sample name -> label names (besides the target labels Prometheus adds)."""
    telemetry = Telemetry(CollectorRegistry())
    for metric in vars(telemetry).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:  # no public accessor
            metric.labels(*("x" for _ in metric._labelnames))
    catalog: dict[str, frozenset[str]] = dict(SYNTHETIC)
    for family in telemetry.registry.collect():
        for sample in family.samples:
            catalog[sample.name] = catalog.get(sample.name, frozenset()) | frozenset(sample.labels)
    return catalog


def target_labels() -> frozenset[str]:
    """Labels Prometheus attaches to every scraped series."""
    return frozenset({"job", "instance"})
