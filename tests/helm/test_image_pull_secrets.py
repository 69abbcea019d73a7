"""imagePullSecrets reach every pod running the chart's images, through one template.

The gateway and the demo backend wrote `.Values.imagePullSecrets` with toYaml each, and nothing gave
it to the pod of a backend including the sidecar (sidecar mode, the usual one): its pathwatch image
from a private registry was never pulled (ErrImagePull). A plain name (["regcred"], as many charts take
it) was refused by the schema, and a name given twice became two entries, which server-side apply
refuses ("duplicate entries for key [name=...]"). pathwatch.imagePullSecrets renders them all, as
`{name: ...}` items, once each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helm.charting import Helm, pod_spec
from tests.helm.test_including_chart import BACKEND_CHART, write_backend_chart
from tests.helm.test_values_schema import check_jsonschema

GIVEN = ["regcred", {"name": "mirror.pull"}, {"name": "regcred"}]
EXPECTED = [{"name": "regcred"}, {"name": "mirror.pull"}]


def values_file(tmp_path: Path, secrets: object, **more: object) -> Path:
    path = tmp_path / "pull.json"
    path.write_text(json.dumps({"imagePullSecrets": secrets, **more}))
    return path


def pod_pull_secrets(helm: Helm, chart: Path, values: Path, *sets: str) -> dict[str, list | None]:
    docs = helm.template(chart, values, sets=sets)
    return {doc["metadata"]["name"]: pod_spec(doc).get("imagePullSecrets")
            for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}


@pytest.mark.parametrize("sets", [
    ("demoBackend.enabled=true",),                                                  # sidecar mode
    ("mode=gateway", "secrets.apiToken=t0ken-0123456789", "demoBackend.enabled=true"),
    ("mode=gateway", "secrets.apiToken=t0ken-0123456789", "persistence.enabled=true"),  # a StatefulSet
], ids=["sidecar", "gateway", "gateway-statefulset"])
def test_names_and_name_objects_reach_every_pod_once(helm: Helm, chart: Path, tmp_path: Path,
                                                     sets: tuple[str, ...]) -> None:
    pods = pod_pull_secrets(helm, chart, values_file(tmp_path, GIVEN), *sets)
    assert pods and all(secrets == EXPECTED for secrets in pods.values()), pods


def test_none_given_renders_no_key(helm: Helm, chart: Path, tmp_path: Path) -> None:
    pods = pod_pull_secrets(helm, chart, values_file(tmp_path, []), "mode=gateway",
                            "secrets.apiToken=t0ken-0123456789", "demoBackend.enabled=true")
    assert pods and set(pods.values()) == {None}


def test_the_including_chart_s_pod_gets_them(helm: Helm, chart: Path, tmp_path: Path) -> None:
    """The README's wiring of a backend's pod (test_including_chart.BACKEND_CHART) includes the template."""
    assert 'include "pathwatch.imagePullSecrets" .Subcharts.pathwatch' in BACKEND_CHART["templates/deployment.yaml"]
    root = write_backend_chart(tmp_path, chart)
    values = tmp_path / "parent.json"
    values.write_text(json.dumps({"pathwatch": {"imagePullSecrets": GIVEN}}))
    pods = pod_pull_secrets(helm, root, values)
    assert pods == {"pw-backend": EXPECTED}
    values.write_text(json.dumps({"pathwatch": {"imagePullSecrets": []}}))
    assert pod_pull_secrets(helm, root, values) == {"pw-backend": None}


@pytest.mark.parametrize("secrets", [[""], [{}], [{"name": ""}], [{"name": "x", "namespace": "y"}], [1],
                                     ["Reg_Cred"], "regcred"], ids=ascii)
def test_the_schema_refuses_what_is_not_a_secret_s_name(helm: Helm, chart: Path, tmp_path: Path,
                                                        secrets: object) -> None:
    values = values_file(tmp_path, secrets)
    assert check_jsonschema(values).returncode != 0
    rendered = helm.run("template", "pw", chart, "--values", values, check=False)
    assert rendered.returncode != 0 and "imagePullSecrets" in rendered.stderr, rendered.stderr


def test_the_schema_takes_both_forms(tmp_path: Path) -> None:
    checked = check_jsonschema(values_file(tmp_path, GIVEN))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_readme_and_notes_wire_it_into_the_backend_s_pod(chart: Path) -> None:
    for name in ("README.md", "templates/NOTES.txt"):
        assert 'include "pathwatch.imagePullSecrets" .Subcharts.pathwatch' in (chart / name).read_text(), name
