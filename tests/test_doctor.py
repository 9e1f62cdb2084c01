"""``graft doctor``: the paths that run without a GPU, the verdicts as pure functions of numbers, the GPU
checks' orchestration over crafted probe results, and the agreement probe itself on the CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from common.model import executor as executor_module
from common.model import optimize as optimize_module
from common.model import timing
from common.model.timing import TIMER
from common.model.zoo import describe
from common.profiles import Profile, shipped
from common.profiling import measure as measure_module
from tools.cli import app
from tools.doctor import checks, probes, verdicts
from tools.doctor.probes import ProbeResult
from tools.doctor.report import EXIT_FAILED, EXIT_NO_CUDA, EXIT_OK, Report, Status, failed, passed, warned
from tools.doctor.verdicts import Agreement

cli = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
GENERAL = ["python", "torch", "CPU threads", "redis-server", "REDIS_URL"]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host as a host without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("GRAFT_PROFILE", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ no CUDA


def test_gpu_without_cuda_exits_2_with_one_line(no_cuda: None) -> None:
    result = cli.invoke(app, ["doctor", "--gpu"])
    assert result.exit_code == EXIT_NO_CUDA
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft doctor --gpu: no GPU check can run: CUDA is not available")
    assert "CUDA_VISIBLE_DEVICES" in lines[0] and result.stdout == ""  # no table, no silent CPU checks


def test_gpu_without_cuda_json(no_cuda: None) -> None:
    result = cli.invoke(app, ["doctor", "--gpu", "--json"])
    assert result.exit_code == EXIT_NO_CUDA
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["exit_code"] == EXIT_NO_CUDA and doc["gpu"] is True
    assert doc["error"].startswith("graft doctor --gpu: no GPU check can run")
    assert [(c["name"], c["status"]) for c in doc["checks"]] == [("CUDA", "FAIL")]
    assert doc["summary"] == {"PASS": 0, "WARN": 0, "FAIL": 1}


def test_the_real_command_refuses_gpu_checks_where_cuda_is_hidden() -> None:
    """The installed entry point, in its own process, on a host whose GPUs (if any) are hidden."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    env.pop("GRAFT_PROFILE", None)
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "doctor", "--gpu"], capture_output=True, text=True,
                          env=env, timeout=120, check=False, cwd=ROOT)
    assert proc.returncode == EXIT_NO_CUDA, proc.stderr
    assert proc.stderr.strip().startswith("graft doctor --gpu: no GPU check can run: CUDA is not available")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_general_checks_json_shape_and_no_gpu_is_a_warning(no_cuda: None) -> None:
    result = cli.invoke(app, ["doctor", "--json"])
    doc = json.loads(result.stdout)
    assert [c["name"] for c in doc["checks"]] == [*GENERAL, "GPU"]
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "figure", "detail", "fix", "data"} and c["figure"]
        assert c["status"] in ("PASS", "WARN", "FAIL") and (c["status"] == "PASS" or c["fix"])
    gpu = doc["checks"][-1]
    assert gpu["status"] == "WARN" and "graft doctor --gpu" in gpu["fix"]
    assert doc["gpu"] is False and "error" not in doc
    assert sum(doc["summary"].values()) == len(doc["checks"])
    failing = [c["name"] for c in doc["checks"] if c["status"] == "FAIL"]
    assert result.exit_code == (EXIT_FAILED if failing else EXIT_OK) == doc["exit_code"]
    assert not failing, failing  # this host has Python 3.11, torch and a redis-server


def test_table_output(no_cuda: None) -> None:
    result = cli.invoke(app, ["doctor"])
    assert result.exit_code == EXIT_OK
    for name in [*GENERAL, "GPU"]:
        assert name in result.stdout
    assert "1 WARN" in result.stdout and "→ on a GPU host run `graft doctor --gpu`" in result.stdout


def test_redis_url_reachable_and_unreachable(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = checks.check_redis_url(redis_url)
    assert ok.status is Status.PASS and "PING" in ok.figure and ok.data["ping_ms"] > 0
    bad = checks.check_redis_url(f"redis://:secret@127.0.0.1:{closed_port()}/0", timeout_s=2.0)
    assert bad.status is Status.FAIL and "unreachable" in bad.figure and "secret" not in bad.figure + bad.detail
    assert checks.check_redis_url(None).status is Status.PASS
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{closed_port()}/0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli.invoke(app, ["doctor", "--json"])
    assert result.exit_code == EXIT_FAILED
    assert {c["name"]: c["status"] for c in json.loads(result.stdout)["checks"]}["REDIS_URL"] == "FAIL"


def test_no_redis_server_fails_only_without_redis_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRAFT_REDIS_SERVER", str(tmp_path / "missing"))
    assert checks.check_redis_server(None).status is Status.FAIL
    assert checks.check_redis_server("redis://elsewhere:6379").status is Status.WARN


# ------------------------------------------------------------------------------ aggregation


def test_report_exit_codes_and_counts() -> None:
    rep = Report(gpu=False, checks=[passed("a", "1"), warned("b", "2", "why", "do")])
    assert rep.exit_code == EXIT_OK and rep.ok and rep.counts() == {"PASS": 1, "WARN": 1, "FAIL": 0}
    rep.extend([failed("c", "3", "why", "do", data={"x": 1})])
    assert rep.exit_code == EXIT_FAILED and not rep.ok
    doc = rep.to_dict()
    assert doc["checks"][2] == {"name": "c", "status": "FAIL", "figure": "3", "detail": "why", "fix": "do",
                                "data": {"x": 1}}
    assert json.loads(json.dumps(doc)) == doc  # plain JSON
    rep.error = "stopped"
    assert rep.exit_code == EXIT_NO_CUDA and rep.to_dict()["error"] == "stopped"
    assert Report(gpu=True).exit_code == EXIT_OK


# ------------------------------------------------------------------------------ verdicts


def test_share_limit_verdicts() -> None:
    assert verdicts.share_limit(400.0, 90.0, mps_running=True).status is Status.PASS  # 0.22: as expected
    assert verdicts.share_limit(400.0, 200.0, mps_running=True).status is Status.PASS  # 0.5: the edge
    assert verdicts.share_limit(400.0, 260.0, mps_running=True).status is Status.WARN  # 0.65: weakly limited
    unlimited = verdicts.share_limit(400.0, 395.0, mps_running=False)
    assert unlimited.status is Status.FAIL and "nvidia-cuda-mps-control -d" in unlimited.fix
    assert "full speed" in unlimited.detail and unlimited.data["ratio"] == pytest.approx(395 / 400)
    not_bound = verdicts.share_limit(400.0, 330.0, mps_running=True)  # 0.825 with a daemon
    assert not_bound.status is Status.FAIL and "CUDA_MPS_PIPE_DIRECTORY" in not_bound.fix
    assert verdicts.share_limit(0.0, 10.0, mps_running=True).status is Status.FAIL
    assert "0.22" in verdicts.share_limit(400.0, 88.0, mps_running=True).figure


def test_agreement_verdicts() -> None:
    good = verdicts.agreement([Agreement("32@cut0", 10.0, 9.2, 1.5), Agreement("mixed", 8.0, 9.1)])
    assert good.status is Status.PASS and "up to 1.50 ms" in good.detail
    assert good.data["cases"][0]["ratio"] == pytest.approx(0.92) and "0.92" in good.figure
    assert verdicts.agreement([Agreement("edge", 10.0, 11.5)]).status is Status.PASS
    slow = verdicts.agreement([Agreement("a", 10.0, 10.2), Agreement("b", 10.0, 12.0)])
    assert slow.status is Status.FAIL and "b:" in slow.detail and "optimistic" in slow.detail
    fast = verdicts.agreement([Agreement("a", 10.0, 8.0)])
    assert fast.status is Status.FAIL and "over-provision" in fast.detail
    assert verdicts.agreement([]).status is Status.FAIL
    assert verdicts.agreement([Agreement("zero", 0.0, 1.0)]).status is Status.FAIL


def test_small_verdicts() -> None:
    gib = verdicts.GIB
    assert verdicts.free_memory(100 * gib, 140 * gib).status is Status.PASS
    assert verdicts.free_memory(20 * gib, 140 * gib).status is Status.WARN
    assert verdicts.free_memory(1 * gib, 16 * gib).status is Status.FAIL
    assert verdicts.cudnn(True, 91002, True).status is Status.PASS
    assert verdicts.cudnn(True, 91002, False).status is Status.FAIL
    assert verdicts.cudnn(False, None, False).status is Status.WARN
    assert verdicts.mps_daemon(True, True, "/tmp/nvidia-mps").status is Status.PASS
    assert verdicts.mps_daemon(False, True, "/x").status is Status.WARN
    missing = verdicts.mps_daemon(False, False, "/x")
    assert missing.status is Status.FAIL and "nvidia-cuda-mps-control -d" in missing.fix
    assert verdicts.cpu_threads(2, 2, 2).status is Status.PASS
    assert verdicts.cpu_threads(2, 8, 16).status is Status.WARN
    assert verdicts.python_version((3, 10, 9), "py").status is Status.FAIL
    assert verdicts.python_version((3, 11, 7), "py").status is Status.PASS


def test_mps_check_reads_the_pipe_the_agents_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    monkeypatch.setattr(checks, "_mps_process", lambda: False)
    assert checks.check_mps().status is Status.FAIL
    (tmp_path / "control").write_text("")
    row = checks.check_mps()
    assert row.status is Status.PASS and str(tmp_path) in row.figure


# ------------------------------------------------------------------------------ GPU orchestration


INFO = {"name": "NVIDIA H200", "capability": "9.0", "free_bytes": 130 * verdicts.GIB,
        "total_bytes": 140 * verdicts.GIB, "sm_count": 132, "cudnn_available": True, "cudnn_version": 91002,
        "cudnn_benchmark": True, "share": "100"}


def fake_probes(monkeypatch: pytest.MonkeyPatch, full: ProbeResult, limited: ProbeResult) -> list[tuple[Any, int]]:
    calls: list[tuple[Any, int]] = []

    def run_probe(spec: dict[str, Any], share: int, *, device_index: int = 0, timeout_s: float = 0) -> ProbeResult:
        calls.append((spec, share))
        return full if share == 100 else limited

    monkeypatch.setattr(probes, "run_probe", run_probe)
    monkeypatch.setattr(checks, "cuda_unavailable", lambda device_index=0: None)
    monkeypatch.setattr(checks, "check_driver", lambda i: passed("driver (NVML)", "driver 570"))
    monkeypatch.setattr(checks, "check_mps", lambda: passed("MPS control daemon", "pipe"))
    monkeypatch.setattr(checks, "general_checks", lambda: [passed("python", "3.11")])
    return calls


def test_gpu_rows_from_probe_results(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [dataclasses.asdict(Agreement("32@cut0", 20.0, 19.0, 2.0)), dataclasses.asdict(Agreement("m", 15.0, 14.0))]
    full = ProbeResult(100, parts={"info": INFO, "matmul": 600.0, "agreement": cases}, exit_code=0)
    calls = fake_probes(monkeypatch, full, ProbeResult(20, parts={"matmul": 140.0}, exit_code=0))
    report = checks.run_doctor(gpu=True)
    assert [c.name for c in report.checks] == ["python", "CUDA", "driver (NVML)", "MPS control daemon",
                                               "cuDNN autotuning", "free GPU memory", "share limits throughput",
                                               "profile vs runtime"]
    assert all(c.status is Status.PASS for c in report.checks), [c for c in report.checks if c.status != "PASS"]
    assert report.exit_code == EXIT_OK and "NVIDIA H200" in report.checks[1].figure
    assert [share for _, share in calls] == [100, verdicts.SHARE_LIMITED_PCT]
    assert set(calls[0][0]) == {"info", "matmul", "agreement"} and set(calls[1][0]) == {"matmul"}


def test_unlimited_share_and_a_broken_probe_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    full = ProbeResult(100, parts={"info": INFO, "matmul": 600.0}, errors={"agreement": "OutOfMemoryError: x"},
                       exit_code=4)
    fake_probes(monkeypatch, full, ProbeResult(20, parts={"matmul": 590.0}, exit_code=0))
    report = checks.run_doctor(gpu=True)
    rows = {c.name: c for c in report.checks}
    assert rows["share limits throughput"].status is Status.FAIL
    assert rows["profile vs runtime"].status is Status.FAIL and "OutOfMemoryError" in rows["profile vs runtime"].detail
    assert report.exit_code == EXIT_FAILED


def test_a_probe_that_never_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = ProbeResult(100, exit_code=-9, stderr_tail="Segmentation fault\n")
    fake_probes(monkeypatch, dead, ProbeResult(20, errors={"probe": "the 20% probe did not finish within 300 s"}))
    rows = {c.name: c for c in checks.run_doctor(gpu=True).checks}
    assert rows["CUDA"].status is Status.FAIL and "exited with -9" in rows["CUDA"].detail
    assert "Segmentation fault" in rows["CUDA"].detail
    assert "cuDNN autotuning" not in rows and rows["share limits throughput"].status is Status.FAIL


# ------------------------------------------------------------------------------ probes on the CPU


def test_probe_child_gets_a_replicas_environment() -> None:
    """The child starts with share_env's variables; without CUDA it says so, with them in the message."""
    result = probes.run_probe({"info": True}, 20, timeout_s=120)
    if torch.cuda.is_available():  # a GPU host: the child really measured
        assert result.parts["info"]["share"] == "20" and result.exit_code == 0
    else:
        assert result.exit_code == 3 and "CUDA is not available" in result.errors["probe"]
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE='20'" in result.errors["probe"]
        assert "CUDA_VISIBLE_DEVICES='0'" in result.errors["probe"]
        assert result.error_of("info") == result.errors["probe"]


def test_probe_parts_report_separately(capsys: pytest.CaptureFixture[str]) -> None:
    code = probes.child({"device": "cpu", "info": True, "matmul": {"seconds": 0.05, "size": 64}})
    lines = [json.loads(x[len(probes.LINE_TAG):]) for x in capsys.readouterr().out.splitlines()]
    assert code == 4  # info is CUDA only: it fails, and the matmul still reports
    assert [(m["event"], m["part"]) for m in lines] == [("error", "info"), ("part", "matmul")]
    assert lines[1]["value"] > 0


class Costly(nn.Module):
    """A block that costs ``ms`` of a virtual clock, whatever the batch (real blocks on two shared cores
    are far too noisy to compare at 15%, and spinning or sleeping blocks are too)."""

    def __init__(self, clock: list[float], ms: float) -> None:
        super().__init__()
        self.clock, self.s = clock, ms / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += self.s
        return x + 1.0


def test_agreement_probe_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The doctor's agreement probe end to end — the profiler's per-block measurement and a runner timed as
    a replica times it — on blocks of known, unequal cost: both must see exactly the blocks' cost, the
    runner's staging and copies apart. The GPU run of this is `graft doctor --gpu`."""
    torch.set_num_threads(1)
    clock = [0.0]
    monkeypatch.setattr(timing, "clock", lambda: clock[0])
    info = describe("resnet18", 32)
    costs = [1.0 + (j % 4) for j in range(info.n_blocks)]  # ms per call: independent of batch size
    same = dataclasses.replace(info, blocks=tuple(dataclasses.replace(b, out_shape=info.input_shape)
                                                  for b in info.blocks))

    def blocks(*_a: Any, **_k: Any) -> list[nn.Module]:
        return [Costly(clock, ms) for ms in costs]

    monkeypatch.setattr(measure_module, "build_blocks", blocks)
    monkeypatch.setattr(executor_module, "build_blocks", blocks)
    monkeypatch.setattr(executor_module, "describe", lambda *a, **k: same)
    # The fake blocks tick a fake clock in Python, which a TorchScript trace would drop: keep them eager.
    def eager(blocks: Any, info: Any, device: Any, **kw: Any) -> Any:
        return optimize_module.inference_blocks(blocks, info, device, **{**kw, "optimize": False})

    monkeypatch.setattr(measure_module, "inference_blocks", eager)
    monkeypatch.setattr(executor_module, "inference_blocks", eager)
    stage = executor_module.FragmentRunner._stage

    def slow_stage(self: Any, items: Any) -> Any:
        clock[0] += 0.007  # staging costs time that belongs to copies, not to the batch
        return stage(self, items)

    monkeypatch.setattr(executor_module.FragmentRunner, "_stage", slow_stage)
    cases = probes.agreement_cases("resnet18", device="cpu", batch=4, resolution=32, warmup=1, repeats=3)
    assert [c.label for c in cases] == ["4@cut0", "2@cut0+2@cut7"]
    for c in cases:  # every block once, whatever the batch: the profile's sum, exactly
        assert c.profile_ms == pytest.approx(sum(costs)) and c.runtime_ms == pytest.approx(sum(costs))
        assert c.copy_ms == pytest.approx(7.0) and c.ratio == pytest.approx(1.0)
    row = verdicts.agreement(cases)
    assert row.status is Status.PASS and "up to 7.00 ms" in row.detail, row.figure


def test_a_gpu_profile_timed_otherwise_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = Profile.load(shipped("v100-estimated")).to_dict()
    assert checks.check_profile("v100-estimated").status is Status.PASS

    def write(**meta: Any) -> str:
        path = tmp_path / "p.json"
        path.write_text(json.dumps({**doc, "source": "measured", **meta}))
        return str(path)

    old = checks.check_profile(write(timing={"timer": "cuda events"}, shares_isolated=True))
    assert old.status is Status.WARN and "graft profile --device cuda" in old.fix
    assert checks.check_profile(write(timing={"timer": TIMER}, shares_isolated=True)).status is Status.PASS
    assert checks.check_profile(write(timing={"timer": TIMER}, shares_isolated=False)).status is Status.WARN
    assert checks.check_profile(str(tmp_path / "nope.json")).status is Status.FAIL
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("GRAFT_PROFILE", write(timing={"timer": "cuda events"}))
    assert [c.name for c in checks.general_checks()][-1] == "GRAFT_PROFILE"
