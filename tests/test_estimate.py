"""Estimated GPU profiles: calibration against the published anchors, shape of the model, file format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.model.zoo import MODEL_NAMES, describe
from common.profiles import Profile, shipped
from common.profiling import estimate
from common.profiling.estimate import (
    V100_ANCHORS,
    Anchor,
    estimate_block_latencies,
    estimate_features_latency_ms,
    estimate_model_latency_ms,
    estimate_profile,
    fit_calibration,
    model_features,
)


@pytest.fixture(scope="module")
def cal() -> estimate.MpsFit:
    return fit_calibration("v100")


@pytest.fixture(scope="module")
def small_profile(cal: estimate.MpsFit) -> Profile:
    return estimate_profile(["alexnet", "resnet18", "mobilenet_v2"], cal=cal)


def test_anchors_are_the_published_table() -> None:
    assert len(V100_ANCHORS) == 27
    assert {a.model for a in V100_ANCHORS} == {"alexnet", "resnet50", "vgg19"}
    assert Anchor("resnet50", 32, 10, 180.47) in V100_ANCHORS
    assert Anchor("vgg19", 1, 100, 2.76) in V100_ANCHORS


@pytest.mark.parametrize("anchor", V100_ANCHORS, ids=lambda a: f"{a.model}-b{a.batch}-g{a.share}")
def test_calibration_reproduces_every_anchor_within_15pct(cal: estimate.MpsFit, anchor: Anchor) -> None:
    info = describe(anchor.model, 224)
    feats = model_features(anchor.model, 224)
    flops = sum(b.flops for b in info.blocks)
    assert sum(b.flops for b in feats.blocks) == flops
    est = estimate_model_latency_ms(flops, info.n_blocks, anchor.batch, anchor.share, cal, layers=feats.layers,
                                    weight_bytes=float(feats.column("weight_bytes").sum()),
                                    act_bytes=float(feats.column("act_bytes").sum()))
    assert abs(est / anchor.ms - 1.0) < 0.15, (anchor, est)


def test_calibration_reports_its_own_errors(cal: estimate.MpsFit) -> None:
    assert len(cal.rel_errors) == len(V100_ANCHORS)
    assert cal.max_abs_error < 0.15
    doc = cal.to_dict()
    assert set(doc["constants"]) == set(estimate.PARAM_NAMES)
    assert all(abs(a["rel_error"]) < 0.15 for a in doc["anchors"])


def test_fitted_constants_are_physical(cal: estimate.MpsFit) -> None:
    c = cal.constants
    assert 0.3 < c["mem_gb_per_ms"] < 1.0  # a V100's HBM2 peaks at 0.9 TB/s
    assert 5.0 < c["peak_gflop_per_ms"] < 130.0  # at most the V100's tensor-core peak
    assert 0.2 <= c["mem_share"] <= 1.0
    for name, lo, hi, _, _ in estimate.PARAMS:
        assert lo <= c[name] <= hi


def test_small_batches_saturate_and_large_batches_scale(cal: estimate.MpsFit) -> None:
    for name in ("resnet50", "resnet18", "mobilenet_v2", "densenet121"):
        f = model_features(name)
        b1 = [estimate_features_latency_ms(f, 1, g, cal) for g in (10, 50, 100)]
        b32 = [estimate_features_latency_ms(f, 32, g, cal) for g in (10, 50, 100)]
        assert b1[1] / b1[2] < 1.5, name  # batch 1 barely gains above half the GPU
        assert b32[0] / b32[2] > 4.0, name  # a big batch uses what it is given
        assert b32[2] / 32 < b1[2], name  # batching lowers the per-request cost


def test_profile_is_monotone(small_profile: Profile) -> None:
    for m in small_profile.models.values():
        t = m.table  # [block, batch, share]
        assert np.all(np.diff(t, axis=1) >= 0), m.name
        assert np.all(np.diff(t, axis=2) <= 0), m.name
        assert np.all(t > 0)


def test_block_latencies_sum_to_the_whole_model(cal: estimate.MpsFit, small_profile: Profile) -> None:
    for name, m in small_profile.models.items():
        f = model_features(name)
        for b in (1, 3, 16, 32):
            for g in (10, 40, 100):
                whole = estimate_features_latency_ms(f, b, g, cal)
                assert estimate_block_latencies(f, b, g, cal).sum() == pytest.approx(whole, rel=1e-9)
                if b in small_profile.batches:  # rounded to 4 significant digits in the file
                    assert m.suffix_latency(0, b, g) == pytest.approx(whole, rel=2e-3)


def test_latency_is_spread_by_flops(cal: estimate.MpsFit) -> None:
    f = model_features("resnet18")
    lat = estimate_block_latencies(f, 8, 50, cal)
    flops = f.column("flops")
    heavy, light = int(np.argmax(flops)), int(np.argmin(flops))
    assert lat[heavy] > 10 * lat[light]


def test_profile_format_and_json_round_trip(small_profile: Profile) -> None:
    d = small_profile.to_dict()
    assert (d["source"], d["device"], d["unit"]) == ("estimated", "v100 (estimated)", "gpu_share_pct")
    assert d["batches"] == [1, 2, 4, 8, 16, 32]
    assert d["shares"] == list(range(10, 101, 10))
    assert d["calibration"]["max_abs_rel_error"] < 0.15
    assert d["resolutions"] == {"alexnet": 224, "resnet18": 224, "mobilenet_v2": 224}
    back = Profile.from_dict(json.loads(json.dumps(d)))
    for name, m in small_profile.models.items():
        assert np.array_equal(back.model(name).table, m.table)
        assert back.model(name).input_bytes == describe(name).input_bytes
        assert [b.flops for b in back.model(name).blocks] == [b.flops for b in describe(name).blocks]


def test_shipped_profile_is_current() -> None:
    shipped_profile = Profile.load(shipped("v100-estimated"))
    assert set(shipped_profile.models) == set(MODEL_NAMES)
    assert shipped_profile.source == "estimated"
    fresh = estimate_profile(["resnet50", "inception_v3"])
    for name in fresh.models:
        assert shipped_profile.model(name).input_shape == fresh.model(name).input_shape
        np.testing.assert_allclose(shipped_profile.model(name).table, fresh.model(name).table, rtol=1e-3)


def test_unknown_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="no calibration anchors"):
        fit_calibration("a100")
