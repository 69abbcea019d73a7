"""Socket writes -> ``deliver`` spans.

Starlette's ``WebSocket.send_json`` / ``send_text`` / ``send_bytes`` / ``send`` are wrapped (when
``starlette.websockets`` is imported). Each write gets one span, even though ``send_json`` calls
``send`` underneath: the outer wrapper marks the write in progress. The span carries the connection
id and the user the middleware recorded for that connection (found through the WebSocket's scope,
so it works from any task), the outcome, the event read from the message per the path map's
``messages`` section, and the link to the emit (see ``linking``).
"""

from __future__ import annotations

import sys
from asyncio import CancelledError
from types import CoroutineType
from typing import Any

import wrapt
from opentelemetry.instrumentation.utils import unwrap

from instrumentation import attributes as attr
from instrumentation.attributes import DeliveryOutcomes, SpanKinds
from instrumentation.errors import by_type_only, mark_app_error, record_error
from instrumentation.extractors import walk
from instrumentation.identity import (RequestInfo, current_request, instances, new_id_factory,
                                      value_text)
from instrumentation.linking import (LINK_MESSAGE_KEY, LINK_NONE, RoleWrite, count_write,
                                     current_dispatch, current_event, event_in_context, in_fan_out,
                                     pending_emits, role_write_in_progress, write_in_progress)
from instrumentation.message_content import content_key
from instrumentation.message_json import read_json_object
from instrumentation.runtime import state, suppressed

TRANSPORT_ROLE = "transport"
#: key in the ASGI scope where the middleware records the request (``RequestInfo``): for a socket,
#: its connection id and the raw id of its user, pseudonymized at each write under the setting then
SCOPE_KEY = "pathwatch.connection"
SEND_METHODS = ("send_json", "send_text", "send_bytes", "send")

new_connection_id = new_id_factory("c")


class MessageInfo:
    __slots__ = ("event_type", "run_id", "event_id", "message")

    def __init__(self, event_type: Any, run_id: Any, event_id: Any, message: Any = None) -> None:
        #: the message as the app handed it to the write (None: not known), for ``content``
        self.message = message
        try:
            self.event_type = None if event_type is None else value_text(event_type)
            self.run_id = None if run_id is None else value_text(run_id)
            self.event_id = None if event_id is None else value_text(event_id)
        except Exception:  # a value that cannot be made text loses its field, not the write's span
            self.event_type, self.run_id, self.event_id = (
                _text_or_none(value) for value in (event_type, run_id, event_id))

    def carries_event(self) -> bool:
        return self.event_type is not None or self.run_id is not None or self.event_id is not None

    def content(self) -> int | None:
        """``message_content.content_key`` of the message (None when not known)."""
        return None if self.message is None else content_key(self.message)


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return value_text(value)
    except Exception as exc:
        record_error("transport:message", exc)
        return None


def describe_message(data: Any) -> MessageInfo | None:
    """Event type, run id and event id of an outgoing message (dict, object, or JSON text, bytes,
    bytearray or memoryview)."""
    keys = state.messages
    message = data
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        data = read_json_object(data, keys.top_level)
    if data is None:
        return None
    return MessageInfo(_read(data, keys.event_type), _read(data, keys.run_id),
                       _read(data, keys.event_id), message)


def carries_event(data: Any) -> bool:
    """Whether ``data`` is a message naming an event (as ``describe_message`` reads it), its values
    not made text: an id that cannot be is counted once, when a write or an emit reads it."""
    keys = state.messages
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        data = read_json_object(data, keys.top_level)
    if data is None:
        return False
    return any(_read(data, chain) is not None
               for chain in (keys.event_type, keys.run_id, keys.event_id))


def _read(data: Any, chain: tuple[str, ...] | None) -> Any:
    """One key chain of a message; a link that raises (a property of the app's message object)
    yields nothing and is counted: the write still gets its span, as for an extractor path."""
    if not chain:
        return None
    try:
        return walk(data, chain)
    except Exception as exc:
        record_error("transport:message", exc)
        return None


def is_connection(value: Any) -> bool:
    """A Starlette WebSocket or Request (a Mapping over its scope: never a message)."""
    requests = sys.modules.get("starlette.requests")
    connection = getattr(requests, "HTTPConnection", None)
    return connection is not None and isinstance(value, connection)


def link_write(attrs: dict, info: MessageInfo | None, opened: int | None = None) -> None:
    """Set event type, run id, event id and link kind of one write on ``attrs``: a write on the
    socket ``attrs`` names, opened at ``opened`` (``linking.connection_opened``; None: not known)."""
    connection_id = attrs.get(attr.CONNECTION_ID)  # not known yet for a deliver role's call
    event = (event_in_context(info.run_id, info.event_type) if info is not None
             else current_event.get())
    if info is not None:
        if info.event_type is not None:
            attrs[attr.EVENT_TYPE] = info.event_type
        if info.run_id is not None:
            attrs[attr.RUN_ID] = info.run_id
    if info is not None and info.event_id is not None:  # the message's own id always wins
        attrs[attr.MESSAGING_MESSAGE_ID] = info.event_id
        attrs[attr.DELIVERY_LINK] = LINK_MESSAGE_KEY
        if pending_emits.mark(info.run_id, info.event_type, info.event_id, connection_id,
                              user=attrs.get(attr.CONNECTION_USER)):
            attrs[attr.DELIVERY_FAN_OUT] = True  # written outside the fan-out call that sent it
        return
    if event is not None:
        attrs[attr.MESSAGING_MESSAGE_ID] = event.event_id
        attrs[attr.DELIVERY_LINK] = event.link
        if event.event_type is not None:
            attrs.setdefault(attr.EVENT_TYPE, event.event_type)
        if event.run_id is not None:
            attrs.setdefault(attr.RUN_ID, event.run_id)
        if event.run_id is not None and event.event_type is not None:
            # the content it was written with: a copy written later by key finds it by that
            pending_emits.mark(event.run_id, event.event_type, event.event_id, connection_id,
                               None if info is None or connection_id is None else info.content())
        return
    if info is not None and info.run_id is not None and info.event_type is not None:
        found = pending_emits.linked(info.run_id, info.event_type, connection_id, opened,
                                     None if connection_id is None else info.content(),
                                     attrs.get(attr.CONNECTION_USER))
        if found is not None:
            attrs[attr.MESSAGING_MESSAGE_ID] = found[0]
            attrs[attr.DELIVERY_LINK] = LINK_MESSAGE_KEY
            if found[1]:  # written outside the fan-out call that sent it (each socket's writer)
                attrs[attr.DELIVERY_FAN_OUT] = True
            return
    attrs[attr.DELIVERY_LINK] = LINK_NONE


def connection_of(websocket: Any, setting: Any = None) -> tuple[str, str | None, int | None]:
    """(connection id, connection user, its opening in the order of emits) recorded by the
    middleware; an id is made up if it did not run (its opening then not known). The user under
    ``setting`` (the write's, read with its tracer), else the current one."""
    scope = websocket.scope
    info = scope.get(SCOPE_KEY)
    if info is None or info.connection_id is None:
        info = scope[SCOPE_KEY] = RequestInfo(None, None, new_connection_id())
    return info.connection_id, info.pseudonym(setting), info.opened


# --- the WebSocket wrappers ----------------------------------------------------------------------------
def _send_wrapper(method: str) -> Any:
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not state.on:
            return wrapped(*args, **kwargs)
        # made here, as unwrapped: a wrong argument raises the app's TypeError at the call
        sending = wrapped(*args, **kwargs)
        if type(sending) is not CoroutineType:
            return sending  # not Starlette's own coroutine: as it is
        traced = _traced_send(method, _Unstarted(sending), instance, args, kwargs)
        # named as the app's: "coroutine 'WebSocket.send_json' was never awaited" (a missing await)
        traced.__name__, traced.__qualname__ = sending.__name__, sending.__qualname__
        return traced
    return wrapper


class _Unstarted:
    """Starlette's write coroutine until the traced one takes it at its first step; closed with it
    when the traced one never starts (a missing await), which then warns alone, by its name."""

    __slots__ = ("coroutine",)

    def __init__(self, coroutine: Any) -> None:
        self.coroutine = coroutine

    def take(self) -> Any:
        coroutine, self.coroutine = self.coroutine, None
        return coroutine

    def __del__(self) -> None:
        coroutine = self.coroutine
        if coroutine is not None:
            try:
                coroutine.close()
            except Exception:  # noqa: S110 - a finalizer must not raise
                pass


async def _traced_send(method: str, unstarted: _Unstarted, websocket: Any, args: tuple,
                       kwargs: dict) -> Any:
    sending = unstarted.take()
    role_write = role_write_in_progress()
    if role_write is not None and role_write.writes == 0 and _is_write(method, args, kwargs):
        role_write.writes = 1
        return await _send_under_role(role_write, method, sending, websocket, args, kwargs)
    if write_in_progress.get() is True or suppressed():
        return await sending
    span, closed_before = _start_write(method, websocket, args, kwargs)
    if span is None:
        return await sending
    token = write_in_progress.set(True)
    try:
        result = await sending
    except BaseException as exc:
        write_in_progress.reset(token)
        _end_write(span, exc, closed_before)
        raise
    write_in_progress.reset(token)
    _end_write(span, None, closed_before)
    return result


async def _send_under_role(role_write: RoleWrite, method: str, sending: Any, websocket: Any,
                           args: tuple, kwargs: dict) -> Any:
    """A write inside a deliver role's call: that call's span is the write's; this one only tells it
    the connection and whether the socket was closed."""
    closed_before = _describe_connection(role_write, method, websocket, args, kwargs)
    if closed_before:
        role_write.closed = True
    token = write_in_progress.set(True)
    try:
        return await sending
    except BaseException as exc:
        try:
            if closed_before or isinstance(exc, closed_errors()):
                role_write.closed = True
        except Exception as error:
            record_error(f"transport:{method}", error)
        raise
    finally:
        write_in_progress.reset(token)


def _describe_connection(role_write: RoleWrite, method: str, websocket: Any, args: tuple,
                         kwargs: dict) -> bool:
    """Set the connection id and user on the role's span; whether the socket was closed before."""
    try:
        connection_id, connection_user, _ = connection_of(websocket, role_write.setting)
        span = role_write.span
        if span is not None and span.is_recording():
            span.set_attribute(attr.CONNECTION_ID, connection_id)
            if connection_user is not None:
                span.set_attribute(attr.CONNECTION_USER, connection_user)
        return _is_closed(websocket)
    except Exception as exc:
        record_error(f"transport:{method}", exc)
        return False


_NOT_A_WRITE = object()


def _is_write(method: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call writes data: not a ``send`` of an accept / close / denial message (one a
    deliver role makes before its write must not take the role's write)."""
    return method != "send" or _written_data(args, kwargs) is not _NOT_A_WRITE


def _written_data(args: tuple, kwargs: dict) -> Any:
    """The data a ``WebSocket.send`` writes, or _NOT_A_WRITE for accept / close / denial messages."""
    message = args[0] if args else kwargs.get("message")
    if not isinstance(message, dict) or message.get("type") != "websocket.send":
        return _NOT_A_WRITE
    return message.get("text") if message.get("text") is not None else message.get("bytes")


def _start_write(method: str, websocket: Any, args: tuple, kwargs: dict) -> tuple[Any, bool]:
    try:
        if method == "send":
            data = _written_data(args, kwargs)
            if data is _NOT_A_WRITE:
                return None, False  # accept / close / denial responses are not writes
        else:
            data = args[0] if args else kwargs.get("data")
        cls = type(websocket)
        setting, tracer = state.setting  # the users and the key id of one setting
        attrs: dict[str, Any] = {
            attr.SPAN_KIND: SpanKinds.DELIVER,
            attr.CODE_FUNCTION_NAME: f"starlette.websockets.WebSocket.{method}",
            attr.ROLE: TRANSPORT_ROLE,
            attr.IMPLEMENTATION: f"{cls.__module__}.{cls.__qualname__}",
            attr.CANONICAL: True,
            attr.RETIRED: False,
            attr.MESSAGING_OPERATION_TYPE: "send",
        }
        token = instances.token(websocket)
        if token is not None:
            attrs[attr.INSTANCE_ID] = token
        connection_id, connection_user, opened = connection_of(websocket, setting)
        attrs[attr.CONNECTION_ID] = connection_id
        if connection_user is not None:
            attrs[attr.CONNECTION_USER] = connection_user
        request = current_request.get()
        if request is not None:
            attrs.update(request.span_attrs(setting))
        link_write(attrs, describe_message(data), opened)
        dispatch = current_dispatch.get()
        if dispatch is not None:
            count_write(dispatch)
            if in_fan_out(dispatch):
                attrs[attr.DELIVERY_FAN_OUT] = True
        closed_before = _is_closed(websocket)
        return tracer.start_span(f"websocket.{method}", attributes=attrs), closed_before
    except Exception as exc:
        record_error(f"transport:{method}", exc)
        return None, False


def _is_closed(websocket: Any) -> bool:
    disconnected = _websocket_state_disconnected()
    return (getattr(websocket, "application_state", None) is disconnected
            or getattr(websocket, "client_state", None) is disconnected)


def _websocket_state_disconnected() -> Any:
    from starlette.websockets import WebSocketState
    return WebSocketState.DISCONNECTED


def closed_errors() -> tuple[type[BaseException], ...]:
    """The errors of a write on a closed socket (none when Starlette is not imported)."""
    websockets = sys.modules.get("starlette.websockets")
    if websockets is None:
        return ()
    errors: list[type[BaseException]] = [websockets.WebSocketDisconnect]
    disconnected = getattr(websockets, "WebSocketDisconnected", None)  # starlette >= 1.0
    if disconnected is not None:
        errors.append(disconnected)
    return tuple(errors)


def _end_write(span: Any, error: BaseException | None, closed_before: bool) -> None:
    by_type_only(span)  # what an ASGI middleware of the app recorded on it while it was current
    try:
        if span.is_recording():
            # a socket closed before the write is ``closed`` also when the server dropped the frame
            # without raising (uvicorn's wsproto server on a dropped connection), as a deliver
            # role's write reports it
            if closed_before or (error is not None and isinstance(error, closed_errors())):
                outcome = DeliveryOutcomes.CLOSED
            elif error is None:
                outcome = DeliveryOutcomes.WRITTEN
            elif isinstance(error, CancelledError):  # the app stopped it: no failure of the send
                outcome = DeliveryOutcomes.CANCELLED
            else:
                outcome = DeliveryOutcomes.FAILED
            span.set_attribute(attr.DELIVERY_OUTCOME, outcome)
            if error is not None:
                mark_app_error(span, error)
    except Exception as exc:
        record_error("transport:end", exc)
    finally:
        try:
            span.end()
        except Exception as exc:  # a span processor's bug must not fail the app's write
            record_error("transport:end", exc)


# --- install / uninstall (the hook fires when starlette.websockets is imported) ---------------------------
_installed: list[Any] = []


def on_websockets_import(module: Any) -> None:
    try:
        if _installed:
            return
        for method in SEND_METHODS:
            wrapt.wrap_function_wrapper(module, f"WebSocket.{method}", _send_wrapper(method))
        _installed.append(module.WebSocket)
    except Exception as exc:
        record_error("transport:install", exc)


def uninstall() -> None:
    for cls in _installed:
        for method in SEND_METHODS:
            try:
                unwrap(cls, method)
            except Exception as exc:
                record_error(f"transport:unwrap:{method}", exc)
    _installed.clear()
