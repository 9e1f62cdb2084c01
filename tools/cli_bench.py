"""``graft bench plan`` (planner suite on the estimated GPU profile), ``graft bench e2e`` (the live system's
max load at 99% client-measured SLO beside the compute limit), ``graft bench gateway`` (the OIP front
door's cost) and ``graft bench faults`` (the fault suite): each prints tables and writes JSON (and PNGs)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Benchmarks: plan (planner suite), e2e (the live system against the compute limit), "
                        "gateway (the OIP front door), faults (the fault suite).", no_args_is_help=True)
    from tools.bench_e2e import register_bench as register_e2e
    from tools.bench_faults import register_bench as register_faults
    from tools.bench_gateway import register_bench as register_gateway
    from tools.bench_plan import register_bench as register_plan

    register_plan(bench)
    register_e2e(bench)
    register_gateway(bench)
    register_faults(bench)
    app.add_typer(bench, name="bench")
