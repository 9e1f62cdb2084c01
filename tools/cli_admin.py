"""``graft status | scale | drain | undrain | replan | dead-letters`` and ``graft plan show | diff``:
inspect and steer a live system through its Redis (``--redis-url`` or ``REDIS_URL``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.markup import escape
from rich.table import Table

from common.planning.types import PlanningError, workload_from_dict
from common.settings import Settings, SettingsError
from common.store.connection import Client, connect
from tools import admin
from tools.console import make_console

T = TypeVar("T")
console = make_console()

RedisUrl = Annotated[str | None, typer.Option("--redis-url", envvar="REDIS_URL", help="Redis of the live system")]


def _redact(url: str) -> str:
    """``url`` without its password, for error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


def _with_redis(url: str | None, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn`` on a client of ``url``; a missing, malformed or unreachable Redis is a one-line error."""
    if not url:
        console.print("[red]no Redis given: pass --redis-url or set REDIS_URL[/red]")
        raise typer.Exit(2)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        console.print(f"[red]bad settings: {exc}[/red]")
        raise typer.Exit(2) from None

    async def go() -> T:
        try:
            r = connect(url, settings=settings)
        except ValueError as exc:  # redis-py's verdict on a malformed URL
            console.print(f"[red]bad Redis URL {_redact(url)!r}: {exc}[/red]")
            raise typer.Exit(2) from None
        try:
            return await fn(r)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            console.print(f"[red]cannot reach Redis at {_redact(url)}: {exc}[/red]")
            raise typer.Exit(1) from None
        finally:
            await r.aclose()

    return asyncio.run(go())


def _table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    cols = columns or sorted({k for row in rows for k in row})
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for row in rows:
        t.add_row(*[("" if row.get(c) is None else str(row.get(c))) for c in cols])
    return t


def plan_table(plan: dict[str, Any]) -> Table:
    t = Table(title=f"plan epoch {plan.get('epoch')} · policy {plan.get('policy')} · total share "
                    f"{plan.get('total_share')} · devices {plan.get('gpus')}")
    for c in ("group", "model", "cuts", "batch", "share", "replicas", "latency ms", "rate rps", "min budget ms"):
        t.add_column(c)
    for g in plan.get("groups", []):
        t.add_row(str(g["id"]), str(g["model"]), ",".join(map(str, g["cuts"])), str(g["batch"]), str(g["share"]),
                  str(g["replicas"]), f"{float(g.get('latency_ms', 0)):.2f}", f"{float(g.get('rate_rps', 0)):.1f}",
                  f"{float(g.get('min_budget_ms', 0)):.1f}")
    unplaced = [u for u in plan.get("unplaced") or [] if isinstance(u, dict)]
    if unplaced:  # the planner found no live worker agent for these devices
        t.caption = "unplaced (no live worker agent hosts the device): " + ", ".join(
            f"{u.get('device')} ({u.get('replicas')} replicas)" for u in unplaced)
    return t


def status(redis_url: RedisUrl = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Services (heartbeats), the current plan and the backlog of every group stream."""
    async def go(r: Client) -> dict[str, Any]:
        view = await admin.current_plan(r)
        return {"services": await admin.services_status(r),
                "plan": view.raw if view else None,
                "groups": await admin.group_backlogs(r, view) if view else []}

    data = _with_redis(redis_url, go)
    if as_json:
        typer.echo(json.dumps(data, default=str, indent=1))
        return
    for row in data["services"]:  # a worker agent's devices, a replica's device (node/gpuN on many hosts)
        devices = row.get("devices")
        row["device(s)"] = ", ".join(map(str, devices)) if isinstance(devices, list) else row.get("device")
    console.print(_table("services", data["services"], ["service", "name", "age_s", "status", "epoch", "device(s)"]))
    if data["plan"] is None:
        console.print("no plan published yet")
        return
    console.print(plan_table(data["plan"]))
    console.print(_table("group streams", data["groups"], ["group", "length", "lag", "pending", "consumers"]))


def plan_show(redis_url: RedisUrl = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The plan the live system runs now."""
    view = _with_redis(redis_url, admin.current_plan)
    if view is None:
        console.print("no plan published yet")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(view.raw, indent=1))
    else:
        console.print(plan_table(view.raw))


def plan_diff(redis_url: RedisUrl = None) -> None:
    """What changed between the last two published plans."""
    plans = _with_redis(redis_url, lambda r: admin.recent_plans(r, 2))
    if len(plans) < 2:
        console.print(f"only {len(plans)} plan(s) published so far: nothing to diff")
        raise typer.Exit(1)
    d = admin.diff_plans(plans[1], plans[0])
    console.print(f"epoch {d['epochs'][0]} → {d['epochs'][1]}; total share {d['total_share'][0]} → "
                  f"{d['total_share'][1]}; devices {d['gpus'][0]} → {d['gpus'][1]}")
    for what in ("added", "removed", "changed"):
        if d[what]:
            console.print(_table(what, d[what]))


def scale(group: Annotated[str, typer.Argument(help="group id of the current plan")],
          replicas: Annotated[int, typer.Argument(min=1)], redis_url: RedisUrl = None) -> None:
    """Pin a group's replica count (the planner publishes a new epoch)."""
    async def go(r: Client) -> tuple[str | None, Any]:
        view = await admin.current_plan(r)
        if view is None or group not in view.groups:  # the planner would drop the command as malformed
            return None, view
        return await admin.send_control(r, "scale", group=group, replicas=replicas), view

    entry, view = _with_redis(redis_url, go)
    if view is None:
        console.print("[red]no plan published yet: there is no group to scale[/red]")
        raise typer.Exit(1)
    if entry is None:
        console.print(f"[red]no group {group!r} in plan epoch {view.epoch}; its groups: "
                      f"{', '.join(sorted(view.groups)) or 'none'}[/red]")
        raise typer.Exit(1)
    console.print(f"scale request queued ({entry})")


def drain(device: Annotated[str, typer.Argument(help="a placement device, e.g. gpu1, or node/gpu1 on a host "
                                                     "with GRAFT_NODE")],
          redis_url: RedisUrl = None) -> None:
    """Move every replica off a device (its streams drain before its replicas exit)."""
    async def go(r: Client) -> tuple[str, set[str]]:
        known = await admin.known_devices(r)
        return await admin.send_control(r, "drain", device=device), known

    entry, known = _with_redis(redis_url, go)
    if device not in known:  # still queued: a device may be drained before its agent comes up
        have = f" (they have: {', '.join(sorted(known))})" if known else ""
        console.print(escape(f"note: neither the current plan nor a live worker agent has a device named {device!r}"
                             f"{have}; on hosts with GRAFT_NODE, devices are named node/gpuN"), style="yellow")
    console.print(f"drain request queued ({entry})")


def undrain(device: Annotated[str, typer.Argument()], redis_url: RedisUrl = None) -> None:
    """Give a drained device back to the planner."""
    entry = _with_redis(redis_url, lambda r: admin.send_control(r, "undrain", device=device))
    console.print(f"undrain request queued ({entry})")


def replan(redis_url: RedisUrl = None) -> None:
    """Ask the planner to re-plan now from the traffic it has observed."""
    entry = _with_redis(redis_url, lambda r: admin.send_control(r, "replan"))
    console.print(f"replan request queued ({entry})")


def plan_apply(workload: Annotated[Path, typer.Option("--workload", help="workload JSON (graft workload --out)")],
               policy: Annotated[str | None, typer.Option(help="graft or per-cut (default: the planner's)")] = None,
               hold: Annotated[bool, typer.Option("--hold", help="keep this plan until `graft plan release`")] = False,
               redis_url: RedisUrl = None) -> None:
    """Have the live planner plan this workload (instead of the observed traffic) and publish it."""
    try:
        body = json.loads(workload.read_text())
        workload_from_dict(body)
    except (OSError, json.JSONDecodeError, PlanningError) as exc:
        raise typer.BadParameter(f"{workload}: {exc}") from None
    args: dict[str, Any] = {"workload": {"fragments": body["fragments"]}, "hold": hold}
    if policy is not None:
        args["policy"] = policy
    entry = _with_redis(redis_url, lambda r: admin.send_control(r, "plan", **args))
    console.print(f"plan request queued ({entry}): {len(body['fragments'])} fragments"
                  + (f", policy {policy}" if policy else "") + (", held" if hold else ""))


def plan_release(redis_url: RedisUrl = None) -> None:
    """Let the planner follow the observed traffic again after `graft plan apply --hold`."""
    entry = _with_redis(redis_url, lambda r: admin.send_control(r, "release"))
    console.print(f"release queued ({entry})")


def dead_letters(redis_url: RedisUrl = None, count: Annotated[int, typer.Option()] = 20,
                 purge: Annotated[bool, typer.Option("--purge", help="delete them after listing")] = False) -> None:
    """Entries that could not be processed, with their error."""
    rows = _with_redis(redis_url, lambda r: admin.dead_letters(r, count))
    for row in rows:
        ms = row.pop("time_ms", None)
        row["when"] = time.strftime("%m-%d %H:%M:%S", time.localtime(int(ms) / 1000)) if ms else ""
    columns = ["when", "stream", "id", "code", "message", "deliveries", "consumer"]
    console.print(_table("dead letters (payloads not shown)", rows, columns) if rows else "no dead letters")
    if purge:
        n = _with_redis(redis_url, admin.purge_dead_letters)
        console.print(f"purged {n} dead letter(s)")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("scale")(scale)
    app.command("drain")(drain)
    app.command("undrain")(undrain)
    app.command("replan")(replan)
    app.command("dead-letters")(dead_letters)
    plan_app = next((g.typer_instance for g in app.registered_groups if g.name == "plan"), None)
    if plan_app is None:
        plan_app = typer.Typer(help="Plans: make, verify, show and diff.")
        app.add_typer(plan_app, name="plan")
    plan_app.command("show")(plan_show)
    plan_app.command("diff")(plan_diff)
    plan_app.command("apply")(plan_apply)
    plan_app.command("release")(plan_release)
