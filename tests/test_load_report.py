"""What a load report and the e2e bench record beside attainment: misses by second, where the CPU went."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tools import cpu
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
    tick = os.sysconf("SC_CLK_TCK")
    before = [0] * 10
    after = [2 * tick, 0, tick // 2, tick, 0, 0, 0, tick // 4, 0, 0]  # over 2 s
    got = cpu.host_cores(before, after, 2.0)
    assert got == {"user": 1.0, "system": 0.25, "idle": 0.5, "steal": 0.125}
    assert cpu.host_cores(None, after, 2.0) == {} and cpu.host_cores(before, after, 0.0) == {}


def test_processes_are_counted_by_role_and_only_for_the_span_seen_twice() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    before = cpu.Snapshot(0.0, None, {(1, 0): ("bench", 0), (2, 5): ("replica", 10), (3, 5): ("replica", 0),
                                      (4, 5): ("ingress", 0)})
    after = cpu.Snapshot(2.0, None, {(1, 0): ("bench", tick), (2, 5): ("replica", 10 + 2 * tick),
                                     (3, 5): ("replica", tick), (5, 9): ("redis", 50 * tick)})
    got = cpu.cores(before, after)
    # The ingress ended and the Redis started between the readings: neither is guessed at.
    assert got == {"host": {}, "roles": {"replica": 1.5, "bench": 0.5}}
    assert cpu.role_of("/x/python -m services.worker.replica --name a/0") == "replica"
    assert cpu.role_of("/x/python -m services.worker") == "agent"
    assert cpu.role_of("/usr/bin/redis-server unixsocket:/tmp/r.sock") == "redis"
    assert cpu.role_of("sleep 1") == "other"


def test_a_busy_child_shows_up_in_the_snapshots_of_this_machine() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.8\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.1)
        before = cpu.snapshot()
        time.sleep(0.5)
        got = cpu.cores(before, cpu.snapshot())
    finally:
        child.wait()
    assert got["roles"].get("other", 0.0) > 0.2, got  # the busy child: most of a core on a quiet host
    assert set(got["host"]) == {"user", "system", "idle", "steal"} and got["host"]["user"] > 0.0
