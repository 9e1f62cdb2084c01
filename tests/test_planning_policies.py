from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.planning import Fragment, PlanningError, plan, verify_plan
from common.planning.synthetic import synthetic_profile

PROFILE = synthetic_profile({"a": (7, 1.0), "b": (5, 0.4)}, seed=2)
RATES = [0.0, 0.2, 1.0, 5.0, 15.0, 30.0, 120.0, 400.0]


@st.composite
def workloads(draw: st.DrawFn, per_model: int = 6) -> list[Fragment]:
    frags: list[Fragment] = []
    for model, n_blocks in (("a", 7), ("b", 5)):
        for _ in range(draw(st.integers(0, per_model))):
            frags.append(Fragment(f"f{len(frags)}", model, draw(st.integers(0, n_blocks - 1)),
                                  draw(st.sampled_from(RATES)), draw(st.floats(1.0, 300.0))))
    if draw(st.booleans()):  # fragments no plan can serve
        frags.append(Fragment(f"f{len(frags)}", "a", 99, 1.0, 100.0))
        frags.append(Fragment(f"f{len(frags)}", "nope", 0, 1.0, 100.0))
    return frags


def alone_infeasible(f: Fragment) -> bool:
    if f.model not in PROFILE.models or not 0 <= f.cut < PROFILE.model(f.model).n_blocks:
        return True
    m = PROFILE.model(f.model)
    return 2 * min(m.suffix_latency(f.cut, 1, g) for g in m.shares) > f.budget_ms


@settings(max_examples=60, deadline=None)
@given(workloads())
def test_every_policy_emits_valid_plans_and_graft_sits_between_oracle_and_per_cut(frags: list[Fragment]) -> None:
    plans = {p: plan(PROFILE, frags, p) for p in ("per-cut", "graft", "oracle")}
    for name, p in plans.items():
        assert verify_plan(PROFILE, frags, p.to_dict()) == [], name
    assert plans["oracle"].total_share <= plans["graft"].total_share <= plans["per-cut"].total_share
    for p in plans.values():
        assert {i.id for i in p.infeasible} == {f.id for f in frags if alone_infeasible(f)}
        assert all(i.reason for i in p.infeasible)
        served = [fid for g in p.groups for fid in g.fragments]
        assert sorted(served + [i.id for i in p.infeasible]) == sorted(f.id for f in frags)


@settings(max_examples=25, deadline=None)
@given(workloads(per_model=12))
def test_plans_are_deterministic_and_ignore_input_order(frags: list[Fragment]) -> None:
    first = plan(PROFILE, frags, "graft", epoch=4)
    assert plan(PROFILE, frags, "graft", epoch=4).to_dict() == first.to_dict()
    shuffled = list(frags)
    random.Random(0).shuffle(shuffled)
    again = plan(PROFILE, shuffled, "graft", epoch=4)
    key = [(g.id, g.fragments, g.batch, g.share, g.replicas) for g in first.groups]
    assert [(g.id, g.fragments, g.batch, g.share, g.replicas) for g in again.groups] == key


def test_graft_regroups_light_fragments_of_many_cuts() -> None:
    frags = [Fragment(f"c{i}", "a", i % 7, 2.0, 200.0) for i in range(28)]
    per_cut, graft = plan(PROFILE, frags, "per-cut"), plan(PROFILE, frags, "graft")
    assert len(per_cut.groups) == 7 and all(len(g.cuts) == 1 for g in per_cut.groups)
    assert len(graft.groups) < len(per_cut.groups)
    assert graft.total_share < per_cut.total_share
    assert max(len(g.cuts) for g in graft.groups) > 1
    assert graft.groups[0].id == "a-g0"
    assert graft.routes["a:0"] == "a-g0"


def test_budget_classes_show_up_as_budget_ordered_routes() -> None:
    # the tight client alone needs batch 1 on half a GPU; with it, 1000 req/s would need that too
    tight = 2 * PROFILE.model("a").suffix_latency(3, 1, 50) * 1.01
    frags = [Fragment(f"c{i}", "a", 3, 100.0, 250.0) for i in range(10)] + [Fragment("t", "a", 3, 1.0, tight)]
    p = plan(PROFILE, frags, "graft")
    assert p.total_share < plan(PROFILE, frags, "per-cut").total_share
    route = p.routes["a:3"]
    assert isinstance(route, list) and len(route) == 2
    assert route[0]["min_budget_ms"] == pytest.approx(tight) and route[1]["min_budget_ms"] == 250.0
    assert p.group(route[0]["group"]).fragments == ("t",)
    assert verify_plan(PROFILE, frags, p.to_dict()) == []


def test_infeasible_fragments_are_reported_with_the_reason() -> None:
    frags = [Fragment("ok", "a", 2, 1.0, 200.0), Fragment("short", "a", 0, 1.0, 0.5),
             Fragment("cut", "b", 9, 1.0, 200.0), Fragment("model", "zzz", 0, 1.0, 200.0)]
    p = plan(PROFILE, frags, "graft")
    reasons = {i.id: i.reason for i in p.infeasible}
    assert set(reasons) == {"short", "cut", "model"}
    assert "budget 0.50 ms" in reasons["short"] and "2·L" in reasons["short"]
    assert "cut 9" in reasons["cut"] and "zzz" in reasons["model"]
    assert [g.fragments for g in p.groups] == [("ok",)]


def test_oracle_refuses_instances_beyond_its_limit() -> None:
    frags = [Fragment(f"c{i}", "a", i % 7, 1.0, 200.0) for i in range(5)]
    assert plan(PROFILE, frags, "oracle", oracle_limit=5).total_share > 0
    with pytest.raises(PlanningError, match="at most 4"):
        plan(PROFILE, frags, "oracle", oracle_limit=4)


def test_bad_inputs_are_refused() -> None:
    frags = [Fragment("x", "a", 1, 1.0, 100.0)]
    with pytest.raises(PlanningError, match="unknown policy"):
        plan(PROFILE, frags, "magic")
    with pytest.raises(PlanningError, match="rho"):
        plan(PROFILE, frags, "graft", rho=1.5)
    with pytest.raises(PlanningError, match="twice"):
        plan(PROFILE, frags * 2, "graft")


def test_an_empty_workload_gives_an_empty_plan() -> None:
    p = plan(PROFILE, [], "graft", epoch=7)
    assert p.to_dict()["groups"] == [] and p.total_share == 0 and p.gpus == 0 and p.epoch == 7
