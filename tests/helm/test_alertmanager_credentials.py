"""Alertmanager's credentials in the chart: config.alerting.alertmanager_username +
alertmanager_password_env (basic auth) or alertmanager_bearer_token_env, each *_env naming a variable of
the sidecar container.

The sidecar refuses a bad combination at start (exit 2), which in sidecar mode (a native sidecar init
container) holds the backend's pod from starting: the chart refuses at render what the sidecar would
refuse, naming the keys, never a URL or a secret. Each refusal is checked against the sidecar's own
parse (``parse_config`` + ``from_environment`` on the env the container would get), so that the chart
is never looser than the sidecar."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, _check_http_url, _has_userinfo, parse_config
from tests.helm.charting import (Helm, by_kind, one, parse_documents, sidecar_config, sidecar_env,
                                 upgrade_reusing_old_values)
from tests.helm.test_secret_checksums import pod_annotations, salt_of, salted
from tests.helm.test_alerting_urls import _corpus
from tests.helm.test_values_schema import assert_refused_without_the_value

AM = "http://am-0.monitoring.svc:9093"
PEER = "http://am-1.monitoring.svc:9093"
TOKEN = "token-one-0123456789"
# what the kubelet puts in a variable of valueFrom (a Secret of the user's): not empty
FROM_A_SECRET = "resolved-from-a-secret-ref"


def from_secret(name: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": "alertmanager-auth", "key": "secret"}}}


def sidecar_refusal(alerting: dict, extra_env: list[dict], chart_env: dict[str, str] | None = None) -> str | None:
    """The sidecar's verdict at start on this alerting section, with the env the container would get
    (the chart's PATHWATCH_API_TOKEN and ``chart_env``, then sidecar.extraEnv: an entry without value or
    valueFrom is an empty variable, the last entry of a name wins): its ConfigError's message, None when
    it starts."""
    environ = {"PATHWATCH_API_TOKEN": TOKEN, **(chart_env or {})}
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
    ("a bearer token with its scheme", BEARER, [{"name": "AM_TOKEN", "value": "Bearer CANARY"}],
     "it holds a space: it begins with the scheme 'Bearer'"),
    ("a bearer token with a space", BEARER, [{"name": "AM_TOKEN", "value": "CAN ARY"}],
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


@pytest.mark.parametrize(("alerting", "given"), [
    ({**BEARER, "alertmanager_bearer_token_env": "eyJhbGciOi.CANARY.c2ln"}, "alertmanager_bearer_token_env"),
    ({**BASIC, "alertmanager_password_env": "CANARY-p@ss"}, "alertmanager_password_env"),
], ids=["a bearer token", "a password"])
def test_a_secret_given_in_place_of_the_variable_s_name_is_not_quoted(helm: Helm, chart: Path, tmp_path: Path,
                                                                      alerting: dict, given: str) -> None:
    """A *_env key holds a variable's name; the secret itself written there is not set as a variable, and
    the chart refuses it as the sidecar does ("is not set") without quoting it in its message (a name
    of letters, digits and "_" only is quoted: test_credentials_the_sidecar_refuses_are_refused_at_render)."""
    assert sidecar_refusal(alerting, []) is not None
    rendered = render(helm, tmp_path, chart, {"config": {"alerting": alerting}})
    assert_refused_without_the_value(rendered, f"config.alerting.{given} names an environment variable "
                                     "(the name is not shown here", "CANARY")


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
    config = sidecar_config(docs)
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


# --- secrets.alertmanagerPassword / alertmanagerBearerToken: kept in the chart's Secret, as the webhook URL

SECRET = "XXXXAMSECRETXXXX"
SALT = "salt-0123456789abcdef"
BACKEND, GATEWAY = "pw-pathwatch-demo-backend", "pw-pathwatch"
# kind -> (the values' key, the Secret's default key, the variable, the config key, config.alerting beside it)
KINDS = {
    "password": ("alertmanagerPassword", "alertmanager-password", "PATHWATCH_ALERTMANAGER_PASSWORD",
                 "alertmanager_password_env", {"alertmanager_url": AM, "alertmanager_username": "pathwatch"}),
    "bearer": ("alertmanagerBearerToken", "alertmanager-bearer-token", "PATHWATCH_ALERTMANAGER_BEARER_TOKEN",
               "alertmanager_bearer_token_env", {"alertmanager_url": AM}),
}


def render_docs(helm: Helm, chart: Path, tmp_path: Path, values: dict, mode: str = "sidecar") -> tuple[str, list[dict]]:
    rendered = render(helm, tmp_path, chart, {"mode": mode, "demoBackend": {"enabled": True}, **values})
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout, parse_documents(rendered.stdout)



@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_the_secret_is_in_the_secret_and_the_env_never_in_clear(helm: Helm, chart: Path, tmp_path: Path,
                                                                mode: str, kind: str) -> None:
    value_key, secret_key, variable, config_key, alerting = KINDS[kind]
    text, docs = render_docs(helm, chart, tmp_path, {"config": {"alerting": alerting},
                                                     "secrets": {"apiToken": TOKEN, value_key: SECRET}}, mode)
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"][secret_key]).decode() == SECRET
    assert SECRET not in text  # base64 in the Secret; nowhere in clear: no ConfigMap, no annotation
    assert sidecar_config(docs)["alerting"] == {**alerting, config_key: variable}
    assert sidecar_env(docs)[variable] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": secret_key}}
    annotations = pod_annotations(docs)
    sidecar_pod = BACKEND if mode == "sidecar" else GATEWAY
    expected = [SECRET, ""] if kind == "password" else ["", SECRET]
    assert annotations[sidecar_pod]["checksum/pathwatch-alertmanager-credentials"] == salted(salt_of(docs), *expected)
    assert hashlib.sha256(SECRET.encode()).hexdigest() not in text and salted("", *expected) not in text
    if mode == "gateway":  # the backend never reads it
        assert "checksum/pathwatch-alertmanager-credentials" not in annotations[BACKEND]
    # the sidecar takes the rendered config with the variable as the kubelet resolves it
    assert sidecar_refusal(sidecar_config(docs)["alerting"], [], {variable: SECRET}) is None


def test_without_the_secrets_nothing_of_them_is_rendered(helm: Helm, chart: Path, tmp_path: Path) -> None:
    text, docs = render_docs(helm, chart, tmp_path, {})
    assert not {"alertmanager-password", "alertmanager-bearer-token"} & one(docs, "Secret")["data"].keys()
    assert "PATHWATCH_ALERTMANAGER" not in text and "alertmanager-credentials" not in text


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_a_changed_secret_rolls_the_pods_running_the_sidecar(helm: Helm, chart: Path, tmp_path: Path,
                                                             mode: str, kind: str) -> None:
    value_key, _, _, _, alerting = KINDS[kind]

    def pod_templates(value: str) -> dict[str, dict]:
        _, docs = render_docs(helm, chart, tmp_path, {"config": {"alerting": alerting}, "secrets": {
            "apiToken": TOKEN, "checksumSalt": SALT, value_key: value}}, mode)
        return {doc["metadata"]["name"]: doc["spec"]["template"]
                for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}

    first = pod_templates(SECRET)
    assert pod_templates(SECRET) == first
    after = pod_templates("another-secret")
    assert {name for name, template in first.items() if after[name] != template} == {
        BACKEND if mode == "sidecar" else GATEWAY}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_existing_secret_s_key_is_wired_and_rolled_by_its_owner(helm: Helm, chart: Path, tmp_path: Path,
                                                                   kind: str) -> None:
    value_key, _, variable, config_key, alerting = KINDS[kind]
    text, docs = render_docs(helm, chart, tmp_path, {"config": {"alerting": alerting}, "secrets": {
        "existingSecret": "mine", f"{value_key}Key": "am-secret"}})
    assert by_kind(docs, "Secret") == []
    assert sidecar_env(docs)[variable] == {"secretKeyRef": {"name": "mine", "key": "am-secret"}}
    assert sidecar_config(docs)["alerting"] == {**alerting, config_key: variable}
    assert "alertmanager-credentials" not in text  # that Secret is its owner's to roll
    # no key named: that Secret holds no credential, and the sidecar is not told to read one
    _, docs = render_docs(helm, chart, tmp_path, {"secrets": {"existingSecret": "mine"}})
    assert variable not in sidecar_env(docs) and config_key not in sidecar_config(docs).get("alerting", {})


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_chart_s_secret_takes_a_key_of_its_own(helm: Helm, chart: Path, tmp_path: Path, kind: str) -> None:
    value_key, _, variable, _, alerting = KINDS[kind]
    values = {"config": {"alerting": alerting}, "secrets": {"apiToken": TOKEN, value_key: SECRET, f"{value_key}Key": "am"}}
    _, docs = render_docs(helm, chart, tmp_path, values)
    assert base64.b64decode(one(docs, "Secret")["data"]["am"]).decode() == SECRET
    assert sidecar_env(docs)[variable]["secretKeyRef"]["key"] == "am"
    for taken in ("api-token", "hmac-key", "checksum-salt", "webhook-url"):
        values["secrets"].update({f"{value_key}Key": taken, "webhookUrl": "https://hooks.example/x"})
        refused = render(helm, tmp_path, chart, values)
        assert_refused_without_the_value(refused, f"secrets.{value_key}Key", SECRET)


# (id, values, what the message names, the sidecar's view (config.alerting, env) or None: a conflict of
# the chart's own values, which the chart resolves one way or the other and refuses to guess)
SECRET_REFUSED = [
    ("whitespace only password", {"config": {"alerting": KINDS["password"][4]}, "secrets": {"alertmanagerPassword": " \n"}},
     "secrets.alertmanagerPassword", "password"),
    ("a control character in the password", {"config": {"alerting": KINDS["password"][4]},
                                              "secrets": {"alertmanagerPassword": "CAN\u0000ARY"}},
     "secrets.alertmanagerPassword", "password"),
    ("a non-ASCII bearer token", {"config": {"alerting": KINDS["bearer"][4]},
                                  "secrets": {"alertmanagerBearerToken": "CANARY\u00e9"}},
     "secrets.alertmanagerBearerToken", "bearer"),
    ("a bearer token with its scheme", {"config": {"alerting": KINDS["bearer"][4]},
                                        "secrets": {"alertmanagerBearerToken": "bearer CANARY"}},
     "secrets.alertmanagerBearerToken is refused (the value is not shown here): it holds a space: it "
     "begins with the scheme 'Bearer'", "bearer"),
    ("a password without a username", {"config": {"alerting": {"alertmanager_url": AM}},
                                       "secrets": {"alertmanagerPassword": "CANARY-pw"}},
     "secrets.alertmanagerPassword is set without config.alerting.alertmanager_username", "password"),
    ("both kinds", {"config": {"alerting": KINDS["password"][4]},
                    "secrets": {"alertmanagerPassword": "CANARY-pw", "alertmanagerBearerToken": "CANARY-tok"}},
     "config.alerting.alertmanager_username (with secrets.alertmanagerPassword) and "
     "secrets.alertmanagerBearerToken are both set", "both"),
    ("no alertmanager_url", {"secrets": {"alertmanagerBearerToken": "CANARY-tok"}},
     "secrets.alertmanagerBearerToken give Alertmanager's credentials, but config.alerting.alertmanager_url", "bearer"),
    ("credentials in the url too", {"config": {"alerting": {"alertmanager_url": "http://u:CANARY@am:9093"}},
                                    "secrets": {"alertmanagerBearerToken": "CANARY-tok"}},
     "config.alerting.alertmanager_url holds credentials", "bearer"),
    ("the existing-secret's key without a username", {"config": {"alerting": {"alertmanager_url": AM}}, "secrets": {
        "existingSecret": "mine", "alertmanagerPasswordKey": "am"}},
     'secrets.alertmanagerPasswordKey ("am" of secrets.existingSecret) is set without', "password"),
    # conflicts of the chart's values: the sidecar would not see them
    ("a password with existingSecret", {"config": {"alerting": KINDS["password"][4]},
                                        "secrets": {"existingSecret": "mine", "alertmanagerPassword": "CANARY-pw"}},
     "secrets.alertmanagerPasswordKey", None),
    ("config password_env beside the secret", {"config": {"alerting": {**KINDS["password"][4], "alertmanager_password_env": "MINE"}},
                                               "secrets": {"alertmanagerPassword": "CANARY-pw"},
                                               "sidecar": {"extraEnv": [from_secret("MINE")]}},
     "config.alerting.alertmanager_password_env is set, but with secrets.alertmanagerPassword", None),
    ("config bearer_token_env beside the existing secret's key",
     {"config": {"alerting": {**KINDS["bearer"][4], "alertmanager_bearer_token_env": "MINE"}},
      "secrets": {"existingSecret": "mine", "alertmanagerBearerTokenKey": "tok"}, "sidecar": {"extraEnv": [from_secret("MINE")]}},
     "config.alerting.alertmanager_bearer_token_env is set, but with secrets.alertmanagerBearerTokenKey", None),
    ("extraEnv repeating the password's variable", {"config": {"alerting": KINDS["password"][4]},
                                                    "secrets": {"alertmanagerPassword": "CANARY-pw"},
                                                    "sidecar": {"extraEnv": [{"name": "PATHWATCH_ALERTMANAGER_PASSWORD",
                                                                              "value": "CANARY-other"}]}},
     "sidecar.extraEnv[0] sets PATHWATCH_ALERTMANAGER_PASSWORD", None),
    ("extraEnv repeating the bearer token's variable",
     {"config": {"alerting": KINDS["bearer"][4]}, "secrets": {"existingSecret": "mine", "alertmanagerBearerTokenKey": "tok"},
      "sidecar": {"extraEnv": [from_secret("PATHWATCH_ALERTMANAGER_BEARER_TOKEN")]}},
     "sidecar.extraEnv[0] sets PATHWATCH_ALERTMANAGER_BEARER_TOKEN", None),
]


def _as_the_sidecar_gets_it(values: dict, kinds: str) -> tuple[dict, dict[str, str]]:
    """The alerting section and the chart's env the sidecar would get from these values, were they
    rendered: the chart sets the *_env keys to its variables, filled from the Secret."""
    alerting = dict(values.get("config", {}).get("alerting", {}))
    env = {}
    for kind in ("password", "bearer"):
        value_key, _, variable, config_key, _ = KINDS[kind]
        secrets = values["secrets"]
        if kinds in (kind, "both"):
            if value_key in secrets or f"{value_key}Key" in secrets:
                alerting[config_key] = variable
                env[variable] = secrets.get(value_key, FROM_A_SECRET)
    return alerting, env


@pytest.mark.parametrize(("values", "named", "kinds"), [case[1:] for case in SECRET_REFUSED],
                         ids=[case[0] for case in SECRET_REFUSED])
def test_secrets_the_sidecar_or_the_chart_refuses_are_refused_at_render_without_the_value(
        helm: Helm, chart: Path, tmp_path: Path, values: dict, named: str, kinds: str | None) -> None:
    if kinds is not None:  # the chart is never looser than the sidecar
        alerting, env = _as_the_sidecar_gets_it(values, kinds)
        refusal = sidecar_refusal(alerting, values.get("sidecar", {}).get("extraEnv", []), env)
        assert refusal is not None and "CANARY" not in refusal
    if "existingSecret" not in values["secrets"]:  # its Secret holds the token (one given is refused)
        values = {**values, "secrets": {"apiToken": TOKEN, **values["secrets"]}}
    refused = render(helm, tmp_path, chart, values)
    assert_refused_without_the_value(refused, named, "CANARY")


@pytest.mark.parametrize("config, sets", [
    ({"demoBackend": {"enabled": True}}, {}),
    ({"demoBackend": {"enabled": True}, "secrets": {"existingSecret": "mine"}}, {}),
    ({"demoBackend": {"enabled": True}, "config": {"alerting": KINDS["password"][4]}},
     {"alertmanagerPassword": SECRET}),
], ids=["sidecar", "existing-secret", "password-set"])
def test_an_upgrade_reusing_the_values_of_a_release_from_before_the_credential_keys_renders(
        helm: Helm, chart: Path, tmp_path: Path, config: dict, sets: dict) -> None:
    """helm upgrade --reuse-values renders with the values of the release's chart, in which the new
    secrets.alertmanager* keys are missing (nil): nothing of them renders (no "<no value>" key, no
    variable the sidecar is told to read), and one set in the upgrade is wired
    (test_webhook_url_secret.py has the mechanism)."""
    args = [arg for key, value in sets.items() for arg in ("--set", f"secrets.{key}={value}")]
    _, docs = upgrade_reusing_old_values(
        helm, chart, tmp_path, config, ("checksumSalt", "webhookUrl", "webhookUrlKey", "alertmanagerPassword",
                                        "alertmanagerPasswordKey", "alertmanagerBearerToken",
                                        "alertmanagerBearerTokenKey"), args)
    env = sidecar_env(docs)
    if sets:
        assert env["PATHWATCH_ALERTMANAGER_PASSWORD"] == {
            "secretKeyRef": {"name": GATEWAY, "key": "alertmanager-password"}}
        assert sidecar_config(docs)["alerting"]["alertmanager_password_env"] == "PATHWATCH_ALERTMANAGER_PASSWORD"
        assert base64.b64decode(one(docs, "Secret")["data"]["alertmanager-password"]).decode() == SECRET
    else:
        assert not [name for name in env if name.startswith("PATHWATCH_ALERTMANAGER")]
        assert "alerting" not in sidecar_config(docs)


@pytest.mark.parametrize("key", ["webhookUrlKey", "alertmanagerPasswordKey", "alertmanagerBearerTokenKey"])
@pytest.mark.parametrize("value", ["S3cr3t!pw-CANARY", "https://hooks.slack.com/services/T0/B0/CANARYSECRET",
                                   "a" * 254])
def test_a_secret_written_into_a_key_value_is_refused_without_quoting_it(helm: Helm, chart: Path,
                                                                         key: str, value: str) -> None:
    """A Secret key's value is checked by pathwatch.validate, not by a schema pattern, whose refusal
    helm 4 prints with the value: a password or a webhook URL given there by mistake."""
    rendered = helm.run("template", "pw", chart, "--set-string", f"secrets.{key}={value}", check=False)
    assert_refused_without_the_value(rendered, f"secrets.{key}", value)
    assert "must name a key of a Secret" in rendered.stderr


@pytest.mark.parametrize("key", ["webhookUrlKey", "alertmanagerPasswordKey", "alertmanagerBearerTokenKey"])
def test_a_secret_key_name_renders(helm: Helm, chart: Path, key: str) -> None:
    rendered = helm.run("template", "pw", chart, "--set-string", f"secrets.{key}=am_pw-2.key", check=False)
    assert rendered.returncode == 0, rendered.stderr
