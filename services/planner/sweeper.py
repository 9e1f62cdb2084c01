"""The retired-stream sweeper: requests stranded in a group stream of a retired epoch still get a reply.

Plan switches are make-before-break: the replicas of a retired epoch drain their stream and exit. But
when a worker agent or its replicas die while such a stream still holds entries (undelivered, or
pending under a dead consumer), nothing brings a replica of that epoch back — agents only start
replicas of the current plan — and a switch that timed out can leave entries in a stream whose group
never had a replica. The planner runs this sweeper beside its loop so those requests are answered.

Every ``interval_s`` one pass:

1. SCANs ``graft:group:*`` and keeps the streams whose epoch is below the current plan's;
2. skips a stream retired for less than ``retired_grace_s`` (first seen retired by this sweeper;
   default ``switch_timeout_s + 10 s``), so the normal drain — and an ingress still waiting out
   ``GRAFT_SWITCH_TIMEOUT_S`` — always wins the race;
3. skips a stream a live replica serves: a ``graft:health:replica:*`` heartbeat names its epoch and
   group (matched by ``(epoch, group)``, never by consumer name: replica names repeat across epochs),
   or a consumer of the workers' group other than this sweeper was active less than the idle grace ago
   (default ``max(2 × worst batch time, 10 s)``, the worst batch time being the largest ``latency_ms``
   of the retired group and of the current plan's groups);
4. sweeps the rest (*abandoned*): pending entries idle longer than the idle grace are XAUTOCLAIMed
   (``common.store.reaper.Reaper``: cursor followed, deleted entries acked on Redis 6.2 and 7, poison
   dead-lettered), then own pending and undelivered entries are read (``StreamConsumer``). Each entry
   is decoded: malformed → dead letter (and an error reply when its ids can be read); deadline passed
   → ``DEADLINE_EXCEEDED``; model not in the current plan → ``UNKNOWN_MODEL``; no group for its cut →
   ``BAD_CUT`` (an answered request's blob ``keys.blob(req_id)`` is deleted with its reply); else its
   payload, unchanged (same ``req_id``, ``received``, ``deadline``, blob), is XADDed to the current
   epoch's stream of its group. A re-route is one Lua script — still pending here? XADD
   to the new stream, then XACK — so two planners sweeping at once cannot route an entry twice, and a
   failed XADD leaves it pending. Replies go through ``ReplySender`` (idempotent by ``req_id``) and
   are acked in the same pipelined round trip;
5. DELs the stream once it has nothing undelivered or pending, under WATCH, so an entry that arrives
   meanwhile aborts the delete and waits for the next pass.

One ``retired_stream_swept`` log line per swept stream; ``graft_swept_total{outcome}`` counts entries.
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
from common.contract.routing import PlanView
from common.metrics import SWEPT
from common.settings import Settings
from common.store.plan_store import load_plan
from common.store.reaper import Reaper
from common.store.replies import ReplySender
from common.store.streams import (
    REDIS_DOWN,
    TRANSIENT,
    Backoff,
    Entry,
    StreamConsumer,
    dead_letter,
    ensure_group,
)
from services.worker.drain import find_plan, read_backlog

log = logs.get_logger("graft.planner.sweeper")

SWEEP_INTERVAL_S = 5.0
RETIRED_MARGIN_S = 10.0    # retired grace = switch_timeout_s + this
MIN_IDLE_GRACE_S = 10.0    # idle grace = max(2 × worst batch time, this)
PAGE = 100                 # entries per XAUTOCLAIM / XREADGROUP page
MAX_PAGES = 10_000         # per stream and pass (new entries arriving meanwhile cannot keep a pass going)

# KEYS[1] = retired stream, KEYS[2] = target stream; ARGV = group, entry id, payload, maxlen, field.
# Re-route an entry only while it is still pending in the retired stream's group, XADD before XACK:
# a second sweeper finds it acked and does nothing, and an XADD that fails leaves it pending.
_REROUTE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', ARGV[5], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


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
    """Handles the entries of one abandoned stream against the current plan."""

    def __init__(self, sweeper: RetiredStreamSweeper, view: PlanView, report: SweepReport) -> None:
        self.s, self.view, self.report = sweeper, view, report
        self.stream = report.stream

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
                reroutes.append((entry.id, target_or_outcome, entry.payload))
            else:
                replies.append((entry.id, req.client, answer, target_or_outcome))
                if req.blob is not None:  # its own blob key only, as the ingress does: never another key
                    blobs.append(keys.blob(req.req_id))
        for target in {t for _, t, _ in reroutes}:
            await self.s.prepare_target(target)
        if reroutes or replies:
            async with self.s.r.pipeline(transaction=False) as pipe:
                for entry_id, target, payload in reroutes:
                    await self.s.reroute_script(keys=[self.stream, target],
                                                args=[keys.WORKER_GROUP, entry_id, payload,
                                                      self.s.settings.stream_maxlen, keys.FIELD], client=pipe)
                for _, client, answer, _ in replies:
                    await self.s.sender.add(pipe, client, answer)
                if replies:
                    pipe.xack(self.stream, keys.WORKER_GROUP, *[entry_id for entry_id, *_ in replies])
                if blobs:
                    pipe.delete(*blobs)
                results = await pipe.execute()
            moved = sum(1 for res in results[:len(reroutes)] if int(res) == 1)
            self.report.add("rerouted", moved)
            self.report.add("taken", len(reroutes) - moved)  # another sweeper re-routed them first
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
            await self.s.sender.send(client, wire.Reply.failure(req_id, exc, epoch=self.report.epoch,
                                                                group=self.report.group))


class RetiredStreamSweeper:
    """Answers or re-routes the entries of abandoned retired group streams, then deletes the streams.

    ``consumer`` must be unique per planner (two planners may sweep at once: XAUTOCLAIM's idle time,
    XREADGROUP's delivery and the re-route script's pending check keep them from doubling work).
    ``idle_grace_s`` and ``retired_grace_s`` default as the module docstring says.
    """

    def __init__(self, r: Any, settings: Settings, *, consumer: str = "sweeper", interval_s: float = SWEEP_INTERVAL_S,
                 idle_grace_s: float | None = None, retired_grace_s: float | None = None, page: int = PAGE,
                 clock: Any = time.monotonic) -> None:
        if page < 1 or interval_s <= 0:
            raise ValueError("page must be >= 1 and interval_s > 0")
        self.r, self.settings, self.consumer = r, settings, consumer
        self.interval_s, self.page, self._clock = interval_s, page, clock
        self.idle_grace_s = idle_grace_s
        self.retired_grace_s = (settings.switch_timeout_s + RETIRED_MARGIN_S if retired_grace_s is None
                                else retired_grace_s)
        self.sender = ReplySender(r)
        self.reroute_script = r.register_script(_REROUTE)
        self._retired_since: dict[str, float] = {}     # stream → when first seen retired (clock)
        self._plans: dict[int, PlanView | None] = {}   # retired epoch → its plan (for the worst batch time)
        self._targets: set[str] = set()                # current streams whose workers' group exists

    # ---------------------------------------------------------------------------------- passes

    async def sweep_once(self) -> list[SweepReport]:
        """One pass over every retired group stream; reports of the streams swept."""
        view = await load_plan(self.r)
        if view is None:
            return []
        now = self._clock()
        retired: list[tuple[str, int, str]] = []
        async for raw in self.r.scan_iter(match=keys.group_stream_pattern(), count=500, _type="stream"):
            name = _sid(raw)
            parsed = keys.parse_group_stream(name)
            if parsed is not None and parsed[0] < view.epoch:
                retired.append((name, *parsed))
        # Forget what is gone: a stream that comes back (a late XADD) waits out the grace again.
        self._retired_since = {n: self._retired_since.get(n, now) for n, _, _ in retired}
        epochs = {e for _, e, _ in retired}
        self._plans = {e: p for e, p in self._plans.items() if e in epochs}
        self._targets &= set(view.streams().values())
        due = sorted((e, n, g) for n, e, g in retired if now - self._retired_since[n] >= self.retired_grace_s)
        if not due:
            return []
        live = await self.live_replicas()
        reports = []
        for epoch, stream, gid in due:
            if (epoch, gid) in live:
                continue
            grace_ms = await self.idle_grace_ms(epoch, gid, view)
            if not await self.consumers_idle(stream, grace_ms):
                continue
            reports.append(await self.sweep_stream(stream, epoch, gid, view, grace_ms))
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

    async def live_replicas(self) -> set[tuple[int, str]]:
        """``(epoch, group)`` of every replica with a live heartbeat."""
        names = [k async for k in self.r.scan_iter(match=keys.health_pattern("replica"), count=500)]
        live: set[tuple[int, str]] = set()
        if not names:
            return live
        for raw in await self.r.mget(names):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                status = wire.decode_message(raw, "health")
                live.add((int(status["epoch"]), str(status["group"])))
            except (GraftError, KeyError, TypeError, ValueError):
                continue
        return live

    async def idle_grace_ms(self, epoch: int, gid: str, view: PlanView) -> int:
        if self.idle_grace_s is not None:
            return int(self.idle_grace_s * 1000.0)
        if epoch not in self._plans:
            self._plans[epoch] = await find_plan(self.r, epoch)
        old = self._plans[epoch]
        specs = [*view.groups.values(), *([old.groups[gid]] if old is not None and gid in old.groups else [])]
        worst_ms = max((s.latency_ms for s in specs), default=0.0)
        return int(max(2.0 * worst_ms, MIN_IDLE_GRACE_S * 1000.0))

    async def consumers_idle(self, stream: str, grace_ms: int) -> bool:
        """True when no consumer of the workers' group but this sweeper was active within ``grace_ms``."""
        try:
            consumers = await self.r.xinfo_consumers(stream, keys.WORKER_GROUP)
        except ResponseError as exc:
            if str(exc).startswith("NOGROUP"):
                return True  # a stream no worker group was ever made for: nobody serves it
            if "no such key" in str(exc).lower():
                return False  # gone meanwhile: nothing to sweep
            raise
        for c in consumers:
            if _sid(c.get("name", b"")) != self.consumer and int(c.get("idle", 0)) < grace_ms:
                return False
        return True

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
            entries = await reader.read()
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

    async def prepare_target(self, stream: str) -> None:
        """The workers' group on a current stream before entries are re-routed to it (from id 0, as the
        ingress makes it, so a replica that starts later still sees them)."""
        if stream not in self._targets:
            await ensure_group(self.r, stream, keys.WORKER_GROUP, "0")
            self._targets.add(stream)

    async def delete_if_drained(self, stream: str) -> bool:
        """DEL the stream when its workers' group has nothing undelivered or pending (WATCHed: an entry
        added meanwhile aborts the delete). True when the stream is gone."""
        async with self.r.pipeline(transaction=True) as pipe:
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
async def sweeping(r: Any, settings: Settings, consumer: str, stop: asyncio.Event) -> AsyncIterator[RetiredStreamSweeper]:
    """Run a ``RetiredStreamSweeper`` as a task for the duration of the block (cancelled at its end)."""
    sweeper = RetiredStreamSweeper(r, settings, consumer=consumer)
    task = asyncio.create_task(sweeper.run(stop), name=f"{consumer}-sweeper")
    try:
        yield sweeper
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
