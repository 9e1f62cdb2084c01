"""The planner service: bootstrap plan, live statistics, drift-triggered re-planning, admin commands.

It publishes plan epoch 1 at once (every served model, every cut, a nominal rate), so ingress and
workers can serve before any statistics exist. Then it folds ingress statistics into a sliding
window and publishes ``epoch + 1`` when the traffic drifted past ``GRAFT_DRIFT`` and the current
epoch is at least ``GRAFT_REPLAN_S`` old, or at once on ``graft replan``/``scale``/``drain``.

It also follows which devices exist: every ``DEVICE_POLL_S`` it reads the worker agents' heartbeats
(the devices each hosts), and every plan's placement goes onto live, non-drained devices
(``devices.assign_devices``); replicas no live device can take are listed under the plan's
``unplaced``, logged and exported as ``graft_plan_unplaced_replicas``. When an agent dies (its
devices missing for ``DEVICE_GRACE_S``) or appears so that the current plan would be placed
differently, it re-plans at once from the current workload, without waiting for the minimum epoch
length. If only the ``unplaced`` report changed (an agent came up with exactly the missing device),
the epoch is kept and the stored plan's report is updated in place.

It also reads the replicas' heartbeats, and when the latency they measure for a model's groups left
the band around what the plan assumed (``services/planner/calibration.py``), it re-plans with that
model's profile latencies scaled by the measured ratio (after the minimum epoch length, like a
drift). Every later plan uses the scaled profile and records the factors as ``latency_scale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from common import logs
from common.contract import keys, wire
from common.contract.errors import GraftError, InvalidRequest
from common.contract.routing import PlanView
from common.metrics import LATENCY_SCALE, PLAN_EPOCH, PLAN_UNPLACED
from common.model.shapes import ShapeBook
from common.profiles import Profile, ProfileError, shipped
from common.settings import Settings
from common.store.connection import Client
from common.store.plan_store import StaleEpoch, annotate_plan, load_plan, publish_plan
from common.store.registry import Registry
from common.store.streams import StreamConsumer, ensure_group
from services.lifecycle import Heartbeat
from services.planner.calibration import Calibration
from services.planner.devices import LiveDevices, needs_reassignment, parse_worker_status, shortfall
from services.planner.leadership import Lease
from services.planner.observed import TrafficWindow, build_workload, drift, parse_stats
from services.planner.replanning import Steering, next_plan, same_serving
from services.planner.sweeper import sweeping

BOOTSTRAP_RPS = 1.0       # nominal rate per cut before any traffic is seen
FLOOR_RPS = 0.05          # a served model without traffic keeps one minimal group (its cut 0 at this rate)
DEFAULT_BUDGET_MS = 200.0  # budget assumed for fragments never seen
WINDOW_S = 20.0
DEVICE_POLL_S = 1.0        # worker heartbeats are read this often (agents beat every 1 s, TTL 5 s)
DEVICE_GRACE_S = 3.0
WORKER_TTL_S = 5.0
REPLICA_TTL_S = 2.0       # a device counts as gone once missing this long (and from 2 scans in a row)


def load_profile(settings: Settings) -> tuple[Profile, str]:
    path = Path(settings.profile) if settings.profile else shipped("v100-estimated")
    try:
        return Profile.load(path), str(path)
    except ProfileError as exc:
        raise SystemExit(f"planner: {exc}") from None


def served_models(settings: Settings, profile: Profile) -> dict[str, int]:
    missing = [m for m in settings.models if m not in profile.models]
    if missing:
        raise SystemExit(f"planner: models {missing} are not in the profile ({sorted(profile.models)})")
    return {m: profile.model(m).n_blocks for m in settings.models}


class Planner:
    def __init__(self, settings: Settings, r: Client, profile: Profile, profile_name: str,
                 hb: Heartbeat | None = None) -> None:
        self.settings, self.r, self.profile, self.profile_name = settings, r, profile, profile_name
        self.served = served_models(settings, profile)
        self.window = TrafficWindow(WINDOW_S)
        self.steering = Steering()
        self.hb = hb
        self.log = logs.get_logger("graft.planner")
        self.current: dict[str, Any] | None = None
        self.published_at = 0.0
        self.devices = LiveDevices(grace_s=DEVICE_GRACE_S)
        self.device_poll_s = DEVICE_POLL_S
        self._devices_read_at = float("-inf")
        self.calibration = Calibration()
        self.fence: str | None = None  # the lease holder name publishes are fenced with (None: no lease)
        self.workers = Registry(r, keys.WORKER_KIND, WORKER_TTL_S)
        self.replicas = Registry(r, keys.REPLICA_KIND, REPLICA_TTL_S)
        self.shapes = ShapeBook(settings.resolution)  # published with every plan: the front door needs no torch

    def planning_profile(self) -> Profile:
        """The profile plans are made with: latencies scaled by the calibrated factors."""
        applied = self.calibration.applied
        return self.profile.scaled(applied) if applied else self.profile

    async def published_shapes(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        """``plan["shapes"]``: each served model's per-cut input shapes (``common.model.shapes``)."""
        models = sorted({str(g["model"]) for g in plan["groups"]})
        try:
            await asyncio.to_thread(self.shapes.learn, models)
        except (GraftError, ValueError) as exc:  # the front door describes them itself then
            self.log.warning(logs.Event.MALFORMED, key="shapes", error=repr(exc))
            return {}
        return {m: self.shapes[m].to_dict() for m in models}

    def report_scale(self) -> None:
        for model in self.served:
            LATENCY_SCALE.labels(model).set(self.calibration.factor(model))
        if self.hb is not None:
            self.hb.status.update(latency_scale=dict(self.calibration.applied))

    async def publish(self, workload: dict[str, Any], reason: str, *, forced: bool = True) -> dict[str, Any]:
        epoch = (int(self.current["epoch"]) if self.current else 0) + 1
        plan = next_plan(self.planning_profile(), workload, epoch=epoch, rho=self.settings.rho, steering=self.steering,
                         profile_name=self.profile_name, policy=self.steering.policy or self.settings.policy,
                         live=self.devices.live, all_cpu=self.devices.all_cpu_nodes,
                         previous=(self.current or {}).get("placement"), spares=self.settings.spare_replicas,
                         cpu_reserve=self.settings.cpu_reserve)
        if self.steering.hold:
            plan["hold"] = True
        plan["shapes"] = await self.published_shapes(plan)
        if self.calibration.applied:
            plan["latency_scale"] = dict(self.calibration.applied)
        if not forced and self.current is not None and same_serving(self.current, plan):
            # Same groups, shares and replicas on the same devices: keep serving this epoch, only move
            # the drift baseline (and bring its unplaced report up to date with the live devices).
            scale = plan.get("latency_scale", {})
            if scale != self.current.get("latency_scale", {}):  # the factors moved, the serving did not
                await annotate_plan(self.r, int(self.current["epoch"]), {"latency_scale": scale})
            self.current = {**self.current, "workload": plan["workload"], "latency_scale": scale}
            self.published_at = time.monotonic()
            self.log.info(logs.Event.PLAN_UNCHANGED, reason=reason, epoch=self.current["epoch"])
            await self.refresh_unplaced()
            return self.current
        try:
            await publish_plan(self.r, plan, fence=self.fence)
        except StaleEpoch:  # another planner moved on: follow it
            view = await load_plan(self.r)
            plan = view.raw if view else plan
        previous = (self.current or {}).get("unplaced")
        self.current, self.published_at = plan, time.monotonic()
        PLAN_EPOCH.labels("planner").set(plan["epoch"])
        logs.bind(epoch=plan["epoch"])
        self.log.info(logs.Event.PLAN_PUBLISHED, reason=reason, groups=len(plan["groups"]),
                      total_share=plan["total_share"], devices=plan["gpus"], infeasible=len(plan["infeasible"]),
                      unplaced=sum(int(u["replicas"]) for u in plan.get("unplaced", [])))
        self.report_unplaced(plan, previous)
        if self.hb is not None:
            self.hb.status.update(status="running", epoch=plan["epoch"])
            self.hb.ready = True
        return plan

    def report_unplaced(self, plan: Mapping[str, Any], previous: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Gauge and log the plan's shortfall: replicas on devices no live worker agent hosts."""
        unplaced = list(plan.get("unplaced", []))
        n = sum(int(u.get("replicas", 0)) for u in unplaced)
        PLAN_UNPLACED.set(n)
        live = self.devices.live
        if n:
            self.log.warning(logs.Event.PLAN_UNPLACED, epoch=plan.get("epoch"), replicas=n,
                             devices=[u.get("device") for u in unplaced],
                             live_devices=None if live is None else sorted(live),
                             all_cpu_agent=self.devices.all_cpu,
                             drained=sorted(self.steering.drained),
                             consequence="these replicas run nowhere until a worker agent hosts their device")
        elif previous:
            self.log.info(logs.Event.PLAN_UNPLACED, epoch=plan.get("epoch"), replicas=0,
                          live_devices=None if live is None else sorted(live))
        if self.hb is not None:
            self.hb.status.update(unplaced_replicas=n)

    async def refresh_unplaced(self) -> None:
        """Recompute the current plan's ``unplaced`` for the live devices; store it without a new epoch."""
        if self.current is None:
            return
        before = list(self.current.get("unplaced", []))
        now = shortfall(self.current.get("placement", []), self.devices.live, self.steering.drained,
                        all_cpu=self.devices.all_cpu_nodes)
        if now == before and "unplaced" in self.current:
            return
        self.current = {**self.current, "unplaced": now}
        if not await annotate_plan(self.r, int(self.current["epoch"]), {"unplaced": now}):
            self.log.info("plan_annotation_skipped", epoch=self.current["epoch"],
                          note="the stored plan has another epoch")
        self.report_unplaced(self.current, before)

    async def read_worker_devices(self) -> tuple[set[str], set[str]]:
        """Devices named by live worker agents (registry), and the nodes where one of them serves every cpu device."""
        seen: set[str] = set()
        all_cpu: set[str] = set()
        for status in (await self.workers.live()).values():
            devices, whole_cpu = parse_worker_status(status)
            seen.update(devices)
            if whole_cpu is not None:
                all_cpu.add(whole_cpu)
        return seen, all_cpu

    async def read_replica_statuses(self) -> list[dict[str, Any]]:
        """The statuses of live replicas (registry)."""
        return list((await self.replicas.live()).values())

    async def calibrate(self) -> bool:
        """Re-plan with re-scaled profile latencies when replicas measure a model off the band.

        Waits for the minimum epoch length like a drift. True if the epoch moved.
        """
        if self.current is None or self.steering.hold:
            return False
        now = time.monotonic()
        view = PlanView(self.current)
        proposal = self.calibration.decide(await self.read_replica_statuses(), view, now)
        if proposal is None or now - self.published_at < self.settings.replan_s:
            return False
        before = dict(self.calibration.applied)
        self.calibration.apply(proposal, now)
        self.report_scale()
        self.log.info(logs.Event.LATENCY_CALIBRATED, epoch=view.epoch, before=before,
                      after=dict(self.calibration.applied))
        # The traffic the current plan was made for, at the new speed (drift follows the traffic itself).
        workload = {"fragments": list(self.current.get("workload") or [])} or self.observed_workload()
        if not workload["fragments"]:
            workload = self.observed_workload()
        plan = await self.publish(workload, "latency calibration", forced=False)
        return plan.get("epoch") != view.epoch

    async def poll_devices(self, *, force: bool = False) -> bool:
        """Read heartbeats into the live device set, at most every ``device_poll_s``; True when it read."""
        now = time.monotonic()
        if not force and now - self._devices_read_at < self.device_poll_s:
            return False
        self._devices_read_at = now
        seen, all_cpu = await self.read_worker_devices()
        appeared, gone = self.devices.observe(seen, all_cpu, now)
        if appeared or gone:
            live = self.devices.live
            self.log.info(logs.Event.WORKER_DEVICES, appeared=sorted(appeared), gone=sorted(gone),
                          live_devices=None if live is None else sorted(live), all_cpu_agent=self.devices.all_cpu)
            if self.hb is not None:
                self.hb.status.update(live_devices=sorted(live or ()), all_cpu_agent=self.devices.all_cpu)
        return True

    async def follow_devices(self) -> bool:
        """Re-plan at once when the current plan no longer fits the live devices. True if the epoch moved."""
        if self.current is None or self.devices.live is None:
            return False
        if not needs_reassignment(self.current, self.devices.live, self.steering.drained,
                                  all_cpu=self.devices.all_cpu_nodes):
            return False
        before, published_at = self.current.get("epoch"), self.published_at
        # The current workload, not the observed one: the groups stay as they are and only the
        # placement moves (drift keeps its own schedule). Same serving → same epoch, fresh report.
        workload = list(self.current.get("workload") or []) or self.observed_workload()["fragments"]
        plan = await self.publish({"fragments": workload}, "devices changed", forced=False)
        if plan.get("epoch") == before:
            self.published_at = published_at  # only the report changed: the epoch's age still counts
            return False
        return True

    async def bootstrap(self) -> None:
        await self.poll_devices(force=True)
        self.report_scale()
        view = await load_plan(self.r)
        if view is not None and set(self.served) <= view.models:
            self.current, self.published_at = view.raw, time.monotonic()
            self.calibration.restore(view.raw.get("latency_scale"), self.served)
            self.report_scale()
            PLAN_EPOCH.labels("planner").set(view.epoch)
            self.report_unplaced(view.raw)
            if self.hb is not None:
                self.hb.status.update(status="running", epoch=view.epoch)
                self.hb.ready = True
            return
        await self.publish(build_workload({}, self.served, bootstrap_rps=BOOTSTRAP_RPS,
                                          default_budget_ms=DEFAULT_BUDGET_MS), "bootstrap")

    def observed_workload(self) -> dict[str, Any]:
        if self.steering.workload is not None:
            return self.steering.workload
        observed = build_workload(self.window.fragments(time.time()), self.served)
        seen = {f["model"] for f in observed["fragments"]}
        quiet = {m: n for m, n in self.served.items() if m not in seen}
        # A served model nobody uses now keeps one minimal group (cut 0 routes every cut of it).
        observed["fragments"] += [{"id": f"{m}:0:idle", "model": m, "cut": 0, "rate_rps": FLOOR_RPS,
                                   "budget_ms": DEFAULT_BUDGET_MS} for m in sorted(quiet)]
        return observed

    async def maybe_replan(self, *, force: str | None = None) -> bool:
        if force is None:
            if self.steering.hold or time.monotonic() - self.published_at < self.settings.replan_s:
                return False
            observed = self.window.fragments(time.time())
            if not observed:
                return False
            workload = self.observed_workload()
            old = (self.current or {}).get("workload", [])
            d = drift(old, workload["fragments"], floor_rps=FLOOR_RPS)
            if d <= self.settings.drift:
                return False
            before = (self.current or {}).get("epoch")
            plan = await self.publish(workload, f"drift {d:.2f}", forced=False)
            return plan.get("epoch") != before
        explicit = self.steering.workload is not None or self.window.fragments(time.time())
        await self.publish(self.observed_workload() if explicit
                           else {"fragments": (self.current or {}).get("workload", [])}, force)
        return True

    def on_stats(self, payload: bytes | None) -> None:
        try:
            msg = wire.decode_message(payload, "stats")
        except InvalidRequest as exc:
            self.log.warning(logs.Event.MALFORMED, stream=keys.STATS, error=exc.message)
            return
        self.window.add(parse_stats(msg))

    def on_control(self, payload: bytes | None) -> str | None:
        try:
            cmd = wire.decode_message(payload, "control")
            return self.steering.apply(cmd, self.current)
        except (InvalidRequest, ValueError) as exc:
            self.log.warning(logs.Event.MALFORMED, stream=keys.CONTROL, error=str(exc))
            return None

    async def run(self, stop: asyncio.Event, consumer_name: str) -> None:
        await self.bootstrap()
        s = self.settings
        stats = StreamConsumer(self.r, keys.STATS, keys.PLANNER_GROUP, consumer_name, count=200, block_ms=s.block_ms,
                               max_deliveries=s.max_deliveries)
        control = StreamConsumer(self.r, keys.CONTROL, keys.PLANNER_GROUP, consumer_name, count=50, block_ms=s.block_ms,
                                 max_deliveries=s.max_deliveries)
        for c in (stats, control):
            await c.setup()
        while not stop.is_set():
            try:
                for e in await stats.read():
                    self.on_stats(e.payload)
                    await stats.ack([e.id])
                forced = None
                for e in await control.read(block_ms=1):
                    forced = self.on_control(e.payload) or forced
                    await control.ack([e.id])
                polled = await self.poll_devices()
                await self.maybe_replan(force=forced)
                if polled:
                    await self.follow_devices()
                    await self.calibrate()
            except (RedisError, ConnectionError, OSError, TimeoutError) as exc:
                self.log.warning(logs.Event.REDIS_RECONNECT, error=repr(exc))
                await asyncio.sleep(0.5)


async def main(settings: Settings, r: Client, stop: asyncio.Event, hb: Heartbeat) -> None:
    """Plan while this instance holds the planner lease; wait as a standby otherwise (leadership.py)."""
    profile, name = load_profile(settings)
    for stream in (keys.STATS, keys.CONTROL):
        await ensure_group(r, stream, keys.PLANNER_GROUP, "0")
    lease = Lease(r, hb.name)
    log = logs.get_logger("graft.planner")
    async with sweeping(r, settings, f"sweeper-{hb.name}", stop):  # answers what orphaned streams strand
        while not stop.is_set():
            hb.status.update(role="standby", leader=None)
            try:
                leading = await lease.hold()
            except (RedisError, OSError) as exc:
                log.warning(logs.Event.REDIS_RECONNECT, error=repr(exc), during="lease")
                leading = False
            if not leading:
                hb.status.update(leader=await _holder(lease))
                hb.ready = True  # a standby is healthy: it is ready to take over
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), lease.retry_s)
                continue
            log.info(logs.Event.LEADER_ELECTED, planner=hb.name)
            hb.status.update(role="leader", leader=hb.name)
            planner = Planner(settings, r, profile, name, hb)  # a fresh start from the published plan
            planner.fence = hb.name
            await _lead(planner, lease, stop, f"planner-{hb.name}")
            if stop.is_set():
                with contextlib.suppress(RedisError, OSError):
                    await lease.release()  # a clean stop hands over at once, not after the TTL


async def _lead(planner: Planner, lease: Lease, stop: asyncio.Event, consumer: str) -> None:
    """Run ``planner`` while the lease can be renewed; stop it the moment it cannot."""
    done = asyncio.Event()
    run = asyncio.create_task(planner.run(done, consumer))
    try:
        while not stop.is_set() and not run.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), lease.renew_s)
            try:
                if not await lease.hold():
                    planner.log.warning(logs.Event.LEADER_LOST, planner=lease.name, holder=await _holder(lease))
                    break
            except (RedisError, OSError) as exc:
                planner.log.warning(logs.Event.LEADER_LOST, planner=lease.name, error=repr(exc))
                break
    finally:
        done.set()
        await asyncio.gather(run, return_exceptions=True)


async def _holder(lease: Lease) -> str | None:
    try:
        return await lease.holder()
    except (RedisError, OSError):
        return None
