"""Placing a plan on the devices live worker agents host (services/planner/devices.py): pure logic."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.contract.routing import PlanView
from common.planning.verify import verify_plan
from services.planner.devices import (
    LiveDevices,
    assign_devices,
    device_node,
    kind_of,
    natural_key,
    needs_reassignment,
    parse_worker_status,
    shortfall,
)
from services.planner.observed import build_workload
from services.planner.replanning import Steering, next_plan, same_serving
from tests.test_planner_service import tiny_profile


def bins(*contents: list[tuple[str, int]], kind: str = "gpu") -> list[dict[str, Any]]:
    """A placement as place() names it: kind0, kind1, ... in order."""
    return [{"device": f"{kind}{i}", "replicas": [{"group": g, "share": s} for g, s in c]}
            for i, c in enumerate(contents)]


def names(placement: list[dict[str, Any]]) -> list[str]:
    return [p["device"] for p in placement]


def content(placement: list[dict[str, Any]]) -> list[Any]:
    return [p["replicas"] for p in placement]


THREE = bins([("a", 50), ("a", 50)], [("b", 40)], [("c", 30)])


def test_unknown_live_set_keeps_the_old_behaviour() -> None:
    a = assign_devices(THREE, None)
    assert names(a.placement) == ["gpu0", "gpu1", "gpu2"] and a.unplaced == []
    a = assign_devices(THREE, None, {"gpu0", "gpu2"})  # drained: renumbered past them
    assert names(a.placement) == ["gpu1", "gpu3", "gpu4"] and a.unplaced == []
    assert content(a.placement) == content(THREE)


def test_places_only_on_live_devices_and_reports_the_rest() -> None:
    a = assign_devices(THREE, {"gpu3", "gpu1"})
    assert names(a.placement)[:2] == ["gpu1", "gpu3"]  # natural order of the live devices
    assert a.unplaced == [{"device": "gpu0", "replicas": 1}]  # the lowest name nobody hosts
    assert a.unplaced_replicas == 1
    assert content(a.placement) == content(THREE)  # order and replicas untouched (replica indices)
    none = assign_devices(THREE, set())
    assert names(none.placement) == ["gpu0", "gpu1", "gpu2"]
    assert [u["replicas"] for u in none.unplaced] == [2, 1, 1]


def test_drained_and_live_together() -> None:
    a = assign_devices(THREE, {"gpu0", "gpu1", "gpu2", "gpu3"}, {"gpu1"})
    assert names(a.placement) == ["gpu0", "gpu2", "gpu3"] and a.unplaced == []
    a = assign_devices(THREE, {"gpu0", "gpu1"}, {"gpu1"})
    assert names(a.placement)[0] == "gpu0"
    assert [u["device"] for u in a.unplaced] == ["gpu2", "gpu3"]  # never a drained or live name
    assert a.unplaced_replicas == 2


def test_natural_order_and_kinds_stay_apart() -> None:
    assert sorted(["gpu10", "gpu2", "cpu1", "gpu0"], key=natural_key) == ["cpu1", "gpu0", "gpu2", "gpu10"]
    a = assign_devices(THREE, {"gpu10", "gpu2", "cpu0", "cpu1"})
    assert names(a.placement)[:2] == ["gpu2", "gpu10"] and a.unplaced_replicas == 1
    assert all(not n.startswith("cpu") for n in names(a.placement))


def test_stable_when_nothing_changed_and_sticky_when_a_device_dies() -> None:
    live = {"gpu0", "gpu1", "gpu2", "gpu5"}
    first = assign_devices(THREE, live)
    again = assign_devices(THREE, live, previous=first.placement)
    assert again == first
    # gpu1 died: its bin moves to the spare gpu5, the others stay where they were
    after = assign_devices(THREE, live - {"gpu1"}, previous=first.placement)
    assert names(after.placement) == ["gpu0", "gpu5", "gpu2"] and after.unplaced == []
    # a re-plan whose bins come out in another order still keeps each bin's device
    swapped = [THREE[2], THREE[0], THREE[1]]
    moved = assign_devices(swapped, live, previous=first.placement)
    assert names(moved.placement) == ["gpu2", "gpu0", "gpu1"]


def test_unplaced_keep_their_name_and_take_an_agent_that_comes_up() -> None:
    first = assign_devices(THREE, {"gpu0"})
    assert [u["device"] for u in first.unplaced] == ["gpu1", "gpu2"]
    assert assign_devices(THREE, {"gpu0"}, previous=first.placement) == first
    # an agent hosting exactly a missing name: same placement, smaller shortfall
    up = assign_devices(THREE, {"gpu0", "gpu2"}, previous=first.placement)
    assert names(up.placement) == names(first.placement) and up.unplaced == [{"device": "gpu1", "replicas": 1}]
    # an agent with another name: the bin moves there
    other = assign_devices(THREE, {"gpu0", "gpu7"}, previous=first.placement)
    assert names(other.placement) == ["gpu0", "gpu7", "gpu2"] and other.unplaced_replicas == 1


def test_cpu_all_devices_mode_serves_every_cpu_name() -> None:
    cpu = bins([("a", 4)], [("a", 4)], [("b", 2)], kind="cpu")
    plain = assign_devices(cpu, {"cpu0"})
    assert plain.unplaced_replicas == 2
    whole = assign_devices(cpu, {"cpu0"}, all_cpu=True)
    assert names(whole.placement) == ["cpu0", "cpu1", "cpu2"] and whole.unplaced == []
    drained = assign_devices(cpu, {"cpu0"}, {"cpu1"}, all_cpu=True)
    assert names(drained.placement) == ["cpu0", "cpu2", "cpu3"] and drained.unplaced == []
    # the whole-CPU agent says nothing about GPUs
    gpu = assign_devices(THREE, {"cpu0"}, all_cpu=True)
    assert gpu.unplaced_replicas == 4


def test_shortfall_and_needs_reassignment() -> None:
    first = assign_devices(THREE, {"gpu0", "gpu1", "gpu2"})
    plan = {"placement": first.placement, "unplaced": first.unplaced}
    assert not needs_reassignment(plan, {"gpu0", "gpu1", "gpu2"})
    assert not needs_reassignment(plan, {"gpu0", "gpu1", "gpu2", "gpu3"})  # a spare appeared: nothing to do
    assert needs_reassignment(plan, {"gpu0", "gpu2", "gpu3"})  # gpu1 died, gpu3 can take its bin
    assert needs_reassignment(plan, {"gpu0", "gpu2"})  # gpu1 died: nowhere to go, but the report changes
    assert shortfall(first.placement, {"gpu0", "gpu2"}) == [{"device": "gpu1", "replicas": 1}]
    assert not needs_reassignment(plan, None)  # unknown devices: keep the plan
    short = assign_devices(THREE, {"gpu0"})
    plan = {"placement": short.placement, "unplaced": short.unplaced}
    assert not needs_reassignment(plan, {"gpu0"})
    assert needs_reassignment(plan, {"gpu0", "gpu1"})  # an unplaced bin can now run
    assert needs_reassignment({"placement": short.placement}, {"gpu0"})  # no report yet: one is due


def test_host_qualified_names_have_the_kind_after_the_slash() -> None:
    assert [kind_of(n) for n in ("gpu3", "a/gpu3", "gpu-host-1/cpu0", "x.y/gpu")] == ["gpu", "gpu", "cpu", "gpu"]
    assert [device_node(n) for n in ("gpu3", "a/gpu3", "gpu-host-1/cpu0")] == ["", "a", "gpu-host-1"]
    # index before node: one GPU of each host in turn; plain names first at each index
    assert sorted(["b/gpu1", "a/gpu1", "gpu1", "b/gpu0", "a/gpu0", "a/cpu0", "a/gpu10"], key=natural_key) == [
        "a/cpu0", "a/gpu0", "b/gpu0", "gpu1", "a/gpu1", "b/gpu1", "a/gpu10"]


def test_bins_spread_over_the_gpus_of_several_hosts() -> None:
    two = assign_devices(THREE, {"a/gpu0", "b/gpu0"})
    # place() named the bins gpu0..gpu2; they land on both hosts, and the third is reported with a plain
    # synthetic name (no host has claimed it)
    assert names(two.placement) == ["a/gpu0", "b/gpu0", "gpu0"]
    assert two.unplaced == [{"device": "gpu0", "replicas": 1}]
    four = {"a/gpu0", "a/gpu1", "b/gpu0", "b/gpu1"}
    first = assign_devices(THREE, four)
    assert names(first.placement) == ["a/gpu0", "b/gpu0", "a/gpu1"] and first.unplaced == []
    assert content(first.placement) == content(THREE)
    assert assign_devices(THREE, four, previous=first.placement) == first  # stable
    # host b goes: a's bins stay; b's keeps its name, reported, until another host comes up
    gone = assign_devices(THREE, {"a/gpu0", "a/gpu1"}, previous=first.placement)
    assert names(gone.placement) == ["a/gpu0", "b/gpu0", "a/gpu1"]
    assert gone.unplaced == [{"device": "b/gpu0", "replicas": 1}]
    back = assign_devices(THREE, {"a/gpu0", "a/gpu1", "c/gpu0"}, previous=gone.placement)
    assert names(back.placement) == ["a/gpu0", "c/gpu0", "a/gpu1"] and back.unplaced == []
    # a plain name and a qualified one are different devices; draining one leaves the other
    assert names(assign_devices(THREE, {"gpu0", "a/gpu0", "b/gpu0"}).placement) == ["gpu0", "a/gpu0", "b/gpu0"]
    drained = assign_devices(THREE, {"a/gpu0", "b/gpu0", "b/gpu1"}, {"a/gpu0", "gpu1"})
    assert names(drained.placement) == ["b/gpu0", "b/gpu1", "gpu0"] and drained.unplaced_replicas == 1
    assert shortfall(first.placement, {"a/gpu0", "a/gpu1", "gpu0"}) == [{"device": "b/gpu0", "replicas": 1}]
    plan = {"placement": first.placement, "unplaced": first.unplaced}
    assert not needs_reassignment(plan, four)
    assert needs_reassignment(plan, four - {"b/gpu0"} | {"b/gpu2"})


def test_whole_cpu_agents_serve_the_cpu_devices_of_their_own_node() -> None:
    cpu = bins([("a", 4)], [("a", 4)], [("b", 2)], [("c", 1)], kind="cpu")
    one = assign_devices(cpu, {"a/cpu0"}, all_cpu={"a"})
    assert names(one.placement) == ["a/cpu0", "a/cpu1", "a/cpu2", "a/cpu3"] and one.unplaced == []
    # an agent of node a says nothing about plain cpuN nor about node b's
    assert shortfall([{"device": "cpu1", "replicas": [{"group": "a", "share": 1}]},
                      {"device": "b/cpu1", "replicas": [{"group": "a", "share": 1}]},
                      {"device": "a/cpu7", "replicas": [{"group": "a", "share": 1}]}], {"a/cpu0"},
                     all_cpu={"a"}) == [{"device": "cpu1", "replicas": 1}, {"device": "b/cpu1", "replicas": 1}]
    # two whole-CPU hosts take the bins in turn, past drained devices
    two = assign_devices(cpu, {"a/cpu0", "b/cpu0"}, {"b/cpu1"}, all_cpu={"a", "b"})
    assert names(two.placement) == ["a/cpu0", "b/cpu0", "a/cpu1", "a/cpu2"] and two.unplaced == []
    # True still means an agent without a node: plain cpuN, next to node a's live cpu0
    legacy = assign_devices(cpu, {"a/cpu0"}, all_cpu=True)
    assert names(legacy.placement) == ["a/cpu0", "cpu0", "cpu1", "cpu2"] and legacy.unplaced == []
    # the plain whole-CPU case is unchanged
    assert names(assign_devices(cpu, {"cpu0"}, all_cpu={""}).placement) == ["cpu0", "cpu1", "cpu2", "cpu3"]
    plan = {"placement": one.placement, "unplaced": one.unplaced}
    assert not needs_reassignment(plan, {"a/cpu0"}, all_cpu={"a"})
    assert needs_reassignment(plan, {"a/cpu0"}, all_cpu={"b"})  # a's whole-CPU agent left: a report is due


PLAIN = [f"gpu{i}" for i in range(8)] + ["cpu0", "cpu1"]
QUALIFIED = [f"{n}/{d}{i}" for n in "ab" for d, i in (("gpu", 0), ("gpu", 1), ("gpu", 3), ("cpu", 0), ("cpu", 2))]
live_sets = st.sets(st.sampled_from(PLAIN + QUALIFIED), max_size=12)
cpu_nodes = st.one_of(st.booleans(), st.sets(st.sampled_from(["", "a", "b"]), max_size=2))
placements = st.lists(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from([10, 20, 50])), min_size=1,
                               max_size=3), min_size=0, max_size=7)


@settings(max_examples=300, deadline=None)
@given(raw=placements, live=live_sets, drained=live_sets, prev_live=live_sets, all_cpu=cpu_nodes,
       kind=st.sampled_from(["gpu", "cpu"]))
def test_assignment_properties(raw: list[list[tuple[str, int]]], live: set[str], drained: set[str],
                               prev_live: set[str], all_cpu: bool | set[str], kind: str) -> None:
    placement = bins(*raw, kind=kind)
    previous = assign_devices(placement, prev_live, all_cpu=all_cpu).placement
    a = assign_devices(placement, live, drained, all_cpu=all_cpu, previous=previous)
    got = names(a.placement)
    # complete and well formed: same bins in the same order, distinct names of the bin's kind
    assert content(a.placement) == content(placement)
    assert len(set(got)) == len(got) and all(kind_of(n) == kind for n in got)
    assert not set(got) & drained  # never on a drained device
    usable = {n for n in live - drained if kind_of(n) == kind}
    whole = ({""} if all_cpu else set()) if isinstance(all_cpu, bool) else all_cpu  # nodes of whole-CPU agents
    served = [n for n in got if n in usable or (kind == "cpu" and device_node(n) in whole)]
    # honest: what is not on a served device is reported, with its replica count, and nothing else is
    assert [u["device"] for u in a.unplaced] == [n for n in got if n not in served]
    assert Counter(u["device"] for u in a.unplaced) == Counter({p["device"]: 1 for p in a.placement
                                                                if p["device"] not in served})
    assert all(u["replicas"] == len(p["replicas"]) for u in a.unplaced for p in a.placement
               if p["device"] == u["device"])
    # no shortfall while live devices are left: a dead or missing device is only used when they ran out
    assert not a.unplaced or usable <= set(got)
    if not (whole and kind == "cpu"):
        assert len(a.unplaced) == max(0, len(placement) - len(usable))
    else:
        assert a.unplaced == []
    assert shortfall(a.placement, live, drained, all_cpu=all_cpu) == a.unplaced
    # a fixpoint: assigning again on the same devices changes nothing
    assert assign_devices(a.placement, live, drained, all_cpu=all_cpu, previous=a.placement) == a
    plan = {"placement": a.placement, "unplaced": a.unplaced}
    assert not needs_reassignment(plan, live, drained, all_cpu=all_cpu)
    # sticky: a bin whose previous device still serves keeps it (when that bin's content is unique)
    sigs = Counter(tuple(sorted(map(tuple, c))) for c in raw)
    for p, q, c in zip(previous, a.placement, raw, strict=True):
        if sigs[tuple(sorted(map(tuple, c)))] == 1 and p["device"] in usable:
            assert q["device"] == p["device"]


def test_live_devices_grace() -> None:
    d = LiveDevices(grace_s=2.0, misses=2)
    assert d.live is None and not d.all_cpu
    assert d.observe({"gpu0", "gpu1"}, False, 0.0) == ({"gpu0", "gpu1"}, set())
    assert d.live == {"gpu0", "gpu1"}
    assert d.observe({"gpu0"}, False, 1.0) == (set(), set())  # one missed scan: still live
    assert d.observe({"gpu0"}, False, 1.5) == (set(), set())  # two, but not 2 s yet
    assert d.observe({"gpu0", "gpu1"}, False, 2.5) == (set(), set())  # back: the count restarts
    assert d.observe({"gpu0"}, False, 3.0) == (set(), set())
    assert d.observe({"gpu0"}, False, 10.0) == (set(), {"gpu1"})  # two scans 7 s apart
    assert d.live == {"gpu0"}
    assert d.observe({"gpu0", "gpu4"}, True, 11.0) == ({"gpu4", "cpu*"}, set())  # appearing is immediate
    assert d.live == {"gpu0", "gpu4"} and d.all_cpu
    d.observe({"gpu0", "gpu4"}, False, 12.0)
    assert d.all_cpu
    assert d.observe(set(), False, 20.0) == (set(), {"cpu*"})  # missed since 12.0: gone
    assert d.live == {"gpu0", "gpu4"}
    assert d.observe(set(), False, 23.0) == (set(), {"gpu0", "gpu4"})
    assert d.live == set() and not d.all_cpu


def test_live_devices_follow_whole_cpu_agents_per_node() -> None:
    d = LiveDevices(grace_s=0.0, misses=1)
    assert d.all_cpu_nodes == frozenset()
    assert d.observe({"a/cpu0", "b/gpu0"}, {"a"}, 0.0) == ({"a/cpu0", "b/gpu0", "a/cpu*"}, set())
    assert d.live == {"a/cpu0", "b/gpu0"} and d.all_cpu and d.all_cpu_nodes == {"a"}
    assert d.observe({"a/cpu0", "b/gpu0", "cpu0"}, {"a", ""}, 1.0) == ({"cpu0", "cpu*"}, set())
    assert d.all_cpu_nodes == {"a", ""}
    assert d.observe({"b/gpu0", "cpu0"}, {""}, 2.0) == (set(), {"a/cpu0", "a/cpu*"})
    assert d.live == {"b/gpu0", "cpu0"} and d.all_cpu_nodes == {""}


@pytest.mark.parametrize(("status", "want"), [
    ({"devices": ["gpu0", "gpu1"]}, (["gpu0", "gpu1"], None)),
    ({"devices": ["cpu0"], "all_cpu_devices": True}, (["cpu0"], "")),
    ({"devices": "gpu0"}, ([], None)),
    ({"devices": ["gpu0", 3, None, "", "x" * 100, "cpu*", "gpu 1"]}, (["gpu0"], None)),
    ({}, ([], None)),
    ({"devices": [], "all_cpu_devices": "yes"}, ([], None)),
    # host-qualified names; the whole-CPU agent's node from its heartbeat, else from its devices
    ({"devices": ["a/gpu0", "a/gpu1"], "node": "a"}, (["a/gpu0", "a/gpu1"], None)),
    ({"devices": ["a/cpu0", "a/cpu1"], "node": "a", "all_cpu_devices": True}, (["a/cpu0", "a/cpu1"], "a")),
    ({"devices": ["a/cpu0"], "all_cpu_devices": True}, (["a/cpu0"], "a")),
    ({"devices": ["cpu0"], "node": "no/slash", "all_cpu_devices": True}, (["cpu0"], "")),
    ({"devices": ["gpu-host-1/gpu0", "bad node/gpu0", "/gpu0", "a/b/gpu0", "a/cpu*", "a/"]},
     (["gpu-host-1/gpu0"], None)),
])
def test_parse_worker_status(status: dict[str, Any], want: tuple[list[str], str | None]) -> None:
    assert parse_worker_status(status) == want


def test_next_plan_places_on_live_devices_verifies_and_keeps_same_serving() -> None:
    prof = tiny_profile()
    wl = build_workload({("m", 0, 40.0): 900.0, ("m", 2, 40.0): 900.0}, {"m": 4})
    from common.planning.types import workload_from_dict
    frags = workload_from_dict(wl)
    base = next_plan(prof, wl, epoch=1, rho=0.9, steering=Steering(), profile_name="t")
    n_dev = len(base["placement"])
    assert n_dev >= 2 and base["unplaced"] == []  # live unknown: positional names, nothing reported
    live = {"gpu3"}
    plan = next_plan(prof, wl, epoch=2, rho=0.9, steering=Steering(), profile_name="t", live=live)
    assert names(plan["placement"])[0] == "gpu3"
    assert sum(u["replicas"] for u in plan["unplaced"]) == sum(len(p["replicas"]) for p in plan["placement"][1:])
    assert not {u["device"] for u in plan["unplaced"]} & live
    assert verify_plan(prof, frags, plan) == []  # extra keys do not break verification
    view = PlanView(plan)  # nor the data plane's view of it
    assert [p.device for p in view.placements() if p.device == "gpu3"]
    # same groups and devices, another unplaced report: still the same serving
    assert same_serving(plan, {**plan, "unplaced": [], "workload": []})
    again = next_plan(prof, wl, epoch=3, rho=0.9, steering=Steering(), profile_name="t", live=live,
                      previous=plan["placement"])
    assert names(again["placement"]) == names(plan["placement"]) and same_serving(plan, again)
    # a device dies: its replicas move to a spare, and that is not the same serving any more
    more = {f"gpu{i}" for i in range(n_dev + 1)}
    full = next_plan(prof, wl, epoch=4, rho=0.9, steering=Steering(), profile_name="t", live=more,
                     previous=plan["placement"])
    assert full["unplaced"] == [] and set(names(full["placement"])) <= more
    dead = next(iter(set(names(full["placement"])) - {"gpu3"}))
    moved = next_plan(prof, wl, epoch=5, rho=0.9, steering=Steering(), profile_name="t", live=more - {dead},
                      previous=full["placement"])
    assert dead not in names(moved["placement"]) and moved["unplaced"] == []
    assert not same_serving(full, moved)
    assert verify_plan(prof, frags, moved) == []


def test_plan_table_names_unplaced_replicas() -> None:
    from rich.console import Console

    from tools.cli_admin import plan_table

    plan = {"epoch": 3, "policy": "graft", "total_share": 100, "gpus": 2, "groups": [],
            "unplaced": [{"device": "gpu1", "replicas": 2}]}
    console = Console(width=200, record=True)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "unplaced" in text and "gpu1 (2 replicas)" in text
    console = Console(width=200, record=True)
    console.print(plan_table({**plan, "unplaced": []}))
    assert "unplaced" not in console.export_text()
