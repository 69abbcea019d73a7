"""What the rendered pods, Services and policies do: the sidecar contract, security, wiring between objects."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from instrumentation.yaml_loader import UniqueKeyLoader
from sidecar.config import is_loopback_endpoint, parse_config
from tests.helm.charting import (ROOT, SCENARIOS, Helm, all_containers, by_kind, one, parse_documents, pod_spec,
                                 render_scenario)

WORKLOAD_KINDS = ("Deployment", "StatefulSet")
WITH_WORKLOADS = ("sidecar-example", "gateway-example", "gateway-deployment", "sidecar-classic")


@pytest.fixture(scope="module")
def rendered(helm: Helm, chart: Path) -> dict[str, list[dict]]:
    return {name: render_scenario(helm, chart, name) for name in SCENARIOS}


def workloads(docs: list[dict]) -> list[dict]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def sidecar_workloads(docs: list[dict]) -> list[dict]:
    found = [w for w in workloads(docs) if any(c["name"] == "pathwatch" for c in all_containers(pod_spec(w)))]
    assert found
    return found


def sidecar_of(workload: dict) -> dict:
    [container] = [c for c in all_containers(pod_spec(workload)) if c["name"] == "pathwatch"]
    return container


def sidecar_config(docs: list[dict]) -> dict:
    config_map = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    return yaml.safe_load(config_map["data"]["sidecar.yaml"])


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.mark.parametrize("scenario", WITH_WORKLOADS)
def test_every_container_and_pod_is_locked_down(rendered: dict[str, list[dict]], scenario: str) -> None:
    found = workloads(rendered[scenario])
    assert found
    for workload in found:
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in all_containers(spec):
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]


@pytest.mark.parametrize("scenario", WITH_WORKLOADS)
def test_the_sidecar_container_runs_the_documented_command_with_probes(rendered: dict[str, list[dict]],
                                                                       scenario: str) -> None:
    for workload in sidecar_workloads(rendered[scenario]):
        sidecar = sidecar_of(workload)
        assert sidecar["image"] == "ghcr.io/pathwatch/pathwatch:0.1.0"   # the chart's appVersion
        assert sidecar["command"] == ["pathwatch", "sidecar", "--config", "/etc/pathwatch/sidecar.yaml"]
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert ports["pathwatch-api"] == 9464
        assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "pathwatch-api"}
        if "gateway" in scenario:
            assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "pathwatch-api"}
        else:  # in the backend's pod: a failing readiness probe would take the backend out of service
            assert "readinessProbe" not in sidecar
            assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "pathwatch-api"}
        assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]


#: the sidecar's RSS once every state table is full at the default capacities (state.max_traces
#: 200,000, max_events 400,000, max_runs 100,000 ...): 600-620 MiB, at most 647, in soaks of 3
#: minutes from nine clients (/tmp/s31_overload/soak.py, SOAK_STATE=default), flat once full
FULL_STATE_RSS_MIB = 650
_UNITS_MIB = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}


def mebibytes(quantity: str) -> float:
    for unit, mib in sorted(_UNITS_MIB.items(), key=lambda item: -len(item[0])):
        if quantity.endswith(unit):
            return float(quantity.removesuffix(unit)) * mib
    return float(quantity) / 2**20


# "default" renders no pod (sidecar mode without the demo backend): the chart's default limit is
# rendered by sidecar-classic and gateway-deployment, which leave the resources at their defaults
@pytest.mark.parametrize("scenario", WITH_WORKLOADS)
def test_the_memory_limit_holds_a_sidecar_whose_state_is_full(rendered: dict[str, list[dict]],
                                                              scenario: str) -> None:
    """The limit was 512Mi: a sidecar whose state tables filled at their default capacities (a
    few hundred runs a second within state.ttl_s, a gateway sooner) reached 600+ MiB, bounded, and
    would be OOM-killed, every accepted span and all its state lost, again at each restart. The limit
    leaves a quarter above the full state for the queue and the requests being read."""
    limits = [container["resources"]["limits"]["memory"] for workload in workloads(rendered[scenario])
              for container in all_containers(pod_spec(workload)) if container["name"] == "pathwatch"]
    assert limits, f"{scenario}: no pathwatch container rendered"
    for limit in limits:
        assert mebibytes(limit) >= 1.25 * FULL_STATE_RSS_MIB, (scenario, limit)


@pytest.mark.parametrize("scenario", WITH_WORKLOADS)
def test_every_mount_has_its_volume(rendered: dict[str, list[dict]], scenario: str) -> None:
    found = workloads(rendered[scenario])
    assert found
    for workload in found:
        spec = pod_spec(workload)
        volumes = {v["name"] for v in spec["volumes"]}
        volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for container in all_containers(spec):
            mounts = {m["name"] for m in container["volumeMounts"]}
            assert mounts <= volumes, (container["name"], mounts - volumes)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_rendered_sidecar_config_is_accepted_by_the_sidecar(rendered: dict[str, list[dict]],
                                                                scenario: str) -> None:
    config = parse_config(sidecar_config(rendered[scenario]), source=f"{scenario}/sidecar.yaml")
    gateway = scenario.startswith("gateway")
    assert config.receiver.grpc_endpoint == ("0.0.0.0:4317" if gateway else "127.0.0.1:4317")
    assert config.receiver.http_endpoint == ("0.0.0.0:4318" if gateway else "127.0.0.1:4318")
    # kubelet probes and Prometheus reach the API on the pod IP, so it is never loopback-only
    assert config.api.endpoint == "0.0.0.0:9464" and not is_loopback_endpoint(config.api.endpoint)
    assert config.incidents.path == "/var/lib/pathwatch/incidents.sqlite"


def test_values_flow_into_the_sidecar_config(rendered: dict[str, list[dict]]) -> None:
    config = parse_config(sidecar_config(rendered["sidecar-example"]))
    assert config.alerting.alertmanager_url == "http://alertmanager-operated.monitoring.svc:9093"
    assert config.rules.delivery_deadline_s == 2.0
    gateway = parse_config(sidecar_config(rendered["gateway-example"]))
    assert gateway.receiver.max_pending_spans == 400000 and gateway.state.max_traces == 400000


def test_the_gateway_example_waits_for_the_collectors_retries(rendered: dict[str, list[dict]]) -> None:
    """examples/gateway-values.yaml puts the sidecar behind an OpenTelemetry Collector, whose exporter
    retries a refused request after up to 45 s (retry_on_failure: max_interval 30 s, +-50 %): with
    the default 10 s window spans retried later were false findings (docs/sidecar.md, The
    detectors' clock). A gateway rendered without the example keeps the default."""
    gateway = parse_config(sidecar_config(rendered["gateway-example"]))
    assert gateway.rules.export_retry_window_s >= 1.5 * 30
    straight = parse_config(sidecar_config(rendered["gateway-deployment"]))
    assert straight.rules.export_retry_window_s == 10.0


@pytest.mark.parametrize("scenario", WITH_WORKLOADS)
def test_the_incident_store_lives_under_the_data_mount(rendered: dict[str, list[dict]], scenario: str) -> None:
    path = sidecar_config(rendered[scenario])["incidents"]["path"]
    for workload in sidecar_workloads(rendered[scenario]):
        [mount] = [m for m in sidecar_of(workload)["volumeMounts"] if m["name"] == "pathwatch-data"]
        assert path.startswith(mount["mountPath"].rstrip("/") + "/")


def test_persistence_choices(rendered: dict[str, list[dict]]) -> None:
    # sidecar mode: one claim of the release, mounted by the backend pod
    docs = rendered["sidecar-example"]
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    volumes = {v["name"]: v for v in pod_spec(one(docs, "Deployment"))["volumes"]}
    assert volumes["pathwatch-data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # gateway mode: a StatefulSet with one claim per replica
    [template] = one(rendered["gateway-example"], "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "pathwatch-data"
    assert template["spec"]["resources"]["requests"]["storage"] == "2Gi"
    # no persistence: emptyDir
    [gateway] = sidecar_workloads(rendered["gateway-deployment"])
    volumes = {v["name"]: v for v in pod_spec(gateway)["volumes"]}
    assert volumes["pathwatch-data"] == {"name": "pathwatch-data", "emptyDir": {}}


@pytest.mark.parametrize("scenario", WITH_WORKLOADS)
def test_a_deployment_mounting_the_incident_claim_is_replaced_not_rolled(rendered: dict[str, list[dict]],
                                                                        scenario: str) -> None:
    # a rolling update starts the new pod before the old one stops: on another node it cannot attach
    # the ReadWriteOnce claim (Multi-Attach error; with maxUnavailable 0 the rollout never ends), on
    # the same node two sidecars write one SQLite incident file
    for workload in by_kind(rendered[scenario], "Deployment"):
        claims = [v for v in pod_spec(workload)["volumes"] if "persistentVolumeClaim" in v]
        if claims:
            assert workload["spec"].get("strategy") == {"type": "Recreate"}, workload["metadata"]["name"]
    assert any("persistentVolumeClaim" in v for w in by_kind(rendered["sidecar-example"], "Deployment")
               for v in pod_spec(w)["volumes"])


@pytest.mark.parametrize("scenario", WITH_WORKLOADS)
def test_no_container_mounts_two_volumes_at_one_path(rendered: dict[str, list[dict]], scenario: str) -> None:
    # the API server refuses such a pod ("mountPath: Invalid value: ...: must be unique")
    found = workloads(rendered[scenario])
    assert found
    for workload in found:
        for container in all_containers(pod_spec(workload)):
            paths = [m["mountPath"].rstrip("/") or "/" for m in container["volumeMounts"]]
            assert len(paths) == len(set(paths)), (container["name"], paths)


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
@pytest.mark.parametrize("path", ["/tmp", "/tmp/", "/etc/pathwatch", "/etc/pathwatch/", "/etc/pathwatch/data"])
def test_a_data_mount_path_on_the_sidecars_own_mounts_is_refused(helm: Helm, chart: Path, mode: str,
                                                                 path: str) -> None:
    """persistence.mountPath on /tmp or /etc/pathwatch rendered a sidecar container with two mounts at
    one path, a pod the API server refuses at install (or, inside /etc/pathwatch, a mount point the
    runtime cannot create in the read-only config volume)."""
    sets = ("--set", f"mode={mode}", "--set", "secrets.apiToken=t0ken-0123456789", "--set", "demoBackend.enabled=true")
    for persistence in ("false", "true"):
        refused = helm.run("template", "pw", chart, *sets, "--set", f"persistence.enabled={persistence}",
                           "--set", f"persistence.mountPath={path}", check=False)
        assert refused.returncode != 0 and "persistence.mountPath" in refused.stderr, refused.stderr
    for elsewhere in ("/tmp/pathwatch", "/etc/pathwatch-data", "/data"):
        accepted = helm.run("template", "pw", chart, *sets, "--set", f"persistence.mountPath={elsewhere}",
                            check=False)
        assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("key", ["pathmap.mountPath", "persistence.mountPath"])
@pytest.mark.parametrize(("path", "why"), [
    ("/tmp", "would hide /tmp"), ("/tmp/", "would hide /tmp"), ("/", "whole file system"),
    ("/etc", "would hide /etc/hosts"), ("/var/run/secrets", "service account token"), ("/usr", "would hide /usr/local/lib"),
    ("/app", "demo backend's code"), ("/opt", "virtualenv"),
    ("/etc/pathwatch/../../tmp", "not a clean absolute path"), ("//tmp", "not a clean absolute path"),
    ("/tmp/.", "not a clean absolute path"), ("/srv/../tmp", "not a clean absolute path"),
])
def test_a_mount_path_that_hides_what_a_container_needs_is_refused(helm: Helm, chart: Path, key: str, path: str,
                                                                   why: str) -> None:
    """pathmap.mountPath=/tmp rendered the demo backend with two mounts at /tmp (the API server refuses
    the Deployment at install, naming no value); /tmp/ or /etc/pathwatch/../../tmp passed the API server's
    string comparison and the runtime mounted the read-only path map over the backend's /tmp; / hid the
    image. Refused at render, naming the value and what it would hide."""
    for mode in ("sidecar", "gateway"):
        refused = helm.run("template", "pw", chart, "--set", f"mode={mode}", "--set", "secrets.apiToken=t0ken-0123456789",
                           "--set", "demoBackend.enabled=true", "--set", "pathmap.content.version=1",
                           "--set", f"{key}={path}", check=False)
        assert refused.returncode != 0, refused.stdout
        assert f"pathwatch: {key} {json.dumps(path)} " in refused.stderr, refused.stderr
        # persistence.mountPath on /tmp is refused first by its older rule (the sidecar's own mounts)
        assert why in refused.stderr or "the sidecar container's own mounts" in refused.stderr, refused.stderr


@pytest.mark.parametrize("path", ["/etc/pathwatch/pathmap/", "/tmp/pathwatch-pathmap", "/srv/pathmap", "/etc/pathwatch-map",
                                  "/opt/pathmap", "/var/lib/pathwatch-map"])
def test_a_mount_path_of_its_own_renders(helm: Helm, chart: Path, path: str) -> None:
    docs = helm.template(chart, sets=("demoBackend.enabled=true", "pathmap.content.version=1",
                                      f"pathmap.mountPath={path}"))
    backend = next(c for w in by_kind(docs, "Deployment") for c in all_containers(pod_spec(w)) if c["name"] != "pathwatch")
    paths = [m["mountPath"] for m in backend["volumeMounts"]]
    assert path in paths and len({p.rstrip("/") for p in paths}) == len(paths)


def test_storage_class(helm: Helm, chart: Path) -> None:
    claim = one(helm.template(chart, sets=("persistence.enabled=true", "persistence.storageClass=fast")),
                "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast"
    claim = one(helm.template(chart, sets=("persistence.enabled=true", "persistence.storageClass=-")),
                "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == ""


def test_gateway_mode_without_a_token_fails_with_a_clear_message(helm: Helm, chart: Path) -> None:
    result = helm.run("template", "pw", chart, "--set", "mode=gateway", check=False)
    assert result.returncode != 0
    assert "gateway mode serves the sidecar API on 0.0.0.0:9464" in result.stderr
    assert "set secrets.apiToken, or secrets.existingSecret" in result.stderr


def test_gateway_mode_with_an_existing_secret_creates_none(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["gateway-example"]
    assert by_kind(docs, "Secret") == []
    token = env_of(sidecar_of(one(docs, "StatefulSet")))["PATHWATCH_API_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "pathwatch-secrets", "key": "api-token"}


def test_the_chart_secret_holds_given_or_generated_values(rendered: dict[str, list[dict]],
                                                          helm: Helm, chart: Path) -> None:
    secret = one(rendered["gateway-deployment"], "Secret")
    assert base64.b64decode(secret["data"]["api-token"]) == b"s3cret-0123456789"
    assert len(base64.b64decode(secret["data"]["hmac-key"])) >= 32
    secret = one(helm.template(chart, sets=("secrets.hmacKey=given-key-0123456789",)), "Secret")
    assert base64.b64decode(secret["data"]["hmac-key"]) == b"given-key-0123456789"
    assert len(base64.b64decode(secret["data"]["api-token"])) >= 32   # sidecar mode generates the token
    [workload] = sidecar_workloads(rendered["gateway-deployment"])
    token = env_of(sidecar_of(workload))["PATHWATCH_API_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-token"}


def demo_backend(docs: list[dict]) -> dict:
    return next(w for w in by_kind(docs, "Deployment") if w["metadata"]["name"].endswith("-demo-backend"))


def test_the_demo_backend_gets_the_sidecar_and_exports_to_loopback(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["sidecar-example"]
    spec = pod_spec(demo_backend(docs))
    assert [c["name"] for c in spec["initContainers"]] == ["pathwatch"]       # sidecar.native: true
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    [backend] = spec["containers"]
    env = env_of(backend)
    assert env["PATHWATCH_OTLP_ENDPOINT"]["value"] == "127.0.0.1:4317"   # pathwatch's own exporter
    assert env["OTEL_TRACES_EXPORTER"]["value"] == "none"                # not also the SDK's
    assert env["PATHWATCH_HMAC_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "hmac-key"
    # the path map file the backend is told about is the mounted ConfigMap's key
    pathmap_file = Path(env["PATHWATCH_PATHMAP"]["value"])
    [mount] = [m for m in backend["volumeMounts"] if m["name"] == "pathwatch-pathmap"]
    assert str(pathmap_file.parent) == mount["mountPath"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "pathwatch-pathmap"]
    pathmap = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"])
    assert yaml.safe_load(pathmap["data"][pathmap_file.name])["roles"]["execution_engine"]["kind"] == "execute"
    classic = pod_spec(demo_backend(rendered["sidecar-classic"]))
    assert "initContainers" not in classic
    assert [c["name"] for c in classic["containers"]] == ["backend", "pathwatch"]
    assert "restartPolicy" not in classic["containers"][1]


def test_the_sidecar_mode_service_and_podmonitor_select_the_backend_pods(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["sidecar-example"]
    pod_labels = demo_backend(docs)["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "pathwatch-api", "port": 9464, "targetPort": 9464,
                                         "protocol": "TCP", "appProtocol": "http"}]
    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "pathwatch-api" and endpoint["path"] == "/metrics"


def test_the_gateway_services(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["gateway-deployment"]
    [workload] = sidecar_workloads(docs)
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    main, headless = services["pw-pathwatch"], services["pw-pathwatch-headless"]
    assert {p["name"]: p["port"] for p in main["spec"]["ports"]} == {
        "otlp-grpc": 4317, "otlp-http": 4318, "pathwatch-api": 9464}
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in headless["spec"]["ports"]} == {"otlp-grpc", "otlp-http"}
    for service in (main, headless):
        assert service["spec"]["selector"].items() <= pod_labels.items()
    # the ServiceMonitor scrapes through the main Service only (the headless one would double the series)
    selector = one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= main["metadata"]["labels"].items()
    assert not selector.items() <= headless["metadata"]["labels"].items()
    # the demo backend exports to the gateway Service
    env = env_of(pod_spec(demo_backend(docs))["containers"][0])
    assert env["PATHWATCH_OTLP_ENDPOINT"]["value"] == "pw-pathwatch.observed.svc:4317"


def ingress_ports(policy: dict) -> list[set[str]]:
    return [{p["port"] for p in rule.get("ports", [])} for rule in policy["spec"]["ingress"]]


def test_gateway_network_policy_admits_otlp_from_backends_and_metrics_from_monitoring(
        rendered: dict[str, list[dict]]) -> None:
    docs = rendered["gateway-deployment"]
    policy = one(docs, "NetworkPolicy")
    otlp, metrics = policy["spec"]["ingress"]
    assert {p["port"] for p in otlp["ports"]} == {4317, 4318}
    backend_labels = demo_backend(docs)["spec"]["template"]["metadata"]["labels"]
    [peer] = otlp["from"]
    assert peer["podSelector"]["matchLabels"].items() <= backend_labels.items()
    assert {p["port"] for p in metrics["ports"]} == {9464}
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # the example lets the Collector in instead
    [peer] = one(rendered["gateway-example"], "NetworkPolicy")["spec"]["ingress"][0]["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "opentelemetry-collector"}


def test_sidecar_network_policy_keeps_the_backend_reachable(rendered: dict[str, list[dict]],
                                                            helm: Helm, chart: Path) -> None:
    policy = one(rendered["sidecar-example"], "NetworkPolicy")
    assert ingress_ports(policy) == [{9464}, {"http"}]  # the chart's, then extraIngress
    result = helm.run("template", "pw", chart, "--set", "networkPolicy.enabled=true", check=False)
    assert result.returncode != 0 and "networkPolicy.extraIngress" in result.stderr


def test_config_change_rolls_the_pods(helm: Helm, chart: Path) -> None:
    def checksum(*sets: str) -> str:
        docs = helm.template(chart, sets=("demoBackend.enabled=true", *sets))
        return demo_backend(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/pathwatch-config"]
    assert checksum() != checksum("config.logging.level=debug")


def test_rendered_path_maps_pass_the_instrumentations_loader(rendered: dict[str, list[dict]]) -> None:
    from instrumentation.pathmap import PathMap

    checked = 0
    for scenario, docs in rendered.items():
        for config_map in by_kind(docs, "ConfigMap"):
            if config_map["metadata"]["name"].endswith("-pathmap"):
                [(key, text)] = config_map["data"].items()
                PathMap.from_yaml(text, source=f"{scenario}/{key}")
                checked += 1
    assert checked >= 2


def test_the_sidecar_example_carries_the_demo_backends_path_map(chart: Path) -> None:
    example = yaml.safe_load((chart / "examples" / "sidecar-values.yaml").read_text())
    demo = yaml.safe_load((ROOT / "examples" / "agent_backend" / "pathmap.yaml").read_text())
    assert example["pathmap"]["content"] == demo


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
@pytest.mark.parametrize(("first", "second"), [("api", "otlpGrpc"), ("api", "otlpHttp"), ("otlpGrpc", "otlpHttp")])
def test_two_sidecar_servers_on_one_port_are_refused(helm: Helm, chart: Path, mode: str, first: str,
                                                     second: str) -> None:
    """The sidecar listens on each of the three ports (the receivers on 127.0.0.1 in sidecar mode, which
    still takes the port from 0.0.0.0): one port for two of them rendered, and the sidecar exited 1 at
    start ('cannot listen on 0.0.0.0:4317 (api.endpoint): Address already in use'), in a crash loop."""
    sets = ("--set", f"mode={mode}", "--set", "secrets.apiToken=t0ken-0123456789")
    refused = helm.run("template", "pw", chart, *sets, "--set", f"ports.{first}=5000", "--set",
                       f"ports.{second}=5000", check=False)
    assert refused.returncode != 0
    assert f"ports.{first}" in refused.stderr and f"ports.{second}" in refused.stderr, refused.stderr
    accepted = helm.run("template", "pw", chart, *sets, "--set", f"ports.{first}=5000", "--set",
                        f"ports.{second}=5001", check=False)
    assert accepted.returncode == 0, accepted.stderr


def test_the_demo_backends_port_is_not_one_of_the_sidecars(helm: Helm, chart: Path) -> None:
    # in sidecar mode the demo backend and its sidecar share the pod's network namespace
    sets = ("--set", "demoBackend.enabled=true", "--set", "demoBackend.port=9464")
    refused = helm.run("template", "pw", chart, *sets, check=False)
    assert refused.returncode != 0 and "demoBackend.port" in refused.stderr and "ports.api" in refused.stderr
    gateway = helm.run("template", "pw", chart, *sets, "--set", "mode=gateway", "--set", "secrets.apiToken=t0ken-0123456789",
                       check=False)
    assert gateway.returncode == 0, gateway.stderr   # its own pod there


# strings go-yaml (helm's toYaml) wrote in a form YAML readers take otherwise: a bare "=" (YAML 1.1's
# value tag, which the backend's PyYAML loader cannot construct), U+2028/U+2029/U+0085 (line breaks to
# YAML 1.1 readers, written raw: the manifest failed to parse, or the value came back folded to a space);
# and strings YAML would read as another type, non-ASCII and HTML characters, as a control
PATH_MAP_STRINGS = ["=", "a\u2028b", "\u2028", "sub\u2028", "\u2029sub", "a\u0085b", "a\u0085", "yes", "~",
                    "null", "0o17", "1e3", "- x", "#x", "a: b", "'\"", "<&>", "\u00e9t\u00e9", "\U0001F600",
                    "a\u00a0b", "\ufeffx"]


def _path_map_with(value: str) -> dict:
    return {"version": 1, "identity": {"http": [{"jwt_claim": value}, {"query_param": value}]}}


def _render_path_map_values(helm: Helm, chart: Path, tmp_path: Path, content: dict,
                            template: str) -> subprocess.CompletedProcess[str]:
    # JSON, BMP characters escaped (a raw U+2028 is a line break to helm's values reader) and others raw
    # (go-yaml refuses surrogate pairs): the strings reach helm exactly
    text = json.dumps({"pathmap": {"content": content}}, ensure_ascii=False)
    values = tmp_path / "pathmap.json"
    values.write_text("".join(c if c.isascii() or ord(c) > 0xFFFF else f"\\u{ord(c):04x}" for c in text),
                      encoding="utf-8")
    return helm.run("template", "pw", chart, "--values", values, "--show-only", template, check=False)


@pytest.mark.parametrize("value", PATH_MAP_STRINGS, ids=ascii)
def test_path_map_strings_reach_the_backend_as_given(helm: Helm, chart: Path, tmp_path: Path,
                                                     value: str) -> None:
    """The ConfigMap as the manifest reader of helm install and kubectl (sigs.k8s.io/yaml) reads it,
    then its pathmap.yaml as the backend reads it (PyYAML, PathMap.from_yaml): the values, exactly."""
    from instrumentation.pathmap import PathMap

    # a copy of the chart with one more template: the path map ConfigMap read back by helm's fromYaml
    copy = tmp_path / "pathwatch"
    shutil.copytree(chart, copy)   # the links under files/ become copies
    shutil.copy(copy / "templates" / "pathmap-configmap.yaml", copy / "files" / "pathmap-configmap.tpl")
    (copy / "templates" / "read-back.yaml").write_text(
        '{{- $cm := tpl (.Files.Get "files/pathmap-configmap.tpl") . | fromYaml }}\n'
        "# READ-BACK {{ $cm.data | toJson }}\n")
    content = _path_map_with(value)
    rendered = _render_path_map_values(helm, copy, tmp_path, content, "templates/read-back.yaml")
    assert rendered.returncode == 0, rendered.stderr
    [text] = json.loads(rendered.stdout.split("# READ-BACK ", 1)[1].splitlines()[0]).values()
    assert yaml.load(text, Loader=UniqueKeyLoader) == content  # noqa: S506 - a SafeLoader
    PathMap.from_yaml(text, source="pathmap.yaml")
    # and the manifest as helm template prints it, read by PyYAML
    printed = _render_path_map_values(helm, chart, tmp_path, content, "templates/pathmap-configmap.yaml")
    assert printed.returncode == 0, printed.stderr
    [config_map] = parse_documents(printed.stdout)
    assert yaml.load(config_map["data"]["pathmap.yaml"], Loader=UniqueKeyLoader) == content  # noqa: S506


def _render_sidecar_config_values(helm: Helm, chart: Path, tmp_path: Path, config: dict,
                                  template: str) -> subprocess.CompletedProcess[str]:
    # as _render_path_map_values: the strings reach helm exactly
    text = json.dumps({"config": config}, ensure_ascii=False)
    values = tmp_path / "config.json"
    values.write_text("".join(c if c.isascii() or ord(c) > 0xFFFF else f"\\u{ord(c):04x}" for c in text),
                      encoding="utf-8")
    return helm.run("template", "pw", chart, "--values", values, "--show-only", template, check=False)


# as event types: a blank one ("\u2028" alone) is refused at start since 033419f
# (tests/test_config.py::test_a_blank_event_type_is_refused_naming_its_key); U+2028 at a string's
# end and U+2029 at its start stay ("sub\u2028", "\u2029sub")
EVENT_TYPE_STRINGS = [value for value in PATH_MAP_STRINGS if value.strip()]


@pytest.mark.parametrize("value", EVENT_TYPE_STRINGS, ids=ascii)
def test_sidecar_config_strings_reach_the_sidecar_as_given(helm: Helm, chart: Path, tmp_path: Path,
                                                           value: str) -> None:
    """sidecar.yaml was toYaml of the values, with the path map's problem (09772d3): a bare `=` in
    config.rules.required_events was written plain and the sidecar's loader failed on YAML 1.1's value
    tag (exit 2, a crash loop), U+2028 at a string's end broke the manifest, U+0085 came back as a
    space. The ConfigMap as helm install and kubectl read it (sigs.k8s.io/yaml), then its sidecar.yaml
    as the sidecar loads it (sidecar.config.load_config): the strings, exactly; and the same from the
    manifest helm template prints, read by PyYAML."""
    from sidecar.config import load_config

    config = {"rules": {"required_events": [value, "agent_completed"], "terminal_events": ["agent_completed"],
                        "delivery_deadline_s": 2.5},
              "alerting": {"retry_backoff_s": 0.25, "max_per_minute": 7}}

    def loads_as_given(text: str) -> None:
        path = tmp_path / "sidecar.yaml"
        path.write_text(text, encoding="utf-8")
        loaded = load_config(path)
        assert loaded.rules.required_events == (value, "agent_completed")
        assert (loaded.rules.delivery_deadline_s, loaded.alerting.retry_backoff_s,
                loaded.alerting.max_per_minute) == (2.5, 0.25, 7)

    copy = tmp_path / "pathwatch"
    shutil.copytree(chart, copy)   # the links under files/ become copies
    shutil.copy(copy / "templates" / "configmap.yaml", copy / "files" / "configmap.tpl")
    (copy / "templates" / "read-back.yaml").write_text(
        '{{- $cm := tpl (.Files.Get "files/configmap.tpl") . | fromYaml }}\n'
        "# READ-BACK {{ $cm.data | toJson }}\n")
    rendered = _render_sidecar_config_values(helm, copy, tmp_path, config, "templates/read-back.yaml")
    assert rendered.returncode == 0, rendered.stderr
    data = json.loads(rendered.stdout.split("# READ-BACK ", 1)[1].splitlines()[0])
    loads_as_given(data["sidecar.yaml"])
    printed = _render_sidecar_config_values(helm, chart, tmp_path, config, "templates/configmap.yaml")
    assert printed.returncode == 0, printed.stderr
    [config_map] = parse_documents(printed.stdout)
    loads_as_given(config_map["data"]["sidecar.yaml"])


@pytest.mark.parametrize(("section", "key", "value"), [("consolidation", "regression_floor", 1e-7),
                                                   ("rules", "leaked_context_tolerance_ms", 5e-7),
                                                   ("consolidation", "regression_factor", 1e21)])
def test_sidecar_config_numbers_written_with_an_exponent_reach_the_sidecar(
        helm: Helm, chart: Path, tmp_path: Path, section: str, key: str, value: float) -> None:
    """sidecar.yaml is JSON, and Go's encoder writes a float below 1e-6 or from 1e21 up with an
    exponent and no dot ("1e-7"), which YAML 1.1 (the sidecar's PyYAML) read as a string: a value the
    schema takes made the sidecar exit 2, "Input should be a valid number"."""
    from sidecar.config import load_config

    printed = _render_sidecar_config_values(helm, chart, tmp_path, {section: {key: value}},
                                            "templates/configmap.yaml")
    assert printed.returncode == 0, printed.stderr
    [config_map] = parse_documents(printed.stdout)
    path = tmp_path / "sidecar.yaml"
    path.write_text(config_map["data"]["sidecar.yaml"], encoding="utf-8")
    assert getattr(getattr(load_config(path), section), key) == value


def test_the_gateway_spreads_over_its_own_release_s_pods_only(helm: Helm, chart: Path) -> None:
    """examples/gateway-values.yaml's spread constraint selected app.kubernetes.io/name=pathwatch and
    component=gateway: the gateway pods of every release in the namespace, so another release's pods
    skewed where this one's went. A constraint without a labelSelector (which would select no pod) now
    gets the gateway's selector labels, release included; one with its own keeps it."""
    docs = helm.template(chart, chart / "examples" / "gateway-values.yaml", release="blue")
    workload = one(docs, "StatefulSet")
    selector = workload["spec"]["selector"]["matchLabels"]
    constraints = pod_spec(workload)["topologySpreadConstraints"]
    assert constraints and all(c["labelSelector"] == {"matchLabels": selector} for c in constraints)
    assert selector["app.kubernetes.io/instance"] == "blue"
    own = {"matchLabels": {"team": "x"}}
    docs = helm.template(chart, chart / "examples" / "gateway-values.yaml", release="blue",
                         sets=("gateway.topologySpreadConstraints[0].maxSkew=1",
                               "gateway.topologySpreadConstraints[0].topologyKey=zone",
                               "gateway.topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule",
                               "gateway.topologySpreadConstraints[0].labelSelector.matchLabels.team=x"))
    assert pod_spec(one(docs, "StatefulSet"))["topologySpreadConstraints"][0]["labelSelector"] == own
