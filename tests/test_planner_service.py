"""Planner service: traffic window, drift, steering, and the live loop against a private Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.contract import keys, wire
from common.profiles import make_profile
from common.settings import Settings
from common.store.plan_store import load_plan
from common.store.registry import Registry
from services.planner.observed import TrafficWindow, build_workload, drift, parse_stats
from services.planner.replanning import Steering, next_plan
from services.planner.service import Planner
from tests.helpers import cpu_test_profile, until


def tiny_profile():
    blocks = [{"name": f"b{j}", "out_bytes": 1000 * (5 - j), "flops": 10**6,
               "latency_ms": [[1.0 + 0.2 * j, 0.8], [1.6, 1.0], [2.8, 1.6], [5.0, 3.0]]} for j in range(4)]
    return make_profile("estimated", "test", "gpu_share_pct", [1, 2, 4, 8], [50, 100],
                        {"m": {"input_shape": [3, 8, 8], "input_bytes": 768, "blocks": blocks}})


def stats_msg(ts: float, frags: list[tuple[str, int, int, float]]) -> dict:
    return {"ts": ts, "window_s": 1.0, "fragments": [
        {"model": m, "cut": c, "count": n, "min_budget_ms": b, "p50_budget_ms": b, "budgets": [[b, n]]}
        for m, c, n, b in frags]}


def test_window_rates_budgets_and_expiry() -> None:
    w = TrafficWindow(window_s=10)
    now = 1000.0
    for i in range(5):
        w.add(parse_stats(stats_msg(now - 4 + i, [("m", 1, 10, 50.0 + i), ("m", 2, 2, 80.0)])))
    frags = w.fragments(now)
    # budgets 50..54 fall in one budget class, reported by its tightest budget
    assert frags == pytest.approx({("m", 1, 50.0): 50 / 5, ("m", 2, 80.0): 10 / 5})
    assert w.fragments(now + 30) == {}


def test_window_keeps_budget_classes_apart() -> None:
    """A 2 ms client at cut 0 among 500 ms ones is its own class: the old window merged a cut into one
    fragment with the tightest budget, which made the whole cut infeasible (BAD_CUT for everyone)."""
    w = TrafficWindow(window_s=10)
    w.add(parse_stats({"ts": 100.0, "window_s": 1.0, "fragments": [
        {"model": "m", "cut": 0, "count": 51, "min_budget_ms": 2.0, "budgets": [[2.0, 1], [500.0, 50]]}]}))
    assert w.fragments(100.0) == pytest.approx({("m", 0, 2.0): 1 / 1, ("m", 0, 500.0): 50 / 1})


def test_parse_stats_skips_garbage() -> None:
    assert parse_stats({"fragments": []}) == []
    obs = parse_stats({"ts": 1.0, "fragments": [{"model": "m"}, {"model": "m", "cut": "x", "count": 1},
                                                 {"model": "m", "cut": 1, "count": 3, "min_budget_ms": 9}]})
    assert [(o.cut, o.count) for o in obs] == [(1, 3)]


def test_workload_lists_only_traffic_and_bootstraps_quiet_models() -> None:
    wl = build_workload({("m", 1, 50.0): 10.0, ("m", 1, 400.0): 5.0}, {"m": 4, "n": 3}, bootstrap_rps=1.0,
                        default_budget_ms=200)
    by = {(f["model"], f["cut"], f["budget_ms"]): f["rate_rps"] for f in wl["fragments"]}
    # m: only its cut with traffic, one fragment per budget class; n (no traffic): every cut, nominal
    assert by == {("m", 1, 50.0): 10.0, ("m", 1, 400.0): 5.0, ("n", 0, 200.0): 1.0, ("n", 1, 200.0): 1.0,
                  ("n", 2, 200.0): 1.0}
    assert build_workload({("m", 1, 50.0): 10.0}, {"m": 4})["fragments"] == [
        {"id": "m:1:50", "model": "m", "cut": 1, "rate_rps": 10.0, "budget_ms": 50.0}]


def test_drift_ignores_noise_and_sees_real_change() -> None:
    base = build_workload({("m", 1, 50.0): 10.0, ("m", 3, 50.0): 10.0}, {"m": 4})["fragments"]
    same = build_workload({("m", 1, 50.0): 10.5, ("m", 3, 50.0): 9.6}, {"m": 4})["fragments"]
    assert drift(base, same, floor_rps=0.05) == 0.0  # within 5% of the model's traffic: noise
    doubled = build_workload({("m", 1, 50.0): 20.0, ("m", 3, 50.0): 10.0}, {"m": 4})["fragments"]
    assert drift(base, doubled, floor_rps=0.05) == pytest.approx(1.0)
    new_cut = build_workload({("m", 1, 50.0): 10.0, ("m", 3, 50.0): 10.0, ("m", 2, 50.0): 5.0}, {"m": 4})
    assert drift(base, new_cut["fragments"], floor_rps=0.05) >= 1.0
    tighter = build_workload({("m", 1, 50.0): 5.0, ("m", 1, 20.0): 5.0, ("m", 3, 50.0): 10.0}, {"m": 4})
    assert drift(base, tighter["fragments"], floor_rps=0.05) >= 1.0
    # a stray tight request is noise, not a reason to re-plan
    stray = build_workload({("m", 1, 50.0): 10.0, ("m", 1, 2.0): 0.05, ("m", 3, 50.0): 10.0}, {"m": 4})
    assert drift(base, stray["fragments"], floor_rps=0.05) == 0.0


def test_steering_pins_and_drains() -> None:
    prof = tiny_profile()
    wl = build_workload({("m", 0, 40.0): 300.0, ("m", 2, 40.0): 300.0}, {"m": 4})
    steer = Steering()
    plan = next_plan(prof, wl, epoch=1, rho=0.9, steering=steer, profile_name="t")
    g = plan["groups"][0]
    assert steer.apply({"cmd": "scale", "group": g["id"], "replicas": g["replicas"] + 3}, plan).startswith("scale")
    assert steer.apply({"cmd": "drain", "device": "gpu0"}, plan) == "drain gpu0"
    plan2 = next_plan(prof, wl, epoch=2, rho=0.9, steering=steer, profile_name="t")
    g2 = next(x for x in plan2["groups"] if x["cuts"] == g["cuts"])
    assert g2["replicas"] == g["replicas"] + 3
    assert all(p["device"] != "gpu0" for p in plan2["placement"])
    placed = sum(len(p["replicas"]) for p in plan2["placement"])
    assert placed == sum(x["replicas"] for x in plan2["groups"])
    for bad in ({"cmd": "scale", "group": "nope", "replicas": 2}, {"cmd": "scale", "group": g["id"], "replicas": 0},
                {"cmd": "drain"}, {"cmd": "explode"}):
        with pytest.raises(ValueError):
            steer.apply(bad, plan)


async def test_planner_bootstraps_replans_on_drift_and_on_command(redis, tmp_path) -> None:
    prof = tiny_profile()
    path = tmp_path / "p.json"
    prof.save(path)
    settings = Settings(models=("m",), profile=str(path), replan_s=0.2, drift=0.5, block_ms=20)
    planner = Planner(settings, redis, prof, "p")
    stop = asyncio.Event()
    task = asyncio.create_task(planner.run(stop, "planner-test"))
    try:
        for _ in range(50):
            view = await load_plan(redis)
            if view is not None:
                break
            await asyncio.sleep(0.05)
        assert view is not None and view.epoch == 1 and {c for g in view.groups.values() for c in g.cuts} == {0, 1, 2, 3}
        # heavy traffic on cut 2: drift → epoch 2 with a much larger rate
        for _ in range(3):
            await redis.xadd(keys.STATS, {keys.FIELD: wire.encode_message("stats", stats_msg(time.time(), [("m", 2, 400, 30.0)]))})
        await redis.xadd(keys.STATS, {keys.FIELD: b"garbage"})  # must be skipped, not fatal
        for _ in range(100):
            view = await load_plan(redis)
            if view is not None and view.epoch >= 2:
                break
            await asyncio.sleep(0.05)
        assert view is not None and view.epoch == 2
        assert sum(g.rate_rps for g in view.groups.values()) > 100
        # an explicit replan command publishes a new epoch at once
        await redis.xadd(keys.CONTROL, {keys.FIELD: wire.encode_message("control", {"cmd": "replan"})})
        for _ in range(100):
            view = await load_plan(redis)
            if view is not None and view.epoch >= 3:
                break
            await asyncio.sleep(0.05)
        assert view is not None and view.epoch == 3
        assert await redis.xlen(keys.PLANS) == 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_drift_that_changes_nothing_keeps_the_epoch(redis, tmp_path) -> None:
    prof = tiny_profile()
    settings = Settings(models=("m",), replan_s=0.0, drift=0.1, block_ms=20)
    planner = Planner(settings, redis, prof, "p")
    await planner.bootstrap()
    assert planner.current is not None and planner.current["epoch"] == 1
    # the first traffic: only cut 1 is used, so the plan keeps only cut 1 (epoch 2)
    planner.window.add(parse_stats(stats_msg(time.time(), [("m", 1, 2, 200.0)])))
    assert await planner.maybe_replan() is True
    assert [g["cuts"] for g in planner.current["groups"]] == [[1]]
    # more traffic of the same kind: rates drift, the plan's shape does not — same epoch, new baseline
    planner.window.add(parse_stats(stats_msg(time.time(), [("m", 1, 4, 200.0)])))
    assert await planner.maybe_replan() is False
    view = await load_plan(redis)
    assert view is not None and view.epoch == 2
    assert any(f["cut"] == 1 and f["rate_rps"] > 2.0 for f in planner.current["workload"])  # baseline moved


# ------------------------------------------------------------------------ devices of live worker agents

async def beat(redis, name: str, devices: list[str], **extra) -> None:
    """A worker agent's registry entry, as services/worker/agent.py publishes it."""
    await Registry(redis, keys.WORKER_KIND, 60.0).beat(name, {"devices": devices, "epoch": None, **extra})


async def gone(redis, name: str) -> None:
    await Registry(redis, keys.WORKER_KIND, 60.0).leave(name)


async def wait_plan(redis, pred, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        view = await load_plan(redis)
        if view is not None and pred(view.raw):
            return view.raw
        assert time.monotonic() < deadline, f"timed out waiting for {what}; plan is {view.raw if view else None}"
        await asyncio.sleep(0.02)


def devices_of(plan: dict) -> list[str]:
    return [p["device"] for p in plan["placement"]]


def unplaced_gauge() -> float | None:
    from common.metrics import REGISTRY
    return REGISTRY.get_sample_value("graft_plan_unplaced_replicas")


async def gauge_reaches(n: float) -> None:
    """The gauge is set just after the plan is stored: a reader of the plan may look in between."""
    await until(lambda: unplaced_gauge() == n, 5.0, f"graft_plan_unplaced_replicas == {n} (is {unplaced_gauge()})")


async def test_planner_places_on_live_worker_devices_and_follows_them(redis, tmp_path) -> None:
    from common.planning import verify_plan
    from common.planning.types import workload_from_dict
    from services.planner.devices import LiveDevices

    prof = tiny_profile()
    # replan_s is long: every re-plan below happens at once, through a command or a device change.
    settings = Settings(models=("m",), replan_s=60.0, drift=0.5, block_ms=20)
    await beat(redis, "w0", ["gpu0"])
    await redis.hset(keys.registry(keys.WORKER_KIND), "junk", b"garbage")  # ignored, not fatal
    await redis.zadd(keys.registry_seen(keys.WORKER_KIND), {"junk": 10**13})
    await Registry(redis, keys.PLANNER_KIND, 60.0).beat("other", {"devices": ["gpu9"]})  # not a worker
    planner = Planner(settings, redis, prof, "p")
    planner.device_poll_s, planner.devices = 0.05, LiveDevices(grace_s=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(planner.run(stop, "planner-test"))
    try:
        first = await wait_plan(redis, lambda p: p["epoch"] == 1, "the bootstrap plan")
        assert devices_of(first) == ["gpu0"] and first["unplaced"] == []
        # Six replicas of share 50 need three GPUs; only gpu0 exists: the rest is reported, not hidden.
        await redis.xadd(keys.CONTROL, {keys.FIELD: wire.encode_message(
            "control", {"cmd": "scale", "group": first["groups"][0]["id"], "replicas": 6})})
        plan = await wait_plan(redis, lambda p: p["epoch"] == 2, "the scaled plan")
        assert devices_of(plan) == ["gpu0", "gpu1", "gpu2"]
        assert plan["unplaced"] == [{"device": "gpu1", "replicas": 2}, {"device": "gpu2", "replicas": 2}]
        await gauge_reaches(4)
        assert verify_plan(prof, workload_from_dict({"fragments": plan["workload"]}), plan) == []

        # An agent hosting exactly a missing device: it serves it as named, same epoch, smaller report.
        await beat(redis, "w1", ["gpu2"])
        plan = await wait_plan(redis, lambda p: len(p["unplaced"]) == 1, "the report to shrink")
        assert plan["epoch"] == 2 and plan["unplaced"] == [{"device": "gpu1", "replicas": 2}]
        await gauge_reaches(2)

        # An agent with other devices: re-plan at once (no minimum epoch length), everything placed.
        await beat(redis, "w2", ["gpu5", "gpu7"])
        plan = await wait_plan(redis, lambda p: p["epoch"] == 3, "a re-plan onto the new agent")
        assert devices_of(plan) == ["gpu0", "gpu2", "gpu5"] and plan["unplaced"] == []
        await gauge_reaches(0)

        # gpu0's agent dies: after the grace its replicas move to the spare gpu7.
        gone_at = time.monotonic()
        await gone(redis, "w0")
        plan = await wait_plan(redis, lambda p: p["epoch"] == 4, "replicas to leave the dead gpu0")
        assert time.monotonic() - gone_at >= 0.5  # not before the grace
        assert sorted(devices_of(plan)) == ["gpu2", "gpu5", "gpu7"] and plan["unplaced"] == []
        assert verify_plan(prof, workload_from_dict({"fragments": plan["workload"]}), plan) == []

        # The second agent dies too: nowhere to move, so the epoch stays and the shortfall is reported.
        await gone(redis, "w2")
        plan = await wait_plan(redis, lambda p: p["unplaced"], "the shortfall report")
        assert plan["epoch"] == 4 and sorted(devices_of(plan)) == ["gpu2", "gpu5", "gpu7"]
        assert sorted(u["device"] for u in plan["unplaced"]) == ["gpu5", "gpu7"]
        await gauge_reaches(4)
        assert planner.current is not None and planner.current["unplaced"] == plan["unplaced"]

        # Draining the one live device leaves nothing to place on; the drained one gets no replica.
        await redis.xadd(keys.CONTROL, {keys.FIELD: wire.encode_message("control", {"cmd": "drain", "device": "gpu2"})})
        plan = await wait_plan(redis, lambda p: p["epoch"] == 5, "the drain")
        assert "gpu2" not in devices_of(plan) and sum(u["replicas"] for u in plan["unplaced"]) == 6
        history = [wire.decode_plan(f[keys.FIELD])["epoch"] for _, f in await redis.xrange(keys.PLANS)]
        assert history == [1, 2, 3, 4, 5]  # report-only updates never entered the history
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_planner_follows_a_whole_cpu_agent_without_churn(redis) -> None:
    from services.planner.devices import LiveDevices

    prof = cpu_test_profile()
    planner = Planner(Settings(models=("m",), replan_s=60.0, block_ms=20), redis, prof, "cpu")
    planner.devices = LiveDevices(grace_s=0.0, misses=1)
    await beat(redis, "host", ["cpu0"])  # a whole-CPU agent before it adopted the plan's other cpus
    await planner.bootstrap()
    gid = planner.current["groups"][0]["id"]
    planner.on_control(wire.encode_message("control", {"cmd": "scale", "group": gid, "replicas": 4}))
    await planner.maybe_replan(force="scale")
    plan = planner.current
    n_dev = len(plan["placement"])
    assert n_dev >= 2 and devices_of(plan) == [f"cpu{i}" for i in range(n_dev)]
    assert [u["device"] for u in plan["unplaced"]] == [f"cpu{i}" for i in range(1, n_dev)]
    epoch = plan["epoch"]
    # The agent adopts every cpuN of the plan and says so in its next heartbeat: same epoch, no shortfall.
    await beat(redis, "host", [f"cpu{i}" for i in range(n_dev)])
    await planner.poll_devices(force=True)
    assert await planner.follow_devices() is False
    stored = (await load_plan(redis)).raw
    assert stored["epoch"] == epoch and stored["unplaced"] == [] and planner.current["unplaced"] == []
    # An agent that reports its whole-CPU mode covers any cpu name, even after the others vanish.
    await beat(redis, "host", ["cpu0"], all_cpu_devices=True)
    await planner.poll_devices(force=True)
    assert await planner.follow_devices() is False
    assert (await load_plan(redis)).raw["unplaced"] == [] and planner.devices.all_cpu


async def test_annotate_plan_only_touches_the_current_epoch(redis) -> None:
    from common.store.plan_store import annotate_plan, publish_plan

    assert await annotate_plan(redis, 1, {"unplaced": []}) is False  # no plan yet
    prof = tiny_profile()
    wl = build_workload({}, {"m": 4}, bootstrap_rps=1.0, default_budget_ms=200)
    plan = next_plan(prof, wl, epoch=1, rho=0.9, steering=Steering(), profile_name="t", live=set())
    assert plan["unplaced"] == [{"device": "gpu0", "replicas": 1}]
    await publish_plan(redis, plan)
    assert await annotate_plan(redis, 2, {"unplaced": []}) is False
    assert (await load_plan(redis)).raw["unplaced"] == plan["unplaced"]
    assert await annotate_plan(redis, 1, {"unplaced": []}) is True
    view = await load_plan(redis)
    assert view.epoch == 1 and view.raw["unplaced"] == [] and view.raw["groups"] == plan["groups"]
    assert await redis.xlen(keys.PLANS) == 1


async def test_planner_places_on_the_gpus_of_two_hosts(redis) -> None:
    from common.planning import verify_plan
    from common.planning.types import workload_from_dict
    from services.planner.devices import LiveDevices

    prof = tiny_profile()
    planner = Planner(Settings(models=("m",), replan_s=60.0, block_ms=20), redis, prof, "p")
    planner.devices = LiveDevices(grace_s=0.0, misses=1)
    # Two GPU hosts, each agent with its own GRAFT_NODE: both have a GPU 0, under different names.
    await beat(redis, "host-a-gpu0", ["a/gpu0"], node="a", all_cpu_devices=False)
    await beat(redis, "host-b-gpu0", ["b/gpu0"], node="b", all_cpu_devices=False)
    await planner.bootstrap()
    assert planner.current is not None and devices_of(planner.current) == ["a/gpu0"]
    assert planner.current["unplaced"] == []
    # Four replicas of share 50 need two GPUs: one on each host, nothing unplaced.
    gid = planner.current["groups"][0]["id"]
    planner.on_control(wire.encode_message("control", {"cmd": "scale", "group": gid, "replicas": 4}))
    await planner.maybe_replan(force="scale")
    plan = (await load_plan(redis)).raw
    assert plan["epoch"] == 2 and devices_of(plan) == ["a/gpu0", "b/gpu0"] and plan["unplaced"] == []
    assert [len(p["replicas"]) for p in plan["placement"]] == [2, 2]
    assert unplaced_gauge() == 0
    assert verify_plan(prof, workload_from_dict({"fragments": plan["workload"]}), plan) == []
    # Nothing changes while both beat; when host b goes, its replicas are reported under b/gpu0 ...
    await planner.poll_devices(force=True)
    assert await planner.follow_devices() is False
    await gone(redis, "host-b-gpu0")
    await planner.poll_devices(force=True)
    assert await planner.follow_devices() is False  # nowhere to move: same epoch, a shortfall report
    assert planner.current["unplaced"] == [{"device": "b/gpu0", "replicas": 2}] and unplaced_gauge() == 2
    # ... until a third host comes up: they move there at once.
    await beat(redis, "host-c-gpu0", ["c/gpu0"], node="c")
    await planner.poll_devices(force=True)
    assert await planner.follow_devices() is True
    plan = (await load_plan(redis)).raw
    assert plan["epoch"] == 3 and devices_of(plan) == ["a/gpu0", "c/gpu0"] and plan["unplaced"] == []
    # drain takes a qualified name
    planner.on_control(wire.encode_message("control", {"cmd": "drain", "device": "a/gpu0"}))
    await planner.maybe_replan(force="drain")
    plan = (await load_plan(redis)).raw
    assert "a/gpu0" not in devices_of(plan) and "c/gpu0" in devices_of(plan)


async def test_planner_gives_whole_cpu_agents_the_cpu_devices_of_their_nodes(redis) -> None:
    from services.planner.devices import LiveDevices

    prof = cpu_test_profile()
    planner = Planner(Settings(models=("m",), replan_s=60.0, block_ms=20), redis, prof, "cpu")
    planner.devices = LiveDevices(grace_s=0.0, misses=1)
    await beat(redis, "ha", ["a/cpu0"], node="a", all_cpu_devices=True)
    await beat(redis, "hb", ["b/cpu0"], node="b", all_cpu_devices=True)
    await planner.bootstrap()
    assert planner.devices.all_cpu_nodes == {"a", "b"}
    gid = planner.current["groups"][0]["id"]
    planner.on_control(wire.encode_message("control", {"cmd": "scale", "group": gid, "replicas": 6}))
    await planner.maybe_replan(force="scale")
    plan = planner.current
    n_dev = len(plan["placement"])
    assert n_dev >= 3 and plan["unplaced"] == []
    assert devices_of(plan) == [f"{'ab'[i % 2]}/cpu{i // 2}" for i in range(n_dev)]  # the hosts in turn
