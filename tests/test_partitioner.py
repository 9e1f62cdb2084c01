"""Neurosurgeon-style cut choice: budgets, feasibility, latency and energy modes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.client.partitioner import CutChoice, choose_cut, cut_options
from common.client.phones import DEVICE_CLASSES, DeviceClass, device_profile
from common.client.traces import LinkTrace
from common.profiles import ModelProfile, Profile, make_profile, shipped

DEV = DeviceClass("test", gflops=10.0, block_overhead_ms=1.0)  # 1 GFLOP = 100 ms on the device


def toy_model() -> ModelProfile:
    """4 blocks: the input is big, block 1 shrinks the tensor a lot, the server is fast."""
    blocks = [  # (name, out_bytes, flops, server ms at batch 1 / full share)
        ("b0", 800_000, 100_000_000, 1.0),
        ("b1", 20_000, 200_000_000, 2.0),
        ("b2", 10_000, 1_500_000_000, 3.0),
        ("b3", 4_000, 100_000_000, 4.0),
    ]
    models = {"toy": {"input_shape": [3, 224, 224], "input_bytes": 600_000, "blocks": [
        {"name": n, "out_bytes": ob, "flops": f, "latency_ms": [[ms * 2, ms], [ms * 3, ms * 1.5]]}
        for n, ob, f, ms in blocks]}}
    return make_profile("estimated", "toy", "gpu_share_pct", [1, 2], [50, 100], models).model("toy")


def test_every_valid_cut_with_consistent_times() -> None:
    m = toy_model()
    opts = cut_options(m, DEV, 8e6, 500.0, rtt_ms=20.0, reply_bytes=4000)
    assert [o.cut for o in opts] == [0, 1, 2, 3]  # valid cuts are 0..N-1
    reply = 4000 * 8 / 8e6 * 1e3 + 10.0
    server = [10.0, 9.0, 7.0, 4.0]  # suffix sums at batch 1, share 100
    device = [0.0, 11.0, 32.0, 183.0]
    for o, up_bytes, s, d in zip(opts, [600_000, 800_000, 20_000, 10_000], server, device, strict=True):
        assert o.device_ms == pytest.approx(d)
        assert o.upload_ms == pytest.approx(up_bytes * 8 / 8e6 * 1e3 + 10.0)
        assert o.reply_ms == pytest.approx(reply)
        assert o.server_ms_est == pytest.approx(s)
        assert o.budget_ms == pytest.approx(500.0 - o.device_ms - o.upload_ms - o.reply_ms)
        assert o.e2e_ms == pytest.approx(o.device_ms + o.upload_ms + o.server_ms_est + o.reply_ms)
        assert o.feasible == (o.budget_ms >= 2 * o.server_ms_est)


def test_fast_link_offloads_everything_slow_link_cuts_after_the_shrink() -> None:
    m = toy_model()
    fast = choose_cut(m, DEV, 1e9, 200.0)
    assert fast is not None and fast.cut == 0
    slow = choose_cut(m, DEV, 1e6, 2000.0)  # 600 KB take 4.8 s; 20 KB take 160 ms
    assert slow is not None and slow.cut == 2


def test_no_feasible_cut_gives_none() -> None:
    m = toy_model()
    assert choose_cut(m, DEV, 1e6, 50.0) is None
    assert all(not o.feasible for o in cut_options(m, DEV, 1e6, 50.0))


def test_the_budget_must_cover_the_server() -> None:
    m = toy_model()
    # At 1 Gbit/s cut 0 needs 4.8 + 10 + 10.03 ms on the wire and 2 × 10 ms of server budget.
    wire = 600_000 * 8 / 1e9 * 1e3 + 10.0 + 4096 * 8 / 1e9 * 1e3 + 10.0
    just_enough = choose_cut(m, DEV, 1e9, wire + 20.0 + 1e-6)
    assert just_enough is not None and just_enough.cut == 0
    assert just_enough.budget_ms >= 2 * just_enough.server_ms_est
    too_little = choose_cut(m, DEV, 1e9, wire + 19.0)
    assert too_little is None or too_little.cut != 0
    loose = choose_cut(m, DEV, 1e9, wire + 11.0, server_factor=1.0)
    assert loose is not None and loose.cut == 0


def test_energy_mode_does_least_on_device_work() -> None:
    m = toy_model()
    assert choose_cut(m, DEV, 1e9, 500.0, mode="energy").cut == 0  # type: ignore[union-attr]
    # On a slow link cut 0/1 are infeasible; energy takes cut 2 (0.3 GFLOP) over cut 3 (1.8 GFLOP).
    lat = choose_cut(m, DEV, 1e6, 2000.0, mode="latency")
    en = choose_cut(m, DEV, 1e6, 2000.0, mode="energy")
    assert en is not None and lat is not None and en.cut == 2
    feasible = [o for o in cut_options(m, DEV, 1e6, 2000.0) if o.feasible]
    assert en.device_flops == min(o.device_flops for o in feasible)
    assert lat.e2e_ms == min(o.e2e_ms for o in feasible)
    with pytest.raises(ValueError, match="unknown partitioning mode"):
        choose_cut(m, DEV, 1e6, 2000.0, mode="speed")  # type: ignore[arg-type]


def test_custom_server_time_and_trace_upload() -> None:
    m = toy_model()
    slow_server = choose_cut(m, DEV, 1e9, 300.0, server_ms=lambda c: 200.0 if c < 3 else 1.0)
    assert slow_server is not None and slow_server.cut == 3 and slow_server.server_ms_est == 1.0
    trace = LinkTrace.constant(12.0, 10.0)  # 1 packet per ms
    opts = cut_options(m, DEV, 12e6, 1000.0, rtt_ms=0.0, upload_time_ms=lambda n: trace.upload_ms(n, 1.0))
    assert opts[0].upload_ms == pytest.approx(400.0)  # 600 KB = 400 packets
    assert opts[2].upload_ms == pytest.approx(14.0)  # 20 KB = 14 packets


@pytest.mark.parametrize("kw", [{"bandwidth_bps": 0.0}, {"slo_ms": 0.0}, {"downlink_bps": -1.0}])
def test_bad_arguments(kw: dict[str, float]) -> None:
    args = {"bandwidth_bps": 1e6, "slo_ms": 100.0, **kw}
    with pytest.raises(ValueError):
        cut_options(toy_model(), DEV, **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def v100() -> Profile:
    return Profile.load(shipped("v100-estimated"))


@given(bw=st.floats(1e5, 1e9), slo=st.floats(1.0, 5000.0), cls=st.sampled_from(sorted(DEVICE_CLASSES)),
       model=st.sampled_from(["resnet50", "mobilenet_v2", "vgg16"]),
       mode=st.sampled_from(["latency", "energy"]))
@settings(max_examples=150, deadline=None)
def test_choice_is_feasible_and_optimal_on_real_profiles(v100: Profile, bw: float, slo: float, cls: str,
                                                         model: str, mode: str) -> None:
    m = v100.model(model)
    opts = cut_options(m, DEVICE_CLASSES[cls], bw, slo)
    choice = choose_cut(m, DEVICE_CLASSES[cls], bw, slo, mode=mode)  # type: ignore[arg-type]
    feasible = [o for o in opts if o.feasible]
    if not feasible:
        assert choice is None
        return
    assert isinstance(choice, CutChoice) and choice.feasible and 0 <= choice.cut < m.n_blocks
    assert choice.budget_ms >= 2 * m.suffix_latency(choice.cut, 1, 100) - 1e-9
    if mode == "latency":
        assert choice.e2e_ms == min(o.e2e_ms for o in feasible)
    else:
        assert choice.device_flops == min(o.device_flops for o in feasible)
    assert choice.device_ms == pytest.approx(sum(device_profile(m, DEVICE_CLASSES[cls])[:choice.cut]))
