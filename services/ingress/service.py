"""The ingress loop: read a batch of requests, validate, stamp deadlines, route or answer, in one write.

Each batch read from ``graft:ingress`` becomes one pipelined round trip: an XADD per routed request to
its group stream, an error reply per refused request (``ReplySender``: idempotent by ``req_id``), and
one XACK for the whole batch. A batch holding blob requests costs one round trip more, before that
one: a STRLEN per blob (it must hold exactly the bytes its dtype and shape need) and a PEXPIRE that
ties the blob's life to the request's deadline (``budget + blob_margin_ms`` from now, server clock).
A refused request that names a blob gets its blob ``keys.blob(req_id)`` deleted with its reply (never
another key it names: that one is not its to delete and expires by its TTL).

A batch is routed entirely with one plan epoch; a newer plan found by the poller is switched to before
the next batch — but only once every group stream of the new plan has a worker consumer
(make-before-break: new replicas take seconds to load their blocks, and requests routed to a stream
nobody reads yet would miss their deadlines), or after ``switch_timeout_s`` if some never appears.
Side loops poll the group backlogs for shedding, flush statistics, beat the heartbeat, trim the
ingress stream and reclaim entries of dead ingress consumers. Nothing here blocks per request: no
round trip, no ``describe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common import logs
from common.contract import keys, wire
from common.contract.errors import GraftError, InternalError, Overloaded
from common.contract.routing import GroupSpec, PlanView
from common.logs import Event
from common.metrics import PLAN_EPOCH, QUEUE_LAG, REQUESTS, STAGE_MS
from common.settings import Settings
from common.store.plan_store import PlanWatcher
from common.store.reaper import Reaper
from common.store.replies import ReplySender
from common.store.streams import (
    TRANSIENT,
    Backoff,
    Entry,
    StreamConsumer,
    consumer_name,
    dead_letter,
    ensure_group,
    trim,
)
from services.ingress.backlog import poll_backlogs
from services.ingress.shedding import Backlogs, Capacity, ShedPolicy
from services.ingress.stats import StatsWindow
from services.ingress.validate import Limits, ModelCatalog, Validator, answerable_ids, blob_error

log = logs.get_logger("graft.ingress")

SERVICE = "ingress"
STATS_MAXLEN = 10_000
HEARTBEAT_TTL_S = 5
# Entries a dead ingress consumer held are reclaimed after this idle time; a live one acks in ms.
RECLAIM_IDLE_MS = 10_000
# A routed blob outlives its request's deadline by this much (replicas delete it once they replied).
BLOB_MARGIN_MS = 2_000.0

_OK = REQUESTS.labels(service=SERVICE, outcome="ok")
_MALFORMED = REQUESTS.labels(service=SERVICE, outcome="MALFORMED")
_VALIDATE_MS = STAGE_MS.labels(stage="validate")
_ROUTE_MS = STAGE_MS.labels(stage="route")


def route(view: PlanView, model: str, cut: int, budget_ms: float) -> GroupSpec:
    """The plan's group for ``(model, cut)``; a cut no group lists joins the group of that model that
    starts nearest below it (``PlanView.resolve``, shared with the planner's retired-stream sweeper)."""
    return view.resolve(model, cut, budget_ms)


async def unserved_streams(r: Any, view: PlanView) -> list[str]:
    """The plan's group streams that no worker consumer has read yet (a replica joins the workers'
    group with its first XREADGROUP, after its blocks are loaded)."""
    streams = view.streams()
    async with r.pipeline(transaction=False) as pipe:
        for stream in streams.values():
            pipe.xinfo_groups(stream)
        answers = await pipe.execute(raise_on_error=False)
    missing = []
    for gid, groups in zip(streams, answers, strict=True):
        if isinstance(groups, Exception):
            missing.append(gid)
            continue
        consumers = sum(int(g.get("consumers", 0)) for g in groups if _text(g.get("name")) == keys.WORKER_GROUP)
        if consumers == 0:
            missing.append(gid)
    return missing


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class IngressService:
    def __init__(
        self, r: Any, settings: Settings, *, name: str | None = None, count: int = 256, block_ms: int | None = None,
        plan_interval_s: float = 0.2, shed_interval_s: float = 0.15, stats_interval_s: float = 1.0,
        heartbeat_s: float = 1.0, trim_interval_s: float = 5.0, shedding: bool = True,
        switch_timeout_s: float | None = None, blob_margin_ms: float = BLOB_MARGIN_MS,
    ) -> None:
        self.r, self.settings = r, settings
        self.name = name or consumer_name(SERVICE)
        self.count, self.block_ms = count, block_ms or min(settings.block_ms, 50)
        self.plan_interval_s, self.shed_interval_s = plan_interval_s, shed_interval_s
        self.stats_interval_s, self.heartbeat_s, self.trim_interval_s = stats_interval_s, heartbeat_s, trim_interval_s
        self.shedding = shedding
        self.blob_margin_ms = blob_margin_ms
        self.switch_timeout_s = settings.switch_timeout_s if switch_timeout_s is None else switch_timeout_s
        self.catalog = ModelCatalog(settings.resolution)
        self.validator = Validator(self.catalog, Limits(settings.max_tensor_bytes, settings.max_slo_ms))
        self.replies = ReplySender(r)
        self.watcher = PlanWatcher(r, interval=plan_interval_s)
        self.view: PlanView | None = None
        self._next_view: PlanView | None = None
        self._waiting: PlanView | None = None  # published, prepared, not yet served by workers
        self._waiting_since = 0.0
        self._in_batch = 0  # batches between taking their plan and their last use of it
        self.backlogs = Backlogs()
        self.policy = ShedPolicy({}, self.backlogs)
        self.stats = StatsWindow(self.name, time.time())
        self.routed_total = 0
        self.replied_total = 0
        self.dead_lettered_total = 0
        self.ready = asyncio.Event()  # set once the first plan is applied (and consuming has begun)
        self._outcomes: dict[str, Any] = {}
        self.metrics_port: int | None = None  # set by whoever serves /metrics, for the startup log

    # ------------------------------------------------------------------------------------- plans

    async def _prepare(self, view: PlanView) -> None:
        """Everything a plan needs before a batch can use it: model shapes, worker groups on its streams."""
        await asyncio.to_thread(self.catalog.prepare, view.models)
        for stream in view.streams().values():
            # Created from id 0 so replicas that start after the first requests still see them.
            await ensure_group(self.r, stream, keys.WORKER_GROUP, "0")

    def _switch(self, view: PlanView) -> None:
        old = self.view
        self.catalog.serve(view.models)
        self.view = view
        caps = {gid: Capacity(s.replicas, s.batch, s.latency_ms) for gid, s in view.groups.items()}
        self.backlogs.update({})  # group ids may repeat across epochs, their streams do not
        self.policy = ShedPolicy(caps, self.backlogs, max_retry_ms=int(self.settings.max_slo_ms))
        PLAN_EPOCH.labels(service=SERVICE).set(view.epoch)
        logs.bind(epoch=view.epoch)
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

    async def _poll_plan(self) -> None:
        view = await self.watcher.poll()
        if view is not None:
            await self._prepare(view)
            self._waiting, self._waiting_since = view, time.monotonic()
            log.info(Event.PLAN_WAITING, ingress=self.name, epoch=view.epoch,
                     current=None if self.view is None else self.view.epoch)
        waiting = self._waiting
        if waiting is None:
            return
        missing = await unserved_streams(self.r, waiting)
        waited = time.monotonic() - self._waiting_since
        if missing and waited < self.switch_timeout_s:
            return
        if missing:
            log.warning(Event.PLAN_SWITCH_TIMEOUT, ingress=self.name, epoch=waiting.epoch,
                        waited_s=round(waited, 1), unserved=sorted(missing))
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

    async def handle_batch(self, entries: list[Entry]) -> None:
        """Route or answer every entry, then XACK them all, in one pipelined round trip."""
        if self._next_view is not None and not self._in_batch:
            self._switch(self._next_view)
            self._next_view = None
        self._in_batch += 1
        try:
            await self._handle(entries)
        finally:
            self._in_batch -= 1

    async def _handle(self, entries: list[Entry]) -> None:
        if not entries:
            return
        view = self.view
        assert view is not None, "handle_batch before the first plan"
        received = time.time()
        spent: list[float] = []  # validation + routing time per entry
        checked: list[wire.Request | Exception] = []
        for entry in entries:
            t0 = time.perf_counter()
            try:
                checked.append(self.validator.check(entry.payload))
            except Exception as exc:
                checked.append(exc)
            spent.append(time.perf_counter() - t0)
        await self._check_blobs(checked)
        routed: list[tuple[wire.Request, int]] = []  # with the request's position in the pipeline
        refused: list[tuple[str, wire.Reply]] = []
        malformed: list[tuple[Entry, GraftError]] = []
        async with self.r.pipeline(transaction=False) as pipe:
            for entry, got, took in zip(entries, checked, spent, strict=True):
                t0 = time.perf_counter()
                if isinstance(got, wire.Request):
                    try:
                        self._route(pipe, view, got, received)
                        routed.append((got, len(pipe.command_stack) - 1))
                        self.stats.record_routed(got.model, got.cut, got.budget_ms or 0.0)
                    except Exception as exc:
                        await self._refuse(pipe, view, entry, exc, received, refused, malformed,
                                           blob=got.blob is not None)
                else:
                    await self._refuse(pipe, view, entry, got, received, refused, malformed)
                _VALIDATE_MS.observe((took + time.perf_counter() - t0) * 1000.0)
            pipe.xack(keys.INGRESS, keys.INGRESS_GROUP, *(e.id for e in entries))
            t1 = time.perf_counter()
            results = await pipe.execute(raise_on_error=False)
        _ROUTE_MS.observe((time.perf_counter() - t1) * 1000.0)
        await self._after(view, routed, refused, malformed, results)

    async def _check_blobs(self, checked: list[wire.Request | Exception]) -> None:
        """Replace each blob request whose blob is missing or of the wrong length by its ``BadTensor``;
        one pipelined round trip, and none at all for a batch without blob requests."""
        blobs = [(i, got) for i, got in enumerate(checked) if isinstance(got, wire.Request) and got.blob is not None]
        if not blobs:
            return
        async with self.r.pipeline(transaction=False) as pipe:
            for _, req in blobs:
                assert req.blob is not None and req.budget_ms is not None
                pipe.strlen(req.blob)
                pipe.pexpire(req.blob, max(1, int(req.budget_ms + self.blob_margin_ms)))
            answers = await pipe.execute(raise_on_error=False)
        for k, (i, req) in enumerate(blobs):
            strlen = answers[2 * k]
            if isinstance(strlen, TRANSIENT):
                raise strlen
            err = blob_error(req, strlen)
            if err is not None:
                checked[i] = err

    def _route(self, pipe: Any, view: PlanView, req: wire.Request, received: float) -> None:
        """Queue the XADD of a valid request to its group stream, or raise ``Overloaded``/``BadCut``."""
        assert req.budget_ms is not None
        spec = route(view, req.model, req.cut, req.budget_ms)
        if self.shedding:
            decision = self.policy.admit(spec.id, req.budget_ms)
            if decision.shed:
                self.stats.record_shed(req.model, req.cut, req.budget_ms)
                raise Overloaded(
                    f"group {spec.id} has {self.backlogs.backlog(spec.id)} requests queued "
                    f"(≈{decision.wait_ms:.0f} ms wait + {spec.latency_ms:.0f} ms batch ≥ "
                    f"budget {req.budget_ms:.0f} ms)",
                    retry_after_ms=decision.retry_after_ms, group=spec.id)
        req.received = received
        req.deadline = received + req.budget_ms / 1000.0
        pipe.xadd(view.stream(spec.id), {keys.FIELD: wire.encode_request(req)},
                  maxlen=self.settings.stream_maxlen, approximate=True)

    async def _refuse(self, pipe: Any, view: PlanView, entry: Entry, exc: Exception, received: float,
                      refused: list[tuple[str, wire.Reply]], malformed: list[tuple[Entry, GraftError]], *,
                      blob: bool | None = None) -> None:
        """Queue the error reply of a refused entry (and the deletion of its blob), or mark it malformed."""
        err = exc if isinstance(exc, GraftError) else InternalError(f"ingress failed: {exc!r}")
        if not isinstance(exc, GraftError):
            log.error(Event.REQUEST_REJECTED, ingress=self.name, entry_id=entry.id, exc_info=exc)
        ids = answerable_ids(entry.payload)
        if ids is None:
            malformed.append((entry, err))
            return
        req_id, client = ids
        rep = wire.Reply.failure(req_id, err, server_ms=(time.time() - received) * 1000.0, epoch=view.epoch)
        refused.append((client, rep))
        await self.replies.add(pipe, client, rep)
        if blob if blob is not None else wire.peek_blob(entry.payload):
            pipe.delete(keys.blob(req_id))
        if not isinstance(err, Overloaded):
            self.stats.record_rejected(str(err.code))

    async def _after(self, view: PlanView, routed: list[tuple[wire.Request, int]],
                     refused: list[tuple[str, wire.Reply]], malformed: list[tuple[Entry, GraftError]],
                     results: list[Any]) -> None:
        failed = [(req, results[pos]) for req, pos in routed if isinstance(results[pos], Exception)]
        if any(isinstance(res, TRANSIENT) for _, res in failed):
            raise next(res for _, res in failed if isinstance(res, TRANSIENT))
        if failed:
            # Acked already, so answer now rather than lose them: the write itself failed (e.g. OOM).
            log.error(Event.BATCH_FAILED, ingress=self.name, failed=len(failed), error=repr(failed[0][1]))
            await self.replies.send_many(
                (req.client, wire.Reply.failure(req.req_id, InternalError(f"routing failed: {res}"),
                                                epoch=view.epoch))
                for req, res in failed)
            blobs = [req.blob for req, _ in failed if req.blob is not None]
            if blobs:
                await self.r.delete(*blobs)
        self.routed_total += len(routed) - len(failed)
        self.replied_total += len(refused)
        _OK.inc(len(routed) - len(failed))
        for client, rep in refused:
            assert rep.error is not None
            self._outcome(rep.error.code).inc()
            if rep.error.code == str(Overloaded.code):
                log.info(Event.REQUEST_SHED, req_id=rep.req_id, client=client, group=rep.error.details.get("group"),
                         retry_after_ms=rep.error.details.get("retry_after_ms"))
            else:
                log.info(Event.REQUEST_REJECTED, req_id=rep.req_id, client=client, code=rep.error.code,
                         error=rep.error.message)
        for entry, err in malformed:
            log.warning(Event.MALFORMED, ingress=self.name, entry_id=entry.id, code=str(err.code), error=err.message)
            await dead_letter(self.r, keys.INGRESS, keys.INGRESS_GROUP, entry.id, entry.payload, err,
                              deliveries=entry.deliveries, consumer=self.name)
            _MALFORMED.inc()
            self.stats.record_rejected("MALFORMED")
            self.dead_lettered_total += 1

    async def _on_dead_lettered(self, entry: Entry, error: GraftError) -> None:
        """A poison entry (delivered too often) went to the dead letters: answer it if we can."""
        ids = answerable_ids(entry.payload)
        self.dead_lettered_total += 1
        if ids is not None:
            epoch = self.view.epoch if self.view is not None else None
            await self.replies.send(ids[1], wire.Reply.failure(ids[0], error, epoch=epoch))
            if wire.peek_blob(entry.payload):
                await self.r.delete(keys.blob(ids[0]))

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
        polled = await poll_backlogs(self.r, view.streams())
        self.backlogs.update(polled, since=mark)
        for gid, n in polled.items():
            QUEUE_LAG.labels(group=gid).set(n)

    async def flush_stats(self) -> None:
        body = self.stats.flush(time.time())
        await self.r.xadd(keys.STATS, {keys.FIELD: wire.encode_message("stats", body)},
                          maxlen=STATS_MAXLEN, approximate=True)

    async def heartbeat(self) -> None:
        status = {
            "service": SERVICE, "name": self.name, "ts": time.time(), "pid": os.getpid(),
            "epoch": None if self.view is None else self.view.epoch,
            "waiting_epoch": None if self._waiting is None else self._waiting.epoch, "routed": self.routed_total,
            "replied": self.replied_total, "dead_lettered": self.dead_lettered_total,
        }
        await self.r.set(keys.health(SERVICE, self.name), wire.encode_message("health", status), ex=HEARTBEAT_TTL_S)

    async def trim_ingress(self) -> None:
        await trim(self.r, keys.INGRESS, max_age_ms=self.settings.max_slo_ms, maxlen=self.settings.stream_maxlen)

    # ------------------------------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; the batch in hand is finished before returning."""
        stop = stop or asyncio.Event()
        log.info(Event.SERVICE_STARTED, service=SERVICE, ingress=self.name, metrics_port=self.metrics_port)
        hb = asyncio.create_task(self._every(self.heartbeat_s, stop, self.heartbeat))
        side: list[asyncio.Task[None]] = []
        try:
            if not await self._first_plan(stop):
                return
            consumer = StreamConsumer(
                self.r, keys.INGRESS, keys.INGRESS_GROUP, self.name, count=self.count, block_ms=self.block_ms,
                max_deliveries=self.settings.max_deliveries, on_dead_lettered=self._on_dead_lettered,
            )
            reaper = Reaper(self.r, keys.INGRESS, keys.INGRESS_GROUP, self.name, min_idle_ms=RECLAIM_IDLE_MS,
                            max_deliveries=self.settings.max_deliveries, on_claimed=self.handle_batch,
                            on_dead_lettered=self._on_dead_lettered, count=self.count, interval_s=2.0)
            side = [asyncio.create_task(c) for c in (
                self._every(self.plan_interval_s, stop, self._poll_plan),
                self._every(self.shed_interval_s, stop, self.poll_backlog),
                self._every(self.stats_interval_s, stop, self.flush_stats),
                self._every(self.trim_interval_s, stop, self.trim_ingress),
                reaper.run(stop),
            )]
            self.ready.set()
            await consumer.run(self.handle_batch, stop=stop, auto_ack=False)
        finally:
            stop.set()
            for task in [*side, hb]:
                task.cancel()
            await asyncio.gather(*side, hb, return_exceptions=True)
            with contextlib.suppress(*TRANSIENT):
                if self.view is not None:
                    await self.flush_stats()
                await self.r.delete(keys.health(SERVICE, self.name))
            log.info(Event.SERVICE_STOPPED, service=SERVICE, ingress=self.name, routed=self.routed_total)
