"""Planner high availability: one leader by a lease, a standby takes over, fenced publishes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from common.contract import keys, wire
from common.settings import Settings
from common.store.plan_store import NotLeader, load_plan, publish_plan
from services.lifecycle import Heartbeat
from services.planner import service
from services.planner.leadership import Lease
from tests.helpers import cpu_test_profile, until


def plan(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "policy": "test", "profile": "t", "rho": 0.9, "groups": [], "infeasible": [],
            "placement": [], "total_share": 0, "gpus": 0, "routes": {}}


async def test_the_lease_has_one_holder_and_lapses(redis: Any) -> None:
    a, b = Lease(redis, "a", ttl_s=0.3), Lease(redis, "b", ttl_s=0.3)
    assert await a.hold() and not await b.hold()
    assert await a.hold() and await a.holder() == "a"  # renewing its own
    await asyncio.sleep(0.45)  # a stopped renewing (paused, dead): the lease lapses
    assert await b.hold() and not await a.hold() and await b.holder() == "b"
    await a.release()  # not its lease any more: nothing happens
    assert await b.holder() == "b"
    await b.release()
    assert await b.holder() is None


async def test_publishes_are_fenced_by_the_lease(redis: Any) -> None:
    a = Lease(redis, "a")
    assert await a.hold()
    await publish_plan(redis, plan(1), fence="a")
    with pytest.raises(NotLeader):
        await publish_plan(redis, plan(2), fence="b")  # a planner that lost the lease cannot publish
    view = await load_plan(redis)
    assert view is not None and view.epoch == 1 and await redis.xlen(keys.PLANS) == 1


async def test_a_standby_takes_over_within_seconds_and_epochs_stay_unique(redis: Any, redis_url: str,
                                                                           tmp_path: Any) -> None:
    path = tmp_path / "cpu.json"
    cpu_test_profile().save(path)
    settings = Settings(redis_url=redis_url, models=("m",), profile=str(path), replan_s=0.2, block_ms=20)
    stops = {n: asyncio.Event() for n in ("p-a", "p-b")}
    beats = {n: Heartbeat(redis, keys.PLANNER_KIND, n, interval_s=0.2) for n in stops}
    tasks = {n: asyncio.create_task(service.main(settings, redis, stops[n], beats[n])) for n in ("p-a",)}
    await until(lambda: beats["p-a"].status.get("role") == "leader", 10, "p-a to lead")
    tasks["p-b"] = asyncio.create_task(service.main(settings, redis, stops["p-b"], beats["p-b"]))
    await until(lambda: beats["p-b"].status.get("role") == "standby" and beats["p-b"].status.get("leader") == "p-a",
                10, "p-b to stand by behind p-a")
    first = await load_plan(redis)
    assert first is not None and first.epoch == 1
    # the leader dies without a word (no release): its lease lapses and the standby leads
    tasks["p-a"].cancel()
    await asyncio.gather(tasks["p-a"], return_exceptions=True)
    died = time.monotonic()
    await until(lambda: beats["p-b"].status.get("role") == "leader", 10, "p-b to take over")
    await redis.xadd(keys.CONTROL, {keys.FIELD: wire.encode_message("control", {"cmd": "replan"})})

    async def epoch_two() -> bool:
        view = await load_plan(redis)
        return view is not None and view.epoch == 2

    while not await epoch_two():
        assert time.monotonic() - died < 5.0, "no plan published within 5 s of the leader's death"
        await asyncio.sleep(0.05)
    epochs = [wire.decode_plan(f[keys.FIELD])["epoch"] for _, f in await redis.xrange(keys.PLANS)]
    assert epochs == [1, 2]  # the new leader adopted the published plan: never two plans for one epoch
    stops["p-b"].set()
    await asyncio.wait_for(tasks["p-b"], 10)
    assert await Lease(redis, "x").holder() is None  # a clean stop releases the lease at once
