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
from common.store.connection import Client

# KEYS[1] = ledger, KEYS[2] = reply stream
# ARGV = horizon ms, stream maxlen, stream idle ttl s, then per reply: member, forget_at_ms (0: now), payload
# One call answers any number of submissions of one client: the ledger is pruned and its expiry set once,
# not once per reply (what a refusal costs decides how much overload an ingress can turn away).
_SEND = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local sent = 0
for i = 4, #ARGV, 3 do
  local seen = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not (seen and tonumber(seen) >= now) then
    redis.call('ZADD', KEYS[1], math.max(tonumber(ARGV[i + 1]), now) + horizon, ARGV[i])
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'm', ARGV[i + 2])
    sent = sent + 1
  end
end
if sent > 0 then
  local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], tonumber(top[2]))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
return sent
"""
DEDUPE_HORIZON_MS = 30_000
REPLY_STREAM_MAXLEN = 10_000
REPLY_STREAM_IDLE_TTL_S = 24 * 3600  # a client gone for a day leaves no stream behind


def submission(reply: wire.Reply) -> str:
    """The ledger member of the submission ``reply`` answers."""
    return f"{reply.req_id}@{reply.source or ''}"


class ReplySender:
    """Queues replies on a pipeline; ``send`` is idempotent per submission."""

    def __init__(self, redis: Client) -> None:
        self._redis = redis
        self._script = redis.register_script(_SEND)

    @staticmethod
    def _args(items: Iterable[tuple[wire.Reply, float | None]]) -> list[Any]:
        args: list[Any] = [DEDUPE_HORIZON_MS, REPLY_STREAM_MAXLEN, REPLY_STREAM_IDLE_TTL_S]
        for reply, deadline in items:
            forget_ms = 0 if deadline is None or not math.isfinite(deadline) else int(deadline * 1000.0)
            args += [submission(reply), forget_ms, wire.encode_reply(reply)]
        return args

    async def add(self, pipe: Any, client: str, reply: wire.Reply, deadline: float | None = None) -> None:
        """Queue one reply on ``pipe`` (a redis pipeline, or a cluster one: ``queue_script``) — nothing is
        sent until it executes.

        ``deadline`` (unix seconds): the request's; the ledger remembers the submission until a
        horizon after it (None: a horizon from now)."""
        await self.add_many(pipe, client, [(reply, deadline)])

    async def add_many(self, pipe: Any, client: str, items: Iterable[tuple[wire.Reply, float | None]]) -> None:
        """Queue the replies of one client as one command on ``pipe`` (in order; each submission still
        answered at most once). Its result is how many were new."""
        await queue_script(pipe, self._script, [keys.reply_ledger(client), keys.reply_stream(client)],
                           self._args(items))

    async def send(self, client: str, reply: wire.Reply, deadline: float | None = None) -> bool:
        """Send one reply now; False when this submission was already answered."""
        res = await self._script(keys=[keys.reply_ledger(client), keys.reply_stream(client)],
                                 args=self._args([(reply, deadline)]))
        return bool(res)

    async def send_many(self, replies: Iterable[tuple[str, wire.Reply]]) -> int:
        """Send many replies in one pipelined round trip, one command per client; returns how many were new."""
        by_client = group_by_client((client, rep, None) for client, rep in replies)
        if not by_client:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for client, items in by_client.items():
                await self.add_many(pipe, client, items)
            res = await pipe.execute()
        return sum(int(r) for r in res if isinstance(r, int))


def group_by_client(replies: Iterable[tuple[str, wire.Reply, float | None]]
                    ) -> dict[str, list[tuple[wire.Reply, float | None]]]:
    """Replies by client, each client's in their order."""
    out: dict[str, list[tuple[wire.Reply, float | None]]] = {}
    for client, reply, deadline in replies:
        out.setdefault(client, []).append((reply, deadline))
    return out
