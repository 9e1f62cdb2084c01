"""What the admin CLI asks of a live Graft: status, plans, dead letters, and commands to the planner.

Plain async functions over a Redis client returning plain data; ``tools/cli_admin.py`` renders them.
The client may be a Redis Cluster's (``GRAFT_REDIS_MODE=cluster``): statuses come from the registry
(one key per kind, no scan), and dead letters are found by ``SCAN``, which a cluster client runs on
every primary (each dead-letter stream sits on its own stream's slot, so they spread over masters).
"""

from __future__ import annotations

from typing import Any

from common.contract import keys, wire
from common.contract.routing import PlanView
from common.store.connection import Client
from common.store.plan_store import load_plan, plan_history
from common.store.registry import Registry

CONTROL_MAXLEN = 1000


# How long an instance of each kind stays "alive" after its last heartbeat.
TTL_S = {keys.INGRESS_KIND: 5.0, keys.PLANNER_KIND: 5.0, keys.WORKER_KIND: 5.0, keys.REPLICA_KIND: 2.0,
         keys.GATEWAY_KIND: 5.0}


async def services_status(r: Client) -> list[dict[str, Any]]:
    """Every live instance in the registry: service, name, age in seconds, its status and other fields."""
    rows: list[dict[str, Any]] = []
    for kind, ttl in TTL_S.items():
        for name, body in (await Registry(r, kind, ttl).live()).items():
            info = {k: v for k, v in body.items() if k not in ("v", "kind", "name", "seen_ms_ago")}
            # Replicas report a "state", the planner a "status", ingress and agents neither: a fresh
            # heartbeat alone means "up".
            status = info.get("status") or info.get("state") or "up"
            rows.append({**info, "service": kind, "name": name, "age_s": round(body["seen_ms_ago"] / 1000.0, 2),
                         "status": status})
    rows.sort(key=lambda row: (str(row["service"]), str(row["name"])))
    return rows


async def known_devices(r: Client) -> set[str]:
    """Device names the current plan places replicas on or a fresh worker heartbeat reports hosting."""
    view = await load_plan(r)
    known = set(view.devices()) if view is not None else set()
    for row in await services_status(r):
        if row["service"] == "worker" and isinstance(row.get("devices"), list):
            known.update(d for d in row["devices"] if isinstance(d, str))
    return known


async def group_backlogs(r: Client, view: PlanView) -> list[dict[str, Any]]:
    """Per group of the plan: stream length, lag and pending of the worker consumer group."""
    out: list[dict[str, Any]] = []
    for gid, stream in view.streams().items():
        row: dict[str, Any] = {"group": gid, "stream": stream, "length": await r.xlen(stream),
                               "lag": None, "pending": None, "consumers": 0}
        try:
            groups: list[dict[Any, Any]] = list(await r.xinfo_groups(stream) or [])
            for g in groups:
                name = g.get("name") or g.get(b"name")
                if name in (keys.WORKER_GROUP, keys.WORKER_GROUP.encode()):
                    row.update(lag=g.get("lag"), pending=g.get("pending"), consumers=g.get("consumers"))
        except Exception:  # no such stream yet: nothing routed to it
            pass
        out.append(row)
    return out


async def dead_letters(r: Client, count: int = 20) -> list[dict[str, Any]]:
    """The newest dead letters of every stream (on a cluster: of every primary)."""
    rows: list[dict[str, Any]] = []
    async for key in r.scan_iter(match=keys.dead_letters("*"), count=500):
        for entry_id, fields in list(await r.xrevrange(key, count=count) or []):
            decoded = {(k.decode() if isinstance(k, bytes) else k): (v.decode(errors="replace") if isinstance(v, bytes)
                       and k not in (keys.FIELD,) else v) for k, v in (fields or {}).items()}
            decoded.pop("m", None)
            rows.append({"stream": key.decode() if isinstance(key, bytes) else key,
                         "id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id, **decoded})
    return rows


async def purge_dead_letters(r: Client) -> int:
    n = 0
    async for key in r.scan_iter(match=keys.dead_letters("*"), count=500):
        n += await r.xlen(key)
        await r.delete(key)
    return n


async def send_control(r: Client, cmd: str, **args: Any) -> str:
    """Queue a command for the planner (``replan``, ``scale``, ``drain``, ``undrain``)."""
    entry_id = await r.xadd(keys.CONTROL, {keys.FIELD: wire.encode_message("control", {"cmd": cmd, **args})},
                            maxlen=CONTROL_MAXLEN, approximate=True)
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def current_plan(r: Client) -> PlanView | None:
    return await load_plan(r)


async def recent_plans(r: Client, count: int = 2) -> list[dict[str, Any]]:
    return await plan_history(r, count)


def diff_plans(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Groups added, removed and changed between two plans (matched by model and cuts)."""
    def index(plan: dict[str, Any]) -> dict[tuple[str, tuple[int, ...]], dict[str, Any]]:
        return {(g["model"], tuple(g["cuts"])): g for g in plan.get("groups", [])}

    a, b = index(old), index(new)
    changed = []
    for key in sorted(set(a) & set(b)):
        ga, gb = a[key], b[key]
        delta = {f: (ga.get(f), gb.get(f)) for f in ("batch", "share", "replicas") if ga.get(f) != gb.get(f)}
        if delta:
            changed.append({"model": key[0], "cuts": list(key[1]), **{f: f"{x} → {y}" for f, (x, y) in delta.items()}})
    return {
        "epochs": (old.get("epoch"), new.get("epoch")),
        "added": [{"model": k[0], "cuts": list(k[1])} for k in sorted(set(b) - set(a))],
        "removed": [{"model": k[0], "cuts": list(k[1])} for k in sorted(set(a) - set(b))],
        "changed": changed,
        "total_share": (old.get("total_share"), new.get("total_share")),
        "gpus": (old.get("gpus"), new.get("gpus")),
    }
