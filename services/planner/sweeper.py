"""The orphan sweeper: requests stranded in a group stream nobody reads still get a timely reply.

A group stream is *orphaned* when no live replica reads it (the replica registry says which streams
each live replica reads) for ``orphan_grace_s`` (1 s by default). That happens when replicas die
without draining — a worker agent and its replicas killed at once, a host lost — and, for a retired
epoch's stream, when the replicas that drained it are gone before it was empty. The planner runs this
sweeper beside its loop (any number of planners may: every move is guarded, see below).

Every ``interval_s`` (0.5 s) one pass looks at the current plan's streams and at the retired ones it
has seen in plans (no keyspace scan):

* a **retired** orphaned stream is swept whole: pending entries idle longer than the idle grace are
  XAUTOCLAIMed (``common.store.reaper.Reaper``: cursor followed, poison dead-lettered), then own
  pending and undelivered entries are read. Each entry is decoded: malformed → dead letter (and an
  error reply when its ids can be read); deadline passed → ``DEADLINE_EXCEEDED``; model not in the
  current plan → ``UNKNOWN_MODEL``; else its payload, unchanged (same ``req_id``, ``received``,
  ``deadline``, blob), is re-routed to the current epoch's stream of its group. The stream is DELeted
  once it has nothing undelivered or pending (under WATCH: a late entry aborts the delete);
* a **current** orphaned stream keeps its requests for the replicas that will come back, but none may
  wait past its deadline for them: expired entries are answered ``DEADLINE_EXCEEDED`` at once, the
  others are re-routed to another live group of the model when one exists, else put back at the end
  of the same stream as new entries (so the returning replica reads them as new) — at most once per
  pass per entry.

The writes of a page (``rerouting.py``): on a single Redis one pipelined round trip, a re-route being
one Lua script — still pending here? XADD to the target, then XACK — so two sweepers at once cannot
route an entry twice, and a failed XADD leaves it pending; replies go through ``ReplySender`` (exactly
once per submission) and are acked in the same round trip. On a Redis Cluster the swept and the target
stream sit on different slots, so a re-route is XADD, then (second round trip) XACK, without the
script: an entry may be re-delivered once more when a sweeper dies between the two, and its client
still gets exactly one reply (the reply ledger).
One ``orphan_stream_swept`` log line per swept stream; ``graft_swept_total{outcome}`` counts entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError, WatchError

from common import logs
from common.contract import keys, wire
from common.contract.errors import (
    BadCut,
    DeadlineExceeded,
    GraftError,
    InternalError,
    InvalidRequest,
    UnknownModel,
)
from common.contract.routing import PlanView, Serving, choose, serving_from
from common.metrics import SWEPT
from common.settings import Settings
from common.store.backlog import id_key, read_backlog
from common.store.connection import REDIS_DOWN, TRANSIENT, Backoff, Client
from common.store.plan_store import find_plan, load_plan, plan_history
from common.store.reaper import Reaper
from common.store.registry import Registry
from common.store.replies import ReplySender
from common.store.streams import Entry, StreamConsumer, dead_letter, ensure_group
from services.planner.rerouting import Rerouter

log = logs.get_logger("graft.planner.sweeper")

SWEEP_INTERVAL_S = 0.5
ORPHAN_GRACE_S = 1.0       # a stream nobody reads for this long is swept
MIN_IDLE_GRACE_S = 1.0     # idle grace of pending entries = max(2 × worst batch time, this)
REPLICA_TTL_S = 2.0
HISTORY_EPOCHS = 50        # retired streams are looked for in this many past plans at start
PAGE = 100                 # entries per XAUTOCLAIM / XREADGROUP page
MAX_PAGES = 10_000         # per stream and pass (new entries arriving meanwhile cannot keep a pass going)


def _sid(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


@dataclass(slots=True)
class SweepReport:
    """What sweeping one abandoned stream did; ``counts`` by outcome (the metric's labels)."""

    stream: str
    epoch: int
    group: str
    counts: Counter[str] = field(default_factory=Counter)
    deleted: bool = False

    def add(self, outcome: str, n: int = 1) -> None:
        if n:
            self.counts[outcome] += n
            SWEPT.labels(outcome=outcome).inc(n)


class _StreamSweep:
    """Handles the entries of one orphaned stream against the current plan (``current``: the stream is
    the current plan's own, whose requests wait for their replicas unless they expire)."""

    def __init__(self, sweeper: OrphanSweeper, view: PlanView, report: SweepReport, *, current: bool = False,
                 serving: Serving | None = None, until: str | None = None) -> None:
        self.s, self.view, self.report = sweeper, view, report
        self.stream = report.stream
        self.current, self.serving, self.until = current, serving or Serving(), until
        self.requeued: set[tuple[str, str | None]] = set()  # (req_id, source) put back in this pass

    async def handle(self, entries: list[Entry]) -> None:
        """Decode, then answer or re-route every entry, in one pipelined round trip (plus dead letters)."""
        now = time.time()
        reroutes: list[tuple[str, str, bytes]] = []    # entry id, target stream, payload
        replies: list[tuple[str, str, wire.Reply, str]] = []  # entry id, client, reply, outcome
        blobs: list[str] = []                          # blobs of the requests answered here
        malformed: list[tuple[Entry, GraftError]] = []
        for entry in entries:
            assert entry.payload is not None  # payload-less entries are dead-lettered by the readers
            try:
                req = wire.decode_request(entry.payload)
            except InvalidRequest as exc:
                malformed.append((entry, exc))
                continue
            target_or_outcome, answer = self._decide(req, now)
            if answer is None:
                if target_or_outcome == self.stream:
                    if (req.req_id, req.source) in self.requeued:
                        continue  # put back earlier in this pass: stays pending here until the next one
                    self.requeued.add((req.req_id, req.source))
                reroutes.append((entry.id, target_or_outcome, entry.payload))
            else:
                answer.source = req.source or entry.id
                replies.append((entry.id, req.client, answer, target_or_outcome))
                if req.blob is not None:  # its own blob key only, as the ingress does: never another key
                    blobs.append(keys.blob(req.req_id))
        for target in {t for _, t, _ in reroutes}:
            await self.s.prepare_target(target)
        if reroutes or replies:
            flags = await self.s.rerouter.write(self.stream, reroutes, replies, blobs, now)
            moved = [t for (_, t, _), ok in zip(reroutes, flags, strict=True) if ok]
            self.report.add("requeued", sum(1 for t in moved if t == self.stream))  # back at the end of its stream
            self.report.add("rerouted", sum(1 for t in moved if t != self.stream))
            self.report.add("taken", len(reroutes) - len(moved))  # another sweeper re-routed them first
            for _, _, _, outcome in replies:
                self.report.add(outcome)
        for entry, err in malformed:
            await dead_letter(self.s.r, self.stream, keys.WORKER_GROUP, entry.id, entry.payload, err,
                              deliveries=entry.deliveries, consumer=self.s.consumer)
            await self._answer_dead(entry, err)
            self.report.add("malformed")

    def _decide(self, req: wire.Request, now: float) -> tuple[str, wire.Reply | None]:
        """``(target stream, None)`` to re-route, else ``(outcome, error reply)``."""
        received = req.received if req.received is not None else now
        budget_ms = req.server_budget_ms()
        deadline = req.deadline
        if deadline is None and budget_ms is not None:
            deadline = received + budget_ms / 1000.0
        server_ms = max(0.0, (now - received) * 1000.0)
        epoch, group = self.report.epoch, self.report.group
        if deadline is not None and deadline <= now:
            late_ms = round((now - deadline) * 1000.0, 3)
            exc: GraftError = DeadlineExceeded(
                f"request expired in retired stream {self.stream} (late by {late_ms} ms): no replica of "
                f"epoch {epoch} was left to serve it", late_ms=late_ms)
            return "expired", wire.Reply.failure(req.req_id, exc, server_ms=server_ms, epoch=epoch, group=group)
        view = self.view
        if self.current:
            if req.model in view.models:
                alive = choose(view, self.serving, req.model, req.cut, budget_ms or 0.0)
                if alive is not None and view.stream(alive.id) != self.stream:
                    return view.stream(alive.id), None
            return self.stream, None  # back at the end of its own stream, for the replicas to come
        if req.model not in view.models:
            exc = UnknownModel(f"model {req.model} is not served by plan epoch {view.epoch}",
                               model=req.model, epoch=view.epoch)
            return "unknown_model", wire.Reply.failure(req.req_id, exc, server_ms=server_ms, epoch=view.epoch)
        if budget_ms is None:
            budget_ms = max(0.0, ((deadline or now) - now) * 1000.0)
        try:
            spec = view.resolve(req.model, req.cut, budget_ms)
        except BadCut as exc:
            return "bad_cut", wire.Reply.failure(req.req_id, exc, server_ms=server_ms, epoch=view.epoch)
        return view.stream(spec.id), None

    async def on_dead_lettered(self, entry: Entry, error: GraftError) -> None:
        """A poison or payload-less entry the readers dead-lettered still owes its client a reply."""
        self.report.add("poison" if entry.payload is not None else "malformed")
        await self._answer_dead(entry, error)

    async def _answer_dead(self, entry: Entry, error: GraftError) -> None:
        req_id, client = wire.peek_ids(entry.payload) if entry.payload is not None else (None, None)
        if req_id is not None and client is not None:
            exc = error if isinstance(error, GraftError) else InternalError(str(error))
            reply = wire.Reply.failure(req_id, exc, epoch=self.report.epoch, group=self.report.group)
            reply.source = wire.peek_source(entry.payload) or entry.id  # the submission, as a replica answers it
            await self.s.sender.send(client, reply)


class OrphanSweeper:
    """Answers or re-routes the entries of orphaned group streams (see the module docstring).

    ``consumer`` must be unique per planner (two planners may sweep at once: XAUTOCLAIM's idle time,
    XREADGROUP's delivery and the re-route script's pending check keep them from doubling work).
    """

    def __init__(self, r: Client, settings: Settings, *, consumer: str = "sweeper", interval_s: float = SWEEP_INTERVAL_S,
                 idle_grace_s: float | None = None, orphan_grace_s: float = ORPHAN_GRACE_S, page: int = PAGE,
                 clock: Any = time.monotonic) -> None:
        if page < 1 or interval_s <= 0:
            raise ValueError("page must be >= 1 and interval_s > 0")
        self.r, self.settings, self.consumer = r, settings, consumer
        self.interval_s, self.page, self._clock = interval_s, page, clock
        self.idle_grace_s = idle_grace_s
        self.orphan_grace_s = orphan_grace_s
        self.sender = ReplySender(r)
        self.rerouter = Rerouter(r, self.sender, maxlen=settings.stream_maxlen)
        self.replicas = Registry(r, keys.REPLICA_KIND, REPLICA_TTL_S)
        self._orphan_since: dict[str, float] = {}      # stream → when first seen without a live reader
        self._retired: dict[str, tuple[int, str]] = {}  # retired stream → (epoch, group)
        self._seen_epoch: int | None = None
        self._plans: dict[int, PlanView | None] = {}   # retired epoch → its plan (for the worst batch time)
        self._targets: set[str] = set()                # current streams whose workers' group exists

    # ---------------------------------------------------------------------------------- passes

    async def _track(self, view: PlanView) -> None:
        """Learn the retired streams from the plans: at start from the history, then at every switch."""
        if self._seen_epoch is None:
            for raw in await plan_history(self.r, HISTORY_EPOCHS):
                past = PlanView(raw)
                if past.epoch < view.epoch:
                    self._retired.update({past.stream(g): (past.epoch, g) for g in past.groups})
        elif view.epoch != self._seen_epoch:
            old = self._plans.get(self._seen_epoch) or await find_plan(self.r, self._seen_epoch)
            if old is not None:
                self._retired.update({old.stream(g): (old.epoch, g) for g in old.groups})
        self._seen_epoch = view.epoch
        self._plans[view.epoch] = view
        for stream in view.streams().values():
            self._retired.pop(stream, None)

    async def sweep_once(self) -> list[SweepReport]:
        """One pass over the current and retired group streams; reports of the streams swept."""
        view = await load_plan(self.r)
        if view is None:
            return []
        await self._track(view)
        now = self._clock()
        serving = serving_from((await self.replicas.live()).values())
        if self._retired:  # forget retired streams that are gone (swept, drained and expired, never made)
            async with self.r.pipeline(transaction=False) as pipe:
                for stream in self._retired:
                    pipe.exists(stream)
                present = await pipe.execute()
            self._retired = {s: v for (s, v), n in zip(self._retired.items(), present, strict=True) if n}
        candidates = [(s, e, g, False) for s, (e, g) in self._retired.items()]
        candidates += [(view.stream(g), view.epoch, g, True) for g in view.groups]
        self._orphan_since = {s: self._orphan_since.get(s, now) for s, *_ in candidates if not serving.live(s)}
        reports = []
        for stream, epoch, gid, current in sorted(candidates, key=lambda c: (c[1], c[0])):
            if stream not in self._orphan_since or now - self._orphan_since[stream] < self.orphan_grace_s:
                continue
            grace_ms = await self.idle_grace_ms(epoch, gid, view)
            if current:
                reports.append(await self.sweep_current(stream, epoch, gid, view, serving, grace_ms))
                continue
            report = await self.sweep_stream(stream, epoch, gid, view, grace_ms)
            reports.append(report)
            if report.deleted:
                self._retired.pop(stream, None)
                self._orphan_since.pop(stream, None)
        self._plans = {e: p for e, p in self._plans.items() if e == view.epoch or any(
            e == ep for ep, _ in self._retired.values())}
        return reports

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every ``interval_s`` until ``stop`` is set; never lets an error end the loop."""
        backoff = Backoff(base=0.5, cap=30.0)
        while not stop.is_set():
            delay = self.interval_s
            try:
                await self.sweep_once()
                backoff.reset()
            except TRANSIENT as exc:
                delay = max(self.interval_s, backoff.next())
                log.warning(logs.Event.REDIS_RECONNECT, during="sweep", error=repr(exc))
            except Exception:  # a bug or a Redis error reply: log it, the next pass retries
                log.exception(logs.Event.BATCH_FAILED, during="sweep", consumer=self.consumer)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # ------------------------------------------------------------------------------ abandonment

    async def idle_grace_ms(self, epoch: int, gid: str, view: PlanView) -> int:
        if self.idle_grace_s is not None:
            return int(self.idle_grace_s * 1000.0)
        if epoch not in self._plans:
            self._plans[epoch] = await find_plan(self.r, epoch)
        old = self._plans[epoch]
        specs = [*view.groups.values(), *([old.groups[gid]] if old is not None and gid in old.groups else [])]
        worst_ms = max((s.latency_ms for s in specs), default=0.0)
        return int(max(2.0 * worst_ms, MIN_IDLE_GRACE_S * 1000.0))

    # ---------------------------------------------------------------------------------- sweeping

    async def sweep_stream(self, stream: str, epoch: int, gid: str, view: PlanView, grace_ms: int) -> SweepReport:
        """Take every entry of an abandoned stream: pending (others' idle, then own) and undelivered."""
        report = SweepReport(stream, epoch, gid)
        job = _StreamSweep(self, view, report)
        await ensure_group(self.r, stream, keys.WORKER_GROUP, "0")
        reaper = Reaper(self.r, stream, keys.WORKER_GROUP, self.consumer, min_idle_ms=grace_ms,
                        max_deliveries=self.settings.max_deliveries, on_claimed=job.handle,
                        on_dead_lettered=job.on_dead_lettered, count=self.page)
        reaped = await reaper.reap_once()
        report.add("gone", len(reaped.deleted))
        reader = StreamConsumer(self.r, stream, keys.WORKER_GROUP, self.consumer, count=self.page, block_ms=1,
                                max_deliveries=self.settings.max_deliveries, on_dead_lettered=job.on_dead_lettered)
        for _ in range(MAX_PAGES):
            try:
                entries = await reader.read()
            except ResponseError as exc:  # another sweeper deleted the stream under a blocked read
                if "UNBLOCKED" not in str(exc):
                    raise
                break
            if not entries:
                break
            try:
                await job.handle(entries)
            except REDIS_DOWN:
                raise
            except Exception:  # left pending under our name: the next pass re-reads them
                log.exception(logs.Event.BATCH_FAILED, stream=stream, consumer=self.consumer, size=len(entries))
                break
        report.deleted = await self.delete_if_drained(stream)
        log.info(logs.Event.STREAM_SWEPT, stream=stream, epoch=epoch, group=gid, current_epoch=view.epoch,
                 deleted=report.deleted, **dict(sorted(report.counts.items())))
        return report

    async def sweep_current(self, stream: str, epoch: int, gid: str, view: PlanView, serving: Serving,
                            grace_ms: int) -> SweepReport:
        """Answer what expired in a current stream nobody reads; move the rest to a live group or to the
        end of the same stream — each entry at most once per pass (only ids older than the pass)."""
        report = SweepReport(stream, epoch, gid)
        until = await self._last_id(stream)
        if until is None:
            return report
        await ensure_group(self.r, stream, keys.WORKER_GROUP, "0")
        undelivered = await self._lag(stream)  # what the pass may read as new: never its own put-backs
        job = _StreamSweep(self, view, report, current=True, serving=serving, until=until)
        reaper = Reaper(self.r, stream, keys.WORKER_GROUP, self.consumer, min_idle_ms=grace_ms,
                        max_deliveries=self.settings.max_deliveries, on_claimed=job.handle,
                        on_dead_lettered=job.on_dead_lettered, count=self.page)
        await reaper.reap_once()
        reader = StreamConsumer(self.r, stream, keys.WORKER_GROUP, self.consumer, count=self.page, block_ms=1,
                                max_deliveries=self.settings.max_deliveries, on_dead_lettered=job.on_dead_lettered)
        for _ in range(MAX_PAGES):  # what this sweeper itself held from an earlier pass
            entries = await reader.read_own_pending()
            if not entries:
                break
            await job.handle(entries)
        for _ in range(MAX_PAGES):  # then new entries, at most as many as were undelivered at the start
            if undelivered is not None and undelivered <= 0:
                break
            entries = await reader.read(count=self.page if undelivered is None else min(self.page, undelivered))
            if not entries:
                break
            if undelivered is not None:
                undelivered -= len(entries)
            await job.handle(entries)
            if undelivered is None and any(id_key(e.id) > id_key(until) for e in entries):
                break  # Redis 6.2 (no lag): past what the pass started with, what it put back stays pending
                # here until the next pass or a returning replica's reaper
        if report.counts:
            log.info(logs.Event.STREAM_SWEPT, stream=stream, epoch=epoch, group=gid, current_epoch=view.epoch,
                     current=True, **dict(sorted(report.counts.items())))
        return report

    async def _lag(self, stream: str) -> int | None:
        """Entries of ``stream`` the workers' group has not delivered yet (None where Redis cannot say)."""
        for g in await self.r.xinfo_groups(stream):
            if _sid(g.get("name", b"")) == keys.WORKER_GROUP:
                lag = g.get("lag")
                return int(lag) if isinstance(lag, int) else None
        return None

    async def _last_id(self, stream: str) -> str | None:
        try:
            info = await self.r.xinfo_stream(stream)
        except ResponseError:
            return None
        return _sid(info.get("last-generated-id", "0-0"))

    async def prepare_target(self, stream: str) -> None:
        """The workers' group on a current stream before entries are re-routed to it (from id 0, as the
        ingress makes it, so a replica that starts later still sees them)."""
        if stream not in self._targets:
            await ensure_group(self.r, stream, keys.WORKER_GROUP, "0")
            self._targets.add(stream)

    async def delete_if_drained(self, stream: str) -> bool:
        """DEL the stream when its workers' group has nothing undelivered or pending (WATCHed: an entry
        added meanwhile aborts the delete). True when the stream is gone."""
        async with self.r.pipeline(transaction=True) as tx:
            pipe: Any = tx  # a WATCHed pipeline runs commands at once; redis-py leaves WATCH/MULTI untyped
            try:
                await pipe.watch(stream)
                backlog = await read_backlog(pipe, stream, keys.WORKER_GROUP)
                if backlog is None:
                    return True
                if backlog.total:
                    await pipe.unwatch()
                    return False
                pipe.multi()
                pipe.delete(stream)
                await pipe.execute()
                return True
            except WatchError:
                return False


@contextlib.asynccontextmanager
async def sweeping(r: Client, settings: Settings, consumer: str, stop: asyncio.Event) -> AsyncIterator[OrphanSweeper]:
    """Run an ``OrphanSweeper`` as a task for the duration of the block (cancelled at its end)."""
    sweeper = OrphanSweeper(r, settings, consumer=consumer)
    task = asyncio.create_task(sweeper.run(stop), name=f"{consumer}-sweeper")
    try:
        yield sweeper
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
