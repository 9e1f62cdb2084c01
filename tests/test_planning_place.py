from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.planning.place import DeviceKind, device_kind, fill_headroom, place
from common.planning.synthetic import synthetic_profile
from common.planning.types import GPU_CAPACITY, MAX_CLIENTS_PER_DEVICE, Group
from common.profiles import Profile


def group(gid: str, share: int, replicas: int) -> Group:
    return Group(gid, "m", (gid,), (0,), 1, share, replicas, 1.0, 1.0, 10.0)


def test_first_fit_decreasing_packs_largest_shares_first() -> None:
    groups = [group("a", 30, 2), group("b", 70, 1), group("c", 40, 1), group("d", 10, 3)]
    devices = place(groups, DeviceKind("gpu", GPU_CAPACITY))
    assert [d.device for d in devices] == ["gpu0", "gpu1"]
    assert devices[0].replicas == (("b", 70), ("a", 30))
    assert devices[1].replicas == (("c", 40), ("a", 30), ("d", 10), ("d", 10), ("d", 10))


def test_the_mps_client_limit_opens_a_new_gpu() -> None:
    devices = place([group("tiny", 1, MAX_CLIENTS_PER_DEVICE + 2)], DeviceKind("gpu", GPU_CAPACITY))
    assert [len(d.replicas) for d in devices] == [MAX_CLIENTS_PER_DEVICE, 2]


def test_cpu_profiles_pack_threads_onto_hosts() -> None:
    gpu = synthetic_profile({"n": (3, 0.1)}, shares=(1, 2, 4))
    assert device_kind(gpu) == DeviceKind("gpu", GPU_CAPACITY)
    cpu = device_kind(Profile.from_dict({**gpu.to_dict(), "unit": "cpu_threads"}))
    assert cpu == DeviceKind("cpu", 4)  # one host holds the threads it was profiled with
    devices = place([group("a", 2, 3), group("b", 4, 1)], cpu)
    assert [d.used for d in devices] == [4, 4, 2] and devices[0].device == "cpu0"


def test_headroom_fills_a_cpu_host_but_leaves_the_reserve_to_the_serving_path() -> None:
    kind = DeviceKind("cpu", 4)
    needed = [group("a", 1, 1)]
    groups, placement = fill_headroom(needed, place(needed, kind), kind)
    assert groups[0].replicas == 4 and groups[0].spares == 3 and placement[0].used == 4
    groups, placement = fill_headroom(needed, place(needed, kind), kind, reserve=1)
    assert groups[0].replicas == 3 and groups[0].spares == 2 and placement[0].used == 3
    # What the load needs is placed whatever the reserve: only the filler replicas give way.
    busy = [group("b", 1, 4)]
    groups, placement = fill_headroom(busy, place(busy, kind), kind, reserve=2)
    assert groups[0].replicas == 4 and groups[0].spares == 0 and placement[0].used == 4


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([10, 20, 30, 50, 70, 100]), st.integers(1, 6)), min_size=1, max_size=12))
def test_placement_respects_capacity_and_places_every_replica(spec: list[tuple[int, int]]) -> None:
    groups = [group(f"g{i}", s, n) for i, (s, n) in enumerate(spec)]
    devices = place(groups, DeviceKind("gpu", GPU_CAPACITY))
    assert all(d.used <= GPU_CAPACITY and len(d.replicas) <= MAX_CLIENTS_PER_DEVICE for d in devices)
    placed = sorted(r for d in devices for r in d.replicas)
    assert placed == sorted((g.id, g.share) for g in groups for _ in range(g.replicas))
    # first fit never leaves two devices that could have been one
    assert all(a.used + b.used > GPU_CAPACITY for i, a in enumerate(devices) for b in devices[i + 1:])
    assert place(groups, DeviceKind("gpu", GPU_CAPACITY)) == devices
