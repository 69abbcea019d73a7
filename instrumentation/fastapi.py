"""Requests and sockets -> the ambient user, the entry point and connection ids.

``PathwatchMiddleware`` is a pure ASGI middleware. It is placed innermost among the app's user
middlewares (after authentication middlewares the app adds have set ``scope["user"]``, inside the
OpenTelemetry FastAPI middleware), so the server span is the current span when it runs: it stamps
that span as the ``request`` span and sets the ``current_request`` context variable that every
wrapped call reads. A user named after it ran (a dependency storing ``request.state.user_id``, a
``Mount``'s authentication middleware), or changed by the app (an account switch), is read at the
request's spans (``identity.build_request_identity``), and stamped on the server span at its end.
At the app's lifespan startup it names the path map's modules not imported, at its shutdown it has
pathwatch's exporter and the SDK's flushed (``_lifespan_send``).

Zero-code: a post-import hook on ``fastapi.applications`` wraps ``FastAPI.__init__``, so every app
built afterwards gets the middleware and the OpenTelemetry FastAPI instrumentation (with per-message
``send``/``receive`` spans excluded) without a code change.
"""

from __future__ import annotations

import logging
import weakref
from functools import partial
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import SpanKind, Status
from opentelemetry.util.http import normalise_response_header_name

from instrumentation import attributes as attr
from instrumentation.after_response import defer, served, serving
from instrumentation.attributes import SpanKinds
from instrumentation.errors import by_type_only, record_error
from instrumentation.header_ids import CAPTURED_HEADERS, scrub_header_ids
from instrumentation.identity import (REDACTED, RequestInfo, captured_header_key, current_request,
                                     user_text, utf8_reading)
from instrumentation.linking import connection_opened, socket_closed, socket_open
from instrumentation.query_ids import scrub_by_name, scrub_query_ids
from instrumentation.routes import entry_point
from instrumentation.runtime import state
from instrumentation.transport import SCOPE_KEY, new_connection_id
from instrumentation.url_tokens import redact_token_text, redact_tokens

_logger = logging.getLogger(__name__)
EXCLUDE_SPANS = ["send", "receive"]


class PathwatchMiddleware:
    """Pure ASGI middleware: resolve the user, give sockets an id, stamp the server span."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        scope_type = scope.get("type")
        if scope_type == "lifespan":
            await self.app(scope, receive, partial(_lifespan_send, send))
            return
        if not state.on or (scope_type != "http" and scope_type != "websocket"):
            await self.app(scope, receive, send)
            return
        described = scope.get(SCOPE_KEY)
        if described is not None and described is current_request.get():
            # an app mounted in another that has the middleware too: the request is described
            identify_again(scope, described, scope_type == "websocket")
            await self.app(scope, receive, send)
            return
        token = socket = info = None
        try:
            info = describe_request(scope, scope_type == "websocket")
            token = current_request.set(info)
            if info.connection_id is not None:
                socket = info.connection_id
                socket_open(socket)
        except Exception as exc:
            record_error("middleware", exc)
        try:
            await self.app(scope, receive, send)
        finally:
            if token is not None:
                current_request.reset(token)
            if socket is not None:
                socket_closed(socket)
            else:
                try:
                    if info is not None:
                        info.settle()  # an HTTP request's user, read one last time (named or changed)
                except Exception as exc:
                    record_error("middleware", exc)
                try:
                    served(scope)  # its span, if the response came before the call's end
                except Exception as exc:
                    record_error("middleware", exc)


async def _lifespan_send(send: Any, message: dict) -> None:
    """The app's lifespan messages to the server. Its startup's end: the path map's modules the app
    has not imported are named (``state.at_app_startup``: a misspelled one is never imported, and
    no hook ever says so). Before its shutdown's end reaches the server, pathwatch's heartbeat and
    the flush of its exporter and the SDK's (``state.at_app_shutdown``, bounded, in a worker
    thread): uvicorn ends the process by the signal it stopped on right after, no atexit handler
    run, so this is the last moment the spans they hold can leave."""
    kind = message.get("type")
    if kind == "lifespan.startup.complete":
        try:
            state.at_app_startup()
        except Exception as exc:
            record_error("lifespan", exc)
    elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
        try:
            import anyio.to_thread  # Starlette's own dependency

            await anyio.to_thread.run_sync(state.at_app_shutdown)
        except Exception as exc:
            record_error("lifespan", exc)
    await send(message)


def describe_request(scope: dict, websocket: bool) -> RequestInfo:
    """The request's ``RequestInfo``, its server span stamped. A socket's ``scope`` sources are
    read again after it connected (``identity.build_socket_identity``): its user may be named
    later (a first-message login), or change (a logout and a login as another user). So are an
    HTTP request's (``identity.build_request_identity``): the app may name its user after this
    middleware ran (a dependency), or store another (an account switch); the server span is
    stamped with its user at its end."""
    if websocket:
        raw_user, live = state.websocket_identity(scope)
    else:
        raw_user, live = state.http_identity(scope)
    span = trace.get_current_span()
    entry = entry_point(scope, span)
    connection_id, opened = (new_connection_id(), connection_opened()) if websocket else (None, None)
    try:
        info = RequestInfo(entry, raw_user, connection_id, opened, live)
    except Exception as exc:  # an id that cannot be made text: no user, the request described
        record_error("middleware:user", exc)
        # its scope sources still read again: a user the app names later (a login) is followed
        info = RequestInfo(entry, None, connection_id, opened, live)
    # the transport finds the socket's id and user through WebSocket.scope; the server span's end
    # finds the request (``_restamp``)
    scope[SCOPE_KEY] = info
    server = span.is_recording() and getattr(span, "kind", None) is SpanKind.SERVER
    if server:
        # every span under the request names it (its request span may arrive long after them: a
        # socket's, when it closes); before the first ``current()``, which caches the attributes
        try:
            info.span_id = format(span.get_span_context().span_id, "016x")
        except Exception as exc:  # its spans name no request: judged by their times, as before
            record_error("middleware:request_span", exc)
    stamp = info.stamp = info.current()
    user = stamp[2]
    if server:
        _record_exceptions_by_type(span)
        if getattr(span.end, "func", None) is not _end_scrubbed:  # no hook: the app's own instrumentor
            span.end = partial(_end_scrubbed, weakref.ref(span), span.end, scope)
        if not websocket:
            serving(scope, span, info)  # its end waits for the call's (after_response.py)
        _scrub_request_urls(span, scope, (info.raw_user,))
        _scrub_headers(span, scope)
        span.set_attribute(attr.SPAN_KIND, SpanKinds.REQUEST)
        span.set_attribute(attr.ENTRY_POINT, entry)
        if user is not None:
            span.set_attribute(stamp[3], user)
            _stamp_key_id(span, stamp)
        if connection_id is not None:
            span.set_attribute(attr.CONNECTION_ID, connection_id)
    return info


def identify_again(scope: dict, info: RequestInfo, websocket: bool) -> None:
    """The middleware of an app mounted in another (``app.mount("/v1", api)``, both with it), on
    the request the outer app's middleware described: one request, one description. Its connection
    id, its opening and its entry point (the whole route template, ``/v1/ws``) stay the outer one's,
    which the request span carries; the user is read again, as the mounted app's own middlewares
    (an authentication middleware of its own) left the scope, the view the endpoint has: one found
    becomes the request's (``RequestInfo.identify``), the request span stamped with it at its end
    (``_restamp``), none leaves the outer one's."""
    try:
        if websocket:
            raw_user, live = state.websocket_identity(scope)
        else:
            raw_user, live = state.http_identity(scope)
        if raw_user is not None:
            info.identify(raw_user, live)
    except Exception as exc:  # an id that cannot be made text: the outer one's stays
        record_error("middleware:user", exc)


_URL_KEYS = ("http.url", "url.full", "http.target", "url.path", "url.query")
#: in the scope, per server span (a mounted app has its own, on the same scope): its URL attributes
#: as the instrumentation set them, and the query parameters and ids they were scrubbed of
URL_SCOPE_KEY = "pathwatch.urls"


class _Urls:
    """URL attributes being scrubbed, apart from the span: set on it when whole."""

    __slots__ = ("attributes",)

    def __init__(self, attributes: dict[str, str]) -> None:
        self.attributes = attributes

    def set_attribute(self, key: str, value: str) -> None:
        self.attributes[key] = value


def _scrub_request_urls(span: Any, scope: dict, raw_users: tuple[Any, ...]) -> None:
    """The server span's URL attributes with every raw user id the request carries replaced by its
    pseudonym, each by its own: every value of an identity query parameter, found by name
    (``query_ids``: ``?user_id=alice&user_id=bob``, the app reading bob), then every id the
    identity sources read from the request (``identity.build_request_ids``: each value of a
    parameter or header sent twice, not only the one the app reads) and the ambient users (every
    user the request had: ``RequestInfo.raw_users``) wherever they are a query value or a whole
    path segment (``_scrub_user``). Made from the attributes as
    the instrumentation set them, kept in the scope until the span ends: a span stamped again under
    another setting (``_restamp``) is scrubbed anew from them, with the names and ids of both
    settings, not from the old setting's pseudonyms (or the raw ids it allowed). Where scrubbing
    fails the URL attributes are exported as ``[REDACTED]``."""
    attributes = getattr(span, "attributes", None) or {}
    kept_urls = scope.setdefault(URL_SCOPE_KEY, {})
    kept = kept_urls.get(id(span))
    if kept is None:
        kept = ({key: attributes[key] for key in _URL_KEYS if isinstance(attributes.get(key), str)},
                frozenset(), ())
    originals, names, ids = kept
    if not originals:
        return
    try:
        names = names | state.identity_params
        found = list(ids)
        for raw in (*state.request_ids(scope), *raw_users):
            if raw is not None and raw not in found:
                found.append(raw)
        ids = tuple(found)
        kept_urls[id(span)] = (originals, names, ids)
        pseudonymize = state.pseudonymize
        urls = _Urls(dict(originals))
        urls.attributes.update(scrub_query_ids(originals, scope.get("query_string") or b"", names,
                                               pseudonymize))
        for raw in ids:
            try:
                user = pseudonymize(raw)
            except Exception as exc:  # no text (its __str__ raises): in no URL, the others scrubbed
                record_error("fastapi:urls", exc)
                continue
            if user is not None:
                _scrub_user(urls, raw, user)
        scrubbed = {key: redact_tokens(value, key) for key, value in urls.attributes.items()}
    except Exception as exc:
        record_error("fastapi:urls", exc)
        scrubbed = dict.fromkeys(originals, REDACTED)
    for key, value in scrubbed.items():
        if attributes.get(key) != value:
            span.set_attribute(key, value)


def _scrub_user(span: Any, raw_user: Any, user: str | None) -> None:
    """Replace the raw id in the URL attributes by the pseudonym (``_scrub_urls``), in both readings."""
    raw = user_text(raw_user)
    _scrub_urls(span, raw, user or "")
    utf8 = utf8_reading(raw)  # a header's id is latin-1 text; the URL is decoded as UTF-8
    if utf8 != raw:
        _scrub_urls(span, utf8, user or "")


def _scrub_headers(span: Any, scope: dict) -> None:
    """A request header the identity sources read a user id from, captured by the FastAPI
    instrumentation (``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST`` naming it, or
    a pattern that matches it), is exported with the pseudonym of the id it carries in place of its
    value (``identity.build_header_scrubbers``); values the instrumentation redacted stay so."""
    scrubbers = state.identity_headers
    if not scrubbers:
        return
    try:
        attributes = getattr(span, "attributes", None) or {}
        for key, scrub in scrubbers.items():
            value = attributes.get(key)
            if value is None or (not isinstance(value, str) and all(v == REDACTED for v in value)):
                continue
            span.set_attribute(key, scrub(scope, state.pseudonymize) or [REDACTED])
    except Exception as exc:  # the request is still described
        record_error("fastapi:headers", exc)


#: captured headers whose value is a URL, as the instrumentation names them: a redirect's Location
#: (FastAPI's trailing-slash redirect echoes the request's path), Content-Location, the Referer
_URL_HEADER_KEYS = (normalise_response_header_name("location"),
                    normalise_response_header_name("content-location"), captured_header_key("referer"))


def _scrub_url_headers(span: Any, scope: dict, raw_users: tuple[Any, ...]) -> None:
    """A captured header whose value is a URL, with the request's user ids replaced by their
    pseudonyms as in the span's own URL (``_scrub_request_urls``): where they are a whole path
    segment or a query value, and every value of an identity query parameter by name. Run at the
    span's end, when the response headers are on it. Where scrubbing fails: ``[REDACTED]``."""
    attributes = getattr(span, "attributes", None) or {}
    present = [key for key in _URL_HEADER_KEYS if attributes.get(key)]
    if not present:
        return
    try:
        ids: list[Any] = []
        for raw in (*state.request_ids(scope), *raw_users):
            if raw is not None and raw not in ids:
                ids.append(raw)
        pseudonymize = state.pseudonymize
        users = [(raw, pseudonymize(raw)) for raw in ids]
        for key in present:
            values = attributes[key]
            scrubbed = tuple(_scrub_url_value(value, users, pseudonymize) if isinstance(value, str)
                             else value for value in ((values,) if isinstance(values, str) else values))
            if scrubbed != tuple(values):
                span.set_attribute(key, scrubbed)
    except Exception as exc:
        record_error("fastapi:url_headers", exc)
        for key in present:
            span.set_attribute(key, [REDACTED])


_CAPTURED_HEADERS = CAPTURED_HEADERS


def _redact_header_tokens(span: Any) -> None:
    """Every captured header with the JWTs in its values replaced by ``[REDACTED]``
    (``url_tokens``): a token's claims are the user id in base64url. Those an identity source reads
    carry the pseudonym already (``_scrub_headers``). At the span's end: the response's are on it."""
    attributes = getattr(span, "attributes", None) or {}
    try:
        for key, values in list(attributes.items()):
            if not key.startswith(_CAPTURED_HEADERS):
                continue
            texts = (values,) if isinstance(values, str) else values
            redacted = tuple(redact_token_text(v) if isinstance(v, str) else v for v in texts)
            if redacted != tuple(texts):
                span.set_attribute(key, redacted)
    except Exception as exc:
        record_error("fastapi:header_tokens", exc)


def _scrub_header_ids(span: Any, scope: dict, raw_users: tuple[Any, ...]) -> None:
    """A captured header whose value is one of the request's user ids (a response header echoing
    it, a request header no identity source reads) with that id's pseudonym (``header_ids``). At
    the span's end: the response's are on it. Where scrubbing fails: ``[REDACTED]``."""
    attributes = getattr(span, "attributes", None) or {}
    captured = [key for key in attributes if key.startswith(_CAPTURED_HEADERS)]
    if not captured:
        return  # nearly every span: no header captured
    try:
        changed = scrub_header_ids(attributes, (*state.request_ids(scope), *raw_users),
                                   state.pseudonymize)
    except Exception as exc:
        record_error("fastapi:header_ids", exc)
        changed = dict.fromkeys(captured, (REDACTED,))
    for key, values in changed.items():
        span.set_attribute(key, values)


def _scrub_url_value(value: str, users: list[tuple[Any, str | None]], pseudonymize: Any) -> str:
    head, mark, query = value.partition("?")  # identity parameters first, by name, as they read
    urls = _Urls({"http.url": head + mark + scrub_by_name(query, state.identity_params, pseudonymize)
                  if mark else value})  # a whole URL, or a path with its query
    for raw, user in users:
        if user is not None:
            _scrub_user(urls, raw, user)
    return redact_tokens(urls.attributes["http.url"], "http.url")


# --- the server span of a request pathwatch's middleware never sees --------------------------------------
_REQUEST_SPAN_KINDS = (SpanKind.SERVER, SpanKind.INTERNAL)  # what the FastAPI instrumentation makes


def on_server_span(span: Any, scope: dict) -> None:
    """The FastAPI instrumentation's ``server_request_hook``: runs in its middleware, the outermost
    of the app, right after the server span started. A middleware the app adds with
    ``add_middleware`` sits outside pathwatch's: a request it rejects (a 401) or that it fails with
    an exception never reaches pathwatch's middleware, yet its span has the URL and the exception.
    Here, before any of the app's middlewares runs, the span records exceptions by type only, and
    it is scrubbed at its end of the raw user id the scope names then, unless pathwatch's
    middleware did it. So is the span the instrumentation makes for an app mounted in another
    (``app.mount("/v1", api)``): INTERNAL, the outer app's server span being current, and never
    stamped (the outer one is the request's)."""
    if not state.on:
        return
    try:
        if span.is_recording() and getattr(span, "kind", None) in _REQUEST_SPAN_KINDS:
            _record_exceptions_by_type(span)
            span.end = partial(_end_scrubbed, weakref.ref(span), span.end, scope)
    except Exception as exc:
        record_error("fastapi:server_span", exc)


def _end_scrubbed(reference: Any, end: Any, scope: dict, *args: Any, **kwargs: Any) -> None:
    span = reference()
    try:
        # the response is complete and the call goes on (background tasks): ended at its end
        if (not args and not kwargs and span is not None
                and defer(scope, span, partial(_end_at, reference, end, scope))):
            return
    except Exception as exc:
        record_error("fastapi:server_span_end", exc)
    if span is not None:
        by_type_only(span)  # what the app recorded itself on its request's span
    try:
        if span is not None and state.on and span.is_recording():
            if (span.attributes or {}).get(attr.SPAN_KIND) != SpanKinds.REQUEST:
                info = scope.get(SCOPE_KEY)
                if isinstance(info, RequestInfo):  # a mounted app's span: the request's users
                    raw_users = info.raw_users()
                else:
                    # pathwatch's middleware did not see this request: read its user from the scope
                    # (the headers, the query, a JWT, and what the middlewares it passed set)
                    resolve = (state.websocket_user if scope.get("type") == "websocket"
                               else state.http_user)
                    raw_users = (resolve(scope),)
                _scrub_request_urls(span, scope, raw_users)
                _scrub_headers(span, scope)
                _scrub_url_headers(span, scope, raw_users)
                _scrub_header_ids(span, scope, raw_users)
                _redact_header_tokens(span)
            else:
                info = scope.get(SCOPE_KEY)
                if isinstance(info, RequestInfo):
                    _restamp(span, info, scope)
                    _stamp_users(span, info)
                    _scrub_url_headers(span, scope, info.raw_users())
                    _scrub_header_ids(span, scope, info.raw_users())
                    _redact_header_tokens(span)
    except Exception as exc:
        record_error("fastapi:server_span_end", exc)
    try:
        if span is not None:
            (scope.get(URL_SCOPE_KEY) or {}).pop(id(span), None)
            del span.end  # the span's own again: no cycle through this function, the scope let go
    except Exception:
        pass
    end(*args, **kwargs)


def _end_at(reference: Any, end: Any, scope: dict, end_time: int) -> None:
    _end_scrubbed(reference, end, scope, end_time=end_time)


def _restamp(span: Any, info: RequestInfo, scope: dict) -> None:
    """A request (a socket, mostly) that began before ``uninstrument()`` and ends after an
    ``instrument()`` with another setting: its span was stamped, and its URL scrubbed, under the old
    one. It is exported under the current one, as every span of its work from then on: the old
    pseudonym, or the raw id that raw ids allowed, does not leave the process. So is a request whose
    user the middleware of an app mounted in the app found after its span was stamped
    (``identify_again``): the span carries the user its work did."""
    stamp = info.stamp
    current = info.current()
    if stamp is None or stamp is current:
        return  # stamped under this setting, with this user
    info.stamp = current
    _scrub_headers(span, scope)
    _scrub_request_urls(span, scope, info.raw_users())  # from the URL as sent
    old_user, old_key = stamp[2], stamp[3]
    user, key = current[2], current[3]
    if old_user is not None and (key != old_key or user is None):
        _drop_attribute(span, old_key, user)
    if user is not None:
        span.set_attribute(key, user)
        _stamp_key_id(span, current)
    elif old_user is not None:
        _drop_attribute(span, attr.PSEUDONYM_KEY_ID, None)


def _stamp_users(span: Any, info: RequestInfo) -> None:
    """A socket whose user changed after it connected (``RequestInfo.reread``): its request span
    lists every user it had (``attr.CONNECTION_USERS``), pseudonymized under the setting of its
    end, with the key that made them (also when it ended with no user), so that the work of each
    of them is judged against the socket (the sidecar's ``bleed.span_vs_root_user``). A socket
    that had more users than the list takes (``MAX_CONNECTION_USERS``) says so
    (``attr.CONNECTION_USERS_TRUNCATED``): a span of a user not listed is then not judged."""
    raw_users = info.users()
    if not raw_users:
        return
    try:
        current = info.current()
        pseudonymize = current[0].fast
        users = [user for user in map(pseudonymize, raw_users) if user is not None]
    except Exception as exc:  # not instrumented (no pseudonymizer): not listed
        record_error("fastapi:users", exc)
        return
    if users:
        span.set_attribute(attr.CONNECTION_USERS, users)
        if info.users_truncated:
            span.set_attribute(attr.CONNECTION_USERS_TRUNCATED, True)
        _stamp_key_id(span, current)


def _stamp_key_id(span: Any, stamp: tuple) -> None:
    """The key the request's user id was made with: the sidecar compares users within one key
    (spans of pathwatch's own tracer carry it on their instrumentation scope)."""
    key_id = getattr(stamp[0], "key_id", None)
    if key_id is not None:
        span.set_attribute(attr.PSEUDONYM_KEY_ID, key_id)


def _drop_attribute(span: Any, key: str, replacement: str | None) -> None:
    """Remove an attribute the span was stamped with; the SDK's spans have no public way, so where
    this fails the value is overwritten instead (never left as it was)."""
    try:
        del span._attributes[key]  # the SDK's BoundedAttributes, mutable until the span ends
    except KeyError:
        pass
    except Exception as exc:
        record_error("fastapi:restamp", exc)
        span.set_attribute(key, replacement or "")


def _server_request_hook(user_hook: Any) -> Any:
    """``on_server_span`` followed by the app's own hook, if it gave one."""
    if user_hook is None or getattr(user_hook, "_pathwatch", False):
        return user_hook or on_server_span

    def hook(span: Any, scope: dict) -> None:
        on_server_span(span, scope)
        user_hook(span, scope)
    hook._pathwatch = True  # type: ignore[attr-defined]
    return hook


def _record_exceptions_by_type(span: Any) -> None:
    """The server span is the OpenTelemetry FastAPI instrumentation's: it records an app's exception
    with its message and stack trace, which may carry user ids (``KeyError('alice')``). On this span
    they are recorded by type only, as pathwatch's own spans do (``mark_app_error``)."""
    if getattr(span.record_exception, "func", None) is _exception_by_type:
        return  # done already (by on_server_span)
    reference = weakref.ref(span)  # the span keeps these functions: no reference cycle
    span.record_exception = partial(_exception_by_type, reference)
    span.set_status = partial(_status_by_type, reference, span.set_status)


def _exception_by_type(reference: Any, exception: BaseException, attributes: Any = None,
                       timestamp: int | None = None, escaped: bool = False) -> None:
    span = reference()
    if span is not None:
        span.add_event("exception", {"exception.type": type(exception).__name__,
                                     "exception.escaped": escaped}, timestamp)


def _status_by_type(reference: Any, set_status: Any, status: Any, description: str | None = None) -> None:
    """A status description made from an exception is ``Type: message``: the type is kept."""
    if isinstance(status, Status):
        if status.description:
            status = Status(status.status_code, status.description.partition(":")[0])
    elif description:
        description = description.partition(":")[0]
    if reference() is not None:
        set_status(status, description)


def _scrub_urls(span: Any, raw_user: str, user: str) -> None:
    """Replace the request's raw user id by its pseudonym in the URL attributes the FastAPI
    instrumentation already set, where it is a query parameter's value (``/ws?user_id=alice``) or a
    whole path segment (``/users/alice/runs``): raw ids must not leave the process. The
    instrumentation may keep the URL as sent or partly decoded, so every form is matched, also an id
    with a ``/`` over several segments. (Another user's id in the URL is not known here, and a raw id
    inside a longer segment is not matched.)"""
    attributes = getattr(span, "attributes", None) or {}
    forms = {raw_user, quote(raw_user, safe=""), quote_plus(raw_user, safe="")}
    for key in _URL_KEYS:
        value = attributes.get(key)
        if isinstance(value, str):
            if key == "url.query":
                scrubbed = _scrub_query(value, forms, raw_user, user)
            elif key == "url.path":
                scrubbed = _scrub_path(value, raw_user, user)
            else:  # a whole URL (scheme and host are not path segments) or a target (path?query)
                parts = urlsplit(value)
                scrubbed = urlunsplit(parts._replace(
                    path=_scrub_path(parts.path, raw_user, user),
                    query=_scrub_query(parts.query, forms, raw_user, user) if parts.query else ""))
            if scrubbed != value:
                span.set_attribute(key, scrubbed)


def _is_raw(text: str, forms: set[str], raw_user: str) -> bool:
    return text in forms or unquote(text) == raw_user or unquote_plus(text) == raw_user


def _scrub_query(query: str, forms: set[str], raw_user: str, user: str) -> str:
    parts = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        parts.append(f"{name}={user}" if eq and _is_raw(value, forms, raw_user) else pair)
    return "&".join(parts)


def _scrub_path(path: str, raw_user: str, user: str) -> str:
    """Whole path segments equal to the raw id, as sent or percent-encoded (``+`` is a plus in a
    path, not a space). An id with a ``/`` in it (``tenant/alice``, base64) sent as one encoded
    segment may reach the span decoded, over several segments: every run of whole segments (bounded
    by ``/`` or the path's ends) that reads as the id is replaced, the longest first."""
    segments = path.split("/")
    most = raw_user.count("/") + 1  # a run of more segments has more slashes than the id
    if most == 1:
        return "/".join(user if segment and (segment == raw_user or unquote(segment) == raw_user)
                        else segment for segment in segments)
    scrubbed = []
    index, count = 0, len(segments)
    while index < count:
        for length in range(min(most, count - index), 0, -1):
            text = "/".join(segments[index:index + length])
            if text and (text == raw_user or unquote(text) == raw_user):
                scrubbed.append(user)
                index += length
                break
        else:
            scrubbed.append(segments[index])
            index += 1
    return "/".join(scrubbed)


# --- putting the middleware into apps -----------------------------------------------------------------
def add_middleware(app: Any) -> None:
    """Append the middleware innermost (later ``add_middleware`` calls wrap it from outside).

    An app that has it already keeps its middleware stack as built: ``uninstall()`` leaves the
    middleware in place (it passes every request through while pathwatch is off), so that a key
    rotation (``uninstrument()``, ``instrument()``) does not make Starlette build every middleware of
    the app anew, which reset the state they keep in their instances (a rate limiter's counts, a
    cache, a circuit breaker) and ran their ``__init__`` again. An app that never had it and has
    served requests already (``instrument_app`` called late) has its stack rebuilt, as it must be
    to take a middleware (Starlette's own ``add_middleware`` refuses then): that is said in the log."""
    from starlette.middleware import Middleware

    if any(getattr(m, "cls", None) is PathwatchMiddleware for m in app.user_middleware):
        return
    app.user_middleware.append(Middleware(PathwatchMiddleware))
    if app.middleware_stack is not None:
        _logger.warning(
            "pathwatch: the FastAPI app %r has served requests already: its middleware stack is "
            "built again with pathwatch's middleware, and its middlewares start with new instances "
            "(state they keep, such as rate limits or caches, starts anew). Call instrument_app() "
            "before the app serves", getattr(app, "title", type(app).__name__))
    app.middleware_stack = None  # built on the next call, with the middleware


def ensure_request_spans(app: Any, tracer_provider: Any = None) -> None:
    """Have the OpenTelemetry FastAPI instrumentation make the server spans, without send/receive."""
    from opentelemetry.instrumentation import fastapi as otel_fastapi

    instrumented_cls = getattr(otel_fastapi, "_InstrumentedFastAPI", None)
    if instrumented_cls is not None and isinstance(app, instrumented_cls):
        # FastAPIInstrumentor is active and instruments this app right after __init__ returns:
        # give it our default instead of instrumenting twice.
        kwargs = getattr(instrumented_cls, "_instrument_kwargs", None)
        if isinstance(kwargs, dict):
            kwargs.setdefault("exclude_spans", EXCLUDE_SPANS)
            kwargs["server_request_hook"] = _server_request_hook(kwargs.get("server_request_hook"))
        return
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        return  # instrumented by the app itself: pathwatch's middleware scrubs what it sees
    otel_fastapi.FastAPIInstrumentor.instrument_app(app, exclude_spans=EXCLUDE_SPANS,
                                                    tracer_provider=tracer_provider,
                                                    server_request_hook=on_server_span)


def instrument_app(app: Any, pathmap: Any = None, *, tracer_provider: Any = None,
                   request_spans: bool = True) -> Any:
    """Explicit use: instrument pathwatch (if not yet) and give ``app`` the middleware."""
    from instrumentation import PathwatchInstrumentor

    instrumentor = PathwatchInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(pathmap=pathmap, tracer_provider=tracer_provider,
                                request_spans=request_spans)
    if request_spans:
        ensure_request_spans(app, tracer_provider)
    add_middleware(app)
    return app


# --- zero-code: every FastAPI app built gets it -------------------------------------------------------
_settings: dict[str, Any] = {"request_spans": True, "tracer_provider": None}
_patched: list[Any] = []


def _after_init(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    if state.on:
        try:
            if _settings["request_spans"]:
                ensure_request_spans(instance, _settings["tracer_provider"])
            add_middleware(instance)
        except Exception as exc:
            record_error("fastapi:init", exc)
    return result


def on_fastapi_import(module: Any, *, request_spans: bool = True, tracer_provider: Any = None) -> None:
    _settings.update(request_spans=request_spans, tracer_provider=tracer_provider)
    if not _patched:
        wrapt.wrap_function_wrapper(module, "FastAPI.__init__", _after_init)
        _patched.append(module.FastAPI)


def uninstall() -> None:
    """Apps built from now on get nothing. The apps that have the middleware keep it, passing every
    request through until the next ``instrument()`` (``add_middleware``)."""
    for cls in _patched:
        try:
            unwrap(cls, "__init__")
        except Exception as exc:
            record_error("fastapi:unwrap", exc)
    _patched.clear()
