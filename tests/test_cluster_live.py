"""``graft up`` on a real 3-master Redis Cluster: ``tools.up.start_system`` + ``wait_ready`` with
``GRAFT_REDIS_MODE=cluster``, ``REDIS_URL`` naming one node and three ingress shards — planner, ingress,
worker agent (with its replica processes) and gateway as child processes, resnet18 at 32 px.

SDK clients on every shard get results equal to local execution, inline and as blobs, exactly one reply
each; the gateway answers; the running system's keys sit on several masters, each family on one slot;
a malformed message on a shard is dead-lettered beside it and found by the admin CLI's scan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import tritonclient.http as httpclient
from redis.asyncio import Redis

from common.client import GraftClient
from common.contract import keys, wire
from common.model.zoo import build_blocks
from common.settings import Settings
from common.store.connection import connect
from services.planner.leadership import Lease
from tests.gateway_helpers import free_port, write_cpu_profile
from tests.helpers import run_blocks
from tools import admin
from tools.redis_server import RedisClusterServer
from tools.up import System, start_system, wait_ready

RES = 32
MODEL = "resnet18"
CUTS = (0, 4, 8, 13)
SHARDS = 3

pytestmark = [pytest.mark.timeout(150), pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Live:
    system: System
    settings: Settings
    cluster: RedisClusterServer
    r: Any
    http: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(redis_cluster: RedisClusterServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    redis_cluster.flushall()
    tmp = tmp_path_factory.mktemp("cluster-live")
    profile = write_cpu_profile(tmp / "cpu.json", (MODEL,), RES)
    http = free_port()
    settings = Settings(redis_url=redis_cluster.url, redis_mode="cluster", ingress_shards=SHARDS, models=(MODEL,),
                        resolution=RES, device="cpu", log_level="warning", replan_s=3600.0,
                        gateway_http_port=http, gateway_grpc_port=free_port())
    system = await start_system(settings, profile, log_dir=tmp / "logs")
    r = connect(redis_cluster.url, settings=settings)
    try:
        await wait_ready(system, timeout=100)
        yield Live(system, settings, redis_cluster, r, f"127.0.0.1:{http}")
    finally:
        await r.aclose()
        await system.stop()
    assert all(st["last_exit"] == 0 for st in system.supervisor.status().values()), system.supervisor.status()


def client_ids() -> dict[tuple[int, bool], str]:
    """A client id per (shard, blob or inline)."""
    out: dict[tuple[int, bool], str] = {}
    for i in range(100):
        c = f"phone-{i}"
        out.setdefault((keys.ingress_shard(c, SHARDS), len(out) % 2 == 1), c)
        if len(out) == 2 * SHARDS:
            return out
    raise AssertionError("no client ids for every shard")


async def submit_until_served(client: GraftClient, cut: int, x: np.ndarray) -> wire.Reply:
    """The reply; a first request may still meet a replica that is loading (OVERLOADED): try again."""
    deadline = time.monotonic() + 60
    while True:
        rep = await client.submit_reply(MODEL, cut, x, budget_ms=20_000.0, timeout_s=40.0)
        if rep.ok or rep.error is None or rep.error.code != "OVERLOADED" or time.monotonic() > deadline:
            return rep
        await asyncio.sleep(0.2)


async def test_graft_up_on_the_cluster_answers_every_shard_inline_and_by_blob(live: Live) -> None:
    blocks = build_blocks(MODEL, resolution=RES, seed=0)
    rng = np.random.default_rng(3)
    images = [rng.standard_normal((3, RES, RES)).astype(np.float32) for _ in CUTS]
    ids = client_ids()

    async def one(shard: int, blob: bool) -> list[tuple[wire.Reply, np.ndarray]]:
        async with GraftClient(live.settings.redis_url, settings=live.settings, client_id=ids[shard, blob],
                               blob_threshold_bytes=1 if blob else 0, default_timeout_s=40.0) as client:
            assert client.ingress_stream == keys.ingress_stream(shard)
            reps = await asyncio.gather(*(submit_until_served(client, c, run_blocks(blocks, x, 0, c))
                                          for c, x in zip(CUTS, images, strict=True)))
        return [(rep, run_blocks(blocks, x, 0, len(blocks))) for rep, x in zip(reps, images, strict=True)]

    results = await asyncio.gather(*(one(shard, blob) for shard, blob in ids))
    for rep, want in (pair for res in results for pair in res):
        assert rep.ok and rep.tensor is not None, rep.error
        np.testing.assert_allclose(rep.tensor, want, rtol=1e-4, atol=1e-5)
    for shard in range(SHARDS):  # every shard read, every entry acked on its own shard
        (group,) = await live.r.xinfo_groups(keys.ingress_stream(shard))
        assert group["entries-read"] >= 2 * len(CUTS) and group["pending"] == 0
    for client in ids.values():  # exactly one reply per request in every client's stream
        rows = await live.r.xrange(keys.reply_stream(client))
        assert sorted(wire.decode_reply(f[keys.FIELD]).req_id for _, f in rows) == sorted(
            {wire.decode_reply(f[keys.FIELD]).req_id for _, f in rows}) and len(rows) >= len(CUTS)
    deadline = time.monotonic() + 10
    while blobs := [k async for k in live.r.scan_iter(match=keys.blob("*"))]:  # SCAN on every primary
        assert time.monotonic() < deadline, f"blobs left behind: {blobs}"
        await asyncio.sleep(0.1)


async def test_the_gateway_answers_through_the_cluster(live: Live) -> None:
    blocks = build_blocks(MODEL, resolution=RES, seed=0)
    x = np.random.default_rng(5).standard_normal((3, RES, RES)).astype(np.float32)
    h = run_blocks(blocks, x, 0, 8)[None]

    def infer() -> np.ndarray:
        client = httpclient.InferenceServerClient(live.http, network_timeout=60.0)
        try:
            inp = httpclient.InferInput("cut_8", list(h.shape), "FP32")
            inp.set_data_from_numpy(h, binary_data=True)
            out = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
            got = out.as_numpy("logits")
            assert got is not None
            return got
        finally:
            client.close()

    got = await asyncio.to_thread(infer)
    np.testing.assert_allclose(got[0], run_blocks(blocks, x, 0, len(blocks)), rtol=1e-4, atol=1e-5)


async def test_the_running_systems_keys_sit_on_several_masters_each_family_on_one_slot(live: Live) -> None:
    where: dict[str, str] = {}  # key -> the master that holds it, asked of each master itself
    for node in live.cluster.nodes:
        async with Redis(host="127.0.0.1", port=node.port) as plain:
            where.update({k.decode(): f"127.0.0.1:{node.port}" async for k in plain.scan_iter(count=1000)})
    assert len(set(where.values())) >= 2, where
    kinds = {row["service"] for row in await admin.services_status(live.r)}
    assert kinds == set(keys.KINDS)
    families = [[keys.PLAN, keys.PLANS, keys.PLANNER_LEASE], [keys.STATS], *[[s] for s in keys.ingress_streams(SHARDS)],
                *[[keys.registry(k), keys.registry_seen(k)] for k in keys.KINDS]]
    for family in families:
        assert all(k in where for k in family), [k for k in family if k not in where]
        assert len({where[k] for k in family}) == 1, family
    assert len({where[s] for s in keys.ingress_streams(SHARDS)}) == SHARDS  # the shards on three masters
    replies = [k for k in where if k.startswith("graft:reply:")]
    assert replies and all(where[k] == where[k.replace(":reply:", ":replied:")] for k in replies)
    planners = [row["name"] for row in await admin.services_status(live.r) if row["service"] == keys.PLANNER_KIND]
    assert await Lease(live.r, "observer").holder() == planners[0]  # the live planner holds the lease


async def test_a_malformed_message_on_a_shard_is_dead_lettered_beside_it(live: Live, tmp_path: Path) -> None:
    shard = keys.ingress_stream(2)
    await live.r.xadd(shard, {keys.FIELD: b"\xc1not msgpack"})
    deadline = time.monotonic() + 10
    while not (rows := [row for row in await admin.dead_letters(live.r) if row["stream"] == shard]):
        assert time.monotonic() < deadline, "the malformed message was never dead-lettered"
        await asyncio.sleep(0.1)
    assert rows[0]["code"] == "INVALID_REQUEST"
    assert await live.r.xlen(keys.dead_letters(shard)) == 1
    assert (await live.r.xpending(shard, keys.INGRESS_GROUP))["pending"] == 0
