"""``graft doctor``: is this host ready to serve, and will plans made from its profile hold?

    graft doctor                 # Python, torch, CPU threads, redis-server, REDIS_URL, whether a GPU exists
    graft doctor --gpu           # + CUDA, driver, MPS daemon, a share limiting throughput, profile vs runtime,
                                 #   cuDNN autotuning, free memory (about a minute; probes run as replicas do)
    graft doctor --gpu --json    # the same rows as JSON

Exit 0 when no row failed (WARN allowed), 1 when one did, 2 when ``--gpu`` finds no usable CUDA (one
line on stderr says why). The checks and their thresholds are in ``tools/doctor``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from tools.console import make_console

STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}


def doctor(
    gpu: Annotated[bool, typer.Option("--gpu", help="Also check CUDA, the MPS daemon, that a share limits "
                                                    "throughput, and profile vs runtime agreement.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON instead of a table.")] = False,
    device: Annotated[int, typer.Option("--device", min=0, help="The GPU to check (its NVML index).")] = 0,
) -> None:
    """Check this host: the environment, and with --gpu whether GPU shares and profiles can be trusted."""
    from tools.doctor.checks import run_doctor

    console = make_console(stderr=True)
    if gpu and not as_json and console.is_terminal:
        with console.status("graft doctor --gpu") as status:
            report = run_doctor(gpu=True, device_index=device, step=lambda msg: status.update(msg))
    else:
        report = run_doctor(gpu=gpu, device_index=device)
    if report.error:
        sys.stderr.write(report.error + "\n")
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=1) + "\n")
    elif not report.error:
        table = Table(title=f"graft doctor{' --gpu' if gpu else ''}")
        for col in ("check", "status", "measured", "what it means / what to do"):
            table.add_column(col, overflow="fold")
        for c in report.checks:
            advice = c.detail if not c.fix else f"{c.detail}\n→ {c.fix}" if c.detail else f"→ {c.fix}"
            table.add_row(c.name, f"[{STYLE[str(c.status)]}]{c.status}[/]", c.figure, advice)
        make_console().print(table)
        counts = report.counts()
        make_console().print(", ".join(f"{n} {s}" for s, n in counts.items()))
    raise typer.Exit(report.exit_code)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
