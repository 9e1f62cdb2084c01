"""Admission (shedding) policy, the replicas' speed factor, and the statistics aggregator (pure, no Redis)."""

from __future__ import annotations

import math

import pytest

from common.contract.routing import GroupSpec, PlanView, Serving
from services.ingress.serving import speed, table_of
from services.ingress.shedding import (
    REPLY_MARGIN_MS,
    Backlogs,
    DrainMeter,
    GroupSpeed,
    Verdict,
    decide,
    speed_factor,
)
from services.ingress.stats import StatsWindow

# One group, batches 1..8 taking 4 + 2·b ms (an affine batch cost, as measured profiles look); the
# table alone predicts (headroom 1), the saturated case has its own tests.
TABLE = tuple(4.0 + 2.0 * b for b in range(1, 9))
ONE = GroupSpeed(replicas=1, table_ms=TABLE, headroom=1.0)
TWO = GroupSpeed(replicas=2, table_ms=TABLE, headroom=1.0)


def test_latency_follows_the_planned_table_times_the_measured_factor() -> None:
    assert ONE.latency_ms(1) == 6.0 and ONE.latency_ms(8) == 20.0
    assert ONE.latency_ms(2.5) == pytest.approx(9.0)  # linear between sizes
    assert ONE.latency_ms(40) == 20.0  # a batch never exceeds B
    assert GroupSpeed(1, TABLE, factor=1.5, headroom=1.0).latency_ms(8) == pytest.approx(30.0)


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
    slow = GroupSpeed(1, TABLE, factor=2.0, headroom=1.0)
    assert decide(ONE, 16, 60.0).verdict is Verdict.ROUTE
    assert decide(slow, 16, 60.0).verdict is Verdict.SHED


def test_a_saturated_group_is_judged_by_its_measured_drain() -> None:
    """The old policy costed a flat-out group by the table times the compute ratio alone: on a host
    where the group really finishes 0.2 entries/ms (a round of 8 every 40 ms, not 20), it admitted a
    queue the replicas could not clear in the budget (overload-5x: 51-62% of admitted in budget)."""
    measured = GroupSpeed(1, TABLE, drain_per_ms=0.2, headroom=1.0)
    assert measured.predict_ms(16) == pytest.approx(3 * 8 / 0.2)  # two rounds ahead and its own, at 40 ms
    assert decide(ONE, 100, 500.0).verdict is Verdict.ROUTE  # the table: 12 rounds of 20 ms
    assert decide(measured, 100, 500.0).verdict is Verdict.SHED  # the drain: 13 rounds of 40 ms
    assert measured.drain_rate_per_ms() == 0.2
    # A drain faster than the table never makes a prediction more optimistic than the table.
    assert GroupSpeed(1, TABLE, drain_per_ms=100.0, headroom=1.0).predict_ms(16) == ONE.predict_ms(16)
    # Below saturation (two full batches per replica) the drain is not used.
    assert measured.predict_ms(15) == ONE.predict_ms(15)


def test_a_saturated_group_holds_its_queue_to_part_of_the_budget() -> None:
    """Under overload the queue settles where admission stops: without a headroom every admitted
    request sits at the edge of its budget (overload-5x at headroom 1: 51-62% of admitted in budget)."""
    held = GroupSpeed(1, TABLE, drain_per_ms=0.2, headroom=2.0)
    assert held.predict_ms(16) == pytest.approx(2 * 120.0)
    assert decide(held, 40, 500.0).verdict is Verdict.ROUTE  # 6 rounds of 40 ms, twice: 480 ms
    assert decide(held, 48, 500.0).verdict is Verdict.SHED  # 7 rounds: 560 ms
    # The retry hint is the real time the queue needs to shrink to where admission resumes.
    assert decide(held, 48, 500.0).retry_after_ms == math.ceil((560.0 + REPLY_MARGIN_MS - 500.0) / 2)
    # Saturated but not measured yet (the first sample takes a while): the table, with the headroom.
    assert GroupSpeed(1, TABLE, headroom=2.0).predict_ms(16) == pytest.approx(2 * ONE.predict_ms(16))
    assert GroupSpeed(1, TABLE, headroom=2.0).predict_ms(15) == ONE.predict_ms(15)  # not saturated


def test_the_drain_is_measured_only_while_saturated() -> None:
    m = DrainMeter(sample_ms=100.0, alpha=0.5, forget_ms=1_000.0)
    s = "graft:g:1:g0"
    m.update(s, backlog=40, acked=0, saturated_at=16, now_ms=0.0)
    assert m.per_ms(s, 0.0) is None  # a stretch needs one sample first
    m.update(s, backlog=40, acked=5, saturated_at=16, now_ms=50.0)
    assert m.per_ms(s, 50.0) is None  # shorter than a sample
    m.update(s, backlog=40, acked=20, saturated_at=16, now_ms=100.0)
    assert m.per_ms(s, 100.0) == pytest.approx(0.2)
    m.update(s, backlog=40, acked=60, saturated_at=16, now_ms=200.0)
    assert m.per_ms(s, 200.0) == pytest.approx(0.5 * 0.2 + 0.5 * 0.4)  # smoothed
    assert m.per_ms(s, 1_300.0) is None  # stale
    # Below saturation the ack rate is the arrival rate, not the capacity: the stretch ends.
    m.update(s, backlog=15, acked=70, saturated_at=16, now_ms=300.0)
    assert m.per_ms(s, 300.0) is None
    for t, acked in ((400.0, 80), (500.0, 90)):
        m.update(s, backlog=16, acked=acked, saturated_at=16, now_ms=t)
    assert m.per_ms(s, 500.0) == pytest.approx(0.1)  # a new stretch, measured afresh
    m.update(s, backlog=16, acked=3, saturated_at=16, now_ms=600.0)  # the group was re-created
    assert m.per_ms(s, 600.0) is None
    m.update(s, backlog=99, acked=None, saturated_at=16, now_ms=700.0)  # Redis < 7.0: no counter
    assert m.per_ms(s, 700.0) is None


def test_a_plan_switch_forgets_retired_streams() -> None:
    m = DrainMeter(sample_ms=10.0)
    for stream in ("old", "kept"):
        m.update(stream, backlog=50, acked=0, saturated_at=8, now_ms=0.0)
        m.update(stream, backlog=50, acked=10, saturated_at=8, now_ms=10.0)
    m.forget(["kept", "new"])
    assert m.per_ms("old", 10.0) is None and m.per_ms("kept", 10.0) == pytest.approx(1.0)


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
