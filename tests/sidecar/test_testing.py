"""sidecar.testing: the config it writes, and a start that fails shows the sidecar's own words."""

import pytest
import yaml

from sidecar.config import ReceiverConfig, SidecarConfig
from sidecar.testing import SidecarError, SidecarProcess


def written(sidecar: SidecarProcess) -> dict:
    return yaml.safe_load(sidecar.config_path.read_text())


def test_port_zero_and_missing_endpoints_get_free_ports_others_stay(tmp_path):
    sidecar = SidecarProcess({"receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""}},
                             state_dir=tmp_path)
    config = written(sidecar)
    grpc_port = int(config["receiver"]["grpc_endpoint"].rpartition(":")[2])
    api_port = int(config["api"]["endpoint"].rpartition(":")[2])
    assert grpc_port > 0 and api_port > 0 and grpc_port != api_port
    assert config["receiver"]["http_endpoint"] == "" and sidecar.http_endpoint == ""
    assert sidecar.grpc_endpoint == f"127.0.0.1:{grpc_port}"
    assert sidecar.api_url == f"http://127.0.0.1:{api_port}"
    assert config["incidents"]["path"] == str(tmp_path / "incidents.sqlite")


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
