"""A backend process's heartbeats are one trace for the process's life (docs/conventions.md
"Heartbeat"), so that a trace-id router sends them all to one gateway replica. Nothing in the
detectors keeps state per trace for them: bleed's trace table and held verdicts, the duplicates'
and delivery's run tables, the consolidation's paths (keyed by trace and run) see only the kinds
they judge, so a trace that gets a span every 10 s for hours is no entry, no TTL refresh, no
finding."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from sidecar.detectors import build_detectors
from sidecar.detectors.deploys import DeployDetector
from sidecar.model import SpanRecord
from sidecar.telemetry import Telemetry
from tests.sidecar.detectors.factory import S, clean_run, rules, state

T0_S = 1_800_000_000
HOURS = 6
BEAT_S = 10
RUN_EVERY_S = 600
HEARTBEAT_TRACE = "5eed" * 8


def heartbeat(sequence: int, at_ns: int) -> SpanRecord:
    return SpanRecord(HEARTBEAT_TRACE, f"{sequence:016x}", None, "pathwatch.heartbeat", at_ns, at_ns + 1000,
                      kind="heartbeat", service_name="backend", service_instance="pod-1",
                      dropped_spans=sequence, instrumentation_errors=0, pending_emits_evicted=0,
                      heartbeat_sequence=sequence, counts_since_s=T0_S)


def run(with_heartbeats: bool) -> tuple[list, str]:
    """Six hours of a backend: a clean run every 10 minutes, and (or not) a heartbeat every 10 s,
    all of one trace; ticks every 10 s. Returns the findings and the detectors' metrics (table
    sizes and evictions, calls, runs, events)."""
    telemetry = Telemetry(CollectorRegistry())
    clock = [float(T0_S)]
    deploys = DeployDetector(rules(), state(), telemetry, clock_s=lambda: clock[0])
    detectors = build_detectors(rules(), state(), telemetry, deploys=deploys)
    findings = []
    sequence = 0
    for second in range(0, HOURS * 3600, BEAT_S):
        clock[0] = T0_S + second
        now_ns = (T0_S + second) * S
        batch = []
        if second % RUN_EVERY_S == 0:
            batch += clean_run(f"user-{second // RUN_EVERY_S % 7}", start_ns=now_ns - 50 * 10**6)
        if with_heartbeats:
            sequence += 1
            batch.append(heartbeat(sequence, now_ns))
        for detector in detectors:
            findings += detector.consume(batch, now_ns)
            findings += detector.tick(now_ns + BEAT_S * S // 2)
    for detector in detectors:
        tables = getattr(detector, "tables", None)
        if tables is not None:
            tables.publish()
    metrics = "\n".join(line for line in generate_latest(telemetry.registry).decode().splitlines()
                        if "_created" not in line)  # the series' creation times differ
    return findings, metrics


def test_a_heartbeat_trace_as_long_as_the_process_changes_nothing_in_the_detectors():
    findings, metrics = run(with_heartbeats=True)
    assert findings == []
    assert metrics == run(with_heartbeats=False)[1]
    # the scenario did something: 36 runs judged, bleed's trace table published
    assert 'pathwatch_runs_completed_total{outcome="complete"} 36.0' in metrics
    assert 'pathwatch_state_entries{table="bleed_traces"}' in metrics
