"""One replica of one group: ``python -m services.worker.replica --epoch E --group GID --device D --index I``.

The process serves the group stream ``graft:group:{E}:{GID}`` as consumer ``{D}-{GID}-{I}`` of
``keys.WORKER_GROUP`` (a stable name: a restarted replica re-reads its own pending entries first). It
loads only the blocks its group needs, batches by deadline (``loop.BatchLoop``), and keeps four helpers
running beside the loop: the reader, the reaper (entries a dead consumer held), the plan watcher that
drains the replica once a newer epoch has taken over, and the heartbeat. Trimming runs with the reaper.

Once a newer epoch is current the replica drains its stream and exits 0 (rule in ``drain.py``); a
retired stream gets a TTL so it disappears once nothing can need it any more.

Blob requests: whatever one read (or one reaper claim) brings in, the replica GETs the blobs of in one
pipelined round trip before queueing the jobs (``intake.py`` says how a missing blob is answered), and
deletes each blob in the pipeline that sends the request's reply and XACKs its entry — never before,
so a replica restarted on its own pending entries, or a reaper that reclaims them, reads them again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from common.contract import keys, wire
from common.contract.errors import GraftError, InternalError
from common.contract.routing import GroupSpec, PlanView
from common.logs import Event, bind, configure
from common.metrics import DEAD_LETTERS, PLAN_EPOCH, QUEUE_LAG, RECLAIMED, HealthServer
from common.model.executor import FragmentRunner
from common.settings import Settings
from common.store.plan_store import load_plan
from common.store.reaper import Reaper
from common.store.replies import ReplySender
from common.store.streams import TRANSIENT, Backoff, Entry, StreamConsumer, connect, dead_letter, trim
from services.lifecycle import run_loop
from services.worker.device import Device, DeviceError
from services.worker.drain import Backlog, find_plan, ingresses_past, is_drained, read_backlog, redis_now_ms
from services.worker.intake import Intake, Job, Rejection
from services.worker.latency import load_latency_model
from services.worker.loop import BatchLoop, Done
from services.worker.supervisor import EXIT_CONFIG, EXIT_CRASH, EXIT_OK, cancel_tasks

# A lazy proxy (no .bind at import): it must pick up the configuration main() sets later.
log = structlog.get_logger("worker.replica")

HEARTBEAT_TTL_S = 5
TRIM_EVERY_S = 30.0
SINK_RETRIES = 5


class ReplicaConfigError(RuntimeError):
    """The replica's epoch, group or model cannot be served (exit code 2: restarting will not help)."""


class StoppedDuringSetup(Exception):
    """SIGTERM arrived before the replica could serve: nothing to drain, exit 0."""


def consumer_name(device: str, group: str, index: int) -> str:
    return f"{device}-{group}-{index}"


class Replica:
    def __init__(self, settings: Settings, *, epoch: int, group: str, device: str = "cpu0", index: int = 0,
                 share: int | None = None, redis: Any | None = None, metrics_port: int = 0,
                 plan_poll_s: float = 0.5, drain_quiet_s: float = 1.0, reap_idle_ms: int | None = None,
                 heartbeat_s: float = 1.0) -> None:
        self.settings = settings
        self.epoch, self.group, self.index = epoch, group, index
        self.device = Device.parse(device)
        self.share = share
        self.consumer = consumer_name(self.device.name, group, index)
        self.stream = keys.group_stream(epoch, group)
        self._redis: Any = redis
        self._own_redis = redis is None
        self._metrics_port = metrics_port
        self._plan_poll_s = plan_poll_s
        self._drain_quiet_s = drain_quiet_s
        self._reap_idle_ms = reap_idle_ms
        self._heartbeat_s = heartbeat_s
        self._stop = asyncio.Event()  # stop reading; the loop finishes its queue
        self._closed = asyncio.Event()  # the loop is done: heartbeats end too
        self.state = "starting"
        self.draining = False
        self._switch_seen = 0.0
        self.exit_code = EXIT_OK
        self.spec: GroupSpec | None = None
        self.loop: BatchLoop | None = None
        self.reclaimed = 0
        self.dead_lettered = 0
        self.health_port: int | None = None
        self.intake: Intake  # set up once the plan and the model are loaded
        self.sender: ReplySender

    def stop(self) -> None:
        if not self._stop.is_set():
            log.info("replica_stopping", consumer=self.consumer)
            self.state = "stopping"
        self._stop.set()
        if self.loop is not None:
            self.loop.wake()

    # ---------------------------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        bind(epoch=self.epoch, group=self.group, consumer=self.consumer)
        r = self._redis if self._redis is not None else self._connect()
        self._redis = r
        health = await HealthServer(self._ready, host=self.settings.metrics_host, port=self._metrics_port).start()
        self.health_port = health.port
        beat = asyncio.create_task(self._heartbeat(r), name=f"{self.consumer}-heartbeat")
        helpers: list[asyncio.Task[None]] = []
        try:
            loop, consumer = await self._setup(r)
            # Announce readiness in the stream itself: the ingress switches to a new plan only once
            # each of its group streams has a consumer (XREADGROUP alone creates none on an empty
            # stream before Redis 7.2).
            await r.xgroup_createconsumer(self.stream, keys.WORKER_GROUP, self.consumer)
            log.info(Event.SERVICE_STARTED, consumer=self.consumer, stream=self.stream, metrics_port=health.port,
                     batch=loop.max_batch, share=self.share, latency=loop.latency.source)
            self.state = "serving"
            reaper = Reaper(r, self.stream, keys.WORKER_GROUP, self.consumer, min_idle_ms=self._min_idle_ms(),
                            max_deliveries=self.settings.max_deliveries, on_claimed=self._on_claimed,
                            on_dead_lettered=self._on_dead_lettered)
            helpers = [asyncio.create_task(coro, name=f"{self.consumer}-{name}") for name, coro in (
                ("reader", self._read_loop(consumer)), ("reaper", self._reap_loop(r, reaper)),
                ("plan", self._watch_plan(r)))]
            for task in helpers:
                task.add_done_callback(self._helper_done)
            await loop.run(self._stop)
        except ReplicaConfigError as exc:
            log.error("replica_config_error", consumer=self.consumer, error=str(exc))
            self.exit_code = EXIT_CONFIG
        except StoppedDuringSetup:
            pass
        finally:
            self._stop.set()
            self._closed.set()
            await cancel_tasks([*helpers, beat])
            with contextlib.suppress(*TRANSIENT, GraftError):
                await r.delete(keys.health("replica", self.consumer))
            await health.stop()
            if self._own_redis:
                await r.aclose()
        log.info(Event.SERVICE_STOPPED, consumer=self.consumer, exit_code=self.exit_code, drained=self.draining)
        return self.exit_code

    def _helper_done(self, task: asyncio.Task[None]) -> None:
        """A helper that dies leaves a replica that looks alive but no longer reads: crash instead."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("replica_helper_failed", task=task.get_name(), exc_info=task.exception())
        self.exit_code = EXIT_CRASH
        self.stop()

    def _connect(self) -> Any:
        if not self.settings.redis_url:
            raise ReplicaConfigError("REDIS_URL is not set")
        return connect(self.settings.redis_url, settings=self.settings, client_name=self.consumer)

    async def _find_plan(self, r: Any) -> PlanView | None:
        """``find_plan``, waiting out a Redis that is not up yet (replicas may start before it)."""
        backoff = Backoff(base=0.1, cap=2.0)
        while True:
            try:
                return await find_plan(r, self.epoch)
            except TRANSIENT as exc:
                if self._stop.is_set():
                    raise StoppedDuringSetup from exc
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, error=repr(exc), during="startup", retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)

    async def _setup(self, r: Any) -> tuple[BatchLoop, StreamConsumer]:
        plan = await self._find_plan(r)
        if plan is None:
            raise ReplicaConfigError(f"no published plan has epoch {self.epoch}")
        spec = plan.groups.get(self.group)
        if spec is None:
            raise ReplicaConfigError(f"plan epoch {self.epoch} has no group {self.group!r}")
        self.spec = spec
        self.share = self.share if self.share is not None else spec.share
        PLAN_EPOCH.labels(service="replica").set(self.epoch)
        torch_device = self._torch_device()
        weights = Path(self.settings.weights_dir) / f"{spec.model}.pt" if self.settings.weights_dir else None
        if weights is not None and not weights.exists():
            # An empty or partial GRAFT_WEIGHTS_DIR is allowed: models without a file get the seeded weights.
            log.warning("weights_missing", model=spec.model, path=str(weights), using="seeded random weights")
        try:
            runner = await asyncio.to_thread(
                FragmentRunner, spec.model, min_cut=spec.min_cut, resolution=self.settings.resolution or None,
                device=torch_device, weights=weights if weights is not None and weights.exists() else None,
                seed=self.settings.seed)
        except (GraftError, ValueError) as exc:
            raise ReplicaConfigError(f"cannot build {spec.model} from cut {spec.min_cut}: {exc}") from exc
        await asyncio.to_thread(self._warm_up, runner, spec)
        latency = load_latency_model(self.settings, plan, spec, runner.n_blocks)
        self.intake = Intake(runner.info, spec, max_tensor_bytes=self.settings.max_tensor_bytes,
                             max_budget_s=self.settings.max_slo_ms / 1000.0)
        self.sender = ReplySender(r)
        self.loop = BatchLoop(runner, latency, self._finish, max_batch=spec.batch, epoch=self.epoch, group=self.group,
                              eager=self.settings.batching == "eager")
        consumer = StreamConsumer(r, self.stream, keys.WORKER_GROUP, self.consumer, count=spec.batch,
                                  block_ms=self.settings.block_ms, max_deliveries=self.settings.max_deliveries,
                                  on_dead_lettered=self._on_dead_lettered)
        await consumer.setup()
        return self.loop, consumer

    def _torch_device(self) -> str:
        if not self.device.is_gpu:
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        log.warning("cuda_unavailable", device=self.device.name, fallback="cpu")
        return "cpu"

    @staticmethod
    def _warm_up(runner: FragmentRunner, spec: GroupSpec) -> None:
        """One request per served cut, so lazy initialisation never lands on a real batch."""
        items = [(c, np.zeros(runner.info.cut_shape(c), dtype=np.float32)) for c in spec.cuts
                 if spec.min_cut <= c < runner.n_blocks]
        runner.run_numpy(items)

    def _min_idle_ms(self) -> int:
        if self._reap_idle_ms is not None:
            return self._reap_idle_ms
        worst_ms = 2.0 * (self.spec.latency_ms if self.spec is not None else 0.0)
        return int(max(worst_ms, 1000.0))

    async def _ready(self) -> bool:
        return self.state in ("serving", "draining") and self._redis is not None and bool(await self._redis.ping())

    # ------------------------------------------------------------------------------ reading and reaping

    @property
    def capacity(self) -> int:
        # Read little ahead: entries left in the stream can still go to another replica of the group.
        return 2 * (self.spec.batch if self.spec is not None else 1)

    async def _read_loop(self, consumer: StreamConsumer) -> None:
        assert self.loop is not None
        backoff = Backoff()
        while not self._stop.is_set():
            await self.loop.wait_for_space(self.capacity)
            try:
                entries = await consumer.read(count=max(1, self.capacity - self.loop.size))
                backoff.reset()
                await self._admit(entries)
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, stream=self.stream, error=repr(exc), retry_in_s=round(delay, 3))
                consumer.recover()
                await asyncio.sleep(delay)

    async def _admit(self, entries: list[Entry], *, claimed: bool = False) -> None:
        assert self.loop is not None
        now = time.time()
        rejected: list[Rejection] = []
        expired: list[Job] = []
        ready: list[Job] = []
        for entry in entries:
            if self.loop.holds(entry.id):
                continue
            got = self.intake.admit(entry.id, entry.payload, now=now, deliveries=entry.deliveries)
            if isinstance(got, Rejection):
                rejected.append(got)
            elif (claimed or got.needs_blob) and got.deadline <= now:
                expired.append(got)  # a late blob request is answered without fetching its blob
            else:
                ready.append(got)
        blob_jobs = [j for j in ready if j.needs_blob]
        if blob_jobs:
            # Before anything is queued or answered: if this raises, the entries are read again.
            fetched = await self._fetch_blobs(blob_jobs)
            for job, data in zip(blob_jobs, fetched, strict=True):
                if self.intake.blob_expired(job, data, now):
                    expired.append(job)
                    continue
                got = self.intake.attach(job, data)
                if isinstance(got, Rejection):
                    rejected.append(got)
            ready = [j for j in ready if not j.needs_blob]
        for job in ready:
            self.loop.add(job)
        done: list[Done] = []
        for rej in rejected:
            await self._reject(rej, done)
        if done:
            await self._finish(done)
        if expired:
            await self.loop.expire(expired, now)

    async def _fetch_blobs(self, jobs: list[Job]) -> list[Any]:
        """The bytes of each job's blob (None where it is gone), in one pipelined round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.get(job.blob)
            got: list[Any] = await pipe.execute(raise_on_error=False)
        for res in got:
            if isinstance(res, TRANSIENT):
                raise res
        return got

    async def _reject(self, rej: Rejection, done: list[Done]) -> None:
        log.warning(Event.MALFORMED, entry_id=rej.entry_id, req_id=rej.req_id, code=str(rej.error.code),
                    error=rej.error.message)
        if rej.req_id is not None and rej.client is not None:
            done.append(Done(rej.entry_id, rej.client, wire.Reply.failure(
                rej.req_id, rej.error, server_ms=(time.time() - rej.received) * 1000.0, epoch=self.epoch,
                group=self.group), rej.blob))
        else:
            await dead_letter(self._redis, self.stream, keys.WORKER_GROUP, rej.entry_id, rej.payload, rej.error,
                              consumer=self.consumer)
            self._count_dead()

    async def _on_claimed(self, entries: list[Entry]) -> None:
        assert self.loop is not None
        fresh = [e for e in entries if not self.loop.holds(e.id)]
        if fresh:
            self.reclaimed += len(fresh)
            RECLAIMED.labels(group=self.group).inc(len(fresh))
            log.info(Event.RECLAIMED, stream=self.stream, count=len(fresh))
            await self._admit(fresh, claimed=True)

    async def _on_dead_lettered(self, entry: Entry, error: GraftError) -> None:
        """A poison entry still owes its client a reply, when its ids can be read."""
        self._count_dead()
        req_id, client = wire.peek_ids(entry.payload) if entry.payload is not None else (None, None)
        if req_id is not None and client is not None:
            exc = error if isinstance(error, GraftError) else InternalError(str(error))
            await self.sender.send(client, wire.Reply.failure(req_id, exc, epoch=self.epoch, group=self.group))
            if entry.payload is not None and wire.peek_blob(entry.payload):
                await self._redis.delete(keys.blob(req_id))

    def _count_dead(self) -> None:
        self.dead_lettered += 1
        DEAD_LETTERS.labels(stream=self.stream).inc()

    async def _reap_loop(self, r: Any, reaper: Reaper) -> None:
        backoff = Backoff()
        last_trim = time.monotonic()
        while not self._stop.is_set():
            delay = reaper.interval_s
            try:
                await self._touch_held(r)
                await reaper.reap_once()
                if time.monotonic() - last_trim >= TRIM_EVERY_S:
                    last_trim = time.monotonic()
                    await trim(r, self.stream, max_age_ms=self.settings.max_slo_ms, maxlen=self.settings.stream_maxlen)
                backoff.reset()
            except TRANSIENT as exc:
                delay = backoff.next()
                log.warning(Event.REDIS_RECONNECT, stream=self.stream, error=repr(exc), during="reap")
            await asyncio.sleep(delay)

    async def _touch_held(self, r: Any) -> None:
        """Reset the idle time of entries we hold, so no reaper takes them while they wait in our queue.

        XCLAIM ... JUSTID to ourselves changes no owner and, with JUSTID, no delivery count.
        """
        assert self.loop is not None
        held = self.loop.held()
        if held:
            await r.xclaim(self.stream, keys.WORKER_GROUP, self.consumer, 0, held, justid=True)

    # ------------------------------------------------------------------------------------- replies

    async def _finish(self, done: list[Done]) -> None:
        """Replies, XACKs and blob deletions of a batch in one pipelined round trip (in that order: a blob
        goes only after its reply and ack); retried, since replies are idempotent and DEL is too."""
        backoff = Backoff(base=0.05, cap=1.0)
        blobs = [d.blob for d in done if d.blob is not None]
        for attempt in range(SINK_RETRIES):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for d in done:
                        if d.client is not None:
                            await self.sender.add(pipe, d.client, d.reply)
                    pipe.xack(self.stream, keys.WORKER_GROUP, *[d.entry_id for d in done])
                    if blobs:
                        pipe.delete(*blobs)
                    await pipe.execute()
                return
            except TRANSIENT as exc:
                log.warning(Event.REDIS_RECONNECT, stream=self.stream, error=repr(exc), during="reply",
                            attempt=attempt + 1)
                await asyncio.sleep(backoff.next())
        # Still pending under our name: the consumer re-reads them after it reconnects.
        log.error("replies_not_sent", stream=self.stream, count=len(done))

    # ------------------------------------------------------------------------------- plan and drain

    async def _watch_plan(self, r: Any) -> None:
        while not self._stop.is_set():
            try:
                view = await load_plan(r)
                if view is not None and view.epoch > self.epoch and not self.draining:
                    self.draining, self.state = True, "draining"
                    self._switch_seen = time.monotonic()
                    log.info(Event.PLAN_SWITCHED, epoch=view.epoch, draining_epoch=self.epoch)
                backlog = await read_backlog(r, self.stream, keys.WORKER_GROUP)
                if backlog is not None:
                    QUEUE_LAG.labels(group=self.group).set(backlog.total)
                if self.draining and await self._drained(r, backlog):
                    log.info(Event.GROUP_DRAINED, stream=self.stream)
                    await r.expire(self.stream, int(self.settings.max_slo_ms / 1000.0) + 60)
                    self.stop()
                    return
            except TRANSIENT as exc:
                log.warning(Event.REDIS_RECONNECT, error=repr(exc), during="plan")
            await asyncio.sleep(self._plan_poll_s / 2 if self.draining else self._plan_poll_s)

    async def _drained(self, r: Any, backlog: Backlog | None) -> bool:
        assert self.loop is not None
        # However long the stream has been idle, give every ingress time to notice the new plan too.
        if not self.loop.idle or time.monotonic() - self._switch_seen < self._drain_quiet_s:
            return False
        if not await ingresses_past(r, self.epoch):
            return False
        return is_drained(backlog, now_ms=await redis_now_ms(r), quiet_s=self._drain_quiet_s)

    # ------------------------------------------------------------------------------------ heartbeat

    def status(self) -> dict[str, Any]:
        loop = self.loop
        return {"service": "replica", "name": self.consumer, "pid": os.getpid(), "ts": time.time(),
                "epoch": self.epoch, "group": self.group, "device": self.device.name, "index": self.index,
                "share": self.share, "state": self.state, "metrics_port": self.health_port,
                "queued": 0 if loop is None else loop.size, "batches": 0 if loop is None else loop.batches,
                "served": 0 if loop is None else loop.served, "expired": 0 if loop is None else loop.expired,
                "reclaimed": self.reclaimed, "dead_lettered": self.dead_lettered,
                "latency": None if loop is None else {"source": loop.latency.source, "ratio": loop.latency.ratio}}

    async def _heartbeat(self, r: Any) -> None:
        key = keys.health("replica", self.consumer)
        while not self._closed.is_set():
            with contextlib.suppress(*TRANSIENT):
                await r.set(key, wire.encode_message("health", self.status()), ex=HEARTBEAT_TTL_S)
            await asyncio.sleep(self._heartbeat_s)


# ------------------------------------------------------------------------------------------ process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.worker.replica", description=__doc__.splitlines()[0])
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--device", default="cpu0", help="gpuN, cpuN, NODE/gpuN or NODE/cpuN, as the plan names it")
    p.add_argument("--index", type=int, default=0, help="replica index of the group on its device")
    p.add_argument("--share", type=int, default=None, help="GPU percent or CPU threads (default: the plan's)")
    p.add_argument("--metrics-port", type=int, default=0)
    return p.parse_args(argv)


async def _serve(replica: Replica) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, replica.stop)
    return await replica.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_env()
    configure(settings.log_format, settings.log_level)
    try:
        device = Device.parse(args.device)
    except DeviceError as exc:
        log.error("replica_config_error", error=str(exc))
        return EXIT_CONFIG
    if not device.is_gpu and args.share:
        # The agent sized OMP_NUM_THREADS too; set_num_threads also covers pools torch made before.
        torch.set_num_threads(max(1, args.share))
    replica = Replica(settings, epoch=args.epoch, group=args.group, device=args.device, index=args.index,
                      share=args.share, metrics_port=args.metrics_port)
    try:
        return run_loop(_serve(replica))
    except ReplicaConfigError as exc:
        log.error("replica_config_error", error=str(exc))
        return EXIT_CONFIG
    except Exception:
        log.exception("replica_crashed", consumer=replica.consumer)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
