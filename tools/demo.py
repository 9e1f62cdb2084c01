"""What ``graft up --demo`` shows a newcomer: the traffic, what the users saw, and what re-alignment saved.

The demo drives emulated phones (their cuts picked by the partitioner from a synthetic uplink) against
the live system for a warm-up — long enough for the planner to re-plan from the traffic it sees —
then measures. ``saving`` compares the plan the live system ran with the plan ``per-cut`` serving (one
group per fragment, no re-alignment: what GSLICE-style spatial sharing gives) would need for the same
traffic on the same profile, both costed by the planner's own rules (design section 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from common.planning.policies import plan as make_plan
from common.planning.types import workload_from_dict
from common.profiles import Profile


def saving(profile: Profile, live_plan: Mapping[str, Any]) -> dict[str, Any]:
    """The live plan's required share beside per-cut's for the traffic the live plan was made for."""
    scale = live_plan.get("latency_scale") or {}
    prof = profile.scaled({m: float(f) for m, f in scale.items() if m in profile.models}) if scale else profile
    frags = workload_from_dict({"fragments": list(live_plan.get("workload") or [])})
    per_cut = make_plan(prof, frags, "per-cut", rho=float(live_plan.get("rho", 0.9)))
    graft = make_plan(prof, frags, "graft", rho=float(live_plan.get("rho", 0.9)))
    return {
        "graft": {"groups": len(graft.groups), "share": graft.required_share,
                  "replicas": sum(g.replicas - g.spares for g in graft.groups)},
        "per-cut": {"groups": len(per_cut.groups), "share": per_cut.required_share,
                    "replicas": sum(g.replicas - g.spares for g in per_cut.groups)},
        "saved": 1.0 - graft.required_share / per_cut.required_share if per_cut.required_share else 0.0,
        "unit": "threads" if profile.unit == "cpu_threads" else "% of a GPU",
    }


def demo_table(s: Mapping[str, Any], saved: Mapping[str, Any], *, duration_s: float, models: str) -> Table:
    t = Table(title=f"Graft demo · {s['devices']} emulated phones · {models} · {duration_s:.0f} s measured",
              show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    cuts = s["cuts"]
    t.add_row("traffic", f"{s['requests']} requests ({s['offered_rps']:.0f}/s) at {len(cuts)} different cuts: "
              + ", ".join(f"{k}×{v}" for k, v in list(cuts.items())[:8]) + (" …" if len(cuts) > 8 else ""))
    t.add_row("SLO met, measured at the phone", f"{100 * s['slo_attainment']:.1f}%  ({s['met']} answered OK within "
              f"their budget; {', '.join(f'{k} {v}' for k, v in s['outcomes'].items())})")
    t.add_row("latency p50 / p99", f"{s['latency_ms_p50']:.1f} / {s['latency_ms_p99']:.1f} ms "
              f"(server share of it: {s['server_ms_p50']:.1f} ms at p50)")
    t.add_row("mean batch", f"{s['mean_batch']:.2f} requests per model pass (fragments of different cuts "
              f"re-aligned into one batch)")
    g, p = saved["graft"], saved["per-cut"]
    t.add_row("compute the plan needs", f"graft: {g['groups']} group(s), {g['share']} {saved['unit']}  ·  per-cut "
              f"serving: {p['groups']} groups, {p['share']} {saved['unit']}  →  {100 * saved['saved']:.0f}% less")
    t.add_row("plan epochs seen", ", ".join(map(str, s["epochs"])))
    return t
