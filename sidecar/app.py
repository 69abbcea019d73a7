"""The sidecar process: build every component from the config, start, and shut down gracefully.

Before anything else the sidecar locks ``<incidents.path>.lock`` and the database file itself
(``sidecar.incidents.lock``): the incident database and the consolidation ledger beside it are one
process's alone, and a second sidecar on the same path (or another name of the file: a symbolic or
hard link) exits 1 before it reads either. Start order: pipeline, then receivers
(gRPC, HTTP), then the API. ``/readyz`` answers ready only while every configured receiver
listens and the pipeline thread goes on (``Pipeline.stalled_s``). Shutdown (SIGTERM or SIGINT) goes the other way round for the data: not ready at once,
receivers stop accepting (calls in flight finish; the detectors' clock stands still from here, so
that nothing is judged for lack of the spans now refused), the pipeline drains every accepted span, alerts
are flushed, the incident store and the ledger are closed and the lock released, and the API stops
last so that /metrics can be scraped until the end. The exit code is 1 when spans were left
unprocessed or the incident store could not write what it held (the log says which). The same
signal again during the shutdown ends the process at once (``exit_at_once``, 128 + the signal).

Open files: each server holds a file descriptor per open connection, up to its cap
(``receiver.grpc_max_connections``, ``receiver.http_max_connections``, ``api.max_connections``).
Before the servers start, the soft ``RLIMIT_NOFILE`` is raised, if it is lower, to what the caps of
the enabled servers and ``FD_RESERVE`` need together, at most to the hard limit (Go programs — the
Collector, Prometheus — raise theirs to the hard limit at start): with a soft limit of 1024, common
outside containers, accept failed (EMFILE) long before the caps. Where the hard limit is lower
still, the sidecar starts anyway and logs a warning naming the keys: the caps are bounds, not the
expected load, the defaults exceed such a limit, and one backend's sidecar needs a handful of
connections.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from prometheus_client import CollectorRegistry

from sidecar.config import ConfigError, SidecarConfig
from sidecar.gcpauses import GcPauseCollector
from sidecar.inhibition import Inhibitor
from sidecar.logsetup import configure_logging
from sidecar.model import Severity
from sidecar.pipeline import Pipeline
from sidecar.receiver import ExportHandler, GrpcReceiver, HttpReceiver, SpanDecoder
from sidecar.receiver.asgi_server import ConnectionLimits, ThreadedAsgiServer
from sidecar.telemetry import Telemetry

log = logging.getLogger("pathwatch.sidecar")

SHUTDOWN_GRACE_S = 5.0  # calls in flight may finish within this
DRAIN_TIMEOUT_S = 60.0
EXIT_LOG_WAIT_S = 1.0  # a forced exit waits this long at most for its log line (``exit_at_once``)
GC_GEN0_THRESHOLD = 50_000
# A generation-1 collection walks everything promoted since the last one: every 2 young
# collections instead of Python's 20 keeps its pause near 70 ms instead of 400 ms with 60,000
# runs held (same total work); generation 2 keeps its rhythm (2 x 1000 = 20 x 100 young ones).
GC_GEN1_THRESHOLD = 2
GC_GEN2_THRESHOLD = 1000
#: file descriptors kept for everything but the servers' connections: 31 at rest (stdio, the
#: incident store and the ledger with their journals, the lock, the listening sockets, the event
#: loops' and grpc's pollers and wake-ups), plus alert connections and SQLite's temporary files
FD_RESERVE = 128


@dataclass
class Endpoints:
    """Where the sidecar actually listens (ports resolved when configured as 0)."""

    grpc: str = ""
    http: str = ""
    api: str = ""
    all: dict[str, str] = field(default_factory=dict)

    def write(self, path: str) -> None:
        """``--endpoints-file``: one JSON object, each server's setting to where it listens (its port
        0 resolved; "" when disabled). Written beside ``path`` and renamed over it: a reader never
        sees half of it."""
        by_setting = {"receiver.grpc_endpoint": self.grpc, "receiver.http_endpoint": self.http,
                      "api.endpoint": self.api}
        target = Path(path)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            partial.write_text(json.dumps(by_setting) + "\n")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


class Sidecar:
    def __init__(self, config: SidecarConfig, *, registry: CollectorRegistry | None = None,
                 api_token: str | None = None) -> None:
        # imported here: these packages are heavier and only the running sidecar needs them
        from sidecar.alerting import AlertDispatcher
        from sidecar.api import require_token_for
        from sidecar.detectors import Inventory, build_detectors
        from sidecar.incidents import IncidentStore
        from sidecar.incidents.lock import StateLock
        from sidecar.liveness import Liveness

        if api_token is None:
            # secrets mounted from files often end in a newline; the header value never does
            api_token = os.environ.get(config.api.token_env, "").strip() or None
        require_token_for(config.api.endpoint, api_token, config.api.token_env)
        # the webhook URL of alerting.webhook_url_env, read (and refused) here, as the token
        config = config.model_copy(update={"alerting": config.alerting.from_environment(os.environ)})
        self.config = config
        self._api_token = api_token
        self.registry = registry if registry is not None else CollectorRegistry()
        self.telemetry = Telemetry(self.registry)
        # the incident database and the ledger beside it are this process's alone: locked before
        # either is read, so that a second sidecar on the same incidents.path touches neither
        self.state_lock = StateLock.acquire(config.incidents.path)
        try:
            self.store = IncidentStore.from_config(config.incidents, self.telemetry)
            try:
                self.deploys = _deploy_detector(config, self.telemetry)
            except BaseException:
                self.store.close()
                raise
        except BaseException:
            self.state_lock.release()
            raise
        self.inventory = Inventory(  # "retired still called" over the window that decides deletion,
            config.rules, config.state, self.telemetry,  # before this start too (the ledger)
            retired_window_s=config.consolidation.safe_to_delete_window_s,
            ledger=self.deploys.ledger, wall_clock_ns=time.time_ns)  # the snapshot's clock
        self.detectors = build_detectors(config.rules, config.state, self.telemetry,
                                         inventory=self.inventory, deploys=self.deploys,
                                         started_ns=time.time_ns(),  # the pipeline clock's start
                                         earlier_processes=self.deploys.ledger.earlier_processes,
                                         note_process=self.deploys.ledger.note_backend_process)
        self.alerts = AlertDispatcher(config.alerting, ledger=self.store, telemetry=self.telemetry)
        # a page owed to a configured sink stays owed across restarts, however long (alertable)
        self.store.owe_pages([sink.name for sink in self.alerts.sinks], Severity(config.alerting.min_severity))
        self.pipeline = Pipeline(
            detectors=self.detectors, incidents=self.store, alerts=self.alerts,
            telemetry=self.telemetry, max_pending_spans=config.receiver.max_pending_spans,
            disabled_rules=config.rules.disabled,
            min_alert_severity=Severity(config.alerting.min_severity), observers=[self.deploys],
            # info findings wait no longer than a run takes to be judged, so they land with its verdict
            inhibitor=Inhibitor(min(config.rules.delivery_deadline_s, config.rules.run_idle_s),
                                self.telemetry))
        self.handler = ExportHandler(SpanDecoder(config.receiver.max_spans_per_request,
                                                 config.receiver.max_attributes_per_request),
                                     self.pipeline, self.telemetry,
                                     config.receiver.max_pending_spans)
        self.endpoints = Endpoints()
        # /healthz: the vital threads, and the pipeline's progress (watched as they start)
        self.liveness = Liveness(self.telemetry, config.api.liveness_grace_s)
        # last: nothing above may fail and leave the hook in gc.callbacks
        self._gc_pauses = GcPauseCollector().install(self.registry)
        self._grpc: GrpcReceiver | None = None
        self._http: HttpReceiver | None = None
        self._api: ThreadedAsgiServer | None = None
        self._accepting = False
        self._stall_logged = False  # the current stall of the pipeline thread was logged
        self._stopped_clean: bool | None = None  # shutdown's result, once it ran

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Endpoints:
        """Start everything; raises OSError naming the setting when a port cannot be bound."""
        receiver = self.config.receiver
        ensure_open_files(self.config)
        self.pipeline.start()
        self.liveness.watch_pipeline(self.pipeline)
        for sink, thread in self.alerts.threads.items():
            self.liveness.watch_thread(f"alerts.{sink}", thread)
        # pages that failed, or were cut by the last shutdown, go out now (owed however long ago
        # their incident was seen); firing alerts are refreshed with their next finding. Not those
        # of a rule switched off (rules.disabled) since: its findings are dropped, and so are the
        # pages still owed for it
        alerting, disabled = self.config.alerting, frozenset(self.config.rules.disabled)
        self.alerts.resume(incident for incident in self.store.alertable(
            Severity(alerting.min_severity), time.time_ns() - int(alerting.resolve_after_s * 1e9))
            if incident.rule not in disabled)
        try:
            if receiver.grpc_endpoint:
                self._grpc = GrpcReceiver(receiver.grpc_endpoint, self.handler,
                                          max_message_bytes=receiver.max_message_bytes,
                                          read_timeout_s=receiver.read_timeout_s,
                                          max_connections=receiver.grpc_max_connections)
                self.endpoints.grpc = self._grpc.start()
                self.liveness.watch_thread("otlp_grpc", self._grpc.thread)
                self._listening("OTLP/gRPC", self.endpoints.grpc)
            if receiver.http_endpoint:
                self._http = HttpReceiver(receiver.http_endpoint, self.handler,
                                          max_message_bytes=receiver.max_message_bytes,
                                          read_timeout_s=receiver.read_timeout_s,
                                          max_connections=receiver.http_max_connections,
                                          on_closed=self._count_closed("otlp_http"))
                self.endpoints.http = self._http.start()
                self.liveness.watch_thread("otlp_http", self._http.thread)
                self._listening("OTLP/HTTP", self.endpoints.http + " (POST /v1/traces)")
            self._accepting = True
            api = self.config.api
            if api.endpoint:
                self._api = ThreadedAsgiServer(
                    self._api_app(), api.endpoint, "api.endpoint", name="pathwatch-api",
                    limits=ConnectionLimits(api.max_connections, api.head_timeout_s,
                                            self._count_closed("api")))
                self._api.start()
                self.liveness.watch_thread("api", self._api.thread)
                self.endpoints.api = self._api.endpoint
                self._listening("HTTP API", self.endpoints.api + " (/metrics /healthz /readyz /api/v1)")
            self._log_alert_sinks()
        except BaseException:
            self.shutdown(quiet=True)  # the caller reports the failure
            raise
        return self.endpoints

    def _count_closed(self, server: str):
        counter = self.telemetry.http_connections_closed
        for reason in ("limit", "head_timeout"):  # the series exist from the start, at 0
            counter.labels(server=server, reason=reason)
        return lambda reason: counter.labels(server=server, reason=reason).inc()

    def ready(self) -> bool:
        """Every configured receiver listens, and the pipeline thread goes round: one stuck in a
        step (``Pipeline.stalled_s``) processes nothing, so a gateway replica leaves its Service and
        its share of the traffic goes to the others (logged once per stall)."""
        grpc_ok = self._grpc is not None or not self.config.receiver.grpc_endpoint
        http_ok = (self._http.listening if self._http is not None
                   else not self.config.receiver.http_endpoint)
        if not (self._accepting and grpc_ok and http_ok):
            return False
        stalled_s = self.pipeline.stalled_s()
        if stalled_s is None:
            self._stall_logged = False
            return True
        if not self._stall_logged:
            self._stall_logged = True
            log.error("pathwatch sidecar: the pipeline thread %s; not ready (/readyz 503) until it "
                      "goes on. %d span(s) wait, new ones are refused once "
                      "receiver.max_pending_spans is reached",
                      "has ended" if stalled_s == float("inf")
                      else f"has been inside one step for {stalled_s:.0f} s",
                      self.pipeline.pending_spans)
        return False

    def live(self) -> list[dict]:
        """What ``/healthz`` reports failing (``sidecar.liveness``): empty while alive."""
        now_ns = time.time_ns()
        return [failure.to_dict(now_ns) for failure in self.liveness.check()]

    def shutdown(self, *, quiet: bool = False) -> bool:
        """Stop accepting, drain, flush, close. True when every accepted span was processed and the
        incident store wrote everything it held (``IncidentStore.close``; its failure is logged).
        Idempotent: a second call returns the first one's result. ``quiet``: no "stopped" line
        (a start that failed)."""
        if self._stopped_clean is not None:
            return self._stopped_clean
        self.liveness.stop()  # threads end from here by design
        self._accepting = False
        self.pipeline.close_intake()  # no span comes any more: nothing is judged for lack of one
        if self._grpc is not None:
            self._grpc.stop(SHUTDOWN_GRACE_S)
        if self._http is not None:
            self._http.stop(SHUTDOWN_GRACE_S)
        drained = self.pipeline.stop(DRAIN_TIMEOUT_S)
        if not drained:
            log.error("pipeline did not drain %s; %d span(s) unprocessed",
                      "(its thread had ended: nor did its last tick run)" if self.pipeline.ended else
                      f"within {DRAIN_TIMEOUT_S:g}s", self.pipeline.pending_spans)
        self._close_quietly("alerting", lambda: self.alerts.close(SHUTDOWN_GRACE_S))
        stored = self._close_quietly("incident store", self.store.close) is not False
        # spans left in the queue may hold calls the ledger never saw: the next start counts a loss
        self._close_quietly("consolidation ledger", lambda: self.deploys.close(clean=drained))
        self._close_quietly("incidents.path lock", self.state_lock.release)  # both files closed
        if self._api is not None:
            self._api.stop(SHUTDOWN_GRACE_S)
        self._gc_pauses.uninstall(self.registry)
        if not quiet:
            log.info("pathwatch sidecar stopped; %d span(s) processed", self.pipeline.processed_spans)
        self._stopped_clean = drained and stored
        return self._stopped_clean

    # --- helpers -----------------------------------------------------------------------------
    def _api_app(self):
        from sidecar.api import create_api

        return create_api(self.store, self.inventory, self.registry, self.ready, self._api_token,
                          live=self.live,
                          metrics_requires_token=self.config.api.metrics_requires_token,
                          consolidation=self.deploys, alerts=self.alerts,
                          body_timeout_s=self.config.api.head_timeout_s)

    def _log_alert_sinks(self) -> None:
        """Where pages go, or that none are pushed: an empty alerting section stores and counts
        incidents without paging anyone, which a start log should not leave to be discovered."""
        from sidecar.alerting.sinks import redacted

        alerting = self.config.alerting
        auth = (f" (basic auth as {alerting.alertmanager_username})" if alerting.alertmanager_username
                else " (bearer token)" if alerting.alertmanager_bearer_token_env else "")
        sinks = [f"Alertmanager {redacted(url)}{auth}" for url in
                 ([alerting.alertmanager_url, *alerting.alertmanager_peers]
                  if alerting.alertmanager_url else [])]
        if alerting.webhook_url:
            sinks.append(f"webhook {redacted(alerting.webhook_url)}")
        if sinks:
            log.info("pathwatch sidecar: %s incidents are pushed to %s", alerting.min_severity,
                     ", ".join(sinks))
        else:
            log.info("pathwatch sidecar: no alert sink configured (alerting.alertmanager_url, "
                     "alerting.webhook_url): incidents are stored and counted, nobody is paged")

    @staticmethod
    def _listening(what: str, endpoint: str) -> None:
        log.info("pathwatch sidecar: %s listening on %s", what, endpoint)

    @staticmethod
    def _close_quietly(what: str, close) -> object:
        """``close()``'s result; False when it raised (logged)."""
        try:
            return close()
        except Exception:
            log.exception("closing the %s failed", what)
            return False


def _deploy_detector(config: SidecarConfig, telemetry: Telemetry):
    """The consolidation workflow, its ledger in its own file beside the incident database."""
    from sidecar.consolidation import ActivityLedger, ledger_path_beside
    from sidecar.detectors.deploys import DeployDetector

    ledger = ActivityLedger(ledger_path_beside(config.incidents.path), clock_s=time.time)
    return DeployDetector(config.rules, config.state, telemetry, config=config.consolidation,
                          ledger=ledger)


def connection_caps(config: SidecarConfig) -> dict[str, int]:
    """The open-connection cap of each enabled server, by its config key."""
    caps = {}
    if config.receiver.grpc_endpoint:
        caps["receiver.grpc_max_connections"] = config.receiver.grpc_max_connections
    if config.receiver.http_endpoint:
        caps["receiver.http_max_connections"] = config.receiver.http_max_connections
    if config.api.endpoint:
        caps["api.max_connections"] = config.api.max_connections
    return caps


def ensure_open_files(config: SidecarConfig) -> int:
    """Raise the soft RLIMIT_NOFILE to what the connection caps and ``FD_RESERVE`` need, at most to
    the hard limit; warn, naming the keys, when even the hard limit is lower. Never lowers it.
    Returns the soft limit in force after."""
    import resource

    caps = connection_caps(config)
    needed = sum(caps.values()) + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # e.g. above fs.nr_open with an unlimited hard limit
            log.warning("pathwatch sidecar: cannot raise the open files limit from %d to %d: %s",
                        soft, target, exc)
        else:
            log.info("pathwatch sidecar: open files limit (RLIMIT_NOFILE) raised from %d to %d for "
                     "the connection caps", soft, target)
            soft = target
    if soft < needed:
        hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        log.warning(
            "pathwatch sidecar: the connection caps (%s) and %d other files need %d open files, but "
            "the process may open %d (RLIMIT_NOFILE, hard limit %s): before the caps are reached, "
            "new connections would fail to be accepted and files fail to open. Raise the limit "
            "(ulimit -n, systemd LimitNOFILE, the container runtime's nofile) or lower those keys",
            ", ".join(f"{key}={cap}" for key, cap in caps.items()), FD_RESERVE, needed, soft,
            hard_text)
    return soft


def tune_garbage_collector() -> None:
    """Per span the sidecar allocates a few short-lived objects, while its detectors hold a large
    live state (hundreds of thousands of entries). With the default gen-0 threshold (700) the
    cyclic collector runs every few hundred spans and its full passes walk that whole state: it
    took a third of the CPU in benchmarks/sidecar_throughput.py. A higher threshold keeps cycle
    collection but far less often; ``freeze`` leaves the objects made at start-up out of it.
    Pauses are exported as ``pathwatch_gc_pause_seconds`` (docs/sidecar.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_GEN1_THRESHOLD, GC_GEN2_THRESHOLD)


def exit_at_once(signum: int, sidecar: Sidecar | None) -> NoReturn:
    """End the process now, 128 + ``signum``, as a crash would (in a signal handler: nothing that waits
    on another thread without a bound). What the shutdown had not done yet is lost: spans not processed, pages not
    pushed (offered again at the next start), incidents not written; the consolidation ledger is
    left unclean, so the next start counts the time as a span loss. The lock on ``incidents.path``
    goes with the process (the kernel releases it).

    The line that says so is written by a thread of its own, waited for ``EXIT_LOG_WAIT_S`` at most:
    written here, it blocked the exit for good when the output could not take it (a pipe nobody
    reads, a terminal scroll-locked), and raised (a reentrant write) when the signal came during a
    write of the main thread's. Whatever happens to the line, the process exits."""
    try:
        pending = sidecar.pipeline.pending_spans if sidecar is not None else 0
        logged = threading.Event()

        def say() -> None:
            try:
                log.error("pathwatch sidecar: %s received again: exiting at once, the shutdown cut "
                          "short; %d accepted span(s) not processed, incidents and pages not yet "
                          "written or pushed are lost (pages owed are offered again at the next start)",
                          signal.Signals(signum).name, pending)
                for handler in logging.getLogger().handlers:
                    try:
                        handler.flush()
                    except Exception:  # noqa: BLE001 - the others are flushed all the same
                        pass
            finally:
                logged.set()

        threading.Thread(target=say, name="pathwatch-exit-log", daemon=True).start()
        logged.wait(EXIT_LOG_WAIT_S)
    finally:
        os._exit(128 + signum)


def run(config: SidecarConfig, endpoints_file: str | None = None, *,
        received_before: list[int] | None = None) -> int:
    """Run until SIGTERM or SIGINT; the process exit code (0 after a clean drain and every incident
    written, else 1). ``endpoints_file`` (``--endpoints-file``): where every server listens is
    written there once they all do (``Endpoints.write``); a file that cannot be written stops the
    start (1). The same signal again during the shutdown (a second Ctrl-C) exits at once,
    128 + its number (``exit_at_once``); the other one is logged and the shutdown goes on: a Ctrl-C
    signals the terminal's whole process group, and a parent that then stops its sidecar (the demo,
    a supervisor) sends SIGTERM — which must not cut the drain. ``received_before``: the SIGTERMs and
    SIGINTs the command line held until now (``cli._hold_stop_signals``), acted on as they came."""
    configure_logging(config.logging.level, config.logging.format)
    stop = threading.Event()
    started_on: list[int] = []  # the signal that began the shutdown
    running: list[Sidecar] = []

    def request_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if not started_on:
            started_on.append(signum)
            log.info("pathwatch sidecar: %s received, shutting down (%s again exits at once, cutting "
                     "the drain short)", name, name)
            stop.set()
        elif signum == started_on[0]:
            exit_at_once(signum, running[0] if running else None)
        else:
            first = signal.Signals(started_on[0]).name
            log.info("pathwatch sidecar: %s received while shutting down on %s; the shutdown goes on "
                     "(%s again exits at once)", name, first, first)

    # Background processes started from a non-interactive shell ignore SIGINT: set both anyway.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for signum in list(received_before or ()):  # a copy: no more come to it once these are set
        request_stop(signum, None)
    try:
        sidecar = Sidecar(config)
        running.append(sidecar)
    except ConfigError:
        raise
    except Exception as exc:  # e.g. the incident store cannot be opened
        log.error("pathwatch sidecar: cannot start: %s", exc)
        return 1
    try:
        sidecar.start()
    except (OSError, RuntimeError) as exc:  # a port taken, a server that did not come up
        log.error("pathwatch sidecar: %s", exc)  # what did start was stopped, the store closed
        return 1
    if endpoints_file is not None:
        try:
            sidecar.endpoints.write(endpoints_file)
        except OSError as exc:
            log.error("pathwatch sidecar: cannot write --endpoints-file %s: %s", endpoints_file,
                      exc.strerror or exc)
            sidecar.shutdown(quiet=True)
            return 1
    tune_garbage_collector()
    check_failed = False
    while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        # the liveness check between two waits: a vital thread's end or a stuck pipeline is logged
        # and counted when it happens, probed or not; a bug of the check never ends this thread
        try:
            sidecar.liveness.check()
        except Exception:
            if not check_failed:
                check_failed = True
                log.exception("pathwatch sidecar: the liveness check raised; /healthz may not say "
                              "what fails")
    return 0 if sidecar.shutdown() else 1
