"""The reply ledger against a real Redis: exactly one reply per submission, many replies of a client in
one command (what a batch of refusals costs the ingress), the ledger pruned and expiring."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from common.contract import keys, wire
from common.contract.errors import Overloaded
from common.store.replies import DEDUPE_HORIZON_MS, ReplySender


def refusal(req_id: str, source: str) -> wire.Reply:
    rep = wire.Reply.failure(req_id, Overloaded("busy", retry_after_ms=5), epoch=1)
    rep.source = source
    return rep


async def replies_of(r: Redis, client: str) -> list[wire.Reply]:
    rows = await r.xrange(keys.reply_stream(client))
    return [wire.decode_reply(fields[keys.FIELD]) for _, fields in rows]


async def test_one_command_answers_many_submissions_of_a_client_in_order_and_each_once(redis: Redis) -> None:
    sender = ReplySender(redis)
    client = "phone-many"
    now = time.time()
    items = [(refusal(f"r{i}", f"1-{i}"), now + 1.0) for i in range(50)]
    items.append((refusal("r3", "1-3"), now + 1.0))  # the same submission twice in one call: answered once
    async with redis.pipeline(transaction=False) as pipe:
        await sender.add_many(pipe, client, items)
        assert len(pipe) == 1  # one command for the client's 51 replies, not 51
        [sent] = await pipe.execute()
    assert sent == 50
    got = await replies_of(redis, client)
    assert [rep.req_id for rep in got] == [f"r{i}" for i in range(50)]
    # A second answer to any of them (a reclaimed entry answered again) is swallowed; a retry with the
    # same req_id is a new submission (another entry id) and gets its own reply.
    assert await sender.send_many([(client, refusal("r7", "1-7")), (client, refusal("r7", "2-0"))]) == 1
    assert [rep.source for rep in await replies_of(redis, client)][-1] == "2-0"
    assert not await sender.send(client, refusal("r0", "1-0"))


async def test_the_ledger_forgets_past_its_horizon_and_expires_with_its_last_member(redis: Redis) -> None:
    sender = ReplySender(redis)
    client = "phone-ledger"
    # A member whose horizon has passed (scored in the past) is pruned by the client's next write.
    await redis.zadd(keys.reply_ledger(client), {"old@1-0": int((time.time() - 1.0) * 1000)})
    assert await sender.send(client, refusal("new", "1-1"), deadline=time.time() + 1.0)
    members = await redis.zrange(keys.reply_ledger(client), 0, -1)
    assert members == [b"new@1-1"]
    ttl_ms = await redis.pttl(keys.reply_ledger(client))
    assert 0 < ttl_ms <= DEDUPE_HORIZON_MS + 1_500
    assert await redis.ttl(keys.reply_stream(client)) > 0


async def test_replies_queued_on_a_pipeline_cost_that_pipeline_alone(redis: Redis) -> None:
    """No ``SCRIPT EXISTS`` round trip before the pipeline (redis-py sends one for every pipeline that
    holds a registered script), and an emptied script cache (a restarted Redis) changes nothing."""
    sender = ReplySender(redis)
    await redis.script_flush()
    await redis.config_resetstat()
    assert await sender.send_many([("phone-a", refusal("a1", "1-1")), ("phone-b", refusal("b1", "1-2")),
                                   ("phone-a", refusal("a2", "1-3"))]) == 3
    stats = await redis.info("commandstats")
    assert not [k for k in stats if k.startswith("cmdstat_script")], stats
    assert stats["cmdstat_eval"]["calls"] == 2  # one command per client
    assert [rep.req_id for rep in await replies_of(redis, "phone-a")] == ["a1", "a2"]
