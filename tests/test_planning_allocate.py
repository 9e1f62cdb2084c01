from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.planning.allocate import GroupAllocator
from common.planning.synthetic import synthetic_profile
from common.profiles import make_profile

PROFILE = synthetic_profile({"net": (9, 1.0)}, seed=3)
NET = PROFILE.model("net")


def brute_force(cut_rates: dict[int, float], budget: float, rho: float) -> tuple[float, int, float] | None:
    """Section 4 by the letter, one grid point at a time: (cost, replicas, latency) of the best point —
    the cheapest, then fewest replicas, then the largest batch, then the lowest latency."""
    total = sum(cut_rates.values())
    best: tuple[float, int, float] | None = None
    best_key: tuple[float, int, int, float] | None = None
    for b in range(1, PROFILE.max_batch + 1):
        counts = {c: b * r / total for c, r in cut_rates.items()}
        for g in NET.shares:
            lat = NET.realigned_latency(counts, g)
            if 2 * lat > budget:
                continue
            n = max(1, math.ceil(total / rho * (lat / 1000) / b - 1e-9))
            key = (float(n * g), n, -b, lat)
            if best_key is None or key < best_key:
                best_key, best = key, (float(n * g), n, lat)
    return best


cut_rates_st = st.dictionaries(st.integers(0, 8), st.floats(0.1, 400.0), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(cut_rates=cut_rates_st)
def test_latency_grid_matches_the_profile_definition(cut_rates: dict[int, float]) -> None:
    alloc = GroupAllocator(NET, 0.9)
    grid = alloc.latency_grid(cut_rates)
    total = sum(cut_rates.values())
    for b in (1, 3, 7, 16, 32):
        for k, g in enumerate(NET.shares):
            want = NET.realigned_latency({c: b * r / total for c, r in cut_rates.items()}, g)
            assert grid[b - 1, k] == pytest.approx(want, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(cut_rates=cut_rates_st, budget=st.floats(2.0, 400.0), rho=st.sampled_from([0.5, 0.9, 1.0]))
def test_allocation_is_the_cheapest_grid_point(cut_rates: dict[int, float], budget: float, rho: float) -> None:
    alloc = GroupAllocator(NET, rho)
    got = alloc.allocate(cut_rates, budget)
    want = brute_force(cut_rates, budget, rho)
    if want is None:
        assert got is None and alloc.cost(cut_rates, budget) == math.inf
        return
    assert got is not None
    assert (got.cost, got.replicas) == (want[0], want[1])
    assert got.latency_ms == pytest.approx(want[2], rel=1e-9)
    assert alloc.cost(cut_rates, budget) == got.cost
    assert 2 * got.latency_ms <= budget
    assert got.replicas * got.batch / (got.latency_ms / 1000) >= sum(cut_rates.values()) / rho * (1 - 1e-9)


def test_a_light_group_still_costs_one_replica_on_the_smallest_share_that_meets_the_budget() -> None:
    alloc = GroupAllocator(NET, 0.9)
    lat1 = alloc.suffix_grid(0)[0]  # batch 1 at every share
    budget = 2 * lat1[3] + 1e-6  # share index 3 is the first share fast enough
    assert 2 * lat1[2] > budget
    got = alloc.allocate({0: 0.01}, budget)
    assert got is not None and got.replicas == 1 and got.share == NET.shares[3] and got.batch == 1


def test_heavier_load_costs_more_and_never_batches_less() -> None:
    alloc = GroupAllocator(NET, 0.9)
    light, heavy = alloc.allocate({4: 5.0}, 200.0), alloc.allocate({4: 5000.0}, 200.0)
    assert light is not None and heavy is not None
    assert heavy.batch >= light.batch and heavy.cost > light.cost


def test_at_equal_cost_the_largest_feasible_batch_wins() -> None:
    # A light group fits one replica at the smallest share at any feasible batch: the plan keeps the
    # largest one, the headroom a Poisson burst needs (an eager replica only fills it when a queue builds).
    alloc = GroupAllocator(NET, 0.9)
    got = alloc.allocate({4: 5.0}, 200.0)
    assert got is not None
    lat = alloc.latency_grid({4: 5.0})[:, list(NET.shares).index(got.share)]
    feasible = [b + 1 for b in range(len(lat)) if 2 * lat[b] <= 200.0]
    assert got.replicas == 1 and got.batch == max(feasible) > 1


def test_zero_rate_group_counts_each_cut_equally() -> None:
    alloc = GroupAllocator(NET, 0.9)
    grid = alloc.latency_grid({2: 0.0, 6: 0.0})
    assert grid[3, 0] == pytest.approx(NET.realigned_latency({2: 2.0, 6: 2.0}, NET.shares[0]))
    got = alloc.allocate({2: 0.0, 6: 0.0}, 500.0)
    assert got is not None and got.replicas == 1


def test_zero_rate_group_on_a_budget_only_fast_shares_meet() -> None:
    alloc = GroupAllocator(NET, 0.9)
    lat1 = alloc.suffix_grid(1)[0]
    budget = 2 * lat1[5] + 1e-9  # shares below index 5 are too slow even at batch 1
    got = alloc.allocate({1: 0.0}, budget)
    assert got is not None and (got.share, got.replicas, got.batch) == (NET.shares[5], 1, 1)
    assert alloc.cost({1: 0.0}, budget) == got.cost
    assert alloc.cost({1: 0.0}, 1e-3) == math.inf and alloc.allocate({1: 0.0}, 1e-3) is None


def test_below_the_smallest_grid_batch_and_beyond_the_largest() -> None:
    # a profile whose grid starts at batch 2 and ends at 4: B = 1 reads batch 2, B = 8 extrapolates
    blocks = [{"name": "a", "out_bytes": 10, "latency_ms": [[4.0, 2.0], [6.0, 3.0]]},
              {"name": "b", "out_bytes": 10, "latency_ms": [[1.0, 1.0], [2.0, 1.5]]}]
    prof = make_profile("estimated", "t", "gpu_share_pct", [2, 4], [50, 100],
                        {"m": {"input_shape": [1], "input_bytes": 8, "blocks": blocks}})
    alloc = GroupAllocator(prof.model("m"), 1.0)
    grid = alloc.latency_grid({0: 1.0})
    assert grid[0].tolist() == pytest.approx([5.0, 3.0])  # B = 1 clamps to batch 2
    assert grid[3].tolist() == pytest.approx([8.0, 4.5])  # B = 4 on the grid
    assert alloc.max_batch == 4
    assert np.all(np.diff(grid, axis=0) >= 0)


def test_rho_must_be_a_fraction() -> None:
    with pytest.raises(ValueError):
        GroupAllocator(NET, 0.0)
