"""sidecar.testing: the config it writes, the ports it hands out, and a start that fails shows the
sidecar's own words."""

import socket

import httpx
import pytest
import yaml

from sidecar import testing
from sidecar.config import ReceiverConfig, SidecarConfig
from sidecar.testing import SidecarError, SidecarProcess, ephemeral_port_range, free_port


def written(sidecar: SidecarProcess) -> dict:
    return yaml.safe_load(sidecar.config_path.read_text())


def test_port_zero_and_missing_endpoints_are_bound_by_the_sidecar_itself_others_stay(tmp_path):
    # the harness chose a port (bind 0, close) that the process bound a second later: in the
    # ephemeral range, where any outgoing connection of the suite could take it in between
    # (/tmp/s29_ports/repro.py). No port is chosen before the process binds it now
    sidecar = SidecarProcess({"receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""}},
                             state_dir=tmp_path)
    config = written(sidecar)
    assert config["receiver"]["grpc_endpoint"] == config["api"]["endpoint"] == "127.0.0.1:0"
    assert config["receiver"]["http_endpoint"] == "" and sidecar.http_endpoint == ""
    assert config["incidents"]["path"] == str(tmp_path / "incidents.sqlite")
    with pytest.raises(SidecarError, match="known once the process listens"):
        sidecar.grpc_endpoint  # noqa: B018 - the property raises
    with sidecar:
        grpc_port = int(sidecar.grpc_endpoint.rpartition(":")[2])
        api_port = int(sidecar.api_url.rpartition(":")[2])
        assert 0 not in (grpc_port, api_port) and grpc_port != api_port
        assert sidecar.grpc_endpoint == f"127.0.0.1:{grpc_port}"
        assert httpx.get(f"{sidecar.api_url}/readyz", timeout=5).status_code == 200
        socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()
        log = sidecar.log()
        assert f"OTLP/gRPC listening on 127.0.0.1:{grpc_port}" in log
        assert f"HTTP API listening on 127.0.0.1:{api_port} " in log
        rewritten = written(sidecar)  # a restart binds the same ports
        assert rewritten["receiver"]["grpc_endpoint"] == f"127.0.0.1:{grpc_port}"
        assert rewritten["api"]["endpoint"] == f"127.0.0.1:{api_port}"
    assert sidecar.process.returncode == 0
    sidecar.start(ready_timeout=30)
    try:
        assert (sidecar.grpc_endpoint, sidecar.api_url) == (f"127.0.0.1:{grpc_port}",
                                                           f"http://127.0.0.1:{api_port}")
        assert httpx.get(f"{sidecar.api_url}/readyz", timeout=5).status_code == 200
    finally:
        assert sidecar.stop() == 0


def test_free_port_is_outside_the_ephemeral_range_and_never_handed_out_twice():
    # bind(0) hands out ports of the ephemeral range, which the kernel gives every outgoing
    # connection as its source port too: a port picked so and bound a moment later could be taken
    first, last = ephemeral_port_range()
    ports = [free_port() for _ in range(300)]
    assert not [port for port in ports if first <= port <= last]
    assert len(set(ports)) == len(ports)
    assert all(port >= testing.PORTS_FROM for port in ports)


def test_free_port_skips_a_port_it_gave_before_and_one_that_is_taken(monkeypatch):
    given, taken, free = free_port(), free_port(), free_port()
    drawn = iter([given, taken, free])
    monkeypatch.setattr(testing, "_candidate", lambda spans: next(drawn))
    testing._handed_out.discard(taken)
    testing._handed_out.discard(free)
    with socket.create_server(("127.0.0.1", taken)):  # someone listens there
        assert free_port() == free


def test_the_ports_to_pick_from_leave_the_ephemeral_range_out(tmp_path, monkeypatch):
    proc_file = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(testing, "EPHEMERAL_RANGE_FILE", proc_file)
    proc_file.write_text("32768\t60999\n")
    assert ephemeral_port_range() == (32768, 60999)
    assert testing._outside(32768, 60999) == [range(20000, 32768), range(61000, 65536)]
    # a range reaching the top: below it, from 1024 when too few are left above PORTS_FROM
    assert testing._outside(20500, 65535) == [range(1024, 20500)]
    proc_file.write_text("1024 65535\n")
    with pytest.raises(OSError, match="no port outside the ephemeral range"):
        free_port()


def test_a_wildcard_endpoint_is_kept_and_reached_over_loopback(tmp_path):
    sidecar = SidecarProcess({"api": {"endpoint": "0.0.0.0:9999"}}, state_dir=tmp_path)
    assert written(sidecar)["api"]["endpoint"] == "0.0.0.0:9999"
    assert sidecar.api_url == "http://127.0.0.1:9999"


def test_a_sidecar_config_object_is_written_with_only_what_was_set(tmp_path):
    config = SidecarConfig(receiver=ReceiverConfig(max_pending_spans=7, http_endpoint=""))
    data = written(SidecarProcess(config, state_dir=tmp_path))
    assert data["receiver"]["max_pending_spans"] == 7
    assert "rules" not in data  # defaults stay the sidecar's own


def test_a_failing_start_raises_with_the_log(tmp_path):
    sidecar = SidecarProcess({"logging": {"level": "chatty"}}, state_dir=tmp_path)
    with pytest.raises(SidecarError) as error:
        sidecar.start(ready_timeout=30)
    assert "exited with 2" in str(error.value) and "logging.level" in str(error.value)
    assert sidecar.stop() == 2


def test_stop_before_start_is_none(tmp_path):
    assert SidecarProcess(state_dir=tmp_path).stop() is None


def test_a_relative_state_dir_starts_a_sidecar_that_uses_it(tmp_path, monkeypatch):
    # the sidecar runs in state_dir, and was given its config (and incidents.path) relative to the
    # caller's directory: `python -m examples.demo --state-dir demo-state` exited 2, "cannot read"
    monkeypatch.chdir(tmp_path)
    with SidecarProcess(state_dir="demo-state") as sidecar:  # started, ready, stopped at the end
        assert sidecar.state_dir == tmp_path / "demo-state"
    assert sidecar.process.returncode == 0
    assert (tmp_path / "demo-state" / "incidents.sqlite").exists()
