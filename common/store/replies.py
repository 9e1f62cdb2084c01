"""Sending replies exactly once per ``req_id``.

Every accepted request gets exactly one reply. Several parties may try to answer the same request (a
replica and a reaper that reclaimed its entry, a worker retrying after a reconnect), so a reply is
written by a Lua script that sets ``graft:replied:{req_id}`` with NX and only then XADDs the reply:
atomic on the server, one round trip, safe under retries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from common.contract import keys, wire

# KEYS[1] = replied marker, KEYS[2] = reply stream; ARGV = ttl_s, payload, maxlen
_SEND = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'm', ARGV[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
  return 1
end
return 0
"""

REPLIED_TTL_S = 3600
REPLY_STREAM_MAXLEN = 10_000
REPLY_STREAM_IDLE_TTL_S = 24 * 3600  # a client gone for a day leaves no stream behind


class ReplySender:
    """Queues replies on a pipeline; ``send`` is idempotent by ``req_id``."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._script = redis.register_script(_SEND)

    async def add(self, pipe: Any, client: str, reply: wire.Reply) -> None:
        """Queue one reply on ``pipe`` (a redis pipeline) — nothing is sent until it executes."""
        await self._script(
            keys=[keys.replied(reply.req_id), keys.reply_stream(client)],
            args=[REPLIED_TTL_S, wire.encode_reply(reply), REPLY_STREAM_MAXLEN, REPLY_STREAM_IDLE_TTL_S],
            client=pipe,
        )

    async def send(self, client: str, reply: wire.Reply) -> bool:
        """Send one reply now; False when this ``req_id`` was already answered."""
        res = await self._script(
            keys=[keys.replied(reply.req_id), keys.reply_stream(client)],
            args=[REPLIED_TTL_S, wire.encode_reply(reply), REPLY_STREAM_MAXLEN, REPLY_STREAM_IDLE_TTL_S],
        )
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
