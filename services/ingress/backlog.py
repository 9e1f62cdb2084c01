"""Polling the backlog of each group stream of the current plan, for the shedding policy.

The backlog of a group is what its replicas have not finished: entries not yet delivered to the
worker consumer group (``lag``) plus entries delivered and not acked (``pending``), both from one
XINFO GROUPS per stream, all streams in one pipelined round trip. Redis before 7.0, or a stream with
entries deleted inside the unread range, reports no ``lag``: then only ``pending`` counts (an
undercount, which errs toward routing). A stream whose worker group does not exist yet (no replica
has started) counts every entry as backlog.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.exceptions import ResponseError

from common.contract import keys


def _name(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def backlog_of(groups: Any, length: Any, group: str = keys.WORKER_GROUP) -> int:
    """Backlog from an XINFO GROUPS reply (or the error it raised) and the stream's XLEN."""
    if isinstance(groups, ResponseError) or groups is None:
        return 0  # no such stream: nothing was ever routed there
    if isinstance(groups, Exception):
        raise groups
    for info in groups:
        if _name(info.get("name")) != group:
            continue
        lag = info.get("lag")
        pending = int(info.get("pending") or 0)
        return pending + (int(lag) if isinstance(lag, int) and lag > 0 else 0)
    return int(length) if isinstance(length, int) else 0


async def poll_backlogs(r: Any, streams: Mapping[str, str]) -> dict[str, int]:
    """``{gid: backlog}`` for ``{gid: stream}`` in one round trip."""
    if not streams:
        return {}
    gids = list(streams)
    async with r.pipeline(transaction=False) as pipe:
        for gid in gids:
            pipe.xinfo_groups(streams[gid])
            pipe.xlen(streams[gid])
        res = await pipe.execute(raise_on_error=False)
    return {gid: backlog_of(res[2 * i], res[2 * i + 1]) for i, gid in enumerate(gids)}
