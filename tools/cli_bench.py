"""``graft bench plan`` (planner suite on the estimated GPU profile) and ``graft bench runtime``
(the live services on this host): each prints a table and writes JSON and PNG plots."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Benchmarks: plan (planner suite) and runtime (live services).", no_args_is_help=True)
    from tools.bench_plan import register_bench as register_plan
    from tools.bench_runtime import register_bench as register_runtime

    register_plan(bench)
    register_runtime(bench)
    app.add_typer(bench, name="bench")
