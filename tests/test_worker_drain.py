"""Retiring a group stream: drained only when every live ingress routes a newer epoch and nothing is left
in it (make-before-break); then the agent drops it from its slot, and a slot with nothing left is released.

The pure rules (``common.store.backlog``) are checked on values, the backlog on a real stream, and the
agent's side with stand-in replica processes (``tests.fake_replica``: the agent's protocol, no model)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from common.contract import keys
from common.settings import Settings
from common.store.backlog import Backlog, Polled, ingresses_past, is_drained, poll_backlogs, read_backlog
from common.store.plan_store import publish_plan
from common.store.streams import ensure_group
from services.worker import agent as agent_mod
from services.worker.agent import Agent
from services.worker.device import Device
from tests.helpers import alive, until
from tests.worker_helpers import fake_python, group, ingress_at, live_replicas, plan

pytestmark = pytest.mark.timeout(60)

MODEL = "resnet18"


# ------------------------------------------------------------------------------------------- rules


def test_a_retired_stream_is_drained_only_when_empty_and_quiet() -> None:
    last_ms = 1_000_000
    idle = Backlog(0, 0, f"{last_ms}-3")
    assert is_drained(idle, now_ms=last_ms + 1000, quiet_s=1.0)
    assert not is_drained(idle, now_ms=last_ms + 999, quiet_s=1.0)  # the ingress may still be switching
    assert not is_drained(Backlog(1, 0, f"{last_ms}-3"), now_ms=last_ms + 10_000, quiet_s=1.0)  # unread
    assert not is_drained(Backlog(0, 2, f"{last_ms}-3"), now_ms=last_ms + 10_000, quiet_s=1.0)  # unacked
    assert is_drained(None, now_ms=0, quiet_s=1.0)  # the stream is gone already


def test_no_ingress_alive_means_nobody_routes_to_the_old_stream() -> None:
    assert ingresses_past([], 3)


def test_waits_for_the_slowest_ingress() -> None:
    assert not ingresses_past([{"epoch": 4}, {"epoch": 3}], 3)  # b still routes by 3: its new replicas aren't up
    assert ingresses_past([{"epoch": 4}, {"epoch": 4}], 3)
    assert not ingresses_past([{"epoch": 4}], 4)


def test_garbage_and_planless_ingresses_do_not_block_a_drain() -> None:
    assert ingresses_past([{"epoch": None}, {"epoch": "7"}, {}, {"epoch": 7}], 6)  # no plan yet routes nothing


async def test_backlog_of_a_real_stream(redis: Any) -> None:
    stream = keys.group_stream(1, "g0")
    assert await read_backlog(redis, stream) is None  # never created
    await ensure_group(redis, stream, keys.WORKER_GROUP)
    ids = [await redis.xadd(stream, {keys.FIELD: b"x"}) for _ in range(3)]
    got = await read_backlog(redis, stream)
    assert got is not None and (got.undelivered, got.pending) == (3, 0) and got.last_id == ids[-1].decode()
    await redis.xreadgroup(keys.WORKER_GROUP, "c", {stream: ">"}, count=2)
    got = await read_backlog(redis, stream)
    assert got is not None and (got.undelivered, got.pending, got.total) == (1, 2, 3)
    await redis.xreadgroup(keys.WORKER_GROUP, "c", {stream: ">"})
    await redis.xack(stream, keys.WORKER_GROUP, *ids)
    got = await read_backlog(redis, stream)
    assert got is not None and got.total == 0


async def test_a_poll_counts_what_the_group_finished(redis: Any) -> None:
    stream = keys.group_stream(1, "g1")
    await ensure_group(redis, stream, keys.WORKER_GROUP)
    ids = [await redis.xadd(stream, {keys.FIELD: b"x"}) for _ in range(5)]
    await redis.xreadgroup(keys.WORKER_GROUP, "c", {stream: ">"}, count=3)
    await redis.xack(stream, keys.WORKER_GROUP, ids[0])
    polled = await poll_backlogs(redis, {"g1": stream, "gone": keys.group_stream(1, "never")})
    assert polled["g1"].backlog == 4  # two undelivered, two pending
    major = int(str((await redis.info("server"))["redis_version"]).split(".")[0])
    assert polled["g1"].acked == (1 if major >= 7 else None)  # entries-read exists from Redis 7.0
    assert polled["gone"] == Polled(0, None)


# ------------------------------------------------------------------------------------------- agent


def two_then_one(epoch: int) -> dict[str, Any]:
    """Epoch 1: group g1 with two replicas on cpu0; later epochs: one replica of a new group g{epoch}."""
    if epoch == 1:
        return plan(1, [group("g1", MODEL)], [("cpu0", "g1", 1), ("cpu0", "g1", 1)])
    gid = f"g{epoch}"
    return plan(epoch, [group(gid, MODEL)], [("cpu0", gid, 1)])


def slot(agent: Agent, consumer: str) -> dict[str, Any] | None:
    return next((s for s in agent.status()["slots"] if s["consumer"] == consumer), None)


def proc_of(agent: Agent, consumer: str) -> Any:
    s = slot(agent, consumer)
    return None if s is None or s["process"] is None else agent.procs.get(s["process"])


@pytest.mark.parametrize(("cap", "then"), [(None, "stops"), (2, "standby")])
async def test_a_drained_stream_is_dropped_and_its_empty_slot_released(
        redis: Any, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int | None,
        then: str) -> None:
    # The old agent had no slots: each epoch got new processes (a cold start) and the old ones watched the
    # plan and exited by themselves once drained. Here the same processes carry on; the stream of the retired
    # group is dropped from its slot only once the ingress routes epoch 2 and nothing is pending in it, and
    # the slot left with nothing to do is released: its process stops when a standby of its kind already
    # waits (cap None: the agent keeps one), else it stays, warm, as that standby (cap 2: no room for one
    # while both slots were busy). The old release counted the released process among the free standbys
    # and so always stopped it, then started a cold standby in its place.
    monkeypatch.setattr(agent_mod, "DRAIN_QUIET_S", 0.3)
    settings = Settings(redis_url=redis_url, log_level="warning")
    agent = Agent(settings, [Device("cpu", 0)], name="drain", python=fake_python(tmp_path), poll_s=0.05,
                  standby=1, max_cpu_processes=cap, stop_grace_s=5.0)
    old, new = keys.group_stream(1, "g1"), keys.group_stream(2, "g2")
    await publish_plan(redis, two_then_one(1))
    async with ingress_at(redis, 1) as ingress:
        task = asyncio.create_task(agent.run())
        try:
            want = 3 if cap is None else 2  # two slots, and a standby when the cap leaves room for it
            await until(lambda: len(agent._ready_procs) == want, 20, f"{want} processes registered")
            a, b = proc_of(agent, "cpu0-resnet18-0"), proc_of(agent, "cpu0-resnet18-1")
            assert a is not None and b is not None and len(agent.procs) == want
            pids = {p.name: p.pid for p in agent.procs.values()}

            await ensure_group(redis, old, keys.WORKER_GROUP)
            await redis.xadd(old, {keys.FIELD: b"late"})  # an entry the ingress routed before switching
            await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-1", {old: ">"})  # held, not acked
            await publish_plan(redis, two_then_one(2))
            await until(lambda: agent.epoch == 2, 5, "epoch 2")
            assert slot(agent, "cpu0-resnet18-0") == {
                "consumer": "cpu0-resnet18-0", "device": "cpu0", "model": MODEL, "share": 1, "group": "g2",
                "epoch": 2, "draining": [old], "process": a.name}
            assert slot(agent, "cpu0-resnet18-1")["draining"] == [old]  # type: ignore[index]
            await until(lambda: a.assignment.streams == (new, old), 5, "the re-targeted slot reads both")

            await asyncio.sleep(0.8)  # well past the quiet time: still held, because the ingress routes epoch 1
            assert slot(agent, "cpu0-resnet18-1") is not None and old in a.assignment.streams
            ingress["epoch"] = 2
            await asyncio.sleep(0.8)  # the ingress moved on, but an entry is still pending
            assert slot(agent, "cpu0-resnet18-1") is not None and old in a.assignment.streams
            [(eid, _)] = (await redis.xrange(old))
            await redis.xack(old, keys.WORKER_GROUP, eid)

            await until(lambda: slot(agent, "cpu0-resnet18-1") is None, 5, "the empty slot released")
            assert a.assignment.streams == (new,) and a.pid == pids[a.name]  # the same process, drain dropped
            assert 0 < await redis.ttl(old) <= settings.max_slo_ms / 1000 + 60  # the stream goes away by itself
            if then == "stops":
                await until(lambda: b.exit_code is not None, 10, "the released process to stop")
                assert b.exit_code == 0 and not alive(pids[b.name])
                assert sorted(agent.procs) == sorted(n for n in pids if n != b.name)  # no new process either
            else:
                await until(lambda: b.assignment.consumer is None, 5, "the released process on standby")
                live = await live_replicas(redis)
                assert live[b.name]["state"] == "standby" and live[b.name]["streams"] == []
                await asyncio.sleep(0.3)
                assert b.alive and b.pid == pids[b.name] and sorted(agent.procs) == sorted(pids)  # warm, not replaced
        finally:
            agent.stop()
            assert await asyncio.wait_for(task, 20) == 0
    assert all(not alive(pid) for pid in pids.values() if pid is not None)


async def test_no_ingress_and_an_empty_stream_drains_at_once(redis: Any, redis_url: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_mod, "DRAIN_QUIET_S", 0.2)
    agent = Agent(Settings(redis_url=redis_url, log_level="warning"), [Device("cpu", 0)], name="drain0",
                  python=fake_python(tmp_path), poll_s=0.05, standby=0, stop_grace_s=5.0)
    await publish_plan(redis, two_then_one(1))
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: len(agent._ready_procs) == 2, 20, "two processes registered")
        t0 = time.monotonic()
        await publish_plan(redis, two_then_one(2))
        await until(lambda: [s["consumer"] for s in agent.status()["slots"]] == ["cpu0-resnet18-0"]
                    and not agent.status()["slots"][0]["draining"], 5, "the retired stream dropped")
        assert time.monotonic() - t0 < 3.0
        await until(lambda: len(agent.procs) == 1, 10, "the released process gone (no standby wanted)")
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, 20) == 0
