from __future__ import annotations

import pytest

from common.settings import Settings, SettingsError


def test_defaults_and_env_round_trip() -> None:
    s = Settings.from_env({"GRAFT_MODELS": "resnet50, vgg16", "GRAFT_RHO": "0.8", "REDIS_URL": "redis://x:1/0"})
    assert s.models == ("resnet50", "vgg16") and s.rho == 0.8 and s.redis_url == "redis://x:1/0"
    assert Settings.from_env(s.to_env()) == s
    assert Settings.from_env({}).redis_url is None


@pytest.mark.parametrize("env", [
    {"GRAFT_BLOCK_MS": "6000"},            # BLOCK above the socket timeout would be retried silently
    {"GRAFT_RHO": "1.5"},
    {"GRAFT_DEVICE": "tpu"},
    {"GRAFT_MAX_DELIVERIES": "0"},
    {"GRAFT_RESOLUTION": "big"},
    {"GRAFT_METRICS_HOST": "0.0.0.0:9100"},
    {"GRAFT_METRICS_HOST": "two hosts"},
    {"GRAFT_NODE": "a/b"},                 # the slash separates the node from the device
    {"GRAFT_NODE": "a:b"},                 # the colon separates Redis key parts
    {"GRAFT_NODE": "-a"},
    {"GRAFT_NODE": "x" * 64},
])
def test_bad_values_are_refused(env) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(env)


def test_metrics_host_defaults_to_loopback_and_reaches_child_processes() -> None:
    assert Settings.from_env({}).metrics_host == "127.0.0.1"
    assert Settings.from_env({"GRAFT_METRICS_HOST": ""}).metrics_host == "127.0.0.1"
    for host in ("0.0.0.0", "::", "worker-1.graft.internal"):
        s = Settings.from_env({"GRAFT_METRICS_HOST": host})
        assert s.metrics_host == host
        assert s.to_env()["GRAFT_METRICS_HOST"] == host and Settings.from_env(s.to_env()) == s


def test_node_defaults_to_none_and_reaches_child_processes() -> None:
    assert Settings.from_env({}).node == "" and Settings.from_env({"GRAFT_NODE": ""}).node == ""
    for node in ("gpu-host-1", "a", "rack2.node_7", "0" * 63):
        s = Settings.from_env({"GRAFT_NODE": node})
        assert s.node == node and s.to_env()["GRAFT_NODE"] == node and Settings.from_env(s.to_env()) == s
