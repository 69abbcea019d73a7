import pytest
from starlette.datastructures import QueryParams

from sidecar.incidents import MAX_LIMIT, IncidentQuery, QueryError, parse_since
from sidecar.model import Severity


def test_since_accepts_unix_seconds_and_rfc3339():
    assert parse_since("1764160000") == 1_764_160_000_000_000_000
    assert parse_since("1764160000.5") == 1_764_160_000_500_000_000
    assert parse_since(" 1.76416e9 ") == parse_since("1764160000.") == 1_764_160_000_000_000_000
    assert parse_since("2025-11-26T12:26:40Z") == 1_764_160_000_000_000_000
    assert parse_since("2025-11-26T13:26:40+01:00") == 1_764_160_000_000_000_000


@pytest.mark.parametrize("value", ["yesterday", "2025-11-26T12:26:40", "-5", "nan", "9999999999",
                                   "1e300", "2300-01-01T00:00:00Z", "1600-01-01T00:00:00Z",
                                   "1969-12-31T00:00:00Z",
                                   # float() takes these, a number in the API's description is not
                                   # them (limit and after refuse them too)
                                   "1_764_160_000", "\u0661\u0667\u0666\u0664\u0661\u0666\u0660\u0660\u0660\u0660",
                                   "infinity", "0x10"])
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


def test_an_offset_typed_unencoded_in_a_url_is_read_as_the_offset():
    # "+01:00" in a URL query arrives as " 01:00" (a plus is a space there)
    assert parse_since("2025-11-26T13:26:40 01:00") == parse_since("2025-11-26T13:26:40+01:00")
