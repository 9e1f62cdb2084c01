"""What the simulator feeds a plan: which group serves each fragment, and when its requests arrive.

A fragment goes to the group whose ``fragments`` lists its id (the planner's intent); failing that, to
the plan's ``routes`` hint for its ``(model, cut)`` and budget; failing that, to the group ingress would
pick from the groups' cuts (:meth:`common.contract.routing.PlanView.route`). A fragment the plan lists as
infeasible is not simulated, nor is one no group serves: both are reported as unserved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from common.contract.routing import GroupSpec, PlanView
from common.planning.types import Fragment

ARRIVALS = ("poisson", "uniform")
_ALIASES = {"periodic": "uniform"}


class SimulationError(ValueError):
    """The plan, workload or settings cannot be simulated as given."""


@dataclass(frozen=True, slots=True)
class Unserved:
    fragment: Fragment
    kind: str  # "infeasible" (the plan says so) or "unrouted" (no group serves it)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.fragment.to_dict(), "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Assignment:
    groups: tuple[GroupSpec, ...]  # plan order
    group_of: dict[str, int]  # fragment id -> index into groups
    unserved: tuple[Unserved, ...]


def _route_hint(route: Any, budget_ms: float) -> str | None:
    if isinstance(route, str):
        return route
    if isinstance(route, list) and route:
        entries = sorted((float(e.get("min_budget_ms", 0.0)), str(e["group"])) for e in route)
        fitting = [gid for floor, gid in entries if floor <= budget_ms]
        return fitting[-1] if fitting else entries[0][1]
    return None


def assign(plan: Mapping[str, Any], fragments: Sequence[Fragment]) -> Assignment:
    """Route every workload fragment to a plan group, or say why it is not served."""
    try:
        view = PlanView(plan)
    except (KeyError, TypeError, ValueError) as exc:
        raise SimulationError(f"malformed plan group: {type(exc).__name__}: {exc}") from None
    groups = tuple(view.groups.values())
    index = {g.id: i for i, g in enumerate(groups)}
    for g in groups:
        if g.replicas < 1 or g.batch < 1 or not g.cuts:
            raise SimulationError(f"group {g.id!r} needs at least one replica, a batch >= 1 and a cut")
    listed: dict[str, str] = {}
    for g in plan.get("groups", []):
        for fid in g.get("fragments", []):
            listed.setdefault(str(fid), str(g["id"]))
    infeasible = {str(i["id"]): str(i.get("reason", "")) for i in plan.get("infeasible", [])}
    routes = plan.get("routes") or {}

    group_of: dict[str, int] = {}
    unserved: list[Unserved] = []
    for f in fragments:
        if f.id in infeasible:
            unserved.append(Unserved(f, "infeasible", infeasible[f.id] or "the plan marks it infeasible"))
            continue
        gid = listed.get(f.id) or _route_hint(routes.get(f"{f.model}:{f.cut}"), f.budget_ms)
        if gid is None:
            spec = view.route(f.model, f.cut, f.budget_ms)
            gid = spec.id if spec is not None else None
        if gid is None:
            unserved.append(Unserved(f, "unrouted", f"no group serves {f.model} at cut {f.cut}"))
            continue
        if gid not in index:
            raise SimulationError(f"fragment {f.id!r} is routed to group {gid!r}, which the plan lacks")
        g = groups[index[gid]]
        if g.model != f.model or f.cut < g.min_cut:
            raise SimulationError(f"group {gid!r} ({g.model}, cuts from {g.min_cut}) cannot serve "
                                  f"fragment {f.id!r} ({f.model}, cut {f.cut})")
        group_of[f.id] = index[gid]
    return Assignment(groups, group_of, tuple(unserved))


def arrival_times(rates: Sequence[float], duration_s: float, rng: np.random.Generator,
                  process: str = "poisson") -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Arrival times in ``[0, duration_s)`` of every source, merged: (times, source index), by time.

    ``poisson``: independent Poisson processes. ``uniform`` (or ``periodic``): one request every
    ``1/rate`` seconds from a random phase, the smoothest load a plan can get.
    """
    process = _ALIASES.get(process, process)
    if process not in ARRIVALS:
        raise SimulationError(f"arrival process must be one of {ARRIVALS} (or 'periodic'), got {process!r}")
    chunks: list[npt.NDArray[np.float64]] = []
    owners: list[npt.NDArray[np.int64]] = []
    for i, rate in enumerate(rates):
        if not rate > 0:
            continue
        if process == "poisson":
            t = np.sort(rng.uniform(0.0, duration_s, int(rng.poisson(rate * duration_s))))
        else:
            period = 1.0 / rate
            ticks = np.arange(int(np.ceil(duration_s * rate)) + 1, dtype=np.float64)
            t = rng.uniform(0.0, period) + period * ticks
            t = t[t < duration_s]
        chunks.append(t)
        owners.append(np.full(len(t), i, dtype=np.int64))
    if not chunks:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    times, owner = np.concatenate(chunks), np.concatenate(owners)
    order = np.argsort(times, kind="stable")  # ties go to the earlier source: deterministic
    return times[order], owner[order]
