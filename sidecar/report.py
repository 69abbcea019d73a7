"""``pathwatch report``: what a running sidecar knows, as readable tables.

Fetches ``/api/v1/inventory`` and ``/api/v1/incidents?status=open`` and prints, per role, the
implementations that really run (calls, share, canonical/retired, entry points, first and last seen,
idle since) and a line of the role's canonical share and retired classes still called, then the
open incidents by severity: at most ``MAX_LIMIT``, fetched one severity at a time, critical first, so
that no number of warnings hides a critical one. Exit code 0 when the report printed, 1 when the
sidecar could not be read or the report not written (a full disk), 2 on bad usage (``--api`` neither an http(s) URL nor ``host:port``, which
is read as ``http://host:port``, as curl does -- a scheme is RFC 3986's followed by ``//``; a password
in it holding an unencoded ``/``, ``?`` or ``#``; an empty ``--token-env``). No message prints a
password of ``--api`` (``***``).

The tables fit the terminal (``COLUMNS``, else the terminal's width, else ``DEFAULT_WIDTH``):
implementations are named by their class name, with as much of the module as tells two apart (the
same in every table), and columns a table can do without are left out, in a fixed order, while it
is wider than that (the inventory's FIRST SEEN, then LAST SEEN — IDLE still says how long ago —,
the incidents' LAST SEEN), each time said under the table. ``--wide``: full names, every column,
whatever the width.

The inventory (``sidecar.inventory.Inventory.snapshot``) is read leniently:
``{"roles": {ROLE: {"implementations": {IMPL: {...}}}}}`` with, per implementation, ``calls``,
``top_level_calls`` (the share's basis when present; else ``calls``; or an explicit ``share`` 0..1),
``canonical``, ``retired``, ``entry_points`` (a list, or a mapping to call counts), ``first_seen`` and
``last_seen`` (unix seconds or RFC 3339; also ``*_unix`` / ``*_ns``) and ``idle_s``; per role
``canonical_share`` and ``retired_still_called`` (the summary line; none when both are missing).
Lists of objects with a ``role`` / ``implementation`` key work too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import httpx

from sidecar.incidents.grouping import severity_rank
from sidecar.incidents.query import MAX_LIMIT
from sidecar.model import Severity
from sidecar.output import write_output

DEFAULT_API_URL = "http://127.0.0.1:9464"
DEFAULT_TOKEN_ENV = "PATHWATCH_API_TOKEN"
#: the columns the report fits when its output is not a terminal and ``COLUMNS`` is not set
DEFAULT_WIDTH = 120
_MAX_ENTRY_POINTS_SHOWN = 3


class ReportError(Exception):
    """The sidecar could not be read; the message says what to check."""


class ServerError(ReportError):
    """The sidecar answered a request with a server error (5xx: e.g. its inventory's snapshot
    raised): its other answers may still be read. (A 404 or 400 says --api is another server, or
    another version: the report ends there.)"""


class ReportIncomplete(ReportError):
    """A part of the report could not be read (the message says which and why); ``text`` is the
    report without it, to print all the same: a failing inventory must not hide open incidents."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


# -- fetching -------------------------------------------------------------------------------------

def fetch_json(client: httpx.Client, api_url: str, path: str, params: Mapping[str, str] | None = None) -> Any:
    url = api_url.rstrip("/") + path
    try:
        response = client.get(url, params=params)
    except httpx.InvalidURL as exc:
        raise ReportError(f"--api {api_url!r} is not a valid URL ({exc})") from None
    except httpx.LocalProtocolError as exc:  # its message may quote a header: the token
        raise ReportError(f"cannot send the request to {api_url} ({type(exc).__name__}); is the "
                          "token a single line of printable ASCII?") from None
    except httpx.HTTPError as exc:
        raise ReportError(f"cannot reach the pathwatch sidecar at {api_url} ({type(exc).__name__}: "
                          f"{exc}); is it running, and is --api right?") from None
    if response.status_code == 401:
        if "authorization" in client.headers:
            raise ReportError(f"the sidecar at {api_url} refused the bearer token: is the one in the "
                              f"environment variable named by --token-env (default {DEFAULT_TOKEN_ENV}) "
                              "the sidecar's?")
        raise ReportError(f"the sidecar at {api_url} wants a bearer token: put it in the environment "
                          f"variable named by --token-env (default {DEFAULT_TOKEN_ENV})")
    if response.status_code != 200:
        # the body may be anything (a protobuf error of the OTLP/HTTP port, a proxy's page): escaped
        # as the tables are, so no control character or escape sequence reaches the terminal
        error = ServerError if response.status_code >= 500 else ReportError
        raise error(f"GET {url}: HTTP {response.status_code}: {printable(response.text[:200], limit=200)}")
    try:
        return response.json()
    except ValueError:
        raise ReportError(f"GET {url}: the answer is not JSON; is {api_url} a pathwatch sidecar?") from None
    except RecursionError:  # valid JSON, nested deeper than the json module reads
        raise ReportError(f"GET {url}: the answer is JSON nested too deeply to read; is {api_url} a "
                          "pathwatch sidecar?") from None


def auth_headers(token: str | None) -> dict[str, str]:
    """The bearer token's header; a token no HTTP header can carry (not ASCII, a line break: httpx
    would raise UnicodeEncodeError or LocalProtocolError) is a ``ReportError`` that never quotes it."""
    if not token:
        return {}
    if not (token.isascii() and token.isprintable()):  # as sidecar.api.require_token_for
        raise ReportError("the bearer token in the environment variable named by --token-env (default "
                          f"{DEFAULT_TOKEN_ENV}) must be a single line of printable ASCII: it travels "
                          "in an HTTP header")
    return {"Authorization": f"Bearer {token}"}


def render_report(api_url: str, token: str | None = None, timeout_s: float = 5.0, *,
                  width: int | None = None, wide: bool = False) -> str:
    """The report, fitting ``width`` columns (None: the terminal's, ``terminal_width``); ``wide``:
    full names and every column, whatever the width."""
    with _password_hidden(api_url), \
            httpx.Client(headers=auth_headers(token), timeout=timeout_s) as client:
        try:
            inventory, missing = fetch_json(client, api_url, "/api/v1/inventory"), None
        except ServerError as exc:  # the sidecar answers: its open incidents come all the same
            inventory, missing = None, _without_password(str(exc), api_url)
        with _unexpected_answer(api_url):
            incidents = fetch_open_incidents(client, api_url)
        with _unexpected_answer(api_url):
            text = format_report(shown_url(api_url), inventory, incidents, wide=wide,
                                 width=None if wide else width or terminal_width(),
                                 inventory_missing=missing)
    if missing is not None:
        raise ReportIncomplete(f"the implementations per role are missing from the report: {missing}", text)
    return text


def terminal_width() -> int:
    """``COLUMNS`` if set, else the terminal's width, else ``DEFAULT_WIDTH`` (output to a file or
    a pipe)."""
    return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns


def shown_url(api_url: str) -> str:
    """``api_url`` as printed: the password of a ``user:password@host`` URL (a proxy's basic auth)
    is ``***`` — also in a URL that is not a valid one, e.g. typed without its scheme
    (``admin:secret@host:9464``): that is what the error about it quotes."""
    return _hidden_password(api_url)[0]


def password_spills(api_url: str) -> bool:
    """The URL's password holds a ``/``, ``?`` or ``#`` not percent-encoded: no client can read it
    (httpx takes what follows the first as the port, and quotes that part of the password)."""
    return _hidden_password(api_url)[2]


# RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then ":"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# an authority without userinfo: a host (a bracketed IP literal, or no ':' in it) and a port of digits
_HOST_PORT = re.compile(r"(\[[^\[\]]*\]|[^\[\]:]*)(:[0-9]*)?")


def split_scheme(api_url: str) -> tuple[str, str]:
    """(``scheme://``, the rest): the scheme as RFC 3986 spells it, followed by ``//`` (an authority,
    as curl reads one); ``("", api_url)`` without (``host:9464/x?u=http://y`` has no scheme,
    ``ops:pw@host`` neither: ``ops:`` is followed by no ``//``). A leading ``//`` alone is kept."""
    match = _SCHEME.match(api_url)
    if match and api_url.startswith("//", match.end()):
        return api_url[:match.end() + 2], api_url[match.end() + 2:]
    if api_url.startswith("//"):
        return "//", api_url[2:]
    return "", api_url


def _hidden_password(api_url: str) -> tuple[str, str | None, bool]:
    """(``api_url`` with its password as ``***``, the password, whether the password holds a ``/``,
    ``?`` or ``#``), read as RFC 3986 delimits the authority (after ``scheme://``, or from the start
    without one; up to the first ``/``, ``?`` or ``#``; the userinfo before its last ``@``), not with
    ``urlsplit``, which gives up (an IPv6 bracket left open) or reads ``user:`` as the scheme of a
    URL typed without one. A password holding a ``/``, ``?`` or ``#`` unencoded ends the authority
    early (``ops:pa/ss@host``: the authority ``ops:pa`` is no host:port, and an ``@`` follows): then
    everything up to the last ``@`` is taken as the userinfo, so no part of it is ever printed."""
    prefix, rest = split_scheme(api_url)
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    spills = not at and "@" in rest[end:] and not _HOST_PORT.fullmatch(rest[:end])
    if spills:
        userinfo, at, host = rest.rpartition("@")
        end = len(rest)
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return api_url, None, False
    return f"{prefix}{user}:***@{host}{rest[end:]}", password, spills


@contextmanager
def _password_hidden(api_url: str) -> Iterator[None]:
    """A ``ReportError`` (which quotes the URL, and httpx's messages that may) never shows the
    password of a ``user:password@host`` URL."""
    try:
        yield
    except ReportError as exc:
        if _hidden_password(api_url)[1] is None:
            raise
        raise ReportError(_without_password(str(exc), api_url)) from None


def _without_password(message: str, api_url: str) -> str:
    """``message`` with the password of a ``user:password@host`` ``api_url`` as ``***``."""
    shown, password, _ = _hidden_password(api_url)
    if password is None:
        return message
    message = message.replace(api_url.rstrip("/"), shown.rstrip("/"))
    return message.replace(f":{password}@", ":***@")


@contextmanager
def _unexpected_answer(api_url: str) -> Iterator[None]:
    """JSON of a shape the report cannot read (another server, another version) is a ReportError
    saying so, not a traceback: the formatting is lenient, but not about everything."""
    try:
        yield
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ReportError(f"the answer of {api_url} is not what a pathwatch sidecar's API answers "
                          f"({type(exc).__name__}: {printable(exc, limit=200)}); is --api a pathwatch "
                          "sidecar of this version?") from None


def fetch_open_incidents(client: httpx.Client, api_url: str) -> dict[str, Any]:
    """``{"incidents": [...], "more": bool}``: up to ``MAX_LIMIT`` open incidents, the most severe
    first. The API lists the most recently seen first: one request per severity keeps a critical
    incident from being crowded out by newer warnings. ``more``: open incidents were left out."""
    shown: list[Any] = []
    more = False
    for severity in sorted(Severity, key=severity_rank, reverse=True):
        room = MAX_LIMIT - len(shown)  # none left: one more request says whether more are open
        answer = fetch_json(client, api_url, "/api/v1/incidents",
                            {"status": "open", "severity": severity.value, "limit": str(room or 1)})
        answer = answer if isinstance(answer, Mapping) else {}
        page = answer.get("incidents") or []
        if room == 0:
            more = more or bool(page)
            continue
        shown += page[:room]
        if "next_before" in answer:
            more = more or answer["next_before"] is not None
        else:  # an older sidecar: a full page may have more
            more = more or len(page) >= room
    return {"incidents": shown, "more": more}


# -- formatting -----------------------------------------------------------------------------------

def format_report(api_url: str, inventory: Any, incidents: Any, *, width: int | None = None,
                  wide: bool = False, inventory_missing: str | None = None) -> str:
    """``width``: the columns to fit (None: no limit); ``wide``: full names. A class is named the
    same way in both tables. ``inventory_missing``: why there is no inventory (its section says so)."""
    names = _inventory_names(_roles(inventory))
    names.update(i.get("implementation") for i in _incident_list(incidents))
    short = _full_name if wide else _shortener({n for n in names if isinstance(n, str) and n})
    shares = (format_inventory(inventory, width=width, short=short) if inventory_missing is None else
              "Implementations per role\n" + "\n".join(_wrapped(f"unavailable: {inventory_missing}", "  ", width)))
    sections = [f"pathwatch report: {api_url}", shares, format_incidents(incidents, width=width, short=short)]
    return "\n\n".join(sections) + "\n"


def _inventory_names(roles: list[tuple[str, Mapping[str, Any], list[tuple[str, Any]]]]) -> set[str]:
    """The implementations an inventory names: those called and the retired ones still called."""
    names = {name for _, _, implementations in roles for name, _ in implementations}
    for _, role_body, _ in roles:
        retired = role_body.get("retired_still_called")
        if isinstance(retired, list):
            names.update(name for name in retired if isinstance(name, str) and name)
    return names


def format_inventory(inventory: Any, *, width: int | None = None,
                     short: Callable[[Any], str] | None = None) -> str:
    """``short`` names the implementations (by default the shortest unique suffix, as
    ``--consolidation`` does); ``width``: the columns to fit (None: no limit)."""
    rows: list[list[str]] = []
    summaries: dict[int, str] = {}  # after the row of this index: the role's summary line
    roles = _roles(inventory)
    names = _inventory_names(roles)
    short = short or _shortener(names)
    for role, role_body, implementations in roles:
        share_key = _share_basis(implementations)
        total = sum(_int(impl.get(share_key)) for _, impl in implementations)
        ordered = sorted(implementations, key=lambda item: (-_int(item[1].get("calls")), item[0]))
        for index, (name, impl) in enumerate(ordered):
            rows.append([role if index == 0 else "", short(name), str(_int(impl.get("calls"))),
                         _share(impl, share_key, total), _marks(impl),
                         _entry_points(impl.get("entry_points")), _when(_first_seen(impl)),
                         _when(_last_seen(impl)), _idle(impl.get("idle_s"))])
        summary = _role_summary(role_body, dict(implementations), short,
                                inventory.get("retired_window_s") if isinstance(inventory, Mapping) else None)
        if summary and ordered:
            summaries[len(rows) - 1] = summary
    if not rows:
        return "Implementations per role\n  (no wrapped calls seen yet)"
    headers = ["ROLE", "IMPLEMENTATION", "CALLS", "SHARE", "MARK", "ENTRY POINTS", "FIRST SEEN",
               "LAST SEEN", "IDLE"]
    # FIRST SEEN, then LAST SEEN give way to a narrow terminal: IDLE still says how long ago
    # then long entry points (route templates), and at worst names, are cut
    headers, rows, right, dropped, cut = _fit(headers, rows, {2, 3, 8}, optional=(6, 7), width=width,
                                              cuttable=((5, _CUT_ENTRY_POINTS), (1, _CUT_NAMES)))
    table = format_table(headers, rows, right_aligned=right).splitlines()
    # the summary of a role under its implementations, from the IMPLEMENTATION column on (the
    # header is ASCII: its index is the terminal column), wrapped there to fit
    indent = " " * table[0].index("IMPLEMENTATION")
    lines = [table[0]]
    for index, line in enumerate(table[1:]):
        lines.append(line)
        if index in summaries:
            lines.extend(_wrapped(summaries[index], indent, width))
    notes = ["SHARE: of the calls the rest of the code makes into the role; CALLS also counts calls "
             "one implementation delegates to another (those are not a path of their own); IDLE: "
             "since LAST SEEN, when the sidecar answered"]
    if any(short(name) != name for name in names):
        notes.append("IMPLEMENTATION: the class name, with as much of its module as tells two "
                     "apart (--wide: full names)")
    notes += _dropped_note(dropped, width, cut)
    return ("Implementations per role\n" + "\n".join(lines) + "\n"
            + "\n".join(line for note in notes
                        for line in _wrapped(note, "  ", min(width or _NOTE_WIDTH, _NOTE_WIDTH),
                                             names=False)))


_NOTE_WIDTH = 100  # the notes under a table: prose reads better on shorter lines
_NAME_AND_PARENTHESIS = re.compile(r"\S+ \([^()]*\)")


def _wrapped(text: str, indent: str, width: int | None, *, names: bool = True) -> list[str]:
    """``text`` on lines of at most ``width`` terminal columns (None: one line; ``display_width``: a
    CJK character takes two, a combining mark none), each after ``indent``; with ``names``, a name
    and the parenthesis after it stay on one line (``Class (9 calls, last ...)``) when they fit on
    one (prose, the notes under a table, fills its lines); a word wider than a line is cut between
    characters (``_cut``)."""
    if width is None:
        return [indent + text]
    room = max(width, len(indent) + 20) - display_width(indent)
    # NUL cannot be in the text (``printable`` escapes it): it holds the spaces not to break at
    kept = (_NAME_AND_PARENTHESIS.sub(lambda match: match.group().replace(" ", "\0"), text)
            if names else text)
    words: list[str] = []
    for unit in kept.split():
        if display_width(unit) <= room:
            words.append(unit.replace("\0", " "))
        else:
            words += [piece for word in unit.split("\0") for piece in _cut(word, room)]
    lines: list[list[str]] = []
    used = room + 1  # the columns the last line takes: no line yet, so the first word starts one
    for word in words:
        word_width = display_width(word)
        if used + 1 + word_width <= room:
            lines[-1].append(word)
            used += 1 + word_width
        else:
            lines.append([word])
            used = word_width
    return [indent + " ".join(line) for line in lines]


def _cut(word: str, room: int) -> list[str]:
    """``word`` in pieces of at most ``room`` columns, never between a character and a combining
    mark after it, nor inside a wide character (it begins the next piece)."""
    pieces, piece, used = [], "", 0
    for char in word:
        char_width = _char_width(char)
        if piece and used + char_width > room:
            pieces.append(piece)
            piece, used = "", 0
        piece += char
        used += char_width
    return [*pieces, piece] if piece else pieces


def _fit(headers: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: Iterable[int], *,
         optional: Sequence[int], width: int | None, cuttable: Sequence[tuple[int, int]] = ()
         ) -> tuple[list[str], list[list[str]], set[int], list[str], list[str]]:
    """Leave out the columns of ``optional`` (indexes), in that order, while the table is wider than
    ``width``; then, while it still is, cut the cells of the ``cuttable`` columns ((index, the fewest
    columns to cut it to), in that order) with an ellipsis: (headers, rows and right-aligned indexes
    of what is left, the headers left out, the headers of the columns cut)."""
    keep = list(range(len(headers)))
    dropped: list[str] = []
    for column in optional:
        if width is None or _table_width([headers[i] for i in keep],
                                         [[row[i] for i in keep] for row in rows]) <= width:
            break
        keep.remove(column)
        dropped.append(headers[column])
    kept_headers = [headers[i] for i in keep]
    kept_rows = [[printable(row[i]) for i in keep] for row in rows]
    cut: list[str] = []
    for column, fewest in ((c, f) for c, f in cuttable if c in keep):
        over = 0 if width is None else _table_width(kept_headers, kept_rows) - width
        if over <= 0:
            break
        position = keep.index(column)
        widest = max(display_width(row[position]) for row in kept_rows) if kept_rows else 0
        limit = max(widest - over, fewest, len(headers[column]))
        if limit >= widest:
            continue
        for row in kept_rows:
            row[position] = printable(row[position], limit=limit)
        cut.append(headers[column])
    right = set(right_aligned)
    return (kept_headers, kept_rows, {position for position, i in enumerate(keep) if i in right},
            dropped, cut)


#: the fewest columns an entry point (a route's beginning) and a class name are cut to while fitting
#: a table: the routes first, as far as that, then the names
_CUT_ENTRY_POINTS, _CUT_NAMES = 16, 24


def _table_width(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
    """The columns ``format_table`` takes for these cells (its two-space margin and gaps)."""
    widths = [max(display_width(printable(cell)) for cell in column)
              for column in zip(headers, *rows)]
    return 2 + sum(widths) + 2 * (len(widths) - 1)


def _dropped_note(dropped: Sequence[str], width: int | None, cut: Sequence[str] = ()) -> list[str]:
    notes = []
    if dropped:
        notes.append(f"{', '.join(dropped)}: left out to fit {width} columns (--wide prints every column)")
    if cut:
        notes.append(f"{', '.join(cut)}: cut to fit {width} columns (--wide does not cut them)")
    return notes


def _incident_list(answer: Any) -> list[Any]:
    incidents = answer.get("incidents", []) if isinstance(answer, Mapping) else []
    return [incident for incident in incidents or [] if isinstance(incident, Mapping)]


def format_incidents(answer: Any, *, width: int | None = None,
                     short: Callable[[Any], str] | None = None) -> str:
    """``short`` names the implementations (by default the shortest unique suffix); ``width``: the
    columns to fit (None: no limit)."""
    incidents = answer.get("incidents", []) if isinstance(answer, Mapping) else []
    if not incidents:
        return "Open incidents: none"
    short = short or _shortener({i.get("implementation") for i in _incident_list(answer)
                                 if isinstance(i.get("implementation"), str) and i.get("implementation")})
    ordered = sorted(incidents, key=lambda i: (-_severity_rank(i.get("severity")),
                                               -float(i.get("last_seen_unix") or 0), str(i.get("id"))))
    rows = [[str(i.get("severity", "")), str(i.get("id", "")), str(i.get("rule", "")),
             short(i.get("implementation")), str(i.get("entry_point") or "-"),
             str(_int(i.get("count"))), _when(i.get("last_seen_unix") or i.get("last_seen"))]
            for i in ordered]
    title = f"Open incidents: {len(incidents)}"
    if isinstance(answer, Mapping) and answer.get("more"):
        title += (" shown, the most severe first; more are open (GET /api/v1/incidents?status=open "
                  "lists them all, page by page)")
    headers = ["SEVERITY", "ID", "RULE", "IMPLEMENTATION", "ENTRY POINT", "COUNT", "LAST SEEN"]
    # they are listed the most recently seen first within a severity
    headers, rows, right, dropped, cut = _fit(headers, rows, {5}, optional=(6,), width=width,
                                              cuttable=((4, _CUT_ENTRY_POINTS), (3, _CUT_NAMES)))
    notes = [line for note in _dropped_note(dropped, width, cut)
             for line in _wrapped(note, "  ", width, names=False)]
    return "\n".join([title, format_table(headers, rows, right_aligned=right), *notes])


#: the widest cell printed, in terminal columns: names come from spans, which any OTLP client can send
MAX_CELL_CHARS = 80


def printable(text: object, limit: int = MAX_CELL_CHARS) -> str:
    """One table cell: control and other non-printable characters escaped (no terminal escape
    sequence, no line break from the data), cut to ``limit`` columns with an ellipsis."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                       for c in text)
    if display_width(text) <= limit:
        return text
    kept, width = [], 0
    for char in text:
        width += _char_width(char)
        if width > limit - 1:
            break
        kept.append(char)
    return "".join(kept) + "…"


def display_width(text: str) -> int:
    """The terminal columns ``text`` takes: a wide or full-width character (CJK) 2, a combining
    mark 0, any other printable character 1."""
    return len(text) if text.isascii() else sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right_aligned: Iterable[int] = ()) -> str:
    """Columns padded to the widest cell by display width (len() counts a CJK character as one
    column where a terminal gives it two)."""
    right = set(right_aligned)
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(display_width(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        padded = []
        for index, (cell, width) in enumerate(zip(cells, widths)):
            fill = " " * (width - display_width(str(cell)))
            padded.append(fill + str(cell) if index in right else str(cell) + fill)
        return "  " + "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


# -- reading the inventory leniently ---------------------------------------------------------------

def _roles(inventory: Any) -> list[tuple[str, Mapping[str, Any], list[tuple[str, Mapping[str, Any]]]]]:
    """(role, the role's own fields or {}, its implementations) per role, by name."""
    roles = inventory.get("roles", inventory) if isinstance(inventory, Mapping) else inventory
    return sorted(((str(name), role if isinstance(role, Mapping) else {}, _implementations(role))
                   for name, role in _named(roles, "role")), key=lambda item: item[0])


def _implementations(role: Any) -> list[tuple[str, Mapping[str, Any]]]:
    implementations = role.get("implementations", {}) if isinstance(role, Mapping) else role
    canonical = role.get("canonical") if isinstance(role, Mapping) else None
    result = []
    for name, impl in _named(implementations, "implementation"):
        impl = dict(impl) if isinstance(impl, Mapping) else {"calls": impl}
        if isinstance(canonical, str) and canonical == name:
            impl.setdefault("canonical", True)
        result.append((str(name), impl))
    return result


def _named(items: Any, key: str) -> list[tuple[str, Any]]:
    """(name, value) pairs from a mapping, or from a list of objects naming themselves by ``key``."""
    if isinstance(items, Mapping):
        return list(items.items())
    if isinstance(items, list):
        return [(str(item.get(key) or item.get("name")), item) for item in items
                if isinstance(item, Mapping) and (item.get(key) or item.get("name"))]
    return []


def _share_basis(implementations: list[tuple[str, Mapping[str, Any]]]) -> str:
    # top-level calls leave out nested delegations (an adapter calling the canonical engine), as the
    # inventory's canonical_share does; fall back to all calls when the inventory has no such count
    if implementations and all("top_level_calls" in impl for _, impl in implementations):
        return "top_level_calls"
    return "calls"


def _share(impl: Mapping[str, Any], basis: str, total: int) -> str:
    share = impl.get("share")
    if not isinstance(share, (int, float)):
        share = _int(impl.get(basis)) / total if total else 0.0
    return f"{100 * share:.1f}%"


def _marks(impl: Mapping[str, Any]) -> str:
    marks = [mark for mark in ("canonical", "retired") if impl.get(mark) is True]
    return ",".join(marks) or "-"


def _entry_points(entry_points: Any) -> str:
    if isinstance(entry_points, Mapping):
        pairs = sorted(entry_points.items(), key=lambda kv: (-_int(kv[1]), str(kv[0])))
        names = [f"{name} ({_int(calls)})" for name, calls in pairs]
    elif isinstance(entry_points, list):
        names = [str(e.get("entry_point") or e.get("name")) if isinstance(e, Mapping) else str(e)
                 for e in entry_points]
    else:
        return "-"
    if len(names) > _MAX_ENTRY_POINTS_SHOWN:
        more = len(names) - _MAX_ENTRY_POINTS_SHOWN
        names = names[:_MAX_ENTRY_POINTS_SHOWN] + [f"+{more} more"]
    return ", ".join(names) or "-"


#: retired classes named in a role's summary line; more are "+N more"
_MAX_RETIRED_SHOWN = 3


def _role_summary(role: Mapping[str, Any], implementations: Mapping[str, Mapping[str, Any]],
                  short: Callable[[Any], str], window_s: Any) -> str | None:
    """``canonical share 82.6% · retired still called: Class (16 calls, last ...)`` from the role's
    ``canonical_share`` and ``retired_still_called``; None when the inventory has neither (an older
    or list-shaped one). Names come from spans: escaped and cut as table cells are."""
    if "canonical_share" not in role and "retired_still_called" not in role:
        return None
    share = role.get("canonical_share")
    parts = [f"canonical share {100 * float(share):.1f}%"
             if isinstance(share, (int, float)) and not isinstance(share, bool)
             else "canonical share - (no canonical implementation)"]
    retired = role.get("retired_still_called")
    retired = [str(name) for name in retired] if isinstance(retired, list) else []
    named = []
    for name in retired[:_MAX_RETIRED_SHOWN]:
        impl = implementations.get(name)
        if impl is None:  # in the ledger: called within the window before this sidecar started
            named.append(f"{printable(short(name))} (called before the sidecar started)")
        else:
            calls = _int(impl.get("calls"))
            named.append(f"{printable(short(name))} ({calls} call{'' if calls == 1 else 's'}, last "
                         f"{printable(_when(_last_seen(impl)))})")
    if len(retired) > _MAX_RETIRED_SHOWN:
        named.append(f"+{len(retired) - _MAX_RETIRED_SHOWN} more")
    label = (f"retired called in the last {float(window_s) / 86400:g} days"
             if isinstance(window_s, (int, float)) and not isinstance(window_s, bool) and window_s > 0
             else "retired still called")
    parts.append(f"{label}: {', '.join(named) or 'none'}")
    return " · ".join(parts)


def _idle(seconds: Any) -> str:
    """``idle_s`` as ``45s``, ``12m``, ``3h 5m``, ``2d 4h``; ``-`` when there is none."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds >= 0:
        return "-"
    if seconds == float("inf"):
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


def _first_seen(impl: Mapping[str, Any]) -> Any:
    if impl.get("first_seen_ns"):
        return _int(impl["first_seen_ns"]) / 1e9
    return impl.get("first_seen_unix") or impl.get("first_seen")


def _last_seen(impl: Mapping[str, Any]) -> Any:
    if impl.get("last_seen_ns"):
        return _int(impl["last_seen_ns"]) / 1e9
    return impl.get("last_seen_unix") or impl.get("last_seen")


def _when(value: Any) -> str:
    """Unix seconds or an RFC 3339 string -> ``2026-11-26 12:00:00Z``; anything else as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        moment = datetime.fromtimestamp(value, tz=timezone.utc)
    elif isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value).astimezone(timezone.utc)
        except ValueError:
            return value
    else:
        return "-"
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _severity_rank(value: Any) -> int:
    try:
        return severity_rank(str(value))
    except ValueError:
        return -1


# -- the consolidation picture (--consolidation) ---------------------------------------------------

def render_consolidation(api_url: str, token: str | None = None, timeout_s: float = 5.0, *,
                         wide: bool = False) -> str:
    with _password_hidden(api_url), \
            httpx.Client(headers=auth_headers(token), timeout=timeout_s) as client:
        inventory = fetch_json(client, api_url, "/api/v1/inventory")
        picture = fetch_json(client, api_url, "/api/v1/consolidation")
        with _unexpected_answer(api_url):
            return format_consolidation(shown_url(api_url), inventory, picture, wide=wide)


def format_consolidation(api_url: str, inventory: Any, picture: Any, *, wide: bool = False) -> str:
    """Roles and canonical share, paths per entry point, callers to migrate, regressions by
    version, deletable classes; ``wide``: full class names."""
    picture = picture if isinstance(picture, Mapping) else {}
    short = _full_name if wide else _shortener(_report_implementations(inventory, picture))
    sections = [f"pathwatch consolidation report: {api_url}", _format_shares(inventory, short),
                _format_paths(picture.get("paths") or {}, short),
                _format_callers(picture.get("callers_to_migrate") or [], short,
                                picture.get("callers_overflow")),
                _format_versions(picture.get("versions") or [], short,
                                 picture.get("versions_overflow")),
                _format_verdicts(picture.get("verdicts") or {}, short)]
    return "\n\n".join(sections) + "\n"


def _report_implementations(inventory: Any, picture: Mapping[str, Any]) -> set[str]:
    """Every implementation the report names, so that each is shortened the same way everywhere."""
    names: set[str] = set()
    roles = inventory.get("roles") if isinstance(inventory, Mapping) else None
    for role in (roles or {}).values():
        if isinstance(role, Mapping):
            names.update(role.get("implementations") or {})
            names.update(role.get("canonical") or [])
            names.update(role.get("retired_still_called") or [])
    for body in ((picture.get("paths") or {}).get("entry_points") or {}).values():
        for path in body.get("paths") or []:
            names.update(step.get("implementation") for step in path.get("steps") or [])
    names.update(item.get("implementation") for item in picture.get("callers_to_migrate") or [])
    names.update(v.get("implementation")
                 for v in (picture.get("verdicts") or {}).get("implementations") or [])
    for version in picture.get("versions") or []:
        names.update(_retired_seen(seen)[1] for seen in version.get("retired_seen") or [])
    return {name for name in names if isinstance(name, str) and name}


def _shortener(names: set[str]) -> Callable[[Any], str]:
    """``module.Class`` -> ``Class``, unless another implementation in the report has that class
    name too (two ``SupervisorAgent`` in different modules): then the shortest dotted suffix that
    tells it apart (``ws.agents.SupervisorAgent``), the whole name at worst."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        by_class.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    shortened: dict[str, str] = {}
    for same in by_class.values():
        for name in same:
            parts = name.split(".")
            for k in range(1, len(parts) + 1):
                suffix = ".".join(parts[-k:])
                if not any(other != name and (other == suffix or other.endswith("." + suffix))
                           for other in same):
                    break
            shortened[name] = suffix

    def short(name: Any) -> str:
        if not name:
            return "-"
        return shortened.get(name) or _short(name)

    return short


def _format_shares(inventory: Any, short: Callable[[Any], str]) -> str:
    roles = inventory.get("roles", {}) if isinstance(inventory, Mapping) else {}
    rows = []
    for name, role in sorted(roles.items()):
        share = role.get("canonical_share") if isinstance(role, Mapping) else None
        rows.append([name, ", ".join(short(c) for c in role.get("canonical") or []) or "-",
                     "-" if share is None else f"{100 * share:.1f}%",
                     str(len(role.get("implementations") or {})),
                     ", ".join(short(r) for r in role.get("retired_still_called") or []) or "-"])
    if not rows:
        return "Roles\n  (no wrapped calls seen yet)"
    window_s = inventory.get("retired_window_s") if isinstance(inventory, Mapping) else None
    retired = (f"RETIRED CALLED (LAST {float(window_s) / 86400:g} DAYS)"
               if isinstance(window_s, (int, float)) and window_s else "RETIRED STILL CALLED")
    return "Roles\n" + format_table(["ROLE", "CANONICAL", "CANONICAL SHARE", "IMPLEMENTATIONS",
                                     retired], rows, right_aligned={2, 3})


def _format_paths(paths: Mapping[str, Any], short: Callable[[Any], str]) -> str:
    rows = []
    for entry, body in sorted((paths.get("entry_points") or {}).items()):
        for index, path in enumerate(body.get("paths") or []):
            rows.append([entry if index == 0 else "", str(path.get("id")), str(_int(path.get("runs"))),
                         f"{100 * float(path.get('share') or 0):.1f}%", _steps(path, short)])
        overflow_runs, runs = _int(body.get("overflow_runs")), _int(body.get("runs"))
        if overflow_runs and runs:
            rows.append(["", "other", str(overflow_runs), f"{100 * overflow_runs / runs:.1f}%",
                         "(paths beyond the limit, not listed)"])
    if not rows:
        return "Paths per entry point\n  (no run judged yet)"
    return "Paths per entry point\n" + format_table(["ENTRY POINT", "PATH", "RUNS", "SHARE", "STEPS"],
                                                    rows, right_aligned={2, 3})


def _steps(path: Mapping[str, Any], short: Callable[[Any], str]) -> str:
    """``role=Class > role=Class (nested)``, as the API's ``path`` says it, with the report's
    short names (the API's shortens to the class name alone)."""
    steps = path.get("steps")
    if not steps:
        return str(path.get("path"))
    return " > ".join(f"{step.get('role')}={short(step.get('implementation'))}"
                      f"{' (nested)' if step.get('nested') else ''}" for step in steps)


def _format_callers(to_migrate: list, short: Callable[[Any], str], overflow: Any = None) -> str:
    overflow = overflow if isinstance(overflow, Mapping) else {}
    rows = []
    for item in to_migrate:
        for index, caller in enumerate(item.get("callers") or []):
            rows.append([f"{item.get('role')} {short(item.get('implementation'))}" if index == 0 else "",
                         str(caller.get("caller")), str(_int(caller.get("calls"))),
                         _when(caller.get("last_seen"))])
        if _int(item.get("callers_dropped")):
            rows.append(["", f"(+ {_int(item.get('callers_dropped'))} dropped to keep the "
                             f"{_int(overflow.get('max_callers')) or len(item.get('callers') or [])}"
                             f" most recent: may call again)", "", ""])
    untracked = _int(overflow.get("untracked_calls"))
    note = (f"\n  {untracked} calls of implementations beyond max_implementations "
            f"({_int(overflow.get('max_implementations'))}) have no callers listed"
            if untracked else "")
    if not rows:
        return "Callers to migrate: none" + note
    return "Callers to migrate\n" + format_table(["IMPLEMENTATION", "CALLER", "CALLS", "LAST SEEN"],
                                                 rows, right_aligned={2}) + note


def _retired_seen(seen: Any) -> tuple[str, str]:
    """A version's ``retired_seen`` entry, ``role module.Class``, as (role, implementation)."""
    role, _, implementation = str(seen).rpartition(" ")  # a dotted class name has no space
    return role, implementation


def _format_versions(versions: list, short: Callable[[Any], str], overflow: Any = None) -> str:
    """One row per (service, version): a gateway sees several services, whose versions may be equal
    strings; then what ``consolidation.max_versions`` cost, when it cost anything. The retired
    classes a version ran are named as in the other tables (``short``)."""
    rows = []
    for version in versions:
        findings = version.get("findings") or {}
        retired = []
        for seen in version.get("retired_seen") or []:
            role, implementation = _retired_seen(seen)
            retired.append(f"{role} {short(implementation)}" if role else short(implementation))
        rows.append([str(version.get("service") or "-"), str(version.get("version")),
                     str(version.get("previous_version") or "-"), str(_int(version.get("runs"))),
                     " ".join(f"{family}={_int(n)}" for family, n in sorted(findings.items())),
                     ", ".join(retired) or "-"])
    if not rows:
        return "Versions: none seen"
    text = ("Versions (regressions are deploy.* incidents)\n"
            + format_table(["SERVICE", "VERSION", "PREVIOUS", "RUNS", "FINDINGS", "RETIRED SEEN"],
                           rows, right_aligned={3}))
    overflow = overflow if isinstance(overflow, Mapping) else {}
    waiting = [w for w in overflow.get("waiting") or [] if isinstance(w, Mapping)]
    if _int(overflow.get("dropped")) or waiting:
        # service and version come from spans (resource attributes): escaped as in the tables
        text += (f"\n  beyond max_versions ({_int(overflow.get('max_versions'))}): "
                 f"{_int(overflow.get('dropped'))} dropped, "
                 f"{_int(overflow.get('ignored'))} spans and findings ignored; not tracked: "
                 + (", ".join(f"{printable(w.get('service'))} {printable(w.get('version'))}"
                              for w in waiting) or "-"))
    return text


# what a ledger that is not persisted means for the verdicts above its table (``verdicts.ledger``)
_LEDGER_NOTES = {
    "moved_aside": "its file could not be read and was moved aside, a fresh ledger started: the "
                   "evidence before is not in these verdicts",
    "write_failing": "{errors} writes failed, kept in memory and retried every flush; last "
                     "written {last}",
    "in_memory": "its file is left alone, nothing of it is saved: these verdicts are lost at the "
                 "sidecar's stop",
    "no_file": "incidents.path is \":memory:\", nothing of it is saved: these verdicts are lost "
               "at the sidecar's stop",
}


def _ledger_note(ledger: Any) -> str:
    """A line saying the ledger behind the verdicts is not being saved, and why; none when it is
    (or the sidecar does not say)."""
    if not isinstance(ledger, Mapping) or ledger.get("state") not in _LEDGER_NOTES:
        return ""
    state, reason = ledger["state"], ledger.get("reason")
    note = _LEDGER_NOTES[state].format(errors=_int(ledger.get("write_errors")),
                                       last=printable(_when(ledger.get("last_written"))))
    why = f" ({printable(reason)})" if reason else ""
    return (f"\n  the ledger behind these verdicts is {state} since "
            f"{printable(_when(ledger.get('since')))}{why}: {note}")


def _format_verdicts(verdicts: Mapping[str, Any], short: Callable[[Any], str]) -> str:
    window_days = float(verdicts.get("window_s") or 0) / 86400
    rows = [[str(v.get("role")), short(v.get("implementation")), str(v.get("verdict")),
             str(_int(v.get("total_calls"))), _when(v.get("last_seen")),
             ", ".join(v.get("last_callers") or []) or "-"]
            for v in verdicts.get("implementations") or [] if v.get("verdict") != "canonical"]
    title = f"Non-canonical classes: safe_to_delete after zero calls for {window_days:g} days"
    loss = verdicts.get("span_loss")
    if isinstance(loss, Mapping):
        title += (f"\n  calls may have been lost {printable(_when(loss.get('from')))} - "
                  f"{printable(_when(loss.get('to')))} ({printable(loss.get('reason'))}): classes idle"
                  f" since before are re-confirmed over a whole window after it")
    title += _ledger_note(verdicts.get("ledger"))
    overflow = verdicts.get("overflow")
    overflow = overflow if isinstance(overflow, Mapping) else {}
    untracked = _int(overflow.get("untracked_calls"))
    if untracked:
        title += (f"\n  {untracked} calls of classes beyond the ledger's "
                  f"{_int(overflow.get('max_implementations'))} were not tracked since the sidecar "
                  f"started: those classes have no verdict below")
    if not rows:
        return title + "\n  (no non-canonical implementation seen)"
    return title + "\n" + format_table(["ROLE", "IMPLEMENTATION", "VERDICT", "CALLS", "LAST SEEN",
                                        "LAST CALLERS"], rows, right_aligned={3})


def _short(name: Any) -> str:
    return str(name).rsplit(".", 1)[-1] if name else "-"


def _full_name(name: Any) -> str:
    """``--wide``: the name as the API gives it."""
    return str(name) if name else "-"


# -- command line ---------------------------------------------------------------------------------

WIDE_HELP = ("full implementation names and every column, however wide (by default the tables fit "
             f"the terminal, or {DEFAULT_WIDTH} columns, naming a class by as little of its module as "
             "tells it apart)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", default=DEFAULT_API_URL, metavar="URL",
                        help=f"base URL of the sidecar's HTTP API, http:// or https://; host:port "
                        f"alone is http://host:port (default {DEFAULT_API_URL})")
    parser.add_argument("--token-env", default=DEFAULT_TOKEN_ENV,
                        help=f"environment variable holding the API bearer token (default {DEFAULT_TOKEN_ENV})")
    parser.add_argument("--consolidation", action="store_true",
                        help="print the consolidation picture (paths, callers, versions, verdicts)")
    parser.add_argument("--wide", action="store_true", help=WIDE_HELP)


def api_url_of(api: str) -> str | None:
    """``--api`` as the base URL to ask: without a scheme (``127.0.0.1:9464``, ``host:9464/prefix``)
    it is ``http://`` (as curl reads it); None when it is empty or of a scheme other than http(s)."""
    api = api.strip()
    prefix, rest = split_scheme(api)
    if prefix in ("", "//"):
        scheme = _SCHEME.match(rest)   # http:host:9464, https:/x: an http(s) URL typed wrong
        if not rest or (scheme and scheme.group().lower() in ("http:", "https:")):
            return None
        return "http://" + rest
    return api if prefix.lower() in ("http://", "https://") else None


def run(args: argparse.Namespace) -> int:
    """Print the report for ``args.api`` (token from ``args.token_env``); the process exit code."""
    if not args.token_env.strip():  # "" read no variable and sent no token, silently
        print("pathwatch report: --token-env is empty: give the name of the environment variable "
              f"holding the API bearer token (default {DEFAULT_TOKEN_ENV})", file=sys.stderr)
        return 2
    api = api_url_of(args.api)
    if api is None:  # httpx said "cannot reach" (an empty one, ftp://) or tried it (ws://)
        print("pathwatch report: --api must be the sidecar's HTTP API as an http:// or https:// URL, "
              f"or host:port (read as http://host:port); got {shown_url(args.api)!r}",
              file=sys.stderr)
        return 2
    if password_spills(api):  # httpx's error would quote a part of the password as the port
        print("pathwatch report: --api: the password holds a '/', '?' or '#', which end the host "
              "part of a URL: percent-encode them (%2F, %3F, %23); got "
              f"{shown_url(args.api)!r}", file=sys.stderr)
        return 2
    # secrets mounted from files often end in a newline (the sidecar strips its token the same way)
    token = os.environ.get(args.token_env, "").strip() or None
    wide = getattr(args, "wide", False)
    incomplete = None
    try:
        if getattr(args, "consolidation", False):
            text = render_consolidation(api, token, wide=wide)
        else:
            text = render_report(api, token, wide=wide)
    except ReportIncomplete as exc:  # what could be read, then what could not (exit 1)
        text, incomplete = exc.text, exc
    except ReportError as exc:
        print(f"pathwatch report: {exc}", file=sys.stderr)
        return 1
    if not write_output(text, "report", "the report"):
        return 1
    if incomplete is not None:
        print(f"pathwatch report: {incomplete}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, *, api: str | None = None,
         token_env: str | None = None, consolidation: bool = False, wide: bool = False) -> int:
    """``main(["--api", URL])`` parses arguments; ``main(api=URL, token_env=NAME)`` skips parsing."""
    if api is not None:
        return run(argparse.Namespace(api=api, token_env=DEFAULT_TOKEN_ENV if token_env is None
                                      else token_env,
                                      consolidation=consolidation, wide=wide))
    parser = argparse.ArgumentParser(prog="pathwatch report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
