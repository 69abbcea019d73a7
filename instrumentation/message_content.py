"""What an outgoing socket message says, as one number: a write by message key whose message is the
one an emit of its key was already written with is a copy of that emit (``linking``), whichever
other emits of the key are waiting.

The number is a hash of the message as the app hands it to the write: a dict or list of JSON values
(``send_json``) read in order, or a text or bytes (``send_text``, ``send_bytes``, ``send``) as they
are. It is bounded: at most ``MAX_VALUES`` values of a message are read (then the lengths of the
containers left unread), and a long string or bytes by its length and ``TEXT_ENDS`` characters at
each end — about 1 µs for a small message, 10 µs for a 1 MB one. Two messages that differ only past
that are taken for the same. A message of anything else (an object, a dict subclass) has none.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

#: values of a message read (containers included; the keys of a dict come with their values)
MAX_VALUES = 48
#: characters (or bytes) read at each end of a longer string, beside its length
TEXT_ENDS = 128


class _NoContent(Exception):
    """A value this reading does not take (an object, a dict key that is no string)."""


def content_key(message: Any) -> int | None:
    """A number equal for equal messages sent the same way, or None (see the module's docstring).
    Never raises."""
    try:
        parts: list[Any] = []
        _read(message, parts, MAX_VALUES)
        return hash(tuple(parts))
    except Exception:  # a message it cannot read (RecursionError too) has none: no copy found
        return None


def _read(value: Any, parts: list[Any], left: int) -> int:
    """Append ``value`` to ``parts`` as read; the values left to read after it."""
    kind = value.__class__
    if kind is str or kind is bytes:
        parts.append(value if len(value) <= 2 * TEXT_ENDS
                     else (len(value), value[:TEXT_ENDS], value[-TEXT_ENDS:]))
        return left - 1
    if kind is int or kind is float or value is None:
        parts.append(value)
        return left - 1
    if kind is bool:
        parts.append((bool, value))  # true is not 1
        return left - 1
    if kind is dict or (kind is not list and kind is not tuple and isinstance(value, dict)):
        parts.append(("{", len(value)))
        left -= 1  # a container is a value too: a deep nesting is read to a bounded depth
        for key, item in islice(value.items(), max(left, 0)):
            if not isinstance(key, (str, int)):
                raise _NoContent
            parts.append(key)
            left = _read(item, parts, left - 1)
            if left <= 0:
                break
        return left
    if kind is list or kind is tuple or isinstance(value, (list, tuple)):
        parts.append(("[", len(value)))
        left -= 1
        for item in islice(value, max(left, 0)):
            left = _read(item, parts, left)
            if left <= 0:
                break
        return left
    if kind is bytearray or kind is memoryview:  # as the bytes they hold
        view = memoryview(value)
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B")
        parts.append(bytes(view) if len(view) <= 2 * TEXT_ENDS
                     else (len(view), bytes(view[:TEXT_ENDS]), bytes(view[-TEXT_ENDS:])))
        return left - 1
    if isinstance(value, (str, int, float)):  # a string or int enum, as json.dumps writes it
        parts.append((kind, value))
        return left - 1
    raise _NoContent
