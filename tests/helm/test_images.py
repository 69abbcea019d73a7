"""The chart's default images are built from this repository: ``Dockerfile`` (the sidecar,
``image.repository``) and ``examples/Dockerfile`` (the demo backend, ``demoBackend.image``).

A static check, without a Docker daemon: each Dockerfile's final stage runs what the chart runs (its
command), as the user the chart's securityContext names, from packages built with extras that exist,
out of files the build context holds.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helm.charting import CHART, EXAMPLES, ROOT, Helm, all_containers, by_kind, pod_spec

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM, stages): instructions with their continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stages.append(Stage(base, words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args, stages


def dockerignored(relative: str) -> bool:
    """Whether the build context leaves ``relative`` out (.dockerignore: a pattern matching a path or
    one of its parent directories; ``**/`` at any depth; no ``!`` exceptions are used)."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(relative).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern)
               or (pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rpartition("/")[2], pattern[3:]))
               for pattern in patterns for prefix in prefixes)


def extras_installed(stage: Stage) -> list[str]:
    return [extra for run in stage.all("RUN") for extra in re.findall(r'pip install "\.\[([\w,-]+)\]"', run)]


IMAGES = {  # Dockerfile -> which image of the chart it builds
    "Dockerfile": "sidecar",
    "examples/Dockerfile": "demo-backend",
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The containers the chart runs these images in (the sidecar example: demo backend + sidecar)."""
    from tests.helm.charting import HELM_BINARIES
    helm = Helm(HELM_BINARIES["helm3"], tmp_path_factory.mktemp("helm3-home"))
    docs = helm.template(CHART, EXAMPLES / "sidecar-values.yaml")
    [deployment] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-demo-backend")]
    spec = pod_spec(deployment)
    containers = {c["name"]: c for c in all_containers(spec)}
    return {"sidecar": containers["pathwatch"], "demo-backend": containers["backend"], "pod": spec}


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_the_image_runs_the_charts_command_as_the_charts_user(dockerfile: str, rendered: dict) -> None:
    _, stages = parse_dockerfile(ROOT / dockerfile)
    final = stages[-1]
    container = rendered[IMAGES[dockerfile]]
    # CMD: what `docker run IMAGE` does is what the chart's pod does (the chart sets `command`)
    assert json.loads(final.last("CMD")) == container["command"]
    assert not final.all("ENTRYPOINT")   # the chart's command replaces CMD alone: no entrypoint prefixed
    # USER: numeric (runAsNonRoot can only be verified for a numeric user) and the chart's user/group
    user, _, group = final.last("USER").partition(":")
    context = container["securityContext"]
    assert (int(user), int(group)) == (context["runAsUser"], context["runAsGroup"])
    assert (int(user), int(group)) == (VALUES["securityContext"]["runAsUser"],
                                       VALUES["securityContext"]["runAsGroup"])
    assert rendered["pod"]["securityContext"]["runAsUser"] == int(user)
    # the user exists in the image (a name for logs and tools), with that id
    created = " ".join(final.all("RUN"))
    assert f"--uid {user}" in created and f"--gid {group}" in created
    # the command's program is on the PATH of the installed venv
    env = " ".join(final.all("ENV"))
    venv = re.search(r"PATH=(\S+)/bin:\$PATH", env).group(1)
    assert any(f"--from=build {venv}" in copy for copy in final.all("COPY"))


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_the_image_installs_the_package_from_the_build_context(dockerfile: str) -> None:
    args, stages = parse_dockerfile(ROOT / dockerfile)
    # a slim Python the package supports (requires-python >=3.11), the same in every stage
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"]), args
    assert {stage.base for stage in stages} == {args["PYTHON_IMAGE"]}
    build = stages[0]
    # every package the build finds (pyproject packages.find) and the readme it needs are copied
    copied = {src.rstrip("/") for copy in build.all("COPY") for src in copy.split()[:-1]}
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    for stage in stages:
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            for source in copy.split()[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: not in the repository"
                assert not dockerignored(source.rstrip("/")), f"{dockerfile}: COPY {source}: .dockerignore drops it"
    # the extras exist
    extras = extras_installed(build)
    assert extras, f"{dockerfile}: no `pip install \".[extra]\"`"
    for extra in extras:
        assert set(extra.split(",")) <= set(PYPROJECT["project"]["optional-dependencies"]), extra


def test_the_sidecar_image_has_the_sidecar_extra_and_its_data_directory() -> None:
    _, stages = parse_dockerfile(ROOT / "Dockerfile")
    # without the extra `pathwatch sidecar` fails at import (httpx, grpc, prometheus_client)
    assert extras_installed(stages[0]) == ["sidecar"]
    final = stages[-1]
    mount = VALUES["persistence"]["mountPath"]
    assert final.last("WORKDIR") == mount
    assert f"chown {VALUES['securityContext']['runAsUser']}:{VALUES['securityContext']['runAsGroup']} {mount}" \
        in " ".join(final.all("RUN"))
    exposed = {int(port) for ports in final.all("EXPOSE") for port in ports.split()}
    assert exposed == set(VALUES["ports"].values())


def test_the_demo_backend_image_is_a_backend_image_with_only_pathwatch() -> None:
    """README step 2: the backend image has the pathwatch package, not opentelemetry-distro; the
    chart's backend env (PATHWATCH_OTLP_ENDPOINT) is what makes its spans leave."""
    _, stages = parse_dockerfile(ROOT / "examples" / "Dockerfile")
    [extra] = extras_installed(stages[0])
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert extra == "demo"
    requirements = " ".join(PYPROJECT["project"]["dependencies"] + optional[extra])
    assert "opentelemetry-distro" not in requirements
    for needed in ("fastapi", "uvicorn", "websockets"):
        assert needed in requirements
    final = stages[-1]
    # the app is no part of the package: copied into the working directory `python -m` imports from
    assert final.last("WORKDIR") == "/app"
    assert any(copy.split() == ["examples/", "examples/"] for copy in final.all("COPY"))
    demo_port = VALUES["demoBackend"]["port"]
    assert {int(p) for ports in final.all("EXPOSE") for p in ports.split()} == {demo_port}


def test_the_chart_readme_says_how_to_build_and_use_the_images() -> None:
    readme = (CHART / "README.md").read_text()
    for repository, dockerfile in ((VALUES["image"]["repository"], ""),
                                   (VALUES["demoBackend"]["image"]["repository"], "-f examples/Dockerfile ")):
        assert f"docker build {dockerfile}-t {repository}:{APP_VERSION} ." in readme
    assert "--set image.repository=" in readme and "--set demoBackend.image.repository=" in readme
    assert ".cache/helm3/helm" in readme   # scripts/setup.sh puts helm there, not on PATH


def test_the_build_context_leaves_the_local_state_out() -> None:
    for local in (".venv", ".cache", ".git", "pathwatch-incidents.sqlite", "sidecar/__pycache__"):
        assert dockerignored(local), local
    for needed in ("pyproject.toml", "README.md", "instrumentation", "sidecar", "examples"):
        assert not dockerignored(needed), needed
