"""``RedisStore``: the serving path's ``Store`` (``protocol.py``) on a single Redis or a Redis Cluster.

On a single Redis a batch's writes are one pipelined round trip, in order: appends, replies (one
script call per client), acks, deletes — a pipeline keeps its order on one connection, and Redis runs
it whatever the client does next. On a Redis Cluster the group streams, reply streams and the entries'
own streams live on different slots, and a cluster pipeline runs each node's part independently; so
the acks and deletes are a second round trip, for the entries whose writes succeeded (rule 2 of the
protocol: an entry whose reply could not be written, or whose append met a master that was down,
stays pending and is handled again).

redis-py's connection, timeout and cluster-down errors are translated here, once, into
``StoreUnavailable``; a command refused for good becomes an ``InternalError`` on its ``Write``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from common.contract import keys, wire
from common.contract.errors import GraftError, InternalError, StoreUnavailable
from common.logs import Event, get_logger
from common.store.cluster import is_cluster
from common.store.connection import TRANSIENT, Client
from common.store.protocol import Letter, Write
from common.store.replies import ReplySender, group_by_client
from common.store.streams import DEAD_LETTER_MAXLEN, dead_letter_fields

log = get_logger(__name__)

# What redis-py raises when the store cannot be reached (TRANSIENT holds our StoreUnavailable too).
_DOWN: tuple[type[Exception], ...] = tuple(e for e in TRANSIENT if e is not StoreUnavailable)


def store_error(exc: BaseException) -> GraftError:
    """Our error for one of redis-py's: ``StoreUnavailable`` when Redis is unreachable, else internal."""
    if isinstance(exc, GraftError):
        return exc
    if isinstance(exc, _DOWN):
        return StoreUnavailable(f"Redis is unreachable: {exc!r}")
    return InternalError(f"Redis refused the write: {exc}")


@contextmanager
def unavailable_as_ours() -> Iterator[None]:
    """Raise ``StoreUnavailable`` in place of redis-py's connection, timeout and cluster-down errors."""
    try:
        yield
    except _DOWN as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc!r}") from exc


class RedisStore:
    def __init__(self, r: Client) -> None:
        self.r = r
        self.sender = ReplySender(r)

    async def write(self, writes: Sequence[Write]) -> None:
        split = is_cluster(self.r)
        by_client = group_by_client(w.reply for w in writes if w.reply is not None)
        with unavailable_as_ours():
            async with self.r.pipeline(transaction=False) as pipe:
                appended: list[tuple[int, Write]] = []
                for w in writes:
                    if w.append is not None:
                        stream, payload = w.append
                        # No MAXLEN: a length cap would drop entries nobody has read yet, unanswered;
                        # readers trim only what their group is done with (safe_trim).
                        pipe.xadd(stream, {keys.FIELD: payload})
                        appended.append((len(pipe) - 1, w))
                replied: dict[str, int] = {}
                for client, items in by_client.items():
                    await self.sender.add_many(pipe, client, items)
                    replied[client] = len(pipe) - 1
                if not split:
                    self._finish(pipe, writes, everything=True)
                results = await pipe.execute(raise_on_error=False)
            for at, w in appended:
                if isinstance(results[at], Exception):
                    w.append_error = store_error(results[at])
            for w in writes:
                if w.reply is not None and isinstance(results[replied[w.reply[0]]], Exception):
                    w.reply_error = store_error(results[replied[w.reply[0]]])
            if split:
                async with self.r.pipeline(transaction=False) as pipe:
                    if self._finish(pipe, writes, everything=False):
                        await pipe.execute()

    @staticmethod
    def _finish(pipe: Any, writes: Sequence[Write], *, everything: bool) -> int:
        """Queue the acks (one XACK per stream and group), then the deletes; how many commands."""
        acks: dict[tuple[str, str], list[str]] = {}
        deletes: list[str] = []
        for w in writes:
            if not everything and (w.reply_error is not None or isinstance(w.append_error, StoreUnavailable)):
                continue  # left pending: handled again, never acknowledged unanswered
            if w.ack is not None:
                stream, group, entry_id = w.ack
                acks.setdefault((stream, group), []).append(entry_id)
            if w.delete is not None:
                deletes.append(w.delete)
        for (stream, group), ids in acks.items():
            pipe.xack(stream, group, *ids)
        if deletes:
            pipe.delete(*deletes)
        return len(acks) + (1 if deletes else 0)

    async def reply(self, replies: Sequence[tuple[str, wire.Reply]]) -> int:
        with unavailable_as_ours():
            return await self.sender.send_many(replies)

    async def blob_lengths(self, blobs: Sequence[tuple[str, int]]) -> list[int]:
        if not blobs:
            return []
        with unavailable_as_ours():
            async with self.r.pipeline(transaction=False) as pipe:
                for key, ttl_ms in blobs:
                    pipe.strlen(key)
                    pipe.pexpire(key, max(1, int(ttl_ms)))
                answers = await pipe.execute(raise_on_error=False)
        lengths = answers[0::2]
        for res in lengths:
            if isinstance(res, Exception):
                raise store_error(res)
        return [int(n) for n in lengths]

    async def blobs(self, keys_: Sequence[str]) -> list[bytes | None]:
        if not keys_:
            return []
        with unavailable_as_ours():
            async with self.r.pipeline(transaction=False) as pipe:
                for key in keys_:
                    pipe.get(key)
                got: list[Any] = await pipe.execute(raise_on_error=False)
        for res in got:
            if isinstance(res, Exception):
                raise store_error(res)
        return got

    async def delete(self, keys_: Sequence[str]) -> None:
        if keys_:
            with unavailable_as_ours():
                await self.r.delete(*keys_)

    async def dead_letter(self, letters: Sequence[Letter]) -> None:
        if not letters:
            return
        now_ms = int(time.time() * 1000)
        with unavailable_as_ours():
            # One MULTI per stream (a cluster transaction stays on one slot): each entry moved and acked.
            by_stream: dict[str, list[Letter]] = {}
            for letter in letters:
                by_stream.setdefault(letter.stream, []).append(letter)
            for stream, group in by_stream.items():
                async with self.r.pipeline(transaction=True) as pipe:
                    for d in group:
                        fields = dead_letter_fields(d.stream, d.group, d.entry_id, d.payload, d.error,
                                                    deliveries=d.deliveries, consumer=d.consumer, time_ms=now_ms)
                        pipe.xadd(keys.dead_letters(stream), fields,  # type: ignore[arg-type]
                                  maxlen=DEAD_LETTER_MAXLEN, approximate=True)
                        pipe.xack(stream, d.group, d.entry_id)
                    await pipe.execute()
        first = letters[0]
        log.warning(Event.DEAD_LETTERED, stream=first.stream, group=first.group, count=len(letters),
                    entry_id=first.entry_id, code=str(first.error.code), error=first.error.message,
                    deliveries=first.deliveries)
