import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from instrumentation import attributes as A
from sidecar.cli import main
from sidecar.incidents import IncidentStore
from tests.sidecar.incidents.test_store import _damaged_index
from tests.sidecar.receiver.harness import ROOT, SidecarProcess
from tests.sidecar.receiver.otlp_payloads import make_request, run_spans
from tests.support import wait_until


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("text, key", [
    ("receiver:\n  max_pending_span: 3\n", "receiver.max_pending_span"),
    ("receiver:\n  grpc_endpoint: nowhere\n", "receiver.grpc_endpoint"),
    ("rules:\n  disabled: [bleed.nope]\n", "rules.disabled"),
    ("alerting:\n  min_severity: loud\n", "alerting.min_severity"),
    # YAML's safe loader keeps the last of two equal keys: the first section was dropped unseen
    ("alerting:\n  alertmanager_url: http://127.0.0.1:9093\nalerting:\n  min_severity: info\n",
     "line 3: alerting is given twice (first on line 1)"),
    ("receiver:\n  max_message_bytes: yes\n", "receiver.max_message_bytes"),  # not 1
    # these failed only to bind, with exit code 1
    ("receiver:\n  http_endpoint: http://127.0.0.1:14318\n", "receiver.http_endpoint: "
     "expected HOST:PORT, not a URL"),
    ("receiver:\n  grpc_endpoint: '[::1:14317'\n", "receiver.grpc_endpoint: expected "
     "HOST:PORT, got '[::1:14317'"),
    ("receiver:\n  http_endpoint: ' 127.0.0.1:14318'\n", "receiver.http_endpoint: "
     "expected HOST:PORT, got ' 127.0.0.1:14318'"),
    ("api:\n  token_env: ''\n", "api.token_env"),
    ("logging:\n  format: xml\n", "logging.format"),
    ("rules:\n  export_retry_window_s: 3600\n", "rules.export_retry_window_s: Input should be less "
     "than or equal to 300"),
    ("rules:\n  export_retry_window_s: 30s\n", "rules.export_retry_window_s: Input should be a valid number"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, text, key):
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert key in result.stderr and "sidecar.yaml" in result.stderr


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["sidecar", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read" in capsys.readouterr().err


def test_an_empty_config_path_exits_2_naming_config_instead_of_running_on_defaults():
    # `--config "$CONFIG"` with CONFIG unset: the sidecar started on every default, unseen
    result = run_cli("sidecar", "--config", "", timeout=30)
    assert result.returncode == 2
    assert "--config is empty" in result.stderr and "listening" not in result.stderr


def test_public_api_without_token_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PATHWATCH_API_TOKEN", raising=False)
    path = tmp_path / "sidecar.yaml"
    path.write_text("receiver:\n  grpc_endpoint: ''\n  http_endpoint: ''\n"
                    "api:\n  endpoint: 0.0.0.0:0\nincidents:\n  path: ':memory:'\n")
    assert main(["sidecar", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "api.endpoint" in error and str(path) in error  # the file and the key


def test_a_token_no_client_could_send_exits_2_without_quoting_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATHWATCH_API_TOKEN", "clé-secrète")  # the header is read as latin-1
    path = tmp_path / "sidecar.yaml"
    path.write_text("receiver:\n  grpc_endpoint: ''\n  http_endpoint: ''\n"
                    "incidents:\n  path: ':memory:'\n")
    assert main(["sidecar", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "printable ASCII" in error and "secrète" not in error


def test_a_bad_webhook_url_exits_2_without_quoting_it(tmp_path, capsys):
    path = tmp_path / "sidecar.yaml"  # typed without its scheme: the path is the webhook's secret
    path.write_text("alerting:\n  webhook_url: hooks.slack.com/services/T000/B000/XXXXSECRETXXXX\n")
    assert main(["sidecar", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "alerting.webhook_url" in error and str(path) in error
    assert "XXXXSECRETXXXX" not in error


@pytest.mark.parametrize("value, problem", [
    (None, "PW_TEST_WEBHOOK is not set"),
    ("", "PW_TEST_WEBHOOK is empty"),
    ("hooks.slack.com/services/T000/B000/XXXXSECRETXXXX", "PW_TEST_WEBHOOK: expected http(s)://"),
])
def test_a_webhook_url_env_without_a_usable_url_exits_2_naming_the_variable(tmp_path, capsys, monkeypatch,
                                                                            value, problem):
    if value is None:
        monkeypatch.delenv("PW_TEST_WEBHOOK", raising=False)
    else:
        monkeypatch.setenv("PW_TEST_WEBHOOK", value)
    path = tmp_path / "sidecar.yaml"
    path.write_text("receiver:\n  grpc_endpoint: ''\n  http_endpoint: ''\napi:\n  endpoint: ''\n"
                    f"incidents:\n  path: {tmp_path / 'incidents.sqlite'}\n"
                    "alerting:\n  webhook_url_env: PW_TEST_WEBHOOK\n")
    assert main(["sidecar", "--config", str(path)]) == 2  # not a sidecar that pages nobody
    error = capsys.readouterr().err
    assert "alerting.webhook_url_env" in error and problem in error and str(path) in error
    assert "XXXXSECRETXXXX" not in error
    assert not (tmp_path / "incidents.sqlite").exists()  # refused before anything was opened


def test_a_webhook_url_written_in_place_of_its_variable_s_name_exits_2_without_quoting_it(tmp_path, capsys):
    path = tmp_path / "sidecar.yaml"
    path.write_text("receiver:\n  grpc_endpoint: ''\n  http_endpoint: ''\napi:\n  endpoint: ''\n"
                    f"incidents:\n  path: {tmp_path / 'incidents.sqlite'}\n"
                    "alerting:\n  webhook_url_env: https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX\n")
    assert main(["sidecar", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "alerting.webhook_url_env" in error and "not shown here" in error and "is not set" in error
    assert "XXXXSECRETXXXX" not in error


def test_alertmanager_credentials_whose_variable_is_unset_exit_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PW_TEST_AM_PASSWORD", raising=False)
    path = tmp_path / "sidecar.yaml"
    path.write_text("receiver:\n  grpc_endpoint: ''\n  http_endpoint: ''\napi:\n  endpoint: ''\n"
                    f"incidents:\n  path: {tmp_path / 'incidents.sqlite'}\n"
                    "alerting:\n  alertmanager_url: http://127.0.0.1:9093\n"
                    "  alertmanager_username: pathwatch\n  alertmanager_password_env: PW_TEST_AM_PASSWORD\n")
    assert main(["sidecar", "--config", str(path)]) == 2  # Alertmanager would answer 401 to each page
    error = capsys.readouterr().err
    assert "alerting.alertmanager_password_env" in error and "PW_TEST_AM_PASSWORD is not set" in error
    assert not (tmp_path / "incidents.sqlite").exists()  # refused before anything was opened


def test_console_script_reports_config_errors(tmp_path):
    script = Path(sys.executable).parent / "pathwatch"
    if not script.exists():  # a failure, not a skip: make test installs the package (pip install -e)
        pytest.fail("the pathwatch console script is not installed in this environment: "
                    "pip install -e '.[sidecar,test]'")
    path = tmp_path / "sidecar.yaml"
    path.write_text("logging:\n  level: chatty\n")
    result = subprocess.run([str(script), "sidecar", "--config", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "logging.level" in result.stderr


def test_taken_port_exits_1_naming_the_setting(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "sidecar.yaml"
        path.write_text(f"receiver:\n  grpc_endpoint: ''\n  http_endpoint: 127.0.0.1:{port}\n"
                        "api:\n  endpoint: ''\nincidents:\n  path: ':memory:'\n")
        result = run_cli("--config", str(path))
    assert result.returncode == 1
    assert "receiver.http_endpoint" in result.stderr


def test_endpoints_file_names_where_each_server_listens_port_0_resolved_as_the_log_does(tmp_path):
    # a harness (sidecar.testing.SidecarProcess) lets the sidecar bind port 0 and reads the ports
    # it got from here, instead of choosing ports the suite's connections could take first
    with SidecarProcess(tmp_path, receiver={"grpc_endpoint": "127.0.0.1:0",
                                            "http_endpoint": "127.0.0.1:0"}) as sidecar:
        written = json.loads(sidecar.endpoints_path.read_text())
        log = sidecar.log()
    ports = {setting: int(endpoint.rpartition(":")[2]) for setting, endpoint in written.items()}
    assert written == {setting: f"127.0.0.1:{port}" for setting, port in ports.items()}
    assert sorted(written) == ["api.endpoint", "receiver.grpc_endpoint", "receiver.http_endpoint"]
    assert 0 not in ports.values() and len(set(ports.values())) == 3
    for what, setting in (("OTLP/gRPC", "receiver.grpc_endpoint"),
                          ("OTLP/HTTP", "receiver.http_endpoint"), ("HTTP API", "api.endpoint")):
        assert f"{what} listening on {written[setting]}" in log


def test_a_disabled_server_is_empty_in_the_endpoints_file(tmp_path):
    with SidecarProcess(tmp_path, receiver={"grpc_endpoint": "",
                                            "http_endpoint": "127.0.0.1:0"}) as sidecar:
        written = json.loads(sidecar.endpoints_path.read_text())
    assert written["receiver.grpc_endpoint"] == ""
    assert written["receiver.http_endpoint"] == sidecar.http_endpoint


def test_an_endpoints_file_that_cannot_be_written_exits_1_naming_it(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("receiver:\n  grpc_endpoint: ''\n  http_endpoint: 127.0.0.1:0\n"
                    "api:\n  endpoint: ''\nincidents:\n  path: ':memory:'\n")
    nowhere = tmp_path / "no-such-dir" / "endpoints.json"
    result = run_cli("--config", str(path), "--endpoints-file", str(nowhere))
    assert result.returncode == 1, result.stderr
    assert f"cannot write --endpoints-file {nowhere}: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("no-such-dir*"))
    result = run_cli("--config", str(path), "--endpoints-file", "", timeout=30)
    assert result.returncode == 2 and "--endpoints-file is empty" in result.stderr
    assert "listening" not in result.stderr


def test_a_damaged_index_in_the_incident_database_exits_1_naming_the_path_and_what_to_do(tmp_path):
    """The table reads fine, one index page does not: refused at start, not a 500 at every
    GET /api/v1/incidents afterwards."""
    store_path = tmp_path / "incidents.sqlite"
    _damaged_index(str(store_path))
    sidecar = SidecarProcess(tmp_path, incidents_path=str(store_path)).start()
    try:
        assert sidecar.process.wait(30) == 1, sidecar.log()
    finally:
        sidecar.stop()
    log = sidecar.log()
    assert (f"cannot start: incidents.path {str(store_path)!r}: cannot read the incident database: "
            "the integrity check failed: ") in log
    assert "move it (with its -wal and -shm files) aside" in log and "Traceback" not in log


def sdk_spans_with_bleed():
    """Spans from the real SDK: a request by user A whose engine was built for user B."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "backend"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("pathwatch")
    with tracer.start_as_current_span("/api/runs", attributes={
            A.SPAN_KIND: "request", A.ENDUSER_PSEUDO_ID: "a" * 32, A.ENTRY_POINT: "/api/runs"}):
        with tracer.start_as_current_span("execution_engine.execute_agent", attributes={
                A.SPAN_KIND: "execute", A.ROLE: "execution_engine",
                A.IMPLEMENTATION: "app.engines.UserExecutionEngine", A.CANONICAL: True,
                A.USER_SCOPED: True, A.USER_OWNER: "b" * 32, A.ENDUSER_PSEUDO_ID: "a" * 32,
                A.ENTRY_POINT: "/api/runs", A.RUN_ID: "run-1"}):
            pass
    return memory.get_finished_spans()


def test_sidecar_process_end_to_end_with_the_official_exporter(tmp_path):
    with SidecarProcess(tmp_path) as sidecar:
        log = sidecar.log()
        for what, port in (("OTLP/gRPC", sidecar.grpc_port), ("OTLP/HTTP", sidecar.http_port),
                           ("HTTP API", sidecar.api_port)):
            assert sum(f"{what} listening on 127.0.0.1:{port}" in line
                       for line in log.splitlines()) == 1
        exporter = OTLPSpanExporter(endpoint=sidecar.grpc_endpoint, insecure=True)
        assert exporter.export(sdk_spans_with_bleed()) is SpanExportResult.SUCCESS
        exporter.shutdown()
        wait_until(lambda: sidecar.metric("pathwatch_findings_total",
                                          rule="bleed.owner_vs_ambient") >= 1,
                   message="the bleed finding on /metrics")
        assert sidecar.metric("pathwatch_receiver_spans_total", protocol="grpc",
                              outcome="accepted") == 2
        # the run executed and emitted none of the required events: judged run_idle_s (1 s) after
        # its last span, a delivery.missing_required_events beside the bleed (read at once, the
        # incidents were the bleed alone, for a second)
        wait_until(lambda: sidecar.metric("pathwatch_runs_completed_total", outcome="missing_events") == 1,
                   message="the run judged")

        def rules() -> list[str]:
            incidents = httpx.get(f"{sidecar.api_url}/api/v1/incidents").json()["incidents"]
            return sorted(i["rule"] for i in incidents)

        wait_until(lambda: rules() == ["bleed.owner_vs_ambient", "delivery.missing_required_events"],
                   message="the bleed and the run's missing events as incidents")
        report = subprocess.run([sys.executable, "-c", "import sys; from sidecar.cli import main; "
                                 "sys.exit(main(sys.argv[1:]))", "report", "--api", sidecar.api_url],
                                cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert report.returncode == 0, report.stderr
        assert "bleed.owner_vs_ambient" in report.stdout
        assert sidecar.stop() == 0
    assert "SIGTERM received" in sidecar.log()


def test_sigterm_drains_every_accepted_span(tmp_path):
    store_path = tmp_path / "incidents.sqlite"
    rng = random.Random(9)
    runs = 1500  # a backlog the pipeline needs a moment for, so SIGTERM finds it queued
    spans = [s for i in range(runs) for s in run_spans(i, rng, bleed=(i == runs - 1))]
    requests = [make_request(spans[i:i + 2000]) for i in range(0, len(spans), 2000)]
    with SidecarProcess(tmp_path, incidents_path=str(store_path)) as sidecar:
        channel = grpc.insecure_channel(sidecar.grpc_endpoint)
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        for request in requests:
            stub.Export(request, timeout=60)
        channel.close()
        assert sidecar.stop() == 0, sidecar.log()
    assert f"stopped; {len(spans)} span(s) processed" in sidecar.log()
    store = IncidentStore(str(store_path))
    try:
        rules = [incident.rule for incident in store.list_incidents()]
    finally:
        store.close()
    assert "bleed.owner_vs_ambient" in rules  # seeded in the very last run sent


# another process (a sqlite3 shell, a backup) holds the database's write lock until its stdin closes
HOLD_WRITE_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
"""


def test_incidents_the_store_cannot_write_at_shutdown_are_an_error_and_exit_code_1(tmp_path):
    store_path = tmp_path / "incidents.sqlite"
    with SidecarProcess(tmp_path, incidents_path=str(store_path)) as sidecar:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(store_path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "locked\n"
            exporter = OTLPSpanExporter(endpoint=sidecar.grpc_endpoint, insecure=True)
            assert exporter.export(sdk_spans_with_bleed()) is SpanExportResult.SUCCESS
            exporter.shutdown()
            wait_until(lambda: sidecar.metric("pathwatch_incident_store_errors_total") >= 1,
                       timeout=30, message="the incident's write failed")
            # still locked at SIGTERM: the last write fails too, and that is no clean stop
            assert sidecar.stop() == 1, sidecar.log()
        finally:
            holder.stdin.close()
            holder.wait(10)
    log = sidecar.log()
    assert re.search(r"ERROR sidecar\.incidents\.store: incident store: the last write, at shutdown, "
                     r"failed \(database is locked\): [1-9][0-9]* incident\(s\) and 0 deletion\(s\) "
                     rf"not written to incidents\.path {re.escape(repr(str(store_path)))} are lost",
                     log), log
    store = IncidentStore(str(store_path))
    try:
        assert store.list_incidents() == []  # lost, as the log says
    finally:
        store.close()


@pytest.mark.parametrize("command", [["report"], ["sidecar"]])
def test_without_the_sidecar_extra_the_command_says_what_to_install(command):
    """``pip install pathwatch`` (the backend's part) has no httpx: the sidecar commands say to
    install the extra instead of ending in a traceback; discover needs nothing more."""
    code = ("import sys; sys.modules['httpx'] = None; sys.modules['prometheus_client'] = None\n"
            "from sidecar.cli import main\n"
            f"sys.exit(main({command!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "pip install 'pathwatch[sidecar]'" in done.stderr and "Traceback" not in done.stderr


def test_every_module_of_the_sidecar_extra_gets_the_install_hint_when_missing():
    """A module of the sidecar extra missing (an environment installed before it was added) must
    give the one-line install hint and exit 2, not a traceback and exit 1: the CLI knows each
    extra's import names."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    from sidecar.cli import _SIDECAR_EXTRA_MODULES

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    modules_of: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(distribution.lower().replace("_", "-"), set()).add(module)
    extra = [Requirement(text).name.lower() for text in
             pyproject["project"]["optional-dependencies"]["sidecar"]]
    assert extra
    uncovered = {name: sorted(modules_of.get(name, ())) for name in extra
                 if not modules_of.get(name, set()) & _SIDECAR_EXTRA_MODULES}
    assert uncovered == {}


def _shutting_down_on_a_page_that_never_answers(tmp_path, hook, first):
    """A sidecar whose shutdown waits on the alert flush (a page in flight to ``hook``, a webhook that
    never answers: 5 s), sent ``first``; returns it once the log says it is shutting down."""
    import signal
    import time

    from sidecar.testing import SidecarProcess as Process
    from tests.sidecar.incidents.findings import BASE_NS, bleed

    store_path = str(tmp_path / "incidents.sqlite")
    store = IncidentStore(store_path)
    store.record([bleed("t1", at_s=time.time() - BASE_NS / 1e9)])  # unpaged: the start pages it
    assert store.close()
    sidecar = Process({"incidents": {"path": store_path}, "alerting": {"webhook_url": hook.url}},
                      state_dir=tmp_path).start(ready_timeout=30)
    assert hook.requested.wait(30), sidecar.log()  # the page is posted; no answer ever comes
    sidecar.process.send_signal(getattr(signal, first))
    wait_until(lambda: f"{first} received, shutting down" in sidecar.log(), timeout=30,
               message="the shutdown began")
    return sidecar


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_the_same_signal_again_during_the_shutdown_exits_at_once_saying_what_was_cut(tmp_path, name):
    # a second Ctrl-C during the drain was only logged: the operator had to wait it out or kill -9
    import signal

    from tests.sidecar.alerting.servers import BlackHole

    with BlackHole() as hook:
        sidecar = _shutting_down_on_a_page_that_never_answers(tmp_path, hook, name)
        try:
            sidecar.process.send_signal(getattr(signal, name))
            code = sidecar.process.wait(30)
        finally:
            sidecar.stop()
    assert code == 128 + getattr(signal, name), sidecar.log()
    assert re.search(rf"{name} received again: exiting at once, the shutdown cut short", sidecar.log())
    assert "pathwatch sidecar stopped" not in sidecar.log()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="fills the pipe through /proc")
def test_the_same_signal_again_exits_at_once_when_its_log_cannot_be_written(tmp_path):
    """/tmp/s27_rev/repro_exit_at_once_blocked_log.py: the sidecar's output is a pipe nobody reads
    any more (a terminal scroll-locked with Ctrl-S, a stalled log shipper). The second Ctrl-C's line
    blocked its handler, and the process ran on: the way out of a stuck shutdown was kill -9."""
    import select
    import signal
    import threading
    import time

    from sidecar.testing import SOURCE_ROOT
    from sidecar.testing import SidecarProcess as Process
    from tests.sidecar.alerting.servers import BlackHole
    from tests.sidecar.incidents.findings import BASE_NS, bleed

    store_path = str(tmp_path / "incidents.sqlite")
    store = IncidentStore(store_path)
    store.record([bleed("t1", at_s=time.time() - BASE_NS / 1e9)])  # unpaged: the start pages it
    assert store.close()
    read_end, write_end = os.pipe()
    # a file description of the test's own: O_NONBLOCK on the child's would fail its writes instead
    filler = os.open(f"/proc/self/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK)
    output, pumping = bytearray(), threading.Event()

    def pump() -> None:
        while pumping.is_set():
            if select.select([read_end], [], [], 0.05)[0]:
                output.extend(os.read(read_end, 65536))

    pumping.set()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = None
    with BlackHole() as hook:
        sidecar = Process({"incidents": {"path": store_path}, "alerting": {"webhook_url": hook.url}},
                          state_dir=tmp_path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))}
        sidecar.process = subprocess.Popen(sidecar._command, cwd=tmp_path, env=env,  # noqa: SLF001
                                           stdout=write_end, stderr=write_end)
        os.close(write_end)
        try:
            sidecar.wait_ready(30)
            assert hook.requested.wait(30), output.decode(errors="replace")
            sidecar.process.send_signal(signal.SIGINT)  # the shutdown waits on the page
            wait_until(lambda: b"SIGINT received, shutting down" in output, timeout=30,
                       message="the shutdown began")
            pumping.clear()
            reader.join()
            for size in (4096, 1):  # full to the last byte: a short line fits in less than a page
                try:
                    while True:
                        os.write(filler, b"x" * size)
                except BlockingIOError:
                    pass
            sidecar.process.send_signal(signal.SIGINT)
            try:
                code = sidecar.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        finally:
            if sidecar.process.poll() is None:
                sidecar.process.kill()
                sidecar.process.wait(30)
            os.close(filler)
            os.close(read_end)
    assert code == 128 + signal.SIGINT


def test_another_signal_during_the_shutdown_lets_the_drain_finish(tmp_path):
    # Ctrl-C in a terminal signals the whole process group, and a parent that stops its sidecar
    # (examples/demo.py) then sends it SIGTERM: that must not cut the drain
    import signal

    from tests.sidecar.alerting.servers import BlackHole

    with BlackHole() as hook:
        sidecar = _shutting_down_on_a_page_that_never_answers(tmp_path, hook, "SIGINT")
        try:
            sidecar.process.send_signal(signal.SIGTERM)
            code = sidecar.process.wait(60)
        finally:
            sidecar.stop()
    assert code == 0, sidecar.log()
    assert "SIGTERM received while shutting down on SIGINT" in sidecar.log()
    assert "pathwatch sidecar stopped" in sidecar.log()


def _writer_of(fifo: Path) -> int | None:
    """The FIFO's write end once a reader has it open (None before: ENXIO)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_before_the_sidecar_set_its_handlers_is_a_clean_stop(tmp_path, name):
    """/tmp/s34_configreview/early.py: SIGTERM in the first half second (the imports, the config
    being read: a pod deleted as it starts) ended the process by the signal (-15, which a shell
    shows as 143, the documented "cut short by the same signal again"), SIGINT with a
    KeyboardInterrupt traceback. The config is a FIFO here, so that the signal comes while the
    process is reading it, before the sidecar's own handlers: it is held and acted on once they are
    set, a stop like any other (exit code 0)."""
    import signal

    from sidecar.testing import SidecarProcess as Process

    sidecar = Process({}, state_dir=tmp_path)
    sidecar.config_path.unlink()
    os.mkfifo(sidecar.config_path)
    sidecar.start()
    writer = None
    try:
        writer = wait_until(lambda: _writer_of(sidecar.config_path), timeout=60,
                            message="the sidecar reading its config")
        sidecar.process.send_signal(getattr(signal, name))
        os.set_blocking(writer, True)
        try:
            os.write(writer, yaml.safe_dump(sidecar.config).encode())
        except BrokenPipeError:  # the process has ended (by the signal): the code below says so
            pass
        os.close(writer)
        writer = None
        code = sidecar.process.wait(60)
    finally:
        if writer is not None:
            os.close(writer)
        sidecar.stop(10)
    log = sidecar.log()
    assert code == 0, log
    assert f"{name} received while starting: it stops once started" in log
    assert f"{name} received, shutting down" in log and "Traceback" not in log
    assert "pathwatch sidecar stopped; 0 span(s) processed" in log


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_the_same_signal_twice_before_the_sidecar_set_its_handlers_exits_at_once(tmp_path, name):
    """A stop signal held while the config is read (above) must not make a config that never comes
    (`--config /dev/stdin`, a FIFO, a hung mount) unstoppable: the same signal again exits at once,
    128 + its number, as during the shutdown (nothing is open yet)."""
    import signal

    from sidecar.testing import SidecarProcess as Process

    sidecar = Process({}, state_dir=tmp_path)
    sidecar.config_path.unlink()
    os.mkfifo(sidecar.config_path)
    sidecar.start()
    writer = None
    try:
        writer = wait_until(lambda: _writer_of(sidecar.config_path), timeout=60,
                            message="the sidecar reading its config")
        def held() -> bool:
            if f"{name} received while starting" in sidecar.log():
                return True
            # one that comes as the process enters read() (past Python's last check of signals, not
            # yet in the system call it would interrupt) is acted on only once the read returns:
            # sent again, it interrupts it. Two sent at once may reach the process as one
            sidecar.process.send_signal(getattr(signal, name))
            return False

        wait_until(held, timeout=60, interval=0.5, message="the first signal held")
        sidecar.process.send_signal(getattr(signal, name))
        code = sidecar.process.wait(60)
    finally:
        if writer is not None:
            os.close(writer)
        sidecar.stop(10)
    assert code == 128 + getattr(signal, name), sidecar.log()
    assert f"{name} received again before the sidecar started: exiting at once" in sidecar.log()


def test_a_configuration_error_leaves_the_callers_signal_handlers_as_they_were(tmp_path, capsys):
    """`main(["sidecar", ...])` in a process of its own caller (these tests) that ends in a
    configuration error must leave SIGTERM and SIGINT as they were: held by the sidecar's start
    (`_hold_stop_signals`), a Ctrl-C of the test run was then taken for the sidecar's; one found once the
    sidecar's own handlers were set (a token it needs) left those."""
    import signal

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    assert main(["sidecar", "--config", str(tmp_path / "nope.yaml")]) == 2
    path = tmp_path / "sidecar.yaml"
    path.write_text("api:\n  endpoint: 0.0.0.0:0\n  token_env: PW_TEST_NO_SUCH_TOKEN\n"
                    f"incidents:\n  path: {tmp_path / 'incidents.sqlite'}\n")
    assert main(["sidecar", "--config", str(path)]) == 2
    assert "api.endpoint '0.0.0.0:0' is reachable beyond this host" in capsys.readouterr().err
    assert {signum: signal.getsignal(signum) for signum in before} == before
