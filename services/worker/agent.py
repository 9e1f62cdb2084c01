"""The worker agent: runs, on its devices, the replicas the current plan places there.

It follows the plan (``PlanWatcher``) and keeps one child process per placement of the current epoch
on its devices. On a new epoch it starts the new epoch's replicas first, then marks the old ones
*draining*: they keep serving their group stream until the ingress has switched and the stream is
empty, and exit 0 by themselves (the replica watches the plan too, so there is nothing to send them).
A replica that crashes is restarted with backoff while its group is in the plan — and also while it
drains, because its pending entries would otherwise wait for a reaper that may never come. SIGTERM
stops every child gracefully (SIGTERM, wait, SIGKILL) and the agent exits 0.

Its devices live on the node ``GRAFT_NODE`` names: with a node ``a`` it serves the placements on
``a/gpu0``, … (and in "all CPU devices" mode every ``a/cpuN`` of the plan), never another node's nor a
plain ``gpu0``; without one it serves the plain names, as on a one-host deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog
from redis.exceptions import RedisError

from common.contract import keys, wire
from common.contract.routing import PlanView
from common.logs import Event
from common.metrics import PLAN_EPOCH, REPLICAS, HealthServer
from common.settings import Settings
from common.store.plan_store import PlanWatcher
from common.store.streams import connect
from services.worker.device import Device, DeviceError
from services.worker.supervisor import ReplicaProcess, ReplicaSlot, State, cancel_tasks, terminate_all

HEARTBEAT_S = 1.0
HEARTBEAT_TTL_S = 5
WORKER_PORT_OFFSET = 2  # the agent's HealthServer: metrics_port + 2 (ingress +0, planner +1)
REPLICA_PORT_OFFSET = 10  # replica k of this agent: metrics_port + 10 + k

# A lazy proxy (no .bind at import): it must pick up the configuration main() sets later.
log = structlog.get_logger("worker.agent")

SlotKey = tuple[int, str, str, int]  # epoch, group, device, index


def default_name(devices: Sequence[Device]) -> str:
    return f"{socket.gethostname()}-{'+'.join(d.name for d in devices)}"


def _cpu_device_of(name: str, node: str) -> Device | None:
    """The CPU device a plan's device name denotes on ``node`` ("all CPU devices" mode adopts it), else None."""
    try:
        d = Device.parse(name)
    except DeviceError:
        return None
    return d if d.kind == "cpu" and d.node == node and d.name == name else None


class Agent:
    def __init__(self, settings: Settings, devices: Sequence[Device], *, name: str | None = None,
                 redis: Any | None = None, python: str = sys.executable, poll_s: float = 0.2,
                 stop_grace_s: float = 10.0, drain_timeout_s: float | None = None, mps: bool = True,
                 all_cpu_devices: bool = False) -> None:
        if not devices:
            raise ValueError("an agent needs at least one device")
        self.settings = settings
        self.node = settings.node
        # Every device is named on this agent's node (a DeviceError, a ValueError, for another node's).
        self.devices = {d.name: d for d in (dev.on(self.node) for dev in devices)}
        self._all_cpu = all_cpu_devices
        self.name = name or default_name(list(self.devices.values()))
        self._redis: Any = redis
        self._own_redis = redis is None
        self._python = python
        self._poll_s = poll_s
        self._stop_grace_s = stop_grace_s
        self._drain_timeout_s = drain_timeout_s or max(60.0, 2 * settings.max_slo_ms / 1000.0,
                                                       2 * settings.switch_timeout_s)
        self._mps = mps
        self._stop = asyncio.Event()
        self._stopping = False
        self._procs: dict[SlotKey, ReplicaProcess] = {}
        self._drain_deadline: dict[SlotKey, float] = {}
        self._ports: dict[SlotKey, int] = {}
        self._view: PlanView | None = None
        self.health_port: int | None = None

    # ------------------------------------------------------------------------------------------ API

    @property
    def epoch(self) -> int | None:
        return None if self._view is None else self._view.epoch

    @property
    def replicas(self) -> list[ReplicaProcess]:
        return list(self._procs.values())

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        return {"service": "worker", "name": self.name, "host": socket.gethostname(), "node": self.node,
                "pid": os.getpid(), "ts": time.time(), "devices": sorted(self.devices), "all_cpu_devices": self._all_cpu,
                "epoch": self.epoch, "mps": self._mps,
                "metrics_port": self.health_port, "replicas": [p.describe() for p in self._procs.values()]}

    async def run(self) -> int:
        r = self._redis if self._redis is not None else self._connect()
        self._redis = r
        base = self.settings.metrics_port
        health = await HealthServer(self._ready, host=self.settings.metrics_host,
                                    port=base + WORKER_PORT_OFFSET if base else 0).start()
        self.health_port = health.port
        log.info(Event.SERVICE_STARTED, agent=self.name, devices=sorted(self.devices), metrics_port=health.port)
        beat = asyncio.create_task(self._heartbeat(r), name="worker-heartbeat")
        watcher = PlanWatcher(r, interval=self._poll_s)
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    view = await watcher.poll()
                    failures = 0
                    if view is not None:
                        await self._apply(view)
                except RedisError as exc:
                    failures += 1
                    log.warning(Event.REDIS_RECONNECT, error=str(exc), attempt=failures)
                await self._supervise()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._poll_s * min(failures + 1, 25))
        finally:
            self._stopping = True
            await terminate_all(list(self._procs.values()), self._stop_grace_s)
            await self._supervise()
            await cancel_tasks([beat])
            with contextlib.suppress(RedisError, OSError):
                await r.delete(keys.health("worker", self.name))
            await health.stop()
            if self._own_redis:
                await r.aclose()
            self._update_metrics()
            log.info(Event.SERVICE_STOPPED, agent=self.name)
        return 0

    # ------------------------------------------------------------------------------------ internals

    def _connect(self) -> Any:
        if not self.settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the worker agent needs the Redis the plan lives in")
        return connect(self.settings.redis_url, settings=self.settings, client_name=f"worker:{self.name}")

    async def _ready(self) -> bool:
        if self._view is None or self._redis is None:
            return False
        return bool(await self._redis.ping())

    async def _heartbeat(self, r: Any) -> None:
        key = keys.health("worker", self.name)
        while not self._stopping:
            try:
                await r.set(key, wire.encode_message("health", self.status()), ex=HEARTBEAT_TTL_S)
            except RedisError as exc:
                log.warning(Event.REDIS_RECONNECT, error=str(exc), during="heartbeat")
            await asyncio.sleep(HEARTBEAT_S)

    async def _apply(self, view: PlanView) -> None:
        """Retire every older replica (they drain on their own) and start the new epoch's replicas."""
        previous = self._view
        self._view = view
        PLAN_EPOCH.labels(service="worker").set(view.epoch)
        if self._all_cpu:
            for name in view.devices():
                if name not in self.devices and (d := _cpu_device_of(name, self.node)) is not None:
                    self.devices[name] = d
        # Older replicas are marked draining first: starting the new ones awaits process spawns, and an
        # old replica that drains meanwhile must be recognised as drained, not as an unplanned exit.
        now = time.monotonic()
        for key, proc in self._procs.items():
            if key[0] < view.epoch and key not in self._drain_deadline:
                proc.state = State.DRAINING
                self._drain_deadline[key] = now + self._drain_timeout_s
        mine = [p for dev in self.devices for p in view.placements(dev)]
        log.info(Event.PLAN_SWITCHED, epoch=view.epoch, previous=None if previous is None else previous.epoch,
                 replicas=len(mine))
        if not mine:
            log.warning("no_placements", epoch=view.epoch, devices=sorted(self.devices),
                        plan_devices=view.devices())
        for p in mine:
            if p.group not in view.groups:
                log.error("placement_without_group", epoch=view.epoch, group=p.group)
                continue
            slot = ReplicaSlot(view.epoch, p.group, self.devices[p.device], p.index, p.share)
            key = (slot.epoch, slot.group, slot.device.name, slot.index)
            if key not in self._procs:
                proc = ReplicaProcess(slot, self._child_env(), python=self._python, metrics_port=self._port_for(key))
                self._procs[key] = proc
                await self._start(proc, restart=False)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.to_env())
        return env

    def _port_for(self, key: SlotKey) -> int:
        base = self.settings.metrics_port
        if not base:
            return 0
        used = set(self._ports.values())
        k = 0
        while base + REPLICA_PORT_OFFSET + k in used:
            k += 1
        self._ports[key] = base + REPLICA_PORT_OFFSET + k
        return self._ports[key]

    async def _start(self, proc: ReplicaProcess, *, restart: bool) -> None:
        try:
            await proc.start()
        except OSError as exc:
            log.error(Event.REPLICA_EXITED, consumer=proc.slot.consumer, error=str(exc), exit_code=None)
            proc.schedule_restart(time.monotonic())
            return
        if restart:
            proc.restarts += 1
        log.info(Event.REPLICA_STARTED, consumer=proc.slot.consumer, epoch=proc.slot.epoch, group=proc.slot.group,
                 device=proc.slot.device.name, share=proc.slot.share, pid=proc.pid, restarts=proc.restarts)

    def _in_plan(self, key: SlotKey) -> bool:
        return self._view is not None and key[0] == self._view.epoch

    async def _supervise(self) -> None:
        now = time.monotonic()
        for key, proc in list(self._procs.items()):
            code = proc.poll_exit()
            if code is not None:
                self._on_exit(key, proc, code, now)
            elif proc.state == State.DRAINING and proc.alive and now > self._drain_deadline.get(key, now + 1):
                log.warning("drain_timeout", consumer=proc.slot.consumer, epoch=key[0])
                proc.signal(signal.SIGTERM)
                self._drain_deadline[key] = now + self._stop_grace_s * 10
            if proc.state == State.EXITED:
                self._forget(key)
            elif not self._stopping and proc.due(now):
                await self._start(proc, restart=True)
        self._update_metrics()

    def _on_exit(self, key: SlotKey, proc: ReplicaProcess, code: int, now: float) -> None:
        draining = proc.state == State.DRAINING
        log_fn = log.info if code == 0 or self._stopping else log.warning
        log_fn(Event.REPLICA_EXITED, consumer=proc.slot.consumer, epoch=key[0], group=key[1], exit_code=code,
               draining=draining)
        if self._stopping:
            proc.state = State.EXITED
        elif draining:
            # Exit 0 is the replica saying "drained"; a crash restarts it to finish its pending entries.
            if code == 0 or now > self._drain_deadline.get(key, now):
                proc.state = State.EXITED
                if code == 0:
                    log.info(Event.GROUP_DRAINED, consumer=proc.slot.consumer, epoch=key[0], group=key[1])
            else:
                proc.schedule_restart(now)
        elif self._in_plan(key):
            delay = proc.schedule_restart(now)
            log.info("replica_restart_scheduled", consumer=proc.slot.consumer, delay_s=delay, exit_code=code)
        else:
            proc.state = State.EXITED

    def _forget(self, key: SlotKey) -> None:
        self._procs.pop(key, None)
        self._drain_deadline.pop(key, None)
        self._ports.pop(key, None)

    def _update_metrics(self) -> None:
        for dev in self.devices:
            REPLICAS.labels(device=dev).set(sum(1 for k, p in self._procs.items() if k[2] == dev and p.alive))
