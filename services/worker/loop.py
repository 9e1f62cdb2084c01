"""A replica's serving loop: EDF queue → deadline-aware batches → re-aligned execution → replies.

The loop owns the queue of admitted jobs and asks the shared ``BatchPolicy`` what to do: drop the
requests that can no longer make it (``DEADLINE_EXCEEDED``), launch a batch when it is full or the
head's slack has run out, otherwise sleep until the policy's wait expires or a request arrives. One
batch runs at a time (a replica is one share of one device), in a thread, so the event loop keeps
reading, reaping and heartbeating meanwhile. Every measured batch corrects the latency model, and the
policy is rebuilt from it (the policy caches single-request latencies, which must follow the model).
A batch is measured as the runner times it (``common.model.timing``: the compute span, synchronised,
the quantity the profile holds), so the model's ``measured / profile`` ratio compares like with like;
the host↔device copies are reported apart (``copy_ms``), and what the wall clock saw beyond the
compute span (copies, the thread handoff) joins the launch margin instead.

Replies leave through ``sink``: the replica sends a batch's replies, XACKs its entries and deletes the
blobs of blob requests in one pipelined round trip, while the next batch already runs (at most one
batch's replies are outstanding; ``run`` returns only once they are written). The loop never talks to
Redis itself, so it runs against a list in unit tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import structlog

from common.batching import BatchPolicy, EdfQueue, Pending
from common.contract import wire
from common.contract.errors import DeadlineExceeded, GraftError, InternalError
from common.logs import Event
from common.metrics import BATCH_SIZE, REQUESTS, SLO, STAGE_MS
from services.worker.intake import Job
from services.worker.latency import LatencyModel

log = structlog.get_logger("worker.loop")

IDLE_WAIT_S = 0.5  # nothing queued: re-check this often even without a wake-up
REPLY_S = 0.002  # starting guess of the reply round trip
JITTER_S = 0.005  # starting guess of how late a timer fires on a busy host
SAFETY_S = 0.001
INLINE_S = 0.001  # batches predicted to run at most this long run on the event loop, not in a thread


class Runner(Protocol):
    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[npt.NDArray[np.float32]]: ...


@runtime_checkable
class TimedRunner(Protocol):
    """A runner that times its own batches (``FragmentRunner``); others are timed by the wall clock."""

    @property
    def last_compute_s(self) -> float | None: ...

    @property
    def last_copy_s(self) -> float: ...


@dataclass(slots=True)
class Done:
    """One answered entry: ack ``entry_id`` on ``stream``; reply to ``client`` (None: nobody to answer);
    delete ``blob``. ``deadline``: the request's, so the reply ledger knows how long to remember it."""

    entry_id: str
    client: str | None
    reply: wire.Reply
    blob: str | None = None
    stream: str = ""
    deadline: float | None = None

    @classmethod
    def of(cls, job: Job, reply: wire.Reply) -> Done:
        reply.source = job.request.source
        return cls(job.entry_id, job.client, reply, job.blob, job.stream, job.deadline)


Sink = Callable[[list[Done]], Awaitable[None]]


class BatchLoop:
    def __init__(self, runner: Runner, latency: LatencyModel, sink: Sink, *, max_batch: int,
                 alpha: float = 0.2, eager: bool = True) -> None:
        self.runner = runner
        self.latency = latency
        self.sink = sink
        self.max_batch = max_batch
        self.group = ""  # the active group, for metrics labels ("" on standby)
        self.alpha = alpha
        self.eager = eager  # work-conserving (GRAFT_BATCHING=eager) or wait for the head's slack
        # Read the next batch while one runs: only for a group's sole replica (a sibling that is free
        # would otherwise find the entries this one holds; see room).
        self.read_ahead = False
        self._undecided = False  # entries were added that the loop has not decided on yet
        self.queue = EdfQueue()
        self.jobs: dict[str, Job] = {}  # job key (stream and entry id) -> job, queued or in flight
        self.in_flight: set[str] = set()
        # The policy launches a lone request at the last moment its slack allows, so the margin must
        # cover what happens after that moment: the reply round trip and a timer that fires late.
        self.reply_s = REPLY_S
        self.jitter_s = JITTER_S
        self.overhead_s = 0.0  # wall clock of a batch beyond its compute span (copies, thread handoff)
        self.policy = self._policy()
        self.batches = 0
        self.served = 0
        self.expired = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._replying: asyncio.Task[None] | None = None  # the last batch's replies being written

    @property
    def tail_s(self) -> float:
        """What every request of a batch waits for after its compute: the handoff back and the reply write."""
        return self.reply_s + self.overhead_s

    @property
    def margin_s(self) -> float:
        return self.tail_s + self.jitter_s + SAFETY_S

    def _policy(self) -> BatchPolicy:
        return BatchPolicy(self.max_batch, self.latency, margin_s=self.margin_s, tail_s=self.tail_s,
                           drop_early=True, eager=self.eager)

    def retarget(self, *, max_batch: int, latency: LatencyModel, group: str) -> None:
        """Serve with another batch size and latency model from the next decision on (a new assignment);
        queued jobs stay queued and are batched under the new rules."""
        self.max_batch, self.latency, self.group = max(1, max_batch), latency, group
        self.policy = self._policy()
        self._wake.set()

    def _woke_late(self, late_s: float) -> None:
        # A decaying peak, not a mean: one late timer is what makes a request miss.
        self.jitter_s = max(late_s, 0.95 * self.jitter_s, SAFETY_S)
        self.policy.margin_s = self.margin_s

    # -------------------------------------------------------------------------------- queue side

    @property
    def size(self) -> int:
        return len(self.jobs)

    @property
    def idle(self) -> bool:
        return not self.jobs

    def held(self) -> list[str]:
        return list(self.jobs)

    def holds(self, key: str) -> bool:
        """Whether the job ``key`` (``intake.job_key``: stream and entry id) is queued or in flight."""
        return key in self.jobs

    def add(self, job: Job) -> bool:
        """Queue a job; False when its entry is already held (a re-read or a reclaim of our own entry)."""
        if job.key in self.jobs:
            return False
        self.jobs[job.key] = job
        self.queue.add(job.pending)
        if not self.in_flight:
            self._undecided = True  # the reader waits for the decision (see room)
        self._wake.set()
        return True

    def wake(self) -> None:
        self._wake.set()

    def room(self, capacity: int) -> int:
        """How many more entries the reader may take now (at most ``capacity`` queued; 0: wait).

        While a batch runs a replica takes nothing: what arrives stays in the stream, a queue shared by
        the group's replicas, for the first one free to run it. A busy replica that read ahead would
        lock entries in its own queue while a sibling sat idle (two replicas reading eagerly get
        alternate entries, two separate queues; pulling when free makes one queue with two servers).
        A group's sole replica (``read_ahead``) has no sibling to starve: it reads the next batch while
        one runs, so reading, decoding and replying overlap the compute instead of adding to it.
        Entries just added wait for the loop's decision first: a read issued before the batch they
        join launches would block in Redis and take what arrives next from a free sibling."""
        if self._undecided or (self.in_flight and not self.read_ahead):
            return 0
        return capacity - (self.size - len(self.in_flight))

    async def wait_for_space(self, capacity: int) -> None:
        """Return when the reader may take new entries (``room``)."""
        while self.room(capacity) <= 0:
            self._space.clear()
            await self._space.wait()

    def _take(self, pendings: Sequence[Pending]) -> list[Job]:
        self.queue.discard(pendings)
        return [self.jobs[p.req_id] for p in pendings]

    def _release(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.jobs.pop(job.key, None)
            self.in_flight.discard(job.key)
        self._space.set()

    # --------------------------------------------------------------------------------- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set and the queue is empty (a stopping loop launches without waiting)."""
        try:
            await self._serve(stop)
        finally:
            await self.replied()

    async def replied(self) -> None:
        """Wait until the replies of the last batch are written (they go out while the next batch runs)."""
        task, self._replying = self._replying, None
        if task is not None:
            await task

    async def _serve(self, stop: asyncio.Event) -> None:
        while True:
            if stop.is_set() and not self.queue:
                return
            self._wake.clear()
            now = time.time()
            decision = self.policy.decide(self.queue, now)
            if decision.drop:
                await self.expire(self._take(decision.drop), now)
            launch = decision.launch
            if not launch and stop.is_set() and self.queue:
                launch = self.queue.pop_batch(self.max_batch)
            if launch:
                await self.execute(self._take(launch), overlap=True)
                continue
            if self._undecided:  # decided to hold what is queued: the reader may take more
                self._undecided = False
                self._space.set()
            if decision.drop:
                continue
            timeout = IDLE_WAIT_S if decision.wait_s is None else min(decision.wait_s, IDLE_WAIT_S)
            if stop.is_set():
                continue
            slept = time.perf_counter()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                self._woke_late(time.perf_counter() - slept - timeout)

    async def expire(self, jobs: Sequence[Job], now: float | None = None) -> None:
        """Answer ``DEADLINE_EXCEEDED`` to jobs that cannot (or did not) make their deadline."""
        if not jobs:
            return
        now = time.time() if now is None else now
        done = []
        for job in jobs:
            late_ms = round((now - job.deadline) * 1000.0, 3)
            exc = DeadlineExceeded(f"request cannot finish before its deadline (late by {max(late_ms, 0.0)} ms "
                                   f"or too little time left to run)", late_ms=late_ms)
            done.append(Done.of(job, self._failure(job, exc, now, None)))
        # One line for the lot (an overloaded replica may expire hundreds at once).
        log.info(Event.DEADLINE_EXCEEDED, count=len(jobs), req_ids=[j.req_id for j in jobs[:5]],
                 cuts=sorted({j.pending.cut for j in jobs}), late_ms_max=round((now - min(j.deadline for j in jobs)) * 1000.0, 3))
        self.expired += len(done)
        SLO.labels(group=self.group, met="false").inc(len(done))
        try:
            await self.sink(done)
        finally:
            self._release(jobs)

    async def execute(self, jobs: list[Job], *, overlap: bool = False) -> None:
        """Run one re-aligned batch and answer every job in it (an error reply if the batch fails).

        ``overlap``: return once the batch is computed and leave its replies to a task, so the next batch
        launches while they are written (the loop's way; at most one batch's replies are outstanding,
        the previous ones are awaited first). Otherwise return once they are written."""
        n = len(jobs)
        self.in_flight.update(j.key for j in jobs)
        self._undecided = False
        if self.read_ahead:
            self._space.set()  # the launched jobs left the queue: room for the next batch
        counts: dict[int, int] = {}
        for j in jobs:
            counts[j.pending.cut] = counts.get(j.pending.cut, 0) + 1
        predicted = self.latency.predict_s(counts)
        start = time.time()
        for j in jobs:
            STAGE_MS.labels(stage="queue").observe(max(0.0, start - j.received) * 1000.0)
        items = [(j.pending.cut, j.request.tensor) for j in jobs]
        try:
            t0 = time.perf_counter()
            if predicted <= INLINE_S:
                # A sub-millisecond batch costs less than the thread handoff it would wait for.
                outputs = self.runner.run_numpy(items)
            else:
                outputs = await asyncio.to_thread(self.runner.run_numpy, items)
            wall_s = time.perf_counter() - t0
        except Exception as exc:
            err = exc if isinstance(exc, GraftError) else InternalError(f"batch failed: {type(exc).__name__}: {exc}")
            log.exception(Event.BATCH_FAILED, size=n, composition=sorted(counts.items()), error=str(exc))
            now = time.time()
            SLO.labels(group=self.group, met="false").inc(n)
            try:
                await self.sink([Done.of(j, self._failure(j, err, now, n)) for j in jobs])
            finally:
                self._release(jobs)
            return
        compute_s, copy_s = self._measured(wall_s)
        STAGE_MS.labels(stage="compute").observe(compute_s * 1000.0)
        STAGE_MS.labels(stage="copy").observe(copy_s * 1000.0)
        BATCH_SIZE.labels(group=self.group).observe(n)
        self.latency.observe(counts, compute_s)
        self.overhead_s = (1 - self.alpha) * self.overhead_s + self.alpha * max(0.0, wall_s - compute_s)
        now = time.time()
        compute_ms = compute_s * 1000.0
        done = [Done.of(j, wire.Reply.result(
            j.req_id, out, server_ms=(now - j.received) * 1000.0, epoch=j.epoch, group=j.group, batch=n,
            timings=self._timings(j, start, compute_ms, copy_s * 1000.0)))
            for j, out in zip(jobs, outputs, strict=True)]
        await self.replied()
        reply = self._reply(jobs, done, predicted, compute_s, counts)
        if overlap:
            self._replying = asyncio.create_task(reply)
        else:
            await reply

    async def _reply(self, jobs: list[Job], done: list[Done], predicted: float, compute_s: float,
                     counts: dict[int, int]) -> None:
        n = len(jobs)
        t1 = time.perf_counter()
        try:
            await self.sink(done)
        finally:
            self._release(jobs)
        reply_s = time.perf_counter() - t1
        STAGE_MS.labels(stage="reply").observe(reply_s * 1000.0)
        finished = time.time()
        met = sum(1 for j in jobs if finished <= j.deadline)
        SLO.labels(group=self.group, met="true").inc(met)
        SLO.labels(group=self.group, met="false").inc(n - met)
        REQUESTS.labels(service="worker", outcome="ok").inc(n)
        self.reply_s = (1 - self.alpha) * self.reply_s + self.alpha * reply_s
        self.policy = self._policy()
        self.batches += 1
        self.served += n
        log.debug(Event.BATCH_DONE, size=n, composition=sorted(counts.items()), predicted_ms=round(predicted * 1e3, 3),
                  compute_ms=round(compute_s * 1e3, 3), reply_ms=round(reply_s * 1e3, 3), met=met)

    def _measured(self, wall_s: float) -> tuple[float, float]:
        """The batch's compute span and copies as the runner timed them; else the wall clock, no copies."""
        runner = self.runner
        if isinstance(runner, TimedRunner) and runner.last_compute_s is not None:
            return runner.last_compute_s, runner.last_copy_s
        return wall_s, 0.0

    @staticmethod
    def _timings(job: Job, start: float, compute_ms: float, copy_ms: float = 0.0) -> dict[str, float]:
        """Where the server time went: ingress + stream hop, the batching hold, the model itself, and the
        host↔device copies of its batch."""
        admitted = job.admitted or job.received
        return {"queue_ms": round(max(0.0, admitted - job.received) * 1000.0, 3),
                "wait_ms": round(max(0.0, start - admitted) * 1000.0, 3),
                "compute_ms": round(compute_ms, 3), "copy_ms": round(copy_ms, 3)}

    def _failure(self, job: Job, exc: GraftError, now: float, batch: int | None) -> wire.Reply:
        REQUESTS.labels(service="worker", outcome=str(exc.code)).inc()
        return wire.Reply.failure(job.req_id, exc, server_ms=(now - job.received) * 1000.0, epoch=job.epoch,
                                  group=job.group, batch=batch)
