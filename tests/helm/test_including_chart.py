"""Sidecar mode as users run it: their own chart includes the pathwatch templates via .Subcharts.pathwatch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helm.charting import ROOT, Helm, all_containers, by_kind, one, pod_spec

BACKEND_CHART = {
    "Chart.yaml": """\
apiVersion: v2
name: shop-backend
version: 1.0.0
dependencies:
  - name: pathwatch
    version: 0.1.0
""",
    "values.yaml": """\
image: registry.example/shop-backend:2.3.1
pathwatch:
  pathmap:
    content:
      version: 1
      roles: {}
  sidecar:
    native: true
""",
    # the documented wiring (README "Including the sidecar"), nothing more
    "templates/deployment.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-backend
spec:
  replicas: 3
  selector:
    matchLabels:
      app: shop-backend
  template:
    metadata:
      labels:
        app: shop-backend
        {{- include "pathwatch.backendPodLabels" .Subcharts.pathwatch | nindent 8 }}
      annotations:
        {{- include "pathwatch.podAnnotations" .Subcharts.pathwatch | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ include "pathwatch.terminationGracePeriodSeconds" .Subcharts.pathwatch }}
      securityContext:
        {{- include "pathwatch.podSecurityContext" .Subcharts.pathwatch | nindent 8 }}
      {{- with include "pathwatch.imagePullSecrets" .Subcharts.pathwatch }}
      imagePullSecrets:
        {{- . | nindent 8 }}
      {{- end }}
      initContainers:
        {{- include "pathwatch.sidecarContainer" .Subcharts.pathwatch | nindent 8 }}
      containers:
        - name: backend
          image: {{ .Values.image }}
          env:
            {{- include "pathwatch.backendEnv" .Subcharts.pathwatch | nindent 12 }}
          volumeMounts:
            {{- include "pathwatch.backendVolumeMounts" .Subcharts.pathwatch | nindent 12 }}
      volumes:
        {{- include "pathwatch.sidecarVolumes" .Subcharts.pathwatch | nindent 8 }}
""",
}


def write_backend_chart(parent: Path, chart: Path) -> Path:
    """The README's backend chart (BACKEND_CHART) under ``parent``, pathwatch's chart copied into
    its charts/ as a dependency; returns its root."""
    root = parent / "shop-backend"
    for name, text in BACKEND_CHART.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    shutil.copytree(chart, root / "charts" / "pathwatch", symlinks=False)
    return root


@pytest.fixture(scope="module")
def backend_chart(chart: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_backend_chart(tmp_path_factory.mktemp("including"), chart)


def test_the_including_chart_gets_a_working_sidecar(helm: Helm, backend_chart: Path, tmp_path: Path) -> None:
    docs = helm.template(backend_chart, release="shop")
    backend = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "shop-backend")
    spec = pod_spec(backend)
    names = {c["name"] for c in all_containers(spec)}
    assert names == {"pathwatch", "backend"}
    # every object the pod refers to is rendered by the pathwatch subchart, under the same names
    config_maps = {c["metadata"]["name"] for c in by_kind(docs, "ConfigMap")}
    secrets = {s["metadata"]["name"] for s in by_kind(docs, "Secret")}
    for volume in spec["volumes"]:
        if "configMap" in volume:
            assert volume["configMap"]["name"] in config_maps
    for container in all_containers(spec):
        for item in container.get("env", []):
            if "valueFrom" in item:
                assert item["valueFrom"]["secretKeyRef"]["name"] in secrets
        assert {m["name"] for m in container["volumeMounts"]} <= {v["name"] for v in spec["volumes"]}
    # the Service and PodMonitor of the subchart select this pod
    labels = backend["spec"]["template"]["metadata"]["labels"]
    assert one(docs, "Service")["spec"]["selector"].items() <= labels.items()
    assert one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # the parent's values reach the subchart: native sidecar, path map
    [sidecar] = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always" and sidecar["image"].endswith(":0.1.0")
    manifest = tmp_path / "backend.yaml"
    manifest.write_text(yaml.safe_dump(backend))
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "kubernetes-validate"), "--strict", "-k", "1.30.0",
                             str(manifest)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


NOTES_PROBE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ include "pathwatch/templates/NOTES.txt" . | quote }}
"""


def render_notes(helm: Helm, chart: Path, workdir: Path, *sets: str) -> str:
    # helm template does not print NOTES.txt; render it through a probe template in a copy of the chart
    copy = workdir / "pathwatch"
    if not copy.exists():
        shutil.copytree(chart, copy, symlinks=False)
        (copy / "templates" / "zz-notes-probe.yaml").write_text(NOTES_PROBE)
    args = ["template", "pw", copy, "--namespace", "observed", "--show-only", "templates/zz-notes-probe.yaml"]
    for assignment in sets:
        args += ["--set", assignment]
    return yaml.safe_load(helm.run(*args).stdout)["data"]["notes"]


def test_notes_explain_each_mode(helm: Helm, chart: Path, tmp_path: Path) -> None:
    sidecar = render_notes(helm, chart, tmp_path)
    assert '{{- include "pathwatch.sidecarContainer" .Subcharts.pathwatch | nindent 8 }}' in sidecar
    assert "127.0.0.1:4317" in sidecar and "PodMonitor" in sidecar
    gateway = render_notes(helm, chart, tmp_path, "mode=gateway", "secrets.apiToken=t0ken-0123456789")
    assert "pw-pathwatch.observed.svc:4317" in gateway and "pw-pathwatch-headless" in gateway
    assert "ServiceMonitor" in gateway


def test_the_including_charts_secret_annotation_is_salted_with_the_subcharts_salt(
        helm: Helm, backend_chart: Path) -> None:
    """The parent's pod and the subchart's Secret are rendered by different templates: one salt for both
    (drawn once per render), so an upgrade that reads it back from the live Secret rolls nothing."""
    import base64
    import hashlib
    import json

    docs = helm.template(backend_chart, release="shop", sets=("pathwatch.secrets.apiToken=t0ken-0123456789",))
    salt = base64.b64decode(one(docs, "Secret")["data"]["checksum-salt"]).decode()
    backend = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "shop-backend")
    expected = hashlib.sha256(json.dumps([salt, "t0ken-0123456789", ""], separators=(",", ":")).encode())
    assert backend["spec"]["template"]["metadata"]["annotations"]["checksum/pathwatch-secret"] == expected.hexdigest()


def env_names(container: dict) -> list[str]:
    return [item["name"] for item in container.get("env", [])]


def test_a_backend_keeping_its_own_sdk_exporter_gets_each_variable_once(helm: Helm, chart: Path,
                                                                         tmp_path: Path) -> None:
    """A backend whose opentelemetry-distro exports to an APM (README, pathwatch.backendEnv): it used to
    list its own OTEL_TRACES_EXPORTER after the pathwatch.backendEnv include ("the later entry wins"),
    a second entry of one name, which server-side apply refuses ("duplicate entries for key"), and
    helm 4 installs with server-side apply by default. pathwatch.backendPathwatchEnv gives the
    PATHWATCH_* variables alone."""
    root = write_backend_chart(tmp_path, chart)
    deployment = root / "templates" / "deployment.yaml"
    wiring = '{{- include "pathwatch.backendEnv" .Subcharts.pathwatch | nindent 12 }}'
    text = deployment.read_text()
    assert wiring in text
    deployment.write_text(text.replace(wiring, (
        '{{- include "pathwatch.backendPathwatchEnv" .Subcharts.pathwatch | nindent 12 }}\n'
        "            - name: OTEL_TRACES_EXPORTER\n              value: otlp\n"
        "            - name: OTEL_EXPORTER_OTLP_ENDPOINT\n              value: http://apm.example:4317\n")))
    docs = helm.template(root, release="shop")
    spec = pod_spec(next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "shop-backend"))
    [backend] = [c for c in spec["containers"] if c["name"] == "backend"]
    names = env_names(backend)
    assert len(names) == len(set(names)), names
    assert {item["name"]: item.get("value") for item in backend["env"]}["OTEL_TRACES_EXPORTER"] == "otlp"
    # the PATHWATCH_* variables are those of pathwatch.backendEnv, which adds the OTEL_*_EXPORTER=none ones
    full = helm.template(write_backend_chart(tmp_path / "default", chart), release="shop")
    [plain] = [c for c in pod_spec(next(d for d in by_kind(full, "Deployment")
                                        if d["metadata"]["name"] == "shop-backend"))["containers"]
               if c["name"] == "backend"]
    assert [n for n in env_names(plain) if n.startswith("PATHWATCH_")] == [
        n for n in names if n.startswith("PATHWATCH_")] == ["PATHWATCH_HMAC_KEY", "PATHWATCH_PATHMAP",
                                                            "PATHWATCH_OTLP_ENDPOINT"]
    assert [n for n in env_names(plain) if not n.startswith("PATHWATCH_")] == [
        "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER"]


def test_the_readme_gives_a_distro_backend_no_second_entry_of_a_variable() -> None:
    readme = (ROOT / "helm" / "pathwatch" / "README.md").read_text()
    [row] = [line for line in readme.splitlines() if line.startswith("| `pathwatch.backendEnv` |")]
    assert "the later entry wins" not in row and "pathwatch.backendPathwatchEnv" in row


def deployment_from_the_notes(notes: str) -> str:
    """The pod template NOTES.txt prints for sidecar mode, pasted into a Deployment of a backend chart."""
    lines = notes.splitlines()
    start = lines.index("  template:")
    end = lines.index("", start)
    snippet = "\n".join(line[2:] for line in lines[start:end])
    snippet = snippet.replace("        - name: backend\n", "        - name: backend\n          image: shop:1\n")
    return ("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}-backend\nspec:\n"
            "  selector:\n    matchLabels:\n      pathwatch.io/backend: shop-pathwatch\n"
            + "\n".join(f"  {line}" for line in snippet.splitlines()) + "\n")


@pytest.mark.parametrize("native", [True, False], ids=["native", "classic"])
def test_the_pod_template_the_notes_print_runs_the_sidecar_as_the_values_say(helm: Helm, chart: Path,
                                                                            tmp_path: Path, native: bool) -> None:
    """NOTES.txt printed the sidecar's include under `containers:` whatever sidecar.native said: a
    native sidecar's `restartPolicy: Always` there is refused by the API server (it is an init
    container's field), and the pod had no securityContext, so no fsGroup made the incident claim
    (persistence) writable by the sidecar's user 10001, as the README's wiring does."""
    sets = (f"sidecar.native={str(native).lower()}", "persistence.enabled=true")
    notes = render_notes(helm, chart, tmp_path / "notes", *sets)
    root = write_backend_chart(tmp_path, chart)
    (root / "templates" / "deployment.yaml").write_text(deployment_from_the_notes(notes))
    values = yaml.safe_load((root / "values.yaml").read_text())
    values["pathwatch"]["sidecar"]["native"] = native
    values["pathwatch"]["persistence"] = {"enabled": True}
    (root / "values.yaml").write_text(yaml.safe_dump(values))
    docs = helm.template(root, release="shop")
    spec = pod_spec(next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "shop-backend"))
    init = [c for c in spec.get("initContainers", []) if c["name"] == "pathwatch"]
    main = [c for c in spec["containers"] if c["name"] == "pathwatch"]
    if native:
        assert not main and len(init) == 1 and init[0]["restartPolicy"] == "Always"
    else:
        assert not init and len(main) == 1 and "restartPolicy" not in main[0]
    assert spec["securityContext"]["fsGroup"] == 10001
    assert {"name": "pathwatch-data", "persistentVolumeClaim": {"claimName": "shop-pathwatch-incidents"}} in (
        spec["volumes"])
