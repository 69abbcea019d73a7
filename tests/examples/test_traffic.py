"""The traffic driver: how observations are judged, argument checks, and the CLI against a backend."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections import Counter

import pytest

from examples.agent_backend.server import BackendProcess
from examples.observations import REQUIRED_EVENTS, Leak, Observation, RunRecord
from examples.traffic import _ws_base, drive, main


def _run(received: dict[str, int], order: int = 0, engine: str = "UserExecutionEngine") -> RunRecord:
    return RunRecord(user="u1", thread_id=f"t{order}", via="http", order=order, status="completed",
                     engine=engine, received=Counter(received))


def test_missing_counts_the_terminal_event_once_and_accepts_agent_error() -> None:
    assert _run({}).missing() == list(REQUIRED_EVENTS)
    errored = _run({kind: 1 for kind in REQUIRED_EVENTS[:-1]} | {"agent_error": 1})
    assert errored.missing() == []


def test_duplicates_count_copies_beyond_the_first() -> None:
    run = _run({"agent_started": 3, "agent_thinking": 1})
    assert run.duplicates() == {"agent_started": 2}


def test_observation_summary_and_canonical_share_by_third() -> None:
    runs = [_run({k: 1 for k in REQUIRED_EVENTS}, order=i,
                 engine="IsolatedExecutionEngine" if i < 3 else "UserExecutionEngine") for i in range(6)]
    observation = Observation("S11", runs, leaks=[])
    assert [observation.canonical_share(i) for i in range(3)] == [0.0, 0.5, 1.0]
    assert observation.summary()["clean"] is True and observation.summary()["events_received"] == 30
    leaked = Observation("S1", runs, leaks=[Leak("u2", "u1", "r", "t0", "tool_executing")] * 2)
    assert leaked.summary()["leaked_events"] == 2 and leaked.leak_pairs() == Counter({("u1", "u2"): 2})
    assert not leaked.is_clean


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="base_url must start with http"):
        _ws_base("ftp://x")
    assert _ws_base("https://h:1/") == "wss://h:1"
    for kwargs, text in (({"scenarios": "S0"}, "scenarios"), ({"users": 0}, "users"),
                         ({"runs_per_user": 0}, "runs_per_user"), ({"via": "pigeon"}, "via")):
        arguments = {"scenarios": ["S0"], **kwargs}
        with pytest.raises(ValueError, match=text):
            asyncio.run(drive("http://127.0.0.1:1", **arguments))


def test_drive_over_one_transport_only(backend: BackendProcess) -> None:
    observations = asyncio.run(drive(backend.url, ["S0"], users=3, runs_per_user=2, via="websocket"))
    s0 = observations["S0"]
    assert {run.via for run in s0.runs} == {"websocket"} and s0.runs_started == 6 and s0.is_clean


def test_cli_prints_a_table(backend: BackendProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", backend.url, "--scenarios", "S0,S6", "--users", "3", "--runs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["scenario", "runs", "expected"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["S0"][1:6] == ["3", "15", "15", "0", "0"] and rows["S0"][-1] == "yes"
    assert rows["S6"][1:6] == ["3", "15", "45", "0", "30"] and rows["S6"][-1] == "no"


def test_cli_reports_an_unreachable_backend(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support import free_port

    assert main(["--url", f"http://127.0.0.1:{free_port()}", "--users", "1", "--timeout", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_refuses_an_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://127.0.0.1:1", "--scenarios", "S0,S99", "--users", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown scenario(s) S99; expected some of S0, S1,")


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass


def test_cli_reports_a_server_that_is_not_the_demo_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietFiles) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            assert main(["--url", url, "--users", "1", "--timeout", "5"]) == 2
        finally:
            server.shutdown()
    err = capsys.readouterr().err
    assert err.startswith(f"error: no WebSocket at ws://127.0.0.1:{server.server_address[1]}/ws")
    assert "Traceback" not in err
