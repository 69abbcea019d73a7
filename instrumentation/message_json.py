"""The keys of an outgoing JSON message text that say which event it is.

A write of text or bytes (a bytearray or memoryview too) holding a JSON object is read for the
path map's ``messages`` keys; bytes as ``json.loads`` reads them (UTF-8, or UTF-16 / UTF-32 / a byte
order mark, decoded first), once their first ``HEAD_BYTES`` show the start of an object (a binary
frame is not decoded or copied). A short text is parsed whole (``json.loads``). A long one is read key by key at the top level with
the ``json`` module's own C scanner, and the reading stops once every key that starts a
``messages`` chain has been read: the usual message names its type and run before its payload, so
a 1 MB tool result costs microseconds instead of the ~8 ms of parsing it whole (about two thirds of
what the app spent serializing it). A value before the keys wanted is parsed as ``json.loads``
would parse it, so a message whose keys come last costs what it cost before.

A text nested deeper than the interpreter lets the json module go (about 1,000 levels on Python
3.11, fewer under a deep call stack; 1,500 on 3.12 and 10,000 on 3.13, a limit of C recursion),
which ``json.loads`` refuses with a RecursionError, is read key by key at any length: the keys wanted that come before the deep value are read (as for an early
stop); none before it, it is no message.

What a long text's early stop does not see: a key sent twice (``json.loads`` keeps the last, the
reading the first) and text after the keys that is not JSON (the message is read, where
``json.loads`` refused it and the write was left unlinked).
"""

from __future__ import annotations

import codecs
import json
from json.decoder import WHITESPACE, scanstring
from typing import Any

#: texts longer than this are read key by key (shorter ones: json.loads is faster than a loop)
WHOLE_PARSE_MAX_CHARS = 2048

#: bytes looked at first: a JSON object starts with "{" after whitespace, so bytes that do not (a
#: binary frame: audio, protobuf) are told apart by their start, not decoded or copied whole
HEAD_BYTES = 64

_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # C: one JSON value at an index
_skip_spaces = WHITESPACE.match


def read_json_object(text: str | bytes | bytearray | memoryview,
                     keys: frozenset[str]) -> dict | None:
    """The JSON object ``text`` holds (for a long text: only its top-level ``keys``, those found),
    or None when it holds no object or is not JSON. Bytes are read as ``json.loads`` reads them:
    UTF-8, or UTF-16 / UTF-32 / a byte order mark as ``json.detect_encoding`` finds them."""
    if not isinstance(text, str):
        try:
            text = _utf8_or_text(text)
        except ValueError:  # not text in the encoding its first bytes say, a released memoryview
            return None
        if text is None:
            return None  # its start is no JSON object's
    elif text.lstrip()[:1] != "{":
        return None  # only JSON objects carry keys; do not parse anything else
    try:
        if len(text) <= WHOLE_PARSE_MAX_CHARS or not keys:
            try:
                return json.loads(text)
            except RecursionError:  # nested deeper than the stack lets it parse: its keys if first
                if not keys:
                    return None
        if not isinstance(text, str):
            text = text.decode(json.detect_encoding(text), "surrogatepass")
        return _top_level(text, keys)
    # UnicodeDecodeError and JSONDecodeError are ValueErrors; never an exception into the app's
    # write, which would lose its span
    except (ValueError, StopIteration, RecursionError):
        return None


def _utf8_or_text(data: bytes | bytearray | memoryview) -> bytes | bytearray | str | None:
    """UTF-8 bytes as they are (read by the json module as bytes); others decoded: a memoryview's
    bytes, and bytes in another encoding (UTF-16 from a client, a BOM), which would not start with
    ``{``. None when they do not start as a JSON object (after whitespace), told from their first
    ``HEAD_BYTES``: a binary frame whose first bytes hold a zero (PCM audio, protobuf) reads as
    UTF-16 or UTF-32, and was decoded whole on every write to find that out (3.3 ms a MB)."""
    view = memoryview(data)  # no copy; a released memoryview raises ValueError
    if view.itemsize != 1 or view.ndim != 1:
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    head = bytes(view[:HEAD_BYTES])
    encoding = json.detect_encoding(head)  # from the first 4 bytes: as for the whole
    if encoding == "utf-8":
        start = head.lstrip()[:1]
    else:  # a code unit cut at the end of the head is held back, not an error
        start = codecs.getincrementaldecoder(encoding)("surrogatepass").decode(head).lstrip()[:1]
    if not start and len(view) > HEAD_BYTES:  # whitespace so far: the whole tells
        whole = view.tobytes()
        start = (whole.lstrip()[:1] if encoding == "utf-8"
                 else whole.decode(encoding, "surrogatepass").lstrip()[:1])
    if start not in ("{", b"{"):
        return None
    if encoding != "utf-8":
        return view.tobytes().decode(encoding, "surrogatepass")
    return data if data.__class__ is bytes or data.__class__ is bytearray else view.tobytes()


def _top_level(text: str, keys: frozenset[str]) -> dict | None:
    """``keys`` of the object ``text`` holds, read in order up to the last of them to come."""
    found: dict[str, Any] = {}
    index = _skip_spaces(text, _skip_spaces(text, 0).end() + 1).end()  # past "{"
    if text[index:index + 1] == "}":
        return found
    while True:
        if text[index:index + 1] != '"':
            return None
        key, index = scanstring(text, index + 1)
        index = _skip_spaces(text, index).end()
        if text[index:index + 1] != ":":
            return None
        try:
            value, index = _scan_once(text, _skip_spaces(text, index + 1).end())
        except RecursionError:  # nested deeper than the stack lets it go: the keys before it
            return found or None
        if key in keys and key not in found:
            found[key] = value
            if len(found) == len(keys):
                return found
        index = _skip_spaces(text, index).end()
        after = text[index:index + 1]
        if after == "}":
            return found
        if after != ",":
            return None
        index = _skip_spaces(text, index + 1).end()
