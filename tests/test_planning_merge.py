from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.planning.allocate import GroupAllocator
from common.planning.merge import merge, merge_identical, split_budget_classes
from common.planning.synthetic import synthetic_profile
from common.planning.types import Fragment

PROFILE = synthetic_profile({"net": (8, 1.0), "other": (5, 0.4)}, seed=5)
ALLOC = GroupAllocator(PROFILE.model("net"), 0.9)


def test_identical_fragments_merge_rates_add_budget_is_the_tightest() -> None:
    frags = [Fragment("a", "net", 3, 5.0, 90.0), Fragment("b", "net", 3, 2.0, 40.0),
             Fragment("c", "net", 5, 1.0, 70.0), Fragment("d", "other", 3, 4.0, 50.0)]
    merged = merge_identical(frags)
    assert [(m.model, m.cut) for m in merged] == [("net", 3), ("net", 5), ("other", 3)]
    net3 = merged[0]
    assert net3.rate_rps == 7.0 and net3.budget_ms == 40.0 and net3.members == ("b", "a")
    with pytest.raises(ValueError):
        merge([frags[0], frags[2]])


def _cost(frags: list[Fragment]) -> float:
    return ALLOC.cost({frags[0].cut: sum(f.rate_rps for f in frags)}, min(f.budget_ms for f in frags))


def test_one_tight_client_is_split_off_when_it_would_shrink_everyone_s_batches() -> None:
    lat = ALLOC.suffix_grid(2)
    tight = 2 * lat[0, -1] * 1.01  # only batch 1 (or so) on the full share fits
    crowd = [Fragment(f"c{i}", "net", 2, 30.0, 400.0) for i in range(20)]
    frags = [*crowd, Fragment("tight", "net", 2, 1.0, tight)]
    classes = split_budget_classes(frags, ALLOC)
    assert len(classes) == 2
    assert classes[0].members == ("tight",) and classes[0].budget_ms == tight
    assert sorted(classes[1].members) == sorted(f.id for f in crowd)
    split_cost = sum(_cost([f for f in frags if f.id in c.members]) for c in classes)
    assert split_cost < _cost(frags)


def test_no_split_when_it_does_not_lower_the_cost() -> None:
    # light clients: one replica on the smallest share serves them all, whatever their budgets
    frags = [Fragment(f"c{i}", "net", 2, 0.5, 300.0 + 10 * i) for i in range(6)]
    classes = split_budget_classes(frags, ALLOC)
    assert len(classes) == 1 and classes[0].rate_rps == pytest.approx(3.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.5, 200.0), st.floats(10.0, 400.0)), min_size=1, max_size=6),
       st.integers(0, 7))
def test_classes_are_the_cheapest_contiguous_budget_split(clients: list[tuple[float, float]], cut: int) -> None:
    floor = 2 * float(ALLOC.suffix_grid(cut)[0].min())
    frags = [Fragment(f"c{i}", "net", cut, r, max(b, floor)) for i, (r, b) in enumerate(clients)]
    classes = split_budget_classes(frags, ALLOC)
    by_id = {f.id: f for f in frags}
    got = sum(_cost([by_id[i] for i in c.members]) for c in classes)
    # brute force over every split of the budget-sorted list into contiguous runs that never
    # separates two clients whose budgets admit the same grid points (B, g)
    order = sorted(frags, key=lambda f: (f.budget_ms, f.id))
    lat = ALLOC.suffix_grid(cut)

    def admits(f: Fragment) -> frozenset[tuple[int, int]]:
        return frozenset((i, k) for i in range(lat.shape[0]) for k in range(lat.shape[1])
                         if 2 * lat[i, k] <= f.budget_ms)

    best = math.inf
    for mask in itertools.product([False, True], repeat=len(order) - 1):
        if any(split and admits(a) == admits(b) for split, a, b in zip(mask, order, order[1:], strict=False)):
            continue
        runs, run = [], [order[0]]
        for f, cut_here in zip(order[1:], mask, strict=True):
            if cut_here:
                runs.append(run)
                run = []
            run.append(f)
        runs.append(run)
        best = min(best, sum(_cost(r) for r in runs))
    assert got == best
    assert len({c.budget_ms for c in classes}) == len(classes)  # routable: no two classes share a budget
    assert sorted(i for c in classes for i in c.members) == sorted(by_id)
    budgets = [c.budget_ms for c in classes]
    assert budgets == sorted(budgets)  # tightest class first, contiguous in budget
