"""The address the sidecar listens on for the pod's network (sidecar.listenAddress): IPv6 clusters too.

The chart wrote 0.0.0.0 into api.endpoint (both modes) and the gateway's receiver endpoints, and no
value changed it: in an IPv6-only cluster the kubelet's probes, Prometheus and (gateway mode) the
exporters reach the pod's IPv6 address, where nothing listened. An IPv6 address joined with a port must
be bracketed ("[::]:9464"): the sidecar refuses ":::9464" at start (exit 2, sidecar/config.py
_check_endpoint), so the chart writes the brackets itself and values.schema.json takes an IP address
only, the forms the sidecar's parser takes."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from sidecar.config import parse_config
from tests.helm.charting import CHART, Helm, parse_documents, sidecar_config, upgrade_reusing_old_values
from tests.helm.test_values_schema import check_jsonschema

GATEWAY = ("mode=gateway", "secrets.apiToken=t0ken-0123456789")


def render_with(helm: Helm, tmp_path: Path, address: str, *sets: str) -> subprocess.CompletedProcess[str]:
    # JSON values: the address reaches helm exactly (--set would split or type some of them)
    values = tmp_path / "listen.json"
    values.write_text(json.dumps({"sidecar": {"listenAddress": address}}))
    args: list[str | Path] = ["template", "pw", CHART, "--values", values]
    for assignment in sets:
        args += ["--set", assignment]
    return helm.run(*args, check=False)


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_the_default_listens_on_every_ipv4_address_as_before(helm: Helm, chart: Path, mode: str) -> None:
    config = sidecar_config(helm.template(chart, sets=(f"mode={mode}", GATEWAY[1])))
    assert config["api"]["endpoint"] == "0.0.0.0:9464"
    receivers = "0.0.0.0" if mode == "gateway" else "127.0.0.1"   # sidecar mode: the pod's loopback
    assert (config["receiver"]["grpc_endpoint"], config["receiver"]["http_endpoint"]) == (
        f"{receivers}:4317", f"{receivers}:4318")


@pytest.mark.parametrize(("address", "host"), [("::", "[::]"), ("fd00::1", "[fd00::1]"),
                                               ("::ffff:10.0.0.1", "[::ffff:10.0.0.1]"), ("10.1.2.3", "10.1.2.3")])
@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_an_ipv6_listen_address_is_bracketed_and_the_sidecar_takes_the_config(
        helm: Helm, tmp_path: Path, mode: str, address: str, host: str) -> None:
    rendered = render_with(helm, tmp_path, address, f"mode={mode}", GATEWAY[1])
    assert rendered.returncode == 0, rendered.stderr
    config = sidecar_config(parse_documents(rendered.stdout))
    assert config["api"]["endpoint"] == f"{host}:9464"
    if mode == "gateway":
        assert config["receiver"]["grpc_endpoint"] == f"{host}:4317"
        assert config["receiver"]["http_endpoint"] == f"{host}:4318"
    else:  # the backend exports to 127.0.0.1 in its own pod (pathwatch.backendEnv): loopback stays
        assert config["receiver"]["grpc_endpoint"] == "127.0.0.1:4317"
    parse_config(config, source="rendered sidecar.yaml")   # the sidecar's own parser: no exit 2


# (a loopback address is an IP address the schema takes, but the chart refuses it: LOOPBACK below)
ACCEPTED = ["0.0.0.0", "10.1.2.3", "::", "fd00::1", "2001:db8::1:0", "1:2:3:4:5:6:7:8", "1::",
            "::ffff:10.0.0.1", "FD00::A", "1::1", "0::2", "128.0.0.1", "::ffff:128.0.0.1"]
# not an IP address (the sidecar takes a host name, a listen address is the pod's own), already joined
# with a port or bracketed (the chart brackets it), malformed, or with a zone
REFUSED = ["", "localhost", "0.0.0.0:80", "[::]", "[::", "1::2::3", "::g", ":::", "256.0.0.1", "01.2.3.4",
           "1:2:3:4:5:6:7:8:9", "fe80::1%eth0", " ::", "::1 ", "0.0.0.0\n"]


@pytest.mark.parametrize("address", ACCEPTED)
def test_the_schema_takes_an_ip_address(helm: Helm, tmp_path: Path, address: str) -> None:
    ipaddress.ip_address(address)  # the premise
    rendered = render_with(helm, tmp_path, address)
    assert rendered.returncode == 0, rendered.stderr
    parse_config(sidecar_config(parse_documents(rendered.stdout)), source="rendered sidecar.yaml")
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"sidecar": {"listenAddress": address}}))
    checked = check_jsonschema(values)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("address", REFUSED, ids=ascii)
def test_the_schema_refuses_what_is_not_an_ip_address(helm: Helm, tmp_path: Path, address: str) -> None:
    rendered = render_with(helm, tmp_path, address)
    assert rendered.returncode != 0 and "listenAddress" in rendered.stderr, rendered.stderr
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"sidecar": {"listenAddress": address}}))
    assert check_jsonschema(values).returncode != 0


def test_the_gateway_s_token_message_names_the_listen_endpoint(helm: Helm, tmp_path: Path) -> None:
    rendered = render_with(helm, tmp_path, "::", "mode=gateway")
    assert rendered.returncode != 0 and "[::]:9464" in rendered.stderr, rendered.stderr


def test_an_upgrade_reusing_values_without_the_key_listens_as_before(helm: Helm, chart: Path,
                                                                     tmp_path: Path) -> None:
    """Nil in values reused from a chart without sidecar.listenAddress: 0.0.0.0, as that chart
    rendered, not an endpoint without a host (":9464") or "<no value>"."""
    _, docs = upgrade_reusing_old_values(helm, chart, tmp_path, {"mode": "gateway"}, (),
                                         ["--set", GATEWAY[1]], missing_paths=("sidecar.listenAddress",))
    config = sidecar_config(docs)
    assert (config["api"]["endpoint"], config["receiver"]["grpc_endpoint"]) == ("0.0.0.0:9464", "0.0.0.0:4317")


# the loopback network in the spellings the schema takes: IPv4's 127/8, IPv6's ::1, IPv4-mapped 127/8
LOOPBACK = ["127.0.0.1", "127.1.2.3", "::1", "0::1", "0:0:0:0:0:0:0:1", "::0:0001", "0000::1",
            "::ffff:127.0.0.1", "0::FFFF:127.0.0.9", "::ffff:7f00:1"]


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
@pytest.mark.parametrize("address", LOOPBACK)
def test_a_loopback_listen_address_is_refused_naming_the_probes(helm: Helm, tmp_path: Path, address: str,
                                                               mode: str) -> None:
    """The probes (httpGet on the pod IP), Prometheus and, in gateway mode, the exporters reach the
    pod's address, never its loopback: the chart rendered a pod whose startup (or readiness) probe could
    never pass — the sidecar restarted for ever, a native sidecar holding the backend's start with it."""
    ip = ipaddress.ip_address(address)  # the premise: one of the loopback network
    assert ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"sidecar": {"listenAddress": address}}))
    assert check_jsonschema(values).returncode == 0  # the schema takes it: an IP address
    rendered = render_with(helm, tmp_path, address, f"mode={mode}", GATEWAY[1])
    assert rendered.returncode != 0
    assert "sidecar.listenAddress" in rendered.stderr and "loopback" in rendered.stderr
    assert "probe" in rendered.stderr, rendered.stderr
