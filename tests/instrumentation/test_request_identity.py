"""An HTTP request whose user the app names after pathwatch's middleware saw it: a FastAPI
dependency storing ``request.state.user_id`` (the path map's ``{scope: state.user_id}``), an
authentication middleware that runs after pathwatch's (one a ``Mount`` has) setting
``scope["user"]`` (``{scope: user.id}``, the id an attribute of the user object). Its ``scope``
sources are read again at its spans while it has no user (``identity.build_request_identity``)."""

from __future__ import annotations

import gc

import pytest
from fastapi import Depends, FastAPI, Header, Request
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from instrumentation import attributes as A
from instrumentation.errors import errors
from instrumentation.identity import Pseudonymizer
from instrumentation.transport import SCOPE_KEY
from tests.instrumentation.helpers import attrs, pseudonym, spans_of_kind
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine
from tests.token_auth import TOKENS, TokenBackend

ALICE, BOB = pseudonym("alice"), pseudonym("bob")
ENGINE = """
roles:
  execution_engine:
    kind: execute
    implementations: [tests.instrumentation.sample.engines.UserExecutionEngine]
    methods: [execute_agent]
    user_scoped: true
    owner: [self.user_context.user_id]
    subject: [arg.context.user_id]
"""


@pytest.fixture
def with_identity(instrument, tmp_path):
    """with_identity("[...]"): pathwatch with these ``identity.http`` sources and the sample engine."""
    def start(sources: str) -> None:
        pathmap = tmp_path / "pathmap.yaml"
        pathmap.write_text(f"version: 1\nidentity:\n  http: {sources}\n{ENGINE}")
        instrument(pathmap)
    return start


def run_for(user: str) -> None:
    context = UserContext(user)
    UserExecutionEngine(context).execute_agent(context)


def dependency_app(described: list | None = None) -> FastAPI:
    """``POST /runs``: a dependency reads ``X-Token`` and stores its user in ``request.state``;
    the endpoint runs the engine for it, or for ``?for_user=`` (another user's run: the bleed);
    ``?switch=`` stores another user in ``request.state`` first (the user changing mid-request)."""
    app = FastAPI()

    async def current_user(request: Request, x_token: str = Header()) -> str:
        if described is not None:
            described.append(request.scope[SCOPE_KEY])
        request.state.user_id = TOKENS[x_token]
        return request.state.user_id

    @app.post("/runs")
    async def runs(request: Request, user: str = Depends(current_user), for_user: str | None = None,
                   switch: str | None = None) -> dict:
        if switch:  # alice's run, then another user stored in request.state, and his run
            run_for(user)
            request.state.user_id = switch
        run_for(for_user or user)
        return {"ran": for_user or user}

    @app.post("/users/{name}/runs")
    def user_runs(name: str, user: str = Depends(current_user)) -> dict:  # a sync endpoint
        run_for(user)
        return {"ran": user}

    @app.post("/public")
    async def public(request: Request) -> dict:
        if described is not None:
            described.append(request.scope[SCOPE_KEY])
        return {}

    return app


async def mounted_runs(request) -> JSONResponse:
    run_for(request.user.id)
    return JSONResponse({"ran": request.user.id})


def mounted_auth_app() -> FastAPI:
    """``/m/runs``: Starlette's ``AuthenticationMiddleware`` on a ``Mount`` only, so it runs after
    pathwatch's middleware (the app's own ``add_middleware`` puts one before it)."""
    app = FastAPI()
    app.router.routes.append(Mount("/m", routes=[Route("/runs", mounted_runs, methods=["POST"])],
                                   middleware=[Middleware(AuthenticationMiddleware,
                                                          backend=TokenBackend())]))
    return app


def post(app: FastAPI, url: str, token: str | None = "t-alice", **headers: str) -> dict:
    if token is not None:
        headers["x-token"] = token
    with TestClient(app) as client:
        response = client.post(url, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()


def execute(exporter) -> dict:
    (span,) = spans_of_kind(exporter, "execute")
    return attrs(span)


def request_span(exporter) -> dict:
    (span,) = spans_of_kind(exporter, "request")
    return attrs(span)


def test_a_user_a_dependency_stores_in_request_state_is_the_ambient_user_of_the_work_after_it(
        with_identity, exporter):
    with_identity("[{scope: state.user_id}]")
    assert post(dependency_app(), "/runs") == {"ran": "alice"}
    run = execute(exporter)
    assert (run[A.ENDUSER_PSEUDO_ID], run[A.USER_OWNER]) == (ALICE, ALICE)
    request = request_span(exporter)  # stamped at its end with the user it learnt
    assert request[A.ENDUSER_PSEUDO_ID] == ALICE and request[A.PSEUDONYM_KEY_ID]
    assert A.CONNECTION_USERS not in request


def test_a_user_an_authentication_middleware_after_pathwatchs_sets_as_an_object_is_read(
        with_identity, exporter):
    with_identity("[{scope: user.id}]")
    assert post(mounted_auth_app(), "/m/runs") == {"ran": "alice"}
    assert execute(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert request_span(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE


def test_an_authentication_middleware_the_app_adds_runs_before_pathwatchs_and_nothing_is_read_again(
        with_identity, exporter):
    """``app.add_middleware`` puts a middleware outside pathwatch's (built innermost, with
    ``instrument()`` as with the zero-code start): its ``scope["user"]`` names the user when the
    request starts, and nothing is read again."""
    with_identity("[{scope: user.id}]")
    app = FastAPI()
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    described: list = []

    @app.post("/runs")
    async def runs(request: Request) -> dict:
        described.append(request.scope[SCOPE_KEY])
        run_for(request.user.id)
        return {}

    post(app, "/runs")
    assert [m.cls.__name__ for m in app.user_middleware] == ["AuthenticationMiddleware",
                                                             "PathwatchMiddleware"]
    assert execute(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert [info._live for info in described] == [None]


def test_a_request_whose_user_a_source_named_when_it_started_is_never_read_again(with_identity,
                                                                                exporter):
    """Its user does not change: a ``scope`` source listed before the header that named it is not
    read later (nor followed when the app stores another user there)."""
    with_identity("[{scope: state.user_id}, {header: x-user-id}]")
    described: list = []
    post(dependency_app(described), "/runs", token="t-bob", **{"x-user-id": "alice"})
    assert execute(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert request_span(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert [info._live for info in described] == [None]


def test_a_user_named_once_is_the_requests_to_its_end(with_identity, exporter):
    """The dependency named alice, a span read her; the endpoint then stores bob: not followed (an
    HTTP request's user does not change; the work carries alice, so bob's run in it is judged
    against her)."""
    with_identity("[{scope: state.user_id}]")
    post(dependency_app(), "/runs?switch=bob&for_user=bob")
    runs = [attrs(span) for span in spans_of_kind(exporter, "execute")]
    assert [(run[A.ENDUSER_PSEUDO_ID], run[A.USER_OWNER]) for run in runs] == [(ALICE, ALICE),
                                                                              (ALICE, BOB)]
    assert request_span(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE


def test_a_sync_dependency_and_endpoint_in_the_thread_pool(with_identity, exporter):
    with_identity("[{scope: state.user_id}]")
    app = FastAPI()

    def current_user(request: Request, x_token: str = Header()) -> str:  # run in the thread pool
        request.state.user_id = TOKENS[x_token]
        return request.state.user_id

    @app.post("/runs")
    def runs(user: str = Depends(current_user)) -> dict:
        run_for(user)
        return {}

    post(app, "/runs")
    assert execute(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert request_span(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE


def test_a_learnt_users_id_in_the_url_leaves_as_its_pseudonym(with_identity, exporter):
    with_identity("[{scope: state.user_id}]")
    post(dependency_app(), "/users/alice/runs")
    request = request_span(exporter)
    assert request[A.ENDUSER_PSEUDO_ID] == ALICE
    urls = [value for key, value in request.items() if key in ("url.path", "http.target", "http.url",
                                                               "url.full")]
    assert urls and all("alice" not in url and ALICE in url for url in urls)


def test_a_request_that_never_names_a_user_has_none_and_lets_its_scope_go(with_identity, exporter):
    with_identity("[{scope: state.user_id}]")
    described: list = []
    post(dependency_app(described), "/public", token=None)
    assert A.ENDUSER_PSEUDO_ID not in request_span(exporter)
    assert [info._live for info in described] == [None]  # let go when the request ended


def test_a_scope_source_that_raises_is_counted_and_the_next_one_read(with_identity, exporter):
    class Broken:
        @property
        def id(self) -> str:
            raise RuntimeError("no user")

    with_identity("[{scope: state.user.id}, {scope: state.user_id}]")
    app = FastAPI()

    @app.post("/runs")
    async def runs(request: Request) -> dict:
        request.state.user = Broken()
        request.state.user_id = "alice"
        run_for("alice")
        return {}

    post(app, "/runs", token=None)
    assert execute(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert errors.count >= 1


def test_a_user_the_middleware_of_a_mounted_app_finds_is_the_requests_and_nothing_is_read_again(
        with_identity, exporter):
    """A FastAPI app mounted in another, both with pathwatch's middleware: the outer one names no
    user, the mounted app's own authentication middleware does (``fastapi.identify_again``); then
    the request's user is named, and what the app stores afterwards is not followed."""
    with_identity("[{scope: state.user_id}, {scope: user.id}]")
    inner = FastAPI()
    inner.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    described: list = []

    @inner.post("/runs")
    async def runs(request: Request) -> dict:
        described.append(request.scope[SCOPE_KEY])
        request.state.user_id = "bob"
        run_for("bob")
        return {}

    outer = FastAPI()
    outer.mount("/v1", inner)
    post(outer, "/v1/runs")
    run = execute(exporter)
    assert (run[A.ENDUSER_PSEUDO_ID], run[A.USER_OWNER]) == (ALICE, BOB)
    assert request_span(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert [info._live for info in described] == [None]


def test_an_anonymous_user_object_with_no_text_of_its_own_is_no_user(with_identity, exporter):
    """``{scope: user}`` (the id itself) behind ``AuthenticationMiddleware``: an anonymous request's
    ``scope["user"]`` is Starlette's ``UnauthenticatedUser``, whose text is its address -- another
    made-up user for every request (alice's work judged against a stranger, a shared engine seen
    serving many users). An object without a ``__str__`` or ``__repr__`` of its own is no user;
    one with its own text (an id type) still is."""
    with_identity("[{scope: user}]")
    app = FastAPI()

    @app.post("/runs")
    async def runs(request: Request) -> dict:
        run_for("alice")
        return {}

    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    post(app, "/runs", token=None)
    run = execute(exporter)
    assert run[A.USER_OWNER] == ALICE
    assert A.ENDUSER_PSEUDO_ID not in run
    assert A.ENDUSER_PSEUDO_ID not in request_span(exporter)
    assert errors.count == 0


@pytest.mark.parametrize("value, user", [
    (type("Opaque", (), {})(), None),
    (type("Named", (), {"__str__": lambda self: "alice"})(), ALICE),
    (type("Shown", (), {"__repr__": lambda self: "alice"})(), ALICE),
    (7, pseudonym("7")),
])
def test_an_id_is_read_as_its_own_text_and_an_object_without_one_is_no_user(value, user):
    key = b"identity-key-0123456789"
    expected = None if user is None else pseudonym({ALICE: "alice"}.get(user, "7"), key.decode())
    assert Pseudonymizer(key)(value) == expected
