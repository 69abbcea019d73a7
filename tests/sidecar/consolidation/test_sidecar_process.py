"""The consolidation evidence across the life of a real sidecar process: killed, restarted.

Spans go in over OTLP/HTTP; what the sidecar made of them is read from its API (polled until it
shows, no sleeps); ``SIGKILL`` is what an OOM kill or a node loss does.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from contextlib import closing

import httpx
import pytest

from instrumentation import attributes as A
from sidecar.consolidation.verdicts import ledger_path_beside
from sidecar.testing import SidecarProcess
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.support import wait_until

ROLE = "execution_engine"
LEGACY = "app.engines.LegacyEngine"
CANONICAL = "app.engines.UserExecutionEngine"
RNG = random.Random(11)


def call(implementation: str, *, retired: bool = False, canonical: bool = False,
         caller: str = "app.routes.handler") -> object:
    return make_span({A.SPAN_KIND: "execute", A.ROLE: ROLE, A.IMPLEMENTATION: implementation,
                      A.CANONICAL: canonical, A.RETIRED: retired, A.ENTRY_POINT: "/ws",
                      A.CALLER: caller, A.ENDUSER_PSEUDO_ID: "u1"}, rng=RNG,
                     start_ns=time.time_ns())


def send(sidecar: SidecarProcess, spans: list, *, service: str = "backend",
         version: str = "1.0.0") -> None:
    resource = {"service.name": service, "service.version": version,
                "service.instance.id": "pod-a"}
    response = httpx.post(f"http://{sidecar.http_endpoint}/v1/traces",
                          content=make_request(spans, resource).SerializeToString(),
                          headers={"Content-Type": "application/x-protobuf"}, timeout=10)
    assert response.status_code == 200, response.text


def verdicts(sidecar: SidecarProcess) -> dict:
    return httpx.get(f"{sidecar.api_url}/api/v1/consolidation/verdicts", timeout=10).json()[
        "verdicts"]


def verdict_of(sidecar: SidecarProcess, implementation: str) -> dict | None:
    return next((row for row in verdicts(sidecar)["implementations"]
                 if row["implementation"] == implementation), None)


def ledger_metrics(sidecar: SidecarProcess) -> tuple[dict[tuple[str, str], float], str]:
    """``pathwatch_ledger_errors_total`` by (operation, cause), and the one state
    ``pathwatch_ledger_state`` says."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(sidecar.metrics()) for s in f.samples]
    errors = {(s.labels["operation"], s.labels["cause"]): s.value for s in samples
              if s.name == "pathwatch_ledger_errors_total"}
    [state] = [s.labels["state"] for s in samples
               if s.name == "pathwatch_ledger_state" and s.value == 1]
    return errors, state


def ledger_calls(sidecar: SidecarProcess, implementation: str) -> int | None:
    """The calls of ``implementation`` the sidecar's ledger file holds (what a kill cannot take)."""
    path = ledger_path_beside(sidecar.config["incidents"]["path"])
    with closing(sqlite3.connect(path, timeout=5)) as db:
        row = db.execute("SELECT total_calls FROM implementation_activity WHERE implementation = ?",
                         (implementation,)).fetchone()
    return None if row is None else row[0]


@pytest.fixture
def sidecar(tmp_path):
    process = SidecarProcess({"receiver": {"grpc_endpoint": "", "http_endpoint": "127.0.0.1:0"}},
                             state_dir=tmp_path)
    process.start(ready_timeout=30)
    yield process
    process.stop()


def test_a_sidecar_killed_right_after_a_retired_class_is_called_keeps_that_call(sidecar):
    """SIGKILL a moment after the sidecar took the call of a retired class it had not seen: the
    call was written with its batch (not 5 s later), and the restarted sidecar knows the stop was
    unclean (a span loss: nothing idle across it is deletable until re-confirmed)."""
    send(sidecar, [call(CANONICAL, canonical=True)])
    wait_until(lambda: verdict_of(sidecar, CANONICAL), message="the canonical call")
    send(sidecar, [call(LEGACY, retired=True, caller="app.old_route")])
    # the file, not the API: the verdicts show the call a moment before its batch's write commits
    wait_until(lambda: ledger_calls(sidecar, LEGACY) == 1, message="the retired call in the ledger")
    sidecar.process.send_signal(signal.SIGKILL)
    sidecar.process.wait(10)
    sidecar.start(ready_timeout=30)
    row = verdict_of(sidecar, LEGACY)
    assert row is not None and row["total_calls"] == 1 and row["last_callers"] == ["app.old_route"]
    loss = verdicts(sidecar)["span_loss"]
    assert loss is not None and loss["reason"] == "unclean_stop" and loss["from"] <= loss["to"]
    assert sidecar.stop() == 0
    sidecar.start(ready_timeout=30)  # after a clean stop: the same loss, no new one
    assert verdicts(sidecar)["span_loss"] == loss


def test_a_clean_restart_keeps_the_retired_classes_called_within_the_window(sidecar):
    """The inventory's retired_still_called is "within the last retired_window_s, not since the
    sidecar started": after a rollout (SIGTERM, start) the retired class called before it is
    still listed."""
    def retired_still_called() -> list | None:
        roles = httpx.get(f"{sidecar.api_url}/api/v1/inventory", timeout=10).json()["roles"]
        return roles[ROLE]["retired_still_called"] if ROLE in roles else None

    send(sidecar, [call(LEGACY, retired=True), call(CANONICAL, canonical=True)])
    assert wait_until(retired_still_called, message="the inventory") == [LEGACY]
    assert sidecar.stop() == 0
    sidecar.start(ready_timeout=30)
    send(sidecar, [call(CANONICAL, canonical=True)])
    assert wait_until(lambda: retired_still_called() is not None, message="the role") is True
    assert retired_still_called() == [LEGACY]


def test_a_sidecar_rolled_back_past_a_ledger_version_starts_and_leaves_that_ledger_alone(sidecar):
    """A rollback across a raise of the ledger's schema version: the older sidecar starts and
    serves (a refused start would stop bleed detection, and a native sidecar's backend with it),
    its ledger in memory only; the later release's file is not written nor moved, and the log
    says so once, naming the file and both versions."""
    import hashlib

    from sidecar import report

    send(sidecar, [call(LEGACY, retired=True), call(CANONICAL, canonical=True)])
    assert wait_until(lambda: verdict_of(sidecar, LEGACY), message="the verdict") is not None
    assert verdicts(sidecar)["ledger"]["state"] == "persisted"
    # the ledger's health on /metrics from the start: every error series at 0, its state
    assert ledger_metrics(sidecar) == ({("open", "unreadable"): 0.0, ("open", "newer_version"): 0.0,
                                        ("write", "sqlite_error"): 0.0,
                                        ("write", "newer_version"): 0.0,
                                        ("write", "other_shape"): 0.0}, "persisted")
    assert "the ledger behind these verdicts" not in report.render_consolidation(sidecar.api_url)
    assert sidecar.stop() == 0
    path = ledger_path_beside(sidecar.config["incidents"]["path"])
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 2")  # as a later release left it
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    started = time.time()
    sidecar.start(ready_timeout=30)
    assert verdict_of(sidecar, LEGACY) is None  # a fresh ledger, in memory
    # and it says so where the verdicts are read, not in a log line alone
    ledger = verdicts(sidecar)["ledger"]
    assert (ledger["state"], ledger["reason"], ledger["last_written"]) == (
        "in_memory", "newer_version", None)
    assert started <= ledger["since"] <= time.time()
    errors, state = ledger_metrics(sidecar)
    assert state == "in_memory" and errors[("open", "newer_version")] == 1.0
    assert sum(errors.values()) == 1.0
    assert ("the ledger behind these verdicts is in_memory since" in
            report.render_consolidation(sidecar.api_url))
    send(sidecar, [call(CANONICAL, canonical=True)])
    assert wait_until(lambda: verdict_of(sidecar, CANONICAL), message="the verdict") is not None
    assert sidecar.stop() == 0
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before
    left = [line for line in sidecar.log().splitlines() if "is left as it is" in line]
    assert len(left) == 1 and path in left[0] and "schema version 2, newer than this pathwatch (1)" \
        in left[0]


def test_the_last_caller_of_a_retired_class_is_on_the_migration_list(sidecar):
    """33 functions call a retired engine, then only the 33rd: the to-do list shows it (the least
    recently seen of the first 32 made room) and says one caller was dropped."""
    send(sidecar, [call(LEGACY, retired=True, caller=f"app.jobs.caller_{n}") for n in range(32)]
         + [call(CANONICAL, canonical=True)])

    def rows() -> list:
        return httpx.get(f"{sidecar.api_url}/api/v1/consolidation/callers_to_migrate",
                         timeout=10).json()["callers_to_migrate"]

    wait_until(lambda: len((rows() or [{}])[0].get("callers", [])) == 32, message="32 callers")
    send(sidecar, [call(LEGACY, retired=True, caller="app.jobs.caller_32")])
    [row] = wait_until(lambda: [r for r in rows() if r["callers_dropped"]], message="a drop")
    assert "app.jobs.caller_32" in [c["caller"] for c in row["callers"]]
    assert len(row["callers"]) == 32 and row["callers_dropped"] == 1
    overflow = httpx.get(f"{sidecar.api_url}/api/v1/consolidation/callers_overflow",
                         timeout=10).json()["callers_overflow"]
    assert overflow["max_callers"] == 32 and overflow["untracked_calls"] == 0


def test_a_backend_that_reports_dropped_spans_is_a_span_loss_for_the_verdicts(sidecar):
    """The backend's heartbeats say its SDK dropped spans: the verdicts name that loss (no class
    idle across it is safe_to_delete until a whole window is watched after it)."""
    from tests.sidecar.receiver.otlp_payloads import heartbeat_span

    send(sidecar, [call(LEGACY, retired=True), heartbeat_span(100, 0, RNG)])
    wait_until(lambda: verdict_of(sidecar, LEGACY), message="the retired call")
    assert verdicts(sidecar)["span_loss"] is None  # the first heartbeat is a baseline
    send(sidecar, [heartbeat_span(5000, 0, RNG)])
    loss = wait_until(lambda: verdicts(sidecar)["span_loss"], message="the span loss")
    assert loss["reason"] == "spans_dropped" and loss["from"] <= loss["to"]


def test_spans_a_backend_dropped_while_the_sidecar_restarted_are_a_span_loss(sidecar):
    """A clean restart within a minute leaves no gap, and the backend's exporter dropped the spans
    it could not send meanwhile (a retired class's call among them, maybe): its next heartbeat's
    total is compared with the one the sidecar saw before the stop (persisted), so the verdicts
    know of the loss; a heartbeat whose total did not rise is none."""
    from tests.sidecar.receiver.otlp_payloads import heartbeat_span

    send(sidecar, [call(LEGACY, retired=True), heartbeat_span(0, 0, RNG)])
    wait_until(lambda: verdict_of(sidecar, LEGACY), message="the retired call")
    stopped_at = time.time()
    assert sidecar.stop() == 0
    sidecar.start(ready_timeout=30)
    send(sidecar, [heartbeat_span(0, 0, RNG)], service="other")  # another instance: a baseline
    send(sidecar, [heartbeat_span(40, 0, RNG)])  # 40 spans dropped while no sidecar listened
    loss = wait_until(lambda: verdicts(sidecar)["span_loss"], message="the span loss")
    assert loss["reason"] == "spans_dropped" and loss["from"] <= stopped_at <= loss["to"]


def test_the_inventory_and_the_verdicts_agree_on_a_gone_services_canonical_class(tmp_path):
    """A gateway: service a's path map names CANONICAL canonical, b's another class, and b still
    calls CANONICAL. a stops. /api/v1/inventory dropped CANONICAL's canonical label a window after
    a's last call, while /api/v1/consolidation's verdicts kept it canonical for as long as b called
    it. Both now read the ledger's answer: canonical within the window (a restart keeps it), then
    not — in_use while b calls it, its caller in b on the migration list — before and after a
    restart."""
    window_s = 8.0
    other = "b.engines.UnifiedExecutionEngine"
    process = SidecarProcess({"receiver": {"grpc_endpoint": "", "http_endpoint": "127.0.0.1:0"},
                              "consolidation": {"safe_to_delete_window_s": window_s}},
                             state_dir=tmp_path)

    def b_calls() -> None:
        send(process, [call(other, canonical=True, caller="b.routes.run"),
                       call(CANONICAL, caller="b.routes.run")], service="b")

    def canonical_now() -> tuple[list, list]:
        """(the inventory's canonical classes, the verdicts'), b calling both first."""
        b_calls()
        roles = httpx.get(f"{process.api_url}/api/v1/inventory", timeout=10).json()["roles"]
        rows = verdicts(process)["implementations"]
        return (roles[ROLE]["canonical"] if ROLE in roles else None,
                sorted(r["implementation"] for r in rows if r["canonical"]))

    def agreed() -> tuple[list, list] | None:
        now = canonical_now()
        return now if now[0] == now[1] else None

    both = sorted([CANONICAL, other])
    with process:
        a_called_s = time.time()
        send(process, [call(CANONICAL, canonical=True, caller="a.routes.run")], service="a")
        wait_until(lambda: canonical_now() == (both, both), message="both canonical")
        assert process.stop() == 0
        process.start(ready_timeout=30)
        answer = wait_until(agreed, message="one answer after the restart")
        assert time.time() - a_called_s < window_s, "the restart took longer than the window"
        assert answer == (both, both)  # a's class, called as canonical within the window
        moved_on = wait_until(lambda: canonical_now() == ([other], [other]),
                              timeout=window_s + 20, interval=0.5, message="a's class demoted")
        assert moved_on
        assert verdict_of(process, CANONICAL)["verdict"] == "in_use"
        to_migrate = httpx.get(f"{process.api_url}/api/v1/consolidation/callers_to_migrate",
                               timeout=10).json()["callers_to_migrate"]
        assert [(r["implementation"], [c["caller"] for c in r["callers"]]) for r in to_migrate] == [
            (CANONICAL, ["b.routes.run"])]
        assert process.stop() == 0
        process.start(ready_timeout=30)
        assert wait_until(agreed, message="one answer after the second restart") == (
            [other], [other])


# --- through the instrumentation's own exporter (OTLP/gRPC), as a backend sends -------------------

@pytest.fixture
def grpc_sidecar(tmp_path):
    process = SidecarProcess({"receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""}},
                             state_dir=tmp_path)
    process.start(ready_timeout=30)
    yield process
    process.stop()


class Backend:
    """One backend process as the sidecar sees it: its own service.instance.id, pathwatch's batch
    processor and OTLP/gRPC exporter (``configure``)."""

    def __init__(self, sidecar: SidecarProcess, instance: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from instrumentation.exporting import configure

        self.provider = TracerProvider(resource=Resource(
            {"service.name": "backend", "service.version": "1.0.0",
             "service.instance.id": instance}))
        configure(sidecar.grpc_endpoint, tracer_provider=self.provider)
        self.tracer = self.provider.get_tracer("tests")

    def call(self, implementation: str, *, retired: bool = False, canonical: bool = False) -> None:
        self.tracer.start_span(f"{ROLE}.run", attributes={
            A.SPAN_KIND: "execute", A.ROLE: ROLE, A.IMPLEMENTATION: implementation,
            A.CANONICAL: canonical, A.RETIRED: retired, A.ENTRY_POINT: "/ws",
            A.CALLER: "app.routes.handler"}).end()

    def flush(self) -> None:
        assert self.provider.force_flush(10_000)

    def shutdown(self) -> None:
        self.provider.shutdown()


def test_classes_beyond_the_ledgers_bound_are_shown_as_not_tracked(grpc_sidecar):
    """515 classes of one role, the ledger holds 512: the 3 beyond it have no verdict row, and
    that is shown — verdicts.overflow in the API, pathwatch_ledger_refused_calls_total on
    /metrics, and a line of `pathwatch report --consolidation` — where it was silent."""
    from prometheus_client.parser import text_string_to_metric_families

    from sidecar import report

    backend = Backend(grpc_sidecar, "pod-a")
    try:
        backend.call(CANONICAL, canonical=True)
        for n in range(514):
            backend.call(f"app.engines.Engine{n}", retired=True)
        backend.flush()
    finally:
        backend.shutdown()
    overflow = wait_until(lambda: verdicts(grpc_sidecar)["overflow"]["untracked_calls"] == 3
                          and verdicts(grpc_sidecar)["overflow"], timeout=30,
                          message="the untracked calls in the verdicts")
    assert overflow["max_implementations"] == 512
    assert len(verdicts(grpc_sidecar)["implementations"]) == 512

    def refused_metric() -> float:
        return sum(s.value for f in text_string_to_metric_families(grpc_sidecar.metrics())
                   for s in f.samples if s.name == "pathwatch_ledger_refused_calls_total")

    wait_until(lambda: refused_metric() == 3, timeout=30, message="the metric (published on flush)")
    text = report.render_consolidation(grpc_sidecar.api_url)
    assert ("3 calls of classes beyond the ledger's 512 were not tracked since the sidecar "
            "started" in text)


def test_spans_a_restarted_backend_dropped_before_its_first_heartbeat_are_a_span_loss(grpc_sidecar):
    """A backend process restarted alone (OOM-killed) gets a new service.instance.id; its exporter
    gave up spans before its first heartbeat (a retired class's call among them, maybe). That
    heartbeat was a baseline, so the verdicts never knew; it is numbered 1 now, so its total is a
    loss from the start of its counts to it. The old process's heartbeats and those of a process
    that dropped nothing are no loss."""
    from instrumentation.exporting import DropCounter, Heartbeat

    old = Backend(grpc_sidecar, "pod-a-1")
    old_counts = DropCounter()
    Heartbeat(0, old.provider, counter=old_counts).beat()
    old.call(LEGACY, retired=True)
    Heartbeat(0, old.provider, counter=old_counts).beat()
    old.flush()
    old.shutdown()
    wait_until(lambda: verdict_of(grpc_sidecar, LEGACY), message="the retired call")
    clean = Backend(grpc_sidecar, "pod-b-1")
    Heartbeat(0, clean.provider, counter=DropCounter()).beat()
    clean.flush()
    clean.shutdown()
    new = Backend(grpc_sidecar, "pod-a-2")  # the restarted process
    counts = DropCounter()
    started_s = counts.since_s
    counts.add_failed(4)  # what its exporter gave up before the first heartbeat
    assert verdicts(grpc_sidecar)["span_loss"] is None
    Heartbeat(0, new.provider, counter=counts).beat()
    new.flush()
    new.shutdown()
    loss = wait_until(lambda: verdicts(grpc_sidecar)["span_loss"], message="the span loss")
    assert loss["reason"] == "spans_dropped" and loss["from"] == pytest.approx(started_s)
    assert loss["from"] <= loss["to"]


def test_a_backend_restarted_while_the_sidecar_was_down_is_a_span_loss(grpc_sidecar):
    """A backend restarted under the same service.instance.id (the OpenTelemetry Operator's
    namespace.pod.container survives a container restart) while the sidecar was down: its first
    heartbeat went nowhere, and the next one's total of dropped spans equals the one the last
    sidecar saved. Its number (not above the saved one) and the start of its counts say it is
    another process: its drops, all since the stop, are a loss."""
    from instrumentation.exporting import DropCounter, Heartbeat

    old = Backend(grpc_sidecar, "ns.pod-0.app")
    old_counts = DropCounter()
    old_counts.add_failed(3)
    for _ in range(2):
        Heartbeat(0, old.provider, counter=old_counts).beat()  # numbered 1 and 2, 3 dropped
    old.flush()
    old.shutdown()
    wait_until(lambda: verdicts(grpc_sidecar)["span_loss"], message="the first heartbeat's loss")
    assert grpc_sidecar.stop() == 0  # a clean stop: the ledger holds the instance's last heartbeat
    stopped_at = time.time()
    counts = DropCounter()  # the restarted process
    counts.add_failed(3)  # its exporter gave up 3 spans while no sidecar listened ...
    counts.next_report()  # ... and its first heartbeat
    grpc_sidecar.start(ready_timeout=30)
    new = Backend(grpc_sidecar, "ns.pod-0.app")
    Heartbeat(0, new.provider, counter=counts).beat()  # numbered 2, 3 dropped: as the saved one
    new.flush()
    new.shutdown()
    loss = wait_until(lambda: (verdicts(grpc_sidecar)["span_loss"] or {}).get("to", 0) > stopped_at
                      and verdicts(grpc_sidecar)["span_loss"], message="the restart's span loss")
    # a process of its own, never held: its drops are a loss from the start of its counts
    assert loss["reason"] == "spans_dropped" and loss["from"] == pytest.approx(counts.since_s, abs=1e-6)
    assert stopped_at <= loss["from"] <= loss["to"]


def test_the_drops_of_a_backend_whose_first_heartbeat_was_lost_are_a_span_loss(grpc_sidecar):
    """A new backend process (a new service.instance.id) whose first heartbeat its exporter gave
    up, with spans before it: the first heartbeat the sidecar gets is numbered 2. It had no record
    of the instance, so that one was a blind baseline; the number says earlier heartbeats went
    unseen, so its total is a loss from the start of its counts."""
    from instrumentation.exporting import DropCounter, Heartbeat

    backend = Backend(grpc_sidecar, "pod-a-2")
    counts = DropCounter()
    counts.add_failed(4)  # 3 spans and the first heartbeat, given up
    counts.next_report()  # that heartbeat was numbered 1
    Heartbeat(0, backend.provider, counter=counts).beat()  # numbered 2
    backend.call(CANONICAL, canonical=True)  # a call after it: the heartbeat is processed by then
    backend.flush()
    backend.shutdown()
    wait_until(lambda: verdict_of(grpc_sidecar, CANONICAL), message="the call after the heartbeat")
    loss = wait_until(lambda: verdicts(grpc_sidecar)["span_loss"], message="the span loss")
    assert loss["reason"] == "spans_dropped" and loss["from"] == pytest.approx(counts.since_s)


def backend_dropped_total(sidecar: SidecarProcess) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    return next((sample.value for family in text_string_to_metric_families(sidecar.metrics())
                 for sample in family.samples
                 if sample.name == "pathwatch_backend_dropped_spans_total"
                 and sample.labels.get("service_name") == "backend"), None)


def test_workers_sharing_one_instance_id_are_told_apart(grpc_sidecar, monkeypatch):
    """uvicorn --workers 2 with service.instance.id set in OTEL_RESOURCE_ATTRIBUTES (the
    OpenTelemetry Operator's <namespace>.<pod>.<container>): both workers export under that id,
    each with its own counts and heartbeat, through pathwatch's exporter. Worker B dropped 2 spans
    before its first heartbeat — one loss; their heartbeats interleave (1, 1, 2, 2, 3, 3): B's were
    a new loss after every one of A's (0 against 2), and the 2 drops counted three times. Then a
    worker restarted under the id, its first heartbeat lost, dropped 3: a loss, counted."""
    from opentelemetry.sdk.trace import TracerProvider

    from instrumentation.exporting import DropCounter, Heartbeat, build_resource, configure

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES",
                       "service.name=backend,service.version=1.0.0,service.instance.id=shop.pod-0.app")
    workers = []
    for dropped in (0, 2):
        provider = TracerProvider(resource=build_resource())
        configure(grpc_sidecar.grpc_endpoint, tracer_provider=provider)
        counts = DropCounter()
        counts.add_failed(dropped)
        workers.append((provider, counts))
    assert {p.resource.attributes["service.instance.id"] for p, _ in workers} == {"shop.pod-0.app"}

    def heartbeats_processed(provider: TracerProvider, marker: str) -> None:
        # a call sent after the heartbeats: once the sidecar shows it, they were processed too
        provider.get_tracer("tests").start_span(f"{ROLE}.run", attributes={
            A.SPAN_KIND: "execute", A.ROLE: ROLE, A.IMPLEMENTATION: marker, A.CANONICAL: True,
            A.RETIRED: False, A.ENTRY_POINT: "/ws", A.CALLER: "app.routes.handler"}).end()
        assert provider.force_flush(10_000)
        wait_until(lambda: verdict_of(grpc_sidecar, marker), timeout=30, message=marker)

    try:
        for provider, counts in workers:
            Heartbeat(0, provider, counter=counts).beat()
            assert provider.force_flush(10_000)
        first = wait_until(lambda: verdicts(grpc_sidecar)["span_loss"], message="B's loss")
        assert first["from"] == pytest.approx(workers[1][1].since_s, abs=1e-6)
        for _ in range(2):
            for provider, counts in workers:
                Heartbeat(0, provider, counter=counts).beat()
                assert provider.force_flush(10_000)
        heartbeats_processed(workers[0][0], "app.engines.AfterInterleaved")
        assert verdicts(grpc_sidecar)["span_loss"] == first
        assert backend_dropped_total(grpc_sidecar) == 2

        restarted = TracerProvider(resource=build_resource())
        configure(grpc_sidecar.grpc_endpoint, tracer_provider=restarted)
        counts = DropCounter()
        counts.add_failed(3)  # 2 spans and its first heartbeat, given up by its exporter
        counts.next_report()
        Heartbeat(0, restarted, counter=counts).beat()  # numbered 2
        assert restarted.force_flush(10_000)
        loss = wait_until(lambda: verdicts(grpc_sidecar)["span_loss"] != first
                          and verdicts(grpc_sidecar)["span_loss"], message="the restart's loss")
        assert loss["reason"] == "spans_dropped" and loss["from"] == pytest.approx(counts.since_s, abs=1e-6)
        wait_until(lambda: backend_dropped_total(grpc_sidecar) == 5, message="its drops counted")
        restarted.shutdown()
    finally:
        for provider, _ in workers:
            provider.shutdown()
