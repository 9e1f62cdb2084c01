"""Step 1 of planning: merge identical ``(model, cut)`` fragments, then split them into budget classes.

Merging adds rates and keeps the tightest budget. That tightest budget binds the whole merged
fragment: one client with little slack forces small batches (or a bigger share) on every client of
its cut. ``split_budget_classes`` therefore partitions the clients of one ``(model, cut)``, sorted by
budget, into contiguous classes, each served on its own, and keeps a split only when it lowers the
cost (section 4) of serving that ``(model, cut)`` alone; on a tie it keeps fewer classes.

Clients whose budgets admit exactly the same grid points ``(B, g)`` always share a class (for one cut
the feasible set only grows with the budget, so it is identified by how many thresholds ``2·L(B, g)``
the budget clears). That costs no feasibility, and it keeps classes routable: two classes of one
``(model, cut)`` never hold the same budget, so ingress can tell them apart by a request's budget
(splitting equal budgets by rate alone could save a replica now and then, but no router could follow
it). Over those pools the search is an exact dynamic programme over contiguous budget runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from common.planning.allocate import CEIL_SLACK, GroupAllocator
from common.planning.types import Fragment


@dataclass(frozen=True, slots=True)
class MergedFragment:
    """Fragments of one ``(model, cut)`` served as a unit: rates added, the tightest budget."""

    model: str
    cut: int
    rate_rps: float
    budget_ms: float
    members: tuple[str, ...]


def merge(fragments: Iterable[Fragment]) -> MergedFragment:
    frags = sorted(fragments, key=lambda f: (f.budget_ms, f.id))
    if not frags or len({(f.model, f.cut) for f in frags}) != 1:
        raise ValueError("merge needs one or more fragments of a single (model, cut)")
    return MergedFragment(model=frags[0].model, cut=frags[0].cut, rate_rps=sum(f.rate_rps for f in frags),
                          budget_ms=frags[0].budget_ms, members=tuple(f.id for f in frags))


def merge_identical(fragments: Iterable[Fragment]) -> list[MergedFragment]:
    """One merged fragment per ``(model, cut)``, ordered by model then cut."""
    by_key: dict[tuple[str, int], list[Fragment]] = defaultdict(list)
    for f in fragments:
        by_key[(f.model, f.cut)].append(f)
    return [merge(by_key[k]) for k in sorted(by_key)]


def split_budget_classes(fragments: Sequence[Fragment], allocator: GroupAllocator) -> list[MergedFragment]:
    """Budget classes of the fragments of one ``(model, cut)``, tightest class first.

    Every fragment must be feasible on its own (the planner sets the others aside first).
    """
    frags = sorted(fragments, key=lambda f: (f.budget_ms, f.id))
    if not frags:
        return []
    cut = frags[0].cut
    lat = allocator.suffix_grid(cut)  # (B, shares): the same for every client of this cut
    thresholds = np.sort((2.0 * lat).ravel())
    pools: list[list[Fragment]] = []
    last_level = -1
    for f in frags:
        level = int(np.searchsorted(thresholds, f.budget_ms, side="right"))
        if level != last_level:
            pools.append([])
            last_level = level
        pools[-1].append(f)
    if len(pools) == 1:
        return [merge(frags)]

    # best per-request time L/B among the grid points a pool's tightest budget admits, per share
    per_request = lat * allocator.per_batch
    best_r = np.array([np.where(2.0 * lat <= p[0].budget_ms, per_request, np.inf).min(axis=0) for p in pools])
    rates = np.array([sum(f.rate_rps for f in p) for p in pools])
    prefix = np.concatenate([[0.0], np.cumsum(rates)])
    shares = allocator.shares.astype(np.float64)
    k = len(pools)
    dp_cost = np.zeros(k + 1)
    dp_classes = np.zeros(k + 1, dtype=np.int64)
    start_of = np.zeros(k + 1, dtype=np.int64)
    for end in range(1, k + 1):
        starts = np.arange(end)
        class_rate = prefix[end] - prefix[starts]  # pools starts..end-1; tightest budget: pool `start`
        with np.errstate(invalid="ignore"):
            need = best_r[starts] * (class_rate[:, None] / allocator.rho / 1000.0)
        replicas = np.maximum(1.0, np.ceil(need - CEIL_SLACK))
        cost = np.where(np.isfinite(best_r[starts]), replicas * shares, np.inf).min(axis=1)
        total = dp_cost[starts] + cost
        classes = dp_classes[starts] + 1
        best = int(np.lexsort((classes, total))[0])
        dp_cost[end], dp_classes[end], start_of[end] = total[best], classes[best], best
    out: list[MergedFragment] = []
    end = k
    while end > 0:
        start = int(start_of[end])
        out.append(merge([f for p in pools[start:end] for f in p]))
        end = start
    out.reverse()
    return out
