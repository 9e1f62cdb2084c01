"""``graft up``: the whole system as local processes — embedded Redis, planner, ingress, worker agent.

With no ``REDIS_URL`` a private Redis is started (and stopped on exit). The profile comes from
``--profile``/``GRAFT_PROFILE``, or is measured on this host the first time (progress shown) and
cached under ``$GRAFT_CACHE_DIR`` (default ``~/.cache/graft``). ``--demo`` then drives a short load
from emulated devices and prints what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.contract import keys
from common.contract.routing import serving_from, unserved
from common.profiles import Profile
from common.settings import Settings
from common.store.connection import connect, wait_for_redis
from common.store.plan_store import load_plan
from common.store.registry import Registry
from tools.redis_server import RedisServer
from tools.supervisor import ChildSpec, Supervisor, service_argv

ENV_CACHE_DIR = "GRAFT_CACHE_DIR"
CPU_BATCHES = (1, 2, 4, 8, 16, 32)


def cpu_threads() -> tuple[int, ...]:
    """Thread counts a CPU profile is measured at: 1..every core, so plans can use the whole host."""
    return tuple(range(1, (os.cpu_count() or 1) + 1))


def cache_dir() -> Path:
    """``$GRAFT_CACHE_DIR`` (read at each call, so tests and wrappers can redirect it), else ``~/.cache/graft``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "graft")


def resolve_device(settings: Settings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cached_profile_path(settings: Settings, device: str) -> Path:
    # "jit": CPU blocks are TorchScript-optimised (common.model.optimize); profiles of eager blocks do not apply.
    key = f"{device}|{','.join(sorted(settings.models))}|{settings.resolution}|{CPU_BATCHES}|{cpu_threads()}|jit"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_dir() / "profiles" / f"{device}-{digest}.json"


def ensure_profile(settings: Settings, *, progress: bool = True, refresh: bool = False) -> tuple[Path, bool]:
    """Profile path for this host: given, cached, or measured now. Returns (path, measured_now).

    ``refresh`` measures again even when a cached profile exists (and replaces it): a host whose speed
    changed since (another tenant, thermal limits) would otherwise be planned from stale latencies."""
    if settings.profile:
        return Path(settings.profile), False
    device = resolve_device(settings)
    path = cached_profile_path(settings, device)
    if path.exists() and not refresh:
        with contextlib.suppress(Exception):
            prof = Profile.load(path)
            if set(settings.models) <= set(prof.models):
                return path, False
    from common.profiling.measure import profile_models

    path.parent.mkdir(parents=True, exist_ok=True)
    shares: tuple[int, ...] = cpu_threads() if device == "cpu" else tuple(range(10, 101, 10))
    prof = profile_models(list(settings.models), device=device, batches=list(CPU_BATCHES), shares=list(shares),
                          resolution=settings.resolution or None, progress=progress, repeats=5)
    prof.save(path)
    return path, True


@dataclass
class System:
    settings: Settings
    redis_url: str
    supervisor: Supervisor
    redis: RedisServer | None
    log_dir: Path

    async def stop(self) -> None:
        await self.supervisor.stop()
        if self.redis is not None:
            self.redis.stop()


SERVICES = ("planner", "ingress", "worker", "gateway")


async def start_system(settings: Settings, profile_path: Path, *, log_dir: Path,
                       services: tuple[str, ...] = SERVICES,
                       before_services: Callable[[str], Awaitable[None]] | None = None,
                       service_urls: Mapping[str, str] | None = None, ingresses: int = 1) -> System:
    """Start Redis (embedded unless ``settings.redis_url``) and the given services as children.

    ``ingresses``: how many ingress processes (``ingress``, ``ingress-2``, ...: one consumer group, so a
    killed one's entries are taken over by the others' reapers instead of waiting for its restart).
    ``before_services(url)`` runs once Redis answers and before any service starts (benchmarks use
    it to publish a fixed plan instead of running the planner). ``service_urls``: a Redis URL per
    service (each service's own ACL user, ``common.contract.access``) instead of ``settings.redis_url``.
    """
    # The worker serves the device kind the profile was measured on: a CPU profile on a GPU host (GRAFT_DEVICE
    # =cpu) must not be handed to an agent that took the GPUs, whose placements the plan never names.
    argv = {"planner": service_argv("planner"), "ingress": service_argv("ingress"),
            "worker": service_argv("worker", "--devices", settings.device or "auto"),
            "gateway": service_argv("gateway")}
    unknown = [name for name in services if name not in argv]
    if unknown:
        raise ValueError(f"unknown services {unknown}; choose from {sorted(argv)}")
    server: RedisServer | None = None
    url = settings.redis_url
    if not url and settings.redis_mode == "cluster":
        raise ValueError("GRAFT_REDIS_MODE=cluster needs REDIS_URL naming a node of the cluster "
                         "(no embedded Redis is started for it)")
    if not url:
        server = RedisServer(persist_dir=None, local_socket=True, die_with_parent=True).start()
        url = server.url
    try:
        await wait_for_redis(url, 10.0)
        if before_services is not None:
            await before_services(url)
        env = {**settings.with_(redis_url=url, profile=str(profile_path)).to_env(), "GRAFT_LOG_FORMAT": "json"}
        urls = service_urls or {}
        specs = [ChildSpec(child, argv[name], {**env, **({"REDIS_URL": urls[name]} if name in urls else {})})
                 for name in services
                 for child in ([name] if name != "ingress" else
                               ["ingress", *(f"ingress-{k}" for k in range(2, max(1, ingresses) + 1))])]
        sup = Supervisor(specs, log_dir=log_dir)
        await sup.start()
    except BaseException:
        if server is not None:  # nobody else holds it: do not leak a redis-server process
            server.stop()
        raise
    return System(settings, url, sup, server, log_dir)


async def wait_ready(system: System, timeout: float = 120.0,
                     on_wait: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Wait until a plan is published, an ingress routes by it, every group of it has a live replica and,
    when the system runs a gateway, the gateway is ready."""
    r = connect(system.redis_url, settings=system.settings)
    deadline = time.monotonic() + timeout
    replicas, ingresses = Registry(r, keys.REPLICA_KIND, 2.0), Registry(r, keys.INGRESS_KIND, 5.0)
    gateways = Registry(r, keys.GATEWAY_KIND, 5.0)
    want_gateway = "gateway" in system.supervisor.children
    try:
        while True:
            view = await load_plan(r)
            serving = serving_from((await replicas.live()).values())
            routing = [s for s in (await ingresses.live()).values() if view is not None and s.get("epoch") == view.epoch]
            missing = unserved(view, serving) if view is not None else ["(no plan)"]
            gateway_ok = not want_gateway or any(s.get("status") == "running" for s in (await gateways.live()).values())
            if view is not None and routing and not missing and gateway_ok:
                return view.raw
            if on_wait is not None:
                on_wait(f"plan={'epoch ' + str(view.epoch) if view else 'none'} ingress={len(routing)} "
                        f"groups without a replica={len(missing)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"system not ready after {timeout}s; see logs in {system.log_dir}")
            for name, st in system.supervisor.status().items():
                if st["restarts"] and int(str(st["restarts"])) >= 3:
                    raise RuntimeError(f"{name} keeps crashing; see {system.log_dir / (name + '.log')}")
            await asyncio.sleep(0.2)
    finally:
        await r.aclose()


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
