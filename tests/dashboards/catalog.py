"""The metric catalog the sidecar exports: names, label names, and the values of closed label sets.

The registry is built the way ``sidecar.app`` builds it (``Telemetry`` plus the collectors it
registers beside it); ``test_the_catalog_is_what_a_real_sidecar_serves`` pins that against a real
sidecar's /metrics. Only a child (a label set) produces samples, so each labelled metric gets one
placeholder child in a throw-away registry; the sample names then come from prometheus-client itself
(``_total``, ``_bucket``, ``_info`` ...), not from a list we keep by hand.

Label *values* matter as much as names: ``outcome="rejected"`` on a real metric and label is a query
that silently returns nothing. ``closed_label_values`` lists the fixed value sets the sidecar emits,
read from the sidecar's own constants; a matcher on one of those labels must use one of them.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from instrumentation.attributes import DeliveryOutcomes
from sidecar.alerting.outcomes import AlertOutcomes
from sidecar.consolidation.deploys import COMPARED_FAMILIES
from sidecar.consolidation.verdicts import LEDGER_ERRORS, LEDGER_STATES
from sidecar.detectors import bleed, delivery, duplicates
from sidecar.gcpauses import GENERATIONS, GcPauseCollector
from sidecar.incidents.store import EVICTED_LOWER_SEVERITY, EVICTED_RESOLVED
from sidecar.inventory import _flag
from sidecar.model import Severity
from sidecar.pipeline import FINDINGS_OVERFLOW_LIMITS
from sidecar.receiver import grpc_server, http_server, refusals
from sidecar.receiver.export import SPAN_OUTCOMES, ExportStatus
from sidecar.rules import CATALOG
from sidecar.state import EVICTED_CAPACITY, EVICTED_TTL
from sidecar.telemetry import Telemetry

# Series Prometheus adds to every scrape target; the absent-sidecar alert reads `up`.
SYNTHETIC = {"up": frozenset({"job", "instance"})}


def _collect() -> list:
    """The metric families of a registry built as ``sidecar.app`` builds it, one child each."""
    telemetry = Telemetry(CollectorRegistry())
    gc_pauses = GcPauseCollector().install(telemetry.registry)  # sidecar.app registers it too
    try:
        for metric in vars(telemetry).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:  # no public accessor
                metric.labels(*("x" for _ in metric._labelnames))
        return list(telemetry.registry.collect())
    finally:
        gc_pauses.uninstall(telemetry.registry)


def sidecar_families() -> dict[str, str]:
    """Family name (OpenMetrics: no ``_total``) -> type, as a real sidecar's /metrics declares them."""
    return {family.name: family.type for family in _collect()}


def sidecar_metrics() -> dict[str, frozenset[str]]:
    """Sample name -> label names (besides the target labels Prometheus adds)."""
    catalog: dict[str, frozenset[str]] = dict(SYNTHETIC)
    for family in _collect():
        for sample in family.samples:
            catalog[sample.name] = catalog.get(sample.name, frozenset()) | frozenset(sample.labels)
    return catalog


def target_labels() -> frozenset[str]:
    """Labels Prometheus attaches to every scraped series."""
    return frozenset({"job", "instance"})


def monitor_labels() -> frozenset[str]:
    """Target labels plus what the prometheus-operator's PodMonitor/ServiceMonitor add (the alert
    rules keep `namespace` in every aggregation)."""
    return target_labels() | {"namespace", "pod", "container", "endpoint", "service"}


def relabeled_target_labels() -> frozenset[str]:
    """Every label name a target commonly carries, which no sidecar label may have: the monitors'
    plus what common Kubernetes scrape configs add by relabeling — `node` (the pod's node), the
    conventional pod labels a `labelmap` of ``__meta_kubernetes_pod_label_(.+)`` or a monitor's
    `podTargetLabels` copies (`app` and `version`, Istio's convention; `component`, `tier`, `release`,
    `name`, Helm's `chart` and `heritage`; the Kubernetes recommended ones, such as
    `app.kubernetes.io/version`, arrive prefixed as `app_kubernetes_io_version` unless a relabeling
    names them `version`), the older example config's `kubernetes_namespace`, `kubernetes_pod_name`,
    `kubernetes_name`, and the external labels many setups add (`cluster`, `prometheus`,
    `prometheus_replica`: a series already carrying one keeps its own value when federated or
    remote-written, hiding where it came from)."""
    return monitor_labels() | {
        "node", "app", "version", "component", "tier", "release", "name", "chart", "heritage",
        "kubernetes_namespace", "kubernetes_pod_name", "kubernetes_name",
        "cluster", "prometheus", "prometheus_replica"}


def closed_label_values() -> dict[tuple[str, str], frozenset[str]]:
    """(sample name, label) -> every value the sidecar can give that label, for fixed sets only.

    Open labels (role, implementation, entry point, event type, service name and version ...) are
    not here.
    """
    rules = frozenset(CATALOG)
    severities = frozenset(s.value for s in Severity)
    flags = frozenset({_flag(True), _flag(False)})
    values: dict[tuple[str, str], frozenset[str]] = {}
    values[("pathwatch_findings_total", "rule")] = rules
    values[("pathwatch_findings_total", "severity")] = severities
    values[("pathwatch_findings_overflow_total", "limit")] = frozenset(FINDINGS_OVERFLOW_LIMITS)
    values[("pathwatch_findings_inhibited_total", "rule")] = rules
    values[("pathwatch_incidents_open", "rule")] = rules
    values[("pathwatch_incidents_open", "severity")] = severities
    for label in ("canonical", "retired", "nested"):
        values[("pathwatch_calls_total", label)] = flags
    for name in ("pathwatch_receiver_spans_total", "pathwatch_receiver_requests_total",
                 "pathwatch_receiver_refused_requests_total"):
        values[(name, "protocol")] = frozenset({grpc_server.PROTOCOL, http_server.PROTOCOL})
    values[("pathwatch_receiver_refused_requests_total", "reason")] = frozenset(refusals.REASONS)
    values[("pathwatch_receiver_spans_total", "outcome")] = frozenset(SPAN_OUTCOMES)
    # gRPC: the status code names; HTTP: 200 and every error status the OTLP/HTTP app answers
    values[("pathwatch_receiver_requests_total", "status")] = frozenset(
        {status.value for status in ExportStatus} | {grpc_server.CANCELLED, "200"}
        | {str(code) for code in http_server._GRPC_CODE})  # noqa: SLF001 (its error statuses)
    values[("pathwatch_state_evictions_total", "reason")] = frozenset({EVICTED_TTL, EVICTED_CAPACITY})
    values[("pathwatch_detector_evidence_dropped_total", "reason")] = frozenset(
        bleed.DROPPED_REASONS + duplicates.DROPPED_REASONS + delivery.DROPPED_REASONS)
    values[("pathwatch_incidents_evicted_total", "reason")] = frozenset(
        {EVICTED_RESOLVED, EVICTED_LOWER_SEVERITY})
    values[("pathwatch_events_undelivered_total", "reason")] = frozenset(
        getattr(delivery, name) for name in dir(delivery) if name.startswith("REASON_"))
    values[("pathwatch_events_written_total", "outcome")] = DeliveryOutcomes.ALL | {
        delivery.OUTCOME_UNKNOWN, delivery.OUTCOME_OTHER}
    values[("pathwatch_runs_completed_total", "outcome")] = frozenset(
        {delivery.RUN_COMPLETE, delivery.RUN_MISSING_EVENTS, delivery.RUN_EVICTED,
         delivery.RUN_STARTED_BEFORE, delivery.RUN_CANCELLED})
    values[("pathwatch_alerts_sent_total", "outcome")] = AlertOutcomes.ALL
    values[("pathwatch_version_findings_total", "family")] = frozenset(COMPARED_FAMILIES)
    values[("pathwatch_ledger_errors_total", "operation")] = frozenset(op for op, _ in LEDGER_ERRORS)
    values[("pathwatch_ledger_errors_total", "cause")] = frozenset(cause for _, cause in LEDGER_ERRORS)
    values[("pathwatch_ledger_state", "state")] = frozenset(LEDGER_STATES)
    for suffix in ("_bucket", "_count", "_sum"):
        values[(f"pathwatch_gc_pause_seconds{suffix}", "generation")] = frozenset(GENERATIONS)
    # a counter's creation-time series (the rules' new-series terms read it) has the counter's labels
    for (name, label), known in list(values.items()):
        if name.endswith("_total"):
            values[(name.removesuffix("_total") + "_created", label)] = known
    return values


def _alternatives(pattern: str) -> list[str]:
    """The top-level ``|`` alternatives of a regular expression (none inside groups or classes)."""
    parts, depth, in_class, current, escaped = [], 0, False, "", False
    for char in pattern:
        if escaped:
            current, escaped = current + char, False
            continue
        if char == "\\":
            current, escaped = current + char, True
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [*parts, current]


def unknown_label_values(matchers: list[tuple[str, str, str, str]]) -> list[str]:
    """Problems with (metric, label, operator, value) matchers on closed label sets: an equality to a
    value the sidecar never gives, or a regex alternative that matches none of its values (a
    negative matcher on an unknown value is a silent no-op, so it is refused too)."""
    closed = closed_label_values()
    problems = []
    for metric, label, op, value in matchers:
        known = closed.get((metric, label))
        if known is None:
            continue
        if op in ("=", "!="):
            if value not in known:
                problems.append(f'{metric}{{{label}{op}"{value}"}}: the sidecar never sets {label} '
                                f"to {value!r} (it sets {sorted(known)})")
            continue
        for alternative in _alternatives(value):
            if not any(re.fullmatch(alternative, v) for v in known):
                problems.append(f'{metric}{{{label}{op}"{value}"}}: {alternative!r} matches none of '
                                f"{sorted(known)}")
    return problems
