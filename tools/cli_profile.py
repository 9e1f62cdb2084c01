"""``graft profile``: measure a profile on this host, estimate a GPU one, or write mobile device latencies.

    graft profile --model resnet18 --device cpu --batches 1,2,4,8 --threads 1,2 --out cpu.json
    graft profile --model resnet50 --device cuda --shares 10,20,30,40,50,60,70,80,90,100 --out gpu.json
    graft profile --estimate-gpu v100 --out common/data/v100-estimated.json     # every model by default
    graft profile --devices --out common/data/devices.json                      # phone classes, every model
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from common.contract.errors import GraftError
from common.profiles import Profile, ProfileError
from tools.console import make_console

_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def dump_compact(doc: dict[str, Any]) -> str:
    """Indented JSON with every innermost list of numbers on one line (small, readable diffs)."""
    text = json.dumps(doc, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def profile_table(profile: Profile) -> Table:
    lo, hi, top = profile.shares[0], profile.shares[-1], profile.batches[-1]
    unit = "%" if profile.unit == "gpu_share_pct" else " thr"
    points = [(1, lo), (1, hi), (top, hi)] if lo != hi else [(1, hi), (top, hi)]
    table = Table(title=f"{profile.source} profile: {profile.device} (whole model, ms)")
    for col in ("model", "blocks", *(f"b={b} @{g}{unit}" for b, g in points), f"ms/req b={top}"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in profile.models.items():
        cells = [m.suffix_latency(0, b, g) for b, g in points]
        table.add_row(name, str(m.n_blocks), *(f"{v:.3f}" for v in cells), f"{cells[-1] / top:.3f}")
    return table


def devices_table(doc: dict[str, Any]) -> Table:
    classes = list(doc["classes"])
    table = Table(title="Mobile device classes: whole-model latency on the device (ms, assumed speeds)")
    table.add_column("model")
    table.add_column("res", justify="right")
    for c in classes:
        table.add_column(c, justify="right")
    for name, m in doc["models"].items():
        table.add_row(name, str(m["resolution"]), *(f"{sum(m['latency_ms'][c]):.1f}" for c in classes))
    return table


def profile(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON file.")],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model to profile (repeatable).")] = None,
    device: Annotated[str, typer.Option("--device", help="Measure on cpu or cuda.")] = "cpu",
    batches: Annotated[str | None, typer.Option("--batches", help="Comma-separated batch sizes.")] = None,
    shares: Annotated[str | None, typer.Option("--shares", help="GPU shares in percent (cuda).")] = None,
    threads: Annotated[str | None, typer.Option("--threads", help="Thread counts (cpu).")] = None,
    resolution: Annotated[int, typer.Option("--resolution", "-r", min=0,
                                            help="Input resolution; 0 = each model's default.")] = 0,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs per block.")] = 3,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs per block (median kept).")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights and inputs.")] = 0,
    estimate_gpu: Annotated[str | None, typer.Option(
        "--estimate-gpu", help="Write an estimated profile of this GPU (v100) instead of measuring.")] = None,
    devices: Annotated[bool, typer.Option(
        "--devices", help="Write per-block latencies of the mobile device classes instead of measuring.")] = False,
) -> None:
    """Measure per-block latency profiles, estimate a GPU profile, or write mobile device latencies."""
    console = make_console()
    res = resolution or None
    try:
        if devices:
            from common.client.phones import devices_document

            doc = devices_document(model or None, res)
            out.write_text(dump_compact(doc))
            console.print(devices_table(doc))
        else:
            if estimate_gpu:
                from common.model.zoo import MODEL_NAMES
                from common.profiling.estimate import BATCHES, SHARES, estimate_profile

                prof = estimate_profile(model or MODEL_NAMES, gpu=estimate_gpu, resolution=res,
                                        batches=_ints(batches, "--batches") or BATCHES,
                                        shares=_ints(shares, "--shares") or SHARES)
                cal = prof.meta["calibration"]
                console.print(f"calibration: {len(cal['anchors'])} anchors, "
                              f"max |relative error| {cal['max_abs_rel_error']:.1%}")
            else:
                if not model:
                    raise typer.BadParameter("give --model (repeatable) to measure, or --estimate-gpu / --devices")
                import torch

                from common.profiling.measure import mps_status, profile_models

                if device == "cuda" and torch.cuda.is_available() and not (mps := mps_status()).running:
                    console.print(f"[yellow]warning:[/] {mps.detail}")
                prof = profile_models(model, device=device, batches=_ints(batches, "--batches") or [1, 2, 4, 8],
                                      shares=_ints(shares, "--shares"), threads=_ints(threads, "--threads"),
                                      resolution=res, warmup=warmup, repeats=repeats, seed=seed, progress=True)
            out.write_text(dump_compact(prof.to_dict()))
            console.print(profile_table(prof))
    except (GraftError, ProfileError, ValueError, RuntimeError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile)
