"""JSON Web Tokens in a URL or a captured header, redacted.

A browser cannot set ``Authorization`` on a WebSocket, so sockets are commonly authenticated by a
token in the query (``/ws?token=<jwt>``); magic links put one in the path. A JWT's claims (``sub``,
``email``) are base64url: the user id in a form anyone reverses, and the token is a credential
besides. In the server span's URL attributes (and the captured URL headers) a whole query value or
path segment that is a JWS compact token — three base64url parts, the first a JSON object naming
its ``alg`` — is exported as ``[REDACTED]``, as the ``Authorization`` header is. So is a token
inside a captured header's value that no identity source scrubs (``Bearer <jwt>``, a cookie, the
``Sec-WebSocket-Protocol`` a browser's socket sends it in): ``redact_token_text``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "[REDACTED]"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
#: a token inside a longer text: not part of a longer run of token characters
_TOKEN_IN_TEXT = re.compile(r"(?<![A-Za-z0-9_.-])" + _TOKEN.pattern + r"(?![A-Za-z0-9_.-])")


def is_jwt(text: str) -> bool:
    """``text`` is a JWS compact token (signed or ``alg: none``)."""
    if not _TOKEN.fullmatch(text):
        return False
    head = text.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return isinstance(header, dict) and "alg" in header


def redact_tokens(value: str, key: str) -> str:
    """A URL attribute (``key``: ``url.query``, ``url.path``, or a whole URL or target) with every
    whole query value and path segment that is a JWT replaced by ``[REDACTED]``."""
    if not _TOKEN.search(value):
        return value  # nearly every URL: nothing that could be one
    if key == "url.query":
        return _query(value)
    if key == "url.path":
        return _path(value)
    parts = urlsplit(value)
    return urlunsplit(parts._replace(path=_path(parts.path), query=_query(parts.query)))


def _token(text: str) -> bool:
    return is_jwt(text) or ("%" in text and is_jwt(unquote(text)))


def _path(path: str) -> str:
    return "/".join(REDACTED if _token(segment) else segment for segment in path.split("/"))


def _query(query: str) -> str:
    parts = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        parts.append(f"{name}={REDACTED}" if eq and _token(value) else pair)
    return "&".join(parts)


def redact_token_text(text: str) -> str:
    """``text`` (a header's value) with every JWT in it replaced by ``[REDACTED]``."""
    if not _TOKEN.search(text):
        return text
    return _TOKEN_IN_TEXT.sub(lambda match: REDACTED if is_jwt(match.group(0)) else match.group(0), text)
