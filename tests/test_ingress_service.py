"""The ingress loop in-process against the private Redis: routing, error replies, shedding, dead letters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from redis.asyncio import Redis

from common.contract import keys, wire
from common.contract.errors import BadCut
from common.contract.routing import PlanView
from common.metrics import REGISTRY
from common.model.zoo import describe
from common.settings import Settings
from common.store.plan_store import publish_plan
from common.store.streams import list_dead_letters
from services.ingress.bench import measure_routing_rate
from services.ingress.service import IngressService
from tests.helpers import serving_replica

RES = 32
INFO = describe("resnet18", RES)
N = INFO.n_blocks


def group(gid: str, cuts: list[int], *, replicas: int = 2, batch: int = 8, latency_ms: float = 10.0,
          min_budget_ms: float = 0.0) -> dict[str, Any]:
    return {"id": gid, "model": "resnet18", "fragments": [], "cuts": cuts, "batch": batch, "share": 50,
            "replicas": replicas, "latency_ms": latency_ms, "rate_rps": 100.0, "min_budget_ms": min_budget_ms}


def plan(epoch: int, groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epoch": epoch, "policy": "test", "profile": "test", "rho": 0.9, "groups": groups, "infeasible": [],
            "placement": [{"device": "cpu0", "replicas": [{"group": g["id"], "share": 1} for g in groups]}],
            "total_share": len(groups), "gpus": 0, "routes": {}}


# g1 drains 10 req/s: a handful of queued entries already costs seconds.
PLAN = plan(1, [group("g0", list(range(7))), group("g1", list(range(7, N)), replicas=1, batch=1, latency_ms=100.0)])


def request(req_id: str, cut: int = 2, client: str = "cli", **kw: Any) -> bytes:
    shape = INFO.cut_shape(cut) if 0 <= cut < N else (4,)
    fields: dict[str, Any] = {"req_id": req_id, "client": client, "model": "resnet18", "cut": cut,
                              "tensor": np.full(shape, 0.5, np.float32), "budget_ms": 500.0}
    fields.update(kw)
    return wire.encode_request(wire.Request(**fields))


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def replies(r: Redis, client: str, n: int) -> dict[str, wire.Reply]:
    async def probe() -> list[Any]:
        rows = await r.xrange(keys.reply_stream(client))
        return rows if len(rows) >= n else []
    rows = await eventually(probe)
    return {(rep := wire.decode_reply(f[keys.FIELD])).req_id: rep for _, f in rows}


async def group_entries(r: Redis, stream: str, n: int) -> list[wire.Request]:
    async def probe() -> list[Any]:
        rows = await r.xrange(stream)
        return rows if len(rows) >= n else []
    return [wire.decode_request(f[keys.FIELD]) for _, f in await eventually(probe)]


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, models=("resnet18",), resolution=RES, max_slo_ms=10_000.0)


def start(redis: Redis, settings: Settings, name: str = "ingress-t") -> tuple[IngressService, asyncio.Event,
                                                                                asyncio.Task[None]]:
    service = IngressService(redis, settings, name=name, plan_interval_s=0.05, shed_interval_s=0.03,
                             stats_interval_s=0.1, serving_interval_s=0.05)
    stop = asyncio.Event()
    return service, stop, asyncio.create_task(service.run(stop))


async def seen_serving(service: IngressService, *streams: str) -> None:
    await eventually(lambda: _all_live(service, streams))


async def _all_live(service: IngressService, streams: tuple[str, ...]) -> bool:
    return all(service.serving.live(s) for s in streams)


@pytest.fixture
async def ingress(redis: Redis, settings: Settings) -> AsyncIterator[IngressService]:
    await publish_plan(redis, PLAN)
    streams = (keys.group_stream(1, "g0"), keys.group_stream(1, "g1"))
    async with serving_replica(redis, *streams):
        service, stop, task = start(redis, settings)
        await asyncio.wait_for(service.ready.wait(), 10)
        await seen_serving(service, *streams)
        yield service
        stop.set()
        await asyncio.wait_for(task, 10)


async def send(r: Redis, *payloads: bytes) -> None:
    """XADD atomically, so the ingress reads them as one batch (one stats window)."""
    async with r.pipeline(transaction=True) as pipe:
        for p in payloads:
            pipe.xadd(keys.INGRESS, {keys.FIELD: p})
        await pipe.execute()


async def test_valid_requests_routed_by_cut_with_deadline_stamped(redis: Redis, ingress: IngressService) -> None:
    before = time.time()
    await send(redis, request("a", cut=0), request("b", cut=6), request("c", cut=N - 1, budget_ms=None,
                                                                         slo_ms=300.0, device_ms=100.0))
    g0 = await group_entries(redis, keys.group_stream(1, "g0"), 2)
    (c,) = await group_entries(redis, keys.group_stream(1, "g1"), 1)
    assert [r.req_id for r in g0] == ["a", "b"] and c.req_id == "c"
    for req in (*g0, c):
        # the receive time is the Redis time in the entry's id (ms resolution), one clock for every ingress
        assert req.received is not None and req.deadline is not None
        assert before - 0.01 <= req.received <= time.time()
        assert req.source is not None and int(req.source.split("-")[0]) == round(req.received * 1000)
        assert req.tensor is not None and req.tensor.shape == INFO.cut_shape(req.cut)
    assert g0[0].deadline == pytest.approx(g0[0].received + 0.5)  # type: ignore[operator]
    assert c.budget_ms == pytest.approx(200.0) and c.deadline == pytest.approx(c.received + 0.2)  # type: ignore[operator]
    assert np.all(g0[1].tensor == 0.5)
    pending = await redis.xpending(keys.INGRESS, keys.INGRESS_GROUP)
    assert pending["pending"] == 0
    ok = REGISTRY.get_sample_value("graft_requests_total", {"service": "ingress", "outcome": "ok"})
    assert ok is not None and ok >= 3
    assert REGISTRY.get_sample_value("graft_plan_epoch", {"service": "ingress"}) == 1


async def test_each_bad_input_gets_its_error_code(redis: Redis, ingress: IngressService) -> None:
    bad_body = msgpack.unpackb(request("body"))
    bad_body["tensor"] = "nonsense"
    await send(
        redis,
        request("no-budget", budget_ms=None),
        request("too-long", budget_ms=20_000.0),
        request("model", model="resnet9000"),
        request("cut", cut=N + 3),
        request("shape", tensor=np.zeros((1, *INFO.cut_shape(2)), np.float32)),
        request("dtype", tensor=np.zeros(INFO.cut_shape(2), np.float16)),
        msgpack.packb(bad_body, use_bin_type=True),
        request("fine"),
    )
    got = await replies(redis, "cli", 7)
    codes = {rid: (rep.error.code if rep.error else "ok") for rid, rep in got.items()}
    assert codes == {"no-budget": "INVALID_REQUEST", "too-long": "INVALID_REQUEST", "model": "UNKNOWN_MODEL",
                     "cut": "BAD_CUT", "shape": "BAD_TENSOR", "dtype": "BAD_TENSOR", "body": "BAD_TENSOR"}
    shape_err = got["shape"].error
    assert shape_err is not None and shape_err.details["expected"] == list(INFO.cut_shape(2))
    assert all(rep.epoch == 1 and not rep.ok for rep in got.values())
    (fine,) = await group_entries(redis, keys.group_stream(1, "g0"), 1)
    assert fine.req_id == "fine"


def blob_request(req_id: str, cut: int = 2, *, key: str | None = None, shape: tuple[int, ...] | None = None,
                 **kw: Any) -> bytes:
    """A blob request's envelope (metadata only); the caller SETs the blob."""
    meta = wire.TensorMeta("float32", shape or INFO.cut_shape(cut))
    fields: dict[str, Any] = {"req_id": req_id, "client": "cli", "model": "resnet18", "cut": cut, "tensor": None,
                              "budget_ms": 500.0, "blob": key or keys.blob(req_id), "blob_meta": meta}
    fields.update(kw)
    return wire.encode_request(wire.Request(**fields))


def blob_bytes(cut: int = 2, value: float = 0.5) -> bytes:
    return np.full(INFO.cut_shape(cut), value, np.float32).tobytes()


async def test_blob_requests_are_checked_in_one_round_trip_and_refused_blobs_deleted(
        redis: Redis, ingress: IngressService) -> None:
    data = blob_bytes()
    await redis.set(keys.blob("good"), data, px=60_000)
    await redis.set(keys.blob("short"), data[:-8], px=60_000)
    await redis.set(keys.blob("not-ours"), data, px=60_000)  # another request's blob, named by "thief"
    await redis.set(keys.blob("thief"), data, px=60_000)
    await redis.set(keys.blob("cut"), data, px=60_000)  # a valid blob, refused for its cut
    await redis.config_resetstat()
    await send(redis, blob_request("good"), blob_request("missing"), blob_request("short"),
               blob_request("thief", key=keys.blob("not-ours")), blob_request("cut", cut=N + 3, shape=INFO.cut_shape(2)),
               request("inline"))
    got = await replies(redis, "cli", 4)
    assert {rid: rep.error.code for rid, rep in got.items() if rep.error} == {
        "missing": "BAD_TENSOR", "short": "BAD_TENSOR", "thief": "BAD_TENSOR", "cut": "BAD_CUT"}
    missing, short, thief = (got[r].error for r in ("missing", "short", "thief"))
    assert missing is not None and "does not exist" in missing.message
    assert short is not None and short.details == {"key": keys.blob("short"), "expected": len(data),
                                                  "got": len(data) - 8}
    assert thief is not None and keys.blob("thief") in thief.message
    routed = await group_entries(redis, keys.group_stream(1, "g0"), 2)
    assert [r.req_id for r in routed] == ["good", "inline"]
    good = routed[0]
    assert good.tensor is None and good.blob == keys.blob("good") and good.deadline is not None
    assert good.blob_meta == wire.TensorMeta("float32", INFO.cut_shape(2))
    # A refused request's own blob is gone; a key it merely named is not its to delete.
    assert not await redis.exists(keys.blob("short"), keys.blob("cut"), keys.blob("thief"))
    assert await redis.get(keys.blob("not-ours")) == data
    # The routed blob stays for the worker, its TTL now tied to the deadline: budget + margin.
    assert await redis.get(keys.blob("good")) == data
    assert 0 < await redis.pttl(keys.blob("good")) <= 500 + ingress.blob_margin_ms
    # One STRLEN per blob request that passed the other checks; the inline one cost none.
    stats = await redis.info("commandstats")
    assert stats["cmdstat_strlen"]["calls"] == 3


async def test_overloaded_when_backlog_exceeds_budget(redis: Redis, ingress: IngressService) -> None:
    stream = keys.group_stream(1, "g1")
    # 30 entries a worker never took, at 10 req/s: ~3 s of wait, far beyond a 500 ms budget.
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(30):
            pipe.xadd(stream, {keys.FIELD: request(f"old{i}", cut=N - 1)})
        await pipe.execute()
    await eventually(lambda: _polled(ingress, "g1", 30))
    await send(redis, request("late", cut=N - 1), request("patient", cut=N - 1, budget_ms=9_000.0),
               request("other-group", cut=1))
    (rep,) = (await replies(redis, "cli", 1)).values()
    assert rep.req_id == "late" and rep.error is not None and rep.error.code == "OVERLOADED"
    assert 2_500 <= rep.error.details["retry_after_ms"] <= 4_000
    entries = await group_entries(redis, stream, 31)
    assert entries[-1].req_id == "patient"
    (other,) = await group_entries(redis, keys.group_stream(1, "g0"), 1)
    assert other.req_id == "other-group"


async def _polled(service: IngressService, gid: str, n: int) -> bool:
    return service.backlogs.backlog(gid) >= n


async def test_malformed_entries_dead_lettered_and_ingress_keeps_running(redis: Redis, ingress: IngressService) -> None:
    await send(redis, b"\x93\x01\x02", msgpack.packb({"v": 1, "kind": "request", "model": "resnet18"}))
    await redis.xadd(keys.INGRESS, {b"other": b"field"})  # no payload field at all
    await send(redis, request("after"))
    (after,) = await group_entries(redis, keys.group_stream(1, "g0"), 1)
    assert after.req_id == "after"
    dead = await eventually(lambda: _dead(redis, 3))
    assert [d.code for d in dead] == ["INVALID_REQUEST"] * 3
    assert {d.payload for d in dead} == {b"\x93\x01\x02", b"", msgpack.packb(
        {"v": 1, "kind": "request", "model": "resnet18"})}
    assert all(d.group == keys.INGRESS_GROUP for d in dead)
    assert (await redis.xpending(keys.INGRESS, keys.INGRESS_GROUP))["pending"] == 0
    assert ingress.dead_lettered_total == 3
    malformed = REGISTRY.get_sample_value("graft_requests_total", {"service": "ingress", "outcome": "MALFORMED"})
    assert malformed is not None and malformed >= 2


async def _dead(r: Redis, n: int) -> list[Any]:
    rows = await list_dead_letters(r, keys.INGRESS)
    return rows if len(rows) >= n else []


async def test_stats_messages_count_fragments(redis: Redis, ingress: IngressService) -> None:
    await send(redis, request("s1", cut=2, budget_ms=100.0), request("s2", cut=2, budget_ms=300.0),
               request("s3", cut=9), request("bad", cut=99))
    await replies(redis, "cli", 1)

    async def totals() -> dict[str, Any]:
        rows = await redis.xrange(keys.STATS)
        msgs = [wire.decode_message(f[keys.FIELD], "stats") for _, f in rows]
        frags: dict[tuple[str, int], int] = {}
        for m in msgs:
            for f in m["fragments"]:
                frags[(f["model"], f["cut"])] = frags.get((f["model"], f["cut"]), 0) + f["count"]
        done = sum(m["accepted"] for m in msgs) == 3 and sum(m["rejected"].get("BAD_CUT", 0) for m in msgs) == 1
        return {"msgs": msgs, "frags": frags} if done else {}

    got = await eventually(totals)
    assert got["frags"] == {("resnet18", 2): 2, ("resnet18", 9): 1}
    first = next(f for m in got["msgs"] for f in m["fragments"] if f["cut"] == 2)
    assert first["min_budget_ms"] == 100.0 and first["p50_budget_ms"] == 200.0
    assert all(m["ingress"] == "ingress-t" and m["window_s"] >= 0 for m in got["msgs"])


async def test_switches_to_a_newer_plan_only_once_its_workers_read(redis: Redis, ingress: IngressService) -> None:
    await publish_plan(redis, plan(2, [group("all", list(range(N)))]))
    stream = keys.group_stream(2, "all")
    # the new plan's stream has the worker group ready before any replica starts ...
    await eventually(lambda: _has_group(redis, stream))
    # ... but the ingress keeps routing by epoch 1 while no live replica reads it (make-before-break);
    # a consumer that once read the stream is not enough: only the registry says who is alive
    await redis.xgroup_createconsumer(stream, keys.WORKER_GROUP, "replica-dead")
    await asyncio.sleep(0.3)
    assert ingress.view is not None and ingress.view.epoch == 1
    await send(redis, request("old", cut=3))
    (old,) = await group_entries(redis, keys.group_stream(1, "g0"), 1)
    assert old.req_id == "old"
    # a replica of the new group registers as reading its stream: the ingress switches
    async with serving_replica(redis, stream, name="replica-x"):
        await eventually(lambda: _epoch(ingress, 2))
        assert REGISTRY.get_sample_value("graft_plan_epoch", {"service": "ingress"}) == 2
        assert ingress.status["epoch"] == 2  # what its registry heartbeat reports to agents and planner
        await send(redis, request("new", cut=3))
        (new,) = await group_entries(redis, stream, 1)
        assert new.req_id == "new"


async def test_switches_anyway_when_no_worker_comes(redis: Redis, ingress: IngressService) -> None:
    ingress.switch_timeout_s = 1.5  # far above the check below even on a loaded machine
    await publish_plan(redis, plan(2, [group("all", list(range(N)))]))
    await eventually(lambda: _waiting(ingress, 2))
    assert ingress.view is not None and ingress.view.epoch == 1
    await eventually(lambda: _epoch(ingress, 2))


async def _waiting(service: IngressService, epoch: int) -> bool:
    return service._waiting is not None and service._waiting.epoch == epoch


async def _has_group(r: Redis, stream: str) -> bool:
    if not await r.exists(stream):
        return False
    return [g["name"] for g in await r.xinfo_groups(stream)] == [b"workers"]


async def _epoch(service: IngressService, epoch: int) -> bool:
    return service.view is not None and service.view.epoch == epoch


async def test_waits_for_the_first_plan_before_consuming(redis: Redis, settings: Settings) -> None:
    async with serving_replica(redis, keys.group_stream(1, "g0")):
        service, stop, task = start(redis, settings, "ingress-w")
        await send(redis, request("early"))
        await asyncio.sleep(0.3)
        assert not service.ready.is_set() and await redis.xlen(keys.group_stream(1, "g0")) == 0
        await publish_plan(redis, PLAN)
        (early,) = await group_entries(redis, keys.group_stream(1, "g0"), 1)
        assert early.req_id == "early"
        stop.set()
        await asyncio.wait_for(task, 10)


def test_route_falls_back_to_the_nearest_group_below_an_unlisted_cut() -> None:
    view = PlanView(plan(3, [group("a", [2, 3]), group("b", [4, 5]), group("b-loose", [4, 5], min_budget_ms=5.0)]))
    assert view.resolve("resnet18", 3, 50.0).id == "a"
    assert view.resolve("resnet18", 9, 50.0).id == "b-loose"
    assert view.resolve("resnet18", 9, 1.0).id == "b"
    # below every group: the model's lowest group (replicas hold the whole model)
    assert view.resolve("resnet18", 0, 50.0).id == "a"
    with pytest.raises(BadCut):
        view.resolve("vgg16", 2, 50.0)


async def test_deadline_counts_from_when_redis_accepted_the_entry(redis: Redis, ingress: IngressService) -> None:
    """The old ingress stamped the deadline when it read the entry: a request queued for 5 s while the
    ingress was down was routed with its whole budget ahead of it, and answered seconds late."""
    t = await redis.time()
    now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
    await redis.xadd(keys.INGRESS, {keys.FIELD: request("queued", budget_ms=2_000.0)}, id=f"{now_ms - 5_000}-0")
    await redis.xadd(keys.INGRESS, {keys.FIELD: request("recent", budget_ms=9_000.0)}, id=f"{now_ms - 5_000}-1")
    got = await replies(redis, "cli", 1)
    late = got["queued"].error
    assert late is not None and late.code == "DEADLINE_EXCEEDED" and late.details["late_ms"] >= 2_900
    (recent,) = await group_entries(redis, keys.group_stream(1, "g0"), 1)
    assert recent.req_id == "recent" and recent.received == pytest.approx(now_ms / 1000 - 5.0, abs=0.01)
    assert recent.deadline == pytest.approx(recent.received + 9.0)  # type: ignore[operator]


async def test_no_live_replica_routes_to_a_live_group_of_the_model_or_answers(redis: Redis, settings: Settings) -> None:
    await publish_plan(redis, PLAN)
    async with serving_replica(redis, keys.group_stream(1, "g1")):
        service, stop, task = start(redis, settings, "ingress-f")
        await asyncio.wait_for(service.ready.wait(), 10)
        await seen_serving(service, keys.group_stream(1, "g1"))
        await send(redis, request("to-g0", cut=2))  # g0 has no live replica: g1 serves any cut of the model
        (moved,) = await group_entries(redis, keys.group_stream(1, "g1"), 1)
        assert moved.req_id == "to-g0" and await redis.xlen(keys.group_stream(1, "g0")) == 0
    await eventually(lambda: _none_live(service))
    await send(redis, request("nobody", cut=2))
    got = (await replies(redis, "cli", 1))["nobody"]
    assert got.error is not None and got.error.code == "OVERLOADED" and got.error.details["retry_after_ms"] > 0
    stop.set()
    await asyncio.wait_for(task, 10)


async def _none_live(service: IngressService) -> bool:
    return not service.serving.readers


async def test_a_budget_below_the_fastest_run_is_answered_at_once(redis: Redis, ingress: IngressService) -> None:
    """g1 takes 100 ms for one request: a 50 ms budget can never be met, so OVERLOADED with a retry hint
    (what the old ingress answered) would be a lie; DEADLINE_EXCEEDED, and nothing is routed."""
    await send(redis, request("hopeless", cut=N - 1, budget_ms=50.0))
    err = (await replies(redis, "cli", 1))["hopeless"].error
    assert err is not None and err.code == "DEADLINE_EXCEEDED" and err.details["fastest_ms"] == pytest.approx(100.0)
    assert await redis.xlen(keys.group_stream(1, "g1")) == 0


async def test_a_retry_with_the_same_req_id_gets_its_own_reply(redis: Redis, ingress: IngressService) -> None:
    """The old reply marker was global per req_id for an hour: a retry after OVERLOADED was swallowed."""
    await send(redis, request("again", cut=N + 3))
    first = await replies(redis, "cli", 1)
    await send(redis, request("again", cut=N + 4))
    rows = await eventually(lambda: _rows(redis, "cli", 2))
    reps = [wire.decode_reply(f[keys.FIELD]) for _, f in rows]
    assert [r.req_id for r in reps] == ["again", "again"] and first["again"].source == reps[0].source
    assert reps[0].source != reps[1].source  # each submission answers its own graft:ingress entry


async def _rows(r: Redis, client: str, n: int) -> list[Any]:
    rows = await r.xrange(keys.reply_stream(client))
    return rows if len(rows) >= n else []


async def test_routing_bench_routes_everything(redis: Redis, redis_url: str) -> None:
    rate = await measure_routing_rate(redis_url, n=400)
    assert rate > 0
    assert not await redis.exists(keys.PLAN)  # the bench cleans up after itself


async def test_poison_entry_is_dead_lettered_and_still_answered(redis: Redis, settings: Settings) -> None:
    """An entry this consumer already failed on too often goes to dead letters, with an INTERNAL reply."""
    await publish_plan(redis, PLAN)
    await redis.xgroup_create(keys.INGRESS, keys.INGRESS_GROUP, id="0", mkstream=True)
    await send(redis, request("poison"))
    await redis.xreadgroup(keys.INGRESS_GROUP, "ingress-p", {keys.INGRESS: ">"})
    for _ in range(settings.max_deliveries):  # each re-read of its own pending counts a delivery
        await redis.xreadgroup(keys.INGRESS_GROUP, "ingress-p", {keys.INGRESS: "0"})
    _service, stop, task = start(redis, settings, "ingress-p")
    got = await replies(redis, "cli", 1)
    assert got["poison"].error is not None and got["poison"].error.code == "INTERNAL"
    assert [d.entry_id for d in await list_dead_letters(redis, keys.INGRESS)] != []
    assert await redis.xlen(keys.group_stream(1, "g0")) == 0
    stop.set()
    await asyncio.wait_for(task, 10)
