"""Prometheus metric definitions, on an injected registry (one per test, one per process).

Labels come only from small fixed sets (rule, severity, role, implementation, entry point, event type,
reason, protocol, outcome, table, detector, sink) — never a user, run, trace or event id. Trace ids ride
as exemplars on the findings counter. Dashboards and alert rules query these names; renaming one is a
breaking change for them.

No label is named like a target label a scrape adds (job, instance, and what the prometheus-operator's
PodMonitor and ServiceMonitor add: namespace, pod, container, endpoint, service; node and the pod labels
(app, version, component ...) that common Kubernetes relabel configs copy onto targets, Istio's
``version`` among them): Prometheus keeps the target's value under that name and renames ours
``exported_<name>``, so a query grouping by it reads the target's. The backend's ``service.name`` and
``service.version`` are therefore ``service_name`` and ``service_version``, as OpenTelemetry's own
Prometheus translation names them, and so is the sidecar's own version in ``pathwatch_build_info``.

Every counter exports its ``<name>_created`` (creation time) series, even when the environment sets
prometheus_client's ``PROMETHEUS_DISABLE_CREATED_SERIES``: the alert rules tell a finding's brand-new
series (born at 1, which increase() never sees) from an old one Prometheus lost track of (a failed
scrape, a gap, empty storage) by it (dashboards/rules/pathwatch-rules.yaml).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics import enable_created_metrics

from sidecar import __version__

#: from 100 us: an in-process WebSocket write follows its emit in 0.15 ms (the demo backend), and a
#: quantile below the lowest bucket is only interpolated from 0 (1 ms as the lowest read every p50 0.5 ms)
DELIVERY_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                            1.0, 2.5, 5.0, 10.0)
#: 1 to 100 ms in ten steps a decade (the Renard series, each edge at most 1.28x the one below):
#: the demo's findings take 2-55 ms, the throughput benchmark's p99 10-25 ms, and the goal is a p99
#: of 100 ms. The edges were 2-2.5x apart (10, 25, 50, 100 ms): histogram_quantile read the demo's
#: p99 1.8x high. Coarse below 1 ms and above 100 ms, up to 1 s; one series an edge (no labels)
PIPELINE_LATENCY_BUCKETS = (0.0005, 0.001, 0.00125, 0.0016, 0.002, 0.0025, 0.0032, 0.004, 0.005,
                            0.0063, 0.008, 0.01, 0.0125, 0.016, 0.02, 0.025, 0.032, 0.04, 0.05,
                            0.063, 0.08, 0.1, 0.25, 0.5, 1.0)


class Telemetry:
    """Every metric the sidecar exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # process-wide and read when each labelled child is made: the sidecar's alerts need `_created`
        enable_created_metrics()
        self.registry = registry
        r = registry
        self.build_info = Info("pathwatch_build", "pathwatch sidecar build information "
                               "(service_version: the sidecar's own version)", registry=r)
        self.build_info.info({"service_version": __version__})
        # findings and incidents
        self.findings = Counter(
            "pathwatch_findings", "Findings raised by the detectors (trace id as exemplar; \"other\": "
            "roles, implementations, entry points beyond 64 / 512 / 512, and a new label combination "
            "beyond 4096 series folds its entry point, then implementation: "
            "pathwatch_findings_overflow_total)",
            ["rule", "severity", "role", "implementation", "entry_point"], registry=r)
        self.findings_overflow = Counter(
            "pathwatch_findings_overflow", "New label values and combinations of pathwatch_findings "
            "folded into \"other\" (limit: roles, implementations, entry_points - a value beyond its "
            "limit, or an entry point or implementation folded by the series cap; cells - a new "
            "combination given no series of its own, beyond 3/4 of the 4096 series cap)", ["limit"],
            registry=r)
        self.findings_inhibited = Counter(
            "pathwatch_findings_inhibited", "Info findings not reported because a warning or critical "
            "finding named the same role and entry point (sidecar/inhibition.py)", ["rule"], registry=r)
        self.incidents_open = Gauge(
            "pathwatch_incidents_open", "Open incidents", ["rule", "severity"], registry=r)
        self.incidents_refused = Counter(
            "pathwatch_incidents_refused",
            "Findings refused because the incident store is full (a new fingerprint beyond capacity, "
            "and no resolved or less severe incident to evict)", registry=r)
        self.incidents_evicted = Counter(
            "pathwatch_incidents_evicted",
            "Incidents evicted from the full incident store to make room for a new fingerprint "
            "(reason: resolved, lower_severity)", ["reason"], registry=r)
        self.incident_store_errors = Counter(
            "pathwatch_incident_store_errors",
            "Incident store writes that failed (kept in memory, retried with the next write)",
            registry=r)
        # the consolidation inventory
        self.calls = Counter(
            "pathwatch_calls", "Wrapped calls seen, per implementation of each role (nested: made "
            "inside another wrapped call of the same role, e.g. a legacy adapter delegating; shares "
            "count nested=\"false\" only, as /api/v1/inventory does)",
            ["role", "implementation", "canonical", "retired", "entry_point", "nested"], registry=r)
        self.implementation_last_seen = Gauge(
            "pathwatch_implementation_last_seen_timestamp_seconds",
            "Unix time an implementation was last called", ["role", "implementation"], registry=r)
        # the consolidation workflow (sidecar/consolidation/): paths, versions, deletable classes
        self.path_runs = Counter(
            "pathwatch_path_runs", "Runs judged per execution path (path = short id, see "
            "/api/v1/consolidation/paths; \"other\": runs of paths beyond the per-entry-point limit, "
            "and of paths new once the metric has 4096 series)",
            ["entry_point", "path"], registry=r)
        self.entry_point_paths = Gauge(
            "pathwatch_entry_point_paths",
            "Distinct execution paths an entry point took within the path window", ["entry_point"],
            registry=r)
        self.version_runs = Counter(
            "pathwatch_version_runs", "Runs seen per backend service.name and service.version "
            "(versions the sidecar tracks, see /api/v1/consolidation/versions)",
            ["service_name", "service_version"],
            registry=r)
        self.version_findings = Counter(
            "pathwatch_version_findings", "Findings per backend service.name, service.version and "
            "rule family (versions the sidecar tracks)", ["service_name", "service_version", "family"],
            registry=r)
        self.ledger_refused_calls = Counter(
            "pathwatch_ledger_refused_calls",
            "Calls of implementations the consolidation ledger does not track: classes new to it "
            "once it holds its maximum (512); they get no verdict (see verdicts.overflow)",
            registry=r)
        self.ledger_errors = Counter(
            "pathwatch_ledger_errors",
            "Errors of the consolidation ledger behind the safe_to_delete verdicts, by operation "
            "(open, write) and cause: unreadable (moved aside, a fresh ledger started), "
            "newer_version / other_shape (a later release's file, left alone: the ledger is kept in "
            "memory only), sqlite_error (a failed write: kept in memory, retried with the next "
            "flush)", ["operation", "cause"], registry=r)
        self.ledger_state = Gauge(
            "pathwatch_ledger_state",
            "1 for the consolidation ledger's persistence state, 0 for the others: persisted, "
            "moved_aside (persisted to a fresh file: the last one was unreadable), write_failing, "
            "in_memory (its file left alone: not saved), no_file (incidents.path \":memory:\")",
            ["state"], registry=r)
        self.implementation_safe_to_delete = Gauge(
            "pathwatch_implementation_safe_to_delete",
            "1 when a retired or non-canonical implementation had zero calls for the whole window",
            ["role", "implementation"], registry=r)
        self.ledger_window_watched = Gauge(
            "pathwatch_ledger_window_watched",
            "1 once this sidecar's consolidation ledger has watched a whole safe-to-delete window "
            "since it started, since its latest span loss and since it last refused a class: a "
            "class it has no pathwatch_implementation_safe_to_delete series for was not called "
            "through it within the window; 0 before (across pods, it vetoes every class)",
            registry=r)
        # delivery
        self.events_emitted = Counter(
            "pathwatch_events_emitted", "Events the backend emitted (non-nested emit calls, failed "
            "ones included: the denominator of the undelivered ratio)", ["event_type"], registry=r)
        self.events_written = Counter(
            "pathwatch_events_written", "Socket writes carrying an event", ["event_type", "outcome"],
            registry=r)
        self.events_undelivered = Counter(
            "pathwatch_events_undelivered", "Events that did not reach a socket",
            ["event_type", "reason"], registry=r)
        self.events_overflow = Counter(
            "pathwatch_events_overflow", "Counts of pathwatch_events_emitted, _written and "
            "_undelivered made under event_type=\"other\" because the event's type came after the "
            "first 128 distinct ones (one per emit, write and undelivered event so labelled)",
            registry=r)
        self.delivery_latency = Histogram(
            "pathwatch_delivery_latency_seconds", "Time from an event's emit to its first socket write",
            ["event_type"], buckets=DELIVERY_LATENCY_BUCKETS, registry=r)
        self.runs_completed = Counter(
            "pathwatch_runs_completed", "Runs judged complete", ["outcome"], registry=r)
        # the receiver
        self.receiver_spans = Counter(
            "pathwatch_receiver_spans", "Spans offered to the receiver",
            ["protocol", "outcome"], registry=r)  # outcome: accepted | refused | invalid | replayed
        self.receiver_requests = Counter(
            "pathwatch_receiver_requests", "Export requests by status", ["protocol", "status"],
            registry=r)
        self.receiver_refused_requests = Counter(
            "pathwatch_receiver_refused_requests", "Export requests refused, by why: over_budget "
            "(receiver.max_pending_spans), in_flight (OTLP/HTTP's 64), shutting_down, "
            "too_many_spans, too_many_attributes, too_large (receiver.max_message_bytes, OTLP/HTTP)",
            ["protocol", "reason"], registry=r)
        self.http_connections_closed = Counter(
            "pathwatch_http_connections_closed",
            "Connections an HTTP server (OTLP/HTTP, the API) closed unanswered: beyond its cap of open "
            "connections, or their request head not complete in time (docs/sidecar.md)",
            ["server", "reason"], registry=r)  # server: otlp_http | api; reason: limit | head_timeout
        self.receiver_invalid_attributes = Counter(
            "pathwatch_receiver_invalid_attributes",
            "Known span attributes ignored because their value was unusable: the wrong type or form, "
            "longer than 512 characters, or not UTF-8",
            ["attribute"], registry=r)  # attribute: a key of the span contract (a fixed set)
        self.receiver_pending_spans = Gauge(
            "pathwatch_receiver_pending_spans", "Spans accepted and not yet through the pipeline",
            registry=r)
        self.pipeline_processed_spans = Counter(
            "pathwatch_pipeline_processed_spans", "Spans the pipeline handed to every detector "
            "(accepted = processed + pending: none accepted is lost)", registry=r)
        self.pipeline_latency = Histogram(
            "pathwatch_pipeline_latency_seconds", "Time from receipt of the span that completed a "
            "finding's evidence to the finding, for findings raised as spans are processed (not those "
            "judged when a wait ends: delivery deadline, idle run, held verdict)",
            buckets=PIPELINE_LATENCY_BUCKETS, registry=r)
        self.detector_evidence_dropped = Counter(
            "pathwatch_detector_evidence_dropped",
            "Evidence a detector did not keep or did not judge because a per-trace or per-event bound "
            "was hit, or two user ids of different keys were not compared (bleed reasons: trace_users, "
            "trace_held, trace_siblings, trace_stash, unplaced, pseudonym_keys, connection_users; duplicates: "
            "event_connections; delivery: late_export, a write in time that arrived after its "
            "event, or a no-connection dispatch it answers, was judged; started_before_sidecar, an "
            "event emitted (or no-connection dispatch made) before a restart whose write may have gone to the previous sidecar "
            "process; docs/rules.md)", ["detector", "reason"], registry=r)
        self.liveness_failures = Counter(
            "pathwatch_liveness_failures", "Vital parts of the sidecar its liveness check found "
            "failing, once per failure: a thread that ended before the shutdown (reason ended), the "
            "pipeline thread inside one step for api.liveness_grace_s (reason stalled); /healthz "
            "answers 503 while one is (sidecar/liveness.py)", ["part", "reason"], registry=r)
        self.detector_errors = Counter(
            "pathwatch_detector_errors", "Exceptions raised inside a detector (caught)", ["detector"],
            registry=r)
        # state
        self.state_entries = Gauge(
            "pathwatch_state_entries", "Entries held per state table", ["table"], registry=r)
        self.state_capacity = Gauge(
            "pathwatch_state_capacity", "Capacity per state table", ["table"], registry=r)
        self.state_evictions = Counter(
            "pathwatch_state_evictions", "Entries evicted per state table", ["table", "reason"],
            registry=r)  # reason: ttl | capacity
        # the backend's own coverage
        self.backend_dropped_spans = Counter(
            "pathwatch_backend_dropped_spans", "Spans the backend SDK reported dropped", ["service_name"],
            registry=r)
        self.backend_instrumentation_errors = Counter(
            "pathwatch_backend_instrumentation_errors",
            "Errors the instrumentation caught inside the backend", ["service_name"], registry=r)
        self.backend_pending_emits_evicted = Counter(
            "pathwatch_backend_pending_emits_evicted",
            "Emits the backend's bounded emit table forgot before a socket write could find them "
            "by key (those writes are not linked to their emit)", ["service_name"], registry=r)
        self.backend_processes_vanished = Counter(
            "pathwatch_backend_processes_vanished",
            "Backend processes that stopped heartbeating without a final heartbeat (killed "
            "outright): the spans their exporters still held are lost", ["service_name"],
            registry=r)
        self.backend_last_heartbeat = Gauge(
            "pathwatch_backend_last_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat per backend service", ["service_name"], registry=r)
        # alerting
        self.alerts_sent = Counter(
            "pathwatch_alerts_sent", "Alert pushes by sink and outcome", ["sink", "outcome"],
            registry=r)  # outcome: sent | refreshed | resolved | cancelled | failed | retried | deduplicated | rate_limited | dropped
        # | instance_skipped (one instance of an Alertmanager cluster missed a firing alert or refresh,
        # its backlog full; resolves are never skipped)
        self.alerts_clock_skew = Gauge(
            "pathwatch_alerts_clock_skew_seconds",
            "Alertmanager's clock minus the sidecar's, from the Date header of its last answer "
            "(for a cluster: the instance furthest off)", ["sink"], registry=r)
        self.alerts_resume_waiting = Gauge(
            "pathwatch_alerts_resume_waiting",
            "Pages of open incidents not paged at start that wait for room in the sink's alert queue",
            ["sink"], registry=r)
