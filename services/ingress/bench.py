"""How many small requests per second one ingress process routes (``graft bench e2e`` reports it).

The bench needs a Redis of its own: it publishes a plan and writes the ingress stream, so it refuses a
Redis that already holds a plan or an ingress stream. It XADDs ``n`` pre-encoded requests (resnet18's
last cut, 2 KiB each), registers a stand-in replica reading both group streams (the ingress routes only
to streams a live replica reads), starts the ingress loop in-process, and times from its first read
until every request sits in a group stream. The plan's capacity is huge and the budgets long, so
nothing is shed: this measures the validate → stamp → route → XACK path alone.

``redis_mode="cluster"`` runs it against a Redis Cluster (``redis_url``: any node): the same requests
on shard 0, routed to two group streams on their own slots. ``python -m services.ingress.bench [n]
[--cluster]`` measures a single Redis (unix socket, as ``graft bench runtime`` does, and TCP) and, with
``--cluster``, a private 3-master cluster, in alternating rounds of one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import numpy as np

from common.contract import keys, wire
from common.model.zoo import describe
from common.settings import Settings
from common.store.connection import Client, connect
from common.store.plan_store import publish_plan
from common.store.registry import Registry
from common.store.streams import ensure_group
from services.ingress.service import READ_COUNT, IngressService

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


async def _stand_in_replica(r: Client, plan: dict[str, Any], stop: asyncio.Event, beating: asyncio.Event) -> None:
    """Heartbeats of a replica reading both group streams, until ``stop`` (the ingress forgets a replica
    it has not heard from for 2 s, and writing the requests alone can take longer on a busy host);
    ``beating`` is set once the first heartbeat is in Redis."""
    replicas = Registry(r, keys.REPLICA_KIND, 60.0)
    body = {"state": "serving", "streams": [keys.group_stream(1, g["id"]) for g in plan["groups"]]}
    while not stop.is_set():
        await replicas.beat("bench-replica", body)
        beating.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def _requests(n: int, client: str, budget_ms: float = 30_000.0, clients: int = 1) -> list[bytes]:
    info = describe(BENCH_MODEL, BENCH_RESOLUTION)
    cut = info.n_blocks - 1
    tensor = np.ones(info.cut_shape(cut), np.float32)
    return [wire.encode_request(wire.Request(req_id=f"{client}-{i}", client=f"{client}-{i % clients}", model=BENCH_MODEL,
                                             cut=cut, tensor=tensor, budget_ms=budget_ms)) for i in range(n)]


async def measure_routing_rate(redis_url: str, n: int = 20_000, *, count: int = READ_COUNT,
                               redis_mode: str = "single", refuse: bool = False) -> float:
    """Requests per second routed by one in-process ingress (wall clock, this machine).

    ``refuse``: every request's budget is below the group's fastest run, so each is answered at the
    ingress (``DEADLINE_EXCEEDED``, the same reply path as ``OVERLOADED``) by four clients: how fast an
    overloaded ingress turns requests away."""
    settings = Settings(redis_url=redis_url, redis_mode=redis_mode, models=(BENCH_MODEL,),
                        resolution=BENCH_RESOLUTION, stream_maxlen=max(100_000, 2 * n))
    r = connect(redis_url, settings=settings)
    stop = asyncio.Event()
    beating: asyncio.Task[None] | None = None
    try:
        if await r.exists(keys.PLAN, keys.INGRESS):
            raise RuntimeError("the routing bench needs an empty Redis (it found a plan or an ingress stream)")
        plan = bench_plan()
        await publish_plan(r, plan)
        first_beat = asyncio.Event()
        beating = asyncio.create_task(_stand_in_replica(r, plan, stop, first_beat))
        await ensure_group(r, keys.INGRESS, keys.INGRESS_GROUP, "0")
        payloads = _requests(n, f"bench-{uuid.uuid4().hex[:8]}", *((0.5, 4) if refuse else (30_000.0, 1)))
        for i in range(0, n, 1000):
            async with r.pipeline(transaction=False) as pipe:
                for p in payloads[i:i + 1000]:
                    pipe.xadd(keys.INGRESS, {keys.FIELD: p})
                await pipe.execute()
        # The ingress routes only to streams a live replica reads: before the stand-in's first heartbeat
        # it would refuse every request (OVERLOADED), as it did once on a busy host.
        await asyncio.wait_for(first_beat.wait(), 10.0)
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
        if (service.routed_total if refuse else service.replied_total):
            raise RuntimeError(f"{service.routed_total if refuse else service.replied_total} bench requests were "
                               f"{'routed' if refuse else 'refused'}")
        stop.set()
        await task
        return n / elapsed
    finally:
        stop.set()
        if beating is not None:
            await beating
        streams = [keys.INGRESS, keys.STATS, keys.PLAN, keys.PLANS, *[keys.group_stream(1, g) for g in ("g0", "g1")],
                   keys.registry(keys.REPLICA_KIND), keys.registry_seen(keys.REPLICA_KIND)]
        await r.delete(*streams)
        await r.aclose()


async def compare(n: int, *, cluster: bool, rounds: int = 3) -> dict[str, list[float]]:
    """Routing rates on a single Redis (unix socket and TCP) and, with ``cluster``, on a 3-master
    cluster, measured in alternating rounds so a busy host slows every setup alike."""
    from tools.redis_server import RedisClusterServer, RedisServer

    rates: dict[str, list[float]] = {"single (unix socket)": [], "single (tcp)": []}
    with RedisServer(local_socket=True) as unix, RedisServer() as tcp, \
            (RedisClusterServer() if cluster else contextlib.nullcontext()) as clu:
        setups: list[tuple[str, str, str]] = [("single (unix socket)", unix.url, "single"),
                                              ("single (tcp)", tcp.url, "single")]
        if clu is not None:
            rates["cluster (3 masters, tcp)"] = []
            setups.append(("cluster (3 masters, tcp)", clu.url, "cluster"))
        for _ in range(rounds):
            for name, url, mode in setups:
                rates[name].append(await measure_routing_rate(url, n, redis_mode=mode))
    return rates


def main() -> None:
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 20_000
    rates = asyncio.run(compare(n, cluster="--cluster" in sys.argv))
    for name, runs in rates.items():
        print(f"{name:26s} best {max(runs):>9,.0f} req/s   runs " + ", ".join(f"{x:,.0f}" for x in runs))
    if "cluster (3 masters, tcp)" in rates:
        best = max(rates["cluster (3 masters, tcp)"])
        for name in ("single (unix socket)", "single (tcp)"):
            print(f"cluster / {name}: {best / max(rates[name]):.2f}")


if __name__ == "__main__":
    main()
