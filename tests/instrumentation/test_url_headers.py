"""Captured headers whose value is a URL carry the request's user ids as its URL does: a redirect's
``Location`` (FastAPI's own trailing-slash redirect echoes the path), ``Content-Location``, and the
request's ``Referer``. With header capture on (``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_*``),
``http.url`` had the id's pseudonym while ``http.response.header.location`` had the raw id.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Header
from fastapi.responses import RedirectResponse
from starlette.testclient import TestClient

from tests.instrumentation.helpers import attrs, only_span, pseudonym

RAW = "alice-RAWID"


@pytest.fixture
def capture(monkeypatch):
    # read when the app's middleware stack is built (its first request)
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", "referer")


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/users/{user_id}/items")
    async def items(user_id: str, x_user_id: str = Header()) -> dict:
        return {}

    @app.get("/me")
    async def me(x_user_id: str = Header()) -> RedirectResponse:
        return RedirectResponse(f"/users/{x_user_id}/items?user_id={x_user_id}&tab=runs",
                                headers={"content-location": f"https://example.com/users/{x_user_id}"})

    return app


def _leaks(exporter) -> list:
    return [(span.name, key, value) for span in exporter.get_finished_spans()
            for key, value in attrs(span).items() if RAW in str(value)]


def test_the_trailing_slash_redirect_of_a_users_path(capture, instrumented, exporter):
    with TestClient(_app()) as client:
        response = client.get(f"/users/{RAW}/items/", headers={"x-user-id": RAW},
                              follow_redirects=False)
    assert response.headers["location"].endswith(f"/users/{RAW}/items")  # the app's answer as ever
    span = only_span(exporter, "GET")
    assert attrs(span)["http.response.header.location"] == (
        f"http://testserver/users/{pseudonym(RAW)}/items",)
    assert _leaks(exporter) == []


def test_an_apps_redirect_to_its_users_urls(capture, instrument, exporter, tmp_path):
    pathmap = tmp_path / "pathmap.yaml"
    pathmap.write_text("version: 1\nidentity:\n  http: [{header: x-user-id}, {query_param: user_id}]\n")
    instrument(pathmap)
    with TestClient(_app()) as client:
        client.get("/me", headers={"x-user-id": RAW, "referer": f"https://example.com/users/{RAW}/home"},
                   follow_redirects=False)
    span = attrs(only_span(exporter, "GET /me"))
    assert span["http.response.header.location"] == (
        f"/users/{pseudonym(RAW)}/items?user_id={pseudonym(RAW)}&tab=runs",)
    assert span["http.response.header.content_location"] == (
        f"https://example.com/users/{pseudonym(RAW)}",)
    assert span["http.request.header.referer"] == (f"https://example.com/users/{pseudonym(RAW)}/home",)
    assert _leaks(exporter) == []
