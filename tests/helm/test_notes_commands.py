"""The commands NOTES.txt prints work as printed.

The token command's jsonpath was `{.data.<secrets.apiTokenKey>}`: a key with a dot (a Secret's key may
hold one, e.g. `pathwatch.token`) was read by kubectl as a path into nested fields, found nothing, and
PATHWATCH_API_TOKEN was silently empty (the report then answered 401). kubectl's jsonpath takes such a
key with its dots escaped, `{.data.pathwatch\\.token}`. The jsonpath is evaluated here by kubectl itself
(`--local`: no cluster) on the Secret the chart renders. In sidecar mode with service.enabled false the
port-forward line was `port-forward svc/<name> (service disabled: use a pod) 9464`, which is no command
and names a Service that does not exist: it now forwards from a backend pod found by its labels."""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helm.charting import ROOT, Helm, by_kind, one
from tests.helm.test_including_chart import render_notes

TOKEN = "t0ken-0123456789-notes"
# scripts/setup.sh helm puts kubectl beside helm 4 (from the same npm package); one on PATH serves too
_CACHED_KUBECTL = ROOT / ".cache" / "helm4" / "kubectl"
KUBECTL = str(_CACHED_KUBECTL) if _CACHED_KUBECTL.is_file() else shutil.which("kubectl")


def notes_command(notes: str, pattern: str) -> str:
    [line] = [line.strip() for line in notes.splitlines() if re.search(pattern, line)]
    return line


def jsonpath_of_the_token_command(notes: str) -> tuple[str, str]:
    """(the Secret's name, the jsonpath) of the printed `export PATHWATCH_API_TOKEN=...` line."""
    line = notes_command(notes, r"^\s*export PATHWATCH_API_TOKEN=")
    match = re.fullmatch(r"export PATHWATCH_API_TOKEN=\$\((.*) \| base64 -d\)", line)
    assert match, line
    words = shlex.split(match.group(1))   # the shell's reading: quotes removed, backslashes kept inside ''
    assert words[:5] == ["kubectl", "-n", "observed", "get", "secret"] and words[6] == "-o", words
    assert words[7].startswith("jsonpath="), words
    return words[5], words[7].removeprefix("jsonpath=")


def kubectl_jsonpath(secret: dict, jsonpath: str, tmp_path: Path) -> str:
    """What `kubectl get secret -o jsonpath=...` prints for this Secret: kubectl's own jsonpath,
    offline (`label --local` prints the object it read, with a label added)."""
    if KUBECTL is None:  # a failure, not a skip: `make test` sets it up
        pytest.fail("kubectl is neither in .cache/helm4 nor on PATH: run `scripts/setup.sh helm`")
    manifest = tmp_path / "secret.yaml"
    manifest.write_text(yaml.safe_dump(secret))
    result = subprocess.run([KUBECTL, "label", "--local", "-f", str(manifest), "probe=1", "-o",
                             f"jsonpath={jsonpath}"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "KUBECONFIG": os.devnull})
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("key", ["api-token", "pathwatch.token", "api.token.v2", "API_token"])
@pytest.mark.parametrize("mode", [(), ("mode=gateway",)], ids=["sidecar", "gateway"])
def test_the_token_command_reads_the_token_from_the_chart_s_secret(helm: Helm, chart: Path, tmp_path: Path,
                                                                   key: str, mode: tuple[str, ...]) -> None:
    sets = (*mode, f"secrets.apiToken={TOKEN}", f"secrets.apiTokenKey={key}")
    notes = render_notes(helm, chart, tmp_path, *sets)
    name, jsonpath = jsonpath_of_the_token_command(notes)
    secret = one(helm.template(chart, sets=sets), "Secret")
    assert name == secret["metadata"]["name"]
    printed = kubectl_jsonpath(secret, jsonpath, tmp_path)
    assert printed and base64.b64decode(printed).decode() == TOKEN, (jsonpath, printed)


def test_the_token_command_names_an_existing_secret(helm: Helm, chart: Path, tmp_path: Path) -> None:
    notes = render_notes(helm, chart, tmp_path, "secrets.existingSecret=mine", "secrets.apiTokenKey=pw.token")
    assert jsonpath_of_the_token_command(notes) == ("mine", r"{.data.pw\.token}")


@pytest.mark.parametrize("mode", [(), ("mode=gateway", f"secrets.apiToken={TOKEN}")], ids=["sidecar", "gateway"])
def test_the_port_forward_goes_to_the_chart_s_service_and_api_port(helm: Helm, chart: Path, tmp_path: Path,
                                                                   mode: tuple[str, ...]) -> None:
    notes = render_notes(helm, chart, tmp_path, *mode, "ports.api=9555")
    words = shlex.split(notes_command(notes, r"port-forward"))
    assert words[:4] == ["kubectl", "-n", "observed", "port-forward"] and len(words) == 6, words
    kind, _, name = words[4].partition("/")
    service = next(s for s in by_kind(helm.template(chart, sets=(*mode, "ports.api=9555")), "Service")
                   if s["metadata"]["name"] == name)
    assert kind == "svc" and words[5] == "9555"
    assert 9555 in [p["port"] for p in service["spec"]["ports"] if p["name"] == "pathwatch-api"]
    assert notes_command(notes, r"pathwatch report") == "pathwatch report --api http://127.0.0.1:9555"


@pytest.mark.parametrize("selector", [(), ("backendSelector.app=shop", "backendSelector.tier=web")],
                         ids=["default", "backendSelector"])
def test_without_the_service_the_port_forward_finds_a_backend_pod(helm: Helm, chart: Path, tmp_path: Path,
                                                                  selector: tuple[str, ...]) -> None:
    sets = ("service.enabled=false", "demoBackend.enabled=true", *selector)
    notes = render_notes(helm, chart, tmp_path, *sets)
    line = notes_command(notes, r"port-forward")
    assert "(" not in line.replace("$(", ""), line
    match = re.fullmatch(r'kubectl -n observed port-forward "\$\((.*)\)" 9464', line)
    assert match, line
    words = shlex.split(match.group(1).replace(" | head -n 1", ""))
    assert words[:6] == ["kubectl", "-n", "observed", "get", "pods", "-l"] and words[7:] == ["-o", "name"], words
    wanted = dict(pair.split("=", 1) for pair in words[6].split(","))
    demo = next(d for d in by_kind(helm.template(chart, sets=sets), "Deployment"))
    assert wanted and wanted.items() <= demo["spec"]["template"]["metadata"]["labels"].items()
    assert not [s for s in by_kind(helm.template(chart, sets=sets), "Service")]


@pytest.mark.parametrize("kind", ["LoadBalancer", "NodePort"])
def test_a_gateway_service_outside_the_cluster_is_warned_of(helm: Helm, chart: Path, tmp_path: Path,
                                                           kind: str) -> None:
    # the OTLP receivers take no token: whoever reaches them can make findings and pages
    gateway = ("mode=gateway", f"secrets.apiToken={TOKEN}")
    notes = render_notes(helm, chart, tmp_path, *gateway, f"gateway.service.type={kind}")
    assert f"WARNING: gateway.service.type is {kind}: the OTLP receivers take no token" in notes
    assert "networkPolicy.enabled=true" in notes
    assert "WARNING" not in render_notes(helm, chart, tmp_path, *gateway)
