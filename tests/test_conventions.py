"""docs/conventions.md, instrumentation/attributes.py and the spans the code really emits agree."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

import instrumentation
from instrumentation import attributes
from instrumentation.attributes import SpanKinds

DOC = Path(__file__).resolve().parents[1] / "docs" / "conventions.md"
PATHMAP = Path(__file__).resolve().parent / "instrumentation" / "sample" / "pathmap.yaml"
# keys the FastAPI/ASGI instrumentation sets on request spans: not pathwatch's
FOREIGN_PREFIXES = ("http.", "net.", "url.", "server.", "client.", "network.", "user_agent.")


def _section(title: str) -> str:
    text = DOC.read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def documented_attributes() -> dict[str, tuple[str, str]]:
    """attribute -> (type, present on), from the table of the Attributes section."""
    rows = {}
    for line in _section("Attributes").splitlines():
        match = re.match(r"^\| `([^`]+)` \| ([\w\[\]]+) \| .* \| ([^|]+) \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3).strip())
    return rows


def documented_kinds() -> set[str]:
    return set(re.findall(r"^\| `(\w+)` \|", _section("Span kinds (`pathwatch.kind`)"), re.M))


def kinds_present_on(key: str, present_on: str, table: dict[str, tuple[str, str]]) -> set[str]:
    alias = re.match(r"as `([^`]+)`", present_on)
    if alias:
        return kinds_present_on(alias.group(1), table[alias.group(1)][1], table)
    if "every pathwatch span" in present_on:
        return set(SpanKinds.ALL)
    if "every span under a request" in present_on:
        return set(SpanKinds.ALL) - {SpanKinds.HEARTBEAT}
    named = {kind for kind in SpanKinds.ALL if re.search(rf"\b{kind}\b", present_on)}
    return named or set(SpanKinds.ROLE_KINDS)  # "spans of roles with ..."


def test_the_attribute_table_equals_the_contract_module():
    assert set(documented_attributes()) == set(attributes.SPAN_ATTRIBUTES)


def test_the_kind_table_equals_the_contract_module():
    assert documented_kinds() == set(SpanKinds.ALL)


def test_outcome_values_are_documented():
    row = [line for line in _section("Attributes").splitlines() if "`pathwatch.delivery.outcome`" in line][0]
    assert set(re.findall(r"`(\w+)`", row)) - {"pathwatch"} >= set(attributes.DeliveryOutcomes.ALL)


def _full_scenario(monkeypatch, raw_ids: bool) -> list:
    """Every span kind, through a real FastAPI app, real sockets and every method kind."""
    if raw_ids:
        monkeypatch.delenv("PATHWATCH_HMAC_KEY", raising=False)
        monkeypatch.setenv("PATHWATCH_ALLOW_RAW_USER_IDS", "1")
    else:
        monkeypatch.setenv("PATHWATCH_HMAC_KEY", "conventions-test-key")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = instrumentation.instrument(PATHMAP, tracer_provider=provider, heartbeat_interval_s=0)
    try:
        from tests.instrumentation.sample.app import build_app
        from tests.instrumentation.sample.engines import (RequestScopedExecutionEngine, UserContext,
                                                          UserExecutionEngine)

        app, _ = build_app()
        with TestClient(app) as client:
            with client.websocket_connect("/ws?user_id=alice") as ws:
                client.post("/api/runs/r1", headers={"x-user-id": "alice"})
                client.post("/api/later/r0", headers={"x-user-id": "alice"})  # a background task
                ws.receive()
                for message, replies in (({"type": "run", "run_id": "r2"}, 3),
                                         ({"type": "queued", "run_id": "r3"}, 3),
                                         ({"type": "raw", "run_id": "r4"}, 4),
                                         ({"type": "broadcast", "run_id": "r6"}, 2),
                                         ({"type": "dispatch_nobody", "run_id": "r5"}, 1),
                                         ({"type": "login", "user_id": "bob"}, 1)):
                    ws.send_json(message)
                    for _ in range(replies):
                        ws.receive()
            with client.websocket_connect("/ws?user_id=alice") as ws:  # more users than listed
                for user in (*RELOGINS, "bob"):
                    ws.send_json({"type": "login", "user_id": user})
                    ws.receive()
        engine = UserExecutionEngine(UserContext("bob"))
        list(engine.stream_steps(UserContext("bob")))
        UserExecutionEngine.build(UserContext("bob"))
        RequestScopedExecutionEngine(UserContext("bob")).execute_agent(UserContext("bob"))  # nested
        announce_in_an_execution()

        class Stopped(UserExecutionEngine):
            async def execute_async(self, context, *, delay=0.0):
                raise asyncio.CancelledError  # as when its task is cancelled: pathwatch.cancelled

        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(Stopped(UserContext("bob")).execute_async(UserContext("bob")))
    finally:
        instrumentation.uninstrument()  # the final heartbeat
    assert instrumentor.heartbeat is None
    # the FastAPI instrumentation's own span around each background task (not pathwatch's)
    return [span for span in exporter.get_finished_spans() if not span.name.startswith("BackgroundTask ")]


def announce_in_an_execution() -> None:
    """An engine that emits inside its call: the emit names that execution."""
    from tests.instrumentation.sample.emitters import QueuedEmitter
    from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine

    class AnnouncingEngine(UserExecutionEngine):  # defined after instrument(): wrapped as the role's
        def execute_agent(self, context, user_context=None):
            QueuedEmitter(context.user_id).notify_tool_executing(context.run_id, "search")
            return "announced"

    AnnouncingEngine(UserContext("bob", run_id="r7")).execute_agent(UserContext("bob", run_id="r7"))


#: users logging in one after another on one socket: with alice and bob, more than a request span lists
RELOGINS = tuple(f"user-{n}" for n in range(attributes.MAX_CONNECTION_USERS))


def pathwatch_keys(span) -> set[str]:
    return {key for key in (span.attributes or {}) if not key.startswith(FOREIGN_PREFIXES)
            or key in attributes.SPAN_ATTRIBUTES}


def test_emitted_spans_use_only_and_all_documented_keys_on_the_documented_kinds(monkeypatch):
    table = documented_attributes()
    spans = _full_scenario(monkeypatch, raw_ids=False) + _full_scenario(monkeypatch, raw_ids=True)
    seen_kinds, seen_keys = set(), set()
    for span in spans:
        kind = (span.attributes or {}).get(attributes.SPAN_KIND)
        assert kind in SpanKinds.ALL, f"span {span.name!r} has no pathwatch kind"
        seen_kinds.add(kind)
        for key in pathwatch_keys(span):
            assert key in table, f"{span.name}: undocumented attribute {key!r}"
            allowed = kinds_present_on(key, table[key][1], table)
            assert kind in allowed, f"{span.name}: {key!r} on a {kind} span; the doc says {table[key][1]!r}"
            seen_keys.add(key)
    assert seen_kinds == set(SpanKinds.ALL)
    assert seen_keys == set(attributes.SPAN_ATTRIBUTES)


def test_documented_types_match_emitted_values(monkeypatch):
    table = documented_attributes()
    python_types = {"string": str, "bool": bool, "int": int, "double": float, "string[]": tuple}
    checked = set()
    for span in _full_scenario(monkeypatch, raw_ids=False):
        for key in pathwatch_keys(span):
            expected = python_types[table[key][0]]
            assert type(span.attributes[key]) is expected, (span.name, key, span.attributes[key])
            if table[key][0] == "string[]":
                assert span.attributes[key] and all(type(value) is str for value in span.attributes[key])
            checked.add(key)
    # every documented attribute's type was checked on a real value (the raw id only with raw_ids)
    assert checked == set(attributes.SPAN_ATTRIBUTES) - {attributes.ENDUSER_ID}


def test_emitted_values_have_the_documented_formats(monkeypatch):
    """The formats and enums the Attributes and Span names sections give, on the spans the code
    really emits (the type test above checks only the Python types)."""
    import hashlib
    import hmac

    key = "conventions-test-key"
    spans = _full_scenario(monkeypatch, raw_ids=False)
    users = {hmac.new(key.encode(), raw.encode(), hashlib.sha256).hexdigest()[:32]
             for raw in ("alice", "bob", "nobody", *RELOGINS)}
    span_ids = {format(span.context.span_id, "016x"): span for span in spans}
    tokens = set()
    executions = requested = 0
    for span in spans:
        a = span.attributes
        kind = a[attributes.SPAN_KIND]
        for user_key in (attributes.ENDUSER_PSEUDO_ID, attributes.USER_OWNER, attributes.USER_SUBJECT,
                         attributes.USER_TARGET, attributes.CONNECTION_USER):
            if user_key in a:
                assert a[user_key] in users, (span.name, user_key, a[user_key])
        if attributes.CONNECTION_USERS in a:  # alice's sockets, where bob (and others) logged in
            truncated = a.get(attributes.CONNECTION_USERS_TRUNCATED)
            had = ("alice", *RELOGINS) if truncated else ("alice", "bob")
            assert list(a[attributes.CONNECTION_USERS]) == [
                hmac.new(key.encode(), raw.encode(), hashlib.sha256).hexdigest()[:32]
                for raw in had][:attributes.MAX_CONNECTION_USERS]
            assert truncated in (None, True) and a[attributes.PSEUDONYM_KEY_ID]
        for id_key, letter in ((attributes.INSTANCE_ID, "i"), (attributes.CONNECTION_ID, "c")):
            if id_key in a:
                match = re.fullmatch(rf"{letter}-(\w+)-[1-9][0-9]*", a[id_key])
                assert match, (span.name, id_key, a[id_key])
                tokens.add(match.group(1))
        if kind == SpanKinds.EMIT:
            match = re.fullmatch(r"e-(\w+)-[1-9][0-9]*", a[attributes.MESSAGING_MESSAGE_ID])
            assert match, (span.name, a[attributes.MESSAGING_MESSAGE_ID])
            tokens.add(match.group(1))
        if attributes.NESTED_OUTER in a:
            outer = span_ids[a[attributes.NESTED_OUTER]]  # 16 lowercase hex: a span id of the trace
            assert re.fullmatch(r"[0-9a-f]{16}", a[attributes.NESTED_OUTER])
            assert outer.attributes[attributes.ROLE] == a[attributes.ROLE] and a[attributes.NESTED]
            assert attributes.CALLER not in a  # execute spans: only when not nested
        if attributes.EXECUTION_SPAN_ID in a:  # 16 lowercase hex: an execution of its run around it
            assert re.fullmatch(r"[0-9a-f]{16}", a[attributes.EXECUTION_SPAN_ID])
            execution = span_ids[a[attributes.EXECUTION_SPAN_ID]]
            assert execution.attributes[attributes.SPAN_KIND] == SpanKinds.EXECUTE
            assert not execution.attributes[attributes.NESTED]
            assert execution.attributes[attributes.RUN_ID] == a[attributes.RUN_ID]
            assert execution.context.trace_id == span.context.trace_id
            assert execution.start_time <= span.start_time <= span.end_time <= execution.end_time
            executions += 1
        if attributes.REQUEST_SPAN_ID in a:  # 16 lowercase hex: the request span it ran under
            assert re.fullmatch(r"[0-9a-f]{16}", a[attributes.REQUEST_SPAN_ID])
            request = span_ids[a[attributes.REQUEST_SPAN_ID]]
            assert request.attributes[attributes.SPAN_KIND] == SpanKinds.REQUEST
            assert request.context.trace_id == span.context.trace_id
            assert kind != SpanKinds.REQUEST
            requested += 1
        assert a.get(attributes.MESSAGING_OPERATION_TYPE) == {
            SpanKinds.EMIT: "create", SpanKinds.DELIVER: "send"}.get(kind)
        if kind == SpanKinds.DELIVER:
            assert a[attributes.DELIVERY_LINK] in {"context", "message_key", "none"}
            assert a[attributes.DELIVERY_OUTCOME] in {"written", "failed", "closed"}
        if kind == SpanKinds.DISPATCH:
            assert a[attributes.DELIVERY_OUTCOME] in {"written", "failed", "no_connection"}
        if kind in SpanKinds.ROLE_KINDS:  # span names
            method = a[attributes.CODE_FUNCTION_NAME].rsplit(".", 1)[1]
            role = a[attributes.ROLE]
            assert span.name == (f"websocket.{method}" if role == "transport" else f"{role}.{method}")
        if kind == SpanKinds.HEARTBEAT:
            assert span.name == attributes.HEARTBEAT_SPAN_NAME and span.parent is None
            # the periodic beat is off here: the heartbeats are the lifespan shutdown's and
            # uninstrument()'s, each the process's last so far (a clean stop)
            assert a[attributes.HEARTBEAT_FINAL] is True
        if kind == SpanKinds.REQUEST:
            assert a[attributes.ENTRY_POINT] == a["http.route"]
    assert len(tokens) == 1  # one process token
    assert executions == 1  # the emit made inside an execution
    assert requested > 10  # every span made in the scenario's requests and sockets


def test_raw_user_ids_are_enduser_id_on_every_span(monkeypatch):
    spans = _full_scenario(monkeypatch, raw_ids=True)
    assert not any(attributes.ENDUSER_PSEUDO_ID in span.attributes for span in spans)
    assert {span.attributes[attributes.SPAN_KIND] for span in spans
            if span.attributes.get(attributes.ENDUSER_ID) == "alice"} == SpanKinds.ALL - {SpanKinds.HEARTBEAT}


def test_a_request_no_route_matched_has_the_unmatched_entry_point(monkeypatch):
    """A raw path is unbounded and may carry ids: ``<unmatched>`` instead."""
    monkeypatch.setenv("PATHWATCH_HMAC_KEY", "conventions-test-key")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentation.instrument(PATHMAP, tracer_provider=provider, heartbeat_interval_s=0)
    try:
        from tests.instrumentation.sample.app import build_app

        app, _ = build_app()
        with TestClient(app) as client:
            assert client.get("/users/alice/nothing", headers={"x-user-id": "alice"}).status_code == 404
    finally:
        instrumentation.uninstrument()
    (request,) = [span for span in exporter.get_finished_spans()
                  if span.attributes.get(attributes.SPAN_KIND) == SpanKinds.REQUEST]
    assert request.attributes[attributes.ENTRY_POINT] == "<unmatched>"


def test_the_emit_tables_bounds_in_the_doc_are_the_codes():
    # the doc said 32 emits of one key after the code had moved to 512: an operator sizing the
    # backend's memory (the table has no time limit, so it fills) read the old bound
    from instrumentation.linking import MAX_EMITS, MAX_EMITS_PER_KEY

    text = " ".join(DOC.read_text().split())
    found = re.search(r"The table holds at most (\d+) emits in all \(.*?\) and (\d+) of one key", text)
    assert found, "docs/conventions.md no longer states the emit table's bounds"
    assert (int(found.group(1)), int(found.group(2))) == (MAX_EMITS, MAX_EMITS_PER_KEY)
