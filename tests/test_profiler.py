"""Measured profiles: a real CPU profile of a small model, and the CUDA path's clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.contract.errors import UnknownModel
from common.model.zoo import describe
from common.profiles import Profile
from common.profiling.measure import (
    ProfilerError,
    _run_share_child,
    gpu_telemetry,
    host_info,
    mps_status,
    profile_models,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_cpu_profile_of_a_small_model() -> None:
    torch.set_num_threads(1)
    prof = profile_models(["resnet18"], device="cpu", batches=[2, 1], threads=[1], resolution=32,
                          warmup=1, repeats=2)
    back = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert (back.source, back.unit, back.batches, back.shares) == ("measured", "cpu_threads", (1, 2), (1,))
    assert back.device.startswith("cpu")
    m = back.model("resnet18")
    info = describe("resnet18", 32)
    assert m.input_shape == info.input_shape and m.input_bytes == info.input_bytes
    assert [(b.name, b.flops, b.out_bytes) for b in m.blocks] == [(b.name, b.flops, b.out_bytes) for b in info.blocks]
    assert (m.table > 0).all()
    assert m.suffix_latency(0, 2, 1) > m.suffix_latency(info.n_blocks - 1, 2, 1)
    host = back.meta["host"]
    assert host["cpu_count"] >= 1 and host["torch"] == torch.__version__
    assert host["telemetry"]["available"] is False and host["telemetry"]["reason"]
    assert back.meta["timing"] == {"warmup": 1, "repeats": 2, "statistic": "median"}
    assert torch.get_num_threads() == 1  # restored


def test_bad_requests_fail_before_timing() -> None:
    with pytest.raises(UnknownModel):
        profile_models(["resnet1000"], batches=[1])
    with pytest.raises(ProfilerError, match="unknown device"):
        profile_models(["resnet18"], device="tpu", batches=[1], resolution=32)
    with pytest.raises(ProfilerError, match="positive batch"):
        profile_models(["resnet18"], batches=[0], resolution=32)


@no_cuda
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(ProfilerError, match="CUDA is not available") as err:
        profile_models(["resnet18"], device="cuda", batches=[1], shares=[50], resolution=32)
    assert "--device cpu" in str(err.value)


@no_cuda
def test_share_child_gets_its_share_before_cuda_and_reports_errors() -> None:
    spec = {"models": ["resnet18"], "batches": [1], "resolution": 32, "warmup": 0, "repeats": 1, "seed": 0}
    with pytest.raises(ProfilerError, match=r"share 30%: .*CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30"):
        _run_share_child(spec, 30, lambda _msg: None)


def test_mps_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    status = mps_status()
    if not status.running:  # a real daemon elsewhere would make this host's answer True
        assert "NOT isolated" in status.detail
    (tmp_path / "control").write_text("")
    status = mps_status()
    assert status.running and str(tmp_path) in status.detail


def test_host_info_and_telemetry_explain_themselves() -> None:
    info = host_info()
    assert {"hostname", "cpu", "cpu_count", "torch", "cuda_available"} <= set(info)
    tel = gpu_telemetry()
    assert isinstance(tel["available"], bool)
    if tel["available"]:
        assert tel["name"] and tel["memory_total_mib"] > 0
    else:
        assert tel["reason"]
