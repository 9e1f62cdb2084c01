"""What a load report and the e2e bench record beside attainment: misses by second, the host's CPU."""

from __future__ import annotations

from tools.bench_e2e import host_cores, host_cpu_ticks
from tools.loadgen import LoadReport, Outcome


def outcome(at_s: float, latency_ms: float, ok: bool = True) -> Outcome:
    return Outcome("d", "m", 4, 100.0, latency_ms, ok, "OK" if ok else "OVERLOADED", 1.0, 1, "g", 1, at_s=at_s)


def test_misses_are_counted_in_the_second_they_were_meant_to_be_sent() -> None:
    outs = [outcome(0.1, 10.0), outcome(0.9, 150.0), outcome(1.2, 10.0), outcome(2.5, 10.0, ok=False),
            outcome(2.6, 20.0)]
    report = LoadReport(3.0, outs)
    # A reply past the budget is a miss like an error, and it counts where it was sent, not received.
    assert report.misses_by_second() == [[0, 2, 1], [1, 1, 0], [2, 2, 1]]
    assert report.summary()["misses_by_second"] == [[0, 2, 1], [1, 1, 0], [2, 2, 1]]


def test_host_cores_are_ticks_per_second_by_kind() -> None:
    tick = __import__("os").sysconf("SC_CLK_TCK")
    before = [0] * 10
    after = [2 * tick, 0, tick // 2, tick, 0, 0, 0, tick // 4, 0, 0]  # over 2 s
    got = host_cores(before, after, 2.0)
    assert got == {"user": 1.0, "system": 0.25, "idle": 0.5, "steal": 0.125}
    assert host_cores(None, after, 2.0) == {} and host_cores(before, after, 0.0) == {}


def test_the_host_reading_is_this_machines_own() -> None:
    ticks = host_cpu_ticks()
    assert ticks is not None and len(ticks) >= 8 and sum(ticks) > 0
