"""A replica's way out: the replies of a batch, the XACKs of its entries and its blobs, in one round trip
(two on a Redis Cluster, whose pipelines do not order nodes: the XACKs and deletions after the replies).

In that order: a request's blob goes only after its reply and its ack, so a replica that crashes
first — or a reaper that reclaims the entry — can still read it. The pipeline is retried on a lost
connection: replies are idempotent per submission (``ReplySender``), XACK and DEL are too. A batch
whose replies cannot be sent after ``RETRIES`` attempts stays pending under the replica's consumer
name and is re-read when it reconnects (or reclaimed by a sibling).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog

from common.contract import keys
from common.logs import Event
from common.store.cluster import is_cluster
from common.store.connection import TRANSIENT, Backoff
from common.store.replies import ReplySender, group_by_client
from services.worker.loop import Done

log = structlog.get_logger("worker.replying")

RETRIES = 5


class Replier:
    def __init__(self, r: Any) -> None:
        self._r = r
        self.sender = ReplySender(r)
        self.sent = 0

    async def __call__(self, done: list[Done]) -> None:
        if not done:
            return
        backoff = Backoff(base=0.05, cap=1.0)
        acks: dict[str, list[str]] = defaultdict(list)
        for d in done:
            acks[d.stream].append(d.entry_id)
        blobs = [d.blob for d in done if d.blob is not None]
        # One reply command per client of the batch (a phone's or a gateway's requests answered together).
        by_client = group_by_client((d.client, d.reply, d.deadline) for d in done if d.client is not None)
        for attempt in range(RETRIES):
            try:
                # A cluster pipeline runs each node's commands independently: there the XACKs and blob
                # deletions wait for the replies in a second round trip, so no entry is acked unanswered.
                split = is_cluster(self._r)
                async with self._r.pipeline(transaction=False) as pipe:
                    for client, items in by_client.items():
                        await self.sender.add_many(pipe, client, items)
                    if not split:
                        self._ack(pipe, acks, blobs)
                    await pipe.execute()
                if split:
                    async with self._r.pipeline(transaction=False) as pipe:
                        self._ack(pipe, acks, blobs)
                        await pipe.execute()
                self.sent += len(done)
                return
            except TRANSIENT as exc:
                log.warning(Event.REDIS_RECONNECT, error=repr(exc), during="reply", attempt=attempt + 1)
                await asyncio.sleep(backoff.next())
        log.error("replies_not_sent", count=len(done), streams=sorted(acks))

    @staticmethod
    def _ack(pipe: Any, acks: dict[str, list[str]], blobs: list[str]) -> None:
        for stream, ids in acks.items():
            if stream:
                pipe.xack(stream, keys.WORKER_GROUP, *ids)
        if blobs:
            pipe.delete(*blobs)
