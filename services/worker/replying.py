"""A replica's way out: the replies of a batch, the acks of its entries and the deletion of its blobs,
as one store write (``common.store.protocol``: a request's blob goes only after its reply and its ack,
so a replica that crashes first — or a reaper that reclaims the entry — can still read it).

The write is retried while the store is unreachable: replies are exactly once per submission, acks and
deletions are idempotent. A batch whose replies cannot be sent after ``RETRIES`` attempts stays pending
under the replica's consumer name and is re-read when it reconnects (or reclaimed by a sibling).
"""

from __future__ import annotations

import asyncio

import structlog

from common.contract import keys
from common.contract.errors import StoreUnavailable
from common.logs import Event
from common.store.connection import Backoff
from common.store.protocol import Store, Write
from services.worker.loop import Done

log = structlog.get_logger("worker.replying")

RETRIES = 5


class Replier:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent = 0

    async def __call__(self, done: list[Done]) -> None:
        if not done:
            return
        backoff = Backoff(base=0.05, cap=1.0)
        for attempt in range(RETRIES):
            writes = [Write(ack=(d.stream, keys.WORKER_GROUP, d.entry_id) if d.stream else None,
                            reply=(d.client, d.reply, d.deadline) if d.client is not None else None,
                            delete=d.blob) for d in done]
            try:
                await self.store.write(writes)
            except StoreUnavailable as exc:
                log.warning(Event.REDIS_RECONNECT, error=repr(exc), during="reply", attempt=attempt + 1)
                await asyncio.sleep(backoff.next())
                continue
            failed = [w for w in writes if w.reply_error is not None]
            if failed:  # left pending by the store: re-read or reclaimed, answered then
                log.error("replies_not_written", count=len(failed), error=repr(failed[0].reply_error))
            self.sent += len(done) - len(failed)
            return
        log.error("replies_not_sent", count=len(done), streams=sorted({d.stream for d in done}))
