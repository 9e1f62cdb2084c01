"""Graft on a real 3-master Redis Cluster (``GRAFT_REDIS_MODE=cluster``): keys, scripts, dead letters,
the ingress over several shards, the sweeper's re-route between masters, the registry, plans and the
planner lease. Which master holds a key is asked of the servers (CLUSTER KEYSLOT, CLUSTER SLOTS);
writes are made to fail for real on one master (``maxmemory 1``: OOM) to show what is never acked
unanswered. The live system (``graft up`` on the cluster) is in ``test_cluster_live.py``."""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest
from redis import Redis as SyncRedis
from redis.exceptions import ResponseError

from common.contract import keys, wire
from common.contract.errors import ErrorCode
from common.model.zoo import describe
from common.settings import Settings, SettingsError
from common.store.cluster import GraftRedisCluster, _read_streams
from common.store.connection import block_below_timeout, connect
from common.store.plan_store import NotLeader, PlanWatcher, StaleEpoch, publish_plan
from common.store.registry import Registry
from common.store.replies import ReplySender
from common.store.streams import StreamConsumer, ensure_group, list_dead_letters
from services.ingress.bench import bench_plan
from services.ingress.service import IngressService
from services.planner.leadership import Lease
from services.planner.rerouting import Rerouter
from services.planner.sweeper import OrphanSweeper
from tests.helpers import serving_replica
from tests.test_sweeper import group, plan, request
from tools import admin
from tools.redis_server import RedisClusterServer
from tools.up import start_system

pytestmark = pytest.mark.timeout(60)

RES = 32


def cluster_settings(url: str, **kw: Any) -> Settings:
    return Settings(redis_url=url, redis_mode="cluster", models=("resnet18",), resolution=RES, **kw)


class Masters:
    """What the servers say: each key's slot (CLUSTER KEYSLOT) and the master serving that slot."""

    def __init__(self, cluster: RedisClusterServer) -> None:
        self.nodes = {f"127.0.0.1:{n.port}": SyncRedis(host="127.0.0.1", port=n.port) for n in cluster.nodes}
        first = next(iter(self.nodes.values()))
        self._first = first
        self.ranges = [(int(r[0]), int(r[1]), f"{r[2][0].decode()}:{r[2][1]}")
                       for r in first.execute_command("CLUSTER", "SLOTS")]

    def slot(self, key: str) -> int:
        return int(self._first.execute_command("CLUSTER", "KEYSLOT", key))

    def master(self, key: str) -> str:
        s = self.slot(key)
        return next(node for lo, hi, node in self.ranges if lo <= s <= hi)

    def set_full(self, node: str, full: bool) -> None:
        self.nodes[node].config_set("maxmemory", 1 if full else 0)

    def close(self) -> None:
        for c in self.nodes.values():
            c.close()


@pytest.fixture
def masters(redis_cluster: RedisClusterServer) -> Iterator[Masters]:
    m = Masters(redis_cluster)
    try:
        yield m
    finally:
        for node in m.nodes:
            m.set_full(node, False)
        m.close()


@pytest.fixture
async def rc(redis_cluster: RedisClusterServer, masters: Masters) -> AsyncIterator[Any]:
    """A cluster client on emptied masters whose script caches are empty too (every script NOSCRIPTs once)."""
    redis_cluster.flushall()
    for c in masters.nodes.values():
        c.script_flush()
    client = connect(redis_cluster.url, settings=cluster_settings(redis_cluster.url))
    try:
        yield client
    finally:
        await client.aclose()


async def until_true(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def client_on(masters: Masters, node: str, *, avoid: str | None = None) -> str:
    """A client id whose reply stream lives on ``node``."""
    return next(c for c in (f"client-{i}" for i in range(1000))
                if masters.master(keys.reply_stream(c)) == node and c != avoid)


# ------------------------------------------------------------------------------------------ keys


def test_a_producers_shard_is_crc32_of_its_client_id() -> None:
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the standard CRC-32/IEEE check value
    assert keys.ingress_shard("123456789", 0xCBF43926 + 1) == 0xCBF43926
    assert keys.ingress_shard("phone-7", 3) == zlib.crc32(b"phone-7") % 3 == 1
    assert keys.ingress_shard("anyone", 1) == 0
    assert keys.ingress_streams(3) == ["graft:{ingress}", "graft:{ingress:1}", "graft:{ingress:2}"]
    assert keys.INGRESS == keys.ingress_stream(0) and keys.client_ingress_stream("phone-7", 3) == "graft:{ingress:1}"
    assert {keys.ingress_shard(f"c{i}", 4) for i in range(64)} == {0, 1, 2, 3}


def test_stream_reads_are_routed_by_the_keys_after_streams() -> None:
    # A group or consumer may be named "streams"; the keys are those after the STREAMS token.
    assert _read_streams("XREADGROUP", (b"GROUP", "streams", "streams", b"COUNT", 5, b"BLOCK", 50, b"NOACK",
                                        b"STREAMS", "graft:{ingress}", ">")) == ("graft:{ingress}",)
    assert _read_streams("XREAD", (b"COUNT", 5, b"STREAMS", "a", "b", "0-0", "0-0")) == ("a", "b")
    assert _read_streams("XADD", ("a", "*")) == () and _read_streams("XREAD", (b"BOGUS", 1)) == ()


def test_keys_touched_together_share_a_slot_and_the_rest_spread(masters: Masters) -> None:
    together = [
        *[[s, keys.dead_letters(s)] for s in (*keys.ingress_streams(3), keys.STATS, keys.CONTROL,
                                               keys.group_stream(7, "resnet18-a"))],
        [keys.reply_stream("phone-7"), keys.reply_ledger("phone-7")],
        *[[keys.registry(k), keys.registry_seen(k)] for k in keys.KINDS],
        [keys.PLAN, keys.PLANS, keys.PLANNER_LEASE],
    ]
    for family in together:
        assert len({masters.slot(k) for k in family}) == 1, family
    # The shards of the ingress are on three masters; group streams and blobs spread too.
    assert len({masters.master(s) for s in keys.ingress_streams(3)}) == 3
    assert len({masters.master(keys.group_stream(1, f"g{i}")) for i in range(12)}) == 3
    assert len({masters.master(keys.blob(f"req-{i}")) for i in range(12)}) == 3


async def test_the_cluster_client_keeps_the_timeout_guarantee_and_reads_in_one_round_trip(
        rc: Any, masters: Masters) -> None:
    assert isinstance(rc, GraftRedisCluster)
    with pytest.raises(ValueError, match="socket timeout"):
        block_below_timeout(rc, 5000)  # 5 s BLOCK on a 5 s socket timeout: a silent retry waiting to happen
    with pytest.raises(SettingsError):
        Settings(redis_mode="cluster", block_ms=5000, socket_timeout_s=5.0)
    with pytest.raises(SettingsError, match="unix socket"):
        Settings(redis_mode="cluster", redis_url="unix:///tmp/redis.sock")

    def getkeys() -> int:
        return sum(int(c.info("commandstats").get("cmdstat_command|getkeys", {}).get("calls", 0))
                   for c in masters.nodes.values())

    stream = keys.ingress_stream(2)
    consumer = StreamConsumer(rc, stream, keys.INGRESS_GROUP, "c", block_ms=50)
    await rc.xadd(stream, {keys.FIELD: b"x"})
    before = getkeys()
    t0 = time.monotonic()
    got = [e for _ in range(10) for e in await consumer.read()]
    idle = await rc.xread({stream: "$"}, block=200)  # a blocked read returns empty at its BLOCK, once
    assert [e.payload for e in got] == [b"x"] and not idle
    assert time.monotonic() - t0 < 3.0
    assert getkeys() == before  # XREAD/XREADGROUP routed by their STREAMS keys, no COMMAND GETKEYS first


async def test_graft_up_in_cluster_mode_needs_a_node_to_connect_to(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="REDIS_URL"):
        await start_system(Settings(redis_mode="cluster"), tmp_path / "p.json", log_dir=tmp_path, services=())


# --------------------------------------------------------------------------------- replies, scripts


async def test_replies_from_cluster_pipelines_are_written_exactly_once_on_every_master(
        rc: Any, masters: Masters) -> None:
    clients = [client_on(masters, node) for node in masters.nodes]
    sender = ReplySender(rc)
    replies = [(c, _reply(f"{c}-r{i}", source=f"1-{i}")) for c in clients for i in range(3)]
    assert await sender.send_many(replies) == 9  # EVAL in a ClusterPipeline: no NOSCRIPT on fresh masters
    assert await sender.send_many(replies) == 0  # the same submissions again: swallowed
    assert not await sender.send(clients[0], _reply(f"{clients[0]}-r0", source="1-0"))
    assert await sender.send(clients[0], _reply(f"{clients[0]}-r0", source="2-0"))  # a retry: a new submission
    for c in clients:
        rows = await rc.xrange(keys.reply_stream(c))
        got = [(r.req_id, r.source) for r in (wire.decode_reply(f[keys.FIELD]) for _, f in rows)]
        assert sorted(got) == sorted([(f"{c}-r{i}", f"1-{i}") for i in range(3)] +
                                     ([(f"{c}-r0", "2-0")] if c == clients[0] else []))


def _reply(req_id: str, *, source: str) -> wire.Reply:
    rep = wire.Reply.result(req_id, np.zeros(2, np.float32))
    rep.source = source
    return rep


async def test_dead_letters_land_on_their_streams_slot_and_admin_finds_them_on_every_master(
        rc: Any, masters: Masters) -> None:
    streams = [keys.ingress_stream(2), keys.group_stream(3, "g")]
    assert masters.master(streams[0]) != masters.master(streams[1])
    for stream in streams:
        consumer = StreamConsumer(rc, stream, "grp", "c", block_ms=10, max_deliveries=1)
        await consumer.setup()
        await rc.xadd(stream, {b"other": b"no payload"})  # no ``m``: dead-lettered on read
        poison = (await rc.xadd(stream, {keys.FIELD: b"poison"})).decode()
        assert [e.id for e in await consumer.read()] == [poison]  # delivered once, not acked
        consumer.recover()
        assert await consumer.read() == []  # its second delivery is over max_deliveries: dead-lettered
        assert (await rc.xpending(stream, "grp"))["pending"] == 0
        assert [d.code for d in await list_dead_letters(rc, stream)] == ["INVALID_REQUEST", "INTERNAL"]
    rows = await admin.dead_letters(rc)  # SCAN on every primary
    assert sorted(row["stream"] for row in rows) == sorted(streams * 2)  # the streams they came from
    assert await admin.purge_dead_letters(rc) == 4 and await admin.dead_letters(rc) == []


# ----------------------------------------------------------------------------------- the ingress


def _requests(client: str, n: int) -> list[bytes]:
    info = describe("resnet18", RES)
    cut = info.n_blocks - 1
    x = np.ones(info.cut_shape(cut), np.float32)
    return [wire.encode_request(wire.Request(req_id=f"{client}-{i}", client=client, model="resnet18", cut=cut,
                                             tensor=x, budget_ms=30_000.0)) for i in range(n)]


@contextlib.asynccontextmanager
async def ingress(rc: Any, settings: Settings) -> AsyncIterator[IngressService]:
    await publish_plan(rc, bench_plan())
    service = IngressService(rc, settings, name="ingress-c", plan_interval_s=0.05, serving_interval_s=0.05)
    stop = asyncio.Event()
    async with serving_replica(rc, *(keys.group_stream(1, g) for g in ("g0", "g1"))):
        task = asyncio.create_task(service.run(stop))
        try:
            await asyncio.wait_for(service.ready.wait(), 20)
            yield service
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)


async def test_one_ingress_reads_every_shard_and_acks_each_entry_on_its_own(rc: Any, redis_cluster: Any) -> None:
    settings = cluster_settings(redis_cluster.url, ingress_shards=3)
    clients = {keys.ingress_shard(f"c{i}", 3): f"c{i}" for i in range(10)}
    assert sorted(clients) == [0, 1, 2]
    async with ingress(rc, settings):
        for shard, client in clients.items():
            for p in _requests(client, 5):
                await rc.xadd(keys.ingress_stream(shard), {keys.FIELD: p})
        bad = wire.encode_request(wire.Request(req_id="nope", client=clients[1], model="vgg99", cut=0,
                                               tensor=np.zeros(2, np.float32), budget_ms=1000.0))
        await rc.xadd(keys.ingress_stream(1), {keys.FIELD: bad})
        await rc.xadd(keys.ingress_stream(2), {keys.FIELD: b"\xc1garbage"})

        async def routed() -> bool:
            return sum([await rc.xlen(keys.group_stream(1, g)) for g in ("g0", "g1")]) == 15
        await until_true(routed, 10, "every valid request routed")

        async def all_read() -> bool:  # pending 0 alone also holds before the bad entries are read at all
            reads = [(await rc.xinfo_groups(keys.ingress_stream(k)))[0]["entries-read"] for k in range(3)]
            return reads == [5, 6, 6]
        await until_true(all_read, 10, "every shard's entries read")
        await until_true(lambda: _pending_zero(rc, 3), 10, "every shard's entries acked")
        rows = await rc.xrange(keys.reply_stream(clients[1]))
        assert [wire.decode_reply(f[keys.FIELD]).error.code for _, f in rows] == [str(ErrorCode.UNKNOWN_MODEL)]
        dead = await list_dead_letters(rc, keys.ingress_stream(2))
        assert [d.payload for d in dead] == [b"\xc1garbage"]
        for shard in range(3):
            groups = await rc.xinfo_groups(keys.ingress_stream(shard))
            assert groups[0]["entries-read"] == 5 + (shard > 0)


async def _pending_zero(rc: Any, shards: int = 1) -> bool:
    for s in keys.ingress_streams(shards):
        if (await rc.xpending(s, keys.INGRESS_GROUP))["pending"]:
            return False
    return True


async def test_an_ingress_entry_stays_pending_until_its_reply_is_written(
        rc: Any, redis_cluster: Any, masters: Masters) -> None:
    client = client_on(masters, next(n for n in masters.nodes if n != masters.master(keys.INGRESS)))
    settings = cluster_settings(redis_cluster.url)
    async with ingress(rc, settings):
        bad = wire.encode_request(wire.Request(req_id="r1", client=client, model="vgg99", cut=0,
                                               tensor=np.zeros(2, np.float32), budget_ms=20_000.0))
        # The reply's master refuses the reply script (its ledger key holds a string: WRONGTYPE, before any
        # write); the refused request's entry sits on another master, where nothing fails.
        await rc.set(keys.reply_ledger(client), b"not a ledger")
        entry = (await rc.xadd(keys.INGRESS, {keys.FIELD: bad})).decode()
        await until_true(lambda: _read(rc), 5, "the ingress read the entry")
        await asyncio.sleep(0.3)
        pending = await rc.xpending_range(keys.INGRESS, keys.INGRESS_GROUP, min="-", max="+", count=10)
        assert [p["message_id"].decode() for p in pending] == [entry]  # not acked: no reply was written
        assert not await rc.exists(keys.reply_stream(client))
        await rc.delete(keys.reply_ledger(client))
        # The ingress's reaper takes it again once idle (1 s): answered, then acked.
        await until_true(lambda: _pending_zero(rc), 10, "the entry acked after its reply")
        rows = await rc.xrange(keys.reply_stream(client))
        assert [wire.decode_reply(f[keys.FIELD]).req_id for _, f in rows] == ["r1"]


async def _read(rc: Any) -> bool:
    groups = await rc.xinfo_groups(keys.INGRESS)
    return bool(groups) and int(groups[0]["entries-read"] or 0) >= 1


# ----------------------------------------------------------------------------------- the sweeper


def _apart(masters: Masters) -> tuple[str, str]:
    """A retired epoch-1 group stream and a current epoch-2 one on different masters."""
    old = keys.group_stream(1, "g0")
    new_gid = next(f"a{i}" for i in range(100)
                   if masters.master(keys.group_stream(2, f"a{i}")) != masters.master(old))
    return old, new_gid


async def test_a_reroute_between_masters_acks_only_what_reached_its_target(rc: Any, masters: Masters) -> None:
    old, new_gid = _apart(masters)
    new = keys.group_stream(2, new_gid)
    for stream in (old, new):
        await ensure_group(rc, stream, keys.WORKER_GROUP, "0")
    payloads = [request(f"p{i}") for i in range(4)]
    ids = [(await rc.xadd(old, {keys.FIELD: p})).decode() for p in payloads]
    await rc.xreadgroup(keys.WORKER_GROUP, "sweeper-c", {old: ">"}, count=4)
    rerouter = Rerouter(rc, ReplySender(rc), maxlen=1000)
    moves = [(i, new, p) for i, p in zip(ids, payloads, strict=True)]

    masters.set_full(masters.master(new), True)  # the target's master refuses writes (OOM)
    try:
        with pytest.raises(ResponseError, match="maxmemory"):
            await rerouter.write(old, moves, [], [], time.time())
    finally:
        masters.set_full(masters.master(new), False)
    assert await rc.xlen(new) == 0
    assert (await rc.xpending(old, keys.WORKER_GROUP))["pending"] == 4  # nothing acked, nothing lost

    assert await rerouter.write(old, moves, [], [], time.time()) == [True] * 4
    assert [f[keys.FIELD] for _, f in await rc.xrange(new)] == payloads
    assert (await rc.xpending(old, keys.WORKER_GROUP))["pending"] == 0


async def test_the_sweeper_moves_a_retired_streams_requests_to_another_master(rc: Any, masters: Masters) -> None:
    old, new_gid = _apart(masters)
    new = keys.group_stream(2, new_gid)
    await publish_plan(rc, plan(1, [group("g0", "m1", [0, 1, 2])]))
    await publish_plan(rc, plan(2, [group(new_gid, "m1", [0, 1, 2])]))
    await ensure_group(rc, old, keys.WORKER_GROUP, "0")
    live = {f"p{i}": request(f"p{i}") for i in range(4)}
    for p in live.values():
        await rc.xadd(old, {keys.FIELD: p})
    await rc.xreadgroup(keys.WORKER_GROUP, "dead-replica", {old: ">"}, count=4)  # it dies holding them
    await rc.xadd(old, {keys.FIELD: request("late", budget_ms=50.0, age_s=1.0)})  # expired: answered
    live["u0"] = request("u0")
    await rc.xadd(old, {keys.FIELD: live["u0"]})  # never delivered
    await asyncio.sleep(0.1)
    sweeper = OrphanSweeper(rc, Settings(max_deliveries=3), consumer="sweeper-c", idle_grace_s=0.05,
                            orphan_grace_s=0.0)
    async with serving_replica(rc, new):  # the current stream is served: only the retired one is swept
        reports = await sweeper.sweep_once()
        assert [(r.stream, r.deleted) for r in reports] == [(old, True)]
        assert dict(reports[0].counts) == {"rerouted": 5, "expired": 1}
        moved = {wire.decode_request(f[keys.FIELD]).req_id: f[keys.FIELD] for _, f in await rc.xrange(new)}
        assert moved == live  # byte for byte, each once
        codes = [wire.decode_reply(f[keys.FIELD]) for _, f in await rc.xrange(keys.reply_stream("client-1"))]
        assert [(r.req_id, r.error.code if r.error else None) for r in codes] == [("late", "DEADLINE_EXCEEDED")]
        assert not await rc.exists(old) and await sweeper.sweep_once() == []


# ---------------------------------------------------------------------- registry, plans, lease


async def test_registry_plans_and_the_planner_lease_on_the_cluster(rc: Any, masters: Masters) -> None:
    kinds = (keys.REPLICA_KIND, keys.INGRESS_KIND, keys.PLANNER_KIND)
    assert len({masters.master(keys.registry(k)) for k in kinds}) >= 2
    for k in kinds:  # scripts outside pipelines: NOSCRIPT on the fresh masters, loaded, run
        await Registry(rc, k, 5.0).beat(f"{k}-1", {"epoch": 1})
    assert {k: list(await Registry(rc, k, 5.0).live()) for k in kinds} == {k: [f"{k}-1"] for k in kinds}
    await Registry(rc, keys.REPLICA_KIND, 5.0).leave(f"{keys.REPLICA_KIND}-1")  # MULTI of HDEL + ZREM
    assert await Registry(rc, keys.REPLICA_KIND, 5.0).live() == {}

    a, b = Lease(rc, "planner-a", ttl_s=1.0), Lease(rc, "planner-b", ttl_s=1.0)
    assert await a.hold() and not await b.hold() and await b.holder() == "planner-a"
    watcher = PlanWatcher(rc)
    assert await publish_plan(rc, plan(1, [group("g", "m1", [0])]), fence="planner-a") == 1
    with pytest.raises(NotLeader):
        await publish_plan(rc, plan(2, [group("g", "m1", [0])]), fence="planner-b")
    with pytest.raises(StaleEpoch):
        await publish_plan(rc, plan(1, [group("g", "m1", [0])]), fence="planner-a")
    view = await watcher.poll()
    assert view is not None and view.epoch == 1
    await a.release()
    assert await b.hold() and await publish_plan(rc, plan(2, [group("g", "m1", [0])]), fence="planner-b") == 2
    assert len(await rc.xrange(keys.PLANS)) == 2
