"""``python -m services.ingress``: run one ingress process; ``--check`` exits 0 iff this instance is alive.

Settings come from the environment (``Settings.from_env``). SIGTERM/SIGINT finish the batch in hand,
flush statistics and exit 0. The health server (``/metrics``, ``/healthz``, ``/readyz``) listens on
``GRAFT_METRICS_HOST`` (default 127.0.0.1), port ``GRAFT_METRICS_PORT`` (0: a free port, logged).
"""

from __future__ import annotations

import asyncio
import sys

from common.contract import keys
from common.settings import Settings
from common.store.connection import Client
from services.ingress.service import IngressService
from services.lifecycle import Heartbeat, run_service

METRICS_PORT_OFFSET = 0


async def serve(settings: Settings, r: Client, stop: asyncio.Event, hb: Heartbeat) -> None:
    service = IngressService(r, settings, name=hb.name, status=hb.status)
    ready = asyncio.create_task(_mark_ready(service, hb))
    try:
        await service.run(stop)
    finally:
        ready.cancel()


async def _mark_ready(service: IngressService, hb: Heartbeat) -> None:
    await service.ready.wait()
    hb.ready = True
    hb.status["status"] = "running"


def main(argv: list[str] | None = None) -> int:
    return run_service(keys.INGRESS_KIND, serve, argv, port_offset=METRICS_PORT_OFFSET)


if __name__ == "__main__":
    sys.exit(main())
