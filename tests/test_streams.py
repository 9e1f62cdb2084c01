"""Stream plumbing against a real Redis: groups, own-pending recovery, dead letters, trimming, reconnects."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common.contract import keys, wire
from common.contract.errors import BadTensor, ErrorCode
from common.settings import Settings, SettingsError
from common.store import connection, streams
from common.store.streams import Entry, StreamConsumer
from tools.redis_server import RedisServer

S, G = "graft:test:s", "g"


async def _fill(r: Redis, n: int, prefix: bytes = b"p") -> list[str]:
    return [await streams.xadd(r, S, prefix + str(i).encode()) for i in range(n)]


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for _ in itertools.count():
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def _pending(r: Redis, stream: str = S) -> list[dict[str, object]]:
    return list(await r.xpending_range(stream, G, "-", "+", 10_000))


async def test_ensure_group_is_idempotent_and_only_ignores_busygroup(redis: Redis) -> None:
    assert await streams.ensure_group(redis, S, G) is True
    await streams.xadd(redis, S, b"x")
    assert await streams.ensure_group(redis, S, G) is False
    groups = await redis.xinfo_groups(S)
    assert [g["name"] for g in groups] == [G.encode()] and groups[0]["last-delivered-id"] == b"0-0"
    await redis.set("graft:test:str", b"v")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await streams.ensure_group(redis, "graft:test:str", G)


async def test_xadd_caps_length_approximately(redis: Redis) -> None:
    for i in range(1000):
        await streams.xadd(redis, S, b"%d" % i, maxlen=100)
    # '~' frees whole radix nodes of up to 100 entries, so the cap overshoots by less than one node.
    assert 100 <= await redis.xlen(S) < 300
    await streams.xadd(redis, S, b"last", maxlen=10, approximate=False)
    assert await redis.xlen(S) == 10


async def test_consumer_rereads_its_own_pending_before_new_entries(redis: Redis) -> None:
    await streams.ensure_group(redis, S, G)
    first = await _fill(redis, 5)
    c1 = StreamConsumer(redis, S, G, "worker-1", count=3)
    got = await c1.read()
    assert [e.id for e in got] == first[:3] and all(e.deliveries == 1 for e in got)
    # worker-1 dies holding 3 entries; 2 more arrive; another consumer takes the 2 unread ones.
    later = await _fill(redis, 2, b"q")
    other = StreamConsumer(redis, S, G, "worker-2", count=10)
    assert [e.id for e in await other.read()] == first[3:] + later
    await _fill(redis, 1, b"r")

    restarted = StreamConsumer(redis, S, G, "worker-1", count=2)
    assert restarted.recovering
    page1, page2 = await restarted.read(), await restarted.read()
    assert [e.id for e in page1 + page2] == first[:3]            # own pending, following the ids
    assert all(e.deliveries == 2 and e.payload for e in page1 + page2)
    fresh = await restarted.read()
    assert not restarted.recovering and [e.payload for e in fresh] == [b"r0"]
    assert await restarted.ack(e.id for e in page1 + page2 + fresh) == 4
    assert {p["consumer"] for p in await _pending(redis)} == {b"worker-2"}


async def test_deliveries_counts_pending_entries_only(redis: Redis) -> None:
    await streams.ensure_group(redis, S, G)
    ids = await _fill(redis, 3)
    await redis.xreadgroup(G, "c", {S: ">"}, count=2)
    await redis.xreadgroup(G, "c", {S: "0"})  # a history read counts as a delivery too
    assert await streams.deliveries(redis, S, G, ids) == {ids[0]: 2, ids[1]: 2}
    assert await streams.deliveries(redis, S, G, []) == {}


async def test_dead_letter_moves_and_acks_in_one_step(redis: Redis) -> None:
    await streams.ensure_group(redis, S, G)
    ids = await _fill(redis, 2)
    await redis.xreadgroup(G, "c", {S: ">"})
    await streams.dead_letter(redis, S, G, ids[0], b"p0", BadTensor("shape mismatch"), deliveries=4, consumer="c")
    await streams.dead_letter(redis, S, G, ids[1], b"p1", "plain text reason")
    assert await _pending(redis) == []
    dl = await streams.list_dead_letters(redis, S)
    assert [(d.entry_id, d.payload, d.code, d.message) for d in dl] == [
        (ids[0], b"p0", ErrorCode.BAD_TENSOR, "shape mismatch"),
        (ids[1], b"p1", ErrorCode.INTERNAL, "plain text reason"),
    ]
    assert dl[0].deliveries == 4 and dl[0].consumer == "c" and dl[0].stream == S and dl[0].group == G
    assert abs(dl[0].time_ms / 1000 - time.time()) < 60


async def test_poison_pending_entry_is_dead_lettered_on_reread(redis: Redis) -> None:
    await streams.ensure_group(redis, S, G)
    ids = await _fill(redis, 2)
    await redis.xreadgroup(G, "w", {S: ">"})
    for _ in range(2):
        await redis.xreadgroup(G, "w", {S: "0"}, count=1)  # only the first entry: now delivered 3 times
    heard: list[tuple[Entry, str]] = []
    c = StreamConsumer(redis, S, G, "w", max_deliveries=3,
                       on_dead_lettered=lambda e, err: heard.append((e, str(err.code))))
    got = await c.read()
    assert [e.id for e in got] == [ids[1]] and got[0].deliveries == 2
    assert [(e.id, e.deliveries, code) for e, code in heard] == [(ids[0], 4, "INTERNAL")]
    dl = await streams.list_dead_letters(redis, S)
    assert [d.entry_id for d in dl] == [ids[0]] and "more than max_deliveries=3" in dl[0].message
    assert [p["message_id"].decode() for p in await _pending(redis)] == [ids[1]]  # type: ignore[attr-defined]


async def test_entry_without_payload_field_is_dead_lettered_not_returned(redis: Redis) -> None:
    await streams.ensure_group(redis, S, G)
    bad = (await redis.xadd(S, {b"other": b"x"})).decode()
    good = await streams.xadd(redis, S, b"ok")
    c = StreamConsumer(redis, S, G, "w")
    assert [e.id for e in await c.read()] == [good]
    dl = await streams.list_dead_letters(redis, S)
    assert [(d.entry_id, d.code) for d in dl] == [(bad, ErrorCode.INVALID_REQUEST)]


async def test_pending_entries_trimmed_away_are_acked_silently(redis: Redis) -> None:
    await streams.ensure_group(redis, S, G)
    ids = await _fill(redis, 3)
    await redis.xreadgroup(G, "w", {S: ">"})
    await redis.xdel(S, ids[0], ids[2])
    c = StreamConsumer(redis, S, G, "w")
    assert [e.id for e in await c.read()] == [ids[1]]
    assert [p["message_id"].decode() for p in await _pending(redis)] == [ids[1]]  # type: ignore[attr-defined]


async def test_blocking_read_returns_within_block_when_idle(redis: Redis) -> None:
    c = StreamConsumer(redis, S, G, "w", block_ms=100)
    assert await c.read() == []          # own pending (none) then the blocking read
    t0 = time.monotonic()
    assert await c.read() == []
    assert 0.08 <= time.monotonic() - t0 < 1.0


async def test_block_at_or_above_socket_timeout_is_refused(redis_url: str) -> None:
    with pytest.raises(SettingsError):
        Settings(block_ms=5000, socket_timeout_s=5.0)
    client = connection.connect(redis_url, settings=Settings(block_ms=100, socket_timeout_s=0.2))
    try:
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.2
        assert await client.ping()
        with pytest.raises(ValueError, match="below the socket timeout"):
            StreamConsumer(client, S, G, "w", block_ms=200)
        StreamConsumer(client, S, G, "w", block_ms=150)
    finally:
        await client.aclose()


async def test_trim_by_age_on_the_redis_clock_and_by_length(redis: Redis) -> None:
    secs, _ = await redis.time()
    old_ms = (int(secs) - 120) * 1000
    for i in range(300):
        await redis.xadd(S, {keys.FIELD: b"old"}, id=f"{old_ms}-{i}")
    new = await _fill(redis, 10)
    removed = await streams.trim(redis, S, max_age_ms=60_000, maxlen=None)   # approximate: whole nodes
    assert removed >= 200 and await redis.xlen(S) == 310 - removed
    removed += await streams.trim(redis, S, max_age_ms=60_000, approximate=False)
    assert removed == 300 and [i.decode() for i, _ in await redis.xrange(S)] == new
    assert await streams.trim(redis, S, max_age_ms=60_000, maxlen=4, approximate=False) == 6
    assert [i.decode() for i, _ in await redis.xrange(S)] == new[-4:]
    assert await streams.trim(redis, "graft:test:missing", max_age_ms=1000, maxlen=10) == 0


async def test_wait_for_redis(redis_url: str) -> None:
    await connection.wait_for_redis(redis_url, timeout=2)
    from tools.redis_server import free_port
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer"):
        await connection.wait_for_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    assert time.monotonic() - t0 < 2.0


async def test_lost_group_is_recreated_from_the_start(redis: Redis) -> None:
    c = StreamConsumer(redis, S, G, "w")
    assert await c.read() == []
    await redis.delete(S)                    # as after a Redis restart without persistence
    await streams.xadd(redis, S, b"after")
    assert await c.read() == []             # NOGROUP: group re-created from id 0
    assert [e.payload for e in await c.read()] == [b"after"]


def _decode_or_raise(seen: list[bytes]) -> streams.Handler:
    def handle(entries: list[Entry]) -> None:
        for e in entries:
            assert e.payload is not None
            wire.decode_message(e.payload, "job")  # raises InvalidRequest on garbage
        seen.extend(e.payload for e in entries if e.payload is not None)
    return handle


async def test_malformed_payload_does_not_crash_the_consumer_loop(redis: Redis) -> None:
    good = [wire.encode_message("job", {"n": i}) for i in range(6)]
    await streams.ensure_group(redis, S, G)
    for p in good[:3]:
        await streams.xadd(redis, S, p)
    garbage = await streams.xadd(redis, S, b"\xc1 not msgpack")
    await redis.xadd(S, {b"no-m": b"1"})
    for p in good[3:]:
        await streams.xadd(redis, S, p)
    seen: list[bytes] = []
    stop = asyncio.Event()
    c = StreamConsumer(redis, S, G, "w", count=4, block_ms=50, max_deliveries=3)
    task = asyncio.create_task(c.run(_decode_or_raise(seen), stop=stop))
    try:
        async def settled() -> bool:
            letters = await streams.list_dead_letters(redis, S)
            return len(letters) == 2 and set(seen) == set(good) and not await _pending(redis)

        await eventually(settled)
    finally:
        stop.set()
        await task
    dl = {d.entry_id: d for d in await streams.list_dead_letters(redis, S)}
    assert dl[garbage].payload == b"\xc1 not msgpack" and dl[garbage].deliveries == 4
    assert "InvalidRequest" in dl[garbage].message and dl[garbage].code == ErrorCode.INTERNAL
    assert sorted(d.code for d in dl.values()) == [ErrorCode.INTERNAL, ErrorCode.INVALID_REQUEST]
    assert not task.exception()


async def test_consumer_loop_survives_a_redis_restart() -> None:
    async with RedisServer() as server:
        port = server.port
        client = connection.connect(server.url, settings=Settings(block_ms=50, socket_timeout_s=1.0))
        producer = Redis.from_url(server.url)
        seen: list[bytes] = []
        stop = asyncio.Event()
        c = StreamConsumer(client, S, G, "w", block_ms=50)
        task = asyncio.create_task(c.run(lambda es: seen.extend(e.payload or b"" for e in es), stop=stop,
                                         backoff=connection.Backoff(base=0.02, cap=0.2)))
        try:
            async with asyncio.timeout(15):
                for i in range(3):
                    await streams.xadd(producer, S, b"before%d" % i)
                await eventually(lambda: len(seen) == 3)
                await server.astop()
                await asyncio.sleep(0.3)                       # the loop sees the outage and backs off
                assert not task.done()
                async with RedisServer(port=port):             # same port, empty data set
                    await producer.aclose()
                    producer = Redis.from_url(server.url)
                    for i in range(3):
                        await streams.xadd(producer, S, b"after%d" % i)
                    await eventually(lambda: len(seen) == 6)
                    await eventually(lambda: _no_pending(producer))   # the last XACK may still be in flight
                    stop.set()
                    await task
        finally:
            stop.set()
            await producer.aclose()
            await client.aclose()
    assert seen == [b"before0", b"before1", b"before2", b"after0", b"after1", b"after2"]


async def _no_pending(r: Redis) -> bool:
    return int((await r.xpending(S, G))["pending"]) == 0


async def test_finished_entries_are_trimmed_a_second_after_and_owed_ones_never(redis: Redis) -> None:
    """The old trim kept every entry for the longest SLO (60 s): a minute of traffic in Redis, ~120 MB
    a second of growth at 5x overload. Now what every group finished goes about a second later; what a
    group has not read, or read and not acked, stays whatever its age."""
    s, group = "graft:test:trim-finished", "workers"
    await streams.ensure_group(redis, s, group, "0")
    secs, _ = await redis.time()
    t = (int(secs) - 5) * 1000  # 5 s ago: finished long enough, far younger than any SLO limit
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(1_000):
            pipe.xadd(s, {keys.FIELD: b"x" * 64}, id=f"{t}-{i}")
        await pipe.execute()
    delivered = await redis.xreadgroup(group, "c", {s: ">"}, count=600)
    ids = [i for i, _ in delivered[0][1]]
    await redis.xack(s, group, *ids[:500])  # 500 finished, 100 pending, 400 never read
    removed = await streams.safe_trim(redis, s)
    assert 400 <= removed <= 500  # approximate: whole nodes, never past the oldest pending entry
    rest = [i.decode() for i, _ in await redis.xrange(s)]
    assert f"{t}-500" in rest and f"{t}-999" in rest and len(rest) == 1_000 - removed
    assert (await redis.xpending(s, group))["pending"] == 100
    # Entries younger than the keep time stay even when finished.
    fresh = [await redis.xadd(s, {keys.FIELD: b"y"}) for _ in range(3)]
    await redis.xreadgroup(group, "c", {s: ">"})
    await redis.xack(s, group, *ids[500:], *[i for i, _ in (await redis.xrange(s, min=f"{t}-600", max=f"{t}-999"))])
    await redis.xack(s, group, *fresh)
    await streams.safe_trim(redis, s)
    assert [i for i, _ in await redis.xrange(s, min=fresh[0])] == fresh


async def test_a_stream_no_group_reads_yet_is_never_trimmed(redis: Redis) -> None:
    """Producers may write before the first ingress has created its group (it does on its first read);
    the old trim found no group owing anything and dropped every entry older than a second, unread
    and unanswered (a flake of test_deadline_counts_from_when_redis_accepted_the_entry, 3 in 10)."""
    s = "graft:test:trim-no-group"
    secs, _ = await redis.time()
    t = (int(secs) - 5) * 1000
    for i in range(200):
        await redis.xadd(s, {keys.FIELD: b"x" * 64}, id=f"{t}-{i}")
    assert await streams.safe_trim(redis, s) == 0
    assert await redis.xlen(s) == 200
    await streams.ensure_group(redis, s, "workers", "0")  # the group that comes later reads them all
    got = await redis.xreadgroup("workers", "c", {s: ">"}, count=500)
    assert len(got[0][1]) == 200
