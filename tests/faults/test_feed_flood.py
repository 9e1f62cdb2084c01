"""A flood of malformed entries in a group stream costs a replica a few round trips per read, not one per
entry (found by the fault suite: 5,375 malformed messages written straight to a group stream, each
unreadable one dead-lettered in its own MULTI with two log lines, kept a replica busy long enough that
2,142 readable messages were answered more than budget + 1 s after they were sent)."""

from __future__ import annotations

from typing import Any

import numpy as np

from common.contract import keys, wire
from common.model.zoo import describe
from common.store.redis_store import RedisStore
from common.store.streams import Entry, ensure_group
from services.worker.feed import Feed
from services.worker.intake import Intake
from services.worker.latency import LatencyModel
from services.worker.loop import BatchLoop
from services.worker.replying import Replier

STREAM = keys.group_stream(1, "g")


class NoRunner:
    def run_numpy(self, items: Any) -> list[np.ndarray]:
        raise AssertionError("no malformed entry may reach the model")


async def test_unreadable_entries_of_one_read_are_dead_lettered_together_and_readable_ones_answered(
        redis: Any) -> None:
    info = describe("resnet18", 32)
    replier = Replier(RedisStore(redis))
    loop = BatchLoop(NoRunner(), LatencyModel(info.n_blocks, prior_ms=5.0), replier, max_batch=4)
    feed = Feed(redis, loop, Intake(info), replier, block_ms=50, max_deliveries=3,
                stream_maxlen=10_000, min_idle_ms=lambda: 500)
    feed.consumer = "c"
    await ensure_group(redis, STREAM, keys.WORKER_GROUP, "0")
    bad_cut = [wire.encode_request(wire.Request(f"r{i}", "phone", "resnet18", 99, np.zeros(3, np.float32),
                                                budget_ms=500.0)) for i in range(100)]
    garbage = [b"\xc1junk-%d" % i for i in range(100)]
    async with redis.pipeline(transaction=False) as pipe:
        for p in [x for pair in zip(garbage, bad_cut, strict=True) for x in pair]:
            pipe.xadd(STREAM, {keys.FIELD: p})
        await pipe.execute()
    rows = (await redis.xreadgroup(keys.WORKER_GROUP, "c", {STREAM: ">"}, count=1000))[0][1]
    entries = [Entry(i.decode(), f.get(keys.FIELD)) for i, f in rows]
    await redis.config_resetstat()
    await feed.admit(entries, STREAM)
    stats = await redis.info("commandstats")
    multi = stats.get("cmdstat_multi", {}).get("calls", 0)
    assert multi <= 1, f"{multi} MULTIs for 100 dead letters: one round trip each"
    assert await redis.xlen(keys.dead_letters(STREAM)) == 100 and feed.dead_lettered == 100
    assert (await redis.xpending(STREAM, keys.WORKER_GROUP))["pending"] == 0  # every entry acked
    got = await redis.xrange(keys.reply_stream("phone"))
    codes = [wire.decode_reply(f[keys.FIELD]).error for _, f in got]
    assert len(codes) == 100 and all(c is not None and c.code == "BAD_CUT" for c in codes)
    dead = await redis.xrange(keys.dead_letters(STREAM), count=1)
    assert dead[0][1][b"code"] == b"INVALID_REQUEST" and dead[0][1][keys.FIELD].startswith(b"\xc1junk")
