"""The consolidation workflow's detector: paths, callers, versions and verdicts from the span stream.

Spans in (execute / emit / dispatch call spans, and request spans that close a trace's paths);
``deploy.*`` findings out (see ``sidecar.consolidation.deploys``). It is also a ``FindingObserver``:
the pipeline hands it every finding it keeps, so findings of the other detectors are counted per
``service.version`` and entry point without any detector knowing of another. (Counting from the
``pathwatch_findings`` metric instead would lose the version: its labels hold none, by design.)

``pathwatch_version_runs_total`` and ``pathwatch_version_findings_total`` (labels ``service_name``
and ``service_version``) count what the version book counts, no more: runs and findings of a version it does not
track (dropped, or waiting for room) are left out of both, and its series are removed, so the metrics
and the API agree — the metrics as runs open and findings are raised, the book (rates, API, ledger)
once every family could have judged them (``settle_s`` later; a run a stopping sidecar did not
judge is in the metrics only). Their series are bounded (``MAX_VERSION_SERIES`` (service, version)
pairs at once, then ``other``). So are those of ``pathwatch_path_runs_total``: at most ``MAX_PATH_SERIES``
(entry point, path) pairs, then a new path's runs count under its entry point's ``other``.

Time: ``now_ns`` from the pipeline (its ``PipelineClock``: the wall clock, a step of it caught up
gradually) for everything judged on tick; ``clock_s`` (the wall clock) for the ledger's first start
and for API-time verdicts. The ledger measures watched time and gaps on ``clock_s``, so what it
stamps — calls, callers, span losses, the verdicts' now — is on that clock too, never behind it
(``_ledger_s``): after a forward step of the wall clock the pipeline's lags it for up to 20 times
the step, and a call stamped with it looked idle for the lag already, and watched for it too, as
that part fell into the gap the step recorded (a class called within the window was declared
``safe_to_delete`` up to the step early). A pipeline clock ahead of the wall clock (a step back) is
kept: a later stamp only delays a verdict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from instrumentation.attributes import SpanKinds
from sidecar.config import ConsolidationConfig, RulesConfig, StateConfig
from sidecar.consolidation.callers import CallerIndex
from sidecar.consolidation.deploys import COMPARED_FAMILIES, NOT_PER_RUN, Thresholds, VersionBook
from sidecar.consolidation.paths import (
    NO_ENTRY_POINT,
    UNKNOWN_SERVICE,
    UNKNOWN_VERSION,
    PathTracker,
)
from sidecar.consolidation.verdicts import (CONSUME_ERROR, LEDGER_ERRORS, LEDGER_STATES,
                                            SAFE_TO_DELETE, SPANS_DROPPED, ActivityLedger)
from sidecar.detectors._findings import enabled_rules, short
from sidecar.detectors._metrics import BatchedCounter
from sidecar.model import Finding, SpanRecord
from sidecar.rules import CATALOG, DEPLOY_NEW_PATH, DEPLOY_REGRESSION, DEPLOY_RETIRED_REVIVED
from sidecar.state import OVERFLOW_LABEL, TableGroup
from sidecar.telemetry import Telemetry
from sidecar.types import ConsumeInterrupted

_CALL_KINDS = frozenset({SpanKinds.EXECUTE, SpanKinds.EMIT, SpanKinds.DISPATCH})
_REQUEST = SpanKinds.REQUEST
PATH_WINDOW_S = 3600.0  # pathwatch_entry_point_paths counts paths taken within the last hour
JUDGE_EVERY_NS = 1_000_000_000
MAX_VERSION_SERIES = 64  # (service, version) label pairs of the version metrics, then "other"
#: (entry point, path) series of pathwatch_path_runs: 512 entry points x max_paths_per_entry_point
#: (32, any in the config) would allow 16,896 and more; beyond, new paths count as their entry
#: point's "other" (at most one more series per entry point)
MAX_PATH_SERIES = 4096
FLUSH_EVERY_NS = 5_000_000_000
#: beyond the detectors' longest wait, before a run counts in its version's rates (``settle_s``)
SETTLE_MARGIN_S = 0.5
log = logging.getLogger(__name__)
_RULE_OF_KIND = {"regression": DEPLOY_REGRESSION, "retired_revived": DEPLOY_RETIRED_REVIVED,
                 "new_path": DEPLOY_NEW_PATH}
#: method names whose defining class is remembered (``DeployDetector._defining_of``)
MAX_FUNCTION_NAMES = 4096


class DeployDetector:
    name = "deploys"

    def __init__(self, rules: RulesConfig | None = None, state: StateConfig | None = None,
                 telemetry: Telemetry | None = None, *, config: ConsolidationConfig | None = None,
                 ledger: ActivityLedger | None = None,
                 clock_s: Callable[[], float] = time.time) -> None:
        rules = rules or RulesConfig()
        state = state or StateConfig()
        self.config = config = config or ConsolidationConfig()
        self._enabled = enabled_rules(rules, "deploy")
        self._telemetry = telemetry
        self._clock_s = clock_s
        self.paths = PathTracker(max_units=state.max_runs, idle_s=config.path_idle_s,
                                 max_paths=config.max_paths_per_entry_point)
        self.callers = CallerIndex(window_s=config.safe_to_delete_window_s)
        self.ledger = ledger if ledger is not None else ActivityLedger(clock_s=clock_s)
        # the versions an earlier process saw (persisted): their order survives a restart. A run
        # counts in its version's rates (and in what is persisted) once every family could have
        # judged it: delivery waits rules.run_idle_s after a run's last span and
        # rules.delivery_deadline_s plus rules.delivery_export_allowance_s after an emit; bleed and duplicates judge as spans come, and what
        # they hold longer they let out at shutdown (drain)
        self.versions = VersionBook(Thresholds(config.min_runs_per_version, config.regression_floor,
                                               config.regression_factor), config.max_versions,
                                    known=self.ledger.versions, counts=self.ledger.version_counts,
                                    settle_s=settle_s(rules))
        # a call after an idle time that matters to the verdict is written with its batch
        self.ledger.write_at_once_idle_s = min(self.ledger.write_at_once_idle_s,
                                               config.safe_to_delete_window_s / 4)
        self._tables = TableGroup(telemetry, self.paths.tables)
        self._version_series: dict[tuple[str, str], tuple[str, str]] = {}
        self.version_series_overflow = 0  # counts folded into ("other", "other")
        self._version_runs = BatchedCounter(telemetry.version_runs if telemetry else None)
        #: code.function.name -> the class defining it (None: no class in the name), made once
        #: per name: the names of a backend's wrapped methods, bounded (MAX_FUNCTION_NAMES)
        self._defining_of: dict[str, str | None] = {}
        self._version_findings = BatchedCounter(telemetry.version_findings if telemetry else None)
        self._path_runs = BatchedCounter(telemetry.path_runs if telemetry else None)
        self._path_series: set[tuple[str, str]] = set()  # (entry point, path) labels given a series
        self.path_series_overflow = 0  # runs counted under "other" by MAX_PATH_SERIES
        self._next_judge_ns = 0
        self._next_flush_ns = 0
        self._refused_published = 0  # the ledger's refused calls already in the metric
        # the ledger's errors already in the metric; its series at 0 from the start (an error at
        # the start, before the first scrape, is a series born at 1: the rules' `_created` term)
        self._errors_published = dict.fromkeys(LEDGER_ERRORS, 0)
        self._losses_logged: set[str] = set()
        self._now_s = clock_s()
        self._publish_ledger_health()

    # --- spans -----------------------------------------------------------------------------------
    def consume(self, spans: Sequence[SpanRecord], now_ns: int) -> list[Finding]:
        now_s = self._now_s = now_ns / 1e9
        try:  # an error here (nothing of the batch is fed again) loses every call of it
            self.paths.batch_started(now_s)
            if spans:  # the findings of this batch's spans settle with the runs it opens
                self.versions.batch_received(now_s, spans[0].received_ns)
        except Exception:
            if any(span.kind in _CALL_KINDS and span.role is not None for span in spans):
                self._calls_lost(now_s)
            raise
        paths_observe, request_ended = self.paths.observe, self.paths.request_ended
        defining_of = self._defining_of
        # calls counted per distinct (role, implementation, caller ...) of the batch, then handed
        # to the caller index and the ledger once each: a batch holds a few distinct ones
        calls: dict[tuple, int] = {}
        # calls that ran a method another class defines (code.function.name): that class's too
        code_run: dict[str, int] = {}
        ran: set[tuple] = set()  # (service, version, role, implementation): what each version ran
        interrupted: ConsumeInterrupted | None = None
        try:  # costs nothing per span; says where a span made it fail (ConsumeInterrupted)
            for span in spans:
                kind = span.kind
                if kind in _CALL_KINDS and span.role is not None:
                    if paths_observe(span):
                        self._run_opened(span, now_s)
                    key = (span.role, span.implementation, span.caller, span.nested,
                           span.entry_point, span.canonical, span.retired, span.service_name)
                    calls[key] = calls.pop(key, 0) + 1  # to the end: the batch's last caller last
                    function = span.function
                    if function is not None:
                        try:  # the class defining the method: one lookup, made once per name
                            defining = defining_of[function]
                        except KeyError:
                            defining = self._defining_class(function)
                        implementation = span.implementation
                        if (defining is not None and defining != implementation
                                and implementation is not None):
                            # inherited, or super() from an override
                            code_run[defining] = code_run.get(defining, 0) + 1
                    ran.add((span.service_name, span.service_version, span.role,
                             span.implementation))
                    if span.retired:
                        self.versions.see_retired(span.service_name or UNKNOWN_SERVICE,
                                                  span.service_version or UNKNOWN_VERSION, span,
                                                  span.entry_point or NO_ENTRY_POINT, now_s)
                elif kind == _REQUEST:
                    request_ended(span.trace_id, now_s)
        except Exception as error:  # the calls of the spans before it still count
            interrupted = ConsumeInterrupted(span, [])
            interrupted.__cause__ = error
        try:
            # the calls before what each version ran: an error there (nothing of the batch is fed
            # again) costs bookkeeping, not the verdicts' evidence
            seen_s = self._ledger_s(now_s) if calls else now_s  # on the ledger's clock
            for (role, implementation, caller, nested, entry, canonical, retired, service), count in (
                    calls.items()):
                self.ledger.observe_calls(role, implementation, canonical, retired, caller, count,
                                          seen_s, service or UNKNOWN_SERVICE)
                self.callers.observe_calls(role, implementation, caller, nested, entry, count,
                                           seen_s, service or UNKNOWN_SERVICE, retired)
            for defining, count in code_run.items():
                self.ledger.observe_code_run(defining, count, seen_s)
        except Exception:
            self._calls_lost(now_s)  # the calls of the batch may not all be in the ledger
            raise
        if interrupted is not None:
            # the span it met the error on and those after it in its batch are not fed again
            # (ConsumeInterrupted): their calls were never counted
            self._calls_lost(now_s)
        for service, version, role, implementation in ran:
            self.versions.see_ran(service or UNKNOWN_SERVICE, version or UNKNOWN_VERSION, role,
                                  implementation or "?", now_s)
        if self.ledger.urgent:  # a class new or idle for long was called: written now, not in 5 s
            self.ledger.flush()
        self._tables.enforce()  # capacity, once per batch
        if interrupted is not None:
            raise interrupted
        return []

    def _defining_class(self, function: str) -> str | None:
        cut = function.rfind(".")
        defining = function[:cut] if cut > 0 else None
        if len(self._defining_of) >= MAX_FUNCTION_NAMES:  # bounded: clearing only costs lookups
            self._defining_of.clear()
        self._defining_of[function] = defining
        return defining

    def _calls_lost(self, now_s: float) -> None:
        """Consuming a batch failed before the ledger had every call of it: those calls are lost as
        a backend's dropped spans are, so no class idle until now is safe_to_delete before a whole
        window is watched after it (``CONSUME_ERROR``)."""
        at_s = self._ledger_s(now_s)
        self.ledger.record_loss(at_s, at_s, CONSUME_ERROR)
        self._log_loss(CONSUME_ERROR)

    def _ledger_s(self, now_s: float) -> float:
        """``now_s`` (the pipeline's clock) as the ledger's clock reads it: never behind it."""
        return max(now_s, self._clock_s())

    def _run_opened(self, span: SpanRecord, now_s: float) -> None:
        service = span.service_name or UNKNOWN_SERVICE
        version = span.service_version or UNKNOWN_VERSION
        if self.versions.count_run(service, version, span.entry_point or NO_ENTRY_POINT, now_s):
            self._version_runs.add(self._series(service, version))

    def _series(self, service: str, version: str) -> tuple[str, str]:
        """The (service, version) labels of the version metrics: a version's own pair, or
        ("other", "other") beyond ``MAX_VERSION_SERIES`` pairs."""
        series = self._version_series.get((service, version))
        if series is None:
            if len(self._version_series) >= MAX_VERSION_SERIES:
                self.version_series_overflow += 1
                return OVERFLOW_LABEL, OVERFLOW_LABEL
            series = self._version_series[(service, version)] = (service, version)
        return series

    # --- findings of every detector (FindingObserver) --------------------------------------------
    def observe(self, findings: Sequence[Finding]) -> None:
        now_s = self._now_s
        for finding in findings:
            family = CATALOG[finding.rule].family if finding.rule in CATALOG else ""
            if family not in COMPARED_FAMILIES or finding.rule in NOT_PER_RUN:
                continue  # deploy.* findings are about versions, not of them; see NOT_PER_RUN
            # counted as runs are: under the finding's own service (UNKNOWN_SERVICE as a span
            # without service.name), never a guess from the version string
            service = finding.service_name or UNKNOWN_SERVICE
            version = finding.service_version or UNKNOWN_VERSION
            if self.versions.count_finding(service, version, finding.entry_point or NO_ENTRY_POINT,
                                           family, finding, now_s):
                self._version_findings.add((*self._series(service, version), family))

    # --- span loss the pipeline knows of (SpanLossObserver) ---------------------------------------
    def spans_lost(self, start_s: float, end_s: float, reason: str) -> None:
        """Calls may have been lost between ``start_s`` and ``end_s`` (a backend dropped spans): no
        class idle across it is safe_to_delete until a whole window is watched after it."""
        self._log_loss(reason)
        # its end (the pipeline's now) on the ledger's clock, which the pipeline's may lag; its
        # start may be the backend's clock (the start of a process's counts): kept
        behind_s = self._ledger_s(self._now_s) - self._now_s
        self.ledger.record_loss(start_s, end_s + behind_s, reason)

    def _log_loss(self, reason: str) -> None:
        if reason not in self._losses_logged:
            self._losses_logged.add(reason)
            log.warning("consolidation: calls may have been lost (%s): no class idle across it is "
                        "safe_to_delete before a whole window is watched after it (logged once; "
                        "verdicts.span_loss has the latest)", reason)

    def heartbeats_seen(self, heartbeats: Sequence[SpanRecord], now_ns: int) -> None:
        """Each backend process's dropped-spans total goes to the ledger, which persists it: the
        first heartbeat after a restart whose total rose since that process's last one is a loss too
        (a sidecar restarted within a minute leaves no gap, and the exporters dropped what they
        could not send meanwhile)."""
        now_s = now_ns / 1e9
        for span in heartbeats:
            if span.dropped_spans is None or span.dropped_spans < 0:
                continue  # an older instrumentation, or a broken sender (the pipeline skips it too)
            loss = self.ledger.observe_dropped_total(span.service_name, span.service_instance,
                                                     span.dropped_spans, self._ledger_s(now_s),
                                                     span.heartbeat_sequence, span.counts_since_s)
            if loss is not None:
                self.ledger.record_loss(loss[0], loss[1], SPANS_DROPPED)  # on the ledger's clock
                self._log_loss(SPANS_DROPPED)

    def held_dropped_total(self, service: str | None, instance: str | None,
                           counts_since_s: float | None) -> int | None:
        """The dropped-spans total the ledger holds of a backend process (its last heartbeat the
        last sidecar saw, or seen since), None when it holds none: the pipeline's heartbeat
        tracker counts from it a process it first hears late (``HeartbeatTracker``)."""
        return self.ledger.dropped_total(service, instance, counts_since_s)

    # --- time ------------------------------------------------------------------------------------
    def tick(self, now_ns: int) -> list[Finding]:
        self._now_s = now_ns / 1e9
        self.paths.advance(now_ns)
        for path in self.paths.take_completed():
            self.versions.see_path(path, self._now_s)
            self._path_runs.add(self._path_labels(path.entry_point,
                                                  OVERFLOW_LABEL if path.overflowed else path.id))
        findings: list[Finding] = []
        if now_ns >= self._next_judge_ns:
            self._next_judge_ns = now_ns + JUDGE_EVERY_NS
            findings = [self._finding(fact, now_ns) for fact in self.versions.judge()]
            findings = [f for f in findings if f.rule in self._enabled]
        # after judging: a finding another detector raises in this tick, about a run settling now,
        # reaches ``observe`` after every tick; the next judgement sees both
        self.versions.settle(self._now_s)
        if now_ns >= self._next_flush_ns:
            self._next_flush_ns = now_ns + FLUSH_EVERY_NS
            self.flush()
        else:
            self._flush_counters()
        self._tables.maybe_publish(now_ns)
        return findings

    def _path_labels(self, entry_point: str, path: str) -> tuple[str, str]:
        """The labels of a completed run's pathwatch_path_runs series: its own, or past
        ``MAX_PATH_SERIES`` series its entry point's ``other`` (per run judged, not per span)."""
        labels = (entry_point, path)
        if labels not in self._path_series:
            if len(self._path_series) >= MAX_PATH_SERIES and path != OVERFLOW_LABEL:
                self.path_series_overflow += 1
                labels = (entry_point, OVERFLOW_LABEL)
            self._path_series.add(labels)
        return labels

    def flush(self) -> None:
        """Counters, gauges and the persisted ledger (tick every few seconds, and at shutdown)."""
        self._flush_counters()
        known = self.versions.take_known()  # versions first seen or active since the last flush
        if known is not None:
            self.ledger.remember_versions(known)
        counts = self.versions.take_counts()  # runs and findings, when they changed: per flush
        if counts is not None:
            self.ledger.remember_version_counts(counts)
        self.ledger.flush()
        ledger_now_s = self._ledger_s(self._now_s)
        self.callers.expire(ledger_now_s)
        telemetry = self._telemetry
        if telemetry is None:
            return
        self._publish_ledger_health()
        refused = self.ledger.refused
        if refused > self._refused_published:
            telemetry.ledger_refused_calls.inc(refused - self._refused_published)
            self._refused_published = refused
        for entry, count in self.paths.recent_path_counts(self._now_s, PATH_WINDOW_S).items():
            telemetry.entry_point_paths.labels(entry).set(count)
        window_s = self.config.safe_to_delete_window_s
        for row in self.ledger.verdicts(window_s, ledger_now_s):
            telemetry.implementation_safe_to_delete.labels(row["role"], row["implementation"]).set(
                1 if row["verdict"] == SAFE_TO_DELETE else 0)
        # a class this sidecar has no row for: vouched for across pods only after a whole window
        telemetry.ledger_window_watched.set(
            1 if self.ledger.watched_whole_window(window_s, ledger_now_s) else 0)

    def _publish_ledger_health(self) -> None:
        """``pathwatch_ledger_errors_total`` (the ledger's errors since the last publish) and
        ``pathwatch_ledger_state`` (1 for its state, 0 for the others)."""
        telemetry = self._telemetry
        if telemetry is None:
            return
        for key, count in self.ledger.errors.items():
            published = self._errors_published.get(key, 0)
            telemetry.ledger_errors.labels(*key).inc(count - published)
            self._errors_published[key] = count
        state = self.ledger.persistence()["state"]
        for each in LEDGER_STATES:
            telemetry.ledger_state.labels(each).set(1 if each == state else 0)

    def close(self, clean: bool = True) -> None:
        """``clean=False``: accepted spans were left unprocessed (see ``ActivityLedger.close``)."""
        self.flush()
        self.ledger.close(clean)

    def _flush_counters(self) -> None:
        self._version_runs.flush()
        self._version_findings.flush()
        self._path_runs.flush()
        self._release_version_series()

    def _release_version_series(self) -> None:
        """Series of versions the book no longer tracks (dropped, or waiting) are removed and their
        place freed, so that the bound holds the live versions and not the first 64 ever seen; a
        version that comes back starts a new series (Prometheus' ``increase`` reads it as a reset)."""
        gone = [pair for pair in self._version_series if pair not in self.versions.versions]
        for service, version in gone:
            if self._telemetry is not None:
                _remove_series(self._telemetry.version_runs, service, version)
                for family in COMPARED_FAMILIES:
                    _remove_series(self._telemetry.version_findings, service, version, family)
            del self._version_series[(service, version)]

    def _finding(self, fact: dict, now_ns: int) -> Finding:
        rule = _RULE_OF_KIND[fact["kind"]]
        return Finding(rule=rule, severity=CATALOG[rule].severity, summary=_summary(fact),
                       role=fact.get("role"), implementation=fact.get("implementation"),
                       entry_point=fact["entry_point"], trace_id=fact.get("trace_id"),
                       service_version=fact["version"], service_name=fact["service"],
                       detected_ns=now_ns,
                       details={k: v for k, v in fact.items()
                                if k not in ("kind", "role", "implementation", "trace_id")})

    # --- the API view ----------------------------------------------------------------------------
    def snapshot(self, now_s: float | None = None) -> dict:
        """The whole consolidation picture (``/api/v1/consolidation``)."""
        now_s = self._clock_s() if now_s is None else now_s
        verdicts = self.ledger.verdicts(self.config.safe_to_delete_window_s, now_s)
        canonical = {(r["role"], r["implementation"]) for r in verdicts if r["canonical"]}
        retired = {(r["role"], r["implementation"]) for r in verdicts if r["retired"]}
        return {
            "generated_at": now_s,
            "paths": self.paths.snapshot(canonical),
            "callers_to_migrate": self.callers.to_migrate(
                canonical, retired, now_s,
                self.ledger.canonical_by_service(self.config.safe_to_delete_window_s, now_s)),
            "callers_overflow": self.callers.limits(),
            "versions": self.versions.snapshot(),
            "versions_overflow": self.versions.overflow(),  # what max_versions cost
            "verdicts": {"window_s": self.config.safe_to_delete_window_s,
                         "observing_since": self.ledger.observing_since_s,
                         "span_loss": _span_loss(self.ledger.span_loss),
                         "overflow": self.ledger.overflow(),  # classes beyond the ledger's bound
                         "ledger": self.ledger.persistence(),  # whether it is being saved
                         "implementations": verdicts},
        }


def settle_s(rules: RulesConfig) -> float:
    """How long after a run opens (and after a span is received, for its findings) it counts in
    its version's rates: the detectors' longest wait that shutdown does not cut short, and a margin."""
    return (max(rules.run_idle_s, rules.delivery_deadline_s + rules.delivery_export_allowance_s)
            + SETTLE_MARGIN_S)


def _span_loss(loss: tuple[float, float, str] | None) -> dict | None:
    if loss is None:
        return None
    return {"from": loss[0], "to": loss[1], "reason": loss[2]}


def _remove_series(counter, *labels: str) -> None:
    """prometheus-client before 0.22 raises KeyError for a series never created (a version
    without findings of every family)."""
    try:
        counter.remove(*labels)
    except KeyError:
        pass


def _summary(fact: dict) -> str:
    where = f"at {fact['entry_point']}"
    versions = f"{fact['previous_version']} -> {fact['version']}"
    if fact["kind"] == "regression":
        return (f"{fact['family']} findings per run rose from {fact['previous_rate']:.3f} to "
                f"{fact['rate']:.3f} {where} after deploy {versions}")
    if fact["kind"] == "retired_revived":
        return (f"retired {short(fact['implementation'])} runs again {where} after deploy "
                f"{versions}")
    return f"new path {fact['path']} {where} after deploy {versions}"
