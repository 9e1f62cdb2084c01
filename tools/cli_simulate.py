"""``graft simulate``: run a plan against a workload on a profile in virtual time (design.md section 9)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.planning.types import PlanningError, load_plan_dict
from common.profiles import Profile, ProfileError, shipped
from common.simulation import Outcome, SimReport, SimulationError, simulate
from tools.console import make_console


def load_profile(name_or_path: str) -> Profile:
    """A profile file, or the name of a shipped one (``common/data/<name>.json``)."""
    path = Path(name_or_path)
    if not path.exists() and shipped(name_or_path).exists():
        path = shipped(name_or_path)
    return Profile.load(path)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} is not a JSON object")
    return data


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def cut_ranges(cuts: tuple[int, ...]) -> str:
    """``0,1,2,3,7,9,10`` as ``0-3,7,9-10``."""
    runs: list[list[int]] = []
    for c in sorted(cuts):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def report_table(report: SimReport) -> Table:
    s = report.settings
    title = (f"plan epoch {report.plan.get('epoch')} ({report.plan.get('policy')}, total share "
             f"{report.plan.get('total_share')}): {s['duration_s']:g} s of {s['arrivals']} arrivals, "
             f"noise σ={s['noise_sigma']:g}, seed {s['seed']}, first {s['warmup_s']:g} s not counted")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("group", "cuts"):
        table.add_column(col, no_wrap=True)
    for col in ("B g ×n", "requests", "SLO met", "dropped/late", "p50/p95/p99 ms", "mean B", "util", "goodput/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for g in report.groups:
        table.add_row(g.id, cut_ranges(g.cuts), f"{g.batch} {g.share} ×{g.replicas}", *_outcome_cells(g.outcome))
    table.add_section()
    table.add_row("overall", "", f"×{sum(g.replicas for g in report.groups)}", *_outcome_cells(report.overall),
                  style="bold")
    return table


def _outcome_cells(o: Outcome) -> list[str]:
    lat = "/".join(_ms(x) for x in (o.p50_ms, o.p95_ms, o.p99_ms))
    return [str(o.requests), _pct(o.slo_attainment), f"{o.dropped}/{o.late}", lat, _num(o.mean_batch),
            _pct(o.utilisation, 1), f"{o.goodput_rps:.0f}"]


def simulate_command(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile file, or a shipped profile's name.")],
    plan: Annotated[Path, typer.Option("--plan", help="Plan file (graft plan's output).")],
    workload: Annotated[Path, typer.Option("--workload", "-w", help="Workload file with the fragments.")],
    duration: Annotated[float, typer.Option("--duration", "-d", min=0.001, help="Virtual seconds of arrivals.")] = 30.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of arrivals and noise.")] = 0,
    noise: Annotated[float, typer.Option("--noise", min=0.0,
                                         help="Sigma of lognormal execution jitter (0: exact profile).")] = 0.0,
    arrivals: Annotated[str, typer.Option("--arrivals", help="poisson, or uniform (periodic).")] = "poisson",
    warmup: Annotated[float, typer.Option("--warmup", min=0.0, help="Seconds not counted at the start.")] = 1.0,
    margin_ms: Annotated[float, typer.Option("--margin-ms", min=0.0,
                                             help="Batching safety margin on the head's slack.")] = 0.0,
    eager: Annotated[bool, typer.Option("--eager", help="Idle replicas launch at once (work-conserving).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Simulate a plan under a workload: SLO attainment, latency percentiles, batches and utilisation."""
    try:
        prof = load_profile(profile)
    except ProfileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from None
    try:
        plan_d = load_plan_dict(plan)
    except PlanningError as exc:
        raise typer.BadParameter(str(exc), param_hint="--plan") from None
    work_d = _load_json(workload)
    err = make_console(stderr=True)
    started = time.perf_counter()
    with Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("simulate", total=1.0)
        try:
            report = simulate(prof, plan_d, work_d, duration_s=duration, seed=seed, arrivals=arrivals,
                              noise_sigma=noise, warmup_s=min(warmup, duration / 2), margin_ms=margin_ms,
                              eager=eager, progress=lambda f: bar.update(task, completed=f))
        except (SimulationError, ProfileError) as exc:
            err.print(f"[red]cannot simulate[/]: {exc}")
            raise typer.Exit(2) from None
    wall = time.perf_counter() - started
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    out = make_console()
    out.print(report_table(report))
    for u in report.unserved:
        out.print(f"[yellow]{u.kind}[/] {u.fragment.id} ({u.fragment.model} cut {u.fragment.cut}, "
                  f"{u.fragment.rate_rps:g} rps): {u.reason}")
    offered = sum(g.offered_rps for g in report.groups)
    out.print(f"{report.overall.requests} requests counted, {offered:g} req/s offered to {len(report.groups)} "
              f"groups, {report.unserved_rps:g} req/s unserved; simulated in {wall:.2f} s")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_command)
