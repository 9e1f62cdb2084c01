"""A read-only view of a published plan for the data plane: routing, group specs, placement.

Routing derives from the groups themselves (a group serves ``(model, cut)`` for every cut in its
``cuts``), so it needs nothing from the plan's ``routes`` hint. When budget classes put one
``(model, cut)`` into several groups, a request goes to the loosest group whose ``min_budget_ms`` its
own budget still covers (bigger batches), else to the tightest group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.contract import keys
from common.contract.errors import BadCut


@dataclass(frozen=True, slots=True)
class GroupSpec:
    id: str
    model: str
    cuts: tuple[int, ...]
    batch: int
    share: int
    replicas: int
    latency_ms: float
    min_budget_ms: float
    rate_rps: float

    @property
    def min_cut(self) -> int:
        return min(self.cuts)


@dataclass(frozen=True, slots=True)
class Placement:
    device: str
    group: str
    share: int
    index: int  # replica index of that group on this device (stable consumer names)


class PlanView:
    def __init__(self, plan: Mapping[str, Any]) -> None:
        self.raw = dict(plan)
        self.epoch = int(plan.get("epoch", 0))
        self.policy = str(plan.get("policy", ""))
        self.groups: dict[str, GroupSpec] = {}
        for g in plan.get("groups", []):
            spec = GroupSpec(
                id=str(g["id"]), model=str(g["model"]), cuts=tuple(int(c) for c in g["cuts"]),
                batch=int(g["batch"]), share=int(g["share"]), replicas=int(g["replicas"]),
                latency_ms=float(g.get("latency_ms", 0.0)),
                min_budget_ms=float(g.get("min_budget_ms", 0.0) or 0.0),
                rate_rps=float(g.get("rate_rps", 0.0) or 0.0),
            )
            self.groups[spec.id] = spec
        self._routes: dict[tuple[str, int], list[GroupSpec]] = {}
        for spec in self.groups.values():
            for c in spec.cuts:
                self._routes.setdefault((spec.model, c), []).append(spec)
        for cands in self._routes.values():
            cands.sort(key=lambda s: (s.min_budget_ms, s.id))
        self.models = frozenset(s.model for s in self.groups.values())

    def route(self, model: str, cut: int, budget_ms: float) -> GroupSpec | None:
        cands = self._routes.get((model, cut))
        if not cands:
            return None
        fitting = [s for s in cands if s.min_budget_ms <= budget_ms]
        return fitting[-1] if fitting else cands[0]

    def resolve(self, model: str, cut: int, budget_ms: float) -> GroupSpec:
        """``route``, and a cut no group lists joins the group of that model that starts nearest below it
        (re-aligned execution runs any cut at or above a group's first cut). Raises ``BadCut`` when no
        group of ``model`` starts at or below ``cut`` (callers check that the model is served first)."""
        spec = self.route(model, cut, budget_ms)
        if spec is not None:
            return spec
        below = [s for s in self.groups.values() if s.model == model and s.min_cut <= cut]
        if not below:
            raise BadCut(f"cut {cut} of {model} is not served by plan epoch {self.epoch}",
                         model=model, cut=cut, epoch=self.epoch)
        nearest = max(s.min_cut for s in below)
        cands = sorted((s for s in below if s.min_cut == nearest), key=lambda s: (s.min_budget_ms, s.id))
        fitting = [s for s in cands if s.min_budget_ms <= budget_ms]
        return fitting[-1] if fitting else cands[0]

    def stream(self, gid: str) -> str:
        return keys.group_stream(self.epoch, gid)

    def streams(self) -> dict[str, str]:
        return {gid: self.stream(gid) for gid in self.groups}

    def placements(self, device: str | None = None) -> list[Placement]:
        """Replicas placed on ``device`` (all devices when None), with a per-group replica index."""
        out: list[Placement] = []
        counter: dict[str, int] = {}
        for dev in self.raw.get("placement", []):
            name = str(dev.get("device"))
            for rep in dev.get("replicas", []):
                gid = str(rep["group"])
                idx = counter.get(gid, 0)
                counter[gid] = idx + 1
                if device is None or name == device:
                    out.append(Placement(name, gid, int(rep["share"]), idx))
        return out

    def devices(self) -> list[str]:
        return [str(d.get("device")) for d in self.raw.get("placement", [])]
