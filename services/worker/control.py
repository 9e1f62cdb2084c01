"""The channel between a worker agent and its replica processes: msgpack messages on the child's stdin.

The agent decides, the replica executes. Each message is a complete, declarative ``Assignment``: the
consumer name to read under, the share to run at, the group the replica serves actively (its batch
size and promised latency), and every stream it must read — the active group's and those of retired
epochs it still drains. A replica applies the newest assignment at its next batch boundary; an
assignment without streams puts it back on standby (loaded, idle, ready to be handed a slot).

The pipe doubles as the replica's lifeline: when the agent dies, the kernel closes its end, the
replica reads end-of-file and stops — replicas never outlive their agent (they also ask the kernel
for SIGTERM when their parent dies, in case the pipe is inherited elsewhere).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Task:
    """The group a replica serves actively."""

    epoch: int
    group: str
    stream: str
    batch: int
    latency_ms: float  # the plan's L(B) for this group (scaled as planned)
    cuts: tuple[int, ...]
    replicas: int = 1  # the group's serving replicas in the plan (this one included)

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "group": self.group, "stream": self.stream, "batch": self.batch,
                "latency_ms": self.latency_ms, "cuts": list(self.cuts), "replicas": self.replicas}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Task:
        return cls(int(d["epoch"]), str(d["group"]), str(d["stream"]), int(d["batch"]), float(d["latency_ms"]),
                   tuple(int(c) for c in d.get("cuts", ())), max(1, int(d.get("replicas", 1))))


@dataclass(frozen=True, slots=True)
class Assignment:
    """What one replica process does now (``seq`` grows with every assignment the agent sends it)."""

    seq: int
    consumer: str | None = None  # None: standby
    share: int = 1
    active: Task | None = None
    streams: tuple[str, ...] = ()  # every stream to read: the active one first, then those it drains
    latency_scale: float = 1.0  # the plan's factor for this model (replicas measure against the raw profile)

    @property
    def standby(self) -> bool:
        return not self.streams

    @property
    def draining(self) -> tuple[str, ...]:
        return tuple(s for s in self.streams if self.active is None or s != self.active.stream)

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "assign", "seq": self.seq, "consumer": self.consumer, "share": self.share,
                "active": None if self.active is None else self.active.to_wire(), "streams": list(self.streams),
                "latency_scale": self.latency_scale}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Assignment:
        active = d.get("active")
        consumer = d.get("consumer")
        streams = tuple(str(s) for s in d.get("streams") or ())
        return cls(seq=int(d.get("seq", 0)), consumer=None if consumer is None else str(consumer),
                   share=max(1, int(d.get("share", 1))), active=None if active is None else Task.from_wire(active),
                   streams=streams, latency_scale=float(d.get("latency_scale", 1.0)))


STOP = {"kind": "stop"}


def encode(message: Mapping[str, Any]) -> bytes:
    out: bytes = msgpack.packb(dict(message), use_bin_type=True)
    return out


async def messages(reader: asyncio.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Decoded messages from ``reader`` until end-of-file (then the iteration ends)."""
    up = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES)
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return
        up.feed(chunk)
        for msg in up:
            if isinstance(msg, dict):
                yield msg


async def stdin_reader() -> asyncio.StreamReader:
    """An asyncio reader over this process's stdin (the agent's end of the control pipe)."""
    import sys

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader
