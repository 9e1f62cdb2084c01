"""``graft bench runtime``: the live services on this host, measured end to end.

Three parts, each on a private embedded Redis with real child processes (ingress, worker agent,
replica processes) — only the plan is fixed by the bench (published before the services start) so
that two policies meet exactly the same load:

Each part measures this host's CPU profile afresh (plans from a cached profile would be wrong if the
host's speed changed since it was cached).

1. **routing** — requests/s one ingress process validates and routes (``services.ingress.bench``).
2. **overhead** — 200 req/s of small tensors (mobilenet_v2's last block) for a few seconds; per reply
   the server overhead is the client's round trip minus the model compute and minus the deliberate
   batching hold, both reported by the replica in ``reply.timings`` (everything else — XADD, ingress,
   stream hops, reply, client read — is overhead).
3. **policies** — a mixed-cut workload of resnet18 (six cuts, Poisson arrivals) served under the
   ``graft`` plan and under the ``per-cut`` plan on the same cores, at several offered loads (each
   plan made for that load): mean batch size, goodput, SLO attainment and the plans' total share.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from common.planning.policies import plan as make_plan
from common.planning.types import Fragment
from common.profiles import Profile
from common.settings import Settings
from common.store.plan_store import publish_plan
from common.store.streams import connect
from services.lifecycle import run_loop
from tools.console import make_console
from tools.loadgen import EmulatedDevice, LoadReport, run_load
from tools.redis_server import RedisServer
from tools.up import ensure_profile, start_system, wait_ready

console = make_console()


def _plan_for(profile: Profile, profile_path: Path, frags: list[Fragment], policy: str) -> dict[str, Any]:
    plan = make_plan(profile, frags, policy, rho=0.9, epoch=1, profile_name=str(profile_path)).to_dict()
    if plan["infeasible"]:
        raise RuntimeError(f"bench workload infeasible under {policy}: {plan['infeasible']}")
    return plan


async def run_fixed(settings: Settings, profile_path: Path, plan: dict[str, Any], devices: list[EmulatedDevice],
                    duration_s: float, log_dir: Path) -> LoadReport:
    """Start ingress + worker on a private Redis with ``plan`` published, drive ``devices``, stop."""
    async def publish(url: str) -> None:
        r = connect(url, settings=settings)
        try:
            await publish_plan(r, plan)
        finally:
            await r.aclose()

    system = await start_system(settings, profile_path, log_dir=log_dir, services=("ingress", "worker"),
                                before_services=publish)
    try:
        await wait_ready(system, timeout=180)
        warm = [EmulatedDevice(d.id, d.model, d.cut, 5000.0, 5000.0, 2.0) for d in devices]
        await run_load(system.redis_url, warm, duration_s=2.0, resolution=settings.resolution or None, seed=99)
        return await run_load(system.redis_url, devices, duration_s=duration_s,
                              resolution=settings.resolution or None, seed=settings.seed)
    finally:
        await system.stop()


async def bench_routing(n: int) -> dict[str, Any]:
    from services.ingress.bench import measure_routing_rate

    with RedisServer(local_socket=True) as server:
        rates = [await measure_routing_rate(server.url, n)]
        r = connect(server.url, settings=Settings())
        await r.flushall()
        await r.aclose()
        rates.append(await measure_routing_rate(server.url, n))
    return {"requests": n, "routed_rps": max(rates), "runs_rps": rates}


async def bench_overhead(rate: float, duration_s: float, log_dir: Path) -> dict[str, Any]:
    settings = Settings.from_env(models=("mobilenet_v2",), resolution=32, redis_url=None, profile=None)
    profile_path, _ = ensure_profile(settings, progress=True, refresh=True)
    profile = Profile.load(profile_path)
    cut = profile.model("mobilenet_v2").n_blocks - 1
    budget = 50.0
    plan = _plan_for(profile, profile_path, [Fragment("small", "mobilenet_v2", cut, rate, budget)], "graft")
    devices = [EmulatedDevice(f"d{i}", "mobilenet_v2", cut, budget, budget, rate / 4) for i in range(4)]
    report = await run_fixed(settings, profile_path, plan, devices, duration_s, log_dir / "overhead")
    ok = [o for o in report.outcomes if o.ok and o.timings]
    overhead = np.array([o.latency_ms - (o.timings or {}).get("compute_ms", 0.0) - (o.timings or {}).get("wait_ms", 0.0) for o in ok])
    with_hold = np.array([o.latency_ms - (o.timings or {}).get("compute_ms", 0.0) for o in ok])
    s = report.summary()
    if not len(overhead):
        raise RuntimeError(f"no timed replies in the overhead run: {s['outcomes']}")
    return {"rate_rps": rate, "achieved_rps": s["throughput_rps"], "replies": len(ok), "outcomes": s["outcomes"],
            "overhead_ms_p50": float(np.percentile(overhead, 50)), "overhead_ms_p99": float(np.percentile(overhead, 99)),
            "overhead_with_hold_ms_p50": float(np.percentile(with_hold, 50)),
            "overhead_with_hold_ms_p99": float(np.percentile(with_hold, 99)),
            "rtt_ms_p50": s["rtt_ms_p50"], "rtt_ms_p99": s["rtt_ms_p99"], "mean_batch": s["mean_batch"],
            "plan": {"batch": plan["groups"][0]["batch"], "replicas": plan["groups"][0]["replicas"]},
            "samples": overhead.tolist()}


async def bench_policies(rates_per_cut: list[float], duration_s: float, log_dir: Path) -> dict[str, Any]:
    """graft vs per-cut on the same mixed-cut load, at several offered loads: which load saturates
    which plan depends on this host's speed at the moment, so one load alone would say little."""
    settings = Settings.from_env(models=("resnet18",), resolution=64, redis_url=None, profile=None)
    profile_path, _ = ensure_profile(settings, progress=True, refresh=True)
    profile = Profile.load(profile_path)
    n_blocks = profile.model("resnet18").n_blocks
    cuts = sorted({round(i * (n_blocks - 2) / 5) for i in range(6)})
    budget = 250.0
    out: dict[str, Any] = {"cuts": cuts, "budget_ms": budget, "loads": []}
    for rate in rates_per_cut:
        frags = [Fragment(f"c{c}", "resnet18", c, rate, budget) for c in cuts]
        load: dict[str, Any] = {"rate_per_cut": rate, "offered_rps": rate * len(cuts), "policies": {}}
        for policy in ("graft", "per-cut"):
            plan = _plan_for(profile, profile_path, frags, policy)
            devices = [EmulatedDevice(f"{c}-{k}", "resnet18", c, budget, budget, rate / 2)
                       for c in cuts for k in range(2)]
            report = await run_fixed(settings, profile_path, plan, devices, duration_s,
                                     log_dir / f"{policy}-{rate:g}")
            s = report.summary()
            load["policies"][policy] = {
                "groups": len(plan["groups"]), "replicas": sum(g["replicas"] for g in plan["groups"]),
                "total_share": plan["total_share"], "mean_batch": s["mean_batch"], "goodput_rps": s["goodput_rps"],
                "throughput_rps": s["throughput_rps"], "slo_attainment": s["slo_attainment"],
                "server_ms_p50": s["server_ms_p50"], "server_ms_p99": s["server_ms_p99"], "outcomes": s["outcomes"],
            }
        out["loads"].append(load)
    g = [ld["policies"]["graft"] for ld in out["loads"]]
    p = [ld["policies"]["per-cut"] for ld in out["loads"]]
    out["graft_bigger_batches"] = sum(a["mean_batch"] > b["mean_batch"] for a, b in zip(g, p, strict=True))
    out["graft_more_goodput"] = sum(a["goodput_rps"] > b["goodput_rps"] for a, b in zip(g, p, strict=True))
    return out


def _plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    samples = result["overhead"].pop("samples")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(samples, bins=60, color="tab:blue")
    ax.axvline(result["overhead"]["overhead_ms_p50"], color="k", ls="--", label="p50")
    ax.axvline(result["overhead"]["overhead_ms_p99"], color="r", ls="--", label="p99")
    ax.set_xlabel("server overhead per request (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"overhead at {result['overhead']['rate_rps']:.0f} req/s (small tensors)")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "overhead.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    loads = result["policies"]["loads"]
    offered = [ld["offered_rps"] for ld in loads]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in zip(axes, ("goodput_rps", "slo_attainment", "mean_batch"),
                              ("goodput (req/s in budget)", "SLO attainment", "mean batch size"), strict=True):
        for name, color in (("graft", "tab:green"), ("per-cut", "tab:gray")):
            ax.plot(offered, [ld["policies"][name][key] for ld in loads], "o-", color=color, label=name)
        if key == "goodput_rps":
            ax.plot(offered, offered, ":", color="k", lw=0.8, label="offered")
        ax.set_xlabel("offered load (req/s)")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle("mixed-cut resnet18 (6 cuts), same cores: graft (re-aligned) vs per-cut plans")
    fig.tight_layout()
    paths.append(out / "policies.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def runtime(out: Annotated[Path, typer.Option(help="folder for JSON and PNGs")] = Path("bench-out/runtime"),
            as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
            quick: Annotated[bool, typer.Option(help="shorter runs")] = False) -> None:
    """Measure routing rate, server overhead and graft vs per-cut on the live services of this host."""
    from common import logs

    logs.configure("console", "warning")
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs" / time.strftime("%Y%m%d-%H%M%S")
    dur = 6.0 if quick else 15.0

    async def go() -> dict[str, Any]:
        res: dict[str, Any] = {}
        with console.status("routing: one ingress process…"):
            res["routing"] = await bench_routing(10_000 if quick else 20_000)
        with console.status("overhead: 200 req/s of small tensors…"):
            res["overhead"] = await bench_overhead(200.0, dur, log_dir)
        with console.status("policies: graft vs per-cut on a mixed-cut workload…"):
            res["policies"] = await bench_policies([10.0, 40.0] if quick else [10.0, 20.0, 30.0, 40.0],
                                                   5.0 if quick else 10.0, log_dir)
        return res

    result = run_loop(go())  # uvloop, like the services: the client side of each round trip costs less
    pngs = _plots(result, out)
    (out / "runtime.json").write_text(json.dumps(result, indent=1))
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    t = Table(title="graft bench runtime (this host)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("target")
    r, o = result["routing"], result["overhead"]
    t.add_row("ingress routing (req/s, one process)", f"{r['routed_rps']:.0f}", "≥ 5000")
    t.add_row(f"overhead p50 at {o['rate_rps']:.0f} req/s (ms)", f"{o['overhead_ms_p50']:.2f}", "≤ 2")
    t.add_row(f"overhead p99 at {o['rate_rps']:.0f} req/s (ms)", f"{o['overhead_ms_p99']:.2f}", "≤ 10")
    t.add_row("overhead incl. batching hold p50 / p99 (ms)",
              f"{o['overhead_with_hold_ms_p50']:.2f} / {o['overhead_with_hold_ms_p99']:.2f}", "")
    t.add_row("achieved rate (req/s)", f"{o['achieved_rps']:.0f}", "")
    pol = result["policies"]
    for ld in pol["loads"]:
        for name in ("graft", "per-cut"):
            p = ld["policies"][name]
            t.add_row(f"{ld['offered_rps']:.0f} req/s offered, {name}: batch · goodput · SLO · share",
                      f"{p['mean_batch']:.2f} · {p['goodput_rps']:.1f} · {100 * p['slo_attainment']:.1f}% · "
                      f"{p['total_share']}", "")
    n = len(pol["loads"])
    t.add_row("loads where graft's mean batch / goodput exceed per-cut's",
              f"{pol['graft_bigger_batches']}/{n} · {pol['graft_more_goodput']}/{n}", "graft > per-cut")
    console.print(t)
    console.print(f"wrote {out / 'runtime.json'} and {', '.join(map(str, pngs))}")


def register_bench(bench_app: typer.Typer) -> None:
    bench_app.command("runtime")(runtime)

