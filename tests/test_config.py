import pytest

from sidecar.config import ConfigError, load_config, parse_config


def test_defaults_are_loopback():
    config = parse_config({})
    assert config.receiver.grpc_endpoint == "127.0.0.1:4317"
    assert config.api.endpoint == "127.0.0.1:9464"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("rules:\n  delivery_deadlin_s: 3\n")
    with pytest.raises(ConfigError, match=r"sidecar.yaml: rules.delivery_deadlin_s"):
        load_config(path)


def test_unknown_rule_id_is_named():
    with pytest.raises(ConfigError, match="rules.disabled.*bleed.nope"):
        parse_config({"rules": {"disabled": ["bleed.nope"]}})


def test_bad_endpoint_is_named():
    with pytest.raises(ConfigError, match="receiver.grpc_endpoint"):
        parse_config({"receiver": {"grpc_endpoint": "nowhere"}})
