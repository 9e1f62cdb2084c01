"""The replica against a real Redis: re-aligned batches, exact results, blobs, deadlines, recovery, and
the assignments that re-target it (consumer, streams, batch size, share, standby, stop).

The replica runs in-process (its ``run`` coroutine as a task, fed assignments through a queue standing
in for its stdin); requests are written to group streams as the ingress writes them, and the raw reply
streams are read back and compared with the whole model run locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from common.contract import keys, wire
from common.contract.errors import DeadlineExceeded, ErrorCode
from common.metrics import REGISTRY, http_get
from common.model.zoo import build_blocks
from common.settings import Settings
from common.store.backlog import read_backlog
from common.store.reaper import Reaper
from common.store.replies import ReplySender
from common.store.streams import ensure_group, list_dead_letters
from services.worker import replica as replica_mod
from services.worker.control import STOP, Assignment, Task
from services.worker.feed import Feed
from services.worker.replica import Replica
from tests.helpers import until
from tests.worker_helpers import (
    CLIENT,
    blob_request,
    live_replicas,
    put,
    put_blobs,
    raw_replies,
    replies,
    until_async,
)
from tests.worker_helpers import request as make_request

pytestmark = pytest.mark.timeout(60)

MODEL, RES = "resnet18", 32
CUTS = (0, 4, 8)
CONSUMER = "cpu0-resnet18-0"
S1 = keys.group_stream(1, "g0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def blocks() -> list[torch.nn.Module]:
    return build_blocks(MODEL, resolution=RES, seed=0)


def request(blocks: list[torch.nn.Module], req_id: str, cut: int, seed: int, **kw: Any) -> tuple[bytes, np.ndarray]:
    return make_request(blocks, MODEL, req_id, cut, seed, res=RES, **kw)


def blob(blocks: list[torch.nn.Module], req_id: str, cut: int, seed: int, **kw: Any) -> tuple[bytes, bytes, np.ndarray]:
    return blob_request(blocks, MODEL, req_id, cut, seed, res=RES, **kw)


def settings(url: str) -> Settings:
    return Settings(redis_url=url, resolution=RES, models=(MODEL,), max_deliveries=2, block_ms=50)


def task(epoch: int = 1, gid: str = "g0", *, batch: int = 8, latency_ms: float = 20.0,
         cuts: Sequence[int] = CUTS, replicas: int = 1) -> Task:
    return Task(epoch, gid, keys.group_stream(epoch, gid), batch, latency_ms, tuple(cuts), replicas)


def serving(t: Task, *draining: str, consumer: str = CONSUMER, share: int = 1) -> Assignment:
    return Assignment(0, consumer, share, t, (t.stream, *draining))


class Control:
    """The replica's stdin: assignments in, ``close()`` is end-of-file."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.seq = 0

    def send(self, a: Assignment) -> None:
        self.seq += 1
        self.q.put_nowait(Assignment(self.seq, a.consumer, a.share, a.active, a.streams, a.latency_scale).to_wire())

    def stop(self) -> None:
        self.q.put_nowait(dict(STOP))

    def close(self) -> None:
        self.q.put_nowait(None)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        while (msg := await self.q.get()) is not None:
            yield msg


async def start(url: str, assignment: Assignment | None, **kw: Any) -> tuple[Replica, asyncio.Task[int], Control]:
    replica = Replica(settings(url), name=kw.pop("name", "rep"), device="cpu0", model=MODEL, share=1, **kw)
    control = Control()
    run = asyncio.create_task(replica.run(control.messages()))
    deadline = time.monotonic() + 30
    while replica.state != "standby":
        assert not run.done(), f"replica exited early: {run.result()}"
        assert time.monotonic() < deadline, "replica did not load"
        await asyncio.sleep(0.02)
    if assignment is not None:
        control.send(assignment)
        await until(lambda: replica.assignment is not None and replica.assignment.seq == control.seq, 5, "assigned")
    return replica, run, control


@contextlib.asynccontextmanager
async def running(url: str, assignment: Assignment | None = None,
                  **kw: Any) -> AsyncIterator[tuple[Replica, asyncio.Task[int], Control]]:
    replica, run, control = await start(url, assignment if assignment is not None else serving(task()), **kw)
    try:
        yield replica, run, control
    finally:
        control.close()
        assert await asyncio.wait_for(run, 20) == 0


def exact(rep: wire.Reply, expected: np.ndarray) -> None:
    assert rep.ok and rep.tensor is not None, rep.error
    np.testing.assert_allclose(rep.tensor, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- serving


async def test_mixed_cuts_are_batched_realigned_and_exact(redis: Any, redis_url: str,
                                                          blocks: list[torch.nn.Module]) -> None:
    met_before = REGISTRY.get_sample_value("graft_slo_total", {"group": "g0", "met": "true"}) or 0.0
    async with running(redis_url) as (replica, _run, _control):
        burst = [request(blocks, f"r{i}", CUTS[i % 3], i) for i in range(16)]
        await put(redis, S1, [p for p, _ in burst])
        got = await replies(redis, 16)
        assert replica.health_port is not None
        status, body = await http_get("127.0.0.1", replica.health_port, "/metrics")
        assert status == 200 and b'graft_batch_size_bucket{group="g0"' in body
        assert (await http_get("127.0.0.1", replica.health_port, "/readyz"))[0] == 200
        live = (await live_replicas(redis))["rep"]
        assert live["state"] == "serving" and live["streams"] == [S1] and live["consumer"] == CONSUMER
        assert live["epoch"] == 1 and live["group"] == "g0" and live["batch"] == 8
    met = (REGISTRY.get_sample_value("graft_slo_total", {"group": "g0", "met": "true"}) or 0.0) - met_before
    assert met == 16
    for i, (_, expected) in enumerate(burst):
        rep = got[f"r{i}"]
        exact(rep, expected)
        assert rep.epoch == 1 and rep.group == "g0" and rep.server_ms > 0 and rep.source == f"r{i}-src"
        assert rep.timings is not None and rep.timings["compute_ms"] > 0
        parts = rep.timings["queue_ms"] + rep.timings["wait_ms"] + rep.timings["compute_ms"]
        assert parts <= rep.server_ms + 1.0  # the parts never exceed the whole (ms rounding aside)
    assert max(rep.batch or 0 for rep in got.values()) > 1
    big = [i for i in range(16) if (got[f"r{i}"].batch or 0) > 1]
    assert len({CUTS[i % 3] for i in big}) > 1, "a multi-request batch mixed cuts (re-aligned)"
    assert replica.loop is not None and replica.loop.latency.samples >= 1
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0
    assert "rep" not in await live_replicas(redis)  # left the registry on its way out


async def test_blob_requests_are_served_exactly_and_their_blobs_deleted(redis: Any, redis_url: str,
                                                                        blocks: list[torch.nn.Module]) -> None:
    async with running(redis_url) as (replica, _run, _control):
        assert replica.feed is not None
        fetches: list[int] = []
        fetch = replica.feed._fetch_blobs

        async def counting(jobs: list[Any]) -> list[Any]:
            fetches.append(len(jobs))
            return await fetch(jobs)

        replica.feed._fetch_blobs = counting  # type: ignore[method-assign]
        blobbed = [blob(blocks, f"b{i}", CUTS[i % 3], 60 + i) for i in range(6)]
        inline = [request(blocks, f"i{i}", CUTS[i % 3], 70 + i) for i in range(4)]
        await put_blobs(redis, {f"b{i}": data for i, (_, data, _) in enumerate(blobbed)})
        await put(redis, S1, [p for p, _, _ in blobbed] + [p for p, _ in inline])
        got = await replies(redis, 10)
    for rid, expected in [*((f"b{i}", e) for i, (_, _, e) in enumerate(blobbed)),
                          *((f"i{i}", e) for i, (_, e) in enumerate(inline))]:
        exact(got[rid], expected)
    assert sum(fetches) == 6 and len(fetches) < 6, f"blobs fetched per read, not per request: {fetches}"
    assert not await redis.exists(*(keys.blob(f"b{i}") for i in range(6)))  # deleted with the replies
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0


async def test_gone_or_wrong_blobs_are_answered_and_cleaned_up(redis: Any, redis_url: str,
                                                             blocks: list[torch.nn.Module]) -> None:
    async with running(redis_url):
        gone, _, _ = blob(blocks, "gone", 4, 1)  # never written (or deleted) before its deadline
        late, _, _ = blob(blocks, "late", 4, 2, budget_ms=200, age_s=1.0)  # expired with the deadline
        short, data, _ = blob(blocks, "short", 4, 3)
        fine, fine_data, expected = blob(blocks, "fine", 8, 4)
        await put_blobs(redis, {"short": data[:-4], "fine": fine_data})
        await put(redis, S1, [gone, late, short, fine])
        got = await replies(redis, 4)
    codes = {rid: rep.error.code if rep.error else "ok" for rid, rep in got.items()}
    assert codes == {"gone": ErrorCode.BAD_TENSOR, "late": ErrorCode.DEADLINE_EXCEEDED,
                     "short": ErrorCode.BAD_TENSOR, "fine": "ok"}
    short_err = got["short"].error
    assert short_err is not None and short_err.details["expected"] == len(data)
    assert short_err.details["got"] == len(data) - 4
    exact(got["fine"], expected)
    assert not await redis.exists(keys.blob("short"), keys.blob("fine"))
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0


async def test_expired_and_hopeless_requests_get_deadline_exceeded(redis: Any, redis_url: str,
                                                                    blocks: list[torch.nn.Module]) -> None:
    async with running(redis_url):
        late, _ = request(blocks, "late", 0, 1, budget_ms=500, age_s=1.0)  # deadline already passed
        hopeless, _ = request(blocks, "hopeless", 0, 2, budget_ms=0.001)  # no time to run even alone
        fine, _ = request(blocks, "fine", 8, 3, budget_ms=600)
        await put(redis, S1, [late, hopeless, fine])
        got = await replies(redis, 3)
    for rid in ("late", "hopeless"):
        assert not got[rid].ok and got[rid].error is not None
        assert got[rid].error.code == ErrorCode.DEADLINE_EXCEEDED
    assert got["fine"].ok


async def test_poison_and_malformed_entries(redis: Any, redis_url: str, blocks: list[torch.nn.Module]) -> None:
    await ensure_group(redis, S1, keys.WORKER_GROUP)
    poison, _ = request(blocks, "poison", 4, 20)
    [poison_id] = await put(redis, S1, [poison])
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-7", {S1: ">"}, count=1)
    # Delivered many times already (each earlier holder crashed on it).
    await redis.xclaim(S1, keys.WORKER_GROUP, "cpu0-resnet18-7", 0, [poison_id], retrycount=5, justid=True)
    async with running(redis_url) as (replica, run, _control):
        bad_shape = wire.encode_request(wire.Request("bad", "client-1", MODEL, 4, np.zeros((2, 2), np.float32),
                                                     budget_ms=1000, received=time.time(),
                                                     deadline=time.time() + 1))
        good, expected = request(blocks, "good", 8, 21, budget_ms=600)
        await put(redis, S1, [b"\x00garbage", bad_shape, good])
        got = await replies(redis, 3)  # the poison one is reclaimed once idle for 0.5 s
        assert not run.done()
        assert replica.feed is not None and replica.feed.dead_lettered == 2
    assert got["bad"].error is not None and got["bad"].error.code == ErrorCode.BAD_TENSOR
    exact(got["good"], expected)
    assert got["poison"].error is not None and got["poison"].error.code == ErrorCode.INTERNAL
    dead = await list_dead_letters(redis, S1)
    assert {d.entry_id for d in dead} >= {poison_id} and len(dead) == 2  # the poison and the garbage
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0


async def test_a_dead_letter_of_an_answered_submission_is_not_a_second_answer(
        redis: Any, redis_url: str, blocks: list[torch.nn.Module]) -> None:
    """A replica that answered an entry and died before its XACK leaves it pending; once it has been
    delivered too often it is dead-lettered with an error reply. That reply named the group entry as
    the submission, not the request's ``graft:ingress`` entry, so the reply ledger took it for a new
    submission and the client got two answers (seen once in overload-5x: 2,286 duplicates)."""
    await ensure_group(redis, S1, keys.WORKER_GROUP)
    answered, _ = request(blocks, "answered", 4, 22)
    [entry_id] = await put(redis, S1, [answered])
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-7", {S1: ">"}, count=1)
    await redis.xclaim(S1, keys.WORKER_GROUP, "cpu0-resnet18-7", 0, [entry_id], retrycount=5, justid=True)
    first = wire.Reply.failure("answered", DeadlineExceeded("answered before the crash"))
    first.source = "answered-src"  # as the replica that died wrote it: the ingress entry it answers
    await ReplySender(redis).send(CLIENT, first, time.time() + 5.0)
    async with running(redis_url) as (replica, _run, _control):
        await until_async(lambda: _pending(redis), 10, "the entry dead-lettered")
        assert replica.feed is not None and replica.feed.dead_lettered == 1
    rows = await redis.xrange(keys.reply_stream(CLIENT))
    answers = [wire.decode_reply(f[keys.FIELD]) for _, f in rows]
    assert [(a.req_id, a.source) for a in answers] == [("answered", "answered-src")]
    assert [d.entry_id for d in await list_dead_letters(redis, S1)] == [entry_id]


async def _pending(redis: Any) -> bool:
    return (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0


# --------------------------------------------------------------------------------------- recovery


async def test_blob_entries_survive_a_crash_and_are_recovered(redis: Any, redis_url: str,
                                                             blocks: list[torch.nn.Module]) -> None:
    await ensure_group(redis, S1, keys.WORKER_GROUP)
    work = [blob(blocks, f"c{i}", CUTS[i % 3], 80 + i) for i in range(4)]
    await put_blobs(redis, {f"c{i}": data for i, (_, data, _) in enumerate(work)})
    await put(redis, S1, [p for p, _, _ in work])
    # This slot's previous process took two, a replica that is gone for good took the others.
    await redis.xreadgroup(keys.WORKER_GROUP, CONSUMER, {S1: ">"}, count=2)
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-7", {S1: ">"}, count=2)
    assert await redis.exists(*(keys.blob(f"c{i}") for i in range(4))) == 4  # nobody deleted them early
    async with running(redis_url, serving(task(batch=2))) as (replica, _run, _control):
        got = await replies(redis, 4)
        assert replica.feed is not None and replica.feed.reclaimed == 2
    for i, (_, _, expected) in enumerate(work):
        exact(got[f"c{i}"], expected)
    assert not await redis.exists(*(keys.blob(f"c{i}") for i in range(4)))
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0


async def test_reaper_recovers_entries_of_a_dead_consumer(redis: Any, redis_url: str,
                                                         blocks: list[torch.nn.Module]) -> None:
    await ensure_group(redis, S1, keys.WORKER_GROUP)
    held = [request(blocks, f"held{i}", CUTS[i], 10 + i) for i in range(3)]
    await put(redis, S1, [p for p, _ in held])
    # A replica that took three entries and died before acking them.
    taken = await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-7", {S1: ">"}, count=3)
    assert len(taken[0][1]) == 3
    async with running(redis_url, serving(task(batch=3))) as (replica, _run, _control):
        got = await replies(redis, 3)
        assert replica.feed is not None and replica.feed.reclaimed == 3
    for i, (_, expected) in enumerate(held):
        exact(got[f"held{i}"], expected)
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0


async def test_a_slot_taken_over_first_serves_its_own_pending_entries(redis: Any, redis_url: str,
                                                                       blocks: list[torch.nn.Module]) -> None:
    await ensure_group(redis, S1, keys.WORKER_GROUP)
    mine = [request(blocks, f"mine{i}", CUTS[i], 40 + i, budget_ms=300_000) for i in range(2)]
    await put(redis, S1, [p for p, _ in mine])
    # The slot's previous process read them, then died; this standby is handed the slot (its name).
    await redis.xreadgroup(keys.WORKER_GROUP, CONSUMER, {S1: ">"}, count=2)
    # latency 30 s: the reaper waits 90 s before taking anything, so it cannot be the one (and the budget
    # covers that latency)
    async with running(redis_url, Assignment(0)) as (replica, _run, control):
        assert replica.state == "standby" and (await live_replicas(redis))["rep"]["state"] == "standby"
        control.send(serving(task(batch=2, latency_ms=30_000.0)))
        got = await replies(redis, 2)
        assert replica.feed is not None and replica.feed.reclaimed == 0
    assert all(got[f"mine{i}"].ok and got[f"mine{i}"].batch == 2 for i in range(2)), got
    exact(got["mine0"], mine[0][1])


class Slow:
    """The real runner, slower than a sibling reaper's idle threshold."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        return list(self.inner.run_numpy(items))


async def test_entries_held_in_a_slow_batch_are_not_stolen_by_a_sibling(redis: Any, redis_url: str,
                                                                        blocks: list[torch.nn.Module]) -> None:
    async with running(redis_url, serving(task(batch=1, replicas=2))) as (replica, _run, _control):
        assert replica.loop is not None
        replica.loop.runner = Slow(replica.loop.runner, 1.2)
        sibling = Reaper(redis, S1, keys.WORKER_GROUP, "cpu0-resnet18-5", min_idle_ms=300)
        ids = await put(redis, S1, [request(blocks, "slow", 8, 50)[0], request(blocks, "queued", 0, 51)[0]])
        stolen = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # well past the sibling's idle threshold, batch still running
            stolen += (await sibling.reap_once()).claimed
            await asyncio.sleep(0.1)
        assert stolen == []
        rows = await redis.xpending_range(S1, keys.WORKER_GROUP, min="-", max="+", count=10)
        # The batch in flight is held (re-stamped) by this replica; what came after it was not taken
        # while the batch ran, and stays in the stream for whichever replica is free first.
        assert [r["message_id"].decode() for r in rows] == ids[:1]
        assert all(r["consumer"] == CONSUMER.encode() and r["times_delivered"] == 1 for r in rows)
        got = await replies(redis, 2)
        assert replica.feed is not None and replica.feed.reclaimed == 0
    assert got["slow"].ok and got["queued"].ok
    assert len(await raw_replies(redis)) == 2


async def test_a_busy_replica_leaves_new_entries_to_a_free_sibling(redis: Any, redis_url: str,
                                                                   blocks: list[torch.nn.Module]) -> None:
    async with running(redis_url, serving(task(batch=4, replicas=2))) as (replica, _run, _control):
        assert replica.loop is not None and not replica.loop.read_ahead
        replica.loop.runner = Slow(replica.loop.runner, 1.0)
        first = await put(redis, S1, [request(blocks, "first", 8, 60)[0]])
        await until(lambda: bool(replica.loop and replica.loop.in_flight), 5, "the first batch running")
        later = await put(redis, S1, [request(blocks, f"later{i}", 8, 61 + i)[0] for i in range(3)])
        sibling = await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-7", {S1: ">"}, count=10)
        taken = [raw_id.decode() for _, rows in sibling for raw_id, _ in rows]
        assert taken == later  # a free sibling gets every entry that arrived during the batch
        got = await replies(redis, 1)
        assert got["first"].ok and len(first) == 1


async def test_a_groups_sole_replica_reads_the_next_batch_while_one_runs(redis: Any, redis_url: str,
                                                                      blocks: list[torch.nn.Module]) -> None:
    async with running(redis_url, serving(task(batch=4))) as (replica, _run, _control):
        assert replica.loop is not None and replica.loop.read_ahead
        replica.loop.runner = Slow(replica.loop.runner, 1.0)
        await put(redis, S1, [request(blocks, "first", 8, 60)[0]])
        await until(lambda: bool(replica.loop and replica.loop.in_flight), 5, "the first batch running")
        later = await put(redis, S1, [request(blocks, f"later{i}", 8, 61 + i)[0] for i in range(6)])
        # Held while the first batch still runs: one batch's worth (4), the rest left in the stream.
        await until(lambda: bool(replica.loop and replica.loop.size == 5), 5, "the next batch read ahead")
        assert replica.loop.in_flight and len(replica.loop.queue) == 4
        sibling = await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-resnet18-7", {S1: ">"}, count=10)
        assert [raw_id.decode() for _, rows in sibling for raw_id, _ in rows] == later[4:]
        got = await replies(redis, 5)
        assert all(got[k].ok for k in ("first", *(f"later{i}" for i in range(4))))
        assert got["later0"].batch == 4


# ------------------------------------------------------------------------------------ assignments


async def test_an_assignment_retargets_streams_batch_and_share_without_a_reload(
        redis: Any, redis_url: str, blocks: list[torch.nn.Module]) -> None:
    t2 = task(2, "g1", batch=4, cuts=(8,))
    async with running(redis_url, serving(task(batch=2))) as (replica, _run, control):
        runner = replica.runner
        # epoch 2: the new group active, the old stream drained meanwhile — entries in both are answered
        control.send(serving(t2, S1, share=2))
        await until(lambda: replica.assignment is not None and replica.assignment.active == t2, 5, "re-targeted")
        assert replica.runner is runner and replica.share == 2 and torch.get_num_threads() == 2
        assert replica.loop is not None and replica.loop.max_batch == 4 and replica.loop.group == "g1"
        assert sorted(replica.feed.streams) == sorted([t2.stream, S1])  # type: ignore[union-attr]
        old = [request(blocks, f"old{i}", 4, i) for i in range(3)]
        new = [request(blocks, f"new{i}", 8, 10 + i) for i in range(5)]
        await put(redis, S1, [p for p, _ in old])
        await put(redis, t2.stream, [p for p, _ in new])
        got = await replies(redis, 8)
        for i, (_, expected) in enumerate(old):
            exact(got[f"old{i}"], expected)
            assert (got[f"old{i}"].epoch, got[f"old{i}"].group) == (1, "g0")  # labelled by the stream it came from
        for i, (_, expected) in enumerate(new):
            exact(got[f"new{i}"], expected)
            assert (got[f"new{i}"].epoch, got[f"new{i}"].group) == (2, "g1")
        assert max(r.batch or 0 for r in got.values()) > 2  # the new group's batch size
        # the old stream drained: dropped from the assignment, its reader stops; the group is the same, so
        # what the replica measured of it stays (before the fix a new latency model, its memo gone)
        learnt = replica.loop.latency
        assert learnt.samples > 0
        control.send(serving(t2, share=2))
        await until(lambda: replica.feed is not None and replica.feed.streams == [t2.stream], 5, "S1 dropped")
        await asyncio.sleep(0.2)  # the dropped reader's last read (BLOCK 50 ms) is over
        await put(redis, S1, [request(blocks, "stray", 4, 99)[0]])
        await asyncio.sleep(0.3)
        backlog = await read_backlog(redis, S1)
        assert backlog is not None and (backlog.undelivered, backlog.pending) == (1, 0)  # nobody reads it now
        assert replica.loop.latency is learnt
        live = (await live_replicas(redis))["rep"]
        assert live["streams"] == [t2.stream] and live["share"] == 2 and live["epoch"] == 2
        torch.set_num_threads(1)


async def test_a_standby_reads_nothing_and_a_new_assignment_is_published_at_once(
        redis: Any, redis_url: str, blocks: list[torch.nn.Module]) -> None:
    # heartbeat every 5 s: what the registry shows within 0.3 s was published by the assignment itself
    # (before the fix the replica published it at its next heartbeat only)
    async with running(redis_url, serving(task()), heartbeat_s=5.0) as (replica, _run, control):
        await until_async(lambda: _state_is(redis, "serving", [S1]), 0.3, "serving in the registry")
        control.send(Assignment(0))
        await until(lambda: replica.state == "standby", 5, "standby")
        await until_async(lambda: _state_is(redis, "standby", []), 0.3, "standby in the registry")
        assert replica.feed is not None and replica.feed.streams == [] and replica.feed.consumer is None
        await asyncio.sleep(0.2)
        await put(redis, S1, [request(blocks, "unread", 0, 1)[0]])
        await asyncio.sleep(0.3)
        backlog = await read_backlog(redis, S1)
        assert backlog is not None and backlog.undelivered == 1 and not await raw_replies(redis)
        control.send(serving(task()))  # and back: it serves what waited
        got = await replies(redis, 1)
        assert got["unread"].ok


async def _state_is(redis: Any, state: str, streams: list[str]) -> bool:
    live = (await live_replicas(redis)).get("rep") or {}
    return live.get("state") == state and live.get("streams") == streams


async def test_stop_serves_what_it_holds_then_exits_0(redis: Any, redis_url: str,
                                                      blocks: list[torch.nn.Module]) -> None:
    replica, run, control = await start(redis_url, serving(task(batch=2, replicas=2)))  # no read-ahead
    assert replica.loop is not None
    replica.loop.runner = Slow(replica.loop.runner, 0.3)
    work = [request(blocks, f"s{i}", CUTS[i % 3], i) for i in range(4)]
    await put(redis, S1, [p for p, _ in work])
    await until(lambda: replica.loop is not None and len(replica.loop.in_flight) == 2, 5, "a batch of two running")
    held = set(replica.loop.held())
    control.stop()
    assert await asyncio.wait_for(run, 20) == 0
    got = await replies(redis, 4, timeout=1)  # answered before it exited
    assert len(held) == 2  # it took nothing more while the batch ran
    for i, (_, expected) in enumerate(work):
        exact(got[f"s{i}"], expected)
    assert (await redis.xpending(S1, keys.WORKER_GROUP))["pending"] == 0
    assert "rep" not in await live_replicas(redis)


async def test_a_stop_while_loading_does_not_wait_for_the_model(redis: Any, redis_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Before the fix the replica read its stdin only once loaded: a stop, or the end of file that means its
    # agent is gone, waited for the whole load (and the agent's stop for its 10 s grace, then SIGKILL).
    release = threading.Event()
    real = replica_mod.FragmentRunner

    def slow(*args: Any, **kw: Any) -> Any:
        release.wait(20)
        return real(*args, **kw)

    monkeypatch.setattr(replica_mod, "FragmentRunner", slow)
    control = Control()
    replica = Replica(settings(redis_url), name="rep", device="cpu0", model=MODEL, share=1)
    run = asyncio.create_task(replica.run(control.messages()))
    try:
        await until_async(lambda: _state_is(redis, "starting", []), 5, "loading, in the registry")
        control.send(serving(task()))
        control.stop()
        t0 = time.monotonic()
        assert await asyncio.wait_for(run, 5) == 0
        assert time.monotonic() - t0 < 1.0 and replica.load_abandoned and replica.feed is None
        assert "rep" not in await live_replicas(redis)
    finally:
        release.set()


async def test_an_assignment_after_a_stop_while_loading_is_not_a_crash(redis_url: str) -> None:
    # Before the fix it reached apply() with no model loaded: an AssertionError in the control task, which
    # turned a clean stop (SIGTERM while loading, then a last assignment in the pipe) into exit code 1.
    replica = Replica(settings(redis_url), name="rep", device="cpu0", model=MODEL, share=1)
    replica.stop()
    control = Control()
    control.send(serving(task()))
    control.close()
    await asyncio.wait_for(replica._follow(control.messages()), 5)
    assert replica.exit_code == 0 and replica._early is not None and replica.assignment is None


async def test_an_assignment_sent_while_loading_is_applied_once_loaded(redis: Any, redis_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       blocks: list[torch.nn.Module]) -> None:
    release = threading.Event()
    real = replica_mod.FragmentRunner

    def gated(*args: Any, **kw: Any) -> Any:
        release.wait(20)
        return real(*args, **kw)

    monkeypatch.setattr(replica_mod, "FragmentRunner", gated)
    control = Control()
    replica = Replica(settings(redis_url), name="rep", device="cpu0", model=MODEL, share=1)
    run = asyncio.create_task(replica.run(control.messages()))
    try:
        await until_async(lambda: _state_is(redis, "starting", []), 5, "loading, in the registry")
        control.send(Assignment(0))
        control.send(serving(task()))  # the newest one wins
        await asyncio.sleep(0.1)
        release.set()
        await until(lambda: replica.state == "serving", 20, "serving what it was sent while loading")
        assert replica.assignment is not None and replica.assignment.seq == 2
        payload, expected = request(blocks, "early", 4, 5)
        await put(redis, S1, [payload])
        exact((await replies(redis, 1))["early"], expected)
    finally:
        release.set()
        control.close()
        assert await asyncio.wait_for(run, 20) == 0


async def test_a_dead_helper_crashes_the_replica_instead_of_leaving_a_zombie(
        redis: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(self: Feed) -> None:
        raise RuntimeError("XAUTOCLAIM answered nonsense")

    monkeypatch.setattr(Feed, "reap_once", broken)
    control = Control()
    control.send(serving(task()))
    replica = Replica(settings(redis_url), name="rep", device="cpu0", model=MODEL, share=1)
    assert await asyncio.wait_for(replica.run(control.messages()), 30) == 1  # its reaper died: so does it
    assert "rep" not in await live_replicas(redis)


async def test_a_reader_that_dies_crashes_the_replica(redis: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                                     blocks: list[torch.nn.Module]) -> None:
    # Before the fix a stream's reader task that raised what it does not handle (an error reply, say OOM on
    # a dead letter's XADD) ended silently: the replica went on heartbeating "serving" that stream, nobody
    # read it, and its requests waited for their deadlines. Now the replica crashes and its slot moves on.
    async def broken(self: Feed, entries: Any, stream: str, *, claimed: bool = False) -> None:
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr(Feed, "admit", broken)
    _replica, run, control = await start(redis_url, serving(task()))
    await put(redis, S1, [request(blocks, "x", 0, 1)[0]])
    assert await asyncio.wait_for(run, 20) == 1
    assert "rep" not in await live_replicas(redis)
    control.close()


async def test_what_cannot_be_served_here_is_exit_2(redis: Any, redis_url: str) -> None:
    with capture_logs() as logs:
        assert await Replica(settings(redis_url), name="x", device="cpu0", model="no-such-model", share=1).run() == 2
        gpu = Replica(settings(redis_url), name="y", device="gpu0", model=MODEL, share=50)
        assert await gpu.run() == 2  # no CUDA in this process: never the CPU instead
    errors = [e for e in logs if e["event"] == "replica_config_error"]
    assert len(errors) == 2 and "no-such-model" in errors[0]["error"]
    assert "CUDA is not available" in errors[1]["error"] and "never falls back to the CPU" in errors[1]["error"]
    assert not await live_replicas(redis)
