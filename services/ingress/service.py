"""The ingress loop: read a batch of requests, validate, stamp deadlines, route or answer, in one write.

Each batch read from an ingress shard (``keys.ingress_stream(k)``, ``GRAFT_INGRESS_SHARDS`` of them;
every process reads them all, one consumer and one reaper per shard) becomes one pipelined round trip
(``batch.py``): an XADD per routed request to its group stream, an error reply per refused request,
one XACK on the shard for the whole batch (on a Redis Cluster the XACK is a second round trip, once
the writes succeeded). A batch holding blob requests costs one round trip more, before that one: a
STRLEN per blob (it must hold exactly the bytes its dtype and shape need) and a PEXPIRE that ties the
blob's life to the request's deadline.

**Deadlines count from when Redis accepted the entry**: the receive time is the timestamp in the
entry's id (the Redis server's clock — on a cluster, that of the master holding the shard — one clock
for every ingress, and time spent queued while an ingress was down counts). A request whose deadline
passed before it was read is answered ``DEADLINE_EXCEEDED`` at once.

**Routing** follows the current plan, but only to group streams that a live replica reads (the
replica registry, ``serving.py``); when a group has none, its requests go to another live group of
the model, and with no live replica of the model at all they are answered ``OVERLOADED``.
**Admission** (``shedding.py``) refuses only what cannot finish in time, from the stream's backlog
(polled every ``shed_interval_s``, completions included) and the replicas' measured speed — for a
saturated group, the rate at which it really acknowledges entries.

A newer plan is switched to before the next batch once every group stream of it has a live reader
(make-before-break; with re-targeted replica processes that takes milliseconds), or after
``switch_timeout_s``. Side loops poll the plan, the backlogs and the registry, flush statistics, trim
the ingress stream (never past an unread or unacknowledged entry) and reclaim entries of dead
ingress consumers. Nothing here blocks per request: no round trip, no ``describe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common import logs
from common.contract import keys, wire
from common.contract.errors import DeadlineExceeded, GraftError, InternalError, Overloaded, StoreUnavailable
from common.contract.routing import PlanView, Serving, choose, serving_from, unserved
from common.logs import Event
from common.metrics import PLAN_EPOCH, QUEUE_LAG, REQUESTS, STAGE_MS
from common.model.shapes import plan_shapes
from common.settings import Settings
from common.store.backlog import id_ms, poll_backlogs
from common.store.connection import TRANSIENT, Backoff, Client
from common.store.plan_store import PlanWatcher
from common.store.protocol import Letter, Store
from common.store.reaper import Reaper
from common.store.redis_store import RedisStore
from common.store.registry import Registry
from common.store.streams import Entry, StreamConsumer, ensure_group, safe_trim
from services.ingress.batch import Batch, Outcome
from services.ingress.serving import speed
from services.ingress.shedding import Backlogs, DrainMeter, Verdict, decide, saturated_backlog
from services.ingress.stats import StatsWindow
from services.ingress.validate import Limits, ModelCatalog, Validator, answerable_ids, blob_error

log = logs.get_logger("graft.ingress")

SERVICE = keys.INGRESS_KIND
# Entries a dead ingress consumer held are reclaimed after this idle time; a live one acks in ms.
RECLAIM_IDLE_MS = 1_000
# A routed blob outlives its request's deadline by this much (replicas delete it once they replied).
BLOB_MARGIN_MS = 2_000.0
REPLICA_TTL_S = 2.0
NO_REPLICA_RETRY_MS = 1_000

_OK = REQUESTS.labels(service=SERVICE, outcome="ok")
_MALFORMED = REQUESTS.labels(service=SERVICE, outcome="MALFORMED")
_VALIDATE_MS = STAGE_MS.labels(stage="validate")
_ROUTE_MS = STAGE_MS.labels(stage="route")

Status = dict[str, Any]
# Entries per read. Small reads keep an ingress flowing on a busy host: Redis hands a large reply out
# 64 KB per event-loop turn, each turn waiting for a core, so 256 entries of ~4 KB took 50-90 ms to
# arrive under the fault suite's 5x overload, and reading, validating and writing run one after another.
# There, 64 instead of 256 took goodput / capacity from 0.15-0.22 to 0.38-0.46 and lost requests from
# ~4,000 to 0 (two runs each); an idle host routes as fast (14-16k small req/s) and refuses 16k/s
# instead of 19-20k.
READ_COUNT = 64


class IngressService:
    def __init__(
        self, r: Client, settings: Settings, *, name: str = "ingress", count: int = READ_COUNT,
        block_ms: int | None = None,
        plan_interval_s: float = 0.1, shed_interval_s: float = 0.025, serving_interval_s: float = 0.2,
        stats_interval_s: float = 1.0, trim_interval_s: float = 1.0, shedding: bool = True,
        switch_timeout_s: float | None = None, blob_margin_ms: float = BLOB_MARGIN_MS,
        status: Status | None = None, store: Store | None = None,
    ) -> None:
        """``store``: where batches are written (default: ``RedisStore(r)``; a ``MemoryStore`` in unit tests)."""
        self.r, self.settings, self.name = r, settings, name
        self.store: Store = store if store is not None else RedisStore(r)
        self.shards = keys.ingress_streams(settings.ingress_shards)  # every process reads every shard
        self.count, self.block_ms = count, block_ms or min(settings.block_ms, 50)
        self.plan_interval_s, self.shed_interval_s = plan_interval_s, shed_interval_s
        self.serving_interval_s, self.stats_interval_s, self.trim_interval_s = (
            serving_interval_s, stats_interval_s, trim_interval_s)
        self.shedding = shedding
        self.blob_margin_ms = blob_margin_ms
        self.switch_timeout_s = settings.switch_timeout_s if switch_timeout_s is None else switch_timeout_s
        self.catalog = ModelCatalog(settings.resolution)
        self.validator = Validator(self.catalog, Limits(settings.max_tensor_bytes, settings.max_slo_ms))
        self.watcher = PlanWatcher(r, interval=plan_interval_s)
        self.replicas = Registry(r, keys.REPLICA_KIND, REPLICA_TTL_S)
        self.view: PlanView | None = None
        self._next_view: PlanView | None = None
        self._waiting: PlanView | None = None  # published, prepared, not yet read by replicas
        self._waiting_since = 0.0
        self._in_batch = 0
        self.backlogs = Backlogs()
        self.drains = DrainMeter()
        self.serving = Serving()
        self.stats = StatsWindow(self.name, time.time())
        self.status: Status = status if status is not None else {}
        self.routed_total = self.replied_total = self.dead_lettered_total = 0
        self.ready = asyncio.Event()  # set once the first plan is applied (and consuming has begun)
        self._outcomes: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------- plans

    async def _prepare(self, view: PlanView) -> None:
        """Everything a plan needs before a batch can use it: model shapes, worker groups on its streams."""
        await asyncio.to_thread(self.catalog.prepare, view.models, plan_shapes(view.raw))
        for stream in view.streams().values():
            # Created from id 0 so replicas that start after the first requests still see them.
            await ensure_group(self.r, stream, keys.WORKER_GROUP, "0")

    def _switch(self, view: PlanView) -> None:
        old = self.view
        self.catalog.serve(view.models, plan_shapes(view.raw))
        self.view = view
        self.backlogs.update({})  # group ids may repeat across epochs, their streams do not
        self.drains.forget(view.streams().values())
        PLAN_EPOCH.labels(service=SERVICE).set(view.epoch)
        logs.bind(epoch=view.epoch)
        self.status.update(epoch=view.epoch, waiting_epoch=None)
        log.info(Event.PLAN_SWITCHED, ingress=self.name, epoch=view.epoch,
                 previous=None if old is None else old.epoch, groups=len(view.groups))

    async def _first_plan(self, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            try:
                view = await self.watcher.poll()
            except TRANSIENT as exc:
                log.warning(Event.REDIS_RECONNECT, ingress=self.name, error=repr(exc))
                view = None
            if view is not None:
                await self._prepare(view)
                self._switch(view)
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.plan_interval_s)
        return False

    async def poll_plan(self) -> None:
        view = await self.watcher.poll()
        if view is not None:
            await self._prepare(view)
            self._waiting, self._waiting_since = view, time.monotonic()
            self.status.update(waiting_epoch=view.epoch)
            log.info(Event.PLAN_WAITING, ingress=self.name, epoch=view.epoch,
                     current=None if self.view is None else self.view.epoch)
        waiting = self._waiting
        if waiting is None:
            return
        missing = unserved(waiting, self.serving)
        waited = time.monotonic() - self._waiting_since
        if missing and waited < self.switch_timeout_s:
            return
        if missing:
            log.warning(Event.PLAN_SWITCH_TIMEOUT, ingress=self.name, epoch=waiting.epoch,
                        waited_s=round(waited, 1), unserved=missing)
        self._waiting = None
        if self._in_batch:
            self._next_view = waiting  # taken by the next batch, never in the middle of one
        else:
            self._switch(waiting)

    # ------------------------------------------------------------------------------------ batches

    def _outcome(self, code: str) -> Any:
        counter = self._outcomes.get(code)
        if counter is None:
            counter = self._outcomes[code] = REQUESTS.labels(service=SERVICE, outcome=code)
        return counter

    async def handle_batch(self, entries: list[Entry], stream: str = keys.INGRESS) -> None:
        """Route or answer every entry (all read from the ingress shard ``stream``), then XACK them there."""
        if self._next_view is not None and not self._in_batch:
            self._switch(self._next_view)
            self._next_view = None
        self._in_batch += 1
        try:
            await self._handle(entries, stream)
        finally:
            self._in_batch -= 1

    async def _handle(self, entries: list[Entry], stream: str) -> None:
        if not entries:
            return
        view = self.view
        assert view is not None, "handle_batch before the first plan"
        batch = Batch(stream)
        for entry in entries:
            t0 = time.perf_counter()
            outcome = Outcome(entry)
            try:
                outcome.request = self.validator.check(entry.payload)
            except Exception as exc:
                self._refuse(outcome, exc)
                if outcome.ids is not None and outcome.error is not None:  # malformed ones count when dead-lettered
                    self.stats.record_rejected(str(outcome.error.code))
            _VALIDATE_MS.observe((time.perf_counter() - t0) * 1000.0)
            batch.add(outcome)
        await self._check_blobs(batch)
        now = time.time()
        for o in batch.outcomes:
            if o.request is not None and o.error is None:
                self._route(view, o, now)
        t1 = time.perf_counter()
        await batch.write(self.store, epoch=view.epoch)
        _ROUTE_MS.observe((time.perf_counter() - t1) * 1000.0)
        await self._settle(view, batch)

    def _refuse(self, o: Outcome, exc: Exception) -> None:
        o.error = exc if isinstance(exc, GraftError) else InternalError(f"ingress failed: {exc!r}")
        if not isinstance(exc, GraftError):
            log.error(Event.REQUEST_REJECTED, ingress=self.name, entry_id=o.entry.id, exc_info=exc)
        o.stream = None
        if o.request is not None:
            o.ids = (o.request.req_id, o.request.client)
            o.blob = o.request.blob is not None
        else:
            o.ids = answerable_ids(o.entry.payload)
            o.blob = o.ids is not None and wire.peek_blob(o.entry.payload)

    async def _check_blobs(self, batch: Batch) -> None:
        """Refuse each blob request whose blob is missing or of the wrong length (``BAD_TENSOR``) and tie
        the others' TTL to the deadline; one pipelined round trip, none for a batch without blobs."""
        blobs = [o for o in batch.outcomes if o.request is not None and o.error is None and o.request.blob]
        if not blobs:
            return
        asks = []
        for o in blobs:
            assert o.request is not None and o.request.blob is not None and o.request.budget_ms is not None
            asks.append((o.request.blob, int(o.request.budget_ms + self.blob_margin_ms)))
        lengths = await self.store.blob_lengths(asks)
        for o, strlen in zip(blobs, lengths, strict=True):
            assert o.request is not None
            err = blob_error(o.request, strlen)
            if err is not None:
                self._refuse(o, err)
                self.stats.record_rejected(str(err.code))

    def _route(self, view: PlanView, o: Outcome, now: float) -> None:
        """Stamp the deadline and pick the stream, or refuse (``DEADLINE_EXCEEDED``, ``OVERLOADED``)."""
        req = o.request
        assert req is not None and req.budget_ms is not None
        req.received = id_ms(o.entry.id) / 1000.0
        req.deadline = req.received + req.budget_ms / 1000.0
        req.source = o.entry.id
        left_ms = (req.deadline - now) * 1000.0
        try:
            spec = choose(view, self.serving, req.model, req.cut, req.budget_ms)
            if spec is None:
                self.stats.record_shed(req.model, req.cut, req.budget_ms)
                raise Overloaded(f"no live replica serves {req.model} right now (one is starting or taking over)",
                                 retry_after_ms=NO_REPLICA_RETRY_MS, model=req.model)
            if left_ms <= 0:
                raise DeadlineExceeded(f"the deadline passed {-left_ms:.0f} ms before the ingress read the request "
                                       "(it waited in the ingress stream)", late_ms=round(-left_ms, 3))
            if self.shedding:
                self._admit(view, spec.id, req, left_ms)
        except GraftError as exc:
            self._refuse(o, exc)
            if not isinstance(exc, Overloaded):
                self.stats.record_rejected(str(exc.code))
            return
        o.stream, o.gid = view.stream(spec.id), spec.id
        self.backlogs.routed(spec.id)
        self.stats.record_routed(req.model, req.cut, req.budget_ms)

    def _admit(self, view: PlanView, gid: str, req: wire.Request, left_ms: float) -> None:
        spec = view.groups[gid]
        group = speed(view, spec, self.serving, self.drains.per_ms(view.stream(gid), time.monotonic() * 1000.0))
        backlog = self.backlogs.backlog(gid)
        decision = decide(group, backlog, left_ms, max_retry_ms=int(self.settings.max_slo_ms))
        if decision.verdict is Verdict.HOPELESS:
            raise DeadlineExceeded(f"{left_ms:.1f} ms left is below the fastest run of {req.model} from cut "
                                   f"{req.cut}: {decision.predicted_ms:.1f} ms alone on an idle replica",
                                   group=gid, fastest_ms=round(decision.predicted_ms, 3))
        if decision.verdict is Verdict.SHED:
            assert req.budget_ms is not None
            self.stats.record_shed(req.model, req.cut, req.budget_ms)
            raise Overloaded(f"group {gid} has {backlog} requests queued on {group.replicas} replica(s): "
                             f"≈{decision.predicted_ms:.0f} ms to answer, {left_ms:.0f} ms left",
                             retry_after_ms=decision.retry_after_ms, group=gid)

    async def _settle(self, view: PlanView, batch: Batch) -> None:
        failed = batch.failed
        down = next((o.failure for o in failed if isinstance(o.failure, StoreUnavailable)), None)
        if down is None:  # replies not written: their entries were left pending, to be read again
            down = next((o.unwritten for o in batch.unwritten if isinstance(o.unwritten, StoreUnavailable)), None)
        if down is not None:
            raise down
        if failed:
            # Acked already, so answer now rather than lose them: the write itself failed (e.g. OOM).
            log.error(Event.BATCH_FAILED, ingress=self.name, failed=len(failed), error=repr(failed[0].failure))
            replies = []
            for o in failed:
                assert o.request is not None
                rep = wire.Reply.failure(o.request.req_id, InternalError(f"routing failed: {o.failure}"),
                                         epoch=view.epoch)
                rep.source = o.entry.id
                replies.append((o.request.client, rep))
            await self.store.reply(replies)
            await self.store.delete([o.request.blob for o in failed if o.request is not None and o.request.blob is not None])
        routed = len(batch.routed)
        self.routed_total += routed
        _OK.inc(routed)
        # One log line per batch and kind of refusal, not one per request: under overload an ingress turns
        # away thousands a second, and rendering a line each would take the CPU the replicas need.
        refused: dict[str, list[Outcome]] = {}
        for o in batch.refused:
            assert o.reply is not None and o.reply.error is not None and o.ids is not None
            self.replied_total += 1
            self._outcome(o.reply.error.code).inc()
            refused.setdefault(o.reply.error.code, []).append(o)
        for code, outs in refused.items():
            first = outs[0]
            assert first.reply is not None and first.reply.error is not None and first.ids is not None
            log.info(Event.REQUEST_SHED if code == str(Overloaded.code) else Event.REQUEST_REJECTED, code=code,
                     count=len(outs), req_ids=[o.ids[0] for o in outs[:5] if o.ids is not None],
                     clients=sorted({o.ids[1] for o in outs if o.ids is not None})[:5],
                     group=first.reply.error.details.get("group"), error=first.reply.error.message)
        malformed = batch.malformed
        if malformed:  # moved to the dead letters and acked together, all of a batch at once
            await self.store.dead_letter([Letter(batch.stream, keys.INGRESS_GROUP, o.entry.id, o.entry.payload,
                                                 o.error, deliveries=o.entry.deliveries, consumer=self.name)
                                          for o in malformed if o.error is not None])
        for o in malformed:
            assert o.error is not None
            log.warning(Event.MALFORMED, ingress=self.name, entry_id=o.entry.id, code=str(o.error.code),
                        error=o.error.message)
            _MALFORMED.inc()
            self.stats.record_rejected("MALFORMED")
            self.dead_lettered_total += 1
        self.status.update(routed=self.routed_total, replied=self.replied_total,
                           dead_lettered=self.dead_lettered_total)

    async def _on_dead_lettered(self, entry: Entry, error: GraftError) -> None:
        """A poison entry (delivered too often) went to the dead letters: answer it if we can."""
        ids = answerable_ids(entry.payload)
        self.dead_lettered_total += 1
        if ids is not None:
            epoch = self.view.epoch if self.view is not None else None
            rep = wire.Reply.failure(ids[0], error, epoch=epoch)
            rep.source = entry.id
            await self.store.reply([(ids[1], rep)])
            if wire.peek_blob(entry.payload):
                await self.store.delete([keys.blob(ids[0])])

    # ------------------------------------------------------------------------------- side loops

    async def _every(self, interval: float, stop: asyncio.Event, step: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff()
        while not stop.is_set():
            delay = interval
            try:
                await step()
                backoff.reset()
            except TRANSIENT as exc:
                delay = max(interval, backoff.next())
                log.warning(Event.REDIS_RECONNECT, ingress=self.name, step=step.__name__, error=repr(exc))
            except Exception:  # a side loop must not take the ingress down; log and try again
                log.exception(Event.BATCH_FAILED, ingress=self.name, step=step.__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def poll_backlog(self) -> None:
        view = self.view
        if view is None or not self.shedding:
            return
        mark = self.backlogs.mark()
        streams = view.streams()
        polled = await poll_backlogs(self.r, streams)
        self.backlogs.update({gid: p.backlog for gid, p in polled.items()}, since=mark)
        now_ms = time.monotonic() * 1000.0
        for gid, p in polled.items():
            QUEUE_LAG.labels(group=gid).set(p.backlog)
            spec = view.groups.get(gid)
            if spec is not None:
                full = saturated_backlog(spec.batch, self.serving.live(streams[gid]))
                self.drains.update(streams[gid], p.backlog, p.acked, saturated_at=full, now_ms=now_ms)

    async def poll_serving(self) -> None:
        self.serving = serving_from((await self.replicas.live()).values())

    async def flush_stats(self) -> None:
        body = self.stats.flush(time.time())
        await self.r.xadd(keys.STATS, {keys.FIELD: wire.encode_message("stats", body)},
                          maxlen=self.settings.stream_maxlen, approximate=True)

    async def trim_ingress(self) -> None:
        for stream in self.shards:
            await safe_trim(self.r, stream)  # what every reader finished, a second after

    # ------------------------------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; the batch in hand is finished before returning."""
        stop = stop or asyncio.Event()
        log.info(Event.SERVICE_STARTED, service=SERVICE, ingress=self.name)
        side: list[asyncio.Task[None]] = []
        try:
            serving = asyncio.create_task(self._every(self.serving_interval_s, stop, self.poll_serving))
            side.append(serving)
            if not await self._first_plan(stop):
                return
            with contextlib.suppress(*TRANSIENT):
                await self.poll_serving()  # know who is alive before the first batch is routed
            consumers, reapers = [], []
            for stream in self.shards:  # XREADGROUP over several streams would be cross-slot on a cluster
                handle = functools.partial(self.handle_batch, stream=stream)
                consumers.append(StreamConsumer(
                    self.r, stream, keys.INGRESS_GROUP, self.name, count=self.count, block_ms=self.block_ms,
                    max_deliveries=self.settings.max_deliveries, on_dead_lettered=self._on_dead_lettered,
                ))
                reapers.append(Reaper(self.r, stream, keys.INGRESS_GROUP, self.name, min_idle_ms=RECLAIM_IDLE_MS,
                                      max_deliveries=self.settings.max_deliveries, on_claimed=handle,
                                      on_dead_lettered=self._on_dead_lettered, count=self.count, interval_s=0.5))
            side += [asyncio.create_task(c) for c in (
                self._every(self.plan_interval_s, stop, self.poll_plan),
                self._every(self.shed_interval_s, stop, self.poll_backlog),
                self._every(self.stats_interval_s, stop, self.flush_stats),
                self._every(self.trim_interval_s, stop, self.trim_ingress),
                *(reaper.run(stop) for reaper in reapers),
            )]
            gc.collect()
            gc.freeze()  # the catalog and libraries stay: spare every later collection scanning them
            self.ready.set()
            await asyncio.gather(*(c.run(functools.partial(self.handle_batch, stream=c.stream), stop=stop,
                                         auto_ack=False) for c in consumers))
        finally:
            stop.set()
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            with contextlib.suppress(*TRANSIENT):
                if self.view is not None:
                    await self.flush_stats()
            log.info(Event.SERVICE_STOPPED, service=SERVICE, ingress=self.name, routed=self.routed_total)
