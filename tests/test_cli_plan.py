from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.planning import Fragment, save_workload
from common.planning.synthetic import synthetic_profile
from common.profiles import Profile
from tools.cli import app

runner = CliRunner()


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    profile = tmp_path / "synthetic.json"
    synthetic_profile({"net": (8, 1.0), "small": (5, 0.3)}, seed=4).save(profile)
    frags = [Fragment(f"c{i}", "net" if i % 3 else "small", i % 5, 3.0 + i, 60.0 + 7 * i) for i in range(15)]
    frags.append(Fragment("hopeless", "net", 0, 1.0, 0.2))
    workload = tmp_path / "w.json"
    save_workload(workload, frags)
    return profile, workload


def test_plan_prints_a_table_and_the_total_share(files: tuple[Path, Path], tmp_path: Path) -> None:
    profile, workload = files
    out = tmp_path / "plan.json"
    res = runner.invoke(app, ["plan", "--profile", str(profile), "--workload", str(workload), "--policy", "graft",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "total share" in res.output and "net-g0" in res.output and "hopeless" in res.output
    written = json.loads(out.read_text())
    assert written["policy"] == "graft" and written["profile"] == "synthetic"
    assert f"total share {written['total_share']} " in res.output


@pytest.mark.parametrize("policy", ["graft", "per-cut", "oracle"])
def test_plan_json_then_verify_says_ok(files: tuple[Path, Path], tmp_path: Path, policy: str) -> None:
    profile, workload = files
    res = runner.invoke(app, ["plan", "-p", str(profile), "-w", str(workload), "--policy", policy, "--rho", "0.8",
                              "--epoch", "3", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["policy"] == policy and plan["rho"] == 0.8 and plan["epoch"] == 3
    assert [i["id"] for i in plan["infeasible"]] == ["hopeless"]
    path = tmp_path / "p.json"
    path.write_text(res.stdout)
    ok = runner.invoke(app, ["plan", "verify", "--profile", str(profile), "--workload", str(workload),
                             "--plan", str(path)])
    assert ok.exit_code == 0, ok.output
    assert "plan OK" in ok.output


def test_verify_names_the_violated_rule(files: tuple[Path, Path], tmp_path: Path) -> None:
    profile, workload = files
    path = tmp_path / "p.json"
    assert runner.invoke(app, ["plan", "-p", str(profile), "-w", str(workload), "--out", str(path)]).exit_code == 0
    plan = json.loads(path.read_text())
    plan["groups"][0]["share"] = 10
    plan["groups"][0]["batch"] = 32  # far too slow for any budget in the workload
    path.write_text(json.dumps(plan))
    res = runner.invoke(app, ["plan", "verify", "-p", str(profile), "-w", str(workload), "--plan", str(path)])
    assert res.exit_code == 1
    assert "[latency]" in res.output and "plan INVALID" in res.output


def test_plan_refuses_bad_arguments(files: tuple[Path, Path], tmp_path: Path) -> None:
    profile, workload = files
    assert runner.invoke(app, ["plan", "-p", str(profile), "-w", str(workload), "--policy", "best"]).exit_code == 2
    assert runner.invoke(app, ["plan", "-p", str(profile)]).exit_code == 2
    assert runner.invoke(app, ["plan", "-p", str(tmp_path / "none.json"), "-w", str(workload)]).exit_code == 2
    broken = tmp_path / "broken.json"
    broken.write_text('{"fragments": [{"id": "x"}]}')
    res = runner.invoke(app, ["plan", "-p", str(profile), "-w", str(broken)])
    assert res.exit_code == 2 and "plan failed" in res.output


def test_oracle_over_its_limit_fails_cleanly(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    synthetic_profile({"net": (8, 1.0)}).save(profile)
    workload = tmp_path / "w.json"
    save_workload(workload, [Fragment(f"c{i}", "net", i % 8, 1.0, 200.0) for i in range(20)])
    res = runner.invoke(app, ["plan", "-p", str(profile), "-w", str(workload), "--policy", "oracle"])
    assert res.exit_code == 2 and "oracle" in res.output


def test_verify_applies_the_plans_latency_scale(files: tuple[Path, Path], tmp_path: Path) -> None:
    """A plan the live planner calibrated to measured speed is checked against the latencies it used."""
    profile, workload = files
    slow = tmp_path / "slow.json"
    Profile.load(profile).scaled({"net": 2.0}).save(slow)
    path = tmp_path / "p.json"
    assert runner.invoke(app, ["plan", "-p", str(slow), "-w", str(workload), "--out", str(path)]).exit_code == 0
    plan = json.loads(path.read_text())
    args = ["plan", "verify", "--profile", str(profile), "--workload", str(workload), "--plan", str(path)]
    unscaled = runner.invoke(app, args)
    assert unscaled.exit_code == 1, unscaled.output  # its latency_ms are twice the file's for "net"
    path.write_text(json.dumps({**plan, "latency_scale": {"net": 2.0}}))
    scaled = runner.invoke(app, args)
    assert scaled.exit_code == 0 and "latency_scale" in scaled.output and "plan OK" in scaled.output, scaled.output
    path.write_text(json.dumps({**plan, "latency_scale": {"nope": 2.0}}))
    assert runner.invoke(app, args).exit_code == 2
