"""A JWT in the request's URL — the usual way a browser authenticates a WebSocket
(``/ws?token=<jwt>``, it cannot set ``Authorization``), an ``access_token`` parameter, a magic link's
path — carries its claims (``sub``, ``email``) in base64url: the user id in a form anyone reverses.
It was exported as sent in ``http.url``, ``http.target`` and ``url.query``/``url.path``; it is a
credential besides, and is exported as ``[REDACTED]``, as the ``Authorization`` header is.
"""

from __future__ import annotations

import base64
import json

from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient

from tests.instrumentation.helpers import attrs, only_span

RAW = "alice-RAWID@example.com"


def _jwt(claims: dict, signed: bool = True) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}." + ("c2lnbmF0dXJl" if signed else "")


def _url_texts(exporter) -> list[tuple[str, str, str]]:
    return [(span.name, key, str(value)) for span in exporter.get_finished_spans()
            for key, value in attrs(span).items() if key.startswith(("http.", "url."))]


def _app() -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket, token: str) -> None:
        await websocket.accept()
        await websocket.send_json({"type": "hello"})
        await websocket.close()

    @app.get("/api/items")
    async def items(access_token: str, page: int = 1) -> dict:
        return {}

    @app.get("/magic/{token}")
    async def magic(token: str) -> dict:
        return {}

    return app


def test_a_jwt_in_a_sockets_query_is_redacted(instrumented, exporter):
    token = _jwt({"sub": RAW, "email": RAW})
    with TestClient(_app()) as client:
        with client.websocket_connect(f"/ws?token={token}") as ws:
            ws.receive_json()
    span = attrs(only_span(exporter, "HTTP /ws"))
    assert span["http.url"].endswith("/ws?token=[REDACTED]")
    assert span["http.target"] == "/ws"  # no query there, as the instrumentation sets it
    assert not [text for text in _url_texts(exporter) if token.split(".")[1] in text[2]]


def test_a_jwt_in_a_query_parameter_or_a_path_segment(instrumented, exporter):
    unsigned = _jwt({"sub": RAW}, signed=False)
    signed = _jwt({"sub": RAW})
    with TestClient(_app()) as client:
        assert client.get(f"/api/items?page=2&access_token={unsigned}").status_code == 200
        assert client.get(f"/magic/{signed}").status_code == 200
    items = attrs(only_span(exporter, "GET /api/items"))
    assert items["http.url"].endswith("/api/items?page=2&access_token=[REDACTED]")
    magic = attrs(only_span(exporter, "GET /magic/{token}"))
    assert magic["http.target"] == "/magic/[REDACTED]"
    payloads = (unsigned.split(".")[1], signed.split(".")[1])
    assert not [text for text in _url_texts(exporter) if any(p in text[2] for p in payloads)]


def test_dotted_values_that_are_no_token_stay(instrumented, exporter):
    with TestClient(_app()) as client:
        client.get("/api/items?access_token=v1.2.3&page=2")
        client.get("/magic/abc.def.ghi")
    assert attrs(only_span(exporter, "GET /api/items"))["http.url"].endswith("access_token=v1.2.3&page=2")
    assert attrs(only_span(exporter, "GET /magic/{token}"))["http.target"] == "/magic/abc.def.ghi"
