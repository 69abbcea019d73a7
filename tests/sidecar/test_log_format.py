"""``logging.format: json``: one JSON object per line, from the formatter up to a real sidecar process."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from sidecar.consolidation import ledger_path_beside
from sidecar.jsonlog import JsonFormatter
from sidecar.testing import SidecarProcess
from tests.sidecar.receiver.harness import ROOT
from tests.sidecar.test_cli import sdk_spans_with_bleed
from tests.support import wait_until

RFC3339_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warning", "error", "critical"}
# another process holds the ledger's write lock until its stdin closes (a sqlite3 shell, a backup)
HOLD_WRITE_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
"""


def record(msg: str = "hello", *args: object, level: int = logging.INFO, exc_info: object = None,
           **extra: object) -> logging.LogRecord:
    made = logging.getLogger("pathwatch.test").makeRecord("pathwatch.test", level, __file__, 1, msg, args,
                                                          exc_info, extra=extra or None)
    made.created, made.msecs = 1700000000.5, 500.0  # 2023-11-14T22:13:20.500Z
    return made


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` as a JSON object with the fields every record has (fails on any other)."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert RFC3339_UTC_MS.fullmatch(entry["time"]), line
        assert entry["level"] in LEVELS, line
        assert isinstance(entry["logger"], str) and isinstance(entry["message"], str), line
        entries.append(entry)
    return entries


# --- the formatter ---------------------------------------------------------------------------------
def test_a_record_is_one_json_object_with_time_level_logger_and_message():
    line = JsonFormatter().format(record("listening on %s:%d", "127.0.0.1", 4317, level=logging.WARNING))
    assert json.loads(line) == {"time": "2023-11-14T22:13:20.500Z", "level": "warning",
                                "logger": "pathwatch.test", "message": "listening on 127.0.0.1:4317"}


def test_an_exception_is_its_formatted_traceback_on_the_same_line():
    try:
        raise ValueError("the store is\nlocked")
    except ValueError:
        line = JsonFormatter().format(record("write failed", level=logging.ERROR, exc_info=sys.exc_info()))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["exception"].startswith("Traceback (most recent call last):\n")
    assert entry["exception"].endswith("ValueError: the store is\nlocked")


def test_extras_are_fields_and_one_named_like_a_field_does_not_replace_it():
    line = JsonFormatter().format(record("x", incident="inc-1", counts={"runs": 3}, level_name="x",
                                         time="not the time", nan=float("nan")))
    entry = json.loads(line)
    assert entry["incident"] == "inc-1" and entry["counts"] == {"runs": 3}
    assert entry["time"] == "2023-11-14T22:13:20.500Z" and entry["extra.time"] == "not the time"
    assert entry["nan"] == "nan"  # NaN is no JSON: its repr


def test_no_line_break_of_any_kind_and_text_stays_valid():
    """JSON leaves U+2028, U+2029 and U+0085 as they are; Python's splitlines (and JavaScript, for the
    first two) break lines there. A lone surrogate (a byte that was not UTF-8) is no character to write."""
    message = "a\nb\rc\u2028d\u2029e\u0085f\x0bg \u00e9t\u00e9 \u65e5\u672c \U0001f600 bad byte \udce9"
    for ascii_only in (False, True):
        line = JsonFormatter(ascii_only=ascii_only).format(record("%s", message))
        assert line.splitlines() == [line]
        line.encode("utf-8")  # no lone surrogate left
        if ascii_only:
            assert line.isascii()
        else:
            assert "\u00e9t\u00e9 \u65e5\u672c \U0001f600" in line  # kept as UTF-8, not escaped
        decoded = json.loads(line)["message"]
        assert decoded == message.replace("\udce9", "\\udce9"), ascii_only


def test_a_log_call_whose_arguments_do_not_fit_still_makes_one_line():
    entry = json.loads(JsonFormatter().format(record("%d spans from %s", "secret-arg")))
    assert entry["message"] == "%d spans from %s (its arguments could not be formatted: TypeError)"


# --- a process: warnings and uncaught exceptions go through the same handler --------------------------
UNCAUGHT = """
import threading, warnings
from sidecar.logsetup import configure_logging

configure_logging("info", "json")
warnings.warn("an old setting\\nsecond line")
thread = threading.Thread(target=lambda: 1 / 0, name="worker")
thread.start()
thread.join()
raise KeyError("r\\u00e9sum\\u00e9")
"""


def test_warnings_and_uncaught_exceptions_are_json_lines_too():
    done = subprocess.run([sys.executable, "-c", UNCAUGHT], cwd=ROOT, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    entries = json_lines(done.stderr.decode("utf-8"))
    assert [(e["level"], e["logger"]) for e in entries] == [
        ("warning", "py.warnings"), ("error", "pathwatch.sidecar"), ("critical", "pathwatch.sidecar")]
    assert "an old setting\nsecond line" in entries[0]["message"]
    assert entries[1]["message"] == "uncaught exception in thread worker"
    assert entries[1]["exception"].endswith("ZeroDivisionError: division by zero")
    assert entries[2]["exception"].endswith("KeyError: 'r\u00e9sum\u00e9'")


# --- the sidecar ---------------------------------------------------------------------------------------
def test_a_sidecar_with_format_json_writes_only_json_lines_a_logged_error_included(tmp_path):
    """A real ``python -m sidecar --config``: its start and stop lines, uvicorn's warning about a bad
    request, and a logged exception (the consolidation ledger locked by another process: the periodic
    write fails), each one JSON object on one line; the state directory's non-ASCII name as UTF-8."""
    state = tmp_path / "donn\u00e9es-\u65e5\u672c"
    sidecar = SidecarProcess({"logging": {"format": "json"}}, state_dir=state)
    with sidecar:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK,
                                   ledger_path_beside(sidecar.config["incidents"]["path"])],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline() == "locked\n"
            exporter = OTLPSpanExporter(endpoint=sidecar.grpc_endpoint, insecure=True)
            assert exporter.export(sdk_spans_with_bleed()) is SpanExportResult.SUCCESS
            exporter.shutdown()
            host, _, port = sidecar.api_url.removeprefix("http://").rpartition(":")
            with socket.create_connection((host, int(port)), timeout=10) as bad:
                bad.sendall(b"NOT HTTP\x00\r\n\r\n")
                assert bad.recv(100).startswith(b"HTTP/1.1 400")
            wait_until(lambda: "writing the consolidation database" in sidecar.log(), timeout=60,
                       message="the ledger's failed write in the log")
        finally:
            holder.stdin.close()
            holder.wait(10)
        assert sidecar.stop() == 0, sidecar.log()
    raw = sidecar.log_path.read_bytes().decode("utf-8")  # strict: valid UTF-8
    entries = json_lines(raw)
    messages = [e["message"] for e in entries]
    assert any("OTLP/gRPC listening on" in m for m in messages) and "SIGTERM received" in messages[-2]
    assert {"logger": "uvicorn.error", "level": "warning", "message": "Invalid HTTP request received."} in [
        {k: e[k] for k in ("logger", "level", "message")} for e in entries]
    [failed] = [e for e in entries if "writing the consolidation database" in e["message"]]
    assert failed["level"] == "error" and failed["logger"] == "sidecar.consolidation.verdicts"
    assert str(state) in failed["message"] and str(state) in raw  # not escaped: UTF-8 as written
    assert failed["exception"].startswith("Traceback (most recent call last):\n")
    assert failed["exception"].endswith("sqlite3.OperationalError: database is locked")
    for pseudonym in ("a" * 32, "b" * 32):  # the spans' users: not in the log, as in text
        assert pseudonym not in raw


def test_a_configuration_error_found_once_the_sidecar_logs_json_is_a_json_line(tmp_path):
    """The token a public API endpoint needs is looked for after logging is set up: its exit 2 message
    is one of the JSON lines, naming the key."""
    config = tmp_path / "sidecar.yaml"
    config.write_text("api:\n  endpoint: 0.0.0.0:0\nincidents:\n  path: ':memory:'\n"
                      "logging:\n  format: json\n")
    environ = {key: value for key, value in os.environ.items() if key != "PATHWATCH_API_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "sidecar", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    [entry] = json_lines(done.stderr)
    assert entry["level"] == "error" and "api.token_env" in entry["message"]
