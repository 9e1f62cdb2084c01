from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.batching import BatchPolicy, Decision, EdfQueue, Pending, ProfileLatency, profile_latency
from common.profiles import ProfileError, make_profile


def _tiny_profile():  # type: ignore[no-untyped-def]
    """4 blocks; block j at batch b and share 100 costs (j+1)·(1 + 0.5·b) ms (half as fast at share 50)."""
    batches, shares = [1, 2, 4, 8], [50, 100]
    blocks = [{"name": f"b{j}", "out_bytes": 1000 * (4 - j), "flops": 1,
               "latency_ms": [[2 * (j + 1) * (1 + 0.5 * b), (j + 1) * (1 + 0.5 * b)] for b in batches]}
              for j in range(4)]
    return make_profile("estimated", "test", "gpu_share_pct", batches, shares,
                        {"m": {"input_shape": [3, 8, 8], "input_bytes": 768, "blocks": blocks}})


MODEL = _tiny_profile().model("m")
LAT = profile_latency(MODEL, 100)


def constant(seconds: float):  # type: ignore[no-untyped-def]
    def lat(counts: Mapping[int, int]) -> float:
        return seconds
    return lat


def req(i: int, deadline: float, cut: int = 0, arrival: float = 0.0) -> Pending:
    return Pending(f"r{i}", cut, deadline, arrival)


def test_the_reply_after_the_compute_counts_against_the_deadline() -> None:
    def per_item(counts: Mapping[int, int]) -> float:  # 10 ms a request
        return 0.010 * sum(counts.values())

    # 12 ms left: the compute (10 ms) fits, the compute and its 3 ms reply do not: dropped, not run late.
    tight = [req(0, 0.012), req(1, 1.0)]
    d = BatchPolicy(4, per_item, tail_s=0.003, eager=True).decide(tight, 0.0)
    assert [p.req_id for p in d.drop] == ["r0"] and [p.req_id for p in d.launch] == ["r1"]
    assert [p.req_id for p in BatchPolicy(4, per_item, eager=True).decide(tight, 0.0).launch] == ["r0"]  # no tail: run
    # A batch of two (20 ms) would end at 23 ms with its reply, past the head's 22 ms: the head runs alone.
    pair = [req(0, 0.022), req(1, 0.5)]
    d = BatchPolicy(4, per_item, tail_s=0.003, eager=True).decide(pair, 0.0)
    assert [p.req_id for p in d.launch] == ["r0"] and d.drop == []
    assert len(BatchPolicy(4, per_item, eager=True).decide(pair, 0.0).launch) == 2


def test_empty_queue_waits_for_an_arrival() -> None:
    assert BatchPolicy(4, LAT).decide([], 1.0) == Decision([], [], None, 0.0)
    assert BatchPolicy(4, LAT).decide(EdfQueue(), 1.0).wait_s is None


def test_full_batch_launches_at_once_in_edf_order() -> None:
    pol = BatchPolicy(3, constant(0.01))
    queue = [req(0, 5.0), req(1, 2.0), req(2, 9.0), req(3, 3.0), req(4, 4.0)]
    d = pol.decide(queue, 0.0)
    assert [p.req_id for p in d.launch] == ["r1", "r3", "r4"]
    assert d.drop == [] and d.wait_s == 0.0 and d.predicted_s == pytest.approx(0.01)


def test_not_full_waits_exactly_until_the_slack_runs_out() -> None:
    pol = BatchPolicy(8, constant(0.010))
    queue = [req(0, 0.100), req(1, 0.150)]
    d = pol.decide(queue, 0.0)
    assert d.launch == [] and d.drop == [] and d.wait_s == pytest.approx(0.090)
    later = pol.decide(queue, 0.090)
    assert [p.req_id for p in later.launch] == ["r0", "r1"] and later.wait_s is None
    assert BatchPolicy(8, constant(0.010), margin_s=0.005).decide(queue, 0.0).wait_s == pytest.approx(0.085)
    assert BatchPolicy(8, constant(0.010), margin_s=0.005).decide(queue, 0.085).launch


def test_a_request_that_cannot_make_it_alone_is_dropped_early() -> None:
    pol = BatchPolicy(4, constant(0.010))
    doomed, expired, fine = req(0, 1.005), req(1, 0.999), req(2, 1.5)
    d = pol.decide([fine, doomed, expired], 1.0)
    assert {p.req_id for p in d.drop} == {"r0", "r1"} and d.launch == []
    assert d.wait_s == pytest.approx(0.49)
    keep = BatchPolicy(4, constant(0.010), drop_early=False).decide([doomed, expired], 1.0)
    assert keep.drop == [expired] and keep.launch == [doomed]  # expired is dropped whatever the setting


def test_only_the_batch_that_fits_the_head_deadline_launches() -> None:
    pol = BatchPolicy(8, LAT)
    queue = [req(i, 1.0 + 0.001 * i, cut=0) for i in range(8)]
    head_room = LAT({0: 3}) + 1e-6  # three fit before the head's deadline, four do not
    d = pol.decide(queue, 1.0 - head_room)
    assert [p.req_id for p in d.launch] == ["r0", "r1", "r2"]
    assert d.predicted_s == pytest.approx(LAT({0: 3})) and d.wait_s == 0.0


def test_a_backlog_skips_to_the_first_full_batch_that_fits_rather_than_shrinking() -> None:
    pol = BatchPolicy(4, LAT)
    full = LAT({0: 4})
    now = 1.0
    # r0 and r1 can run alone but not in a full batch; from r2 on, four fit their head's deadline.
    queue = [req(0, now + full - 0.001), req(1, now + full - 0.0005)]
    queue += [req(i, now + full + 0.001 * i) for i in range(2, 8)]
    d = pol.decide(queue, now)
    assert [p.req_id for p in d.launch] == ["r2", "r3", "r4", "r5"] and d.drop == []
    assert d.predicted_s == pytest.approx(full) and d.wait_s == 0.0
    # with no full window that fits, the longest prefix the head can afford launches instead
    d = pol.decide(queue[:5], now)
    assert [p.req_id for p in d.launch] == ["r0", "r1", "r2"]


def test_eager_launches_whatever_is_queued() -> None:
    queue = [req(0, 1.0), req(1, 2.0)]
    d = BatchPolicy(8, constant(0.01), eager=True).decide(queue, 0.0)
    assert d.launch == queue and d.wait_s is None and d.predicted_s == pytest.approx(0.01)
    assert BatchPolicy(8, constant(0.01)).decide(queue, 0.0).launch == []


def test_latency_uses_the_realigned_composition_of_the_batch() -> None:
    pol = BatchPolicy(8, LAT)
    mixed = [req(0, 1.0, cut=0), req(1, 1.0, cut=3), req(2, 1.0, cut=3)]
    late = [req(0, 1.0, cut=3), req(1, 1.0, cut=3), req(2, 1.0, cut=3)]
    expect_mixed = MODEL.realigned_latency({0: 1, 3: 2}, 100) / 1000
    expect_late = MODEL.realigned_latency({3: 3}, 100) / 1000
    assert expect_mixed > expect_late
    assert pol.decide(mixed, 0.0).wait_s == pytest.approx(1.0 - expect_mixed)
    assert pol.decide(late, 0.0).wait_s == pytest.approx(1.0 - expect_late)
    d = pol.decide(mixed, 1.0 - expect_mixed)
    assert len(d.launch) == 3 and d.predicted_s == pytest.approx(expect_mixed)


def test_wait_stops_when_a_member_would_become_a_certain_miss() -> None:
    # Not monotone on purpose: alone, cut 0 costs more than the whole candidate batch is predicted to.
    def lat(counts: Mapping[int, int]) -> float:
        return 0.5 if dict(counts) == {0: 1} else 0.01
    d = BatchPolicy(8, lat).decide([req(0, 1.0, cut=2), req(1, 1.2, cut=0)], 0.0)
    assert d.launch == [] and d.wait_s == pytest.approx(0.7)


def test_a_busy_executor_launches_nothing_and_judges_drops_at_its_free_time() -> None:
    pol = BatchPolicy(2, constant(0.010))
    queue = [req(0, 1.05), req(1, 1.2), req(2, 1.3)]
    d = pol.decide(queue, 1.0, busy_until=1.045)
    assert d.launch == [] and d.drop == [queue[0]] and d.wait_s == pytest.approx(0.045)
    assert pol.decide(queue[1:], 1.045, busy_until=1.045).launch == queue[1:]


def test_profile_latency_is_seconds_scaled_cached_and_checked() -> None:
    lat = profile_latency(MODEL, 50, scale=2.0)
    assert isinstance(lat, ProfileLatency)
    assert lat({1: 2, 3: 1, 2: 0}) == pytest.approx(2 * MODEL.realigned_latency({1: 2, 3: 1}, 50) / 1000)
    assert lat({3: 1, 1: 2}) == lat({1: 2, 3: 1})
    assert lat({}) == 0.0
    with pytest.raises(ProfileError):
        profile_latency(MODEL, 30)
    with pytest.raises(ValueError):
        profile_latency(MODEL, 50, scale=0.0)


def test_policy_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(0, LAT)
    with pytest.raises(ValueError):
        BatchPolicy(4, LAT, margin_s=-0.001)


def test_edf_queue_keeps_deadline_order_and_removes_by_id() -> None:
    q = EdfQueue([req(0, 3.0), req(1, 1.0), req(2, 2.0, arrival=0.5), req(3, 2.0, arrival=0.1)])
    assert [p.req_id for p in q] == ["r1", "r3", "r2", "r0"] and len(q) == 4 and "r2" in q
    with pytest.raises(ValueError):
        q.add(req(1, 9.0))
    assert q.peek() == req(1, 1.0)
    assert q.remove("r3") == req(3, 2.0, arrival=0.1) and q.remove("r3") is None
    q.discard([req(0, 3.0), req(9, 0.0)])
    assert [p.req_id for p in q] == ["r1", "r2"]
    q.add(req(5, 1.5))
    assert [p.req_id for p in q.pop_batch(2)] == ["r1", "r5"] and [p.req_id for p in q] == ["r2"]
    q.apply(Decision(launch=[req(2, 2.0, arrival=0.5)]))
    assert not q and q.peek() is None and "r2" not in q


# ------------------------------------------------------------------------------------- properties

pendings = st.lists(
    st.tuples(st.integers(0, 3), st.floats(0.0, 0.3), st.floats(0.0, 0.05)),
    max_size=30,
).map(lambda rows: [Pending(f"r{i}", c, 1.0 + d, 1.0 - a) for i, (c, d, a) in enumerate(rows)])


@settings(max_examples=150, deadline=None)
@given(queue=pendings, max_batch=st.integers(1, 8), margin=st.sampled_from([0.0, 0.002]), eager=st.booleans())
def test_one_decision_is_well_formed(queue: list[Pending], max_batch: int, margin: float, eager: bool) -> None:
    now = 1.0
    pol = BatchPolicy(max_batch, LAT, margin_s=margin, eager=eager)
    d = pol.decide(queue, now)
    ids = [p.req_id for p in d.launch] + [p.req_id for p in d.drop]
    assert len(ids) == len(set(ids)) and set(ids) <= {p.req_id for p in queue}
    assert len(d.launch) <= max_batch
    assert all(p.deadline > now for p in d.launch)
    if d.launch:
        assert now + d.predicted_s <= min(p.deadline for p in d.launch)
        assert [p.deadline for p in d.launch] == sorted(p.deadline for p in d.launch)
        assert d.predicted_s == pytest.approx(BatchPolicy(max_batch, LAT).batch_s(d.launch))
    else:
        assert d.wait_s is None or d.wait_s > 0
    assert d == pol.decide(EdfQueue(queue), now)


@settings(max_examples=100, deadline=None)
@given(queue=pendings, max_batch=st.integers(1, 8), seed=st.integers(0, 1000), eager=st.booleans())
def test_every_request_is_eventually_launched_or_dropped(queue: list[Pending], max_batch: int,
                                                         seed: int, eager: bool) -> None:
    """One executor; time advances by the waits the policy asks for and by each batch's run time."""
    rng = random.Random(seed)
    pol = BatchPolicy(max_batch, LAT, eager=eager)
    q = EdfQueue(queue)
    now, busy_until, outcome = 1.0, 1.0, dict[str, str]()
    for _ in range(10 * len(queue) + 10):
        if not q:
            break
        d = pol.decide(q, now, busy_until=busy_until)
        for p in d.drop:
            outcome[p.req_id] = "drop"
        for p in d.launch:
            outcome[p.req_id] = "launch"
            assert now + d.predicted_s <= p.deadline
        q.apply(d)
        if d.launch:
            busy_until = now + d.predicted_s
        if d.wait_s is not None:
            # An arrival or a spurious wake-up may come earlier than asked; the policy must cope.
            now += d.wait_s * (1.0 if rng.random() < 0.7 else rng.uniform(0.1, 1.0))
    assert not q
    assert set(outcome) == {p.req_id for p in queue}
