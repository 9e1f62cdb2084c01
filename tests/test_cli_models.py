"""``graft models``: the registry as JSON and as tables."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from common.model.zoo import MODEL_NAMES, describe
from tools.cli import app

runner = CliRunner()


def test_json_lists_every_model_with_its_cuts() -> None:
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["name"] for m in report["models"]] == list(MODEL_NAMES)
    assert report["skipped"] == {}
    for m in report["models"]:
        info = describe(m["name"])
        assert m["resolution"] == info.resolution and m["n_blocks"] == info.n_blocks
        assert [b["name"] for b in m["blocks"]] == [b.name for b in info.blocks]
        assert [r["cut"] for r in m["cuts"]] == list(range(info.n_blocks))
        assert [r["upload_bytes"] for r in m["cuts"]] == [info.upload_bytes(c) for c in info.cuts]
        assert all(r["device_flops"] + r["server_flops"] == m["total_flops"] for r in m["cuts"])
    inception = next(m for m in report["models"] if m["name"] == "inception_v3")
    assert inception["input_shape"] == [3, 299, 299]


def test_resolution_and_model_filters() -> None:
    result = runner.invoke(app, ["models", "--json", "-r", "64", "-m", "resnet18", "-m", "alexnet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["name"] for m in report["models"]] == ["resnet18", "alexnet"]
    assert report["models"][0]["cuts"][0]["upload_bytes"] == 3 * 64 * 64 * 4
    # Listing everything at 64 px skips only the model that cannot run that small.
    everything = json.loads(runner.invoke(app, ["models", "--json", "--resolution", "64"]).stdout)
    assert list(everything["skipped"]) == ["inception_v3"]
    assert len(everything["models"]) == len(MODEL_NAMES) - 1


def test_tables() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in MODEL_NAMES)
    detail = runner.invoke(app, ["models", "--model", "resnet50"])
    assert detail.exit_code == 0, detail.output
    assert "layer3.0" in detail.stdout and "3×224×224" in detail.stdout


def test_bad_arguments() -> None:
    unknown = runner.invoke(app, ["models", "--model", "lenet"])
    assert unknown.exit_code == 2 and "unknown model" in unknown.output
    too_small = runner.invoke(app, ["models", "--model", "inception_v3", "--resolution", "64"])
    assert too_small.exit_code == 2 and "minimum" in too_small.output
