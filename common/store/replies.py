"""Sending replies exactly once per submission.

Every request the ingress accepts gets exactly one reply. Several parties may try to answer the same
request (a replica and a reaper that reclaimed its entry, an ingress that reclaimed the entry of one
that died after routing it, a worker retrying after a reconnect), so a reply is written by a Lua
script that first records the submission in the client's *reply ledger* and only then XADDs the
reply — atomic on the server, one round trip, safe under retries.

A submission is identified by ``req_id@source``: the ``req_id`` the producer chose and the id Redis
gave its entry in ``graft:ingress`` (``Reply.source``). A producer that retries with the same
``req_id`` (after ``OVERLOADED``, say) makes a new submission and gets its own reply; a duplicate
answer to the *same* submission is swallowed.

The ledger ``keys.reply_ledger(client)`` is one sorted set per client (not one key per request),
sharing the reply stream's hash tag: each member is scored with the Redis time after which nobody
can answer that submission any more — its deadline plus ``DEDUPE_HORIZON_MS`` (the longest a second
answer can come: an entry reclaimed from a dead consumer) — and each write prunes what expired.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from common.contract import keys, wire
from common.store.cluster import queue_script

# KEYS[1] = ledger, KEYS[2] = reply stream
# ARGV = member, forget_at_ms (0: now + horizon), payload, stream maxlen, stream idle ttl s, horizon ms
_SEND = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) >= now then
  return 0
end
local horizon = tonumber(ARGV[6])
local forget = math.max(tonumber(ARGV[2]), now) + horizon
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], forget, ARGV[1])
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(top[2]))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', 'm', ARGV[3])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return 1
"""
DEDUPE_HORIZON_MS = 30_000
REPLY_STREAM_MAXLEN = 10_000
REPLY_STREAM_IDLE_TTL_S = 24 * 3600  # a client gone for a day leaves no stream behind


def submission(reply: wire.Reply) -> str:
    """The ledger member of the submission ``reply`` answers."""
    return f"{reply.req_id}@{reply.source or ''}"


class ReplySender:
    """Queues replies on a pipeline; ``send`` is idempotent per submission."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._script = redis.register_script(_SEND)

    @staticmethod
    def _args(reply: wire.Reply, deadline: float | None) -> list[Any]:
        forget_ms = 0 if deadline is None or not math.isfinite(deadline) else int(deadline * 1000.0)
        return [submission(reply), forget_ms, wire.encode_reply(reply), REPLY_STREAM_MAXLEN,
                REPLY_STREAM_IDLE_TTL_S, DEDUPE_HORIZON_MS]

    async def add(self, pipe: Any, client: str, reply: wire.Reply, deadline: float | None = None) -> None:
        """Queue one reply on ``pipe`` (a redis pipeline, or a cluster one: ``queue_script``) — nothing is
        sent until it executes.

        ``deadline`` (unix seconds): the request's; the ledger remembers the submission until a
        horizon after it (None: a horizon from now)."""
        await queue_script(pipe, self._script, [keys.reply_ledger(client), keys.reply_stream(client)],
                           self._args(reply, deadline))

    async def send(self, client: str, reply: wire.Reply, deadline: float | None = None) -> bool:
        """Send one reply now; False when this submission was already answered."""
        res = await self._script(keys=[keys.reply_ledger(client), keys.reply_stream(client)],
                                 args=self._args(reply, deadline))
        return bool(res)

    async def send_many(self, replies: Iterable[tuple[str, wire.Reply]]) -> int:
        """Send many replies in one pipelined round trip; returns how many were new."""
        items = list(replies)
        if not items:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for client, rep in items:
                await self.add(pipe, client, rep)
            res = await pipe.execute()
        return sum(1 for r in res if r)
