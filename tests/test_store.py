"""One contract suite for the serving path's ``Store``, run against ``MemoryStore`` and ``RedisStore`` (a
real single Redis and a real Redis Cluster): the fake is only worth the unit tests built on it if it
keeps the rules the real one keeps (``common.store.protocol``)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.contract import keys, wire
from common.contract.errors import InternalError, Overloaded, StoreUnavailable
from common.settings import Settings
from common.store.connection import connect
from common.store.memory import MemoryStore
from common.store.protocol import Letter, Store, Write
from common.store.redis_store import RedisStore
from common.store.streams import ensure_group

STREAM, GROUP, CLIENT = "graft:{t1}:in", "g", "phone-1"
OUT = "graft:{t1}:out"


def refusal(req_id: str, source: str) -> wire.Reply:
    rep = wire.Reply.failure(req_id, Overloaded("busy", retry_after_ms=5), epoch=1)
    rep.source = source
    return rep


class Harness:
    """The test's side of one store: produce and deliver entries, and look at what the store did."""

    def __init__(self, store: Store, r: Any = None) -> None:
        self.store, self.r = store, r

    async def produce(self, n: int) -> list[str]:
        if isinstance(self.store, MemoryStore):
            ids = [self.store.add(STREAM, b"x%d" % i) for i in range(n)]
            self.store.deliver(STREAM, GROUP)
            return ids
        await ensure_group(self.r, STREAM, GROUP)
        ids = [(await self.r.xadd(STREAM, {keys.FIELD: b"x%d" % i})).decode() for i in range(n)]
        await self.r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=n)
        return ids

    async def pending(self) -> list[str]:
        if isinstance(self.store, MemoryStore):
            return self.store.pending(STREAM, GROUP)
        rows = await self.r.xpending_range(STREAM, GROUP, min="-", max="+", count=100)
        return [row["message_id"].decode() for row in rows]

    async def payloads(self, stream: str) -> list[bytes]:
        if isinstance(self.store, MemoryStore):
            return self.store.payloads(stream)
        return [f[keys.FIELD] for _, f in await self.r.xrange(stream)]

    async def replies(self, client: str) -> list[wire.Reply]:
        if isinstance(self.store, MemoryStore):
            return self.store.replies.get(client, [])
        return [wire.decode_reply(f[keys.FIELD]) for _, f in await self.r.xrange(keys.reply_stream(client))]

    async def put_blob(self, key: str, data: bytes) -> None:
        if isinstance(self.store, MemoryStore):
            self.store.blob_store[key] = data
        else:
            await self.r.set(key, data)

    async def blob(self, key: str) -> bytes | None:
        if isinstance(self.store, MemoryStore):
            return self.store.blob_store.get(key)
        got: bytes | None = await self.r.get(key)
        return got

    async def refuse_appends(self, stream: str) -> None:
        """Make appends to ``stream`` fail for good (a key of the wrong type, as an OOM Redis would)."""
        if isinstance(self.store, MemoryStore):
            self.store.refuse_appends_to.add(stream)
        else:
            await self.r.set(stream, b"not a stream")

    async def refuse_replies(self, client: str) -> None:
        if isinstance(self.store, MemoryStore):
            self.store.refuse_replies_to.add(client)
        else:
            await self.r.set(keys.reply_stream(client), b"not a stream")

    async def dead_letters(self) -> list[str]:
        if isinstance(self.store, MemoryStore):
            return [d.entry_id for d in self.store.dead_letters]
        return [f[b"id"].decode() for _, f in await self.r.xrange(keys.dead_letters(STREAM))]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with _harness(request, request.param) as h:
        yield h


@contextlib.asynccontextmanager
async def _harness(request: pytest.FixtureRequest, kind: str) -> AsyncIterator[Harness]:
    if kind == "memory":
        yield Harness(MemoryStore())
        return
    if kind == "redis":
        r: Any = Redis.from_url(request.getfixturevalue("redis_url"))
        await r.flushall()
    else:
        url = request.getfixturevalue("redis_cluster_url")
        r = connect(url, settings=Settings(redis_url=url, redis_mode="cluster"))
        await r.flushall(target_nodes="primaries")
    try:
        yield Harness(RedisStore(r), r)
    finally:
        await r.aclose()


async def test_a_batch_is_appended_answered_acked_and_its_blobs_deleted(harness: Harness) -> None:
    ids = await harness.produce(3)
    await harness.put_blob("graft:blob:r1", b"bytes")
    writes = [Write(ack=(STREAM, GROUP, ids[0]), append=(OUT, b"routed")),
              Write(ack=(STREAM, GROUP, ids[1]), reply=(CLIENT, refusal("r1", ids[1]), None), delete="graft:blob:r1")]
    await harness.store.write(writes)
    assert all(w.written for w in writes)
    assert await harness.payloads(OUT) == [b"routed"]
    assert [r.req_id for r in await harness.replies(CLIENT)] == ["r1"]
    assert await harness.pending() == ids[2:]  # the third was in no write: still pending
    assert await harness.blob("graft:blob:r1") is None


async def test_a_submission_is_answered_once_however_often_it_is_written(harness: Harness) -> None:
    ids = await harness.produce(1)
    for _ in range(3):  # a retry after a lost connection, a reclaim by a sibling
        await harness.store.write([Write(ack=(STREAM, GROUP, ids[0]), reply=(CLIENT, refusal("r1", ids[0]), None))])
    assert await harness.store.reply([(CLIENT, refusal("r1", ids[0])), (CLIENT, refusal("r1", "9-9"))]) == 1
    assert [r.source for r in await harness.replies(CLIENT)] == [ids[0], "9-9"]  # a new submission: its own


async def test_an_append_refused_for_good_is_reported_and_its_entry_acked_for_the_caller_to_answer(
        harness: Harness) -> None:
    ids = await harness.produce(2)
    await harness.refuse_appends(OUT)
    writes = [Write(ack=(STREAM, GROUP, ids[0]), append=(OUT, b"a")),
              Write(ack=(STREAM, GROUP, ids[1]), append=("graft:{t1}:fine", b"b"))]
    await harness.store.write(writes)
    assert isinstance(writes[0].append_error, InternalError)
    assert not isinstance(writes[0].append_error, StoreUnavailable)
    assert writes[1].written
    assert await harness.pending() == []


# On a single Redis the batch is one ordered round trip and its acks do not wait for a reply's result
# (the protocol's rule 2); where the store can wait — the fake, a cluster's two round trips — they do.
@pytest.mark.parametrize("kind", ["memory", "cluster"])
async def test_an_entry_whose_reply_was_not_written_stays_pending_with_its_blob(
        request: pytest.FixtureRequest, kind: str) -> None:
    async with _harness(request, kind) as harness:
        ids = await harness.produce(2)
        await harness.put_blob("graft:blob:r0", b"b")
        await harness.refuse_replies("phone-full")
        writes = [Write(ack=(STREAM, GROUP, ids[0]), reply=("phone-full", refusal("r0", ids[0]), None),
                        delete="graft:blob:r0"),
                  Write(ack=(STREAM, GROUP, ids[1]), reply=(CLIENT, refusal("r1", ids[1]), None))]
        await harness.store.write(writes)
        assert isinstance(writes[0].reply_error, InternalError) and writes[1].written
        assert await harness.pending() == ids[:1]
        assert await harness.blob("graft:blob:r0") == b"b"


async def test_blobs_are_measured_given_their_ttl_and_read(harness: Harness) -> None:
    await harness.put_blob("graft:blob:a", b"12345")
    assert await harness.store.blob_lengths([("graft:blob:a", 60_000), ("graft:blob:gone", 60_000)]) == [5, 0]
    if harness.r is not None:
        assert 0 < await harness.r.pttl("graft:blob:a") <= 60_000
    assert await harness.store.blobs(["graft:blob:a", "graft:blob:gone"]) == [b"12345", None]
    await harness.store.delete(["graft:blob:a"])
    assert await harness.blob("graft:blob:a") is None


async def test_dead_letters_are_moved_and_acked(harness: Harness) -> None:
    ids = await harness.produce(2)
    await harness.store.dead_letter([Letter(STREAM, GROUP, ids[0], b"junk", InternalError("unreadable"), consumer="c")])
    assert await harness.dead_letters() == [ids[0]]
    assert await harness.pending() == ids[1:]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_an_unreachable_store_raises_our_error_and_nothing_else(kind: str) -> None:
    if kind == "memory":
        store: Store = MemoryStore(down=True)
        r = None
    else:
        url = f"redis://127.0.0.1:{closed_port()}/0"
        r = connect(url, settings=Settings(redis_url=url))
        store = RedisStore(r)
    try:
        calls = [store.write([Write(append=(OUT, b"a"))]), store.reply([(CLIENT, refusal("r", "1-1"))]),
                 store.blob_lengths([("graft:blob:a", 1)]), store.blobs(["graft:blob:a"]), store.delete(["k"]),
                 store.dead_letter([Letter(STREAM, GROUP, "1-1", b"", InternalError("x"))])]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                await call
    finally:
        if r is not None:
            await r.aclose()


async def test_a_producer_connection_never_resends_a_timed_out_xadd() -> None:
    """redis-py re-sends a command after a timeout when the client has a retry policy: an XADD that
    timed out may have landed, so a producer's re-send is a second submission with its own answer (at
    5x overload the fault suite's generator got 11,794 requests answered twice that way). Services keep
    their retries (their writes repeat safely); producers (the SDK, the fault suite's loads) get none."""
    received: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers the connection's handshake (HELLO, PING, CLIENT ...), never an XADD."""
        while data := await reader.read(65536):
            received.append(data)
            for name in re.findall(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n", data):
                if name.upper() == b"HELLO":
                    writer.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                elif name.upper() == b"PING":
                    writer.write(b"+PONG\r\n")
                elif name.upper() != b"XADD":
                    writer.write(b"+OK\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}", socket_timeout_s=0.2, block_ms=50)
    try:
        for retries, sends in ((3, 4), (0, 1)):
            received.clear()
            r = connect(settings.redis_url, settings=settings, retries=retries)
            with pytest.raises(RedisTimeoutError):
                await r.xadd("graft:ingress", {"m": b"request"})
            await r.aclose()
            await asyncio.sleep(0.05)
            assert b"".join(received).count(b"XADD") == sends
    finally:
        server.close()
        await server.wait_closed()
