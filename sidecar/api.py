"""The sidecar's HTTP API: health, readiness, Prometheus metrics, incidents, findings, inventory and
the consolidation picture, described by ``sidecar/openapi.yaml`` (served as ``/api/v1/openapi.json``).

Thin handlers over injected state. Handlers are plain functions, so Starlette runs them in its thread
pool: store reads take a lock and must not stall the event loop. With a token set, every endpoint
except ``/healthz``, ``/readyz`` (and ``/metrics`` unless ``metrics_requires_token``) needs
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Protocol

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar.config import ConfigError, is_loopback_endpoint, shown_env_name
from sidecar.incidents import StoreClosed
from sidecar.incidents.query import STATUSES, IncidentQuery, QueryError, cursor, reject_unknown
from sidecar.incidents.recent import FindingQuery, RecentFindings, finding_to_dict
from sidecar.incidents.serialize import incident_to_dict
from sidecar.model import Incident

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: /metrics takes prometheus_client's own filter: only the samples named (repeatable)
METRICS_PARAMETERS = ("name[]",)


_MAX_PATCH_BYTES = 4096
#: api.head_timeout_s's default: a PATCH body must arrive within it too
DEFAULT_BODY_TIMEOUT_S = 10.0


class IncidentReader(Protocol):
    def get(self, incident_id: str) -> Incident | None: ...

    def list_incidents(self, query: IncidentQuery) -> list[Incident]: ...

    def set_status(self, incident_id: str, status: str) -> bool:
        """False for an unknown id; raises ``StoreClosed`` once the store is closed."""


class InventorySource(Protocol):
    def snapshot(self) -> dict[str, Any]: ...


class ConsolidationSource(Protocol):
    def snapshot(self) -> dict[str, Any]: ...


class AlertResolver(Protocol):
    def resolved(self, incident: Incident) -> None:
        """Never blocks, never raises (``AlertDispatcher.resolved``)."""


class ApiTokenRequired(ConfigError):
    """The API listens beyond loopback without a bearer token."""


#: below this a bearer token is warned of at start as guessable (the Helm chart refuses a shorter
#: ``secrets.apiToken``)
MIN_TOKEN_CHARS = 16


def require_token_for(endpoint: str, token: str | None, token_env: str = "PATHWATCH_API_TOKEN") -> None:
    """Refuse to serve the API on a non-loopback address without a token, or with a token no client
    could send (raises ``ApiTokenRequired``; the message never quotes the token); warn of a token
    shorter than ``MIN_TOKEN_CHARS``."""
    token_env = shown_env_name(token_env)
    if token and not (token.isascii() and token.isprintable()):
        raise ApiTokenRequired(
            f"the bearer token in {token_env} (api.token_env) must be one line of printable ASCII: "
            "it travels in an HTTP header, where other characters cannot be matched")
    if endpoint and not token and not is_loopback_endpoint(endpoint):
        raise ApiTokenRequired(
            f"api.endpoint {endpoint!r} is reachable beyond this host: set a bearer token in the "
            f"environment variable {token_env} (api.token_env), or bind to 127.0.0.1")
    if token and len(token) < MIN_TOKEN_CHARS:
        # a warning, not a refusal: a sidecar that does not start may hold its backend's start too
        log.warning("the bearer token in %s (api.token_env) has %d characters, fewer than %d: it can "
                    "be guessed; use a random one, e.g. `openssl rand -hex 32`", token_env,
                    len(token), MIN_TOKEN_CHARS)


def create_api(store: IncidentReader, inventory: InventorySource | None,
               telemetry_registry: CollectorRegistry, ready: Callable[[], bool], token: str | None, *,
               metrics_requires_token: bool = False, findings: RecentFindings | None = None,
               consolidation: ConsolidationSource | None = None,
               alerts: AlertResolver | None = None,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               live: Callable[[], Sequence[dict[str, Any]]] | None = None) -> Starlette:
    """``findings`` defaults to the store's own ring of recent findings (``IncidentStore.recent``);
    ``alerts`` is told of incidents resolved by PATCH (the alert dispatcher ends their alerts);
    ``body_timeout_s`` (``api.head_timeout_s``) bounds the wait for a PATCH body, as the server
    bounds the wait for a head: past it, a 408 and the connection closed. ``live``: what fails
    (``Sidecar.live``; empty while alive), for ``/healthz``."""
    if findings is None:
        findings = getattr(store, "recent", None)
    handlers = _Handlers(store, inventory, telemetry_registry, ready, findings)
    handlers.body_timeout_s = body_timeout_s
    handlers.live = live
    handlers.consolidation_source = consolidation  # /api/v1/consolidation (DeployDetector.snapshot)
    handlers.alerts = alerts
    middleware = []
    if token:
        open_paths = OPEN_PATHS if metrics_requires_token else OPEN_PATHS | {"/metrics"}
        middleware.append(Middleware(BearerTokenMiddleware, token=token, open_paths=open_paths))
    app = Starlette(
        routes=[
            Route("/healthz", handlers.healthz),
            Route("/readyz", handlers.readyz),
            Route("/metrics", handlers.metrics),
            Route("/api/v1/incidents", handlers.incidents),
            # one route for both methods, so that a 405 lists both in Allow
            Route("/api/v1/incidents/{incident_id}", handlers.incident_resource,
                  methods=["GET", "PATCH"]),
            Route("/api/v1/inventory", handlers.inventory),
            Route("/api/v1/consolidation", handlers.consolidation),
            Route("/api/v1/consolidation/{section}", handlers.consolidation),
            Route("/api/v1/findings", handlers.findings),
            Route("/api/v1/openapi.json", handlers.openapi),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
    )
    # /healthz/ is a path not served (a JSON 404), not a 307 to a URL built from the Host header
    app.router.redirect_slashes = False
    return app


class _Handlers:
    def __init__(self, store: IncidentReader, inventory: InventorySource | None,
                 registry: CollectorRegistry, ready: Callable[[], bool],
                 findings: RecentFindings | None = None) -> None:
        self._store = store
        self.alerts: AlertResolver | None = None
        self._findings = findings
        self._inventory = inventory
        self._registry = registry
        self._ready = ready
        self._warned: set[str] = set()
        self.body_timeout_s = DEFAULT_BODY_TIMEOUT_S
        self.live: Callable[[], Sequence[dict[str, Any]]] | None = None

    def healthz(self, request: Request) -> Response:
        """200 ``ok`` while alive; 503 with the failing parts (``sidecar.liveness``). A check that
        raises answers ok (logged once): a bug of the check must not restart the sidecar."""
        if refused := _refuse_parameters(request):
            return refused
        failures: Sequence[dict[str, Any]] = ()
        if self.live is not None:
            try:
                failures = self.live()
            except Exception:
                self._warn_once("healthz", "liveness check raised; answering ok")
        if not failures:
            return PlainTextResponse("ok\n")
        return JSONResponse({"status": "failing", "failures": list(failures)}, status_code=503)

    def readyz(self, request: Request) -> Response:
        if refused := _refuse_parameters(request):
            return refused
        try:
            is_ready = bool(self._ready())
        except Exception:
            self._warn_once("readyz", "readiness check raised; answering not ready")
            is_ready = False
        return PlainTextResponse("ready\n" if is_ready else "not ready\n", 200 if is_ready else 503)

    def metrics(self, request: Request) -> Response:
        """``name[]`` (any number of times) answers only the samples named, as prometheus_client's
        own handlers do (a scrape config's ``params``); any other parameter is a 400."""
        if refused := _refuse_parameters(request, METRICS_PARAMETERS, repeatable=METRICS_PARAMETERS):
            return refused
        names = [name for name in request.query_params.getlist("name[]") if name]
        registry = self._registry.restricted_registry(names) if names else self._registry
        # OpenMetrics (with exemplars) when the scraper asks for it, text 0.0.4 otherwise
        try:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        except (TypeError, ValueError):  # prometheus-client compares a version such as "1.a" with numbers
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        return Response(encoder(registry), headers={"Content-Type": content_type})

    def incidents(self, request: Request) -> Response:
        try:
            query = IncidentQuery.from_params(request.query_params)
        except QueryError as exc:
            return _error(400, str(exc), parameter=exc.parameter)
        # one more than the limit: whether there is a next page
        found = self._store.list_incidents(dataclasses.replace(query, limit=query.limit + 1))
        page = found[:query.limit]
        next_before = cursor(page[-1]) if len(found) > query.limit else None
        response = JSONResponse({"incidents": [incident_to_dict(i) for i in page], "count": len(page),
                                 "limit": query.limit, "next_before": next_before})
        if next_before is not None:
            following = request.url.include_query_params(before=next_before)
            response.headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
        return response

    async def incident_resource(self, request: Request) -> Response:
        if refused := _refuse_parameters(request):
            return refused
        if request.method == "PATCH":
            return await self.update_incident(request)
        return await run_in_threadpool(self.incident, request)

    async def update_incident(self, request: Request) -> Response:
        """``PATCH {"status": "resolved"}`` (or ``"open"``): resolve an incident that is fixed, as in
        Sentry. A resolved incident reopens with its next finding (without a second page), and is
        the first to go when the store is full."""
        incident_id = request.path_params["incident_id"]
        body = bytearray()
        try:
            # a body that stops coming held the connection for ever: the server's head timeout
            # no longer runs once a head is complete
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():  # read no more than the limit
                    body += chunk
                    if len(body) > _MAX_PATCH_BYTES:
                        return _error(413, f"request body above {_MAX_PATCH_BYTES} bytes")
        except TimeoutError:
            response = _error(408, f"request body not received within api.head_timeout_s="
                                   f"{self.body_timeout_s:g}s")
            response.headers["Connection"] = "close"  # the rest of the body may still come
            return response
        except ClientDisconnect:  # raised out of the app, uvicorn logged it as an error, traceback
            return _error(400, "the client hung up before its body was read", parameter="body")
        try:
            change = json.loads(body, object_pairs_hook=_keys_once)
        except _KeyGivenTwice as exc:  # json.loads would keep the last: {"status": "x", "status": "open"}
            return _error(400, f'key {exc.key!r} given twice; expected exactly one field, "status"',
                          parameter="body")
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            return _error(400, 'expected a JSON object such as {"status": "resolved"}', parameter="body")
        if not isinstance(change, dict) or set(change) != {"status"}:
            return _error(400, 'expected exactly one field, "status"', parameter="body")
        status = change["status"]
        if isinstance(status, str):
            status = status.lower()  # as ?status= is
        if status not in STATUSES:
            return _error(400, f"expected one of {', '.join(STATUSES)}, got {status!r}",
                          parameter="status")
        try:
            changed = await run_in_threadpool(self._store.set_status, incident_id, status)
        except StoreClosed:
            return _error(503, "the sidecar is shutting down: the incident was not changed")
        if not changed:
            return _error(404, f"no incident with id {incident_id!r}", id=incident_id)
        if status == "resolved" and self.alerts is not None:
            await run_in_threadpool(self._end_alert, incident_id)
        return await run_in_threadpool(self.incident, request)  # the store's lock: off the loop

    def _end_alert(self, incident_id: str) -> None:
        """Off the event loop: the store's lock is held while the pipeline commits."""
        incident = self._store.get(incident_id)  # as it is now: a finding may have reopened it
        if incident is not None and incident.status == "resolved" and incident.alerted:
            self.alerts.resolved(incident)

    def incident(self, request: Request) -> Response:
        incident_id = request.path_params["incident_id"]
        incident = self._store.get(incident_id)
        if incident is None:
            return _error(404, f"no incident with id {incident_id!r}", id=incident_id)
        return JSONResponse(incident_to_dict(incident))

    def findings(self, request: Request) -> Response:
        """The most recent findings one by one (oldest first); ``after=SEQ`` pages forward."""
        try:
            query = FindingQuery.from_params(request.query_params)
        except QueryError as exc:
            return _error(400, str(exc), parameter=exc.parameter)
        if self._findings is None:
            return _JSONResponse({"findings": [], "count": 0, "limit": query.limit, "last_seq": 0,
                                  "next_after": 0, "first_seq": 0, "capacity": 0, "evicted": 0})
        page = self._findings.page(query)
        return _JSONResponse({
            "findings": [finding_to_dict(seq, finding) for seq, finding in page.findings],
            "count": len(page.findings), "limit": query.limit, "last_seq": page.last_seq,
            "next_after": page.cursor,
            "first_seq": page.first_seq, "capacity": self._findings.capacity,
            "evicted": page.evicted})

    def inventory(self, request: Request) -> Response:
        if refused := _refuse_parameters(request):
            return refused
        if self._inventory is None:
            return _JSONResponse({"roles": {}})
        try:
            return _JSONResponse(self._inventory.snapshot())
        except Exception:
            self._warn_once("inventory", "inventory snapshot failed")
            return _error(500, "inventory snapshot failed; see the sidecar log")

    consolidation_source: ConsolidationSource | None = None

    def consolidation(self, request: Request) -> Response:
        """The consolidation picture, or one section of it (paths, callers_to_migrate,
        callers_overflow, versions, versions_overflow, verdicts)."""
        if refused := _refuse_parameters(request):
            return refused
        if self.consolidation_source is None:
            return _error(404, "the consolidation workflow is not enabled on this sidecar")
        try:
            picture = self.consolidation_source.snapshot()
        except Exception:
            self._warn_once("consolidation", "consolidation snapshot failed")
            return _error(500, "consolidation snapshot failed; see the sidecar log")
        section = request.path_params.get("section")
        if section is None:
            return _JSONResponse(picture)
        if section not in picture or section == "generated_at":
            return _error(404, f"no consolidation section {section!r}", section=section)
        return _JSONResponse({section: picture[section], "generated_at": picture["generated_at"]})

    def openapi(self, request: Request) -> Response:
        """This API's description: the packaged ``sidecar/openapi.yaml``, as JSON."""
        if refused := _refuse_parameters(request):
            return refused
        return JSONResponse(openapi_document())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, exc_info=True)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """``sidecar/openapi.yaml`` (package data: in the wheel too), read once."""
    return yaml.safe_load(resources.files("sidecar").joinpath("openapi.yaml").read_text("utf-8"))


class BearerTokenMiddleware:
    """Pure ASGI: ``Authorization: Bearer <token>`` on every path but ``open_paths``."""

    def __init__(self, app: ASGIApp, token: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self._token = token.encode()
        self._open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = _error(401, "missing or invalid bearer token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="pathwatch"'
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, credentials = Headers(scope=scope).get("authorization", "").partition(" ")
        # constant-time compare: the token's bytes cannot be guessed from response timing
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)


class _JSONResponse(JSONResponse):
    """JSON that also renders sets, tuples and other odd values an inventory snapshot may hold."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_jsonable, separators=(",", ":")).encode()


def _jsonable(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


class _KeyGivenTwice(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _keys_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different, else ``_KeyGivenTwice`` (a query parameter
    or a key of the YAML config given twice is refused too)."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise _KeyGivenTwice(key)
        document[key] = value
    return document


def _refuse_parameters(request: Request, known: Sequence[str] = (), *,
                       repeatable: Sequence[str] = ()) -> Response | None:
    """The 400 naming a query parameter the endpoint does not take, or one given twice (as the
    incident and finding filters are refused); None when there is none."""
    try:
        reject_unknown(request.query_params, known, repeatable=repeatable)
    except QueryError as exc:
        return _error(400, str(exc), parameter=exc.parameter)
    return None


def _error(status: int, message: str, **fields: str) -> JSONResponse:
    return JSONResponse({"error": message, **fields}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = _error(exc.status_code, exc.detail or "error", path=request.url.path)
    response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response
