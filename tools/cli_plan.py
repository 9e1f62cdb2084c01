"""``graft plan``: plan a workload on a profile; ``graft plan verify``: check any plan against section 4.

    graft plan --profile v100-estimated --workload w.json --policy graft [--rho 0.9] [--json] [--out plan.json]
    graft plan verify --profile v100-estimated --workload w.json --plan plan.json

``--profile`` takes a profile file or the name of a shipped profile (``common/data/<name>.json``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from common.planning import POLICIES, Plan, PlanningError, load_plan_dict, load_workload, plan, verify_plan
from common.profiles import Profile, ProfileError, shipped
from tools.console import make_console

plan_app = typer.Typer(help="Plan a workload (groups, (B, g, n), placement), or verify a plan.",
                       invoke_without_command=True, no_args_is_help=False)


def load_profile(ref: str) -> tuple[Profile, str]:
    """A profile from a path, else from the shipped profiles by name; with the name a plan records."""
    path = Path(ref)
    if not path.exists():
        path = shipped(ref)
        if not path.exists():
            raise typer.BadParameter(f"{ref!r} is neither a profile file nor a shipped profile",
                                     param_hint="--profile")
    try:
        return Profile.load(path), path.stem
    except ProfileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile") from None


def plan_table(p: Plan) -> Table:
    table = Table(title=f"plan epoch {p.epoch} · policy {p.policy} · profile {p.profile} · ρ = {p.rho:g}")
    for col in ("group", "cuts", "frags", "rate/s", "min T ms", "B", "g %", "n", "L ms", "cost"):
        table.add_column(col, justify="left" if col in ("group", "cuts") else "right")
    for g in p.groups:
        cuts = ",".join(map(str, g.cuts))
        table.add_row(g.id, cuts if len(cuts) <= 24 else cuts[:21] + "…", str(len(g.fragments)),
                      f"{g.rate_rps:.1f}", f"{g.min_budget_ms:.1f}", str(g.batch), str(g.share),
                      str(g.replicas), f"{g.latency_ms:.2f}", str(g.cost))
    return table


@plan_app.callback()
def plan_command(
    ctx: typer.Context,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="Profile file or shipped name.")] = None,
    workload: Annotated[Path | None, typer.Option("--workload", "-w", help="Workload JSON file.")] = None,
    policy: Annotated[str, typer.Option(help=f"One of {', '.join(POLICIES)}.")] = "graft",
    rho: Annotated[float, typer.Option(min=0.01, max=1.0, help="Utilisation cap ρ.")] = 0.9,
    epoch: Annotated[int, typer.Option(min=0, help="Epoch number the plan carries.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the plan file here.")] = None,
) -> None:
    """Plan WORKLOAD on PROFILE with POLICY and print the groups and the total share."""
    if ctx.invoked_subcommand is not None:
        return
    if profile is None or workload is None:
        raise typer.BadParameter("--profile and --workload are required", param_hint="--profile/--workload")
    if policy not in POLICIES:
        raise typer.BadParameter(f"choose one of {', '.join(POLICIES)}", param_hint="--policy")
    prof, name = load_profile(profile)
    console = make_console()
    try:
        fragments = load_workload(workload)
        started = time.perf_counter()
        result = plan(prof, fragments, policy, rho=rho, epoch=epoch, profile_name=name)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    except PlanningError as exc:
        console.print(f"[red]plan failed:[/red] {exc}")
        raise typer.Exit(2) from None
    if out is not None:
        result.save(out)
    if as_json:
        typer.echo(result.to_json())
        return
    console.print(plan_table(result))
    for bad in result.infeasible:
        console.print(f"[yellow]infeasible[/yellow] {bad.id}: {bad.reason}")
    console.print(f"total share {result.total_share} on {result.gpus} GPU(s) · {len(result.groups)} groups · "
                  f"{len(fragments) - len(result.infeasible)}/{len(fragments)} fragments served · "
                  f"planned in {elapsed_ms:.1f} ms" + (f" · written to {out}" if out else ""))


@plan_app.command("verify")
def verify_command(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile file or shipped name.")],
    workload: Annotated[Path, typer.Option("--workload", "-w", help="Workload JSON file.")],
    plan_file: Annotated[Path, typer.Option("--plan", help="Plan JSON file to check.")],
) -> None:
    """Re-check a plan against design.md section 4; exit 1 naming every violated rule."""
    prof, _ = load_profile(profile)
    try:
        fragments = load_workload(workload)
        raw = load_plan_dict(plan_file)
    except PlanningError as exc:
        typer.echo(f"cannot verify: {exc}", err=True)
        raise typer.Exit(2) from None
    scale = raw.get("latency_scale") or {}
    if scale:
        # A live planner calibrated this plan to measured speed: check it against the latencies it used.
        try:
            prof = prof.scaled({str(m): float(f) for m, f in scale.items()})
        except (ProfileError, TypeError, ValueError) as exc:
            typer.echo(f"cannot verify: bad latency_scale {scale!r}: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"profile latencies scaled by the plan's latency_scale {scale}")
    violations = verify_plan(prof, fragments, raw)
    if violations:
        for v in violations:
            typer.echo(f"violation {v}")
        rules = sorted({v.rule for v in violations})
        typer.echo(f"plan INVALID: {len(violations)} violation(s) of rule(s) {', '.join(rules)}")
        raise typer.Exit(1)
    typer.echo(f"plan OK: {len(raw['groups'])} groups, total share {raw.get('total_share')}, "
               f"{raw.get('gpus')} GPU(s), {len(fragments)} fragments covered")


def register(app: typer.Typer) -> None:
    app.add_typer(plan_app, name="plan")
