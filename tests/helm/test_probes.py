"""``livenessProbe: null`` / ``readinessProbe: null`` turn that probe off, as ``resources: null`` and
``securityContext: null`` leave theirs out: the chart printed ``null`` under the probe's ``httpGet``
(a YAML error, "could not find expected ':'"), and in sidecar mode a null readinessProbe stopped the
render on a nil pointer (its timeoutSeconds sets the startup probe's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.charting import Helm, all_containers, by_kind, pod_spec
from tests.helm.test_including_chart import write_backend_chart
from tests.helm.test_values_schema import check_jsonschema

GATEWAY = ("mode=gateway", "secrets.apiToken=t0ken-0123456789")
SIDECAR = ("demoBackend.enabled=true",)
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def pathwatch_probes(docs: list[dict]) -> dict[str, dict]:
    """probe name -> probe of the one pathwatch container rendered."""
    [container] = [c for doc in [*by_kind(docs, "Deployment"), *by_kind(docs, "StatefulSet")]
                   for c in all_containers(pod_spec(doc)) if c["name"] == "pathwatch"]
    return {name: container[name] for name in PROBES if name in container}


@pytest.mark.parametrize("mode, sets", [("gateway", GATEWAY), ("sidecar", SIDECAR)])
def test_the_defaults_are_unchanged(helm: Helm, chart: Path, mode: str, sets: tuple[str, ...]) -> None:
    probes = pathwatch_probes(helm.template(chart, sets=sets))
    assert probes["livenessProbe"] == {"httpGet": {"path": "/healthz", "port": "pathwatch-api"},
                                       "initialDelaySeconds": 5, "periodSeconds": 10, "timeoutSeconds": 2,
                                       "failureThreshold": 6}
    if mode == "gateway":
        assert set(probes) == {"livenessProbe", "readinessProbe"}
        assert probes["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": "pathwatch-api"},
                                            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    else:
        assert set(probes) == {"livenessProbe", "startupProbe"}
        assert probes["startupProbe"]["timeoutSeconds"] == 2
        given = pathwatch_probes(helm.template(chart, sets=(*sets, "readinessProbe.timeoutSeconds=5")))
        assert given["startupProbe"]["timeoutSeconds"] == 5


@pytest.mark.parametrize("how", ["values-file", "set"])
@pytest.mark.parametrize("mode, sets", [("gateway", GATEWAY), ("sidecar", SIDECAR)])
@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
def test_a_probe_set_to_null_is_left_out(helm: Helm, chart: Path, tmp_path: Path, probe: str, mode: str,
                                         sets: tuple[str, ...], how: str) -> None:
    if how == "values-file":
        values = tmp_path / "values.yaml"
        values.write_text(f"{probe}: null\n")
        docs = helm.template(chart, values, sets=sets)
    else:
        docs = helm.template(chart, sets=(*sets, f"{probe}=null"))
    probes = pathwatch_probes(docs)
    assert probe not in probes
    if probe == "livenessProbe":
        assert ("readinessProbe" if mode == "gateway" else "startupProbe") in probes
    else:
        assert "livenessProbe" in probes
    if mode == "sidecar":   # the startup probe is not the readiness probe: it stays, its timeout the default
        assert probes["startupProbe"]["timeoutSeconds"] == 2


def test_the_schema_takes_null_for_a_probe(tmp_path: Path) -> None:
    """helm drops a null key before it validates; an editor or check-jsonschema reads the file as written."""
    values = tmp_path / "values.yaml"
    values.write_text("livenessProbe: null\nreadinessProbe: null\n")
    checked = check_jsonschema(values)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_including_chart_can_turn_the_sidecar_s_liveness_probe_off(helm: Helm, chart: Path,
                                                                        tmp_path: Path) -> None:
    root = write_backend_chart(tmp_path, chart)
    values = tmp_path / "values.yaml"
    values.write_text("pathwatch:\n  livenessProbe: null\n  readinessProbe: null\n")
    probes = pathwatch_probes(helm.template(root, values))
    assert set(probes) == {"startupProbe"}


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
def test_a_probe_that_is_no_mapping_is_refused_naming_the_key(helm: Helm, chart: Path, probe: str) -> None:
    refused = helm.run("template", "pw", chart, "--set", f"{probe}=false", check=False)
    assert refused.returncode != 0 and probe in refused.stderr, refused.stderr
