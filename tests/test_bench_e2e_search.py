"""The search of ``graft bench e2e`` (sweep, bisection, confirmation) on a fake system: which rates it
tries and what it reports."""

from __future__ import annotations

import asyncio
from typing import Any

from tools.bench_e2e import Bench, Point


def fake_bench(passes: Any) -> tuple[Bench, list[tuple[str, float]]]:
    """A ``Bench`` whose points pass by ``passes(rate, phase)``; the tried (phase, rate) in order."""
    tried: list[tuple[str, float]] = []
    bench = object.__new__(Bench)

    async def point(policy: str, budget: float, rate: float, phase: str) -> Point:
        tried.append((phase, rate))
        ok = passes(rate, phase)
        return Point(policy, budget, rate, len(tried), phase, {"slo_attainment": 1.0 if ok else 0.9}, 1, [], 1, 1, [1])

    bench.point = point  # type: ignore[method-assign]
    return bench, tried


def search(bench: Bench) -> Any:
    return asyncio.run(bench.search("graft", 100.0, 252.0, 2_000.0, bisect_steps=2, on_point=lambda p: None))


def test_single_points_pass_higher_than_confirmations_and_the_search_still_reports_a_load() -> None:
    # As seen on 2026-12-04: single points passed up to 638 req/s, three in a row only below 500.
    bench, tried = fake_bench(lambda rate, phase: rate <= (640.0 if phase != "confirm" else 500.0))
    s = search(bench)
    assert [r for ph, r in tried if ph == "sweep"] == [252.0, 378.0, 567.0, 850.5]
    assert s.confirmed and 400.0 < s.max_rps <= 500.0 and s.best_single_rps >= 567.0
    assert all(p.rate_rps == s.max_rps for p in s.confirmed) and len(s.confirmed) == 3


def test_a_load_that_never_confirms_reports_none() -> None:
    bench, tried = fake_bench(lambda rate, phase: phase != "confirm")
    s = search(bench)
    assert not s.confirmed and s.max_rps == 0.0
    assert sum(1 for ph, _ in tried if ph == "confirm") == 18  # six rounds of three, then it stops
