from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from common.planning.allocate import GroupAllocator
from common.planning.group import GroupCost, group_contiguous, group_exact, improve, sort_units
from common.planning.merge import MergedFragment
from common.planning.synthetic import synthetic_profile

PROFILE = synthetic_profile({"net": (10, 1.0)}, seed=11)
NET = PROFILE.model("net")


def units_from(spec: Sequence[tuple[int, float, float]]) -> list[MergedFragment]:
    out = []
    for i, (cut, rate, budget) in enumerate(spec):
        floor = 2 * NET.suffix_latency(cut, 1, max(NET.shares))  # keep every unit feasible alone
        out.append(MergedFragment("net", cut, rate, max(budget, floor * 1.001), (f"u{i}",)))
    return sort_units(out)


def set_partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in set_partitions(rest):
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1:]]
        yield [[first], *p]


unit_spec = st.lists(st.tuples(st.integers(0, 9), st.sampled_from([0.5, 2.0, 5.0, 20.0, 80.0, 300.0]),
                               st.floats(5.0, 300.0)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(unit_spec)
def test_contiguous_dp_is_optimal_over_contiguous_runs(spec: list[tuple[int, float, float]]) -> None:
    units = units_from(spec)
    cost = GroupCost(units, GroupAllocator(NET, 0.9))
    got = cost.total(group_contiguous(units, cost))
    best = math.inf
    for mask in itertools.product([False, True], repeat=len(units) - 1):
        runs, run = [], [0]
        for i, split in enumerate(mask, start=1):
            if split:
                runs.append(run)
                run = []
            run.append(i)
        runs.append(run)
        best = min(best, cost.total(runs))
    assert got == best


@settings(max_examples=30, deadline=None)
@given(unit_spec)
def test_exact_grouping_matches_enumeration_of_all_set_partitions(spec: list[tuple[int, float, float]]) -> None:
    units = units_from(spec)
    cost = GroupCost(units, GroupAllocator(NET, 0.9))
    exact = group_exact(len(units), cost)
    assert sorted(i for g in exact for i in g) == list(range(len(units)))
    best = min(cost.total(p) for p in set_partitions(list(range(len(units)))))
    assert cost.total(exact) == best
    # the heuristics can only be worse, and local search never makes a partition worse
    contiguous = group_contiguous(units, cost)
    improved = improve(contiguous, cost)
    assert best <= cost.total(improved) <= cost.total(contiguous)
    assert sorted(i for g in improved for i in g) == list(range(len(units)))


def test_light_fragments_of_many_cuts_share_one_group() -> None:
    units = units_from([(c, 1.0, 250.0) for c in range(0, 10, 2)])
    cost = GroupCost(units, GroupAllocator(NET, 0.9))
    partition = group_contiguous(units, cost)
    assert partition == [list(range(5))]
    assert cost.total(partition) < sum(cost([i]) for i in range(5))


def test_local_search_finds_a_grouping_the_cut_order_cannot_express() -> None:
    # sorted by (cut, budget): (0, 150/s, 40 ms), (0, 300/s, 134 ms), (2, 80/s, 16 ms), (8, 20/s, 300 ms).
    # The optimum keeps the loose cut-8 fragment alone and groups the other three — the tight cut-2
    # fragment with the cut-0 ones, across the cut order the contiguous runs follow.
    units = units_from([(2, 80.0, 16.0), (8, 20.0, 300.0), (0, 300.0, 134.0), (0, 150.0, 40.0)])
    cost = GroupCost(units, GroupAllocator(NET, 0.9))
    contiguous = group_contiguous(units, cost)
    improved = improve(contiguous, cost)
    exact = group_exact(len(units), cost)
    assert cost.total(improved) < cost.total(contiguous)
    assert cost.total(improved) == cost.total(exact)
    assert [1] in improved


def test_cost_memo_counts_each_set_once() -> None:
    units = units_from([(2, 5.0, 100.0), (4, 5.0, 100.0)])
    cost = GroupCost(units, GroupAllocator(NET, 0.9))
    a, b = cost([0, 1]), cost(frozenset({1, 0}))
    assert a == b and cost.evaluations == 1
