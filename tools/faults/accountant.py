"""The reply accountant: what was sent, what came back, judged on the Redis clock, trusting no SDK.

Every request the fault suite sends is recorded here (``record``): its ``req_id`` (unique per
submission), client, intended send time and budget, and the id Redis gave its ``graft:ingress`` entry
(None when the XADD itself failed: never accepted). Replies are read raw — ``XRANGE`` of each client's
reply stream after the run (``collect``), and, where Redis may lose acknowledged writes, also as they
arrive (``tail``) — so a second reply to one submission is seen and counted, never swallowed.

Times are Redis-clock milliseconds at both ends: a request's intended send time is this host's intended
time shifted by the offset to the Redis ``TIME`` (``clock_offset_ms``), a reply's time is the
millisecond part of its reply-stream entry id. Per request (``judge``):

* **ok in budget** — an OK reply no later than intended + budget;
* **lost** — no reply at all no later than intended + budget + ``grace_ms`` (1 s): a reply after that
  is one the client has given up on (counted as ``late`` too);
* **duplicated** — more than one reply entry for the submission.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from common.contract import keys
from common.store.backlog import id_ms
from common.store.cluster import is_cluster
from common.store.connection import Client

GRACE_MS = 1000.0
PAGE = 1000


def _sid(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def clock_offset_ms(r: Client) -> float:
    """Redis ``TIME`` minus this host's ``time.time()``, in ms (midpoint of the round trip)."""
    best: tuple[float, float] | None = None
    for _ in range(5):
        t0 = time.time()
        sec, usec = await r.time()
        t1 = time.time()
        rtt = t1 - t0
        off = (int(sec) + int(usec) / 1e6 - (t0 + t1) / 2.0) * 1000.0
        if best is None or rtt < best[0]:
            best = (rtt, off)
    assert best is not None
    return best[1]


@dataclass(slots=True)
class Sent:
    req_id: str
    client: str
    intended_ms: float  # Redis clock
    budget_ms: float
    entry_id: str | None  # the graft:ingress (or group stream) entry; None: the XADD failed
    tag: str = ""
    send_error: str | None = None


@dataclass(slots=True)
class Seen:
    """One reply entry as it lies in a reply stream."""

    entry_id: str
    ms: int
    req_id: str | None
    ok: bool
    code: str
    source: str | None


def parse_reply(entry_id: str, payload: Any) -> Seen:
    """Read a reply entry leniently: a garbled one still counts (with code ``UNREADABLE``)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        obj = None
    if not isinstance(obj, dict):
        return Seen(entry_id, id_ms(entry_id), None, False, "UNREADABLE", None)
    ok = obj.get("ok") is True
    err = obj.get("error")
    code = "OK" if ok else str(err.get("code")) if isinstance(err, dict) else "UNREADABLE"
    rid = obj.get("req_id")
    src = obj.get("source")
    return Seen(entry_id, id_ms(entry_id), rid if isinstance(rid, str) else None, ok, code,
                src if isinstance(src, str) else None)


@dataclass
class Verdict:
    """The account of a set of requests (one scenario, or one window of it)."""

    sent: int = 0
    not_accepted: int = 0  # the XADD failed: the client knows at once, nothing to answer
    ok: int = 0
    ok_in_budget: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # code of the first reply, OK excluded
    lost: int = 0
    late: int = 0  # answered, but only after budget + grace (counted in lost)
    duplicated: int = 0
    unknown_replies: int = 0  # reply entries for no request we sent
    lost_ids: list[str] = field(default_factory=list)
    dup_ids: list[str] = field(default_factory=list)
    dup_examples: list[str] = field(default_factory=list)  # the first few: each reply's code, time, source
    latencies_ms: list[float] = field(default_factory=list)  # first reply − intended, answered ones

    @property
    def accepted(self) -> int:
        return self.sent - self.not_accepted

    @property
    def ok_in_budget_pct(self) -> float:
        return 100.0 * self.ok_in_budget / self.accepted if self.accepted else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "accepted": self.accepted, "not_accepted": self.not_accepted, "ok": self.ok,
                "ok_in_budget": self.ok_in_budget, "ok_in_budget_pct": round(self.ok_in_budget_pct, 3),
                "errors": dict(sorted(self.errors.items())), "lost": self.lost, "late": self.late,
                "duplicated": self.duplicated, "unknown_replies": self.unknown_replies,
                "lost_ids": self.lost_ids[:20], "dup_ids": self.dup_ids[:20],
                "dup_examples": self.dup_examples}


class Accountant:
    def __init__(self, grace_ms: float = GRACE_MS) -> None:
        self.grace_ms = grace_ms
        self.sent: dict[str, Sent] = {}
        self.clients: set[str] = set()
        # (client, entry id, digest of the payload) → reply: the same entry read twice (tail and XRANGE)
        # counts once; an entry id Redis re-issued after losing writes, with another payload, counts apart.
        self.seen: dict[tuple[str, str, str], Seen] = {}
        self._last: dict[str, str] = {}
        self._by_req: dict[str, list[Seen]] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------------------------------ sending

    def record(self, s: Sent) -> None:
        if s.req_id in self.sent:
            raise ValueError(f"req_id {s.req_id!r} recorded twice: every submission needs its own")
        self.sent[s.req_id] = s
        self.clients.add(s.client)

    def watch(self, client: str) -> None:
        """Read ``client``'s reply stream too (requests recorded later, or sent by hand)."""
        self.clients.add(client)

    # ---------------------------------------------------------------------------------- replies

    def add_raw(self, client: str, entry_id: Any, fields: Any) -> None:
        eid = _sid(entry_id)
        payload = fields.get(keys.FIELD) if isinstance(fields, dict) else None
        if payload is None and isinstance(fields, dict):
            payload = fields.get(keys.FIELD.decode())
        digest = hashlib.blake2b(payload if isinstance(payload, bytes) else b"", digest_size=8).hexdigest()
        k = (client, eid, digest)
        if k not in self.seen:
            seen = self.seen[k] = parse_reply(eid, payload)
            if seen.req_id is not None:
                self._by_req.setdefault(seen.req_id, []).append(seen)
                waiter = self._waiters.pop(seen.req_id, None)
                if waiter is not None:
                    waiter.set()

    def replies_of(self, req_id: str) -> list[Seen]:
        """The reply entries seen so far for ``req_id``."""
        return self._by_req.get(req_id, [])

    async def first_reply(self, req_id: str, timeout_s: float) -> Seen | None:
        """The first reply to ``req_id`` once ``tail`` has read it (None after ``timeout_s``): no polling."""
        if not self._by_req.get(req_id):
            waiter = self._waiters.setdefault(req_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), timeout_s)
            self._waiters.pop(req_id, None)
        got = self._by_req.get(req_id)
        return got[0] if got else None

    async def collect(self, r: Client) -> int:
        """XRANGE every watched client's whole reply stream; returns the entries read."""
        n = 0
        for client in sorted(self.clients):
            stream = keys.reply_stream(client)
            start = "-"
            while True:
                rows = list(await r.xrange(stream, min=start, max="+", count=PAGE) or [])
                for eid, fields in rows:
                    self.add_raw(client, eid, fields)
                n += len(rows)
                if len(rows) < PAGE:
                    break
                last = _sid(rows[-1][0])
                ms, _, seq = last.partition("-")
                start = f"{ms}-{int(seq) + 1}"
        return n

    async def tail(self, r: Client, stop: asyncio.Event, *, block_ms: int = 100) -> None:
        """Read replies as they come (XREAD of every watched stream), until ``stop``; survives Redis
        going away (it retries) — for scenarios where Redis may lose writes it acknowledged."""
        while not stop.is_set():
            streams = {keys.reply_stream(c): self._last.get(c, "0-0") for c in sorted(self.clients)}
            if not streams:
                await asyncio.sleep(0.05)
                continue
            resp: Any
            try:
                if is_cluster(r):  # reply streams live on different slots: one read per stream, together
                    parts = await asyncio.gather(*(r.xread({k: v}, block=block_ms, count=PAGE)
                                                   for k, v in streams.items()))
                    resp = [row for part in parts for row in (part or [])]
                else:
                    resp = await r.xread(dict[Any, Any](streams), block=block_ms, count=PAGE)
            except Exception:  # Redis restarting: try again shortly
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)
                continue
            for raw_stream, rows in resp or []:
                name = _sid(raw_stream)
                client = name[len(keys.reply_stream("")) - 1:-1]
                for eid, fields in rows:
                    self.add_raw(client, eid, fields)
                    self._last[client] = _sid(eid)

    def replies_by_req(self) -> dict[str, list[Seen]]:
        out: dict[str, list[Seen]] = {}
        for seen in self.seen.values():
            if seen.req_id is not None:
                out.setdefault(seen.req_id, []).append(seen)
        for lst in out.values():
            lst.sort(key=lambda s: (s.ms, s.entry_id))
        return out

    # ---------------------------------------------------------------------------------- judging

    def judge(self, req_ids: Iterable[str] | None = None) -> Verdict:
        """The verdict over ``req_ids`` (default: everything sent)."""
        by_req = self.replies_by_req()
        ids = list(self.sent) if req_ids is None else list(req_ids)
        v = Verdict()
        for rid in ids:
            s = self.sent[rid]
            v.sent += 1
            if s.entry_id is None:
                v.not_accepted += 1
                continue
            got = by_req.get(rid, [])
            if len(got) > 1:
                v.duplicated += 1
                v.dup_ids.append(rid)
                if len(v.dup_examples) < 10:
                    v.dup_examples.append(f"{rid} (entry {s.entry_id}): " + "; ".join(
                        f"{g.code} at +{g.ms - s.intended_ms:.0f} ms, source {g.source}, reply {g.entry_id}"
                        for g in got))
            if not got:
                v.lost += 1
                v.lost_ids.append(rid)
                continue
            first = got[0]
            latency = first.ms - s.intended_ms
            v.latencies_ms.append(latency)
            if latency > s.budget_ms + self.grace_ms:
                v.lost += 1
                v.late += 1
                v.lost_ids.append(rid)
            if first.ok:
                v.ok += 1
                if latency <= s.budget_ms:
                    v.ok_in_budget += 1
            else:
                v.errors[first.code] += 1
        mine = set(self.sent)
        v.unknown_replies = sum(1 for seen in self.seen.values() if seen.req_id not in mine)
        return v

    def breakdown(self, req_ids: Iterable[str]) -> dict[str, dict[str, float]]:
        """Where the time went, per outcome (``ok``, ``ok-late``, or the error code): how many, and the
        median / p99 of the send lag (entry id − intended: the producer's own delay) and of the server
        span (reply − entry id: queueing and service inside Graft)."""
        by_req = self.replies_by_req()
        spans: dict[str, tuple[list[float], list[float]]] = {}
        for rid in req_ids:
            s = self.sent[rid]
            got = by_req.get(rid)
            if s.entry_id is None or not got:
                continue
            first, entered = got[0], id_ms(s.entry_id)
            kind = (first.code or "?") if not first.ok else ("ok" if first.ms - s.intended_ms <= s.budget_ms else "ok-late")
            lag, server = spans.setdefault(kind, ([], []))
            lag.append(entered - s.intended_ms)
            server.append(first.ms - entered)

        def pct(xs: list[float], q: float) -> float:
            xs = sorted(xs)
            return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)

        return {k: {"n": len(lag), "send_lag_p50_ms": pct(lag, 0.5), "send_lag_p99_ms": pct(lag, 0.99),
                    "server_p50_ms": pct(srv, 0.5), "server_p99_ms": pct(srv, 0.99)}
                for k, (lag, srv) in sorted(spans.items())}

    def send_errors(self, req_ids: Iterable[str]) -> dict[str, int]:
        """Why the XADDs that failed failed (the error's first 80 characters), most common first."""
        counts = Counter((self.sent[rid].send_error or "")[:80] for rid in req_ids if self.sent[rid].send_error)
        return dict(counts.most_common())

    def timeline(self, req_ids: Iterable[str], step_ms: float = 1000.0) -> list[dict[str, int]]:
        """Outcomes per ``step_ms`` of intended send time (``ok``, ``ok-late``, an error code, ``none``):
        whether misses cluster at the start of a load (a transient) or run through it."""
        by_req = self.replies_by_req()
        rows = [(self.sent[rid], by_req.get(rid)) for rid in req_ids]
        if not rows:
            return []
        t0 = min(s.intended_ms for s, _ in rows)
        out: list[Counter[str]] = []
        for s, got in rows:
            k = int((s.intended_ms - t0) // step_ms)
            while len(out) <= k:
                out.append(Counter())
            first = got[0] if got else None
            out[k][("ok" if first.ms - s.intended_ms <= s.budget_ms else "ok-late") if first is not None and first.ok
                   else first.code if first is not None else "none"] += 1
        return [dict(c) for c in out]

    def sent_between(self, start_ms: float, end_ms: float) -> list[str]:
        return [rid for rid, s in self.sent.items() if start_ms <= s.intended_ms < end_ms]

    def ok_times(self) -> list[int]:
        """Redis times (ms) of every OK reply to a request we sent, sorted."""
        mine = set(self.sent)
        return sorted(s.ms for s in self.seen.values() if s.ok and s.req_id in mine)


def longest_gap_ms(times: list[int], start_ms: float, end_ms: float) -> float:
    """The longest stretch within [start, end] with no OK reply (the edges count as replies)."""
    inside = [t for t in times if start_ms <= t <= end_ms]
    marks = [start_ms, *inside, end_ms]
    return max((b - a for a, b in itertools.pairwise(marks)), default=0.0)
