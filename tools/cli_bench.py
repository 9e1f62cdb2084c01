"""``graft bench plan`` (planner suite on the estimated GPU profile), ``graft bench runtime`` (the live
services on this host) and ``graft bench gateway`` (the OIP front door's cost): each prints a table and
writes JSON (and PNG plots)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Benchmarks: plan (planner suite), runtime (live services), gateway (the OIP front door), "
                        "faults (the fault suite).", no_args_is_help=True)
    from tools.bench_e2e import register_bench as register_e2e
    from tools.bench_faults import register_bench as register_faults
    from tools.bench_gateway import register_bench as register_gateway
    from tools.bench_plan import register_bench as register_plan
    from tools.bench_runtime import register_bench as register_runtime

    register_plan(bench)
    register_runtime(bench)
    register_e2e(bench)
    register_gateway(bench)
    register_faults(bench)
    app.add_typer(bench, name="bench")
