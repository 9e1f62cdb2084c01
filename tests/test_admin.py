"""The admin commands (``graft status / scale / drain / undrain / replan / dead-letters / plan show|diff``)
against the private Redis: seeded with real plans, heartbeats and dead letters, driven through typer."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from common.contract import keys, wire
from common.contract.errors import BadCut, Overloaded
from common.store.plan_store import publish_plan
from common.store.registry import Registry
from common.store.streams import dead_letter, ensure_group
from services.planner.replanning import Steering
from tools import admin
from tools.cli import app
from tools.redis_server import free_port

runner = CliRunner()


def group(gid: str, cuts: list[int], *, batch: int = 4, share: int = 30, replicas: int = 1,
          model: str = "resnet18") -> dict[str, Any]:
    return {"id": gid, "model": model, "fragments": [[model, c] for c in cuts], "cuts": cuts, "batch": batch,
            "share": share, "replicas": replicas, "latency_ms": 12.5, "rate_rps": 40.0, "min_budget_ms": 80.0}


def plan(epoch: int, groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epoch": epoch, "policy": "graft", "profile": "test", "rho": 0.9, "groups": groups, "infeasible": [],
            "placement": [{"device": "gpu0", "replicas": [{"group": g["id"], "share": g["share"]}
                                                          for g in groups for _ in range(g["replicas"])]}],
            "total_share": sum(g["share"] * g["replicas"] for g in groups), "gpus": 1, "routes": {}}


PLAN1 = plan(1, [group("g0", [0, 1, 2]), group("g1", [5]), group("g2", [7], model="mobilenet_v2")])
# g0: batch 4 → 8 and 1 → 2 replicas; g1 (resnet18 [5]) leaves; g3 (resnet18 [6]) arrives; g2 unchanged.
PLAN2 = plan(2, [group("g0", [0, 1, 2], batch=8, replicas=2), group("g2", [7], model="mobilenet_v2"),
                 group("g3", [6], share=20)])


@pytest.fixture
def env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """REDIS_URL for the commands, and a wide terminal so rich tables are not truncated."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("COLUMNS", "250")
    return redis_url


async def cli(*args: str) -> Result:
    """Invoke ``graft ARGS`` (each command runs its own event loop, so it runs in a thread here)."""
    return await asyncio.to_thread(runner.invoke, app, list(args))


async def heartbeat(r: Any, key: tuple[str, str], age_s: float = 0.0, **body: Any) -> None:
    """A registry entry for instance ``key = (kind, name)``, last seen ``age_s`` ago (Redis clock)."""
    kind, name = key
    await Registry(r, kind, 30.0).beat(name, body)
    if age_s:
        secs, micros = await r.time()
        await r.zadd(keys.registry_seen(kind), {name: int(secs) * 1000 + int(micros) // 1000 - int(age_s * 1000)})


async def control_commands(r: Any) -> list[dict[str, Any]]:
    return [wire.decode_message(fields[keys.FIELD], "control") for _id, fields in await r.xrange(keys.CONTROL)]


# ------------------------------------------------------------------------------------------ status


async def test_status_shows_heartbeats_the_plan_and_each_group_backlog(redis: Any, env: str) -> None:
    await publish_plan(redis, PLAN1)
    await heartbeat(redis, ("planner", "p1"), status="running", epoch=1)
    await heartbeat(redis, ("ingress", "ing-a"), age_s=2.0, epoch=1, routed=7)
    await heartbeat(redis, ("replica", "gpu0-g0-0"), state="draining", epoch=1, service="replica")
    await heartbeat(redis, ("replica", "gone"), age_s=30.0, state="serving")  # past the replica TTL: not listed
    await redis.hset(keys.registry("worker"), "w-garbled", b"not msgpack")  # not a registry status: ignored
    await redis.zadd(keys.registry_seen("worker"), {"w-garbled": 10**13})
    # g0's stream: 3 entries, one delivered to a worker and still pending; g1 never got traffic.
    stream = keys.group_stream(1, "g0")
    for i in range(3):
        await redis.xadd(stream, {keys.FIELD: f"req{i}".encode()})
    await ensure_group(redis, stream, keys.WORKER_GROUP)
    await redis.xreadgroup(keys.WORKER_GROUP, "gpu0-g0-0", {stream: ">"}, count=1)

    res = await cli("status", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    services = {(s["service"], s["name"]): s for s in data["services"]}
    assert list(services) == [("ingress", "ing-a"), ("planner", "p1"), ("replica", "gpu0-g0-0")]
    assert services[("planner", "p1")]["status"] == "running"
    assert services[("replica", "gpu0-g0-0")]["status"] == "draining"  # a replica's "state"
    assert services[("ingress", "ing-a")]["status"] == "up" and services[("ingress", "ing-a")]["routed"] == 7
    assert 1.5 < services[("ingress", "ing-a")]["age_s"] < 10
    assert data["plan"]["epoch"] == 1 and [g["id"] for g in data["plan"]["groups"]] == ["g0", "g1", "g2"]
    backlog = {g["group"]: g for g in data["groups"]}
    assert backlog["g0"]["stream"] == stream
    assert (backlog["g0"]["length"], backlog["g0"]["pending"], backlog["g0"]["consumers"]) == (3, 1, 1)
    major = int(str((await redis.info("server"))["redis_version"]).split(".")[0])
    assert backlog["g0"]["lag"] == (2 if major >= 7 else None)  # XINFO GROUPS reports lag since Redis 7
    assert backlog["g1"] == {"group": "g1", "stream": keys.group_stream(1, "g1"), "length": 0, "lag": None,
                             "pending": None, "consumers": 0}

    res = await cli("status")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "plan epoch 1 · policy graft · total share 90 · devices 1" in out
    assert "ing-a" in out and "gpu0-g0-0" in out and "draining" in out and "running" in out
    assert "gone" not in out and "w-garbled" not in out
    lines = [line for line in out.splitlines() if "│ g0 " in line]
    assert any("│ 3 " in line and "│ 1 " in line for line in lines), out  # length 3, pending 1, consumers 1


async def test_status_without_a_plan_says_so(redis: Any, env: str) -> None:
    res = await cli("status")
    assert res.exit_code == 0, res.output
    assert "no plan published yet" in res.output and "group streams" not in res.output
    res = await cli("status", "--json")
    assert json.loads(res.output) == {"services": [], "plan": None, "groups": []}


# ------------------------------------------------------------------------------------------- plans


async def test_plan_show_prints_the_current_plan(redis: Any, env: str) -> None:
    res = await cli("plan", "show")
    assert res.exit_code == 1 and "no plan published yet" in res.output

    await publish_plan(redis, PLAN1)
    await publish_plan(redis, PLAN2)
    res = await cli("plan", "show", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == PLAN2

    res = await cli("plan", "show")
    assert res.exit_code == 0, res.output
    assert "plan epoch 2" in res.output
    g0 = next(line for line in res.output.splitlines() if "│ g0 " in line)
    cells = [c.strip() for c in g0.strip("│ ").split("│")]
    # group, model, cuts, batch, share, replicas, latency ms, rate rps, min budget ms
    assert cells == ["g0", "resnet18", "0,1,2", "8", "30", "2", "12.50", "40.0", "80.0"]
    assert "g1" not in res.output  # epoch 1's group


async def test_plan_diff_reports_added_removed_and_changed_groups(redis: Any, env: str) -> None:
    res = await cli("plan", "diff")
    assert res.exit_code == 1 and "only 0 plan(s)" in res.output
    await publish_plan(redis, PLAN1)
    res = await cli("plan", "diff")
    assert res.exit_code == 1 and "only 1 plan(s)" in res.output

    await publish_plan(redis, PLAN2)
    res = await cli("plan", "diff")
    assert res.exit_code == 0, res.output
    assert "epoch 1 → 2; total share 90 → 110; devices 1 → 1" in res.output
    tables = res.output.split("changed")
    assert "[6]" in tables[0] and "[5]" in tables[0]  # added g3's cuts, removed g1's
    assert "4 → 8" in tables[1] and "1 → 2" in tables[1]

    d = admin.diff_plans(PLAN1, PLAN2)
    assert d["added"] == [{"model": "resnet18", "cuts": [6]}]
    assert d["removed"] == [{"model": "resnet18", "cuts": [5]}]
    assert d["changed"] == [{"model": "resnet18", "cuts": [0, 1, 2], "batch": "4 → 8", "replicas": "1 → 2"}]
    assert d["epochs"] == (1, 2) and d["total_share"] == (90, 110)


# ---------------------------------------------------------------------------------------- commands


async def test_control_commands_reach_the_planner_in_its_format(redis: Any, env: str) -> None:
    await publish_plan(redis, PLAN1)
    for args, said in ((["replan"], "replan request queued"), (["drain", "gpu1"], "drain request queued"),
                       (["undrain", "gpu1"], "undrain request queued"), (["drain", "gpu2"], "drain request queued"),
                       (["scale", "g0", "3"], "scale request queued")):
        res = await cli(*args)
        assert res.exit_code == 0, res.output
        assert said in res.output

    cmds = await control_commands(redis)
    assert [{k: v for k, v in c.items() if k not in ("v", "kind")} for c in cmds] == [
        {"cmd": "replan"}, {"cmd": "drain", "device": "gpu1"}, {"cmd": "undrain", "device": "gpu1"},
        {"cmd": "drain", "device": "gpu2"}, {"cmd": "scale", "group": "g0", "replicas": 3}]
    # The planner's own parser accepts every one of them, with the intended effect.
    steering = Steering()
    applied = [steering.apply(c, PLAN1) for c in cmds]
    assert applied == ["replan", "drain gpu1", "undrain gpu1", "drain gpu2", "scale g0 to 3"]
    assert steering.drained == {"gpu2"} and steering.pinned == {("resnet18", (0, 1, 2)): 3}
    # Each output names the entry id that landed on the stream.
    entry_ids = [_id.decode() for _id, _f in await redis.xrange(keys.CONTROL)]
    assert entry_ids[-1] in res.output


async def test_scale_refuses_a_group_the_plan_does_not_have(redis: Any, env: str) -> None:
    res = await cli("scale", "g0", "2")
    assert res.exit_code == 1 and "no plan published yet" in res.output
    await publish_plan(redis, PLAN1)
    res = await cli("scale", "g9", "2")
    assert res.exit_code == 1
    assert "no group 'g9' in plan epoch 1" in res.output and "g0, g1, g2" in res.output
    res = await cli("scale", "g0", "0")
    assert res.exit_code == 2  # replicas >= 1
    assert await redis.xlen(keys.CONTROL) == 0


# ------------------------------------------------------------------------------------ dead letters


async def test_dead_letters_lists_and_purges(redis: Any, env: str) -> None:
    res = await cli("dead-letters")
    assert res.exit_code == 0 and "no dead letters" in res.output

    ing = keys.INGRESS
    grp = keys.group_stream(3, "g0")
    for stream, grp_name in ((ing, keys.INGRESS_GROUP), (grp, keys.WORKER_GROUP)):
        await ensure_group(redis, stream, grp_name)
    ids = [await redis.xadd(ing, {keys.FIELD: b"x"}) for _ in range(3)]
    for i, entry_id in enumerate(ids):
        await dead_letter(redis, ing, keys.INGRESS_GROUP, entry_id.decode(), b"payload",
                          BadCut(f"cut {i} out of range"), deliveries=1, consumer="ingress-a")
    gid = await redis.xadd(grp, {keys.FIELD: b"y"})
    await dead_letter(redis, grp, keys.WORKER_GROUP, gid.decode(), None, Overloaded("queue full"), deliveries=4,
                      consumer="gpu0-g0-0")

    rows = await admin.dead_letters(redis, count=2)
    assert sorted((r["stream"], r["code"]) for r in rows) == [(grp, "OVERLOADED"), (ing, "BAD_CUT"), (ing, "BAD_CUT")]
    newest = [r for r in rows if r["stream"] == ing]
    assert [r["message"] for r in newest] == ["cut 2 out of range", "cut 1 out of range"]  # newest first
    assert all("m" not in r for r in rows)  # payloads are not printed

    res = await cli("dead-letters", "--count", "5")
    assert res.exit_code == 0, res.output
    for text in ("cut 0 out of range", "cut 2 out of range", "queue full", "gpu0-g0-0", "BAD_CUT", "OVERLOADED"):
        assert text in res.output
    assert await redis.exists(keys.dead_letters(ing), keys.dead_letters(grp)) == 2  # listing keeps them

    res = await cli("dead-letters", "--count", "1", "--purge")
    assert res.exit_code == 0, res.output
    assert "cut 2 out of range" in res.output and "cut 0 out of range" not in res.output
    assert "purged 4 dead letter(s)" in res.output
    assert await redis.exists(keys.dead_letters(ing), keys.dead_letters(grp)) == 0
    assert await redis.xlen(ing) == 3  # the source streams are untouched
    res = await cli("dead-letters")
    assert "no dead letters" in res.output


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("args", [["status"], ["replan"], ["plan", "show"], ["dead-letters", "--purge"],
                                  ["scale", "g0", "2"]])
def test_unreachable_redis_is_a_clear_error_not_a_traceback(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("COLUMNS", "250")
    started = time.monotonic()
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # typer.Exit, not an uncaught ConnectionError
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in res.output
    assert "s3cret" not in res.output and "Traceback" not in res.output
    assert time.monotonic() - started < 10


def test_missing_or_malformed_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.delenv("REDIS_URL", raising=False)
    res = runner.invoke(app, ["replan"])
    assert res.exit_code == 2 and "no Redis given" in res.output
    res = runner.invoke(app, ["replan", "--redis-url", "localhost:6379"])
    assert res.exit_code == 2 and "bad Redis URL 'localhost:6379'" in res.output
    assert isinstance(res.exception, SystemExit)


async def test_redis_url_option_wins_over_the_environment(redis: Any, redis_url: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    res = await cli("replan", "--redis-url", redis_url)
    assert res.exit_code == 0, res.output
    assert [c["cmd"] for c in await control_commands(redis)] == ["replan"]


async def test_drain_and_status_with_host_qualified_devices(redis: Any, env: str) -> None:
    qualified = {**PLAN1, "placement": [{**PLAN1["placement"][0], "device": "a/gpu0"}]}
    await publish_plan(redis, qualified)
    await heartbeat(redis, ("worker", "h1"), devices=["b/gpu0", "b/gpu1"], node="b")
    await heartbeat(redis, ("replica", "r0"), state="running", device="a/gpu0", epoch=1)
    for device in ("a/gpu0", "b/gpu0"):
        res = await cli("drain", device)
        assert res.exit_code == 0 and "drain request queued" in res.output and "note" not in res.output
    res = await cli("drain", "gpu0")  # a plain name where every device is host-qualified: queued, with a note
    assert res.exit_code == 0 and "drain request queued" in res.output
    assert "note" in res.output and "a/gpu0, b/gpu0, b/gpu1" in res.output and "node/gpuN" in res.output
    cmds = await control_commands(redis)
    assert [c["device"] for c in cmds] == ["a/gpu0", "b/gpu0", "gpu0"]
    res = await cli("status")
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[2].strip(): line for line in res.output.splitlines() if line.count("│") > 3}
    assert "device(s)" in res.output
    assert "b/gpu0, b/gpu1" in rows["h1"] and "a/gpu0" in rows["r0"]  # an agent's devices, a replica's device


async def test_plan_apply_and_release_queue_commands_for_the_planner(redis: Any, env: str, tmp_path: Any) -> None:
    wl = tmp_path / "w.json"
    wl.write_text(json.dumps({"fragments": [{"id": "a", "model": "resnet18", "cut": 2, "rate_rps": 5.0,
                                             "budget_ms": 80.0}]}))
    res = await cli("plan", "apply", "--workload", str(wl), "--policy", "per-cut", "--hold")
    assert res.exit_code == 0 and "1 fragments, policy per-cut, held" in res.output, res.output
    res = await cli("plan", "release")
    assert res.exit_code == 0, res.output
    cmds = await control_commands(redis)
    assert [c["cmd"] for c in cmds] == ["plan", "release"]
    assert cmds[0]["policy"] == "per-cut" and cmds[0]["hold"] is True
    assert cmds[0]["workload"]["fragments"][0]["cut"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"fragments": [{"id": "a"}]}')
    res = await cli("plan", "apply", "--workload", str(bad))
    assert res.exit_code != 0 and len(await control_commands(redis)) == 2  # nothing queued
