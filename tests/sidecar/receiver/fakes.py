"""Small stand-ins for the pipeline's neighbours: detectors, incident sink, alert sink."""

from __future__ import annotations

import threading

from sidecar.model import Finding, Incident, SpanRecord


class RecordingDetector:
    def __init__(self, name="recording", findings_for=lambda spans: [], tick_findings=None):
        self.name = name
        self.seen: list[SpanRecord] = []
        self.ticks = 0
        self._findings_for = findings_for
        self._tick_findings = tick_findings or []

    def consume(self, spans, now_ns):
        self.seen.extend(spans)
        return self._findings_for(spans)

    def tick(self, now_ns):
        self.ticks += 1
        found, self._tick_findings = self._tick_findings, []
        return found


class RaisingDetector:
    name = "raising"

    def consume(self, spans, now_ns):
        raise RuntimeError("boom")

    def tick(self, now_ns):
        raise RuntimeError("boom")


class BlockingDetector(RecordingDetector):
    """Holds the pipeline thread inside ``consume`` until the test sets ``release``."""

    def __init__(self):
        super().__init__("blocking")
        self.release = threading.Event()
        self.entered = threading.Event()

    def consume(self, spans, now_ns):
        self.entered.set()
        assert self.release.wait(60), "test never released the detector"
        return super().consume(spans, now_ns)


class FakeIncidents:
    """Records every finding the pipeline hands over, and makes incidents as the store does.

    Why not the real ``IncidentStore(":memory:")`` (which runs here, and which the tests of the
    pipeline's alerting use): it merges findings into incidents, so a test of what the pipeline
    passed on (each finding, in order, once) could not see it; and ``fail=True`` stands for a store
    whose writes raise (a full disk), which the real SQLite store cannot be made to do here."""

    def __init__(self, fail=False):
        self.recorded: list[Finding] = []
        self._incidents: dict[str, Incident] = {}
        self._fail = fail

    def record(self, findings):
        if self._fail:
            raise OSError("disk full")
        self.recorded.extend(findings)
        touched = []
        for f in findings:
            incident = self._incidents.get(f.fingerprint)
            if incident is None:
                incident = self._incidents[f.fingerprint] = Incident(
                    id=f.fingerprint, rule=f.rule, severity=f.severity, role=f.role,
                    implementation=None, entry_point=None, summary=f.summary, count=1,
                    first_seen_ns=0, last_seen_ns=0, sample_trace_ids=[])
                touched.append((incident, True))
            else:
                incident.count += 1
                touched.append((incident, False))
        return touched


class FakeAlerts:
    """Every push succeeds at once (the incident is marked alerted, as the dispatcher does).

    Why not the real ``AlertDispatcher`` (which runs here with a local webhook, see
    test_pipeline's alert tests): it filters by severity and rate and posts on its own thread, so
    which incidents the pipeline offered, and when, could not be read from what it posted."""

    def __init__(self):
        self.notified: list[Incident] = []

    def notify(self, incidents):
        for incident in incidents:
            incident.alerted = True
        self.notified.extend(incidents)
