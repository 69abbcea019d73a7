"""Every value of an identity query parameter in the server span's URL, each by its own pseudonym.

The path map names the query parameters a user id is read from (``identity``: ``query_param``).
The app reads the last of a parameter sent twice (``?user_id=alice&user_id=bob`` is bob), and so
does the ambient user; the URL the FastAPI instrumentation records has both values, and both are
user ids. Each value is replaced by the pseudonym of the value as the app would read it
(``parse_qsl`` of the query's latin-1 text, as Starlette), where the URL attribute has it: the
pseudonymized query is made from the request's own query string, pair by pair, and given the form
the instrumentation made of it — as sent (``url.query``), percent-decoded (``http.url``: there a
``%26`` or ``%23`` in a value reads as ``&`` or ``#``), or re-encoded by its redaction of signed
URLs. A URL attribute in none of these forms has every value of such a parameter replaced by name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus

try:  # the instrumentation's redaction of signed URLs' parameters (``sig=REDACTED``)
    from opentelemetry.util.http import redact_query_parameters
except Exception:  # pragma: no cover - moved: such URLs are scrubbed by name
    redact_query_parameters = None

#: the URL attributes that may have a query: the query itself, or a URL or target (after its ``?``)
QUERY_KEYS = ("url.query", "http.url", "url.full", "http.target")
_BASE = "http://h/?"


def scrub_query_ids(attributes: Mapping[str, Any], query_string: bytes, names: Collection[str],
                    pseudonymize: Callable[[Any], str | None]) -> dict[str, str]:
    """The URL attributes among ``attributes`` with a value of a parameter in ``names`` -> their
    value with each such value replaced by its pseudonym; empty values stay (no user)."""
    if not names or not query_string:
        return {}
    clean, users = _pseudonymized_query(query_string, names, pseudonymize)
    if not users:
        return {}  # none, or raw ids allowed
    sent = query_string.decode("utf-8", "replace")  # as the instrumentation decodes it
    forms = [(sent, clean), (unquote(sent), unquote(clean))]
    if redact_query_parameters is not None:
        forms.append((_redacted(sent), _redacted(clean)))
    changed = {}
    for key in QUERY_KEYS:
        value = attributes.get(key)
        if not isinstance(value, str):
            continue
        scrubbed = _in_form(value, key == "url.query", forms)
        if scrubbed is None and key == "url.query":
            scrubbed = _by_name(value, names, users, pseudonymize)
        elif scrubbed is None:
            head, mark, query = value.partition("?")
            scrubbed = head + mark + _by_name(query, names, users, pseudonymize) if mark else value
        if scrubbed != value:
            changed[key] = scrubbed
    return changed


def _pseudonymized_query(query_string: bytes, names: Collection[str],
                         pseudonymize: Callable[[Any], str | None]) -> tuple[str, dict[str, str]]:
    """The query as sent, every value of a parameter in ``names`` replaced by its pseudonym, and
    {value as the app reads it: its pseudonym}."""
    users: dict[str, str] = {}
    pairs = []
    for pair in query_string.split(b"&"):
        read = parse_qsl(pair.decode("latin-1"), keep_blank_values=True)
        if read and read[0][0] in names and read[0][1]:
            value = read[0][1]
            user = pseudonymize(value)
            if user is not None and user != value:
                users[value] = user
                pair = pair.partition(b"=")[0] + b"=" + quote(user, safe="").encode("ascii")
        pairs.append(pair)
    return b"&".join(pairs).decode("utf-8", "replace"), users


def _redacted(query: str) -> str | None:
    url = redact_query_parameters(_BASE + unquote(query))  # type: ignore[misc]
    return url[len(_BASE):] if url.startswith(_BASE) else None


def _in_form(value: str, whole: bool, forms: list[tuple[str | None, str | None]]) -> str | None:
    """``value`` with its query (all of it, or what ends it after a ``?``) in one of the forms the
    instrumentation makes of the query string, that form of the pseudonymized query."""
    for before, after in forms:
        if before is None or after is None:
            continue
        if value == before and whole:
            return after
        if not whole and value.endswith("?" + before):
            return value[:len(value) - len(before)] + after
    return None


def scrub_by_name(query: str, names: Collection[str], pseudonymize: Callable[[Any], str | None]) -> str:
    """``query`` (a query string as written: percent- or plus-encoded) with each value of a
    parameter in ``names`` replaced by the pseudonym of the value it reads as."""
    return _by_name(query, names, {}, pseudonymize) if names and query else query


def _by_name(query: str, names: Collection[str], users: dict[str, str],
             pseudonymize: Callable[[Any], str | None]) -> str:
    """Each ``name=value`` pair of a parameter in ``names`` with the pseudonym of the value it
    reads as (a value already a pseudonym stays)."""
    pseudonyms = set(users.values())
    parts = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and value and value not in pseudonyms and unquote_plus(name) in names:
            user = next((users[text] for text in (value, unquote(value), unquote_plus(value))
                         if text in users), None) or pseudonymize(unquote_plus(value))
            if user is not None:
                pair = f"{name}={quote(user, safe='')}"
        parts.append(pair)
    return "&".join(parts)
