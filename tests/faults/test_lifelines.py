"""Children that die with their parent even while they are still importing (found by the fault suite:
3 of 4 replicas an agent had just started for a new plan were alive 5 s after the agent's SIGKILL,
importing torch and then loading their model, stealing CPU from the restarted agent's replicas).

The parent-death signal used to be asked for by the child itself, in ``main()``, once its imports were
done — seconds for anything that imports torch. It is now set between fork and exec."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis as sync_redis

from common.contract import keys, wire
from tests.helpers import alive
from tools.faults.live import MODEL, RESOLUTION
from tools.faults.procs import descendants

# A replica (torch, torchvision) or an ingress (the model zoo) takes seconds to import, even on an idle
# host; a child with the death signal set before exec is gone within milliseconds of its parent.
GONE_WITHIN_S = 1.0

PLAN = {"epoch": 1, "policy": "test", "profile": None, "rho": 0.9, "infeasible": [], "total_share": 1, "gpus": 0,
        "routes": {}, "placement": [{"device": "cpu0", "replicas": [{"group": "g", "share": 1}]}],
        "groups": [{"id": "g", "model": MODEL, "fragments": [[MODEL, 0], [MODEL, 3]], "cuts": [0, 3], "batch": 4,
                    "share": 1, "replicas": 1, "latency_ms": 20.0, "rate_rps": 10.0, "min_budget_ms": 100.0}]}


def _first(root: int, needle: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> int:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for p in descendants(root):
            if needle in p.cmd:
                return p.pid
        assert proc.poll() is None, f"the parent exited first with {proc.returncode}"
        time.sleep(0.005)
    raise AssertionError(f"no {needle} child within {timeout_s} s")


def _gone(pid: int) -> float:
    t0 = time.monotonic()
    while alive(pid) and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    return time.monotonic() - t0


def test_a_replica_still_importing_dies_with_its_killed_agent(redis_url: str, fault_profile: Path,
                                                              tmp_path: Path) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    client.flushall()
    client.set(keys.PLAN, wire.encode_plan(PLAN))
    client.close()
    env = {**os.environ, "REDIS_URL": redis_url, "GRAFT_MODELS": MODEL, "GRAFT_RESOLUTION": str(RESOLUTION),
           "GRAFT_PROFILE": str(fault_profile), "GRAFT_STANDBY_REPLICAS": "0", "GRAFT_LOG_LEVEL": "warning"}
    with (tmp_path / "agent.log").open("wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "services.worker", "--devices", "cpu0", "--name", "a"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    replica = -1
    try:
        replica = _first(agent.pid, "services.worker.replica", 60.0, agent)
        agent.send_signal(signal.SIGKILL)  # the replica has just been exec'd: it is importing torch
        agent.wait(5)
        took = _gone(replica)
        assert took < GONE_WITHIN_S, f"the replica outlived its agent by {took:.1f} s"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        if replica > 0 and alive(replica):
            os.kill(replica, signal.SIGKILL)


def test_a_service_still_importing_dies_with_a_killed_graft_up(fault_profile: Path, tmp_path: Path) -> None:
    env = {**os.environ, "GRAFT_LOG_LEVEL": "warning", "GRAFT_GATEWAY_HTTP_PORT": "0", "GRAFT_GATEWAY_GRPC_PORT": "0"}
    env.pop("REDIS_URL", None)
    up = subprocess.Popen([sys.executable, "-m", "tools.cli", "up", "--models", MODEL, "--resolution",
                           str(RESOLUTION), "--profile", str(fault_profile)], env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left: list[int] = []
    try:
        ingress = _first(up.pid, "services.ingress", 60.0, up)  # imports the model zoo: seconds
        left = [p.pid for p in descendants(up.pid)]
        up.send_signal(signal.SIGKILL)
        up.wait(5)
        took = _gone(ingress)
        assert took < GONE_WITHIN_S, f"the ingress outlived graft up by {took:.1f} s"
        for pid in left:
            assert _gone(pid) < 20, f"pid {pid} outlived graft up"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(5)
        for pid in left:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
