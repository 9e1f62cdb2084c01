"""A replica's way in (``feed.py``) on a real stream, with a fake runner: how far it reads ahead, what it
does with entries it reclaims, and that it reads exactly the streams it is assigned."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest

from common.contract import keys, wire
from common.contract.errors import ErrorCode
from common.model.zoo import ModelInfo, describe
from common.store.backlog import read_backlog
from common.store.redis_store import RedisStore
from common.store.streams import ensure_group
from services.worker.feed import Feed
from services.worker.intake import Intake
from services.worker.latency import LatencyModel
from services.worker.loop import BatchLoop
from services.worker.replying import Replier
from tests.helpers import until
from tests.worker_helpers import CLIENT, put, raw_replies, replies

pytestmark = pytest.mark.timeout(30)

MODEL, RES = "resnet18", 32
S1, S2 = keys.group_stream(1, "g0"), keys.group_stream(2, "g1")


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return describe(MODEL, RES)


class Gate:
    """A runner that waits for ``open`` before each batch, and answers zeros of the output shape."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.batches: list[int] = []

    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        self.open.wait(10)
        self.batches.append(len(items))
        return [np.zeros((10,), np.float32) for _ in items]


def entry(info: ModelInfo, req_id: str, cut: int = 0, *, budget_ms: float = 10_000.0, age_s: float = 0.0) -> bytes:
    received = time.time() - age_s
    return wire.encode_request(wire.Request(req_id, CLIENT, MODEL, cut, np.zeros(info.cut_shape(cut), np.float32),
                                            budget_ms=budget_ms, received=received,
                                            deadline=received + budget_ms / 1000.0, source=f"{req_id}-src"))


@contextlib.asynccontextmanager
async def feed_of(r: Any, info: ModelInfo, runner: Any, *, max_batch: int) -> AsyncIterator[tuple[Feed, BatchLoop]]:
    replier = Replier(RedisStore(r))
    loop = BatchLoop(runner, LatencyModel(info.n_blocks, prior_ms=5.0), replier, max_batch=max_batch)
    feed = Feed(r, loop, Intake(info), replier, block_ms=50, max_deliveries=3,
                stream_maxlen=10_000, min_idle_ms=lambda: 500)
    stop = asyncio.Event()
    run = asyncio.create_task(loop.run(stop))
    try:
        yield feed, loop
    finally:
        await feed.close()
        stop.set()
        loop.wake()
        await asyncio.wait_for(run, 10)


async def test_reads_one_batch_and_nothing_while_it_runs(redis: Any, info: ModelInfo) -> None:
    gate = Gate()
    async with feed_of(redis, info, gate, max_batch=2) as (feed, loop):
        feed.assign("cpu0-resnet18-0", [S1])
        await until(lambda: feed.streams == [S1], 1, "a reader")
        await asyncio.sleep(0.1)  # its consumer group exists and it is blocked in a read
        await put(redis, S1, [entry(info, f"r{i}") for i in range(10)])
        await until(lambda: loop.size == 2 and loop.in_flight, 5, "a batch of two running")
        await asyncio.sleep(0.3)
        backlog = await read_backlog(redis, S1)
        # what it cannot start now stays in the stream, for whichever replica of the group is free first
        assert backlog is not None and (backlog.undelivered, backlog.pending) == (8, 2) and loop.size == 2
        gate.open.set()
        got = await replies(redis, 10)
        assert all(rep.ok for rep in got.values()) and max(gate.batches) == 2


async def test_reclaimed_entries_past_their_deadline_are_answered_unrun(redis: Any, info: ModelInfo) -> None:
    gate = Gate()
    gate.open.set()
    await ensure_group(redis, S1, keys.WORKER_GROUP)
    await put(redis, S1, [entry(info, "late", budget_ms=300.0, age_s=1.0), entry(info, "fine")])
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-9", {S1: ">"})  # a consumer that died holding them
    async with feed_of(redis, info, gate, max_batch=4) as (feed, _loop):
        feed.assign("cpu0-resnet18-0", [S1])
        feed.reap_interval_s = 0.05
        await asyncio.sleep(0.6)  # idle for the reaper's 0.5 s
        await feed.reap_once()
        got = await replies(redis, 2)
        assert feed.reclaimed == 2
    assert got["late"].error is not None and got["late"].error.code == ErrorCode.DEADLINE_EXCEEDED
    assert got["fine"].ok and gate.batches == [1]  # only the live one ran
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0


async def test_reads_exactly_the_assigned_streams(redis: Any, info: ModelInfo) -> None:
    gate = Gate()
    gate.open.set()
    async with feed_of(redis, info, gate, max_batch=4) as (feed, _loop):
        feed.assign("cpu0-resnet18-0", [S2, S1])
        await until(lambda: sorted(feed.streams) == sorted([S1, S2]), 1, "two readers")
        await asyncio.sleep(0.1)
        await put(redis, S1, [entry(info, "a")])
        await put(redis, S2, [entry(info, "b")])
        await replies(redis, 2)
        feed.assign("cpu0-resnet18-0", [S2])
        await asyncio.sleep(0.2)  # the dropped reader's last BLOCK (50 ms) is over
        await put(redis, S1, [entry(info, "c")])
        await put(redis, S2, [entry(info, "d")])
        await replies(redis, 3)
        await asyncio.sleep(0.2)
        assert sorted(r.req_id for r in await raw_replies(redis)) == ["a", "b", "d"]
        backlog = await read_backlog(redis, S1)
        assert backlog is not None and backlog.undelivered == 1
        feed.assign(None, [])  # standby: reads nothing, owns nothing
        assert feed.streams == [] and feed.consumer is None


async def test_equal_entry_ids_on_two_streams_are_two_jobs(redis: Any, info: ModelInfo) -> None:
    """Entry ids are unique per stream only: a replica draining a retired stream beside its own sees equal
    ids on both whenever the two were fed in the same millisecond (a fresh-clone CI run lost one so, the
    second taken for a re-read of the first while the first waited for its batch)."""
    gate = Gate()  # closed: the first entry is still held when the second is read
    async with feed_of(redis, info, gate, max_batch=1) as (feed, loop):
        loop.read_ahead = True  # read while a batch runs, as a group's sole replica does
        for stream in (S1, S2):
            await ensure_group(redis, stream, keys.WORKER_GROUP)
        await redis.xadd(S1, {keys.FIELD: entry(info, "a")}, id="5-0")
        await redis.xadd(S2, {keys.FIELD: entry(info, "b")}, id="5-0")
        feed.assign("cpu0-resnet18-0", [S1, S2])
        await until(lambda: loop.size == 2, 5, "both entries held")
        gate.open.set()
        got = await replies(redis, 2)
    assert got["a"].ok and got["b"].ok
    for stream in (S1, S2):
        assert (await redis.xpending(stream, keys.WORKER_GROUP))["pending"] == 0
