"""A replica's latency model: profile predictions corrected by what it measures, robust to stalls."""

from __future__ import annotations

import pytest

from services.worker.latency import WINDOW, LatencyModel, latency_model, work_units
from tests.helpers import cpu_test_profile


def model() -> LatencyModel:
    return latency_model(cpu_test_profile().model("m"), 2, 1)


def test_starts_from_the_profile_and_follows_a_slower_host() -> None:
    lat = model()
    assert lat.source == "profile" and lat.ratio == 1.0
    base = lat.predict_s({0: 1})
    assert base == pytest.approx(2.0e-3)  # two blocks of 1 ms at batch 1, one thread
    for _ in range(WINDOW // 2 + 1):
        lat.observe({1: 1}, 3.0 * lat.base_s({1: 1}))  # a host three times slower than its profile
    assert lat.ratio == pytest.approx(3.0, rel=1e-6)
    assert lat.predict_s({0: 1}) == pytest.approx(3.0 * base)  # unseen compositions scale too


def test_a_few_stalled_batches_move_nothing() -> None:
    """The old geometric EWMA moved by 10^0.2 = 1.6× on a single batch ten times too slow, and the
    batching policy then dropped requests early that still had time; the median of recent ratios
    ignores stalls shorter than half its window."""
    lat = model()
    for i in range(WINDOW):
        lat.observe({0: 2}, (10.0 if i % 8 == 0 else 1.0) * lat.base_s({0: 2}))
    assert lat.ratio == pytest.approx(1.0)
    assert lat.predict_s({0: 2}) == pytest.approx(lat.base_s({0: 2}))  # the memo is a median too


def test_carry_keeps_what_was_learnt() -> None:
    a, b = model(), model()
    for _ in range(10):
        a.observe({0: 1}, 2.0 * a.base_s({0: 1}))
    b.carry_from(a)
    assert b.ratio == pytest.approx(2.0) and b.samples == 10
    b.observe({0: 1}, 2.0 * b.base_s({0: 1}))
    assert b.ratio == pytest.approx(2.0)


def test_work_model_without_a_profile() -> None:
    lat = LatencyModel(4, prior_ms=8.0, prior_batch=2, prior_cut=0)
    assert lat.source == "online"
    assert work_units({0: 2}, 4) == 2 * 4 + 4
    assert lat.predict_s({0: 2}) == pytest.approx(8.0e-3)
