"""A replica's intake, batch loop and replies on the in-memory store, no Redis: what each entry becomes,
that a blob goes only after its reply and ack, and that replies survive a store outage. The Redis
client the feed is given refuses every use: admission and answering talk to the ``Store`` only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from common.contract import keys, wire
from common.model.zoo import describe
from common.store.memory import MemoryStore
from services.worker.feed import Feed
from services.worker.intake import Intake
from services.worker.latency import LatencyModel
from services.worker.loop import BatchLoop
from services.worker.replying import Replier
from tests.helpers import NoRedis, until

pytestmark = pytest.mark.timeout(30)

INFO = describe("resnet18", 32)
STREAM = keys.group_stream(3, "g0")
CLIENT = "phone-w"


class Zeros:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        self.batches.append(len(items))
        return [np.zeros((10,), np.float32) for _ in items]


def payload(req_id: str, cut: int = 0, **kw: Any) -> bytes:
    now = time.time()
    fields: dict[str, Any] = {"tensor": np.zeros(INFO.cut_shape(cut), np.float32) if 0 <= cut < INFO.n_blocks
                              else np.zeros((3,), np.float32),
                              "budget_ms": 5_000.0, "received": now, "deadline": now + 5.0, "source": f"{req_id}-src"}
    fields.update(kw)
    return wire.encode_request(wire.Request(req_id, CLIENT, "resnet18", cut, **fields))


async def serve(store: MemoryStore, *payloads: bytes, max_batch: int = 4) -> tuple[list[str], Zeros]:
    runner = Zeros()
    replier = Replier(store)
    loop = BatchLoop(runner, LatencyModel(INFO.n_blocks, prior_ms=5.0), replier, max_batch=max_batch)
    feed = Feed(NoRedis(), loop, Intake(INFO), replier, block_ms=50, max_deliveries=3,
                stream_maxlen=10_000, min_idle_ms=lambda: 500)
    ids = [store.add(STREAM, p) for p in payloads]
    stop = asyncio.Event()
    run = asyncio.create_task(loop.run(stop))
    await feed.admit(store.deliver(STREAM, keys.WORKER_GROUP), STREAM)
    await until(lambda: loop.idle, 5, "every job answered")
    stop.set()
    loop.wake()
    await asyncio.wait_for(run, 5)
    return ids, runner


def answers(store: MemoryStore) -> dict[str, wire.Reply]:
    return {r.req_id: r for r in store.replies.get(CLIENT, [])}


async def test_entries_are_run_answered_and_acked_and_bad_ones_answered_or_dead_lettered() -> None:
    store = MemoryStore()
    ids, runner = await serve(store, payload("a"), payload("b", 2), payload("cut", 99), b"\x00junk")
    got = answers(store)
    assert got["a"].ok and got["b"].ok and got["a"].batch == 2 and runner.batches == [2]
    assert got["cut"].error is not None and str(got["cut"].error.code) == "BAD_CUT"
    assert [d.entry_id for d in store.dead_letters] == [ids[3]]
    assert store.pending(STREAM, keys.WORKER_GROUP) == []
    assert sorted(r.source or "" for r in store.replies[CLIENT]) == ["a-src", "b-src", "cut-src"]  # once each


async def test_a_blob_request_is_fetched_run_and_its_blob_deleted_after_the_reply() -> None:
    store = MemoryStore()
    tensor = np.ones(INFO.cut_shape(0), np.float32)
    store.blob_store[keys.blob("big")] = tensor.tobytes()
    meta = wire.TensorMeta("float32", tuple(INFO.cut_shape(0)))
    await serve(store, payload("big", tensor=None, blob=keys.blob("big"), blob_meta=meta),
                payload("lost", tensor=None, blob=keys.blob("lost"), blob_meta=meta))
    got = answers(store)
    assert got["big"].ok
    assert got["lost"].error is not None  # its blob is gone: answered, never run
    assert keys.blob("big") in store.deleted and keys.blob("big") not in store.blob_store
    assert store.pending(STREAM, keys.WORKER_GROUP) == []


async def test_replies_wait_out_a_store_outage_and_are_written_once() -> None:
    store = MemoryStore()
    runner = Zeros()
    replier = Replier(store)
    loop = BatchLoop(runner, LatencyModel(INFO.n_blocks, prior_ms=5.0), replier, max_batch=4)
    feed = Feed(NoRedis(), loop, Intake(INFO), replier, block_ms=50, max_deliveries=3,
                stream_maxlen=10_000, min_idle_ms=lambda: 500)
    store.add(STREAM, payload("a"))
    await feed.admit(store.deliver(STREAM, keys.WORKER_GROUP), STREAM)
    store.down = True
    stop = asyncio.Event()
    run = asyncio.create_task(loop.run(stop))
    await until(lambda: runner.batches, 5, "the batch ran")
    # The reply write is failing and being retried: two failed attempts, then the store comes back
    # while retries are left (a fixed 0.2 s outage could outlast all five: their jittered backoff can
    # sum to less than that, and then the batch waits for a reaper this test does not run).
    await until(lambda: store.calls >= 2, 5, "two failed reply writes")
    assert not store.replies
    store.down = False
    await until(lambda: bool(store.replies), 5, "the reply written once the store is back")
    stop.set()
    loop.wake()
    await asyncio.wait_for(run, 5)
    assert [r.req_id for r in store.replies[CLIENT]] == ["a"] and replier.sent == 1
    assert store.pending(STREAM, keys.WORKER_GROUP) == []
