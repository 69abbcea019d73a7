"""The demo backend listens on ``demoBackend.port``: the image's command says ``--port 8000``, so
another port gave a containerPort (and a Service target) nothing listened on."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helm.charting import Helm, by_kind, pod_spec

ROOT = Path(__file__).resolve().parents[2]


def backend_container(docs: list[dict]) -> dict:
    (deployment,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("demo-backend")]
    (container,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == "backend"]
    return container


def image_command() -> list[str]:
    (cmd,) = re.findall(r"^CMD (\[.*\])$", (ROOT / "examples" / "Dockerfile").read_text(), re.M)
    return json.loads(cmd)


def test_the_default_is_the_image_s_own_command(helm: Helm, chart: Path) -> None:
    container = backend_container(helm.template(chart, sets=("demoBackend.enabled=true",)))
    assert container["args"] == image_command()
    assert container["ports"][0]["containerPort"] == 8000


def test_another_port_is_the_one_the_backend_listens_on(helm: Helm, chart: Path) -> None:
    container = backend_container(helm.template(chart, sets=("demoBackend.enabled=true",
                                                             "demoBackend.port=8080")))
    args = container["args"]
    assert args[args.index("--port") + 1] == "8080" and args[:-1] == image_command()[:-1]
    assert container["ports"][0]["containerPort"] == 8080


def test_a_command_or_args_given_are_left_as_they_are(helm: Helm, chart: Path) -> None:
    given = helm.template(chart, sets=("demoBackend.enabled=true", "demoBackend.args={serve,--fast}"))
    assert backend_container(given)["args"] == ["serve", "--fast"]
    command = backend_container(helm.template(chart, sets=("demoBackend.enabled=true",
                                                           "demoBackend.command={/bin/run}")))
    assert command["command"] == ["/bin/run"] and "args" not in command
