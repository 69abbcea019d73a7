import logging

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from prometheus_client import CollectorRegistry

from instrumentation import attributes as A
from sidecar.app import FD_RESERVE, Sidecar, configure_logging, connection_caps, ensure_open_files
from sidecar.config import parse_config
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.support import wait_until


def loopback_config(tmp_path):
    """Every server on a free loopback port, the incident store in ``tmp_path``."""
    return parse_config({
        "receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": "127.0.0.1:0"},
        "api": {"endpoint": "127.0.0.1:0"},
        "incidents": {"path": str(tmp_path / "incidents.sqlite")}})


@pytest.fixture
def sidecar(tmp_path):
    config = loopback_config(tmp_path)
    app = Sidecar(config, registry=CollectorRegistry())
    app.start()
    yield app
    app.shutdown()


def test_ports_zero_resolve_to_real_listening_endpoints(sidecar):
    endpoints = sidecar.endpoints
    assert all(not e.endswith(":0") for e in (endpoints.grpc, endpoints.http, endpoints.api))
    assert httpx.get(f"http://{endpoints.api}/readyz").status_code == 200
    assert sidecar.ready()


def test_spans_over_both_protocols_reach_the_pipeline(sidecar):
    channel = grpc.insecure_channel(sidecar.endpoints.grpc)
    trace_service_pb2_grpc.TraceServiceStub(channel).Export(
        make_request([make_span({A.SPAN_KIND: "execute"})]), timeout=10)
    channel.close()
    response = httpx.post(f"http://{sidecar.endpoints.http}/v1/traces",
                          content=make_request([make_span({})]).SerializeToString(),
                          headers={"Content-Type": "application/x-protobuf"})
    assert response.status_code == 200
    wait_until(lambda: sidecar.pipeline.processed_spans == 2, message="both spans processed")


def test_the_receiver_counters_exist_at_zero_from_the_start(sidecar):
    # rate() and increase() need a sample before the first count: a refused or invalid span, or a
    # request answered 400, on a series born at its first value was invisible to them (to the
    # dashboard's panels and to PathwatchSidecarRefusingSpans, which reads these series)
    metrics = httpx.get(f"http://{sidecar.endpoints.api}/metrics").text
    value = sidecar.registry.get_sample_value
    for protocol in ("grpc", "http"):
        for outcome in ("accepted", "refused", "invalid", "replayed"):
            labels = {"protocol": protocol, "outcome": outcome}
            assert value("pathwatch_receiver_spans_total", labels) == 0, labels
    for protocol, statuses in (("grpc", ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED",
                                         "UNAVAILABLE", "CANCELLED")),
                               ("http", ("200", "400", "404", "405", "408", "413", "415", "429",
                                         "499", "503"))):
        for status in statuses:
            labels = {"protocol": protocol, "status": status}
            assert value("pathwatch_receiver_requests_total", labels) == 0, labels
    assert 'pathwatch_receiver_spans_total{outcome="refused",protocol="http"} 0.0' in metrics


def test_a_disabled_receiver_has_no_counter_series(tmp_path):
    config = parse_config({"receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""},
                           "api": {"endpoint": ""},
                           "incidents": {"path": str(tmp_path / "incidents.sqlite")}})
    app = Sidecar(config, registry=CollectorRegistry())
    app.start()
    try:
        value = app.registry.get_sample_value
        refused = "pathwatch_receiver_spans_total"
        assert value(refused, {"protocol": "grpc", "outcome": "refused"}) == 0
        assert value(refused, {"protocol": "http", "outcome": "refused"}) is None
    finally:
        app.shutdown()


def test_not_ready_once_a_receiver_stops_listening(sidecar):
    sidecar._http.stop(5)
    assert not sidecar.ready()
    assert httpx.get(f"http://{sidecar.endpoints.api}/readyz").status_code == 503


class ServerCrashed(BaseException):
    """What ends a uvicorn server's loop from inside (uvicorn catches no BaseException)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_not_ready_once_the_otlp_http_server_thread_has_ended(sidecar):
    """uvicorn's loop ended by an exception leaves ``started`` set and ``should_exit`` clear, and the
    socket bound: connections queue unanswered. Readiness read those flags alone, and a gateway
    replica whose OTLP/HTTP was dead stayed in its Service (before: ready() True)."""
    server = sidecar._http._server  # noqa: SLF001

    async def crash(counter):
        raise ServerCrashed("on tick")

    server._server.on_tick = crash  # noqa: SLF001 - uvicorn calls it every 0.1 s
    wait_until(lambda: not server.thread.is_alive(), message="the OTLP/HTTP thread ended")
    assert not sidecar.ready()
    assert httpx.get(f"http://{sidecar.endpoints.api}/readyz").status_code == 503


def test_not_ready_while_the_pipeline_is_stuck_and_ready_again_once_it_moves(sidecar, caplog):
    """A detector call that does not return (a deadlock, a runaway loop) stalls every span behind
    it: the receivers refuse them all (RESOURCE_EXHAUSTED / 429 once the budget is full), and a
    gateway replica must leave its Service so that the load balancer routes to the others (before:
    /readyz 200 however long, /tmp/s26_pipe/stuck_detector.py)."""
    import threading

    release, entered = threading.Event(), threading.Event()
    detector = sidecar.detectors[0]
    consume = detector.consume

    def stuck(spans, now_ns):
        entered.set()
        assert release.wait(60)
        return consume(spans, now_ns)

    detector.consume = stuck
    # a bound well above the pipeline's idle tick (0.1 s) even when a loaded machine delays it (the
    # test once saw 503 before anything was stuck, 2 in 100 runs, with 0.2 s)
    sidecar.pipeline.stalled_after_s = 1.0
    readyz = f"http://{sidecar.endpoints.api}/readyz"
    wait_until(lambda: httpx.get(readyz).status_code == 200, message="ready before anything is stuck")
    channel = grpc.insecure_channel(sidecar.endpoints.grpc)
    try:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            make_request([make_span({})]), timeout=10)
    finally:
        channel.close()
    try:
        assert entered.wait(10)
        with caplog.at_level(logging.WARNING, logger="pathwatch.sidecar"):
            wait_until(lambda: httpx.get(readyz).status_code == 503, message="not ready while stuck")
        assert not sidecar.ready()
        assert "pipeline" in caplog.text
    finally:
        release.set()
    wait_until(lambda: httpx.get(readyz).status_code == 200, message="ready again")
    assert sidecar.pipeline.processed_spans == 1


def test_shutdown_drains_and_stops_accepting(tmp_path):
    config = parse_config({
        "receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""},
        "api": {"endpoint": ""}, "incidents": {"path": ":memory:"}})
    app = Sidecar(config, registry=CollectorRegistry())
    endpoint = app.start().grpc
    channel = grpc.insecure_channel(endpoint)
    trace_service_pb2_grpc.TraceServiceStub(channel).Export(
        make_request([make_span({}) for _ in range(100)]), timeout=10)
    channel.close()
    assert app.ready()
    assert app.shutdown() is True
    assert app.pipeline.processed_spans == 100
    assert not app.ready()


def test_shutdown_stops_the_detectors_clock_before_the_receivers_grace(tmp_path):
    """While calls in flight finish (up to 5 s) and the queue drains, the receivers refuse new
    spans: the detectors' clock must stand still from the moment they do, or deadlines judge spans
    that can no longer come."""
    app = Sidecar(loopback_config(tmp_path), registry=CollectorRegistry())
    app.start()
    order = []
    close_intake, grpc_stop = app.pipeline.close_intake, app._grpc.stop  # noqa: SLF001
    app.pipeline.close_intake = lambda: (order.append("intake closed"), close_intake())[1]
    app._grpc.stop = lambda grace_s: (order.append("grpc stopping"), grpc_stop(grace_s))[1]  # noqa: SLF001
    assert app.shutdown(quiet=True) is True
    assert order[:2] == ["intake closed", "grpc stopping"]


def test_an_api_token_read_from_the_environment_loses_its_trailing_newline(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWATCH_API_TOKEN", "s3cret\n")  # as a secret mounted from a file reads
    config = loopback_config(tmp_path)
    app = Sidecar(config, registry=CollectorRegistry())
    app.start()
    try:
        url = f"http://{app.endpoints.api}/api/v1/incidents"
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url).status_code == 401
    finally:
        app.shutdown()


def test_metrics_need_the_token_when_the_config_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHWATCH_API_TOKEN", "s3cret")
    config = parse_config({**loopback_config(tmp_path).model_dump(),
                           "api": {"endpoint": "127.0.0.1:0", "metrics_requires_token": True}})
    app = Sidecar(config, registry=CollectorRegistry())
    app.start()
    try:
        url = f"http://{app.endpoints.api}/metrics"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        app.shutdown()


def test_a_server_that_fails_to_start_ends_the_run_with_exit_code_1_and_a_message(tmp_path, monkeypatch,
                                                                                  caplog):
    from sidecar.app import run
    from sidecar.receiver.asgi_server import ThreadedAsgiServer

    def fail(self, timeout_s=10.0):
        raise RuntimeError(f"HTTP server on {self.endpoint} failed to start: boom")

    monkeypatch.setattr(ThreadedAsgiServer, "start", fail)
    config = loopback_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        assert run(config) == 1
    assert "failed to start: boom" in caplog.text
    assert "stopped" not in caplog.text  # one message: the error (it said "stopped" twice before it)


def test_shutdown_twice_is_done_once(tmp_path, caplog):
    app = Sidecar(loopback_config(tmp_path), registry=CollectorRegistry())
    app.start()
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        assert app.shutdown() is True
        assert app.shutdown() is True
    assert caplog.text.count("pathwatch sidecar stopped") == 1


def test_logging_keeps_http_client_request_lines_out(monkeypatch):
    # httpx logs each request's full URL at INFO, and alert URLs may carry credentials
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    for name in ("httpx", "httpcore"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    configure_logging("debug")
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.WARNING


def test_retired_still_called_covers_the_window_that_decides_deletion(tmp_path):
    config = parse_config({"incidents": {"path": str(tmp_path / "i.sqlite")},
                           "consolidation": {"safe_to_delete_window_s": 3600}})
    sidecar = Sidecar(config, registry=CollectorRegistry())
    try:
        assert sidecar.inventory.snapshot()["retired_window_s"] == 3600
    finally:
        sidecar.shutdown()


def test_a_shutdown_that_leaves_spans_unprocessed_leaves_the_ledger_unclean(tmp_path, monkeypatch):
    """Spans accepted but never processed (the pipeline did not drain in time) may hold calls the
    consolidation ledger never saw: the ledger must not record a clean stop, or the next start
    counts no loss and a class whose only call was among them can become safe_to_delete."""
    import threading
    import time

    import sidecar.app as app_module
    from sidecar.consolidation import ActivityLedger, ledger_path_beside

    monkeypatch.setattr(app_module, "DRAIN_TIMEOUT_S", 0.5)
    release, entered = threading.Event(), threading.Event()

    class Stuck:
        name = "stuck"

        def consume(self, spans, now_ns):
            entered.set()
            release.wait(30)
            return []

        def tick(self, now_ns):
            return []

    config = loopback_config(tmp_path)
    app = Sidecar(config, registry=CollectorRegistry())
    app.pipeline._detectors.insert(0, Stuck())  # noqa: SLF001 (holds the pipeline thread)
    endpoints = app.start()
    try:
        with grpc.insecure_channel(endpoints.grpc) as channel:
            export = trace_service_pb2_grpc.TraceServiceStub(channel).Export
            export(make_request([make_span({A.ROLE: "engine"}, name="first")]), timeout=10)
            assert entered.wait(10)
            export(make_request([make_span({A.SPAN_KIND: "execute", A.ROLE: "engine",
                                            A.IMPLEMENTATION: "m.RetiredEngine", A.RETIRED: True})]),
                   timeout=10)
        assert app.shutdown(quiet=True) is False  # one batch left in the queue
    finally:
        release.set()
    ledger = ActivityLedger(ledger_path_beside(config.incidents.path), clock_s=time.time)
    try:
        assert ledger.span_loss is not None and ledger.span_loss[2] == "unclean_stop"
    finally:
        ledger.close()


@pytest.mark.parametrize("alerting, said", [
    ({}, "no alert sink configured (alerting.alertmanager_url, alerting.webhook_url): incidents are "
         "stored and counted, nobody is paged"),
    ({"alertmanager_url": "http://user:pw@am-0:9093", "alertmanager_peers": ["http://am-1:9093"],
      "webhook_url": "https://hooks.example/services/T0/B0/SECRET"},
     "critical incidents are pushed to Alertmanager http://am-0:9093, Alertmanager http://am-1:9093, "
     "webhook https://hooks.example/…"),
])
def test_the_start_log_says_where_pages_go_or_that_none_are_pushed(tmp_path, caplog, alerting, said):
    config = loopback_config(tmp_path).model_copy(update={"alerting": parse_config(
        {"alerting": alerting}).alerting})
    app = Sidecar(config, registry=CollectorRegistry())
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        app.start()
        app.shutdown()
    assert caplog.text.count(said) == 1
    assert "pw@" not in caplog.text and "SECRET" not in caplog.text


class FakeLimits:
    """resource.getrlimit/setrlimit of RLIMIT_NOFILE, starting at (soft, hard).

    A stand-in because the real limits cannot be set as these cases need: an unprivileged process
    cannot raise its hard limit again once lowered, nor be refused at will, and lowering the soft
    one would limit the whole pytest process (test_connection_limits.py runs the real ones)."""

    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse

    def install(self, monkeypatch):
        import resource

        monkeypatch.setattr(resource, "getrlimit", lambda which: self.limits)

        def setrlimit(which, limits):
            assert which == resource.RLIMIT_NOFILE
            if self.refuse:
                raise ValueError("not allowed to raise maximum limit")
            self.limits = limits

        monkeypatch.setattr(resource, "setrlimit", setrlimit)
        return self


def caps_config(**sections):
    return parse_config({"receiver": {"grpc_max_connections": 1000, "http_max_connections": 500},
                         "api": {"max_connections": 100}, **sections})


NEEDED = 1000 + 500 + 100 + FD_RESERVE


def test_the_open_files_limit_is_raised_to_what_the_caps_need_at_most_the_hard_limit(monkeypatch,
                                                                                     caplog):
    limits = FakeLimits(1024, 1_000_000).install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        assert ensure_open_files(caps_config()) == NEEDED
    assert limits.limits == (NEEDED, 1_000_000)  # the hard limit kept
    assert f"raised from 1024 to {NEEDED}" in caplog.text and "WARNING" not in caplog.text


def test_an_open_files_limit_high_enough_is_left_alone(monkeypatch, caplog):
    import resource

    for soft, hard in [(NEEDED, NEEDED), (50_000, 50_000), (resource.RLIM_INFINITY, resource.RLIM_INFINITY)]:
        limits = FakeLimits(soft, hard).install(monkeypatch)
        with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
            assert ensure_open_files(caps_config()) == soft
        assert limits.limits == (soft, hard) and caplog.text == ""


def test_a_hard_limit_below_the_caps_is_a_warning_naming_the_keys_not_a_refusal(monkeypatch, caplog):
    """The default caps (2,304) need more than a hard limit of 1024 allows, and one backend's sidecar
    needs a handful of connections: refusing to start would break such hosts for nothing."""
    limits = FakeLimits(512, 1024).install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        assert ensure_open_files(caps_config()) == 1024
    assert limits.limits == (1024, 1024)  # as far as it goes
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    for said in ("receiver.grpc_max_connections=1000", "receiver.http_max_connections=500",
                 "api.max_connections=100", f"need {NEEDED} open files", "may open 1024",
                 "hard limit 1024", "ulimit -n"):
        assert said in warning[0].getMessage(), said


def test_a_limit_that_cannot_be_raised_is_a_warning(monkeypatch, caplog):
    import resource

    FakeLimits(1024, resource.RLIM_INFINITY, refuse=True).install(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        assert ensure_open_files(caps_config()) == 1024
    assert "cannot raise the open files limit from 1024" in caplog.text
    assert "hard limit unlimited" in caplog.text


def test_a_disabled_server_needs_no_descriptors(monkeypatch):
    limits = FakeLimits(100, 1_000_000).install(monkeypatch)
    config = caps_config(receiver={"grpc_endpoint": "", "http_max_connections": 500},
                         api={"endpoint": "", "max_connections": 100})
    assert connection_caps(config) == {"receiver.http_max_connections": 500}
    assert ensure_open_files(config) == 500 + FD_RESERVE
    assert limits.limits[0] == 500 + FD_RESERVE


def test_the_sidecar_checks_the_open_files_limit_when_it_starts(tmp_path, monkeypatch):
    limits = FakeLimits(64, 1_000_000).install(monkeypatch)
    app = Sidecar(loopback_config(tmp_path), registry=CollectorRegistry())
    try:
        app.start()
    finally:
        app.shutdown()
    assert limits.limits[0] == 1024 + 1024 + 256 + FD_RESERVE  # the default caps


def test_a_restart_does_not_page_the_unpaged_incidents_of_a_rule_switched_off(tmp_path):
    # a rule paging false positives is switched off (rules.disabled) and the sidecar restarted: its
    # incidents whose pages were still waiting (rate limit, a sink down, cut by the shutdown) were
    # all paged by the start's resume, the very pages the operator turned it off to stop
    import time

    from sidecar.incidents import IncidentStore
    from sidecar.rules import BLEED_OWNER_VS_AMBIENT, BLEED_SHARED_INSTANCE
    from tests.sidecar.alerting.servers import Collector
    from tests.sidecar.incidents.findings import bleed

    path = str(tmp_path / "incidents.sqlite")
    store = IncidentStore(path)
    now_s = time.time() - 1_764_160_000  # bleed()'s at_s: seconds after its BASE_NS
    recorded = store.record([bleed("t1", at_s=now_s, rule=BLEED_OWNER_VS_AMBIENT),
                             bleed("t2", at_s=now_s, rule=BLEED_SHARED_INSTANCE)])
    by_rule = {incident.rule: incident.id for incident, _ in recorded}
    assert store.close()
    with Collector() as webhook:
        config = parse_config({
            "receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""},
            "api": {"endpoint": ""}, "incidents": {"path": path},
            "rules": {"disabled": [BLEED_SHARED_INSTANCE]},
            "alerting": {"webhook_url": webhook.url}})
        app = Sidecar(config, registry=CollectorRegistry())
        app.start()
        try:
            wait_until(lambda: app.store.is_alerted(by_rule[BLEED_OWNER_VS_AMBIENT]),
                       message="the rule still on is paged at start")
        finally:
            assert app.shutdown()
        assert [body["incident"]["id"] for body in webhook.received()] == [
            by_rule[BLEED_OWNER_VS_AMBIENT]]


def test_a_socks_proxy_in_the_environment_does_not_keep_a_sidecar_without_alert_sinks_from_starting(
        tmp_path, monkeypatch):
    # httpx reads the proxy variables when its client is made and refuses a SOCKS proxy without the
    # socksio package: the alert dispatcher made its client whatever the sinks, so a sidecar that
    # pushes no alert exited 1 ("cannot start: Using SOCKS proxy, but the 'socksio' package ...")
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    app = Sidecar(loopback_config(tmp_path), registry=CollectorRegistry())
    app.start()
    assert app.shutdown()
