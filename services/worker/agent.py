"""The worker agent: runs, on its devices, the replicas the current plan places there.

It follows the plan and keeps, per device, *slots* (logical replicas with stable consumer names, see
``assignment.py``) served by *replica processes* (``process.py``): long-lived children, each holding
one model at one share, that do what their assignment says.

* **Plan switch (make-before-break, no cold start).** On epoch ``e`` every slot's older group is
  retired (its stream joins the slot's drains) and the new placements are matched onto slots of the
  same device and model: a matched slot's process is re-targeted at once — the new group's stream
  has a consumer within milliseconds, the process keeps its loaded model and its measured speed.
  Placements left over take a warm standby process, else a new one is started. A retired stream is
  drained when every live ingress routes by a newer epoch and nothing is left in it
  (``common.store.backlog``); then the slot drops it, and a slot with nothing left is released.
* **Crashes.** A process that dies is noticed at once (a waiter per child). Its slot — consumer name,
  streams, pending entries — is handed to a warm standby of the same device, model and share, which
  re-reads the slot's pending entries and serves on; a new standby is started behind it. Without a
  standby the slot gets a new process. Processes of a kind (device, model, share) that keep dying,
  standbys included, are restarted after a backoff per kind (0.2 s doubling to 5 s, reset after a
  stable run; after an exit 2 — cannot be served here — 5 s doubling to 60 s), reported in the status.
* **Standbys.** ``GRAFT_STANDBY_REPLICAS`` (default 1) loaded, idle processes per (device, model,
  share) in use. They cost memory, and on a GPU an MPS client slot, but no share: a standby computes
  nothing until it takes over. A kind gets its standbys once one of its processes has loaded: the
  slots' processes load first, alone on the cores, and a kind that cannot load here starts one
  process per backoff, not two.
* **Lifeline.** Children read their assignments from a pipe and stop when it closes, and ask the
  kernel for SIGTERM when the agent dies: replicas never outlive their agent. SIGTERM to the agent
  stops every child gracefully (stop, wait, SIGKILL) and the agent exits 0.

Its devices live on the node ``GRAFT_NODE`` names (see ``device.py``); in "all CPU devices" mode it
serves every ``cpuN`` placement of the plan on this host, at most ``GRAFT_MAX_CPU_PROCESSES``
processes (placements beyond are left unserved, reported in the status, and their traffic follows
the ingress's fallback to another group of the model; standbys only take the room placements leave).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog
from redis.exceptions import RedisError

from common.contract import keys
from common.contract.routing import PlanView
from common.logs import Event
from common.metrics import PLAN_EPOCH, REPLICAS, HealthServer
from common.settings import Settings
from common.store.backlog import drained_streams
from common.store.connection import Client, connect
from common.store.plan_store import PlanWatcher
from common.store.registry import Registry
from services.lifecycle import Heartbeat
from services.worker.assignment import Slot, Wanted, retarget
from services.worker.control import Assignment, Task
from services.worker.device import Device, cpu_device_of, default_agent_name
from services.worker.process import (
    EXIT_CONFIG,
    REPLICA_TTL_S,
    Backoff,
    ReplicaProcess,
    cancel_tasks,
    terminate_all,
)

WORKER_TTL_S = 5.0
INGRESS_TTL_S = 5.0
WORKER_PORT_OFFSET = 2  # the agent's HealthServer: metrics_port + 2 (ingress +0, planner +1)
REPLICA_PORT_OFFSET = 10  # replica k of this agent: metrics_port + 10 + k
DRAIN_QUIET_S = 1.0

log = structlog.get_logger("worker.agent")

ProcKey = tuple[str, str, int]  # device, model, share


class Agent:
    def __init__(self, settings: Settings, devices: Sequence[Device], *, name: str | None = None,
                 redis: Client | None = None, python: str = sys.executable, poll_s: float = 0.1,
                 stop_grace_s: float = 10.0, mps: bool = True, all_cpu_devices: bool = False,
                 standby: int | None = None, max_cpu_processes: int | None = None,
                 heartbeat: Heartbeat | None = None) -> None:
        if not devices:
            raise ValueError("an agent needs at least one device")
        self.settings = settings
        self.node = settings.node
        self.devices = {d.name: d for d in (dev.on(self.node) for dev in devices)}
        self._all_cpu = all_cpu_devices
        self.name = name or default_agent_name(list(self.devices.values()))
        self._redis: Client | None = redis
        self._own_redis = redis is None
        self._python = python
        self._poll_s = poll_s
        self._stop_grace_s = stop_grace_s
        self._mps = mps
        self.standby = settings.standby_replicas if standby is None else standby
        self.max_cpu_processes = max_cpu_processes or settings.max_cpu_processes or max(4, 2 * (os.cpu_count() or 1))
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self.slots: list[Slot] = []
        self.procs: dict[str, ReplicaProcess] = {}  # by process name
        self._bound: dict[str, str] = {}  # slot consumer -> process name
        # Processes of a kind that keep dying: no new one of that kind (for a slot or as a standby) before
        # _spawn_at[key]; a process that exits unasked moves it by _backoff[key].
        self._spawn_at: dict[ProcKey, float] = {}
        self._backoff: dict[ProcKey, Backoff] = {}
        self._last_exit: dict[ProcKey, int | None] = {}
        self._next_proc = 0
        self._ports: dict[str, int] = {}
        self._view: PlanView | None = None
        self._ready_procs: set[str] = set()
        self._loaded_kinds: set[ProcKey] = set()  # kinds of process that have loaded here at least once
        self._leaving: set[str] = set()  # processes asked to stop
        self._watch: dict[str, asyncio.Task[None]] = {}
        self._scale: dict[str, float] = {}
        self.unserved: list[str] = []  # placements beyond the CPU process cap
        self.takeovers = 0
        self.restarts = 0
        self.health_port: int | None = None
        self._hb = heartbeat

    # ------------------------------------------------------------------------------------------ API

    @property
    def epoch(self) -> int | None:
        return None if self._view is None else self._view.epoch

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "node": self.node, "pid": os.getpid(), "devices": sorted(self.devices),
                "all_cpu_devices": self._all_cpu, "epoch": self.epoch, "mps": self._mps,
                "metrics_port": self.health_port, "standby_target": self.standby, "takeovers": self.takeovers,
                "restarts": self.restarts, "unserved": self.unserved, "backoff": self._backoff_status(),
                "slots": [{"consumer": s.consumer, "device": s.device, "model": s.model, "share": s.share,
                           "group": None if s.active is None else s.active.group,
                           "epoch": None if s.active is None else s.active.epoch, "draining": list(s.draining),
                           "process": self._bound.get(s.consumer)} for s in self.slots],
                "replicas": [p.describe() for p in self.procs.values()]}

    def _backoff_status(self) -> list[dict[str, Any]]:
        """Kinds of process (device, model, share) that may not be started yet, their last exit and the wait."""
        now = time.monotonic()
        return [{"device": k[0], "model": k[1], "share": k[2], "exit_code": self._last_exit.get(k),
                 "retry_in_s": round(at - now, 3)} for k, at in sorted(self._spawn_at.items()) if at > now]

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Serve until ``stop()`` (or ``stop`` is set); every child is stopped before returning."""
        r = self._redis if self._redis is not None else self._connect()
        self._redis = r
        own = self._hb is None
        hb = self._hb or Heartbeat(r, keys.WORKER_KIND, self.name, ttl_s=WORKER_TTL_S)
        health = None
        if own:
            base = self.settings.metrics_port
            health = await HealthServer(self._ready, host=self.settings.metrics_host,
                                        port=base + WORKER_PORT_OFFSET if base else 0).start()
            self.health_port = health.port
        self._replicas = Registry(r, keys.REPLICA_KIND, REPLICA_TTL_S)
        self._ingresses = Registry(r, keys.INGRESS_KIND, INGRESS_TTL_S)
        log.info(Event.SERVICE_STARTED, agent=self.name, devices=sorted(self.devices), metrics_port=self.health_port)
        hb.status.update(self.status())
        beat = asyncio.create_task(hb.run(self._stop), name="worker-heartbeat") if own else None
        outer = asyncio.create_task(self._follow_stop(stop)) if stop is not None else None
        watcher = PlanWatcher(r, interval=self._poll_s)
        failures = 0
        try:
            while not self._stop.is_set():
                # Cleared before the pass, not after it: a child that exits while the pass awaits Redis
                # wakes the next one at once instead of a poll period later.
                self._wake.clear()
                try:
                    view = await watcher.poll()
                    if view is not None:
                        await self._apply(view)
                    await self._observe()
                    await self._drain()
                    failures = 0
                except RedisError as exc:
                    failures += 1
                    log.warning(Event.REDIS_RECONNECT, error=str(exc), attempt=failures)
                await self._supervise()
                hb.status.update(self.status())
                hb.ready = self._view is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_s * min(failures + 1, 25))
        finally:
            self._stopping = True
            await terminate_all(list(self.procs.values()), self._stop_grace_s)
            await cancel_tasks([t for t in (beat, outer, *self._watch.values()) if t is not None])
            if health is not None:
                await health.stop()
            if self._own_redis:
                await r.aclose()
            self._update_metrics()
            log.info(Event.SERVICE_STOPPED, agent=self.name)
        return 0

    async def _follow_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stop()

    # ------------------------------------------------------------------------------------- plans

    def _connect(self) -> Any:
        if not self.settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the worker agent needs the Redis the plan lives in")
        return connect(self.settings.redis_url, settings=self.settings, client_name=f"worker:{self.name}")

    async def _ready(self) -> bool:
        if self._view is None or self._redis is None:
            return False
        return bool(await self._redis.ping())

    def _wanted(self, view: PlanView) -> list[Wanted]:
        if self._all_cpu:
            for name in view.devices():
                if name not in self.devices and (d := cpu_device_of(name, self.node)) is not None:
                    self.devices[name] = d
        scale = view.raw.get("latency_scale") or {}
        out: list[Wanted] = []
        for dev in self.devices:
            for p in view.placements(dev):
                spec = view.groups.get(p.group)
                if spec is None:
                    log.error("placement_without_group", epoch=view.epoch, group=p.group)
                    continue
                task = Task(view.epoch, spec.id, view.stream(spec.id), spec.batch, spec.latency_ms, spec.cuts,
                            spec.replicas)
                out.append(Wanted(dev, spec.model, p.share, task))
        self._scale = {str(m): float(f) for m, f in scale.items()} if isinstance(scale, dict) else {}
        gpu = [w for w in out if self.devices[w.device].is_gpu]
        cpu = [w for w in out if not self.devices[w.device].is_gpu]
        self.unserved = [f"{w.device}:{w.task.group}" for w in cpu[self.max_cpu_processes:]]
        if self.unserved:
            log.warning("cpu_process_cap", cap=self.max_cpu_processes, unserved=self.unserved)
        return gpu + cpu[: self.max_cpu_processes]

    async def _apply(self, view: PlanView) -> None:
        previous = self._view
        self._view = view
        PLAN_EPOCH.labels(service="worker").set(view.epoch)
        wanted = self._wanted(view)
        gpus = frozenset(n for n, d in self.devices.items() if d.is_gpu)
        created = retarget(self.slots, wanted, view.epoch, gpu_devices=gpus)
        self.slots.extend(created)
        log.info(Event.PLAN_SWITCHED, epoch=view.epoch, previous=None if previous is None else previous.epoch,
                 replicas=len(wanted), new_slots=len(created))
        if not wanted:
            log.warning("no_placements", epoch=view.epoch, devices=sorted(self.devices), plan_devices=view.devices())
        for slot in self.slots:
            await self._bind(slot)

    # ------------------------------------------------------------------------------- processes

    def _key(self, device: str, model: str, share: int) -> ProcKey:
        # On a CPU a process can change its thread count, so any share of a model fits any process.
        return (device, model, share if self.devices[device].is_gpu else 0)

    def _free_standbys(self, key: ProcKey) -> list[ReplicaProcess]:
        bound = set(self._bound.values())
        return [p for n, p in self.procs.items() if n not in bound and n not in self._leaving and p.alive
                and self._key(p.device.name, p.model, p.share) == key]

    async def _spawn(self, device: str, model: str, share: int) -> ReplicaProcess:
        name = f"{self.name}/{self._next_proc}"
        self._next_proc += 1
        env = dict(os.environ)
        env.update(self.settings.to_env())
        proc = ReplicaProcess(name, self.devices[device], model, share, env, python=self._python,
                              metrics_port=self._port_for(name))
        self.procs[name] = proc
        await proc.start()
        self._watch[name] = asyncio.create_task(self._on_exit_soon(proc), name=f"watch-{name}")
        log.info(Event.REPLICA_STARTED, process=name, device=device, model=model, share=share, pid=proc.pid)
        return proc

    async def _on_exit_soon(self, proc: ReplicaProcess) -> None:
        await proc.exited.wait()
        self._wake.set()

    def _port_for(self, name: str) -> int:
        base = self.settings.metrics_port
        if not base:
            return 0
        used = set(self._ports.values())
        k = 0
        while base + REPLICA_PORT_OFFSET + k in used:
            k += 1
        self._ports[name] = base + REPLICA_PORT_OFFSET + k
        return self._ports[name]

    def _assignment(self, slot: Slot) -> Assignment:
        return Assignment(0, slot.consumer, slot.share, slot.active, slot.streams, self._scale.get(slot.model, 1.0))

    async def _bind(self, slot: Slot) -> None:
        """Give ``slot`` a process (its own, a ready standby, a new one) and send it its assignment."""
        if slot.idle:
            return
        name = self._bound.get(slot.consumer)
        proc = self.procs.get(name) if name is not None else None
        if proc is not None and not proc.alive:
            proc = None
        if proc is None:
            key = self._key(slot.device, slot.model, slot.share)
            ready = [p for p in self._free_standbys(key) if p.name in self._ready_procs]
            loading = [p for p in self._free_standbys(key) if p.name not in self._ready_procs]
            if ready or loading:
                proc = (ready or loading)[0]
                if name is not None:
                    self.takeovers += 1
                    log.info("slot_takeover", slot=slot.consumer, process=proc.name, ready=bool(ready))
            elif not self._may_spawn(key):
                return  # backing off: processes of this kind keep dying
            else:
                proc = await self._spawn(slot.device, slot.model, slot.share)
                if name is not None:
                    self.restarts += 1
            self._bound[slot.consumer] = proc.name
        want = self._assignment(slot)
        have = proc.assignment
        if have is None or (have.consumer, have.share, have.active, have.streams, have.latency_scale) != (
                want.consumer, want.share, want.active, want.streams, want.latency_scale):
            await proc.assign(want)

    async def _release(self, slot: Slot) -> None:
        """A slot with nothing left: its process becomes a standby or stops."""
        name = self._bound.pop(slot.consumer, None)
        self.slots.remove(slot)
        proc = self.procs.get(name) if name is not None else None
        if proc is None or not proc.alive:
            return
        # It is unbound now, so it is among the free standbys itself: count the others.
        others = [p for p in self._free_standbys(self._key(proc.device.name, proc.model, proc.share)) if p is not proc]
        if len(others) < self._standby_target(proc):
            await proc.assign(Assignment(0, None, proc.share))
            log.info("slot_released", slot=slot.consumer, process=proc.name, now="standby")
        else:
            await self._retire(proc)
            log.info("slot_released", slot=slot.consumer, process=proc.name, now="stopping")

    async def _retire(self, proc: ReplicaProcess) -> None:
        self._leaving.add(proc.name)
        await proc.stop()

    def _standby_target(self, proc: ReplicaProcess) -> int:
        key = self._key(proc.device.name, proc.model, proc.share)
        in_use = any(self._key(s.device, s.model, s.share) == key and s.active is not None for s in self.slots)
        return self.standby if in_use else 0

    def _may_spawn(self, key: ProcKey) -> bool:
        return time.monotonic() >= self._spawn_at.get(key, 0.0)

    async def _supervise(self) -> None:
        now = time.monotonic()
        bound = {n: c for c, n in self._bound.items()}
        for name, proc in list(self.procs.items()):
            if proc.alive:
                continue
            slot = bound.get(name)
            asked = name in self._leaving
            log_fn = log.info if (proc.exit_code == 0 and asked) or self._stopping else log.warning
            log_fn(Event.REPLICA_EXITED, process=name, slot=slot, exit_code=proc.exit_code,
                   reason="stopped" if asked else "cannot be served here" if proc.exit_code == EXIT_CONFIG else "died")
            del self.procs[name]
            self._ports.pop(name, None)
            self._ready_procs.discard(name)
            self._leaving.discard(name)
            self._watch.pop(name, None)
            if not asked and not self._stopping:
                # Standbys too: a kind whose every process dies while loading must not be restarted in a loop.
                key = self._key(proc.device.name, proc.model, proc.share)
                delay = self._backoff.setdefault(key, Backoff()).next(now - proc.started_at, proc.exit_code)
                self._spawn_at[key] = now + delay
                self._last_exit[key] = proc.exit_code
        if self._stopping:
            return
        for each in list(self.slots):
            await self._bind(each)
        await self._keep_standbys()
        self._update_metrics()

    async def _keep_standbys(self) -> None:
        keys_in_use = {self._key(s.device, s.model, s.share): s for s in self.slots if s.active is not None}
        for key, slot in keys_in_use.items():
            # Not before a process of its kind has loaded once: until then a standby would only compete
            # with the slots' own processes for the cores they load on, or fail like them.
            if not self._may_spawn(key) or key not in self._loaded_kinds:
                continue
            free = self._free_standbys(key)
            for _ in range(self.standby - len(free)):
                if not self.devices[slot.device].is_gpu and self._cpu_processes() >= self.max_cpu_processes:
                    break  # the cap is for the placements first; standbys get the room they leave
                await self._spawn(slot.device, slot.model, slot.share)
        # standbys of (device, model, share) no slot uses any more, and CPU standbys beyond the cap
        bound = set(self._bound.values())
        excess = self._cpu_processes() - self.max_cpu_processes
        for name, proc in list(self.procs.items()):
            if name in bound or name in self._leaving or not proc.alive:
                continue
            if (self._key(proc.device.name, proc.model, proc.share) not in keys_in_use
                    or (excess > 0 and not proc.device.is_gpu)):
                await self._retire(proc)
                excess -= 0 if proc.device.is_gpu else 1

    def _cpu_processes(self) -> int:
        return sum(1 for n, p in self.procs.items() if p.alive and n not in self._leaving and not p.device.is_gpu)

    # ------------------------------------------------------------------------- observing, draining

    async def _observe(self) -> None:
        """Which processes have loaded (they register as standby or serving)."""
        live = await self._replicas.live()
        self._ready_procs = {n for n, s in live.items() if n in self.procs and s.get("state") in ("standby", "serving")}
        for name in self._ready_procs:
            proc = self.procs[name]
            proc.loaded = True
            self._loaded_kinds.add(self._key(proc.device.name, proc.model, proc.share))

    async def _drain(self) -> None:
        draining = {s for slot in self.slots for s in slot.draining}
        if (not draining and not any(s.idle for s in self.slots)) or self._redis is None:
            return
        r = self._redis
        done = (await drained_streams(r, draining, (await self._ingresses.live()).values(),
                                      quiet_s=DRAIN_QUIET_S) if draining else set())
        for slot in list(self.slots):
            for stream in done & set(slot.draining):
                slot.drained(stream)
                log.info(Event.GROUP_DRAINED, slot=slot.consumer, stream=stream)
                with contextlib.suppress(RedisError):
                    await r.expire(stream, int(self.settings.max_slo_ms / 1000.0) + 60)
            if slot.idle:
                await self._release(slot)
            elif done & set(slot.streams) or slot.active is None:
                await self._bind(slot)

    def _update_metrics(self) -> None:
        for dev in self.devices:
            REPLICAS.labels(device=dev).set(sum(1 for p in self.procs.values() if p.device.name == dev and p.alive))
