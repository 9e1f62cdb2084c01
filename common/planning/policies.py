"""Planning policies behind one interface: ``plan(profile, fragments, policy, rho, epoch) -> Plan``.

    graft    merge → budget classes → contiguous DP over (cut, budget) + local search → allocate → place
    per-cut  one group per (model, cut) after merging identical fragments (GSLICE-style spatial
             sharing: fine-grained shares, no re-alignment); the baseline of the resource-efficiency gain
    oracle   the optimal set partition of each model's fragments (exact, exponential: at most
             ``ORACLE_LIMIT`` fragments per model, else ``PlanningError``). A yardstick for the
             heuristic's gap, not a plan to deploy: it may split the clients of one (model, cut)
             by rate with interleaved budgets, which routing by budget cannot reproduce

Every policy first sets aside the fragments that no plan can serve (unknown model, invalid cut,
a budget below ``2·L`` of the fragment alone at batch 1 on the fastest share) and reports each by id
with the reason. The result is deterministic for a given input.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

from common.planning.allocate import GroupAllocator
from common.planning.group import GroupCost, group_contiguous, group_exact, improve, sort_units
from common.planning.merge import MergedFragment, merge_identical, split_budget_classes
from common.planning.place import device_kind, place
from common.planning.types import (
    POLICIES,
    Fragment,
    Group,
    Infeasible,
    Plan,
    PlanningError,
    Route,
    check_unique_ids,
)
from common.profiles import Profile

ORACLE_LIMIT = 12
LOCAL_SEARCH_EVALUATIONS = 3000


def screen(profile: Profile, fragments: Sequence[Fragment],
           allocators: dict[str, GroupAllocator]) -> tuple[list[Fragment], list[Infeasible]]:
    """Split fragments into those some plan can serve and those none can (with the reason)."""
    ok: list[Fragment] = []
    bad: list[Infeasible] = []
    for f in fragments:
        reason = infeasibility(profile, f, allocators)
        if reason is None:
            ok.append(f)
        else:
            bad.append(Infeasible(f.id, reason))
    return ok, bad


def infeasibility(profile: Profile, f: Fragment, allocators: dict[str, GroupAllocator]) -> str | None:
    if f.model not in profile.models:
        return f"model {f.model!r} is not in the profile"
    alloc = allocators[f.model]
    if not 0 <= f.cut < alloc.n_blocks:
        return f"cut {f.cut} is not valid for {f.model} (0..{alloc.n_blocks - 1})"
    if not (math.isfinite(f.rate_rps) and f.rate_rps >= 0):
        return f"rate {f.rate_rps} req/s is not a finite non-negative number"
    lat, share = alloc.alone_latency(f.cut)
    if not 2.0 * lat <= f.budget_ms:
        return (f"budget {f.budget_ms:.2f} ms is below 2·L = {2.0 * lat:.2f} ms: {f.model} from cut {f.cut} "
                f"alone at batch 1 on share {share} (the fastest)")
    return None


def plan(profile: Profile, fragments: Sequence[Fragment], policy: str, rho: float = 0.9, epoch: int = 0,
         *, profile_name: str | None = None, oracle_limit: int = ORACLE_LIMIT, spares: int = 0) -> Plan:
    """``spares``: serving replicas added to every group beyond what its rate needs (N+1), so a group
    survives a replica's death without a gap; they count in the plan's cost."""
    if policy not in POLICIES:
        raise PlanningError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not 0.0 < rho <= 1.0:
        raise PlanningError(f"utilisation cap rho must be in (0, 1], got {rho}")
    check_unique_ids(fragments)
    allocators = {name: GroupAllocator(m, rho) for name, m in profile.models.items()}
    ok, infeasible = screen(profile, fragments, allocators)

    by_model: dict[str, list[Fragment]] = defaultdict(list)
    for f in ok:
        by_model[f.model].append(f)
    if policy == "oracle":
        for model, frags in sorted(by_model.items()):
            if len(frags) > oracle_limit:
                raise PlanningError(f"oracle: {model} has {len(frags)} fragments; the exhaustive search "
                                    f"handles at most {oracle_limit} per model")

    groups: list[Group] = []
    for model in sorted(by_model):
        allocator = allocators[model]
        members = _partition(by_model[model], policy, allocator)
        groups.extend(_build_groups(model, members, allocator, spares))
    return Plan(epoch=epoch, policy=policy, profile=profile_name or str(profile.meta.get("name", profile.device)),
                rho=rho, groups=tuple(groups), infeasible=tuple(infeasible),
                placement=place(groups, device_kind(profile)), routes=routes(groups, ok))


def _partition(frags: list[Fragment], policy: str, allocator: GroupAllocator) -> list[list[Fragment]]:
    """Fragments of one model, partitioned into groups by ``policy``."""
    if policy == "oracle":
        units = sorted(frags, key=lambda f: (f.cut, f.budget_ms, f.id))
        oracle_cost = GroupCost(units, allocator)
        return [[units[i] for i in g] for g in group_exact(len(units), oracle_cost)]
    by_id = {f.id: f for f in frags}
    merged = merge_identical(frags)
    if policy == "per-cut":
        return [[by_id[i] for i in u.members] for u in merged]
    classes: list[MergedFragment] = []
    for u in merged:
        classes.extend(split_budget_classes([by_id[i] for i in u.members], allocator))
    units_sorted = sort_units(classes)
    cost = GroupCost(units_sorted, allocator)
    partition = improve(group_contiguous(units_sorted, cost), cost, LOCAL_SEARCH_EVALUATIONS)
    return [[by_id[i] for k in g for i in units_sorted[k].members] for g in partition]


def _build_groups(model: str, members: list[list[Fragment]], allocator: GroupAllocator,
                  spares: int = 0) -> list[Group]:
    built: list[tuple[tuple[int, float, str], Group]] = []
    for frags in members:
        rates: dict[int, float] = {}
        for f in frags:
            rates[f.cut] = rates.get(f.cut, 0.0) + f.rate_rps
        budget = min(f.budget_ms for f in frags)
        alloc = allocator.allocate(rates, budget)
        if alloc is None:  # partitions come from searches that only keep feasible groups
            raise PlanningError(f"internal: group of {model} fragments {[f.id for f in frags]} is infeasible")
        ids = tuple(sorted(f.id for f in frags))
        cuts = tuple(sorted(rates))
        group = Group(id="", model=model, fragments=ids, cuts=cuts, batch=alloc.batch, share=alloc.share,
                      replicas=alloc.replicas + spares, latency_ms=alloc.latency_ms, rate_rps=sum(rates.values()),
                      min_budget_ms=budget, latency_table_ms=allocator.latency_table(rates, alloc.share, alloc.batch),
                      spares=spares)
        built.append(((cuts[0], budget, ids[0]), group))
    built.sort(key=lambda kg: kg[0])
    return [replace(g, id=f"{model}-g{i}") for i, (_, g) in enumerate(built)]


def routes(groups: Sequence[Group], fragments: Sequence[Fragment]) -> dict[str, Route]:
    """``"model:cut"`` → group id, or a budget-ordered list when budget classes split a (model, cut)."""
    by_id = {f.id: f for f in fragments}
    entries: dict[tuple[str, int], list[tuple[float, str]]] = defaultdict(list)
    for g in groups:
        floor: dict[int, float] = {}
        for fid in g.fragments:
            f = by_id[fid]
            floor[f.cut] = min(floor.get(f.cut, math.inf), f.budget_ms)
        for cut, b in floor.items():
            entries[(g.model, cut)].append((b, g.id))
    out: dict[str, Route] = {}
    for (model, cut), cands in sorted(entries.items()):
        cands.sort()
        out[f"{model}:{cut}"] = (cands[0][1] if len(cands) == 1 else
                                 [{"group": gid, "min_budget_ms": b} for b, gid in cands])
    return out
