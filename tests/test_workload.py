from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.client.partitioner import choose_cut
from common.client.phones import DEVICE_CLASSES
from common.client.traces import LinkTrace
from common.client.workload import clients_to_workload, emulate_clients
from common.planning import load_workload, plan, verify_plan
from common.profiles import Profile, shipped
from tools.cli import app

PROFILE = Profile.load(shipped("v100-estimated"))
TRACES = [LinkTrace.synthetic(1.0, 120.0, seed=1, name="slow"), LinkTrace.synthetic(15.0, 120.0, seed=2, name="fast")]


def test_clients_are_drawn_reproducibly_from_the_lists() -> None:
    a = emulate_clients(40, ["resnet50", "mobilenet_v2"], [100, 400], TRACES, fps=[1, 5], seed=3)
    assert a == emulate_clients(40, ["resnet50", "mobilenet_v2"], [100, 400], TRACES, fps=[1, 5], seed=3)
    assert a != emulate_clients(40, ["resnet50", "mobilenet_v2"], [100, 400], TRACES, fps=[1, 5], seed=4)
    assert len({c.id for c in a}) == 40
    assert {c.model for c in a} <= {"resnet50", "mobilenet_v2"} and {c.slo_ms for c in a} <= {100.0, 400.0}
    assert {c.fps for c in a} <= {1.0, 5.0} and {c.device for c in a} <= set(DEVICE_CLASSES)
    by_name = {t.name: t for t in TRACES}
    for c in a[:5]:
        assert c.bandwidth_bps == by_name[c.trace].bandwidth_bps(c.start_s, 2.0)


def test_each_client_becomes_the_fragment_its_partitioner_chose() -> None:
    clients = emulate_clients(60, ["resnet18", "alexnet"], [200, 400], TRACES, fps=[5], seed=1)
    result = clients_to_workload(PROFILE, clients)
    assert len(result.fragments) + len(result.rejected) == len(clients)
    assert result.fragments, "a 15 Mbit/s uplink with a 400 ms SLO must leave some clients a cut"
    by_id = {c.id: c for c in clients}
    for f in result.fragments:
        c = by_id[f.id]
        choice = choose_cut(PROFILE.model(c.model), DEVICE_CLASSES[c.device], c.bandwidth_bps, c.slo_ms)
        assert choice is not None and (f.cut, f.budget_ms) == (choice.cut, choice.budget_ms)
        assert f.rate_rps == c.fps and f.model == c.model
    for r in result.rejected:
        assert r.reason and r.client in by_id
    # the partitioner only picks cuts the planner can serve: nothing is infeasible
    p = plan(PROFILE, result.fragments, "graft")
    assert p.infeasible == () and verify_plan(PROFILE, result.fragments, p.to_dict()) == []


def test_hopeless_clients_are_rejected_with_a_reason() -> None:
    clients = emulate_clients(5, ["vgg19"], [5], TRACES, device_classes=["low"], seed=0)
    result = clients_to_workload(PROFILE, clients)
    assert result.fragments == [] and len(result.rejected) == 5
    assert all("no cut of vgg19" in r.reason for r in result.rejected)


def test_bad_client_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="device classes"):
        emulate_clients(3, ["resnet50"], [100], TRACES, device_classes=["tablet"])
    with pytest.raises(ValueError, match="models"):
        emulate_clients(3, [], [100], TRACES)


def test_workload_cli_writes_a_plannable_workload(tmp_path: Path) -> None:
    runner = CliRunner()
    trace = tmp_path / "uplink.up"
    TRACES[1].write_mahimahi(trace)
    out = tmp_path / "w.json"
    res = runner.invoke(app, ["workload", "--profile", "v100-estimated", "--clients", "50", "--models",
                              "resnet50,mobilenet_v2", "--slo-ms", "200,400", "--trace", str(trace), "--seed", "2",
                              "--device-classes", "mid,high", "--fps", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    frags = load_workload(out)
    assert frags and {f.model for f in frags} <= {"resnet50", "mobilenet_v2"}
    assert f"{len(frags)} fragments" in res.output
    plan_file = tmp_path / "plan.json"
    assert runner.invoke(app, ["plan", "-p", "v100-estimated", "-w", str(out), "--out", str(plan_file)]).exit_code == 0
    ok = runner.invoke(app, ["plan", "verify", "-p", "v100-estimated", "-w", str(out), "--plan", str(plan_file)])
    assert ok.exit_code == 0 and "plan OK" in ok.output
    assert json.loads(plan_file.read_text())["profile"] == "v100-estimated"


def test_workload_cli_with_a_synthetic_uplink_and_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "w.json"
    res = runner.invoke(app, ["workload", "-p", "v100-estimated", "-n", "20", "--synthetic-mbps", "10",
                              "--slo-ms", "300", "--fps", "1,15", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {f.rate_rps for f in load_workload(out)} <= {1.0, 15.0}
    assert runner.invoke(app, ["workload", "-p", "v100-estimated", "--out", str(out)]).exit_code == 2
    assert runner.invoke(app, ["workload", "-p", "v100-estimated", "--synthetic-mbps", "5", "--slo-ms", "x",
                               "--out", str(out)]).exit_code == 2
