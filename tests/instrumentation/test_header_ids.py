"""Captured headers whose value is one of the request's user ids: a response header echoing the
user (``X-User-Id`` set again on the answer, as gateways do) and a request header no identity source
reads (``X-Forwarded-User`` beside the ``X-User-Id`` the path map names) were exported with the raw
id while the span's own user was its pseudonym (review s30, /tmp/s30_priv/probe_late_user.py)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient

from instrumentation.identity import Pseudonymizer
from tests.instrumentation.helpers import attrs, only_span, pseudonym

RAW = "alice-RAWID"


@pytest.fixture
def capture(monkeypatch):
    # read when the app's middleware stack is built (its first request)
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", "x-user-id,x-other")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST",
                       "x-user-id,x-forwarded-user,x-other")


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({}, headers={"x-user-id": request.headers["x-user-id"],
                                         "x-other": f"user {RAW}"})

    return app


def _leaks(exporter) -> list:
    return [(span.name, key, value) for span in exporter.get_finished_spans()
            for key, value in attrs(span).items()
            if RAW in str(value) and key != "http.response.header.x_other"]


def test_a_header_echoing_the_requests_user(capture, instrumented, exporter):
    with TestClient(_app()) as client:
        response = client.get("/echo", headers={"x-user-id": RAW, "x-forwarded-user": f" {RAW} ",
                                                "x-other": "no user"})
    assert response.headers["x-user-id"] == RAW  # the app's answer as ever
    span = attrs(only_span(exporter, "GET /echo"))
    assert span["http.response.header.x_user_id"] == (pseudonym(RAW),)
    assert span["http.request.header.x_forwarded_user"] == (pseudonym(RAW),)
    assert span["http.request.header.x_user_id"] == (pseudonym(RAW),)
    assert span["http.request.header.x_other"] == ("no user",)  # other values stay
    # an id inside a longer value is not recognised (docs/conventions.md)
    assert span["http.response.header.x_other"] == (f"user {RAW}",)
    assert _leaks(exporter) == []


def test_a_request_pathwatchs_middleware_never_saw(capture, instrumented, exporter):
    """A request an outer middleware of the app answers itself is scrubbed the same way."""
    app = _app()

    @app.middleware("http")
    async def deny(request: Request, call_next):
        return JSONResponse({}, status_code=401, headers={"x-user-id": request.headers["x-user-id"]})

    with TestClient(app) as client:
        assert client.get("/echo", headers={"x-user-id": RAW}).status_code == 401
    span = attrs(only_span(exporter, "GET /echo"))
    assert span["http.response.header.x_user_id"] == (pseudonym(RAW),)
    assert _leaks(exporter) == []


def test_raw_ids_allowed_leave_the_headers_as_they_are(capture, instrument, exporter):
    instrument(pseudonymizer=Pseudonymizer(None, allow_raw=True))
    with TestClient(_app()) as client:
        client.get("/echo", headers={"x-user-id": RAW, "x-forwarded-user": RAW})
    span = attrs(only_span(exporter, "GET /echo"))
    assert span["http.response.header.x_user_id"] == (RAW,)
    assert span["http.request.header.x_forwarded_user"] == (RAW,)
