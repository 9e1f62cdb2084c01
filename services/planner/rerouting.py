"""The sweeper's writes: re-routes, replies, acks and blob deletions of one page of a swept stream.

**Single Redis**: one pipelined round trip, in order. A re-route is one Lua script — still pending
here? XADD to the target, then XACK — so two sweepers at once cannot route an entry twice, and a failed
XADD leaves it pending. Replies go through ``ReplySender`` (exactly once per submission); the XACK of
the answered entries and the deletion of their blobs follow them in the same pipeline.

**Redis Cluster**: the swept stream and its target are two group streams, on two slots (often two
masters), and no script may touch both. So a re-route to *another* stream is an XADD to the target
and, in a second round trip once the XADD succeeded, the XACK in the swept stream: a sweeper that dies
between the two leaves the entry pending, another (or its own next pass) re-routes it once more — a
request may then run twice, and its client still gets one reply (the per-client reply ledger answers
each submission once). A put-back to the *same* stream (a current stream waiting for its replicas)
keeps the script: both keys are on one slot. Replies are written in the first round trip and their
entries acked (and blobs deleted) in the second, only where the reply was written — a cluster
pipeline runs each node's commands independently, so an XACK sent beside a reply that failed on
another node would lose the request.
"""

from __future__ import annotations

from common.contract import keys, wire
from common.store.cluster import is_cluster, queue_script
from common.store.connection import Client
from common.store.replies import ReplySender

# KEYS[1] = swept stream, KEYS[2] = target stream; ARGV = group, entry id, payload, maxlen, field.
# Re-route an entry only while it is still pending in the swept stream's group, XADD before XACK:
# a second sweeper finds it acked and does nothing, and an XADD that fails leaves it pending.
_REROUTE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', ARGV[5], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

Reroute = tuple[str, str, bytes]            # entry id, target stream, payload
Answer = tuple[str, str, wire.Reply, str]   # entry id, client, reply, outcome


class Rerouter:
    def __init__(self, r: Client, sender: ReplySender, *, maxlen: int) -> None:
        self.r, self.sender, self.maxlen = r, sender, maxlen
        self.script = r.register_script(_REROUTE)
        self.cluster = is_cluster(r)

    async def write(self, stream: str, reroutes: list[Reroute], replies: list[Answer], blobs: list[str],
                    now: float) -> list[bool]:
        """Write one page's decisions; returns, per re-route, whether this call moved the entry."""
        if self.cluster:
            return await self._write_cluster(stream, reroutes, replies, blobs, now)
        async with self.r.pipeline(transaction=False) as pipe:
            for entry_id, target, payload in reroutes:
                await queue_script(pipe, self.script, [stream, target],
                                   [keys.WORKER_GROUP, entry_id, payload, self.maxlen, keys.FIELD])
            for _, client, answer, _ in replies:
                await self.sender.add(pipe, client, answer, now)
            if replies:
                pipe.xack(stream, keys.WORKER_GROUP, *[entry_id for entry_id, *_ in replies])
            if blobs:
                pipe.delete(*blobs)
            results = await pipe.execute()
        return [int(res) == 1 for res in results[:len(reroutes)]]

    async def _write_cluster(self, stream: str, reroutes: list[Reroute], replies: list[Answer], blobs: list[str],
                             now: float) -> list[bool]:
        async with self.r.pipeline(transaction=False) as pipe:
            for entry_id, target, payload in reroutes:
                if target == stream:
                    await queue_script(pipe, self.script, [stream, target],
                                       [keys.WORKER_GROUP, entry_id, payload, self.maxlen, keys.FIELD])
                else:
                    pipe.xadd(target, {keys.FIELD: payload}, maxlen=self.maxlen, approximate=True)
            for _, client, answer, _ in replies:
                await self.sender.add(pipe, client, answer, now)
            results = await pipe.execute(raise_on_error=False)
        moved = [not isinstance(res, Exception) and (target != stream or int(res) == 1)
                 for (_, target, _), res in zip(reroutes, results, strict=False)]
        written = [not isinstance(res, Exception) for res in results[len(reroutes):]]
        done = [entry_id for (entry_id, target, _), ok in zip(reroutes, moved, strict=True) if ok and target != stream]
        done += [entry_id for (entry_id, *_), ok in zip(replies, written, strict=True) if ok]
        if done or (blobs and all(written)):
            async with self.r.pipeline(transaction=False) as pipe:
                if done:
                    pipe.xack(stream, keys.WORKER_GROUP, *done)
                if blobs and all(written):
                    pipe.delete(*blobs)  # the cluster pipeline splits it per slot
                await pipe.execute()
        failed = next((res for res in results if isinstance(res, Exception)), None)
        if failed is not None:
            raise failed  # what was not written stays pending under this sweeper: the next pass retries it
        return moved
