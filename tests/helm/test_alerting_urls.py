"""The chart refuses at render the alerting URLs the sidecar refuses at start (exit 2, which in sidecar mode
holds the backend's pod), naming the key and never the URL; the two verdicts are compared string by string
(``pathwatch.httpUrlProblem`` run by the real helm against ``_check_http_url``), so they cannot drift."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import httpx
import yaml

from sidecar.config import _check_http_url
from tests.helm.charting import Helm
from tests.helm.test_values_schema import assert_refused_without_the_value


def sidecar_refuses(url: str) -> bool:
    try:
        _check_http_url(url)
    except ValueError:
        return True
    return False


# (the URL, what is wrong): each one the sidecar refuses, a CANARY in its secret part
BAD = [
    ("https://", "no host"),
    ("http://:80/CANARY", "no host"),
    ("http:///CANARY", "no host"),
    ("http:CANARY", "no host"),
    ("https://user:CANARY@/x", "no host behind the credentials"),
    ("http://host:99999/CANARY", "a port beyond 65535"),
    ("http://host:0/CANARY", "port 0"),
    ("http://user:CANARY/x", "the password taken for a port (no @host)"),
    ("http://ho st/CANARY", "a space in the host"),
    ("http://host\\CANARY", "a backslash in the host"),
    ("http://host%2FCANARY", "an escaped / in the host"),
    ("http://-host/CANARY", "a host name beginning with -"),
    ("http://256.1.1.1/CANARY", "no IPv4 address"),
    ("http://[::1:80/CANARY", "an unclosed bracket"),
    ("http://[CANARY]/x", "brackets without an IPv6 address"),
    ("http://[fe80::1%CANARYü]/x", "a non-ASCII IPv6 zone"),
    ("https://hooks.example/CANARY\n", "a line break"),
    ("htps://hooks.example/CANARY", "a mistyped scheme"),
    ("hooks.example/CANARY", "no scheme"),
]
GOOD = [
    "https://hooks.slack.com/services/T0/B0/X",
    "http://am-0.am.monitoring.svc:9093",
    "http://user:pw@am:9093/path?q=1#f",
    "HTTPS://Hooks.Example:443/x y",
    "http://10.0.0.1:65535",
    "http://[fe80::1%25eth0]:9093/",
    "http://[::ffff:10.0.0.1]/",
    "http://xn--bcher-kva.example/x",
    "http://under_score/x",
    "http://h/pfad/ü?q=ü",
    "http://üser:pässword@h/",
]

# The chart's words for a host with a non-ASCII character: the sidecar encodes one with IDNA 2008 (httpx,
# the idna package), which a template cannot run, so the chart refuses them all and asks for the ASCII
# (xn--...) form. Before, it let through hosts IDNA refuses, and the sidecar exited 2 at start.
NON_ASCII_HOST = "a host with a non-ASCII character"
# non-ASCII hosts the sidecar refuses (IDNA does): the chart must refuse them (the gap)
NON_ASCII_HOSTS_THE_SIDECAR_REFUSES = ["http://xn--ü.example/CANARY", "http://a\u200db.example/CANARY",
                                       "http://ａｂｃ.example/CANARY", "http://\u0301a.example/CANARY",
                                       "http://a١.example/CANARY"]
# and some it takes: refused too, the chart cannot tell them apart; their ASCII form renders
NON_ASCII_HOSTS_THE_SIDECAR_TAKES = ["http://bücher.example/CANARY", "http://ß.de/CANARY",
                                     "http://BÜCHER.example:8080/CANARY", "http://a。b/CANARY"]

# Where the chart's verdict differs on purpose, always stricter, never looser: a non-ASCII host (above),
# and a port in ASCII digits only (Python's int() takes a sign, spaces, "_" and other digits too, the
# sidecar with it)
CHART_REFUSES_SIDECAR_ACCEPTS = ["http://host:+80/", "http://host: 8080/", "http://host:80_80/", "http://host:８０/"]


def _corpus() -> list[str]:
    """The cases above and URLs assembled at random (seeded) from the parts httpx and the sidecar tell
    apart: schemes, credentials, hosts (names, IPv4, IPv6, brackets, odd characters) and ports."""
    schemes = ["http", "https", "HTTP", "Https", "ftp", "", "http:", "httpx"]
    seps = ["://", ":", ":/", ":///", "//"]
    userinfo = ["", "u@", "u:p@", "u:p@x@", "@", ":@"]
    hosts = ["h", "host.example", "a-b.c", "-a", "a-", "a.", ".a", "a..b", "_a", "a_b", "A.B", "1.2.3.4",
             "255.255.255.255", "256.0.0.0", "01.2.3.4", "1.2.3", "1.2.3.4.5", "0.0.0.0", "[::1]", "[::]",
             "[1:2:3:4:5:6:7:8]", "[1:2:3:4:5:6:7:8:9]", "[1::2::3]", "[::ffff:1.2.3.4]", "[::ffff:1.2.3.04]",
             "[1:2:3:4:5:6:7::]", "[::2:3:4:5:6:7:8]", "[1:2:3:4::5:6:7:8]", "[fe80::1%eth0]", "[fe80::1%]",
             "[::1", "::1", "[12345::]", "[g::]", "a b", "a~b", "a%41", "a!b", "bücher", "ü", "", "a\tb",
             "a\\b", "[::1]x", "xn--ü", "xn--bcher-kva", "ß", "ａ", "a。b", "a\u200db", "ü b", "ü!", "ü_a", "-ü",
             "ü.", "[fe80::1%ü]", "١٢٣"]
    ports = ["", ":", ":80", ":443", ":0", ":1", ":65535", ":65536", ":99999", ":00080", ":8o", ":-1",
             ":99999999999999999999999", ":000000000000000001", ":80:81", "80"]
    tails = ["", "/", "/p/CANARY", "?q", "#f", "/a b", "/ü"]
    rng = random.Random(20261128)
    # mostly http(s)://, for the hosts and ports to be reached
    assembled = {(rng.choice(schemes) + rng.choice(seps) if rng.random() < 0.2 else rng.choice(schemes[:4]) + "://")
                 + rng.choice(userinfo) + rng.choice(hosts) + rng.choice(ports) + rng.choice(tails)
                 for _ in range(3000)}
    return [*dict.fromkeys([""] + [url for url, _ in BAD] + GOOD + sorted(assembled)
                           + NON_ASCII_HOSTS_THE_SIDECAR_REFUSES + NON_ASCII_HOSTS_THE_SIDECAR_TAKES
                           + CHART_REFUSES_SIDECAR_ACCEPTS)]


def ascii_form(url: str) -> str:
    """The URL as the sidecar sends it: its host in IDNA's ASCII form (xn--...), the rest %-encoded."""
    return str(httpx.URL(url))


def chart_problems(helm: Helm, chart: Path, tmp_path: Path, urls: list[str]) -> list[str]:
    """pathwatch.httpUrlProblem of each URL, from one render of a parent chart holding pathwatch (named
    templates are shared with the parent): the chart's own check, run by the real helm."""
    parent = tmp_path / "parent"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text("apiVersion: v2\nname: parent\nversion: 0.1.0\n")
    shutil.copytree(chart, parent / "charts" / "pathwatch", symlinks=False)
    (parent / "templates" / "verdicts.yaml").write_text(
        "{{- $problems := list -}}\n"
        "{{- range .Values.urls }}{{ $problems = append $problems (include \"pathwatch.httpUrlProblem\" .) }}{{ end -}}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: verdicts}\n"
        "data: {problems: {{ $problems | toJson | quote }}}\n")
    values = tmp_path / "urls.json"   # JSON: each string reaches helm exactly
    values.write_text(json.dumps({"urls": urls}))
    rendered = helm.run("template", "p", parent, "--values", values, "--show-only", "templates/verdicts.yaml")
    problems = json.loads(yaml.safe_load(rendered.stdout)["data"]["problems"])
    assert len(problems) == len(urls)
    return problems


def test_the_chart_refuses_exactly_the_urls_the_sidecar_refuses(helm: Helm, chart: Path, tmp_path: Path) -> None:
    """Equal verdicts, but where the chart is stricter on purpose: never looser (a URL the chart renders
    and the sidecar refuses holds the pod); stricter only for a non-ASCII host, whose ASCII form then
    renders, and the listed ports."""
    urls = _corpus()
    refused_by_the_sidecar = {url for url in urls if sidecar_refuses(url)}
    # what the chart's message asks for, for each non-ASCII host the sidecar takes (in the same render)
    ascii_forms = {url: ascii_form(url) for url in urls
                   if url not in refused_by_the_sidecar and not (urlsplit(url).hostname or "").isascii()}
    asked = [*dict.fromkeys(ascii_forms.values())]
    verdicts = chart_problems(helm, chart, tmp_path, urls + asked)
    problems = dict(zip(urls, verdicts))
    assert len(refused_by_the_sidecar) > 300 and len(urls) - len(refused_by_the_sidecar) > 100   # both sides
    assert problems[""] == "no URL" and all(problems[url] for url in CHART_REFUSES_SIDECAR_ACCEPTS)
    assert not any(map(sidecar_refuses, CHART_REFUSES_SIDECAR_ACCEPTS))
    assert all(map(sidecar_refuses, NON_ASCII_HOSTS_THE_SIDECAR_REFUSES))
    assert not any(map(sidecar_refuses, NON_ASCII_HOSTS_THE_SIDECAR_TAKES))

    looser = {url: "accepted" for url in urls if not problems[url] and url in refused_by_the_sidecar}
    assert not looser, f"the chart renders URLs the sidecar refuses at start (exit 2): {looser}"
    stricter = {url: problems[url] for url in urls if problems[url] and url not in refused_by_the_sidecar
                and url not in ("", *CHART_REFUSES_SIDECAR_ACCEPTS)}
    differ = {url: why for url, why in stricter.items() if why != NON_ASCII_HOST or url not in ascii_forms}
    assert not differ, f"the chart refuses URLs the sidecar takes, not for a non-ASCII host: {differ}"
    assert set(NON_ASCII_HOSTS_THE_SIDECAR_TAKES) <= stricter.keys() and len(stricter) > 50
    assert all(problems[url] == NON_ASCII_HOST for url in NON_ASCII_HOSTS_THE_SIDECAR_REFUSES)
    assert all(url.isascii() and not sidecar_refuses(url) for url in asked)
    not_taken = {url: why for url, why in zip(asked, verdicts[len(urls):]) if why}
    assert not not_taken, f"the ASCII form the chart asks for is refused too: {not_taken}"


# the keys an alerting URL is given in: (how to set it, the key a refusal names)
KEYS = [
    ({"config": {"alerting": {"webhook_url": "URL"}}}, "config.alerting.webhook_url"),
    ({"config": {"alerting": {"alertmanager_url": "URL"}}}, "config.alerting.alertmanager_url"),
    ({"config": {"alerting": {"external_url": "URL"}}}, "config.alerting.external_url"),
    ({"config": {"alerting": {"alertmanager_url": "http://am-0:9093", "alertmanager_peers": ["http://am-1:9093", "URL"]}}},
     "config.alerting.alertmanager_peers[1]"),
    ({"secrets": {"webhookUrl": "URL"}}, "secrets.webhookUrl"),
]


def _values(template: dict, url: str) -> dict:
    return json.loads(json.dumps(template).replace('"URL"', json.dumps(url)))


@pytest.mark.parametrize(("values", "key"), KEYS, ids=[key for _, key in KEYS])
@pytest.mark.parametrize(("url", "why"), BAD, ids=[why for _, why in BAD])
def test_a_url_the_sidecar_refuses_is_refused_at_render_without_the_url(helm: Helm, chart: Path, tmp_path: Path,
                                                                      values: dict, key: str, url: str,
                                                                      why: str) -> None:
    if key == "secrets.webhookUrl" and url.endswith("\n"):
        pytest.skip("the sidecar strips the variable's surrounding whitespace: tested below")
    assert sidecar_refuses(url), why
    given = tmp_path / "values.json"   # JSON: the string reaches helm exactly
    given.write_text(json.dumps(_values(values, url)))
    rendered = helm.run("template", "pw", chart, "--values", given, check=False)
    assert_refused_without_the_value(rendered, key, url)
    assert "the sidecar would refuse it at start" in rendered.stderr


@pytest.mark.parametrize(("values", "key"), KEYS, ids=[key for _, key in KEYS])
def test_a_url_the_sidecar_takes_renders(helm: Helm, chart: Path, tmp_path: Path, values: dict, key: str) -> None:
    given = tmp_path / "values.json"
    for url in GOOD:
        assert not sidecar_refuses(url), url
        given.write_text(json.dumps(_values(values, url)))
        rendered = helm.run("template", "pw", chart, "--values", given, check=False)
        assert rendered.returncode == 0, (url, rendered.stderr)


@pytest.mark.parametrize(("values", "key"), KEYS, ids=[key for _, key in KEYS])
def test_a_non_ascii_host_is_refused_at_render_asking_for_its_ascii_form(helm: Helm, chart: Path, tmp_path: Path,
                                                                        values: dict, key: str) -> None:
    """A non-ASCII host is refused, whether IDNA (the sidecar) would take it or not, naming the key and
    asking for the host's ASCII form, never quoting the URL; that form renders."""
    given = tmp_path / "values.json"
    for url in (NON_ASCII_HOSTS_THE_SIDECAR_REFUSES[0], NON_ASCII_HOSTS_THE_SIDECAR_TAKES[0]):
        given.write_text(json.dumps(_values(values, url)))
        rendered = helm.run("template", "pw", chart, "--values", given, check=False)
        assert_refused_without_the_value(rendered, key, url)
        assert f"got {NON_ASCII_HOST}; " in rendered.stderr
        assert "give the host in its ASCII (IDNA, xn--...) form" in rendered.stderr
    given.write_text(json.dumps(_values(values, ascii_form(NON_ASCII_HOSTS_THE_SIDECAR_TAKES[0]))))
    rendered = helm.run("template", "pw", chart, "--values", given, check=False)
    assert rendered.returncode == 0, rendered.stderr


def test_the_secrets_webhook_url_is_checked_as_the_sidecar_reads_it(helm: Helm, chart: Path, tmp_path: Path) -> None:
    """The sidecar strips PATHWATCH_WEBHOOK_URL's surrounding whitespace (a file given with --set-file ends
    in a line break), then checks it: so does the chart; whitespace only is refused."""
    given = tmp_path / "values.json"
    given.write_text(json.dumps({"secrets": {"webhookUrl": " https://hooks.example/services/X\n"}}))
    assert helm.run("template", "pw", chart, "--values", given, check=False).returncode == 0
    for url in (" \n", "https://:80/CANARY\n"):
        given.write_text(json.dumps({"secrets": {"webhookUrl": url}}))
        assert_refused_without_the_value(helm.run("template", "pw", chart, "--values", given, check=False),
                                         "secrets.webhookUrl", url)
