"""``graft models``: the model registry — blocks, valid cuts, upload bytes and FLOPs per cut."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from common.contract.errors import UnknownModel
from common.model.zoo import MODEL_NAMES, ModelInfo, describe, resolve_resolution
from tools.console import make_console


def cut_rows(info: ModelInfo) -> list[dict[str, Any]]:
    """One row per valid cut: what the device uploads and how the FLOPs divide."""
    return [
        {"cut": c, "server_starts_at": info.blocks[c].name, "shape": list(info.cut_shape(c)),
         "upload_bytes": info.upload_bytes(c), "device_flops": info.device_flops(c),
         "server_flops": info.server_flops(c)}
        for c in info.cuts
    ]


def registry_report(models: list[str] | None, resolution: int | None) -> dict[str, Any]:
    """The JSON document ``graft models --json`` prints.

    Asked-for models that cannot run at ``resolution`` are an error; when listing every model, those
    are reported under ``skipped`` instead.
    """
    names = models or list(MODEL_NAMES)
    out: dict[str, Any] = {"resolution": resolution or "default", "models": [], "skipped": {}}
    for name in names:
        try:
            res = resolve_resolution(name, resolution)
        except ValueError as exc:
            if models:
                raise
            out["skipped"][name] = str(exc)
            continue
        info = describe(name, res)
        out["models"].append({**info.to_dict(), "total_flops": info.total_flops,
                              "valid_cuts": [0, info.n_blocks - 1], "cuts": cut_rows(info)})
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f}"


def _gflops(n: int) -> str:
    return f"{n / 1e9:,.3f}"


def _summary_table(report: dict[str, Any]) -> Table:
    table = Table(title="Graft model registry (per request, fp32)")
    for col in ("model", "res", "blocks", "cuts", "input MB", "GFLOPs", "smallest upload"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in report["models"]:
        smallest = min(m["cuts"], key=lambda r: (r["upload_bytes"], r["cut"]))
        table.add_row(m["name"], str(m["resolution"]), str(m["n_blocks"]), f"0..{m['n_blocks'] - 1}",
                      _mb(m["input_bytes"]), _gflops(m["total_flops"]),
                      f"{_mb(smallest['upload_bytes'])} MB @ {smallest['cut']}")
    return table


def _cut_table(m: dict[str, Any]) -> Table:
    table = Table(title=f"{m['name']} at {m['resolution']}px: cut c = device ran blocks 0..c-1")
    for col in ("cut", "server from", "upload shape", "upload MB", "device GF", "server GF"):
        table.add_column(col, justify="left" if col in ("server from", "upload shape") else "right")
    for r in m["cuts"]:
        table.add_row(str(r["cut"]), r["server_starts_at"], "×".join(map(str, r["shape"])),
                      _mb(r["upload_bytes"]), _gflops(r["device_flops"]), _gflops(r["server_flops"]))
    return table


def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print the registry as JSON on stdout.")] = False,
    resolution: Annotated[int, typer.Option("--resolution", "-r", min=0,
                                            help="Input resolution (0: each model's default).")] = 0,
    model: Annotated[list[str] | None, typer.Option("--model", "-m",
                                                    help="Only this model (repeatable); shows every cut.")] = None,
) -> None:
    """List the models Graft serves: blocks, valid cuts, upload bytes and FLOPs per cut."""
    try:
        report = registry_report(model, resolution or None)
    except UnknownModel as exc:
        raise typer.BadParameter(exc.message, param_hint="--model") from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--resolution") from None
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    console = make_console()
    console.print(_summary_table(report))
    if model:
        for m in report["models"]:
            console.print(_cut_table(m))
    for name, why in report["skipped"].items():
        console.print(f"[yellow]skipped {name}[/]: {why}")


def register(app: typer.Typer) -> None:
    app.command("models")(models)
