"""Each variable once in a container's env.

A second entry of one name in a container's env is resolved to the last one by the kubelet, but
refused by server-side apply ("duplicate entries for key [name=...]"), with which helm 4 installs by
default (Argo CD and Flux may use it too): the release fails. The chart refuses such a repeat in
sidecar.extraEnv at render; demoBackend.env repeated what the chart sets in the demo backend's
container (the pathwatch.backendEnv variables, OTEL_SERVICE_NAME) as a second entry: an entry of
demoBackend.env now takes the place of the chart's of that name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.charting import SCENARIOS, Helm, all_containers, by_kind, pod_spec, render_scenario

GATEWAY = ("mode=gateway", "secrets.apiToken=t0ken-0123456789")


def containers(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{doc['metadata']['name']}/{container['name']}", container)
            for doc in [*by_kind(docs, "Deployment"), *by_kind(docs, "StatefulSet")]
            for container in all_containers(pod_spec(doc))]


def repeated_names(container: dict) -> list[str]:
    names = [item["name"] for item in container.get("env", [])]
    return sorted({name for name in names if names.count(name) > 1})


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_container_of_a_scenario_repeats_a_variable(helm: Helm, chart: Path, scenario: str) -> None:
    assert {where: repeated_names(c) for where, c in containers(render_scenario(helm, chart, scenario))
            if repeated_names(c)} == {}


@pytest.mark.parametrize("mode", [(), GATEWAY], ids=["sidecar", "gateway"])
def test_an_entry_of_demo_backend_env_takes_the_place_of_the_charts(helm: Helm, chart: Path,
                                                                    mode: tuple[str, ...]) -> None:
    docs = helm.template(chart, sets=(
        *mode, "demoBackend.enabled=true",
        "demoBackend.env[0].name=OTEL_SERVICE_NAME", "demoBackend.env[0].value=shop-demo",
        "demoBackend.env[1].name=OTEL_TRACES_EXPORTER", "demoBackend.env[1].value=otlp",
        "demoBackend.env[2].name=LOG_LEVEL", "demoBackend.env[2].value=debug"))
    [(_, backend)] = [(w, c) for w, c in containers(docs) if w == "pw-pathwatch-demo-backend/backend"]
    assert repeated_names(backend) == []
    env = {item["name"]: item for item in backend["env"]}
    assert env["OTEL_SERVICE_NAME"]["value"] == "shop-demo"
    assert env["OTEL_TRACES_EXPORTER"]["value"] == "otlp"
    assert env["LOG_LEVEL"]["value"] == "debug"
    # the chart's other variables stay, in their order, before the given ones
    names = [item["name"] for item in backend["env"]]
    assert names[:2] == ["PATHWATCH_HMAC_KEY", "PATHWATCH_OTLP_ENDPOINT"]
    assert names[-3:] == ["OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER", "LOG_LEVEL"]
    assert env["PATHWATCH_HMAC_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "hmac-key"


def test_without_demo_backend_env_the_demo_backend_gets_the_charts_variables(helm: Helm, chart: Path) -> None:
    docs = helm.template(chart, sets=("demoBackend.enabled=true", "pathmap.content.version=1"))
    [(_, backend)] = [(w, c) for w, c in containers(docs) if w == "pw-pathwatch-demo-backend/backend"]
    assert [item["name"] for item in backend["env"]] == [
        "PATHWATCH_HMAC_KEY", "PATHWATCH_PATHMAP", "PATHWATCH_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER", "OTEL_SERVICE_NAME"]
