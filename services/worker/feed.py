"""A replica's way in: reading the streams it is assigned, turning entries into jobs, reclaiming the dead's.

One reader task per assigned stream (the active group's, and retired ones it still drains) reads
under the replica's consumer name: its own pending entries first (a process that took over the slot
of a dead one continues where that one stopped), then new ones, never more than one batch and never
while a batch runs (``BatchLoop.wait_for_space``: what is left in the stream goes to whichever
replica of the group is free first). Every entry is
admitted through ``Intake``: a bad one is answered (or dead-lettered when nobody can be answered), a
late one is answered ``DEADLINE_EXCEEDED``, a good one joins the EDF queue of the batch loop.

Blob requests: whatever one read brings in, the replica GETs the blobs of in one pipelined round trip
before queueing the jobs (``intake.py`` says how a missing blob is answered).

Beside the readers, one reaping pass per stream every ``reap_interval_s``: first re-stamp the entries
this replica holds (XCLAIM JUSTID to itself: idle time 0, owner and delivery count unchanged) so no
sibling takes them while they wait in its queue, then XAUTOCLAIM what a dead consumer left idle for
``min_idle_ms``. Removing a stream stops its reader after its current read: what that read brought in
is still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from common.contract import keys, wire
from common.contract.errors import GraftError, InternalError
from common.logs import Event
from common.metrics import DEAD_LETTERS, RECLAIMED
from common.store.connection import TRANSIENT, Backoff, Client
from common.store.protocol import Letter
from common.store.reaper import Reaper
from common.store.streams import Entry, StreamConsumer, safe_trim
from services.worker.intake import Intake, Job, Rejection, job_key
from services.worker.loop import BatchLoop, Done
from services.worker.replying import Replier

log = structlog.get_logger("worker.feed")

TRIM_EVERY_S = 2.0  # finished entries go a second or two after their ack (streams.FINISHED_KEEP_MS)


@dataclass
class _Reader:
    consumer: StreamConsumer
    reaper: Reaper
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    trimmed_at: float = field(default_factory=time.monotonic)


class Feed:
    def __init__(self, r: Client, loop: BatchLoop, intake: Intake, replier: Replier, *, block_ms: int,
                 max_deliveries: int, stream_maxlen: int,
                 min_idle_ms: Callable[[], int], reap_interval_s: float = 0.2,
                 on_reader_done: Callable[[asyncio.Task[None]], None] | None = None) -> None:
        self._r = r
        # Told when a reader task ends (its exception, if any): one that died of an error it does not
        # handle leaves a stream nobody reads behind a replica that looks alive (the replica crashes).
        self._on_reader_done = on_reader_done
        self.loop, self.intake, self.replier = loop, intake, replier
        self._block_ms, self._max_deliveries = block_ms, max_deliveries
        self._stream_maxlen = stream_maxlen
        self._min_idle_ms = min_idle_ms
        self.reap_interval_s = reap_interval_s
        self.consumer: str | None = None
        self._readers: dict[str, _Reader] = {}
        self._retired: list[_Reader] = []
        self.reclaimed = 0
        self.dead_lettered = 0

    @property
    def capacity(self) -> int:
        # One batch: entries left in the stream can still go to another replica of the group.
        return self.loop.max_batch

    @property
    def streams(self) -> list[str]:
        return list(self._readers)

    # --------------------------------------------------------------------------------- assignment

    def assign(self, consumer: str | None, streams: Sequence[str]) -> None:
        """Read exactly ``streams`` as ``consumer`` from now on (None and no streams: standby)."""
        if consumer != self.consumer:
            for stream in list(self._readers):
                self._retire(stream)
            self.consumer = consumer
        if consumer is None:
            return
        for stream in list(self._readers):
            if stream not in streams:
                self._retire(stream)
        for stream in streams:
            if stream not in self._readers:
                self._start(consumer, stream)

    def _start(self, consumer: str, stream: str) -> None:
        async def claimed(entries: list[Entry]) -> None:
            await self._on_claimed(entries, stream)

        reader = _Reader(
            StreamConsumer(self._r, stream, keys.WORKER_GROUP, consumer, count=self.capacity, block_ms=self._block_ms,
                           max_deliveries=self._max_deliveries, on_dead_lettered=self._on_dead_lettered),
            Reaper(self._r, stream, keys.WORKER_GROUP, consumer, min_idle_ms=self._min_idle_ms(),
                   max_deliveries=self._max_deliveries, on_claimed=claimed,
                   on_dead_lettered=self._on_dead_lettered, interval_s=self.reap_interval_s))
        reader.task = asyncio.create_task(self._read(stream, reader), name=f"read-{stream}")
        if self._on_reader_done is not None:
            reader.task.add_done_callback(self._on_reader_done)
        self._readers[stream] = reader
        log.info("stream_assigned", stream=stream, consumer=consumer)

    def _retire(self, stream: str) -> None:
        reader = self._readers.pop(stream)
        reader.stop.set()
        self._retired.append(reader)
        log.info("stream_released", stream=stream, consumer=reader.consumer.consumer)

    async def close(self) -> None:
        for stream in list(self._readers):
            self._retire(stream)
        tasks = [r.task for r in self._retired if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self._block_ms / 1000.0 + 1.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._retired.clear()

    # ------------------------------------------------------------------------------------ reading

    async def _read(self, stream: str, reader: _Reader) -> None:
        backoff = Backoff()
        consumer = reader.consumer
        await consumer.setup()
        # Visible in XINFO CONSUMERS at once (XREADGROUP alone creates no consumer on an empty stream
        # before Redis 7.2): operators see who serves the stream.
        with contextlib.suppress(*TRANSIENT):
            await self._r.xgroup_createconsumer(stream, keys.WORKER_GROUP, consumer.consumer)
        while not reader.stop.is_set():
            await self.loop.wait_for_space(self.capacity)
            try:
                entries = await consumer.read(count=max(1, self.loop.room(self.capacity)))
                backoff.reset()
                await self.admit(entries, stream)
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, stream=stream, error=repr(exc), retry_in_s=round(delay, 3))
                consumer.recover()
                await asyncio.sleep(delay)

    async def admit(self, entries: list[Entry], stream: str, *, claimed: bool = False) -> None:
        now = time.time()
        rejected: list[Rejection] = []
        expired: list[Job] = []
        ready: list[Job] = []
        for entry in entries:
            if self.loop.holds(job_key(stream, entry.id)):
                continue
            got = self.intake.admit(entry.id, entry.payload, now=now, deliveries=entry.deliveries, stream=stream)
            if isinstance(got, Rejection):
                rejected.append(got)
            elif (claimed or got.needs_blob) and got.deadline <= now:
                expired.append(got)  # a late blob request is answered without fetching its blob
            else:
                ready.append(got)
        blob_jobs = [j for j in ready if j.needs_blob]
        if blob_jobs:
            # Before anything is queued or answered: if this raises, the entries are read again.
            fetched = await self._fetch_blobs(blob_jobs)
            for job, data in zip(blob_jobs, fetched, strict=True):
                if self.intake.blob_expired(job, data, now):
                    expired.append(job)
                    continue
                got = self.intake.attach(job, data)
                if isinstance(got, Rejection):
                    rejected.append(got)
            ready = [j for j in ready if not j.needs_blob]
        for job in ready:
            self.loop.add(job)
        done: list[Done] = []
        if rejected:
            await self._reject_all(rejected, done)
        if done:
            await self.replier(done)
        if expired:
            await self.loop.expire(expired, now)

    async def _fetch_blobs(self, jobs: list[Job]) -> list[Any]:
        """The bytes of each job's blob (None where it is gone), in one pipelined round trip."""
        keys_ = []
        for job in jobs:
            assert job.blob is not None  # needs_blob
            keys_.append(job.blob)
        return list(await self.replier.store.blobs(keys_))

    async def _reject_all(self, rejected: list[Rejection], done: list[Done]) -> None:
        """Answer every rejection that has ids (its reply joins ``done``) and dead-letter the others, all of
        one read together: one MULTI for the dead letters and one log line, not a round trip and two log
        lines per entry — a flood of garbage in a group stream must not starve the replies behind it."""
        codes = Counter(str(r.error.code) for r in rejected)
        log.warning(Event.MALFORMED, count=len(rejected), codes=dict(codes), entry_id=rejected[0].entry_id,
                    req_id=rejected[0].req_id, error=rejected[0].error.message)
        dead = []
        for rej in rejected:
            if rej.req_id is not None and rej.client is not None:
                where = keys.parse_group_stream(rej.stream) if rej.stream else None
                reply = wire.Reply.failure(rej.req_id, rej.error, server_ms=(time.time() - rej.received) * 1000.0,
                                           epoch=None if where is None else where[0],
                                           group=None if where is None else where[1])
                reply.source = rej.source or rej.entry_id
                done.append(Done(rej.entry_id, rej.client, reply, rej.blob, rej.stream))
            else:
                dead.append(rej)
        if not dead:
            return
        await self.replier.store.dead_letter([  # each entry moved and acked, all or none
            Letter(rej.stream, keys.WORKER_GROUP, rej.entry_id, rej.payload, rej.error, consumer=self.consumer or "")
            for rej in dead])
        for rej in dead:
            self._count_dead(rej.stream)

    async def _on_claimed(self, entries: list[Entry], stream: str) -> None:
        fresh = [e for e in entries if not self.loop.holds(job_key(stream, e.id))]
        if fresh:
            self.reclaimed += len(fresh)
            RECLAIMED.labels(group=self.loop.group).inc(len(fresh))
            log.info(Event.RECLAIMED, stream=stream, count=len(fresh))
            await self.admit(fresh, stream, claimed=True)

    async def _on_dead_lettered(self, entry: Entry, error: GraftError) -> None:
        """A poison entry still owes its client a reply, when its ids can be read."""
        self.dead_lettered += 1
        req_id, client = wire.peek_ids(entry.payload) if entry.payload is not None else (None, None)
        if req_id is not None and client is not None:
            exc = error if isinstance(error, GraftError) else InternalError(str(error))
            reply = wire.Reply.failure(req_id, exc)
            # The submission, not this group entry: had a replica answered it before, this is the same answer.
            reply.source = wire.peek_source(entry.payload) or entry.id
            await self.replier.store.reply([(client, reply)])
            if entry.payload is not None and wire.peek_blob(entry.payload):
                await self.replier.store.delete([keys.blob(req_id)])

    def _count_dead(self, stream: str) -> None:
        self.dead_lettered += 1
        DEAD_LETTERS.labels(stream=stream).inc()

    # ------------------------------------------------------------------------------------ reaping

    async def reap_forever(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            delay = self.reap_interval_s
            try:
                await self.reap_once()
                backoff.reset()
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, error=repr(exc), during="reap")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def reap_once(self) -> None:
        self._retired = [r for r in self._retired if r.task is not None and not r.task.done()]
        if self.consumer is None:
            return
        held: dict[str, list[str]] = {}
        for job in self.loop.jobs.values():
            held.setdefault(job.stream, []).append(job.entry_id)
        for stream, ids in held.items():  # the streams it drains too: their jobs wait in the same queue
            if stream:
                await self._r.xclaim(stream, keys.WORKER_GROUP, self.consumer, 0, list[Any](ids), justid=True)
        for stream, reader in list(self._readers.items()):
            reader.reaper.min_idle_ms = self._min_idle_ms()
            await reader.reaper.reap_once()
            if time.monotonic() - reader.trimmed_at >= TRIM_EVERY_S:
                reader.trimmed_at = time.monotonic()
                await safe_trim(self._r, stream)
