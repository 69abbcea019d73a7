"""The chart lints and renders, in both modes, with helm 3 and helm 4; every rendered object is valid."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helm.charting import (
    ROOT,
    SCENARIOS,
    Helm,
    by_kind,
    duplicate_keys,
    one,
    parse_documents,
    render_scenario,
    render_scenario_text,
)

MONITORING_GROUP = "monitoring.coreos.com/v1"
KUBERNETES_VERSION = "1.30.0"
MODELS = ROOT / ".cache" / "k8s-models"
VALIDATOR = Path(__file__).resolve().parent / "validate_monitoring.mjs"

EXPECTED_KINDS = {
    "default": {"ConfigMap", "Secret", "Service", "PodMonitor", "PrometheusRule"},
    "sidecar-example": {"ConfigMap", "Secret", "Service", "PodMonitor", "PrometheusRule", "Deployment",
                        "PersistentVolumeClaim", "NetworkPolicy"},
    "gateway-example": {"ConfigMap", "Service", "ServiceMonitor", "PrometheusRule", "StatefulSet",
                        "NetworkPolicy"},
    "gateway-deployment": {"ConfigMap", "Secret", "Service", "ServiceMonitor", "PrometheusRule", "Deployment",
                           "NetworkPolicy"},
    "sidecar-classic": {"ConfigMap", "Secret", "Service", "PodMonitor", "PrometheusRule", "Deployment"},
}


@pytest.fixture(scope="module")
def rendered(helm: Helm, chart: Path) -> dict[str, list[dict]]:
    return {name: render_scenario(helm, chart, name) for name in SCENARIOS}


@pytest.mark.parametrize("values", [None, "sidecar-values.yaml", "gateway-values.yaml"])
def test_lint_strict_passes(helm: Helm, chart: Path, values: str | None) -> None:
    args = ["lint", "--strict", chart] + (["--values", chart / "examples" / values] if values else [])
    result = helm.run(*args)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_renders_the_objects_of_the_mode(rendered: dict[str, list[dict]], scenario: str) -> None:
    kinds = {doc["kind"] for doc in rendered[scenario]}
    assert kinds == EXPECTED_KINDS[scenario]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kubernetes_objects_validate_strictly(rendered: dict[str, list[dict]], scenario: str,
                                              tmp_path: Path) -> None:
    core = [doc for doc in rendered[scenario] if doc["apiVersion"] != MONITORING_GROUP]
    assert core
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "kubernetes-validate"), "--strict",
                             "-k", KUBERNETES_VERSION, str(manifest)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(core), result.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_manifests_repeat_no_mapping_key(helm: Helm, chart: Path, scenario: str) -> None:
    # the gateway's pod template listed app.kubernetes.io/name and /instance twice (the common labels
    # and the selector labels): kubectl --validate=strict and yaml.v3 refuse such a manifest
    assert duplicate_keys(render_scenario_text(helm, chart, scenario)) == []


def test_gateway_pod_labels_are_one_mapping_and_keep_the_selectors_values(helm: Helm, chart: Path) -> None:
    text = helm.template_text(chart, sets=(
        "mode=gateway", "secrets.apiToken=t0ken-0123456789", "gateway.podLabels.team=obs",
        "gateway.podLabels.app\\.kubernetes\\.io/part-of=observability",
        "gateway.podLabels.app\\.kubernetes\\.io/component=other"))
    assert duplicate_keys(text) == []
    workload = one(parse_documents(text), "Deployment")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()  # component: gateway
    assert labels["team"] == "obs" and labels["app.kubernetes.io/part-of"] == "observability"
    assert labels["helm.sh/chart"].startswith("pathwatch-")


def test_duplicate_keys_finds_a_repeated_key_in_a_nested_mapping() -> None:
    text = "a: 1\n---\nkind: X\nspec:\n  items:\n    - labels:\n        k: 1\n        j: 2\n        k: 3\n"
    assert duplicate_keys(text) == ["'k' at line 9 (first at line 7)"]


def validate_monitoring(objects: list[dict]) -> list[dict]:
    assert (MODELS / "node_modules").is_dir(), f"{MODELS} is missing: run `scripts/setup.sh npm`"
    result = subprocess.run(["node", str(VALIDATOR), str(MODELS)], input=json.dumps(objects),
                            capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_monitoring_objects_validate_against_the_crd_schemas(rendered: dict[str, list[dict]],
                                                             scenario: str) -> None:
    objects = [doc for doc in rendered[scenario] if doc["apiVersion"] == MONITORING_GROUP]
    assert {doc["kind"] for doc in objects} >= {"PrometheusRule"}
    reports = validate_monitoring(objects)
    assert len(reports) == len(objects)
    assert [r for r in reports if r["errors"]] == []


def test_the_crd_validator_rejects_a_bad_object() -> None:
    # guards against a validator that accepts anything
    bad = {"apiVersion": MONITORING_GROUP, "kind": "ServiceMonitor", "metadata": {"name": "bad"},
           "spec": {"selector": {}, "endpoints": [{"port": "api", "interval": 30}]}}
    [report] = validate_monitoring([bad])
    assert report["errors"] and "interval" in report["errors"][0]


def test_monitoring_objects_carry_the_configured_labels(rendered: dict[str, list[dict]]) -> None:
    seen = set()
    for scenario in ("sidecar-example", "gateway-example"):
        for kind in ("PrometheusRule", "PodMonitor", "ServiceMonitor"):
            for doc in by_kind(rendered[scenario], kind):
                assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
                seen.add((scenario, kind))
    # each mode renders its rules and its own monitor (a pod's in sidecar mode, a service's in gateway)
    assert {kind for _, kind in seen} == {"PrometheusRule", "PodMonitor", "ServiceMonitor"}, seen
    assert {scenario for scenario, kind in seen if kind == "PrometheusRule"} == {
        "sidecar-example", "gateway-example"}, seen


@pytest.mark.parametrize("scenario", ["sidecar-example", "gateway-example"])
def test_the_scrape_job_is_pathwatch_whatever_the_release_is_named(helm: Helm, chart: Path,
                                                                    scenario: str) -> None:
    # the alert rules find the sidecar by job=~".*pathwatch.*" (PathwatchSidecarAbsent)
    files, sets = SCENARIOS[scenario]
    docs = helm.template(chart, *(chart / "examples" / name for name in files),
                         sets=(*sets, "nameOverride=tracer"))
    monitors = by_kind(docs, "PodMonitor") + by_kind(docs, "ServiceMonitor")
    assert monitors
    for monitor in monitors:
        assert "pathwatch" not in monitor["metadata"]["name"]
        spec = monitor["spec"]
        for endpoint in spec.get("podMetricsEndpoints", []) + spec.get("endpoints", []):
            assert {"action": "replace", "targetLabel": "job", "replacement": "pathwatch"} in (
                endpoint["relabelings"])


def test_dashboard_config_maps_keep_distinct_names_with_the_longest_fullname(helm: Helm,
                                                                             chart: Path) -> None:
    docs = helm.template(chart, sets=("fullnameOverride=" + "a" * 52,))
    names = [doc["metadata"]["name"] for doc in by_kind(docs, "ConfigMap")
             if "dashboard" in doc["metadata"]["name"]]
    assert len(names) == 3 and len(set(names)) == 3 and all(len(name) <= 63 for name in names)


def test_dashboard_config_maps_of_releases_sharing_a_long_prefix_do_not_collide(helm: Helm,
                                                                                chart: Path) -> None:
    """Two releases in one namespace whose fullnames differ only after 36 characters."""
    prefix = "p" * 40

    def names(fullname: str) -> set[str]:
        docs = helm.template(chart, sets=("fullnameOverride=" + fullname,))
        return {doc["metadata"]["name"] for doc in by_kind(docs, "ConfigMap")
                if "dashboard" in doc["metadata"]["name"]}

    first, second = names(prefix + "-blue"), names(prefix + "-green")
    assert len(first) == len(second) == 3 and not first & second
    assert all(len(name) <= 63 for name in first | second)
    short = names("pw")  # a short fullname stays readable: no hash
    assert short == {"pw-dashboard-consolidation", "pw-dashboard-delivery", "pw-dashboard-isolation"}


def test_the_backend_exports_traces_only(rendered: dict[str, list[dict]]) -> None:
    backend = next(c for doc in by_kind(rendered["sidecar-example"], "Deployment")
                   for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] != "pathwatch")
    env = {item["name"]: item.get("value") for item in backend["env"]}
    assert env["OTEL_METRICS_EXPORTER"] == env["OTEL_LOGS_EXPORTER"] == "none"
    assert backend["command"][0] == "opentelemetry-instrument"


def test_sidecars_of_several_replicas_cannot_share_one_incident_file(helm: Helm, chart: Path) -> None:
    args = ["template", "pw", chart, "--values", chart / "examples" / "sidecar-values.yaml",
            "--set", "persistence.enabled=true", "--set", "demoBackend.replicas=2"]
    refused = helm.run(*args, "--set", "persistence.accessModes={ReadWriteMany}", check=False)
    assert refused.returncode != 0 and "cannot share it" in refused.stderr
    one_replica = helm.run(*args[:-2], "--set", "demoBackend.replicas=1", check=False)
    assert one_replica.returncode == 0, one_replica.stderr


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_a_changed_token_or_key_in_the_values_rolls_the_pods_that_read_it(helm: Helm, chart: Path,
                                                                          mode: str) -> None:
    """The API token is read by the sidecar, the HMAC key by the backend (PATHWATCH_HMAC_KEY), each once
    at start. In gateway mode one checksum of both rolled the gateway for a new HMAC key, which it never
    reads, and not the backend, which went on pseudonymizing with the old key next to new pods.
    helm template reads no live Secret: the checksums' salt is pinned here, as such pipelines do
    (test_secret_checksums.py: an upgrade keeps the live Secret's)."""
    def pod_templates(*sets: str) -> dict[str, dict]:
        docs = helm.template(chart, sets=(f"mode={mode}", "demoBackend.enabled=true",
                                          "secrets.apiToken=token-one-0123456789",
                                          "secrets.hmacKey=hmac-key-0123456789",
                                          "secrets.checksumSalt=salt-0123456789abcdef", *sets))
        return {doc["metadata"]["name"]: doc["spec"]["template"]
                for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}

    def rolled(*sets: str) -> set[str]:
        after = pod_templates(*sets)
        return {name for name, template in first.items() if after[name] != template}

    first = pod_templates()
    backend, gateway = "pw-pathwatch-demo-backend", "pw-pathwatch"
    sidecar_pods = {backend} if mode == "sidecar" else {gateway}
    assert set(first) == ({backend} if mode == "sidecar" else {backend, gateway})
    assert rolled("secrets.apiToken=token-two-0123456789") == sidecar_pods
    assert rolled("secrets.hmacKey=another-key-0123456789") == {backend}
    assert rolled("secrets.apiToken=token-one-0123456789") == set()
    # a Secret of secrets.existingSecret is its owner's to roll
    existing = pod_templates("secrets.existingSecret=mine", "secrets.apiToken=", "secrets.hmacKey=")
    assert not any(key.startswith("checksum/pathwatch-") and key != "checksum/pathwatch-config"
                   for template in existing.values() for key in template["metadata"].get("annotations", {}))


def test_the_sidecar_service_and_network_policy_use_port_numbers(
        rendered: dict[str, list[dict]]) -> None:
    # named ports of native sidecars are not resolved by Kubernetes < 1.32 (kubernetes#127958)
    docs = rendered["sidecar-example"]
    (service,) = by_kind(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [9464]
    (policy,) = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 9464, "protocol": "TCP"}]


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_a_changed_path_map_rolls_the_backend_pods(helm: Helm, chart: Path, mode: str) -> None:
    """The backend reads PATHWATCH_PATHMAP once, at start: a path map changed in the values must change
    the backend's pod template, or `helm upgrade` leaves every running pod on the old map."""
    def pod_template(*sets: str) -> dict:
        # the salt of the token's checksum pinned: helm template draws one per run otherwise
        docs = helm.template(chart, sets=(f"mode={mode}", "secrets.apiToken=t0ken-0123456789", "demoBackend.enabled=true",
                                          "secrets.checksumSalt=salt-0123456789abcdef",
                                          "pathmap.content.version=1", *sets))
        backend = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-demo-backend"))
        return backend["spec"]["template"]

    first = pod_template("pathmap.content.roles.r.canonical=a.A")
    assert pod_template("pathmap.content.roles.r.canonical=a.B") != first
    assert pod_template("pathmap.content.roles.r.canonical=a.A") == first
    # a ConfigMap of pathmap.existingConfigMap is its owner's to roll, as an existing Secret is
    assert "checksum/pathwatch-pathmap" not in pod_template("pathmap.existingConfigMap=mine")["metadata"].get(
        "annotations", {})
    if mode == "gateway":  # the gateway does not read the path map: it does not roll for it
        gateway = helm.template(chart, sets=("mode=gateway", "secrets.apiToken=t0ken-0123456789", "pathmap.content.version=1"))
        (workload,) = by_kind(gateway, "Deployment")
        assert "checksum/pathwatch-pathmap" not in workload["spec"]["template"]["metadata"]["annotations"]


def test_dashboards_of_releases_in_two_namespaces_sent_to_one_grafana_namespace_do_not_collide(
        helm: Helm, chart: Path) -> None:
    """dashboards.namespace puts the ConfigMaps beside Grafana: the release `pw` of namespace shop and
    the release `pw` of namespace billing named theirs alike there, and helm refused the second install
    (the ConfigMap exists, owned by the other release). Sent to the release's own namespace, the names
    stay as they were."""
    def dashboards(namespace: str, *sets: str) -> set[tuple[str, str]]:
        docs = helm.template(chart, sets=sets, namespace=namespace)
        return {(doc["metadata"]["namespace"], doc["metadata"]["name"]) for doc in by_kind(docs, "ConfigMap")
                if "dashboard" in doc["metadata"]["name"]}

    shop, billing = (dashboards(ns, "dashboards.namespace=monitoring") for ns in ("shop", "billing"))
    assert len(shop) == len(billing) == 3 and not shop & billing
    assert all(namespace == "monitoring" and len(name) <= 63 for namespace, name in shop | billing)
    long_namespace = dashboards("n" * 63, "dashboards.namespace=monitoring", "fullnameOverride=" + "f" * 52)
    assert len(long_namespace) == 3 and all(len(name) <= 63 for _, name in long_namespace)
    assert dashboards("shop") == dashboards("shop", "dashboards.namespace=shop") == {
        ("shop", "pw-pathwatch-dashboard-consolidation"), ("shop", "pw-pathwatch-dashboard-delivery"),
        ("shop", "pw-pathwatch-dashboard-isolation")}
