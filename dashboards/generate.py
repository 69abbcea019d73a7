"""Build the three pathwatch Grafana dashboards and write them next to this file.

    python -m dashboards.generate            # rewrite the checked-in JSON
    python -m dashboards.generate --check    # exit 1 if the checked-in JSON is stale

Queries use only metrics from ``sidecar/telemetry.py`` and only labels the sidecar always sets
(tests/dashboards checks both). Counters that stay at zero in a healthy system (dropped spans,
evictions) are padded with an explicit 0 per known table/service so a quiet panel reads "0", not
"No data" — but only while the sidecar reports, so an outage never looks like a clean bill.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `dashboards` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from dashboards.kit import (
    BLUE,
    GREEN,
    ORANGE,
    RED,
    Query,
    bargauge_panel,
    new_dashboard,
    row,
    stat_panel,
    thresholds,
    timeseries_panel,
)

HERE = Path(__file__).resolve().parent
RI = "[$__rate_interval]"
SIDECAR_UP = "count(pathwatch_build_info)"  # present while a sidecar is scraped

# $__rate_interval in seconds (Grafana renders $__rate_interval_ms as a number)
RATE_WINDOW_S = "($__rate_interval_ms / 1000)"


def per_second(selector: str, *, created: str | None = None, ignoring: str = "") -> str:
    """``rate()`` of a counter, its new series included: a series appears with its first count,
    already at 1 (a finding, a retired call) or at its first batch (counts the sidecar flushes:
    calls, emits, writes, completed runs, evictions, latencies), and rate() needs two samples of a
    series, so it read 0 for every finding that happened once (deploy.* findings are one per version
    and entry point) and missed every series' first batch. A series the sidecar created within the
    window counts its whole value over the window instead (the `_created` term of
    rules/pathwatch-rules.yaml; not `unless ... offset`, which a failed scrape makes true for every
    series). ``created``: the creation-time selector when it is not the counter's with `_created`
    for `_total` (a histogram's buckets, matched ``ignoring`` their `le`). Wrap it in
    ``sum by (...) (...)``."""
    created = created or selector.replace("_total", "_created", 1)
    match = f" ignoring ({ignoring})" if ignoring else ""
    return (f"({selector} and{match} (time() - {created} < {RATE_WINDOW_S})) / {RATE_WINDOW_S}"
            f" or rate({selector}{RI})")


def bucket_per_second(histogram: str) -> str:
    """``per_second()`` of a histogram's buckets (its `_created` has no `le`)."""
    return per_second(f"{histogram}_bucket", created=f"{histogram}_created", ignoring="le")


# every calls query uses per_second(): an implementation's series is born at its first flushed calls
# top-level calls only (nested="false"): a legacy adapter delegating to the canonical engine is one
# call of the adapter, not also one of the canonical engine (the API's share counts the same way)
TOP_LEVEL_CALLS = per_second('pathwatch_calls_total{nested="false"}')
CALLS_BY_PATH = f"sum by (role, entry_point, implementation) ({TOP_LEVEL_CALLS})"
PATHS_PER_ENTRY_POINT = f"count by (role, entry_point) ({CALLS_BY_PATH} > 0)"
CANONICAL_SHARE = (
    f"""(sum by (role) ({per_second('pathwatch_calls_total{canonical="true",nested="false"}')})"""
    f" or on (role) 0 * sum by (role) ({TOP_LEVEL_CALLS}))"
    f" / on (role) sum by (role) ({TOP_LEVEL_CALLS})"
)
RETIRED = 'pathwatch_calls_total{retired="true"}'
# Called in the last 10 minutes, not in the hour before (a series created in that hour was called in
# it: increase() reads 0 for a series born at its only count). A retired call's series appears with its
# first call, so a burst within one scrape has increase() 0 for ever: like the alert rules, a series
# the sidecar created less than 10 minutes ago counts too (its own `or` term; `_created` rather than
# `unless ... offset`, which a failed scrape or a gap makes true for every series; see
# rules/pathwatch-rules.yaml).
RETIRED_CREATED = 'pathwatch_calls_created{retired="true"}'
# duplicate.retired_invoked findings (per entry point a minute with calls):
# PathwatchRetiredImplementationCalled fires on them as on the calls; their exemplars carry a trace id
RETIRED_INVOKED = 'pathwatch_findings_total{rule="duplicate.retired_invoked"}'
RETIRED_REVIVED = (
    f"((sum by (role, implementation) (increase({RETIRED}[10m])) > 0)"
    f" or (sum by (role, implementation) ({RETIRED} and (time() - {RETIRED_CREATED} < 600)) > 0))"
    " unless on (role, implementation)"
    f" ((sum by (role, implementation) (increase({RETIRED}[1h] offset 10m)) > 0)"
    # a series born in that hour (its first calls, which increase() does not see) was called in it
    f" or count by (role, implementation) (time() - {RETIRED_CREATED} offset 10m < 4200))"
)
BLEED = 'pathwatch_findings_total{severity="critical"}'
# Every panel that shows what an alert fires on names the alert and its runbook, and the runbook's
# "Find the offending trace" names the panel (tests/dashboards/test_rules.py)
RUNBOOKS = "docs/runbooks/"


# Findings per run of each backend version, summed over all sidecars: during a rollout old and new
# pods run side by side, so the lines compare the versions even when no single sidecar saw both
# (in sidecar mode each pod's sidecar sees one version). A version is a (service, version) pair: a
# gateway sees several services. A version without runs in the window is dropped rather than divided
# by zero. A new version's series are born at their first count (its first runs, its first finding
# of a family): per_second(), else a version's one bleed read 0 findings per run.
FINDINGS_PER_RUN = (
    "sum by (service_name, service_version, family)"
    f" ({per_second('pathwatch_version_findings_total')})"
    " / on (service_name, service_version) group_left ()"
    f" (sum by (service_name, service_version) ({per_second('pathwatch_version_runs_total')}) > 0)"
)


DUPLICATE_FINDINGS = 'pathwatch_findings_total{rule=~"duplicate[.].*"}'
# The consolidation ledger's health (PathwatchConsolidationLedgerNotPersisted): the sidecars in each
# state, and its errors over the alert's 15 minutes. Every error series exists at 0 from the
# sidecar's start, but a file moved aside (or found a later release's) at the start is counted
# before Prometheus's first scrape: a series created within the window counts its whole value.
LEDGER_ERRORS = "pathwatch_ledger_errors_total"


def ledger_errors_in_15m(selector: str) -> str:
    """The ledger's errors of the last 15 minutes, a series first scraped non-zero included."""
    total = f"{LEDGER_ERRORS}{selector}"
    created = f"pathwatch_ledger_errors_created{selector}"
    return f"({total} and (time() - {created} < 900)) or increase({total}[15m])"
DEPLOY_FINDINGS = 'pathwatch_findings_total{rule=~"deploy[.].*"}'


def consolidation() -> Dashboard:
    return (
        new_dashboard(
            "pathwatch-consolidation", "pathwatch / consolidation",
            "Which implementations of each role really run, for which entry points, and how far the "
            "move to the canonical one has come; per deploy (service.version), whether findings "
            "rose, retired code came back, and which implementations are safe to delete.")
        .with_row(row(100, "Inventory"))
        .with_panel(timeseries_panel(
            1, "Calls per implementation",
            "Wrapped calls per second, per implementation of each role.",
            [Query(f"sum by (role, implementation) ({per_second('pathwatch_calls_total')})",
                   "{{role}} / {{implementation}}")],
            unit="cps", width=12))
        .with_panel(timeseries_panel(
            2, "Canonical share per role",
            "Share of each role's calls served by its canonical implementation. 100 % = consolidated. "
            "Over 15 minutes more than 10 points below one hour before, for 10 minutes, fires "
            f"PathwatchCanonicalShareRegressed (runbook {RUNBOOKS}PathwatchCanonicalShareRegressed.md).",
            [Query(CANONICAL_SHARE, "{{role}}")],
            unit="percentunit", max_value=1, width=12,
            limits=thresholds(RED, (0.5, ORANGE), (0.99, GREEN))))
        .with_panel(timeseries_panel(
            3, "Retired implementations still called",
            "Calls per second into implementations the path map marks retired (a first call "
            "shows too), and their duplicate.retired_invoked findings per second (one per entry "
            "point a minute with calls; exemplar dots carry a trace id of such a call), 0 per "
            "retired implementation called. Should be flat zero: any fires "
            "PathwatchRetiredImplementationCalled (runbook "
            f"{RUNBOOKS}PathwatchRetiredImplementationCalled.md).",
            [Query(f"sum by (role, implementation) ({per_second(RETIRED)})",
                   "{{role}} / {{implementation}}"),
             # its own `rule` label: a line of its own beside the calls, also where it pads
             Query(f"sum by (rule, role, implementation) ({per_second(RETIRED_INVOKED)})"
                   " or on (role, implementation) label_replace(0 * sum by (role, implementation)"
                   f' ({per_second(RETIRED)}), "rule", "duplicate.retired_invoked", "", "")',
                   "{{role}} / {{implementation}} {{rule}}", exemplar=True)],
            unit="cps", width=12, limits=thresholds(GREEN, (1e-9, RED))))
        .with_panel(timeseries_panel(
            4, "Implementations per entry point",
            "Distinct implementations of a role that served calls, per entry point. More than one "
            "means the entry point still has several paths.",
            [Query(PATHS_PER_ENTRY_POINT, "{{role}} @ {{entry_point}}")],
            width=12, limits=thresholds(GREEN, (2, ORANGE))))
        .with_panel(bargauge_panel(
            5, "Idle since, per implementation",
            "Time since each implementation was last called. A retired one idle for long is safe "
            "to delete; a canonical one idle is a surprise.",
            [Query("time() - max by (role, implementation) "
                   "(pathwatch_implementation_last_seen_timestamp_seconds)",
                   "{{role}} / {{implementation}}", instant=True)],
            unit="s", width=24, limits=thresholds(BLUE)))
        .with_row(row(101, "Consolidation phase"))
        .with_panel(timeseries_panel(
            6, "Retired implementations revived",
            "Retired implementations called in the last 10 minutes after an hour without calls "
            "(with less than an hour of history, every call into a retired implementation shows). "
            "A deploy that brings one back also raises deploy.retired_revived (Deploy findings by "
            "rule).",
            [Query(RETIRED_REVIVED, "{{role}} / {{implementation}}")],
            bars=True, width=8, limits=thresholds(GREEN, (1, RED))))
        .with_panel(timeseries_panel(
            7, "Paths per entry point",
            "Distinct execution paths (the role/implementation steps of a run) each entry point took "
            "in the last hour; the highest count any sidecar reports. The goal is one; above one "
            "for 30 minutes fires PathwatchEntryPointPathsAboveOne (runbook "
            f"{RUNBOOKS}PathwatchEntryPointPathsAboveOne.md). Per role: Implementations per "
            "entry point.",
            [Query("max by (entry_point) (pathwatch_entry_point_paths)", "{{entry_point}}")],
            width=8, limits=thresholds(GREEN, (2, ORANGE))))
        .with_panel(timeseries_panel(
            8, "Duplicate findings by rule",
            "duplicate.* findings per second, per rule, implementation and entry point (a single "
            "finding shows as 1 / the rate interval for one interval). Exemplar dots carry the "
            "trace id of a finding. Any "
            "duplicate.execution fires PathwatchDuplicateExecution (runbook "
            f"{RUNBOOKS}PathwatchDuplicateExecution.md); any duplicate.emission fires "
            f"PathwatchDuplicateEmission (runbook {RUNBOOKS}PathwatchDuplicateEmission.md).",
            [Query("sum by (rule, role, implementation, entry_point) "
                   f"({per_second(DUPLICATE_FINDINGS)})",
                   "{{rule}} {{role}} / {{implementation}} @ {{entry_point}}", exemplar=True)],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            9, "Findings per run, by version",
            "Bleed, duplicate and delivery findings per run of each backend version, over all pods. "
            "A new version's line above the previous one is a regression after deploy "
            "(deploy.regression compares the same per entry point and service). One line per "
            "service and version: a gateway sees several services.",
            [Query(FINDINGS_PER_RUN, "{{service_name}} {{service_version}} {{family}}")],
            width=12))
        .with_panel(timeseries_panel(
            10, "Runs per version",
            "Runs per second of each backend version (service.name, service.version): how far a "
            "rollout has come.",
            [Query("sum by (service_name, service_version) "
                   f"({per_second('pathwatch_version_runs_total')})",
                   "{{service_name}} {{service_version}}")],
            unit="ops", width=12))
        .with_panel(timeseries_panel(
            11, "Deploy findings by rule",
            "deploy.regression, deploy.retired_revived and deploy.new_path findings per second, "
            "each raised once per new version and what it names (regression: entry point and family; "
            "retired_revived: implementation; new_path: entry point and path), so each shows as 1 / the "
            "rate interval for one interval; one line per rule, entry point and implementation (a "
            "regression's: the one most blamed; a new path's: its first new step); 0 while there are "
            "none. Exemplar dots carry a trace id. "
            f"Any deploy.regression fires PathwatchDeployRegression (runbook {RUNBOOKS}"
            "PathwatchDeployRegression.md); any deploy.retired_revived fires "
            "PathwatchRetiredImplementationRevived (runbook "
            f"{RUNBOOKS}PathwatchRetiredImplementationRevived.md).",
            [Query("sum by (rule, entry_point, role, implementation) "
                   f"({per_second(DEPLOY_FINDINGS)})"
                   f" or on () 0 * {SIDECAR_UP}",
                   "{{rule}} @ {{entry_point}} ({{role}} / {{implementation}})", exemplar=True)],
            unit="cps", width=12, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(bargauge_panel(
            12, "Safe to delete, per implementation",
            "1 = retired or non-canonical, no calls for the whole safe-to-delete window (14 days by "
            "default) on every sidecar, for the last 15 minutes; 0 = still called, canonical, or "
            "watched too briefly, on some sidecar — also, for every class, while some sidecar has "
            "not watched a whole window since it started, lost spans or refused a class "
            "(pathwatch_ledger_window_watched 0: a class it has no row for may have been called "
            "through it). A sidecar restarting or missing scrapes still vetoes with what it said in "
            "the last 15 minutes; one gone for longer does not (docs/consolidation.md).",
            [Query("min by (role, implementation) "
                   "(min_over_time(pathwatch_implementation_safe_to_delete[15m])) "
                   "* on () group_left () "
                   "min(min_over_time(pathwatch_ledger_window_watched[15m]))",
                   "{{role}} / {{implementation}}", instant=True)],
            unit="bool_yes_no", width=12, limits=thresholds(BLUE, (1, GREEN))))
        .with_panel(timeseries_panel(
            13, "Consolidation ledger persistence",
            "Whether the ledger the safe-to-delete verdicts rest on is being saved: the sidecars "
            "in each state (persisted; moved_aside, written to a fresh file after the last one "
            "was unreadable and moved aside at the start, the evidence before it gone; "
            "write_failing, its writes failing, e.g. a lock or a full disk, kept in memory and "
            "retried every flush; in_memory, its file a later release's and left alone, nothing "
            "saved; no_file, incidents.path \":memory:\"), and the ledger's errors in the last 15 "
            "minutes: files moved aside (moved_aside), and the others by operation and cause. "
            "write_failing or in_memory for 5 minutes, or a file moved aside, fires "
            "PathwatchConsolidationLedgerNotPersisted (runbook "
            f"{RUNBOOKS}PathwatchConsolidationLedgerNotPersisted.md). Which sidecar and why: "
            "verdicts.ledger in /api/v1/consolidation/verdicts.",
            [Query("sum by (state) (pathwatch_ledger_state)", "{{state}}"),
             Query(f"""sum({ledger_errors_in_15m('{cause="unreadable"}')})""",
                   "moved_aside (unreadable files, last 15 min)"),
             Query("sum by (operation, cause) "
                   f"""({ledger_errors_in_15m('{cause!="unreadable"}')})""",
                   "{{operation}} {{cause}} (errors, last 15 min)")],
            width=24, limits=thresholds(GREEN, (1, ORANGE))))
    )


def isolation() -> Dashboard:
    return (
        new_dashboard(
            "pathwatch-isolation", "pathwatch / isolation",
            "Cross-user bleed: one user's context, object or event reaching another user. Any "
            "value above zero is a security incident. Exemplar dots link a finding to its trace.")
        .with_row(row(100, "Bleed"))
        .with_panel(stat_panel(
            1, "Bleed findings since sidecar start",
            "Critical findings counted by the running sidecar (0 while it reports none).",
            [Query(f"sum({BLEED}) or on () 0 * {SIDECAR_UP}", "findings", instant=True)],
            width=6, limits=thresholds(GREEN, (1, RED))))
        .with_panel(stat_panel(
            2, "Open critical incidents",
            "Incidents (findings grouped by rule, role, implementation, entry point) still open.",
            [Query('sum(pathwatch_incidents_open{severity="critical"})'
                   f" or on () 0 * {SIDECAR_UP}", "incidents", instant=True)],
            width=6, limits=thresholds(GREEN, (1, RED))))
        .with_panel(timeseries_panel(
            3, "Open incidents by rule",
            "Open incidents per rule and severity, as the incident store reports them.",
            [Query("sum by (rule, severity) (pathwatch_incidents_open)", "{{rule}} ({{severity}})")],
            width=12, limits=thresholds(GREEN, (1, RED))))
        .with_panel(timeseries_panel(
            4, "Bleed findings by rule",
            "Critical findings per second by rule (a single finding shows as 1 / the rate "
            "interval for one interval); hover an exemplar dot for the trace id. Any fires "
            "PathwatchCrossUserBleed at once; per rule, implementation and entry point, as the "
            "alert fires: Bleed findings by implementation.",
            [Query(f"sum by (rule) ({per_second(BLEED)})", "{{rule}}", exemplar=True)],
            unit="cps", width=12, limits=thresholds(GREEN, (1e-9, RED))))
        .with_panel(timeseries_panel(
            5, "Bleed findings by implementation",
            "Critical findings per second by rule and the implementation and entry point they were "
            "seen in, as PathwatchCrossUserBleed fires (a single finding shows as 1 / the rate "
            "interval for one interval); hover an exemplar dot for the trace id. Any fires "
            f"PathwatchCrossUserBleed at once (runbook {RUNBOOKS}PathwatchCrossUserBleed.md).",
            [Query(f"sum by (rule, role, implementation, entry_point) ({per_second(BLEED)})",
                   "{{rule}} {{role}} / {{implementation}} @ {{entry_point}}", exemplar=True)],
            unit="cps", width=12, limits=thresholds(GREEN, (1e-9, RED))))
        .with_panel(bargauge_panel(
            6, "Bleed findings by rule (total)",
            "Critical findings since the sidecar started, by rule.",
            [Query(f"sum by (rule) ({BLEED})", "{{rule}}", instant=True)],
            width=12, limits=thresholds(GREEN, (1, RED))))
        .with_panel(bargauge_panel(
            7, "Bleed findings by implementation (total)",
            "Critical findings since the sidecar started, by implementation.",
            [Query(f"sum by (role, implementation) ({BLEED})", "{{role}} / {{implementation}}",
                   instant=True)],
            width=12, limits=thresholds(GREEN, (1, RED))))
    )


MISSING_EVENTS = 'pathwatch_findings_total{rule="delivery.missing_required_events"}'
# a (sink, outcome) series appears with its first push, already at 1: a page dropped once (a full
# queue) fires PathwatchAlertPagesFailing, and must show here too (per_second(), not rate() alone)
ALERT_PUSHES = "pathwatch_alerts_sent_total"
# the same for an event type's first undelivered events (per reason) and its first emits
UNDELIVERED = "pathwatch_events_undelivered_total"
EMITTED = "pathwatch_events_emitted_total"
# and for what the sidecar counts in batches, each series born at its first batch: writes, latencies
WRITTEN = "pathwatch_events_written_total"
LATENCY = "pathwatch_delivery_latency_seconds"
DELIVERY_FINDINGS = 'pathwatch_findings_total{rule=~"delivery[.].*"}'


# The receiver creates its span and request series at 0 at its start (sidecar/receiver/export.py,
# declare()), yet Prometheus's first scrape of a new pod comes when it comes: what the receiver counted
# before it (a start-up surge refused by the memory limiter, a rejected first export) is in the first
# sample, which rate() alone never saw. per_second() counts it, as for every other counter.
RECEIVER_SPANS = "pathwatch_receiver_spans_total"
RECEIVER_REQUESTS = "pathwatch_receiver_requests_total"
# A backend's dropped spans are learnt from heartbeat
# totals: a series born non-zero holds drops of the past, and so does a sidecar's restart in place
# (the same series, back lower: a reset, which rate() read as every past drop at once). As
# PathwatchBackendDroppingSpans (rules/pathwatch-rules.yaml): the rise over the window above the
# series' lowest value there, skipping the first minute of each life of it (its `_created`), in which
# a new or restarted sidecar hears every backend process's past total once.
DROPPED = "pathwatch_backend_dropped_spans_total"


def heartbeat_rise(total: str) -> str:
    """The rise of a heartbeat total over the rate interval, past counts and resets left out."""
    created = total.replace("_total", "_created", 1)
    return (f"clamp_min({total} - min_over_time(({total} and"
            f" (time() - {created} >= 60))[$__rate_interval:10s]), 0)")


def heartbeat_per_second(total: str) -> str:
    """``heartbeat_rise()`` per second and per service; 0 per service that heartbeats."""
    return (f"sum by (service_name) ({heartbeat_rise(total)}) / {RATE_WINDOW_S}"
            " or on (service_name) 0 * sum by (service_name) "
            "(pathwatch_backend_last_heartbeat_timestamp_seconds)")


# The instrumentation's own faults come in the same heartbeats, as totals since the process started,
# and are read the same way (as PathwatchBackendInstrumentationFaults reads them).
INSTRUMENTATION_ERRORS = "pathwatch_backend_instrumentation_errors_total"
EMITS_FORGOTTEN = "pathwatch_backend_pending_emits_evicted_total"
# Backend processes judged gone (heartbeats stopped without a final one: killed outright) are the
# sidecar's own count, not a backend's total: a series holds no past, and a sidecar restarted in place
# counts from 0 again (a reset rate() reads right). Its series is born at 0 at a service's first
# heartbeat (sidecar/heartbeats.py, HeartbeatTracker.observe), beside the last-heartbeat gauge, so it
# reads 0 per service that heartbeats without `or on (service_name) 0 * ...` (which would also claim 0
# for a sidecar of a release before the counter, which cannot tell). Yet Prometheus's first scrape of a
# new sidecar can come after its first vanish (a process heard, then killed: judged 3 intervals + 10 s
# later), and a restart in place can vanish as many as before between two scrapes: per_second().
VANISHED = "pathwatch_backend_processes_vanished_total"
# Evidence a detector let go and span attributes the receiver ignored are published as they happen:
# a (detector, reason) or attribute series is born at its first count (already 1 at its first
# scrape), so per_second(); none yet reads 0 while the sidecar reports (no label set to pad with).
EVIDENCE_DROPPED = "pathwatch_detector_evidence_dropped_total"
INVALID_ATTRIBUTES = "pathwatch_receiver_invalid_attributes_total"
# Liveness failures: every (part, reason) series exists at 0 from the sidecar's start (a 0 per part
# without padding), but a new pod's first scrape can come after a failure at start-up: per_second();
# a restart in place counts from 0 again (a reset rate() reads right).
LIVENESS_FAILURES = "pathwatch_liveness_failures_total"
# Findings the sidecar lost (PathwatchSidecarLosingFindings): a detector that raised on a batch, the
# full incident store refusing a new fingerprint, an incident write that failed. All three series
# exist at 0 from the sidecar's start (one per detector and pipeline step), yet a new pod's first
# scrape can come after its first error: per_second(); a restart in place counts from 0 again.
DETECTOR_ERRORS = "pathwatch_detector_errors_total"
INCIDENTS_REFUSED = "pathwatch_incidents_refused_total"
INCIDENT_STORE_ERRORS = "pathwatch_incident_store_errors_total"
# Export requests the exporter drops (PathwatchSidecarRefusingSpans reads them beside the refused
# and invalid spans): their spans are in no span counter
REQUESTS_DROPPED = 'pathwatch_receiver_requests_total{status=~"INVALID_ARGUMENT|400|413|415"}'
# Why the receivers refused requests, by protocol and reason (sidecar/receiver/refusals.py): every
# reason a receiver can refuse for has its series at 0 from its start (0 per reason without padding),
# but a new pod's first scrape can come after its start-up surge's refusals: per_second()
REFUSED_REQUESTS = "pathwatch_receiver_refused_requests_total"


def delivery() -> Dashboard:
    emitted = f"sum by (event_type) ({per_second(EMITTED)})"
    latency = f"sum by (le) ({bucket_per_second(LATENCY)})"
    return (
        new_dashboard(
            "pathwatch-delivery", "pathwatch / delivery",
            "Did every emitted event reach a socket, how fast, did every run deliver its required "
            "events — and is pathwatch itself seeing everything (dropped spans, refusals, state).")
        .with_row(row(100, "Events"))
        .with_panel(timeseries_panel(
            1, "Emitted vs written",
            "Events emitted by the backend and socket writes carrying an event, by outcome.",
            [Query(emitted, "emitted {{event_type}}"),
             Query(f"sum by (event_type, outcome) ({per_second(WRITTEN)})",
                   "written {{event_type}} ({{outcome}})")],
            unit="cps", width=16))
        .with_panel(timeseries_panel(
            2, "Undelivered ratio by event type",
            "Undelivered events / emitted events, per event type (an event type's first events "
            "count too); 0 while none of its events is undelivered or none is emitted. Above 1 % "
            "for an event type over 10 minutes, for 5 minutes, fires PathwatchUndeliveredEventsHigh "
            f"for that event type (runbook {RUNBOOKS}PathwatchUndeliveredEventsHigh.md); why, "
            "per reason: Undelivered by type and reason.",
            # per event type, as the alert fires (one ratio over every type hid which one it was).
            # No undelivered event: 0 (not 0 / 0 = NaN while nothing is emitted either); nothing
            # emitted in the window: 0 too, not +Inf -- an event is judged undelivered a deadline
            # plus allowance (8 s) after its emit is counted, so after a burst the undelivered
            # ones stay in the window that long after the emits have left it
            [Query(f"(sum by (event_type) ({per_second(UNDELIVERED)}) > 0)"
                   f" / on (event_type) (sum by (event_type) ({per_second(EMITTED)}) > 0)"
                   f" or on (event_type) 0 * sum by (event_type) ({per_second(EMITTED)})"
                   f" or on () 0 * {SIDECAR_UP}", "{{event_type}}")],
            unit="percentunit", width=8,
            limits=thresholds(GREEN, (0.001, ORANGE), (0.01, RED))))
        .with_panel(timeseries_panel(
            3, "Undelivered by type and reason",
            "Events that did not reach a socket, per event type and reason (a single one shows as "
            "1 / the rate interval for one interval).",
            [Query(f"sum by (event_type, reason) ({per_second(UNDELIVERED)})",
                   "{{event_type}} ({{reason}})")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            4, "Delivery latency",
            "Time from an event's emit to its first socket write. The delivery deadline is 2 s "
            "by default.",
            [Query(f"histogram_quantile({q}, {latency})", f"p{round(q * 100)}")
             for q in (0.5, 0.9, 0.99)],
            unit="s", width=8, limits=thresholds(GREEN, (1, ORANGE), (2, RED))))
        .with_panel(timeseries_panel(
            5, "Delivery latency p95 by event type",
            "95th percentile of emit-to-write time per event type.",
            [Query("histogram_quantile(0.95, sum by (event_type, le) "
                   f"({bucket_per_second(LATENCY)}))", "{{event_type}}")],
            unit="s", width=8, limits=thresholds(GREEN, (1, ORANGE), (2, RED))))
        .with_row(row(101, "Runs"))
        .with_panel(timeseries_panel(
            6, "Runs completed by outcome",
            "Runs the sidecar judged complete, per outcome.",
            [Query(f"sum by (outcome) ({per_second('pathwatch_runs_completed_total')})",
                   "{{outcome}}")],
            unit="cps", width=8))
        .with_panel(timeseries_panel(
            7, "Runs missing required events",
            "Runs per second that ended without all their required events (a single one shows as "
            "1 / the rate interval for one interval); exemplar dots carry the trace id. Any fires "
            "PathwatchRunsMissingRequiredEvents (runbook "
            f"{RUNBOOKS}PathwatchRunsMissingRequiredEvents.md).",
            [Query("sum by (role, implementation, entry_point) "
                   f"({per_second(MISSING_EVENTS)})",
                   "{{role}} / {{implementation}} @ {{entry_point}}", exemplar=True)],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            8, "Delivery findings by rule",
            "delivery.* findings per second (a single finding shows as 1 / the rate interval for "
            "one interval); exemplar dots carry the trace id.",
            [Query(f"sum by (rule) ({per_second(DELIVERY_FINDINGS)})",
                   "{{rule}}", exemplar=True)],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_row(row(102, "Coverage and sidecar health"))
        .with_panel(timeseries_panel(
            9, "Backend-dropped spans",
            "Spans the backend's SDK reported dropped (from its heartbeats): blind spots. "
            "A rise for 5 minutes fires PathwatchBackendDroppingSpans (runbook "
            f"{RUNBOOKS}PathwatchBackendDroppingSpans.md). 0 per service that sends heartbeats and "
            "dropped none.",
            [Query(heartbeat_per_second(DROPPED), "{{service_name}}")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            17, "Backend processes vanished",
            "Backend processes that stopped heartbeating without a final heartbeat (SIGKILL, an OOM "
            "kill, a pod killed past its grace period, a node lost), per second (a single one shows "
            "as 1 / the rate interval for one interval): the spans their exporters still held are "
            "lost, a blind spot, and the consolidation verdicts wait a whole window after it "
            "(verdicts.span_loss, reason process_vanished: nothing idle across it is safe to "
            "delete until then). Judged 3 heartbeat intervals + 10 s after a process's last "
            "heartbeat, and only for instrumentations that mark their final heartbeat "
            "(pathwatch.sdk.heartbeat_final). Any fires PathwatchBackendProcessesVanished (runbook "
            f"{RUNBOOKS}PathwatchBackendProcessesVanished.md). 0 per service that sends heartbeats.",
            [Query(f"sum by (service_name) ({per_second(VANISHED)})", "{{service_name}}")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            18, "Backend instrumentation faults",
            "Faults pathwatch's instrumentation reported from inside the backend (from its "
            "heartbeats), per service and problem, per second: instrumentation_errors are errors "
            "it caught (logged once per site; the backend's call went on, its span may lack what "
            "the detectors read, so findings can be missed); pending_emits_evicted are emits its "
            "emit table forgot before a socket write could find them by key (those writes are "
            "not linked: delivery and duplicate findings of that time may be false). Read as "
            "Backend-dropped spans: a new or restarted sidecar learning a process's past total "
            "is no fault. Any for 5 minutes fires PathwatchBackendInstrumentationFaults (runbook "
            f"{RUNBOOKS}PathwatchBackendInstrumentationFaults.md). 0 per service that sends "
            "heartbeats.",
            [Query(heartbeat_per_second(INSTRUMENTATION_ERRORS),
                   "{{service_name}} instrumentation_errors"),
             Query(heartbeat_per_second(EMITS_FORGOTTEN), "{{service_name}} pending_emits_evicted")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            10, "Receiver spans by outcome",
            "Spans offered to the sidecar's receiver, each counted once: accepted; refused (memory "
            "limiter full, or shutting down: the exporter retries; a request of too many spans or "
            "attributes: refused for good; why, per request: Export requests refused by reason); "
            "invalid (bad trace or span id: "
            "that span rejected, the rest of its request accepted); replayed (an exporter's retry "
            "of spans already accepted, alone or re-batched by a Collector: their scope is "
            "analysed once, no loss). Do not add the "
            "outcomes up: a replayed span was counted as accepted the first time. Beside them, "
            "export requests the exporter drops whole (INVALID_ARGUMENT / 400, 413, 415: their "
            "spans are in no span counter; 0 per protocol while none). Any refused or invalid "
            "span or dropped request for 5 minutes fires PathwatchSidecarRefusingSpans (runbook "
            f"{RUNBOOKS}PathwatchSidecarRefusingSpans.md).",
            [Query(f"sum by (protocol, outcome) ({per_second(RECEIVER_SPANS)})",
                   "{{protocol}} {{outcome}}"),
             Query(f"sum by (protocol, status) ({per_second(REQUESTS_DROPPED)})"
                   f" or on (protocol) 0 * sum by (protocol) ({per_second(RECEIVER_REQUESTS)})",
                   "{{protocol}} requests dropped {{status}}")],
            unit="cps", width=12))
        .with_panel(timeseries_panel(
            23, "Export requests refused by reason",
            "Export requests the receivers refused, per protocol and reason, per second (a single "
            "one shows as 1 / the rate interval for one interval): why the spans of Receiver spans "
            "by outcome were refused, which the answers alone do not tell (gRPC RESOURCE_EXHAUSTED "
            "is both over_budget and too_many_spans, HTTP 503 both in_flight and shutting_down). "
            "The exporter retries after about 2 s: over_budget, the memory limiter "
            "(receiver.max_pending_spans: the pipeline cannot keep up; the sidecar's log says when "
            "it starts and ends); in_flight, OTLP/HTTP requests beyond the 64 it reads at once; "
            "shutting_down, at the next sidecar. Refused for good, their spans lost (the "
            "exporter's batches are larger than the sidecar takes): too_many_spans "
            "(receiver.max_spans_per_request); too_many_attributes "
            "(receiver.max_attributes_per_request, OTLP/JSON); too_large "
            "(receiver.max_message_bytes, OTLP/HTTP's 413; gRPC refuses such a request unseen, "
            "CANCELLED in Export requests rejected). All but in_flight (no span counted, a 503 "
            "retried) for 5 minutes fire PathwatchSidecarRefusingSpans, by their refused spans "
            "(too_large: its 413), which Receiver spans by outcome shows and links to its runbook "
            "(what to do, per reason). 0 per reason each receiver refuses for (gRPC: neither "
            "in_flight nor too_large).",
            [Query(f"sum by (protocol, reason) ({per_second(REFUSED_REQUESTS)})",
                   "{{protocol}} {{reason}}")],
            unit="reqps", width=12, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            14, "Export requests rejected",
            "Export requests answered with an error, by status; their spans are in no span "
            "counter. INVALID_ARGUMENT / 400 (not an OTLP protobuf or JSON body), 413 (above "
            "receiver.max_message_bytes) and 415 (another media type) are dropped by the exporter "
            "and fire PathwatchSidecarRefusingSpans; 404 / 405 are requests to another path or method; "
            "RESOURCE_EXHAUSTED / 429 / UNAVAILABLE / 503 are retried; CANCELLED / 408 / 499 are "
            "bodies that never arrived (the client stalled or went away). 0 per protocol while none.",
            [Query("sum by (protocol, status) "
                   f"""({per_second(RECEIVER_REQUESTS + '{status!~"OK|200"}')})"""
                   f" or on (protocol) 0 * sum by (protocol) ({per_second(RECEIVER_REQUESTS)})",
                   "{{protocol}} {{status}}")],
            unit="reqps", width=12, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            19, "Span attributes ignored",
            "Span attributes of the span contract the receiver ignored, per attribute, per second "
            "(a single one shows as 1 / the rate interval for one interval): a value of the wrong "
            "type, longer than 512 characters or not UTF-8; the span is analysed without it, so "
            "the detectors that read it may miss findings. The counter names no service. Any for "
            "10 minutes fires PathwatchSpanAttributesInvalid (runbook "
            f"{RUNBOOKS}PathwatchSpanAttributesInvalid.md). 0 while none.",
            [Query(f"sum by (attribute) ({per_second(INVALID_ATTRIBUTES)})"
                   f" or on () 0 * {SIDECAR_UP}", "{{attribute}}")],
            unit="cps", width=12, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            11, "State evictions",
            "Entries evicted from the sidecar's bounded state; reason=capacity means evidence lost "
            "before its time: for 5 minutes it fires PathwatchStateEvictingAtCapacity (runbook "
            f"{RUNBOOKS}PathwatchStateEvictingAtCapacity.md). 0 per table with no evictions.",
            [Query(f"sum by (table, reason) ({per_second('pathwatch_state_evictions_total')})"
                   " or on (table) 0 * sum by (table) (pathwatch_state_capacity)",
                   "{{table}} {{reason}}")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            12, "State entries vs capacity",
            "Entries held per state table, and each table's capacity.",
            [Query("sum by (table) (pathwatch_state_entries)", "entries {{table}}"),
             Query("sum by (table) (pathwatch_state_capacity)", "capacity {{table}}")],
            width=8))
        .with_panel(timeseries_panel(
            13, "State utilisation",
            "Entries / capacity per state table. Near 100 % the table evicts by capacity.",
            [Query("max by (table) (pathwatch_state_entries / pathwatch_state_capacity)", "{{table}}")],
            unit="percentunit", max_value=1, width=8,
            limits=thresholds(GREEN, (0.8, ORANGE), (0.95, RED))))
        .with_panel(timeseries_panel(
            20, "Detector evidence dropped",
            "Evidence the detectors let go, per detector and reason, per second (a single one "
            "shows as 1 / the rate interval for one interval). bleed trace_users, trace_held, "
            "trace_siblings, trace_stash, unplaced, connection_users and duplicates "
            "event_connections, run_executions: a per-trace, per-event or per-run bound hit; "
            "duplicates held_emissions: a held duplicate emission whose run state.max_runs pushed "
            "out (raise it); duplicates path_implementations: calls of a class past the 32 an "
            "entry point and role remember; bleed "
            "pseudonym_keys: two "
            "user ids of different pseudonym keys not compared; what was let go was not judged, "
            "so findings can be missed. delivery late_export: a write in time that arrived after "
            "its event was judged, so delivery findings of that time may be false (the export "
            "allowance is too short). delivery started_before_sidecar: events of before a "
            "sidecar's restart left unjudged on purpose (a few a restart: normal). Any reason but "
            "started_before_sidecar for 10 minutes fires PathwatchDetectorEvidenceDropped "
            f"(runbook {RUNBOOKS}PathwatchDetectorEvidenceDropped.md). 0 while none.",
            [Query(f"sum by (detector, reason) ({per_second(EVIDENCE_DROPPED)})"
                   f" or on () 0 * {SIDECAR_UP}", "{{detector}} {{reason}}")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            21, "Sidecar liveness failures",
            "Vital parts of the sidecar its liveness check found failing, per part and reason, "
            "per second (a single one shows as 1 / the rate interval for one interval): ended, a "
            "thread that ended before the shutdown (pipeline, otlp_grpc, otlp_http, api, "
            "alerts.<sink>); stalled, the pipeline inside one step for api.liveness_grace_s. "
            "/healthz answers 503 meanwhile: spans go unanalysed or are refused (an alert sink: "
            "pages do not go out), and outside Kubernetes nothing restarts the sidecar. Any "
            "fires PathwatchSidecarUnhealthy, for 10 minutes (runbook "
            f"{RUNBOOKS}PathwatchSidecarUnhealthy.md). 0 per part watched.",
            [Query(f"sum by (part, reason) ({per_second(LIVENESS_FAILURES)})",
                   "{{part}} {{reason}}")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_panel(timeseries_panel(
            22, "Findings lost by the sidecar",
            "Findings the sidecar lost or could not keep, per second (a single one shows as 1 / the "
            "rate interval for one interval): detector_errors, a detector (or a pipeline step) that "
            "raised on a batch, whose findings for it are lost; incidents_refused, findings with a "
            "new fingerprint the full incident store refused (counted, but no incident and no "
            "alert); incident_store_errors, incident writes or reads of the SQLite store that failed "
            "(kept in memory, retried). Any, for 1 minute, fires PathwatchSidecarLosingFindings "
            f"(runbook {RUNBOOKS}PathwatchSidecarLosingFindings.md). 0 per detector, and 0 each "
            "while none.",
            [Query(f"sum by (detector) ({per_second(DETECTOR_ERRORS)})",
                   "detector_errors {{detector}}"),
             Query(f"sum({per_second(INCIDENTS_REFUSED)})", "incidents_refused"),
             Query(f"sum({per_second(INCIDENT_STORE_ERRORS)})", "incident_store_errors")],
            unit="cps", width=8, limits=thresholds(GREEN, (1e-9, ORANGE))))
        .with_row(row(103, "Alert pipeline"))
        .with_panel(timeseries_panel(
            15, "Alert pushes by sink and outcome",
            "The sidecar's own pages to alerting.alertmanager_url / webhook_url, per second (a "
            "single push shows as 1 / the rate interval for one interval): sent "
            "(a page the sink accepted); refreshed (Alertmanager told again that a firing incident "
            "still fires); resolved (an incident resolved through the API, ended in Alertmanager); "
            "retried (a push tried again after a connection error, timeout, 5xx or 429); failed "
            "(a push that failed after its retries, or refused with a 4xx: tried again later); "
            "dropped (a full queue, or shutdown: offered again by the next finding or start); "
            "rate_limited (a page held back by alerting.max_per_minute, sent later); deduplicated "
            "(a page the sink already had); cancelled (resolved before its page went out); "
            "instance_skipped (one instance of an Alertmanager cluster missed a firing alert, its "
            "backlog full). failed or dropped fire PathwatchAlertPagesFailing (runbook "
            f"{RUNBOOKS}PathwatchAlertPagesFailing.md). 0 per configured "
            "sink that pushed nothing; no data: no sink configured.",
            [Query(f"sum by (sink, outcome) ({per_second(ALERT_PUSHES)})"
                   " or on (sink) 0 * sum by (sink) (pathwatch_alerts_resume_waiting)",
                   "{{sink}} {{outcome}}")],
            unit="ops", width=12))
        .with_panel(timeseries_panel(
            16, "Alertmanager clock skew",
            "Alertmanager's clock minus the sidecar's, per sidecar, from the Date header of its "
            "last answer (for a cluster, the instance furthest off); 0 until it answered. "
            "Alertmanager judges startsAt / endsAt by its own clock: behind by more than "
            "alerting.resolve_after_s, it takes every page as already resolved (counted sent, "
            "never notified); ahead by more than 60 s, it ignores resolves. Beyond 60 s either "
            "way (or resolve_after_s, if shorter) the sidecar logs a warning.",
            [Query("max by (sink, instance) (pathwatch_alerts_clock_skew_seconds)",
                   "{{sink}} {{instance}}")],
            unit="s", min_value=None, width=12, limits=thresholds(RED, (-60, GREEN), (60, RED))))
    )


DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "pathwatch-consolidation.json": consolidation,
    "pathwatch-isolation.json": isolation,
    "pathwatch-delivery.json": delivery,
}


def render(build: Callable[[], Dashboard]) -> str:
    """The dashboard as the JSON we check in: sorted keys, so a diff shows only real changes."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in JSON is stale")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run: python -m dashboards.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
