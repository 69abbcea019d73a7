"""Alertmanager's credentials in the chart: config.alerting.alertmanager_username +
alertmanager_password_env (basic auth) or alertmanager_bearer_token_env, each *_env naming a variable of
the sidecar container.

The sidecar refuses a bad combination at start (exit 2), which in sidecar mode (a native sidecar init
container) holds the backend's pod from starting: the chart refuses at render what the sidecar would
refuse, naming the keys, never a URL or a secret. Each refusal is checked against the sidecar's own
parse (``parse_config`` + ``from_environment`` on the env the container would get), so that the chart
is never looser than the sidecar."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, _check_http_url, _has_userinfo, parse_config
from tests.helm.charting import Helm, by_kind
from tests.helm.test_alerting_urls import _corpus
from tests.helm.test_values_schema import assert_refused_without_the_value

AM = "http://am-0.monitoring.svc:9093"
PEER = "http://am-1.monitoring.svc:9093"
TOKEN = "token-one-0123456789"
# what the kubelet puts in a variable of valueFrom (a Secret of the user's): not empty
FROM_A_SECRET = "resolved-from-a-secret-ref"


def from_secret(name: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": "alertmanager-auth", "key": "secret"}}}


def sidecar_refusal(alerting: dict, extra_env: list[dict]) -> str | None:
    """The sidecar's verdict at start on this alerting section, with the env the container would get
    (the chart's PATHWATCH_API_TOKEN, then sidecar.extraEnv: an entry without value or valueFrom is an
    empty variable, the last entry of a name wins): its ConfigError's message, None when it starts."""
    environ = {"PATHWATCH_API_TOKEN": TOKEN}
    for item in extra_env:
        environ[item["name"]] = FROM_A_SECRET if "valueFrom" in item else item.get("value", "")
    try:
        parse_config({"alerting": alerting}).alerting.from_environment(environ)
    except ConfigError as exc:
        return str(exc)
    return None


def render(helm: Helm, tmp_path: Path, chart: Path, values: dict):
    path = tmp_path / "values.json"   # JSON: every string reaches helm exactly
    path.write_text(json.dumps({"secrets": {"apiToken": TOKEN}, **values}))
    return helm.run("template", "pw", chart, "--values", path, check=False)


BASIC = {"alertmanager_url": AM, "alertmanager_username": "pathwatch", "alertmanager_password_env": "AM_PASSWORD"}
BEARER = {"alertmanager_url": AM, "alertmanager_bearer_token_env": "AM_TOKEN"}

# (id, config.alerting, sidecar.extraEnv, what the chart's message names): each refused by the sidecar
REFUSED = [
    ("username without password_env", {"alertmanager_url": AM, "alertmanager_username": "pathwatch"},
     [from_secret("AM_PASSWORD")], "config.alerting.alertmanager_username is set without"),
    ("password_env without username", {"alertmanager_url": AM, "alertmanager_password_env": "AM_PASSWORD"},
     [from_secret("AM_PASSWORD")], "config.alerting.alertmanager_password_env is set without"),
    ("both kinds", {**BASIC, "alertmanager_bearer_token_env": "AM_TOKEN"},
     [from_secret("AM_PASSWORD"), from_secret("AM_TOKEN")], "are both set"),
    ("bearer without alertmanager_url", {"alertmanager_bearer_token_env": "AM_TOKEN"},
     [from_secret("AM_TOKEN")], "config.alerting.alertmanager_url is not set"),
    ("basic without alertmanager_url", {"alertmanager_username": "pathwatch", "alertmanager_password_env": "AM_PASSWORD"},
     [from_secret("AM_PASSWORD")], "config.alerting.alertmanager_url is not set"),
    ("user and password in alertmanager_url", {**BEARER, "alertmanager_url": "http://pathwatch:CANARY@am-0:9093"},
     [from_secret("AM_TOKEN")], "config.alerting.alertmanager_url holds credentials"),
    ("a user in alertmanager_url", {**BASIC, "alertmanager_url": "http://CANARY@am-0:9093/"},
     [from_secret("AM_PASSWORD")], "config.alerting.alertmanager_url holds credentials"),
    ("credentials in a peer", {**BASIC, "alertmanager_peers": [PEER, "https://u:CANARY@am-2:9093"]},
     [from_secret("AM_PASSWORD")], "config.alerting.alertmanager_peers[1] holds credentials"),
    ("bearer variable not set", BEARER, [], "config.alerting.alertmanager_bearer_token_env names the "
     "environment variable AM_TOKEN, which is neither in sidecar.extraEnv nor set by the chart"),
    ("password variable not set", BASIC, [from_secret("AM_TOKEN"), {"name": "OTHER", "value": "1"}],
     "config.alerting.alertmanager_password_env names the environment variable AM_PASSWORD, which is neither"),
    ("an empty literal value", BASIC, [{"name": "AM_PASSWORD", "value": ""}], "sidecar.extraEnv[0] (AM_PASSWORD"),
    ("neither value nor valueFrom", BEARER, [{"name": "AM_TOKEN"}], "sidecar.extraEnv[0] (AM_TOKEN"),
    ("whitespace only", BASIC, [{"name": "OTHER", "value": "1"}, {"name": "AM_PASSWORD", "value": " \u00a0\n"}],
     "sidecar.extraEnv[1] (AM_PASSWORD"),
    ("the last entry of the name is empty", BEARER, [from_secret("AM_TOKEN"), {"name": "AM_TOKEN", "value": ""}],
     "sidecar.extraEnv[1] (AM_TOKEN"),
    ("a control character inside", BASIC, [{"name": "AM_PASSWORD", "value": "CAN\tARY"}],
     "sidecar.extraEnv[0] (AM_PASSWORD"),
    ("a non-ASCII bearer token", BEARER, [{"name": "AM_TOKEN", "value": "CANARY\u00fc"}],
     "sidecar.extraEnv[0] (AM_TOKEN"),
    ("a username with a colon", {**BASIC, "alertmanager_username": "path:watch"}, [from_secret("AM_PASSWORD")],
     "config.alerting.alertmanager_username is refused"),
    ("a username with a line break", {**BASIC, "alertmanager_username": "pathwatch\n"},
     [from_secret("AM_PASSWORD")], "config.alerting.alertmanager_username is refused"),
    ("a variable name with =", {**BEARER, "alertmanager_bearer_token_env": "AM=TOKEN"}, [from_secret("AM=TOKEN")],
     "config.alerting.alertmanager_bearer_token_env is refused"),
]


@pytest.mark.parametrize(("alerting", "extra_env", "named"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_credentials_the_sidecar_refuses_are_refused_at_render(helm: Helm, chart: Path, tmp_path: Path,
                                                               alerting: dict, extra_env: list[dict],
                                                               named: str) -> None:
    refusal = sidecar_refusal(alerting, extra_env)
    assert refusal is not None, "the sidecar takes it: not a case for the chart to refuse"
    assert "CANARY" not in refusal
    rendered = render(helm, tmp_path, chart, {"config": {"alerting": alerting}, "sidecar": {"extraEnv": extra_env}})
    assert_refused_without_the_value(rendered, named, "CANARY")
    assert "the sidecar" in rendered.stderr and "exit 2" in rendered.stderr


# (id, config.alerting, sidecar.extraEnv): each taken by the sidecar, so rendered by the chart
ACCEPTED = [
    ("basic auth from a Secret of yours", BASIC, [from_secret("AM_PASSWORD")]),
    ("a bearer token from a Secret of yours", {**BEARER, "alertmanager_peers": [PEER]}, [from_secret("AM_TOKEN")]),
    ("a literal bearer token with surrounding whitespace", BEARER, [{"name": "AM_TOKEN", "value": " t0ken\n"}]),
    ("a non-ASCII password", BASIC, [{"name": "AM_PASSWORD", "value": "p\u00e4sswort"}]),
    ("an empty userinfo", {**BASIC, "alertmanager_url": "http://@am-0:9093"}, [from_secret("AM_PASSWORD")]),
    ("an @ in the path", {**BEARER, "alertmanager_url": "http://am-0:9093/a@b"}, [from_secret("AM_TOKEN")]),
    ("the last entry of the name is set", BEARER, [{"name": "AM_TOKEN", "value": ""}, from_secret("AM_TOKEN")]),
    ("a variable the chart sets", {**BEARER, "alertmanager_bearer_token_env": "PATHWATCH_API_TOKEN"}, []),
    ("no credentials", {"alertmanager_url": "http://u:p@am-0:9093"}, []),
]


@pytest.mark.parametrize(("alerting", "extra_env"), [case[1:] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED])
@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_credentials_the_sidecar_takes_render(helm: Helm, chart: Path, tmp_path: Path, mode: str,
                                              alerting: dict, extra_env: list[dict]) -> None:
    assert sidecar_refusal(alerting, extra_env) is None
    rendered = render(helm, tmp_path, chart, {"mode": mode, "demoBackend": {"enabled": True},
                                              "config": {"alerting": alerting}, "sidecar": {"extraEnv": extra_env}})
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    config_map = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-config"))
    config = yaml.safe_load(config_map["data"]["sidecar.yaml"])
    assert config["alerting"] == alerting
    # the rendered config itself, as the sidecar reads it, with the container's env
    environ = {"PATHWATCH_API_TOKEN": TOKEN}
    environ.update({item["name"]: FROM_A_SECRET if "valueFrom" in item else item.get("value", "")
                    for item in extra_env})
    parse_config(config).alerting.from_environment(environ)


def test_the_chart_reads_credentials_in_a_url_as_the_sidecar_does(helm: Helm, chart: Path, tmp_path: Path) -> None:
    """pathwatch.httpUrlHasUserinfo against the sidecar's _has_userinfo (httpx's userinfo), on every URL
    of the alerting URL corpus both take (one render of a parent chart holding pathwatch)."""
    urls = [url for url in _corpus() if _valid(url)]
    assert len(urls) > 100 and sum(map(_has_userinfo, urls)) > 30
    parent = tmp_path / "parent"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text("apiVersion: v2\nname: parent\nversion: 0.1.0\n")
    shutil.copytree(chart, parent / "charts" / "pathwatch", symlinks=False)
    (parent / "templates" / "verdicts.yaml").write_text(
        "{{- $verdicts := list -}}\n"
        "{{- range .Values.urls }}{{ $verdicts = append $verdicts (include \"pathwatch.httpUrlHasUserinfo\" .) }}{{ end -}}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: verdicts}\n"
        "data: {verdicts: {{ $verdicts | toJson | quote }}}\n")
    values = tmp_path / "urls.json"
    values.write_text(json.dumps({"urls": urls}))
    rendered = helm.run("template", "p", parent, "--values", values, "--show-only", "templates/verdicts.yaml")
    verdicts = json.loads(yaml.safe_load(rendered.stdout)["data"]["verdicts"])
    differ = {url: verdict for url, verdict in zip(urls, verdicts, strict=True)
              if bool(verdict) != _has_userinfo(url)}
    assert not differ


def _valid(url: str) -> bool:
    try:
        _check_http_url(url)
    except ValueError:
        return False
    return bool(url)
