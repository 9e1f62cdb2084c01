"""Redis Streams plumbing for every service: consumer groups, dead letters, trimming (connections and the
transient errors: ``connection.py``).

The reliability protocol of design section 7, the consumer's half (the reaper is in ``reaper.py``):

- a consumer first re-reads its *own* pending entries (XREADGROUP from id ``0``, following the ids
  until the history is empty), then new ones (``>``) — a restarted replica recovers what it held;
- an entry delivered more than ``max_deliveries`` times, or one without the payload field, goes to
  ``keys.dead_letters(stream)`` with the error, and is acked, in one MULTI/EXEC;
- blocking reads use a BLOCK below the socket timeout (checked here, and in ``Settings``);
- ``StreamConsumer.run`` survives Redis restarts: it backs off, re-creates a lost group and
  re-reads its own pending entries before new ones.

Entry ids are returned as ``str``; payloads stay ``bytes`` (clients use ``decode_responses=False``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.exceptions import ResponseError

from common.contract import keys
from common.contract.errors import GraftError, InternalError, InvalidRequest
from common.logs import Event, get_logger
from common.store.connection import REDIS_DOWN, TRANSIENT, Backoff, Client, block_below_timeout

log = get_logger(__name__)

DEAD_LETTER_MAXLEN = 10_000


class Entry(NamedTuple):
    """One stream entry as a consumer sees it. ``payload`` is None when the entry has no ``m`` field."""

    id: str
    payload: bytes | None
    deliveries: int = 1


DeadLetterHook = Callable[[Entry, GraftError], Awaitable[None] | None]


async def maybe_await(value: Awaitable[None] | None) -> None:
    if inspect.isawaitable(value):
        await value


def _sid(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# ------------------------------------------------------------------------------ groups and data


async def ensure_group(r: Client, stream: str, group: str, start_id: str = "0") -> bool:
    """Create ``group`` on ``stream`` (and the stream); True if created, False if it existed."""
    try:
        await r.xgroup_create(stream, group, id=start_id, mkstream=True)
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        raise
    return True


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


async def xadd(r: Client, stream: str, payload: bytes, maxlen: int | None = None, *, approximate: bool = True) -> str:
    """Append one payload (field ``m``) with an approximate length cap; return the entry id."""
    entry_id = await r.xadd(stream, {keys.FIELD: payload}, maxlen=maxlen, approximate=approximate)
    return _sid(entry_id)


async def trim(r: Client, stream: str, *, max_age_ms: float, maxlen: int | None = None,
               approximate: bool = True) -> int:
    """Drop entries older than ``max_age_ms`` and cap the length; return how many were removed.

    Age is measured on the Redis clock (TIME), the clock that stamped the entry ids.
    Approximate trimming only frees whole radix-tree nodes (~100 entries), which is what makes it cheap.
    """
    secs, micros = await r.time()
    cutoff_ms = max(0, int(secs) * 1000 + int(micros) // 1000 - int(max_age_ms))
    removed = int(await r.xtrim(stream, minid=f"{cutoff_ms}-0", approximate=approximate))
    if maxlen is not None:
        removed += int(await r.xtrim(stream, maxlen=maxlen, approximate=approximate))
    return removed


# Finished entries outlive their ack by about this much. They are owed nothing (a pending or unread
# entry is never trimmed, whatever its age); keeping them for the longest SLO instead (60 s) held a
# minute of traffic in Redis — at 5,000 req/s of 16 KB tensors its memory grew ~120 MB/s for the
# whole of an overload run, every byte of it fresh pages.
FINISHED_KEEP_MS = 1_000.0


async def safe_trim(r: Client, stream: str, *, max_age_ms: float = FINISHED_KEEP_MS) -> int:
    """Drop entries older than ``max_age_ms`` (Redis clock) that no consumer group still owes anything:
    never past a group's last delivered entry, never past its oldest pending one, nothing of a stream
    no group reads yet. Nothing is lost unanswered by trimming; returns how many entries went.

    Approximate trimming only frees whole radix-tree nodes (~100 entries), which is what makes it cheap.
    """
    secs, micros = await r.time()
    cutoff = (max(0, int(secs) * 1000 + int(micros) // 1000 - int(max_age_ms)), 0)
    try:
        groups = await r.xinfo_groups(stream)
    except ResponseError:
        return 0  # no such stream
    if not groups:  # written before its readers' group exists: every entry is still owed to that group
        return 0
    for g in groups:
        delivered = _id_key(_sid(g.get("last-delivered-id", "0-0")))
        cutoff = min(cutoff, (delivered[0], delivered[1] + 1))
        if int(g.get("pending", 0) or 0):
            summary = await r.xpending(stream, _sid(g.get("name", b"")))
            oldest = summary.get("min") if isinstance(summary, dict) else None
            if oldest is not None:
                cutoff = min(cutoff, _id_key(_sid(oldest)))
    if cutoff <= (0, 0):
        return 0
    return int(await r.xtrim(stream, minid=f"{cutoff[0]}-{cutoff[1]}", approximate=True))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


async def deliveries(r: Client, stream: str, group: str, ids: Sequence[str]) -> dict[str, int]:
    """Delivery counts of pending entries (XPENDING extended form); ids not pending are absent."""
    if not ids:
        return {}
    async with r.pipeline(transaction=False) as pipe:
        for entry_id in ids:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        pages = await pipe.execute()
    out: dict[str, int] = {}
    for page in pages:
        for row in page:
            out[_sid(row["message_id"])] = int(row["times_delivered"])
    return out


async def ack(r: Client, stream: str, group: str, ids: Iterable[str], *, delete: bool = False) -> int:
    """XACK (and XDEL when ``delete``) in chunks, one pipelined round trip; return the number acked."""
    id_list = list(ids)
    if not id_list:
        return 0
    async with r.pipeline(transaction=False) as pipe:
        for i in range(0, len(id_list), 1000):
            chunk = id_list[i:i + 1000]
            pipe.xack(stream, group, *chunk)
            if delete:
                pipe.xdel(stream, *chunk)
        results = await pipe.execute()
    return sum(int(n) for n in results[:: 2 if delete else 1])


# ------------------------------------------------------------------------------------ dead letters


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str                 # id in the dead-letter stream
    stream: str             # where the entry came from
    group: str
    entry_id: str           # its id there
    payload: bytes
    code: str
    message: str
    deliveries: int
    consumer: str
    time_ms: int


def dead_letter_fields(stream: str, group: str, entry_id: str, payload: bytes | None, error: GraftError, *,
                       deliveries: int, consumer: str, time_ms: int) -> dict[bytes, bytes | str | int]:
    """The fields of a dead letter: the entry's payload, why, and where it came from."""
    return {keys.FIELD: payload if payload is not None else b"", b"code": str(error.code), b"message": error.message,
            b"stream": stream, b"group": group, b"id": entry_id, b"deliveries": deliveries, b"consumer": consumer,
            b"time_ms": time_ms}


async def dead_letter(
    r: Client, stream: str, group: str, entry_id: str, payload: bytes | None, error: GraftError | str, *,
    deliveries: int = 0, consumer: str = "", maxlen: int = DEAD_LETTER_MAXLEN,
) -> str:
    """Move one entry to ``keys.dead_letters(stream)`` with its error and XACK it, atomically."""
    err = error if isinstance(error, GraftError) else InternalError(error)
    fields = dead_letter_fields(stream, group, entry_id, payload, err, deliveries=deliveries, consumer=consumer,
                                time_ms=int(time.time() * 1000))
    async with r.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.dead_letters(stream), fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.xack(stream, group, entry_id)
        dead_id, _ = await pipe.execute()
    log.warning(Event.DEAD_LETTERED, stream=stream, group=group, entry_id=entry_id, code=str(err.code),
                error=err.message, deliveries=deliveries)
    return _sid(dead_id)


async def list_dead_letters(r: Client, stream: str, *, count: int = 100, start: str = "-") -> list[DeadLetter]:
    """The oldest ``count`` dead letters of ``stream`` from ``start`` (for the admin CLI)."""
    rows: list[tuple[Any, Any]] = list(await r.xrange(keys.dead_letters(stream), min=start, max="+", count=count) or [])
    out: list[DeadLetter] = []
    for raw_id, raw_fields in rows:
        f: dict[bytes, bytes] = raw_fields or {}
        text = {k: _sid(v) for k, v in f.items() if k != keys.FIELD}
        out.append(DeadLetter(
            id=_sid(raw_id), stream=text.get(b"stream", ""), group=text.get(b"group", ""),
            entry_id=text.get(b"id", ""), payload=f.get(keys.FIELD, b""), code=text.get(b"code", ""),
            message=text.get(b"message", ""), deliveries=int(text.get(b"deliveries") or 0),
            consumer=text.get(b"consumer", ""), time_ms=int(text.get(b"time_ms") or 0),
        ))
    return out


def _read_rows(resp: Any) -> list[tuple[Any, dict[Any, Any]]]:
    """XREADGROUP reply for one stream → its rows (RESP2 list or RESP3 map; None when BLOCK expired)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        return [row for rows in resp.values() for row in rows]
    return [row for _, rows in resp for row in rows]


# ------------------------------------------------------------------------------------- consumer

Handler = Callable[[list[Entry]], Awaitable[None] | None]


class StreamConsumer:
    """One consumer of one group: own pending entries first, then new ones; poison goes to dead letters.

    ``read`` never returns an entry without a payload, nor one delivered more than ``max_deliveries``
    times (None: no limit): those are dead-lettered (and acked) on the way, and ``on_dead_lettered``
    hears about each, so a service can still answer the request. Pending entries whose stream entry
    was trimmed away meanwhile are acked silently: nothing is left to answer.
    """

    def __init__(
        self, r: Client, stream: str, group: str, consumer: str, *, count: int = 16, block_ms: int = 100,
        max_deliveries: int | None = 3, start_id: str = "0", dead_letter_maxlen: int = DEAD_LETTER_MAXLEN,
        on_dead_lettered: DeadLetterHook | None = None,
    ) -> None:
        block_below_timeout(r, block_ms)
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self.count, self.block_ms, self.max_deliveries = count, block_ms, max_deliveries
        self.start_id, self.dead_letter_maxlen, self.on_dead_lettered = start_id, dead_letter_maxlen, on_dead_lettered
        self._pending_from: str | None = "0"   # next own-pending id to re-read; None: reading new entries
        self._isolate = False                  # re-read pending one by one (after a failed batch)
        self._errors: dict[str, str] = {}      # last handler error per entry id, for its dead letter
        self._ready = False

    @property
    def recovering(self) -> bool:
        """True while own pending entries are still being re-read."""
        return self._pending_from is not None

    async def setup(self) -> None:
        await ensure_group(self.r, self.stream, self.group, self.start_id)
        self._ready = True

    def recover(self, *, isolate: bool = False) -> None:
        """Re-read own pending entries before new ones (after a reconnect or a failed batch).

        ``isolate`` re-reads them one at a time, so a poison entry cannot drag its batch-mates to the
        dead-letter stream with it.
        """
        self._pending_from = "0"
        self._isolate = self._isolate or isolate

    async def read(self, count: int | None = None, block_ms: int | None = None) -> list[Entry]:
        n = count or self.count
        try:
            if not self._ready:
                await self.setup()
            while self._pending_from is not None:
                entries = await self._read_pending(1 if self._isolate else n)
                if entries:
                    return entries
            resp = await self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=n,
                                           block=block_ms or self.block_ms)
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            # The stream or group vanished (a Redis restart without persistence, or a FLUSH): re-create
            # it from id 0 so entries producers added since are still served.
            self._ready = False
            self.recover()
            return []
        out: list[Entry] = []
        for raw_id, fields in _read_rows(resp):
            entry = Entry(_sid(raw_id), fields.get(keys.FIELD), 1)
            if entry.payload is None:
                await self._dead_letter(entry, InvalidRequest(f"stream entry has no {keys.FIELD!r} field"))
            else:
                out.append(entry)
        return out

    async def read_own_pending(self, count: int | None = None) -> list[Entry]:
        """One page of this consumer's own pending entries ([] once they are all re-read; then ``read``
        returns new entries only)."""
        if not self._ready:
            await self.setup()
        while self._pending_from is not None:
            entries = await self._read_pending(count or self.count)
            if entries:
                return entries
        return []

    async def _read_pending(self, n: int) -> list[Entry]:
        assert self._pending_from is not None
        resp = await self.r.xreadgroup(self.group, self.consumer, {self.stream: self._pending_from}, count=n)
        rows = _read_rows(resp)
        if not rows:
            self._pending_from, self._isolate = None, False
            self._errors.clear()
            return []
        self._pending_from = _sid(rows[-1][0])
        # A pending entry whose stream entry is gone (trimmed, XDEL) comes back with no fields.
        gone = [_sid(i) for i, f in rows if not f]
        if gone:
            await ack(self.r, self.stream, self.group, gone)
            log.info(Event.RECLAIMED, stream=self.stream, consumer=self.consumer, gone=len(gone))
        live = [(_sid(i), f) for i, f in rows if f]
        counts = await deliveries(self.r, self.stream, self.group, [i for i, _ in live])
        out: list[Entry] = []
        for entry_id, fields in live:
            entry = Entry(entry_id, fields.get(keys.FIELD), counts.get(entry_id, 1))
            if entry.payload is None:
                await self._dead_letter(entry, InvalidRequest(f"stream entry has no {keys.FIELD!r} field"))
            elif self.max_deliveries is not None and entry.deliveries > self.max_deliveries:
                await self._dead_letter(entry, poison_error(entry, self.max_deliveries, self._errors.get(entry_id)))
            else:
                out.append(entry)
        return out

    async def _dead_letter(self, entry: Entry, error: GraftError) -> None:
        await dead_letter(self.r, self.stream, self.group, entry.id, entry.payload, error,
                          deliveries=entry.deliveries, consumer=self.consumer, maxlen=self.dead_letter_maxlen)
        self._errors.pop(entry.id, None)
        if self.on_dead_lettered is not None:
            await maybe_await(self.on_dead_lettered(entry, error))

    async def ack(self, ids: Iterable[str]) -> int:
        return await ack(self.r, self.stream, self.group, ids)

    async def ack_and_delete(self, ids: Iterable[str]) -> int:
        return await ack(self.r, self.stream, self.group, ids, delete=True)

    async def run(self, handler: Handler, *, stop: asyncio.Event | None = None, auto_ack: bool = True,
                  backoff: Backoff | None = None) -> None:
        """Read → ``handler(entries)`` → XACK until ``stop`` is set, surviving Redis outages.

        A handler that raises leaves its entries pending; they are re-read one at a time and land in
        the dead-letter stream once delivered more than ``max_deliveries`` times. Entries can thus be
        handled more than once: handlers must be idempotent by entry (replies are, by ``req_id``).
        """
        stop = stop or asyncio.Event()
        backoff = backoff or Backoff()
        while not stop.is_set():
            try:
                entries = await self.read()
                backoff.reset()
                if not entries:
                    continue
                try:
                    await maybe_await(handler(entries))
                except REDIS_DOWN:
                    raise
                except Exception as exc:  # a handler bug must not kill the consumer; the entry is retried
                    log.exception(Event.BATCH_FAILED, stream=self.stream, consumer=self.consumer, size=len(entries))
                    for e in entries:
                        self._errors[e.id] = f"{type(exc).__name__}: {exc}"
                    self.recover(isolate=True)
                    continue
                if auto_ack:
                    await self.ack(e.id for e in entries)
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, stream=self.stream, consumer=self.consumer,
                            error=repr(exc), retry_in_s=round(delay, 3))
                # Whatever was delivered to us while the link broke sits in our PEL: re-read it first.
                self._ready = False
                self.recover()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    pass


def poison_error(entry: Entry, max_deliveries: int, last_error: str | None = None) -> InternalError:
    why = f"; last error: {last_error}" if last_error else ""
    return InternalError(f"delivered {entry.deliveries} times, more than max_deliveries={max_deliveries}{why}",
                         deliveries=entry.deliveries)
