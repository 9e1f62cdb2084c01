"""Which slot serves which group across plan switches (``assignment.retarget``) — pure logic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from common.contract import keys
from services.worker.assignment import Slot, Wanted, consumer_name, retarget
from services.worker.control import Task

GPUS = frozenset({"gpu0", "a/gpu1"})


def want(epoch: int, gid: str, model: str = "m", *, device: str = "cpu0", share: int = 1,
         cuts: tuple[int, ...] = (0,)) -> Wanted:
    return Wanted(device, model, share, Task(epoch, gid, keys.group_stream(epoch, gid), 4, 10.0, cuts))


def test_first_plan_makes_slots_with_stable_names() -> None:
    slots: list[Slot] = []
    made = retarget(slots, [want(1, "g", "m"), want(1, "g", "m"), want(1, "h", "n", device="gpu0", share=50)], 1,
                    gpu_devices=GPUS)
    assert [s.consumer for s in made] == ["cpu0-m-0", "cpu0-m-1", "gpu0-n-0"]
    assert consumer_name("a/gpu1", "m", 2) == "a/gpu1-m-2"
    gpu = made[2]
    assert gpu.gpu and gpu.share == 50 and not made[0].gpu
    assert gpu.active is not None and gpu.streams == (keys.group_stream(1, "h"),) and not gpu.idle
    assert slots == []  # the caller adds what was made


def test_a_new_epoch_retargets_the_same_slot_and_drains_the_old_stream() -> None:
    slots = retarget([], [want(1, "g")], 1, gpu_devices=GPUS)
    [slot] = slots
    made = retarget(slots, [want(2, "g2", cuts=(0, 4))], 2, gpu_devices=GPUS)
    assert made == [] and slot.consumer == "cpu0-m-0"  # the same consumer name, the same process
    assert slot.active is not None and slot.active.group == "g2" and slot.active.epoch == 2
    old, new = keys.group_stream(1, "g"), keys.group_stream(2, "g2")
    assert slot.draining == [old] and slot.streams == (new, old)  # the active one first
    slot.drained(old)
    assert slot.streams == (new,) and not slot.idle
    slot.drained(old)  # twice: harmless
    assert slot.draining == []


def test_fewer_placements_leave_a_slot_that_only_drains_then_idles() -> None:
    slots = retarget([], [want(1, "g"), want(1, "g")], 1, gpu_devices=GPUS)
    made = retarget(slots, [want(2, "g")], 2, gpu_devices=GPUS)
    assert made == []
    busy, spare = slots
    assert busy.active is not None and spare.active is None
    assert spare.draining == [keys.group_stream(1, "g")] and not spare.idle
    spare.drained(keys.group_stream(1, "g"))
    assert spare.idle  # the agent releases it
    # a third epoch: the idle-to-be slot is free again for a placement of its model
    slots2 = [busy, spare]
    assert retarget(slots2, [want(3, "g"), want(3, "g")], 3, gpu_devices=GPUS) == []
    assert all(s.active is not None and s.active.epoch == 3 for s in slots2)


def test_more_placements_get_new_names_past_the_used_ones() -> None:
    slots = retarget([], [want(1, "g"), want(1, "g")], 1, gpu_devices=GPUS)
    slots.pop(0)  # cpu0-m-0 was released
    made = retarget(slots, [want(2, "g")] * 3, 2, gpu_devices=GPUS)
    names = sorted(s.consumer for s in slots + made)
    assert names == ["cpu0-m-0", "cpu0-m-1", "cpu0-m-2"] and len(set(names)) == 3


def test_a_gpu_slot_keeps_its_share_a_cpu_slot_changes_threads() -> None:
    gpu = retarget([], [want(1, "g", device="gpu0", share=50)], 1, gpu_devices=GPUS)
    made = retarget(gpu, [want(2, "g", device="gpu0", share=30)], 2, gpu_devices=GPUS)
    # MPS fixes a process's share when CUDA starts: another share needs another process (a new slot)
    assert len(made) == 1 and made[0].share == 30 and gpu[0].active is None
    cpu = retarget([], [want(1, "g", share=1)], 1, gpu_devices=GPUS)
    assert retarget(cpu, [want(2, "g", share=2)], 2, gpu_devices=GPUS) == []
    assert cpu[0].share == 2 and cpu[0].active is not None


def test_another_model_or_device_never_takes_a_slot() -> None:
    slots = retarget([], [want(1, "g", "m")], 1, gpu_devices=GPUS)
    made = retarget(slots, [want(2, "h", "n"), want(2, "g", "m", device="cpu1")], 2, gpu_devices=GPUS)
    assert sorted(s.consumer for s in made) == ["cpu0-n-0", "cpu1-m-0"]
    assert slots[0].active is None and slots[0].draining == [keys.group_stream(1, "g")]


def test_a_slot_whose_last_group_had_the_same_cuts_is_preferred() -> None:
    slots = retarget([], [want(1, "lo", cuts=(0, 2)), want(1, "hi", cuts=(8,))], 1, gpu_devices=GPUS)
    by_group = {s.active.group: s for s in slots if s.active is not None}
    retarget(slots, [want(2, "hi2", cuts=(8,)), want(2, "lo2", cuts=(0, 2))], 2, gpu_devices=GPUS)
    assert by_group["hi"].active is not None and by_group["hi"].active.group == "hi2"
    assert by_group["lo"].active is not None and by_group["lo"].active.group == "lo2"


def test_the_same_stream_again_is_not_drained() -> None:
    slots = retarget([], [want(1, "g")], 1, gpu_devices=GPUS)
    slots[0].draining.append(keys.group_stream(2, "g"))
    retarget(slots, [want(2, "g")], 2, gpu_devices=GPUS)
    assert slots[0].draining == [keys.group_stream(1, "g")]
    assert slots[0].streams == (keys.group_stream(2, "g"), keys.group_stream(1, "g"))


def test_an_older_or_equal_epoch_does_not_retire_the_active_group() -> None:
    slots = retarget([], [want(3, "g")], 3, gpu_devices=GPUS)
    slots[0].retire(3)
    assert slots[0].active is not None and slots[0].draining == []


placement = st.tuples(st.sampled_from(["cpu0", "cpu1", "gpu0"]), st.sampled_from(["m", "n"]),
                      st.sampled_from([1, 2, 50]), st.sampled_from(["g", "h", "k"]))


@given(st.lists(st.lists(placement, max_size=6), min_size=1, max_size=5))
def test_invariants_over_any_sequence_of_plans(plans: list[list[tuple[str, str, int, str]]]) -> None:
    slots: list[Slot] = []
    for epoch, placements in enumerate(plans, start=1):
        before = {s.consumer: s.active for s in slots}
        wanted = [want(epoch, gid, model, device=dev, share=share) for dev, model, share, gid in placements]
        slots.extend(retarget(slots, wanted, epoch, gpu_devices=GPUS))
        names = [s.consumer for s in slots]
        assert len(names) == len(set(names)), "consumer names are unique"
        active = sorted((s.device, s.model, s.share, s.active.group) for s in slots if s.active is not None)
        assert active == sorted((w.device, w.model, w.share, w.task.group) for w in wanted)  # each served once
        for s in slots:
            assert all(p.epoch == epoch for p in [s.active] if p is not None)
            assert s.consumer.startswith(f"{s.device}-{s.model}-")
            assert len(s.streams) == len(set(s.streams))
            old = before.get(s.consumer)
            if old is not None:  # whatever it served before is now drained by the same slot
                assert old.stream in s.draining
        for s in [s for s in slots if s.idle]:  # the agent releases idle slots; drain everything here
            slots.remove(s)
        for s in slots:
            for stream in list(s.draining):
                s.drained(stream)
