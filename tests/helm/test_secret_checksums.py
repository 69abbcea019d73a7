"""The pod annotations that roll pods for a secret given in the values are no test of a guessed secret.

Anyone allowed to read pods sees the annotations. They held a bare SHA-256 of secrets.apiToken,
secrets.hmacKey (and of both): a guessable value was found offline by hashing candidates, and a found
HMAC key re-identifies users from their pseudonyms. They are now salted with a random value kept in the
chart's Secret (pathwatch.checksumSalt), and a given token needs 16 characters."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from tests.helm.charting import Helm, by_kind, one, parse_documents
from tests.helm.kube_stand_in import kube_api_with_secret
from tests.helm.test_values_schema import assert_refused_without_the_value

TOKEN, KEY = "changeme-changeme", "pathwatch-key-2024"   # long enough, yet in any guess list
SECRET_ANNOTATIONS = ("checksum/pathwatch-secret", "checksum/pathwatch-api-token", "checksum/pathwatch-hmac-key")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def salted(salt: str, *secrets: str) -> str:
    # Go's toJson of the list: no spaces (the values here hold no character it escapes otherwise)
    return sha256(json.dumps([salt, *secrets], separators=(",", ":")))


def pod_annotations(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["spec"]["template"]["metadata"].get("annotations", {})
            for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}


def secret_annotations(docs: list[dict]) -> dict[tuple[str, str], str]:
    return {(name, key): value for name, annotations in pod_annotations(docs).items()
            for key, value in annotations.items() if key in SECRET_ANNOTATIONS}


def salt_of(docs: list[dict]) -> str:
    return base64.b64decode(one(docs, "Secret")["data"]["checksum-salt"]).decode()


EXPECTED = {  # mode -> what each secret annotation is a salted checksum of
    "sidecar": {("pw-pathwatch-demo-backend", "checksum/pathwatch-secret"): (TOKEN, KEY)},
    "gateway": {("pw-pathwatch", "checksum/pathwatch-api-token"): (TOKEN,),
                ("pw-pathwatch-demo-backend", "checksum/pathwatch-hmac-key"): (KEY,)},
}


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_the_secret_annotations_are_salted_with_the_salt_kept_in_the_secret(helm: Helm, chart: Path,
                                                                            mode: str) -> None:
    docs = helm.template(chart, sets=(f"mode={mode}", "demoBackend.enabled=true", f"secrets.apiToken={TOKEN}",
                                      f"secrets.hmacKey={KEY}"))
    salt = salt_of(docs)
    assert len(salt) >= 32
    found = secret_annotations(docs)
    # drawn once per render: the Secret and every annotation of that render hold the same salt
    assert found == {where: salted(salt, *secrets) for where, secrets in EXPECTED[mode].items()}
    guesses = {sha256(TOKEN), sha256(KEY), sha256(f"{TOKEN}\n{KEY}"), salted("", TOKEN, KEY),
               salted("", TOKEN), salted("", KEY)}
    assert not guesses & set(found.values())


def test_helm_template_draws_a_new_salt_unless_it_is_given(helm: Helm, chart: Path) -> None:
    """helm template has no live Secret to read the salt from: each run draws one (every apply of
    such a pipeline rolls the pods), unless secrets.checksumSalt is given."""
    sets = ("demoBackend.enabled=true", f"secrets.apiToken={TOKEN}")
    first, second = (helm.template(chart, sets=sets) for _ in range(2))
    assert salt_of(first) != salt_of(second)
    assert secret_annotations(first) != secret_annotations(second)
    pinned = (*sets, "secrets.checksumSalt=salt-0123456789abcdef")
    first, second = (helm.template(chart, sets=pinned) for _ in range(2))
    assert salt_of(first) == salt_of(second) == "salt-0123456789abcdef"
    assert pod_annotations(first) == pod_annotations(second)


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_an_upgrade_keeps_the_live_salt_and_rolls_only_for_a_changed_secret(helm: Helm, chart: Path,
                                                                            tmp_path: Path, mode: str) -> None:
    """On upgrade the salt is read back from the live Secret (lookup): an unchanged token and key leave
    the pod templates as they are, a changed one rolls the pods that read it."""
    live_salt = "salt-of-the-live-secret-0123"
    data = {"checksum-salt": base64.b64encode(live_salt.encode()).decode()}
    with kube_api_with_secret(tmp_path, "observed", "pw-pathwatch", data) as kubeconfig:
        def upgrade(token: str) -> list[dict]:
            return parse_documents(helm.run(
                "template", "pw", chart, "--namespace", "observed", "--dry-run=server", "--is-upgrade",
                "--disable-openapi-validation", "--set", f"mode={mode}", "--set", "demoBackend.enabled=true",
                "--set", f"secrets.apiToken={token}", "--set", f"secrets.hmacKey={KEY}",
                kubeconfig=kubeconfig).stdout)

        docs = upgrade(TOKEN)
        assert salt_of(docs) == live_salt
        assert secret_annotations(docs) == {where: salted(live_salt, *secrets)
                                            for where, secrets in EXPECTED[mode].items()}
        assert pod_annotations(upgrade(TOKEN)) == pod_annotations(docs)
        changed = pod_annotations(upgrade("another-token-0123456789"))
        rolled = {name for name, annotations in pod_annotations(docs).items() if changed[name] != annotations}
        assert rolled == {"pw-pathwatch-demo-backend" if mode == "sidecar" else "pw-pathwatch"}


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
@pytest.mark.parametrize("token", ["t", "s3cret", "CANARY-012345", "0123456789abcde", "  0123456789abcde \n"])
def test_a_short_api_token_is_refused_at_render_without_the_token(helm: Helm, chart: Path, tmp_path: Path,
                                                                   mode: str, token: str) -> None:
    """... naming secrets.apiToken; 16 characters (once stripped, as the sidecar strips it) render."""
    values = tmp_path / "token.json"   # JSON: the string reaches helm exactly
    values.write_text(json.dumps({"mode": mode, "secrets": {"apiToken": token}}))
    refused = helm.run("template", "pw", chart, "--values", values, check=False)
    assert_refused_without_the_value(refused, "secrets.apiToken", token)
    assert "at least 16 characters" in refused.stderr and "openssl rand" in refused.stderr
    values.write_text(json.dumps({"mode": mode, "secrets": {"apiToken": " 0123456789abcdef\n"}}))
    accepted = helm.run("template", "pw", chart, "--values", values, check=False)
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("salt", ["CANARY-salt", "0123456789abcde", " " * 16, "\u00a0" * 16])
def test_a_weak_checksum_salt_is_refused_at_render_without_the_salt(helm: Helm, chart: Path, tmp_path: Path,
                                                                    salt: str) -> None:
    values = tmp_path / "salt.json"
    values.write_text(json.dumps({"secrets": {"checksumSalt": salt}}))
    assert_refused_without_the_value(helm.run("template", "pw", chart, "--values", values, check=False),
                                     "secrets.checksumSalt", salt)
    values.write_text(json.dumps({"secrets": {"checksumSalt": "0123456789abcdef"}}))
    accepted = helm.run("template", "pw", chart, "--values", values, check=False)
    assert accepted.returncode == 0, accepted.stderr


def test_an_existing_secret_gets_no_salt_and_no_secret_annotation(helm: Helm, chart: Path) -> None:
    docs = helm.template(chart, sets=("demoBackend.enabled=true", "secrets.existingSecret=mine"))
    assert by_kind(docs, "Secret") == [] and secret_annotations(docs) == {}


@pytest.mark.parametrize(("key", "value"), [("apiToken", TOKEN), ("hmacKey", "0123456789abcdef0123")])
def test_a_token_or_key_given_with_an_existing_secret_is_refused_not_ignored(helm: Helm, chart: Path,
                                                                            tmp_path: Path, key: str,
                                                                            value: str) -> None:
    # the pods read secrets.existingSecret's: the value given was silently never used
    values = tmp_path / "given.json"
    values.write_text(json.dumps({"secrets": {"existingSecret": "mine", key: value}}))
    refused = helm.run("template", "pw", chart, "--values", values, check=False)
    assert_refused_without_the_value(refused, f"secrets.{key} is set", value)
    assert f"secrets.{key}Key" in refused.stderr
