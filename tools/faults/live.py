"""One live Graft for one scenario: started as ``graft up`` starts it, watched, stopped, checked for leftovers.

``Live`` starts ``tools.up.start_system`` (embedded Redis on a unix socket, a ``RedisServer`` the
scenario owns, e.g. with AOF, or the suite's Redis Cluster, emptied first, when the settings say
``cluster``), records every descendant process while it runs (``Census``), tails the
reply streams into the scenario's ``Accountant``, and knows where the parts are: the serving replicas
and their standbys (replica registry), the worker agent, ingress and planner (supervisor), and what
restarted (supervisor restarts, agent ``restarts``/``takeovers``, summed over every agent instance seen).

The profile is this host's measured one (``ensure_profile``) restricted to one thread per CPU device
(``one_thread_profile``): the planner then gives a group exactly the replicas its load needs (one at
the suite's loads) and ``GRAFT_SPARE_REPLICAS=1`` adds one on a second device — the N+1 comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.contract import keys
from common.contract.routing import serving_from, unserved
from common.settings import Settings
from common.store.connection import Client, connect
from common.store.plan_store import load_plan
from common.store.registry import Registry
from tools.faults.accountant import Accountant
from tools.faults.procs import Census, Proc, kill_all, rss_kib, short
from tools.redis_server import RedisServer
from tools.supervisor import ChildSpec, Supervisor, service_argv
from tools.up import System, ensure_profile, start_system, wait_ready

MODEL = "resnet18"
RESOLUTION = 32


def base_settings(**over: Any) -> Settings:
    """resnet18 at 32 px on the CPU; the gateway on free ports (another system on this host may hold 8000)."""
    return Settings.from_env(**{"models": (MODEL,), "resolution": RESOLUTION, "device": "cpu", "log_level": "warning",
                                "gateway_http_port": 0, "gateway_grpc_port": 0, **over})


def one_thread_profile(out_dir: Path, settings: Settings) -> Path:
    """This host's measured profile (measured now if not cached), keeping only the 1-thread column."""
    src, _ = ensure_profile(settings.with_(profile=""), progress=False)
    d = json.loads(Path(src).read_text())
    k = d["shares"].index(1)
    d["shares"] = [1]
    for m in d["models"].values():
        for b in m["blocks"]:
            b["latency_ms"] = [[row[k]] for row in b["latency_ms"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "profile-1thread.json"
    path.write_text(json.dumps(d))
    return path


@dataclass
class Restarts:
    services: dict[str, int] = field(default_factory=dict)  # supervisor restarts per child
    agent_restarts: int = 0  # replica processes the agents started again for a slot
    takeovers: int = 0  # slots a standby took over

    def to_dict(self) -> dict[str, Any]:
        return {"services": self.services, "agent_restarts": self.agent_restarts, "takeovers": self.takeovers}

    @property
    def total(self) -> int:
        return sum(self.services.values()) + self.agent_restarts + self.takeovers


class Live:
    def __init__(self, settings: Settings, profile: Path, log_dir: Path, *, redis: RedisServer | None = None,
                 extra_ingresses: int = 0) -> None:
        self.settings = settings.with_(redis_url=redis.url) if redis is not None else settings
        self.profile, self.log_dir, self.redis_server = profile, log_dir, redis
        self.extra_ingresses = extra_ingresses
        self.more: Supervisor | None = None  # the extra ingresses (graft up starts one)
        self.census = Census()
        self.acct = Accountant()
        self.system: System | None = None
        self._r: Client | None = None
        self._producer: Client | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._agents: dict[str, tuple[int, int]] = {}  # agent name → (restarts, takeovers), last seen
        self.leftovers: list[Proc] = []
        self.started_s = 0.0

    async def __aenter__(self) -> Live:
        t0 = time.monotonic()
        if self.settings.redis_mode == "cluster":  # the suite's cluster outlives a scenario: start it empty
            assert self.settings.redis_url, "cluster mode needs the cluster's URL"
            r = connect(self.settings.redis_url, settings=self.settings)
            try:
                await r.flushall(target_nodes="primaries")
            finally:
                await r.aclose()
        self.system = await start_system(self.settings, self.profile, log_dir=self.log_dir)
        if self.extra_ingresses:
            env = {**self.settings.with_(redis_url=self.system.redis_url, profile=str(self.profile)).to_env(),
                   "GRAFT_LOG_FORMAT": "json"}
            self.more = Supervisor([ChildSpec(f"ingress-{k + 2}", service_argv("ingress"), env)
                                    for k in range(self.extra_ingresses)], log_dir=self.log_dir)
            await self.more.start()
        self._r = connect(self.system.redis_url, settings=self.settings)
        # The loads' own: a producer's XADD is never re-sent by redis-py after a timeout (that would be
        # a second submission of each request in it, answered on its own: counted as duplicated).
        self._producer = connect(self.system.redis_url, settings=self.settings, client_name="fx-producer", retries=0)
        self._tasks = [asyncio.create_task(self.census.watch(self._stop)),
                       asyncio.create_task(self.acct.tail(self.r, self._stop)),
                       asyncio.create_task(self._watch_agents())]
        try:
            await wait_ready(self.system, timeout=180.0)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {await self.describe()}") from None
        self.started_s = time.monotonic() - t0
        return self

    async def describe(self) -> str:
        """Who is alive and what they report: the diagnosis of a system that did not come up."""
        parts = []
        with contextlib.suppress(Exception):
            view = await load_plan(self.r)
            parts.append(f"plan epoch {view.epoch if view else None}")
            for kind in keys.KINDS:
                live = await Registry(self.r, kind, 5.0).live()
                parts.append(f"{kind}: " + ", ".join(
                    f"{n}({s.get('state') or s.get('status') or 'up'}, epoch {s.get('epoch')})" for n, s in live.items()))
        assert self.system is not None
        parts.append(f"supervisor {self.system.supervisor.status()}")
        return "; ".join(parts)

    @property
    def r(self) -> Client:
        """The system's Redis, connected on entering the block."""
        if self._r is None:
            raise RuntimeError("Live is not started: use `async with Live(...)`")
        return self._r

    @property
    def producer(self) -> Client:
        """The connection loads send through (no automatic re-send of a timed-out XADD)."""
        if self._producer is None:
            raise RuntimeError("Live is not started: use `async with Live(...)`")
        return self._producer

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        assert self.system is not None
        return self.system.redis_url

    async def stop(self) -> None:
        if self.system is None:
            return
        with contextlib.suppress(Exception):
            await self.refresh_agents()
        self.census.poll()
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in (self._r, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        if self.more is not None:
            await self.more.stop()
        await self.system.stop()
        if self.redis_server is not None:
            await self.redis_server.astop()
        self.leftovers = await self.census.wait_gone(15.0)
        kill_all(self.leftovers)  # reported, then cleaned up so the next scenario starts clean
        self.system = None

    # ------------------------------------------------------------------------------- where things are

    async def replicas(self) -> dict[str, dict[str, Any]]:
        return await Registry(self.r, keys.REPLICA_KIND, 2.0).live()

    async def serving_replicas(self) -> list[dict[str, Any]]:
        return [s for s in (await self.replicas()).values() if s.get("state") == "serving" and s.get("streams")]

    async def standbys(self) -> list[dict[str, Any]]:
        return [s for s in (await self.replicas()).values() if s.get("state") == "standby"]

    def child_pid(self, name: str) -> int | None:
        assert self.system is not None
        sup = self.more if self.more is not None and name in self.more.children else self.system.supervisor
        pid = sup.status()[name]["pid"]
        return int(str(pid)) if pid is not None else None

    async def refresh_agents(self) -> None:
        for name, st in (await Registry(self.r, keys.WORKER_KIND, 5.0).live()).items():
            self._agents[name] = (int(st.get("restarts") or 0), int(st.get("takeovers") or 0))

    async def _watch_agents(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                await self.refresh_agents()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)

    def restarts(self) -> Restarts:
        assert self.system is not None or self._agents
        services = ({n: int(str(s["restarts"])) for n, s in self.system.supervisor.status().items()}
                    if self.system is not None else {})
        if self.more is not None:
            services.update({n: int(str(s["restarts"])) for n, s in self.more.status().items()})
        return Restarts(services, sum(a for a, _ in self._agents.values()), sum(t for _, t in self._agents.values()))

    async def ready(self, timeout_s: float = 120.0) -> None:
        """Until a plan is served: an ingress routes by it and every group has a live replica."""
        end = time.monotonic() + timeout_s
        while True:
            view = await load_plan(self.r)
            if view is not None:
                serving = serving_from((await self.replicas()).values())
                ing = [s for s in (await Registry(self.r, keys.INGRESS_KIND, 5.0).live()).values()
                       if s.get("epoch") == view.epoch]
                if ing and not unserved(view, serving):
                    return
            if time.monotonic() > end:
                raise TimeoutError("the system did not serve its plan again")
            await asyncio.sleep(0.2)

    async def instances(self, kind: str) -> dict[str, dict[str, Any]]:
        return await Registry(self.r, kind, 5.0).live()

    async def new_instance(self, kind: str, before: set[str], timeout_s: float) -> str:
        """The name of an instance of ``kind`` not in ``before``, once one beats (a restarted service)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            fresh = set(await self.instances(kind)) - before
            if fresh:
                return sorted(fresh)[0]
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no new {kind} within {timeout_s} s")

    async def ready_standby(self, timeout_s: float = 60.0) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if await self.standbys():
                return True
            await asyncio.sleep(0.2)
        return False

    def rss(self) -> dict[str, int]:
        """RSS (KiB) of every live descendant, by a readable name (pid added to keep names apart)."""
        out: dict[str, int] = {}
        for p in self.census.poll():
            kib = rss_kib(p.pid)
            if kib is not None:
                out[f"{short(p.cmd)} [{p.pid}]"] = kib
        return out


def sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
