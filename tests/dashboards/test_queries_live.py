"""Every panel query returns data from a real Prometheus scraping the sidecar's real metric set.

The registry is ``sidecar.telemetry.Telemetry`` fed by a small driver that moves the metrics the way
the demo does (canonical and retired engines, a bleed finding with its trace id as exemplar,
undelivered events, ...). Counters that stay at zero in a healthy system (dropped spans, evictions,
rejected export requests) are deliberately left untouched: their panels must still show data (an
explicit 0).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from dashboards.queries import iter_panels, render_for_prometheus
from sidecar.consolidation.verdicts import LEDGER_ERRORS, LEDGER_STATES
from sidecar.receiver.grpc_server import REASONS as GRPC_REASONS
from sidecar.telemetry import Telemetry
from tests.dashboards.tooling import DASHBOARD_FILES, ROOT, load_dashboard
from tests.support import free_port, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ENGINE, SUPERVISOR = "execution_engine", "supervisor"
OLD, NEW = "1.4.0", "1.5.0"


def drive(telemetry: Telemetry, stop: threading.Event) -> None:
    """Move every metric a little, every 50 ms, until stopped."""
    t = telemetry
    t.state_capacity.labels("runs").set(100_000)
    t.state_capacity.labels("events").set(400_000)
    while not stop.is_set():
        t.calls.labels(ENGINE, "demo.UserExecutionEngine", "true", "false", "/ws", "false").inc(3)
        t.calls.labels(ENGINE, "demo.UserExecutionEngine", "true", "false", "/ws", "true").inc()  # delegated to
        t.calls.labels(ENGINE, "demo.RequestScopedExecutionEngine", "false", "false", "/ws", "false").inc()
        t.calls.labels(ENGINE, "demo.IsolatedExecutionEngine", "false", "true", "/api/runs", "false").inc()
        t.calls.labels(SUPERVISOR, "demo.ChatOrchestrator", "false", "false", "/ws", "false").inc()  # no canonical
        for role, implementation in ((ENGINE, "demo.UserExecutionEngine"),
                                     (ENGINE, "demo.IsolatedExecutionEngine")):
            t.implementation_last_seen.labels(role, implementation).set(time.time())
        t.findings.labels("bleed.target_vs_socket_owner", "critical", "event_emitter",
                          "demo.AgentBridge", "/ws").inc(exemplar={"trace_id": TRACE_ID})
        t.findings.labels("duplicate.execution", "warning", ENGINE,
                          "demo.RequestScopedExecutionEngine", "/ws").inc(exemplar={"trace_id": TRACE_ID})
        t.findings.labels("delivery.missing_required_events", "warning", "", "", "/ws").inc()
        t.incidents_open.labels("bleed.target_vs_socket_owner", "critical").set(1)
        t.events_emitted.labels("agent_started").inc(10)
        t.events_written.labels("agent_started", "written").inc(9)
        t.events_undelivered.labels("agent_started", "no_connection").inc()
        t.delivery_latency.labels("agent_started").observe(0.02)
        t.runs_completed.labels("complete").inc()
        t.runs_completed.labels("missing_events").inc()
        t.receiver_spans.labels("grpc", "accepted").inc(50)
        t.receiver_requests.labels("grpc", "OK").inc()  # no request rejected: that panel reads 0
        for reason in GRPC_REASONS:  # as the gRPC receiver declares them: each at 0, none refused
            t.receiver_refused_requests.labels("grpc", reason)
        t.state_entries.labels("runs").set(1200)
        t.state_entries.labels("events").set(5300)
        t.backend_last_heartbeat.labels("demo-backend").set(time.time())
        # as the heartbeat tracker does: the series exists at 0 from a service's first heartbeat
        t.backend_processes_vanished.labels("demo-backend")
        t.backend_instrumentation_errors.labels("demo-backend")
        t.backend_pending_emits_evicted.labels("demo-backend")
        for part in ("pipeline", "api"):  # as the liveness check does: each part's series at 0
            t.liveness_failures.labels(part, "ended")
        t.liveness_failures.labels("pipeline", "stalled")
        t.alerts_sent.labels("alertmanager", "sent").inc()  # the webhook pushed nothing: it reads 0
        t.alerts_sent.labels("alertmanager", "refreshed").inc(2)
        for sink in ("alertmanager", "webhook"):  # set for each configured sink at start
            t.alerts_resume_waiting.labels(sink).set(0)
        t.alerts_clock_skew.labels("alertmanager").set(-1.5)
        for detector in ("bleed", "duplicates", "delivery"):  # as the pipeline does: each at 0
            t.detector_errors.labels(detector)
        for operation, cause in LEDGER_ERRORS:  # as the deploys detector does: each at 0
            t.ledger_errors.labels(operation, cause)
        for state in LEDGER_STATES:
            t.ledger_state.labels(state).set(1 if state == "persisted" else 0)
        _drive_consolidation_phase(t)
        stop.wait(0.05)


def _drive_consolidation_phase(t: Telemetry) -> None:
    """A rollout from 1.4.0 to 1.5.0 with bleed in the new version only; one entry point still on
    two paths, one retired class deletable. No deploy.* finding: that panel must read 0."""
    for version, runs, bleed in ((OLD, 4, 0), (NEW, 4, 2)):
        t.version_runs.labels("demo-backend", version).inc(runs)
        t.version_findings.labels("demo-backend", version, "duplicate").inc()
        if bleed:
            t.version_findings.labels("demo-backend", version, "bleed").inc(bleed)
    t.path_runs.labels("/ws", "a1b2c3d4").inc(3)
    t.path_runs.labels("/ws", "e5f6a7b8").inc()
    t.entry_point_paths.labels("/ws").set(2)
    t.entry_point_paths.labels("/api/runs").set(1)
    t.implementation_safe_to_delete.labels(ENGINE, "demo.ExecutionEngine").set(1)
    t.implementation_safe_to_delete.labels(ENGINE, "demo.UserExecutionEngine").set(0)
    t.ledger_window_watched.set(1)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[str]:
    telemetry = Telemetry(CollectorRegistry())
    stop = threading.Event()
    driver = threading.Thread(target=drive, args=(telemetry, stop), daemon=True)
    driver.start()
    try:
        with scraping_prometheus(tmp_path_factory.mktemp("prometheus"), telemetry.registry,
                                 "--enable-feature=exemplar-storage") as url:
            yield url
    finally:
        stop.set()
        driver.join(timeout=5)


@contextmanager
def scraping_prometheus(work: Path, registry: CollectorRegistry, *flags: str) -> Iterator[str]:
    """A real Prometheus (Debian's) scraping ``registry``, served on a free port, every second; its
    URL once ready. Its log is printed if it exits otherwise than by our SIGTERM."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not on PATH: run `scripts/setup.sh debian`")
    server, server_thread = start_http_server(0, "127.0.0.1", registry)  # binds a port it picks
    metrics_port = server.server_port
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "pathwatch",
                                  "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    process = subprocess.Popen(
        [exe, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", *flags], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready").status_code == 200, timeout=30,
                   message="prometheus ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
        server.shutdown()
        server_thread.join(timeout=5)
        _print_log_on_failure(work / "prometheus.log", process.returncode)


def _print_log_on_failure(path: Path, returncode: int | None) -> None:
    if returncode not in (0, -15):
        print(path.read_text()[-4000:])


def instant(url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body.get("status") == "success", (expr, body)
    return body["data"]["result"]


def panel_queries() -> list[tuple[str, str]]:
    return [(f"{name}: {panel['title']}", target["expr"])
            for name in DASHBOARD_FILES for panel in iter_panels(load_dashboard(name))
            for target in panel["targets"]]


@pytest.mark.parametrize(("panel", "expr"), panel_queries(), ids=[p for p, _ in panel_queries()])
def test_panel_query_returns_data(prometheus: str, panel: str, expr: str) -> None:
    rendered = render_for_prometheus(expr, rate_interval="5s", interval="1s", range_="1m")
    result = wait_until(lambda: instant(prometheus, rendered), timeout=30,
                        message=f"data for {panel}: {rendered}")
    assert all(sample["value"][1] not in ("NaN", "") for sample in result), (panel, result)


def test_quiet_counters_read_zero_not_no_data(prometheus: str) -> None:
    dashboard = load_dashboard("pathwatch-delivery.json")
    by_title = {p["title"]: p["targets"][0]["expr"] for p in iter_panels(dashboard)}
    for title, label, expected_keys in (("Backend-dropped spans", "service_name", {"demo-backend"}),
                                        ("Backend processes vanished", "service_name",
                                         {"demo-backend"}),
                                        ("Backend instrumentation faults", "service_name",
                                         {"demo-backend"}),
                                        ("Sidecar liveness failures", "part", {"pipeline", "api"}),
                                        ("State evictions", "table", {"runs", "events"}),
                                        ("Export requests rejected", "protocol", {"grpc"}),
                                        ("Export requests refused by reason", "reason",
                                         set(GRPC_REASONS)),
                                        ("Findings lost by the sidecar", "detector",
                                         {"bleed", "duplicates", "delivery"})):
        expr = render_for_prometheus(by_title[title], rate_interval="5s")
        result = wait_until(lambda e=expr: instant(prometheus, e), timeout=30, message=title)
        assert {s["metric"][label] for s in result} == expected_keys
        assert {float(s["value"][1]) for s in result} == {0.0}
    # counters born at their first count, none yet: one 0, while the sidecar reports
    for title in ("Detector evidence dropped", "Span attributes ignored"):
        expr = render_for_prometheus(by_title[title], rate_interval="5s")
        result = wait_until(lambda e=expr: instant(prometheus, e), timeout=30, message=title)
        assert [(s["metric"], float(s["value"][1])) for s in result] == [({}, 0.0)], title


def test_the_alert_pushes_panel_shows_each_outcome_and_0_for_a_sink_that_pushed_nothing(
        prometheus: str) -> None:
    dashboard = load_dashboard("pathwatch-delivery.json")
    expr = next(p["targets"][0]["expr"] for p in iter_panels(dashboard)
                if p["title"] == "Alert pushes by sink and outcome")
    rendered = render_for_prometheus(expr, rate_interval="5s")
    result = wait_until(lambda: len(instant(prometheus, rendered)) == 3 and
                        instant(prometheus, rendered), timeout=30, message="three lines")
    rates = {(s["metric"]["sink"], s["metric"].get("outcome")): float(s["value"][1]) for s in result}
    assert set(rates) == {("alertmanager", "sent"), ("alertmanager", "refreshed"), ("webhook", None)}
    assert rates[("webhook", None)] == 0.0
    assert 0 < rates[("alertmanager", "sent")] < rates[("alertmanager", "refreshed")]


def test_canonical_share_is_zero_for_a_role_without_canonical_calls(prometheus: str) -> None:
    dashboard = load_dashboard("pathwatch-consolidation.json")
    expr = next(p["targets"][0]["expr"] for p in iter_panels(dashboard)
                if p["title"] == "Canonical share per role")
    rendered = render_for_prometheus(expr, rate_interval="5s")
    result = wait_until(lambda: len(instant(prometheus, rendered)) == 2 and
                        instant(prometheus, rendered), timeout=30, message="share for both roles")
    share = {s["metric"]["role"]: float(s["value"][1]) for s in result}
    assert share[SUPERVISOR] == 0.0
    assert 0.5 < share[ENGINE] < 1.0  # 3 canonical calls of every 5


def test_bleed_panels_get_trace_ids_as_exemplars(prometheus: str) -> None:
    dashboard = load_dashboard("pathwatch-isolation.json")
    expr = next(t["expr"] for p in iter_panels(dashboard) for t in p["targets"]
                if p["title"] == "Bleed findings by rule")
    rendered = render_for_prometheus(expr, rate_interval="5s")

    def exemplars() -> list[dict]:
        now = time.time()
        response = httpx.get(f"{prometheus}/api/v1/query_exemplars",
                             params={"query": rendered, "start": now - 60, "end": now}, timeout=10)
        return [e for series in response.json()["data"] for e in series["exemplars"]]

    found = wait_until(exemplars, timeout=30, message="exemplars on the bleed panel")
    assert {e["labels"]["trace_id"] for e in found} == {TRACE_ID}


def consolidation_expr(title: str) -> str:
    dashboard = load_dashboard("pathwatch-consolidation.json")
    return next(p["targets"][0]["expr"] for p in iter_panels(dashboard) if p["title"] == title)


def consolidation_query(title: str) -> str:
    dashboard = load_dashboard("pathwatch-consolidation.json")
    expr = next(p["targets"][0]["expr"] for p in iter_panels(dashboard) if p["title"] == title)
    return render_for_prometheus(expr, rate_interval="5s")


def test_findings_per_run_show_the_new_versions_regression(prometheus: str) -> None:
    rendered = consolidation_query("Findings per run, by version")
    result = wait_until(lambda: len(instant(prometheus, rendered)) == 3 and
                        instant(prometheus, rendered), timeout=30, message="three version lines")
    per_run = {(s["metric"]["service_version"], s["metric"]["family"]): float(s["value"][1]) for s in result}
    assert set(per_run) == {(OLD, "duplicate"), (NEW, "duplicate"), (NEW, "bleed")}
    assert per_run[(NEW, "bleed")] == pytest.approx(0.5, rel=0.2)  # 2 per 4 runs
    assert per_run[(OLD, "duplicate")] == pytest.approx(per_run[(NEW, "duplicate")], rel=0.2)


def test_deploy_findings_read_zero_while_there_are_none(prometheus: str) -> None:
    rendered = consolidation_query("Deploy findings by rule")
    result = wait_until(lambda: instant(prometheus, rendered), timeout=30, message="deploy panel")
    assert [float(s["value"][1]) for s in result] == [0.0]


# --- one-off events: a series born at its only value ----------------------------------------------

ONE_OFF_PANELS = (  # dashboard, panel title, labels of the one-off line (None: absent), its count
    ("pathwatch-isolation.json", "Bleed findings by rule", {"rule": "bleed.owner_vs_ambient"}, 1),
    ("pathwatch-isolation.json", "Bleed findings by implementation",
     {"implementation": "demo.UserExecutionEngine"}, 1),
    ("pathwatch-consolidation.json", "Duplicate findings by rule", {"rule": "duplicate.execution"}, 1),
    ("pathwatch-consolidation.json", "Deploy findings by rule", {"rule": "deploy.regression"}, 1),
    ("pathwatch-consolidation.json", "Retired implementations still called",
     {"implementation": "demo.ExecutionEngine", "rule": None}, 1),
    # its duplicate.retired_invoked finding, beside the calls (PathwatchRetiredImplementationCalled)
    ("pathwatch-consolidation.json", "Retired implementations still called",
     {"implementation": "demo.ExecutionEngine", "rule": "duplicate.retired_invoked"}, 1),
    ("pathwatch-delivery.json", "Runs missing required events", {"entry_point": "/api/runs"}, 1),
    ("pathwatch-delivery.json", "Delivery findings by rule",
     {"rule": "delivery.missing_required_events"}, 1),
    # a page dropped once (a full queue): the series is born at 1 too, and fires PathwatchAlertPagesFailing
    ("pathwatch-delivery.json", "Alert pushes by sink and outcome", {"outcome": "dropped"}, 1),
    # an event type's first undelivered event for a reason (a swallowed emit error, here)
    ("pathwatch-delivery.json", "Undelivered by type and reason", {"reason": "emit_error"}, 1),
    # counters the sidecar adds to in batches (a flush, a state publish): a series is born at the
    # count of its first batch, which rate() alone never saw
    ("pathwatch-consolidation.json", "Calls per implementation",
     {"implementation": "demo.ExecutionEngine"}, 1),
    ("pathwatch-consolidation.json", "Runs per version", {"service_version": "2.0.0"}, 4),
    ("pathwatch-delivery.json", "Emitted vs written", {"event_type": "agent_started", "outcome": None},
     10),
    ("pathwatch-delivery.json", "Emitted vs written", {"event_type": "agent_started",
                                                       "outcome": "written"}, 9),
    ("pathwatch-delivery.json", "Runs completed by outcome", {"outcome": "missing_events"}, 2),
    ("pathwatch-delivery.json", "State evictions", {"table": "runs", "reason": "capacity"}, 3),
)
ONE_OFF_WINDOW_S = 5  # the $__rate_interval the queries are rendered with


@pytest.fixture(scope="module")
def one_off_prometheus(tmp_path_factory) -> Iterator[tuple[str, float]]:
    """A real Prometheus scraping a sidecar registry in which each finding (and one retired call, one
    dropped alert push, ten emits of which one undelivered) happened exactly once: one inc() each,
    no other movement (so, after the window, an idle sidecar)."""
    telemetry = Telemetry(CollectorRegistry())
    telemetry.build_info.info({"service_version": "test"})  # present while the sidecar reports
    with scraping_prometheus(tmp_path_factory.mktemp("prometheus-one-off"), telemetry.registry) as url:
        wait_until(lambda: instant(url, 'up{job="pathwatch"} == 1'), timeout=30,
                   message="the one-off registry scraped")
        start = time.time()
        t = telemetry
        t.findings.labels("bleed.owner_vs_ambient", "critical", ENGINE, "demo.UserExecutionEngine",
                          "/ws").inc(exemplar={"trace_id": TRACE_ID})
        t.findings.labels("duplicate.execution", "warning", ENGINE, "demo.RequestScopedExecutionEngine",
                          "/ws").inc()
        t.findings.labels("deploy.regression", "warning", ENGINE, "demo.UserExecutionEngine",
                          "/ws").inc()
        t.findings.labels("delivery.missing_required_events", "warning", "", "", "/api/runs").inc()
        t.calls.labels(ENGINE, "demo.ExecutionEngine", "false", "true", "/api/runs", "false").inc()
        t.findings.labels("duplicate.retired_invoked", "warning", ENGINE, "demo.ExecutionEngine",
                          "/api/runs").inc()
        t.alerts_sent.labels("webhook", "dropped").inc()
        t.events_emitted.labels("agent_started").inc(10)  # ten emits, one of them undelivered
        t.events_undelivered.labels("agent_started", "emit_error").inc()
        t.version_runs.labels("demo-backend", "2.0.0").inc(4)  # a new version: 4 runs, 1 bleed
        t.version_findings.labels("demo-backend", "2.0.0", "bleed").inc()
        # counts the sidecar flushes in batches: each series born at its first batch's count
        t.events_written.labels("agent_started", "written").inc(9)
        t.runs_completed.labels("missing_events").inc(2)
        t.state_evictions.labels("runs", "capacity").inc(3)
        t.delivery_latency.labels("agent_started").observe(0.3)
        t.calls.labels(SUPERVISOR, "demo.Supervisor", "true", "false", "/ws", "false").inc()  # canonical
        # well past the window: the one-offs are scraped (1 s) and their window has ended
        wait_until(lambda: instant(url, f"count(pathwatch_findings_total) == 5 and on () "
                                        f"vector(time() - {start}) > {3 * ONE_OFF_WINDOW_S}"),
                   timeout=60, interval=0.5, message="the one-off findings scraped, window ended")
        yield url, start


def _range(url: str, expr: str, start: float, end: float) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query_range",
                         params={"query": expr, "start": start, "end": end, "step": 1}, timeout=10)
    body = response.json()
    assert body.get("status") == "success", (expr, body)
    return body["data"]["result"]


def _one_off_lines(url: str, start: float, dashboard: str, title: str,
                   labels: dict[str, str | None]) -> list[dict]:
    """The lines of every query of a panel, over the one-off fixture's time, whose labels match."""
    lines = []
    for panel in iter_panels(load_dashboard(dashboard)):
        for target in panel["targets"] if panel["title"] == title else ():
            rendered = render_for_prometheus(target["expr"], rate_interval=f"{ONE_OFF_WINDOW_S}s")
            lines += [s for s in _range(url, rendered, start - 5, time.time())
                      if all(s["metric"].get(k) == v for k, v in labels.items())]
    return lines


@pytest.mark.parametrize(("dashboard", "title", "labels", "count"), ONE_OFF_PANELS,
                         ids=[f"{title} {labels}" for _, title, labels, _ in ONE_OFF_PANELS])
def test_a_finding_that_happens_once_shows_on_its_panel(
        one_off_prometheus: tuple[str, float], dashboard: str, title: str,
        labels: dict[str, str | None], count: int) -> None:
    # a finding's series is born at 1 (a batched counter's at its first batch): rate() alone needs
    # two samples of it and read 0 for ever
    url, start = one_off_prometheus
    lines = _one_off_lines(url, start, dashboard, title, labels)
    assert len(lines) == 1, (title, lines)
    values = [float(v) for _, v in lines[0]["values"]]
    # N counts over a 5 s window: N/5 per second while the series is new, then 0 (no growth)
    assert max(values) == pytest.approx(count / ONE_OFF_WINDOW_S), (title, values)
    assert values[-1] == 0.0, (title, values)


def test_a_first_call_counts_in_the_share_and_the_implementations_per_entry_point(
        one_off_prometheus: tuple[str, float]) -> None:
    # the supervisor's only call (canonical) and the engine's only one (retired, at /api/runs):
    # rate() alone read no calls at all, so no share (0 / 0) and no implementation at /api/runs
    url, start = one_off_prometheus
    [share] = _one_off_lines(url, start, "pathwatch-consolidation.json", "Canonical share per role",
                             {"role": SUPERVISOR})
    assert max(float(v) for _, v in share["values"] if v != "NaN") == 1.0
    [paths] = _one_off_lines(url, start, "pathwatch-consolidation.json",
                             "Implementations per entry point", {"role": ENGINE, "entry_point": "/api/runs"})
    assert {float(v) for _, v in paths["values"]} == {1.0}


@pytest.mark.parametrize("title", ["Delivery latency", "Delivery latency p95 by event type"])
def test_an_event_types_first_delivery_shows_its_latency(
        one_off_prometheus: tuple[str, float], title: str) -> None:
    # one event written 0.3 s after its emit, its histogram series born with it: rate() alone read
    # 0 in every bucket, a quantile of NaN (no line)
    url, start = one_off_prometheus
    lines = _one_off_lines(url, start, "pathwatch-delivery.json", title, {})
    values = [float(v) for line in lines for _, v in line["values"] if v != "NaN"]
    assert values and all(0.25 <= v <= 0.5 for v in values), (title, lines)


# --- the namespace variable: two namespaces and a target without the label -------------------------

# The namespace tests read the panels with a rate interval of an hour: every call series below is
# created before Prometheus starts and never moves, so a panel's per_second() reads each as its count
# / 3600 s for the whole test, and a share is a ratio of these fixed counts (two sidecars ticking in
# threads gave rates that depended on which ticks fell into a 5 s window: 0.5 read 0.39 under load).
NAMESPACE_RATE_INTERVAL = "1h"


@pytest.fixture(scope="module")
def namespaced_prometheus(tmp_path_factory) -> Iterator[str]:
    """Three sidecar registries, as the prometheus-operator would label them: namespace "shop" (its
    engine all canonical: 3 calls), "billing" (all on a legacy engine: 1 call), and one scraped by a
    plain config (no namespace label; a supervisor role only, canonical: 2 calls). Their counts are
    set before Prometheus starts and never move."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not on PATH: run `scripts/setup.sh debian`")
    servers, scrape_configs = [], []
    for job, namespace, canonical, role, calls in (("pathwatch-shop", "shop", True, ENGINE, 3),
                                                   ("pathwatch-billing", "billing", False, ENGINE, 1),
                                                   ("pathwatch", None, True, SUPERVISOR, 2)):
        telemetry = Telemetry(CollectorRegistry())
        implementation = "demo.UserExecutionEngine" if canonical else "demo.LegacyEngine"
        telemetry.calls.labels(role, implementation, str(canonical).lower(), "false", "/ws",
                               "false").inc(calls)
        servers.append(start_http_server(0, "127.0.0.1", telemetry.registry))
        target = {"targets": [f"127.0.0.1:{servers[-1][0].server_port}"]} | ({"labels": {"namespace": namespace}}
                                                       if namespace else {})
        scrape_configs.append({"job_name": job, "static_configs": [target]})
    work = tmp_path_factory.mktemp("prometheus-namespaces")
    (work / "prometheus.yml").write_text(yaml.safe_dump(
        {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
         "scrape_configs": scrape_configs}))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    process = subprocess.Popen(
        [exe, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        # each target scraped once: every series is in, at its final count
        wait_until(lambda: len(instant(url, "up == 1")) == 3, timeout=30, message="three targets up")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
        for server, server_thread in servers:
            server.shutdown()
            server_thread.join(timeout=5)
        _print_log_on_failure(work / "prometheus.log", process.returncode)


def test_the_namespace_variable_lists_the_sidecars_namespaces(namespaced_prometheus: str) -> None:
    # what Grafana asks for label_values(pathwatch_build_info, namespace)
    variable = next(v for v in load_dashboard("pathwatch-isolation.json")["templating"]["list"]
                    if v["name"] == "namespace")
    metric = variable["query"].removeprefix("label_values(").split(",")[0]
    response = httpx.get(f"{namespaced_prometheus}/api/v1/label/namespace/values",
                         params={"match[]": metric}, timeout=10).json()
    assert response["data"] == ["billing", "shop"]


@pytest.mark.parametrize(("namespace", "expected"), [
    ("shop", {ENGINE: 1.0}),
    ("billing", {ENGINE: 0.0}),
    # Grafana's rendering of a two-value selection: 3 canonical calls of 4 (not the mean of the
    # two sidecars' shares, 0.5)
    ("shop|billing", {ENGINE: 0.75}),
    (".*", {ENGINE: 0.75, SUPERVISOR: 1.0}),  # All: the target without a namespace label too
])
def test_a_chosen_namespace_shows_only_its_sidecars_and_all_shows_every_one(
        namespaced_prometheus: str, namespace: str, expected: dict[str, float]) -> None:
    rendered = render_for_prometheus(consolidation_expr("Canonical share per role"),
                                     rate_interval=NAMESPACE_RATE_INTERVAL, namespace=namespace)
    share = {s["metric"]["role"]: float(s["value"][1]) for s in instant(namespaced_prometheus, rendered)}
    assert share == pytest.approx(expected)
    # a stat that reads 0 while a sidecar reports counts only the namespace's sidecars
    sidecars = render_for_prometheus("count(pathwatch_build_info{namespace=~\"$namespace\"})",
                                     namespace=namespace)
    count = {"shop": 1, "billing": 1, "shop|billing": 2, ".*": 3}[namespace]
    assert float(instant(namespaced_prometheus, sidecars)[0]["value"][1]) == count


def test_the_alert_pages_runbook_counts_a_push_dropped_once(
        one_off_prometheus: tuple[str, float]) -> None:
    # PathwatchAlertPagesFailing fires on it ("1 alert push(es) ... dropped"): the runbook's first
    # query, which says which sink and outcome, must count it too (increase() alone read 0)
    url, _ = one_off_prometheus
    text = (ROOT / "docs" / "runbooks" / "PathwatchAlertPagesFailing.md").read_text()
    [query] = [code for code in re.findall(r"`([^`\n]+)`", text)
               if code.startswith("sum by (sink, outcome)")]
    pushes = {(s["metric"]["sink"], s["metric"]["outcome"]): float(s["value"][1])
              for s in instant(url, query)}
    assert pushes == {("webhook", "dropped"): 1.0}


def test_the_undelivered_ratio_counts_a_first_undelivered_event_and_reads_0_when_idle(
        one_off_prometheus: tuple[str, float]) -> None:
    # 1 of 10 events undelivered, both series born within the window: 10 %, not 0; then nothing is
    # emitted for a while (rate 0 / rate 0): 0 %, not NaN (a stat's "last not null" skips NaN and
    # kept showing the last ratio of a busy moment, red, on an idle backend)
    url, start = one_off_prometheus
    expr = next(t["expr"] for p in iter_panels(load_dashboard("pathwatch-delivery.json"))
                if p["title"] == "Undelivered ratio by event type" for t in p["targets"])
    rendered = render_for_prometheus(expr, rate_interval=f"{ONE_OFF_WINDOW_S}s")
    lines = _range(url, rendered, start - 5, time.time())
    # a line per event type; before the first emit, while the sidecar reports, a 0 of no type
    assert {line["metric"].get("event_type") for line in lines} <= {"agent_started", None}, lines
    assert all(float(v) == 0.0 for line in lines if not line["metric"] for _, v in line["values"])
    [line] = [line for line in lines if line["metric"] == {"event_type": "agent_started"}]
    values = [v for _, v in line["values"]]
    assert "NaN" not in values, values
    assert max(float(v) for v in values) == pytest.approx(0.1), values
    assert float(values[-1]) == 0.0, values


def test_findings_per_run_count_a_new_versions_first_finding(
        one_off_prometheus: tuple[str, float]) -> None:
    # a new version's first runs and its one bleed, all born within the window: 1 per 4 runs, not 0
    # (rate() alone read 0 for both series: the version's bleed line stayed at 0)
    url, start = one_off_prometheus
    rendered = render_for_prometheus(consolidation_expr("Findings per run, by version"),
                                     rate_interval=f"{ONE_OFF_WINDOW_S}s")
    lines = [s for s in _range(url, rendered, start - 5, time.time())
             if s["metric"].get("service_version") == "2.0.0"]
    assert [line["metric"]["family"] for line in lines] == ["bleed"]
    assert max(float(v) for _, v in lines[0]["values"]) == pytest.approx(0.25)
