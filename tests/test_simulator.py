from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from common.planning import Fragment, verify_plan
from common.profiles import Profile, make_profile
from common.simulation import SimReport, SimulationError, arrival_times, assign, simulate

BATCHES, SHARES = [1, 2, 4, 8, 16], [25, 50, 100]


def tiny_profile() -> Profile:
    """4 blocks; block j at batch b and share g costs (j+1)·(0.5 + 0.25·b)·100/g ms."""
    blocks = [{"name": f"b{j}", "out_bytes": 100 * (4 - j), "flops": 1,
               "latency_ms": [[(j + 1) * (0.5 + 0.25 * b) * 100 / g for g in SHARES] for b in BATCHES]}
              for j in range(4)]
    return make_profile("estimated", "toy", "gpu_share_pct", BATCHES, SHARES,
                        {"m": {"input_shape": [4], "input_bytes": 16, "blocks": blocks}})


PROFILE = tiny_profile()


def make_plan(groups: Sequence[tuple[str, list[str], int, int, int]], frags: Sequence[Fragment],
              rho: float = 0.9, infeasible: Sequence[str] = ()) -> dict[str, Any]:
    """A plan file for hand-picked ``(id, fragment ids, B, share, replicas)``, reported fields derived."""
    mp = PROFILE.model("m")
    out = []
    for gid, fids, batch, share, replicas in groups:
        members = [f for f in frags if f.id in fids]
        rates: dict[int, float] = {}
        for f in members:
            rates[f.cut] = rates.get(f.cut, 0.0) + f.rate_rps
        total = sum(rates.values())
        latency = mp.realigned_latency({c: batch * r / total for c, r in rates.items()}, share)
        out.append({"id": gid, "model": "m", "fragments": list(fids), "cuts": sorted(rates), "batch": batch,
                    "share": share, "replicas": replicas, "latency_ms": latency, "rate_rps": total,
                    "min_budget_ms": min(f.budget_ms for f in members)})
    devices: list[list[tuple[str, int]]] = []
    for g in out:
        for _ in range(g["replicas"]):
            dev = next((d for d in devices if sum(s for _, s in d) + g["share"] <= 100), None)
            if dev is None:
                devices.append(dev := [])
            dev.append((g["id"], g["share"]))
    return {"epoch": 1, "policy": "hand", "profile": "toy", "rho": rho, "groups": out,
            "infeasible": [{"id": i, "reason": "budget below twice the fastest single run"} for i in infeasible],
            "placement": [{"device": f"gpu{i}", "replicas": [{"group": g, "share": s} for g, s in d]}
                          for i, d in enumerate(devices)],
            "total_share": sum(g["share"] * g["replicas"] for g in out), "gpus": len(devices)}


def workload(frags: Sequence[Fragment]) -> dict[str, Any]:
    return {"fragments": [f.to_dict() for f in frags]}


def two_cuts(rate: float, budget_ms: float = 60.0) -> list[Fragment]:
    return [Fragment("a", "m", 0, rate, budget_ms), Fragment("b", "m", 2, rate, budget_ms)]


def check_accounting(r: SimReport) -> None:
    window = r.settings["duration_s"] - r.settings["warmup_s"]
    for o in [g.outcome for g in r.groups] + [r.overall]:
        assert o.requests == o.in_deadline + o.late + o.dropped
        assert 0.0 <= o.utilisation <= 1.0 + 1e-9
        assert o.goodput_rps == pytest.approx(o.in_deadline / window)
    assert r.overall.requests == sum(g.outcome.requests for g in r.groups)
    assert r.overall.batches == sum(g.outcome.batches for g in r.groups)


def test_a_plan_that_meets_section_4_attains_its_slo_under_poisson_load() -> None:
    frags = two_cuts(120.0)  # Λ = 240 rps, L(8) = 22 ms: 2L ≤ 60 ms and 8/L = 364 rps ≥ Λ/ρ
    plan = make_plan([("g0", ["a", "b"], 8, 100, 1)], frags)
    assert verify_plan(PROFILE, frags, plan) == []
    r = simulate(PROFILE, plan, workload(frags), duration_s=20.0, seed=0)
    check_accounting(r)
    o = r.overall
    assert o.requests == pytest.approx(240 * 19, rel=0.05)
    assert o.slo_attainment is not None and o.slo_attainment >= 0.99
    assert o.late == 0  # without jitter the policy never launches a request that will be late
    assert o.p99_ms is not None and o.p99_ms <= 60.0 + 1e-6  # slack launches finish right at the budget
    assert o.mean_batch is not None and o.mean_batch > 6  # the slack policy waits for big batches
    g = r.group("g0")
    assert g.offered_rps == pytest.approx(240.0) and g.fragments == 2
    # busy fraction matches the work done: batches × mean run time ≈ utilisation × window
    assert 0.5 < g.outcome.utilisation < 0.8


def test_too_few_replicas_miss_massively_but_keep_goodput_at_capacity() -> None:
    frags = two_cuts(400.0)  # Λ = 800 rps against a capacity of 8 / 22 ms = 364 rps
    plan = make_plan([("g0", ["a", "b"], 8, 100, 1)], frags)
    assert [v.rule for v in verify_plan(PROFILE, frags, plan)] == ["throughput"]
    r = simulate(PROFILE, plan, workload(frags), duration_s=10.0, seed=0)
    check_accounting(r)
    o = r.overall
    assert o.slo_attainment is not None and o.slo_attainment < 0.5 and o.dropped > 0.4 * o.requests
    assert o.utilisation > 0.95
    assert 330 < o.goodput_rps < 370 and o.mean_batch == pytest.approx(8.0, abs=0.1)
    more = simulate(PROFILE, make_plan([("g0", ["a", "b"], 8, 100, 3)], frags), workload(frags),
                    duration_s=10.0, seed=0)
    assert more.overall.slo_attainment is not None and more.overall.slo_attainment > 0.99


def test_realigned_group_batches_more_than_per_cut_groups_at_the_same_load() -> None:
    frags = two_cuts(60.0)
    realigned = make_plan([("g0", ["a", "b"], 8, 100, 1)], frags)
    per_cut = make_plan([("ga", ["a"], 8, 100, 1), ("gb", ["b"], 8, 100, 1)], frags)
    assert verify_plan(PROFILE, frags, realigned) == [] and verify_plan(PROFILE, frags, per_cut) == []
    r1 = simulate(PROFILE, realigned, workload(frags), duration_s=20.0, seed=3)
    r2 = simulate(PROFILE, per_cut, workload(frags), duration_s=20.0, seed=3)
    assert r1.overall.requests == r2.overall.requests  # same arrivals
    assert r1.overall.mean_batch is not None and r2.overall.mean_batch is not None
    assert r1.overall.mean_batch > 1.3 * r2.overall.mean_batch
    assert r1.overall.batches < r2.overall.batches
    for r in (r1, r2):
        check_accounting(r)
        assert r.overall.slo_attainment is not None and r.overall.slo_attainment >= 0.99


def test_same_seed_same_report_and_another_seed_differs() -> None:
    frags = two_cuts(100.0)
    plan = make_plan([("g0", ["a", "b"], 8, 100, 1)], frags)
    kw: dict[str, Any] = {"duration_s": 5.0, "noise_sigma": 0.1}
    a = simulate(PROFILE, plan, workload(frags), seed=7, **kw).to_dict()
    assert a == simulate(PROFILE, plan, workload(frags), seed=7, **kw).to_dict()
    assert a != simulate(PROFILE, plan, workload(frags), seed=8, **kw).to_dict()


def test_execution_jitter_makes_slack_launched_batches_late_and_a_margin_helps() -> None:
    frags = two_cuts(60.0)
    plan = make_plan([("g0", ["a", "b"], 8, 100, 1)], frags)
    exact = simulate(PROFILE, plan, workload(frags), duration_s=20.0, seed=1)
    noisy = simulate(PROFILE, plan, workload(frags), duration_s=20.0, seed=1, noise_sigma=0.2)
    safe = simulate(PROFILE, plan, workload(frags), duration_s=20.0, seed=1, noise_sigma=0.2, margin_ms=8.0)
    assert exact.overall.late == 0
    assert noisy.overall.late > 0.05 * noisy.overall.requests
    assert safe.overall.late < noisy.overall.late / 4
    eager = simulate(PROFILE, plan, workload(frags), duration_s=20.0, seed=1, noise_sigma=0.2, eager=True)
    assert eager.overall.late < noisy.overall.late / 4
    assert eager.overall.mean_batch is not None and noisy.overall.mean_batch is not None
    assert eager.overall.mean_batch < noisy.overall.mean_batch


def test_uniform_arrivals_are_counted_exactly() -> None:
    frags = two_cuts(50.0)
    plan = make_plan([("g0", ["a", "b"], 8, 100, 1)], frags)
    r = simulate(PROFILE, plan, workload(frags), duration_s=10.0, warmup_s=2.0, arrivals="uniform", seed=2)
    assert abs(r.overall.requests - 2 * 50 * 8) <= 2
    assert r.overall.slo_attainment == 1.0 and r.settings["arrivals"] == "uniform"


def test_infeasible_and_unrouted_fragments_are_reported_not_simulated() -> None:
    frags = [*two_cuts(50.0), Fragment("tight", "m", 0, 30.0, 1.0), Fragment("orphan", "m", 1, 20.0, 60.0)]
    plan = make_plan([("g0", ["a", "b"], 8, 100, 1)], frags[:2], infeasible=["tight"])
    r = simulate(PROFILE, plan, workload(frags), duration_s=5.0, seed=0)
    assert {(u.fragment.id, u.kind) for u in r.unserved} == {("tight", "infeasible"), ("orphan", "unrouted")}
    assert r.unserved_rps == pytest.approx(50.0)
    assert r.group("g0").offered_rps == pytest.approx(100.0)
    d = r.to_dict()
    assert {u["id"] for u in d["unserved"]} == {"tight", "orphan"} and d["overall"]["requests"] > 0


def test_routing_follows_fragments_then_route_hints_then_cuts() -> None:
    frags = [Fragment("a", "m", 0, 10.0, 60.0), Fragment("x", "m", 2, 10.0, 30.0),
             Fragment("y", "m", 2, 10.0, 90.0), Fragment("z", "m", 3, 10.0, 60.0)]
    plan = make_plan([("g0", ["a"], 4, 100, 1), ("g1", ["x"], 2, 100, 1), ("g2", ["y"], 8, 100, 1)], frags[:3])
    plan["groups"][0]["fragments"] = []  # "a" must now be found by its route or the groups' cuts
    plan["groups"][2]["cuts"] = [2, 3]
    plan["routes"] = {"m:2": [{"group": "g2", "min_budget_ms": 90.0}, {"group": "g1", "min_budget_ms": 30.0}]}
    x_and_y = [Fragment("x2", "m", 2, 1.0, 40.0), Fragment("y2", "m", 2, 1.0, 95.0)]
    a = assign(plan, [*frags, *x_and_y])
    ids = [g.id for g in a.groups]
    assert {f: ids[i] for f, i in a.group_of.items()} == {"a": "g0", "x": "g1", "y": "g2", "z": "g2",
                                                        "x2": "g1", "y2": "g2"}
    wrong = make_plan([("g0", ["a"], 4, 100, 1)], frags[:1])
    wrong["groups"][0]["fragments"] = ["z"]
    wrong["groups"][0]["model"] = "other"
    with pytest.raises(SimulationError):
        assign(wrong, frags)


@pytest.mark.parametrize("kw", [{"warmup_s": 5.0, "duration_s": 5.0}, {"arrivals": "bursty"},
                                {"noise_sigma": -0.1}, {"margin_ms": -1.0}])
def test_bad_settings_are_refused(kw: dict[str, Any]) -> None:
    frags = two_cuts(10.0)
    with pytest.raises(SimulationError):
        simulate(PROFILE, make_plan([("g0", ["a", "b"], 4, 100, 1)], frags), workload(frags), **kw)


def test_bad_plans_are_refused() -> None:
    frags = two_cuts(10.0)
    plan = make_plan([("g0", ["a", "b"], 4, 100, 1)], frags)
    plan["groups"][0]["replicas"] = 0
    with pytest.raises(SimulationError, match="replica"):
        simulate(PROFILE, plan, workload(frags), duration_s=2.0)
    plan = make_plan([("g0", ["a", "b"], 4, 100, 1)], frags)
    plan["groups"][0]["share"] = 30
    with pytest.raises(SimulationError, match="share"):
        simulate(PROFILE, plan, workload(frags), duration_s=2.0)
    with pytest.raises(SimulationError):
        simulate(PROFILE, plan, {"fragments": [{"id": "a"}]}, duration_s=2.0)


def test_arrival_processes() -> None:
    rng = np.random.default_rng(0)
    times, owner = arrival_times([100.0, 0.0, 300.0], 50.0, rng, "poisson")
    assert np.all(np.diff(times) >= 0) and times.min() >= 0 and times.max() < 50.0
    assert set(owner.tolist()) == {0, 2}
    for src, rate in ((0, 100.0), (2, 300.0)):
        n = int(np.sum(owner == src))
        assert abs(n - rate * 50) < 5 * np.sqrt(rate * 50)
        gaps = np.diff(times[owner == src])
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.1) and gaps.std() == pytest.approx(1 / rate, rel=0.1)
    t, o = arrival_times([4.0], 10.0, rng, "periodic")
    assert len(t) == 40 and np.allclose(np.diff(t), 0.25) and set(o.tolist()) == {0}


def test_one_hundred_thousand_requests_take_seconds() -> None:
    frags = [Fragment(f"f{c}", "m", c, 1000.0, 60.0) for c in range(4)]
    plan = make_plan([("g0", [f.id for f in frags], 8, 100, 12)], frags)
    assert verify_plan(PROFILE, frags, plan) == []
    seen: list[float] = []
    started = time.perf_counter()
    r = simulate(PROFILE, plan, workload(frags), duration_s=25.0, warmup_s=0.0, seed=0, progress=seen.append)
    wall = time.perf_counter() - started
    assert r.overall.requests == pytest.approx(100_000, rel=0.02)
    assert r.overall.slo_attainment is not None and r.overall.slo_attainment > 0.99
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert wall < 20.0, f"100k requests took {wall:.1f} s"  # ~2-4 s on one free core; lenient for busy CI
