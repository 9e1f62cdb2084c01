"""The reaper: recovers entries that consumers took and never acked (design section 7).

One reaper per group stream, usually running inside each worker replica under that replica's own
consumer name, periodically XAUTOCLAIMs entries idle longer than ``min_idle_ms`` — the worst batch
time, so a live replica's batch in flight is never stolen — and follows XAUTOCLAIM's cursor until it
comes back ``0-0``: one call only scans ``count`` pending entries, so a reaper that stops after the
first page leaves the rest of a dead replica's work stranded.

Each claimed entry is routed: delivered more than ``max_deliveries`` times → dead-letter stream (with
the error) and acked; otherwise → ``on_claimed(entries)``, which owns it from then on (process it, or
answer ``DEADLINE_EXCEEDED`` if its deadline passed, then XACK). Entries deleted from the stream while
pending (trimming) are acked: Redis 7 lists them in XAUTOCLAIM's third element (and already dropped
them from the PEL); Redis 6.2 returns them as nil entries and keeps them pending, so they are found
in our PEL and acked here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common.contract import keys
from common.contract.errors import InvalidRequest
from common.logs import Event, get_logger
from common.store.connection import REDIS_DOWN, TRANSIENT, Backoff, Client
from common.store.streams import (
    DEAD_LETTER_MAXLEN,
    DeadLetterHook,
    Entry,
    ack,
    dead_letter,
    deliveries,
    is_nogroup,
    maybe_await,
    poison_error,
)

log = get_logger(__name__)

ClaimHandler = Callable[[list[Entry]], Awaitable[None] | None]


@dataclass(slots=True)
class ReapReport:
    """What one full pass over the stream's pending entries did."""

    claimed: list[Entry] = field(default_factory=list)        # handed to on_claimed, with delivery counts
    dead_lettered: list[Entry] = field(default_factory=list)  # poison or payload-less entries
    deleted: list[str] = field(default_factory=list)          # pending ids whose entry was gone; acked
    pages: int = 0                                             # XAUTOCLAIM calls made


def _sid(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Reaper:
    def __init__(
        self, r: Client, stream: str, group: str, consumer: str, *, min_idle_ms: int, max_deliveries: int = 3,
        on_claimed: ClaimHandler | None = None, on_dead_lettered: DeadLetterHook | None = None,
        count: int = 100, interval_s: float | None = None, dead_letter_maxlen: int = DEAD_LETTER_MAXLEN,
    ) -> None:
        if min_idle_ms < 0 or count < 1 or max_deliveries < 1:
            raise ValueError("min_idle_ms must be >= 0, count and max_deliveries >= 1")
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self.min_idle_ms, self.max_deliveries, self.count = min_idle_ms, max_deliveries, count
        self.on_claimed, self.on_dead_lettered = on_claimed, on_dead_lettered
        # Checking twice per idle period bounds how long a stranded entry waits beyond min_idle_ms.
        self.interval_s = interval_s if interval_s is not None else max(0.05, min_idle_ms / 2000.0)
        self.dead_letter_maxlen = dead_letter_maxlen

    async def reap_once(self) -> ReapReport:
        """One pass: XAUTOCLAIM from ``0-0``, following the cursor until Redis returns ``0-0``."""
        report = ReapReport()
        cursor = "0-0"
        while True:
            try:
                resp = await self.r.xautoclaim(self.stream, self.group, self.consumer, self.min_idle_ms,
                                               cursor, count=self.count)
            except Exception as exc:
                if is_nogroup(exc):  # stream retired or not created yet: nothing to reap
                    return report
                raise
            report.pages += 1
            next_cursor = _sid(resp[0])
            rows: list[tuple[Any, Any]] = list(resp[1])
            gone = [_sid(i) for i in resp[2]] if len(resp) > 2 else []
            live = [(_sid(i), f) for i, f in rows if i is not None]
            if len(live) < len(rows):  # Redis 6.2: nil entries, still pending under our name
                gone += await self._gone_in_own_pel(cursor, next_cursor, {i for i, _ in live})
            if gone:
                await ack(self.r, self.stream, self.group, gone)
                report.deleted += gone
            await self._route(live, report)
            cursor = next_cursor
            if cursor == "0-0":
                break
        if report.claimed or report.dead_lettered or report.deleted:
            log.info(Event.RECLAIMED, stream=self.stream, consumer=self.consumer, claimed=len(report.claimed),
                     dead_lettered=len(report.dead_lettered), deleted=len(report.deleted), pages=report.pages)
        return report

    async def _route(self, live: list[tuple[str, Any]], report: ReapReport) -> None:
        counts = await deliveries(self.r, self.stream, self.group, [i for i, _ in live])
        handed: list[Entry] = []
        for entry_id, fields in live:
            entry = Entry(entry_id, (fields or {}).get(keys.FIELD), counts.get(entry_id, 1))
            if entry.payload is None:
                error: Any = InvalidRequest(f"stream entry has no {keys.FIELD!r} field")
            elif entry.deliveries > self.max_deliveries:
                error = poison_error(entry, self.max_deliveries)
            else:
                handed.append(entry)
                continue
            await dead_letter(self.r, self.stream, self.group, entry.id, entry.payload, error,
                              deliveries=entry.deliveries, consumer=self.consumer, maxlen=self.dead_letter_maxlen)
            report.dead_lettered.append(entry)
            if self.on_dead_lettered is not None:
                await maybe_await(self.on_dead_lettered(entry, error))
        report.claimed += handed
        if handed and self.on_claimed is not None:
            # Handed over page by page, so a huge backlog never sits in memory at once.
            try:
                await maybe_await(self.on_claimed(handed))
            except REDIS_DOWN:
                raise
            except Exception:  # the entries stay pending under our name; the next pass retries them
                log.exception(Event.BATCH_FAILED, stream=self.stream, consumer=self.consumer, size=len(handed))

    async def _gone_in_own_pel(self, start: str, end: str, live: set[str]) -> list[str]:
        """Ids in our PEL within [start, end] whose stream entry no longer exists (Redis 6.2 only)."""
        upper = "+" if end == "0-0" else end
        candidates: list[str] = []
        lower = start
        while True:
            page = await self.r.xpending_range(self.stream, self.group, min=lower, max=upper, count=1000,
                                               consumername=self.consumer)
            ids = [_sid(row["message_id"]) for row in page]
            candidates += [i for i in ids if i not in live]
            if len(ids) < 1000:
                break
            lower = "(" + ids[-1]
        if not candidates:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for i in candidates:
                pipe.xrange(self.stream, min=i, max=i, count=1)
            found = await pipe.execute()
        return [i for i, rows in zip(candidates, found, strict=True) if not rows]

    async def run(self, stop: asyncio.Event | None = None, *, backoff: Backoff | None = None) -> None:
        """Reap every ``interval_s`` until ``stop`` is set, waiting out Redis outages."""
        stop = stop or asyncio.Event()
        backoff = backoff or Backoff()
        while not stop.is_set():
            delay = self.interval_s
            try:
                await self.reap_once()
                backoff.reset()
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, stream=self.stream, consumer=self.consumer, error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
