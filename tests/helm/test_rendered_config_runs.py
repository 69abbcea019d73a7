"""The real sidecar runs on what the chart renders: its config, its token wiring, its probe paths."""

from __future__ import annotations

import base64
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from sidecar.testing import SidecarProcess
from tests.helm.charting import ROOT, Helm, by_kind, one, pod_spec, sidecar_config
from tests.support import free_port

PYTHON = ROOT / ".venv" / "bin" / "python"  # its pathwatch console script runs the sidecar


def render(helm: Helm, chart: Path, mode: str, data_dir: Path,
           *more: str) -> tuple[dict, dict, list[dict]]:
    """(sidecar.yaml, ports, rendered objects) for a mode, on free ports and a temporary data dir."""
    ports = {"otlpGrpc": free_port(), "otlpHttp": free_port(), "api": free_port()}
    sets = [f"mode={mode}", "secrets.apiToken=t0ken-from-values", "demoBackend.enabled=true",
            f"persistence.mountPath={data_dir}", *(f"ports.{name}={port}" for name, port in ports.items()),
            *more]
    docs = helm.template(chart, sets=tuple(sets))
    return sidecar_config(docs), ports, docs


def token_env_of_the_sidecar(docs: list[dict]) -> dict[str, str]:
    """Resolve the sidecar container's env the way the kubelet would, from the rendered Secret."""
    secret = one(docs, "Secret")
    env = {}
    for workload in by_kind(docs, "Deployment"):
        for container in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", []):
            if container["name"] != "pathwatch":
                continue
            for item in container["env"]:
                ref = item["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"]
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert env
    return env


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator:
    """Start ``pathwatch sidecar`` (the chart's command) on a rendered config, without waiting."""
    started: list[SidecarProcess] = []

    def start(config: dict, env: dict[str, str]) -> SidecarProcess:
        # the rendered config's own ports (chosen free in render) are used as given
        sidecar = SidecarProcess(config, state_dir=tmp_path, env=env, python=str(PYTHON),
                                 console_script=True, name=f"sidecar-{len(started)}")
        started.append(sidecar)
        return sidecar.start()

    yield start
    for sidecar in started:
        sidecar.stop(timeout=20)


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_the_sidecar_serves_probes_metrics_and_a_guarded_api(helm: Helm, chart: Path, tmp_path: Path,
                                                             start_sidecar, mode: str) -> None:
    config, ports, docs = render(helm, chart, mode, tmp_path / "data")
    (tmp_path / "data").mkdir()
    env = token_env_of_the_sidecar(docs)
    assert env == {"PATHWATCH_API_TOKEN": "t0ken-from-values"}
    sidecar = start_sidecar(config, env)
    process = sidecar.process
    api = f"http://127.0.0.1:{ports['api']}"
    sidecar.wait_ready(timeout=30)
    assert process.poll() is None, sidecar.log()
    assert httpx.get(f"{api}/healthz", timeout=2).status_code == 200
    metrics = httpx.get(f"{api}/metrics", timeout=2)          # what the PodMonitor/ServiceMonitor scrape
    assert metrics.status_code == 200 and "pathwatch_" in metrics.text
    assert httpx.get(f"{api}/api/v1/incidents", timeout=2).status_code == 401
    authorized = httpx.get(f"{api}/api/v1/incidents", timeout=2,
                           headers={"Authorization": f"Bearer {env['PATHWATCH_API_TOKEN']}"})
    assert authorized.status_code == 200
    assert Path(config["incidents"]["path"]).parent == tmp_path / "data"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def test_with_an_ipv6_listen_address_the_gateway_serves_ipv6_and_ipv4(helm: Helm, chart: Path, tmp_path: Path,
                                                                      start_sidecar) -> None:
    """sidecar.listenAddress "::" (an IPv6 or dual-stack cluster): the sidecar starts on the rendered
    "[::]:PORT" endpoints and answers over IPv6 and IPv4, API and receivers alike."""
    import socket

    config, ports, docs = render(helm, chart, "gateway", tmp_path / "data", "sidecar.listenAddress=::")
    (tmp_path / "data").mkdir()
    assert config["api"]["endpoint"] == f"[::]:{ports['api']}"
    sidecar = start_sidecar(config, token_env_of_the_sidecar(docs))
    sidecar.wait_ready(timeout=30)
    for host in ("[::1]", "127.0.0.1"):
        assert httpx.get(f"http://{host}:{ports['api']}/healthz", timeout=2).status_code == 200
        assert httpx.post(f"http://{host}:{ports['otlpHttp']}/v1/traces", content=b"", timeout=2,
                          headers={"Content-Type": "application/x-protobuf"}).status_code == 200
    with socket.create_connection(("::1", ports["otlpGrpc"]), timeout=2):
        pass
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(timeout=30) == 0


def test_the_webhook_url_of_the_secret_reaches_the_sidecar_through_its_env(helm: Helm, chart: Path,
                                                                          tmp_path: Path, start_sidecar) -> None:
    """secrets.webhookUrl: the rendered config names PATHWATCH_WEBHOOK_URL, the env resolved from the
    rendered Secret holds the URL, and the sidecar pages there (its start log, the path redacted)."""
    url = "http://127.0.0.1:9/services/T0/B0/XXXXWEBHOOKSECRETXXXX"
    config, _, docs = render(helm, chart, "sidecar", tmp_path / "data", f"secrets.webhookUrl={url}")
    (tmp_path / "data").mkdir()
    env = token_env_of_the_sidecar(docs)
    assert env["PATHWATCH_WEBHOOK_URL"] == url and "XXXXWEBHOOKSECRETXXXX" not in yaml.safe_dump(config)
    sidecar = start_sidecar(config, env)
    sidecar.wait_ready(timeout=30)
    assert "critical incidents are pushed to webhook http://127.0.0.1:9/…" in sidecar.log()
    assert "XXXXWEBHOOKSECRETXXXX" not in sidecar.log()
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(timeout=30) == 0
    # the variable unset (a Secret without the key): refused at start, naming it
    refused = start_sidecar(config, {"PATHWATCH_API_TOKEN": env["PATHWATCH_API_TOKEN"]})
    assert refused.process.wait(timeout=30) == 2
    assert "alerting.webhook_url_env: the environment variable PATHWATCH_WEBHOOK_URL is not set" in refused.log()


def test_without_the_token_the_sidecar_refuses_to_start(helm: Helm, chart: Path, tmp_path: Path,
                                                        start_sidecar) -> None:
    # why the chart always wires a token: its API endpoint is never loopback-only
    config, _, _ = render(helm, chart, "sidecar", tmp_path / "data")
    (tmp_path / "data").mkdir()
    env = {"PATHWATCH_API_TOKEN": ""}
    sidecar = start_sidecar(config, env)
    assert sidecar.process.wait(timeout=30) != 0
    assert "PATHWATCH_API_TOKEN" in sidecar.log()


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_with_monitoring_authorize_metrics_need_the_token_the_monitor_sends(
        helm: Helm, chart: Path, tmp_path: Path, start_sidecar, mode: str) -> None:
    config, ports, docs = render(helm, chart, mode, tmp_path / "data", "monitoring.authorize=true")
    (tmp_path / "data").mkdir()
    assert config["api"]["metrics_requires_token"] is True
    # the token Prometheus sends: the monitor's authorization credentials, from the rendered Secret
    [monitor] = by_kind(docs, "PodMonitor") + by_kind(docs, "ServiceMonitor")
    spec = monitor["spec"]
    [endpoint] = spec.get("podMetricsEndpoints", []) + spec.get("endpoints", [])
    credentials = endpoint["authorization"]["credentials"]
    secret = one(docs, "Secret")
    assert credentials["name"] == secret["metadata"]["name"]
    scrape_token = base64.b64decode(secret["data"][credentials["key"]]).decode()
    sidecar = start_sidecar(config, token_env_of_the_sidecar(docs))
    sidecar.wait_ready(timeout=30)
    api = f"http://127.0.0.1:{ports['api']}"
    for probe in ("/healthz", "/readyz"):  # the kubelet's probes carry no token
        assert httpx.get(f"{api}{probe}", timeout=2).status_code == 200, probe
    assert httpx.get(f"{api}/metrics", timeout=2).status_code == 401
    scraped = httpx.get(f"{api}/metrics", timeout=2, headers={"Authorization": f"Bearer {scrape_token}"})
    assert scraped.status_code == 200 and "pathwatch_" in scraped.text


def test_alertmanager_basic_auth_reaches_the_sidecar_through_a_variable_of_extra_env(
        helm: Helm, chart: Path, tmp_path: Path, start_sidecar) -> None:
    """config.alerting.alertmanager_username / _password_env render into the config, the password's
    variable comes from sidecar.extraEnv (a Secret of the user's), and the sidecar starts with it."""
    config, _, docs = render(
        helm, chart, "sidecar", tmp_path / "data", "config.alerting.alertmanager_url=http://127.0.0.1:9",
        "config.alerting.alertmanager_username=pathwatch",
        "config.alerting.alertmanager_password_env=AM_PASSWORD",
        "sidecar.extraEnv[0].name=AM_PASSWORD",
        "sidecar.extraEnv[0].valueFrom.secretKeyRef.name=alertmanager-auth",
        "sidecar.extraEnv[0].valueFrom.secretKeyRef.key=password")
    (tmp_path / "data").mkdir()
    assert config["alerting"]["alertmanager_password_env"] == "AM_PASSWORD"
    (workload,) = [w for w in by_kind(docs, "Deployment")
                   if any(c["name"] == "pathwatch" for c in pod_spec(w)["containers"]
                          + pod_spec(w).get("initContainers", []))]
    container = next(c for c in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", [])
                     if c["name"] == "pathwatch")
    assert {"name": "AM_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "alertmanager-auth",
                                                                  "key": "password"}}} in container["env"]
    env = {"PATHWATCH_API_TOKEN": "t0ken-from-values", "AM_PASSWORD": "XXXXAMPASSWORDXXXX\n"}
    sidecar = start_sidecar(config, env)
    sidecar.wait_ready(timeout=30)
    assert "pushed to Alertmanager http://127.0.0.1:9 (basic auth as pathwatch)" in sidecar.log()
    assert "XXXXAMPASSWORDXXXX" not in sidecar.log()
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(timeout=30) == 0


@pytest.mark.parametrize(("secret_key", "username", "logged"), [
    ("alertmanagerPassword", "pathwatch", "(basic auth as pathwatch)"),
    ("alertmanagerBearerToken", "", "(bearer token)"),
], ids=["password", "bearer-token"])
@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_alertmanager_credentials_of_the_chart_s_secret_reach_the_sidecar(
        helm: Helm, chart: Path, tmp_path: Path, start_sidecar, mode: str, secret_key: str, username: str,
        logged: str) -> None:
    """secrets.alertmanagerPassword / alertmanagerBearerToken: kept in the rendered Secret, the chart sets
    the config's *_env to its variable, and the sidecar, on the rendered config with its env resolved
    from the rendered Secret as the kubelet would, starts with the credential, never logging it."""
    secret = "XXXXAMSECRETXXXX"
    config, _, docs = render(helm, chart, mode, tmp_path / "data", "config.alerting.alertmanager_url=http://127.0.0.1:9",
                             f"secrets.{secret_key}={secret}",
                             *([f"config.alerting.alertmanager_username={username}"] if username else []))
    (tmp_path / "data").mkdir()
    env = token_env_of_the_sidecar(docs)
    variable = "PATHWATCH_ALERTMANAGER_PASSWORD" if username else "PATHWATCH_ALERTMANAGER_BEARER_TOKEN"
    assert env == {"PATHWATCH_API_TOKEN": "t0ken-from-values", variable: secret}
    assert secret not in yaml.safe_dump(config)
    sidecar = start_sidecar(config, env)
    sidecar.wait_ready(timeout=30)
    assert f"pushed to Alertmanager http://127.0.0.1:9 {logged}" in sidecar.log()
    assert secret not in sidecar.log()
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(timeout=30) == 0


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_a_token_given_with_surrounding_whitespace_is_the_one_the_monitor_sends(
        helm: Helm, chart: Path, tmp_path: Path, start_sidecar, mode: str) -> None:
    """`--set-file secrets.apiToken=token.txt` gives the file's line break too. The chart takes it (the
    sidecar strips PATHWATCH_API_TOKEN), but the chart's Secret kept it, and the monitor's
    authorization sends the Secret's value as it is: "Bearer <token>\\n" is no valid header
    (Prometheus: "invalid header field value"), nothing was scraped and PathwatchSidecarAbsent fired.
    The Secret holds the token as the sidecar reads it."""
    token_file = tmp_path / "token.txt"
    token_file.write_text(" t0ken-from-a-file-0123\n")
    ports = {"otlpGrpc": free_port(), "otlpHttp": free_port(), "api": free_port()}
    data = tmp_path / "data"
    data.mkdir()
    args = ["template", "pw", chart, "--namespace", "observed", "--set-file", f"secrets.apiToken={token_file}"]
    for assignment in (f"mode={mode}", "demoBackend.enabled=true", "monitoring.authorize=true",
                       f"persistence.mountPath={data}", *(f"ports.{n}={p}" for n, p in ports.items())):
        args += ["--set", assignment]
    docs = [d for d in yaml.safe_load_all(helm.run(*args).stdout) if d]
    [monitor] = by_kind(docs, "PodMonitor") + by_kind(docs, "ServiceMonitor")
    spec = monitor["spec"]
    [endpoint] = spec.get("podMetricsEndpoints", []) + spec.get("endpoints", [])
    secret = one(docs, "Secret")
    scrape_token = base64.b64decode(secret["data"][endpoint["authorization"]["credentials"]["key"]]).decode()
    assert scrape_token == "t0ken-from-a-file-0123"
    sidecar = start_sidecar(sidecar_config(docs), token_env_of_the_sidecar(docs))
    sidecar.wait_ready(timeout=30)
    scraped = httpx.get(f"http://127.0.0.1:{ports['api']}/metrics", timeout=2,
                        headers={"Authorization": f"Bearer {scrape_token}"})
    assert scraped.status_code == 200 and "pathwatch_" in scraped.text
