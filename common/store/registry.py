"""Who is alive: a registry of processes with heartbeats, read without scanning the keyspace.

Each kind of process (``keys.KINDS``: ingress, planner, worker agent, replica, gateway) has one hash
``keys.registry(kind)`` — a field per instance holding its msgpack status — and one sorted set
``keys.registry_seen(kind)`` scoring each instance by its last heartbeat in milliseconds of the
*Redis server's* clock (one clock for every host). Both keys share a hash tag, so one script touches
them together, also on Redis Cluster.

* ``beat(name, status)``: store the status and stamp the instance seen now (one round trip);
* ``live()``: the statuses of the instances seen within ``ttl_s`` (one round trip: the script reads
  the clock, the index range and the statuses), each with ``seen_ms_ago``;
* ``leave(name)``: a clean exit removes the instance at once;
* stale entries (seen longer ago than ``forget_s``) are removed by whoever reads them.

A reader asks one key per kind, however many keys the keyspace holds: no ``SCAN`` on a hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.contract import keys, wire
from common.contract.errors import InvalidRequest
from common.store.connection import Client

# KEYS[1] hash, KEYS[2] seen index; ARGV[1] name, ARGV[2] status
_BEAT = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
"""

# KEYS[1] hash, KEYS[2] seen index; ARGV[1] ttl_ms, ARGV[2] forget_ms
_LIVE = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
if #stale > 0 then
  for i = 1, #stale, 500 do
    local chunk = {unpack(stale, i, math.min(i + 499, #stale))}
    redis.call('HDEL', KEYS[1], unpack(chunk))
    redis.call('ZREM', KEYS[2], unpack(chunk))
  end
end
local seen = redis.call('ZRANGEBYSCORE', KEYS[2], now - tonumber(ARGV[1]), '+inf', 'WITHSCORES')
local out = {now}
for i = 1, #seen, 2 do
  local status = redis.call('HGET', KEYS[1], seen[i])
  if status then
    out[#out + 1] = seen[i]
    out[#out + 1] = seen[i + 1]
    out[#out + 1] = status
  end
end
return out
"""

# Instances not seen for this long are removed from the registry by the next reader.
FORGET_S = 60.0


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Registry:
    """The live instances of one kind. ``ttl_s``: an instance is alive when seen within it."""

    def __init__(self, r: Client, kind: str, ttl_s: float, *, forget_s: float = FORGET_S) -> None:
        if kind not in keys.KINDS:
            raise ValueError(f"unknown registry kind {kind!r}; one of {keys.KINDS}")
        self._r = r
        self.kind = kind
        self.ttl_s = ttl_s
        self.forget_s = max(forget_s, ttl_s)
        self._keys = [keys.registry(kind), keys.registry_seen(kind)]
        self._beat = r.register_script(_BEAT)
        self._live = r.register_script(_LIVE)

    async def beat(self, name: str, status: Mapping[str, Any]) -> int:
        """Publish ``status`` for instance ``name``; returns the Redis time (ms) it was stamped with."""
        body = wire.encode_message("status", {**status, "name": name})
        return int(await self._beat(keys=self._keys, args=[name, body]))

    async def leave(self, name: str) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(self._keys[0], name)
            pipe.zrem(self._keys[1], name)
            await pipe.execute()

    async def live(self) -> dict[str, dict[str, Any]]:
        """``{name: status}`` of the instances seen within ``ttl_s`` (statuses gain ``seen_ms_ago``)."""
        raw = await self._live(keys=self._keys, args=[int(self.ttl_s * 1000), int(self.forget_s * 1000)])
        now = int(raw[0])
        out: dict[str, dict[str, Any]] = {}
        for i in range(1, len(raw) - 2, 3):
            try:
                status = wire.decode_message(raw[i + 2], "status")
            except InvalidRequest:
                continue  # not written by beat(): says nothing about liveness
            status["seen_ms_ago"] = now - int(float(raw[i + 1]))
            out[_text(raw[i])] = status
        return out

    async def alive(self, name: str) -> bool:
        return name in await self.live()
