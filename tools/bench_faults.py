"""``graft bench faults``: proof, with figures, that every request gets exactly one timely answer.

The fault suite of issue 9. Each scenario starts the system as ``graft up`` does (embedded Redis,
planner, ingress, worker agent with replica processes; resnet18 at 32 px on this host's measured
profile, one thread per CPU device), drives steady open-loop load from its own clients, injects a
fault, and hands every request to a reply accountant that reads the raw reply streams
(``tools/faults/accountant.py``): sent, OK, errors by code, *lost* (no reply within budget + 1 s of the
intended send time, on the Redis clock), *duplicated* (more than one reply entry for one submission),
OK within budget, restarts, and processes left alive after the system stopped.

Scenarios (``--only`` takes their names): ``replica-kill`` and ``replica-kill-n+1`` (≥ 20 SIGKILLs of
serving replicas at 40 req/s, 2 s budgets; warm standby alone, then GRAFT_SPARE_REPLICAS=1),
``agent-kill``, ``agent-kill-switch`` (SIGKILL 1 s after a new plan is published), ``ingress-kill``,
``planner-kill``, ``redis-restart-aof`` (SIGTERM) and ``redis-crash-aof`` (SIGKILL; appendonly yes,
appendfsync everysec), ``malformed`` (≥ 10,000 messages of 43 kinds to graft:ingress and a group
stream), ``overload-5x`` (capacity measured, then 5× it offered; on a 2-core host the front door
runs short of CPU first) and ``overload-2.5x`` (the same at 2.5×, where it keeps up: admission's own
figure), ``mixed-budgets`` (500 ms clients
and a 2 ms client at one cut, through re-plans), ``soak`` (10 min; RSS of every process at start and
end) and ``graft-up-stops`` (SIGINT, SIGTERM, SIGKILL at 0.5 s, at its first child, after ready).
``--quick`` runs shorter versions. ``--cluster`` runs them on a private 3-master Redis Cluster (emptied
before each scenario), without the three that own a single Redis (``redis-restart-aof``,
``redis-crash-aof``, ``graft-up-stops``). Results: a table, ``faults.json`` and ``faults.md`` in
``--out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from common.settings import Settings
from tools.console import make_console
from tools.faults import report
from tools.faults.live import base_settings, one_thread_profile
from tools.faults.scenarios import Ctx, agent_kill, redis_restart, replica_kills, service_kill
from tools.faults.scenarios2 import malformed, mixed_budgets, overload, soak, up_stops

console = make_console()

Scenario = Callable[[Ctx], Awaitable[report.Result]]

SCENARIOS: dict[str, Scenario] = {
    "replica-kill": lambda c: replica_kills(c, 0),
    "replica-kill-n+1": lambda c: replica_kills(c, 1),
    "agent-kill": lambda c: agent_kill(c, False),
    "agent-kill-switch": lambda c: agent_kill(c, True),
    "ingress-kill": lambda c: service_kill(c, "ingress"),
    "ingress-kill-n+1": lambda c: service_kill(c, "ingress", spare=True),
    "planner-kill": lambda c: service_kill(c, "planner"),
    "redis-restart-aof": lambda c: redis_restart(c, False),
    "redis-crash-aof": lambda c: redis_restart(c, True),
    "malformed": malformed,
    "overload-5x": overload,
    "overload-2.5x": lambda c: overload(c, 2.5),
    "mixed-budgets": mixed_budgets,
    "soak": soak,
    "graft-up-stops": up_stops,
}


# Scenarios that own their Redis (restart it, or start graft up with its embedded one): not on a cluster.
SINGLE_REDIS_ONLY = ("redis-restart-aof", "redis-crash-aof", "graft-up-stops")


async def run_suite(out: Path, *, quick: bool, only: list[str] | None = None,
                    cluster: bool = False) -> tuple[list[report.Result], dict[str, Any]]:
    names = only or [n for n in SCENARIOS if not (cluster and n in SINGLE_REDIS_ONLY)]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise typer.BadParameter(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if cluster and (owned := [n for n in names if n in SINGLE_REDIS_ONLY]):
        raise typer.BadParameter(f"{', '.join(owned)} own a single Redis: not with --cluster")
    with contextlib.ExitStack() as stack:
        settings = base_settings()
        if cluster:
            from tools.redis_server import RedisClusterServer

            nodes = stack.enter_context(RedisClusterServer(masters=3))
            settings = settings.with_(redis_mode="cluster", redis_url=nodes.url)
        return await _run(out, quick, names, settings, cluster)


async def _run(out: Path, quick: bool, names: list[str], settings: Settings,
               cluster: bool) -> tuple[list[report.Result], dict[str, Any]]:
    profile = await asyncio.to_thread(one_thread_profile, out, settings)
    ctx = Ctx(quick=quick, out=out, profile=profile, settings=settings.with_(profile=str(profile)), say=console.print)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results: list[report.Result] = []
    for name in names:
        console.print(f"[bold]{name}[/bold] …")
        res = await SCENARIOS[name](ctx)
        res.name = name
        results.append(res)
        console.print(f"  {name}: {'met' if res.met else 'MISSED'} in {res.duration_s:.0f} s "
                      f"(sent {res.verdict.sent}, lost {res.verdict.lost}, duplicated {res.verdict.duplicated})")
        report.write(out, results, {"started": started, "quick": quick})
    meta = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": quick,
            "redis": "cluster (3 masters)" if cluster else "single",
            "command": " ".join(shlex.quote(a) for a in ["graft", *sys.argv[1:]]), "profile": str(profile)}
    report.write(out, results, meta)
    return results, meta


def faults(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("bench-out/faults"),
    quick: Annotated[bool, typer.Option("--quick", help="shorter scenarios (CI-sized figures)")] = False,
    only: Annotated[str | None, typer.Option(help="comma-separated scenario names")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    cluster: Annotated[bool, typer.Option("--cluster", help="on a private 3-master Redis Cluster "
                                          "(without the scenarios that own a single Redis)")] = False,
) -> None:
    """Fault suite: every request gets exactly one timely answer, whatever fails (exit 1 if a target is missed)."""
    from common import logs

    logs.configure("console", "warning")
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    results, meta = asyncio.run(run_suite(out.absolute(), quick=quick, only=names, cluster=cluster))
    if json_out:
        print(json.dumps({**meta, "scenarios": [r.to_dict() for r in results]}, indent=1, default=str))
    else:
        wide = Console(width=max(console.width, 200))  # the table is wide: never squeeze it into wrapped cells
        wide.print(report.table(results, f"fault suite ({'quick' if quick else 'full'}, {meta['redis']} Redis), "
                                         f"{meta['started']}"))
        console.print(f"command: {meta['command']}\nresults in {out}/faults.json and {out}/faults.md")
    raise typer.Exit(0 if all(r.met for r in results) else 1)


def register_bench(bench: typer.Typer) -> None:
    bench.command("faults")(faults)
