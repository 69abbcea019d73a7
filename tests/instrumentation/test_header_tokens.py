"""A JWT in a captured header no identity source reads: ``Authorization: Bearer <jwt>`` where the
path map reads the user from another header, the token a browser sends a WebSocket in
``Sec-WebSocket-Protocol``, a session cookie, a ``Set-Cookie`` of the response. With header capture
on (``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_*``) it was exported as sent: its claims are
the user id in base64url. The token is replaced by ``[REDACTED]``, the rest of the value kept.
"""

from __future__ import annotations

import base64
import json

import pytest
from fastapi import FastAPI, Header, Response, WebSocket
from starlette.testclient import TestClient

from tests.instrumentation.helpers import attrs, only_span

RAW = "alice-RAWID@example.com"


def _jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256', 'kid': 'k1'})}.{part(claims)}.c2lnbmF0dXJlLXNpZw"


@pytest.fixture
def capture(monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE", ".*")


@pytest.fixture
def header_identity(instrument, tmp_path):
    pathmap = tmp_path / "pathmap.yaml"  # the user from x-user-id: no source reads Authorization
    pathmap.write_text("version: 1\nidentity:\n  http: [{header: x-user-id}]\n"
                       "  websocket: [{header: x-user-id}]\n")
    instrument(pathmap)


def _app(token: str) -> FastAPI:
    app = FastAPI()

    @app.get("/api/me")
    async def me(response: Response, x_user_id: str = Header()) -> dict:
        response.set_cookie("session", token, httponly=True)
        return {}

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="access_token")
        await websocket.close()

    return app


def _payload_leaks(exporter, token: str) -> list:
    payload = token.split(".")[1]
    return [(span.name, key) for span in exporter.get_finished_spans()
            for key, value in attrs(span).items() if payload in str(value)]


def test_tokens_in_captured_headers_are_redacted(capture, header_identity, exporter):
    token = _jwt({"sub": RAW, "email": RAW})
    with TestClient(_app(token)) as client:
        client.get("/api/me", headers={"x-user-id": "u-1", "authorization": f"Bearer {token}",
                                        "cookie": f"theme=dark; session={token}"})
        with client.websocket_connect("/ws", subprotocols=["access_token", token],
                                      headers={"x-user-id": "u-1"}):
            pass
    me = attrs(only_span(exporter, "GET /api/me"))
    assert me["http.request.header.authorization"] == ("Bearer [REDACTED]",)
    assert me["http.request.header.cookie"] == ("theme=dark; session=[REDACTED]",)
    assert me["http.response.header.set_cookie"][0].startswith("session=[REDACTED];")
    socket = attrs(only_span(exporter, "HTTP /ws"))
    assert socket["http.request.header.sec_websocket_protocol"] == ("access_token, [REDACTED]",)
    assert _payload_leaks(exporter, token) == []
