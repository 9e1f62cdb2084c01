"""What every Graft service process shares: signals, heartbeats, health endpoint, ``--check``.

A service is an async ``main(settings, redis, stop)`` coroutine; ``run_service`` wraps it with logging,
the Redis connection, SIGTERM/SIGINT → ``stop`` (graceful drain), a heartbeat key refreshed every
second (``graft status`` and ``--check`` read it) and the Prometheus/health HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from common import logs
from common.contract import keys, wire
from common.metrics import HealthServer
from common.settings import Settings
from common.store.streams import connect

T = TypeVar("T")

HEARTBEAT_S = 1.0
HEARTBEAT_TTL_S = 5

StatusFn = Callable[[], dict[str, Any]]
ServiceMain = Callable[[Settings, Any, asyncio.Event, "Heartbeat"], Awaitable[None]]


class Heartbeat:
    """Refreshes ``graft:health:{service}:{name}`` with the service's own status every second."""

    def __init__(self, r: Any, service: str, name: str) -> None:
        self._r, self.service, self.name = r, service, name
        self.status: dict[str, Any] = {"status": "starting"}
        self.ready = False

    async def beat(self) -> None:
        body = {"ts": time.time(), "host": socket.gethostname(), **self.status}
        await self._r.set(keys.health(self.service, self.name), wire.encode_message("health", body),
                          ex=HEARTBEAT_TTL_S)

    async def run(self, stop: asyncio.Event) -> None:
        log = logs.get_logger("graft.heartbeat")
        while not stop.is_set():
            try:
                await self.beat()
            except Exception as exc:  # Redis down: keep serving; the key simply expires
                log.warning(logs.Event.REDIS_RECONNECT, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT_S)
        with contextlib.suppress(Exception):
            await self._r.delete(keys.health(self.service, self.name))


async def check(settings: Settings, service: str) -> bool:
    """True iff some instance of ``service`` sent a heartbeat within the TTL."""
    if not settings.redis_url:
        return False
    r = connect(settings.redis_url, settings=settings)
    try:
        async for _ in r.scan_iter(match=keys.health_pattern(service), count=100):
            return True
        return False
    finally:
        await r.aclose()


def run_service(service: str, main: ServiceMain, argv: list[str] | None = None,
                extra_args: Callable[[argparse.ArgumentParser], None] | None = None, port_offset: int = 0) -> int:
    """Run ``main`` as service ``service``; its metrics port is ``GRAFT_METRICS_PORT + port_offset``
    (ingress +0, planner +1, worker agent +2, replicas +10+k), or a free port when the base is 0."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}")
    parser.add_argument("--check", action="store_true", help="exit 0 iff a live instance sends heartbeats")
    parser.add_argument("--name", default=None, help="instance name (default: host-pid)")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logs.configure(settings.log_format, settings.log_level)
    if args.check:
        return 0 if asyncio.run(check(settings, service)) else 1
    if not settings.redis_url:
        print(f"services.{service}: REDIS_URL is not set (use `graft up` for an embedded Redis)", file=sys.stderr)
        return 2
    name = args.name or f"{socket.gethostname()}-{__import__('os').getpid()}"
    settings = settings.with_(extra={**settings.extra, **{k: str(v) for k, v in vars(args).items()}})

    async def _run() -> None:
        log = logs.get_logger(f"graft.{service}", service=service, instance=name)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        r = connect(settings.redis_url or "", settings=settings, client_name=f"graft-{service}-{name}")
        hb = Heartbeat(r, service, name)

        async def ready() -> bool:
            return hb.ready and bool(await r.ping())

        port = settings.metrics_port + port_offset if settings.metrics_port else 0
        health = await HealthServer(ready, host=settings.metrics_host, port=port).start()
        log.info(logs.Event.SERVICE_STARTED, metrics_host=health.host, metrics_port=health.port)
        hb.status["metrics_port"] = health.port
        beat = asyncio.create_task(hb.run(stop))
        try:
            await main(settings, r, stop, hb)
        finally:
            stop.set()
            await beat
            await health.stop()
            await r.aclose()
            log.info(logs.Event.SERVICE_STOPPED)

    run_loop(_run())
    return 0


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a service's top coroutine on uvloop (a dependency: its lower per-message overhead shows in
    the server overhead figures); plain asyncio only if uvloop cannot be imported."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        return asyncio.run(main)
    return uvloop.run(main)
