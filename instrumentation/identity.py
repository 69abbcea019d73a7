"""Who the work is for: the ambient (request) user, instance owners, and pseudonyms.

* The ambient user lives in a context variable set by the ASGI middleware (``RequestInfo``), so it
  follows the request into every task it spawns. A socket's user may be named after it connected
  (a first-message login stored in ``websocket.state``, a logout and a login as another user): its
  ``scope`` sources are read again at each of its spans and writes (``RequestInfo.reread``). So
  are an HTTP request's, at its spans: its user may be named after pathwatch's middleware saw it (a
  FastAPI dependency storing ``request.state.user_id``, an authentication middleware that runs
  after pathwatch's), or change (an endpoint that logs in as another user, an account switch).
* Instances get a stable token (a per-process counter, never ``id()``) and, for user-scoped roles,
  the owner read right after ``__init__``, kept per role's owner paths (a span carries its own
  role's); both live in ``InstanceRegistry``, keyed by object identity and cleaned up by a weakref
  callback when the object dies.
* User ids are pseudonymized with HMAC-SHA256 before they reach a span; the pseudonym of a raw id is
  cached in a bounded LRU because it is computed on every wrapped call.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import itertools
import json
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qsl

from opentelemetry.util.http import normalise_request_header_name

from instrumentation import attributes as attr
from instrumentation.errors import ConfigurationError, record_error
from instrumentation.extractors import walk
from instrumentation.forks import in_forked_child
from instrumentation.routes import path_params
from instrumentation.runtime import state

HMAC_KEY_ENV = "PATHWATCH_HMAC_KEY"
ALLOW_RAW_ENV = "PATHWATCH_ALLOW_RAW_USER_IDS"
PSEUDONYM_LENGTH = 32
#: ``Pseudonymizer.key_id``: the first hex digits of HMAC-SHA256(key, this message), or ``raw``
KEY_ID_MESSAGE = b"pathwatch.pseudonym.key_id"
KEY_ID_LENGTH = 8
RAW_KEY_ID = "raw"
#: the shortest key accepted, in bytes (128 bits when they are random; a hex key of this length has
#: 64, hence the docs' `openssl rand -hex 32`). A short (or guessable) key lets anyone who sees the spans
#: recover the key and then guessable ids (user-13) from their pseudonyms offline
MIN_KEY_BYTES = 16
PSEUDONYM_CACHE_SIZE = 65536
#: the longest id (characters, or bytes of one that is not UTF-8) whose pseudonym is cached: a
#: longer one is hashed at each use. The cache keeps the ids it holds alive: with no bound on their
#: length, a client sending a new 16 KB header value (or query value) an identity source reads at
#: each request made the cache hold 1 GiB at its 65536 entries
PSEUDONYM_CACHE_MAX_ID = 256

#: random per process, so tokens, connection ids and event ids from two replicas never collide;
#: drawn again in a forked child (``_after_fork_in_child``): gunicorn's workers are forks of one
#: master, where the app (and pathwatch) may be loaded already
PROCESS_TOKEN = os.urandom(4).hex()
_id_factories: weakref.WeakSet[Any] = weakref.WeakSet()


def new_id_factory(letter: str) -> Callable[[], str]:
    """Ids like ``i-1a2b3c4d-17``: unique in the process for its lifetime and across replicas (and
    across the forks of one process: a forked child starts its factories over with its own token)."""
    counter = itertools.count(1)
    prefix = f"{letter}-{PROCESS_TOKEN}-"

    def new_id() -> str:
        return prefix + str(next(counter))

    def restart() -> None:
        nonlocal counter, prefix
        counter = itertools.count(1)
        prefix = f"{letter}-{PROCESS_TOKEN}-"
    new_id.restart = restart  # type: ignore[attr-defined]
    _id_factories.add(new_id)
    return new_id


# --- pseudonyms ------------------------------------------------------------------------------------
class Pseudonymizer:
    """Turns raw user ids into HMAC pseudonyms (or passes them through when raw ids are allowed)."""

    def __init__(self, key: bytes | None, allow_raw: bool = False,
                 cache_size: int = PSEUDONYM_CACHE_SIZE) -> None:
        if key is None and not allow_raw:
            raise ConfigurationError(
                f"pathwatch needs a key to pseudonymize user ids: set {HMAC_KEY_ENV}, or set "
                f"{ALLOW_RAW_ENV}=1 to export raw user ids (only where that is allowed)")
        if key is not None:
            check_key(key)
        self.raw = key is None
        #: which key made the pseudonyms (``attr.PSEUDONYM_KEY_ID``): not the key, and no way back to
        #: it that the pseudonyms themselves do not already give
        self.key_id = RAW_KEY_ID if self.raw else hmac.new(
            key, KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:KEY_ID_LENGTH]
        #: the attribute key of the ambient user on request spans
        self.enduser_key = attr.ENDUSER_ID if self.raw else attr.ENDUSER_PSEUDO_ID
        limit = PSEUDONYM_CACHE_MAX_ID
        if self.raw:
            self._pseudonym = digest = cached = str
            normalise: Callable[[Any], str | bytes] = user_text
        else:
            def digest(raw: str | bytes) -> str:
                data = raw.encode("utf-8") if type(raw) is str else raw
                return hmac.new(key, data, hashlib.sha256).hexdigest()[:PSEUDONYM_LENGTH]
            cached = functools.lru_cache(maxsize=cache_size)(digest)

            def pseudonym(raw: str | bytes) -> str:
                return cached(raw) if len(raw) <= limit else digest(raw)
            pseudonym.cache_info = cached.cache_info  # type: ignore[attr-defined]
            self._pseudonym = pseudonym
            normalise = normalised_id

        def fast(raw: Any) -> str | None:
            # the hot-path form of __call__: a plain function, no method lookup; a long id is not
            # cached (``PSEUDONYM_CACHE_MAX_ID``)
            if type(raw) is str:
                if not raw:
                    return None
                return cached(raw) if len(raw) <= limit else digest(raw)
            if raw is None:
                return None
            value = normalise(raw)
            if not value:
                return None
            return cached(value) if len(value) <= limit else digest(value)
        #: ``fast(raw)`` == ``self(raw)``, for the per-call paths
        self.fast = fast

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Pseudonymizer:
        key = environ.get(HMAC_KEY_ENV) or None
        allow_raw = environ.get(ALLOW_RAW_ENV, "").strip().lower() in ("1", "true", "yes")
        # the variable's bytes: a key of random bytes (``openssl rand 32``, not UTF-8) reaches
        # os.environ with surrogate escapes, which plain UTF-8 cannot encode
        return cls(key.encode("utf-8", "surrogateescape") if key else None, allow_raw=allow_raw)

    def __call__(self, raw: Any) -> str | None:
        """Pseudonym of a raw id (any scalar, see ``normalised_id``); None and empty ids are None."""
        return self.fast(raw)


def check_key(key: bytes) -> None:
    """Refuse a key too weak to keep pseudonyms from being reversed: shorter than ``MIN_KEY_BYTES``
    (in UTF-8 bytes, as the environment's text is used) or only whitespace. The key itself is never
    put in the message: it is logged."""
    if not isinstance(key, (bytes, bytearray)):
        raise ConfigurationError(f"the {HMAC_KEY_ENV} key must be bytes, not {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"{HMAC_KEY_ENV} is too short ({len(key)} bytes): the key that pseudonymizes user ids must "
            f"have at least {MIN_KEY_BYTES} bytes ({MIN_KEY_BYTES * 8} bits), or its pseudonyms can be "
            f"reversed offline; use a random one, e.g. `openssl rand -hex 32`")
    if not bytes(key).decode("utf-8", "replace").strip():
        raise ConfigurationError(
            f"{HMAC_KEY_ENV} is only whitespace: the key that pseudonymizes user ids must be random "
            f"(at least {MIN_KEY_BYTES} bytes), e.g. `openssl rand -hex 32`")


_BINARY = (bytes, bytearray, memoryview)


def normalised_id(raw: Any) -> str | bytes:
    """What a raw user id is pseudonymized as: text as it is; bytes (a Redis value, a raw token)
    decoded as UTF-8, so ``b"alice"`` is the same user as ``"alice"`` from a header, or the bytes
    themselves when they are not UTF-8; anything else (an int, a UUID) as ``str(raw)``, unless its
    type has no text of its own (neither ``__str__`` nor ``__repr__``: its text would be its address,
    another made-up user for each object, e.g. Starlette's ``UnauthenticatedUser`` as
    ``scope["user"]``): "", no user. Documented in docs/conventions.md (User ids)."""
    if isinstance(raw, str):
        return str.__str__(raw)  # a str subclass (a str Enum) as the text it equals
    if isinstance(raw, _BINARY):
        data = bytes(raw)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data
    kind = type(raw)
    if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
        return ""
    return str(raw)


def user_text(raw: Any) -> str:
    """A raw user id as text (``normalised_id``; bytes that are not UTF-8 with backslash escapes)."""
    value = normalised_id(raw)
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def names_user(value: Any) -> bool:
    """Whether a value that is not None and not ``""`` (checked first, where a value that cannot be
    compared is counted) names a user: bytes that are empty, an object with no text of its own or
    whose text is empty do not (``normalised_id``), and an identity source or a user path that
    reads one does not resolve: the next alternative is read (docs/pathmap.md). One whose text
    raises does name one: the error is counted where it is made text, its attribute left off."""
    if type(value) is str:
        return True
    try:
        return bool(normalised_id(value))
    except Exception:
        return True


def value_text(raw: Any) -> str:
    """A run id, conversation thread id, event type or event id as the text exported: read as a user
    id is (``user_text``: a string Enum as the text it equals, bytes as UTF-8), and any Enum member
    as its value, so that an emit called with ``EventType.AGENT_STARTED`` or ``b"run-7"`` and the
    JSON message it writes (``"agent_started"``, ``"run-7"``) name the same event (their message key
    links the write to the emit). Documented in docs/conventions.md (Attributes)."""
    if type(raw) is str:
        return raw
    if isinstance(raw, enum.Enum) and not isinstance(raw, str):
        raw = raw.value
    return user_text(raw)


# --- the ambient request -----------------------------------------------------------------------------
class RequestInfo:
    """What the middleware learnt about the request or socket that started the current work.

    The user is kept as its raw id (``normalised_id``), never exported as it is: ``span_attrs`` and
    ``pseudonym`` make it a pseudonym with the setting in force when they are called, cached until
    the next ``instrument()``. A socket outlives ``uninstrument()``: its spans after an
    ``instrument()`` with another key (or raw ids no longer allowed) must not carry the old
    pseudonym, or a raw id, beside owners and targets under the new one."""

    __slots__ = ("entry_point", "connection_id", "opened", "stamp", "_user", "_cache", "_live",
                 "_users", "users_truncated", "after_response", "span_id")

    def __init__(self, entry_point: str | None, user: Any, connection_id: str | None = None,
                 opened: int | None = None, live: LiveIdentity | None = None) -> None:
        self.entry_point = entry_point
        self.connection_id = connection_id
        #: a socket's place in the order of emits when it opened (``linking.connection_opened``);
        #: None when not known (the middleware did not see it begin)
        self.opened = opened
        self._user: str | bytes | None = None if user is None else normalised_id(user) or None
        #: a socket or HTTP request whose user may change after it started
        #: (``build_socket_identity``): read again at each of its spans and writes; None (no
        #: ``scope`` source that could win) costs one check
        self._live = live
        #: every user the socket or request had, in order, once its user changed (None until
        #: then): its request span lists them (``attr.CONNECTION_USERS``), raw in the process
        self._users: list[str | bytes] | None = None
        #: it had a user ``_users`` could not take (``MAX_CONNECTION_USERS`` listed already): its
        #: request span says so (``attr.CONNECTION_USERS_TRUNCATED``)
        self.users_truncated = False
        #: (the pseudonymizer it was built with, span attributes, pseudonym, enduser key): one
        #: tuple, replaced whole, so another thread never reads half of a renewal; built from one
        #: ``state.pseudonymizer`` (function and key together) and checked against it
        self._cache: tuple[Any, dict[str, str], str | None, str] = (None, {}, None, "")
        #: the cache the request's server span was stamped with (``fastapi.describe_request``)
        self.stamp: tuple[Any, dict[str, str], str | None, str] | None = None
        #: an HTTP request whose response is complete while its call goes on
        #: (``after_response.defer``): False, then True once one of its spans started after it
        self.after_response: bool | None = None
        #: its server span's id (16 hex digits), which every span under it carries
        #: (``attr.REQUEST_SPAN_ID``); None when pathwatch did not stamp one (set before first use)
        self.span_id: str | None = None

    @property
    def raw_user(self) -> str | bytes | None:
        """The raw id, only to find it in the request's own URL: never exported as it is."""
        return self._user

    def identify(self, user: Any, live: LiveIdentity | None = None) -> None:
        """The request's user, as a middleware further in found it (that of an app mounted in
        another: ``fastapi.identify_again``): every span made from then on, every write on the
        socket, carries it, and its server span is stamped with it at its end. The same user, or
        none, changes nothing. ``live``: a socket's sources read again from then on in the scope
        that middleware saw (the view its endpoint has), not the outer one's."""
        raw = normalised_id(user) or None
        if raw is not None:
            current = self._live
            if current is not None and (live is not None or current.http):
                # the mounted app's view from then on; an HTTP request's user named there by a
                # source fixed for its life (a header): it wins, nothing is read again
                self._live = live
            if raw != self._user:
                self._change(raw, listed_from_none=False)

    def current(self) -> tuple[Any, dict[str, str], str | None, str]:
        """The cache of the current setting, built at its first use under it."""
        if self._live is not None:
            self.reread()
        cache = self._cache
        if cache[0] is not state.pseudonymizer:
            cache = self._renew()
        return cache

    def span_attrs(self, setting: Any = None) -> dict[str, str]:
        """The attributes every span under this request carries (entry point, ambient user), under
        ``setting`` (a span's, read with its tracer: ``state.setting``), else the current one."""
        if self.after_response is False:
            self.after_response = True  # a span started after the response (a background task)
        if self._live is not None:
            self.reread()
        if setting is None:
            setting = state.pseudonymizer
        cache = self._cache
        return cache[1] if cache[0] is setting else self._renew(setting)[1]

    def pseudonym(self, setting: Any = None) -> str | None:
        """The user's pseudonym (the raw id when raw ids are allowed) under ``setting``, else the
        current one."""
        if self._live is not None:
            self.reread()
        if setting is None:
            setting = state.pseudonymizer
        cache = self._cache
        return cache[2] if cache[0] is setting else self._renew(setting)[2]

    def reread(self) -> None:
        """A socket's or HTTP request's user as its ``scope`` sources name it now
        (``LiveIdentity.read``): a user the app stored after connect (a first-message login:
        ``websocket.state.user_id``) or after the middleware saw the request (a dependency's
        ``request.state.user_id``), another after a logout and a login, or an account switch in an
        endpoint, none after a logout. A change is the request's from then on: every span and write
        made afterwards carries it, whatever task makes it, and the users it had are kept for its
        request span (``users``)."""
        live = self._live
        if live is None:
            return  # let go by another thread since its caller looked (an HTTP request's end)
        try:
            raw = live.read()
            if raw is not None and type(raw) is not str:
                raw = normalised_id(raw) or None
        except Exception as exc:  # an id that cannot be made text: no user, as at its start (not
            record_error("identity:source", exc)  # the user before, whom the app replaced)
            raw = None
        if raw == self._user:
            return  # the common case: no change (one read of a dict or two)
        self._change(raw, listed_from_none=not live.http)

    def _change(self, raw: str | bytes | None, listed_from_none: bool) -> None:
        """The request's user is ``raw`` from now on; the users it had are kept for its request
        span (``users``) once it changed from one user to another, or to none. ``listed_from_none``:
        a first user named where there was none starts the list too (a socket's login; an HTTP
        request named by a dependency has one user until it changes)."""
        users = self._users
        if users is None:
            if self._user is None and not listed_from_none:
                self._user = raw  # named for the first time: one user so far, nothing to list
                self._renew()
                return
            users = self._users = [] if self._user is None else [self._user]
        if raw is not None and raw not in users:
            if len(users) < MAX_CONNECTION_USERS:
                users.append(raw)
            else:  # bounded: the request span says the list is not whole
                self.users_truncated = True
        self._user = raw
        self._renew()

    def settle(self) -> None:
        """An HTTP request that ended: its ``scope`` sources read one last time (its server span,
        stamped when it ends right after, has the user named or changed at the very end) and let
        go, so that the request's scope is not kept as long as a task it started runs, and
        no reference cycle through it (the scope holds this) is left to the garbage collector."""
        live = self._live
        if live is not None and live.http:
            self.reread()
            self._live = None

    def raw_users(self) -> tuple[str | bytes | None, ...]:
        """Every user the request had, raw (those ``users`` lists and its user now), only to find
        them in its own URL: a user it had before its user changed (an id in the path, named by a
        dependency, then an account switch) must leave the URL as its pseudonym too."""
        users = self._users
        return (self._user,) if users is None else (*users, self._user)

    def users(self) -> list[str | bytes] | None:
        """Every user the socket or request had once its user changed (``reread``), raw, in
        order; None when it never changed. Only to stamp its request span, pseudonymized."""
        return None if self._users is None else list(self._users)

    def _renew(self, setting: Any = None) -> tuple[Any, dict[str, str], str | None, str]:
        if setting is None:
            setting = state.pseudonymizer  # read once: its function and key belong together
        pseudonymize, enduser_key = setting.fast, setting.enduser_key
        attrs: dict[str, str] = {}
        if self.entry_point is not None:
            attrs[attr.ENTRY_POINT] = self.entry_point
        if self.span_id is not None:
            attrs[attr.REQUEST_SPAN_ID] = self.span_id
        user = None
        if self._user is not None:
            try:
                user = pseudonymize(self._user)
            except Exception as exc:  # not instrumented (no pseudonymizer): no user, the span made
                record_error("identity:request_user", exc)
            if user is not None:
                attrs[enduser_key] = user
        cache = self._cache = (setting, attrs, user, enduser_key)
        return cache


current_request: ContextVar[RequestInfo | None] = ContextVar("pathwatch_request", default=None)


# --- identity sources in the ASGI scope ----------------------------------------------------------------
ScopeResolver = Callable[[Mapping[str, Any]], Any]
#: users a socket's request span lists (``RequestInfo.users``): more are not added
MAX_CONNECTION_USERS = attr.MAX_CONNECTION_USERS


class LiveIdentity:
    """A socket's or HTTP request's ``scope`` sources, to be read again after it started: those
    before the first other source (a header, the query, a JWT claim, a path parameter: fixed for
    the request's life) that named a user at its start, which can never win over it; ``fallback``
    is that user, the request's when none of them names one. ``http``: an HTTP request's, read a
    last time and let go when it ends (``RequestInfo.settle``)."""

    __slots__ = ("scope", "getters", "fallback", "http")

    def __init__(self, scope: Mapping[str, Any], getters: tuple[ScopeResolver, ...],
                 fallback: Any, http: bool = False) -> None:
        self.scope = scope
        self.getters = getters
        self.fallback = fallback
        self.http = http

    def read(self) -> Any:
        """The raw user the sources name now, as ``build_scope_resolver`` reads them (first that
        resolves wins; one that raises is counted and the next tried)."""
        scope = self.scope
        for get in self.getters:
            try:
                value = get(scope)
                if value is not None and value != "" and (type(value) is str or names_user(value)):
                    return value
            except Exception as exc:
                record_error("identity:source", exc)
        return self.fallback


SocketIdentity = Callable[[Mapping[str, Any]], "tuple[Any, LiveIdentity | None]"]


def build_socket_identity(sources: list[Any], http: bool = False) -> SocketIdentity:
    """A function scope -> (raw user at connect, ``LiveIdentity`` or None): the user as
    ``build_scope_resolver`` reads it, and the ``scope`` sources that may name another one later
    (None when there are none that could win: nothing is read again). ``http``: an HTTP
    request's (``build_request_identity``)."""
    getters = [(bool(source.scope), _source_getter(source)) for source in sources]
    if not any(live for live, _ in getters):
        resolve = build_scope_resolver(sources)
        return lambda scope: (resolve(scope), None)

    def identify(scope: Mapping[str, Any]) -> tuple[Any, LiveIdentity | None]:
        live: list[ScopeResolver] = []
        found = fallback = None
        for is_live, get in getters:
            try:
                value = get(scope)
                resolved = value is not None and value != "" and names_user(value)
            except Exception as exc:
                record_error("identity:source", exc)
                resolved = False
            if is_live:
                live.append(get)
                if resolved and found is None:
                    found = value
            elif resolved:
                fallback = value
                break
        user = found if found is not None else fallback
        return user, LiveIdentity(scope, tuple(live), fallback, http) if live else None
    return identify


def build_request_identity(sources: list[Any]) -> SocketIdentity:
    """A function scope -> (raw user when the request starts, ``LiveIdentity`` or None) for HTTP
    requests, as a socket's (``build_socket_identity``): its ``scope`` sources that could win are
    read again at the request's spans (``RequestInfo.reread``) -- a FastAPI dependency, or an
    authentication middleware that runs after pathwatch's (one inside a ``Mount``), names the user
    after the middleware saw the request; an endpoint that logs in as another user (an account
    switch) stores another -- and a last time when it ends (``RequestInfo.settle``). None when a
    source read from what the client sent (a header, the query, a JWT claim, a path parameter:
    fixed by then) named the user before any ``scope`` source, or there is no ``scope`` source."""
    return build_socket_identity(sources, http=True)


def build_scope_resolver(sources: list[Any]) -> ScopeResolver:
    """A function scope -> raw user id, trying the path map's identity sources in order."""
    getters = [_source_getter(source) for source in sources]

    def resolve(scope: Mapping[str, Any]) -> Any:
        for get in getters:
            try:
                value = get(scope)
                if value is not None and value != "" and names_user(value):
                    return value
            except Exception as exc:  # e.g. a scope["user"] whose attribute raises: the next source
                record_error("identity:source", exc)
        return None
    return resolve


def _source_getter(source: Any) -> ScopeResolver:
    if source.header:
        name = source.header.lower().encode("latin-1")
        return lambda scope: _header(scope, name)
    if source.query_param:
        key = source.query_param
        return lambda scope: _query_param(scope, key)
    if source.jwt_claim:
        claim = tuple(source.jwt_claim.split("."))
        return lambda scope: _jwt_claim(scope, claim)
    if source.path_param:
        name = source.path_param
        return lambda scope: path_params(scope).get(name)
    chain = tuple(source.scope.split("."))
    return lambda scope: walk(scope, chain)


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return _decode_header(value)
    return None


def _header_values(scope: Mapping[str, Any], name: bytes) -> list[str]:
    return [_decode_header(value) for key, value in scope.get("headers") or () if key.lower() == name]


def _decode_header(value: bytes) -> str:
    """As latin-1, exactly as Starlette hands header values to the app (``Header()``, ``request.
    headers``): the ambient pseudonym must equal the one of the owner or subject the app builds from
    the same header, or every request of a non-ASCII id would look like bleed. The URL, decoded as
    UTF-8, is scrubbed of both readings (``fastapi._scrub_urls``)."""
    return value.decode("latin-1")


def utf8_reading(text: str) -> str:
    """``text`` read from latin-1 bytes, as those bytes read as UTF-8 (itself when they are not)."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _query_param(scope: Mapping[str, Any], key: str) -> str | None:
    """The parameter as the app reads it: Starlette's ``query_params[key]`` and FastAPI's
    ``Query()`` take the last of a parameter sent twice (``?user_id=alice&user_id=bob`` is bob),
    an empty one included (no user)."""
    values = _query_values(scope, key)
    return values[-1] if values else None


def _query_values(scope: Mapping[str, Any], key: str) -> list[str]:
    """Every value of the parameter, as the app reads each (``parse_qsl`` of the latin-1 text)."""
    raw = scope.get("query_string") or b""
    return [value for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
            if name == key]


def _jwt_claim(scope: Mapping[str, Any], claim: tuple[str, ...]) -> Any:
    return _bearer_claim(_header(scope, b"authorization"), claim)


def _bearer_claim(auth: str | None, claim: tuple[str, ...]) -> Any:
    # Read unverified on purpose: pathwatch observes who the backend thinks the user is; verifying
    # tokens is the backend's job and pathwatch holds no keys.
    if not auth or not auth[:7].lower() == "bearer ":
        return None
    parts = auth[7:].strip().split(".")
    if len(parts) < 2:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, UnicodeError):
        return None
    value = None
    if len(claim) > 1 and isinstance(claims, dict):
        # a claim whose name has dots: a namespaced custom claim ("https://acme.example/user_id",
        # as Auth0 requires them), taken whole before the dotted path is followed
        value = claims.get(".".join(claim))
    if value is None:
        value = walk(claims, claim)
    return value if isinstance(value, (str, int)) else None


# --- every user id a request carries ---------------------------------------------------------------------
def query_param_names(sources: list[Any]) -> frozenset[str]:
    """The query parameters the identity sources read a user id from: each of their values in the
    server span's URL is replaced by its pseudonym (``query_ids``)."""
    return frozenset(source.query_param for source in sources if source.query_param)


def build_request_ids(sources: list[Any]) -> ScopeResolver:
    """A function scope -> every raw user id the request carries where the identity sources read
    one, each once: every value of a header or query parameter sent more than once (the app reads
    one of them, so does the ambient user), the claim of every ``Authorization`` header, the scope
    path's. The server span's URL is scrubbed of them all (``fastapi._scrub_request_urls``), not
    only of the ambient user's."""
    getters = [_values_getter(source) for source in sources]

    def request_ids(scope: Mapping[str, Any]) -> list[Any]:
        found: list[Any] = []
        for get in getters:
            try:
                for value in get(scope):
                    if value is not None and value != "" and value not in found:
                        found.append(value)
            except Exception:  # counted where the same source gives the ambient user (resolve)
                pass
        return found
    return request_ids


def _values_getter(source: Any) -> Callable[[Mapping[str, Any]], list[Any]]:
    if source.header:
        name = source.header.lower().encode("latin-1")
        return lambda scope: _header_values(scope, name)
    if source.query_param:
        key = source.query_param
        return lambda scope: _query_values(scope, key)
    if source.jwt_claim:
        claim = tuple(source.jwt_claim.split("."))
        return lambda scope: [_bearer_claim(value, claim)
                              for value in _header_values(scope, b"authorization")]
    if source.path_param:
        name = source.path_param
        return lambda scope: [path_params(scope).get(name)]
    chain = tuple(source.scope.split("."))
    return lambda scope: [walk(scope, chain)]


# --- captured request headers that carry a user id ---------------------------------------------------
REDACTED = "[REDACTED]"  # as the OpenTelemetry instrumentations' own sanitizing


#: name -> the span attribute the OpenTelemetry HTTP server instrumentations give a request header
#: they capture (``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST``): their own function
captured_header_key: Callable[[str], str] = normalise_request_header_name


HeaderScrubber = Callable[[Mapping[str, Any], Callable[[Any], Any]], list[str]]


def build_header_scrubbers(sources: list[Any]) -> dict[str, HeaderScrubber]:
    """For each request header an identity source reads a user id from (a ``header`` source;
    ``Authorization`` for a ``jwt_claim`` source), its captured attribute -> a function (scope,
    pseudonymize) -> the header's values as they should be exported: a header source's value by its
    pseudonym, an Authorization header by the pseudonym of its first claim that resolves (or
    ``[REDACTED]``: it is a credential). Values are read from the scope in order, as the
    instrumentation collected them."""
    scrubbers: dict[str, HeaderScrubber] = {}
    claims: list[tuple[str, ...]] = []
    for source in sources:
        if source.header:
            key = captured_header_key(source.header)
            if key not in scrubbers:
                scrubbers[key] = functools.partial(_scrubbed_values, key, _id_of_value)
        elif source.jwt_claim:
            claims.append(tuple(source.jwt_claim.split(".")))
    if claims:
        key = captured_header_key("authorization")
        scrubbers[key] = functools.partial(_scrubbed_values, key,
                                           functools.partial(_id_of_bearer, tuple(claims)))
    return scrubbers


def _scrubbed_values(key: str, read: Callable[[str], Any], scope: Mapping[str, Any],
                     pseudonymize: Callable[[Any], Any]) -> list[str]:
    values = []
    for name, value in scope.get("headers") or ():
        if captured_header_key(name.decode("latin-1")) == key:
            raw = read(_decode_header(value))
            user = pseudonymize(raw) if raw is not None else None
            values.append(user if user is not None else REDACTED)
    return values


def _id_of_value(value: str) -> str:
    return value


def _id_of_bearer(claims: tuple[tuple[str, ...], ...], value: str) -> Any:
    for claim in claims:
        found = _bearer_claim(value, claim)
        if found is not None and found != "":
            return found
    return None


# --- instances: stable tokens and owners ---------------------------------------------------------------
class _InstanceEntry:
    __slots__ = ("ref", "token", "_owners", "cached")

    def __init__(self, ref: Any, token: str) -> None:
        self.ref = ref
        self.token = token
        #: (owner paths, the owner's raw id or None) per set of owner paths read (after __init__, or
        #: at the first call): one per role, mostly. Replaced whole, never changed in place
        self._owners: tuple[tuple[Any, str | bytes | None], ...] = ()
        #: (role, setting, span attributes of this instance, its class), built at its first
        #: wrapped call of a role (of this instrumentation: ``instrument()`` makes new roles) under
        #: the setting (``state.setting``'s pseudonymizer) of that call: its owner's pseudonym is of
        #: that key; built again when its class is another (``instance.__class__ = Other``)
        self.cached: tuple[Any, Any, dict[str, Any], type] | None = None

    def owner_of(self, chains: Any) -> tuple[bool, str | bytes | None]:
        """(read, owner): whether these owner paths were read on the instance, and the owner's raw id
        (``normalised_id``) they gave. Owners are kept per paths: an instance whose class inherits
        from a class of another role is captured through the paths of both (a base's ``__init__``
        wrapper runs under ``super().__init__()``), and a span carries only the owner of its own
        role's paths. Kept raw and pseudonymized into ``cached`` with the pseudonymizer of the time:
        the registry outlives ``uninstrument()``, and a later ``instrument()`` with another key (or
        none) must not export the old pseudonym, or a raw id."""
        for paths, owner in self._owners:
            if paths is chains or paths == chains:
                return True, owner
        return False, None

    def set_owner(self, chains: Any, value: Any) -> str | bytes | None:
        """Remember what ``chains`` read (None: nothing resolved) and return it as remembered; raises
        on an id ``normalised_id`` cannot make text (nothing is remembered then)."""
        owner = None if value is None else normalised_id(value)
        self._owners = tuple(pair for pair in self._owners
                             if pair[0] is not chains and pair[0] != chains) + ((chains, owner),)
        self.cached = None
        return owner


class InstanceRegistry:
    """Stable per-process tokens and captured owners of instances, without touching the instances.

    Keyed by ``id(obj)`` only while the object lives: the weakref callback removes the entry when the
    object dies, before its id can be reused, and every lookup checks the weakref still points at
    the same object. Objects that cannot be weakly referenced get no token.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _InstanceEntry] = {}
        #: a forked child's entries made by its parent, given a new token at their first use here
        #: (see after_fork_in_child); only looked at when ``_entries`` has no live entry for an object
        self._inherited: dict[int, _InstanceEntry] = {}
        # reentrant: _forget is a weakref callback, and a collection at an allocation it makes under
        # the lock can free another registered instance (one in a reference cycle), whose _forget
        # runs then, in the same thread, under the lock it holds (a plain Lock: a deadlock for good)
        self._lock = threading.RLock()
        self._new_token = new_id_factory("i")

    def __len__(self) -> int:
        return len(self._entries) + len(self._inherited)

    def entry(self, obj: Any) -> _InstanceEntry | None:
        key = id(obj)
        entry = self._entries.get(key)
        if entry is not None and entry.ref() is obj:
            return entry
        if self._inherited:
            entry = self._adopt(key, obj)
            if entry is not None:
                return entry
        try:
            ref = weakref.ref(obj, functools.partial(self._forget, key))
        except TypeError:  # not weakly referenceable (e.g. __slots__ without __weakref__)
            return None
        entry = _InstanceEntry(ref, self._new_token())
        with self._lock:
            current = self._entries.get(key)
            if current is not None and current.ref() is obj:
                return current  # another thread registered it meanwhile: one token per object
            self._entries[key] = entry
        return entry

    def token(self, obj: Any) -> str | None:
        entry = self.entry(obj)
        return entry.token if entry is not None else None

    def _adopt(self, key: int, obj: Any) -> _InstanceEntry | None:
        """The entry the parent made for ``obj`` before the fork, with a token of this process."""
        with self._lock:
            entry = self._inherited.pop(key, None)
            if entry is None or entry.ref() is not obj:
                return None  # none, or one of a dead object whose id was reused (dropped)
            current = self._entries.get(key)
            if current is not None and current.ref() is obj:
                return current
            entry.token = self._new_token()
            entry.cached = None  # built with the parent's token
            self._entries[key] = entry
            return entry

    def _forget(self, key: int, ref: Any) -> None:
        with self._lock:
            for table in (self._entries, self._inherited):
                entry = table.get(key)
                if entry is not None and entry.ref is ref:
                    del table[key]

    def after_fork_in_child(self) -> None:
        """A forked child: a new lock (another thread of the parent may have held it at the fork),
        and new tokens for the instances it inherited, which every sibling inherited too. The tokens
        are drawn at each instance's first use in the child, not here: the handler runs in every
        fork, also ``subprocess``'s with a ``preexec_fn`` and fork-started multiprocessing workers,
        which should not pay for the parent's instances (one per instance) before they exec or start."""
        self._lock = threading.RLock()
        if self._inherited:  # a fork of a fork: what it had not used yet stays inherited
            self._inherited.update(self._entries)
        else:
            self._inherited = self._entries
        self._entries = {}


instances = InstanceRegistry()


@in_forked_child
def _after_fork_in_child() -> None:
    """The child is another process, with ids of its own."""
    global PROCESS_TOKEN
    PROCESS_TOKEN = os.urandom(4).hex()
    for factory in list(_id_factories):
        factory.restart()
    instances.after_fork_in_child()
