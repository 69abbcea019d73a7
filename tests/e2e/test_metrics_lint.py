"""The sidecar's /metrics output passes `promtool check metrics` (Prometheus' own linter), with every
kind of series present: findings with exemplars, calls, delivery, receiver, state, heartbeat counts."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from tests.e2e.fixture_runs import send_runs
from tests.e2e.fixture_sidecar import Sidecar
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)


def test_metrics_pass_promtool_check_metrics(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run scripts/setup.sh debian (Debian's prometheus package)")
    rules = {"delivery_deadline_s": 0.2, "delivery_export_allowance_s": 0.0, "run_idle_s": 0.3}
    with Sidecar(tmp_path, rules=rules) as sidecar:
        # one run whose user-scoped engine was built for bob serves alice: a bleed; and a heartbeat
        send_runs(sidecar.grpc_endpoint, version="1", runs=1, owner="bob", dropped_spans=3)
        wait_until(lambda: sidecar.metric("pathwatch_findings_total", rule="bleed.owner_vs_ambient") >= 1
                   and sidecar.metric("pathwatch_runs_completed_total") >= 1
                   and sidecar.metric("pathwatch_backend_dropped_spans_total") == 3,
                   timeout=20, message="the bleed finding, the judged run and the heartbeat on /metrics")
        exposition = sidecar.metrics()
    for family in ("pathwatch_calls_total", "pathwatch_events_written_total",
                   "pathwatch_delivery_latency_seconds_bucket", "pathwatch_receiver_spans_total",
                   "pathwatch_state_entries", 'pathwatch_gc_pause_seconds_count{generation="2"}',
                   'pathwatch_ledger_state{state="persisted"}',
                   'pathwatch_ledger_errors_total{cause="sqlite_error",operation="write"}'):
        assert family in exposition, family
    result = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pipeline_latency_stays_within_its_buckets_under_the_default_rules(tmp_path):
    # delivery.missing_required_events is judged rules.run_idle_s (1 s) after the run's last span:
    # timed from that span's receipt it fell above the top bucket (1 s) and histogram_quantile read
    # the p99 as the top bucket, whatever the detectors' speed (/tmp/s19/metrics/repro_pipeline_latency.py)
    with Sidecar(tmp_path) as sidecar:
        send_runs(sidecar.grpc_endpoint, version="1", runs=5, owner="bob")  # bleeds, raised at once
        wait_until(lambda: sidecar.metric("pathwatch_findings_total",
                                          rule="delivery.missing_required_events") >= 5
                   and sidecar.metric("pathwatch_findings_total", rule="bleed.owner_vs_ambient") >= 5,
                   timeout=30, message="five bleeds and five runs missing events")
        bleeds = sidecar.metric("pathwatch_findings_total", rule="bleed.owner_vs_ambient")
        timed = sidecar.metric("pathwatch_pipeline_latency_seconds_count")
        within = sidecar.metric("pathwatch_pipeline_latency_seconds_bucket", le="1.0")
    assert timed == bleeds
    assert within == timed
