"""Admission (shedding) policy, the replicas' speed factor, and the statistics aggregator (pure, no Redis)."""

from __future__ import annotations

import pytest

from common.contract.routing import GroupSpec, PlanView, Serving
from services.ingress.serving import speed, table_of
from services.ingress.shedding import REPLY_MARGIN_MS, Backlogs, GroupSpeed, Verdict, decide, speed_factor
from services.ingress.stats import StatsWindow

# One group, batches 1..8 taking 4 + 2·b ms (an affine batch cost, as measured profiles look).
TABLE = tuple(4.0 + 2.0 * b for b in range(1, 9))
ONE = GroupSpeed(replicas=1, table_ms=TABLE)
TWO = GroupSpeed(replicas=2, table_ms=TABLE)


def test_latency_follows_the_planned_table_times_the_measured_factor() -> None:
    assert ONE.latency_ms(1) == 6.0 and ONE.latency_ms(8) == 20.0
    assert ONE.latency_ms(2.5) == pytest.approx(9.0)  # linear between sizes
    assert ONE.latency_ms(40) == 20.0  # a batch never exceeds B
    assert GroupSpeed(1, TABLE, factor=1.5).latency_ms(8) == pytest.approx(30.0)


def test_prediction_counts_full_batches_ahead_and_the_own_batch() -> None:
    assert ONE.predict_ms(0) == 6.0  # alone on an idle replica
    assert ONE.predict_ms(3) == 12.0  # joins a batch of 4
    assert ONE.predict_ms(8) == pytest.approx(20.0 + 6.0)  # one full batch ahead, then alone
    assert ONE.predict_ms(20) == pytest.approx(2 * 20.0 + 14.0)
    assert TWO.predict_ms(8) == pytest.approx(ONE.predict_ms(4))  # two replicas split the backlog


def test_a_light_load_is_never_shed() -> None:
    """The old policy shed at light load: it costed every request as a whole batch behind every request
    routed since the last poll (a third request in one poll window with B=1 and 60 ms was refused)."""
    b1 = GroupSpeed(replicas=1, table_ms=(25.0,))  # B = 1, L = 25 ms, budget 60 ms
    assert decide(b1, backlog=0, budget_ms=60.0).verdict is Verdict.ROUTE
    assert decide(b1, backlog=1, budget_ms=60.0).verdict is Verdict.ROUTE  # one ahead: 50 ms
    assert decide(b1, backlog=2, budget_ms=60.0).verdict is Verdict.SHED  # two ahead: 75 ms
    for q in range(8):
        assert decide(ONE, q, budget_ms=60.0).verdict is Verdict.ROUTE


@pytest.mark.parametrize(("backlog", "budget", "verdict"), [
    (0, 60.0, Verdict.ROUTE),
    (16, 60.0, Verdict.ROUTE),  # two full batches ahead: 40 + 6 ms
    (24, 60.0, Verdict.SHED),  # three: 60 + 6 ms
    (7, 20.0 + REPLY_MARGIN_MS, Verdict.ROUTE),  # its own batch of 8 just fits with the reply margin
    (7, 20.0 + REPLY_MARGIN_MS - 0.1, Verdict.SHED),
    (0, 6.0 + REPLY_MARGIN_MS - 0.1, Verdict.HOPELESS),  # below the fastest run: no retry can help
])
def test_verdicts(backlog: int, budget: float, verdict: Verdict) -> None:
    assert decide(ONE, backlog, budget).verdict is verdict


def test_retry_after_is_the_excess_and_bounded() -> None:
    d = decide(ONE, 24, 60.0)
    assert d.verdict is Verdict.SHED
    assert d.retry_after_ms == pytest.approx(66.0 + REPLY_MARGIN_MS - 60.0, abs=1)
    assert decide(ONE, 10**7, 60.0, max_retry_ms=3000).retry_after_ms == 3000
    assert decide(ONE, 24, 60.0).retry_after_ms >= 1


def test_a_slower_host_sheds_earlier() -> None:
    slow = GroupSpeed(1, TABLE, factor=2.0)
    assert decide(ONE, 16, 60.0).verdict is Verdict.ROUTE
    assert decide(slow, 16, 60.0).verdict is Verdict.SHED


def test_speed_factor_is_the_median_ratio_over_the_plans_scale() -> None:
    assert speed_factor([], 1.0) == 1.0
    assert speed_factor([1.0, 3.0, 2.0], 1.0) == 2.0
    assert speed_factor([1.0, 3.0], 2.0) == 1.0  # the plan already assumed a 2x slower host


def test_speed_of_a_group_reads_live_replicas_and_the_plan_table() -> None:
    g = {"id": "m-g0", "model": "m", "cuts": [0, 2], "batch": 4, "share": 1, "replicas": 2, "latency_ms": 10.0,
         "latency_table_ms": [4.0, 6.0, 8.0, 10.0]}
    view = PlanView({"epoch": 3, "groups": [g], "latency_scale": {"m": 2.0}})
    stream = view.stream("m-g0")
    got = speed(view, view.groups["m-g0"], Serving({stream: 2}, {stream: [4.0, 3.0, 5.0]}))
    assert got.replicas == 2 and got.table_ms == (4.0, 6.0, 8.0, 10.0) and got.factor == pytest.approx(2.0)
    spec = GroupSpec("x", "m", (0,), 4, 1, 1, 10.0, 0.0, 0.0)  # a plan without a table
    assert table_of(spec) == (2.5, 5.0, 7.5, 10.0)


def test_backlog_counts_routed_since_last_poll() -> None:
    b = Backlogs()
    b.update({"g0": 10})
    b.routed("g0", 5)
    b.routed("g1")
    assert (b.backlog("g0"), b.backlog("g1"), b.backlog("g2")) == (15, 1, 0)
    assert b.snapshot() == {"g0": 15, "g1": 1}
    b.update({"g0": 3})  # completions count the moment the poll sees them
    assert (b.backlog("g0"), b.backlog("g1")) == (3, 0)


def test_backlog_keeps_what_was_routed_while_a_poll_was_in_flight() -> None:
    b = Backlogs()
    b.routed("g0", 4)
    mark = b.mark()
    b.routed("g0", 2)  # routed after the poll was sent: the poll may not include these
    b.update({"g0": 10}, since=mark)
    assert b.backlog("g0") == 12


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
        {"model": "mobilenet_v2", "cut": 7, "count": 1, "min_budget_ms": 40.0, "p50_budget_ms": 40.0,
         "budgets": [[40.0, 1]]},
        {"model": "resnet18", "cut": 0, "count": 1, "min_budget_ms": 80.0, "p50_budget_ms": 80.0,
         "budgets": [[80.0, 1]]},
        {"model": "resnet18", "cut": 3, "count": 4, "min_budget_ms": 5.0, "p50_budget_ms": 20.0,
         "budgets": [[5.0, 1], [10.0, 1], [30.0, 1], [50.0, 1]]},
    ]


def test_stats_budget_classes_keep_a_tight_client_apart() -> None:
    """One 2 ms client among 500 ms ones: its own class, so the planner can set it aside alone."""
    w = StatsWindow("i", start=0.0)
    for _ in range(99):
        w.record_routed("resnet18", 0, 500.0)
    w.record_routed("resnet18", 0, 2.0)
    w.record_routed("resnet18", 0, 450.0)  # within 25% of 500: the same class as 500 or the next one
    frag = w.flush(1.0)["fragments"][0]
    assert frag["budgets"][0] == [2.0, 1]
    assert sum(n for _, n in frag["budgets"]) == 101 and len(frag["budgets"]) <= 3


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
