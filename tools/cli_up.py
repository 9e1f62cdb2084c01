"""``graft up [--demo]``: run Graft locally (embedded Redis when REDIS_URL is unset)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from common import logs
from common.contract import keys
from common.profiles import Profile
from common.settings import Settings
from common.store.connection import connect
from common.store.plan_store import load_plan
from common.store.registry import Registry
from tools.cli_admin import plan_table
from tools.console import make_console
from tools.demo import demo_table, saving
from tools.loadgen import emulate_devices, run_load
from tools.up import ensure_profile, start_system, wait_for_signal, wait_ready

console = make_console()
DEMO_MODELS = ("resnet18", "mobilenet_v2")
DEMO_RESOLUTION = 64


def summary_table(s: dict[str, Any]) -> Table:
    t = Table(title="demo summary")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("requests sent", s["requests"]), ("replied ok", s["ok"]),
        ("outcomes", ", ".join(f"{k}={v}" for k, v in s["outcomes"].items())),
        ("SLO attainment", f"{100 * s['slo_attainment']:.1f}%"),
        ("server time p50 / p99 (ms)", f"{s['server_ms_p50']:.1f} / {s['server_ms_p99']:.1f}"),
        ("client latency p50 / p99 (ms)", f"{s['latency_ms_p50']:.1f} / {s['latency_ms_p99']:.1f}"),
        ("mean batch size", f"{s['mean_batch']:.2f}"),
        ("goodput (req/s in budget)", f"{s['goodput_rps']:.1f}"),
        ("emulated devices", f"{s['devices']} (+{s['unplaced_devices']} with no feasible cut)"),
        ("plan epochs seen", ", ".join(map(str, s["epochs"]))),
        ("device cuts", ", ".join(f"{k}×{v}" for k, v in s["cuts"].items())),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


async def _up(settings: Settings, demo: bool, duration: float, devices: int, rate: float, slo: list[float],
              trace: str | None, json_out: Path | None, reprofile: bool = False, warmup: float = 12.0,
              ingresses: int = 2) -> int:
    profile_path, measured = ensure_profile(settings, progress=True, refresh=reprofile)
    console.print(f"profile: {profile_path}{' (measured now, cached)' if measured else ''}")
    log_dir = Path(".graft") / "logs" / time.strftime("%Y%m%d-%H%M%S")
    system = await start_system(settings, profile_path, log_dir=log_dir, ingresses=ingresses)
    console.print(f"redis: {system.redis_url}{' (embedded)' if system.redis else ''}; service logs in {log_dir}")
    try:
        with console.status("waiting for plan and replicas…") as st:
            plan = await wait_ready(system, on_wait=lambda msg: st.update(f"waiting: {msg}"))
        console.print(plan_table(plan))
        if not demo:
            r = connect(system.redis_url, settings=settings)
            try:
                gateways = list((await Registry(r, keys.GATEWAY_KIND, 5.0).live()).values())
            finally:
                await r.aclose()
            for g in gateways:
                console.print(f"gateway (Open Inference Protocol v2): http://{g.get('host')}:{g.get('http_port')} · "
                              f"grpc {g.get('host')}:{g.get('grpc_port')}")
            console.print(f"Graft is up. Standard clients (tritonclient, curl) use the gateway; Redis producers XADD "
                          f"to {keys.INGRESS} at {system.redis_url} (see README). Ctrl-C stops everything.")
            await wait_for_signal()
            return 0
        profile = Profile.load(profile_path)
        devs, unplaced = emulate_devices(profile, list(settings.models), devices, slo_ms=slo, rate_rps=rate,
                                         seed=settings.seed, trace_path=trace)
        if not devs:
            console.print("[red]no emulated device found a feasible cut; raise --slo-ms[/red]")
            return 1
        with console.status(f"warming up: {warmup:.0f} s of the same traffic, so the planner re-plans from it…"):
            await run_load(system.redis_url, devs, duration_s=warmup, resolution=settings.resolution or None,
                           seed=settings.seed + 1)
        with Progress(TextColumn("demo load"), BarColumn(), TextColumn("{task.completed} replies"),
                      TimeRemainingColumn(), console=console) as prog:
            task = prog.add_task("load", total=None)
            t0 = time.monotonic()

            def tick(_o: object) -> None:
                prog.update(task, advance=1, description=f"{time.monotonic() - t0:.0f}s")

            report = await run_load(system.redis_url, devs, duration_s=duration,
                                    resolution=settings.resolution or None, seed=settings.seed, on_outcome=tick)
        report.unplaced = unplaced
        s = report.summary()
        r = connect(system.redis_url, settings=settings)
        try:
            view = await load_plan(r)
        finally:
            await r.aclose()
        live = view.raw if view is not None else plan
        saved = saving(profile, live)
        s["saving"] = saved
        console.print(plan_table(live))
        console.print(demo_table(s, saved, duration_s=duration, models=", ".join(settings.models)))
        if json_out is not None:
            await asyncio.to_thread(json_out.write_text, json.dumps(s, indent=1))
        return 0 if s["ok"] > 0 else 1
    finally:
        with console.status("stopping services…"):
            await system.stop()
        for name, child in system.supervisor.status().items():
            if child["restarts"]:
                console.print(f"[yellow]{name} was restarted {child['restarts']} time(s); see {log_dir}[/yellow]")


def up(
    demo: Annotated[bool, typer.Option("--demo", help="run a short built-in load and print a summary")] = False,
    profile: Annotated[Path | None, typer.Option(help="profile JSON (default: measured on first start)")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated models to serve")] = None,
    resolution: Annotated[int | None, typer.Option(help="input resolution (0: model default)")] = None,
    duration: Annotated[float, typer.Option(help="demo load measured (s), after a warm-up")] = 20.0,
    warmup: Annotated[float, typer.Option(help="demo warm-up (s): the planner re-plans from it")] = 12.0,
    devices: Annotated[int, typer.Option(help="emulated devices in the demo")] = 24,
    rate: Annotated[float, typer.Option(help="requests/s per emulated device")] = 5.0,
    slo_ms: Annotated[str, typer.Option(help="comma-separated SLOs the devices draw from (ms)")] = "250,400",
    trace: Annotated[str | None, typer.Option(help="mahimahi uplink trace for the devices (default: synthetic)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="write the demo summary as JSON")] = None,
    reprofile: Annotated[bool, typer.Option("--reprofile", help="measure this host's profile again, replacing the cached one")] = False,
    ingresses: Annotated[int, typer.Option(min=1, help="ingress processes (2: a killed one's requests are taken over at once)")] = 2,
) -> None:
    """Start Redis (embedded if REDIS_URL is unset), planner, ingress and workers; --demo drives a load."""
    logs.configure("console", "warning")
    over: dict[str, Any] = {}
    if profile is not None:
        over["profile"] = str(profile)
    if models:
        over["models"] = tuple(m.strip() for m in models.split(",") if m.strip())
    elif demo:
        over["models"] = DEMO_MODELS
    if resolution is not None:
        over["resolution"] = resolution
    elif demo:
        over["resolution"] = DEMO_RESOLUTION
    if demo and not os.environ.get("GRAFT_REPLAN_S"):
        over["replan_s"] = 4.0  # the demo is short: let the planner follow the traffic within its warm-up
    settings = Settings.from_env(**over)
    if settings.redis_mode == "cluster" and not settings.redis_url:
        console.print("[red]GRAFT_REDIS_MODE=cluster needs REDIS_URL naming a node of the cluster[/red]")
        raise typer.Exit(2)
    slos = [float(x) for x in slo_ms.split(",") if x.strip()]
    code = asyncio.run(_up(settings, demo, duration, devices, rate, slos, trace, json_out, reprofile, warmup, ingresses))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
