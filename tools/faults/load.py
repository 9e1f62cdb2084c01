"""Open-loop load for the fault suite: raw XADDs at intended times, every request recorded.

No SDK on this path: the sender builds each envelope (``wire.encode_request``: msgpack, a fresh
``req_id`` per submission), XADDs whatever is due in one pipeline, and records each request in the
``Accountant`` with its intended send time on the Redis clock and the entry id Redis gave it (or the
error of a failed XADD). A generator that falls behind keeps the intended times: its lateness counts
against the system, as a user would see it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from common.contract import keys, wire
from common.model import zoo
from common.store.connection import Client
from tools.faults.accountant import Accountant, Sent, clock_offset_ms
from tools.loadgen import Arrival, RequestClass, collections_deferred, mix_arrivals

_COUNTER = itertools.count()


def new_req_id(prefix: str) -> str:
    return f"{prefix}-{next(_COUNTER)}-{time.time_ns() % 10**9}"


class Load:
    """Sends requests for ``acct`` from ``clients`` (round robin) to ``stream`` (default graft:ingress)."""

    def __init__(self, r: Client, acct: Accountant, *, clients: Sequence[str], resolution: int | None,
                 stream: str = keys.INGRESS, seed: int = 0) -> None:
        self.r, self.acct, self.clients, self.stream = r, acct, list(clients), stream
        self.resolution = resolution
        self._rng = np.random.default_rng(seed)
        self._tensors: dict[tuple[str, int], npt.NDArray[np.float32]] = {}
        self._next_client = itertools.cycle(self.clients)
        self.offset_ms = 0.0

    async def start(self) -> Load:
        self.offset_ms = await clock_offset_ms(self.r)
        for c in self.clients:
            self.acct.watch(c)
        return self

    def tensor(self, model: str, cut: int) -> npt.NDArray[np.float32]:
        t = self._tensors.get((model, cut))
        if t is None:
            shape = zoo.describe(model, self.resolution).cut_shape(cut)
            t = self._tensors[(model, cut)] = self._rng.standard_normal(shape).astype(np.float32)
        return t

    def redis_ms(self, local_s: float) -> float:
        return local_s * 1000.0 + self.offset_ms

    def envelope(self, a: Arrival, client: str, req_id: str) -> bytes:
        req = wire.Request(req_id=req_id, client=client, model=a.model, cut=a.cut,
                           tensor=self.tensor(a.model, a.cut), budget_ms=a.budget_ms)
        return wire.encode_request(req)

    async def send_batch(self, items: list[tuple[Arrival, float]], *, client: str | None = None,
                         prefix: str = "fx") -> list[str]:
        """XADD ``(arrival, intended local time)`` items in one pipeline; returns their req_ids."""
        rows: list[Sent] = []
        async with self.r.pipeline(transaction=False) as pipe:
            for a, intended in items:
                cl = client or next(self._next_client)
                rid = new_req_id(prefix)
                pipe.xadd(self.stream, {keys.FIELD: self.envelope(a, cl, rid)})
                rows.append(Sent(rid, cl, self.redis_ms(intended), a.budget_ms, None, a.source))
            try:
                res = await pipe.execute(raise_on_error=False)
            except Exception as exc:  # the connection itself failed: none of them was accepted
                res = [exc] * len(rows)
        for s, got in zip(rows, res, strict=True):
            if isinstance(got, Exception):
                s.send_error = repr(got)[:200]
            else:
                s.entry_id = got.decode() if isinstance(got, bytes) else str(got)
            self.acct.record(s)
        return [s.req_id for s in rows]

    async def run(self, arrivals: Sequence[Arrival], *, stop: asyncio.Event | None = None,
                  prefix: str = "fx", client: str | None = None) -> list[str]:
        """Send ``arrivals`` at their intended times (relative to now); returns every req_id sent."""
        with collections_deferred():  # a collection pause would delay every send due meanwhile
            return await self._run(arrivals, stop=stop, prefix=prefix, client=client)

    async def _run(self, arrivals: Sequence[Arrival], *, stop: asyncio.Event | None, prefix: str,
                   client: str | None) -> list[str]:
        start = time.time() + 0.02
        out: list[str] = []
        i = 0
        pending: set[asyncio.Task[list[str]]] = set()
        while i < len(arrivals) and not (stop is not None and stop.is_set()):
            now = time.time()
            due: list[tuple[Arrival, float]] = []
            while i < len(arrivals) and start + arrivals[i].at_s <= now:
                due.append((arrivals[i], start + arrivals[i].at_s))
                i += 1
            if due:
                task = asyncio.create_task(self.send_batch(due, client=client, prefix=prefix))
                pending.add(task)
                task.add_done_callback(pending.discard)
                task.add_done_callback(lambda t: out.extend(t.result()) if not t.cancelled() and not t.exception()
                                       else None)
            if i < len(arrivals):
                await asyncio.sleep(max(0.0, min(start + arrivals[i].at_s - time.time(), 0.05)))
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return out


def steady(mix: Sequence[RequestClass], rate_rps: float, duration_s: float, seed: int) -> list[Arrival]:
    return mix_arrivals(mix, rate_rps, duration_s, seed=seed)


async def closed_loop(load: Load, acct: Accountant, cls: RequestClass, *, concurrency: int, duration_s: float,
                      prefix: str = "cap") -> tuple[int, float]:
    """``concurrency`` requests always outstanding for ``duration_s`` (capacity); returns (OK replies, s).

    Replies are watched in the accountant's raw records (its ``tail`` must run meanwhile)."""
    ok = 0
    t_end = time.time() + duration_s
    t0 = time.time()

    async def worker(k: int) -> None:
        nonlocal ok
        client = load.clients[k % len(load.clients)]
        while time.time() < t_end:
            now = time.time()
            [rid] = await load.send_batch([(Arrival(0.0, cls.model + ":cap", cls.model, cls.cut, cls.budget_ms),
                                            now)], client=client, prefix=prefix)
            got = await acct.first_reply(rid, (cls.budget_ms + 2000.0) / 1000.0)
            if got is not None and got.ok:
                ok += 1

    with collections_deferred():
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return ok, time.time() - t0
