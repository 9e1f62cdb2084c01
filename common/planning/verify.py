"""An independent check of a plan against design.md section 4 (``graft plan verify``).

It reads the plan as plain JSON data and recomputes everything from the profile and the workload
through ``ModelProfile.realigned_latency`` (not the planner's vectorised tables), so a bug in the
planner's own arithmetic cannot hide itself. Rules, by the name a violation reports:

    structure   the plan is not shaped like a plan file
    rho         the utilisation cap is outside (0, 1]
    group       a group's model is unknown, its id is repeated, or it has no fragments
    coverage    a workload fragment is in no group and not infeasible, in two groups, or in both;
                or a plan names a fragment the workload does not have
    cuts        a group's cuts differ from its fragments' cuts, or a fragment's model differs
    batch       B is not an integer in 1..largest grid batch
    share       g is not a grid share
    replicas    n is not an integer >= 1
    latency     2·L(B, g) > the group's tightest budget
    throughput  n·B/L(B, g) < Λ/ρ
    report      a group's latency_ms, rate_rps or min_budget_ms disagrees with the recomputed value
    infeasible  an infeasible entry has no reason, or names a fragment that is feasible on its own
    placement   a group's replicas are not all placed with its share, a device is over its share
                capacity or over the MPS client limit, or device names repeat
    totals      total_share or gpus disagree with the groups and the placement
    routes      a route names a missing group or one that does not serve that cut, or a served cut
                has no route
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from common.planning.types import GPU_CAPACITY, MAX_CLIENTS_PER_DEVICE, Fragment
from common.profiles import Profile

REL_TOL = 1e-6


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}"


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(c) for c in x)


def _is_num(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def verify_plan(profile: Profile, fragments: Sequence[Fragment], plan: Mapping[str, Any]) -> list[Violation]:
    """Every violation of section 4 in ``plan`` for this workload (empty: the plan is OK)."""
    out: list[Violation] = []
    try:
        groups = list(plan["groups"])
        infeasible = list(plan.get("infeasible", []))
        placement = list(plan.get("placement", []))
        rho = plan["rho"]
    except (KeyError, TypeError) as exc:
        return [Violation("structure", f"missing or malformed top-level field: {exc}")]
    if not _is_num(rho) or not 0.0 < rho <= 1.0:
        return [Violation("rho", f"rho must be in (0, 1], got {rho!r}")]
    by_id = {f.id: f for f in fragments}
    seen: Counter[str] = Counter()
    ids: Counter[str] = Counter()
    total = 0
    served: dict[tuple[str, int], set[str]] = defaultdict(set)
    for g in groups:
        try:
            gid, model, frag_ids = str(g["id"]), str(g["model"]), [str(x) for x in g["fragments"]]
            cuts, batch, share, replicas = g["cuts"], g["batch"], g["share"], g["replicas"]
        except (KeyError, TypeError) as exc:
            out.append(Violation("structure", f"group {g!r} lacks a field: {exc}"))
            continue
        ids[gid] += 1
        seen.update(frag_ids)
        out.extend(_check_group(profile, by_id, rho, g, gid, model, frag_ids, cuts, batch, share, replicas))
        if _is_int(share) and _is_int(replicas):
            total += share * replicas
        if _int_list(cuts):
            for c in cuts:
                served[(model, c)].add(gid)
    out.extend(Violation("group", f"group id {gid!r} appears {n} times") for gid, n in ids.items() if n > 1)
    out.extend(_check_coverage(profile, by_id, seen, infeasible))
    out.extend(_check_placement(profile, groups, placement))
    if plan.get("total_share") != total:
        out.append(Violation("totals", f"total_share is {plan.get('total_share')!r}, groups cost {total}"))
    if plan.get("gpus") != len(placement):
        out.append(Violation("totals", f"gpus is {plan.get('gpus')!r}, placement uses {len(placement)} devices"))
    if "routes" in plan:
        out.extend(_check_routes(plan["routes"], served))
    return out


def _check_group(profile: Profile, by_id: Mapping[str, Fragment], rho: float, g: Mapping[str, Any], gid: str,
                 model: str, frag_ids: list[str], cuts: Any, batch: Any, share: Any,
                 replicas: Any) -> list[Violation]:
    out: list[Violation] = []
    if model not in profile.models:
        return [Violation("group", f"{gid}: model {model!r} is not in the profile")]
    mp = profile.models[model]
    members = [by_id[i] for i in frag_ids if i in by_id]
    if not frag_ids:
        return [Violation("group", f"{gid}: no fragments")]
    if len(members) != len(frag_ids):
        return []  # reported under coverage
    if any(f.model != model for f in members):
        out.append(Violation("cuts", f"{gid}: holds fragments of another model"))
    if not _int_list(cuts) or sorted(set(cuts)) != sorted({f.cut for f in members}):
        out.append(Violation("cuts", f"{gid}: cuts {cuts!r} differ from its fragments' cuts "
                                     f"{sorted({f.cut for f in members})}"))
    if not _is_int(batch) or not 1 <= batch <= profile.max_batch:
        out.append(Violation("batch", f"{gid}: batch {batch!r} is not an integer in 1..{profile.max_batch}"))
    if not _is_int(share) or share not in mp.shares:
        out.append(Violation("share", f"{gid}: share {share!r} is not a grid share {list(mp.shares)}"))
    if not _is_int(replicas) or replicas < 1:
        out.append(Violation("replicas", f"{gid}: replicas {replicas!r} is not an integer >= 1"))
    if out or any(not 0 <= f.cut < mp.n_blocks for f in members):
        return out
    rates: dict[int, float] = defaultdict(float)
    for f in members:
        rates[f.cut] += f.rate_rps
    total_rate = sum(rates.values())
    if total_rate > 0:
        counts = {c: batch * r / total_rate for c, r in rates.items()}
    else:
        counts = {c: batch / len(rates) for c in rates}
    lat = mp.realigned_latency(counts, share)
    budget = min(f.budget_ms for f in members)
    if 2.0 * lat > budget * (1 + 1e-9) + 1e-9:
        out.append(Violation("latency", f"{gid}: 2·L(B={batch}, g={share}) = {2 * lat:.3f} ms exceeds the "
                                        f"tightest budget {budget:.3f} ms"))
    if replicas * batch / (lat / 1000.0) < total_rate / rho * (1 - 1e-9):
        out.append(Violation("throughput", f"{gid}: {replicas} × {batch} / {lat:.3f} ms serves "
                                           f"{replicas * batch / lat * 1000:.2f} req/s < Λ/ρ = "
                                           f"{total_rate / rho:.2f} req/s"))
    for name, want in (("latency_ms", lat), ("rate_rps", total_rate), ("min_budget_ms", budget)):
        got = g.get(name)
        if not _is_num(got) or abs(float(got) - want) > REL_TOL * max(1.0, abs(want)):
            out.append(Violation("report", f"{gid}: {name} is {got!r}, recomputed {want:.6g}"))
    return out


def _alone_infeasible(profile: Profile, f: Fragment) -> bool:
    mp = profile.models.get(f.model)
    if mp is None or not 0 <= f.cut < mp.n_blocks or not (math.isfinite(f.rate_rps) and f.rate_rps >= 0):
        return True
    fastest = min(mp.realigned_latency({f.cut: 1.0}, s) for s in mp.shares)
    return not 2.0 * fastest <= f.budget_ms


def _check_coverage(profile: Profile, by_id: Mapping[str, Fragment], seen: Counter[str],
                    infeasible: list[Any]) -> list[Violation]:
    out: list[Violation] = []
    marked: Counter[str] = Counter()
    for entry in infeasible:
        if not isinstance(entry, Mapping) or "id" not in entry:
            out.append(Violation("structure", f"infeasible entry {entry!r} has no id"))
            continue
        fid = str(entry["id"])
        marked[fid] += 1
        if not str(entry.get("reason", "")).strip():
            out.append(Violation("infeasible", f"fragment {fid!r} is infeasible without a reason"))
        if fid in by_id and not _alone_infeasible(profile, by_id[fid]):
            out.append(Violation("infeasible", f"fragment {fid!r} is listed infeasible but fits alone"))
    for fid in sorted(set(seen) | set(marked)):
        if fid not in by_id:
            out.append(Violation("coverage", f"the plan names fragment {fid!r}, which the workload lacks"))
    for fid in by_id:
        n, m = seen[fid], marked[fid]
        if n + m == 0:
            out.append(Violation("coverage", f"fragment {fid!r} is in no group and not infeasible"))
        elif n > 1 or m > 1 or (n and m):
            out.append(Violation("coverage", f"fragment {fid!r} is in {n} groups and {m} infeasible entries"))
    return out


def _check_placement(profile: Profile, groups: list[Any], placement: list[Any]) -> list[Violation]:
    out: list[Violation] = []
    capacity = max(profile.shares) if profile.unit == "cpu_threads" else GPU_CAPACITY
    want = {str(g.get("id")): (g.get("share"), g.get("replicas")) for g in groups if isinstance(g, Mapping)}
    placed: Counter[str] = Counter()
    names: Counter[str] = Counter()
    for dev in placement:
        try:
            name, reps = str(dev["device"]), list(dev["replicas"])
            pairs = [(str(r["group"]), r["share"]) for r in reps]
        except (KeyError, TypeError) as exc:
            out.append(Violation("structure", f"placement entry {dev!r} is malformed: {exc}"))
            continue
        names[name] += 1
        used = 0
        for gid, share in pairs:
            placed[gid] += 1
            if gid not in want:
                out.append(Violation("placement", f"{name}: places unknown group {gid!r}"))
            elif share != want[gid][0]:
                out.append(Violation("placement", f"{name}: replica of {gid} has share {share!r}, "
                                                  f"the group's is {want[gid][0]!r}"))
            used += share if _is_int(share) else 0
        if used > capacity:
            out.append(Violation("placement", f"{name}: shares sum to {used} > {capacity}"))
        if len(pairs) > MAX_CLIENTS_PER_DEVICE:
            out.append(Violation("placement", f"{name}: {len(pairs)} replicas > the MPS limit "
                                              f"{MAX_CLIENTS_PER_DEVICE}"))
    out.extend(Violation("placement", f"device {n!r} appears {k} times") for n, k in names.items() if k > 1)
    for gid, (_, replicas) in want.items():
        if placed[gid] != replicas:
            out.append(Violation("placement", f"{gid}: {placed[gid]} replicas placed, the group has {replicas!r}"))
    return out


def _check_routes(routes: Any, served: Mapping[tuple[str, int], set[str]]) -> list[Violation]:
    if not isinstance(routes, Mapping):
        return [Violation("routes", "routes is not an object")]
    out: list[Violation] = []
    routed: set[tuple[str, int]] = set()
    for key, value in routes.items():
        model, _, cut_s = str(key).rpartition(":")
        try:
            mc = (model, int(cut_s))
        except ValueError:
            out.append(Violation("routes", f"route key {key!r} is not 'model:cut'"))
            continue
        routed.add(mc)
        if isinstance(value, str):
            targets = [value]
        elif isinstance(value, list) and all(isinstance(v, Mapping) and "group" in v for v in value):
            targets = [str(v["group"]) for v in value]
        else:
            out.append(Violation("routes", f"route {key!r} is neither a group id nor a list of groups"))
            continue
        for gid in targets:
            if gid not in served.get(mc, set()):
                out.append(Violation("routes", f"route {key!r} names {gid!r}, which does not serve that cut"))
        missing = served.get(mc, set()) - set(targets)
        if missing:
            out.append(Violation("routes", f"route {key!r} omits serving groups {sorted(missing)}"))
    for mc in sorted(set(served) - routed):
        out.append(Violation("routes", f"{mc[0]}:{mc[1]} is served but has no route"))
    return out
