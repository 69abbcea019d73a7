"""sidecar.native against the cluster's Kubernetes version (helm's .Capabilities.KubeVersion).

A native sidecar is an init container with ``restartPolicy: Always``: Kubernetes 1.29 and later
(beta, on by default). Before, the API server drops the field (unknown before 1.28, behind the
SidecarContainers gate, off by default, in 1.28) and then refuses the pod, whose init container
carries the sidecar's probes ("may not be set for init containers"): in sidecar mode the backend's
own Deployment is refused, its release fails on a message that names no value. The chart's
kubeVersion (>=1.25) admits those clusters for the classic sidecar, so it refuses sidecar.native
there at render, naming the value and the version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.charting import EXAMPLES, Helm, all_containers, by_kind, parse_documents, pod_spec


def render(helm: Helm, chart: Path, kube_version: str, *sets: str, values: tuple[Path, ...] = ()):
    args: list = ["template", "pw", chart, "--namespace", "observed", "--kube-version", kube_version]
    for path in values:
        args += ["--values", path]
    for assignment in sets:
        args += ["--set", assignment]
    return helm.run(*args, check=False)


def sidecar_containers(text: str) -> list[tuple[str, dict]]:
    """(where, container) of the pathwatch container of every workload: initContainers or containers."""
    found = []
    for doc in parse_documents(text):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            spec = pod_spec(doc)
            found += [("initContainers", c) for c in spec.get("initContainers", []) if c["name"] == "pathwatch"]
            found += [("containers", c) for c in spec["containers"] if c["name"] == "pathwatch"]
    return found


@pytest.mark.parametrize("kube_version", ["1.25.0", "1.27.16", "1.28.15"])
def test_a_native_sidecar_is_refused_before_kubernetes_1_29(helm: Helm, chart: Path, kube_version: str) -> None:
    result = render(helm, chart, kube_version, values=(EXAMPLES / "sidecar-values.yaml",))
    assert result.returncode != 0
    assert "sidecar.native" in result.stderr and f"v{kube_version}" in result.stderr
    assert "1.29" in result.stderr and "sidecar.native false" in result.stderr


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.30.4", "1.33.1"])
def test_a_native_sidecar_renders_from_kubernetes_1_29(helm: Helm, chart: Path, kube_version: str) -> None:
    result = render(helm, chart, kube_version, values=(EXAMPLES / "sidecar-values.yaml",))
    assert result.returncode == 0, result.stderr
    [(where, container)] = sidecar_containers(result.stdout)
    assert where == "initContainers" and container["restartPolicy"] == "Always"


def test_a_classic_sidecar_and_a_gateway_render_on_an_older_kubernetes(helm: Helm, chart: Path) -> None:
    classic = render(helm, chart, "1.25.0", "sidecar.native=false", values=(EXAMPLES / "sidecar-values.yaml",))
    assert classic.returncode == 0, classic.stderr
    [(where, container)] = sidecar_containers(classic.stdout)
    assert where == "containers" and "restartPolicy" not in container
    # in gateway mode sidecar.native changes nothing: the gateway's pods run the sidecar as a container
    gateway = render(helm, chart, "1.25.0", "mode=gateway", "sidecar.native=true",
                     "secrets.apiToken=t0ken-0123456789abcdef")
    assert gateway.returncode == 0, gateway.stderr
    workloads = by_kind(parse_documents(gateway.stdout), "Deployment")
    assert [c["name"] for c in all_containers(pod_spec(workloads[0]))] == ["pathwatch"]
