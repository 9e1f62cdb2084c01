"""``graft up``'s pieces: the profile cache, waiting for readiness, and the whole system on an embedded Redis."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from typer.testing import CliRunner

from common.contract import keys
from common.profiles import Profile
from common.settings import Settings
from common.store.connection import wait_for_redis
from common.store.plan_store import load_plan, publish_plan
from common.store.registry import Registry
from tests.helpers import alive
from tools import admin
from tools.cli import app
from tools.supervisor import ChildSpec, Supervisor
from tools.up import System, cached_profile_path, ensure_profile, start_system, wait_ready

RES = 32
SETTINGS = Settings(models=("resnet18",), resolution=RES, device="cpu", log_level="warning",
                    gateway_http_port=0, gateway_grpc_port=0)  # free ports: nothing here may need 8000


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private profile cache; HOME moves too, so a write to ~/.cache by mistake lands here and is seen."""
    monkeypatch.setenv("GRAFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------ profile


def test_ensure_profile_measures_once_then_reuses_the_cache(cache: Path, tmp_path: Path) -> None:
    path, measured = ensure_profile(SETTINGS, progress=False)
    assert measured is True
    assert path.parent == cache / "profiles" and path.name.startswith("cpu-") and path.suffix == ".json"
    prof = Profile.load(path)
    assert set(prof.models) == {"resnet18"} and prof.model("resnet18").input_shape == (3, RES, RES)
    stamp = path.stat().st_mtime_ns

    again, measured = ensure_profile(SETTINGS, progress=False)
    assert (again, measured) == (path, False)
    assert path.stat().st_mtime_ns == stamp  # read, not rewritten

    # Other models or another resolution are another cache entry; the same settings in another order are not.
    assert cached_profile_path(SETTINGS.with_(resolution=64), "cpu") != path
    assert cached_profile_path(SETTINGS.with_(models=("resnet18", "mobilenet_v2")), "cpu") != path
    assert cached_profile_path(SETTINGS.with_(models=("mobilenet_v2", "resnet18")), "cpu") == \
        cached_profile_path(SETTINGS.with_(models=("resnet18", "mobilenet_v2")), "cpu")

    # --reprofile (refresh) measures again and replaces the cached entry.
    again, measured = ensure_profile(SETTINGS, progress=False, refresh=True)
    assert (again, measured) == (path, True) and path.stat().st_mtime_ns != stamp

    # A damaged cache entry is measured again, not trusted.
    path.write_text("{ not json")
    again, measured = ensure_profile(SETTINGS, progress=False)
    assert (again, measured) == (path, True)
    assert set(Profile.load(path).models) == {"resnet18"}
    assert not (tmp_path / "home").exists()  # nothing went to ~/.cache


def test_an_explicit_profile_is_used_as_given(cache: Path, tmp_path: Path) -> None:
    given = tmp_path / "mine.json"
    assert ensure_profile(SETTINGS.with_(profile=str(given)), progress=False) == (given, False)
    assert not cache.exists()  # nothing measured, nothing cached


# --------------------------------------------------------------------------------------- wait_ready


def plan(epoch: int, replicas: int) -> dict[str, Any]:
    g = {"id": "g0", "model": "resnet18", "fragments": [["resnet18", 3]], "cuts": [3], "batch": 2, "share": 1,
         "replicas": replicas, "latency_ms": 5.0, "rate_rps": 1.0, "min_budget_ms": 50.0}
    return {"epoch": epoch, "policy": "test", "profile": "test", "rho": 0.9, "groups": [g], "infeasible": [],
            "placement": [{"device": "cpu0", "replicas": [{"group": "g0", "share": 1}] * replicas}],
            "total_share": replicas, "gpus": 0, "routes": {}}


async def beat(r: Any, service: str, name: str, **body: Any) -> None:
    await Registry(r, service, 30.0).beat(name, body)


def system(redis_url: str, tmp_path: Path, supervisor: Supervisor | None = None) -> System:
    return System(SETTINGS.with_(redis_url=redis_url), redis_url, supervisor or Supervisor([]), None,
                  tmp_path / "logs")


async def test_wait_ready_waits_for_the_plan_ingress_and_every_replica_of_its_epoch(
        redis: Any, redis_url: str, tmp_path: Path) -> None:
    waits: list[str] = []
    task = asyncio.create_task(wait_ready(system(redis_url, tmp_path), timeout=20, on_wait=waits.append))

    async def reports(progress: str) -> None:  # wait_ready polls every 0.5 s; it must still be waiting
        deadline = time.monotonic() + 5
        while not waits or waits[-1] != progress:
            assert not task.done(), task
            assert time.monotonic() < deadline, f"last progress {waits[-1:]}, want {progress!r}"
            await asyncio.sleep(0.02)

    await reports("plan=none ingress=0 groups without a replica=1")
    await publish_plan(redis, plan(1, replicas=2))
    await reports("plan=epoch 1 ingress=0 groups without a replica=1")
    await beat(redis, "ingress", "ing", epoch=1)
    await reports("plan=epoch 1 ingress=1 groups without a replica=1")
    await publish_plan(redis, plan(2, replicas=2))
    # a replica reading epoch 1's stream does not serve epoch 2; an unreadable entry is ignored
    await beat(redis, "replica", "p0", state="serving", streams=[keys.group_stream(1, "g0")])
    await redis.hset(keys.registry("replica"), "garbled", b"\x00junk")
    await redis.zadd(keys.registry_seen("replica"), {"garbled": 10**13})
    await reports("plan=epoch 2 ingress=0 groups without a replica=1")  # the ingress still routes epoch 1
    await beat(redis, "ingress", "ing", epoch=2)
    await reports("plan=epoch 2 ingress=1 groups without a replica=1")
    await beat(redis, "replica", "p1", state="standby", streams=[])  # loaded, but serving nothing
    await asyncio.sleep(0.5)  # a few polls more: still not ready
    assert not task.done() and waits[-1] == "plan=epoch 2 ingress=1 groups without a replica=1"
    await beat(redis, "replica", "p1", state="serving", streams=[keys.group_stream(2, "g0")])
    ready = await asyncio.wait_for(task, 5)
    assert ready == plan(2, replicas=2)


async def test_wait_ready_times_out_naming_the_logs(redis: Any, redis_url: str, tmp_path: Path) -> None:
    await publish_plan(redis, plan(1, replicas=1))  # no ingress, no replica ever beats
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"not ready after 1.0s; see logs in {tmp_path / 'logs'}"):
        await wait_ready(system(redis_url, tmp_path), timeout=1.0)
    assert time.monotonic() - started < 3


async def test_wait_ready_gives_up_on_a_crash_looping_service(redis: Any, redis_url: str, tmp_path: Path) -> None:
    sup = Supervisor([ChildSpec("planner", [sys.executable, "-c", "raise SystemExit(1)"])], max_backoff_s=0.05,
                     log_dir=tmp_path / "logs")
    await sup.start()
    try:
        with pytest.raises(RuntimeError, match=f"planner keeps crashing; see {tmp_path / 'logs' / 'planner.log'}"):
            await wait_ready(system(redis_url, tmp_path, sup), timeout=20)
    finally:
        await sup.stop()


# ------------------------------------------------------------------------------------- start_system


async def test_start_system_stops_its_embedded_redis_when_it_fails_to_start(tmp_path: Path) -> None:
    seen: list[str] = []

    async def broken(url: str) -> None:
        await wait_for_redis(url, 5)  # it answers here
        seen.append(url)
        raise RuntimeError("no plan for you")

    with pytest.raises(RuntimeError, match="no plan for you"):
        await start_system(SETTINGS, tmp_path / "p.json", log_dir=tmp_path / "logs", services=(),
                           before_services=broken)
    assert len(seen) == 1
    with pytest.raises(TimeoutError):
        await wait_for_redis(seen[0], 0.5)  # and is gone
    with pytest.raises(ValueError, match="unknown services \\['planer'\\]"):
        await start_system(SETTINGS, tmp_path / "p.json", log_dir=tmp_path / "logs", services=("planer",))


async def test_start_system_serves_replans_and_stops(cache: Path, tmp_path: Path) -> None:
    """The real thing: embedded Redis, planner, ingress and worker agent (with its replica) as children."""
    profile_path, _ = ensure_profile(SETTINGS, progress=False)
    system = await start_system(SETTINGS, profile_path, log_dir=tmp_path / "logs", ingresses=2)
    replica_pids: list[int] = []
    try:
        assert system.redis is not None and system.redis_url == system.redis.url  # embedded: no REDIS_URL given
        worker = system.supervisor.children["worker"].spec
        assert worker.argv[-2:] == ["--devices", "cpu"]  # the device kind the profile was measured on
        assert worker.env["GRAFT_PROFILE"] == str(profile_path) and worker.env["REDIS_URL"] == system.redis_url

        first = await wait_ready(system, timeout=60)
        assert first["epoch"] == 1 and {g["model"] for g in first["groups"]} == {"resnet18"}
        assert all(st["running"] and st["restarts"] == 0 for st in system.supervisor.status().values())
        # The plan carries the input shapes, so the front door never loads torch (a restart takes a second).
        assert first["shapes"]["resnet18"]["cuts"][0] == [3, SETTINGS.resolution, SETTINGS.resolution]
        for name in ("ingress", "ingress-2", "gateway"):
            maps = await asyncio.to_thread(Path(f"/proc/{system.supervisor.status()[name]['pid']}/maps").read_text)
            assert "libtorch" not in maps, f"{name} loaded torch"

        r = Redis.from_url(system.redis_url)
        try:
            rows = await admin.services_status(r)
            assert {row["service"] for row in rows} == {"planner", "ingress", "worker", "replica", "gateway"}
            assert sum(row["service"] == "ingress" for row in rows) == 2
            # The admin CLI steers the live planner: a replan publishes epoch 2, which the worker serves.
            res = await asyncio.to_thread(CliRunner().invoke, app, ["replan", "--redis-url", system.redis_url])
            assert res.exit_code == 0, res.output
            deadline = time.monotonic() + 30
            while (view := await load_plan(r)) is None or view.epoch < 2:
                assert time.monotonic() < deadline, "the planner never acted on the replan"
                await asyncio.sleep(0.1)
            assert view.epoch == 2
            second = await wait_ready(system, timeout=60)  # now: epoch 2's stream has a live reader
            assert second["epoch"] == 2
            deadline = time.monotonic() + 30  # the standby may still be loading its model
            while len(pids := [int(row["pid"]) for row in await admin.services_status(r)
                               if row["service"] == "replica"]) < 2:
                assert time.monotonic() < deadline, f"the serving replica and its warm standby: {pids}"
                await asyncio.sleep(0.2)
            replica_pids.extend(pids)
        finally:
            await r.aclose()
    finally:
        await system.stop()

    st = system.supervisor.status()
    assert {name: (s["running"], s["last_exit"]) for name, s in st.items()} == {
        "planner": (False, 0), "ingress": (False, 0), "ingress-2": (False, 0), "worker": (False, 0),
        "gateway": (False, 0)}  # gracefully
    assert replica_pids and not any(alive(pid) for pid in replica_pids)
    with pytest.raises(TimeoutError):
        await wait_for_redis(system.redis_url, 0.5)  # the embedded Redis is gone too
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["gateway.log", "ingress-2.log", "ingress.log",
                                                                     "planner.log", "worker.log"]
    assert os.environ.get("GRAFT_CACHE_DIR") == str(cache)


# ------------------------------------------------------------------- the worker's whole-CPU mode
# ``graft up`` starts the worker with ``--devices cpu`` (or auto on a host without GPUs): on a CPU profile
# the plan's cpu0, cpu1, ... are thread budgets of this one host, and that agent must serve them all.


def cpu_plan(epoch: int) -> dict[str, Any]:
    p = plan(epoch, replicas=3)
    p["placement"] = [{"device": "cpu0", "replicas": [{"group": "g0", "share": 1}]},
                      {"device": "cpu1", "replicas": [{"group": "g0", "share": 2}]},
                      {"device": "gpu0", "replicas": [{"group": "g0", "share": 50}]}]  # another host's
    return p


@pytest.mark.parametrize("all_cpu", [True, False])
async def test_agent_serves_every_cpu_device_of_the_plan_only_in_whole_cpu_mode(
        redis: Any, redis_url: str, tmp_path: Path, all_cpu: bool) -> None:
    from services.worker.agent import Agent
    from services.worker.device import Device

    # A stand-in interpreter: records the replica's arguments and idles (no torch, no model: fast).
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "argv"}\nexec sleep 30\n')
    fake.chmod(0o755)
    await publish_plan(redis, cpu_plan(1))
    agent = Agent(SETTINGS.with_(redis_url=redis_url), [Device("cpu", 0)], name="whole", python=str(fake),
                  poll_s=0.05, stop_grace_s=5.0, all_cpu_devices=all_cpu, standby=0)
    task = asyncio.create_task(agent.run())
    want = {"cpu0-resnet18-0", "cpu1-resnet18-0"} if all_cpu else {"cpu0-resnet18-0"}
    try:
        deadline = time.monotonic() + 15
        while {s.consumer for s in agent.slots} != want or not (tmp_path / "argv").exists() \
                or len((tmp_path / "argv").read_text().splitlines()) < len(want):
            assert time.monotonic() < deadline, f"slots {[s.consumer for s in agent.slots]}, want {want}"
            await asyncio.sleep(0.05)
        assert sorted(agent.devices) == (["cpu0", "cpu1"] if all_cpu else ["cpu0"])  # never gpu0
        lines = sorted((tmp_path / "argv").read_text().splitlines())
        assert [line.split("--device ")[1].split()[0] for line in lines] == sorted(d[:4] for d in want)
        assert all(line.startswith("-m services.worker.replica --name whole/") and "--model resnet18" in line
                   for line in lines)
        # Its registry entry (every second) reports the devices it adopted.
        workers = Registry(redis, keys.WORKER_KIND, 5.0)
        while (await workers.live()).get("whole", {}).get("devices") != sorted(agent.devices):
            assert time.monotonic() < deadline + 5, "no agent heartbeat with its devices"
            await asyncio.sleep(0.05)
        procs = [p.proc for p in agent.procs.values()]
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 20) == 0
    assert all(p is not None and p.returncode is not None for p in procs)


@pytest.mark.parametrize(("devices", "gpus", "whole_cpu"), [
    ("cpu", 0, True), ("auto", 0, True), ("cpu0", 0, False), ("cpu0,cpu1", 0, False), ("auto", 2, False)])
def test_worker_main_turns_on_whole_cpu_mode_for_auto_or_cpu_on_a_host_without_gpus(
        monkeypatch: pytest.MonkeyPatch, redis_url: str, devices: str, gpus: int, whole_cpu: bool) -> None:
    import services.worker.__main__ as worker_main
    import services.worker.device as device

    made: list[dict[str, Any]] = []

    class RecordingAgent:
        def __init__(self, settings: Settings, devices: Any, **kw: Any) -> None:
            made.append({"devices": [d.name for d in devices], **kw})

        def stop(self) -> None:
            pass

        async def run(self, stop: Any = None) -> int:
            return 0

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("GRAFT_LOG_LEVEL", "warning")
    monkeypatch.setattr(device, "nvml_gpu_count", lambda: (gpus, "test"))
    monkeypatch.setattr(worker_main, "Agent", RecordingAgent)
    monkeypatch.setattr(worker_main, "discover", lambda spec, node="": device.discover(spec, node=node))
    assert worker_main.main(["--devices", devices, "--name", "w"]) == 0
    [kw] = made
    assert kw["all_cpu_devices"] is whole_cpu
    assert kw["devices"] == ({"cpu": ["cpu0"], "cpu0": ["cpu0"], "cpu0,cpu1": ["cpu0", "cpu1"]}.get(devices)
                             or (["gpu0", "gpu1"] if gpus else ["cpu0"]))
