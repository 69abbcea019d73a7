"""Captured headers whose value is one of the request's user ids, pseudonymized.

The FastAPI instrumentation exports the headers ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_*``
name. A request header an identity source reads carries the pseudonym already
(``identity.build_header_scrubbers``), URL headers are scrubbed as the URL is, JWTs are redacted
anywhere; but a response header that echoes the request's user (a gateway's ``X-User-Id``, set again
on the answer) or a request header no identity source reads (``X-Forwarded-User`` beside the
``X-User-Id`` the path map names) was exported with the raw id. Here every captured header value
that is, whole (surrounding whitespace aside), one of the user ids pathwatch read from the request
is replaced by that id's pseudonym. An id inside a longer value is not recognised (as in a URL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from instrumentation.identity import user_text, utf8_reading

CAPTURED_HEADERS = ("http.request.header.", "http.response.header.")


def scrub_header_ids(attributes: Mapping[str, Any], raw_ids: Iterable[Any],
                     pseudonymize: Callable[[Any], str | None]) -> dict[str, tuple]:
    """The captured header attributes among ``attributes`` with a value that is one of ``raw_ids``
    -> their values with each such one replaced by its pseudonym."""
    keys = [key for key in attributes if key.startswith(CAPTURED_HEADERS)]
    if not keys:
        return {}
    pseudonyms: dict[str, str] = {}
    for raw in raw_ids:
        if raw is None:
            continue
        user = pseudonymize(raw)
        if user is None:
            continue
        text = user_text(raw)
        for form in (text, utf8_reading(text)):  # a header's bytes read as latin-1, or as UTF-8
            if form and form != user:  # raw ids allowed: the id is what is exported
                pseudonyms.setdefault(form, user)
    if not pseudonyms:
        return {}
    changed = {}
    for key in keys:
        values = attributes[key]
        texts = (values,) if isinstance(values, str) else tuple(values)
        scrubbed = tuple(pseudonyms.get(value.strip(), value) if isinstance(value, str) else value
                         for value in texts)
        if scrubbed != texts:
            changed[key] = scrubbed
    return changed
