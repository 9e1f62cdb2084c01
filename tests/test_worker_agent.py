"""The worker agent: real replica child processes that follow the plan, restart, drain and stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from common.contract import keys, wire
from common.logs import Event
from common.settings import Settings
from common.store.plan_store import publish_plan
from services.worker.__main__ import main as worker_main
from services.worker.agent import Agent
from services.worker.device import Device
from services.worker.supervisor import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    EXIT_CONFIG,
    STABLE_S,
    ReplicaProcess,
    ReplicaSlot,
    State,
)
from tests.helpers import until

GROUP = "g0"


def plan(epoch: int, replicas: int) -> dict[str, Any]:
    return {
        "epoch": epoch, "policy": "test", "profile": None, "rho": 0.9,
        "groups": [{"id": GROUP, "model": "resnet18", "fragments": [["resnet18", 8]], "cuts": [8], "batch": 2,
                    "share": 1, "replicas": replicas, "latency_ms": 5.0, "rate_rps": 1.0, "min_budget_ms": 100.0}],
        "infeasible": [],
        "placement": [{"device": "cpu0", "replicas": [{"group": GROUP, "share": 1}] * replicas},
                      {"device": "gpu0", "replicas": [{"group": GROUP, "share": 50}]}],  # another host's
        "total_share": replicas, "gpus": 0, "routes": {},
    }


async def test_agent_runs_restarts_drains_and_stops_replica_processes(redis: Any, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, resolution=32, models=("resnet18",), log_level="warning")
    await publish_plan(redis, plan(1, replicas=2))
    agent = Agent(settings, [Device("cpu", 0)], name="test-agent", poll_s=0.05, stop_grace_s=10.0)
    with capture_logs() as logs:
        task = asyncio.create_task(agent.run())
        try:
            await until(lambda: len([p for p in agent.replicas if p.alive]) == 2, 20, "two replica processes")
            assert sorted(p.slot.consumer for p in agent.replicas) == ["cpu0-g0-0", "cpu0-g0-1"]
            assert {p.slot.device.name for p in agent.replicas} == {"cpu0"}  # gpu0 is another agent's

            # A replica that dies (here while still starting) is restarted under the same consumer name.
            victim = next(p for p in agent.replicas if p.slot.index == 1)
            old_pid = victim.pid
            assert old_pid is not None
            os.kill(old_pid, signal.SIGKILL)
            await until(lambda: victim.restarts == 1 and victim.alive, 20, "the killed replica's restart")
            assert victim.pid != old_pid and victim.last_exit == -signal.SIGKILL
            exits = [e for e in logs if e["event"] == Event.REPLICA_EXITED]
            assert any(e["exit_code"] == -signal.SIGKILL and e["consumer"] == "cpu0-g0-1" for e in exits)

            # Both children really serve: each heartbeats under its stable consumer name.
            names = [keys.health("replica", f"cpu0-g0-{i}") for i in (0, 1)]
            deadline = time.monotonic() + 40
            while await redis.exists(*names) != 2:
                assert time.monotonic() < deadline, "replicas never heartbeat"
                await asyncio.sleep(0.1)
            beat = wire.decode_message(await redis.get(keys.health("worker", "test-agent")), "health")
            assert beat["epoch"] == 1 and len(beat["replicas"]) == 2

            # A new epoch with one replica: it starts, and the two old ones drain (empty stream) and exit 0.
            old = list(agent.replicas)
            await publish_plan(redis, plan(2, replicas=1))
            await until(lambda: any(p.slot.epoch == 2 and p.alive for p in agent.replicas), 20, "the epoch-2 replica")
            await until(lambda: all(p.slot.epoch == 2 for p in agent.replicas), 60, "old replicas to drain")
            assert all(p.last_exit == 0 and p.state == State.EXITED for p in old)
            drained = [e for e in logs if e["event"] == Event.GROUP_DRAINED and e.get("epoch") == 1]
            assert len(drained) == 2, [e for e in logs if e.get("epoch") == 1 or e.get("draining_epoch") == 1]
            [new] = agent.replicas
            child = new.proc
        finally:
            agent.stop()
            code = await asyncio.wait_for(task, 30)
    assert code == 0
    assert child is not None and child.returncode is not None  # stopped with the agent
    assert agent.replicas == []
    assert not await redis.exists(keys.health("worker", "test-agent"))


def test_check_reports_the_heartbeat(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis as sync_redis

    monkeypatch.setenv("REDIS_URL", redis_url)
    assert worker_main(["--devices", "cpu0", "--name", "probe", "--check"]) == 1
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.set(keys.health("worker", "probe"), wire.encode_message("health", {"ts": time.time()}), ex=5)
        assert worker_main(["--devices", "cpu0", "--name", "probe", "--check"]) == 0
    finally:
        client.delete(keys.health("worker", "probe"))
        client.close()
    assert worker_main(["--devices", "gpu7", "--check"]) == 2  # no such device here: refused up front


def test_restart_backoff_doubles_caps_and_resets_after_a_stable_run() -> None:
    proc = ReplicaProcess(ReplicaSlot(1, GROUP, Device("cpu", 0), 0, 1), env={})
    proc.started_at = 100.0
    delays = [proc.schedule_restart(100.0 + i) for i in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0] and proc.state == State.BACKOFF
    assert not proc.due(100.0) and proc.due(200.0)
    proc.started_at = 200.0
    assert proc.schedule_restart(200.0 + STABLE_S) == BACKOFF_START_S  # it ran stably: fast again
    proc.last_exit = EXIT_CONFIG
    assert proc.schedule_restart(300.0) == BACKOFF_MAX_S  # a plan it cannot serve: no fast retries


# ------------------------------------------------------------------------------ host-qualified devices

def two_host_plan(epoch: int) -> dict[str, Any]:
    """One replica of g0 on each device, of this host (node a), of another (b) and of a host without a node."""
    p = plan(epoch, replicas=1)
    p["placement"] = [{"device": d, "replicas": [{"group": GROUP, "share": 50 if "gpu" in d else 1}]}
                      for d in ("gpu0", "b/gpu0", "a/gpu0", "cpu0", "a/cpu0", "b/cpu0", "a/cpu1")]
    return p


@pytest.mark.parametrize(("device", "all_cpu", "want"), [
    (Device("gpu", 0), False, {"a/gpu0-g0-2": "0|50"}),  # replica index 2: the third placement of g0
    (Device("cpu", 0), True, {"a/cpu0-g0-4": "|", "a/cpu1-g0-6": "|"}),  # every cpu of node a, no GPU
])
async def test_agent_on_a_node_serves_only_that_nodes_devices(
        redis: Any, redis_url: str, tmp_path: Path, device: Device, all_cpu: bool, want: dict[str, str]) -> None:
    # A stand-in interpreter: records the GPU it was given, its share and its arguments, then idles.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES|$CUDA_MPS_ACTIVE_THREAD_PERCENTAGE|$*" '
                    f'>> {tmp_path / "argv"}\nexec sleep 30\n')
    fake.chmod(0o755)
    settings = Settings(redis_url=redis_url, resolution=32, models=("resnet18",), log_level="warning", node="a")
    await publish_plan(redis, two_host_plan(1))
    agent = Agent(settings, [device], name="node-a", python=str(fake), poll_s=0.05, stop_grace_s=5.0, mps=False,
                  all_cpu_devices=all_cpu)
    task = asyncio.create_task(agent.run())
    record = tmp_path / "argv"
    try:
        await until(lambda: {p.slot.consumer for p in agent.replicas if p.alive} == set(want)
                    and record.exists() and len(record.read_text().splitlines()) >= len(want), 15,
                    f"replicas {set(want)}")
        assert sorted(agent.devices) == sorted(c.rsplit("-g0-", 1)[0] for c in want)  # never b/…, never plain
        seen = {}
        for line in record.read_text().splitlines():
            gpu, share, args = line.split("|", 2)
            argv = args.split()
            seen[f"{argv[argv.index('--device') + 1]}-g0-{argv[argv.index('--index') + 1]}"] = f"{gpu}|{share}"
        assert seen == want  # CUDA index and MPS share from the part after the slash
        deadline = time.monotonic() + 10
        while True:
            raw = await redis.get(keys.health("worker", "node-a"))
            beat = None if raw is None else wire.decode_message(raw, "health")
            if beat is not None and beat["devices"] == sorted(agent.devices):
                break
            assert time.monotonic() < deadline, "no heartbeat naming the agent's devices"
            await asyncio.sleep(0.05)
        assert beat["node"] == "a" and beat["all_cpu_devices"] is all_cpu
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 20) == 0


def test_an_agent_refuses_another_nodes_device() -> None:
    with pytest.raises(ValueError, match="node 'b'"):
        Agent(Settings(node="a"), [Device("gpu", 0, "b")])
    with pytest.raises(ValueError, match="node 'a'"):
        Agent(Settings(), [Device("gpu", 0, "a")])
    agent = Agent(Settings(node="a"), [Device("gpu", 1), Device("gpu", 0, "a")], name="x")
    assert sorted(agent.devices) == ["a/gpu0", "a/gpu1"] and agent.devices["a/gpu1"].index == 1
    assert agent.status()["node"] == "a"


def test_worker_main_names_devices_on_graft_node(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis as sync_redis

    import services.worker.__main__ as worker_mod
    import services.worker.device as device_mod

    made: list[list[str]] = []

    class RecordingAgent:
        def __init__(self, settings: Settings, devices: Any, **kw: Any) -> None:
            made.append([d.name for d in devices])

        def stop(self) -> None:
            pass

        async def run(self) -> int:
            return 0

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("GRAFT_LOG_LEVEL", "warning")
    monkeypatch.setenv("GRAFT_NODE", "a")
    monkeypatch.setattr(device_mod, "nvml_gpu_count", lambda: (2, "test"))
    monkeypatch.setattr(worker_mod, "Agent", RecordingAgent)
    assert worker_mod.main(["--devices", "auto", "--name", "w"]) == 0
    assert worker_mod.main(["--devices", "gpu1", "--name", "w"]) == 0
    assert made == [["a/gpu0", "a/gpu1"], ["a/gpu1"]]
    assert worker_mod.main(["--devices", "b/gpu0", "--check"]) == 2  # another node's device: refused
    # --check looks for the heartbeat of the agent the same command would start (named after its devices)
    name = f"{socket.gethostname()}-a/gpu0+a/gpu1"
    assert worker_mod.main(["--devices", "auto", "--check"]) == 1
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.set(keys.health("worker", name), wire.encode_message("health", {"ts": time.time()}), ex=5)
        assert worker_mod.main(["--devices", "auto", "--check"]) == 0
    finally:
        client.delete(keys.health("worker", name))
        client.close()
    monkeypatch.setenv("GRAFT_NODE", "a/b")
    assert worker_mod.main(["--devices", "auto", "--name", "w"]) == 2  # bad settings
