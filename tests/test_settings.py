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
])
def test_bad_values_are_refused(env) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(env)
