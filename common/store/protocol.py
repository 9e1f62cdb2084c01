"""The store as the serving path sees it: a narrow protocol, and the rules every implementation keeps.

The ingress and the replicas read entries with ``StreamConsumer`` (``streams.py``); everything they
*write* while serving goes through a ``Store``: the outcome of a batch (``write``), loose replies,
blobs, dead letters. ``RedisStore`` (``redis_store.py``) is the real one, on a single Redis or a
Redis Cluster; ``MemoryStore`` (``memory.py``) is an in-memory fake that keeps the same rules, so
the ingress's and the replica's logic is unit-tested without Redis (as httpx tests clients with
``MockTransport`` and dramatiq actors with ``StubBroker``); ``tests/test_store.py`` runs one contract
suite against both.

The rules of ``write`` (one call per batch):

1. Every ``append`` (a routed request) and every ``reply`` is written first. Replies are exactly once
   per submission (``req_id@source``, ``replies.py``): a second answer to one submission is swallowed.
2. An entry is acknowledged only after what answers it: its ``ack`` is not applied when its reply
   failed, or its append failed because the store was unreachable. An append refused for good (Redis
   out of memory, a key of the wrong type) is acknowledged: the caller answers that request itself
   (``append_error`` says why), so nothing is acknowledged unanswered. (Where one ordered round trip
   can carry it all — a single Redis — the ack follows its reply's command without waiting for its
   result; a reply refused for good is still reported on ``reply_error``.)
3. A ``delete`` (a request's blob) comes after its entry's ack and, like it, is skipped when the reply
   failed: a replica that crashes first, or a reaper that reclaims the entry, can still read it.
4. Failures of a single command are reported on its ``Write`` (``append_error``, ``reply_error``) as
   ``GraftError``s; when the store cannot be reached at all, ``write`` raises ``StoreUnavailable``
   and nothing may be assumed written — the entries stay pending and are handled again (rule 1 makes
   that safe). No redis-py error crosses this boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.contract import wire
from common.contract.errors import GraftError


@dataclass(slots=True)
class Write:
    """What one entry of a batch asks of the store, and what became of it."""

    ack: tuple[str, str, str] | None = None  # (stream, consumer group, entry id) to acknowledge
    append: tuple[str, bytes] | None = None  # (stream, payload): a request routed on
    reply: tuple[str, wire.Reply, float | None] | None = None  # (client, reply, the request's deadline)
    delete: str | None = None  # a key (the request's blob) to delete once it is answered
    append_error: GraftError | None = None
    reply_error: GraftError | None = None

    @property
    def written(self) -> bool:
        return self.append_error is None and self.reply_error is None


@dataclass(frozen=True, slots=True)
class Letter:
    """An entry moved to its stream's dead letters (``keys.dead_letters``) and acknowledged, atomically."""

    stream: str
    group: str
    entry_id: str
    payload: bytes | None
    error: GraftError
    deliveries: int = 0
    consumer: str = ""


class Store(Protocol):
    async def write(self, writes: Sequence[Write]) -> None:
        """Apply a batch's writes by the rules of the module docstring."""
        ...

    async def reply(self, replies: Sequence[tuple[str, wire.Reply]]) -> int:
        """Send ``(client, reply)`` pairs (exactly once per submission); how many were new."""
        ...

    async def blob_lengths(self, blobs: Sequence[tuple[str, int]]) -> list[int]:
        """The length of each ``(key, ttl_ms)`` blob (0: missing), and its TTL set to ``ttl_ms``."""
        ...

    async def blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        """The bytes of each blob (None where it is gone)."""
        ...

    async def delete(self, keys: Sequence[str]) -> None: ...

    async def dead_letter(self, letters: Sequence[Letter]) -> None:
        """Move each entry to the dead letters and acknowledge it: each letter all or nothing."""
        ...
