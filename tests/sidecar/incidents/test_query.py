import json
import random

import pytest
from starlette.datastructures import QueryParams

from sidecar.incidents import MAX_LIMIT, IncidentQuery, QueryError, incident_to_dict, parse_since
from sidecar.model import Incident, Severity


def test_since_accepts_unix_seconds_and_rfc3339():
    assert parse_since("1764160000") == 1_764_160_000_000_000_000
    assert parse_since("1764160000.5") == 1_764_160_000_500_000_000
    assert parse_since(" 1.76416e9 ") == parse_since("1764160000.") == 1_764_160_000_000_000_000
    # zero with any exponent is zero (0e99 was refused as "after 2262": its exponent was judged)
    assert parse_since("0e99") == parse_since("0.000e+999999") == parse_since("0") == 0
    assert parse_since("2025-11-26T12:26:40Z") == 1_764_160_000_000_000_000
    assert parse_since("2025-11-26T13:26:40+01:00") == 1_764_160_000_000_000_000


def test_since_is_read_exactly_to_the_nanosecond_and_truncated():
    assert parse_since("1764160000.123456789") == 1_764_160_000_123_456_789
    assert parse_since("1764160000.1234567899") == 1_764_160_000_123_456_789
    assert parse_since("1.764160000123456789e9") == 1_764_160_000_123_456_789
    assert parse_since("2025-11-26T12:26:40.123456789Z") == 1_764_160_000_123_456_789
    assert parse_since("2025-11-26T13:26:40,1234567899+01:00") == 1_764_160_000_123_456_789
    assert parse_since("2025-11-26T12:26:40.5Z") == 1_764_160_000_500_000_000
    assert parse_since("0") == parse_since("-0") == parse_since("1e-99") == 0


def _incident_at(ns: int) -> Incident:
    return Incident(id="0123456789abcdef", rule="bleed.owner_vs_ambient", severity=Severity.CRITICAL,
                    role=None, implementation=None, entry_point=None, summary="s", count=1,
                    first_seen_ns=ns, last_seen_ns=ns, sample_trace_ids=[])


def test_since_with_the_time_an_incident_shows_lists_that_incident():
    """since = its last_seen_unix or its last_seen, as JSON carries them: at or after, so it is in."""
    times = [1_795_784_463_123_999_700,  # 13:01:03.1239997: its milliseconds were rounded up
             1_795_784_463_181_176_449,  # its unix seconds' shortest float form was ...1811767
             *random.Random(1).sample(range(1_795_000_000_000_000_000, 1_796_000_000_000_000_000),
                                      5000)]
    for ns in times:
        incident = _incident_at(ns)
        shown = json.loads(json.dumps(incident_to_dict(incident)))
        for since in (str(shown["last_seen_unix"]), shown["last_seen"]):
            assert IncidentQuery.from_params({"since": since}).matches(incident), (ns, since)
            assert parse_since(since) > ns - 1_000_000, (ns, since)  # its time: not far before


@pytest.mark.parametrize("value", ["yesterday", "2025-11-26T12:26:40", "-5", "nan", "9999999999",
                                   "1e300", "2300-01-01T00:00:00Z", "1600-01-01T00:00:00Z",
                                   "1969-12-31T00:00:00Z",
                                   # float() takes these, a number in the API's description is not
                                   # them (limit and after refuse them too)
                                   "1_764_160_000", "\u0661\u0667\u0666\u0664\u0661\u0666\u0660\u0660\u0660\u0660",
                                   "infinity", "0x10", "1e99999999999999999999",
                                   "1e-99999999999999999999",
                                   # nor digits other than ASCII in an RFC 3339 time (the
                                   # fraction's were read as digits: .\u0665 as .5)
                                   "2026-11-26T12:00:00.\u0665Z", "2026-11-26T12:00:00,\u0661\u0662Z",
                                   "2026-11-26T12:00:00.5\u0665Z", "2026-11-26T12:00:00.\u0968Z",
                                   "2026-11-26T12:00:00 \u0660\u0661:00",
                                   "2026-11-26T12:00:00.5 \u0660\u0661:00",
                                   # two fractions: the first was cut out and the second read by
                                   # datetime, 1 s in all (12:00:01)
                                   "2026-11-26T12:00:00.5.5Z", "2026-11-26T12:00:00.5,5Z",
                                   "2026-11-26T12:00:00,5.5+01:00"])
def test_since_rejects_what_it_cannot_place_in_time(value):
    with pytest.raises(QueryError) as err:
        parse_since(value)
    assert err.value.parameter == "since"


def test_query_from_params():
    query = IncidentQuery.from_params(
        {"rule": "bleed.owner_vs_ambient", "severity": "CRITICAL", "status": "Open", "limit": "5",
         "since": "1764160000", "before": "1764160000000000001:0123abcd"})
    assert query == IncidentQuery(rule="bleed.owner_vs_ambient", severity=Severity.CRITICAL,
                                  status="open", limit=5, since_ns=1_764_160_000_000_000_000,
                                  before=(1_764_160_000_000_000_001, "0123abcd"))


@pytest.mark.parametrize(("params", "parameter"), [
    ({"severity": "urgent"}, "severity"),
    ({"status": "closed"}, "status"),
    ({"limit": "ten"}, "limit"),
    ({"limit": "0"}, "limit"),
    ({"limit": str(MAX_LIMIT + 1)}, "limit"),
    ({"sort": "asc"}, "sort"),
    ({"limit": "1_0"}, "limit"),
    ({"rule": "bleed.no_such_rule"}, "rule"),  # would match nothing, silently
    ({"before": "1764160000"}, "before"),
    ({"before": "-1:0123abcd"}, "before"),
    (QueryParams("rule=bleed.owner_vs_ambient&rule=delivery.undelivered"), "rule"),
])
def test_bad_params_name_the_parameter(params, parameter):
    with pytest.raises(QueryError) as err:
        IncidentQuery.from_params(params)
    assert err.value.parameter == parameter
    assert str(err.value).startswith(f"{parameter}: ")


@pytest.mark.parametrize("value", ["-1", "ten", "+5", "1.0"])
def test_a_bad_integer_says_what_range_it_takes(value):
    # "-1" was answered "expected an integer": it is one, the range was what it missed
    with pytest.raises(QueryError) as err:
        IncidentQuery.from_params({"limit": value})
    assert str(err.value) == f"limit: expected an integer 1..{MAX_LIMIT}, got {value!r}"


def test_a_fraction_in_the_offset_is_the_offset_s_not_the_time_s():
    # the first "HH:MM:SS.f" found was taken for the time's: in the offset it added .5 s where the
    # offset takes it away
    assert parse_since("2026-11-26T12:00:00+01:00:30.5") == parse_since("2026-11-26T10:59:29.5Z")
    assert parse_since("2026-11-26T12:00:00.25+01:00:30.5") == parse_since("2026-11-26T10:59:29.75Z")


def test_an_offset_typed_unencoded_in_a_url_is_read_as_the_offset():
    # "+01:00" in a URL query arrives as " 01:00" (a plus is a space there)
    assert parse_since("2025-11-26T13:26:40 01:00") == parse_since("2025-11-26T13:26:40+01:00")
    # with the space RFC 3339 allows between date and time too (it was refused: 400)
    assert parse_since("2025-11-26 13:26:40 01:00") == parse_since("2025-11-26T13:26:40+01:00")
    assert parse_since("2025-11-26 13:26:40.5 01:00") == parse_since("2025-11-26T12:26:40.5Z")
