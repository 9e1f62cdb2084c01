"""Mobile device classes: per-block latency from FLOPs, and the shipped devices.json."""

from __future__ import annotations

import json

import pytest

from common.client.phones import (
    DEVICE_CLASSES,
    DEVICES_FILE,
    device_block_latency_ms,
    device_class,
    device_prefix_ms,
    device_profile,
    devices_document,
    load_device_latencies,
)
from common.model.zoo import MODEL_NAMES, describe
from common.profiles import Profile, shipped


def test_three_classes_ordered_by_speed() -> None:
    assert {"low", "mid", "high"} <= set(DEVICE_CLASSES)
    low, mid, high = (DEVICE_CLASSES[n] for n in ("low", "mid", "high"))
    assert low.gflops < mid.gflops < high.gflops
    assert low.block_overhead_ms >= mid.block_overhead_ms >= high.block_overhead_ms
    for flops in (0, 1e6, 1e9):
        assert (device_block_latency_ms(low, flops) > device_block_latency_ms(mid, flops)
                > device_block_latency_ms(high, flops))


def test_block_latency_is_overhead_plus_flops_over_rate() -> None:
    mid = device_class("mid")
    assert device_block_latency_ms(mid, 0) == mid.block_overhead_ms
    assert device_block_latency_ms(mid, 2e9) - device_block_latency_ms(mid, 1e9) == pytest.approx(
        1e9 / (mid.gflops * 1e9) * 1e3)
    with pytest.raises(ValueError, match="unknown device class"):
        device_class("tablet")


def test_profile_from_model_info_and_model_profile_agree() -> None:
    info = describe("resnet18", 64)
    prof = Profile.load(shipped("v100-estimated")).model("resnet18")
    high = DEVICE_CLASSES["high"]
    from_info = device_profile(info, high)
    assert len(from_info) == info.n_blocks
    assert device_profile(describe("resnet18"), high) == pytest.approx(device_profile(prof, high))
    assert device_prefix_ms(from_info, 0) == 0.0
    assert device_prefix_ms(from_info, 3) == pytest.approx(sum(from_info[:3]))


def test_orders_of_magnitude_are_phone_like() -> None:
    def whole(model: str, cls: str) -> float:
        return sum(device_profile(describe(model), DEVICE_CLASSES[cls]))

    assert 10 < whole("mobilenet_v2", "mid") < 100
    assert whole("resnet50", "low") > 1000
    assert 50 < whole("resnet50", "high") < 300


def test_shipped_devices_file_is_current() -> None:
    doc = json.loads(DEVICES_FILE.read_text())
    assert set(doc["models"]) == set(MODEL_NAMES)
    assert set(doc["classes"]) == set(DEVICE_CLASSES)
    fresh = devices_document(["mobilenet_v2", "inception_v3"])
    for name, m in fresh["models"].items():
        assert doc["models"][name] == m
    lat = load_device_latencies()
    assert len(lat["resnet50"]["low"]) == describe("resnet50").n_blocks


def test_unreadable_devices_file() -> None:
    with pytest.raises(ValueError, match="cannot read device latencies"):
        load_device_latencies("/nonexistent/devices.json")
