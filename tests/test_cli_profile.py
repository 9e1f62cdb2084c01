"""``graft profile``: estimated, measured (CPU), device-class files, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.profiles import Profile
from tools.cli import app
from tools.cli_profile import dump_compact

runner = CliRunner()


def test_estimate_gpu_profile(tmp_path: Path) -> None:
    out = tmp_path / "v100.json"
    res = runner.invoke(app, ["profile", "--estimate-gpu", "v100", "--model", "resnet18", "--model", "alexnet",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "max |relative error|" in res.output and "resnet18" in res.output
    prof = Profile.load(out)
    assert prof.source == "estimated" and set(prof.models) == {"resnet18", "alexnet"}
    assert prof.shares == tuple(range(10, 101, 10)) and prof.batches == (1, 2, 4, 8, 16, 32)


def test_measured_cpu_profile(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "cpu.json"
    res = runner.invoke(app, ["profile", "--model", "resnet18", "--device", "cpu", "--batches", "1,2",
                              "--threads", "1", "--resolution", "32", "--warmup", "0", "--repeats", "1",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    prof = Profile.load(out)
    assert (prof.source, prof.unit, prof.shares, prof.batches) == ("measured", "cpu_threads", (1,), (1, 2))
    assert prof.model("resnet18").input_shape == (3, 32, 32)


def test_devices_file(tmp_path: Path) -> None:
    out = tmp_path / "devices.json"
    res = runner.invoke(app, ["profile", "--devices", "--model", "mobilenet_v2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc["models"]) == {"mobilenet_v2"}
    assert set(doc["models"]["mobilenet_v2"]["latency_ms"]) >= {"low", "mid", "high"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_without_cuda_fails_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    res = runner.invoke(app, ["profile", "--model", "resnet18", "--device", "cuda", "--out", str(out)])
    assert res.exit_code == 1
    assert "CUDA is not available" in res.output and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["profile", "--out", "x.json"],  # nothing to measure
    ["profile", "--model", "resnet18", "--batches", "1,x", "--out", "x.json"],
    ["profile", "--model", "resnet18", "--threads", "0", "--out", "x.json"],
])
def test_usage_errors(args: list[str]) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output


def test_unknown_model_and_gpu_are_errors(tmp_path: Path) -> None:
    res = runner.invoke(app, ["profile", "--estimate-gpu", "a100", "--model", "resnet18",
                              "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 1 and "no calibration anchors" in res.output
    res = runner.invoke(app, ["profile", "--model", "nosuchnet", "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 1 and "unknown model" in res.output


def test_dump_compact_is_the_same_json() -> None:
    doc = {"a": [[1.5, 2e-05, -3], [4, 5, 6]], "b": {"c": [1, 2], "d": "x"}, "e": []}
    text = dump_compact(doc)
    assert json.loads(text) == doc
    assert "[1.5, 2e-05, -3]" in text
