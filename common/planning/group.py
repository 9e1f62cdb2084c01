"""Step 2 of planning: partition the merged fragments of one model into groups (re-alignment).

``group_contiguous`` is a dynamic programme over the merged fragments sorted by cut, then budget:
it finds the cheapest partition into *contiguous* runs. The partition "one group per cut" is such a
partition, so graft never costs more than per-cut serving. With profiles whose latency grows with
the batch, extending a run towards earlier cuts can only raise its cost (a bigger batch reaches
every block, the rate grows, the budget shrinks); the programme uses that to stop early.

``improve`` is a local search over arbitrary partitions (merge two groups, move one merged fragment
to another group or alone), accepting strict improvements only, within an evaluation budget. It
reaches groupings the contiguous order cannot express, e.g. the tight budget classes of two cuts
together and their loose classes together.

``group_exact`` is the oracle: the optimal set partition, by dynamic programming over subsets
(it visits every set partition implicitly, as enumerating all Bell-number partitions would, in
O(3^m) instead of O(B_m)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from common.planning.allocate import GroupAllocator

Partition = list[list[int]]


class Unit(Protocol):
    @property
    def cut(self) -> int: ...
    @property
    def rate_rps(self) -> float: ...
    @property
    def budget_ms(self) -> float: ...


U = TypeVar("U", bound=Unit)


def sort_units(units: Sequence[U]) -> list[U]:
    return sorted(units, key=lambda u: (u.cut, u.budget_ms))


class GroupCost:
    """Cost of a set of units (indices into ``units``) on one model, memoised by the set."""

    def __init__(self, units: Sequence[Unit], allocator: GroupAllocator) -> None:
        self.units = units
        self.allocator = allocator
        self._memo: dict[frozenset[int], float] = {}
        self.evaluations = 0

    def __call__(self, members: Sequence[int] | frozenset[int]) -> float:
        key = members if isinstance(members, frozenset) else frozenset(members)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        rates: dict[int, float] = {}
        budget = math.inf
        for i in key:
            u = self.units[i]
            rates[u.cut] = rates.get(u.cut, 0.0) + u.rate_rps
            budget = min(budget, u.budget_ms)
        self.evaluations += 1
        cost = self.allocator.cost(rates, budget)
        self._memo[key] = cost
        return cost

    def total(self, partition: Partition) -> float:
        return sum(self(g) for g in partition)


def group_contiguous(units: Sequence[Unit], cost: Callable[[Sequence[int]], float]) -> Partition:
    """Cheapest partition of ``units`` (already in cut, budget order) into contiguous runs."""
    m = len(units)
    best = [0.0] + [math.inf] * m
    groups = [0] * (m + 1)
    start_of = [0] * (m + 1)
    for end in range(1, m + 1):
        for start in range(end - 1, -1, -1):
            c = cost(range(start, end))
            if c == math.inf or c >= best[end]:
                break  # runs starting earlier cost at least as much (see module docstring)
            total = best[start] + c
            if total < best[end] or (total == best[end] and groups[start] + 1 < groups[end]):
                best[end], groups[end], start_of[end] = total, groups[start] + 1, start
    if best[m] == math.inf:
        raise ValueError("a unit is infeasible on its own; set it aside before grouping")
    out: Partition = []
    end = m
    while end > 0:
        out.append(list(range(start_of[end], end)))
        end = start_of[end]
    out.reverse()
    return out


def improve(partition: Partition, cost: GroupCost, max_evaluations: int = 4000) -> Partition:
    """Local search: merge pairs of groups, move single units; strict improvements only."""
    groups = [list(g) for g in partition]
    stop_at = cost.evaluations + max_evaluations
    # merges first: fewer, larger groups are where re-alignment pays
    while cost.evaluations < stop_at and (_merge_once(groups, cost) or _move_once(groups, cost, stop_at)):
        pass
    return sorted((sorted(g) for g in groups if g), key=lambda g: g[0])


def _merge_once(groups: Partition, cost: GroupCost) -> bool:
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            joined = groups[a] + groups[b]
            if cost(joined) < cost(groups[a]) + cost(groups[b]):
                groups[a] = sorted(joined)
                del groups[b]
                return True
    return False


def _move_once(groups: Partition, cost: GroupCost, stop_at: int) -> bool:
    """Move the first unit whose best move (to another group, or alone) saves something."""
    for a in range(len(groups)):
        if len(groups[a]) == 1:
            continue
        now = cost(groups[a])
        for u in groups[a]:
            rest = [i for i in groups[a] if i != u]
            best_gain, best_to = now - cost(rest) - cost([u]), -1  # -1: alone
            for b in range(len(groups)):
                if b == a or cost.evaluations >= stop_at:
                    continue
                gain = now + cost(groups[b]) - cost(rest) - cost([*groups[b], u])
                if gain > best_gain:
                    best_gain, best_to = gain, b
            if best_gain > 0:
                groups[a] = rest
                if best_to == -1:
                    groups.append([u])
                else:
                    groups[best_to] = sorted([*groups[best_to], u])
                return True
    return False


def group_exact(m: int, cost: Callable[[Sequence[int]], float]) -> Partition:
    """Optimal set partition of units ``0..m-1`` (dynamic programming over subsets)."""
    full = (1 << m) - 1
    subset_cost = [math.inf] * (full + 1)
    for mask in range(1, full + 1):
        subset_cost[mask] = cost([i for i in range(m) if mask >> i & 1])
    best = [math.inf] * (full + 1)
    choice = [0] * (full + 1)
    best[0] = 0.0
    for mask in range(1, full + 1):
        low = mask & -mask  # the lowest unit joins some group: fixing it avoids counting partitions twice
        rest = mask ^ low
        sub = rest
        while True:
            group = sub | low
            total = subset_cost[group] + best[mask ^ group]
            if total < best[mask]:
                best[mask], choice[mask] = total, group
            if sub == 0:
                break
            sub = (sub - 1) & rest
    if best[full] == math.inf:
        raise ValueError("a unit is infeasible on its own; set it aside before grouping")
    out: Partition = []
    mask = full
    while mask:
        out.append([i for i in range(m) if choice[mask] >> i & 1])
        mask ^= choice[mask]
    return sorted(out, key=lambda g: g[0])
