"""``graft bench plan``: the planner suite — resource efficiency of graft against per-cut and oracle, and speed.

Workloads come from emulated clients (``common.client.workload``): each client draws a registry model, a
device class (low/mid/high), an SLO from {100, 200, 400} ms, a frame rate, and a 2 s window at a
random time on one of the uplink traces in ``../shared/traces`` (``GRAFT_TRACES_DIR`` overrides);
the partitioner picks its cut and server budget, and clients no cut can serve are rejected. The
suite crosses the partitioner objective (``latency``: least end-to-end time, Neurosurgeon's default;
``energy``: least on-device work that still meets the SLO), the frame rate (5 fps for everyone, or
drawn from {1, 5, 15, 30}), the number of clients and seeds. Each workload is planned with
``per-cut`` and ``graft`` (and ``oracle`` where every model has at most 8 fragments); the targets are
judged on these client workloads. For contrast, a ``random-cuts`` family spreads fragments uniformly
over every cut of every model (rates from {1, 5, 15, 30}/s, budgets uniform in 1–300 ms): the regime
where re-alignment pays most, which the partitioner rarely produces. A third family measures the gap
to the oracle on small instances (at most 8 fragments of one model: from clients, and uniformly
random ones). Planning time is the median of repeated runs in this process.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.client.traces import LinkTrace, shared_traces_dir
from common.client.workload import clients_to_workload, emulate_clients
from common.planning import Fragment, Plan, plan, verify_plan
from common.profiles import Profile, shipped

REPO_ROOT = Path(__file__).resolve().parents[1]
SLOS_MS = (100.0, 200.0, 400.0)
FPS_SETTINGS: dict[str, tuple[float, ...]] = {"5fps": (5.0,), "mixed-fps": (1.0, 5.0, 15.0, 30.0)}
ORACLE_MAX_PER_MODEL = 8


@dataclass(frozen=True)
class SuiteConfig:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    clients: tuple[int, ...] = (30, 100, 300, 1000, 3000)
    modes: tuple[str, ...] = ("latency", "energy")
    fps: tuple[str, ...] = ("5fps", "mixed-fps")
    random_sizes: tuple[int, ...] = (30, 100, 300, 1000)
    oracle_seeds: int = 6  # per model, from clients
    oracle_random: int = 60
    timing_sizes: tuple[int, ...] = (10, 30, 100, 300, 1000)
    timing_repeats: int = 15

    @classmethod
    def quick(cls) -> SuiteConfig:
        return cls(seeds=(0,), clients=(30, 300, 3000), fps=("mixed-fps",), random_sizes=(100,), oracle_seeds=2,
                   oracle_random=20,
                   timing_sizes=(10, 100, 1000), timing_repeats=5)


@dataclass
class BenchResult:
    profile: str
    traces: list[str]
    traces_note: str
    instances: list[dict[str, Any]] = field(default_factory=list)
    oracle: list[dict[str, Any]] = field(default_factory=list)
    timing: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "traces": self.traces, "traces_note": self.traces_note,
                "generator": (__doc__ or "").strip(), "summary": self.summary, "instances": self.instances,
                "oracle": self.oracle, "timing": self.timing}


# ----------------------------------------------------------------------------------------------- inputs

def traces_dir() -> Path:
    return shared_traces_dir()


def load_uplinks() -> tuple[list[LinkTrace], str]:
    """The uplink traces, or synthetic stand-ins (saying so) when the folder is absent."""
    folder = traces_dir()
    files = sorted(folder.glob("*.up")) if folder.is_dir() else []
    if files:
        return [LinkTrace.from_mahimahi(f) for f in files], f"real uplink traces from {folder}"
    synthetic = [LinkTrace.synthetic(1.0, 600.0, seed=1, name="synthetic-1mbps"),
                 LinkTrace.synthetic(12.0, 600.0, seed=2, name="synthetic-12mbps")]
    return synthetic, (f"NO TRACES at {folder}: using synthetic uplinks of 1 and 12 Mbit/s mean "
                       "(log-normal AR(1) rate) instead")


def client_workload(profile: Profile, traces: Sequence[LinkTrace], n_clients: int, mode: str,
                    fps: Sequence[float], seed: int, models: Sequence[str] | None = None) -> tuple[list[Fragment], int]:
    clients = emulate_clients(n_clients, list(models or sorted(profile.models)), SLOS_MS, traces, fps=fps, seed=seed)
    result = clients_to_workload(profile, clients, mode="energy" if mode == "energy" else "latency")
    return result.fragments, len(result.rejected)


def random_instance(profile: Profile, seed: int, n: int = ORACLE_MAX_PER_MODEL, *, one_model: bool = True,
                    max_budget_ms: float = 150.0, rates: Sequence[float] = (1.0, 5.0, 15.0, 30.0, 60.0)) -> list[Fragment]:
    """Uniformly random fragments (model, cut, rate, budget), alone-feasible ones kept, of one model or all."""
    rng = np.random.default_rng(10_000 + seed)
    names = sorted(profile.models)
    chosen = names[int(rng.integers(len(names)))]
    out: list[Fragment] = []
    while len(out) < n:
        model = profile.models[chosen if one_model else names[int(rng.integers(len(names)))]]
        cut = int(rng.integers(model.n_blocks))
        budget = float(rng.uniform(1.0, max_budget_ms))
        if 2 * model.suffix_latency(cut, 1, max(model.shares)) <= budget:
            out.append(Fragment(f"r{len(out)}", model.name, cut, float(rng.choice(list(rates))), budget))
    return out


# ------------------------------------------------------------------------------------------- measuring

def timed_plan(profile: Profile, frags: Sequence[Fragment], policy: str) -> tuple[Plan, float]:
    started = time.perf_counter()
    result = plan(profile, frags, policy)
    return result, (time.perf_counter() - started) * 1000.0


def per_model_cost(p: Plan) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for g in p.groups:
        out[g.model] += g.cost
    return dict(out)


def oracle_eligible(frags: Sequence[Fragment]) -> bool:
    counts: dict[str, int] = defaultdict(int)
    for f in frags:
        counts[f.model] += 1
    return bool(frags) and max(counts.values()) <= ORACLE_MAX_PER_MODEL


def evaluate(profile: Profile, frags: Sequence[Fragment], with_oracle: bool) -> dict[str, Any]:
    """Plan with every policy, verify each plan, and report costs, GPUs and times."""
    policies = ["per-cut", "graft", *(["oracle"] if with_oracle else [])]
    row: dict[str, Any] = {"fragments": len(frags), "cost": {}, "gpus": {}, "groups": {}, "plan_ms": {},
                           "per_model_cost": {}, "infeasible": {}, "violations": 0}
    for policy in policies:
        p, ms = timed_plan(profile, frags, policy)
        row["violations"] += len(verify_plan(profile, frags, p.to_dict()))
        row["cost"][policy], row["gpus"][policy], row["groups"][policy] = p.total_share, p.gpus, len(p.groups)
        row["plan_ms"][policy], row["per_model_cost"][policy] = ms, per_model_cost(p)
        row["infeasible"][policy] = len(p.infeasible)
    base, graft = row["cost"]["per-cut"], row["cost"]["graft"]
    row["gain"] = 1.0 - graft / base if base else 0.0
    if with_oracle:
        oracle = row["cost"]["oracle"]
        row["oracle_gap"] = graft / oracle - 1.0 if oracle else 0.0
    return row


def run_suite(profile: Profile, traces: Sequence[LinkTrace], cfg: SuiteConfig, result: BenchResult,
              progress: Progress) -> None:
    models = sorted(profile.models)
    suite = [(mode, fps, n, seed) for mode in cfg.modes for fps in cfg.fps for n in cfg.clients for seed in cfg.seeds]
    small = [(m, s) for m in models for s in range(cfg.oracle_seeds)]
    spread = [(n, seed) for n in cfg.random_sizes for seed in cfg.seeds]
    timing_work = 2 * len(cfg.timing_sizes) * cfg.timing_repeats * 2
    task = progress.add_task("planner suite", total=len(suite) + len(spread) + len(small) + cfg.oracle_random
                             + timing_work)
    for mode, fps, n, seed in suite:
        frags, rejected = client_workload(profile, traces, n, mode, FPS_SETTINGS[fps], seed)
        row = evaluate(profile, frags, oracle_eligible(frags))
        result.instances.append({"family": "clients", "mode": mode, "fps": fps, "clients": n, "seed": seed,
                                 "rejected": rejected, **row})
        progress.advance(task)
    for n, seed in spread:
        frags = random_instance(profile, 500 + seed, n, one_model=False, max_budget_ms=300.0,
                                rates=(1.0, 5.0, 15.0, 30.0))
        result.instances.append({"family": "random-cuts", "mode": "random", "fps": "mixed-fps", "clients": 0,
                                 "seed": seed, "rejected": 0, **evaluate(profile, frags, oracle_eligible(frags))})
        progress.advance(task)
    for model, seed in small:  # at most 8 fragments of one model, from clients
        frags, _ = client_workload(profile, traces, 40, cfg.modes[seed % len(cfg.modes)], FPS_SETTINGS["mixed-fps"],
                                   seed, models=[model])
        frags = frags[:ORACLE_MAX_PER_MODEL]
        if frags:
            result.oracle.append({"family": "clients", "model": model, "seed": seed, **evaluate(profile, frags, True)})
        progress.advance(task)
    for seed in range(cfg.oracle_random):
        frags = random_instance(profile, seed)
        result.oracle.append({"family": "random", "model": frags[0].model, "seed": seed,
                              **evaluate(profile, frags, True)})
        progress.advance(task)
    pools = {
        "clients": client_workload(profile, traces, 6 * max(cfg.timing_sizes), "energy", FPS_SETTINGS["mixed-fps"],
                                   99)[0],
        "random-cuts": random_instance(profile, 999, max(cfg.timing_sizes), one_model=False, max_budget_ms=300.0,
                                       rates=(1.0, 5.0, 15.0, 30.0)),
    }
    for workload, pool in pools.items():
        for size in cfg.timing_sizes:
            frags = pool[:size]
            for policy in ("per-cut", "graft"):
                times = []
                for _ in range(cfg.timing_repeats):
                    times.append(timed_plan(profile, frags, policy)[1])
                    progress.advance(task)
                result.timing.append({"workload": workload, "fragments": len(frags), "policy": policy,
                                      "median_ms": statistics.median(times), "min_ms": min(times),
                                      "max_ms": max(times), "runs": len(times)})
    result.summary = summarise(result)


def summarise(result: BenchResult) -> dict[str, Any]:
    clients = [r for r in result.instances if r["family"] == "clients"]
    gains = [r["gain"] for r in clients]
    by_mode: dict[str, list[float]] = defaultdict(list)
    for r in result.instances:
        by_mode[r["family"] if r["family"] != "clients" else f"{r['mode']}/{r['fps']}"].append(r["gain"])
    gaps = [r["oracle_gap"] for r in result.oracle]
    gaps_all = gaps + [r["oracle_gap"] for r in result.instances if "oracle_gap" in r]
    feasible_mismatch = sum(1 for r in result.oracle if r["infeasible"]["graft"] > r["infeasible"]["oracle"])
    def at(n: int) -> float | None:  # the slower of the two timing workloads
        times = [x["median_ms"] for x in result.timing if x["policy"] == "graft" and x["fragments"] == n]
        return max(times) if times else None

    out: dict[str, Any] = {
        "instances": len(clients),
        "fragments_range": [min((r["fragments"] for r in clients), default=0),
                            max((r["fragments"] for r in clients), default=0)],
        "median_gain": statistics.median(gains) if gains else None,
        "best_gain": max(gains) if gains else None,
        "median_gain_by_setting": {k: statistics.median(v) for k, v in sorted(by_mode.items())},
        "oracle_instances": len(gaps),
        "oracle_median_gap": statistics.median(gaps) if gaps else None,
        "oracle_mean_gap": statistics.mean(gaps) if gaps else None,
        "oracle_max_gap": max(gaps) if gaps else None,
        "oracle_median_gap_incl_suite": statistics.median(gaps_all) if gaps_all else None,
        "graft_infeasible_where_oracle_feasible": feasible_mismatch,
        "verify_violations": sum(r["violations"] for r in result.instances + result.oracle),
        "graft_ms_100": at(100), "graft_ms_1000": at(1000),
    }
    out["targets"] = {
        "median_gain>=0.40": out["median_gain"] is not None and out["median_gain"] >= 0.40,
        "best_gain>=0.70": out["best_gain"] is not None and out["best_gain"] >= 0.70,
        "oracle_median_gap<=0.03": out["oracle_median_gap"] is not None and out["oracle_median_gap"] <= 0.03,
        "never_infeasible_where_oracle_feasible": feasible_mismatch == 0,
        "plan_100<50ms": out["graft_ms_100"] is not None and out["graft_ms_100"] < 50.0,
        "plan_1000<1s": out["graft_ms_1000"] is not None and out["graft_ms_1000"] < 1000.0,
    }
    return out


# -------------------------------------------------------------------------------------------- reporting

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def tables(result: BenchResult) -> list[Table]:
    suite = Table(title=f"planner suite on {result.profile}: cost = Σ n·g (share %), gain = 1 − graft/per-cut")
    for col in ("cuts by", "fps", "clients", "seed", "frags", "per-cut", "graft", "oracle", "GPUs",
                "gain", "ms"):
        suite.add_column(col, justify="left" if col in ("cuts by", "fps") else "right")
    for r in result.instances:
        c = r["cost"]
        suite.add_row(r["mode"], "5" if r["fps"] == "5fps" else "mix", str(r["clients"] or "-"), str(r["seed"]),
                      str(r["fragments"]), str(c["per-cut"]), str(c["graft"]), str(c.get("oracle", "-")),
                      f"{r['gpus']['per-cut']}→{r['gpus']['graft']}", _pct(r["gain"]), f"{r['plan_ms']['graft']:.0f}")
    timing = Table(title="planning time (median of repeated runs, this host)")
    for col in ("workload", "fragments", "policy", "median ms", "min ms", "max ms", "runs"):
        timing.add_column(col, justify="left" if col == "workload" else "right")
    for t in result.timing:
        timing.add_row(t["workload"], str(t["fragments"]), t["policy"], f"{t['median_ms']:.2f}",
                       f"{t['min_ms']:.2f}", f"{t['max_ms']:.2f}", str(t["runs"]))
    s = result.summary
    summary = Table(title="summary and targets")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    summary.add_column("target", justify="right")
    tg = s["targets"]
    rows = [
        (f"median gain over per-cut ({s['instances']} client workloads)", _pct(s["median_gain"]),
         _mark(tg["median_gain>=0.40"], "≥ 40%")),
        ("best gain over per-cut (client workloads)", _pct(s["best_gain"]), _mark(tg["best_gain>=0.70"], "≥ 70%")),
        *[(f"  median gain, {k}", _pct(v), "") for k, v in s["median_gain_by_setting"].items()],
        (f"median gap to oracle ({s['oracle_instances']} small instances)", _pct(s["oracle_median_gap"]),
         _mark(tg["oracle_median_gap<=0.03"], "≤ 3%")),
        ("mean / max gap to oracle", f"{_pct(s['oracle_mean_gap'])} / {_pct(s['oracle_max_gap'])}", ""),
        ("graft infeasible where oracle feasible", str(s["graft_infeasible_where_oracle_feasible"]),
         _mark(tg["never_infeasible_where_oracle_feasible"], "0")),
        ("plan 100 fragments (graft, median, slower workload)", _ms(s["graft_ms_100"]),
         _mark(tg["plan_100<50ms"], "< 50 ms")),
        ("plan 1000 fragments (graft, median, slower workload)", _ms(s["graft_ms_1000"]),
         _mark(tg["plan_1000<1s"], "< 1 s")),
        ("plans failing verify", str(s["verify_violations"]), "0"),
    ]
    for row in rows:
        summary.add_row(*row)
    return [suite, timing, summary]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def _mark(ok: bool, target: str) -> str:
    return f"{target} {'met' if ok else 'MISSED'}"


def plot(result: BenchResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    models = sorted({m for r in result.instances for m in r["per_model_cost"]["per-cut"]} |
                    {r["model"] for r in result.oracle})
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    x = np.arange(len(models))
    clients = [r for r in result.instances if r["family"] == "clients"]
    for i, policy in enumerate(("per-cut", "graft")):
        totals = [sum(r["per_model_cost"][policy].get(m, 0) for r in clients) for m in models]
        left.bar(x + (i - 0.5) * 0.4, totals, 0.4, label=policy)
    left.set_title("client workloads: total cost per model (Σ over instances)")
    for i, policy in enumerate(("per-cut", "graft", "oracle")):
        totals = [sum(r["per_model_cost"][policy].get(m, 0) for r in result.oracle) for m in models]
        right.bar(x + (i - 1) * 0.28, totals, 0.28, label=policy)
    right.set_title(f"small instances (≤ {ORACLE_MAX_PER_MODEL} fragments): total cost per model")
    for ax in (left, right):
        ax.set_xticks(x, models, rotation=35, ha="right")
        ax.set_ylabel("Σ n·g (GPU share %)")
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "cost_per_model.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for workload, style in (("clients", "-"), ("random-cuts", "--")):
        for policy in ("per-cut", "graft"):
            pts = sorted((t["fragments"], t["median_ms"]) for t in result.timing
                         if t["policy"] == policy and t["workload"] == workload)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                    label=f"{policy}, {workload} (median)")
    for family, marker in (("clients", "x"), ("random-cuts", "^")):
        pts = [(r["fragments"], r["plan_ms"]["graft"]) for r in result.instances
               if r["fragments"] and r["family"] == family]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, alpha=0.5, marker=marker,
                   label=f"graft, single {family} runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fragments")
    ax.set_ylabel("planning time (ms)")
    ax.set_title("planning time vs number of fragments")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "plan_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run_bench(out_dir: Path, quick: bool = False, profile_ref: str = "v100-estimated",
              console: Console | None = None) -> BenchResult:
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that the suite table keeps its columns
            console = Console(width=120)
    started = time.perf_counter()
    path = Path(profile_ref) if Path(profile_ref).exists() else shipped(profile_ref)
    profile = Profile.load(path)
    traces, note = load_uplinks()
    console.print(f"profile {path.stem} ({profile.source}); {note}: {', '.join(t.name for t in traces)}")
    result = BenchResult(profile=path.stem, traces=[t.name for t in traces], traces_note=note)
    cfg = SuiteConfig.quick() if quick else SuiteConfig()
    with Progress(console=console, transient=True) as progress:
        run_suite(profile, traces, cfg, result, progress)
    result.summary["elapsed_s"] = time.perf_counter() - started
    result.summary["config"] = {"quick": quick, **asdict(cfg)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_plan.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    pngs = plot(result, out_dir)
    for t in tables(result):
        console.print(t)
    console.print(f"suite ran in {result.summary['elapsed_s']:.0f} s; wrote {out_dir / 'bench_plan.json'}, "
                  + ", ".join(str(p) for p in pngs))
    return result


def register_bench(bench_app: typer.Typer) -> None:
    @bench_app.command("plan")
    def bench_plan(
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for JSON and PNGs.")] = Path("bench-out/plan"),
        quick: Annotated[bool, typer.Option("--quick", help="A smaller suite (seconds, for CI).")] = False,
        profile: Annotated[str, typer.Option("--profile", "-p", help="Profile file or shipped name.")]
        = "v100-estimated",
    ) -> None:
        """Planner suite: graft vs per-cut vs oracle on client workloads; planning time; JSON + PNGs."""
        run_bench(out, quick=quick, profile_ref=profile)

