"""Fault scenarios under steady open-loop load: kill a part, keep sending, account for every request.

Each scenario starts its own system (``Live``), drives ``steady`` load from four clients of its own,
injects its fault, stops sending, waits out the last budgets, reads the raw reply streams and judges
(``Accountant.judge``). Process kills are real SIGKILLs of the pids the registry and the supervisor
name; what restarted is read back from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.settings import Settings
from common.store.backlog import redis_now_ms
from common.store.plan_store import load_plan
from tools.admin import send_control
from tools.faults.accountant import longest_gap_ms
from tools.faults.live import MODEL, RESOLUTION, Live, Restarts, sigkill
from tools.faults.load import Load, steady
from tools.faults.procs import Proc, alive, descendants
from tools.faults.report import Result
from tools.loadgen import RequestClass
from tools.redis_server import RedisServer, free_port

T = TypeVar("T")

CUTS = (0, 3, 6, 9)
BUDGET_MS = 2000.0
RATE = 40.0


@dataclass
class Ctx:
    quick: bool
    out: Path
    profile: Path  # one thread per CPU device (see live.one_thread_profile)
    settings: Settings
    say: Callable[[str], None] = print
    ci: bool = False  # the smallest versions, for tests/faults (≤ ~30 s each)

    def pick(self, full: T, quick: T, ci: T | None = None) -> T:
        if self.ci and ci is not None:
            return ci
        return quick if self.quick or self.ci else full

    def log_dir(self, name: str) -> Path:
        return self.out / "logs" / name


def mix(budget_ms: float = BUDGET_MS, cuts: tuple[int, ...] = CUTS) -> list[RequestClass]:
    return [RequestClass(MODEL, c, budget_ms) for c in cuts]


Fault = Callable[[Live, Load], Awaitable[dict[str, Any]]]


async def under_load(live: Live, name: str, fault: Fault, *, rate: float = RATE, budget_ms: float = BUDGET_MS,
                     max_s: float = 900.0, seed: int = 1, clients: int = 4) -> dict[str, Any]:
    """Steady load from ``clients`` clients while ``fault`` runs; then wait out the budgets and collect."""
    load = await Load(live.producer, live.acct, clients=[f"fx-{name}-{k}" for k in range(clients)],
                      resolution=RESOLUTION, seed=seed).start()
    stop = asyncio.Event()
    sending = asyncio.create_task(load.run(steady(mix(budget_ms), rate, max_s, seed), stop=stop, prefix=name))
    try:
        extra = await fault(live, load)
    finally:
        stop.set()
        await sending
    await settle(live, budget_ms)
    return extra


async def settle(live: Live, budget_ms: float) -> None:
    await asyncio.sleep(budget_ms / 1000.0 + 2.0)
    await live.acct.collect(live.r)


async def run_live(ctx: Ctx, name: str, settings: Settings, body: Callable[[Live], Awaitable[dict[str, Any]]],
                   *, redis: RedisServer | None = None, profile: Path | None = None, extra_ingresses: int = 0) -> Result:
    """Start a system, run ``body``, stop it, and build the result with the standard targets."""
    t0 = time.monotonic()
    live = Live(settings, profile or ctx.profile, ctx.log_dir(name), redis=redis, extra_ingresses=extra_ingresses)
    extra: dict[str, Any] = {}
    error = None
    restarts: Restarts | None = None
    try:
        async with live:
            ctx.say(f"  {name}: system ready in {live.started_s:.1f} s")
            extra = await body(live)
            restarts = live.restarts()
    except Exception as exc:  # a scenario that breaks is reported, and the suite goes on
        error = f"{type(exc).__name__}: {exc}"
        if live.system is not None:
            restarts = live.restarts()
        with contextlib.suppress(Exception):
            await live.stop()
    res = Result(name, live.acct.judge(), leftovers=live.leftovers, extra=extra, duration_s=time.monotonic() - t0,
                 error=error)
    if restarts is not None:
        res.restarts = restarts
    res.extra["startup_s"] = round(live.started_s, 1)
    res.standard()
    return res


# ------------------------------------------------------------------------------------ replica kills


async def replica_kills(ctx: Ctx, spares: int) -> Result:
    name = "replica-kill" + ("-n+1" if spares else "")
    n, interval = ctx.pick((22, 3.0), (5, 2.5), (1, 3.0))

    async def fault(live: Live, load: Load) -> dict[str, Any]:
        await asyncio.sleep(ctx.pick(4.0, 4.0, 2.0))
        kills: list[dict[str, Any]] = []
        while len(kills) < n:
            standby = await live.ready_standby(60.0)
            serving = await live.serving_replicas()
            if not serving:
                await asyncio.sleep(0.2)
                continue
            victim = serving[len(kills) % len(serving)]
            at = await redis_now_ms(live.r)
            sigkill(int(victim["pid"]))
            kills.append({"at_ms": at, "pid": int(victim["pid"]), "replica": victim.get("name"),
                          "standby_was_ready": standby, "serving": len(serving)})
            await asyncio.sleep(interval)
        await asyncio.sleep(ctx.pick(3.0, 3.0, 0.5))
        return {"kills": kills}

    async def body(live: Live) -> dict[str, Any]:
        extra = await under_load(live, name, fault)
        times = live.acct.ok_times()
        gaps = [longest_gap_ms(times, k["at_ms"], k["at_ms"] + interval * 1000.0) for k in extra["kills"]]
        extra["gap_ms"] = {"max": max(gaps, default=0.0), "median": sorted(gaps)[len(gaps) // 2] if gaps else 0.0,
                           "each": [round(g) for g in gaps]}
        return extra

    res = await run_live(ctx, name, ctx.settings.with_(spare_replicas=spares), body)
    kills = len(res.extra.get("kills", []))
    want_kills = n
    res.target("kills", kills >= want_kills, kills, f"≥ {want_kills}")
    pct, want = res.verdict.ok_in_budget_pct, 99.0 if spares else 95.0
    res.target("ok in budget", pct >= want, f"{pct:.2f}%", f"≥ {want:g}%")
    return res


# ---------------------------------------------------------------------------------- agent kills


async def _wait_epoch_above(live: Live, epoch: int, timeout_s: float) -> int:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        view = await load_plan(live.r)
        if view is not None and view.epoch > epoch:
            return view.epoch
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no plan after epoch {epoch} within {timeout_s} s")


async def agent_kill(ctx: Ctx, during_switch: bool = False) -> Result:
    name = "agent-kill-switch" if during_switch else "agent-kill"

    async def fault(live: Live, load: Load) -> dict[str, Any]:
        await asyncio.sleep(ctx.pick(4.0, 4.0, 2.0))
        extra: dict[str, Any] = {}
        if during_switch:
            view = await load_plan(live.r)
            assert view is not None
            frags = [{"id": f"{MODEL}:{c}:{BUDGET_MS:g}", "model": MODEL, "cut": c, "rate_rps": RATE / len(CUTS),
                      "budget_ms": BUDGET_MS} for c in CUTS[:2]]
            frags.append({"id": f"{MODEL}:rest", "model": MODEL, "cut": CUTS[2], "rate_rps": RATE / 2,
                          "budget_ms": BUDGET_MS})
            await send_control(live.r, "plan", workload={"fragments": frags}, policy="per-cut", hold=True)
            extra["switch_from"] = view.epoch
            extra["switch_to"] = await _wait_epoch_above(live, view.epoch, 20.0)
            await asyncio.sleep(1.0)
        agent = live.child_pid("worker")
        assert agent is not None
        replicas = [p for p in descendants(agent) if "services.worker.replica" in p.cmd]
        at = await redis_now_ms(live.r)
        sigkill(agent)
        await asyncio.sleep(5.0)
        orphans: list[Proc] = [p for p in replicas if alive(p)]
        extra.update(killed_at_ms=at, replicas_at_kill=len(replicas), orphans_after_5s=len(orphans))
        if not ctx.ci:  # CI stops here: what was sent meanwhile must still be answered
            await live.ready(180.0)
            extra["recovered_s"] = round((await redis_now_ms(live.r) - at) / 1000.0, 1)
            await asyncio.sleep(5.0)
        return extra

    async def body(live: Live) -> dict[str, Any]:
        return await under_load(live, name, fault)

    res = await run_live(ctx, name, ctx.settings, body)
    orphans = res.extra.get("orphans_after_5s", -1)
    res.target("orphan replicas", orphans == 0, orphans, "0 (5 s after the kill)")
    return res


# ------------------------------------------------------------------------------ ingress, planner


async def service_kill(ctx: Ctx, service: str, *, spare: bool = False) -> Result:
    """SIGKILL the ingress or the planner under load (``spare``: with a second ingress running beside it)."""
    name = f"{service}-kill" + ("-n+1" if spare else "")

    async def fault(live: Live, load: Load) -> dict[str, Any]:
        await asyncio.sleep(4.0)
        pid = live.child_pid(service)
        assert pid is not None
        before = set(await live.instances(service))
        at = await redis_now_ms(live.r)
        sigkill(pid)
        await live.new_instance(service, before, 120.0)  # the registry still lists the dead one for its TTL
        await live.ready(120.0)
        back = await redis_now_ms(live.r)
        await asyncio.sleep(6.0)
        return {"killed_at_ms": at, "serving_again_s": round((back - at) / 1000.0, 1)}

    async def body(live: Live) -> dict[str, Any]:
        return await under_load(live, name, fault)

    return await run_live(ctx, name, ctx.settings, body, extra_ingresses=1 if spare else 0)


# ------------------------------------------------------------------------------------------ Redis


async def redis_restart(ctx: Ctx, crash: bool) -> Result:
    """Redis with AOF (appendonly yes, appendfsync everysec) stopped under load and started again on its files.

    ``crash``: SIGKILL, else SIGTERM (Redis fsyncs the AOF as it shuts down). What can be lost, precisely:

    * requests sent while Redis is down: their XADD fails, the producer knows at once and must send
      again — counted as *not accepted*, never as lost;
    * with ``everysec`` Redis write()s the AOF before it answers a command, so a *killed Redis process*
      loses nothing it acknowledged (the kernel holds the bytes); only an OS crash or power loss can lose
      the last ≤ 1 s (≤ 2 s when an fsync stalls) of acknowledged writes — requests, replies and acks
      alike, which would show as lost requests or, for a lost ack, a second reply. The suite cannot pull
      the power: ``in_fsync_window`` reports the 2 s before the kill apart, and everything else
      (``outside_window``) must be answered exactly once in time.
    """
    name = "redis-crash-aof" if crash else "redis-restart-aof"
    window_ms = 2000.0
    server = RedisServer(port=free_port(), persist_dir=ctx.out / "redis-aof" / name, appendonly=True)
    await server.astart()

    async def fault(live: Live, load: Load) -> dict[str, Any]:
        await live.r.config_set("appendfsync", "everysec")
        fsync = await live.r.config_get("appendfsync")
        await asyncio.sleep(ctx.pick(5.0, 5.0, 2.0))
        at = await redis_now_ms(live.r)
        if crash:
            sigkill(server.pid)
        else:
            os.kill(server.pid, signal.SIGTERM)  # Redis fsyncs the AOF as it shuts down
            for _ in range(200):
                if not server.running:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        await server.astart()
        back = await redis_now_ms(live.r)
        await live.ready(60.0)
        await asyncio.sleep(ctx.pick(8.0, 8.0, 3.0))
        return {"killed_at_ms": at, "down_ms": back - at, "appendfsync": str(fsync), "signal": "KILL" if crash else "TERM"}

    async def body(live: Live) -> dict[str, Any]:
        extra = await under_load(live, name, fault)
        at = extra["killed_at_ms"]
        inside = [r for r, s in live.acct.sent.items() if at - window_ms <= s.intended_ms <= at]
        outside = [r for r in live.acct.sent if r not in set(inside)]
        extra["in_fsync_window"] = live.acct.judge(inside).to_dict()
        extra["outside_window"] = live.acct.judge(outside).to_dict()
        return extra

    res = await run_live(ctx, name, ctx.settings.with_(redis_url=server.url), body, redis=server)
    if crash:  # only the fsync window may lose or repeat anything
        out = res.extra.get("outside_window", {})
        res.targets = [t for t in res.targets if t.name not in ("lost", "duplicated")]
        res.target("lost outside the fsync window", out.get("lost") == 0, out.get("lost"), "0")
        res.target("duplicated outside the fsync window", out.get("duplicated") == 0, out.get("duplicated"), "0")
    return res

