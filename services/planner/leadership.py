"""One planner leads: a lease in Redis, renewed while it plans, taken over by a standby when it lapses.

Any number of planners may run (two or more for high availability). The one holding the lease —
``keys.PLANNER_LEASE`` set to its instance name with a TTL of ``ttl_s`` — reads traffic statistics and
admin commands and publishes plans; the others wait, trying to take the lease every ``retry_s``. The
leader renews every ``ttl_s / 3``; a leader that cannot renew (Redis unreachable, its process paused)
stops planning before the TTL could have let another take over, and a dead leader's lease lapses by
itself, so a standby leads within ``ttl_s + retry_s``.

Publishing is fenced: ``publish_plan`` checks, in the same transaction, that the lease still names the
publisher (``fence``), so a leader that lost the lease without knowing it cannot publish; and a plan's
epoch must exceed the current one, so there are never two plans for one epoch. The lease shares the
plan's hash tag (``{plan}``), so both are on one slot of a Redis Cluster.
"""

from __future__ import annotations

from common.contract import keys
from common.store.connection import Client

TTL_S = 3.0
RETRY_S = 0.5

# KEYS[1] lease; ARGV[1] name, ARGV[2] ttl ms. Take a free lease or renew our own.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""

# KEYS[1] lease; ARGV[1] name
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, r: Client, name: str, *, ttl_s: float = TTL_S, retry_s: float = RETRY_S) -> None:
        self.r, self.name = r, name
        self.ttl_s, self.retry_s = ttl_s, retry_s
        self._hold = r.register_script(_HOLD)
        self._release = r.register_script(_RELEASE)
        self.held = False

    @property
    def renew_s(self) -> float:
        return self.ttl_s / 3.0

    async def hold(self) -> bool:
        """Take the lease if it is free, renew it if it is ours; True while we lead."""
        self.held = bool(await self._hold(keys=[keys.PLANNER_LEASE], args=[self.name, int(self.ttl_s * 1000)]))
        return self.held

    async def release(self) -> None:
        await self._release(keys=[keys.PLANNER_LEASE], args=[self.name])
        self.held = False

    async def holder(self) -> str | None:
        raw = await self.r.get(keys.PLANNER_LEASE)
        return None if raw is None else (raw.decode() if isinstance(raw, bytes) else str(raw))
