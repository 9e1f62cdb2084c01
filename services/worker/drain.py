"""Retiring a group stream: the plan of a replica's epoch, and when a retired stream is drained.

A replica serves one epoch's stream. When a newer plan is published, the ingress switches to the new
epoch's streams at its next batch, so entries may still arrive for a moment. A retired stream is
drained when, with ``quiet_s`` passed both since the replica saw the new plan and since the last entry
was added, nothing in it is undelivered or pending in the workers' group, and the replica's own queue
is empty. ``quiet_s`` must exceed the ingress's plan poll interval.

The ingress switches to a new plan only once its streams have worker consumers (make-before-break),
so a retired stream may still receive entries for as long as the new replicas take to load: a
retired stream is not drained while any live ingress (by its heartbeat) still routes by an epoch at
or below the stream's — a quiet spell in the traffic must not let the old replicas leave early.

``last-delivered-id`` against ``last-generated-id`` says "nothing undelivered" on Redis 6.2 too,
where XINFO GROUPS has no ``lag``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from common.contract import keys, wire
from common.contract.errors import GraftError
from common.contract.routing import PlanView
from common.store.plan_store import load_plan


async def find_plan(r: Any, epoch: int, *, page: int = 100) -> PlanView | None:
    """The plan of ``epoch``: the current one, else from the published history (newest first)."""
    current = await load_plan(r)
    if current is not None and current.epoch == epoch:
        return current
    upper = "+"
    while True:
        rows = await r.xrevrange(keys.PLANS, max=upper, min="-", count=page)
        for entry_id, fields in rows:
            with contextlib.suppress(GraftError):
                view = PlanView(wire.decode_plan(fields[keys.FIELD]))
                if view.epoch == epoch:
                    return view
            upper = "(" + _sid(entry_id)
        if len(rows) < page:
            return None


@dataclass(frozen=True, slots=True)
class Backlog:
    undelivered: int  # entries no consumer of the group has read yet
    pending: int  # read by some consumer, not acked
    last_id: str  # the stream's last-generated-id

    @property
    def total(self) -> int:
        return self.undelivered + self.pending


async def read_backlog(r: Any, stream: str, group: str) -> Backlog | None:
    """The group's backlog on ``stream``; None when the stream no longer exists."""
    try:
        info = await r.xinfo_stream(stream)
        groups = await r.xinfo_groups(stream)
    except Exception as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    last = _sid(info.get("last-generated-id", "0-0"))
    for g in groups:
        if _sid(g.get("name", b"")) == group:
            delivered = _sid(g.get("last-delivered-id", "0-0"))
            lag = g.get("lag")
            undelivered = int(lag) if lag is not None else (0 if id_key(delivered) >= id_key(last) else 1)
            return Backlog(undelivered, int(g.get("pending", 0)), last)
    return Backlog(0, 0, last)


def is_drained(backlog: Backlog | None, *, now_ms: int, quiet_s: float) -> bool:
    """Nothing left in the group, and no entry added to the stream for ``quiet_s`` (Redis clock)."""
    if backlog is None:
        return True
    if backlog.total:
        return False
    return now_ms - id_key(backlog.last_id)[0] >= quiet_s * 1000.0


async def ingresses_past(r: Any, epoch: int) -> bool:
    """True when every live ingress routes by a plan newer than ``epoch`` (or none is alive)."""
    names = [key async for key in r.scan_iter(match=keys.health_pattern("ingress"), count=100)]
    if not names:
        return True
    for raw in await r.mget(names):
        if raw is None:
            continue  # expired between SCAN and MGET: that ingress is gone
        try:
            routed = wire.decode_message(raw, "health").get("epoch")
        except GraftError:
            continue
        if routed is not None and int(routed) <= epoch:
            return False
    return True


async def redis_now_ms(r: Any) -> int:
    """Redis's clock, the one that stamped the entry ids."""
    secs, micros = await r.time()
    return int(secs) * 1000 + int(micros) // 1000


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def _sid(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
