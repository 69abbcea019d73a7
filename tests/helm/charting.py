"""Running helm against the pathwatch chart, offline, with helm's state in a temporary folder.

The chart reads the alert rules and dashboards through symlinks into ``dashboards/``, so the tests render
the repository's chart as it is and compare against those very files.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pathwatch"
EXAMPLES = CHART / "examples"
HELM_BINARIES = {"helm3": ROOT / ".cache" / "helm3" / "helm", "helm4": ROOT / ".cache" / "helm4" / "helm"}
RULES = Path("dashboards/rules/pathwatch-rules.yaml")
DASHBOARD_NAMES = ("consolidation", "isolation", "delivery")
DASHBOARDS = tuple(Path(f"dashboards/pathwatch-{name}.json") for name in DASHBOARD_NAMES)


@dataclass
class Helm:
    binary: Path
    home: Path

    @property
    def name(self) -> str:
        return self.binary.parent.name

    def run(self, *args: str | os.PathLike[str], check: bool = True,
            kubeconfig: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **(env or {})}
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[var] = str(self.home / var.lower())
        # offline: never reach a cluster from the tests (but a local stand-in API, kube_stand_in.py)
        env["KUBECONFIG"] = str(kubeconfig) if kubeconfig else os.devnull
        result = subprocess.run([str(self.binary), *map(str, args)], capture_output=True, text=True,
                                env=env, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def template(self, chart: Path, *values: Path, sets: tuple[str, ...] = (),
                 release: str = "pw", namespace: str = "observed") -> list[dict]:
        return parse_documents(self.template_text(chart, *values, sets=sets, release=release,
                                                  namespace=namespace))

    def template_text(self, chart: Path, *values: Path, sets: tuple[str, ...] = (),
                      release: str = "pw", namespace: str = "observed") -> str:
        args: list[str | os.PathLike[str]] = ["template", release, chart, "--namespace", namespace]
        for path in values:
            args += ["--values", path]
        for assignment in sets:
            args += ["--set", assignment]
        return self.run(*args).stdout


def duplicate_keys(text: str) -> list[str]:
    """Every mapping key that appears twice in one mapping of ``text`` (YAML requires unique keys:
    strict decoders such as kubectl's ``--validate=strict`` and yaml.v3 refuse them, while PyYAML's
    ``safe_load`` silently keeps the last), as ``'key' at line N (first at line M)``."""
    found: list[str] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        found.append(f"{key.value!r} at line {line} (first at line {seen[key.value]})")
                    else:
                        seen[key.value] = line
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    for document in yaml.compose_all(text, Loader=yaml.SafeLoader):
        if document is not None:
            walk(document)
    return found


def parse_documents(text: str) -> list[dict]:
    """The rendered objects; a key repeated in one mapping fails the test (see ``duplicate_keys``)."""
    duplicates = duplicate_keys(text)
    assert not duplicates, f"duplicate mapping keys in the rendered manifests: {duplicates}"
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def upgrade_reusing_old_values(helm: Helm, chart: Path, tmp_path: Path, config: dict,
                               missing: tuple[str, ...], args: list[str], *,
                               missing_paths: tuple[str, ...] = ()) -> tuple[str, list[dict]]:
    """``helm upgrade --reuse-values --dry-run=client`` of a release made by a chart whose values
    lacked the ``secrets`` keys ``missing`` and the dotted ``missing_paths`` (e.g.
    ``sidecar.listenAddress``; nil in the reused values, as from an earlier chart version): the
    release is a record in helm's memory driver (HELM_MEMORY_DRIVER_DATA) and helm asks a stand-in
    API server its version only. Returns helm's output and the upgraded manifest's documents,
    asserting the upgrade rendered and printed no "<no value>"."""
    from tests.helm.kube_stand_in import kube_api_with_secret

    old_values = yaml.safe_load((chart / "values.yaml").read_text())
    for key in missing:
        del old_values["secrets"][key]
    for path in missing_paths:
        *parents, key = path.split(".")
        section = old_values
        for parent in parents:
            section = section[parent]
        del section[key]
    release = {"name": "pw", "namespace": "observed", "version": 1, "info": {"status": "deployed"},
               "chart": {"metadata": {"apiVersion": "v2", "name": "pathwatch", "version": "0.1.0"},
                         "values": old_values},
               "config": config, "manifest": ""}
    (tmp_path / "releases.yaml").write_text(yaml.safe_dump([release]))
    with kube_api_with_secret(tmp_path, "observed", "pw-pathwatch", {}) as kubeconfig:
        upgraded = helm.run("upgrade", "pw", chart, "--namespace", "observed", "--reuse-values",
                            "--dry-run=client", *args, kubeconfig=kubeconfig, check=False,
                            env={"HELM_DRIVER": "memory",
                                 "HELM_MEMORY_DRIVER_DATA": str(tmp_path / "releases.yaml")})
    assert upgraded.returncode == 0, upgraded.stderr
    docs = parse_documents(upgraded.stdout.partition("MANIFEST:")[2].partition("\nNOTES:")[0])
    assert docs and "<no value>" not in upgraded.stdout
    return upgraded.stdout, docs


def sidecar_config(docs: list[dict]) -> dict:
    """The sidecar.yaml the chart rendered into its ConfigMap."""
    config_map = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-config"))
    return yaml.safe_load(config_map["data"]["sidecar.yaml"])


def sidecar_env(docs: list[dict]) -> dict[str, dict]:
    """name -> valueFrom of the pathwatch container's env, over every workload running it."""
    env: dict[str, dict] = {}
    for workload in [*by_kind(docs, "Deployment"), *by_kind(docs, "StatefulSet")]:
        for container in all_containers(pod_spec(workload)):
            if container["name"] == "pathwatch":
                env.update({item["name"]: item.get("valueFrom") for item in container["env"]})
    assert env, "no pathwatch container rendered"
    return env


# Value sets every rendering test runs over: name -> (values files under examples/, --set assignments).
SCENARIOS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "sidecar-example": (("sidecar-values.yaml",), ()),
    "gateway-example": (("gateway-values.yaml",), ()),
    # gateway without persistence (a Deployment), a token from values, the demo backend exporting to it
    "gateway-deployment": ((), ("mode=gateway", "secrets.apiToken=s3cret-0123456789", "demoBackend.enabled=true",
                                "networkPolicy.enabled=true", "pathmap.content.version=1")),
    # sidecar with a classic (not native) sidecar container and the demo backend, pulling with a secret
    "sidecar-classic": ((), ("demoBackend.enabled=true", "sidecar.native=false", "imagePullSecrets={regcred}")),
}


def render_scenario(helm: Helm, chart: Path, scenario: str) -> list[dict]:
    return parse_documents(render_scenario_text(helm, chart, scenario))


def render_scenario_text(helm: Helm, chart: Path, scenario: str) -> str:
    files, sets = SCENARIOS[scenario]
    return helm.template_text(chart, *(chart / "examples" / name for name in files), sets=sets)
