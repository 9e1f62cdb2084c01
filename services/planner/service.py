"""The planner service: bootstrap plan, live statistics, drift-triggered re-planning, admin commands.

It publishes plan epoch 1 at once (every served model, every cut, a nominal rate), so ingress and
workers can serve before any statistics exist. Then it folds ingress statistics into a sliding
window and publishes ``epoch + 1`` when the traffic drifted past ``GRAFT_DRIFT`` and the current
epoch is at least ``GRAFT_REPLAN_S`` old, or at once on ``graft replan``/``scale``/``drain``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from common import keys, logs, wire
from common.errors import InvalidRequest
from common.metrics import PLAN_EPOCH
from common.plan_store import StaleEpoch, load_plan, publish_plan
from common.profiles import Profile, ProfileError, shipped
from common.settings import Settings
from common.streams import StreamConsumer, ensure_group
from services.lifecycle import Heartbeat
from services.planner.observed import TrafficWindow, build_workload, drift, parse_stats
from services.planner.replanning import Steering, next_plan, same_serving

BOOTSTRAP_RPS = 1.0       # nominal rate per fragment before any traffic is seen
FLOOR_RPS = 0.05          # rate kept for cuts nobody uses, so every (model, cut) stays routable
DEFAULT_BUDGET_MS = 200.0  # budget assumed for fragments never seen
WINDOW_S = 20.0


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
    def __init__(self, settings: Settings, r: Any, profile: Profile, profile_name: str,
                 hb: Heartbeat | None = None) -> None:
        self.settings, self.r, self.profile, self.profile_name = settings, r, profile, profile_name
        self.served = served_models(settings, profile)
        self.window = TrafficWindow(WINDOW_S)
        self.steering = Steering()
        self.hb = hb
        self.log = logs.get_logger("graft.planner")
        self.current: dict[str, Any] | None = None
        self.published_at = 0.0

    async def publish(self, workload: dict[str, Any], reason: str, *, forced: bool = True) -> dict[str, Any]:
        epoch = (int(self.current["epoch"]) if self.current else 0) + 1
        plan = next_plan(self.profile, workload, epoch=epoch, rho=self.settings.rho, steering=self.steering,
                         profile_name=self.profile_name, policy=self.settings.policy)
        if not forced and self.current is not None and same_serving(self.current, plan):
            # Same groups, shares and replicas: keep serving this epoch, only move the drift baseline.
            self.current = {**self.current, "workload": plan["workload"]}
            self.published_at = time.monotonic()
            self.log.info(logs.Event.PLAN_UNCHANGED, reason=reason, epoch=self.current["epoch"])
            return self.current
        try:
            await publish_plan(self.r, plan)
        except StaleEpoch:  # another planner moved on: follow it
            view = await load_plan(self.r)
            plan = view.raw if view else plan
        self.current, self.published_at = plan, time.monotonic()
        PLAN_EPOCH.labels("planner").set(plan["epoch"])
        logs.bind(epoch=plan["epoch"])
        self.log.info(logs.Event.PLAN_PUBLISHED, reason=reason, groups=len(plan["groups"]),
                      total_share=plan["total_share"], devices=plan["gpus"], infeasible=len(plan["infeasible"]))
        if self.hb is not None:
            self.hb.status.update(status="running", epoch=plan["epoch"])
            self.hb.ready = True
        return plan

    async def bootstrap(self) -> None:
        view = await load_plan(self.r)
        if view is not None and set(self.served) <= view.models:
            self.current, self.published_at = view.raw, time.monotonic()
            PLAN_EPOCH.labels("planner").set(view.epoch)
            if self.hb is not None:
                self.hb.status.update(status="running", epoch=view.epoch)
                self.hb.ready = True
            return
        await self.publish(build_workload({}, self.served, floor_rps=BOOTSTRAP_RPS,
                                          default_budget_ms=DEFAULT_BUDGET_MS), "bootstrap")

    def observed_workload(self) -> dict[str, Any]:
        return build_workload(self.window.fragments(time.time()), self.served, floor_rps=FLOOR_RPS,
                              default_budget_ms=DEFAULT_BUDGET_MS)

    async def maybe_replan(self, *, force: str | None = None) -> bool:
        if force is None:
            if time.monotonic() - self.published_at < self.settings.replan_s:
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
        await self.publish(self.observed_workload() if self.window.fragments(time.time())
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
                await self.maybe_replan(force=forced)
            except (ConnectionError, OSError, TimeoutError) as exc:
                self.log.warning(logs.Event.REDIS_RECONNECT, error=repr(exc))
                await asyncio.sleep(0.5)


async def main(settings: Settings, r: Any, stop: asyncio.Event, hb: Heartbeat) -> None:
    profile, name = load_profile(settings)
    for stream in (keys.STATS, keys.CONTROL):
        await ensure_group(r, stream, keys.PLANNER_GROUP, "0")
    planner = Planner(settings, r, profile, name, hb)
    await planner.run(stop, f"planner-{hb.name}")
