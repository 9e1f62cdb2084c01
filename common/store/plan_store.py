"""Where plans live in Redis, and how services follow them.

``graft:{plan}`` holds the current plan (a msgpack plan envelope); ``graft:{plan}:history`` is a stream with every
plan ever published (history for ``graft plan diff``). Publishing is one MULTI/EXEC transaction
guarded by the epoch, so epochs only grow even with two planners. Services poll the small
``graft:{plan}`` key (a GET every ``interval``) rather than subscribing: a poll cannot miss a message
across a reconnect, and switching happens at batch boundaries anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from redis.exceptions import WatchError

from common.contract import keys, wire
from common.contract.errors import GraftError
from common.contract.routing import PlanView
from common.store.connection import Client

HISTORY_MAXLEN = 1000


class StaleEpoch(RuntimeError):
    """A plan was published with an epoch not above the current one."""


class NotLeader(RuntimeError):
    """A fenced publish by a planner that does not hold the planner lease."""


async def load_plan(r: Client) -> PlanView | None:
    raw = await r.get(keys.PLAN)
    if raw is None:
        return None
    return PlanView(wire.decode_plan(raw))


async def find_plan(r: Client, epoch: int, *, page: int = 100) -> PlanView | None:
    """The plan of ``epoch``: the current one, else from the published history (newest first)."""
    current = await load_plan(r)
    if current is not None and current.epoch == epoch:
        return current
    upper = "+"
    while True:
        rows = list(await r.xrevrange(keys.PLANS, max=upper, min="-", count=page) or [])
        for entry_id, fields in rows:
            with contextlib.suppress(GraftError):
                view = PlanView(wire.decode_plan((fields or {}).get(keys.FIELD)))
                if view.epoch == epoch:
                    return view
            upper = "(" + (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
        if len(rows) < page:
            return None


async def publish_plan(r: Client, plan: Mapping[str, Any], *, fence: str | None = None) -> int:
    """Publish ``plan`` as the current plan; its epoch must exceed the current one. Returns the epoch.

    ``fence``: the publisher's planner instance name; the publish happens only while the planner lease
    (``keys.PLANNER_LEASE``) names it, checked in the same transaction (``NotLeader`` otherwise).
    """
    epoch = int(plan["epoch"])
    payload = wire.encode_plan(dict(plan))
    async with r.pipeline(transaction=True) as tx:
        pipe: Any = tx  # redis-py leaves WATCH/MULTI/UNWATCH untyped
        while True:
            try:
                await pipe.watch(keys.PLAN, *([keys.PLANNER_LEASE] if fence is not None else []))
                raw = await pipe.get(keys.PLAN)
                if fence is not None:
                    holder = await pipe.get(keys.PLANNER_LEASE)
                    if holder is None or (holder.decode() if isinstance(holder, bytes) else str(holder)) != fence:
                        raise NotLeader(f"planner {fence} does not hold the lease; plan epoch {epoch} not published")
                current = PlanView(wire.decode_plan(raw)).epoch if raw is not None else -1
                if epoch <= current:
                    raise StaleEpoch(f"plan epoch {epoch} is not above the current epoch {current}")
                pipe.multi()
                pipe.set(keys.PLAN, payload)
                pipe.xadd(keys.PLANS, {keys.FIELD: payload}, maxlen=HISTORY_MAXLEN, approximate=True)
                await pipe.execute()
                return epoch
            except WatchError:
                continue


async def annotate_plan(r: Client, epoch: int, fields: Mapping[str, Any]) -> bool:
    """Update report-only fields of the current plan in place while its epoch is still ``epoch``.

    For what no service acts on (the planner's ``unplaced`` report): watchers follow epochs, so they
    never see this change, and the history stream keeps each plan as it was published. Returns False
    when the current plan is missing or has another epoch (then nothing is written).
    """
    async with r.pipeline(transaction=True) as tx:
        pipe: Any = tx  # redis-py leaves WATCH/MULTI/UNWATCH untyped
        while True:
            try:
                await pipe.watch(keys.PLAN)
                raw = await pipe.get(keys.PLAN)
                if raw is None:
                    await pipe.unwatch()
                    return False
                plan = wire.decode_plan(raw)
                if PlanView(plan).epoch != epoch:
                    await pipe.unwatch()
                    return False
                plan.update(fields)
                pipe.multi()
                pipe.set(keys.PLAN, wire.encode_plan(plan))
                await pipe.execute()
                return True
            except WatchError:
                continue


async def plan_history(r: Client, count: int = 20) -> list[dict[str, Any]]:
    """The last ``count`` published plans, newest first."""
    entries = list(await r.xrevrange(keys.PLANS, count=count) or [])
    return [wire.decode_plan((fields or {}).get(keys.FIELD)) for _id, fields in entries]


class PlanWatcher:
    """Polls the current plan; ``changed()`` returns a new PlanView when the epoch moved forward."""

    def __init__(self, r: Client, interval: float = 0.2) -> None:
        self._r = r
        self.interval = interval
        self.current: PlanView | None = None
        self._raw: bytes | str | None = None  # the bytes last decoded: an unchanged plan is not decoded again

    async def poll(self) -> PlanView | None:
        """Fetch once; returns the new view if the epoch advanced, else None. Decoding a large plan costs
        milliseconds and every service polls several times a second: only changed bytes are decoded."""
        raw = await self._r.get(keys.PLAN)
        if raw is None or raw == self._raw:
            return None
        self._raw = raw
        view = PlanView(wire.decode_plan(raw))
        if self.current is None or view.epoch > self.current.epoch:
            self.current = view
            return view
        return None

    async def wait_first(self, timeout: float | None = None) -> PlanView:
        """Block until a plan exists (services start before the planner has published)."""
        async def _loop() -> PlanView:
            while True:
                await self.poll()
                if self.current is not None:
                    return self.current
                await asyncio.sleep(self.interval)
        return await asyncio.wait_for(_loop(), timeout)
