"""One batch of ``graft:ingress`` entries on its way out: an outcome per entry, one pipelined write.

Each entry read becomes an ``Outcome``: routed to a group stream, refused with an error reply to its
client, or — when no client can be read from it — dead-lettered. ``Batch`` collects the outcomes and
writes them all in one pipelined round trip: an XADD per routed request, an error reply per refusal
(``ReplySender``: exactly once per submission) and the deletion of a refused request's blob, then
one XACK for the whole batch. ``settle`` reads the pipeline's answers back per outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.contract import keys, wire
from common.contract.errors import GraftError
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

    @property
    def routed(self) -> bool:
        return self.stream is not None and self.failure is None

    @property
    def malformed(self) -> bool:
        return self.error is not None and self.ids is None


@dataclass
class Batch:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    async def write(self, r: Any, replies: ReplySender, *, epoch: int | None) -> None:
        """Every routing, reply, blob deletion and the XACK of the batch, in one round trip."""
        async with r.pipeline(transaction=False) as pipe:
            for o in self.outcomes:
                if o.stream is not None and o.request is not None:
                    # No MAXLEN: replicas trim only what the workers' group is done with (safe_trim).
                    pipe.xadd(o.stream, {keys.FIELD: wire.encode_request(o.request)})
                    o.position = len(pipe.command_stack) - 1
                elif o.error is not None and o.ids is not None:
                    req_id, client = o.ids
                    o.reply = wire.Reply.failure(req_id, o.error, epoch=epoch)
                    o.reply.source = o.entry.id
                    await replies.add(pipe, client, o.reply, o.request.deadline if o.request is not None else None)
                    if o.blob:
                        pipe.delete(keys.blob(req_id))
            # A malformed entry is acked by its dead-lettering (XADD + XACK in one MULTI), never before.
            answered = [o.entry.id for o in self.outcomes if not o.malformed]
            if answered:
                pipe.xack(keys.INGRESS, keys.INGRESS_GROUP, *answered)
            results = await pipe.execute(raise_on_error=False)
        for o in self.outcomes:
            if o.position >= 0 and isinstance(results[o.position], Exception):
                o.failure = results[o.position]

    @property
    def routed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.routed]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failure is not None]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.reply is not None]

    @property
    def malformed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.malformed]
