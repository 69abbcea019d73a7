"""Liveness of a real sidecar process whose pipeline thread dies or is stuck for good
(``tests/sidecar/faulty_sidecar.py`` makes it so on command), and what its shutdown says then."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from datetime import datetime

import grpc
import httpx
import jsonschema
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from prometheus_client import CollectorRegistry

from sidecar.api import openapi_document
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.liveness import Liveness
from sidecar.telemetry import Telemetry
from sidecar.testing import SidecarProcess
from sidecar.threads import WatchedThread
from tests.sidecar.faulty_sidecar import DIE, MODULE, STALL
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.support import wait_until


def faulty_sidecar(tmp_path, **api) -> SidecarProcess:
    return SidecarProcess({"receiver": {"http_endpoint": ""}, "api": api}, state_dir=tmp_path,
                          module=MODULE)


def export(sidecar: SidecarProcess, *names: str) -> None:
    channel = grpc.insecure_channel(sidecar.grpc_endpoint)
    try:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            make_request([make_span({}, name=name) for name in names]), timeout=10)
    finally:
        channel.close()


def status(sidecar: SidecarProcess, path: str) -> int:
    return httpx.get(f"{sidecar.api_url}{path}", timeout=5).status_code


def test_a_shutdown_after_the_pipeline_thread_died_with_spans_in_hand_is_no_clean_stop(tmp_path):
    """The spans the dead thread had taken were never processed: exit code 1, as for spans left in
    the queue (before: 'stopped; 0 span(s) processed' and exit code 0, the queue being empty)."""
    with faulty_sidecar(tmp_path) as sidecar:
        export(sidecar, DIE, "span")
        wait_until(lambda: status(sidecar, "/readyz") == 503, timeout=30,
                   message="the pipeline thread ended")
        assert sidecar.stop() == 1, sidecar.log()
    assert "2 span(s) unprocessed" in sidecar.log()


def healthz(sidecar: SidecarProcess) -> httpx.Response:
    return httpx.get(f"{sidecar.api_url}/healthz", timeout=5)


def failing(sidecar: SidecarProcess) -> list[dict]:
    """The failures /healthz reports now (none while it answers 200)."""
    response = healthz(sidecar)
    if response.status_code == 200:
        assert response.text == "ok\n"
        return []
    assert response.status_code == 503 and response.json()["status"] == "failing", response.text
    return response.json()["failures"]


def liveness_failures(sidecar: SidecarProcess, component: str, reason: str) -> float:
    pattern = (rf'^pathwatch_liveness_failures_total{{part="{component}",reason="{reason}"}} '
               r"(\S+)$")
    found = re.search(pattern, sidecar.metrics(), re.M)
    assert found, f"no series for {component} {reason}"
    return float(found.group(1))


def since(failure: dict) -> float:
    return datetime.fromisoformat(failure["since"].replace("Z", "+00:00")).timestamp()


def test_healthz_fails_naming_the_pipeline_once_its_thread_has_died(tmp_path):
    """Before: /healthz said ok however long the pipeline thread had been dead, so the kubelet
    never restarted a sidecar whose spans could only pile up, then be refused."""
    with faulty_sidecar(tmp_path) as sidecar:
        assert failing(sidecar) == []
        assert liveness_failures(sidecar, "pipeline", "ended") == 0
        before = time.time()
        export(sidecar, DIE)
        [failure] = wait_until(lambda: failing(sidecar), timeout=30, message="/healthz 503")
        assert {key: failure[key] for key in ("component", "thread", "reason", "error",
                                              "pending_spans")} == {
            "component": "pipeline", "thread": "pathwatch-pipeline", "reason": "ended",
            "error": "FaultKilled", "pending_spans": 1}
        assert before - 1 <= since(failure) <= time.time() and failure["for_s"] >= 0
        jsonschema.validate(healthz(sidecar).json(),  # as the API description says
                            openapi_document()["components"]["schemas"]["Liveness"])
        for _ in range(3):  # asked again: the same failure, since the same moment
            assert [f["since"] for f in failing(sidecar)] == [failure["since"]]
        assert liveness_failures(sidecar, "pipeline", "ended") == 1
        assert status(sidecar, "/readyz") == 503
        assert sidecar.stop() == 1  # the span the thread had taken was never processed
    lines = [line for line in sidecar.log().splitlines() if "liveness: pipeline" in line]
    assert len(lines) == 1, lines  # logged once, however often asked
    assert "ended at" in lines[0] and "FaultKilled" in lines[0] and "1 span(s) wait" in lines[0]


def test_healthz_fails_while_the_pipeline_is_stuck_past_the_grace_and_is_ok_once_it_goes_on(tmp_path):
    """A detector that does not return: every span behind it waits. Past api.liveness_grace_s
    /healthz fails, saying since when and how many spans wait; released, it answers ok again."""
    with faulty_sidecar(tmp_path, liveness_grace_s=1.0) as sidecar:
        export(sidecar, STALL)
        wait_until(lambda: "fault: stalling" in sidecar.log(), timeout=30, message="the stall began")
        export(sidecar, "behind it")
        [failure] = wait_until(lambda: failing(sidecar), timeout=30, message="/healthz 503")
        assert (failure["component"], failure["reason"], failure["pending_spans"]) == (
            "pipeline", "stalled", 2)
        assert failure["for_s"] >= 1.0  # not before the grace
        assert liveness_failures(sidecar, "pipeline", "stalled") == 1
        sidecar.process.send_signal(signal.SIGUSR1)  # the detector returns
        wait_until(lambda: failing(sidecar) == [], timeout=30, message="/healthz ok again")
        assert liveness_failures(sidecar, "pipeline", "stalled") == 1
        assert sidecar.stop() == 0, sidecar.log()
    log = sidecar.log()
    [stalled] = [line for line in log.splitlines() if "liveness: pipeline" in line and "ERROR" in line]
    assert "inside one step since" in stalled and "api.liveness_grace_s 1 s" in stalled
    assert "liveness: pipeline (pathwatch-pipeline) goes on again after" in log


# --- the other vital threads, in a sidecar of this process ------------------------------------------
class Crashed(BaseException):
    """Nothing in uvicorn or the alert worker catches it."""


async def crash(counter):  # noqa: ANN001 - uvicorn.Server.on_tick, called every 0.1 s
    raise Crashed("on tick")


def crash_worker():
    raise Crashed("worker")


KILLS = {
    "otlp_http": lambda app: setattr(app._http._server._server, "on_tick", crash),  # noqa: SLF001
    "otlp_grpc": lambda app: app._grpc._deadlines.stop(),  # noqa: SLF001 - a return, no error
    "alerts.webhook": lambda app: setattr(app.alerts._workers[0], "_requeue_due", crash_worker),  # noqa: SLF001
    "api": lambda app: setattr(app._api._server, "on_tick", crash),  # noqa: SLF001
}


@pytest.fixture
def app(tmp_path):
    config = parse_config({
        "receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": "127.0.0.1:0"},
        "api": {"endpoint": "127.0.0.1:0"}, "incidents": {"path": str(tmp_path / "incidents.sqlite")},
        "alerting": {"webhook_url": "http://127.0.0.1:9/hook"}})  # never posted to: no incident
    app = Sidecar(config, registry=CollectorRegistry())
    app.start()
    yield app
    app.shutdown(quiet=True)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("component", KILLS)
def test_healthz_fails_naming_any_vital_thread_that_ended(app, component, caplog):
    value = app.registry.get_sample_value
    assert app.live() == []
    assert all(value("pathwatch_liveness_failures_total", {"part": name, "reason": "ended"}) == 0
               for name in [*KILLS, "pipeline"])
    KILLS[component](app)
    with caplog.at_level(logging.ERROR, logger="pathwatch.sidecar"):
        [failure] = wait_until(app.live, message=f"{component} failing")
        app.live()
    assert (failure["component"], failure["reason"]) == (component, "ended")
    assert failure["error"] == (None if component == "otlp_grpc" else "Crashed")
    assert value("pathwatch_liveness_failures_total", {"part": component, "reason": "ended"}) == 1
    assert len([r for r in caplog.records if f"liveness: {component} " in r.getMessage()]) == 1
    if component != "api":  # a dead API answers nothing: the probe fails by itself
        response = httpx.get(f"http://{app.endpoints.api}/healthz")
        assert response.status_code == 503 and response.json()["failures"] == [
            {**failure, "for_s": response.json()["failures"][0]["for_s"]}]


def test_threads_that_end_in_the_shutdown_are_no_failure(app):
    assert app.shutdown(quiet=True) is True
    assert app.live() == []
    for name in [*KILLS, "pipeline"]:
        labels = {"part": name, "reason": "ended"}
        assert app.registry.get_sample_value("pathwatch_liveness_failures_total", labels) == 0, name


# --- the stall's grace, on a clock of the test's ----------------------------------------------------
class StuckPipeline:
    """What the liveness check reads of a pipeline: in a step for ``step_s``."""

    def __init__(self) -> None:
        self.thread = WatchedThread(target=threading.Event().wait, args=(60,), daemon=True)
        self.step_s = 0.0
        self.pending_spans = 3

    def stalled_s(self, after_s=None):  # noqa: ANN001
        return self.step_s if self.step_s >= after_s else None


def test_a_step_shorter_than_the_grace_is_alive_and_each_stall_is_counted_once(caplog):
    telemetry = Telemetry(CollectorRegistry())
    now = [1_800_000_000 * 10**9]
    liveness = Liveness(telemetry, 60.0, wall_clock_ns=lambda: now[0])
    pipeline = StuckPipeline()
    liveness.watch_pipeline(pipeline)
    stalls = lambda: telemetry.registry.get_sample_value(  # noqa: E731
        "pathwatch_liveness_failures_total", {"part": "pipeline", "reason": "stalled"})
    assert stalls() == 0
    pipeline.step_s = 59.9  # a slow moment: a collection, a commit, a large batch
    assert liveness.check() == []
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        pipeline.step_s = 60.0
        [failure] = liveness.check()
        assert failure.since_ns == now[0] - 60 * 10**9
        now[0] += 5 * 10**9
        pipeline.step_s = 65.0
        assert liveness.check() == [failure]  # the same stall: since the same moment
        assert failure.to_dict(now[0]) == {
            "component": "pipeline", "thread": pipeline.thread.name, "reason": "stalled",
            "since": "2027-01-15T07:59:00.000Z", "for_s": 65.0, "pending_spans": 3}
        pipeline.step_s = 0.1
        assert liveness.check() == []
        pipeline.step_s = 61.0
        assert len(liveness.check()) == 1  # another stall
    assert stalls() == 2
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "has been inside one step" in m]) == 2
    assert len([m for m in messages if "goes on again after 65 s" in m]) == 1


def test_a_liveness_check_that_raises_answers_ok(tmp_path):
    """A bug of the check must not have the kubelet restart a sidecar that works, in a loop."""
    from sidecar.incidents import IncidentStore
    from tests.sidecar.test_api import client

    store = IncidentStore(":memory:")
    try:
        api = client(store, Telemetry(CollectorRegistry()), live=lambda: 1 / 0)
        response = api.get("/healthz")
        assert (response.status_code, response.text) == (200, "ok\n")
    finally:
        store.close()


def test_a_stall_that_ends_with_the_pipeline_thread_is_not_logged_as_going_on(caplog):
    """The step the thread was stuck in ended it (an exception no step catches): /healthz goes on
    answering 503, and the log must not say the pipeline goes on and /healthz answers ok."""
    liveness = Liveness(Telemetry(CollectorRegistry()), 60.0)
    pipeline = StuckPipeline()
    pipeline.thread = WatchedThread(target=lambda: None, daemon=True)
    liveness.watch_pipeline(pipeline)
    pipeline.step_s = 61.0
    with caplog.at_level(logging.INFO, logger="pathwatch.sidecar"):
        [stalled] = liveness.check()
        pipeline.thread.start()
        pipeline.thread.join(10)
        pipeline.step_s = 0.0
        [ended] = liveness.check()
    assert (stalled.reason, ended.reason) == ("stalled", "ended")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "goes on again" in m or "answers ok" in m], messages
