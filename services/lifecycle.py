"""What every Graft service process shares: arguments, signals, the registry heartbeat, health, ``--check``.

A service is an async ``main(settings, redis, stop, heartbeat)`` coroutine; ``run_service`` wraps it
with logging, the Redis connection, SIGTERM/SIGINT → ``stop`` (graceful drain), a heartbeat in the
registry (``common.store.registry``: ``graft status`` and ``--check`` read it; the status dict is the
service's own to fill) and the Prometheus/health HTTP server (``/metrics``, ``/healthz``, ``/readyz``).

``--check`` exits 0 iff *this* instance is alive: the one named by ``--name``, else one running on
this host (in a container: this container) — never just "some instance somewhere".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from common import logs
from common.metrics import HealthServer
from common.settings import Settings, SettingsError
from common.store.connection import TRANSIENT, Client, connect
from common.store.registry import Registry

T = TypeVar("T")

HEARTBEAT_S = 1.0
HEARTBEAT_TTL_S = 5.0

ServiceMain = Callable[[Settings, Any, asyncio.Event, "Heartbeat"], Awaitable[None]]


def instance_name(explicit: str | None = None) -> str:
    """``--name``, else ``GRAFT_INSTANCE``, else ``host-pid``."""
    return explicit or os.environ.get("GRAFT_INSTANCE") or f"{socket.gethostname()}-{os.getpid()}"


class Heartbeat:
    """Publishes the service's ``status`` in the registry every ``interval_s``; ``ready`` feeds /readyz."""

    def __init__(self, r: Client, kind: str, name: str, *, ttl_s: float = HEARTBEAT_TTL_S,
                 interval_s: float = HEARTBEAT_S) -> None:
        self.registry = Registry(r, kind, ttl_s)
        self.kind, self.name, self.interval_s = kind, name, interval_s
        self.status: dict[str, Any] = {"status": "starting"}
        self.ready = False

    @property
    def service(self) -> str:
        return self.kind

    async def beat(self) -> None:
        await self.registry.beat(self.name, {"host": socket.gethostname(), "pid": os.getpid(), **self.status})

    async def run(self, stop: asyncio.Event) -> None:
        log = logs.get_logger("graft.heartbeat")
        while not stop.is_set():
            try:
                await self.beat()
            except Exception as exc:  # Redis down: keep serving; the entry simply goes stale
                log.warning(logs.Event.REDIS_RECONNECT, error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
        with contextlib.suppress(Exception):
            await self.registry.leave(self.name)


async def check(settings: Settings, kind: str, name: str | None = None, *, ttl_s: float = HEARTBEAT_TTL_S) -> bool:
    """True iff instance ``name`` of ``kind`` (None: an instance on this host) is alive in the registry."""
    if not settings.redis_url:
        return False
    r = connect(settings.redis_url, settings=settings)
    try:
        live = await Registry(r, kind, ttl_s).live()
    except TRANSIENT:
        return False
    finally:
        await r.aclose()
    if name:
        return name in live
    host = socket.gethostname()
    return any(s.get("host") == host for s in live.values())


def run_service(service: str, main: ServiceMain, argv: list[str] | None = None,
                extra_args: Callable[[argparse.ArgumentParser], None] | None = None, port_offset: int = 0) -> int:
    """Run ``main`` as service ``service`` (also its registry kind); its metrics port is
    ``GRAFT_METRICS_PORT + port_offset`` (ingress +0, planner +1, worker agent +2, gateway +3,
    replicas +10+k), or a free port when the base is 0."""
    die_with_parent()
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}")
    parser.add_argument("--check", action="store_true", help="exit 0 iff this instance is alive (see --name)")
    parser.add_argument("--name", default=None, help="instance name (default: $GRAFT_INSTANCE, else host-pid)")
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"services.{service}: bad settings: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    if args.check:
        return 0 if asyncio.run(check(settings, service, args.name or os.environ.get("GRAFT_INSTANCE"))) else 1
    if not settings.redis_url:
        print(f"services.{service}: REDIS_URL is not set (use `graft up` for an embedded Redis)", file=sys.stderr)
        return 2
    name = instance_name(args.name)
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


ENV_DIE_WITH_PARENT = "GRAFT_DIE_WITH_PARENT"
ENV_PARENT_PID = "GRAFT_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(base: dict[str, str]) -> dict[str, str]:
    """The environment a supervisor gives a child it wants to die with it (see ``die_with_parent``)."""
    return {**base, ENV_DIE_WITH_PARENT: "1", ENV_PARENT_PID: str(os.getpid())}


def pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for a child that must die with its parent from its very first instruction.

    ``die_with_parent`` runs only once the child's imports are done — seconds for a replica importing
    torch — and a parent killed meanwhile leaves an orphan that keeps importing, loading its model and
    taking CPU from the processes that replace it. Set in the forked child before ``exec``, the death
    signal covers that window too (it survives ``exec``); ``die_with_parent`` still checks, after the
    imports, that the parent did not die before the fork finished. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """When started by a supervisor (``GRAFT_DIE_WITH_PARENT=1``: ``graft up``, the worker agent), ask
    the kernel to send ``sig`` when the parent dies — even by SIGKILL — so no child outlives it. A
    parent that died before this ran (the child was still importing) is noticed too: the child's
    parent is no longer the one in ``GRAFT_PARENT_PID``."""
    if os.environ.get(ENV_DIE_WITH_PARENT) != "1" or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    expected = os.environ.get(ENV_PARENT_PID)
    if (expected is not None and str(os.getppid()) != expected) or os.getppid() == 1:
        os.kill(os.getpid(), sig)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a service's top coroutine on uvloop (a dependency: its lower per-message overhead shows in
    the server overhead figures); plain asyncio only if uvloop cannot be imported."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        return asyncio.run(main)
    return uvloop.run(main)
