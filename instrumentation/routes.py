"""The entry point of a request: its route template, through the apps mounted in the app; and the
path parameters of that route, for a ``path_param`` identity source (``path_params``).

The FastAPI instrumentation's ``http.route`` names the route the app itself matched: for a request
served by an app or router mounted in it (``app.mount("/v1", api)``, ``Mount("/v1", routes=...)``)
that is the mount (``/v1``), the same for every route under it, while the mounted FastAPI app's own
span has its route without the mount's prefix (``/ws``). The entry point is the whole template,
``/v1/ws``: the mount's path and the route it leads to, matched as the routers will match it.
"""

from __future__ import annotations

from typing import Any

from instrumentation import attributes as attr
from instrumentation.errors import record_error

try:  # the same route lookup the FastAPI instrumentation uses for http.route
    from opentelemetry.instrumentation.fastapi import _get_route_details
except Exception:  # pragma: no cover - private helper moved
    _get_route_details = None

UNMATCHED_ENTRY_POINT = "<unmatched>"
#: mounts followed into one another at most (a deeper one keeps the template found so far)
MAX_MOUNT_DEPTH = 8


class _Routes:
    """What ``_get_route_details`` reads of ``scope["app"]``: the routes of a mount."""

    __slots__ = ("routes",)

    def __init__(self, routes: list[Any]) -> None:
        self.routes = routes


def entry_point(scope: dict, span: Any) -> str:
    """The route template of the request ``scope`` describes, before the app routes it: the server
    span's ``http.route`` (else the same lookup), followed into the mount or host it leads to. An
    unmatched raw path is unbounded and may carry ids: one constant instead."""
    route = (getattr(span, "attributes", None) or {}).get(attr.HTTP_ROUTE)
    app = scope.get("app")
    if app is not None and _get_route_details is not None:
        try:
            if route is None:
                route = _get_route_details(scope)
            route = _through_mounts(scope, getattr(app, "routes", None) or (), route)
        except Exception as exc:
            record_error("middleware:route", exc)
    return route if route is not None else UNMATCHED_ENTRY_POINT


def _through_mounts(scope: dict, routes: Any, route: str | None) -> str | None:
    """``route`` matched among ``routes`` (None: nothing, or a route without a path): when it
    leads into a mount (its path) or a host (no path, or the raw one, from the instrumentation's
    lookup), the template of the route matched in there, prefixed by the mounts' paths; the
    mount's own when nothing in it matches."""
    template = ""
    for _ in range(MAX_MOUNT_DEPTH):
        found = _mount_of(scope, routes, route)
        if found is None:
            break
        mount, child = found
        template += getattr(mount, "path", "")  # a host adds nothing to the path
        routes = mount.routes
        scope = {**scope, **child, "app": _Routes(routes)}
        route = _get_route_details(scope)
    if route is None:
        return template or None
    return template + route


def _mount_of(scope: dict, routes: Any, route: str | None) -> tuple[Any, dict] | None:
    """The mount or host among ``routes`` the router takes the request to when ``route`` is what
    the instrumentation's lookup says of it; with its child scope."""
    from starlette.routing import Host, Match, Mount

    for candidate in routes:
        if isinstance(candidate, Mount):
            if candidate.path != route:
                continue
        elif isinstance(candidate, Host):
            if route is not None and route != scope.get("path"):
                continue
        else:
            if route is not None and getattr(candidate, "path", None) == route:
                return None  # a route of the app itself, before any mount
            continue
        match, child = candidate.matches(scope)
        if match == Match.FULL:
            return candidate, child
    return None


#: in the scope: (the app its routes were matched in, the path parameters found there)
PATH_PARAMS_KEY = "pathwatch.path_params"


def path_params(scope: dict) -> dict[str, Any]:
    """The path parameters of the route the request is taken to, as the app's routers will take it
    (through its mounts and hosts), before they do: ``{"user_id": "alice"}`` for a request to
    ``/users/alice/ws`` of the route ``/users/{user_id}/ws``, the values as the app's endpoint gets
    them (decoded, converted). Also of a request a router answers itself from a route's path: a
    method the route does not take (its 405), and the trailing-slash redirect to a route (its 307
    names the same parameters). Empty when no route is found. Matched once per app in the scope (an
    app mounted in another matches again, from its own routes)."""
    app = scope.get("app")
    kept = scope.get(PATH_PARAMS_KEY)
    if kept is not None and kept[0] is app:
        return kept[1]
    found: dict[str, Any] = {}
    try:
        found = _matched_params(scope, getattr(app, "routes", None) or (), _redirects(app))
    except Exception as exc:
        record_error("middleware:path_params", exc)
    scope[PATH_PARAMS_KEY] = (app, found)
    return found


def _matched_params(scope: dict, routes: Any, redirects: bool) -> dict[str, Any]:
    for _ in range(MAX_MOUNT_DEPTH + 1):
        taken = _route_taken(scope, routes, redirects)
        if taken is None:
            return {}
        route, child = taken
        inner = getattr(route, "routes", None)  # a mount or a host: on into its routes
        if inner is None:
            return dict(child.get("path_params") or {})
        scope = {**scope, **child}
        routes = inner
        redirects = _redirects(getattr(route, "app", None))
    return {}


def _route_taken(scope: dict, routes: Any, redirects: bool) -> tuple[Any, dict] | None:
    """The route a Starlette router takes the request to, with its child scope: the first that
    matches it in full, else the first that matches it in part (a method it does not take: it
    answers 405), else, for HTTP where the router redirects slashes, the first that the path with
    its trailing slash added or taken off matches (the router redirects there)."""
    from starlette.routing import Match

    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route, child
        if match == Match.PARTIAL and partial is None:
            partial = (route, child)
    if partial is not None:
        return partial
    path = scope.get("path") or ""
    if not redirects or scope.get("type") != "http" or path in ("", "/"):
        return None
    toggled = {**scope, "path": path.rstrip("/") if path.endswith("/") else path + "/"}
    for route in routes:
        match, child = route.matches(toggled)
        if match != Match.NONE:
            return route, child
    return None


def _redirects(app: Any) -> bool:
    """Whether the router of ``app`` (an app, a router, or what a mount holds) redirects a path to
    the one with its trailing slash added or taken off (Starlette's and FastAPI's default)."""
    router = getattr(app, "router", app)
    return getattr(router, "redirect_slashes", True) is not False
