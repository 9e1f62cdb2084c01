"""One batch of ingress entries (of one shard's stream) on its way out: an outcome per entry, then the writes.

Each entry read becomes an ``Outcome``: routed to a group stream, refused with an error reply to its
client, or — when no client can be read from it — dead-lettered. ``Batch`` collects the outcomes and
hands them to the store as one ``write`` (``common.store.protocol``): an append per routed request,
the error reply of each refusal (exactly once per submission), the deletion of a refused request's
blob, and the ack of every entry on the batch's own shard stream — acknowledged only after what
answers it (an entry whose reply could not be written stays pending and is handled again). ``settle``
in the service reads the results back per outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.contract import keys, wire
from common.contract.errors import GraftError
from common.store.protocol import Store, Write
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
    write: Write | None = None  # what it asked of the store, and what became of it

    @property
    def failure(self) -> GraftError | None:
        """Why its routing could not be written (None: routed, or nothing to route)."""
        return None if self.write is None else self.write.append_error

    @property
    def unwritten(self) -> GraftError | None:
        """Why its error reply could not be written (its entry was left pending)."""
        return None if self.write is None else self.write.reply_error

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

    async def write(self, store: Store, *, epoch: int | None) -> None:
        """Every routing, reply, blob deletion and ack of the batch, as one store write."""
        writes: list[Write] = []
        for o in self.outcomes:
            if o.malformed:
                continue  # acked by its dead-lettering (moved and acked together), never before
            w = o.write = Write(ack=(self.stream, keys.INGRESS_GROUP, o.entry.id))
            if o.stream is not None and o.request is not None:
                w.append = (o.stream, wire.encode_request(o.request))
            elif o.error is not None and o.ids is not None:
                req_id, client = o.ids
                o.reply = wire.Reply.failure(req_id, o.error, epoch=epoch)
                o.reply.source = o.entry.id
                w.reply = (client, o.reply, o.request.deadline if o.request is not None else None)
                if o.blob:
                    w.delete = keys.blob(req_id)
            writes.append(w)
        await store.write(writes)

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
