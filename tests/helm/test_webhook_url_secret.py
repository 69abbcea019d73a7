"""The alert webhook's URL through the chart's Secret (secrets.webhookUrl), not the ConfigMap.

A webhook URL's path is often its secret (Slack: /services/T0/B0/TOKEN). config.alerting.webhook_url
renders it in clear into the sidecar's ConfigMap, which more people can read than Secrets (and the
checksum/pathwatch-config annotation is a bare SHA-256 over it). secrets.webhookUrl keeps it in the
Secret, hands it to the sidecar as PATHWATCH_WEBHOOK_URL (alerting.webhook_url_env), and rolls the
pods running the sidecar through a salted checksum, as the API token does."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from tests.helm.charting import (Helm, all_containers, by_kind, one, parse_documents, pod_spec, sidecar_config,
                                 sidecar_env, upgrade_reusing_old_values)
from tests.helm.test_secret_checksums import pod_annotations, salt_of, salted
from tests.helm.test_values_schema import assert_refused_without_the_value

SECRET = "XXXXWEBHOOKSECRETXXXX"
URL = f"https://hooks.slack.com/services/T0/B0/{SECRET}"
SALT = "salt-0123456789abcdef"
BACKEND, GATEWAY = "pw-pathwatch-demo-backend", "pw-pathwatch"


def render(helm: Helm, chart: Path, *sets: str, mode: str = "sidecar") -> tuple[str, list[dict]]:
    # a token of the values, unless the pods read secrets.existingSecret's (one given is refused)
    token = () if any(s.startswith("secrets.existingSecret=") for s in sets) else (
        "secrets.apiToken=token-one-0123456789",)
    text = helm.template_text(chart, sets=(f"mode={mode}", "demoBackend.enabled=true", *token, *sets))
    return text, parse_documents(text)



@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_the_webhook_url_is_in_the_secret_and_the_env_not_in_the_config_map(helm: Helm, chart: Path,
                                                                             mode: str) -> None:
    text, docs = render(helm, chart, f"secrets.webhookUrl={URL}", mode=mode)
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["webhook-url"]).decode() == URL
    assert SECRET not in text  # base64 in the Secret; nowhere in clear, no ConfigMap, no annotation
    alerting = sidecar_config(docs)["alerting"]
    assert alerting == {"webhook_url_env": "PATHWATCH_WEBHOOK_URL"}
    assert sidecar_env(docs)["PATHWATCH_WEBHOOK_URL"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "webhook-url"}}
    sidecar_pod = BACKEND if mode == "sidecar" else GATEWAY
    annotations = pod_annotations(docs)
    assert annotations[sidecar_pod]["checksum/pathwatch-webhook-url"] == salted(salt_of(docs), URL)
    bare = hashlib.sha256(URL.encode()).hexdigest()
    assert bare not in text and salted("", URL) not in text
    if mode == "gateway":  # the backend never reads it
        assert "checksum/pathwatch-webhook-url" not in annotations[BACKEND]


def test_without_a_webhook_secret_nothing_of_it_is_rendered(helm: Helm, chart: Path) -> None:
    text, docs = render(helm, chart)
    assert "webhook-url" not in one(docs, "Secret")["data"]
    assert "PATHWATCH_WEBHOOK_URL" not in text and "webhook_url_env" not in text


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_a_changed_webhook_url_rolls_the_pods_running_the_sidecar(helm: Helm, chart: Path, mode: str) -> None:
    def pod_templates(url: str) -> dict[str, dict]:
        _, docs = render(helm, chart, f"secrets.webhookUrl={url}", f"secrets.checksumSalt={SALT}", mode=mode)
        return {doc["metadata"]["name"]: doc["spec"]["template"]
                for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}

    first = pod_templates(URL)
    assert pod_templates(URL) == first
    after = pod_templates(URL.replace(SECRET, "another-token"))
    rolled = {name for name, template in first.items() if after[name] != template}
    assert rolled == {BACKEND if mode == "sidecar" else GATEWAY}


def test_an_existing_secret_s_webhook_key_is_wired_and_rolled_by_its_owner(helm: Helm, chart: Path) -> None:
    text, docs = render(helm, chart, "secrets.existingSecret=mine", "secrets.webhookUrlKey=slack-url")
    assert by_kind(docs, "Secret") == []
    assert sidecar_env(docs)["PATHWATCH_WEBHOOK_URL"] == {"secretKeyRef": {"name": "mine", "key": "slack-url"}}
    assert sidecar_config(docs)["alerting"] == {"webhook_url_env": "PATHWATCH_WEBHOOK_URL"}
    assert "checksum/pathwatch-webhook-url" not in text  # a Secret of existingSecret is its owner's to roll
    # no key named: that Secret holds no webhook URL, and the sidecar is not told to read one
    text, docs = render(helm, chart, "secrets.existingSecret=mine")
    assert "PATHWATCH_WEBHOOK_URL" not in sidecar_env(docs) and "webhook_url_env" not in text


def test_the_chart_s_secret_takes_a_key_of_its_own(helm: Helm, chart: Path) -> None:
    _, docs = render(helm, chart, f"secrets.webhookUrl={URL}", "secrets.webhookUrlKey=slack")
    assert base64.b64decode(one(docs, "Secret")["data"]["slack"]).decode() == URL
    assert sidecar_env(docs)["PATHWATCH_WEBHOOK_URL"]["secretKeyRef"]["key"] == "slack"
    for taken in ("api-token", "hmac-key", "checksum-salt"):
        refused = helm.run("template", "pw", chart, "--set", f"secrets.webhookUrl={URL}",
                           "--set", f"secrets.webhookUrlKey={taken}", check=False)
        assert refused.returncode != 0 and "secrets.webhookUrlKey" in refused.stderr
        assert SECRET not in refused.stdout + refused.stderr


@pytest.mark.parametrize("values, key", [
    ({"secrets": {"webhookUrl": f"hooks.slack.com/services/T0/B0/{SECRET}"}}, "secrets.webhookUrl"),
    ({"secrets": {"webhookUrl": f"{URL}\nx"}}, "secrets.webhookUrl"),
    ({"secrets": {"webhookUrl": URL, "existingSecret": "mine"}}, "secrets.webhookUrlKey"),
    ({"secrets": {"webhookUrl": URL}, "config": {"alerting": {"webhook_url": URL}}},
     "config.alerting.webhook_url and secrets.webhookUrl"),
    ({"secrets": {"existingSecret": "mine", "webhookUrlKey": "k"}, "config": {"alerting": {"webhook_url": URL}}},
     "config.alerting.webhook_url and secrets.webhookUrlKey"),
    ({"secrets": {"webhookUrl": URL}, "config": {"alerting": {"webhook_url_env": "MINE"}}},
     "config.alerting.webhook_url_env"),
])
def test_a_webhook_url_the_sidecar_would_refuse_is_refused_at_render_without_the_url(
        helm: Helm, chart: Path, tmp_path: Path, values: dict, key: str) -> None:
    path = tmp_path / "values.json"   # JSON: the string reaches helm exactly
    path.write_text(json.dumps(values))
    refused = helm.run("template", "pw", chart, "--values", path, check=False)
    assert_refused_without_the_value(refused, key, values["secrets"].get("webhookUrl", URL))
    assert SECRET not in refused.stdout + refused.stderr


def test_config_alerting_webhook_url_still_works(helm: Helm, chart: Path) -> None:
    _, docs = render(helm, chart, f"config.alerting.webhook_url={URL}")
    assert sidecar_config(docs)["alerting"] == {"webhook_url": URL}
    assert "PATHWATCH_WEBHOOK_URL" not in sidecar_env(docs)


NEW_SECRET_KEYS = ("checksumSalt", "webhookUrl", "webhookUrlKey")


@pytest.mark.parametrize("config, sets", [
    ({"demoBackend": {"enabled": True}}, ()),
    ({"mode": "gateway", "demoBackend": {"enabled": True}, "secrets": {"apiToken": "token-one-0123456789"}}, ()),
    ({"demoBackend": {"enabled": True}, "secrets": {"existingSecret": "mine"}}, ()),
    ({"demoBackend": {"enabled": True}}, (f"secrets.webhookUrl={URL}",)),
], ids=["sidecar", "gateway", "existing-secret", "webhook-url-set"])
def test_an_upgrade_reusing_the_values_of_a_release_from_before_the_webhook_keys_renders(
        helm: Helm, chart: Path, tmp_path: Path, config: dict, sets: tuple[str, ...]) -> None:
    """helm upgrade --reuse-values renders with the values of the release's chart (helm's
    reuseValues: chart.Values = the old chart's), in which secrets.checksumSalt, webhookUrl and
    webhookUrlKey are missing: nil. regexMatch refused nil (the upgrade failed, "wrong type for value;
    expected string"), and with existingSecret the key printed "<no value>", so the sidecar got a
    PATHWATCH_WEBHOOK_URL of no key and was told to read it. The release is a record in helm's memory
    driver (HELM_MEMORY_DRIVER_DATA); helm asks the stand-in API server its version only."""
    args = [arg for assignment in sets for arg in ("--set", assignment)]
    _, docs = upgrade_reusing_old_values(helm, chart, tmp_path, config, NEW_SECRET_KEYS, args)
    env = sidecar_env(docs)
    if sets:
        assert sidecar_config(docs)["alerting"] == {"webhook_url_env": "PATHWATCH_WEBHOOK_URL"}
        assert env["PATHWATCH_WEBHOOK_URL"] == {"secretKeyRef": {"name": GATEWAY, "key": "webhook-url"}}
        assert base64.b64decode(one(docs, "Secret")["data"]["webhook-url"]).decode() == URL
    else:
        assert "PATHWATCH_WEBHOOK_URL" not in env and "alerting" not in sidecar_config(docs)
    if "existingSecret" not in config.get("secrets", {}):
        assert len(salt_of(docs)) == 32


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
@pytest.mark.parametrize("secrets, name", [
    ({"apiToken": "token-one-0123456789"}, "PATHWATCH_API_TOKEN"),
    ({"apiToken": "token-one-0123456789", "webhookUrl": URL}, "PATHWATCH_WEBHOOK_URL"),
    ({"existingSecret": "mine", "webhookUrlKey": "slack-url"}, "PATHWATCH_WEBHOOK_URL"),
])
def test_an_extra_env_entry_of_a_variable_the_chart_sets_is_refused_without_its_value(
        helm: Helm, chart: Path, tmp_path: Path, mode: str, secrets: dict, name: str) -> None:
    """sidecar.extraEnv naming a variable the chart sets in the sidecar container rendered a second
    entry of it in one env list: Kubernetes takes the last (the extraEnv value replaced the Secret's,
    which the annotations and the ServiceMonitor follow), server-side apply refuses the list."""
    extra = f"https://hooks.example/services/T0/B0/{SECRET}"
    values = {"mode": mode, "demoBackend": {"enabled": True}, "secrets": secrets,
              "sidecar": {"extraEnv": [{"name": "OTHER", "value": "1"}, {"name": name, "value": extra}]}}
    path = tmp_path / "values.json"
    path.write_text(json.dumps(values))
    refused = helm.run("template", "pw", chart, "--values", path, check=False)
    assert_refused_without_the_value(refused, f"sidecar.extraEnv[1] sets {name}", extra)


def test_an_extra_env_variable_of_your_own_for_the_webhook_renders_once(helm: Helm, chart: Path) -> None:
    """Without secrets.webhookUrl(Key) the chart sets no PATHWATCH_WEBHOOK_URL: a variable of that name
    in sidecar.extraEnv, named by config.alerting.webhook_url_env, is the one entry."""
    _, docs = render(helm, chart, "config.alerting.webhook_url_env=PATHWATCH_WEBHOOK_URL",
                     "sidecar.extraEnv[0].name=PATHWATCH_WEBHOOK_URL",
                     "sidecar.extraEnv[0].valueFrom.secretKeyRef.name=mine",
                     "sidecar.extraEnv[0].valueFrom.secretKeyRef.key=url")
    container = next(c for c in all_containers(pod_spec(one(docs, "Deployment"))) if c["name"] == "pathwatch")
    names = [item["name"] for item in container["env"]]
    assert names.count("PATHWATCH_WEBHOOK_URL") == 1 and len(names) == len(set(names))
    assert sidecar_config(docs)["alerting"] == {"webhook_url_env": "PATHWATCH_WEBHOOK_URL"}


def _sidecar_refuses_the_webhook(alerting: dict, extra_env: list[dict]) -> bool:
    """The sidecar's verdict at start, with the env the container gets (a valueFrom: some URL the kubelet
    resolves; the last entry of a name wins)."""
    from sidecar.config import ConfigError, parse_config
    environ = {"PATHWATCH_API_TOKEN": "token-one-0123456789"}
    for item in extra_env:
        environ[item["name"]] = "https://hooks.example/resolved" if "valueFrom" in item else item.get("value", "")
    try:
        parse_config({"alerting": alerting}).alerting.from_environment(environ)
    except ConfigError:
        return True
    return False


MY_HOOK = {"webhook_url_env": "MY_HOOK"}
FROM_MINE = {"name": "MY_HOOK", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "url"}}}


@pytest.mark.parametrize("alerting, extra_env, named", [
    (MY_HOOK, [], "config.alerting.webhook_url_env names the environment variable MY_HOOK, which is neither"),
    (MY_HOOK, [{"name": "OTHER", "value": "1"}], "config.alerting.webhook_url_env names the environment variable"),
    (MY_HOOK, [{"name": "MY_HOOK", "value": f"hooks.slack.com/services/T0/B0/{SECRET}"}], "sidecar.extraEnv[0] (MY_HOOK"),
    (MY_HOOK, [{"name": "MY_HOOK"}], "sidecar.extraEnv[0] (MY_HOOK"),
    (MY_HOOK, [FROM_MINE, {"name": "MY_HOOK", "value": " \n"}], "sidecar.extraEnv[1] (MY_HOOK"),
    ({**MY_HOOK, "webhook_url": URL}, [FROM_MINE],
     "config.alerting.webhook_url and config.alerting.webhook_url_env are both set"),
], ids=["not set", "not among extraEnv", "a literal value not a URL", "no value", "the last entry empty", "both"])
def test_a_webhook_url_env_the_sidecar_would_refuse_is_refused_at_render(helm: Helm, chart: Path, tmp_path: Path,
                                                                         alerting: dict, extra_env: list[dict],
                                                                         named: str) -> None:
    """config.alerting.webhook_url_env of the user's names a variable of the sidecar container: one that
    is not there, empty or not a URL the sidecar takes, or webhook_url beside it, and the sidecar exits 2
    at start (in sidecar mode holding the backend's pod): refused at render, never quoting the URL."""
    assert _sidecar_refuses_the_webhook(alerting, extra_env)
    path = tmp_path / "values.json"
    path.write_text(json.dumps({"config": {"alerting": alerting}, "sidecar": {"extraEnv": extra_env}}))
    refused = helm.run("template", "pw", chart, "--values", path, check=False)
    assert_refused_without_the_value(refused, named, URL)
    assert SECRET not in refused.stdout + refused.stderr


def test_a_webhook_url_given_in_place_of_the_variable_s_name_is_not_quoted(helm: Helm, chart: Path,
                                                                          tmp_path: Path) -> None:
    """config.alerting.webhook_url_env holds a variable's name; the URL itself written there (a path that
    is its secret) names no variable, and the chart refuses it as the sidecar does ("is not set") without
    quoting it in its message."""
    alerting = {"webhook_url_env": URL}
    assert _sidecar_refuses_the_webhook(alerting, [])
    path = tmp_path / "values.json"
    path.write_text(json.dumps({"config": {"alerting": alerting}}))
    refused = helm.run("template", "pw", chart, "--values", path, check=False)
    assert_refused_without_the_value(refused, "config.alerting.webhook_url_env names an environment variable "
                                     "(the name is not shown here", URL)
    assert SECRET not in refused.stdout + refused.stderr


@pytest.mark.parametrize("extra_env", [
    [FROM_MINE], [{"name": "MY_HOOK", "value": f" {URL}\n"}], [{"name": "MY_HOOK", "value": ""}, FROM_MINE],
], ids=["from a Secret of yours", "a literal URL", "the last entry set"])
def test_a_webhook_url_env_the_sidecar_takes_renders(helm: Helm, chart: Path, tmp_path: Path,
                                                     extra_env: list[dict]) -> None:
    assert not _sidecar_refuses_the_webhook(MY_HOOK, extra_env)
    path = tmp_path / "values.json"
    path.write_text(json.dumps({"config": {"alerting": MY_HOOK}, "sidecar": {"extraEnv": extra_env}}))
    rendered = helm.run("template", "pw", chart, "--values", path, check=False)
    assert rendered.returncode == 0, rendered.stderr


def _as_the_kubelet_expands(extra_env: list[dict], resolved: dict[str, str]) -> dict[str, str]:
    """The container's variables from sidecar.extraEnv as the kubelet makes them: a valueFrom is read
    from ``resolved`` (what the referenced ConfigMap or Secret holds), and a literal value's $(NAME) is
    replaced by a variable defined before it (Kubernetes' dependent environment variables)."""
    import re
    environ: dict[str, str] = {}
    for item in extra_env:
        if "valueFrom" in item:
            environ[item["name"]] = resolved[item["name"]]
        else:
            environ[item["name"]] = re.sub(r"\$\(([^)]*)\)", lambda m: environ.get(m[1], m[0]),
                                           item.get("value", ""))
    return environ


def test_a_webhook_url_env_value_the_kubelet_expands_renders(helm: Helm, chart: Path, tmp_path: Path) -> None:
    """A literal value with a $(VAR) reference is expanded by the kubelet from a variable before it: the
    chart cannot know the URL the container gets, so it renders it as written rather than refusing it
    ("no scheme") though the sidecar takes the expanded URL."""
    from sidecar.config import parse_config
    extra_env = [{"name": "HOOK_BASE", "valueFrom": {"configMapKeyRef": {"name": "hooks", "key": "base"}}},
                 {"name": "MY_HOOK", "value": "$(HOOK_BASE)/pathwatch"}]
    environ = _as_the_kubelet_expands(extra_env, {"HOOK_BASE": "https://hooks.example"})
    assert environ["MY_HOOK"] == "https://hooks.example/pathwatch"
    parse_config({"alerting": MY_HOOK}).alerting.from_environment(environ)   # the sidecar takes it
    path = tmp_path / "values.json"
    path.write_text(json.dumps({"demoBackend": {"enabled": True}, "config": {"alerting": MY_HOOK},
                                "sidecar": {"extraEnv": extra_env}}))
    rendered = helm.run("template", "pw", chart, "--values", path, check=False)
    assert rendered.returncode == 0, rendered.stderr
    container = next(c for c in all_containers(pod_spec(one(parse_documents(rendered.stdout), "Deployment")))
                     if c["name"] == "pathwatch")
    assert {"name": "MY_HOOK", "value": "$(HOOK_BASE)/pathwatch"} in container["env"]
