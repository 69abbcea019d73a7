"""An HTTP request whose user the app names after pathwatch's middleware saw it: a FastAPI
dependency storing ``request.state.user_id`` (the path map's ``{scope: state.user_id}``), an
authentication middleware that runs after pathwatch's (one a ``Mount`` has) setting
``scope["user"]`` (``{scope: user.id}``, the id an attribute of the user object); or changes it
(an endpoint that logs in as another user, an account switch). Its ``scope`` sources are read again
at its spans, as a socket's (``identity.build_request_identity``)."""

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
    def user_runs(request: Request, name: str, user: str = Depends(current_user),
                  switch: str | None = None) -> dict:  # a sync endpoint
        run_for(user)
        if switch:
            request.state.user_id = switch
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


def test_an_authentication_middleware_the_app_adds_runs_before_pathwatchs_and_names_the_user_at_start(
        with_identity, exporter):
    """``app.add_middleware`` puts a middleware outside pathwatch's (built innermost, with
    ``instrument()`` as with the zero-code start): its ``scope["user"]`` names the user when the
    request starts; its source is let go when the request ends."""
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


def test_a_header_listed_first_that_named_the_user_when_it_started_wins_and_nothing_is_read_again(
        with_identity, exporter):
    """A source read from what the client sent (fixed for the request's life) before the ``scope``
    source, naming a user: it wins, the ``scope`` source is never read (no cost at the spans), and
    a user the app stores there is not the request's."""
    with_identity("[{header: x-user-id}, {scope: state.user_id}]")
    described: list = []
    post(dependency_app(described), "/runs", token="t-bob", **{"x-user-id": "alice"})
    assert execute(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert request_span(exporter)[A.ENDUSER_PSEUDO_ID] == ALICE
    assert [info._live for info in described] == [None]


def test_a_scope_source_listed_before_the_header_that_named_the_user_names_the_user_stored_later(
        with_identity, exporter):
    """The header named alice when the request started; the ``scope`` source listed before it is
    read again, as on a socket: the user the dependency stores there (bob) is the request's from
    then on, and the request span lists both."""
    with_identity("[{scope: state.user_id}, {header: x-user-id}]")
    post(dependency_app(), "/runs", token="t-bob", **{"x-user-id": "alice"})
    run = execute(exporter)
    assert (run[A.ENDUSER_PSEUDO_ID], run[A.USER_OWNER]) == (BOB, BOB)
    request = request_span(exporter)
    assert (request[A.ENDUSER_PSEUDO_ID], request[A.CONNECTION_USERS]) == (BOB, (ALICE, BOB))


def test_a_user_the_app_stores_in_place_of_the_first_is_the_requests_from_then_on(with_identity,
                                                                                  exporter):
    """The dependency named alice, a span read her; the endpoint then logs in as bob (stores him in
    ``request.state``) and runs his engine: the request is bob's from then on, as a socket's after
    a login as another user (before, the work kept alice: bob's own run was a false
    ``owner_vs_ambient``). Its request span carries bob, the user it ended with, and lists both."""
    with_identity("[{scope: state.user_id}]")
    post(dependency_app(), "/runs?switch=bob&for_user=bob")
    runs = [attrs(span) for span in spans_of_kind(exporter, "execute")]
    assert [(run[A.ENDUSER_PSEUDO_ID], run[A.USER_OWNER]) for run in runs] == [(ALICE, ALICE),
                                                                              (BOB, BOB)]
    request = request_span(exporter)
    assert (request[A.ENDUSER_PSEUDO_ID], request[A.CONNECTION_USERS]) == (BOB, (ALICE, BOB))
    assert request[A.PSEUDONYM_KEY_ID]


def test_a_user_named_at_start_by_a_scope_source_is_followed_when_the_app_stores_another(
        with_identity, exporter):
    """A middleware the app adds (before pathwatch's) names alice when the request starts; the
    endpoint stores bob: followed as well."""
    with_identity("[{scope: state.user_id}]")
    app = FastAPI()

    @app.middleware("http")
    async def login(request: Request, call_next):
        request.state.user_id = TOKENS[request.headers["x-token"]]
        return await call_next(request)

    @app.post("/runs")
    async def runs(request: Request) -> dict:
        run_for(request.state.user_id)
        request.state.user_id = "bob"
        run_for("bob")
        return {}

    post(app, "/runs")
    assert [attrs(span)[A.ENDUSER_PSEUDO_ID] for span in spans_of_kind(exporter, "execute")] == [
        ALICE, BOB]
    assert request_span(exporter)[A.CONNECTION_USERS] == (ALICE, BOB)


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


def test_the_id_in_the_url_of_a_user_the_request_had_before_it_changed_leaves_as_its_pseudonym(
        with_identity, exporter):
    """The request's user changed after the dependency named alice, whose id is in its path: the
    URL is scrubbed of every user it had, not only of bob, the user it ended with."""
    with_identity("[{scope: state.user_id}]")
    post(dependency_app(), "/users/alice/runs?switch=bob")
    request = request_span(exporter)
    assert (request[A.ENDUSER_PSEUDO_ID], request[A.CONNECTION_USERS]) == (BOB, (ALICE, BOB))
    urls = [value for key, value in request.items() if key in ("url.path", "http.target", "http.url",
                                                               "url.full")]
    assert urls and all("alice" not in url and ALICE in url for url in urls)


def test_a_stored_user_whose_text_cannot_be_made_leaves_the_other_ids_scrubbed_from_the_url(
        with_identity, exporter):
    """The app stores, after alice's header named her, a user object whose ``__str__`` raises: it
    cannot be in the URL, so alice's id in the path is still replaced by her pseudonym (before,
    the error made the whole URL ``[REDACTED]``: the route's path lost from every such span)."""
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("detached")

    with_identity("[{scope: state.user_id}, {header: x-user-id}]")
    app = FastAPI()

    @app.post("/users/{name}/runs")
    async def runs(request: Request, name: str) -> dict:
        request.state.user_id = Unprintable()
        return {}

    post(app, "/users/alice/runs", token=None, **{"x-user-id": "alice"})
    request = request_span(exporter)
    urls = [value for key, value in request.items() if key in ("url.path", "http.target", "http.url",
                                                               "url.full")]
    assert urls and all("alice" not in url and ALICE in url for url in urls), urls
    assert errors.count >= 1


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


def test_a_user_the_middleware_of_a_mounted_app_finds_is_the_requests_and_then_followed(
        with_identity, exporter):
    """A FastAPI app mounted in another, both with pathwatch's middleware: the outer one names no
    user, the mounted app's own authentication middleware does (``fastapi.identify_again``); then
    the request's user is named, and a user the app stores afterwards is followed; the sources are
    let go when the request ends."""
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
    assert (run[A.ENDUSER_PSEUDO_ID], run[A.USER_OWNER]) == (BOB, BOB)
    request = request_span(exporter)
    assert (request[A.ENDUSER_PSEUDO_ID], request[A.CONNECTION_USERS]) == (BOB, (ALICE, BOB))
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
