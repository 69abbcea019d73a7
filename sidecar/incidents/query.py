"""Incident queries: the filters the HTTP API accepts, parsed and validated in one place."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_FLOOR, Decimal, InvalidOperation, localcontext

from sidecar.model import Incident, Severity

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
STATUSES = ("open", "resolved")
_PARAMETERS = ("rule", "severity", "since", "status", "limit", "before")


class QueryError(ValueError):
    """A query parameter is invalid; ``parameter`` names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


@dataclass(frozen=True, slots=True, kw_only=True)
class IncidentQuery:
    rule: str | None = None
    severity: Severity | None = None
    since_ns: int | None = None  # incidents last seen at or after this unix time
    status: str | None = None
    limit: int = DEFAULT_LIMIT
    # keyset cursor: only the incidents listed after this one (last_seen_ns, id) — the next page
    before: tuple[int, str] | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> IncidentQuery:
        """Build from URL query parameters; raises ``QueryError`` naming the bad parameter."""
        reject_unknown(params, _PARAMETERS)
        return cls(
            rule=parse_rule(params.get("rule")),
            severity=_parse_severity(params.get("severity")),
            since_ns=parse_since(params["since"]) if params.get("since") else None,
            status=_parse_status(params.get("status")),
            limit=parse_int("limit", params.get("limit"), 1, MAX_LIMIT) or DEFAULT_LIMIT,
            before=_parse_before(params.get("before")),
        )

    def matches(self, incident: Incident) -> bool:
        """The filters in Python (the store's SQL applies the same ones when it reads the database)."""
        return ((self.rule is None or incident.rule == self.rule)
                and (self.status is None or incident.status == self.status)
                and (self.severity is None or incident.severity == self.severity)
                and (self.since_ns is None or incident.last_seen_ns >= self.since_ns)
                and (self.before is None or list_position(incident) > (-self.before[0], self.before[1])))


def list_position(incident: Incident) -> tuple[int, str]:
    """The list order: most recently seen first, then by id."""
    return -incident.last_seen_ns, incident.id


def cursor(incident: Incident) -> str:
    """The ``before`` value that lists the incidents after this one: ``LAST_SEEN_NS:ID``."""
    return f"{incident.last_seen_ns}:{incident.id}"


def reject_unknown(params: Mapping[str, str], known: Sequence[str], *,
                   repeatable: Sequence[str] = ()) -> None:
    """A misspelt filter must fail loudly, not silently return everything; a filter given twice
    (``?rule=a&rule=b``) too, rather than one of them silently winning — unless it is a list
    (``repeatable``, e.g. ``/metrics?name[]=a&name[]=b``)."""
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise QueryError(unknown[0], f"unknown parameter; known: {', '.join(known)}" if known
                         else "unknown parameter; this endpoint takes none")
    getlist = getattr(params, "getlist", None)  # Starlette's QueryParams keeps repeated keys
    if getlist is not None:
        for name in params:
            if name not in repeatable and len(getlist(name)) > 1:
                raise QueryError(name, "given more than once; one value per filter")


def parse_rule(value: str | None) -> str | None:
    """A rule id of the catalog (an unknown one would match nothing, silently)."""
    if not value:
        return None
    from sidecar.rules import CATALOG

    if value not in CATALOG:
        raise QueryError("rule", f"unknown rule id {value!r}; known: {', '.join(sorted(CATALOG))}")
    return value


def parse_int(name: str, value: str | None, low: int, high: int) -> int | None:
    """An integer parameter within ``low..high``; None if absent."""
    if value is None or value == "":
        return None
    digits = value.strip()
    if not _DIGITS.fullmatch(digits):  # int() would take "1_0" and "٣"
        raise QueryError(name, f"expected an integer {low}..{high}, got {value!r}")
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(high)):  # int() refuses more than 4300 digits (a 500 it was)
        raise QueryError(name, f"expected {low}..{high}, got a number of {len(significant)} digits")
    number = int(significant)
    if number < low or number > high:
        raise QueryError(name, f"expected {low}..{high}, got {number}")
    return number


_MAX_NS = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # ASCII, as in JSON
# ASCII digits only in these two (re.ASCII), as datetime.fromisoformat and every other parameter
# read them: with Unicode \d, int() took "2026-11-26T12:00:00.\u0665Z" (Arabic-Indic five) for .5
# "+01:00" typed unencoded in a URL arrives as " 01:00": read it as the offset it was
# (after a "T" or the space RFC 3339 allows between date and time)
_SPACED_OFFSET = re.compile(r"([T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:\d\d)$", re.ASCII)
# the fraction of the seconds, read to the nanosecond here (datetime keeps microseconds): the one
# right after the time's seconds (the first HH:MM:SS), ending the time (an offset or nothing after
# it) -- else ".5.5Z" was read as .5 s and then .5 s again, and an offset's seconds' fraction
# ("+01:00:30.5") as the time's; such text goes to datetime whole (which refuses the first)
_SECONDS = re.compile(r"\d\d:\d\d:\d\d", re.ASCII)
_SECOND_FRACTION = re.compile(r"[.,]([0-9]+)(?=[Zz+-]|$)")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS_PER_S = 1_000_000_000


def parse_since(value: str) -> int:
    """Unix seconds (``1764160000`` or ``1764160000.5``) or RFC 3339 (``2026-11-26T12:00:00Z``) -> ns.

    Read exactly and truncated to the nanosecond (no float rounding): ``since=`` with the
    ``last_seen_unix`` or ``last_seen`` an incident shows lists that incident
    (``sidecar.incidents.serialize``)."""
    text = value.strip()
    if not _DECIMAL.fullmatch(text):  # float() would take "1_0", "١٢" and "infinity"
        return _parse_rfc3339(text)
    try:
        seconds = Decimal(text)
    except InvalidOperation:  # an exponent beyond what Decimal holds
        raise QueryError("since", f"expected unix seconds from 1970 to 2262, got {value!r}") from None
    if seconds < 0:
        raise QueryError("since", f"expected a non-negative unix time, got {value!r}")
    if seconds and seconds.adjusted() > 12:  # 30,000 years: out of range, without a huge product
        raise QueryError("since", f"expected a time before the year 2262, got {value!r}")
    with localcontext() as exact:
        exact.prec, exact.rounding = 64, ROUND_FLOOR  # floors, to far more digits than a time has
        ns = int((seconds * _NS_PER_S).to_integral_value())
    return _within_range(ns, value)


def _within_range(ns: int, value: str) -> int:
    """Times are stored as signed 64-bit ns (SQLite INTEGER): up to the year 2262; none is before
    1970 (a unix time is non-negative)."""
    if ns > _MAX_NS:
        raise QueryError("since", f"expected a time before the year 2262, got {value!r}")
    if ns < 0:
        raise QueryError("since", f"expected a time after 1970-01-01, got {value!r}")
    return ns


def _parse_rfc3339(text: str) -> int:
    text = _SPACED_OFFSET.sub(r"\1+\2", text)
    seconds = _SECONDS.search(text)
    fraction = None if seconds is None else _SECOND_FRACTION.match(text, seconds.end())
    whole = text if fraction is None else text[:fraction.start()] + text[fraction.end():]
    try:
        moment = datetime.fromisoformat(whole.replace("z", "Z"))
    except ValueError:
        raise QueryError(
            "since", f"expected unix seconds or RFC 3339 (2026-11-26T12:00:00Z), got {text!r}") from None
    if moment.tzinfo is None:
        raise QueryError("since", f"RFC 3339 time needs an offset (Z or +01:00), got {text!r}")
    elapsed = moment - _EPOCH  # exact: whole seconds (and microseconds) as integers
    ns = ((elapsed.days * 86_400 + elapsed.seconds) * _NS_PER_S + elapsed.microseconds * 1000
          + (int(fraction[1][:9].ljust(9, "0")) if fraction is not None else 0))
    return _within_range(ns, text)


_CURSOR = re.compile(r"([0-9]{1,19}):([0-9a-f]+)")


def _parse_before(value: str | None) -> tuple[int, str] | None:
    """A cursor made by ``cursor`` (the ``next_before`` of a previous page)."""
    if not value:
        return None
    match = _CURSOR.fullmatch(value)
    if match is None or int(match[1]) > _MAX_NS:
        raise QueryError("before", f"expected the next_before of a previous page (LAST_SEEN_NS:ID), "
                                   f"got {value!r}")
    return int(match[1]), match[2]


def _parse_severity(value: str | None) -> Severity | None:
    if not value:
        return None
    try:
        return Severity(value.lower())
    except ValueError:
        known = ", ".join(s.value for s in Severity)
        raise QueryError("severity", f"expected one of {known}, got {value!r}") from None


def _parse_status(value: str | None) -> str | None:
    if not value:
        return None
    value = value.lower()  # as severity
    if value not in STATUSES:
        raise QueryError("status", f"expected one of {', '.join(STATUSES)}, got {value!r}")
    return value
