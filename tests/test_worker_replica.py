"""The worker replica: re-aligned batches over a real group stream, deadlines, recovery, drain.

The replica runs in-process (its ``run`` coroutine as a task) against the session's private Redis;
requests are written to its group stream exactly as the ingress writes them, and replies are read
back from the client's reply stream and compared with the whole model run locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from common.contract import keys, wire
from common.contract.errors import ErrorCode
from common.contract.routing import GroupSpec, PlanView
from common.metrics import REGISTRY, http_get
from common.model.zoo import build_blocks, describe
from common.profiles import make_profile
from common.settings import Settings
from common.store.plan_store import publish_plan
from common.store.streams import ensure_group, list_dead_letters
from services.worker.drain import Backlog, find_plan, is_drained
from services.worker.intake import Intake, Job, Rejection
from services.worker.latency import LatencyModel, load_latency_model, work_units
from services.worker.loop import BatchLoop, Done
from services.worker.replica import Replica
from tests.helpers import run_blocks

MODEL, RES, CLIENT = "resnet18", 32, "client-1"
CUTS = (0, 4, 8)
GROUP = "g0"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def blocks() -> list[torch.nn.Module]:
    return build_blocks(MODEL, resolution=RES, seed=0)


def plan(epoch: int = 1, *, batch: int = 8, cuts: Sequence[int] = CUTS) -> dict[str, Any]:
    return {
        "epoch": epoch, "policy": "test", "profile": None, "rho": 0.9,
        "groups": [{"id": GROUP, "model": MODEL, "fragments": [[MODEL, c] for c in cuts], "cuts": list(cuts),
                    "batch": batch, "share": 1, "replicas": 1, "latency_ms": 20.0, "rate_rps": 10.0,
                    "min_budget_ms": 100.0}],
        "infeasible": [], "placement": [{"device": "cpu0", "replicas": [{"group": GROUP, "share": 1}]}],
        "total_share": 1, "gpus": 0, "routes": {},
    }


def settings(url: str) -> Settings:
    return Settings(redis_url=url, resolution=RES, models=(MODEL,), max_deliveries=2, block_ms=50)


def sample(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, RES, RES)).astype(np.float32)


def request(blocks: list[torch.nn.Module], req_id: str, cut: int, seed: int, *, budget_ms: float = 5000.0,
            age_s: float = 0.0) -> tuple[bytes, np.ndarray]:
    """The entry the ingress would write for a device that ran blocks 0..cut-1, and the expected output."""
    x = sample(seed)
    received = time.time() - age_s
    req = wire.Request(req_id=req_id, client=CLIENT, model=MODEL, cut=cut, tensor=run_blocks(blocks, x, 0, cut),
                       budget_ms=budget_ms, received=received, deadline=received + budget_ms / 1000.0)
    return wire.encode_request(req), run_blocks(blocks, x, 0, len(blocks))


def blob_request(blocks: list[torch.nn.Module], req_id: str, cut: int, seed: int, *, budget_ms: float = 5000.0,
                 age_s: float = 0.0) -> tuple[bytes, bytes, np.ndarray]:
    """Like ``request``, with the tensor in a blob: the entry, the blob's bytes, the expected output."""
    x = sample(seed)
    received = time.time() - age_s
    meta, data = wire.tensor_bytes(run_blocks(blocks, x, 0, cut))
    req = wire.Request(req_id=req_id, client=CLIENT, model=MODEL, cut=cut, tensor=None, budget_ms=budget_ms,
                       received=received, deadline=received + budget_ms / 1000.0, blob=keys.blob(req_id),
                       blob_meta=meta)
    return wire.encode_request(req), data, run_blocks(blocks, x, 0, len(blocks))


async def put_blobs(r: Any, blobs: dict[str, bytes]) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for req_id, data in blobs.items():
            pipe.set(keys.blob(req_id), data, px=60_000)
        await pipe.execute()


async def put(r: Any, payloads: Sequence[bytes], epoch: int = 1) -> list[str]:
    """XADD atomically (MULTI), so a blocked replica reads the whole burst at once."""
    async with r.pipeline(transaction=True) as pipe:
        for p in payloads:
            pipe.xadd(keys.group_stream(epoch, GROUP), {keys.FIELD: p})
        ids = await pipe.execute()
    return [i.decode() for i in ids]


async def replies(r: Any, n: int, timeout: float = 20.0) -> dict[str, wire.Reply]:
    out: dict[str, wire.Reply] = {}
    last = "0-0"
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} replies arrived"
        resp = await r.xread({keys.reply_stream(CLIENT): last}, block=200)
        for _stream, rows in resp or []:
            for entry_id, fields in rows:
                last = entry_id
                rep = wire.decode_reply(fields[keys.FIELD])
                out[rep.req_id] = rep
    return out


@contextlib.asynccontextmanager
async def running(url: str, **kw: Any) -> AsyncIterator[tuple[Replica, asyncio.Task[int]]]:
    replica = Replica(settings(url), epoch=kw.pop("epoch", 1), group=GROUP, device="cpu0", index=0, **kw)
    task = asyncio.create_task(replica.run())
    deadline = time.monotonic() + 30
    while replica.state != "serving":
        assert not task.done(), f"replica exited early: {task.result()}"
        assert time.monotonic() < deadline, "replica did not start"
        await asyncio.sleep(0.02)
    try:
        yield replica, task
    finally:
        replica.stop()
        await asyncio.wait_for(task, 20)


# ------------------------------------------------------------------------------------ pure parts


def test_latency_model_follows_measurements() -> None:
    batches, shares = [1, 2, 4, 8], [1, 2]
    blocks = [{"name": f"b{j}", "out_bytes": 4, "flops": 1,
               "latency_ms": [[float(b), float(b) / 2] for b in batches]} for j in range(4)]
    prof = make_profile("measured", "cpu", "cpu_threads", batches, shares,
                        {"m": {"input_shape": [1], "input_bytes": 4, "blocks": blocks}}).model("m")
    lat = LatencyModel(4, profile=prof, share=1)
    assert lat.source == "profile"
    # Re-aligned: 2 requests join at cut 0 (b=2 for blocks 0..1), 2 more at cut 2 (b=4 for blocks 2..3).
    assert lat.predict_ms({0: 2, 2: 2}) == pytest.approx(2 + 2 + 4 + 4)
    for _ in range(30):
        lat.observe({0: 1}, 0.008)  # the host is twice as slow as the profile says (4 ms predicted)
    assert lat.ratio == pytest.approx(2.0, rel=0.05)
    assert lat.predict_ms({0: 4}) == pytest.approx(2 * 16, rel=0.05)  # unseen composition: scaled
    assert lat.predict_ms({0: 1}) == pytest.approx(8.0, rel=0.01)  # seen composition: its own EWMA
    off_grid = LatencyModel(4, profile=prof, share=3, prior_ms=10.0, prior_batch=1, prior_cut=0)
    assert off_grid.source == "online" and "share" in off_grid.fallback_reason
    assert off_grid.predict_ms({0: 1}) == pytest.approx(10.0)
    assert off_grid.predict_ms({0: 2}) > off_grid.predict_ms({0: 1}) > off_grid.predict_ms({3: 1})
    assert work_units({0: 2, 2: 1}, 4) == 2 * 4 + 2 + 4


def test_latency_model_comes_from_the_shipped_profile_when_it_fits() -> None:
    view = PlanView({**plan(), "profile": "v100-estimated"})
    spec = view.groups[GROUP]
    on_cpu = load_latency_model(Settings(), view, spec, 14)  # share 1 is not a GPU grid share
    assert on_cpu.source == "online" and "share" in on_cpu.fallback_reason
    gpu_spec = dataclasses.replace(spec, share=50)
    on_gpu = load_latency_model(Settings(), view, gpu_spec, 14)
    assert on_gpu.source == "profile" and on_gpu.predict_ms({4: 2, 8: 2}) > on_gpu.predict_ms({8: 2}) > 0
    missing = load_latency_model(Settings(profile="/nonexistent/profile.json"), view, gpu_spec, 14)
    assert missing.source == "online"


def test_a_retired_stream_is_drained_only_when_empty_and_quiet() -> None:
    last_ms = 1_000_000
    idle = Backlog(0, 0, f"{last_ms}-3")
    assert is_drained(idle, now_ms=last_ms + 1000, quiet_s=1.0)
    assert not is_drained(idle, now_ms=last_ms + 999, quiet_s=1.0)  # the ingress may still be switching
    assert not is_drained(Backlog(1, 0, f"{last_ms}-3"), now_ms=last_ms + 10_000, quiet_s=1.0)  # unread
    assert not is_drained(Backlog(0, 2, f"{last_ms}-3"), now_ms=last_ms + 10_000, quiet_s=1.0)  # unacked
    assert is_drained(None, now_ms=0, quiet_s=1.0)  # the stream is gone already


def test_intake_rejects_what_the_runner_cannot_take(blocks: list[torch.nn.Module]) -> None:
    spec = GroupSpec(GROUP, MODEL, (4, 8), 4, 1, 1, 20.0, 100.0, 1.0)
    intake = Intake(describe(MODEL, RES), spec)
    good, _ = request(blocks, "ok", 8, 1)
    job = intake.admit("1-0", good)
    assert isinstance(job, Job) and job.pending.cut == 8 and job.pending.req_id == "1-0"
    low, _ = request(blocks, "low", 0, 1)  # below the group's first block
    bad_cut = intake.admit("2-0", low)
    assert isinstance(bad_cut, Rejection) and bad_cut.error.code == ErrorCode.BAD_CUT and bad_cut.req_id == "low"
    wrong = wire.encode_request(wire.Request("shape", CLIENT, MODEL, 4, np.zeros((3, 3), np.float32), budget_ms=9))
    rej = intake.admit("3-0", wrong)
    assert isinstance(rej, Rejection) and rej.error.code == ErrorCode.BAD_TENSOR and rej.client == CLIENT
    garbage = intake.admit("4-0", b"\x93not a request")
    assert isinstance(garbage, Rejection) and garbage.req_id is None


def test_intake_takes_blob_requests_on_metadata_and_attaches_a_copy(blocks: list[torch.nn.Module]) -> None:
    spec = GroupSpec(GROUP, MODEL, (4, 8), 4, 1, 1, 20.0, 100.0, 1.0)
    intake = Intake(describe(MODEL, RES), spec)
    payload, data, _ = blob_request(blocks, "b", 8, 1)
    job = intake.admit("1-0", payload)
    assert isinstance(job, Job) and job.needs_blob and job.blob == keys.blob("b")
    buf = bytearray(data)
    attached = intake.attach(job, buf)
    assert attached is job and not job.needs_blob and job.request.tensor is not None
    t = job.request.tensor
    assert t.shape == describe(MODEL, RES).cut_shape(8) and t.flags.owndata and t.flags.writeable
    buf[:4] = b"\xff" * 4
    assert t.reshape(-1)[0] == np.frombuffer(data[:4], np.float32)[0]  # a copy, not a view of the buffer
    gone = intake.attach(intake.admit("2-0", payload), None)  # type: ignore[arg-type]
    assert isinstance(gone, Rejection) and gone.error.code == ErrorCode.BAD_TENSOR and gone.blob == keys.blob("b")
    short = intake.attach(intake.admit("3-0", payload), data[:-4])  # type: ignore[arg-type]
    assert isinstance(short, Rejection) and short.error.details["got"] == len(data) - 4
    late = intake.admit("4-0", blob_request(blocks, "late", 8, 1, budget_ms=10, age_s=1.0)[0])
    assert isinstance(late, Job) and Intake.blob_expired(late, None, time.time())
    assert not Intake.blob_expired(late, data, time.time()) and not Intake.blob_expired(job, None, time.time())
    wrong, _, _ = blob_request(blocks, "w", 4, 1)  # cut 4's shape...
    obj = wire.decode_request(wrong)
    obj.cut = 8  # ...sent for cut 8
    rej = intake.admit("5-0", wire.encode_request(obj))
    assert isinstance(rej, Rejection) and rej.error.code == ErrorCode.BAD_TENSOR and rej.blob == keys.blob("w")


class _Broken:
    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        raise RuntimeError("device fell off the bus")


async def test_a_failing_batch_answers_internal(blocks: list[torch.nn.Module]) -> None:
    spec = GroupSpec(GROUP, MODEL, (4,), 2, 1, 1, 20.0, 100.0, 1.0)
    intake = Intake(describe(MODEL, RES), spec)
    sent: list[Done] = []

    async def sink(done: list[Done]) -> None:
        sent.extend(done)

    loop = BatchLoop(_Broken(), LatencyModel(14, prior_ms=1.0), sink, max_batch=2, epoch=3, group=GROUP)
    for i in range(2):
        job = intake.admit(f"{i}-1", request(blocks, f"r{i}", 4, i)[0])
        assert isinstance(job, Job)
        loop.add(job)
    stop = asyncio.Event()
    stop.set()  # serve what is queued, then return
    await asyncio.wait_for(loop.run(stop), 10)
    assert sorted(d.entry_id for d in sent) == ["0-1", "1-1"] and loop.idle
    for d in sent:
        assert not d.reply.ok and d.reply.error is not None and d.reply.error.code == ErrorCode.INTERNAL
        assert "fell off the bus" in d.reply.error.message and d.reply.batch == 2 and d.reply.epoch == 3


# ------------------------------------------------------------------------------ against Redis


async def test_mixed_cuts_are_batched_realigned_and_exact(redis: Any, redis_url: str,
                                                          blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan())
    met_before = REGISTRY.get_sample_value("graft_slo_total", {"group": GROUP, "met": "true"}) or 0.0
    async with running(redis_url) as (replica, _task):
        burst = [request(blocks, f"r{i}", CUTS[i % 3], i) for i in range(16)]
        await put(redis, [p for p, _ in burst])
        got = await replies(redis, 16)
        assert replica.health_port is not None
        status, body = await http_get("127.0.0.1", replica.health_port, "/metrics")
        assert status == 200 and b'graft_batch_size_bucket{group="g0"' in body
        assert (await http_get("127.0.0.1", replica.health_port, "/readyz"))[0] == 200
    met = (REGISTRY.get_sample_value("graft_slo_total", {"group": GROUP, "met": "true"}) or 0.0) - met_before
    assert met == 16
    for i, (_, expected) in enumerate(burst):
        rep = got[f"r{i}"]
        assert rep.ok and rep.tensor is not None, rep.error
        np.testing.assert_allclose(rep.tensor, expected, rtol=1e-4, atol=1e-5)
        assert rep.epoch == 1 and rep.group == GROUP and rep.server_ms > 0
        assert rep.timings is not None and rep.timings["compute_ms"] > 0
        parts = rep.timings["queue_ms"] + rep.timings["wait_ms"] + rep.timings["compute_ms"]
        assert parts <= rep.server_ms + 1.0  # the parts never exceed the whole (ms rounding aside)
    assert max(rep.batch or 0 for rep in got.values()) > 1
    big = [i for i in range(16) if (got[f"r{i}"].batch or 0) > 1]
    assert len({CUTS[i % 3] for i in big}) > 1, "a multi-request batch mixed cuts (re-aligned)"
    assert replica.loop is not None and replica.loop.latency.samples >= 1
    group = next(g for g in await redis.xinfo_groups(keys.group_stream(1, GROUP)))
    assert group["pending"] == 0


async def test_blob_requests_are_served_exactly_and_their_blobs_deleted(redis: Any, redis_url: str,
                                                                        blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan())
    async with running(redis_url) as (replica, _task):
        fetches: list[int] = []
        fetch = replica._fetch_blobs

        async def counting(jobs: list[Job]) -> list[Any]:
            fetches.append(len(jobs))
            return await fetch(jobs)

        replica._fetch_blobs = counting  # type: ignore[method-assign]
        blobbed = [blob_request(blocks, f"b{i}", CUTS[i % 3], 60 + i) for i in range(6)]
        inline = [request(blocks, f"i{i}", CUTS[i % 3], 70 + i) for i in range(4)]
        await put_blobs(redis, {f"b{i}": data for i, (_, data, _) in enumerate(blobbed)})
        await put(redis, [p for p, _, _ in blobbed] + [p for p, _ in inline])
        got = await replies(redis, 10)
    for rid, expected in [*((f"b{i}", e) for i, (_, _, e) in enumerate(blobbed)),
                          *((f"i{i}", e) for i, (_, e) in enumerate(inline))]:
        rep = got[rid]
        assert rep.ok and rep.tensor is not None, (rid, rep.error)
        np.testing.assert_allclose(rep.tensor, expected, rtol=1e-4, atol=1e-5)
    assert sum(fetches) == 6 and len(fetches) < 6, f"blobs fetched per read, not per request: {fetches}"
    assert not await redis.exists(*(keys.blob(f"b{i}") for i in range(6)))  # deleted with the replies
    assert (await redis.xpending(keys.group_stream(1, GROUP), keys.WORKER_GROUP))["pending"] == 0


async def test_gone_or_wrong_blobs_are_answered_and_cleaned_up(redis: Any, redis_url: str,
                                                             blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan())
    async with running(redis_url):
        gone, _, _ = blob_request(blocks, "gone", 4, 1)  # never written (or deleted) before its deadline
        late, _, _ = blob_request(blocks, "late", 4, 2, budget_ms=200, age_s=1.0)  # expired with the deadline
        short, data, _ = blob_request(blocks, "short", 4, 3)
        fine, fine_data, expected = blob_request(blocks, "fine", 8, 4)
        await put_blobs(redis, {"short": data[:-4], "fine": fine_data})
        await put(redis, [gone, late, short, fine])
        got = await replies(redis, 4)
    codes = {rid: rep.error.code if rep.error else "ok" for rid, rep in got.items()}
    assert codes == {"gone": ErrorCode.BAD_TENSOR, "late": ErrorCode.DEADLINE_EXCEEDED,
                     "short": ErrorCode.BAD_TENSOR, "fine": "ok"}
    short_err = got["short"].error
    assert short_err is not None and short_err.details["expected"] == len(data)
    assert short_err.details["got"] == len(data) - 4
    np.testing.assert_allclose(got["fine"].tensor, expected, rtol=1e-4, atol=1e-5)
    assert not await redis.exists(keys.blob("short"), keys.blob("fine"))


async def test_blob_entries_survive_a_crash_and_are_recovered(redis: Any, redis_url: str,
                                                             blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan(batch=2))
    stream = keys.group_stream(1, GROUP)
    await ensure_group(redis, stream, keys.WORKER_GROUP)
    work = [blob_request(blocks, f"c{i}", CUTS[i % 3], 80 + i) for i in range(4)]
    await put_blobs(redis, {f"c{i}": data for i, (_, data, _) in enumerate(work)})
    await put(redis, [p for p, _, _ in work])
    # This replica's previous incarnation took two, a replica that is gone for good took the others.
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-g0-0", {stream: ">"}, count=2)
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-g0-7", {stream: ">"}, count=2)
    assert await redis.exists(*(keys.blob(f"c{i}") for i in range(4))) == 4  # nobody deleted them early
    async with running(redis_url, reap_idle_ms=300) as (replica, _task):
        got = await replies(redis, 4)
        assert replica.reclaimed == 2
    for i, (_, _, expected) in enumerate(work):
        assert got[f"c{i}"].ok, got[f"c{i}"].error
        np.testing.assert_allclose(got[f"c{i}"].tensor, expected, rtol=1e-4, atol=1e-5)
    assert not await redis.exists(*(keys.blob(f"c{i}") for i in range(4)))
    assert (await redis.xpending(stream, keys.WORKER_GROUP))["pending"] == 0


async def test_expired_and_hopeless_requests_get_deadline_exceeded(redis: Any, redis_url: str,
                                                                    blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan())
    async with running(redis_url):
        late, _ = request(blocks, "late", 0, 1, budget_ms=500, age_s=1.0)  # deadline already passed
        hopeless, _ = request(blocks, "hopeless", 0, 2, budget_ms=0.001)  # no time to run even alone
        fine, _ = request(blocks, "fine", 8, 3, budget_ms=600)  # alone: launches once its slack runs out
        await put(redis, [late, hopeless, fine])
        got = await replies(redis, 3)
    for rid in ("late", "hopeless"):
        assert not got[rid].ok and got[rid].error is not None
        assert got[rid].error.code == ErrorCode.DEADLINE_EXCEEDED
    assert got["fine"].ok


async def test_reaper_recovers_entries_of_a_dead_consumer(redis: Any, redis_url: str,
                                                         blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan(batch=3))
    stream = keys.group_stream(1, GROUP)
    await ensure_group(redis, stream, keys.WORKER_GROUP)
    held = [request(blocks, f"held{i}", CUTS[i], 10 + i) for i in range(3)]
    await put(redis, [p for p, _ in held])
    # A replica that took three entries and died before acking them.
    taken = await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-g0-7", {stream: ">"}, count=3)
    assert len(taken[0][1]) == 3
    async with running(redis_url, reap_idle_ms=300) as (replica, _task):
        got = await replies(redis, 3)
        assert replica.reclaimed == 3
    for i, (_, expected) in enumerate(held):
        assert got[f"held{i}"].ok
        np.testing.assert_allclose(got[f"held{i}"].tensor, expected, rtol=1e-4, atol=1e-5)
    assert (await redis.xpending(stream, keys.WORKER_GROUP))["pending"] == 0


async def test_a_restarted_replica_first_serves_its_own_pending_entries(redis: Any, redis_url: str,
                                                                        blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan(batch=2))
    stream = keys.group_stream(1, GROUP)
    await ensure_group(redis, stream, keys.WORKER_GROUP)
    mine = [request(blocks, f"mine{i}", CUTS[i], 40 + i) for i in range(2)]
    await put(redis, [p for p, _ in mine])
    # The previous incarnation of this very replica read them, then crashed.
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-g0-0", {stream: ">"}, count=2)
    async with running(redis_url, reap_idle_ms=60_000) as (replica, _task):  # the reaper cannot be the one
        got = await replies(redis, 2)
        assert replica.reclaimed == 0
    assert all(got[f"mine{i}"].ok and got[f"mine{i}"].batch == 2 for i in range(2))


class _Slow:
    """The real runner, slower than the reaper's idle threshold."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def run_numpy(self, items: Sequence[tuple[int, Any]]) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        return list(self.inner.run_numpy(items))


async def test_a_slow_batch_is_not_stolen_by_a_reaper(redis: Any, redis_url: str,
                                                      blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan(batch=1))
    stream = keys.group_stream(1, GROUP)
    async with running(redis_url, reap_idle_ms=150) as (replica, _task):
        assert replica.loop is not None
        replica.loop.runner = _Slow(replica.loop.runner, 0.9)
        [entry_id] = await put(redis, [request(blocks, "slow", 8, 50)[0]])
        await asyncio.sleep(0.6)  # well past the idle threshold, batch still running
        [row] = await redis.xpending_range(stream, keys.WORKER_GROUP, min=entry_id, max=entry_id, count=1)
        assert row["consumer"] == b"cpu0-g0-0" and row["times_delivered"] == 1
        got = await replies(redis, 1)
        assert replica.reclaimed == 0
    assert got["slow"].ok
    assert await redis.xlen(keys.reply_stream(CLIENT)) == 1


async def test_poison_and_malformed_entries(redis: Any, redis_url: str, blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan())
    stream = keys.group_stream(1, GROUP)
    await ensure_group(redis, stream, keys.WORKER_GROUP)
    poison, _ = request(blocks, "poison", 4, 20)
    [poison_id] = await put(redis, [poison])
    await redis.xreadgroup(keys.WORKER_GROUP, "cpu0-g0-7", {stream: ">"}, count=1)
    # Delivered many times already (each earlier holder crashed on it).
    await redis.xclaim(stream, keys.WORKER_GROUP, "cpu0-g0-7", 0, [poison_id], retrycount=5, justid=True)
    async with running(redis_url, reap_idle_ms=200) as (replica, task):
        bad_shape = wire.encode_request(wire.Request("bad", CLIENT, MODEL, 4, np.zeros((2, 2), np.float32),
                                                     budget_ms=1000, received=time.time(),
                                                     deadline=time.time() + 1))
        good, expected = request(blocks, "good", 8, 21, budget_ms=600)
        await put(redis, [b"\x00garbage", bad_shape, good])
        got = await replies(redis, 3)
        assert not task.done()
    assert got["bad"].error is not None and got["bad"].error.code == ErrorCode.BAD_TENSOR
    assert got["good"].ok
    np.testing.assert_allclose(got["good"].tensor, expected, rtol=1e-4, atol=1e-5)
    assert got["poison"].error is not None and got["poison"].error.code == ErrorCode.INTERNAL
    dead = await list_dead_letters(redis, stream)
    assert {d.entry_id for d in dead} >= {poison_id} and len(dead) == 2  # the poison and the garbage
    assert replica.dead_lettered == 2
    assert (await redis.xpending(stream, keys.WORKER_GROUP))["pending"] == 0


async def test_replica_drains_and_exits_on_a_newer_plan(redis: Any, redis_url: str,
                                                        blocks: list[torch.nn.Module]) -> None:
    await publish_plan(redis, plan(1, batch=6))
    async with running(redis_url, drain_quiet_s=0.4, plan_poll_s=0.1) as (replica, task):
        work = [request(blocks, f"d{i}", CUTS[i % 3], 30 + i) for i in range(6)]
        await put(redis, [p for p, _ in work])
        await publish_plan(redis, plan(2))
        code = await asyncio.wait_for(task, 15)
        assert code == 0 and replica.draining
    got = await replies(redis, 6)
    assert all(got[f"d{i}"].ok for i in range(6))
    assert await redis.ttl(keys.group_stream(1, GROUP)) > 0  # the retired stream goes away by itself
    assert (await find_plan(redis, 1)) is not None and (await find_plan(redis, 1)).epoch == 1  # type: ignore[union-attr]


async def test_a_dead_helper_crashes_the_replica_instead_of_leaving_a_zombie(
        redis: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await publish_plan(redis, plan())
    replica = Replica(settings(redis_url), epoch=1, group=GROUP, device="cpu0", plan_poll_s=0.05)

    async def broken_backlog(*args: Any) -> None:
        raise RuntimeError("XINFO answered nonsense")

    monkeypatch.setattr("services.worker.replica.read_backlog", broken_backlog)
    assert await asyncio.wait_for(replica.run(), 30) == 1
    assert not await redis.exists(keys.health("replica", replica.consumer))


async def test_an_unknown_group_is_a_configuration_error(redis: Any, redis_url: str) -> None:
    await publish_plan(redis, plan())
    assert await Replica(settings(redis_url), epoch=1, group="nope").run() == 2
    assert await Replica(settings(redis_url), epoch=7, group=GROUP).run() == 2
