"""The sidecar's label names survive the scrape: none is named like a target label.

Prometheus attaches target labels to every scraped series; with ``honor_labels: false`` (the default,
and what the prometheus-operator generates) a scraped label of the same name is renamed
``exported_<name>`` and the target's value takes its place. The chart's gateway mode is scraped by a
ServiceMonitor, whose targets carry ``namespace``, ``service`` (the Kubernetes Service), ``pod``,
``container`` and ``endpoint``: a sidecar label ``service`` (the backend's ``service.name``) was
stored as ``exported_service``, and every alert and panel grouping by ``service`` read the Service's
name instead (/tmp/s19/metrics/repro_service_label_clash.py). Scrape configs that copy pod labels onto
targets (a ``labelmap`` of the pod's labels, a monitor's ``podTargetLabels``) add Istio's ``version``
pod label: the sidecar's ``version`` (the backend's ``service.version``, and its own in
``pathwatch_build_info``) was stored as ``exported_version`` and "Runs per version" grouped by the
pod's label (/tmp/s19/labels/repro_version_label_clash.py).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import httpx
import pytest
import yaml

from sidecar import __version__
from sidecar.testing import SidecarProcess
from tests.dashboards.catalog import monitor_labels, relabeled_target_labels, sidecar_metrics
from tests.dashboards.tooling import RULES
from tests.e2e.fixture_runs import send_runs
from tests.support import free_port, wait_until

pytestmark = pytest.mark.timeout(120)

# what the prometheus-operator's relabeling gives a ServiceMonitor target of the chart in gateway
# mode (pkg/prometheus/promcfg.go, generateServiceMonitorConfig), plus the chart's job relabeling
SERVICE_MONITOR_TARGET = {"job": "pathwatch", "namespace": "observed", "service": "pw-pathwatch-api",
                          "pod": "pw-pathwatch-0", "container": "sidecar",
                          "endpoint": "pathwatch-api"}
# pod labels a labelmap of __meta_kubernetes_pod_label_(.+) copies onto the target (Istio's convention)
POD_LABELS = {"app": "backend", "version": "v2"}


def test_no_sidecar_label_is_named_like_a_target_label() -> None:
    clashes = {f"{metric}{{{label}}}" for metric, labels in sidecar_metrics().items()
               if metric != "up" for label in labels & relabeled_target_labels()}
    assert not clashes, f"renamed exported_<label> by the scrape: {sorted(clashes)}"


def test_the_build_info_is_in_the_catalog_with_its_label() -> None:
    # an Info has no label names until set: the clash check above sees its label only if it is set
    # where the registry is built
    assert sidecar_metrics()["pathwatch_build_info"] == {"service_version"}


def test_service_monitor_target_labels_are_in_the_catalog_of_monitor_labels() -> None:
    assert set(SERVICE_MONITOR_TARGET) <= monitor_labels()
    assert set(POD_LABELS) <= relabeled_target_labels()


@pytest.fixture
def scraped(tmp_path) -> Iterator[str]:
    """A real sidecar that got a heartbeat (service.name "backend", service.version "1", 3 dropped
    spans) through the official OTLP exporter, scraped by a real Prometheus as the chart's
    ServiceMonitor scrapes it, with the pod labels a labelmap would copy onto the target too."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not on PATH: run `scripts/setup.sh debian`")
    with SidecarProcess({"receiver": {"http_endpoint": ""}}, state_dir=tmp_path / "sidecar") as sidecar:
        send_runs(sidecar.grpc_endpoint, version="1", runs=1, dropped_spans=3)
        target = sidecar.api_url.removeprefix("http://")
        labels = {k: v for k, v in SERVICE_MONITOR_TARGET.items() if k != "job"} | POD_LABELS
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(RULES)],
                  "scrape_configs": [{"job_name": SERVICE_MONITOR_TARGET["job"],
                                      "static_configs": [{"targets": [target], "labels": labels}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        with (tmp_path / "prometheus.log").open("w") as log:
            process = subprocess.Popen(
                [exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=20)


def _query(url: str, expr: str) -> list[dict]:
    try:
        response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5)
    except httpx.HTTPError:
        return []  # not listening yet
    return response.json()["data"]["result"] if response.status_code == 200 else []


def test_the_backends_service_name_and_version_reach_prometheus_through_a_monitor(scraped: str) -> None:
    series = wait_until(lambda: _query(scraped, 'pathwatch_backend_dropped_spans_total == 3'),
                        timeout=30, message="the heartbeat's dropped spans scraped")
    assert [s["metric"].get("service_name") for s in series] == ["backend"]
    # the grouping of PathwatchBackendDroppingSpans and of the dashboards' backend and version panels
    for expr in ("sum by (namespace, service_name) (pathwatch_backend_dropped_spans_total)",
                 "sum by (service_name, service_version) (pathwatch_version_runs_total)"):
        grouped = wait_until(lambda e=expr: _query(scraped, e), timeout=30, message=expr)
        assert {s["metric"]["service_name"] for s in grouped} == {"backend"}, expr
    runs = _query(scraped, "sum by (service_name, service_version) (pathwatch_version_runs_total)")
    assert [(s["metric"]["service_name"], s["metric"]["service_version"]) for s in runs] == [
        ("backend", "1")]
    build = wait_until(lambda: _query(scraped, "pathwatch_build_info"), timeout=30,
                       message="the build info scraped")
    assert [s["metric"]["service_version"] for s in build] == [__version__]
    renamed = {name for s in _query(scraped, '{__name__=~"pathwatch_.+"}') for name in s["metric"]
               if name.startswith("exported_")}
    assert not renamed
