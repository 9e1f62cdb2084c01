"""``graft workload``: build a workload file from emulated clients through the partitioner.

    graft workload --profile v100-estimated --clients 200 --models resnet50,vgg16 --slo-ms 100,200 \\
        --trace ../shared/traces/ATT-LTE-driving.up --seed 1 --device-classes low,mid,high --fps 5 --out w.json

Each client draws a model, a device class, an SLO and a frame rate from the lists, and a point on one
of the uplink traces (or a synthetic trace of ``--synthetic-mbps``); ``choose_cut`` turns that into a
fragment (cut, budget). Clients that no cut can serve are reported, not written.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.client.traces import LinkTrace, TraceError
from common.client.workload import clients_to_workload, emulate_clients
from common.planning import save_workload
from tools.cli_plan import load_profile
from tools.console import make_console


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter("expected positive numbers", param_hint=option)
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def workload_command(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile file or shipped name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Workload JSON file to write.")],
    clients: Annotated[int, typer.Option("--clients", "-n", min=1, help="Number of emulated clients.")] = 100,
    models: Annotated[str, typer.Option(help="Comma-separated models (default: every profile model).")] = "",
    slo_ms: Annotated[str, typer.Option("--slo-ms", help="Comma-separated SLOs in ms.")] = "100,200",
    trace: Annotated[list[Path] | None, typer.Option(help="Uplink trace (mahimahi); repeat for several.")] = None,
    synthetic_mbps: Annotated[float | None, typer.Option(help="Use a synthetic uplink of this mean.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the client draw.")] = 0,
    device_classes: Annotated[str, typer.Option(help="Comma-separated device classes.")] = "low,mid,high",
    fps: Annotated[str, typer.Option(help="Frame rate per client; comma-separated to draw from several.")] = "5",
    mode: Annotated[str, typer.Option(help="Partitioner objective: latency or energy.")] = "latency",
) -> None:
    """Emulate clients on uplink traces, let each pick its cut, and write the fragments."""
    if bool(trace) == (synthetic_mbps is not None):
        raise typer.BadParameter("give --trace (one or more) or --synthetic-mbps, not both or neither")
    if mode not in ("latency", "energy"):
        raise typer.BadParameter("latency or energy", param_hint="--mode")
    prof, _ = load_profile(profile)
    try:
        links = ([LinkTrace.from_mahimahi(p) for p in trace] if trace else
                 [LinkTrace.synthetic(float(synthetic_mbps or 0.0), 600.0, seed=seed)])
    except TraceError as exc:
        raise typer.BadParameter(str(exc), param_hint="--trace/--synthetic-mbps") from None
    model_names = _names(models) or sorted(prof.models)
    try:
        emulated = emulate_clients(clients, model_names, _floats(slo_ms, "--slo-ms"), links,
                                   device_classes=_names(device_classes), fps=_floats(fps, "--fps"), seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    result = clients_to_workload(prof, emulated, mode="energy" if mode == "energy" else "latency")
    save_workload(out, result.fragments)

    console = make_console()
    per_cut = Counter((f.model, f.cut) for f in result.fragments)
    table = Table(title=f"{len(result.fragments)} fragments from {clients} clients (seed {seed})")
    for col in ("model", "cut", "clients", "rate/s", "min T ms", "max T ms"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for (model, cut), n in sorted(per_cut.items()):
        frags = [f for f in result.fragments if (f.model, f.cut) == (model, cut)]
        table.add_row(model, str(cut), str(n), f"{sum(f.rate_rps for f in frags):.1f}",
                      f"{min(f.budget_ms for f in frags):.1f}", f"{max(f.budget_ms for f in frags):.1f}")
    console.print(table)
    for r in result.rejected[:10]:
        console.print(f"[yellow]rejected[/yellow] {r.client}: {r.reason}")
    if len(result.rejected) > 10:
        console.print(f"… and {len(result.rejected) - 10} more rejected clients")
    console.print(f"{len(result.fragments)} fragments over {len(per_cut)} (model, cut) pairs, "
                  f"{len(result.rejected)} clients rejected; written to {out}")


def register(app: typer.Typer) -> None:
    app.command("workload")(workload_command)
