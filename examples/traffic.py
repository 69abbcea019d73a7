"""Traffic driver: N simulated users, each on a real WebSocket, running agent runs per scenario.

    observations = await drive("http://127.0.0.1:8000", ["S0", "S1"], users=20, runs_per_user=3)
    python -m examples.traffic --url http://127.0.0.1:8000 --scenarios S0,S1 --users 20

Per scenario: every user opens ``/ws?user_id=...`` and waits for ``connected``; then all users run
their runs at once (``asyncio.gather``), one after another per user, alternating HTTP
(``POST /api/runs``) and the socket (``start_run``) by default. Each run gets a thread id only its
client uses. When every run has answered, each client pings its socket and waits for the pong: the
backend writes a run's events before answering the run, so everything sent before is in by then.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from examples.agent_backend.scenarios import ALL_SCENARIOS
from examples.observations import AGENT_EVENTS, Leak, Observation, RunRecord

VIA_CHOICES = ("mixed", "http", "websocket")
#: how long an idle pooled HTTP connection may be reused. uvicorn (the demo backend, the sidecar's API)
#: closes a connection after 5 s idle, its default --timeout-keep-alive, and httpx's default keeps one
#: for 5 s too: a request sent on a connection as the server closes it fails with ReadError (httpx
#: retries none), which aborted the demo at 100 users. Well below the server's, the client lets go first.
KEEPALIVE_EXPIRY_S = 2.0


class DriveError(RuntimeError):
    """The backend could not be driven (not reachable, a socket did not open, a run never answered)."""


@dataclass(slots=True)
class _ScenarioState:
    """What all clients of one scenario share: who owns which thread, the request order, the leaks."""

    scenario: str
    thread_owner: dict[str, str] = field(default_factory=dict)
    order: itertools.count = field(default_factory=itertools.count)
    leaks: list[Leak] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class SimulatedUser:
    def __init__(self, user_id: str, index: int, base_url: str, http: httpx.AsyncClient,
                 state: _ScenarioState, timeout_s: float) -> None:
        self.user_id = user_id
        self.index = index
        self.base_url = base_url
        self.http = http
        self.state = state
        self.timeout_s = timeout_s
        self.runs: dict[str, RunRecord] = {}  # thread id -> run
        self._socket: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}  # request id / ping nonce -> reply

    # --- lifecycle ------------------------------------------------------------------------
    async def connect(self) -> None:
        url = f"{_ws_base(self.base_url)}/ws?user_id={quote(self.user_id)}"
        try:
            self._socket = await connect(url, open_timeout=self.timeout_s, max_size=2**22)
        except WebSocketException as exc:  # an answer, but not the demo backend's socket
            raise DriveError(f"no WebSocket at {url.partition('?')[0]} (is it the demo backend?): {exc}") from None
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._connected, self.timeout_s)

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def sync(self) -> None:
        """Ping and wait for the pong: every write made to this socket before is received by then."""
        nonce = uuid.uuid4().hex
        await self._request(nonce, {"type": "ping", "nonce": nonce})

    # --- runs -----------------------------------------------------------------------------
    async def run_all(self, runs: int, via: str) -> None:
        for number in range(1, runs + 1):
            await self.run_once(number, _pick_via(via, self.index, number))

    async def run_once(self, number: int, via: str) -> RunRecord:
        thread_id = f"thread-{uuid.uuid4().hex[:16]}"
        record = RunRecord(user=self.user_id, thread_id=thread_id, via=via, order=next(self.state.order))
        self.state.thread_owner[thread_id] = self.user_id
        self.runs[thread_id] = record
        # Each client numbers its requests from 1, as real clients do (S10 trips over this).
        fields = {"thread_id": thread_id, "request_id": f"req-{number}", "scenario": self.state.scenario}
        outcome = await (self._run_over_http(fields) if via == "http" else self._run_over_socket(fields))
        record.run_id = outcome.get("run_id")
        record.status = outcome.get("status")
        record.engine = outcome.get("engine")
        record.rollout_percent = outcome.get("rollout_percent")
        record.trace_id = outcome.get("trace_id")
        return record

    async def _run_over_http(self, fields: dict[str, str]) -> dict[str, Any]:
        headers = {"x-user-id": self.user_id, "x-scenario": fields["scenario"],
                   "x-request-id": fields["request_id"]}
        response = await self.http.post("/api/runs", json={"thread_id": fields["thread_id"]}, headers=headers)
        if response.status_code != 200:
            self.state.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            return {}
        return response.json()

    async def _run_over_socket(self, fields: dict[str, str]) -> dict[str, Any]:
        reply = await self._request(fields["request_id"], {"type": "start_run", **fields})
        if reply.get("type") == "error":
            self.state.errors.append(f"socket error: {reply.get('error')}")
            return {}
        return reply

    async def _request(self, key: str, message: dict[str, Any]) -> dict[str, Any]:
        if self._socket is None:
            raise DriveError("connect() first")
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            await self._socket.send(json.dumps(message))
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise DriveError(f"no answer to {message['type']!r} within {self.timeout_s}s") from None
        finally:
            self._waiting.pop(key, None)

    # --- receiving ------------------------------------------------------------------------
    async def _read(self) -> None:
        assert self._socket is not None
        try:
            async for raw in self._socket:
                self._on_message(json.loads(raw))
        except Exception as exc:  # the socket broke: unblock whoever waits
            for future in [self._connected, *self._waiting.values()]:
                if not future.done():
                    future.set_exception(DriveError(f"socket closed: {exc!r}"))

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in AGENT_EVENTS:
            self._on_event(kind, message)
        elif kind == "connected" and not self._connected.done():
            self._connected.set_result(None)
        elif kind in ("run_finished", "pong", "error"):
            key = message.get("request_id") if kind != "pong" else message.get("nonce")
            future = self._waiting.get(key) if key else None
            if future is not None and not future.done():
                future.set_result(message)
            elif kind == "error":
                self.state.errors.append(f"socket error: {message.get('error')}")

    def _on_event(self, kind: str, message: dict[str, Any]) -> None:
        thread_id = message.get("thread_id")
        record = self.runs.get(thread_id) if isinstance(thread_id, str) else None
        if record is None:
            owner = self.state.thread_owner.get(thread_id) if isinstance(thread_id, str) else None
            self.state.leaks.append(Leak(recipient=self.user_id, owner=owner, run_id=message.get("run_id"),
                                         thread_id=thread_id, event_type=kind))
            return
        record.received[kind] += 1
        engine = (message.get("payload") or {}).get("engine")
        if engine:
            record.event_engines.add(engine)


def _pick_via(via: str, index: int, number: int) -> str:
    if via == "mixed":
        return "http" if (index + number) % 2 == 0 else "websocket"
    return via


def _ws_base(base_url: str) -> str:
    parts = urlsplit(base_url.rstrip("/"))
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return urlunsplit(("ws" if parts.scheme == "http" else "wss", parts.netloc, parts.path, "", ""))


async def drive_scenario(base_url: str, scenario: str, http: httpx.AsyncClient, *, users: int,
                         runs_per_user: int, via: str, timeout_s: float) -> Observation:
    state = _ScenarioState(scenario)
    clients = [SimulatedUser(f"user-{i + 1:02d}", i, base_url, http, state, timeout_s) for i in range(users)]
    try:
        await asyncio.gather(*(client.connect() for client in clients))
        await asyncio.gather(*(client.run_all(runs_per_user, via) for client in clients))
        await asyncio.gather(*(client.sync() for client in clients))
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    runs = [run for client in clients for run in client.runs.values()]
    return Observation(scenario=scenario, runs=runs, leaks=state.leaks, errors=state.errors)


async def drive(base_url: str, scenarios: Sequence[str], users: int = 20, runs_per_user: int = 3, *,
                via: str = "mixed", timeout_s: float = 30.0) -> dict[str, Observation]:
    """Drive each scenario in turn with ``users`` concurrent clients; return what the clients saw."""
    _check_arguments(scenarios, users, runs_per_user, via)
    limits = httpx.Limits(max_connections=users + 8, max_keepalive_connections=users + 8,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    results: dict[str, Observation] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as http:
        for scenario in scenarios:
            results[scenario] = await drive_scenario(base_url, scenario, http, users=users,
                                                     runs_per_user=runs_per_user, via=via,
                                                     timeout_s=timeout_s)
    return results


def _check_arguments(scenarios: Sequence[str], users: int, runs_per_user: int, via: str) -> None:
    if isinstance(scenarios, str) or not scenarios:
        raise ValueError(f"scenarios must be a non-empty list like ['S0', 'S1'], got {scenarios!r}")
    known = [scenario.value for scenario in ALL_SCENARIOS]
    unknown = [scenario for scenario in scenarios if scenario not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(map(str, unknown))}; expected some of {', '.join(known)}")
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if runs_per_user < 1:
        raise ValueError(f"runs_per_user must be >= 1, got {runs_per_user}")
    if via not in VIA_CHOICES:
        raise ValueError(f"via must be one of {VIA_CHOICES}, got {via!r}")


# --- command line --------------------------------------------------------------------------
_COLUMNS = ("scenario", "runs", "expected", "received", "missing", "dups", "leaks", "pairs", "2-exec",
            "canonical share by third", "clean")


def format_table(observations: dict[str, Observation]) -> str:
    rows = [_COLUMNS]
    for observation in observations.values():
        s = observation.summary()
        shares = " -> ".join("-" if share is None else f"{share:.0%}"
                             for share in s["canonical_share_by_third"])
        rows.append((s["scenario"], s["runs_started"], s["events_expected"], s["events_received"],
                     s["missing_events"], s["duplicate_events"], s["leaked_events"], s["leak_pairs"],
                     s["runs_with_two_executions"], shares, "yes" if s["clean"] else "no"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the running demo backend")
    parser.add_argument("--scenarios", default="S0", help="comma-separated, e.g. S0,S1,S10")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="runs per user and scenario")
    parser.add_argument("--via", choices=VIA_CHOICES, default="mixed")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for any one answer")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON instead of a table")
    args = parser.parse_args(argv)
    scenarios = [name.strip().upper() for name in args.scenarios.split(",") if name.strip()]
    try:
        observations = asyncio.run(drive(args.url, scenarios, args.users, args.runs, via=args.via,
                                         timeout_s=args.timeout))
    except (ValueError, DriveError, OSError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({name: obs.summary() for name, obs in observations.items()}, indent=2))
    else:
        print(format_table(observations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
