"""Scenarios of what producers send (malformed messages, overload, mixed budgets), a soak, and ``graft up``
stopped every way."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

from common.contract import keys
from common.model import zoo
from common.store.backlog import redis_now_ms
from common.store.plan_store import load_plan, plan_history
from tools import cpu
from tools.admin import send_control
from tools.faults.accountant import Sent, Verdict
from tools.faults.live import MODEL, RESOLUTION, Live
from tools.faults.load import Load, closed_loop, new_req_id, steady
from tools.faults.malformed import KINDS, fields_for
from tools.faults.procs import Census, kill_all, short
from tools.faults.report import Result
from tools.faults.scenarios import BUDGET_MS, RATE, Ctx, mix, run_live, settle, under_load
from tools.loadgen import RequestClass

# ------------------------------------------------------------------------------------ malformed


async def malformed(ctx: Ctx) -> Result:
    """Every kind of malformed message, to graft:ingress and straight to a group stream, beside valid load."""
    per_kind = ctx.pick(125, 25, 4)  # × 42 kinds × 2 streams: 10,500 / 2,100 / 336 messages
    name = "malformed"
    shape = zoo.describe(MODEL, RESOLUTION).cut_shape(0)

    async def fault(live: Live, load: Load) -> dict[str, Any]:
        await asyncio.sleep(2.0)
        view = await load_plan(live.r)
        assert view is not None
        group_stream = sorted(view.streams().values())[0]
        before_pids = {int(s["pid"]) for s in (await live.replicas()).values()}
        dead_keys = [keys.dead_letters(keys.INGRESS), keys.dead_letters(group_stream)]
        dead0 = [await live.r.xlen(k) for k in dead_keys]
        sent: Counter[str] = Counter()
        unreadable = 0
        for rnd in range(per_kind):
            async with live.r.pipeline(transaction=False) as pipe:
                rows: list[Sent] = []
                for kind in KINDS:
                    for target in (keys.INGRESS, group_stream):
                        client = f"fx-mal-{rnd % 4}"
                        rid = new_req_id(f"mal-{kind.name}")
                        fields, blob = fields_for(kind, rid, client, shape)
                        if blob is not None:
                            pipe.set(keys.blob(rid), blob, px=10_000)
                        pipe.xadd(target, fields)  # type: ignore[arg-type]  # bytes keys are valid field names
                        sent[kind.name] += 1
                        if kind.readable:
                            live.acct.watch(client)
                            rows.append(Sent(rid, client, load.redis_ms(time.time()), BUDGET_MS, "?",
                                             f"{kind.name}@{'ingress' if target == keys.INGRESS else 'group'}"))
                        else:
                            unreadable += 1
                await pipe.execute()
            for s in rows:
                live.acct.record(s)
            await asyncio.sleep(0.02)
        await asyncio.sleep(ctx.pick(4.0, 4.0, 2.0))
        after_pids = {int(s["pid"]) for s in (await live.replicas()).values()}
        dead1 = [await live.r.xlen(k) for k in dead_keys]
        return {"messages": sum(sent.values()), "kinds": len(KINDS), "unreadable": unreadable,
                "dead_lettered": sum(b - a for a, b in zip(dead0, dead1, strict=True)),
                # A replica that went away is a crash; one that appeared (a standby still warming up when the
                # first census was taken) is not: a crash and its restart also show in the agents' restarts.
                "replica_pids_gone": sorted(before_pids - after_pids),
                "replica_pids_new": sorted(after_pids - before_pids), "group_stream": group_stream}

    async def body(live: Live) -> dict[str, Any]:
        extra = await under_load(live, name, fault, rate=20.0)
        mal = [r for r, s in live.acct.sent.items() if r.startswith("mal-")]
        valid = [r for r in live.acct.sent if not r.startswith("mal-")]
        v = live.acct.judge(mal)
        extra["readable_messages"] = v.to_dict()
        extra["valid_load"] = live.acct.judge(valid).to_dict()
        by_req = live.acct.replies_by_req()
        extra["unanswered_readable"] = sorted({live.acct.sent[r].tag for r in mal if not by_req.get(r)})[:40]
        return extra

    res = await run_live(ctx, name, ctx.settings, body)
    x = res.extra
    want = ctx.pick(10_000, 2_000, 300)
    res.target("messages", x.get("messages", 0) >= want, x.get("messages"), f"≥ {want:,}")
    res.target("kinds", x.get("kinds", 0) >= 30, x.get("kinds"), "≥ 30")
    crashes = res.restarts.total + len(x.get("replica_pids_gone", []))
    res.target("crashes", crashes == 0, crashes, "0")
    unanswered = x.get("readable_messages", {}).get("lost", -1)
    res.target("unanswered readable", unanswered == 0, unanswered, "0")
    valid = x.get("valid_load", {})
    res.target("valid load lost", valid.get("lost") == 0, valid.get("lost"), "0")
    return res


# ------------------------------------------------------------------------------------- overload


async def overload(ctx: Ctx, factor: float = 5.0) -> Result:
    """Capacity measured closed-loop on a held plan, then ``factor`` × that offered open-loop.

    At 5× on a 2-core host the front door (generator, Redis, ingresses) is short of CPU before
    admission has a say; 2.5× keeps it fed, so there the figure is admission's own."""
    name = f"overload-{factor:g}x"
    budget = 500.0
    cls = RequestClass(MODEL, 6, budget)
    cap_s, over_s = (6.0, 8.0) if ctx.quick else (10.0, 20.0)

    async def body(live: Live) -> dict[str, Any]:
        frags = [{"id": f"{MODEL}:6:{budget:g}", "model": MODEL, "cut": 6, "rate_rps": 100.0, "budget_ms": budget}]
        epoch = (await load_plan(live.r)).epoch  # type: ignore[union-attr]
        await send_control(live.r, "plan", workload={"fragments": frags}, hold=True)
        for _ in range(200):
            view = await load_plan(live.r)
            if view is not None and view.epoch > epoch:
                break
            await asyncio.sleep(0.1)
        await live.ready(120.0)
        held = await load_plan(live.r)
        assert held is not None
        # Enough outstanding that every replica always has a full batch queued behind the one it runs.
        outstanding = max(8, 3 * sum(g.batch * g.replicas for g in held.groups.values()))
        cap_load = await Load(live.producer, live.acct, clients=["fx-cap-0", "fx-cap-1"], resolution=RESOLUTION).start()
        await closed_loop(cap_load, live.acct, cls, concurrency=outstanding, duration_s=2.0, prefix="warm")
        ok, secs = await closed_loop(cap_load, live.acct, cls, concurrency=outstanding, duration_s=cap_s, prefix="cap")
        capacity = ok / secs
        ctx.say(f"  {name}: measured capacity {capacity:.0f} req/s")
        await asyncio.sleep(1.0)
        load = await Load(live.producer, live.acct, clients=[f"fx-over-{k}" for k in range(4)], resolution=RESOLUTION).start()
        t0, before = time.time(), cpu.snapshot()
        ids = await load.run(steady([cls], factor * capacity, over_s, seed=7), prefix="over")
        spent = cpu.cores(before, cpu.snapshot())  # the two cores during the overload, by role
        await settle(live, budget)
        v = live.acct.judge(ids)
        shed = v.errors.get("OVERLOADED", 0)
        admitted = v.accepted - shed
        return {"capacity_rps": round(capacity, 1), "capacity_outstanding": outstanding, "offered_rps": round(len(ids) / over_s, 1),
                "send_s": round(time.time() - t0, 1), "overload": v.to_dict(), "admitted": admitted,
                "admitted_in_budget_pct": round(100.0 * v.ok_in_budget / admitted, 3) if admitted else 0.0,
                "goodput_rps": round(v.ok_in_budget / over_s, 1),
                "goodput_vs_capacity": round(v.ok_in_budget / over_s / capacity, 3) if capacity else 0.0,
                "overload_ids": len(ids), "breakdown": live.acct.breakdown(ids),
                "timeline_per_s": live.acct.timeline(ids), "send_errors": live.acct.send_errors(ids),
                "cpu_cores": spent}

    # Two ingresses, as ``graft up`` starts them: one ingress's read → validate → write cycle is serial.
    res = await run_live(ctx, name, ctx.settings, body, extra_ingresses=1)
    x = res.extra
    res.target("admitted in budget", x.get("admitted_in_budget_pct", 0) >= 99.0,
               f"{x.get('admitted_in_budget_pct', 0):.2f}%", "≥ 99%")
    res.target("goodput / capacity", x.get("goodput_vs_capacity", 0) >= 0.8, x.get("goodput_vs_capacity"), "≥ 0.8")
    return res


# -------------------------------------------------------------------------------- mixed budgets


async def mixed_budgets(ctx: Ctx) -> Result:
    """500 ms clients and one 2 ms client at the same cut, through re-plans."""
    name = "mixed-budgets"
    dur = 20.0 if ctx.quick else 45.0

    async def body(live: Live) -> dict[str, Any]:
        e0 = (await load_plan(live.r)).epoch  # type: ignore[union-attr]
        relaxed = await Load(live.producer, live.acct, clients=[f"fx-relaxed-{k}" for k in range(3)],
                             resolution=RESOLUTION, seed=3).start()
        tight = await Load(live.producer, live.acct, clients=["fx-tight-0"], resolution=RESOLUTION, seed=4).start()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(relaxed.run(steady([RequestClass(MODEL, 0, 500.0)], 30.0, dur, 5),
                                                 stop=stop, prefix="relaxed")),
                 asyncio.create_task(tight.run(steady([RequestClass(MODEL, 0, 2.0)], 10.0, dur, 6), stop=stop,
                                               prefix="tight"))]
        replan_at: list[int] = []
        for _ in range(3):
            await asyncio.sleep(dur / 4.0)
            await send_control(live.r, "replan")
            replan_at.append(await redis_now_ms(live.r))
        await asyncio.gather(*tasks)
        await settle(live, 500.0)
        epochs = sorted({int(p.get("epoch", 0)) for p in await plan_history(live.r, 50)} - {0})
        first_replan = replan_at[0]
        after = [r for r, s in live.acct.sent.items() if r.startswith("relaxed") and s.intended_ms >= first_replan]
        rel = live.acct.judge([r for r in live.acct.sent if r.startswith("relaxed")])
        tig = live.acct.judge([r for r in live.acct.sent if r.startswith("tight")])
        return {"epochs": [e for e in epochs if e >= e0], "relaxed": rel.to_dict(), "tight": tig.to_dict(),
                "relaxed_after_first_replan": live.acct.judge(after).to_dict()}

    res = await run_live(ctx, name, ctx.settings.with_(replan_s=3.0), body)
    x = res.extra
    res.target("re-plans", len(x.get("epochs", [])) >= 2, len(x.get("epochs", [])), "≥ 2 epochs")
    after = x.get("relaxed_after_first_replan", {})
    res.target("500 ms after re-plans", after.get("ok_in_budget_pct", 0) >= 99.0,
               f"{after.get('ok_in_budget_pct', 0):.2f}%", "≥ 99% OK in budget")
    tight = x.get("tight", {})
    codes = tight.get("errors", {})
    res.target("2 ms answered DEADLINE_EXCEEDED", set(codes) == {"DEADLINE_EXCEEDED"} and tight.get("ok", 1) == 0,
               codes, "only DEADLINE_EXCEEDED")
    return res


# ------------------------------------------------------------------------------------------ soak


async def soak(ctx: Ctx) -> Result:
    name = "soak"
    dur = 60.0 if ctx.quick else 600.0

    async def fault(live: Live, load: Load) -> dict[str, Any]:
        await asyncio.sleep(5.0)
        start = live.rss()
        await asyncio.sleep(dur)
        end = live.rss()
        growth = {k: round(100.0 * (end[k] - v) / v, 1) for k, v in start.items() if k in end and v}
        return {"soak_s": dur, "rss_kib_start": start, "rss_kib_end": end, "rss_growth_pct": growth,
                "rss_growth_max_pct": max(growth.values(), default=0.0)}

    async def body(live: Live) -> dict[str, Any]:
        return await under_load(live, name, fault)

    return await run_live(ctx, name, ctx.settings, body)


# ----------------------------------------------------------------------------------- graft up stops


def _as_from_a_terminal() -> None:
    """graft up as a user's shell starts it: SIGINT at its default. A suite run in the background of a
    non-interactive shell (``cmd &``, nohup) inherits SIGINT *ignored*, and so would graft up: Python
    then installs no KeyboardInterrupt handler, and a Ctrl-C before graft up is ready would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def _one_stop(ctx: Ctx, sig: signal.Signals, when: str) -> dict[str, Any]:
    env = {**os.environ, "GRAFT_LOG_LEVEL": "warning", "GRAFT_GATEWAY_HTTP_PORT": "0", "GRAFT_GATEWAY_GRPC_PORT": "0"}
    env.pop("REDIS_URL", None)
    argv = [sys.executable, "-m", "tools.cli", "up", "--models", MODEL, "--resolution", str(RESOLUTION),
            "--profile", str(ctx.profile)]
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                cwd=ctx.out, preexec_fn=_as_from_a_terminal)
    census = Census(proc.pid)
    t0 = time.monotonic()
    out = b""
    assert proc.stdout is not None
    try:
        if when == "0.5s":
            await asyncio.sleep(0.5)
        elif when == "first-child":
            while not census.poll() and time.monotonic() - t0 < 60 and proc.returncode is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polling /proc: there is no event to wait for
        else:
            end = time.monotonic() + 180
            while b"Graft is up" not in out and time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    out += await asyncio.wait_for(proc.stdout.read(4096), 1.0)
                census.poll()
        census.poll()
        at = time.monotonic() - t0
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        reader = asyncio.create_task(proc.stdout.read())
        try:
            code = await asyncio.wait_for(proc.wait(), 60.0)
        except TimeoutError:
            code = None
        census.poll()
        left = await census.wait_gone(20.0)
        reader.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    kill_all(left)
    return {"signal": sig.name, "when": when, "signalled_at_s": round(at, 2), "exit_code": code,
            "processes_seen": len(census.seen), "leftovers": [f"{short(p.cmd)} [{p.pid}]" for p in left],
            "_left": left}


async def up_stops(ctx: Ctx) -> Result:
    name = "graft-up-stops"
    t0 = time.monotonic()
    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    whens = ["first-child", "ready"] if ctx.quick else ["0.5s", "first-child", "ready"]
    runs = []
    for sig in sigs:
        for when in whens:
            one = await _one_stop(ctx, sig, when)
            ctx.say(f"  {name}: {sig.name} at {when} ({one['signalled_at_s']} s): exit {one['exit_code']}, "
                    f"{one['processes_seen']} processes seen, leftovers {one['leftovers'] or 0}")
            runs.append(one)
    left = [p for r in runs for p in r.pop("_left")]
    res = Result(name, Verdict(), leftovers=left, extra={"runs": runs}, duration_s=time.monotonic() - t0)
    res.target("leftovers", not left, len(left), "0")
    exited = all(r["exit_code"] is not None for r in runs)
    res.target("graft up exited", exited, exited, "every run")
    return res


__all__ = ["BUDGET_MS", "RATE", "malformed", "mix", "mixed_budgets", "overload", "soak", "up_stops"]
