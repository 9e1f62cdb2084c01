"""``MemoryStore``: an in-memory ``Store`` (``protocol.py``) for unit tests of the serving logic.

It keeps the protocol's rules — replies exactly once per submission, acks only after what answers
an entry, deletes after acks, dead letters moved and acked together — and records what was done so
tests assert on it, as dramatiq's ``StubBroker`` keeps ``dead_letters``:

* ``streams[name]``: the payloads appended to each stream, in order (``entries`` gives their ids);
* ``replies[client]``: the replies each client received, in order;
* ``acked[(stream, group)]``: acknowledged entry ids; ``pending(stream, group)``: delivered, not acked;
* ``blob_store``: blob bytes by key, ``ttl_ms`` the TTL last set; ``deleted``: keys deleted;
* ``dead_letters``: the ``Letter`` of every entry moved there.

Failures on demand: ``down = True`` makes every call raise ``StoreUnavailable`` (nothing written);
``refuse_appends_to`` names streams whose appends are refused for good (an ``InternalError`` on the
write, like an out-of-memory Redis); ``refuse_replies_to`` the same for clients' replies.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.contract import wire
from common.contract.errors import InternalError, StoreUnavailable
from common.store.protocol import Letter, Write
from common.store.replies import submission
from common.store.streams import Entry


@dataclass
class MemoryStore:
    streams: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    replies: dict[str, list[wire.Reply]] = field(default_factory=dict)
    acked: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    blob_store: dict[str, bytes] = field(default_factory=dict)
    ttl_ms: dict[str, int] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    dead_letters: list[Letter] = field(default_factory=list)
    down: bool = False
    refuse_appends_to: set[str] = field(default_factory=set)
    refuse_replies_to: set[str] = field(default_factory=set)
    calls: int = 0  # round trips a real store would have made (one per call)
    _delivered: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _answered: set[tuple[str, str]] = field(default_factory=set)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------------ test side: producing entries

    def add(self, stream: str, payload: bytes, *, ms: int | None = None) -> str:
        """Append an entry as a producer would (its id carries ``ms``, the store's clock); its id."""
        n = next(self._ids)
        entry_id = f"{ms if ms is not None else n}-{n}"
        self.streams.setdefault(stream, []).append((entry_id, payload))
        return entry_id

    def deliver(self, stream: str, group: str, count: int = 64) -> list[Entry]:
        """Hand ``group`` the entries of ``stream`` it has not had yet (as XREADGROUP ``>`` does)."""
        seen = self._delivered.setdefault((stream, group), [])
        fresh = [(i, p) for i, p in self.streams.get(stream, []) if i not in seen][:count]
        seen.extend(i for i, _ in fresh)
        return [Entry(i, p, 1) for i, p in fresh]

    def pending(self, stream: str, group: str) -> list[str]:
        done = set(self.acked.get((stream, group), []))
        return [i for i in self._delivered.get((stream, group), []) if i not in done]

    def payloads(self, stream: str) -> list[bytes]:
        return [p for _, p in self.streams.get(stream, [])]

    # ------------------------------------------------------------------------------ the protocol

    def _call(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("the memory store is down (down = True)")

    def _send(self, client: str, reply: wire.Reply) -> bool:
        key = (client, submission(reply))
        if key in self._answered:
            return False
        self._answered.add(key)
        self.replies.setdefault(client, []).append(reply)
        return True

    async def write(self, writes: Sequence[Write]) -> None:
        self._call()
        for w in writes:
            if w.append is not None:
                stream, payload = w.append
                if stream in self.refuse_appends_to:
                    w.append_error = InternalError(f"OOM: appends to {stream} refused (refuse_appends_to)")
                else:
                    self.add(stream, payload)
            if w.reply is not None:
                client, reply, _deadline = w.reply
                if client in self.refuse_replies_to:
                    w.reply_error = InternalError(f"OOM: replies to {client} refused (refuse_replies_to)")
                else:
                    self._send(client, reply)
        for w in writes:
            if w.reply_error is not None or isinstance(w.append_error, StoreUnavailable):
                continue
            if w.ack is not None:
                stream, group, entry_id = w.ack
                self.acked.setdefault((stream, group), []).append(entry_id)
            if w.delete is not None:
                self._delete(w.delete)

    def _delete(self, key: str) -> None:
        self.blob_store.pop(key, None)
        self.deleted.append(key)

    async def reply(self, replies: Sequence[tuple[str, wire.Reply]]) -> int:
        self._call()
        return sum(self._send(client, rep) for client, rep in replies)

    async def blob_lengths(self, blobs: Sequence[tuple[str, int]]) -> list[int]:
        self._call()
        out = []
        for key, ttl_ms in blobs:
            if key in self.blob_store:
                self.ttl_ms[key] = max(1, int(ttl_ms))
            out.append(len(self.blob_store.get(key, b"")))
        return out

    async def blobs(self, keys: Sequence[str]) -> list[bytes | None]:
        self._call()
        return [self.blob_store.get(k) for k in keys]

    async def delete(self, keys: Sequence[str]) -> None:
        self._call()
        for k in keys:
            self._delete(k)

    async def dead_letter(self, letters: Sequence[Letter]) -> None:
        self._call()
        for d in letters:
            self.dead_letters.append(d)
            self.acked.setdefault((d.stream, d.group), []).append(d.entry_id)
