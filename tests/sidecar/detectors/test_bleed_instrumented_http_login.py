"""Bleed on HTTP requests whose user the app names after pathwatch's middleware saw them, on the
spans the instrumentation really makes: a FastAPI dependency that authenticates the request and
stores its user in ``request.state`` (``{scope: state.user_id}``), and Starlette's
``AuthenticationMiddleware`` on a ``Mount`` (it runs after pathwatch's middleware) setting
``scope["user"]`` to a user object (``{scope: user.id}``); and requests whose user the app changes
(an endpoint that logs in as another user). Real FastAPI apps, the spans encoded as
an OTLP request and decoded by the sidecar's ``SpanDecoder``."""

from __future__ import annotations

import itertools

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, Request
from opentelemetry import propagate
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from sidecar.detectors.bleed import BleedDetector
from sidecar.rules import (BLEED_OWNER_VS_AMBIENT, BLEED_SHARED_INSTANCE, BLEED_SPAN_VS_ROOT_USER,
                           BLEED_SUBJECT_VS_AMBIENT)
from tests.sidecar.detectors.factory import NOW, S, rules, state
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend
from tests.token_auth import TOKENS, TokenBackend

PATHMAP = """\
version: 1
identity:
  http: [{scope: state.user_id}, {scope: user.id}, {header: x-user-id}]
roles:
  execution_engine:
    kind: execute
    implementations: [{module}.Engine]
    methods: [execute_agent]
    user_scoped: true
    owner: [self.user_id]
    subject: [arg.user_id]
"""
BACKEND = """\
class Engine:
    def __init__(self, user_id):
        self.user_id = user_id

    async def execute_agent(self, user_id):
        return user_id
"""
_modules = itertools.count()


@pytest.fixture
def backend(tmp_path, monkeypatch):
    with instrumented_backend(tmp_path, monkeypatch, f"pw_http_login_{next(_modules)}", BACKEND,
                              PATHMAP) as backend:
        yield backend


def dependency_app(module) -> FastAPI:
    """``POST /runs``: the request's user from a dependency (``request.state.user_id``); the run
    is for ``?for_user=`` when given (the bleed: another user's engine in alice's request)."""
    app = FastAPI()

    async def current_user(request: Request, x_token: str = Header()) -> str:
        request.state.user_id = TOKENS[x_token]
        return request.state.user_id

    @app.post("/runs")
    async def runs(user: str = Depends(current_user), for_user: str | None = None) -> dict:
        who = for_user or user
        await module.Engine(who).execute_agent(who)
        return {"ran": who}

    return app


def mounted_auth_app(module) -> FastAPI:
    async def runs(request) -> JSONResponse:
        who = request.query_params.get("for_user") or request.user.id
        await module.Engine(who).execute_agent(who)
        return JSONResponse({"ran": who})

    app = FastAPI()
    app.router.routes.append(Mount("/m", routes=[Route("/runs", runs, methods=["POST"])],
                                   middleware=[Middleware(AuthenticationMiddleware,
                                                          backend=TokenBackend())]))
    return app


def judged(exporter) -> list[str]:
    bleed = BleedDetector(rules(), state())
    return sorted(f.rule for f in bleed.consume(decoded(exporter), NOW) + bleed.tick(NOW + 60 * S))


@pytest.mark.parametrize("build, url", [(dependency_app, "/runs"), (mounted_auth_app, "/m/runs")])
def test_another_users_run_in_a_request_authenticated_after_pathwatchs_middleware_is_found(
        backend, build, url):
    module, exporter = backend
    with TestClient(build(module)) as client:
        assert client.post(f"{url}?for_user=bob", headers={"x-token": "t-alice"}).json() == {"ran": "bob"}
    assert judged(exporter) == [BLEED_OWNER_VS_AMBIENT, BLEED_SUBJECT_VS_AMBIENT]


@pytest.mark.parametrize("build, url", [(dependency_app, "/runs"), (mounted_auth_app, "/m/runs")])
def test_the_users_own_run_raises_nothing(backend, build, url):
    module, exporter = backend
    with TestClient(build(module)) as client:
        assert client.post(url, headers={"x-token": "t-alice"}).json() == {"ran": "alice"}
    assert judged(exporter) == []


def test_a_downstream_call_made_as_another_user_is_judged_against_the_request_user_it_learnt(backend):
    """alice's request (named by a dependency) calls an internal service, in the same trace, with
    bob's ``X-User-Id``: the service's request and run are bob's, under a root that is alice's once
    it learnt her -- ``span_vs_root_user`` (the root had no user, so nothing was judged)."""
    module, exporter = backend
    internal = FastAPI()

    @internal.post("/internal/runs")
    async def internal_runs(x_user_id: str = Header()) -> dict:
        await module.Engine(x_user_id).execute_agent(x_user_id)
        return {"ran": x_user_id}

    app = FastAPI()

    async def current_user(request: Request, x_token: str = Header()) -> str:
        request.state.user_id = TOKENS[x_token]
        return request.state.user_id

    @app.post("/runs")
    async def runs(user: str = Depends(current_user), as_user: str | None = None) -> dict:
        headers = {"x-user-id": as_user or user}
        propagate.inject(headers)  # the trace goes on in the internal service
        transport = httpx.ASGITransport(app=internal)
        async with httpx.AsyncClient(transport=transport, base_url="http://internal") as client:
            return (await client.post("/internal/runs", headers=headers)).json()

    with TestClient(app) as client:
        assert client.post("/runs", headers={"x-token": "t-alice"}).json() == {"ran": "alice"}
    assert judged(exporter) == []
    exporter.clear()
    with TestClient(app) as client:
        assert client.post("/runs?as_user=bob", headers={"x-token": "t-alice"}).json() == {"ran": "bob"}
    assert judged(exporter) == [BLEED_SPAN_VS_ROOT_USER]


class TokenMiddleware:
    """A pure ASGI middleware the app adds (it runs before pathwatch's): names the request's user
    in ``request.state`` when it starts."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        token = dict(scope.get("headers") or ()).get(b"x-token")
        if scope["type"] == "http" and token:
            scope.setdefault("state", {})["user_id"] = TOKENS[token.decode()]
        await self.app(scope, receive, send)


def switching_app(module, named_by: str) -> FastAPI:
    """``POST /switch?to=``: alice's request (named by a middleware before pathwatch's, or by a
    dependency after it) runs her engine, then logs in as ``to`` (stores him in ``request.state``)
    and runs his, or (``stale``) her engine again: the previous user's instance serving the user
    switched to."""
    app = FastAPI()
    if named_by == "middleware":
        app.add_middleware(TokenMiddleware)

    async def current_user(request: Request, x_token: str = Header()) -> str:
        if named_by == "dependency":
            request.state.user_id = TOKENS[x_token]
        return request.state.user_id

    @app.post("/switch")
    async def switch(request: Request, to: str, user: str = Depends(current_user),
                     stale: bool = False) -> dict:
        engine = module.Engine(user)
        await engine.execute_agent(user)
        request.state.user_id = to
        if stale:
            await engine.execute_agent(user)
        else:
            await module.Engine(to).execute_agent(to)
        return {"now": to}

    return app


@pytest.mark.parametrize("named_by", ["middleware", "dependency"])
def test_the_work_of_the_user_a_request_switched_to_raises_nothing(backend, named_by):
    """Before, the request kept the first user it had: bob's own run after the endpoint logged in
    as him was a false owner_vs_ambient and subject_vs_ambient (critical)."""
    module, exporter = backend
    with TestClient(switching_app(module, named_by)) as client:
        assert client.post("/switch?to=bob", headers={"x-token": "t-alice"}).json() == {"now": "bob"}
    assert judged(exporter) == []


@pytest.mark.parametrize("named_by", ["middleware", "dependency"])
def test_the_previous_users_engine_serving_the_user_switched_to_is_found(backend, named_by):
    """Before, alice's engine serving the request after it became bob's raised nothing."""
    module, exporter = backend
    with TestClient(switching_app(module, named_by)) as client:
        assert client.post("/switch?to=bob&stale=true",
                           headers={"x-token": "t-alice"}).json() == {"now": "bob"}
    assert judged(exporter) == [BLEED_OWNER_VS_AMBIENT, BLEED_SHARED_INSTANCE,
                                BLEED_SUBJECT_VS_AMBIENT]
