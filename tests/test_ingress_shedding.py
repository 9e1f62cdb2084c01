"""Load-shedding policy and the statistics aggregator (pure, no Redis)."""

from __future__ import annotations

import math

import pytest

from services.ingress.shedding import Backlogs, Capacity, ShedPolicy, decide
from services.ingress.stats import StatsWindow

# 2 replicas x batch 8 every 20 ms: 800 req/s, so each queued entry adds 1.25 ms of wait.
CAP = Capacity(replicas=2, batch=8, latency_ms=20.0)


def test_service_rate_from_the_plan() -> None:
    assert CAP.rate_rps == pytest.approx(800.0)
    assert CAP.wait_ms(80) == pytest.approx(100.0)
    assert CAP.wait_ms(0) == 0.0
    assert Capacity(0, 8, 20.0).wait_ms(1) == math.inf
    assert Capacity(1, 8, 0.0).rate_rps == 0.0


def test_empty_backlog_always_routes_even_with_a_tight_budget() -> None:
    assert not decide(CAP, 0, budget_ms=5.0).shed


@pytest.mark.parametrize(("backlog", "budget", "shed"), [
    (80, 121.0, False),   # 100 ms wait + 20 ms batch < 121 ms
    (80, 120.0, True),    # exactly at the budget: would miss
    (80, 60.0, True),
    (8, 50.0, False),
    (4000, 1000.0, True),
])
def test_shed_when_wait_plus_latency_reaches_budget(backlog: int, budget: float, shed: bool) -> None:
    d = decide(CAP, backlog, budget)
    assert d.shed is shed
    if shed:
        assert d.retry_after_ms == math.ceil(CAP.wait_ms(backlog))


def test_retry_after_is_bounded_and_positive() -> None:
    assert decide(CAP, 1, 0.5).retry_after_ms == 2  # 1.25 ms rounds up
    assert decide(Capacity(0, 1, 1.0), 5, 100.0, max_retry_ms=3000).retry_after_ms == 3000
    assert decide(CAP, 10**9, 100.0, max_retry_ms=3000).retry_after_ms == 3000


def test_backlog_counts_routed_since_last_poll() -> None:
    b = Backlogs()
    b.update({"g0": 10})
    b.routed("g0", 5)
    b.routed("g1")
    assert (b.backlog("g0"), b.backlog("g1"), b.backlog("g2")) == (15, 1, 0)
    assert b.snapshot() == {"g0": 15, "g1": 1}
    b.update({"g0": 3})
    assert (b.backlog("g0"), b.backlog("g1")) == (3, 0)


def test_backlog_keeps_what_was_routed_while_a_poll_was_in_flight() -> None:
    b = Backlogs()
    b.routed("g0", 4)
    mark = b.mark()
    b.routed("g0", 2)  # routed after the poll was sent: the poll may not include these
    b.update({"g0": 10}, since=mark)
    assert b.backlog("g0") == 12


def test_policy_counts_admitted_requests_toward_later_ones() -> None:
    backlogs = Backlogs()
    backlogs.update({"g0": 0})
    policy = ShedPolicy({"g0": CAP}, backlogs)
    # Budget 30 ms: 20 ms batch + wait < 10 ms, i.e. fewer than 8 queued ahead.
    decisions = [policy.admit("g0", 30.0) for _ in range(12)]
    assert [d.shed for d in decisions] == [False] * 8 + [True] * 4
    assert backlogs.backlog("g0") == 8  # shed requests do not join the queue
    assert not policy.admit("g0", 1000.0).shed


def test_policy_routes_groups_without_capacity_info() -> None:
    backlogs = Backlogs()
    policy = ShedPolicy({}, backlogs)
    assert not policy.admit("ghost", 1.0).shed
    assert backlogs.backlog("ghost") == 1


# ----------------------------------------------------------------------------------------- stats


def test_stats_window_aggregates_per_fragment() -> None:
    w = StatsWindow("ingress-a", start=100.0)
    for budget in (30.0, 10.0, 50.0):
        w.record_routed("resnet18", 3, budget)
    w.record_shed("resnet18", 3, 5.0)
    w.record_routed("resnet18", 0, 80.0)
    w.record_routed("mobilenet_v2", 7, 40.0)
    w.record_rejected("BAD_CUT")
    w.record_rejected("BAD_CUT")
    w.record_rejected("UNKNOWN_MODEL")
    body = w.flush(101.5)
    assert body["ingress"] == "ingress-a" and body["ts"] == 101.5 and body["window_s"] == pytest.approx(1.5)
    assert body["accepted"] == 5 and body["shed"] == 1
    assert body["rejected"] == {"BAD_CUT": 2, "UNKNOWN_MODEL": 1}
    assert body["fragments"] == [
        {"model": "mobilenet_v2", "cut": 7, "count": 1, "min_budget_ms": 40.0, "p50_budget_ms": 40.0},
        {"model": "resnet18", "cut": 0, "count": 1, "min_budget_ms": 80.0, "p50_budget_ms": 80.0},
        {"model": "resnet18", "cut": 3, "count": 4, "min_budget_ms": 5.0, "p50_budget_ms": 20.0},
    ]


def test_stats_flush_starts_a_new_window() -> None:
    w = StatsWindow("i", start=0.0)
    w.record_routed("resnet18", 1, 10.0)
    w.flush(1.0)
    body = w.flush(2.0)
    assert body["fragments"] == [] and body["accepted"] == 0 and body["rejected"] == {}
    assert body["window_s"] == pytest.approx(1.0)


def test_stats_sample_is_bounded_but_min_and_count_exact() -> None:
    w = StatsWindow("i", start=0.0, sample_cap=64)
    for i in range(10_000):
        w.record_routed("resnet18", 2, float(i % 100) + 1.0)
    frag = w.flush(1.0)["fragments"][0]
    assert frag["count"] == 10_000 and frag["min_budget_ms"] == 1.0
    assert 25.0 <= frag["p50_budget_ms"] <= 75.0  # a uniform sample of a uniform 1..100
