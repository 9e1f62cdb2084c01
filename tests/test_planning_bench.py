from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from common.profiles import Profile, shipped
from tools import bench_plan
from tools.bench_plan import BenchResult, SuiteConfig, load_uplinks, register_bench, run_suite

TINY = SuiteConfig(seeds=(0,), clients=(20, 60), fps=("5fps",), random_sizes=(30,), oracle_seeds=1, oracle_random=3,
                   timing_sizes=(5, 20), timing_repeats=2)


def test_missing_traces_fall_back_to_synthetic_and_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFT_TRACES_DIR", str(tmp_path / "nowhere"))
    traces, note = load_uplinks()
    assert traces and "NO TRACES" in note and all(t.name.startswith("synthetic") for t in traces)


def test_suite_reports_costs_gains_oracle_gaps_and_times(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAFT_TRACES_DIR", str(tmp_path))  # synthetic uplinks: fast and self-contained
    profile = Profile.load(shipped("v100-estimated"))
    traces, note = load_uplinks()
    result = BenchResult("v100-estimated", [t.name for t in traces], note)
    with Progress(console=Console(file=io.StringIO()), disable=True) as progress:
        run_suite(profile, traces, TINY, result, progress)
    assert len([r for r in result.instances if r["family"] == "clients"]) == 2 * 2  # modes × client counts
    for r in result.instances:
        assert r["cost"]["graft"] <= r["cost"]["per-cut"] and r["violations"] == 0
        assert r["gain"] == pytest.approx(1 - r["cost"]["graft"] / r["cost"]["per-cut"]) if r["cost"]["per-cut"] else True
    assert len(result.oracle) >= 3 and all(r["cost"]["oracle"] <= r["cost"]["graft"] for r in result.oracle)
    assert {(t["fragments"], t["policy"]) for t in result.timing} >= {(5, "graft"), (20, "per-cut")}
    s = result.summary
    assert s["verify_violations"] == 0 and s["graft_infeasible_where_oracle_feasible"] == 0
    assert set(s["targets"]) >= {"median_gain>=0.40", "plan_1000<1s"}
    pngs = bench_plan.plot(result, tmp_path)
    assert all(p.exists() and p.stat().st_size > 1000 for p in pngs)


def test_bench_plan_command_writes_json_and_plots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAFT_TRACES_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(SuiteConfig, "quick", classmethod(lambda cls: TINY))
    bench = typer.Typer()
    register_bench(bench)
    root = typer.Typer()
    root.add_typer(bench, name="bench")
    out = tmp_path / "out"
    res = CliRunner().invoke(root, ["bench", "plan", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench_plan.json").read_text())
    assert "NO TRACES" in data["traces_note"] and data["summary"]["instances"] == 4
    assert (out / "cost_per_model.png").exists() and (out / "plan_time.png").exists()
    assert "median gain over per-cut" in res.output
