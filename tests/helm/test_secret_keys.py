"""The keys the chart's Secret and path map ConfigMap are written under are keys Kubernetes takes, and
two values never share one key.

secrets.hmacKeyKey equal to secrets.apiTokenKey (or to checksum-salt) rendered the Secret's `data` with
one key twice: YAML readers keep the last, so the backend's PATHWATCH_HMAC_KEY silently became the API
token (or the checksum salt), a given secrets.hmacKey was dropped, and whoever holds the API token (the
monitors with monitoring.authorize, every API client) could re-identify users from their pseudonyms. A
key holding "/" (or a secret pasted in the key's place) rendered a Secret or ConfigMap the API server
refuses at install."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.helm.charting import Helm, duplicate_keys, one, parse_documents
from tests.helm.test_values_schema import assert_refused_without_the_value

GATEWAY = ("mode=gateway", "secrets.apiToken=0123456789abcdef-token")


@pytest.mark.parametrize("existing", [False, True])
def test_one_key_for_the_hmac_key_and_the_api_token_is_refused(helm: Helm, chart: Path, existing: bool) -> None:
    sets = ["secrets.hmacKeyKey=shared", "secrets.apiTokenKey=shared"]
    if existing:
        sets.append("secrets.existingSecret=mine")
    rendered = helm.run("template", "pw", chart, *[arg for s in sets for arg in ("--set", s)], check=False)
    assert rendered.returncode != 0, duplicate_keys(rendered.stdout) or rendered.stdout[-2000:]
    assert "secrets.hmacKeyKey and secrets.apiTokenKey" in rendered.stderr, rendered.stderr


@pytest.mark.parametrize("key", ["hmacKeyKey", "apiTokenKey"])
def test_the_salt_s_key_is_not_given_to_another_value(helm: Helm, chart: Path, key: str) -> None:
    rendered = helm.run("template", "pw", chart, "--set", f"secrets.{key}=checksum-salt", check=False)
    assert rendered.returncode != 0, duplicate_keys(rendered.stdout)
    assert f"secrets.{key}" in rendered.stderr and "checksum-salt" in rendered.stderr, rendered.stderr


def test_the_salt_s_key_of_an_existing_secret_is_the_owner_s(helm: Helm, chart: Path) -> None:
    # no Secret of the chart's, no salt in it: the key names one of the owner's Secret
    helm.run("template", "pw", chart, "--set", "secrets.existingSecret=mine",
             "--set", "secrets.hmacKeyKey=checksum-salt")


@pytest.mark.parametrize("key", ["secrets.hmacKeyKey", "secrets.apiTokenKey", "pathmap.key"])
@pytest.mark.parametrize("value", ["keys/hmac", "S3cr3t pw CANARY", "..", "a" * 254])
def test_a_key_kubernetes_refuses_is_refused_at_render_without_quoting_it(helm: Helm, chart: Path, key: str,
                                                                         value: str) -> None:
    rendered = helm.run("template", "pw", chart, "--set-string", f"{key}={value}",
                        "--set", "pathmap.content.version=1", check=False)
    assert_refused_without_the_value(rendered, key, value)


def test_keys_of_their_own_render_where_the_workloads_read_them(helm: Helm, chart: Path) -> None:
    docs = parse_documents(helm.run(
        "template", "pw", chart, *[arg for s in (*GATEWAY, "demoBackend.enabled=true", "pathmap.content.version=1",
                                                 "secrets.hmacKeyKey=hmac_key.v2", "secrets.apiTokenKey=API-token",
                                                 "pathmap.key=map.yaml") for arg in ("--set", s)]).stdout)
    data = one(docs, "Secret")["data"]
    assert set(data) == {"hmac_key.v2", "API-token", "checksum-salt"}
    assert base64.b64decode(data["API-token"]).decode() == "0123456789abcdef-token"
    pathmaps = [doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-pathmap")]
    assert list(pathmaps[0]["data"]) == ["map.yaml"]
