"""What the demo reports as saved: the live plan's traffic planned per-cut vs graft on the same profile."""

from __future__ import annotations

import pytest

from common.planning.synthetic import synthetic_profile
from common.planning.types import Fragment
from services.planner.replanning import Steering, next_plan
from tools.demo import demo_table, saving


def test_saving_compares_the_same_traffic_under_both_policies() -> None:
    prof = synthetic_profile()
    model = next(iter(prof.models))
    n = prof.model(model).n_blocks
    frags = [Fragment(f"f{c}", model, c, 30.0, 400.0).to_dict() for c in range(0, n, max(1, n // 4))]
    live = next_plan(prof, {"fragments": frags}, epoch=3, rho=0.9, steering=Steering(), profile_name="p")
    got = saving(prof, live)
    assert got["per-cut"]["groups"] == len(frags) and got["graft"]["groups"] <= len(frags)
    assert 0 < got["graft"]["share"] <= got["per-cut"]["share"]
    assert got["saved"] == pytest.approx(1 - got["graft"]["share"] / got["per-cut"]["share"])
    # a slower host (the plan's latency scale) needs at least as much share under both policies
    slower = saving(prof, {**live, "latency_scale": {model: 3.0}})
    assert slower["per-cut"]["share"] >= got["per-cut"]["share"] and slower["graft"]["share"] >= got["graft"]["share"]
    summary = {"devices": 4, "cuts": {f"{model}:0": 3}, "requests": 10, "offered_rps": 5.0, "slo_attainment": 1.0,
               "met": 10, "outcomes": {"OK": 10}, "latency_ms_p50": 5.0, "latency_ms_p99": 9.0, "server_ms_p50": 3.0,
               "mean_batch": 1.5, "epochs": [3]}
    table = demo_table(summary, got, duration_s=20, models=model)
    assert table.row_count == 6
