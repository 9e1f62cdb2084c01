"""How much a group stream still holds: backlogs for admission, and when a retired stream is drained.

The backlog of a group is what its replicas have not finished: entries not yet delivered to the
worker consumer group (``lag``) plus entries delivered and not acked (``pending``), both from one
XINFO GROUPS per stream, all streams in one pipelined round trip (``poll_backlogs``). Redis before
7.0, or a stream with entries deleted inside the unread range, reports no ``lag``: then
``last-delivered-id`` against ``last-generated-id`` says whether anything is undelivered. The same
reply gives how many entries the group has finished so far (``entries-read − pending``, Redis ≥ 7.0):
admission measures a saturated group's real drain rate from it.

A retired stream (an older epoch's) is *drained* when nothing in it is undelivered or pending and no
entry was added for ``quiet_s`` (Redis clock), and every live ingress routes by a newer epoch
(``ingresses_past``): the ingress switches to a new plan only once its streams have live consumers,
so a retired stream may still receive entries for a moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from common.contract import keys
from common.store.connection import Client


def _sid(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def id_ms(entry_id: str | bytes) -> int:
    """The Redis time (ms) at which an auto-generated entry id was assigned."""
    return id_key(_sid(entry_id))[0]


@dataclass(frozen=True, slots=True)
class Backlog:
    undelivered: int  # entries no consumer of the group has read yet
    pending: int  # read by some consumer, not acked
    last_id: str  # the stream's last-generated-id

    @property
    def total(self) -> int:
        return self.undelivered + self.pending


def backlog_of(groups: Any, length: Any, group: str = keys.WORKER_GROUP) -> int:
    """Backlog from an XINFO GROUPS reply (or the error it raised) and the stream's XLEN."""
    if isinstance(groups, ResponseError) or groups is None:
        return 0  # no such stream: nothing was ever routed there
    if isinstance(groups, Exception):
        raise groups
    for info in groups:
        if _sid(info.get("name")) != group:
            continue
        lag = info.get("lag")
        pending = int(info.get("pending") or 0)
        return pending + (int(lag) if isinstance(lag, int) and lag > 0 else 0)
    return int(length) if isinstance(length, int) else 0


def acked_of(groups: Any, group: str = keys.WORKER_GROUP) -> int | None:
    """Entries the group has acknowledged so far (read minus pending) from an XINFO GROUPS reply; None
    when Redis does not say (before 7.0, or ``entries-read`` unknown after an XGROUP SETID)."""
    if isinstance(groups, Exception) or groups is None:
        return None
    for info in groups:
        if _sid(info.get("name")) == group:
            read = info.get("entries-read")
            return max(0, int(read) - int(info.get("pending") or 0)) if isinstance(read, int) else None
    return None


@dataclass(frozen=True, slots=True)
class Polled:
    backlog: int  # undelivered + pending
    acked: int | None  # acknowledged so far (a counter: its rate is the group's drain), None if unknown


async def poll_backlogs(r: Client, streams: Mapping[str, str]) -> dict[str, Polled]:
    """``{gid: Polled}`` for ``{gid: stream}`` in one round trip."""
    if not streams:
        return {}
    gids = list(streams)
    async with r.pipeline(transaction=False) as pipe:
        for gid in gids:
            pipe.xinfo_groups(streams[gid])
            pipe.xlen(streams[gid])
        res = await pipe.execute(raise_on_error=False)
    return {gid: Polled(backlog_of(res[2 * i], res[2 * i + 1]), acked_of(res[2 * i])) for i, gid in enumerate(gids)}


async def read_backlog(r: Client, stream: str, group: str = keys.WORKER_GROUP) -> Backlog | None:
    """The group's backlog on ``stream``; None when the stream no longer exists."""
    try:
        info = await r.xinfo_stream(stream)
        groups = await r.xinfo_groups(stream)
    except ResponseError as exc:
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


def ingresses_past(ingress_statuses: Iterable[Mapping[str, Any]], epoch: int) -> bool:
    """True when every live ingress (its registry status) routes by a plan newer than ``epoch``."""
    for status in ingress_statuses:
        routed = status.get("epoch")
        if isinstance(routed, int) and routed <= epoch:
            return False
    return True


async def redis_now_ms(r: Client) -> int:
    """Redis's clock, the one that stamped the entry ids."""
    secs, micros = await r.time()
    return int(secs) * 1000 + int(micros) // 1000


async def drained_streams(r: Client, streams: Iterable[str], ingress_statuses: Iterable[Mapping[str, Any]], *,
                          quiet_s: float) -> set[str]:
    """The retired group streams among ``streams`` that may be dropped: every live ingress routes by a
    newer epoch than the stream's, nothing is left in it, and nothing was added for ``quiet_s``."""
    statuses = list(ingress_statuses)
    done: set[str] = set()
    todo = [s for s in streams if (where := keys.parse_group_stream(s)) is not None and ingresses_past(statuses, where[0])]
    if not todo:
        return done
    now_ms = await redis_now_ms(r)
    for stream in todo:
        if is_drained(await read_backlog(r, stream), now_ms=now_ms, quiet_s=quiet_s):
            done.add(stream)
    return done
