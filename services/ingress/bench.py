"""How many small requests per second one ingress process routes (``graft bench runtime`` calls this).

The bench needs a Redis of its own: it publishes a plan and writes the ingress stream, so it refuses a
Redis that already holds a plan or an ingress stream. It XADDs ``n`` pre-encoded requests (resnet18's
last cut, 2 KiB each), registers a stand-in replica reading both group streams (the ingress routes only
to streams a live replica reads), starts the ingress loop in-process, and times from its first read
until every request sits in a group stream. The plan's capacity is huge and the budgets long, so
nothing is shed: this measures the validate → stamp → route → XACK path alone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np

from common.contract import keys, wire
from common.model.zoo import describe
from common.settings import Settings
from common.store.plan_store import publish_plan
from common.store.registry import Registry
from common.store.streams import connect, ensure_group
from services.ingress.service import IngressService

BENCH_MODEL = "resnet18"
BENCH_RESOLUTION = 32


def bench_plan(epoch: int = 1) -> dict[str, Any]:
    n = describe(BENCH_MODEL, BENCH_RESOLUTION).n_blocks
    half = n // 2
    groups = [
        {"id": gid, "model": BENCH_MODEL, "fragments": [], "cuts": cuts, "batch": 32, "share": 100,
         "replicas": 1000, "latency_ms": 1.0, "rate_rps": 0.0, "min_budget_ms": 0.0}
        for gid, cuts in (("g0", list(range(half))), ("g1", list(range(half, n))))
    ]
    return {"epoch": epoch, "policy": "bench", "profile": "none", "rho": 0.9, "groups": groups,
            "infeasible": [], "placement": [], "total_share": 0, "gpus": 0, "routes": {}}


def _requests(n: int, client: str) -> list[bytes]:
    info = describe(BENCH_MODEL, BENCH_RESOLUTION)
    cut = info.n_blocks - 1
    tensor = np.ones(info.cut_shape(cut), np.float32)
    return [wire.encode_request(wire.Request(req_id=f"{client}-{i}", client=client, model=BENCH_MODEL, cut=cut,
                                             tensor=tensor, budget_ms=30_000.0)) for i in range(n)]


async def measure_routing_rate(redis_url: str, n: int = 20_000, *, count: int = 256) -> float:
    """Requests per second routed by one in-process ingress (wall clock, this machine)."""
    settings = Settings(redis_url=redis_url, models=(BENCH_MODEL,), resolution=BENCH_RESOLUTION,
                        stream_maxlen=max(100_000, 2 * n))
    r = connect(redis_url, settings=settings)
    stop = asyncio.Event()
    try:
        if await r.exists(keys.PLAN, keys.INGRESS):
            raise RuntimeError("the routing bench needs an empty Redis (it found a plan or an ingress stream)")
        plan = bench_plan()
        await publish_plan(r, plan)
        replicas = Registry(r, keys.REPLICA_KIND, 60.0)
        await replicas.beat("bench-replica", {"state": "serving",
                                              "streams": [keys.group_stream(1, g["id"]) for g in plan["groups"]]})
        await ensure_group(r, keys.INGRESS, keys.INGRESS_GROUP, "0")
        payloads = _requests(n, f"bench-{uuid.uuid4().hex[:8]}")
        for i in range(0, n, 1000):
            async with r.pipeline(transaction=False) as pipe:
                for p in payloads[i:i + 1000]:
                    pipe.xadd(keys.INGRESS, {keys.FIELD: p})
                await pipe.execute()
        service = IngressService(r, settings, name="bench", count=count, stats_interval_s=5.0, trim_interval_s=60.0)
        task = asyncio.create_task(service.run(stop))
        await service.ready.wait()
        start = time.perf_counter()
        while service.routed_total + service.replied_total < n:
            if task.done():
                task.result()
                raise RuntimeError("ingress stopped before routing every request")
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - start
        if service.replied_total:
            raise RuntimeError(f"{service.replied_total} bench requests were refused")
        stop.set()
        await task
        return n / elapsed
    finally:
        stop.set()
        streams = [keys.INGRESS, keys.STATS, keys.PLAN, keys.PLANS, *[keys.group_stream(1, g) for g in ("g0", "g1")],
                   keys.registry(keys.REPLICA_KIND), keys.registry_seen(keys.REPLICA_KIND)]
        await r.delete(*streams)
        await r.aclose()


def main() -> None:
    import sys

    from tools.redis_server import RedisServer

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with RedisServer(local_socket=True) as server:
        rate = asyncio.run(measure_routing_rate(server.url, n))
    print(f"ingress routed {n} requests at {rate:,.0f} req/s")


if __name__ == "__main__":
    main()
