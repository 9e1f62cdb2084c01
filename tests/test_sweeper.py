"""The planner's orphan sweeper against a private Redis: what a stream nobody reads held is re-routed,
put back or answered in time, and a stream a live replica reads (the registry says so) is left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from common.contract import keys, wire
from common.contract.errors import ErrorCode
from common.metrics import REGISTRY
from common.settings import Settings
from common.store.plan_store import load_plan, publish_plan
from common.store.streams import ensure_group, list_dead_letters
from services.planner.sweeper import MIN_IDLE_GRACE_S, OrphanSweeper
from tests.helpers import serving_replica

CLIENT = "client-1"
OLD, NEW = 1, 2
OLD_STREAM = keys.group_stream(OLD, "g0")
NEW_STREAM = keys.group_stream(NEW, "a")
GRACE_S = 0.05


def group(gid: str, model: str, cuts: Sequence[int], latency_ms: float = 20.0) -> dict[str, Any]:
    return {"id": gid, "model": model, "fragments": [[model, c] for c in cuts], "cuts": list(cuts), "batch": 4,
            "share": 1, "replicas": 1, "latency_ms": latency_ms, "rate_rps": 1.0, "min_budget_ms": 0.0}


def plan(epoch: int, groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epoch": epoch, "policy": "test", "profile": None, "rho": 0.9, "groups": groups, "infeasible": [],
            "placement": [{"device": "cpu0", "replicas": [{"group": g["id"], "share": 1} for g in groups]}],
            "total_share": len(groups), "gpus": 0, "routes": {}}


async def publish_both(r: Any, new_latency_ms: float = 20.0) -> None:
    """Epoch 1 served m1 (cuts 0-2) and m2; epoch 2 serves m1 from cut 1 only."""
    await publish_plan(r, plan(OLD, [group("g0", "m1", [0, 1, 2]), group("g1", "m2", [0])]))
    await publish_plan(r, plan(NEW, [group("a", "m1", [1, 2], new_latency_ms)]))


def request(req_id: str, *, model: str = "m1", cut: int = 1, budget_ms: float = 30_000.0,
            age_s: float = 0.0, blob: bool = False) -> bytes:
    received = time.time() - age_s
    return wire.encode_request(wire.Request(
        req_id=req_id, client=CLIENT, model=model, cut=cut, tensor=np.arange(4, dtype=np.float32).reshape(2, 2),
        budget_ms=budget_ms, received=received, deadline=received + budget_ms / 1000.0,
        blob=keys.blob(req_id) if blob else None))


async def xadd(r: Any, stream: str, payloads: Sequence[bytes]) -> list[str]:
    return [(await r.xadd(stream, {keys.FIELD: p})).decode() for p in payloads]


async def held_by_dead_consumer(r: Any, stream: str, payloads: Sequence[bytes],
                                consumer: str = "cpu0-g0-0") -> list[str]:
    """``consumer`` reads the entries and dies without acking them."""
    ids = await xadd(r, stream, payloads)
    got = await r.xreadgroup(keys.WORKER_GROUP, consumer, {stream: ">"}, count=len(payloads))
    assert len(got[0][1]) == len(payloads)
    return ids


async def reply_codes(r: Any) -> dict[str, str | None]:
    rows = await r.xrange(keys.reply_stream(CLIENT))
    out: dict[str, str | None] = {}
    for _id, fields in rows:
        rep = wire.decode_reply(fields[keys.FIELD])
        assert rep.req_id not in out, f"two replies for {rep.req_id}"
        out[rep.req_id] = None if rep.error is None else rep.error.code
    return out


async def stream_payloads(r: Any, stream: str) -> dict[str, bytes]:
    return {wire.decode_request(f[keys.FIELD]).req_id: f[keys.FIELD] for _id, f in await r.xrange(stream)}


def sweeper(r: Any, **kw: Any) -> OrphanSweeper:
    opts: dict[str, Any] = {"consumer": "sweeper-t", "idle_grace_s": GRACE_S, "orphan_grace_s": 0.0, **kw}
    return OrphanSweeper(r, Settings(max_deliveries=3), **opts)


def swept(outcome: str) -> float:
    return REGISTRY.get_sample_value("graft_swept_total", {"outcome": outcome}) or 0.0


def test_group_stream_names_parse_back() -> None:
    assert keys.parse_group_stream(keys.group_stream(12, "g-3")) == (12, "g-3")
    assert keys.parse_group_stream(keys.group_stream(3, "a:b").encode()) == (3, "a:b")
    for other in ("graft:group:x:g0", "graft:group:7", "graft:group:7:", "graft:dead:graft:group:1:g0",
                  "graft:reply:c", "graft:group:²:g0"):
        assert keys.parse_group_stream(other) is None


async def test_abandoned_stream_is_rerouted_answered_and_deleted(redis: Any) -> None:
    await publish_both(redis)
    await ensure_group(redis, OLD_STREAM, keys.WORKER_GROUP, "0")
    pending = {f"p{i}": request(f"p{i}", cut=1 + i % 2) for i in range(3)}
    pending["old"] = request("old", budget_ms=50.0, age_s=1.0)                  # (c) deadline passed
    ids = await held_by_dead_consumer(redis, OLD_STREAM, [*pending.values(), request("trimmed")])
    await redis.xdel(OLD_STREAM, ids[-1])                                        # pending, entry gone
    undelivered = {"u0": request("u0", cut=2), "u1": request("u1", cut=7),     # (b); cut 7 runs in "a"
                   "ub": request("ub", blob=True)}
    await xadd(redis, OLD_STREAM, [*undelivered.values(), b"\xc1garbage",     # (d) malformed
                                   request("m2", model="m2", blob=True),       # (e) model no longer served
                                   request("c0", cut=0)])  # below every group: the lowest one runs it
    for rid in ("ub", "m2"):
        await redis.set(keys.blob(rid), b"\0" * 16, ex=60)
    await asyncio.sleep(GRACE_S * 2)  # the dead consumer's entries are now idle past the grace
    before = {o: swept(o) for o in ("rerouted", "expired", "unknown_model", "bad_cut", "malformed", "gone")}

    async with serving_replica(redis, NEW_STREAM):  # the current stream is served: only the old one is swept
        reports = await sweeper(redis).sweep_once()

    assert [(r.stream, r.epoch, r.group, r.deleted) for r in reports] == [(OLD_STREAM, OLD, "g0", True)]
    counts = reports[0].counts
    assert dict(counts) == {"rerouted": 7, "expired": 1, "unknown_model": 1, "malformed": 1, "gone": 1}
    assert {o: swept(o) - n for o, n in before.items() if o in counts} == dict(counts)
    # Live requests: in the current epoch's stream, byte for byte (same req_id, received, deadline).
    live = {k: v for k, v in {**pending, **undelivered, "c0": request("c0", cut=0)}.items() if k != "old"}
    live_ids = set(live)
    got = await stream_payloads(redis, NEW_STREAM)
    assert set(got) == live_ids and all(got[k] == v for k, v in live.items() if k != "c0")
    groups = await redis.xinfo_groups(NEW_STREAM)  # made from id 0: a replica starting later reads them all
    assert [(g["name"], g["last-delivered-id"], g["pending"]) for g in groups] == [
        (keys.WORKER_GROUP.encode(), b"0-0", 0)]
    assert await redis.exists(keys.blob("ub")) and not await redis.exists(keys.blob("m2"))  # answered: gone
    # Expired and unserved: answered with the right code, exactly once; nothing else answered.
    assert await reply_codes(redis) == {"old": str(ErrorCode.DEADLINE_EXCEEDED),
                                        "m2": str(ErrorCode.UNKNOWN_MODEL)}
    dead = await list_dead_letters(redis, OLD_STREAM)
    assert [(d.payload, d.code) for d in dead] == [(b"\xc1garbage", str(ErrorCode.INVALID_REQUEST))]
    assert not await redis.exists(OLD_STREAM)

    # A second pass finds nothing more to do with it.
    async with serving_replica(redis, NEW_STREAM):
        assert await sweeper(redis).sweep_once() == []
    assert len(await reply_codes(redis)) == 2


async def test_a_live_reader_keeps_the_stream(redis: Any) -> None:
    await publish_both(redis)
    await ensure_group(redis, OLD_STREAM, keys.WORKER_GROUP, "0")
    await held_by_dead_consumer(redis, OLD_STREAM, [request("p0")])
    await xadd(redis, OLD_STREAM, [request("u0")])
    await asyncio.sleep(GRACE_S * 2)
    async with serving_replica(redis, OLD_STREAM, NEW_STREAM, name="draining-replica"):
        assert await sweeper(redis).sweep_once() == []
        assert await redis.xlen(OLD_STREAM) == 2
        assert not await redis.exists(NEW_STREAM)
    # A live replica that reads only the new stream says nothing about the old one.
    async with serving_replica(redis, NEW_STREAM, name="new-replica"):
        [report] = await sweeper(redis).sweep_once()
        assert report.stream == OLD_STREAM and report.counts["rerouted"] == 2 and report.deleted


async def test_entries_held_less_than_the_idle_grace_stay_with_their_consumer(redis: Any) -> None:
    await publish_both(redis)
    await ensure_group(redis, OLD_STREAM, keys.WORKER_GROUP, "0")
    await xadd(redis, OLD_STREAM, [request("u0")])
    await redis.xreadgroup(keys.WORKER_GROUP, "slow-replica", {OLD_STREAM: ">"}, count=1)

    [report] = [r for r in await sweeper(redis, idle_grace_s=30.0).sweep_once() if r.stream == OLD_STREAM]
    assert not report.counts and not report.deleted
    assert await redis.xlen(OLD_STREAM) == 1
    [(_, owner)] = [(row["message_id"], row["consumer"])
                    for row in await redis.xpending_range(OLD_STREAM, keys.WORKER_GROUP, "-", "+", 10)]
    assert owner == b"slow-replica"


async def test_a_stream_waits_out_the_orphan_grace(redis: Any) -> None:
    await publish_both(redis)
    await xadd(redis, OLD_STREAM, [request("u0")])  # no workers' group at all (a switch that timed out)
    now = [100.0]
    s = sweeper(redis, orphan_grace_s=1.0, clock=lambda: now[0])
    assert [r for r in await s.sweep_once() if r.stream == OLD_STREAM] == []
    now[0] += 0.9
    assert [r for r in await s.sweep_once() if r.stream == OLD_STREAM] == []
    assert await redis.xlen(OLD_STREAM) == 1
    now[0] += 0.2
    [report] = [r for r in await s.sweep_once() if r.stream == OLD_STREAM]
    assert report.counts["rerouted"] == 1 and report.deleted
    assert list(await stream_payloads(redis, NEW_STREAM)) == ["u0"]


async def test_a_current_stream_nobody_reads_answers_what_expired_and_keeps_the_rest(redis: Any) -> None:
    """The old sweeper never touched the current epoch: with its replicas dead (an agent and its
    children killed at once), requests in it waited unanswered far past their deadlines."""
    await publish_both(redis)
    await ensure_group(redis, NEW_STREAM, keys.WORKER_GROUP, "0")
    await held_by_dead_consumer(redis, NEW_STREAM, [request("p0"), request("late", budget_ms=1.0, age_s=5.0)])
    await xadd(redis, NEW_STREAM, [request("u0"), request("u-late", budget_ms=1.0, age_s=5.0), b"junk"])
    await asyncio.sleep(GRACE_S * 2)

    [report] = [r for r in await sweeper(redis).sweep_once() if r.stream == NEW_STREAM]
    assert report.counts["expired"] == 2 and report.counts["malformed"] == 1 and report.counts["requeued"] == 2
    assert await reply_codes(redis) == {"late": str(ErrorCode.DEADLINE_EXCEEDED),
                                        "u-late": str(ErrorCode.DEADLINE_EXCEEDED)}
    # the live ones wait at the end of their own stream, undelivered, for the replicas to come back
    groups = await redis.xinfo_groups(NEW_STREAM)
    assert groups[0]["pending"] == 0 and groups[0]["lag"] == 2
    tail = await redis.xrevrange(NEW_STREAM, count=2)
    assert sorted(wire.decode_request(f[keys.FIELD]).req_id for _, f in tail) == ["p0", "u0"]


async def test_a_current_stream_a_live_replica_reads_is_never_touched(redis: Any) -> None:
    await publish_both(redis)
    await ensure_group(redis, NEW_STREAM, keys.WORKER_GROUP, "0")
    await held_by_dead_consumer(redis, NEW_STREAM, [request("p0"), request("late", budget_ms=1.0, age_s=5.0)])
    await xadd(redis, NEW_STREAM, [request("u0"), b"junk"])
    await asyncio.sleep(GRACE_S * 2)
    async with serving_replica(redis, NEW_STREAM):
        assert await sweeper(redis).sweep_once() == []
    assert await redis.xlen(NEW_STREAM) == 4
    assert len(await redis.xpending_range(NEW_STREAM, keys.WORKER_GROUP, "-", "+", 10)) == 2
    assert await reply_codes(redis) == {}
    assert not await redis.exists(keys.dead_letters(NEW_STREAM))


async def test_two_sweepers_reroute_each_entry_once(redis: Any) -> None:
    await publish_both(redis)
    await ensure_group(redis, OLD_STREAM, keys.WORKER_GROUP, "0")
    await held_by_dead_consumer(redis, OLD_STREAM, [request(f"p{i}") for i in range(150)])
    await xadd(redis, OLD_STREAM, [request(f"u{i}") for i in range(150)] + [request("old", budget_ms=1.0)])
    await asyncio.sleep(GRACE_S * 2)

    a, b = sweeper(redis, consumer="sweeper-a", page=20), sweeper(redis, consumer="sweeper-b", page=20)
    async with serving_replica(redis, NEW_STREAM):  # the current stream is served: only the old one is swept
        await asyncio.gather(a.sweep_once(), b.sweep_once())
        await asyncio.sleep(GRACE_S * 2)
        await asyncio.gather(a.sweep_once(), b.sweep_once())  # whatever the race left pending

    assert len(await redis.xrange(NEW_STREAM)) == len(await stream_payloads(redis, NEW_STREAM)) == 300
    assert await reply_codes(redis) == {"old": str(ErrorCode.DEADLINE_EXCEEDED)}
    assert not await redis.exists(OLD_STREAM)


async def test_idle_grace_defaults_to_twice_the_worst_batch_or_a_second(redis: Any) -> None:
    await publish_both(redis)
    view = await load_plan(redis)
    assert view is not None
    s = OrphanSweeper(redis, Settings())
    assert s.orphan_grace_s == pytest.approx(1.0)
    assert await s.idle_grace_ms(OLD, "g0", view) == int(MIN_IDLE_GRACE_S * 1000)
    await publish_plan(redis, plan(3, [group("a", "m1", [1, 2], latency_ms=7_000.0)]))
    view = await load_plan(redis)
    assert view is not None
    assert await s.idle_grace_ms(OLD, "g0", view) == 14_000
