"""The demo backend's pod has a securityContext of its own (demoBackend.podSecurityContext).

It took the sidecar's podSecurityContext: a demo backend image running as another user (or needing
another fsGroup) could only get it by changing the gateway's and every backend's sidecar pod too, and
no value set the demo backend's alone. Its default is the same locked-down context (non-root 10001,
fsGroup 10001, seccomp RuntimeDefault), which in sidecar mode also suits the sidecar sharing the pod;
a release upgraded with --reuse-values from a chart without the key keeps what it rendered before."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.charting import Helm, by_kind, pod_spec, upgrade_reusing_old_values

GATEWAY = ("mode=gateway", "secrets.apiToken=t0ken-0123456789")
LOCKED_DOWN = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
               "seccompProfile": {"type": "RuntimeDefault"}}


def pod_contexts(docs: list[dict]) -> dict[str, dict | None]:
    return {doc["metadata"]["name"]: pod_spec(doc).get("securityContext")
            for doc in [*by_kind(docs, "Deployment"), *by_kind(docs, "StatefulSet")]}


@pytest.mark.parametrize("mode", [(), GATEWAY], ids=["sidecar", "gateway"])
def test_the_default_is_locked_down(helm: Helm, chart: Path, mode: tuple[str, ...]) -> None:
    contexts = pod_contexts(helm.template(chart, sets=(*mode, "demoBackend.enabled=true")))
    assert contexts["pw-pathwatch-demo-backend"] == LOCKED_DOWN


def test_the_demo_backend_s_context_is_its_own(helm: Helm, chart: Path) -> None:
    contexts = pod_contexts(helm.template(chart, sets=(
        *GATEWAY, "demoBackend.enabled=true", "demoBackend.podSecurityContext.runAsUser=20001",
        "demoBackend.podSecurityContext.fsGroup=20001", "podSecurityContext.runAsUser=30001")))
    assert contexts["pw-pathwatch-demo-backend"] == {**LOCKED_DOWN, "runAsUser": 20001, "fsGroup": 20001}
    assert contexts["pw-pathwatch"] == {**LOCKED_DOWN, "runAsUser": 30001}   # the gateway: the sidecar's


def test_a_field_set_to_null_is_left_out(helm: Helm, chart: Path) -> None:
    # helm merges a given mapping into the default: null removes a field of it
    contexts = pod_contexts(helm.template(chart, sets=("demoBackend.enabled=true",
                                                       "demoBackend.podSecurityContext.fsGroup=null")))
    assert contexts["pw-pathwatch-demo-backend"] == {k: v for k, v in LOCKED_DOWN.items() if k != "fsGroup"}


def test_the_schema_refuses_a_context_that_is_not_a_mapping(helm: Helm, chart: Path) -> None:
    rendered = helm.run("template", "pw", chart, "--set", "demoBackend.enabled=true",
                        "--set", "demoBackend.podSecurityContext=root", check=False)
    assert rendered.returncode != 0 and "podSecurityContext" in rendered.stderr, rendered.stderr


def test_an_upgrade_reusing_values_without_the_key_keeps_the_sidecar_s_context(helm: Helm, chart: Path,
                                                                                tmp_path: Path) -> None:
    """Nil in values reused from a chart without the key: the pod keeps the context it had (the
    sidecar's podSecurityContext), not none at all (root, no seccomp)."""
    _, docs = upgrade_reusing_old_values(
        helm, chart, tmp_path, {"demoBackend": {"enabled": True}}, (), ["--set", "podSecurityContext.runAsUser=30001"],
        missing_paths=("demoBackend.podSecurityContext",))
    assert pod_contexts(docs)["pw-pathwatch-demo-backend"] == {**LOCKED_DOWN, "runAsUser": 30001}
