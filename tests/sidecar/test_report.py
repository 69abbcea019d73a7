import os
import re
import socket
import subprocess
import sys
import threading

import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from sidecar import cli, report, rules
from sidecar.api import create_api
from sidecar.incidents import IncidentStore
from sidecar.incidents.serialize import incident_to_dict
from sidecar.report import (MAX_CELL_CHARS, ReportError, display_width, format_inventory, format_table,
                            render_report)
from tests.sidecar.incidents.findings import BASE_NS, bleed, duplicate
from tests.sidecar.receiver.harness import ROOT
from tests.support import free_port, wait_until

TOKEN = "report-token"
NOW_S = BASE_NS / 1e9
INVENTORY = {"roles": {
    "execution_engine": {"implementations": {
        "demo.engines.UserExecutionEngine": {
            "calls": 90, "canonical": True, "retired": False,
            "entry_points": {"/ws": 80, "/api/runs": 10}, "last_seen": NOW_S},
        "demo.engines.IsolatedExecutionEngine": {
            "calls": 10, "canonical": False, "retired": True,
            "entry_points": {"/ws": 10}, "last_seen": NOW_S - 3600},
    }},
    "event_emitter": {"implementations": {
        "demo.emitters.UnifiedEmitter": {"calls": 40, "entry_points": ["/ws"], "last_seen": NOW_S},
    }},
}}


class StaticInventory:
    """A fixed inventory snapshot behind the real API: the report is tested on chosen contents
    (callers, shares, last-seen times) that the real ``Inventory`` would make only from spans."""

    def __init__(self, snapshot) -> None:
        self._snapshot = snapshot

    def snapshot(self):
        return self._snapshot


class ServedApi:
    """The real API app, served by uvicorn on a free port in a thread."""

    def __init__(self, store, inventory, token=None) -> None:
        self._inventory = StaticInventory(inventory)
        app = create_api(store, self._inventory, CollectorRegistry(), lambda: True, token)
        self._socket = socket.create_server(("127.0.0.1", 0))  # bound here: its port is known and held
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        daemon=True)

    def app_inventory(self, inventory) -> None:
        """The API's inventory from now on (its snapshots)."""
        self._inventory.snapshot = inventory.snapshot

    def __enter__(self) -> "ServedApi":
        self._thread.start()
        wait_until(lambda: self._server.started, message="uvicorn started")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()


@pytest.fixture(autouse=True)
def terminal_120(monkeypatch):
    """The report fits the terminal: a 120-column one here, whatever runs the tests."""
    monkeypatch.setenv("COLUMNS", "120")


@pytest.fixture
def store():
    store = IncidentStore(":memory:")
    store.record([duplicate("d1", at_s=50), bleed("t1", at_s=10), bleed("t2", at_s=20),
                  bleed("t3", at_s=30, entry_point="/api/runs")])
    yield store
    store.close()


def test_report_shows_roles_and_open_incidents(store):
    resolved = duplicate("r1", at_s=5)
    resolved.entry_point = "/resolved"
    store.record([resolved])
    store.set_status(resolved.fingerprint, "resolved")
    with ServedApi(store, INVENTORY) as api:
        text = render_report(api.url, wide=True)  # full names, every column
    lines = text.splitlines()
    assert lines[0] == f"pathwatch report: {api.url}"
    engine = next(line for line in lines if "UserExecutionEngine" in line)
    assert engine.split()[:6] == ["execution_engine", "demo.engines.UserExecutionEngine", "90", "90.0%",
                                  "canonical", "/ws"]
    assert "/ws (80), /api/runs (10)" in engine and "2025-11-26 12:26:40Z" in engine
    retired = next(line for line in lines if "IsolatedExecutionEngine" in line)
    assert retired.split()[:4] == ["demo.engines.IsolatedExecutionEngine", "10", "10.0%", "retired"]
    assert "2025-11-26 11:26:40Z" in retired
    emitter = next(line for line in lines if "UnifiedEmitter" in line)
    assert "100.0%" in emitter

    assert "Open incidents: 3" in lines
    incident_lines = lines[lines.index("Open incidents: 3") + 2:]
    assert [line.split()[0] for line in incident_lines] == ["critical", "critical", "warning"]
    assert [line.split()[4] for line in incident_lines] == ["/api/runs", "/ws", "/api/runs"]
    first_bleed = incident_lines[1].split()
    assert first_bleed[1] == bleed().fingerprint and first_bleed[5] == "2"
    assert "/resolved" not in text


def test_no_number_of_newer_warnings_hides_an_open_critical_incident(store, monkeypatch):
    monkeypatch.setattr(report, "MAX_LIMIT", 3)  # the rows shown (1000)
    with ServedApi(store, INVENTORY) as api:
        assert "Open incidents: 3" in render_report(api.url).splitlines()  # all of them: no "more"
        store.record([bleed(f"w{n}", at_s=100 + n, rule=rules.DUPLICATE_EXECUTION,
                            implementation=f"demo.engines.Warned{n}") for n in range(5)])
        lines = render_report(api.url, wide=True).splitlines()
    title = next(line for line in lines if line.startswith("Open incidents"))
    assert title.startswith("Open incidents: 3 shown, the most severe first; more are open")
    rows = lines[lines.index(title) + 2:]
    assert [row.split()[0] for row in rows] == ["critical", "critical", "warning"]
    assert "demo.engines.Warned4" in rows[2]  # then the most recently seen


class FailingInventory:
    def snapshot(self):
        raise RuntimeError("a bug in the inventory")


def test_a_failing_inventory_does_not_hide_the_open_incidents(store, capsys):
    """Reproducer /tmp/s22/review_api/repro_inventory_500_hides_incidents.sh: the inventory's 500 ended
    the report before the incidents were read: open bleeds were hidden by a secondary section."""
    with ServedApi(store, None) as api:
        api.app_inventory(FailingInventory())
        assert report.main(["--api", api.url]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[:3] == [f"pathwatch report: {api.url}", "", "Implementations per role"]
    assert lines[3].startswith("  unavailable: GET ") and "HTTP 500" in lines[3]
    assert "Open incidents: 3" in lines
    rows = lines[lines.index("Open incidents: 3") + 2:]
    assert [row.split()[0] for row in rows] == ["critical", "critical", "warning"]
    assert err.startswith("pathwatch report: the implementations per role are missing from the report: GET ")
    assert "inventory snapshot failed" in err


def test_a_refused_token_still_ends_the_report(store, capsys):
    with ServedApi(store, INVENTORY, token=TOKEN) as api:
        assert report.main(["--api", api.url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "wants a bearer token" in err


def test_columns_line_up():
    table = format_table(["NAME", "CALLS"], [["a", "5"], ["longer-name", "1234"]], right_aligned={1})
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # right-aligned last column: equal widths
    assert lines[1].index("a") == lines[2].index("longer-name") == lines[0].index("NAME")


def test_columns_line_up_with_wide_and_combining_characters():
    # widths were len(): a CJK character takes two columns in a terminal, a combining accent none
    inventory = {"roles": {"执行引擎": {"implementations": {
        "backend.引擎.用户执行引擎": {"calls": 3, "entry_points": ["/api/运行"]},
        "backend.engines.PlainEngine": {"calls": 2, "entry_points": ["/ws"]},
        "backend.engines.Cafe\u0301Engine": {"calls": 1, "entry_points": ["/ｗｓ"]},  # full-width
    }}}}
    lines = format_inventory(inventory).splitlines()[1:5]
    header, rows = lines[0], lines[1:]

    def column_of(line: str, cell: str) -> int:  # the terminal column a cell starts at
        return display_width(line[:line.index(cell)])

    for heading, cells in (("IMPLEMENTATION", ["用户执行引擎", "PlainEngine", "Cafe\u0301Engine"]),
                           ("ENTRY POINTS", ["/api/运行", "/ws", "/ｗｓ"])):
        assert [column_of(row, cell) for row, cell in zip(rows, cells)] == \
            [column_of(header, heading)] * 3, heading
    # right-aligned CALLS and SHARE end in the same column on every line
    ends = {display_width(row[:row.index("%") + 1]) for row in rows}
    assert len(ends) == 1 and display_width(header[:header.index("SHARE") + 5]) in ends


def test_a_long_wide_name_is_cut_to_the_cell_width_in_columns():
    cell = format_table(["NAME"], [["引" * 100]]).splitlines()[1].strip()
    assert cell.endswith("…") and display_width(cell) <= MAX_CELL_CHARS
    assert display_width("引a\u0301ｗ") == 2 + 1 + 0 + 2


def test_a_role_summary_with_wide_and_combining_names_fits_the_width_under_aligned_columns():
    """The role's summary line was wrapped by textwrap, which counts characters: CJK names (two
    columns each) made it 132 columns wide in a 120-column terminal. Every line fits, in columns."""
    cjk = "执行引擎实现类名称很长的用户执行引擎"  # 18 characters, 36 columns
    accented = "Cafe\u0301Re\u0301sume\u0301Na\u0308i\u0308veEngine"  # 26 characters, 21 columns
    retired = [f"backend.旧引擎.{cjk}{i}" for i in range(3)] + [f"backend.x.{accented}"]
    inventory = {"roles": {"执行引擎": {"canonical_share": 0.5, "retired_still_called": retired,
                                    "implementations": {
        f"backend.引擎.{cjk}": {"calls": 3, "canonical": True, "entry_points": {"/api/运行/任务/列表/详情": 3},
                               "first_seen": NOW_S - 600, "last_seen": NOW_S, "idle_s": 5},
        **{name: {"calls": 1, "retired": True, "entry_points": ["/ｗｓ/全角路径" if "旧" in name else "/cafe\u0301"],
                  "first_seen": NOW_S - 900, "last_seen": NOW_S - 60, "idle_s": 60} for name in retired}}}}}
    incidents = {"incidents": [{"id": "a" * 16, "rule": "duplicate.execution", "severity": "warning",
                                "implementation": f"backend.引擎.{cjk}", "entry_point": "/api/运行/任务/列表/详情",
                                "count": 1, "last_seen_unix": NOW_S}]}
    lines = report.format_report("http://sidecar", inventory, incidents, width=120).splitlines()
    assert max(display_width(line) for line in lines) <= 120
    header = lines.index(next(line for line in lines if line.split()[:2] == ["ROLE", "IMPLEMENTATION"]))
    column = lines[header].index("IMPLEMENTATION")  # the header is ASCII

    def column_of(line: str, cell: str) -> int:  # the terminal column a cell starts at
        return display_width(line[:line.index(cell)])

    rows = lines[header + 1:header + 6]
    names = [cjk, accented, f"{cjk}0", f"{cjk}1", f"{cjk}2"]
    assert [column_of(row, name) for row, name in zip(rows, names)] == [column] * 5
    assert len({column_of(row, "%") for row in rows}) == 1  # SHARE, right-aligned, ends in one column
    ends = {display_width(row[:row.index(" 1m") + 3]) for row in rows[1:]}  # and so does IDLE
    assert len(ends) == 1 and display_width(rows[0]) in ends
    # the summary: under the IMPLEMENTATION column, each retired name whole, with its parenthesis
    summary = lines[header + 6:header + 6 + 4]
    assert summary[0].strip().startswith("canonical share 50.0% · retired still called:")
    assert all(line[:column].strip() == "" and line[column] != " " for line in summary)
    for index in range(3):
        assert sum(f"{cjk}{index} (1 call, last {report._when(NOW_S - 60)})" in line for line in summary) == 1
    assert summary[-1].endswith("+1 more")
    incident = next(line for line in lines if line.startswith("  warning"))
    incident_header = next(line for line in lines if line.startswith("  SEVERITY"))
    assert column_of(incident, "/api/") == column_of(incident_header, "ENTRY POINT")


@pytest.mark.parametrize("name", ["N" * 80, "引" * 39 + "…", "e\u0301" * 79 + "…"],
                         ids=["ascii", "cjk", "combining"])
def test_a_summary_wider_than_the_line_is_cut_to_fit_never_inside_a_character(name):
    """A name and its parenthesis are kept on one line when they fit on one; a name cut at the cell
    width (80 columns) with its parenthesis did not, and went past the width (129 columns of 120)."""
    text = f"canonical share 1.0% · retired still called: {name} (3 calls, last 2025-11-26 11:59:00Z)"
    lines = report._wrapped(text, " " * 12, 120)
    assert max(display_width(line) for line in lines) <= 120
    assert [line[:12] for line in lines] == [" " * 12] * len(lines)
    assert " ".join(line[12:] for line in lines) == text  # nothing lost, only spaces turned into breaks
    assert any(name in line for line in lines)  # the name whole on a line, its parenthesis broken
    narrow = report._wrapped(f"x {name}", "  ", 30)  # a name wider than the line: cut in pieces
    assert max(display_width(line) for line in narrow) <= 30 and len(narrow) > 2
    assert "".join(line[2:] for line in narrow[1:]) == name  # cut between characters, nothing lost
    assert not any(line[2:][:1] == "\u0301" for line in narrow)  # never before a combining mark


def test_the_token_comes_from_the_environment(store, monkeypatch, capsys):
    with ServedApi(store, INVENTORY, token=TOKEN) as api:
        monkeypatch.setenv("MY_PW_TOKEN", TOKEN)
        assert report.main(["--api", api.url, "--token-env", "MY_PW_TOKEN"]) == 0
        assert "UserExecutionEngine" in capsys.readouterr().out
        monkeypatch.delenv("MY_PW_TOKEN")
        assert report.main(["--api", api.url, "--token-env", "MY_PW_TOKEN"]) == 1
    error = capsys.readouterr().err
    assert "wants a bearer token" in error and "--token-env" in error


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_token_env_is_a_usage_error_not_the_default(store, monkeypatch, capsys, name):
    # it fell back to PATHWATCH_API_TOKEN (through the CLI) or read no variable at all, silently
    monkeypatch.setenv("PATHWATCH_API_TOKEN", TOKEN)
    with ServedApi(store, INVENTORY, token=TOKEN) as api:
        assert report.main(["--api", api.url, "--token-env", name]) == 2
        assert report.main(api=api.url, token_env=name) == 2
        assert cli.main(["report", "--api", api.url, "--token-env", name]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("--token-env is empty") == 3


def test_a_wrong_token_is_told_apart_from_a_missing_one(store, monkeypatch, capsys):
    with ServedApi(store, INVENTORY, token=TOKEN) as api:
        monkeypatch.setenv("MY_PW_TOKEN", "not-" + TOKEN)
        assert report.main(["--api", api.url, "--token-env", "MY_PW_TOKEN"]) == 1
    error = capsys.readouterr().err
    assert "refused the bearer token" in error and "not-" + TOKEN not in error


def test_a_token_from_a_secret_file_ending_in_a_newline_works(store, monkeypatch, capsys):
    with ServedApi(store, INVENTORY, token=TOKEN) as api:
        monkeypatch.setenv("MY_PW_TOKEN", TOKEN + "\n")
        assert report.main(["--api", api.url, "--token-env", "MY_PW_TOKEN"]) == 0
        monkeypatch.setenv("MY_PW_TOKEN", "bad\ntoken-inside")  # cannot be sent: never printed
        assert report.main(["--api", api.url, "--token-env", "MY_PW_TOKEN"]) == 1
    error = capsys.readouterr().err
    assert "single line" in error and "token-inside" not in error


@pytest.mark.parametrize("consolidation", [[], ["--consolidation"]])
def test_a_token_no_header_can_carry_is_one_line_naming_token_env_not_a_traceback(consolidation):
    # httpx raised UnicodeEncodeError building the Authorization header: a traceback, exit 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MY_PW_TOKEN": "tökén-secret"}
    done = subprocess.run([sys.executable, "-m", "sidecar", "report", "--token-env", "MY_PW_TOKEN",
                           "--api", f"http://127.0.0.1:{free_port()}", *consolidation],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "--token-env" in done.stderr and "printable ASCII" in done.stderr
    assert "secret" not in done.stderr


def test_an_invalid_api_url_is_a_clear_error(capsys):
    assert report.main(["--api", "http://[::1"]) == 1
    assert "is not a valid URL" in capsys.readouterr().err


def test_an_unreachable_sidecar_is_a_clear_error(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ReportError, match="cannot reach the pathwatch sidecar"):
        render_report(url)
    assert report.main(["--api", url]) == 1
    assert f"cannot reach the pathwatch sidecar at {url}" in capsys.readouterr().err


def test_an_api_given_as_host_and_port_is_read_as_http_as_curl_does(store, capsys):
    # `--api 127.0.0.1:9464` exited 1: "cannot reach the pathwatch sidecar" (httpx: no scheme)
    with ServedApi(store, INVENTORY) as api:
        assert report.main(api=api.url.removeprefix("http://")) == 0
        assert cli.main(["report", "--api", api.url.removeprefix("http://")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.count(f"pathwatch report: {api.url}\n") == 2


@pytest.mark.parametrize("api", ["", "  ", "ftp://127.0.0.1:9464", "ws://ops:pw@127.0.0.1:9464"])
def test_an_api_that_is_no_http_url_is_a_usage_error_naming_api(capsys, api):
    assert report.main(api=api) == 2
    assert report.main(api=api, consolidation=True) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("--api") == 2 and "cannot reach" not in err
    assert "http://" in err and "pw@" not in err


@pytest.mark.parametrize("tail", ["/x?u=http://y", "/?next=ftp://z", "/a#b://c"])
def test_a_url_after_the_host_is_no_scheme(capsys, tail):
    # everything before the first "://" was taken as the scheme: `host:9464/x?u=http://y` was
    # refused as no http(s) URL (exit 2); the scheme is RFC 3986's, followed by "//"
    port = free_port()  # nothing listens: the URL is tried, as curl would
    assert report.main(api=f"127.0.0.1:{port}{tail}") == 1
    err = capsys.readouterr().err
    assert f"cannot reach the pathwatch sidecar at http://127.0.0.1:{port}{tail}" in err
    assert report.api_url_of(f"host:9464{tail}") == f"http://host:9464{tail}"


def test_the_scheme_is_read_as_rfc_3986_spells_it():
    assert report.split_scheme("HTTPS://h:1/x") == ("HTTPS://", "h:1/x")
    assert report.split_scheme("svn+ssh://h") == ("svn+ssh://", "h")
    for no_scheme in ("host:9464/x?u=http://y", "ops:pw@host:1", "my_host:1/a://b", "1a://h", "[::1]:1"):
        assert report.split_scheme(no_scheme) == ("", no_scheme)
    assert report.api_url_of("HTTP://h:1") == "HTTP://h:1"
    for refused in ("http:h:1", "https:/h", "svn+ssh://h", "//"):
        assert report.api_url_of(refused) is None


@pytest.mark.parametrize("consolidation", [False, True], ids=["report", "consolidation"])
@pytest.mark.parametrize("api, shown", [
    ("user:s3://cr3t@127.0.0.1:1", "user:***@127.0.0.1:1"),     # was read as the scheme "user:s3"
    ("http://user:s3/cr3t@127.0.0.1:1/x", "http://user:***@127.0.0.1:1/x"),
    ("user:s3?cr3t@127.0.0.1:1", "user:***@127.0.0.1:1"),
    ("http://user:s3#cr3t@127.0.0.1:1", "http://user:***@127.0.0.1:1"),
])
def test_a_password_holding_a_slash_question_mark_or_hash_is_a_usage_error_that_hides_it(
        capsys, api, shown, consolidation):
    # the usage error printed `user:s3://cr3t@h:1` whole; read as http, httpx's error quotes the
    # part of the password before the '/' as the port ("Invalid port: 's3:'")
    assert report.main(api=api, consolidation=consolidation) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--api" in err and "percent-encode" in err
    assert "s3" not in err and "cr3t" not in err and f"got {shown!r}" in err
    assert report.shown_url(api) == shown
    assert cli.main(["report", "--api", api]) == 2   # the console script, the same way
    assert "cr3t" not in capsys.readouterr().err


def test_an_empty_sidecar_says_so(monkeypatch):
    empty = IncidentStore(":memory:")
    with ServedApi(empty, {"roles": {}}) as api:
        text = render_report(api.url)
    assert "(no wrapped calls seen yet)" in text and "Open incidents: none" in text


def test_inventory_as_lists_and_many_entry_points():
    inventory = {"roles": [{"role": "supervisor", "canonical": "a.Sup", "implementations": [
        {"implementation": "a.Sup", "calls": 3, "entry_points": [f"/e{n}" for n in range(5)],
         "last_seen_ns": BASE_NS},
        {"implementation": "b.OldSup", "calls": 1, "share": 0.25, "last_seen": "2025-11-26T12:26:40Z"},
    ]}]}
    lines = format_inventory(inventory).splitlines()
    assert lines[2].split()[:5] == ["supervisor", "Sup", "3", "75.0%", "canonical"]
    assert "/e0, /e1, /e2, +2 more" in lines[2]
    assert lines[3].split()[:4] == ["OldSup", "1", "25.0%", "-"]
    assert "2025-11-26 12:26:40Z" in lines[2] and "2025-11-26 12:26:40Z" in lines[3]


def _execute_span(n: int, implementation: str, *, canonical=False, retired=False, nested=False,
                  entry_point="/ws"):
    from instrumentation.attributes import SpanKinds
    from sidecar.model import SpanRecord

    return SpanRecord(trace_id=f"{n:032x}", span_id=f"{n:016x}", parent_span_id=None,
                      name="execution_engine.execute_agent", start_ns=BASE_NS + n, end_ns=BASE_NS + n + 1,
                      kind=SpanKinds.EXECUTE, role="execution_engine", implementation=implementation,
                      canonical=canonical, retired=retired, nested=nested, entry_point=entry_point)


def test_report_of_the_real_inventory(capsys):
    from sidecar.inventory import Inventory

    inventory = Inventory()
    spans = [_execute_span(n, "demo.engines.UserExecutionEngine", canonical=True) for n in range(3)]
    spans += [_execute_span(10, "demo.engines.IsolatedExecutionEngine", retired=True,
                            entry_point="/api/runs")]
    # a nested delegation counts as a call but not in the share
    spans += [_execute_span(20, "demo.engines.UserExecutionEngine", canonical=True, nested=True)]
    inventory.consume(spans, BASE_NS)
    # a minute after the spans (a canonical class idle for the whole window is no longer listed so)
    with ServedApi(IncidentStore(":memory:"), inventory.snapshot(now_s=BASE_NS / 1e9 + 60)) as api:
        assert report.main(api=api.url, token_env="PATHWATCH_TEST_NO_SUCH_TOKEN") == 0
    lines = capsys.readouterr().out.splitlines()
    user = next(line for line in lines if "UserExecutionEngine" in line)
    assert user.split()[:6] == ["execution_engine", "UserExecutionEngine", "4", "75.0%",
                                "canonical", "/ws"]
    isolated = next(line for line in lines if "IsolatedExecutionEngine" in line)
    assert isolated.split()[:5] == ["IsolatedExecutionEngine", "1", "25.0%", "retired",
                                    "/api/runs"]
    assert "2025-11-26 12:26:40Z" in user



def test_the_report_shows_first_seen_idle_and_per_role_canonical_share_and_retired_still_called(
        capsys, monkeypatch):
    # the report left out what the inventory has: first seen, idle, the role's canonical share
    # and the retired classes still called (only --consolidation showed the last two)
    from sidecar.inventory import Inventory

    monkeypatch.setenv("COLUMNS", "200")  # a terminal wide enough for every column

    s = 1_000_000_000
    inventory = Inventory()
    spans = [_execute_span(0, "demo.engines.UserExecutionEngine", canonical=True),
             _execute_span(30 * s, "demo.engines.UserExecutionEngine", canonical=True),
             _execute_span(90 * s, "demo.engines.IsolatedExecutionEngine", retired=True)]
    emit = _execute_span(5 * s, "demo.emitters.Bridge")
    emit.role = "event_emitter"
    inventory.consume([*spans, emit], BASE_NS + 100 * s)  # received after the last span ended
    with ServedApi(IncidentStore(":memory:"), inventory.snapshot(now_s=BASE_NS / 1e9 + 3 * 3600)) as api:
        assert report.main(api=api.url, token_env="PATHWATCH_TEST_NO_SUCH_TOKEN") == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("ROLE"))
    assert header.split()[-5:] == ["FIRST", "SEEN", "LAST", "SEEN", "IDLE"]
    user = next(line for line in lines if "UserExecutionEngine" in line)
    assert user.endswith("2025-11-26 12:26:40Z  2025-11-26 12:27:10Z  2h 59m")
    isolated = next(line for line in lines if "IsolatedExecutionEngine" in line)
    assert isolated.endswith("2025-11-26 12:28:10Z  2025-11-26 12:28:10Z  2h 58m")
    # under each role's rows, from the IMPLEMENTATION column on
    column = header.index("IMPLEMENTATION")
    summary = lines[lines.index(isolated) + 1]
    assert summary[:column].strip() == "" and summary[column] != " "
    assert summary[column:] == ("canonical share 66.7% · retired called in the last 14 days: "
                                "IsolatedExecutionEngine (1 call, last 2025-11-26 12:28:10Z)")
    emitter = next(line for line in lines if " Bridge " in line)
    assert lines[lines.index(emitter) + 1][column:] == (
        "canonical share - (no canonical implementation) · retired called in the last 14 days: none")
    # idle as the API gives it, whatever the span: seconds, minutes, days
    assert [report._idle(v) for v in (0, 59.9, 61, 3600 * 25 + 120, None, -1, True)] == \
        ["0s", "59s", "1m", "1d 1h", "-", "-", "-"]

def test_names_from_spans_cannot_break_the_table_or_the_terminal():
    hostile = "evil.Engine\x1b[2J\nFAKE ROW"
    rows = [[hostile, "x" * 5000, "1"], ["ok", "short", "2"]]
    lines = format_table(["NAME", "DETAIL", "N"], rows).splitlines()
    assert len(lines) == 3  # no line break from the data
    assert all("\x1b" not in line for line in lines)
    assert "evil.Engine\\x1b[2J\\nFAKE ROW" in lines[1]
    assert max(len(line) for line in lines) < 2 * MAX_CELL_CHARS and "…" in lines[1]


def test_the_consolidation_report_shows_the_runs_of_paths_beyond_the_limit():
    picture = {"paths": {"entry_points": {"/ws": {"runs": 100, "overflow_runs": 89, "paths": [
        {"id": "p-1", "runs": 10, "share": 0.1, "path": "execution_engine=UserExecutionEngine"},
        {"id": "p-2", "runs": 1, "share": 0.01, "path": "event_emitter=Emitter0"}]}}}}
    text = report.format_consolidation("http://sidecar", {"roles": {}}, picture)
    other = next(line for line in text.splitlines() if " other " in line)
    assert other.split()[:3] == ["other", "89", "89.0%"]


def test_the_consolidation_report_says_which_window_retired_still_called_covers():
    inventory = {"retired_window_s": 14 * 86400, "roles": {"execution_engine": {
        "canonical": ["demo.engines.UserExecutionEngine"], "canonical_share": 1.0,
        "implementations": {"demo.engines.UserExecutionEngine": {}},
        "retired_still_called": []}}}
    text = report.format_consolidation("http://sidecar", inventory, {})
    assert "RETIRED CALLED (LAST 14 DAYS)" in text


def test_the_consolidation_report_says_which_service_each_version_is_of_and_what_the_limit_cost():
    from sidecar.consolidation import Thresholds, VersionBook

    book = VersionBook(Thresholds(), max_versions=4)
    for service in ("chat", "billing"):
        for version in ("1.0.0", "1.1.0"):
            book.count_run(service, version, "/x", 0.0)

    def versions(overflow: dict) -> list[str]:
        text = report.format_consolidation("http://sidecar", {}, {
            "versions": book.snapshot(), "versions_overflow": overflow})
        return text.split("Versions (")[1].split("\n\n")[0].splitlines()

    section = versions(book.overflow())
    assert section[1].split()[:4] == ["SERVICE", "VERSION", "PREVIOUS", "RUNS"]
    assert [line.split()[:3] for line in section[2:]] == [
        ["chat", "1.0.0", "-"], ["chat", "1.1.0", "1.0.0"],
        ["billing", "1.0.0", "-"], ["billing", "1.1.0", "1.0.0"]]  # nothing dropped: no more lines
    overflow = {"max_versions": 4, "dropped": 2, "refused": 1, "ignored": 7,
                "waiting": [{"service": "search", "version": "1.0.0"}]}
    assert versions(overflow)[-1].strip() == (
        "beyond max_versions (4): 2 dropped, 7 spans and findings ignored; not tracked: search 1.0.0")


def test_span_supplied_text_outside_the_tables_cannot_break_the_terminal_either():
    """A waiting version's service and version come from spans (service.name, service.version):
    the "not tracked" line printed them raw, terminal escapes and line breaks included, so a span
    could retitle the terminal or print a line of its own. Every free-text line escapes them as
    the table cells do."""
    evil = "9.9\x1b]0;PWNED\x07\x1b[31mRED\x1b[0m\nFAKE: all clear"
    text = report.format_consolidation("http://sidecar", {}, {
        "versions": [{"service": "a", "version": "1", "runs": 3, "findings": {}}],
        "versions_overflow": {"max_versions": 1, "dropped": 0, "ignored": 3,
                              "waiting": [{"service": "svc\x1b[2J", "version": evil}]},
        "verdicts": {"window_s": 86400, "implementations": [],
                     "span_loss": {"from": "\x1b[2Jx", "to": 1_800_000_005.0, "reason": evil}}})
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert ("not tracked: svc\\x1b[2J 9.9\\x1b]0;PWNED\\x07\\x1b[31mRED\\x1b[0m\\nFAKE: all clear"
            in text)
    assert "(9.9\\x1b]0;PWNED" in text


def test_the_consolidation_report_says_when_calls_may_have_been_lost():
    loss = {"from": 1_800_000_000.0, "to": 1_800_000_005.0, "reason": "unclean_stop"}
    text = report.format_consolidation("http://sidecar", {}, {"verdicts": {
        "window_s": 86400, "span_loss": loss, "implementations": []}})
    assert ("calls may have been lost 2027-01-15 08:00:00Z - 2027-01-15 08:00:05Z (unclean_stop)"
            in text)
    assert "lost" not in report.format_consolidation("http://sidecar", {}, {"verdicts": {
        "window_s": 86400, "span_loss": None, "implementations": []}})


def test_the_consolidation_report_says_when_the_ledger_behind_the_verdicts_is_not_saved():
    """Verdicts resting on a ledger that is not being saved (writes failing, in memory only, a file
    moved aside) looked like any others: the report says it above the table; nothing is said when
    the ledger is persisted (or by a sidecar that does not tell)."""
    def verdicts(ledger) -> str:
        return report.format_consolidation("http://sidecar", {}, {"verdicts": {
            "window_s": 86400, "span_loss": None, "ledger": ledger, "implementations": []}})

    def ledger(state: str, reason: str | None = None) -> dict:
        return {"state": state, "since": 1_800_000_000.0, "reason": reason, "write_errors": 3,
                "moved_aside_at": None, "last_written": 1_799_999_990.0}

    assert ("the ledger behind these verdicts is write_failing since 2027-01-15 08:00:00Z "
            "(database is locked): 3 writes failed, kept in memory and retried every flush; "
            "last written 2027-01-15 07:59:50Z" in verdicts(ledger("write_failing",
                                                                   "database is locked")))
    assert ("the ledger behind these verdicts is in_memory since 2027-01-15 08:00:00Z "
            "(newer_version): its file is left alone, nothing of it is saved"
            in verdicts(ledger("in_memory", "newer_version")))
    assert ("the ledger behind these verdicts is moved_aside since 2027-01-15 08:00:00Z "
            "(unreadable): its file could not be read and was moved aside, a fresh ledger "
            "started" in verdicts(ledger("moved_aside", "unreadable")))
    assert "no_file" in verdicts(ledger("no_file"))
    evil = "locked\x1b[2J\nFAKE: persisted"
    text = verdicts(ledger("write_failing", evil))
    assert "\x1b" not in text and not any(line.startswith("FAKE") for line in text.splitlines())
    for quiet in (ledger("persisted"), None, "garbage"):
        assert "the ledger behind" not in verdicts(quiet)


def test_classes_of_one_name_in_different_modules_are_told_apart_wherever_the_report_names_them():
    """Two SupervisorAgent classes, one dead (safe_to_delete) and one live: the report shortened
    both to "SupervisorAgent", identical rows with opposite verdicts. Names that collide get the
    shortest dotted suffix telling them apart, the same in every table; the others stay short."""
    dead, live = "app.legacy.agents.SupervisorAgent", "app.ws.agents.SupervisorAgent"
    canonical = "app.core.ChatOrchestrator"
    inventory = {"roles": {"supervisor": {
        "canonical": [canonical], "canonical_share": 0.5, "retired_still_called": [live],
        "implementations": {dead: {}, live: {}, canonical: {}}}}}
    step = {"role": "supervisor", "nested": False, "canonical": False}
    picture = {
        "paths": {"entry_points": {"/ws": {"runs": 2, "overflow_runs": 0, "paths": [
            {"id": "p-1", "runs": 1, "share": 0.5, "path": "supervisor=SupervisorAgent",
             "steps": [dict(step, implementation=live)]},
            {"id": "p-2", "runs": 1, "share": 0.5, "path": "supervisor=SupervisorAgent",
             "steps": [dict(step, implementation=dead)]}]}}},
        "callers_to_migrate": [{"role": "supervisor", "implementation": dead, "callers": [
            {"caller": "app.legacy.http_route", "calls": 1, "last_seen": NOW_S,
             "entry_points": []}]}],
        "verdicts": {"window_s": 86400, "implementations": [
            {"role": "supervisor", "implementation": dead, "verdict": "safe_to_delete",
             "total_calls": 1, "last_seen": NOW_S, "last_callers": []},
            {"role": "supervisor", "implementation": live, "verdict": "in_use",
             "total_calls": 7, "last_seen": NOW_S, "last_callers": []}]}}
    text = report.format_consolidation("http://sidecar", inventory, picture)
    roles = text.split("Roles\n")[1].split("\n\n")[0].splitlines()[1]
    assert roles.split()[:2] == ["supervisor", "ChatOrchestrator"] and "ws.agents.SupervisorAgent" in roles
    paths = text.split("Paths per entry point\n")[1].split("\n\n")[0]
    assert "supervisor=ws.agents.SupervisorAgent" in paths
    assert "supervisor=legacy.agents.SupervisorAgent" in paths
    assert "supervisor legacy.agents.SupervisorAgent" in text.split("Callers to migrate\n")[1]
    verdicts = text.split("days\n")[1].splitlines()[1:]
    assert [line.split()[1:3] for line in verdicts] == [
        ["legacy.agents.SupervisorAgent", "safe_to_delete"], ["ws.agents.SupervisorAgent", "in_use"]]


def test_the_versions_table_names_the_retired_classes_a_version_ran_as_the_other_tables_do():
    """RETIRED SEEN printed the API's "role module.Class" whole while the verdicts named the class
    by its class name; a class name two modules share gets the same suffix as in the verdicts."""
    isolated = "app.engines.IsolatedExecutionEngine"
    dead, live = "app.legacy.agents.SupervisorAgent", "app.ws.agents.SupervisorAgent"
    picture = {
        "versions": [{"service": "chat", "version": "2.0.0", "previous_version": "1.0.0", "runs": 4,
                      "findings": {}, "retired_seen": [f"execution_engine {isolated}",
                                                       f"agent {dead}"]}],
        "verdicts": {"window_s": 86400, "implementations": [
            {"role": "execution_engine", "implementation": isolated, "verdict": "in_use",
             "total_calls": 4, "last_seen": NOW_S, "last_callers": []},
            {"role": "agent", "implementation": live, "verdict": "in_use",
             "total_calls": 7, "last_seen": NOW_S, "last_callers": []}]}}
    text = report.format_consolidation("http://sidecar", {}, picture)
    row = text.split("Versions (")[1].split("\n\n")[0].splitlines()[2]
    assert row.split("  ")[-1].strip() == (
        "execution_engine IsolatedExecutionEngine, agent legacy.agents.SupervisorAgent")
    verdicts = text.split("days\n")[1]
    assert "IsolatedExecutionEngine" in verdicts and "app.engines" not in text
    assert "ws.agents.SupervisorAgent" in verdicts  # told apart from the version's dead one


def test_the_shortest_suffix_that_tells_names_apart():
    short = report._shortener({"a.x.Engine", "b.x.Engine", "c.Engine", "x.Engine", "d.Other"})
    assert [short(n) for n in ("a.x.Engine", "b.x.Engine", "c.Engine", "x.Engine", "d.Other")] == [
        "a.x.Engine", "b.x.Engine", "c.Engine", "x.Engine", "Other"]
    assert short(None) == "-" and short("e.Unlisted") == "Unlisted"


def test_the_consolidation_report_says_when_callers_were_dropped_from_a_full_list():
    picture = {"callers_to_migrate": [{"role": "execution_engine", "implementation": "a.Legacy",
                                       "callers_dropped": 3, "callers": [
                                           {"caller": "app.jobs.x", "calls": 2, "last_seen": NOW_S}]}],
               "callers_overflow": {"max_callers": 32, "max_implementations": 512,
                                    "window_s": 86400, "untracked_calls": 7}}
    section = report.format_consolidation("http://sidecar", {}, picture).split(
        "Callers to migrate\n")[1].split("\n\n")[0]
    assert "(+ 3 dropped to keep the 32 most recent: may call again)" in section
    assert "7 calls of implementations beyond max_implementations (512) have no callers listed" in section


class _FixedAnswers:
    """A plain HTTP server answering fixed bodies per path: not a pathwatch sidecar, whose API never
    answers JSON of these other shapes (the report must still fail clearly on them)."""

    def __init__(self, routes) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, body = routes.get(self.path.split("?")[0],
                                                        (404, "text/plain", b"not here"))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "_FixedAnswers":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _json(body) -> tuple[int, str, bytes]:
    import json

    return 200, "application/json", json.dumps(body).encode()


@pytest.mark.parametrize("consolidation, routes", [
    (False, {"/api/v1/inventory": _json({"roles": {}}), "/api/v1/incidents": _json({"incidents": {"a": 1}})}),
    (False, {"/api/v1/inventory": _json({"roles": {}}), "/api/v1/incidents": _json({"incidents": ["x"]})}),
    (False, {"/api/v1/inventory": _json({"roles": {}}),
             "/api/v1/incidents": _json({"incidents": [{"id": "a", "last_seen_unix": "soon"}]})}),
    (True, {"/api/v1/inventory": _json({"roles": []}), "/api/v1/consolidation": _json({})}),
    (True, {"/api/v1/inventory": _json({"roles": {"r": {"canonical_share": "high"}}}),
            "/api/v1/consolidation": _json({})}),
], ids=["incidents-a-mapping", "an-incident-a-string", "last-seen-a-word", "roles-a-list", "share-a-word"])
def test_json_of_another_shape_is_one_clear_line_and_exit_1_not_a_traceback(capsys, consolidation, routes):
    # the report raised TypeError/AttributeError/ValueError out of main(): a traceback
    with _FixedAnswers(routes) as api:
        assert report.main(api=api.url, consolidation=consolidation) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert f"pathwatch report: the answer of {api.url} is not what a pathwatch sidecar's API answers" in err
    assert "is --api a pathwatch sidecar of this version?" in err


def test_an_error_body_cannot_put_control_characters_on_the_terminal(capsys):
    # e.g. --api at the OTLP/HTTP port: its 404 is a protobuf google.rpc.Status, printed raw
    # (\x08 a backspace) -- or a proxy's page with an escape sequence
    body = b"\x08\x05\x12Cno such path\x1b[2J\r\nsecond line"
    with _FixedAnswers({"/api/v1/inventory": (404, "application/x-protobuf", body)}) as api:
        assert report.main(api=api.url) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\x08" not in err and "\r" not in err
    assert "HTTP 404: \\x08\\x05\\x12Cno such path\\x1b[2J\\r\\nsecond line" in err


@pytest.mark.parametrize("consolidation", [False, True], ids=["report", "consolidation"])
def test_the_password_of_a_user_password_url_is_never_printed(capsys, consolidation):
    # --api http://user:password@host (a proxy's basic auth) was quoted whole in every error line
    # and in the report's first line
    with _FixedAnswers({"/api/v1/inventory": _json({"roles": {}}),
                        "/api/v1/incidents": _json({"incidents": [], "more": False}),
                        "/api/v1/consolidation": _json({})}) as api:
        with_password = api.url.replace("http://", "http://ops:s3cr3t-pw@")
        assert report.main(api=with_password, consolidation=consolidation) == 0
        out, _ = capsys.readouterr()
        assert out.startswith(f"pathwatch {'consolidation ' if consolidation else ''}report: "
                              f"{api.url.replace('http://', 'http://ops:***@')}\n")
        assert report.main(api=with_password + "/nowhere", consolidation=consolidation) == 1
    closed = "http://ops:s3cr3t-pw@127.0.0.1:1"  # nothing listens: httpx's message quotes the URL
    assert report.main(api=closed, consolidation=consolidation) == 1
    out, err = capsys.readouterr()
    assert "s3cr3t-pw" not in out + err
    assert err.count("ops:***@") == 2  # both errors say where, without the password


@pytest.mark.parametrize("consolidation", [False, True], ids=["report", "consolidation"])
@pytest.mark.parametrize("api", [
    "ops:s3cr3t-pw@127.0.0.1:1",  # the scheme forgotten: urlsplit reads "ops" as the scheme
    "ops:s3cr3t-pw@127.0.0.1:1/x?y#z",
    "http://ops:s3cr3t-pw@[::1",  # a bracket left open: urlsplit raises
    "http://ops:s3cr3t-pw@127.0.0.1:port",
])
def test_the_password_of_a_url_that_is_not_valid_is_never_printed(capsys, api, consolidation):
    # such a URL was printed as given: the error about it quoted the password
    assert report.main(api=api, consolidation=consolidation) == 1
    out, err = capsys.readouterr()
    assert "s3cr3t-pw" not in out + err and "ops:***@" in err


def test_shown_url_hides_only_a_password():
    assert report.shown_url("http://ops:pw@host:9464/x") == "http://ops:***@host:9464/x"
    assert report.shown_url("ops:pw@host:9464") == "ops:***@host:9464"
    assert report.shown_url("http://o:p@ss@host") == "http://o:***@host"  # the last @ ends it
    for unchanged in ("http://host:9464", "http://ops@host", "http://ops:@host", "host:9464",
                      "http://host/a:b@c", "http://host?a:b@c", "not a url"):
        assert report.shown_url(unchanged) == unchanged


def test_the_consolidation_report_says_when_classes_were_not_tracked():
    """Classes beyond the ledger's bound have no verdict: the report says so, or the table looks
    complete; nothing is said when nothing was refused (or by a sidecar that does not tell)."""
    def verdicts(overflow) -> str:
        return report.format_consolidation("http://sidecar", {}, {"verdicts": {
            "window_s": 86400, "span_loss": None, "overflow": overflow, "implementations": []}})

    assert ("12 calls of classes beyond the ledger's 512 were not tracked since the sidecar "
            "started: those classes have no verdict below"
            in verdicts({"max_implementations": 512, "untracked_calls": 12}))
    assert "not tracked" not in verdicts({"max_implementations": 512, "untracked_calls": 0})
    assert "not tracked" not in verdicts(None)


@pytest.mark.parametrize("consolidation", [False, True], ids=["report", "consolidation"])
def test_json_nested_too_deeply_is_one_clear_line_and_exit_1(capsys, consolidation):
    # json raised RecursionError out of main(): a traceback
    deep = (200, "application/json", b"[" * 100_000 + b"]" * 100_000)
    with _FixedAnswers({"/api/v1/inventory": deep, "/api/v1/consolidation": deep,
                        "/api/v1/incidents": _json({"incidents": [], "more": False})}) as api:
        assert report.main(api=api.url, consolidation=consolidation) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "the answer is JSON nested too deeply to read" in err


# -- fitting the terminal: the demo's data (examples/) ------------------------------------------------

_DEMO = "examples.agent_backend."
_DEMO_ROLES = {  # role: (implementation, canonical, retired), as examples/agent_backend/pathmap.yaml
    "execution_engine": [("engines.UserExecutionEngine", True, False),
                         ("engines.RequestScopedExecutionEngine", False, False),
                         ("engines.ExecutionEngine", False, False),
                         ("engines.SupervisorExecutionEngineAdapter", False, False),
                         ("engines.IsolatedExecutionEngine", False, True)],
    "supervisor": [("supervisors.SupervisorAgent", False, False),
                   ("supervisors.ChatOrchestrator", False, False)],
    "event_emitter": [("emitters.AgentWebSocketBridge", True, False),
                      ("emitters.UnifiedEventEmitter", False, False),
                      ("emitters.WebSocketNotifier", False, False)],
    "socket_manager": [("sockets.WebSocketManager", False, False)],
}
_DEMO_CULPRITS = [  # examples/demo_judge.py: the rule and culprit of each seeded bug (S1-S11)
    ("bleed.target_vs_socket_owner", "event_emitter", "emitters.UnifiedEventEmitter"),
    ("bleed.owner_vs_ambient", "event_emitter", "emitters.UnifiedEventEmitter"),
    ("delivery.no_connection", "socket_manager", "sockets.WebSocketManager"),
    ("duplicate.execution", "execution_engine", "engines.SupervisorExecutionEngineAdapter"),
    ("duplicate.execution", "supervisor", "supervisors.ChatOrchestrator"),
    ("duplicate.emission", "event_emitter", "emitters.AgentWebSocketBridge"),
    ("delivery.undelivered", "event_emitter", "emitters.WebSocketNotifier"),
    ("delivery.missing_required_events", "execution_engine", "engines.UserExecutionEngine"),
    ("delivery.undelivered", "event_emitter", "emitters.AgentWebSocketBridge"),
    ("bleed.target_vs_socket_owner", "event_emitter", "emitters.AgentWebSocketBridge"),
    ("duplicate.retired_invoked", "execution_engine", "engines.IsolatedExecutionEngine"),
]


def _demo_run():
    """A full demo run's inventory (every implementation, from both entry points, through the
    real Inventory) and its incidents (every seeded bug's culprit on both entry points)."""
    from instrumentation.attributes import SpanKinds
    from sidecar.inventory import Inventory
    from sidecar.model import Finding, SpanRecord

    kinds = {"execution_engine": SpanKinds.EXECUTE, "supervisor": SpanKinds.EXECUTE,
             "event_emitter": SpanKinds.EMIT, "socket_manager": SpanKinds.DISPATCH}
    spans = []
    for role, implementations in _DEMO_ROLES.items():
        for name, canonical, retired in implementations:
            for entry_point in ("/ws", "/api/runs"):
                n = len(spans) + 1
                spans.append(SpanRecord(
                    trace_id=f"{n:032x}", span_id=f"{n:016x}", parent_span_id=None, name=role,
                    start_ns=BASE_NS + n, end_ns=BASE_NS + n + 1, kind=kinds[role], role=role,
                    implementation=_DEMO + name, canonical=canonical, retired=retired,
                    entry_point=entry_point))
    inventory = Inventory()
    inventory.consume(spans, BASE_NS + len(spans))
    store = IncidentStore(":memory:")
    store.record([Finding(rule=rule, severity=rules.CATALOG[rule].severity, summary="s", role=role,
                          implementation=_DEMO + name, entry_point=entry_point,
                          trace_id=f"{n:032x}", detected_ns=BASE_NS + n)
                  for n, (rule, role, name) in enumerate(_DEMO_CULPRITS)
                  for entry_point in ("/ws", "/api/runs")])
    return inventory.snapshot(now_s=NOW_S + 60), store


def _printed(capsys, *argv) -> list[str]:
    assert report.main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_the_report_of_the_demo_fits_a_120_column_terminal_and_wide_prints_it_all(capsys):
    """The demo's report was 175 columns wide (fully qualified class names, two timestamps per row):
    a 120-column terminal wrapped every row. It names classes by their class name and leaves out
    what does not fit, saying so; --wide prints the full names and every column."""
    inventory, store = _demo_run()
    with ServedApi(store, inventory) as api:
        lines = _printed(capsys, "--api", api.url)
        wide = _printed(capsys, "--api", api.url, "--wide")
    assert max(display_width(line) for line in lines) <= 120
    text = "\n".join(lines)
    assert _DEMO not in text
    adapter = next(line for line in lines if "SupervisorExecutionEngineAdapter" in line)
    assert adapter.split()[:4] == ["SupervisorExecutionEngineAdapter", "2", "20.0%", "-"]
    header = next(line for line in lines if line.split()[:2] == ["ROLE", "IMPLEMENTATION"])
    assert "FIRST SEEN" not in header and header.split()[-1] == "IDLE"
    assert "  FIRST SEEN, LAST SEEN: left out to fit 120 columns (--wide prints every column)" in lines
    assert any(line.startswith("  IMPLEMENTATION: the class name") for line in lines)
    incidents = lines[lines.index("Open incidents: 22") + 1:]
    assert incidents[0].split()[-2:] == ["POINT", "COUNT"]
    assert incidents[-1] == "  LAST SEEN: left out to fit 120 columns (--wide prints every column)"
    assert incidents[1].split()[:4] == ["critical", "32e0cea224de2ff1", "bleed.target_vs_socket_owner",
                                        "AgentWebSocketBridge"]
    # the role's summary, wrapped under the IMPLEMENTATION column
    column = header.index("IMPLEMENTATION")
    summary = lines.index(next(line for line in lines if "canonical share 20.0%" in line))
    assert lines[summary][column - 1:column + 1] == " c"
    assert lines[summary + 1][:column].strip() == "" and "12:26:40Z)" in lines[summary + 1]

    assert max(display_width(line) for line in wide) > 160  # as before, on purpose
    wide_header = next(line for line in wide if line.split()[:2] == ["ROLE", "IMPLEMENTATION"])
    assert wide_header.split()[-5:] == ["FIRST", "SEEN", "LAST", "SEEN", "IDLE"]
    assert any(line.split()[:1] == [_DEMO + "engines.SupervisorExecutionEngineAdapter"]
               for line in wide)
    assert "left out" not in "\n".join(wide) and "IMPLEMENTATION: the class name" not in "\n".join(wide)
    assert wide[-1].split()[3] == _DEMO + "emitters.AgentWebSocketBridge"
    assert wide[-1].endswith("2025-11-26 12:26:40Z")


def test_the_report_uses_the_terminal_width_it_has(capsys, monkeypatch):
    inventory, store = _demo_run()
    with ServedApi(store, inventory) as api:
        monkeypatch.setenv("COLUMNS", "140")  # the inventory's LAST SEEN fits, FIRST SEEN does not
        lines = _printed(capsys, "--api", api.url)
        monkeypatch.setenv("COLUMNS", "200")
        roomy = _printed(capsys, "--api", api.url)
    assert max(display_width(line) for line in lines) <= 140
    header = next(line for line in lines if line.split()[:2] == ["ROLE", "IMPLEMENTATION"])
    assert header.split()[-3:] == ["LAST", "SEEN", "IDLE"]
    assert "  FIRST SEEN: left out to fit 140 columns (--wide prints every column)" in lines
    assert next(line for line in lines if line.startswith("  SEVERITY")).endswith("LAST SEEN")
    assert "left out" not in "\n".join(roomy) and _DEMO not in "\n".join(roomy)  # short names still


def test_a_class_name_two_modules_share_is_told_apart_the_same_way_in_both_tables():
    dead, live = "app.legacy.agents.SupervisorAgent", "app.ws.agents.SupervisorAgent"
    inventory = {"roles": {"supervisor": {"implementations": {dead: {"calls": 1}, live: {"calls": 2}}}}}
    incidents = {"incidents": [{"id": "a" * 16, "rule": "duplicate.execution", "severity": "warning",
                                "implementation": dead, "entry_point": "/ws", "count": 1}]}
    text = report.format_report("http://sidecar", inventory, incidents, width=120)
    assert [line.split()[:2] for line in text.splitlines() if "SupervisorAgent" in line] == [
        ["supervisor", "ws.agents.SupervisorAgent"], ["legacy.agents.SupervisorAgent", "1"],
        ["warning", "aaaaaaaaaaaaaaaa"]]
    assert "duplicate.execution  legacy.agents.SupervisorAgent  /ws" in text


def test_the_pathwatch_command_takes_wide(capsys):
    from sidecar import cli

    inventory, store = _demo_run()
    with ServedApi(store, inventory) as api:
        assert cli.main(["report", "--api", api.url, "--wide"]) == 0
    assert _DEMO + "engines.IsolatedExecutionEngine" in capsys.readouterr().out
    # --consolidation names classes as briefly (its tables are not fitted to the terminal)
    assert cli._parser().parse_args(["report", "--consolidation", "--wide"]).wide is True
    assert cli.REPORT_WIDE_HELP == report.WIDE_HELP  # the two parsers say the same
    assert _DEMO in report.format_consolidation("http://sidecar", inventory, {}, wide=True)
    assert _DEMO not in report.format_consolidation("http://sidecar", inventory, {})


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", [["report"], ["discover"]])
def test_a_reader_gone_before_the_output_is_a_quiet_exit_not_a_traceback(store, tmp_path, command,
                                                                        buffered):
    # `pathwatch report | head -1` where head has exited: BrokenPipeError's traceback on stderr, exit 1
    # (and discover's likewise), as if the sidecar could not be read. Buffered (a pipe's default,
    # without PYTHONUNBUFFERED): a short output is written by the interpreter's flush at exit, after
    # main() returned -- "Exception ignored ... BrokenPipeError" and exit 120 (/tmp/s26_rev/
    # repro_brokenpipe_buffered.sh)
    (tmp_path / "app.py").write_text("class UserExecutionEngine:\n    def execute_agent(self): ...\n")
    args = [str(tmp_path)] if command == ["discover"] else ["--api"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with ServedApi(store, INVENTORY) as api:
        if args == ["--api"]:
            args = ["--api", api.url]
        read, write = os.pipe()
        os.close(read)  # the reader has gone
        try:
            done = subprocess.run([sys.executable, "-m", "sidecar", *command, *args], stdout=write,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, timeout=60)
        finally:
            os.close(write)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as a command the signal ended


@pytest.mark.parametrize(("output", "buffered", "why"), [
    ("/dev/full", True, "No space left on device"), ("/dev/full", False, "No space left on device"),
    (None, True, "it is closed")], ids=["full-buffered", "full-unbuffered", "closed"])
def test_an_output_that_cannot_be_written_is_one_line_and_exit_1_not_a_traceback(store, output,
                                                                                  buffered, why):
    # `pathwatch report > /data/report.txt` on a full disk: OSError's traceback (ENOSPC), from the
    # print or, buffered, from the flush after main() returned; `pathwatch report >&-`: nothing
    # printed, exit code 0
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with ServedApi(store, INVENTORY) as api, open(output or os.devnull, "w") as stdout:
        done = subprocess.run([sys.executable, "-m", "sidecar", "report", "--api", api.url],
                              stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                              timeout=60, preexec_fn=None if output else lambda: os.close(1))
    assert done.stderr == f"pathwatch report: cannot write the report to its output ({why})\n"
    assert done.returncode == 1


def test_long_entry_points_are_cut_to_fit_the_terminal_saying_so():
    """Route templates of a real API (/api/v1/organizations/{org_id}/...) made the inventory's ENTRY
    POINTS cell 80 columns and the incidents' ENTRY POINT 57: with FIRST and LAST SEEN left out the
    tables were still 166 and 138 columns wide in a 120-column terminal, under a note saying they had
    been fitted to it. They are cut (…) to fit, as the notes say; --wide prints them as before."""
    routes = ["/api/v1/organizations/{org_id}/projects/{project_id}/runs",
              "/api/v1/organizations/{org_id}/chat/ws", "/ws"]
    engine = "app.services.agents.engines.RequestScopedUserExecutionEngine"
    inventory = {"roles": {"execution_engine": {"implementations": {engine: {
        "calls": 9, "canonical": True, "entry_points": {route: 5 - i for i, route in enumerate(routes)},
        "first_seen": NOW_S - 60, "last_seen": NOW_S, "idle_s": 3}}}}}
    incidents = {"incidents": [{"id": "a" * 16, "rule": "bleed.target_vs_socket_owner", "severity": "critical",
                                "implementation": engine, "entry_point": routes[0], "count": 2,
                                "last_seen_unix": NOW_S}]}
    lines = report.format_report("http://sidecar", inventory, incidents, width=120).splitlines()
    assert max(display_width(line) for line in lines) <= 120, "\n".join(lines)
    row = next(line for line in lines if line.startswith("  execution_engine"))
    assert "RequestScopedUserExecutionEngine" in row  # the class name stays whole
    assert f"{routes[0][:20]}" in row and "…" in row
    incident = next(line for line in lines if line.startswith("  critical"))
    assert "RequestScopedUserExecutionEngine" in incident and routes[0][:12] in incident
    assert "  ENTRY POINTS: cut to fit 120 columns (--wide does not cut them)" in lines
    assert "  ENTRY POINT: cut to fit 120 columns (--wide does not cut them)" in lines
    # narrower: the class names are cut too, once the entry points are down to 16 columns
    lines = report.format_report("http://sidecar", inventory, incidents, width=112).splitlines()
    assert max(display_width(line) for line in lines) <= 112, "\n".join(lines)
    assert "  ENTRY POINT, IMPLEMENTATION: cut to fit 112 columns (--wide does not cut them)" in lines
    incident = next(line for line in lines if line.startswith("  critical"))
    assert "  RequestScopedUserExecution…  /api/v1/organiz…  " in incident
    wide = report.format_report("http://sidecar", inventory, incidents, wide=True)
    assert routes[0] + " (5)" in wide and "cut to fit" not in wide
    assert f"  {routes[0]}  " in next(line for line in wide.splitlines() if line.startswith("  critical"))


@pytest.mark.parametrize("width", [60, 80])
def test_the_notes_under_the_tables_fill_their_lines(width):
    # a word and the parenthesis after it were kept on one line, as a class name and its calls are
    # in a role's summary: at 80 columns "counts calls one implementation delegates to" ended a
    # line 30 columns short, "another (those are not a path of their own);" began the next
    inventory, store = _demo_run()
    try:
        incidents = {"incidents": [incident_to_dict(i) for i in store.list_incidents()]}
    finally:
        store.close()
    text = report.format_report("http://127.0.0.1:9464", inventory, incidents, width=width)
    notes = [line for line in text.splitlines() if line.startswith("  ") and not line.startswith("   ")
             and not line.lstrip().startswith(("ROLE ", "SEVERITY "))
             and not re.match(r"  \S+\s{2,}", line)]  # a table's rows: two spaces between cells
    starts = re.compile(r"  [A-Z][A-Z ,]*: ")  # SHARE: ..., IMPLEMENTATION: ..., LAST SEEN: ...
    assert len(notes) >= 6 and any(starts.match(line) for line in notes)
    for line, following in zip(notes, notes[1:]):
        if not starts.match(following):  # the same note goes on
            assert display_width(line) + 1 + display_width(following.split()[0]) > width, (line, following)
