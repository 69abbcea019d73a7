"""The monitors' scrape timing: a scrapeTimeout longer than the interval is refused at render.

The prometheus-operator refuses a PodMonitor or ServiceMonitor whose scrapeTimeout is longer than its
interval (``scrapeTimeout "10s" greater than scrapeInterval "5s"``: the monitor is left out of the
Prometheus configuration, as Prometheus itself refuses such a scrape config). The chart rendered one
whenever monitoring.interval went below the default scrapeTimeout (10s), e.g. ``monitoring.interval=5s``
alone: no sidecar was scraped, PathwatchSidecarAbsent fired and every other alert and dashboard went
dark. The accepted pairs are checked with promtool on the scrape config they make, and the monitors
against the operator's CRD schema: the values' schema took a duration in any order of units ("30s1m",
"1m1m"), which the CRD's pattern (and Prometheus's duration parser) refuses, so the chart rendered a
monitor the API server refused at install."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.dashboards.tooling import promtool
from tests.helm.charting import Helm, one
from tests.helm.test_render import validate_monitoring

GATEWAY = ("mode=gateway", "secrets.apiToken=t0ken-0123456789")
MODES = {"sidecar": ((), "PodMonitor", "podMetricsEndpoints"),
         "gateway": (GATEWAY, "ServiceMonitor", "endpoints")}


def render(helm: Helm, chart: Path, mode: str, *sets: str, check: bool = True):
    args = ["template", "pw", chart, "--namespace", "observed"]
    for assignment in (*MODES[mode][0], *sets):
        args += ["--set", assignment]
    return helm.run(*args, check=check)


def scrape_config_of(endpoint: dict, path: Path) -> Path:
    """The scrape config the operator makes of a monitor's endpoint (its timing, one target)."""
    path.write_text(yaml.safe_dump({"scrape_configs": [{
        "job_name": "pathwatch", "scrape_interval": endpoint["interval"],
        "scrape_timeout": endpoint["scrapeTimeout"],
        "static_configs": [{"targets": ["127.0.0.1:9464"]}]}]}))
    return path


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("sets", [("monitoring.interval=5s",),
                                  ("monitoring.interval=30s", "monitoring.scrapeTimeout=31s"),
                                  ("monitoring.interval=1m", "monitoring.scrapeTimeout=1m1s"),
                                  ("monitoring.interval=900ms", "monitoring.scrapeTimeout=1s")])
def test_a_scrape_timeout_longer_than_the_interval_is_refused(helm: Helm, chart: Path, mode: str,
                                                              sets: tuple[str, ...]) -> None:
    refused = render(helm, chart, mode, *sets, check=False)
    assert refused.returncode != 0, "rendered a monitor the prometheus-operator refuses"
    assert "monitoring.scrapeTimeout" in refused.stderr, refused.stderr
    assert "monitoring.interval" in refused.stderr, refused.stderr


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("interval, timeout", [("30s", "10s"), ("10s", "10s"), ("1m", "60s"),
                                               ("1m30s", "90s"), ("5s", "4500ms"), ("1h", "59m59s")])
def test_a_scrape_timeout_up_to_the_interval_renders_a_config_prometheus_takes(
        helm: Helm, chart: Path, tmp_path: Path, mode: str, interval: str, timeout: str) -> None:
    _, kind, endpoints = MODES[mode]
    rendered = render(helm, chart, mode, f"monitoring.interval={interval}",
                      f"monitoring.scrapeTimeout={timeout}")
    monitor = one(list(yaml.safe_load_all(rendered.stdout)), kind)
    endpoint = monitor["spec"][endpoints][0]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (interval, timeout)
    assert [report["errors"] for report in validate_monitoring([monitor])] == [[]]
    checked = promtool("check", "config", str(scrape_config_of(endpoint, tmp_path / "prometheus.yml")))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_timing_is_not_checked_without_a_monitor(helm: Helm, chart: Path) -> None:
    render(helm, chart, "sidecar", "monitoring.enabled=false", "monitoring.interval=5s")


def test_promtool_refuses_what_the_chart_refuses(tmp_path: Path) -> None:
    # the premise, on a real Prometheus config parser
    checked = promtool("check", "config", str(scrape_config_of(
        {"interval": "5s", "scrapeTimeout": "10s"}, tmp_path / "prometheus.yml")))
    assert checked.returncode != 0
    assert "scrape timeout greater than scrape interval" in checked.stdout + checked.stderr


@pytest.mark.parametrize("key", ["interval", "scrapeTimeout"])
@pytest.mark.parametrize("value", ["30s1m", "1m1m", "10ms1s", "1s1h", "1m30", "m", ""])
def test_a_duration_out_of_prometheus_s_unit_order_is_refused_by_the_schema(helm: Helm, chart: Path,
                                                                            key: str, value: str) -> None:
    refused = render(helm, chart, "sidecar", "monitoring.interval=1h", f"monitoring.{key}={value}",
                     check=False)
    assert refused.returncode != 0, f"rendered monitoring.{key}={value!r}"
    assert "schema" in refused.stderr and key in refused.stderr, refused.stderr
