from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_simulator import PROFILE, make_plan, two_cuts, workload
from tools.cli import app

runner = CliRunner()


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    frags = two_cuts(80.0)
    paths = {"profile": tmp_path / "profile.json", "plan": tmp_path / "plan.json",
             "workload": tmp_path / "workload.json"}
    PROFILE.save(paths["profile"])
    paths["plan"].write_text(json.dumps(make_plan([("g0", ["a", "b"], 8, 100, 1)], frags)))
    paths["workload"].write_text(json.dumps(workload(frags)))
    return paths


def _args(files: dict[str, Path], *extra: str) -> list[str]:
    return ["simulate", "--profile", str(files["profile"]), "--plan", str(files["plan"]),
            "--workload", str(files["workload"]), "--duration", "5", *extra]


def test_json_report(files: dict[str, Path]) -> None:
    result = runner.invoke(app, _args(files, "--seed", "3", "--noise", "0.05", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["seed"] == 3 and report["settings"]["noise_sigma"] == 0.05
    assert [g["id"] for g in report["groups"]] == ["g0"]
    o = report["overall"]
    assert o["requests"] == o["in_deadline"] + o["late"] + o["dropped"] > 500
    assert 0.9 < o["slo_attainment"] <= 1.0 and report["groups"][0]["cuts"] == [0, 2]
    again = runner.invoke(app, _args(files, "--seed", "3", "--noise", "0.05", "--json"))
    assert json.loads(again.stdout) == report


def test_table_report(files: dict[str, Path]) -> None:
    result = runner.invoke(app, _args(files, "--arrivals", "uniform", "--eager"), env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for word in ("g0", "overall", "SLO met", "p99 ms", "100.00%", "requests counted"):
        assert word in result.stdout


@pytest.mark.parametrize("which, content", [("plan", "not json"), ("workload", "[1, 2]"),
                                            ("profile", "{}")])
def test_unreadable_inputs_fail_with_a_message(files: dict[str, Path], which: str, content: str) -> None:
    files[which].write_text(content)
    result = runner.invoke(app, _args(files))
    assert result.exit_code == 2
    assert which in result.output.lower()


def test_a_plan_that_cannot_be_simulated_is_refused(files: dict[str, Path]) -> None:
    plan = json.loads(files["plan"].read_text())
    plan["groups"][0]["share"] = 30  # not a grid share
    files["plan"].write_text(json.dumps(plan))
    result = runner.invoke(app, _args(files))
    assert result.exit_code == 2 and "cannot simulate" in result.output
