"""The gateway service: one ``GraftClient``, the plan follower, and the HTTP and gRPC servers on one loop.

``main`` is what ``services.lifecycle.run_service`` runs (heartbeat, signals, ``--check``, and the
``/metrics`` ``/healthz`` ``/readyz`` server on ``GRAFT_METRICS_PORT + 3``). It reads the current plan
once before listening (so a gateway started on a running system is ready at once), then listens on
``GRAFT_GATEWAY_HOST`` at ``GRAFT_GATEWAY_HTTP_PORT`` and ``GRAFT_GATEWAY_GRPC_PORT`` (0: free ports,
logged and reported in the heartbeat status as ``http_port`` / ``grpc_port``). On SIGTERM both servers
stop accepting, calls in flight get a few seconds to finish, then the SDK client closes (a row still
waiting is answered ``UNAVAILABLE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid

from common import logs
from common.client import GraftClient
from common.metrics import GATEWAY_PENDING
from common.settings import Settings
from common.store.connection import TRANSIENT, Client
from services.gateway.catalog import Catalog, PlanFollower
from services.gateway.frontdoor import FrontDoor
from services.gateway.grpc_api import GrpcApi
from services.gateway.http_api import HttpApi
from services.lifecycle import Heartbeat

log = logs.get_logger("graft.gateway")

SERVICE = "gateway"
METRICS_PORT_OFFSET = 3  # GRAFT_METRICS_PORT + 3 (ingress +0, planner +1, worker agent +2)


async def main(settings: Settings, r: Client, stop: asyncio.Event, hb: Heartbeat) -> None:
    catalog = Catalog(settings.resolution)
    client = GraftClient(settings.redis_url, settings=settings, client_id=f"gateway-{hb.name}-{uuid.uuid4().hex[:8]}")
    await client.start()
    GATEWAY_PENDING.set_function(lambda: client.in_flight)
    door = FrontDoor(client, catalog, settings)

    def on_plan(cat: Catalog) -> None:
        hb.ready = door.ready
        hb.status.update(epoch=cat.epoch, models=cat.models)

    follower = PlanFollower(r, catalog, on_change=on_plan)
    http, grpc_api = HttpApi(door), GrpcApi(door)
    following: asyncio.Task[None] | None = None
    try:
        with contextlib.suppress(*TRANSIENT):
            await follower.poll()
        http_port = await http.start(settings.gateway_host, settings.gateway_http_port)
        grpc_port = await grpc_api.start(settings.gateway_host, settings.gateway_grpc_port)
        hb.status.update(status="running", host=settings.gateway_host, http_port=http_port, grpc_port=grpc_port)
        log.info("gateway_listening", host=settings.gateway_host, http_port=http_port, grpc_port=grpc_port,
                 client=client.client_id, epoch=catalog.epoch, models=catalog.models)
        following = asyncio.create_task(follower.run(stop), name="gateway-plan")
        # Everything alive now (torch, the zoo, the stacks) lives as long as the process: keep it out of
        # the collector's way, or every full collection walks millions of objects on the request path.
        gc.collect()
        gc.freeze()
        await stop.wait()
    finally:
        hb.ready = False
        await asyncio.gather(grpc_api.stop(), http.stop(), return_exceptions=True)
        if following is not None:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
        await client.close()
