"""``python -m services.ingress``: run one ingress process; ``--check`` exits 0 iff a fresh heartbeat exists.

Settings come from the environment (``Settings.from_env``). SIGTERM/SIGINT finish the batch in hand,
flush statistics and exit 0. The health server (``/metrics``, ``/healthz``, ``/readyz``) listens on
``GRAFT_METRICS_HOST`` (default 127.0.0.1), port ``GRAFT_METRICS_PORT`` (0: a free port, logged).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Any

from common import logs
from common.contract import keys, wire
from common.contract.errors import InvalidRequest
from common.metrics import HealthServer
from common.settings import Settings
from common.store.streams import TRANSIENT, connect
from services.ingress.service import HEARTBEAT_TTL_S, SERVICE, IngressService
from services.lifecycle import run_loop

# Offset of the ingress from GRAFT_METRICS_PORT, so services on one host do not collide.
METRICS_PORT_OFFSET = 0


def fresh(raw: Any, now: float, max_age_s: float = HEARTBEAT_TTL_S) -> bool:
    if raw is None:
        return False
    try:
        body = wire.decode_message(raw, "health")
    except InvalidRequest:
        return False
    ts = body.get("ts")
    return isinstance(ts, int | float) and now - float(ts) <= max_age_s


async def check(settings: Settings, name: str | None) -> bool:
    """True iff an ingress heartbeat (``name``'s, or any ingress's) is fresh."""
    if not settings.redis_url:
        return False
    r = connect(settings.redis_url, settings=settings)
    try:
        if name:
            names = [keys.health(SERVICE, name)]
        else:
            names = [k async for k in r.scan_iter(match=keys.health_pattern(SERVICE), count=100)]
        beats: list[Any] = [await r.get(k) for k in names]
        now = time.time()
        return any(fresh(raw, now) for raw in beats)
    except TRANSIENT:
        return False
    finally:
        await r.aclose()


async def serve(settings: Settings, name: str | None, metrics_port: int | None) -> None:
    assert settings.redis_url is not None
    r = connect(settings.redis_url, settings=settings, client_name=f"graft-{SERVICE}")
    service = IngressService(r, settings, name=name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def ready() -> bool:
        return service.ready.is_set() and bool(await r.ping())

    port = metrics_port if metrics_port is not None else (
        settings.metrics_port + METRICS_PORT_OFFSET if settings.metrics_port else 0)
    health = await HealthServer(ready, host=settings.metrics_host, port=port).start()
    service.metrics_port = health.port
    try:
        await service.run(stop)
    finally:
        await health.stop()
        await r.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ingress", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 0 iff a fresh ingress heartbeat exists")
    parser.add_argument("--name", default=None, help="consumer name (default: $GRAFT_CONSUMER or host:ingress)")
    parser.add_argument("--metrics-port", type=int, default=None, help="health/metrics port (0: a free one)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logs.configure(settings.log_format, settings.log_level)
    if args.check:
        return 0 if asyncio.run(check(settings, args.name)) else 1
    if not settings.redis_url:
        print("REDIS_URL is not set", file=sys.stderr)
        return 2
    run_loop(serve(settings, args.name, args.metrics_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
