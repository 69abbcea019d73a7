"""What the app records itself on the span that is current — an exception it handled, a status in
its own words — leaves the process as pathwatch records the app's exceptions: by type only.

Inside a traced call the current span is pathwatch's; inside a request, outside traced calls, it is
the server span pathwatch stamps. ``trace.get_current_span().record_exception(exc)`` there put the
exception's message and stack trace on the exported span, and a status description in the app's
own words (``quota exceeded for alice``, no ``Type:`` prefix) was exported as it was.
"""

from __future__ import annotations

from fastapi import FastAPI, Header
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.testclient import TestClient

from tests.instrumentation.helpers import only_span
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine

RAW = "alice-RAWID-123"


def _texts(span) -> list[str]:
    texts = [str(v) for event in span.events for v in (event.attributes or {}).values()]
    return texts + [span.status.description or ""]


def _record_handled(user_id: str) -> None:
    """An app's error handling inside a traced call: it records a handled error on the current span."""
    span = trace.get_current_span()
    try:
        raise ValueError(f"tool failed for user {user_id}")
    except ValueError as exc:
        span.record_exception(exc, attributes={"app.user": user_id})
    span.set_status(Status(StatusCode.ERROR, f"tool failed for user {user_id}"))


def test_an_exception_the_app_records_in_a_traced_call_is_exported_by_type(instrumented, exporter):
    class Degrading(UserExecutionEngine):
        def execute_agent(self, context, user_context=None):
            _record_handled(context.user_id)
            return "degraded"

    assert Degrading().execute_agent(UserContext(RAW)) == "degraded"
    span = only_span(exporter, "execution_engine.execute_agent")
    assert [(event.name, dict(event.attributes)) for event in span.events] == [
        ("exception", {"exception.type": "ValueError", "exception.escaped": "False"})]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is None  # the app's words, not an exception's type
    assert not [text for text in _texts(span) if RAW in text]


def test_the_apps_record_and_its_own_exception_in_a_traced_call(instrumented, exporter):
    class Failing(UserExecutionEngine):
        def execute_agent(self, context, user_context=None):
            _record_handled(context.user_id)
            raise KeyError(context.user_id)

    try:
        Failing().execute_agent(UserContext(RAW))
    except KeyError as exc:
        assert exc.args == (RAW,)  # the app's exception passes through unchanged
    span = only_span(exporter, "execution_engine.execute_agent")
    assert [dict(event.attributes)["exception.type"] for event in span.events] == ["ValueError", "KeyError"]
    assert span.status.description == "KeyError"
    assert not [text for text in _texts(span) if RAW in text]


def test_a_status_the_app_sets_on_its_request_span_loses_its_words(instrumented, exporter):
    app = FastAPI()

    @app.post("/api/quota")
    async def quota(x_user_id: str = Header()) -> dict:
        span = trace.get_current_span()  # the server span: no traced call around
        span.set_status(Status(StatusCode.ERROR, f"quota exceeded for {x_user_id}"))
        span.add_event("exception", {"exception.type": "QuotaError",
                                     "exception.message": f"quota exceeded for {x_user_id}"})
        return {}

    @app.post("/api/prefixed")
    async def prefixed(x_user_id: str = Header()) -> dict:
        trace.get_current_span().set_status(Status(StatusCode.ERROR, f"{x_user_id}: over quota"))
        return {}

    with TestClient(app) as client:
        assert client.post("/api/quota", headers={"x-user-id": RAW}).status_code == 200
        assert client.post("/api/prefixed", headers={"x-user-id": "alice"}).status_code == 200
    span = only_span(exporter, "POST /api/quota")
    assert [dict(event.attributes) for event in span.events] == [{"exception.type": "QuotaError"}]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is None
    assert not [text for text in _texts(span) if RAW in text]
    # a prefix is kept only as the type of an exception recorded on the span: "alice" is none
    assert only_span(exporter, "POST /api/prefixed").status.description is None


def test_the_server_spans_own_exception_keeps_its_type(instrumented, exporter):
    app = FastAPI()

    @app.post("/api/fail")
    async def fail(x_user_id: str = Header()) -> None:
        raise KeyError(x_user_id)

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/api/fail", headers={"x-user-id": RAW}).status_code == 500
    span = only_span(exporter, "POST /api/fail")
    assert [dict(event.attributes) for event in span.events] == [
        {"exception.type": "KeyError", "exception.escaped": False}]
    assert span.status.status_code is StatusCode.ERROR
    assert not [text for text in _texts(span) if RAW in text]
