from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from common.planning import Fragment, plan, verify_plan
from common.planning.synthetic import synthetic_profile

PROFILE = synthetic_profile({"a": (7, 1.0), "b": (5, 0.4)}, seed=2)
FRAGS = [Fragment("a1", "a", 1, 30.0, 120.0), Fragment("a2", "a", 4, 30.0, 150.0),
         Fragment("a3", "a", 5, 300.0, 40.0), Fragment("b1", "b", 2, 5000.0, 60.0),
         Fragment("bad", "a", 0, 1.0, 0.1)]


@pytest.fixture()
def good() -> dict[str, Any]:
    d = plan(PROFILE, FRAGS, "graft").to_dict()
    assert verify_plan(PROFILE, FRAGS, d) == []
    assert any(len(g["cuts"]) > 1 for g in d["groups"])  # the base plan exercises re-alignment
    return d


def first_group(d: dict[str, Any]) -> dict[str, Any]:
    return next(g for g in d["groups"] if len(g["cuts"]) > 1)


def set_field(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        first_group(d)[name] = value
    return mutate


def too_slow(d: dict[str, Any]) -> None:
    g = first_group(d)
    g["batch"] = PROFILE.max_batch
    g["share"] = 10


def too_few(d: dict[str, Any]) -> None:
    g = max(d["groups"], key=lambda g: g["rate_rps"])
    g["batch"], g["replicas"] = 1, 1


def drop_fragment(d: dict[str, Any]) -> None:
    g = first_group(d)
    g["fragments"] = g["fragments"][1:]


def twice(d: dict[str, Any]) -> None:
    d["groups"][1]["fragments"].append(d["groups"][0]["fragments"][0])


def stranger(d: dict[str, Any]) -> None:
    d["infeasible"].append({"id": "ghost", "reason": "made up"})


def false_infeasible(d: dict[str, Any]) -> None:
    d["infeasible"].append({"id": "b1", "reason": "lazy"})
    d["groups"] = [g for g in d["groups"] if "b1" not in g["fragments"]]


def crowded(d: dict[str, Any]) -> None:
    dev = d["placement"][0]
    dev["replicas"] = dev["replicas"] + [{"group": dev["replicas"][0]["group"], "share": 100}]


def unplaced(d: dict[str, Any]) -> None:
    d["placement"] = []
    d["gpus"] = 0


def bad_total(d: dict[str, Any]) -> None:
    d["total_share"] += 10


def bad_route(d: dict[str, Any]) -> None:
    d["routes"]["a:6"] = d["groups"][0]["id"]


def missing_route(d: dict[str, Any]) -> None:
    d["routes"].pop(next(iter(d["routes"])))


def no_reason(d: dict[str, Any]) -> None:
    d["infeasible"][0]["reason"] = " "


CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("batch", set_field("batch", 0), "batch"),
    ("batch-float", set_field("batch", 2.5), "batch"),
    ("batch-big", set_field("batch", PROFILE.max_batch + 1), "batch"),
    ("share", set_field("share", 33), "share"),
    ("replicas", set_field("replicas", 0), "replicas"),
    ("cuts", set_field("cuts", [0]), "cuts"),
    ("latency", too_slow, "latency"),
    ("throughput", too_few, "throughput"),
    ("report", set_field("latency_ms", 0.001), "report"),
    ("report-rate", set_field("rate_rps", 1.0), "report"),
    ("coverage-missing", drop_fragment, "coverage"),
    ("coverage-twice", twice, "coverage"),
    ("coverage-stranger", stranger, "coverage"),
    ("infeasible-false", false_infeasible, "infeasible"),
    ("infeasible-reason", no_reason, "infeasible"),
    ("placement-full", crowded, "placement"),
    ("placement-missing", unplaced, "placement"),
    ("totals", bad_total, "totals"),
    ("routes-wrong", bad_route, "routes"),
    ("routes-missing", missing_route, "routes"),
    ("rho", lambda d: d.update(rho=0), "rho"),
    ("structure", lambda d: d.pop("groups"), "structure"),
]


@pytest.mark.parametrize(("case", "mutate", "rule"), CASES, ids=[c[0] for c in CASES])
def test_each_rule_catches_its_violation(good: dict[str, Any], case: str,
                                         mutate: Callable[[dict[str, Any]], None], rule: str) -> None:
    bad = copy.deepcopy(good)
    mutate(bad)
    rules = {v.rule for v in verify_plan(PROFILE, FRAGS, bad)}
    assert rule in rules, (case, rules)


def test_too_many_replicas_on_one_gpu_breaks_the_mps_limit(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    g = bad["groups"][0]
    g["share"], g["replicas"] = 1, 49  # 1% is no grid share either; the placement rule must still fire
    bad["placement"] = [{"device": "gpu0", "replicas": [{"group": g["id"], "share": 1}] * 49}]
    messages = [str(v) for v in verify_plan(PROFILE, FRAGS, bad)]
    assert any("MPS limit" in m for m in messages)


def test_a_plan_for_another_workload_fails(good: dict[str, Any]) -> None:
    more = [*FRAGS, Fragment("late", "b", 1, 1.0, 100.0)]
    assert "coverage" in {v.rule for v in verify_plan(PROFILE, more, good)}


def test_routes_are_optional(good: dict[str, Any]) -> None:
    del good["routes"]
    assert verify_plan(PROFILE, FRAGS, good) == []
