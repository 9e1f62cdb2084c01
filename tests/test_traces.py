"""Mahimahi link traces: parsing, looping, bandwidth windows and upload times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.client.traces import PACKET_BYTES, LinkTrace, TraceError, shared_traces_dir

MTU_BITS = PACKET_BYTES * 8




def test_hand_written_trace(tmp_path: Path) -> None:
    # 3 packets at 1 ms, one at 2 ms, two at 5 ms: 6 packets per 5 ms period, then it loops.
    p = tmp_path / "tiny.up"
    p.write_text("1\n1\n1\n2\n5\n5\n")
    tr = LinkTrace.from_mahimahi(p)
    assert tr.period_ms == 5 and tr.packets == 6 and tr.duration_s == pytest.approx(0.005)
    assert tr.mean_bps == pytest.approx(6 * MTU_BITS / 0.005)
    assert tr.upload_ms(1, 0.0) == 1.0  # the first opportunity is at 1 ms
    assert tr.upload_ms(3 * PACKET_BYTES, 0.0) == 1.0  # three packets fit in that millisecond
    assert tr.upload_ms(3 * PACKET_BYTES + 1, 0.0) == 2.0
    assert tr.upload_ms(6 * PACKET_BYTES, 0.0) == 5.0
    assert tr.upload_ms(7 * PACKET_BYTES, 0.0) == 6.0  # looped: 5 + 1
    assert tr.upload_ms(13 * PACKET_BYTES, 0.0) == 11.0  # two full loops, then one packet at 10 + 1
    assert tr.upload_ms(PACKET_BYTES, 0.003) == 2.0  # from 3 ms the next opportunity is at 5 ms
    assert tr.upload_ms(3 * PACKET_BYTES, 0.003) == 3.0  # 5, 5, then 6 (= 5 + 1)
    assert tr.upload_ms(0, 1.0) == 0.0
    # (0, 2 ms] holds the packets at 1 and 2 ms; (5 ms, 10 ms] a full loop.
    assert tr.bandwidth_bps(0.0, 0.002) == pytest.approx(4 * MTU_BITS / 0.002)
    assert tr.bandwidth_bps(0.005, 0.005) == pytest.approx(tr.mean_bps)


def test_boundary_opportunity_is_not_counted_twice(tmp_path: Path) -> None:
    p = tmp_path / "edge.up"
    p.write_text("2\n4\n")
    tr = LinkTrace.from_mahimahi(p)
    # Opportunities at 2, 4, 6, 8, ... ms; a packet ready at t leaves strictly after t.
    for start_ms in range(0, 12):
        expected = 1 if start_ms % 2 else 2
        assert tr.upload_ms(PACKET_BYTES, start_ms / 1000) == expected, start_ms
    assert tr.bandwidth_bps(0.004, 0.004) == pytest.approx(2 * MTU_BITS / 0.004)


@pytest.mark.parametrize("bad", ["", "3\n2\n", "1\nx\n", "-1\n2\n"])
def test_malformed_traces_are_refused(tmp_path: Path, bad: str) -> None:
    p = tmp_path / "bad.up"
    p.write_text(bad)
    with pytest.raises(TraceError):
        LinkTrace.from_mahimahi(p)


def test_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        LinkTrace.from_mahimahi(tmp_path / "nope.up")


@pytest.mark.parametrize(("mbps", "variability"), [(1.0, 0.0), (8.0, 0.3), (20.0, 0.8)])
def test_synthetic_mean_is_exact(mbps: float, variability: float) -> None:
    tr = LinkTrace.synthetic(mbps, 30.0, seed=3, variability=variability)
    assert tr.duration_s == pytest.approx(30.0)
    assert tr.mean_bps == pytest.approx(mbps * 1e6, rel=2e-3)
    _, bw = tr.segments(1.0)
    assert len(bw) == 30
    assert float(np.mean(bw)) == pytest.approx(tr.mean_bps, rel=1e-9)
    cv = float(np.std(bw) / np.mean(bw))
    if variability == 0.0:
        assert cv < 0.01
    else:
        assert 0.3 * variability < cv < 2.0 * variability


def test_synthetic_is_deterministic_and_seeded() -> None:
    a, b = LinkTrace.synthetic(5, 10, seed=1), LinkTrace.synthetic(5, 10, seed=1)
    c = LinkTrace.synthetic(5, 10, seed=2)
    assert np.array_equal(a.opportunities_ms, b.opportunities_ms)
    assert not np.array_equal(a.opportunities_ms, c.opportunities_ms)


def test_constant_link_upload_time_is_size_over_rate() -> None:
    tr = LinkTrace.constant(12.0, 2.0)  # one packet per ms
    for nbytes in (PACKET_BYTES, 150_000, 602_112, 5_000_000):  # the last one loops the 2 s trace
        expected = np.ceil(nbytes / PACKET_BYTES)
        assert tr.upload_ms(nbytes, 0.25) == pytest.approx(expected, abs=1.0)
    assert tr.bandwidth_bps(0.7, 0.5) == pytest.approx(12e6, rel=0.01)


def test_write_and_read_back(tmp_path: Path) -> None:
    tr = LinkTrace.synthetic(3.0, 5.0, seed=7)
    p = tmp_path / "syn.up"
    tr.write_mahimahi(p)
    back = LinkTrace.from_mahimahi(p)
    assert back.period_ms == tr.period_ms
    assert np.array_equal(back.opportunities_ms, tr.opportunities_ms)
    assert back.upload_ms(1_000_000, 1.234) == tr.upload_ms(1_000_000, 1.234)


def test_upload_time_grows_with_size_and_matches_bandwidth() -> None:
    tr = LinkTrace.synthetic(6.0, 20.0, seed=0, variability=0.5)
    sizes = [0, 1, 10_000, 100_000, 1_000_000, 10_000_000]
    times = [tr.upload_ms(n, 3.3) for n in sizes]
    assert times == sorted(times)
    # A 15 MB upload spans many windows: its rate approaches the trace's mean rate.
    big = tr.upload_ms(15_000_000, 0.0)
    assert 15_000_000 * 8 / (big / 1000) == pytest.approx(tr.mean_bps, rel=0.05)


def test_real_uplink_traces() -> None:
    folder = shared_traces_dir()
    short = folder / "TMobile-LTE-short.up"
    if not short.exists():
        pytest.skip(f"no shared traces at {folder} (set GRAFT_TRACES_DIR)")
    expected_mean_mbps = {"ATT-LTE-driving.up": 0.83, "TMobile-LTE-short.up": 13.3, "Verizon-EVDO-driving.up": 0.84}
    for name, mean in expected_mean_mbps.items():
        path = folder / name
        if not path.exists():
            continue
        tr = LinkTrace.from_mahimahi(path)
        print(f"{name}: {tr.duration_s:.0f} s, mean {tr.mean_bps / 1e6:.3f} Mbit/s")
        assert tr.mean_bps / 1e6 == pytest.approx(mean, rel=0.02)
    tr = LinkTrace.from_mahimahi(short)
    assert tr.duration_s == pytest.approx(140.0)
    _, bw = tr.segments(1.0)
    assert 10e6 < float(np.median(bw)) < 13e6
    # An input tensor (602 KB): done exactly when the link has offered enough packets, not a ms earlier.
    needed = -(-602_112 // PACKET_BYTES)
    for start in (0.0, 10.0, 139.9):  # the last one wraps around the end of the trace
        t = tr.upload_ms(602_112, start)
        assert tr.bandwidth_bps(start, t / 1000) * t / 1000 / MTU_BITS >= needed
        assert tr.bandwidth_bps(start, (t - 1) / 1000) * (t - 1) / 1000 / MTU_BITS < needed
