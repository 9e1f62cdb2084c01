"""One batch of ingress entries (of one shard's stream) on its way out: an outcome per entry, then the writes.

Each entry read becomes an ``Outcome``: routed to a group stream, refused with an error reply to its
client, or — when no client can be read from it — dead-lettered. ``Batch`` collects the outcomes and
writes them: an XADD per routed request, the error replies of the refusals (one command per client:
``ReplySender``, exactly once per submission), the deletion of a refused request's blob, and one XACK on
the batch's own shard stream. On a single Redis that is one pipelined round trip, in order. On a Redis Cluster the group
streams, the reply streams and the shard are on different slots, and a cluster pipeline runs each
node's part independently; so the XACK is a second round trip, for the entries whose writes
succeeded: an entry whose route or reply could not be written (a master down) stays pending and is
handled again — never acked unanswered. ``settle`` reads the answers back per outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.contract import keys, wire
from common.contract.errors import GraftError
from common.store.cluster import is_cluster
from common.store.connection import TRANSIENT
from common.store.replies import ReplySender
from common.store.streams import Entry


@dataclass(slots=True)
class Outcome:
    entry: Entry
    request: wire.Request | None = None  # set when valid
    stream: str | None = None  # where it was routed
    gid: str | None = None
    error: GraftError | None = None  # why it was refused
    ids: tuple[str, str] | None = None  # (req_id, client) to answer a refusal; None: dead-letter it
    reply: wire.Reply | None = None
    blob: bool = False  # a refused request whose blob must go
    position: int = -1  # its command in the pipeline
    failure: Exception | None = None  # the routing write failed (answered afterwards)
    reply_at: int = -1  # its error reply's command in the pipeline
    unwritten: Exception | None = None  # cluster: its reply could not be written; left pending, not acked

    @property
    def routed(self) -> bool:
        return self.stream is not None and self.failure is None

    @property
    def malformed(self) -> bool:
        return self.error is not None and self.ids is None


@dataclass
class Batch:
    stream: str = keys.INGRESS  # the ingress shard every entry of the batch was read from
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    async def write(self, r: Any, replies: ReplySender, *, epoch: int | None) -> None:
        """Every routing, reply, blob deletion and the XACK of the batch: one round trip (two on a cluster)."""
        cluster = is_cluster(r)
        blobs: list[str] = []
        refused: dict[str, list[Outcome]] = {}  # by client: one reply command per client, not per refusal
        async with r.pipeline(transaction=False) as pipe:
            for o in self.outcomes:
                if o.stream is not None and o.request is not None:
                    # No MAXLEN: replicas trim only what the workers' group is done with (safe_trim).
                    pipe.xadd(o.stream, {keys.FIELD: wire.encode_request(o.request)})
                    o.position = len(pipe) - 1
                elif o.error is not None and o.ids is not None:
                    req_id, client = o.ids
                    o.reply = wire.Reply.failure(req_id, o.error, epoch=epoch)
                    o.reply.source = o.entry.id
                    refused.setdefault(client, []).append(o)
                    if o.blob:
                        blobs.append(keys.blob(req_id))
            for client, group in refused.items():
                await replies.add_many(pipe, client, [(o.reply, o.request.deadline if o.request is not None else None)
                                                      for o in group if o.reply is not None])
                for o in group:
                    o.reply_at = len(pipe) - 1
            if not cluster:
                for blob in blobs:
                    pipe.delete(blob)
                # A malformed entry is acked by its dead-lettering (XADD + XACK in one MULTI), never before.
                answered = [o.entry.id for o in self.outcomes if not o.malformed]
                if answered:
                    pipe.xack(self.stream, keys.INGRESS_GROUP, *answered)
            results = await pipe.execute(raise_on_error=False)
        for o in self.outcomes:
            if o.position >= 0 and isinstance(results[o.position], Exception):
                o.failure = results[o.position]
            if cluster and o.reply_at >= 0 and isinstance(results[o.reply_at], Exception):
                o.unwritten = results[o.reply_at]
        if cluster:
            await self._ack_written(r, blobs)

    async def _ack_written(self, r: Any, blobs: list[str]) -> None:
        """Cluster: XACK what was written (a route that failed for good is acked too: ``settle`` answers
        it), and delete the blobs of the refusals whose replies were written."""
        done = [o.entry.id for o in self.outcomes if not o.malformed and o.unwritten is None
                and not isinstance(o.failure, TRANSIENT)]
        written = {keys.blob(o.ids[0]) for o in self.outcomes if o.blob and o.ids and o.unwritten is None}
        gone = [blob for blob in blobs if blob in written]
        if not done and not gone:
            return
        async with r.pipeline(transaction=False) as pipe:
            if done:
                pipe.xack(self.stream, keys.INGRESS_GROUP, *done)
            for blob in gone:
                pipe.delete(blob)
            await pipe.execute()

    @property
    def routed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.routed]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failure is not None]

    @property
    def unwritten(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.unwritten is not None]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.reply is not None and o.unwritten is None]

    @property
    def malformed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.malformed]
